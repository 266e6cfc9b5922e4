// The tunnel mux on the worker's watch WebSocket (controller capability "watch-mux",
// docs/tunnel-mux-protocol.md, "On the watch"): our worker holds one connection to the controller, on
// which its instructions, its reports and its tunnels all travel; it comes back as one after a
// restart. The controller refuses the mux to an account without compute:write, tells the watch's
// text frames from the mux's binary ones both ways, closes the watch on a mux breach (1008), and
// cuts a worker that stops reading but not one whose tunnels are busy.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import net from 'node:net';
import type { IncomingMessage } from 'node:http';
import type { WebSocket } from 'ws';
import { pino } from 'pino';
import { RESOURCE_TART_VMS } from '../src/api/schemas.ts';
import { DATA, frame, INITIAL_WINDOW, OPEN, OPEN_OK } from '../src/client/mux.ts';
import { startController } from '../src/controller/controller.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, tempDir, waitFor } from './helpers.ts';
import { account, closed, countWebSockets, echo, syntheticWorker, upgrade } from './security/attack.ts';

const ADMIN: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];

/** Counts the workers' WebSocket upgrades (/v1/rpc/…) the controller (any https server in this process) receives, by path. */
function controllerUpgrades(): { paths: string[]; restore(): void } {
  const paths: string[] = [];
  const emit = https.Server.prototype.emit as (this: https.Server, event: string | symbol, ...args: unknown[]) => boolean;
  https.Server.prototype.emit = function (this: https.Server, event: string | symbol, ...args: unknown[]) {
    const url = event === 'upgrade' ? (args[0] as IncomingMessage).url : undefined;
    if (url?.startsWith('/v1/rpc/')) paths.push(new URL(url, 'http://x').pathname);
    return emit.call(this, event, ...args);
  };
  return { paths, restore: () => void (https.Server.prototype.emit = emit) };
}

/** The text frames (parsed) and binary frames `ws` receives. */
function frames(ws: WebSocket) {
  const text: Record<string, unknown>[] = [];
  const binary: Buffer[] = [];
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    if (isBinary) binary.push(data);
    else text.push(JSON.parse(data.toString()) as Record<string, unknown>);
  });
  return { text, binary };
}

