// The SSH jump host holds to the same bounds as port-forwards: its channels count against the
// account's tunnel limit (shared with WebSocket port-forwards), and a client that disconnects while
// a channel waits for its VM cancels the wait, so no tunnel is dialled for nobody.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Duplex } from 'node:stream';
import { pino } from 'pino';
import ssh2 from 'ssh2';
import { SyntheticDriver } from '../../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../../src/worker/worker.ts';
import { metric, tempDir, waitFor } from '../helpers.ts';
import { account, clusterWithVM, upgrade, type Account } from '../security/attack.ts';

class CountingDriver extends SyntheticDriver {
  dials = 0;
  override async dial(localName: string, port: number): Promise<Duplex> {
    this.dials++;
    return super.dial(localName, port);
  }
}

function connect(port: number, who: Account): Promise<ssh2.Client> {
  return new Promise((resolve, reject) => {
    const conn = new ssh2.Client();
    conn.once('ready', () => resolve(conn));
    conn.once('error', reject);
    conn.connect({ host: '127.0.0.1', port, username: who.name, password: who.token, hostVerifier: () => true });
  });
}

const forward = (conn: ssh2.Client, vm: string) =>
  new Promise<ssh2.ClientChannel>((resolve, reject) => conn.forwardOut('127.0.0.1', 0, vm, 22, (err, channel) => (err ? reject(err) : resolve(channel))));

test('SSH jump: channels count against the tunnel limit; a client that leaves cancels its waits', async () => {
  const { c, close } = await clusterWithVM('vm1', { listenSSH: '127.0.0.1:0', limits: { tunnelsPerAccount: 2 } });
  const driver = new CountingDriver();
  const late = new OrchardWorker({ client: c.admin, name: 'late', labels: { rack: 'b' }, driver, dataDir: tempDir(), slots: 10, heartbeatMs: 1000, logger: pino({ level: 'silent' }) });
  try {
    const user = await account(c, 'jumper', ['compute:read', 'compute:connect']);
    const port = c.ctl.ssh!.port;
    const conn = await connect(port, user);
    const first = await forward(conn, 'vm1');
    await forward(conn, 'vm1');
    await assert.rejects(forward(conn, 'vm1'), /jumper.*2 tunnels open, its limit is 2/);
    // The same count as WebSocket port-forwards.
    assert.equal((await upgrade(c.ctl, '/v1/vms/vm1/port-forward?port=22', { auth: user.auth })).status, 429);
    // A closed channel gives its place back.
    first.close();
    await waitFor('a channel to open again', () => forward(conn, 'vm1').then(() => true, () => false), 5000, 100);
    conn.end();

    // A channel waiting for a VM that is not running yet (the jump host waits 5 s) whose client leaves.
    await c.admin.createVM({ name: 'vm2', image: 'synthetic', labels: { rack: 'b' } });
    const leaver = await connect(port, user);
    const waiting = forward(leaver, 'vm2').catch(() => undefined);
    await waitFor('the channel to wait for vm2', async () => (await metric(c.ctl, 'orchard_vm_waits')) === 1, 5000, 20);
    leaver.end();
    await waiting;
    await late.start();
    await waitFor('vm2 to run', async () => (await c.admin.getVM('vm2')).status === 'running', 10_000);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(driver.dials, 0, 'no tunnel is dialled for a client that left while waiting');
    // Nothing of the leaver is still counted: the limit's two places are free.
    const again = await connect(port, user);
    await forward(again, 'vm2');
    await forward(again, 'vm2');
    assert.equal(driver.dials, 2);
    again.end();
  } finally {
    await late.stop();
    await close();
  }
});
