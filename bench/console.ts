// The web console with many VMs, in Debian's chromium (headless, playwright-core) against a real
// controller process: first paint of the VM list (navigation start → first row on screen, and →
// all N counted), the rows that exist in the page (windowed rendering), how long a committed change
// takes to reach the screen (POST /v1/vms sent → its row on screen: an upper bound of commit →
// screen), and the bytes the browser loads (on the wire: scripts and style sheets compressed as
// built, brotli for chromium; and as decoded).
//
//   node bench/console.ts [--vms 10000] [--runs 5] [--changes 20]
import { parseArgs } from 'node:util';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { OrchardClient } from '../src/client/client.ts';
import { buildConsole } from '../src/console/build.ts';
import { closedLoop, pct } from './load-harness.ts';
import { ADMIN_TOKEN, spawnController, tempDir } from '../test/helpers.ts';
import { launchChromium, signedIn } from '../test/console-page.ts';

const { values } = parseArgs({ options: { vms: { type: 'string', default: '10000' }, runs: { type: 'string', default: '5' }, changes: { type: 'string', default: '20' } } });
const N = Number(values.vms);
const RUNS = Number(values.runs);
const CHANGES = Number(values.changes);

/** What page functions use of the browser's globals (this file is type-checked without the DOM's types). */
interface Browserish {
  document: { querySelector(s: string): { textContent: string | null } | null; querySelectorAll(s: string): { length: number } };
  performance: { now(): number };
}

