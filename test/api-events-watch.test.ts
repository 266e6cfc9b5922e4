// GET /v1/vms/{name}/events?watch=true: the kept events, then each appended one as it is committed,
// in order with no gap or duplicate (also while the kept ones are still being written out), with a
// cursor to resume from; ends with DELETED when the VM is deleted; same roles as listing events;
// a reader that does not read is ended with the reason.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Event, EventWatchLine } from '../src/api/schemas.ts';
import { inProcessController, pausedWatch, placeOn, rawRequest, readAll, waitFor } from './helpers.ts';
import { account } from './security/attack.ts';

const ev = (payload: string): Event => ({ kind: 'log_line', timestamp: 1_700_000_000, payload });

test('the kept events, then concurrent appends: every event once, in commit order, with cursors; DELETED ends it', async () => {
  // Small pages: the kept events go out in many pages, and appends land while they do.
  const c = await inProcessController({ limits: { eventPageBytes: 2048 } });
  try {
    await c.admin.createVM({ name: 'box', image: 'img' });
    await placeOn(c.admin, 'w', 'box');
    for (let i = 0; i < 300; i += 50) await c.admin.appendEvents('box', Array.from({ length: 50 }, (_, j) => ev(`kept ${i + j}`)));

    const lines: EventWatchLine[] = [];
    const watching = (async () => {
      for await (const line of c.admin.watchEvents('box')) lines.push(line);
    })();
    // 40 writers × 5 events at once, started as the watch starts.
    const writers = Array.from({ length: 40 }, (_, w) => c.admin.appendEvents('box', Array.from({ length: 5 }, (_, j) => ev(`live ${w}.${j}`))));
    await Promise.all(writers);
    await waitFor('every event on the watch', () => lines.length >= 500 || undefined, 20_000);

    // The store's own order (its list, ascending) is what the watch gave, each once.
    const stored: Event[] = [];
    let cursor: string | undefined;
    do {
      const page = await c.admin.listEvents('box', { limit: 1000, order: 'asc', cursor });
      stored.push(...page.events);
      cursor = page.nextCursor;
    } while (cursor);
    assert.equal(stored.length, 500);
    assert.deepEqual(lines.map((l) => (l.object as Event).payload), stored.map((e) => e.payload));
    assert.ok(lines.every((l) => l.type === 'ADDED'));
    const cursors = lines.map((l) => Number(l.cursor));
    assert.ok(cursors.every((id, i) => i === 0 || id > cursors[i - 1]), 'cursors ascend');
    // Each writer's five events in its order.
    for (let w = 0; w < 40; w++) {
      const mine = lines.map((l) => (l.object as Event).payload).filter((p) => p.startsWith(`live ${w}.`));
      assert.deepEqual(mine, [0, 1, 2, 3, 4].map((j) => `live ${w}.${j}`));
    }

    // Watching again from a cursor gives only what came after it.
    const from = lines[449].cursor!;
    const rest: string[] = [];
    const abort = new AbortController();
    const again = (async () => {
      for await (const line of c.admin.watchEvents('box', { cursor: from, signal: abort.signal })) rest.push((line.object as Event).payload);
    })();
    await waitFor('the events after the cursor', () => rest.length >= 50 || undefined, 10_000);
    abort.abort();
    await again;
    assert.deepEqual(rest, stored.slice(450).map((e) => e.payload));

    await c.admin.deleteVM('box');
    await watching; // the stream ends
    const last = lines.at(-1)!;
    assert.equal(last.type, 'DELETED');
    assert.match((last.object as Event).payload, /VM "box" was deleted/);
    assert.equal(lines.length, 501);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('roles as listing events: compute:read watches, no role is 403 naming it, no credentials 401; unknown VM 404; desc and limit 400', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'v', image: 'img' });
    await placeOn(c.admin, 'w', 'v');
    const reader = await account(c, 'reader', ['compute:read']);
    const nobody = await account(c, 'nobody', []);

    const res = await pausedWatch(c.ctl, reader.auth, '/v1/vms/v/events?watch=true');
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /^application\/x-ndjson/);
    const text = readAll(res);
    await c.admin.appendEvents('v', [ev('seen by the reader')]);
    await c.admin.deleteVM('v');
    const lines = (await text).trim().split('\n').map((l) => JSON.parse(l) as EventWatchLine);
    assert.deepEqual(lines.map((l) => [l.type, (l.object as Event).payload.replace(/".*"/, '')]), [['ADDED', 'seen by the reader'], ['DELETED', 'VM  was deleted']]);

    await c.admin.createVM({ name: 'v', image: 'img' });
    const refused = await rawRequest(c.ctl, 'GET', '/v1/vms/v/events?watch=true', { auth: nobody.auth });
    assert.equal(refused.status, 403);
    assert.match((refused.json as { message: string }).message, /compute:read/);
    assert.equal((await rawRequest(c.ctl, 'GET', '/v1/vms/v/events?watch=true')).status, 401);
    const missing = await rawRequest(c.ctl, 'GET', '/v1/vms/nope/events?watch=true', { auth: reader.auth });
    assert.equal(missing.status, 404);
    assert.match((missing.json as { message: string }).message, /VM "nope" not found/);
    const desc = await rawRequest(c.ctl, 'GET', '/v1/vms/v/events?watch=true&order=desc', { auth: reader.auth });
    assert.equal(desc.status, 400);
    assert.match((desc.json as { message: string }).message, /"order"/);
    const limited = await rawRequest(c.ctl, 'GET', '/v1/vms/v/events?watch=true&limit=5', { auth: reader.auth });
    assert.equal(limited.status, 400);
    assert.match((limited.json as { message: string }).message, /"limit"/);

    // Losing the role ends the stream.
    const held = await pausedWatch(c.ctl, reader.auth, '/v1/vms/v/events?watch=true');
    assert.equal(held.statusCode, 200);
    const ended = readAll(held);
    await c.admin.updateServiceAccount({ name: 'reader', roles: [] });
    await ended;
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('a reader that does not read is ended with the reason as its last line', async () => {
  const c = await inProcessController({ limits: { watchBufferBytes: 64 * 1024 } });
  try {
    await c.admin.createVM({ name: 'chatty', image: 'img' });
    await placeOn(c.admin, 'w', 'chatty');
    const slow = await pausedWatch(c.ctl, ['bootstrap-admin', 'test-admin-token'], '/v1/vms/chatty/events?watch=true');
    assert.equal(slow.statusCode, 200);
    // ~25 MB of events: more than the socket buffers and the 64 KiB limit hold.
    const big = 'x'.repeat(250 * 1024);
    for (let i = 0; i < 100; i++) await c.admin.appendEvents('chatty', [ev(big)]);
    const lines = (await readAll(slow)).trim().split('\n');
    const last = JSON.parse(lines.at(-1)!) as EventWatchLine;
    assert.equal(last.type, 'ERROR', `last line: ${lines.at(-1)!.slice(0, 200)}`);
    assert.match((last.object as { message: string }).message, /fell \d+ bytes behind \(the limit is 65536\); watch again from the last cursor/);
    assert.ok(lines.length < 60, `${lines.length} lines were sent to the slow reader`);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('events retention dropped are stood in for by one events-dropped line, without a cursor, before the kept ones', async () => {
  const c = await inProcessController({ limits: { eventsPerVM: 5 } });
  try {
    await c.admin.createVM({ name: 'old', image: 'img' });
    await placeOn(c.admin, 'w', 'old');
    await c.admin.appendEvents('old', Array.from({ length: 8 }, (_, i) => ev(`e${i}`)));
    const lines: EventWatchLine[] = [];
    const abort = new AbortController();
    const watching = (async () => {
      for await (const line of c.admin.watchEvents('old', { signal: abort.signal })) lines.push(line);
    })();
    await waitFor('the kept events', () => lines.length >= 6 || undefined, 10_000);
    abort.abort();
    await watching;
    assert.deepEqual(lines.map((l) => [(l.object as Event).kind, l.cursor === undefined]), [['events-dropped', true], ...Array.from({ length: 5 }, () => ['log_line', false])]);
    assert.match((lines[0].object as Event).payload, /^3 earlier events were dropped/);
    assert.deepEqual(lines.slice(1).map((l) => (l.object as Event).payload), ['e3', 'e4', 'e5', 'e6', 'e7']);
  } finally {
    await c.close();
    c.cleanup();
  }
});
