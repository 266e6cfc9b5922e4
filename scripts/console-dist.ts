// npm's prepack: the web console's files into dist/console, so that an installed package (which has
// no dev dependencies: no esbuild, no Preact) serves them as built (src/build/source-tree.ts).
import { join, resolve } from 'node:path';
import { writeConsole } from '../src/console/build.ts';

const dir = join(resolve(import.meta.dirname, '..'), 'dist', 'console');
const files = await writeConsole(dir);
process.stderr.write(`console-dist: ${files.length} files in ${dir}\n`);
