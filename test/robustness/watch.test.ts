// Watch streams cannot make the controller buffer without bound: a reader that does not read is ended
// with the reason as the stream's last line, and an account may hold only so many watch streams.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_LIMITS } from '../../src/controller/limits.ts';
import { inProcessController, metric, pausedWatch, rawRequest, readAll, waitFor } from '../helpers.ts';
import { account, type Account, type Cluster } from '../security/attack.ts';

const openWatch = (c: Cluster, who: Account, path = '/v1/vms?watch=true') => pausedWatch(c.ctl, who.auth, path);

describe('slow watchers', () => {
  let c: Cluster;
  let reader: Account;
  before(async () => {
    c = await inProcessController({ limits: { watchBufferBytes: 256 * 1024 } });
    reader = await account(c, 'reader', ['compute:read']);
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test('a watcher that does not read is ended with the reason as its last line; a reading one is not', async () => {
    const script = 'x'.repeat(200 * 1024);
    await c.admin.createVM({ name: 'big', image: 'synthetic', startup_script: { script_content: script } });
    const slow = await openWatch(c, reader);
    const events: string[] = [];
    const abort = new AbortController();
    const reading = (async () => {
      for await (const e of reader.client.watch<{ name: string }>('/v1/vms?watch=true', abort.signal)) events.push(e.type);
    })();
    await waitFor('the reading watcher to be established', () => events.length === 1);
    // ~40 MB of changes: far more than the socket buffers and the 256 kB limit can hold. The slow
    // watcher is read from the moment it was ended (the gauge of open watches drops): a reader that
    // leaves the end line unread for 10 s loses the connection, and on a busy machine the changes
    // can take longer than that.
    let slowText: Promise<string> | undefined;
    for (let i = 0; i < 200; i++) {
      await c.admin.updateVM({ name: 'big', image: 'synthetic', cpu: 1 + (i % 2), startup_script: { script_content: script } });
      if (!slowText && (await metric(c.ctl, 'orchard_watch_streams')) < 2) slowText = readAll(slow);
    }
    await Promise.race([reading, waitFor('the reading watcher to see every change', () => events.length >= 201, 30_000)]);
    assert.ok(slowText, 'the slow watcher was ended');
    const text = await slowText;
    const lines = text.trim().split('\n');
    const last = JSON.parse(lines.at(-1)!) as { type: string; object: { message: string } };
    assert.equal(last.type, 'ERROR', `last line: ${lines.at(-1)!.slice(0, 200)}`);
    assert.match(last.object.message, /fell \d+ bytes behind \(the limit is 262144\); watch again/);
    assert.ok(lines.length < 150, `${lines.length} lines were buffered for the slow watcher`);
    abort.abort();
    await reading;
    assert.equal(events.length, 201);
  });

  test('the client turns the end line into an error', async () => {
    await c.admin.createVM({ name: 'big2', image: 'synthetic', startup_script: { script_content: 'y'.repeat(200 * 1024) } });
    const iterator = reader.client.watch<{ name: string }>('/v1/vms/big2?watch=true');
    const first = await iterator.next(); // the watch is established
    assert.equal(first.value?.type, 'ADDED');
    for (let i = 0; i < 100; i++) await c.admin.updateVM({ name: 'big2', image: 'synthetic', cpu: 1 + (i % 2), startup_script: { script_content: 'y'.repeat(200 * 1024) } });
    await assert.rejects(async () => {
      for (;;) if ((await iterator.next()).done) break;
    }, /the controller ended the watch: the watch was ended because its reader fell/);
  });
});

describe('watch streams per account', () => {
  let c: Cluster;
  before(async () => {
    c = await inProcessController({ limits: { watchesPerAccount: 3 } });
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test('the fourth is a 429 naming the limit; other accounts are not affected; a closed one frees its place', async () => {
    const a = await account(c, 'a', ['compute:read']);
    const b = await account(c, 'b', ['compute:read']);
    await c.admin.createVM({ name: 'v', image: 'synthetic' });
    const open = [await openWatch(c, a), await openWatch(c, a, '/v1/vms/v?watch=true'), await openWatch(c, a)];
    for (const res of open) assert.equal(res.statusCode, 200);
    const refused = await rawRequest(c.ctl, 'GET', '/v1/vms?watch=true', { auth: a.auth });
    assert.equal(refused.status, 429);
    assert.match((refused.json as { message: string }).message, /service account "a" has 3 watch streams open, its limit is 3/);
    assert.equal((await openWatch(c, b)).statusCode, 200);
    // plain requests are not limited
    assert.equal((await rawRequest(c.ctl, 'GET', '/v1/vms', { auth: a.auth })).status, 200);
    open[0].destroy();
    const again = await waitFor('a place freed', async () => {
      const res = await openWatch(c, a);
      if (res.statusCode === 200) return res;
      res.destroy();
      return undefined;
    }, 5_000);
    again.destroy();
  });
});

describe('watch streams per account (default)', () => {
  let c: Cluster;
  before(async () => {
    c = await inProcessController();
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test(`an account may hold ${DEFAULT_LIMITS.watchesPerAccount} watch streams`, async () => {
    const a = await account(c, 'a', ['compute:read']);
    const open = await Promise.all(Array.from({ length: DEFAULT_LIMITS.watchesPerAccount }, () => openWatch(c, a)));
    assert.ok(open.every((r) => r.statusCode === 200));
    const refused = await rawRequest(c.ctl, 'GET', '/v1/vms?watch=true', { auth: a.auth });
    assert.equal(refused.status, 429, refused.body);
    for (const r of open) r.destroy();
  });
});
