// A client's ready port-forward connections (controller capability "port-forward-ready"): tunnels of
// client.portForwarder take a connection opened ahead of time (no per-tunnel upgrade), errors come back
// as the controller's status, roles are checked as for the per-tunnel path, a client that breaks the
// protocol is closed, bytes pipelined after the open request are not lost, one that leaves while its VM is awaited ends the wait, TLS sessions are resumed, and against a controller
// without the capability the per-tunnel WebSocket is used, as before.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ApiError } from '../src/client/errors.ts';
import { ADMIN_TOKEN, metric, waitFor } from './helpers.ts';
import { account, closed, clusterWithVM, countWebSockets, upgrade } from './security/attack.ts';

async function echo(tunnel: { ws: { close(): void }; stream: NodeJS.ReadWriteStream }, text: string) {
  const back = new Promise<string>((resolve) => tunnel.stream.once('data', (c: Buffer) => resolve(c.toString())));
  tunnel.stream.write(text);
  assert.equal(await back, text);
  tunnel.ws.close();
}

describe('client ready port-forward connections', () => {
  let cluster: Awaited<ReturnType<typeof clusterWithVM>>;
  before(async () => {
    cluster = await clusterWithVM('v1');
  });
  after(() => cluster.close());

  test('the controller lists port-forward-ready; 20 tunnels in a row each take a ready connection, none opens its own WebSocket', async () => {
    const { admin } = cluster.c;
    assert.ok((await admin.info()).capabilities.includes('port-forward-ready'));
    const paths = countWebSockets(admin).client;
    const forwarder = admin.portForwarder({ vm: 'v1', port: 22, waitSeconds: 5 }, 2, { mux: false });
    try {
      for (let i = 0; i < 20; i++) {
        await waitFor('a ready connection', () => forwarder.ready > 0 || undefined, 10_000, 5);
        const before = paths.length;
        const opening = forwarder.open();
        // The used connection is replaced later (a timer), not at once on the tunnel's own path: by the
        // end of this event-loop turn no WebSocket has been opened.
        await new Promise((r) => setImmediate(r));
        assert.equal(paths.length, before, 'WebSockets opened at once when a tunnel was asked for');
        await echo(await opening, `hello ${i}`);
      }
      assert.deepEqual(new Set(paths), new Set(['/v1/vms/v1/port-forward/ready']));
      assert.ok(paths.length >= 20, `${paths.length} ready connections for 20 tunnels (used ones are replaced)`);
    } finally {
      forwarder.close();
    }
  });

  test("the controller's refusal comes back as its status: an unknown VM is 404, and the forwarder keeps working", async () => {
    const { admin } = cluster.c;
    const missing = admin.portForwarder({ vm: 'nope', port: 22, waitSeconds: 0 }, 1, { mux: false });
    try {
      await waitFor('a ready connection', () => missing.ready > 0 || undefined, 10_000, 5);
      await assert.rejects(missing.open(), (err: unknown) => err instanceof ApiError && err.status === 404 && /VM "nope" not found/.test(err.message));
      await waitFor('a ready connection again', () => missing.ready > 0 || undefined, 10_000, 5);
    } finally {
      missing.close();
    }
  });

  test('an unknown worker is 404 naming it, on the per-tunnel route and on a ready connection', async () => {
    const { admin } = cluster.c;
    const named = (err: unknown) => err instanceof ApiError && err.status === 404 && /worker "nowhere" not found/.test(err.message);
    await assert.rejects(admin.portForwardWorker('nowhere', 22), named);
    const ready = admin.portForwarder({ worker: 'nowhere', port: 22 }, 1, { mux: false });
    try {
      await waitFor('a ready connection', () => ready.ready > 0 || undefined, 10_000, 5);
      await assert.rejects(ready.open(), named);
    } finally {
      ready.close();
    }
  });

  test('roles as on the per-tunnel path: compute:read may not open a ready connection, compute:connect may not reach a worker host', async () => {
    const reader = await account(cluster.c, 'reader', ['compute:read']);
    const connector = await account(cluster.c, 'connector', ['compute:connect']);
    try {
      const r = await upgrade(cluster.c.ctl, '/v1/vms/v1/port-forward/ready?port=22', { auth: reader.auth });
      assert.equal(r.status, 403, r.body);
      const w = await upgrade(cluster.c.ctl, '/v1/workers/syn-1/port-forward/ready?port=22', { auth: connector.auth });
      assert.equal(w.status, 403, w.body);
      // Through the forwarder: the refusal of the upgrade, then of the per-tunnel path, reaches the caller.
      const f = reader.client.portForwarder({ vm: 'v1', port: 22 }, 1, { mux: false });
      await assert.rejects(f.open(), (err: unknown) => err instanceof ApiError && err.status === 403);
      f.close();
      const ok = connector.client.portForwarder({ vm: 'v1', port: 22 }, 1, { mux: false });
      await waitFor('a ready connection', () => ok.ready > 0 || undefined, 10_000, 5);
      await echo(await ok.open(), 'connect role');
      ok.close();
    } finally {
      reader.client.close();
      connector.client.close();
    }
  });

  test('revoking the role closes idle ready connections, and no tunnel opens on them afterwards', async () => {
    const temp = await account(cluster.c, 'temp', ['compute:connect']);
    const f = temp.client.portForwarder({ vm: 'v1', port: 22 }, 2, { mux: false });
    try {
      await waitFor('2 ready connections', () => f.ready === 2 || undefined, 10_000, 5);
      await cluster.c.admin.updateServiceAccount({ name: 'temp', token: temp.token, roles: ['compute:read'] });
      await waitFor('the idle connections closed', () => f.ready === 0 || undefined, 10_000, 5);
      await assert.rejects(f.open(), (err: unknown) => err instanceof ApiError && err.status === 403);
    } finally {
      f.close();
      temp.client.close();
    }
  });

  test('a client that sends anything but the open request first is closed with 1008; bytes sent right after the request are relayed once the tunnel opens', async () => {
    const auth: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];
    const a = await upgrade(cluster.c.ctl, '/v1/vms/v1/port-forward/ready?port=22', { auth });
    const aClosed = closed(a.ws!);
    a.ws!.send(Buffer.from('GET / HTTP/1.0\r\n\r\n'));
    assert.equal((await aClosed).code, 1008);
    const b = await upgrade(cluster.c.ctl, '/v1/vms/v1/port-forward/ready?port=22', { auth });
    const got: string[] = [];
    const echoed = new Promise<void>((resolve) =>
      b.ws!.on('message', (m, isBinary) => {
        got.push(isBinary ? `binary ${m.toString()}` : m.toString());
        if (got.join('').includes('pipelined')) resolve();
      }),
    );
    b.ws!.send('{"open":true}');
    b.ws!.send(Buffer.from('pipelined'));
    await echoed;
    assert.equal(got[0], '{"ready":true}');
    assert.equal(got.slice(1).join('').replace(/binary /g, ''), 'pipelined');
    b.ws!.close();
  });

  test('a client that leaves while its VM is awaited ends the wait', async () => {
    await cluster.c.admin.createVM({ name: 'later2', image: 'synthetic', labels: { none: 'such' } });
    const c = await upgrade(cluster.c.ctl, '/v1/vms/later2/port-forward/ready?port=22&wait=30', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
    c.ws!.send('{"open":true}');
    await waitFor('the request to wait for its VM', async () => (await metric(cluster.c.ctl, 'orchard_vm_waits')) === 1, 5000, 20);
    c.ws!.terminate();
    await waitFor('no request waiting', async () => (await metric(cluster.c.ctl, 'orchard_vm_waits')) === 0, 5000, 20);
    await cluster.c.admin.deleteVM('later2');
  });

  test("the client's WebSockets resume the controller's TLS session: the second tunnel skips the certificate exchange", async () => {
    const { admin } = cluster.c;
    const reused: boolean[] = [];
    for (let i = 0; i < 2; i++) {
      const t = await admin.portForwardVM('v1', 22);
      reused.push((t.ws as unknown as { _socket: import('node:tls').TLSSocket })._socket.isSessionReused());
      await echo(t, `resumed ${i}`);
    }
    assert.equal(reused[1], true);
  });

  test('against a controller without the capability (upstream), each tunnel opens its own WebSocket on /port-forward', async () => {
    const { admin } = cluster.c;
    const info = admin.info;
    admin.info = async () => ({ ...(await info()), capabilities: [] });
    const paths = countWebSockets(admin).client;
    const forwarder = admin.portForwarder({ vm: 'v1', port: 22 }, 2, { mux: false });
    try {
      for (let i = 0; i < 3; i++) await echo(await forwarder.open(), `old way ${i}`);
      assert.deepEqual(paths, ['/v1/vms/v1/port-forward', '/v1/vms/v1/port-forward', '/v1/vms/v1/port-forward']);
      assert.equal(forwarder.ready, 0);
    } finally {
      forwarder.close();
      admin.info = info;
    }
  });
});

describe('client ready port-forward connections: bounded per account', () => {
  test('idle ready connections count against the account\'s tunnels: past the limit the upgrade is 429', async () => {
    const cluster = await clusterWithVM('v1', { limits: { tunnelsPerAccount: 3 } });
    const f = cluster.c.admin.portForwarder({ vm: 'v1', port: 22 }, 3, { mux: false });
    try {
      await waitFor('3 ready connections', () => f.ready === 3 || undefined, 10_000, 5);
      const more = await upgrade(cluster.c.ctl, '/v1/vms/v1/port-forward/ready?port=22', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
      assert.equal(more.status, 429, more.body);
      // A tunnel on one of them works; its replacement is refused while the tunnel holds its place.
      await echo(await f.open(), 'within the limit');
    } finally {
      f.close();
      await cluster.close();
    }
  });
});
