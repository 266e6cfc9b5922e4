import assert from 'node:assert/strict';
import { constants, performance, PerformanceObserver } from 'node:perf_hooks';
import { test } from 'node:test';
import { relayed } from '../src/client/scavenge.ts';

// Collections are told apart by when they started: the test runner's own allocations may set off a
// scavenge of V8's choosing at any moment, but not during the few synchronous calls timed here.
test('relaying 8 MiB runs one young-generation collection (the read buffers freed without a full mark of the heap), and less runs none', async () => {
  const entries: { start: number; kind: number }[] = [];
  const observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) entries.push({ start: e.startTime, kind: (e as unknown as { detail: { kind: number } }).detail.kind });
  });
  observer.observe({ entryTypes: ['gc'] });
  const t0 = performance.now();
  for (let i = 0; i < 511; i++) relayed(16 * 1024);
  const t1 = performance.now();
  relayed(16 * 1024);
  const t2 = performance.now();
  await new Promise((r) => setTimeout(r, 50));
  observer.disconnect();
  const within = (from: number, to: number) => entries.filter((e) => e.start >= from && e.start <= to).map((e) => e.kind);
  assert.deepEqual(within(t0, t1), [], 'no collection before 8 MiB');
  assert.deepEqual(within(t1, t2), [constants.NODE_PERFORMANCE_GC_MINOR], 'one scavenge at 8 MiB, no major collection');
  assert.equal((globalThis as { gc?: unknown }).gc, undefined, 'gc() is not exposed to the process');
});
