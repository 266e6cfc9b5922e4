// npm run build [-- --host-only]: Orchard as one executable file per platform, with nothing else to
// install (Node's single executable applications, SEA):
//   1. esbuild bundles src/cli/main.ts and every dependency into one CommonJS script, with
//      src/build/single-executable.ts in place of src/build/source-tree.ts (version and commit fixed
//      now, asset files read from inside the executable);
//   2. the pinned Node (node_modules/node) makes a SEA preparation blob of it and the asset files;
//   3. postject injects the blob into a copy of the Node binary of each platform, at exactly the
//      pinned version: this host's is node_modules/node's own, other platforms' come from the npm
//      registry's node-<platform>-<arch> packages (`npm pack`, cached in node_modules/.cache).
// Writes dist/orchard-linux-x64 and dist/orchard-linux-arm64 (--host-only: this host's only, no
// download) and dist/orchard.blob, the blob without code cache for other platforms (README: macOS).
// Only this host's executable carries V8's code cache: a code cache is specific to the CPU it was
// made for.
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, join, relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import * as esbuild from 'esbuild';
import { ASSETS, LAZY_SCRIPT, LAZY_WRAPPER } from '../src/build/assets.ts';
import { writeConsole } from '../src/console/build.ts';
import { orchardNodeFlags } from './node-flags.ts';
import { CONSOLE_MANIFEST, ENCODED_SUFFIX, type ConsoleEncoding } from '../src/console/files.ts';

const ROOT = resolve(import.meta.dirname, '..');
const DIST = join(ROOT, 'dist');
const WORK = join(DIST, '.build');
const CACHE = join(ROOT, 'node_modules', '.cache', 'orchard-sea');
const NODE = join(ROOT, 'node_modules', 'node', 'bin', 'node');
// From Node's single executable applications documentation (v24): the fuse postject flips.
const SENTINEL_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

const { values: args } = parseArgs({ options: { 'host-only': { type: 'boolean' }, 'no-code-cache': { type: 'boolean' } } });
const say = (msg: string) => process.stderr.write(`build: ${msg}\n`);
const t0 = performance.now();
const elapsed = () => `${((performance.now() - t0) / 1000).toFixed(1)}s`;

const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
// The exact Node version package-lock.json pins (the `node` package's version is Node's).
const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { version?: string }> };
const nodeVersion = lock.packages['node_modules/node']?.version;
if (!nodeVersion) throw new Error('package-lock.json pins no version of the "node" package');
const hostNodeVersion = execFileSync(NODE, ['--version'], { encoding: 'utf8' }).trim();
if (hostNodeVersion !== `v${nodeVersion}`) throw new Error(`${NODE} is ${hostNodeVersion}, package-lock.json pins ${nodeVersion}: run npm ci`);

