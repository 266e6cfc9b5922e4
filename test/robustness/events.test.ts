// One account flooding a VM with events: the store keeps the newest ones (by count and by bytes),
// says how many older ones it dropped, and a page of events stays small however much is asked for.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { Event } from '../../src/api/schemas.ts';
import { DEFAULT_LIMITS } from '../../src/controller/limits.ts';
import { inProcessController, placeOn, rawRequest } from '../helpers.ts';
import { account, type Account, type Cluster } from '../security/attack.ts';

const events = (n: number, from: number, payloadBytes = 10): Event[] =>
  Array.from({ length: n }, (_, i) => ({ kind: 'flood', timestamp: 1_700_000_000 + from + i, payload: `${from + i}:`.padEnd(payloadBytes, 'x') }));

/** Every event of VM `name`, following X-Next-Cursor; with the pages' body sizes and the dropped count. */
async function allEvents(c: Cluster, who: Account, name: string, query = 'limit=10000') {
  const out: Event[] = [];
  const pageBytes: number[] = [];
  let cursor: string | undefined;
  let dropped: string | undefined;
  do {
    const res = await rawRequest(c.ctl, 'GET', `/v1/vms/${name}/events?${query}${cursor ? `&cursor=${cursor}` : ''}`, { auth: who.auth });
    assert.equal(res.status, 200, res.body);
    pageBytes.push(Buffer.byteLength(res.body));
    out.push(...(res.json as Event[]));
    cursor = res.headers['x-next-cursor'] as string | undefined;
    dropped = res.headers['x-events-dropped'] as string | undefined;
  } while (cursor);
  return { events: out, pageBytes, dropped };
}

describe('event retention and bounded pages (small limits)', () => {
  let c: Cluster;
  let worker: Account;
  before(async () => {
    c = await inProcessController({ limits: { eventsPerVM: 50, eventBytesPerVM: 40_000, eventPageBytes: 16 * 1024 } });
    worker = await account(c, 'worker-acct', ['compute:read', 'compute:write']);
    for (const vm of ['by-count', 'by-bytes', 'paged', 'gone']) await c.admin.createVM({ name: vm, image: 'synthetic' });
    for (const vm of ['by-count', 'by-bytes', 'paged', 'gone']) await placeOn(worker.client, 'w1', vm);
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test('by count: the newest are kept, the cut is shown first (asc) or last (desc) and in a header', async () => {
    for (let i = 0; i < 4; i++) await worker.client.appendEvents('by-count', events(50, i * 50));
    // and in a state report, which carries events too
    await worker.client.updateVMState('by-count', { status: 'running', events: events(10, 200) });
    const { events: kept, dropped } = await allEvents(c, worker, 'by-count');
    assert.equal(dropped, '160');
    assert.equal(kept.length, 51);
    assert.equal(kept[0].kind, 'events-dropped');
    assert.match(kept[0].payload, /^160 earlier events were dropped/);
    assert.deepEqual(kept.slice(1).map((e) => e.payload.split(':')[0]), Array.from({ length: 50 }, (_, i) => String(160 + i)));
    const desc = await allEvents(c, worker, 'by-count', 'order=desc&limit=20');
    assert.equal(desc.events.length, 51);
    assert.equal(desc.events[0].payload.split(':')[0], '209');
    assert.equal(desc.events.at(-1)!.kind, 'events-dropped');
    // a later page (with a cursor) of an ascending listing does not repeat the cut
    const page2 = await rawRequest(c.ctl, 'GET', '/v1/vms/by-count/events?limit=10&cursor=1', { auth: worker.auth });
    assert.ok((page2.json as Event[]).every((e) => e.kind === 'flood'));
    assert.equal(page2.headers['x-events-dropped'], '160');
  });

  test('by bytes: at most eventBytesPerVM of events are kept', async () => {
    for (let i = 0; i < 10; i++) await worker.client.appendEvents('by-bytes', events(5, i * 5, 2000));
    const { events: kept, dropped } = await allEvents(c, worker, 'by-bytes');
    const flood = kept.filter((e) => e.kind === 'flood');
    const bytes = flood.reduce((n, e) => n + Buffer.byteLength(JSON.stringify(e)), 0);
    assert.ok(bytes <= 40_000, `${bytes} bytes kept`);
    assert.ok(flood.length >= 18, `${flood.length} kept`);
    assert.equal(Number(dropped), 50 - flood.length);
    assert.equal(flood.at(-1)!.payload.split(':')[0], '49');
  });

  test('a page stops at about eventPageBytes whatever the limit, and the cursor gives the rest', async () => {
    await worker.client.appendEvents('paged', events(30, 0, 1000)); // 31 kB: two 16 kB pages
    const { events: all, pageBytes, dropped } = await allEvents(c, worker, 'paged');
    assert.equal(dropped, undefined);
    assert.equal(all.length, 30);
    assert.deepEqual(all.map((e) => Number(e.payload.split(':')[0])), Array.from({ length: 30 }, (_, i) => i));
    assert.ok(pageBytes.length >= 2, `pages: ${pageBytes.join(', ')}`);
    for (const b of pageBytes) assert.ok(b <= 17 * 1024, `a page of ${b} bytes`);
  });

  test('a deleted VM takes its events and its cut with it', async () => {
    await worker.client.appendEvents('gone', events(60, 0));
    await c.admin.deleteVM('gone');
    await c.admin.createVM({ name: 'gone', image: 'synthetic' });
    await placeOn(worker.client, 'w1', 'gone');
    await worker.client.appendEvents('gone', events(1, 0));
    const { events: kept, dropped } = await allEvents(c, worker, 'gone');
    assert.equal(dropped, undefined);
    assert.equal(kept.length, 1);
  });
});

describe('event retention and pages (defaults)', () => {
  let c: Cluster;
  let worker: Account;
  before(async () => {
    c = await inProcessController();
    worker = await account(c, 'worker-acct', ['compute:read', 'compute:write']);
    await c.admin.createVM({ name: 'v', image: 'synthetic' });
    await placeOn(worker.client, 'w1', 'v');
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test(`at most ${DEFAULT_LIMITS.eventsPerVM} events and ${DEFAULT_LIMITS.eventBytesPerVM} bytes per VM; pages of at most ${DEFAULT_LIMITS.eventPageBytes} bytes`, async () => {
    await worker.client.appendEvents('v', events(10_000, 0));
    await worker.client.appendEvents('v', events(25, 10_000));
    let { events: kept, dropped } = await allEvents(c, worker, 'v');
    assert.equal(dropped, '25');
    assert.equal(kept.length, DEFAULT_LIMITS.eventsPerVM + 1);
    // Big events: ~900 kB per request (the body limit is 1 MiB), 6 requests
    for (let i = 0; i < 6; i++) await worker.client.appendEvents('v', events(9, 20_000 + i * 9, 100_000));
    const res = await allEvents(c, worker, 'v');
    ({ events: kept, dropped } = res);
    const bytes = kept.filter((e) => e.kind === 'flood').reduce((n, e) => n + Buffer.byteLength(JSON.stringify(e)), 0);
    assert.ok(bytes <= DEFAULT_LIMITS.eventBytesPerVM, `${bytes} bytes kept`);
    assert.ok(bytes > DEFAULT_LIMITS.eventBytesPerVM - 200_000, `${bytes} bytes kept`);
    assert.ok(res.pageBytes.length >= 2);
    for (const b of res.pageBytes) assert.ok(b <= DEFAULT_LIMITS.eventPageBytes + 200_000, `a page of ${b} bytes`);
  });
});
