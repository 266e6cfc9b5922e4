import assert from 'node:assert/strict';
import { constants, PerformanceObserver } from 'node:perf_hooks';
import { test } from 'node:test';
import { relayed } from '../src/client/scavenge.ts';

test('relaying 8 MiB runs one young-generation collection (the read buffers freed without a full mark of the heap), and less runs none', async () => {
  const kinds: number[] = [];
  const observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) kinds.push((e as unknown as { detail: { kind: number } }).detail.kind);
  });
  observer.observe({ entryTypes: ['gc'] });
  const settle = () => new Promise((r) => setTimeout(r, 50));
  await settle();
  kinds.length = 0;
  for (let i = 0; i < 511; i++) relayed(16 * 1024);
  await settle();
  assert.deepEqual(kinds, [], 'no collection before 8 MiB');
  relayed(16 * 1024);
  await settle();
  observer.disconnect();
  assert.deepEqual(kinds, [constants.NODE_PERFORMANCE_GC_MINOR], 'one scavenge, no major collection');
  assert.equal((globalThis as { gc?: unknown }).gc, undefined, 'gc() is not exposed to the process');
});
