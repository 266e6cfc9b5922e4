// A hostile side of a multiplexed tunnel connection (docs/tunnel-mux-protocol.md): every tunnel opened
// on a client's mux connection is authorised and counted as a per-tunnel WebSocket is, revocation closes
// the connection, a worker's mux connection is only its own account's and only its own VMs' tunnels ride
// on it, and each breach of the protocol (bytes beyond the window, for a tunnel not open, frames too big,
// ids reused, too many tunnels, an OPEN from the wrong side) closes that connection with 1008 while the
// controller carries on.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import type { WebSocket } from 'ws';
import { ApiError } from '../../src/client/client.ts';
import { DATA, END, frame, INITIAL_WINDOW, OPEN, OPEN_OK, RESET, WINDOW } from '../../src/client/mux.ts';
import { RESOURCE_TART_VMS } from '../../src/api/schemas.ts';
import { ADMIN_TOKEN, metric, waitFor } from '../helpers.ts';
import { account, closed, clusterWithVM, upgrade } from './attack.ts';

const ADMIN: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];

/** The frames `ws` receives, parsed. */
function frames(ws: WebSocket) {
  const got: { type: number; id: number; payload: Buffer }[] = [];
  const waiters: (() => void)[] = [];
  ws.on('message', (data: Buffer) => {
    got.push({ type: data[0], id: data.readUInt32BE(1), payload: data.subarray(5) });
    for (const w of waiters.splice(0)) w();
  });
  return {
    got,
    /** The first frame (from now on or before) that `match` accepts. */
    next(match: (f: { type: number; id: number; payload: Buffer }) => boolean) {
      return new Promise<{ type: number; id: number; payload: Buffer }>((resolve) => {
        const look = () => {
          const f = got.find(match);
          if (f) resolve(f);
          else waiters.push(look);
        };
        look();
      });
    },
  };
}

