// The web console's browser bundle, made by esbuild: one script and one style sheet named by their
// content hash (so they can be cached for good) and the page that loads them. Used by the single
// executable's build (scripts/build.ts embeds the files) and, in a checkout, by the controller when
// the console is first asked for (source-tree.ts); nothing is fetched at run time.
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { brotliCompress, constants, gzip } from 'node:zlib';
import * as esbuild from 'esbuild';
import { CONSOLE_MANIFEST, ENCODED_SUFFIX, type ConsoleFile, type ConsoleManifestEntry } from './files.ts';

const APP = join(import.meta.dirname, 'app');

const TYPES: Record<string, string> = { '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.html': 'text/html; charset=utf-8' };
const typeOf = (name: string) => TYPES[name.slice(name.lastIndexOf('.'))] ?? 'application/octet-stream';

const gzipAsync = promisify(gzip);
const brotliAsync = promisify(brotliCompress);

/**
 * Compressed copies of the scripts and style sheets (the page is made per response, and small), made
 * in libuv's thread pool. Brotli at its best quality costs about a second of CPU for the whole
 * bundle: worth it for files built once (the executable, the npm package); a checkout, which builds
 * the console when it is first asked for, passes a lower one.
 */
async function compress(files: ConsoleFile[], brotliQuality: number) {
  await Promise.all(
    files
      .filter((f) => /\.(js|css)$/.test(f.name))
      .map(async (f) => {
        const [br, gz] = await Promise.all([
          brotliAsync(f.body, { params: { [constants.BROTLI_PARAM_QUALITY]: brotliQuality, [constants.BROTLI_PARAM_SIZE_HINT]: f.body.length } }),
          gzipAsync(f.body, { level: 9 }),
        ]);
        f.encoded = { br, gzip: gz };
      }),
  );
}

export async function buildConsole(opts: { brotliQuality?: number } = {}): Promise<ConsoleFile[]> {
  const result = await esbuild.build({
    entryPoints: [join(APP, 'main.tsx')],
    bundle: true,
    write: false,
    outdir: '/console-out',
    entryNames: 'app-[hash]',
    chunkNames: 'chunk-[hash]',
    // The terminal (xterm.js, most of the bytes) is a chunk loaded when a terminal is opened.
    splitting: true,
    metafile: true,
    format: 'esm',
    target: ['chrome120', 'firefox120', 'safari17'],
    platform: 'browser',
    jsx: 'automatic',
    jsxImportSource: 'preact',
    minify: true,
    legalComments: 'none',
    sourcemap: false,
    logLevel: 'silent',
  });
  const files: ConsoleFile[] = result.outputFiles.map((f) => ({ name: basename(f.path), type: typeOf(f.path), body: Buffer.from(f.contents) }));
  const entry = Object.entries(result.metafile.outputs).find(([, o]) => o.entryPoint !== undefined);
  const script = files.find((f) => entry && f.name === basename(entry[0]));
  const style = files.find((f) => entry && f.name === basename(entry[1].cssBundle ?? ''));
  // The chunks the script imports statically are fetched with it, not after it was parsed.
  const preload = (entry?.[1].imports ?? []).filter((i) => i.kind === 'import-statement').map((i) => basename(i.path));
  if (!script || !style) throw new Error(`the console's bundle lacks its ${script ? 'style sheet' : 'script'}`);
  // %BASE% is the API prefix and %NONCE% the response's CSP nonce for styles, filled in when the page
  // is served (the terminal emulator makes <style> elements; nonce.ts gives them the nonce).
  const page = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Orchard</title>
<meta name="orchard-style-nonce" content="%NONCE%">
<link rel="stylesheet" href="%BASE%/console/assets/${style.name}">
<script type="module" src="%BASE%/console/assets/${script.name}"></script>
${preload.map((name) => `<link rel="modulepreload" href="%BASE%/console/assets/${name}">\n`).join('')}
</head>
<body><div id="app"></div></body>
</html>
`;
  files.push({ name: 'index.html', type: typeOf('index.html'), body: Buffer.from(page) });
  await compress(files, opts.brotliQuality ?? constants.BROTLI_MAX_QUALITY);
  return files;
}

/**
 * Builds the console into `dir` (emptied first): its files, their compressed copies (NAME.br,
 * NAME.gz) and the manifest that lists them (the names are the SEA assets' `console/NAME`, and an
 * installed package's dist/console/NAME).
 */
export async function writeConsole(dir: string): Promise<ConsoleFile[]> {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const files = await buildConsole();
  const manifest: ConsoleManifestEntry[] = [];
  for (const f of files) {
    writeFileSync(join(dir, f.name), f.body);
    const encodings = Object.entries(f.encoded ?? {}) as [keyof typeof ENCODED_SUFFIX, Buffer][];
    for (const [encoding, body] of encodings) writeFileSync(join(dir, f.name + ENCODED_SUFFIX[encoding]), body);
    manifest.push({ name: f.name, type: f.type, ...(encodings.length && { encodings: encodings.map(([e]) => e) }) });
  }
  writeFileSync(join(dir, basename(CONSOLE_MANIFEST)), JSON.stringify(manifest));
  return files;
}
