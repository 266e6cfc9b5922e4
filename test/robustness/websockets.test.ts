// WebSocket limits: frames far smaller than the 16 MiB ws allowed before (a client's big frames were
// held whole in the controller's memory), and an account's number of open tunnels.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { RESOURCE_TART_VMS } from '../../src/api/schemas.ts';
import { DEFAULT_LIMITS } from '../../src/controller/limits.ts';
import { waitFor } from '../helpers.ts';
import { account, closed, clusterWithVM, upgrade, type Account, type Cluster } from '../security/attack.ts';

const echoed = (ws: import('ws').WebSocket, bytes: number) =>
  new Promise<void>((resolve, reject) => {
    let got = 0;
    ws.on('message', (m: Buffer) => {
      got += m.length;
      if (got >= bytes) resolve();
    });
    ws.once('close', (code) => reject(new Error(`closed with ${code} after ${got} bytes`)));
  });

/** The close code, or a failure when the connection stays open for 5 s. */
const closeCode = (ws: import('ws').WebSocket) =>
  Promise.race([closed(ws).then((e) => e.code), new Promise<number>((_, reject) => setTimeout(() => reject(new Error('still open after 5 s')), 5000))]);

describe('WebSocket frame limits (defaults)', () => {
  let cluster: Awaited<ReturnType<typeof clusterWithVM>>;
  let c: Cluster;
  let user: Account;
  before(async () => {
    cluster = await clusterWithVM('v');
    c = cluster.c;
    user = await account(c, 'user', ['compute:read', 'compute:connect']);
  });
  after(() => cluster.close());

  test(`port-forward: a frame of ${DEFAULT_LIMITS.tunnelFrameBytes} bytes passes, a bigger one closes the tunnel with 1009`, async () => {
    const ok = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: user.auth });
    assert.equal(ok.status, 101, ok.body);
    const back = echoed(ok.ws!, DEFAULT_LIMITS.tunnelFrameBytes);
    ok.ws!.send(Buffer.alloc(DEFAULT_LIMITS.tunnelFrameBytes, 1));
    await back;
    ok.ws!.close();
    const big = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: user.auth });
    const end = closeCode(big.ws!);
    big.ws!.on('error', () => {});
    big.ws!.send(Buffer.alloc(DEFAULT_LIMITS.tunnelFrameBytes + 1, 1));
    assert.equal(await end, 1009);
    // The offending account is held off for a while (1 s, doubling per offence): 429 with Retry-After.
    const held = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: user.auth });
    assert.equal(held.status, 429);
    assert.match(held.body, /broke the WebSocket protocol 1 time lately \(frames over the limit\); it may open WebSockets again in 1s/);
    assert.equal(held.headers['retry-after'], '1');
    // Another account is not.
    const other = await account(c, 'other', ['compute:read', 'compute:connect']);
    const fine = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: other.auth });
    assert.equal(fine.status, 101, fine.body);
    fine.ws!.close();
    // After the hold, the offender may connect again.
    await waitFor('the hold to end', async () => {
      const again = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: user.auth });
      again.ws?.close();
      return again.status === 101;
    }, 5000, 200);
  });

  test("a worker's watch connection: a frame over the limit closes it with 1009", async () => {
    const w = await account(c, 'hand-made', ['compute:read', 'compute:write']);
    await w.client.registerWorker({ name: 'hand', resources: { [RESOURCE_TART_VMS]: 1 } });
    const watch = await upgrade(c.ctl, '/v1/rpc/watch?workerName=hand', { auth: w.auth });
    assert.equal(watch.status, 101, watch.body);
    const end = closeCode(watch.ws!);
    watch.ws!.on('error', () => {});
    watch.ws!.send(Buffer.alloc(DEFAULT_LIMITS.controlFrameBytes + 1, 1));
    assert.equal(await end, 1009);
  });
});

describe('tunnels per account', () => {
  let cluster: Awaited<ReturnType<typeof clusterWithVM>>;
  let c: Cluster;
  before(async () => {
    cluster = await clusterWithVM('v', { limits: { tunnelsPerAccount: 2 } });
    c = cluster.c;
  });
  after(() => cluster.close());

  test('the third is a 429 naming the limit, waits for a VM count, other accounts are not affected, a closed one frees its place', async () => {
    const a = await account(c, 'a', ['compute:read', 'compute:connect']);
    const b = await account(c, 'b', ['compute:read', 'compute:connect']);
    const first = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: a.auth });
    assert.equal(first.status, 101);
    // a port-forward still waiting for its VM holds a place too
    await c.admin.createVM({ name: 'never', image: 'synthetic', resources: { [RESOURCE_TART_VMS]: 100 } });
    const waiting = upgrade(c.ctl, '/v1/vms/never/port-forward?port=22&wait=3', { auth: a.auth });
    await waitFor('the waiting port-forward to be counted', async () => {
      const u = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: a.auth });
      if (u.status === 429) return u;
      u.ws?.close();
      return undefined;
    }, 3000);
    const refused = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: a.auth });
    assert.equal(refused.status, 429);
    assert.match(JSON.parse(refused.body).message as string, /service account "a" has 2 tunnels open, its limit is 2/);
    const other = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: b.auth });
    assert.equal(other.status, 101);
    other.ws!.close();
    assert.equal((await waiting).status, 503); // the VM never ran: its place is freed
    const second = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: a.auth });
    assert.equal(second.status, 101);
    first.ws!.close();
    await closed(first.ws!).catch(() => {});
    const third = await waitFor('a place freed', async () => {
      const u = await upgrade(c.ctl, '/v1/vms/v/port-forward?port=22', { auth: a.auth });
      return u.status === 101 ? u : undefined;
    }, 3000);
    third.ws!.close();
    second.ws!.close();
  });
});
