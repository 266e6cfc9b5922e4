// Ready tunnel connections (controller capability "tunnel-pool", worker capability "portForwardPool"):
// our worker's port-forwards take a connection it opened ahead of time instead of dialling back, the
// pool is bounded per worker and refilled after use, no account can hold or be handed another
// worker's tunnels, and the pool comes back after the controller restarts.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { TLSSocket } from 'node:tls';
import { pino } from 'pino';
import type { OrchardClient } from '../src/client/client.ts';
import { RESOURCE_TART_VMS } from '../src/api/schemas.ts';
import { startController, type RunningController } from '../src/controller/controller.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { ADMIN_TOKEN, clientOf, tempDir, waitFor } from './helpers.ts';
import { upgrade, type Upgrade } from './security/attack.ts';

/** A synthetic worker (dial: an echo stream) whose client counts the dial-backs it opens. */
function countingWorker(ctl: RunningController, name: string, readyTunnels: number | undefined = 4, labels: Record<string, string> = {}) {
  const client = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
  const counts = { dialBacks: 0 };
  const urlOf = client.urlOf.bind(client);
  client.urlOf = ((path: string, ws?: boolean) => {
    if (path === '/v1/rpc/port-forward') counts.dialBacks++;
    return urlOf(path, ws);
  }) as OrchardClient['urlOf'];
  // Whether each TLS handshake of its WebSockets (its watch, ready connections, dial-backs) resumed a session, in order.
  const resumed: boolean[] = [];
  const wsOptions = client.wsOptions.bind(client);
  client.wsOptions = ((url: URL) => {
    const o = wsOptions(url);
    const connect = o.createConnection as unknown as (opts: object) => TLSSocket;
    const counted = (opts: object) => {
      const socket = connect(opts);
      socket.once('secureConnect', () => resumed.push(socket.isSessionReused()));
      return socket;
    };
    return { ...o, createConnection: counted as unknown as typeof o.createConnection };
  }) as OrchardClient['wsOptions'];
  // Ready connections only: no mux connection (tunnel-mux.test.ts has those).
  const worker = new OrchardWorker({ client, name, driver: new SyntheticDriver(), dataDir: tempDir(), slots: 10, heartbeatMs: 1000, readyTunnels, labels, tunnelMux: false, logger: pino({ level: 'silent' }) });
  return { worker, counts, resumed };
}

/** One tunnel to the VM's port 22: what is sent comes back (the synthetic VM echoes). */
async function echoThrough(client: OrchardClient, vm: string, text: string) {
  const { ws, stream } = await client.portForwardVM(vm, 22, 5);
  const back = new Promise<string>((resolve) => stream.once('data', (c: Buffer) => resolve(c.toString())));
  stream.write(text);
  assert.equal(await back, text);
  ws.close();
}