function gitCommit(): string {
  try {
    const git = (...a: string[]) => execFileSync('git', a, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return git('rev-parse', '--short=12', 'HEAD') + (git('status', '--porcelain', '--untracked-files=no') ? '-dirty' : '');
  } catch {
    return 'unknown';
  }
}
const commit = process.env.ORCHARD_COMMIT ?? gitCommit();

interface Target {
  platform: 'linux' | 'darwin';
  arch: 'x64' | 'arm64';
}
const host: Target = { platform: process.platform as Target['platform'], arch: process.arch as Target['arch'] };
if (host.platform !== 'linux' || (host.arch !== 'x64' && host.arch !== 'arm64')) throw new Error(`building on ${process.platform}-${process.arch} is not supported (linux-x64, linux-arm64)`);
const targets: Target[] = args['host-only'] ? [host] : [{ platform: 'linux', arch: 'x64' }, { platform: 'linux', arch: 'arm64' }];
const same = (a: Target, b: Target) => a.platform === b.platform && a.arch === b.arch;

mkdirSync(WORK, { recursive: true });

// 1. Two scripts. The first (orchard.cjs, the SEA's main) is the CLI: what every start needs. The
// second (lazy.cjs, a SEA asset; its entry is src/build/lazy.ts) holds the parts a command loads when
// it runs (controller, worker, client, pino, yaml, ssh2), so a start compiles only the first. A module both
// need (the client's errors, the version, …) is in the first only: the second requires it as
// `orchard-shared:PATH`, and lazy-single-executable.ts hands over the first script's instance.
const bundle = join(WORK, 'orchard.cjs');
const lazyBundle = join(WORK, LAZY_SCRIPT.source);
const common: esbuild.BuildOptions = {
  absWorkingDir: ROOT,
  bundle: true,
  platform: 'node',
  target: `node${nodeVersion}`,
  format: 'cjs',
  // import() becomes require(): the second script runs in a vm.Script, which has no import().
  supported: { 'dynamic-import': false },
  // Whitespace and syntax only: names stay, so stack traces (ORCHARD_DEBUG) stay readable.
  minifyWhitespace: true,
  minifySyntax: true,
  legalComments: 'eof',
  sourcemap: false,
  define: { ORCHARD_BUILD_VERSION: JSON.stringify(pkg.version), ORCHARD_BUILD_COMMIT: JSON.stringify(commit) },
  // ssh2's optional native parts (cpu-features, its crypto binding) are loaded in try/catch and not
  // needed: ssh2 falls back to Node's crypto, as it does in a checkout (package.json allowScripts).
  external: ['cpu-features', '*.node'],
  // import.meta is empty in a CommonJS bundle: a use of it would read the wrong file at run time.
  logOverride: { 'empty-import-meta': 'error' },
  metafile: true,
};
/** The modules of the single executable in place of the checkout's (source-tree.ts, lazy.ts). */
const singleExecutable: esbuild.Plugin = {
  name: 'single-executable',
  setup(build) {
    build.onResolve({ filter: /\/source-tree\.ts$/ }, (a) => ({ path: join(resolve(a.resolveDir, a.path), '..', 'single-executable.ts') }));
    // (Not for the second script's entry, which is lazy.ts itself.)
    build.onResolve({ filter: /\/lazy\.ts$/ }, (a) => (a.kind === 'entry-point' ? undefined : { path: join(resolve(a.resolveDir, a.path), '..', 'lazy-single-executable.ts') }));
    // commander loads node:child_process (≈ 3 ms of every start) for executable subcommands,
    // which orchard does not have: load it when first used instead.
    build.onLoad({ filter: /[\\/]commander[\\/]lib[\\/]command\.js$/ }, (a) => {
      const eager = "const childProcess = require('node:child_process');";
      const source = readFileSync(a.path, 'utf8');
      if (!source.includes(eager)) throw new Error(`${a.path}: commander changed; check how it loads node:child_process`);
      return { contents: source.replace(eager, "const childProcess = { spawn: (...args) => require('node:child_process').spawn(...args) };"), loader: 'js' };
    });
  },
};
/** The first script, whose `orchard:shared` module hands `shared` (repository paths) to the second. */
const buildFirst = (shared: string[]) =>
  esbuild.build({
    ...common,
    entryPoints: [join(ROOT, 'src', 'cli', 'main.ts')],
    outfile: bundle,
    plugins: [
      singleExecutable,
      {
        name: 'shared',
        setup(build) {
          build.onResolve({ filter: /^orchard:shared$/ }, () => ({ path: 'orchard:shared', namespace: 'orchard-shared' }));
          build.onLoad({ filter: /.*/, namespace: 'orchard-shared' }, () => ({
            resolveDir: ROOT,
            loader: 'js',
            contents:
              shared.map((f, i) => `import * as m${i} from ${JSON.stringify('./' + f)};`).join('\n') +
              `\nexport const shared = { ${shared.map((f, i) => `${JSON.stringify(f)}: m${i}`).join(', ')} };\n`,
          }));
        },
      },
    ],
  });
const srcInputs = (r: esbuild.BuildResult) => Object.keys(r.metafile!.inputs).filter((f) => f.startsWith('src/'));

const firstInputs = new Set(srcInputs(await buildFirst([])));
const shared = new Set<string>();
const lazyResult = await esbuild.build({
  ...common,
  entryPoints: [join(ROOT, 'src', 'build', 'lazy.ts')],
  outfile: lazyBundle,
  plugins: [
    {
      name: 'shared',
      setup(build) {
        build.onResolve({ filter: /^\./ }, (a) => {
          const file = relative(ROOT, resolve(a.resolveDir, a.path)).replace(/\\/g, '/').replace(/source-tree\.ts$/, 'single-executable.ts');
          if (!firstInputs.has(file)) return undefined;
          shared.add(file);
          return { path: `orchard-shared:${file}`, external: true };
        });
      },
    },
    singleExecutable,
  ],
});
const firstResult = await buildFirst([...shared].sort());
// esbuild writes strings and names as ASCII; what is left (a regex's `µs`, a licence's name) is
// escaped too, so both scripts are ASCII: Node then makes one-byte strings of them, not two-byte
// copies (≈ 3 ms of a command's start for the second script). \uXXXX means the same character in a
// regex, and in a comment it is only text.
for (const file of [bundle, lazyBundle]) {
  const text = readFileSync(file, 'utf8');
  writeFileSync(file, text.replace(/[^\x00-\x7f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`));
}
const firstFinal = srcInputs(firstResult);
// The first script may only have gained its `orchard:shared` module.
if (firstFinal.length !== firstInputs.size || firstFinal.some((f) => !firstInputs.has(f))) throw new Error('the first script changed when it got the shared modules');
for (const w of [...firstResult.warnings, ...lazyResult.warnings]) say(`esbuild warning: ${w.text}`);
const first = Object.keys(firstResult.metafile!.inputs);
const lazy = Object.keys(lazyResult.metafile!.inputs);
if ([...first, ...lazy].some((f) => f.endsWith('source-tree.ts')) || first.includes('src/build/lazy.ts')) throw new Error("a checkout's module is in the first script");
// Every part is in the second script, and none of it is in the first.
for (const part of ['controller/controller.ts', 'worker/run.ts', 'worker/drivers/qemu.ts', 'worker/drivers/tart.ts', 'worker/drivers/synthetic.ts', 'worker/images.ts', 'client/client.ts']) {
  if (!lazy.includes(`src/${part}`)) throw new Error(`src/${part} is not in the second script`);
  if (first.includes(`src/${part}`)) throw new Error(`src/${part} is in the first script`);
}
say(
  `bundled ${first.length} modules into ${relative(ROOT, bundle)} (${(statSync(bundle).size / 1e6).toFixed(2)} MB) and ${lazy.length} into ` +
    `${relative(ROOT, lazyBundle)} (${(statSync(lazyBundle).size / 1e6).toFixed(1)} MB; ${shared.size} shared) in ${elapsed()}`,
);

// The Node flags bin/orchard runs with: the executable runs with the same.
const NODE_FLAGS = orchardNodeFlags();

// The second script's code cache, for this host: V8 compiles it exactly as lazy-single-executable.ts will,
// under the same flags: V8 rejects a code cache made under other flags (and Node then warns on stderr).
const lazyCache = join(WORK, LAZY_SCRIPT.cache);
execFileSync(
  NODE,
  [...NODE_FLAGS, '-e', 'const fs = require("node:fs"), vm = require("node:vm"); const [, src, out, filename, head, tail] = process.argv; fs.writeFileSync(out, new vm.Script(head + fs.readFileSync(src, "utf8") + tail, { filename }).createCachedData());',
    lazyBundle, lazyCache, LAZY_SCRIPT.filename, ...LAZY_WRAPPER],
  { stdio: 'pipe' },
);

// The web console's browser bundle (src/console/build.ts), embedded as assets `console/NAME` with a
// manifest that lists them (single-executable.ts reads it).
const consoleDir = join(WORK, 'console');
const consoleFiles = await writeConsole(consoleDir);
const consoleAssets = {
  [CONSOLE_MANIFEST]: join(consoleDir, basename(CONSOLE_MANIFEST)),
  ...Object.fromEntries(consoleFiles.map((f) => [`console/${f.name}`, join(consoleDir, f.name)])),
  // Their compressed copies, served by Accept-Encoding.
  ...Object.fromEntries(
    consoleFiles.flatMap((f) => (Object.keys(f.encoded ?? {}) as ConsoleEncoding[]).map((e) => [`console/${f.name}${ENCODED_SUFFIX[e]}`, join(consoleDir, f.name + ENCODED_SUFFIX[e])])),
  ),
};
say(`web console bundled: ${consoleFiles.map((f) => `${f.name} ${(f.body.length / 1024).toFixed(1)} KiB${f.encoded?.br ? ` (br ${(f.encoded.br.length / 1024).toFixed(1)})` : ''}`).join(', ')}`);

// 2. The preparation blobs: with code cache for this host (when asked for), without for the others.
function makeBlob(name: string, useCodeCache: boolean): string {
  const blob = join(WORK, `${name}.blob`);
  const config = join(WORK, `${name}.sea-config.json`);
  writeFileSync(
    config,
    JSON.stringify(
      {
        main: bundle,
        output: blob,
        disableExperimentalSEAWarning: true,
        useSnapshot: false,
        useCodeCache,
        execArgv: NODE_FLAGS,
        assets: {
          ...Object.fromEntries(ASSETS.map((a) => [a, join(ROOT, 'src', a)])),
          ...consoleAssets,
          [LAZY_SCRIPT.source]: lazyBundle,
          ...(useCodeCache ? { [LAZY_SCRIPT.cache]: lazyCache } : {}),
        },
      },
      null,
      2,
    ),
  );
  execFileSync(NODE, [...NODE_FLAGS, '--experimental-sea-config', config], { stdio: 'pipe' });
  return blob;
}
const useCodeCache = !args['no-code-cache'];
const hostBlob = makeBlob('host', useCodeCache);
const portableBlob = useCodeCache ? makeBlob('portable', false) : hostBlob;
copyFileSync(portableBlob, join(DIST, 'orchard.blob'));
chmodSync(join(DIST, 'orchard.blob'), 0o644);
say(`SEA blobs made (this host's ${useCodeCache ? 'with' : 'without'} code cache) at ${elapsed()}`);

// 3. Node binaries at the pinned version, and the injection.
function nodeBinary(t: Target): string {
  if (same(t, host)) return NODE;
  const name = `node-${t.platform}-${t.arch}`;
  const dir = join(CACHE, `${name}-${nodeVersion}`);
  const binary = join(dir, 'package', 'bin', 'node');
  if (existsSync(binary)) return binary;
  mkdirSync(dir, { recursive: true });
  say(`fetching ${name}@${nodeVersion} from the npm registry (npm pack; cached in ${relative(ROOT, CACHE)})`);
  const out = execFileSync('npm', ['pack', `${name}@${nodeVersion}`, '--pack-destination', dir, '--json', '--silent'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const [{ filename }] = JSON.parse(out) as { filename: string }[];
  execFileSync('tar', ['-xzf', join(dir, filename), '-C', dir, 'package/bin/node', 'package/package.json']);
  rmSync(join(dir, filename));
  return binary;
}

// postject's LIEF prints "warning: Can't find string offset for section name '.note.100'" for Node's
// binaries, harmless (Node's SEA documentation shows them too): its printer, bound to console.warn
// when postject loads, skips just those.
const consoleWarn = console.warn;
console.warn = (...a: unknown[]) => void (/^warning: Can't find string offset for section name/.test(String(a[0])) || consoleWarn(...a));
const { inject } = createRequire(import.meta.url)('postject') as {
  inject(file: string, resource: string, data: Buffer, opts: { sentinelFuse: string; machoSegmentName?: string; overwrite?: boolean }): Promise<void>;
};
for (const t of targets) {
  const node = nodeBinary(t);
  const out = join(DIST, `orchard-${t.platform}-${t.arch}`);
  const tmp = `${out}.tmp`;
  copyFileSync(node, tmp);
  chmodSync(tmp, 0o755);
  await inject(tmp, 'NODE_SEA_BLOB', readFileSync(same(t, host) ? hostBlob : portableBlob), { sentinelFuse: SENTINEL_FUSE });
  renameSync(tmp, out);
  say(`${relative(ROOT, out)}: ${(statSync(out).size / 1e6).toFixed(1)} MB (Node ${nodeVersion} ${(statSync(node).size / 1e6).toFixed(1)} MB) at ${elapsed()}`);
}
say(`orchard ${pkg.version} (commit ${commit}) built in ${elapsed()}`);