describe('multiplexed tunnels: a hostile side', () => {
  let cluster: Awaited<ReturnType<typeof clusterWithVM>>;
  before(async () => {
    cluster = await clusterWithVM('v1', { limits: { tunnelsPerAccount: 3 } });
    // A VM that never runs (no worker has the label): a tunnel to it stays open, waiting, as long as asked.
    await cluster.c.admin.createVM({ name: 'waits', image: 'synthetic', labels: { nowhere: 'yes' } });
    await waitFor('the worker mux connection', () => cluster.worker.tunnelMuxOpen || undefined, 10_000, 5);
  });
  after(() => cluster.close());

  /** A client's raw mux connection as `auth`. */
  async function client(auth: [string, string] = ADMIN) {
    const u = await upgrade(cluster.c.ctl, '/v1/port-forward-mux', { auth });
    assert.equal(u.status, 101, u.body);
    return u.ws!;
  }
  const openWaiting = (ws: WebSocket, id: number) => ws.send(frame(OPEN, id, JSON.stringify({ vm: 'waits', port: 22, wait: 60 })));

  test('roles as the per-tunnel route: compute:read may not open a mux connection, compute:connect may not reach a worker host', async () => {
    const reader = await account(cluster.c, 'mux-reader', ['compute:read']);
    assert.equal((await upgrade(cluster.c.ctl, '/v1/port-forward-mux', { auth: reader.auth })).status, 403);
    const connector = await account(cluster.c, 'mux-conn', ['compute:connect']);
    const f = connector.client.portForwarder({ worker: 'syn-1', port: 22 });
    try {
      await assert.rejects(f.open(), (err: unknown) => err instanceof ApiError && err.status === 403);
    } finally {
      f.close();
    }
  });

  test("each tunnel counts against the account's tunnelsPerAccount (the connection too): 429 beyond, and a closed one frees its place", async () => {
    const user = await account(cluster.c, 'mux-limited', ['compute:connect']);
    const f = user.client.portForwarder({ vm: 'v1', port: 22 });
    try {
      const a = await f.open();
      const b = await f.open();
      await assert.rejects(f.open(), (err: unknown) => err instanceof ApiError && err.status === 429 && /tunnels open, its limit is 3/.test(err.message));
      a.stream.destroy();
      await waitFor('the place freed', async () => (await f.open().then((t) => (t.stream.destroy(), true), () => undefined)), 10_000, 5);
      b.stream.destroy();
    } finally {
      f.close();
    }
  });

  test('revoking the account closes its mux connection and every tunnel on it', async () => {
    const user = await account(cluster.c, 'mux-revoked', ['compute:connect']);
    const f = user.client.portForwarder({ vm: 'v1', port: 22 });
    try {
      const { ws, stream } = await f.open();
      const gone = closed(ws);
      const streamClosed = new Promise((resolve) => stream.once('close', resolve));
      await cluster.c.admin.deleteServiceAccount(user.name);
      assert.equal((await gone).code, 1008);
      await streamClosed;
      assert.ok(stream.destroyed);
    } finally {
      f.close();
    }
  });

  for (const [what, breach, reason] of [
    ['a text frame', (ws: WebSocket) => ws.send('{"open":true}'), /a text frame/],
    ['bytes for a tunnel that is not open', (ws: WebSocket) => ws.send(frame(DATA, 7, Buffer.alloc(10))), /not open/],
    ['an END for a tunnel that is not open', (ws: WebSocket) => ws.send(frame(END, 9)), /not open/],
    ['a frame shorter than its header', (ws: WebSocket) => ws.send(Buffer.from([DATA, 0, 0])), /shorter than its header/],
    ['an unknown frame type', (ws: WebSocket) => (openWaiting(ws, 1), ws.send(frame(99, 1))), /unknown frame type/],
    ['an OPEN_OK from the side that opens', (ws: WebSocket) => (openWaiting(ws, 1), ws.send(frame(OPEN_OK, 1))), /OPEN_OK for tunnel 1/],
    ['an OPEN reusing an id', (ws: WebSocket) => (openWaiting(ws, 1), openWaiting(ws, 1)), /reusing a tunnel id/],
    ['bytes beyond the window granted', (ws: WebSocket) => {
      openWaiting(ws, 1);
      for (let sent = 0; sent <= INITIAL_WINDOW; sent += 16 * 1024) ws.send(frame(DATA, 1, Buffer.alloc(16 * 1024)));
    }, /beyond the window/],
    ['a DATA frame over 64 KiB', (ws: WebSocket) => (openWaiting(ws, 1), ws.send(frame(DATA, 1, Buffer.alloc(64 * 1024 + 1)))), /over 64 KiB/],
    ['bytes after its END', (ws: WebSocket) => (openWaiting(ws, 1), ws.send(frame(END, 1)), ws.send(frame(DATA, 1, Buffer.alloc(1)))), /after the end/],
  ] as const) {
    test(`${what} closes the connection with 1008, and the controller serves on`, async () => {
      const ws = await client();
      const gone = closed(ws);
      breach(ws);
      const { code, reason: why } = await gone;
      assert.equal(code, 1008);
      assert.match(why, reason);
      assert.ok((await cluster.c.admin.info()).capabilities.includes('tunnel-mux'));
    });
  }

  test('more than 1024 tunnels on one connection (refused ones never acknowledged count too) close it with 1008', async () => {
    const ws = await client();
    const gone = closed(ws);
    // Each is refused at once (port 0): the controller's RESET waits for ours, which never comes.
    for (let id = 1; id <= 1025; id++) ws.send(frame(OPEN, id, JSON.stringify({ vm: 'v1', port: 0 })));
    const { code, reason } = await gone;
    assert.equal(code, 1008);
    assert.match(reason, /more than 1024 tunnels/);
  });

  test("a worker's mux connection: only its own account, only if declared, at most 2", async () => {
    const { token } = await account(cluster.c, 'writer', ['compute:write']);
    assert.equal((await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=syn-1', { auth: ['writer', token] })).status, 403);
    const writer = cluster.c.client('writer', token);
    await writer.registerWorker({ name: 'wx', machine_id: 'machine-x', resources: { [RESOURCE_TART_VMS]: 1 } });
    assert.equal((await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=wx', { auth: ['writer', token] })).status, 403);
    // syn-1 (the admin's) holds one already.
    const second = await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=syn-1', { auth: ADMIN });
    assert.equal(second.status, 101);
    assert.equal((await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=syn-1', { auth: ADMIN })).status, 429);
    second.ws!.close();
    await closed(second.ws!);
  });

  test("a hostile worker: it sees no other worker's tunnels; an OPEN from it, or bytes beyond its window, close its connection (1008) and reset the tunnels on it", async () => {
    const { token } = await account(cluster.c, 'evil', ['compute:write']);
    const evil = cluster.c.client('evil', token);
    await evil.registerWorker({ name: 'evil-1', machine_id: 'machine-evil', resources: { [RESOURCE_TART_VMS]: 1 }, capabilities: ['portForwardMux'] });
    {
      // Another worker's VM: nothing of its tunnel reaches this worker's connection.
      const u = await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=evil-1', { auth: ['evil', token] });
      assert.equal(u.status, 101, u.body);
      const seen = frames(u.ws!);
      const f = cluster.c.admin.portForwarder({ vm: 'v1', port: 22 });
      const { stream } = await f.open();
      const back = new Promise<string>((resolve) => stream.once('data', (c: Buffer) => resolve(c.toString())));
      stream.write('for syn-1');
      assert.equal(await back, 'for syn-1');
      f.close();
      assert.deepEqual(seen.got, []);
      u.ws!.close();
      await closed(u.ws!);
    }
    for (const breach of ['open', 'window'] as const) {
      const u = await upgrade(cluster.c.ctl, '/v1/rpc/port-forward-mux?workerName=evil-1', { auth: ['evil', token] });
      assert.equal(u.status, 101, u.body);
      const ws = u.ws!;
      const from = frames(ws);
      const gone = closed(ws);
      const f = cluster.c.admin.portForwarder({ worker: 'evil-1', port: 4000 });
      try {
        const opening = f.open();
        opening.catch(() => {});
        const request = await from.next((x) => x.type === OPEN);
        assert.deepEqual(JSON.parse(request.payload.toString()), { vmUID: '', port: 4000 });
        if (breach === 'open') {
          ws.send(frame(OPEN, 1, '{}'));
          assert.match((await gone).reason, /OPEN from the side that may not open/);
          await assert.rejects(opening, (err: unknown) => err instanceof ApiError && err.status === 503);
        } else {
          ws.send(frame(OPEN_OK, request.id));
          const { stream } = await opening;
          stream.pause();
          const reset = new Promise<Error>((resolve) => stream.once('error', resolve));
          // Far more than it was granted, without waiting for window updates.
          for (let i = 0; i < 512; i++) ws.send(frame(DATA, request.id, Buffer.alloc(16 * 1024)));
          assert.match((await gone).reason, /beyond the window/);
          assert.match((await reset).message, /beyond the window/);
        }
      } finally {
        f.close();
      }
    }
    // The honest worker's tunnels are untouched.
    const ok = cluster.c.admin.portForwarder({ vm: 'v1', port: 22 });
    try {
      const { stream } = await ok.open();
      const back = new Promise<string>((resolve) => stream.once('data', (c: Buffer) => resolve(c.toString())));
      stream.write('still here');
      assert.equal(await back, 'still here');
      stream.destroy();
    } finally {
      ok.close();
    }
  });

  test('a client that grants itself a 1 GiB window and reads nothing: the controller relays only what its queues hold, and the worker side stops', async () => {
    // A worker-host port that sends as fast as it is let, counting what it handed over.
    let sent = 0;
    const chunk = Buffer.alloc(64 * 1024, 1);
    const firehose = net.createServer((sock) => {
      sock.on('error', () => {});
      const pump = () => {
        do sent += chunk.length;
        while (sock.write(chunk));
      };
      sock.on('drain', pump);
      pump();
    });
    await new Promise<void>((resolve) => firehose.listen(0, '127.0.0.1', resolve));
    const ws = await client();
    try {
      const f = frames(ws);
      ws.send(frame(OPEN, 1, JSON.stringify({ worker: 'syn-1', port: (firehose.address() as net.AddressInfo).port })));
      await f.next((x) => x.type === OPEN_OK && x.id === 1);
      const grant = Buffer.alloc(4);
      grant.writeUInt32BE(1024 ** 3);
      ws.send(frame(WINDOW, 1, grant));
      ws.pause(); // from now on it reads nothing
      // The flow stops once the kernel's buffers, the relay's queue and the worker's window are full:
      // a few MiB. Queued in the controller without bound, it would pass 256 MiB in about a second.
      let last = -1;
      let still = 0;
      await waitFor('the firehose to be held back', () => {
        still = sent === last ? still + 1 : 0;
        last = sent;
        return still >= 5 || sent > 256 * 1024 * 1024 || undefined;
      }, 30_000, 100);
      assert.ok(sent < 64 * 1024 * 1024, `${(sent / 1024 / 1024).toFixed(0)} MiB left the worker host's port for a client that reads nothing`);
    } finally {
      ws.terminate();
      firehose.close();
    }
  });

  test('a client that resets a tunnel waiting for its VM ends the wait; its RESET is answered, and the id is not reused', async () => {
    const ws = await client();
    const from = frames(ws);
    openWaiting(ws, 1);
    await waitFor('the wait for the VM', async () => (await metric(cluster.c.ctl, 'orchard_vm_waits')) === 1 || undefined, 10_000, 5);
    ws.send(frame(RESET, 1));
    const answer = await from.next((x) => x.type === RESET && x.id === 1);
    assert.equal(answer.id, 1);
    await waitFor('the wait ended', async () => (await metric(cluster.c.ctl, 'orchard_vm_waits')) === 0 || undefined, 10_000, 5);
    const gone = closed(ws);
    openWaiting(ws, 1);
    assert.match((await gone).reason, /reusing a tunnel id/);
  });
});