describe('the tunnel mux on the watch', () => {
  test('a worker holds one WebSocket; tunnels of every kind ride it; after a restart it comes back as one and tunnels work again', async () => {
    const dataDir = tempDir();
    const start = (listen = '127.0.0.1:0') => startController({ dataDir, listen, bootstrapAdminToken: ADMIN_TOKEN, logger: pino({ level: 'silent' }) });
    let ctl = await start();
    const port = new URL(ctl.url).port;
    const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    assert.ok((await admin.info()).capabilities.includes('watch-mux'));
    const upgrades = controllerUpgrades();
    const worker = syntheticWorker(clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN), 'one-1');
    try {
      await worker.start();
      await waitFor('the mux on the watch', () => worker.tunnelMuxOpen || undefined, 10_000, 5);
      await admin.createVM({ name: 'v1', image: 'synthetic' });
      await waitFor('v1 running', async () => (await admin.getVM('v1')).status === 'running' || undefined, 10_000);
      const record = (await admin.listWorkers()).find((w) => w.name === 'one-1');
      assert.deepEqual(record?.capabilities?.filter((c) => c.startsWith('portForward')), ['portForwardMux']);
      assert.equal(worker.readyTunnels, 0, 'no ready connection');

      const tunnels = async () => {
        const seen = countWebSockets(admin);
        // Through the client's mux.
        const forwarder = admin.portForwarder({ vm: 'v1', port: 22, waitSeconds: 5 });
        try {
          await Promise.all(Array.from({ length: 10 }, async (_, i) => echo((await forwarder.open()).stream, Buffer.alloc(200_000 + i, i))));
        } finally {
          forwarder.close();
        }
        // Upstream's per-tunnel WebSocket, to the VM and to the worker's host.
        const { ws, stream } = await admin.portForwardVM('v1', 22, 5);
        const back = new Promise<string>((resolve) => stream.once('data', (c: Buffer) => resolve(c.toString())));
        stream.write('per-tunnel');
        assert.equal(await back, 'per-tunnel');
        ws.close();
        await closed(ws);
        const hostPort = net.createServer((sock) => sock.end('from the host'));
        await new Promise<void>((resolve) => hostPort.listen(0, '127.0.0.1', resolve));
        try {
          const host = await admin.portForwardWorker('one-1', (hostPort.address() as net.AddressInfo).port);
          let got = '';
          host.stream.on('data', (c: Buffer) => (got += c.toString()));
          assert.equal((await closed(host.ws)).code, 1000);
          assert.equal(got, 'from the host');
        } finally {
          hostPort.close();
        }
        assert.deepEqual(seen.worker, [], 'no dial-back, no ready connection, no mux connection of its own');
      };
      await tunnels();
      // (Exec and the SSH jump host take their worker's side from the same Tunnels.openStream; a synthetic
      // VM has no sshd: test/exec.test.ts and test/ssh-jump.test.ts run them against QEMU guests.)
      assert.deepEqual(upgrades.paths, ['/v1/rpc/watch'], 'one WebSocket of the worker\'s');
      assert.equal(ctl.activity().workersConnected, 1);

      // A restart: the worker comes back with its one connection, and tunnels work again.
      upgrades.paths.length = 0;
      await ctl.close();
      await waitFor('the worker to see its watch drop', () => !worker.connected || undefined, 10_000, 10);
      ctl = await start(`127.0.0.1:${port}`);
      await waitFor('the worker back', () => (worker.connected && worker.tunnelMuxOpen) || undefined, 15_000, 10);
      await waitFor('v1 running again', async () => (await admin.getVM('v1')).status === 'running' || undefined, 10_000);
      await tunnels();
      assert.deepEqual(upgrades.paths, ['/v1/rpc/watch'], 'one WebSocket after the restart');
    } finally {
      upgrades.restore();
      await worker.stop();
      admin.close();
      await ctl.close();
    }
  });

  test('a worker that asked for the mux and got a plain watch (an older controller took the place) keeps a mux connection of its own', async () => {
    const c = await inProcessController();
    // The controller never sees mux=1: it answers as one without "watch-mux" would (binary instructions, no header).
    const emit = https.Server.prototype.emit as (this: https.Server, event: string | symbol, ...args: unknown[]) => boolean;
    https.Server.prototype.emit = function (this: https.Server, event: string | symbol, ...args: unknown[]) {
      const req = args[0] as IncomingMessage;
      if (event === 'upgrade' && req.url?.startsWith('/v1/rpc/watch')) req.url = req.url.replace('&mux=1', '');
      return emit.call(this, event, ...args);
    };
    const worker = syntheticWorker(c.admin, 'old-1');
    const seen = countWebSockets(c.admin);
    try {
      await worker.start();
      await waitFor('its own mux connection', () => worker.tunnelMuxOpen || undefined, 10_000, 5);
      assert.deepEqual(seen.worker, ['/v1/rpc/port-forward-mux']);
      await c.admin.createVM({ name: 'o1', image: 'synthetic' });
      await waitFor('o1 running (binary instructions read)', async () => (await c.admin.getVM('o1')).status === 'running' || undefined, 10_000);
      const forwarder = c.admin.portForwarder({ vm: 'o1', port: 22 });
      try {
        await echo((await forwarder.open()).stream, Buffer.alloc(100_000, 4));
      } finally {
        forwarder.close();
      }
    } finally {
      https.Server.prototype.emit = emit;
      await worker.stop();
      await c.close();
      c.cleanup();
    }
  });

  describe('the controller side', () => {
    let c: Awaited<ReturnType<typeof inProcessController>>;
    before(async () => {
      c = await inProcessController();
      await c.admin.registerWorker({ name: 'wm', machine_id: 'machine-wm', resources: { [RESOURCE_TART_VMS]: 100 }, capabilities: ['portForwardMux'] });
    });
    after(async () => {
      await c.close();
      c.cleanup();
    });

    test('compute:read only: the mux on the watch is refused (403 naming compute:write); the plain watch is not', async () => {
      // Registering needs compute:write: the account registers its worker, then keeps compute:read only.
      const reader = await account(c, 'reader', ['compute:read', 'compute:write']);
      await reader.client.registerWorker({ name: 'wr', machine_id: 'machine-wr', resources: { [RESOURCE_TART_VMS]: 1 } });
      await c.admin.updateServiceAccount({ name: 'reader', token: reader.token, roles: ['compute:read'] });
      const refused = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wr&mux=1', { auth: reader.auth });
      assert.equal(refused.status, 403, refused.body);
      const { message } = JSON.parse(refused.body) as { message: string };
      assert.match(message, /lacks the role "compute:write"/);
      assert.match(message, /mux=1/);
      const plain = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wr', { auth: reader.auth });
      assert.equal(plain.status, 101, plain.body);
      plain.ws!.close();
      await closed(plain.ws!);
    });

    test('our worker whose account loses compute:write: its watch closes (the tunnels need it) and comes back without the mux', async () => {
      const w = await account(c, 'w-losing', ['compute:read', 'compute:write']);
      const worker = syntheticWorker(w.client, 'wl');
      try {
        await worker.start();
        await waitFor('the mux on the watch', () => (worker.connected && worker.tunnelMuxOpen) || undefined, 10_000, 5);
        await c.admin.updateServiceAccount({ name: 'w-losing', token: w.token, roles: ['compute:read'] });
        await waitFor('the mux gone', () => !worker.tunnelMuxOpen || undefined, 10_000, 5);
        await waitFor('the plain watch back', () => worker.connected || undefined, 10_000, 5);
        assert.equal(worker.tunnelMuxOpen, false);
      } finally {
        await worker.stop();
      }
    });

    test('on a mux watch, watch messages are text frames; a text report is answered; a binary frame that is no mux frame closes it (1008)', async () => {
      const u = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wm&mux=1&hello=1', { auth: ADMIN });
      assert.equal(u.status, 101, u.body);
      const ws = u.ws!;
      const got = frames(ws);
      await waitFor('the hello and the first sync', () => (got.text.some((f) => 'controllerHello' in f) && got.text.some((f) => 'syncVMsAction' in f)) || undefined, 5000, 5);
      assert.deepEqual(got.binary, [], 'no binary watch frame');
      ws.send(JSON.stringify({ id: 7, vmState: { vm: 'nope', state: { status: 'running' } } }));
      await waitFor('the acknowledgement', () => got.text.find((f) => (f.reportAck as { id?: number } | undefined)?.id === 7), 5000, 5);
      const gone = closed(ws);
      ws.send(Buffer.from([0xff, 0, 0]));
      const { code, reason } = await gone;
      assert.equal(code, 1008);
      assert.match(reason, /shorter than its header/);
    });

    test('a plain watch (upstream\'s workers) is unchanged: binary instructions, and a binary frame up is answered as a report', async () => {
      const u = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wm', { auth: ADMIN });
      assert.equal(u.status, 101);
      const ws = u.ws!;
      const got = frames(ws);
      await waitFor('the first sync', () => got.binary.length || undefined, 5000, 5);
      assert.ok(JSON.parse(got.binary[0].toString()).syncVMsAction);
      ws.send(Buffer.from('not json'));
      await waitFor('the answer', () => got.text.find((f) => (f.reportAck as { status?: number } | undefined)?.status === 400), 5000, 5);
      assert.equal(ws.readyState, ws.OPEN);
      ws.close();
      await closed(ws);
    });
  });

  test('busy tunnels do not get the watch cut; a worker that stops reading is cut', async () => {
    // A small limit: with the whole socket's backlog counted, the tunnels' bytes alone would pass it.
    const c = await inProcessController({ limits: { workerBufferBytes: 256 * 1024 } });
    /** A worker of the admin's on its mux watch, accepting every tunnel; its socket paused once they are open, with their windows' worth under way. */
    const stalled = async (name: string) => {
      await c.admin.registerWorker({ name, machine_id: `machine-${name}`, labels: { pool: name }, resources: { [RESOURCE_TART_VMS]: 200 }, capabilities: ['portForwardMux'] });
      const u = await upgrade(c.ctl, `/v1/rpc/watch?workerName=${name}&mux=1`, { auth: ADMIN });
      assert.equal(u.status, 101, u.body);
      const ws = u.ws!;
      let opened = 0;
      let dataBytes = 0;
      ws.on('message', (data: Buffer, isBinary: boolean) => {
        if (isBinary && data[0] === OPEN) {
          opened++;
          ws.send(frame(OPEN_OK, data.readUInt32BE(1)));
        }
        if (isBinary && data[0] === DATA) dataBytes += data.length - 5;
      });
      const wsClosed = closed(ws);
      const socket = (ws as unknown as { _socket: net.Socket })._socket;
      const forwarder = c.admin.portForwarder({ worker: name, port: 1 });
      const streams = await Promise.all(Array.from({ length: 40 }, async () => (await forwarder.open()).stream));
      assert.equal(opened, 40);
      // It stops reading while each tunnel sends its window's worth: what the controller relays fills
      // the kernel's buffers, then waits in its socket's (at most the relays' queues, ≈ 64 KiB a tunnel).
      socket.pause();
      for (const s of streams) s.write(Buffer.alloc(INITIAL_WINDOW, 1));
      await new Promise((r) => setTimeout(r, 1000));
      return { ws, socket, wsClosed, forwarder, received: () => dataBytes };
    };
    try {
      const busy = await stalled('wm');
      // A sync now (a VM placed on it): it waits behind the tunnels' bytes, and is no reason to cut the watch.
      await c.admin.createVM({ name: 'busy-0', image: 'synthetic', labels: { pool: 'wm' } });
      await waitFor('busy-0 placed', async () => (await c.admin.getVM('busy-0')).worker === 'wm' || undefined, 5000);
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(c.ctl.activity().workersConnected, 1, "the watch was cut for its tunnels' bytes");
      // Reading again: everything arrives, the watch goes on.
      busy.socket.resume();
      await waitFor("the tunnels' bytes", () => busy.received() >= 40 * INITIAL_WINDOW || undefined, 10_000, 10);
      assert.equal(busy.ws.readyState, busy.ws.OPEN);
      busy.forwarder.close();
      busy.ws.close();
      await busy.wsClosed;

      // One that stops reading for good: the syncs pile up behind the tunnels' bytes, and it is cut.
      const dead = await stalled('wm2');
      for (let i = 1; i <= 150 && c.ctl.activity().workersConnected === 1; i++) {
        await c.admin.createVM({ name: `dead-${i}`, image: 'synthetic', labels: { pool: 'wm2' } });
        await new Promise((r) => setTimeout(r, 10));
      }
      await waitFor('the worker cut', () => c.ctl.activity().workersConnected === 0 || undefined, 10_000, 10);
      dead.socket.resume();
      const { code } = await dead.wsClosed;
      assert.ok(code === 1008 || code === 1006, `closed with ${code}`);
      dead.forwarder.close();
    } finally {
      await c.close();
      c.cleanup();
    }
  });
});
