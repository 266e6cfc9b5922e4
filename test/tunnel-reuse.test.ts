// Reused tunnel connections (docs/tunnel-pool-protocol.md, "Reusing a connection"): a tunnel that
// ends with an end frame each way leaves its client and worker WebSockets open, and the next tunnels
// take them, so tunnels in a row open no WebSocket at all; half-close passes end to end; a tunnel
// cut or a side that breaks the protocol closes the connection instead; a reused connection is still
// its account's (revocation closes it); upstream's per-tunnel path
// (no end frames on the client's side) still reuses the worker's connection when the VM ends first.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { ADMIN_TOKEN, waitFor } from './helpers.ts';
import { account, closed, clusterWithVM, countWebSockets, upgrade } from './security/attack.ts';

/** Sends `text` through an echo, reads it back, ends its side and waits for the tunnel's end (both ends passed). */
async function echoAndEnd(stream: Duplex, text: string) {
  let got = '';
  const ended = new Promise<void>((resolve, reject) => {
    stream.on('data', (c: Buffer) => (got += c.toString()));
    stream.once('error', reject);
    stream.once('close', () => resolve());
  });
  stream.write(text);
  stream.end();
  await ended;
  assert.equal(got, text);
}

describe('reused tunnel connections', () => {
  let cluster: Awaited<ReturnType<typeof clusterWithVM>>;
  before(async () => {
    // The worker keeps ready connections (with a mux connection it keeps none: docs/tunnel-mux-protocol.md).
    cluster = await clusterWithVM('v1', { tunnelMux: false });
  });
  after(() => cluster.close());

  test('20 tunnels in a row that end with end frames open no WebSocket, neither the client nor the worker', async () => {
    const { admin } = cluster.c;
    const forwarder = admin.portForwarder({ vm: 'v1', port: 22, waitSeconds: 5 }, 2, { mux: false });
    try {
      await waitFor('2 ready connections', () => forwarder.ready === 2 || undefined, 10_000, 5);
      // Warm-up: the first tunnels have their connections replaced before they come back.
      // Warm-up: two tunnels at once take both connections, whose replacements open (10 ms later); all
      // four come back, and from then on a take never leaves the pool below its size.
      const both = await Promise.all([forwarder.open(), forwarder.open()]);
      await waitFor('the replacements', () => forwarder.ready === 2 || undefined, 10_000, 5);
      await Promise.all(both.map((t, i) => echoAndEnd(t.stream, `warm-up ${i}`)));
      assert.equal(forwarder.ready, 4);
      const seen = countWebSockets(admin);
      for (let i = 0; i < 20; i++) {
        const { ws, stream } = await forwarder.open();
        await echoAndEnd(stream, `hello ${i}`);
        assert.equal(ws.readyState, ws.OPEN, 'the connection stays open once its tunnel ended');
      }
      assert.deepEqual(seen.client, []);
      // The worker's pool (1) gets its second connection only if a tunnel outlasts the 10 ms refill delay.
      assert.ok(seen.worker.length <= 1, `the worker opened ${seen.worker.length} WebSockets for 20 tunnels`);
    } finally {
      forwarder.close();
    }
  });

  test("a half-closed tunnel keeps flowing the other way: the client's end reaches the target, whose answer comes back", async () => {
    const server = net.createServer({ allowHalfOpen: true }, (sock) => {
      let request = '';
      sock.on('data', (c: Buffer) => (request += c.toString()));
      // Answers only once the client's end (FIN) has come.
      sock.on('end', () => sock.end(`got ${request.length} bytes`));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const forwarder = cluster.c.admin.portForwarder({ worker: 'syn-1', port: (server.address() as net.AddressInfo).port }, 1, { mux: false });
    try {
      await waitFor('a ready connection', () => forwarder.ready === 1 || undefined, 10_000, 5);
      for (let i = 0; i < 3; i++) {
        const { stream } = await forwarder.open();
        let answer = '';
        stream.on('data', (c: Buffer) => (answer += c.toString()));
        const done = new Promise((r) => stream.once('close', r));
        stream.end('x'.repeat(100_000));
        await done;
        assert.equal(answer, 'got 100000 bytes');
      }
    } finally {
      forwarder.close();
      server.close();
    }
  });

  test("a reader that stops holds back only its own tunnel: the other's 16 MiB pass, then its own arrive intact, on connections reused", async () => {
    const SIZE = 16 * 1024 * 1024;
    const payload = Buffer.alloc(SIZE, 0x61);
    // Sends SIZE bytes to whoever connects, then closes.
    const server = net.createServer((sock) => (sock.on('error', () => {}), sock.end(payload)));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const forwarder = cluster.c.admin.portForwarder({ worker: 'syn-1', port: (server.address() as net.AddressInfo).port }, 2, { mux: false });
    /** Reads to the target's end, then ends this side (the tunnel's end frames: the connection comes back). */
    const drain = async (stream: Duplex) => {
      let n = 0;
      for await (const c of stream) n += (c as Buffer).length;
      stream.end();
      return n;
    };
    try {
      await waitFor('2 ready connections', () => forwarder.ready === 2 || undefined, 10_000, 5);
      for (let round = 0; round < 2; round++) {
        const [slow, fast] = await Promise.all([forwarder.open(), forwarder.open()]);
        slow.stream.pause();
        assert.equal(await drain(fast.stream), SIZE);
        assert.ok(slow.stream.readableLength < SIZE, `the stopped reader had all ${slow.stream.readableLength} bytes buffered on its side`);
        assert.equal(await drain(slow.stream), SIZE);
        await waitFor('both connections back', () => forwarder.ready >= 2 || undefined, 10_000, 5);
      }
    } finally {
      forwarder.close();
      server.close();
    }
  });

  test('a tunnel cut before its end closes its connection, and the next tunnel still opens', async () => {
    const forwarder = cluster.c.admin.portForwarder({ vm: 'v1', port: 22 }, 1, { mux: false });
    try {
      await waitFor('a ready connection', () => forwarder.ready === 1 || undefined, 10_000, 5);
      const { ws, stream } = await forwarder.open();
      const gone = closed(ws);
      stream.destroy();
      await gone;
      await waitFor('a ready connection in its place', () => forwarder.ready === 1 || undefined, 10_000, 5);
      await echoAndEnd((await forwarder.open()).stream, 'after the cut');
    } finally {
      forwarder.close();
    }
  });

  test('a connection back from a tunnel is still held for its account: revoking the role closes it', async () => {
    const temp = await account(cluster.c, 'reuser', ['compute:connect']);
    const f = temp.client.portForwarder({ vm: 'v1', port: 22 }, 1, { mux: false });
    try {
      await waitFor('a ready connection', () => f.ready === 1 || undefined, 10_000, 5);
      const { ws, stream } = await f.open();
      await echoAndEnd(stream, 'before the revocation');
      assert.equal(ws.readyState, ws.OPEN);
      const gone = closed(ws);
      await cluster.c.admin.updateServiceAccount({ name: 'reuser', token: temp.token, roles: ['compute:read'] });
      assert.equal((await gone).code, 1008);
    } finally {
      f.close();
      temp.client.close();
    }
  });

  test('a client that sends a text frame other than its end, or bytes after its end, is closed with 1008', async () => {
    const auth: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];
    for (const [what, send] of [
      ['a text frame', (ws: import('ws').WebSocket) => ws.send('{"hello":1}')],
      ['bytes after the end', (ws: import('ws').WebSocket) => (ws.send('{"end":true}'), ws.send(Buffer.from('late')))],
    ] as const) {
      const u = await upgrade(cluster.c.ctl, '/v1/vms/v1/port-forward/ready?port=22', { auth });
      const ws = u.ws!;
      const answer = new Promise<string>((resolve) => ws.once('message', (m) => resolve(m.toString())));
      ws.send('{"open":true,"reuse":true}');
      assert.equal(await answer, '{"ready":true,"reuse":true}');
      const gone = closed(ws);
      send(ws);
      assert.equal((await gone).code, 1008, what);
    }
  });

  test("upstream's per-tunnel path: the target closing first ends the client's WebSocket (1000) and the worker's connection is reused", async () => {
    const server = net.createServer((sock) => sock.end('bye'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const port = (server.address() as net.AddressInfo).port;
    const { admin } = cluster.c;
    try {
      const tunnel = async () => {
        const { ws, stream } = await admin.portForwardWorker('syn-1', port);
        let got = '';
        stream.on('data', (c: Buffer) => (got += c.toString()));
        assert.equal((await closed(ws)).code, 1000);
        assert.equal(got, 'bye');
      };
      // Warm-up: until a tunnel finds the worker's ready connection (the earlier tests closed some,
      // which the worker reopens after a back-off).
      const warm = countWebSockets(admin);
      await waitFor('a tunnel on a ready connection', async () => {
        const before = warm.worker.length;
        await tunnel();
        return warm.worker.length === before || undefined;
      }, 10_000, 0);
      const seen = countWebSockets(admin);
      for (let i = 0; i < 10; i++) await tunnel();
      assert.ok(seen.worker.length <= 1, `the worker opened ${seen.worker.length} WebSockets for 10 tunnels`);
    } finally {
      server.close();
    }
  });
});
