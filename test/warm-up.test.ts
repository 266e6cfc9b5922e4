// The controller's warm-up (src/controller/warm-up.ts): the lazily compiled validators and serializers of
// its hot routes are compiled while it is quiet, never while it is busy serving, and each only once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { WarmUp } from '../src/controller/warm-up.ts';

/** Keeps the event loop busy (about 90 % of the time) for `ms`. */
async function busyFor(ms: number) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const slice = Date.now() + 9;
    while (Date.now() < slice); // spin
    await sleep(1);
  }
}

test('warm-up compiles nothing while the event loop is busy, then everything once quiet, each once', async () => {
  const warmUp = new WarmUp();
  const compiled: number[] = [];
  for (let i = 0; i < 5; i++) {
    let done = false;
    warmUp.add(() => {
      if (done) return; // idempotent, as the app's compiles are
      done = true;
      compiled.push(i);
    });
  }
  const stop = warmUp.start();
  try {
    await busyFor(1_000);
    assert.deepEqual(compiled, [], 'nothing is compiled while the controller is busy');
    const deadline = Date.now() + 5_000;
    while (compiled.length < 5 && Date.now() < deadline) await sleep(50);
    assert.deepEqual(compiled, [0, 1, 2, 3, 4], 'all are compiled once quiet, in the order they were added');
  } finally {
    stop();
  }
});

test('a compile that throws does not stop the warm-up of the others', async () => {
  const warmUp = new WarmUp();
  const compiled: string[] = [];
  warmUp.add(() => compiled.push('a'));
  warmUp.add(() => {
    throw new Error('a bad schema');
  });
  warmUp.add(() => compiled.push('c'));
  const stop = warmUp.start();
  try {
    const deadline = Date.now() + 5_000;
    while (compiled.length < 2 && Date.now() < deadline) await sleep(50);
    assert.deepEqual(compiled, ['a', 'c']);
  } finally {
    stop();
  }
});
