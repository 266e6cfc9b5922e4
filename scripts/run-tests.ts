// Runs the test files (all of test/**/*.test.ts, or those named) with node:test: those that boot VMs
// (they call heavyFile() from test/helpers.ts) one at a time, the others beside them, in two runs of
// node:test whose events make one report with one summary. Each run takes its files longest first,
// by the durations in test/durations.json (`--record` rewrites it from this run). Output and exit
// code are node --test's.
//
// One run for both kinds, in an order worked out beforehand, held a slot idle whenever a heavy file
// started while another ran (it waits for its turn): with real durations off those recorded by tens
// of seconds, the suite took 815 s on 2 cores for 693 s of heavy and 695 s of light files.
import { globSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { PassThrough } from 'node:stream';
import { run } from 'node:test';
import { spec } from 'node:test/reporters';

const ROOT = resolve(import.meta.dirname, '..');
const DURATIONS = join(ROOT, 'test', 'durations.json');
/** Seconds a file not in DURATIONS is taken to last. */
const GUESS = 3;
/**
 * Light files started before all others: test/guest-images.test.ts builds the guest images (a minute
 * on a fresh machine, a second once cached), beside the first heavy file rather than inside a later
 * one, on the heavy files' one-at-a-time path.
 */
const FIRST = ['test/guest-images.test.ts'];

const args = process.argv.slice(2);
const record = args.includes('--record');
const named = args.filter((a) => a !== '--record');
const files = (named.length ? named : globSync('test/**/*.test.ts', { cwd: ROOT })).map((f) => relative(ROOT, resolve(f))).sort();
// Two at once on a 2-core machine (one VM's TCG and the other file's processes); up to 4 on bigger ones.
const concurrency = Number(process.env.ORCHARD_TEST_CONCURRENCY) || Math.min(4, Math.max(2, availableParallelism()));

const known: Record<string, number> = (() => {
  try {
    return JSON.parse(readFileSync(DURATIONS, 'utf8'));
  } catch {
    return {};
  }
})();
const isHeavy = (f: string) => /^await heavyFile\(\);/m.test(readFileSync(join(ROOT, f), 'utf8'));
/** FIRST first, then the longest first. */
const inOrder = (list: string[]) => [...list].sort((a, b) => Number(FIRST.includes(b)) - Number(FIRST.includes(a)) || (known[b] ?? GUESS) - (known[a] ?? GUESS));
const heavy = inOrder(files.filter(isHeavy));
const light = inOrder(files.filter((f) => !heavy.includes(f)));

const started = performance.now();
const runs = [
  { files: heavy, concurrency: 1 },
  { files: light, concurrency: heavy.length ? Math.max(1, concurrency - 1) : concurrency },
]
  .filter((r) => r.files.length)
  .map((r) => run({ files: r.files.map((f) => join(ROOT, f)), concurrency: r.concurrency, timeout: 600_000 }));

// One report: each file's events together (a run reports its files one after another, and the two
// runs' files end at any time, so a file's events are held until the run goes on to another file or
// ends), each run's own summary (its diagnostics with no file, its plan and summary) left out, and
// the counts of both given once at the end, as one run would give them.
const report = new PassThrough({ objectMode: true });
report.compose(spec).pipe(process.stdout);
const counts = new Map<string, number>();
const took = new Map<string, number>();
await Promise.all(
  runs.map(async (stream) => {
    let file: string | undefined;
    let held: unknown[] = [];
    const flush = () => {
      for (const e of held) report.write(e);
      held = [];
    };
    for await (const event of stream) {
      const data = event.data as { nesting?: number; file?: string; message?: string; details?: { duration_ms: number } };
      if (event.type === 'test:fail') process.exitCode = 1;
      if (data.file) {
        if (data.file !== file) flush();
        file = data.file;
        held.push(event);
        if ((event.type === 'test:pass' || event.type === 'test:fail') && data.nesting === 0) {
          const f = relative(ROOT, data.file);
          took.set(f, (took.get(f) ?? 0) + data.details!.duration_ms / 1000);
        }
        continue;
      }
      flush();
      if (event.type === 'test:plan' || event.type === 'test:summary') continue;
      if (event.type === 'test:diagnostic' && data.nesting === 0) {
        const [name, value] = (data.message ?? '').split(' ');
        if (name !== 'duration_ms') counts.set(name, (counts.get(name) ?? 0) + Number(value));
        continue;
      }
      report.write(event);
    }
    flush();
  }),
);
for (const name of ['tests', 'suites', 'pass', 'fail', 'cancelled', 'skipped', 'todo']) {
  report.write({ type: 'test:diagnostic', data: { nesting: 0, message: `${name} ${counts.get(name) ?? 0}`, level: 'info' } });
}
report.write({ type: 'test:diagnostic', data: { nesting: 0, message: `duration_ms ${performance.now() - started}`, level: 'info' } });
report.end();

if (record) {
  const all = { ...known, ...Object.fromEntries([...took].map(([f, s]) => [f, Math.round(s * 10) / 10])) };
  writeFileSync(DURATIONS, `${JSON.stringify(Object.fromEntries(Object.entries(all).sort(([a], [b]) => a.localeCompare(b))), null, 2)}\n`);
}
