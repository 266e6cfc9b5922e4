// What the program reads from its source tree at run time: its version, its git commit and its asset
// files. This is the checkout's version of the module; the single executable (`npm run build`,
// scripts/build.ts) is bundled with single-executable.ts beside it instead, which serves the same
// things from inside the executable. Both export the same names.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type { AssetName } from './assets.ts';
import { CONSOLE_MANIFEST, ENCODED_SUFFIX, type ConsoleFile, type ConsoleManifestEntry } from '../console/files.ts';
import { basename } from 'node:path';

const ROOT = new URL('../../', import.meta.url);

export const VERSION: string = (JSON.parse(readFileSync(new URL('package.json', ROOT), 'utf8')) as { version: string }).version;

let commit: string | undefined;
/** The checkout's commit (short hash, "-dirty" with uncommitted changes), or "dev" without git. */
export function buildCommit(): string {
  if (commit === undefined) {
    try {
      const git = (...args: string[]) => execFileSync('git', args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5_000 }).trim();
      commit = git('rev-parse', '--short=12', 'HEAD') + (git('status', '--porcelain', '--untracked-files=no') ? '-dirty' : '');
    } catch {
      commit = 'dev';
    }
  }
  return commit;
}

/** The text of an asset file. */
export function assetText(name: AssetName): string {
  return readFileSync(new URL(`src/${name}`, ROOT), 'utf8');
}

let consoleBuild: Promise<ConsoleFile[]> | undefined;
/**
 * The web console's files: in a checkout bundled by esbuild (a dev dependency) when first asked for;
 * in an installed npm package, which has no dev dependencies, the ones `npm pack` built into
 * dist/console (scripts/console-dist.ts).
 */
export function consoleFiles(): Promise<ConsoleFile[]> {
  consoleBuild ??= import('../console/build.ts').then(
    // (A quicker brotli than a release's: this build runs when the console is first asked for.)
    (m) => m.buildConsole({ brotliQuality: 5 }),
    (err: NodeJS.ErrnoException) => {
      if (err.code !== 'ERR_MODULE_NOT_FOUND') throw err;
      return prebuiltConsoleFiles(new URL('dist/console/', ROOT));
    },
  );
  return consoleBuild;
}

/** The console's files as scripts/console-dist.ts wrote them into `dir`. */
export function prebuiltConsoleFiles(dir: URL): ConsoleFile[] {
  const manifest = JSON.parse(readFileSync(new URL(basename(CONSOLE_MANIFEST), dir), 'utf8')) as ConsoleManifestEntry[];
  const read = (name: string) => readFileSync(new URL(name, dir));
  return manifest.map(({ name, type, encodings = [] }) => ({ name, type, body: read(name), encoded: Object.fromEntries(encodings.map((e) => [e, read(name + ENCODED_SUFFIX[e])])) }));
}

/** true in the single executable. */
export const SINGLE_EXECUTABLE = false;