const dataDir = tempDir('orchard-bench-console-');
const ctl = await spawnController(dataDir);
const browser = await launchChromium();
try {
  const client = new OrchardClient({ url: ctl.url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  // No worker: every VM stays pending with its reason, as in a cluster waiting for capacity.
  await closedLoop(N, 32, (i) => client.createVM({ name: `vm-${String(i).padStart(5, '0')}`, image: 'debian-dev', labels: { pool: `p${i % 10}` } }));
  console.log(`web console benchmark: ${N} VMs, chromium ${browser.version()} headless, controller process on loopback (TLS)\n`);

  const { page } = await signedIn(browser, ctl.url, 'bootstrap-admin', ADMIN_TOKEN);
  const firstRow: number[] = [];
  const allCounted: number[] = [];
  let rows = 0;
  for (let r = 0; r < RUNS + 1; r++) {
    await page.reload({ waitUntil: 'commit' });
    await page.waitForFunction(() => (globalThis as unknown as Browserish).document.querySelector('[data-vm]') !== null, undefined, { polling: 'raf' });
    const t1 = await page.evaluate(() => (globalThis as unknown as Browserish).performance.now());
    await page.waitForFunction((n) => (globalThis as unknown as Browserish).document.querySelector('[data-testid=vm-count]')?.textContent === `${n} of ${n} VMs`, N, { polling: 'raf', timeout: 60_000 });
    const t2 = await page.evaluate(() => (globalThis as unknown as Browserish).performance.now());
    rows = await page.evaluate(() => (globalThis as unknown as Browserish).document.querySelectorAll('[data-vm]').length);
    const timing = await page.evaluate(() =>
      (globalThis as unknown as { performance: { getEntriesByType(t: string): { name: string; startTime: number; responseStart: number; responseEnd: number; encodedBodySize: number }[] } }).performance
        .getEntriesByType('resource')
        .filter((e) => e.name.includes('/v1/vms?watch') || e.name.includes('/console/'))
        .map((e) => `${new URL(e.name).pathname.split('/').pop()}: start ${e.startTime.toFixed(0)}, first byte ${e.responseStart.toFixed(0)}${e.responseEnd ? `, end ${e.responseEnd.toFixed(0)}` : ''}, ${(e.encodedBodySize / 1024).toFixed(0)} KiB`),
    );
    if (r === RUNS) console.log(`(last run's requests, ms from navigation: ${timing.join('; ')})`);
    if (r === 0) continue; // the first load fills the browser's caches
    firstRow.push(t1);
    allCounted.push(t2);
  }
  const sorted = (a: number[]) => [...a].sort((x, y) => x - y);
  const median = (a: number[]) => pct(sorted(a), 50);
  console.log(`first paint (navigation → first row)      median ${median(firstRow).toFixed(0)} ms  (runs: ${firstRow.map((x) => x.toFixed(0)).join(', ')})`);
  console.log(`all ${N} in the list (navigation → count) median ${median(allCounted).toFixed(0)} ms  (runs: ${allCounted.map((x) => x.toFixed(0)).join(', ')})`);
  console.log(`rows in the page: ${rows} of ${N} (windowed)`);

  // A change on screen: a new VM named to sort first, so its row is in view.
  const latencies: number[] = [];
  for (let i = 0; i < CHANGES; i++) {
    const name = `a-probe-${i}`;
    const seen = page.waitForFunction((n) => (globalThis as unknown as Browserish).document.querySelector(`[data-vm="${n}"]`) !== null, name, { polling: 'raf' });
    const t0 = performance.now();
    await client.createVM({ name, image: 'debian-dev' });
    await seen;
    latencies.push(performance.now() - t0);
    await client.deleteVM(name);
  }
  console.log(`change → screen (POST sent → row shown)    median ${median(latencies).toFixed(0)} ms, p95 ${pct(sorted(latencies), 95).toFixed(0)} ms, max ${Math.max(...latencies).toFixed(0)} ms (${CHANGES} changes)`);

  // What the browser loads for the console's page in a fresh context (nothing cached), then a terminal's chunk.
  const loaded = new Map<string, { decoded: number; wire: number; encoding: string }>();
  const fresh = { page: await (await browser.newContext({ ignoreHTTPSErrors: true })).newPage() };
  const noted: Promise<void>[] = [];
  fresh.page.on('requestfinished', (req) => {
    noted.push(Promise.all([req.response(), req.sizes()]).then(async ([res, sizes]) => {
      if (!res) return;
      loaded.set(new URL(req.url()).pathname, { decoded: (await res.body()).length, wire: sizes.responseBodySize, encoding: (await res.allHeaders())['content-encoding'] ?? 'identity' });
    }, () => {}));
  });
  await fresh.page.goto(ctl.url + '/');
  await fresh.page.waitForSelector('input[name=token]');
  await Promise.all(noted);
  const listBytes = [...loaded].filter(([path]) => path === '/' || path.startsWith('/console/assets/'));
  const nameOf = (path: string) => path.split('/').pop() || 'index.html';
  const kib = (n: number) => (n / 1024).toFixed(1);
  const sum = (f: (x: { decoded: number; wire: number }) => number) => listBytes.reduce((n, [, x]) => n + f(x), 0);
  console.log(
    `bytes for the console's first page: ${kib(sum((x) => x.wire))} KiB on the wire (${listBytes.map(([p, x]) => `${nameOf(p)} ${kib(x.wire)} ${x.encoding}`).join(', ')}), ${kib(sum((x) => x.decoded))} KiB decoded`,
  );
  // A checkout's controller compresses with a quicker brotli when it builds the console; the single
  // executable and the npm package carry the build's best.
  const files = await buildConsole();
  const byName = new Map(files.map((f) => [f.name, f]));
  const built = (name: string) => byName.get(name)?.encoded?.br?.length ?? byName.get(name)?.body.length ?? 0;
  console.log(`the same from the single executable (brotli at its best): ${kib(listBytes.reduce((n, [p, x]) => n + (p === '/' ? x.wire : built(nameOf(p))), 0))} KiB`);
  const chunks = files.filter((f) => f.name.endsWith('.js') && !listBytes.some(([p]) => p.endsWith(f.name)));
  console.log(
    `loaded when a terminal or a screen is first opened: ${kib(chunks.reduce((n, f) => n + f.body.length, 0))} KiB decoded, ${kib(chunks.reduce((n, f) => n + (f.encoded?.br?.length ?? f.body.length), 0))} KiB brotli (${chunks.map((f) => f.name).join(', ')})`,
  );
  await fresh.page.context().close();
  client.close();
} finally {
  await browser.close();
  await ctl.kill('SIGKILL');
  rmSync(dataDir, { recursive: true, force: true });
}
