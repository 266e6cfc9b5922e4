// Progress lines to the controller at most once an interval (src/worker/throttle.ts): the first at
// once, the newest of those held back when the interval is over, the last one at the end (flush).
// Timers are mocked, the clock is not: a timer then fires before Date.now() says the interval is over,
// as libuv's do by up to a loop turn. The throttle before this one held the line again at that moment
// and dropped it ("booting the template" never reached a VM's events in CI).
import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import { Throttle } from '../src/worker/throttle.ts';

test('a throttle sends the first line at once, the newest held one when its timer fires (early or not), and what is held on flush', () => {
  mock.timers.enable({ apis: ['setTimeout'] });
  try {
    const sent: string[] = [];
    const t = new Throttle((m) => sent.push(m), 1000);
    t.push('resolving');
    assert.deepEqual(sent, ['resolving']);
    t.push('making a snapshot');
    t.push('booting the template');
    assert.deepEqual(sent, ['resolving'], 'held within the interval');
    // The timer fires while the real clock has moved by milliseconds only.
    mock.timers.tick(1000);
    assert.deepEqual(sent, ['resolving', 'booting the template'], 'the newest held line, when the timer fired');
    mock.timers.tick(5000);
    assert.deepEqual(sent, ['resolving', 'booting the template'], 'nothing more, and nothing twice');
    t.push('saving the state');
    t.flush();
    assert.deepEqual(sent, ['resolving', 'booting the template', 'saving the state'], 'flush sends what is held');
    t.flush();
    t.push('dropped');
    t.cancel();
    mock.timers.tick(5000);
    assert.deepEqual(sent, ['resolving', 'booting the template', 'saving the state'], 'cancel drops what is held, and its timer');
  } finally {
    mock.timers.reset();
  }
});
