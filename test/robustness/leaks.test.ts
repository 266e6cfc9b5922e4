// Nothing is left behind by clients that leave: port-forwards abandoned while they wait for a VM
// cancel their wait (no tunnel opens when the VM starts later), and a client that leaves while its
// tunnel is being set up, or after, gets it closed on both sides (controller and worker).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { pino } from 'pino';
import { WebSocket } from 'ws';
import { SyntheticDriver } from '../../src/worker/drivers/synthetic.ts';
import { startWorker } from '../../src/worker/run.ts';
import { ADMIN_TOKEN, inProcessController, metric, tempDir, waitFor } from '../helpers.ts';

/** A synthetic driver that counts the connections dialled to its VMs and those still open; dials can be slowed down. */
class CountingDriver extends SyntheticDriver {
  dials = 0;
  open = 0;
  dialDelayMs = 0;
  override async dial(localName: string, port: number): Promise<Duplex> {
    this.dials++;
    if (this.dialDelayMs) await new Promise((r) => setTimeout(r, this.dialDelayMs));
    const stream = await super.dial(localName, port);
    this.open++;
    stream.once('close', () => this.open--);
    return stream;
  }
}

test('abandoned port-forwards: waits are cancelled, tunnels close on both sides', async () => {
  const c = await inProcessController();
  const dirs = [tempDir('orchard-worker-'), tempDir('orchard-worker-')];
  const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate };
  const drivers = [new CountingDriver(), new CountingDriver()];
  const workers = [];
  try {
    workers.push(await startWorker({ url: c.ctl.url, token, name: 'w1', runtime: 'synthetic', labels: {}, dataDir: dirs[0], driver: drivers[0], logger: pino({ level: 'silent' }) }));
    await c.admin.createVM({ name: 'late', image: 'img', labels: { rack: 'b' } });
    const url = new URL('/v1/vms/late/port-forward?port=22&wait=120', c.ctl.url.replace(/^http/, 'ws'));
    const headers = { authorization: 'Basic ' + Buffer.from(`bootstrap-admin:${ADMIN_TOKEN}`).toString('base64') };
    const clients = Array.from({ length: 50 }, () => {
      const ws = new WebSocket(url, { headers, ...c.admin.tlsOptions() });
      ws.on('error', () => {});
      return ws;
    });
    await waitFor('the 50 clients to wait for late', async () => (await metric(c.ctl, 'orchard_vm_waits')) === 50, 10_000, 20);
    for (const ws of clients) ws.terminate();

    // The VM starts later, on a worker that has the label.
    workers.push(await startWorker({ url: c.ctl.url, token, name: 'w2', runtime: 'synthetic', labels: { rack: 'b' }, dataDir: dirs[1], driver: drivers[1], logger: pino({ level: 'silent' }) }));
    await waitFor('late to run', async () => (await c.admin.getVM('late')).status === 'running', 10_000);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(drivers[1].dials, 0, 'no tunnel is opened for clients that left while waiting');

    // A client that leaves while its tunnel is being set up: the tunnel closes on the worker too.
    drivers[1].dialDelayMs = 500;
    const early = new WebSocket(url, { headers, ...c.admin.tlsOptions() });
    early.on('error', () => {});
    await waitFor('the worker to dial', () => drivers[1].dials === 1, 5000, 10);
    early.terminate();
    await waitFor('the dialled connection to open', () => drivers[1].open === 1 || drivers[1].dials > 1, 5000, 10).catch(() => {});
    await waitFor('the abandoned tunnel to close on the worker', () => drivers[1].open === 0, 5000, 50);

    // An open tunnel whose client goes away without a word closes on the worker too.
    drivers[1].dialDelayMs = 0;
    const { ws, stream } = await c.admin.portForwardVM('late', 22);
    stream.write('ping');
    await new Promise<void>((r) => stream.once('data', () => r()));
    assert.equal(drivers[1].open, 1);
    ws.terminate();
    await waitFor('the tunnel to close on the worker', () => drivers[1].open === 0, 5000, 50);
  } finally {
    for (const w of workers) await w.stop();
    await c.close();
    c.cleanup();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
});
