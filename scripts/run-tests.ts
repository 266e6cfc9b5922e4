// Runs the test files (all of test/**/*.test.ts, or those named) with node:test, several at once:
// those that boot VMs (they call heavyFile() from test/helpers.ts) one at a time, the
// others beside them. The order keeps both kinds busy: the longest files first, by the durations in
// test/durations.json (`--record` rewrites it from this run). Output and exit code are node --test's.
import { globSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { run } from 'node:test';
import { spec } from 'node:test/reporters';

const ROOT = resolve(import.meta.dirname, '..');
const DURATIONS = join(ROOT, 'test', 'durations.json');
/** Seconds a file not in DURATIONS is taken to last. */
const GUESS = { heavy: 20, light: 3 };

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
/**
 * Light files started before all others: test/guest-images.test.ts builds the guest images (a minute
 * on a fresh machine, a second once cached), beside the first heavy file rather than inside a later
 * one, where the heavy files' one-at-a-time path (the suite's length) would wait for it.
 */
const FIRST = ['test/guest-images.test.ts'];
const heavy = files.filter(isHeavy);
const seconds = (f: string) => known[f] ?? (heavy.includes(f) ? GUESS.heavy : GUESS.light);
const longestFirst = (list: string[]) => [...list].sort((a, b) => seconds(b) - seconds(a));

/**
 * The order to hand the files to node:test, which starts them first come first served as slots free up:
 * a simulation of its slots gives each freed slot the longest heavy file if none runs then, else the
 * longest light one (a heavy file given while another runs would hold its slot waiting).
 */
function schedule(): string[] {
  const h = longestFirst(heavy);
  const light = longestFirst(files.filter((f) => !heavy.includes(f)));
  const l = [...light.filter((f) => FIRST.includes(f)), ...light.filter((f) => !FIRST.includes(f))];
  const freeAt = new Array<number>(concurrency).fill(0);
  let heavyFreeAt = 0;
  const order: string[] = [];
  while (h.length || l.length) {
    const now = Math.min(...freeAt);
    const slot = freeAt.indexOf(now);
    if (h.length && (heavyFreeAt <= now || !l.length)) {
      const f = h.shift()!;
      heavyFreeAt = freeAt[slot] = Math.max(now, heavyFreeAt) + seconds(f);
      order.push(f);
    } else {
      const f = l.shift()!;
      freeAt[slot] = now + seconds(f);
      order.push(f);
    }
  }
  return order;
}

// (Tried: the heavy files in a run of their own beside one of the light ones, so that no slot waits
// for the heavy turn. The suite is CPU-bound on 2 cores: with both slots always busy every file took
// longer, and the suite 851 s against 815 s; not kept.)
const stream = run({ files: schedule().map((f) => join(ROOT, f)), concurrency, timeout: 600_000 });
stream.on('test:fail', () => (process.exitCode = 1));
if (record) {
  const took = new Map<string, number>();
  for (const event of ['test:pass', 'test:fail'] as const) {
    stream.on(event, (data) => {
      if (data.nesting !== 0 || !data.file) return;
      const f = relative(ROOT, data.file);
      took.set(f, (took.get(f) ?? 0) + data.details.duration_ms / 1000);
    });
  }
  stream.once('end', () => {
    const all = { ...known, ...Object.fromEntries([...took].map(([f, s]) => [f, Math.round(s * 10) / 10])) };
    writeFileSync(DURATIONS, `${JSON.stringify(Object.fromEntries(Object.entries(all).sort(([a], [b]) => a.localeCompare(b))), null, 2)}\n`);
  });
}
stream.compose(spec).pipe(process.stdout);
