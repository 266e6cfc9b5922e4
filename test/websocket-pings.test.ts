// The controller's WebSocket pings: every connection is pinged each round and one that answers none
// by the next round is cut, and a round goes out PING_SLICE connections per event-loop turn, so that
// a thousand workers' pings never hold the loop at once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { join } from 'node:path';
import pino from 'pino';
import { WebSocket } from 'ws';
import { ROLES } from '../src/api/enums.ts';
import { Access } from '../src/controller/access.ts';
import { PING_SLICE, WebSocketRoutes } from '../src/controller/rpc.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { tempDir, waitFor } from './helpers.ts';

test('pings go to every WebSocket, at most PING_SLICE per event-loop turn; one that never answers is cut', async () => {
  const store = new SQLiteStore(join(tempDir(), 'orchard.db'));
  await store.put('serviceAccounts', { name: 'a', token: 'secret', roles: [...ROLES], createdAt: new Date().toISOString() });
  const logger = pino({ level: 'silent' });
  const routes = new WebSocketRoutes(new Access(store, logger, false), logger, undefined, 400);
  // Which turn of the event loop each server-side ping went out in (a counter bumped once per turn).
  let turn = 0;
  let turning = true;
  const tick = () => {
    turn++;
    if (turning) setImmediate(tick);
  };
  tick();
  const pingedIn: number[] = [];
  routes.route('/ws', ['compute:read'], { maxPayload: 1 << 16 }, () => (ws) => {
    const ping = ws.ping.bind(ws);
    ws.ping = (...args: Parameters<typeof ws.ping>) => {
      pingedIn.push(turn);
      ping(...args);
    };
  });
  const server = createServer();
  routes.attach(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const open = (autoPong: boolean) =>
    new Promise<WebSocket>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: { authorization: 'Basic ' + Buffer.from('a:secret').toString('base64') }, autoPong });
      ws.once('open', () => resolve(ws)).once('error', reject);
    });
  const N = 3 * PING_SLICE + 10;
  const clients = await Promise.all(Array.from({ length: N }, () => open(true)));
  const silent = await open(false);
  try {
    // One round: every connection pinged once, in at least four turns, none with more than PING_SLICE.
    await waitFor('a round of pings', () => pingedIn.length >= N + 1, 5_000, 20);
    const round = pingedIn.slice(0, N + 1);
    const perTurn = new Map<number, number>();
    for (const t of round) perTurn.set(t, (perTurn.get(t) ?? 0) + 1);
    assert.ok(Math.max(...perTurn.values()) <= PING_SLICE, `at most ${PING_SLICE} pings in one turn: ${[...perTurn.values()]}`);
    assert.ok(perTurn.size >= Math.ceil((N + 1) / PING_SLICE), `spread over turns: ${perTurn.size}`);
    // The one that answers no ping is cut at the next round; the others stay.
    await waitFor('the silent one cut', () => silent.readyState === WebSocket.CLOSED, 5_000, 20);
    assert.ok(clients.every((c) => c.readyState === WebSocket.OPEN), 'the answering ones stay open');
  } finally {
    turning = false;
    for (const c of [...clients, silent]) c.terminate();
    routes.close(0);
    server.close();
    store.close();
  }
});
