// The web console in the npm package: `npm pack` builds it into dist/console (prepack), the package
// carries those files and no other part of dist/, and what an installed package (no esbuild) reads
// back from there is exactly the build.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { buildConsole, writeConsole } from '../src/console/build.ts';
import { prebuiltConsoleFiles } from '../src/build/source-tree.ts';
import { ROOT, tempDir } from './helpers.ts';

test('npm pack carries the built console and nothing else of dist/', () => {
  // (npm runs prepack with node_modules/.bin first on the PATH: the pinned Node.)
  const out = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts=false'], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const files = (JSON.parse(out) as { files: { path: string }[] }[])[0].files.map((f) => f.path);
  const dist = files.filter((f) => f.startsWith('dist/'));
  assert.ok(dist.includes('dist/console/index.html') && dist.includes('dist/console/manifest.json'), dist.join(' '));
  assert.deepEqual(dist.filter((f) => !f.startsWith('dist/console/')), []);
  assert.ok(dist.some((f) => /^dist\/console\/app-\w+\.js$/.test(f)));
  assert.equal(files.some((f) => f.startsWith('node_modules/')), false);
});

test('an installed package reads back the files the build wrote', async () => {
  const dir = tempDir('orchard-console-dist-');
  try {
    const written = await writeConsole(dir);
    const read = prebuiltConsoleFiles(pathToFileURL(dir + '/'));
    assert.deepEqual(read.map((f) => [f.name, f.type, f.body.length]), written.map((f) => [f.name, f.type, f.body.length]));
    // With their compressed copies, made at build time (scripts and style sheets; not the page).
    const encodings = (files: typeof read) => files.map((f) => [f.name, Object.fromEntries(Object.entries(f.encoded ?? {}).map(([e, b]) => [e, b.length]))]);
    assert.deepEqual(encodings(read), encodings(written));
    for (const f of read) assert.deepEqual(Object.keys(f.encoded ?? {}).sort(), f.name === 'index.html' ? [] : ['br', 'gzip'], f.name);
    assert.deepEqual(read.map((f) => f.name).sort(), (await buildConsole()).map((f) => f.name).sort(), 'the build is reproducible: same hashed names');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