const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('ready tunnel connections', () => {
  const dataDir = tempDir();
  let ctl: RunningController;
  let admin: OrchardClient;
  let w: ReturnType<typeof countingWorker>;
  const start = (port = 0) =>
    startController({ dataDir, listen: `127.0.0.1:${port}`, bootstrapAdminToken: ADMIN_TOKEN, logger: pino({ level: 'silent' }) });

  before(async () => {
    ctl = await start();
    admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    w = countingWorker(ctl, 'syn-1');
    await w.worker.start();
    await admin.createVM({ name: 'v1', image: 'synthetic' });
    await waitFor('v1 running', async () => (await admin.getVM('v1')).status === 'running', 10_000);
  });
  after(async () => {
    admin.close();
    await w.worker.stop();
    await ctl.close();
  });

  test('the controller offers tunnel-pool and our worker declares portForwardPool', async () => {
    assert.ok((await admin.info()).capabilities.includes('tunnel-pool'));
    assert.ok((await admin.getWorker('syn-1')).capabilities?.includes('portForwardPool'));
  });

  test("our worker's tunnels take ready connections: no dial-back on the path of 20 tunnels in a row", async () => {
    await waitFor('the pool filled', () => w.worker.readyTunnels === 4 || undefined, 10_000);
    const before = w.counts.dialBacks;
    for (let i = 0; i < 20; i++) {
      await waitFor('a ready connection', () => w.worker.readyTunnels > 0 || undefined, 10_000);
      await echoThrough(admin, 'v1', `hello ${i}`);
    }
    assert.equal(w.counts.dialBacks - before, 0, 'dial-backs during the 20 tunnels');
  });

  test("the worker's replacement ready connections resume the controller's TLS session", async () => {
    // The watch and the first ready ones open together, before any session ticket came; those opened after tunnels resume it.
    const later = w.resumed.slice(5);
    assert.ok(later.length >= 10, `${later.length} replacement connections`);
    assert.deepEqual(later.filter((r) => !r).length, 0, 'full handshakes after the first 5');
  });

  test('the counter counts: a worker without ready connections dials back once per tunnel', async () => {
    // Labelled so that v0 (same label) can only go there.
    const other = countingWorker(ctl, 'syn-0', 0, { pool: 'none' });
    await other.worker.start();
    try {
      await admin.createVM({ name: 'v0', image: 'synthetic', labels: { pool: 'none' } });
      await waitFor('v0 running on syn-0', async () => {
        const vm = await admin.getVM('v0');
        return (vm.status === 'running' && vm.worker === 'syn-0') || undefined;
      }, 10_000);
      for (let i = 0; i < 3; i++) await echoThrough(admin, 'v0', `dial back ${i}`);
      assert.equal(other.counts.dialBacks, 3);
      assert.ok(!(await admin.getWorker('syn-0')).capabilities?.includes('portForwardPool'), 'a worker with no pool does not declare it');
    } finally {
      await admin.deleteVM('v0').catch(() => {});
      await other.worker.stop();
    }
  });

  test('the pool is refilled after use, and bounded per worker: past 8 idle connections the controller answers 429', async () => {
    await echoThrough(admin, 'v1', 'use one');
    await waitFor('refilled to 4', () => w.worker.readyTunnels === 4 || undefined, 10_000);
    const extra: Upgrade[] = [];
    for (let i = 0; i < 6; i++) extra.push(await upgrade(ctl, '/v1/rpc/port-forward-pool?workerName=syn-1', { auth: ['bootstrap-admin', ADMIN_TOKEN] }));
    assert.deepEqual(extra.map((u) => u.status), [101, 101, 101, 101, 429, 429]);
    assert.match(extra[4].body, /holds 8 ready tunnel connections already/);
    for (const u of extra) u.ws?.close();
  });

  test("an account cannot hold another worker's ready connections, nor be handed a tunnel of another worker's VM", async () => {
    const token = 'writer-token-0123456789abcdef';
    await admin.createServiceAccount({ name: 'writer', token, roles: ['compute:read', 'compute:write'] });
    const writer = clientOf(ctl, 'writer', token);
    try {
      // syn-1 belongs to bootstrap-admin: 403 for anyone else.
      const r = await upgrade(ctl, '/v1/rpc/port-forward-pool?workerName=syn-1', { auth: ['writer', token] });
      assert.equal(r.status, 403, r.body);
      // Its own worker, not declaring the capability: 403; declaring it: 101.
      await writer.registerWorker({ name: 'wx', machine_id: 'mx', resources: { [RESOURCE_TART_VMS]: 0 } });
      const undeclared = await upgrade(ctl, '/v1/rpc/port-forward-pool?workerName=wx', { auth: ['writer', token] });
      assert.equal(undeclared.status, 403, undeclared.body);
      await writer.registerWorker({ name: 'wx', machine_id: 'mx', resources: { [RESOURCE_TART_VMS]: 0 }, capabilities: ['portForwardPool'] });
      const own = await upgrade(ctl, '/v1/rpc/port-forward-pool?workerName=wx', { auth: ['writer', token] });
      assert.equal(own.status, 101, own.body);
      const got: string[] = [];
      own.ws!.on('message', (m) => got.push(m.toString()));
      // Tunnels to syn-1's VM never reach wx's connection.
      for (let i = 0; i < 5; i++) await echoThrough(admin, 'v1', `not for wx ${i}`);
      await settle(100);
      assert.deepEqual(got, []);
      assert.equal(own.ws!.readyState, own.ws!.OPEN);
      own.ws!.close();
    } finally {
      writer.close();
    }
  });

  test('after the controller restarts, the worker opens its ready connections again and tunnels take them', async () => {
    const { port } = ctl;
    await ctl.close();
    ctl = await start(port);
    admin.close();
    admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    await waitFor('the pool re-established', () => w.worker.readyTunnels === 4 || undefined, 20_000);
    await waitFor('v1 running', async () => (await admin.getVM('v1')).status === 'running', 10_000);
    const before = w.counts.dialBacks;
    for (let i = 0; i < 3; i++) {
      await waitFor('a ready connection', () => w.worker.readyTunnels > 0 || undefined, 10_000);
      await echoThrough(admin, 'v1', `after restart ${i}`);
    }
    assert.equal(w.counts.dialBacks - before, 0);
  });
});
