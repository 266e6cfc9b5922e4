// Flow control along the whole tunnel: a reader that stops reading makes the far end stop sending;
// the controller and the worker (both real processes) buffer a bounded amount, and their memory
// stays flat while 1 GiB goes through. A worker killed mid-transfer ends the tunnel with an error.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { OrchardClient } from '../src/client/client.ts';
import { ADMIN_TOKEN, ORCHARD_BIN, spawnController, tempDir, waitFor } from './helpers.ts';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const rssOf = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;

test('a slow reader holds back the sender: bounded buffers, flat memory, 1 GiB intact', async () => {
  const dataDir = tempDir();
  const workerDir = tempDir('orchard-worker-');
  const ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const admin = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
  const worker = spawn(ORCHARD_BIN, ['worker', 'run', ctl.url, '--bootstrap-token', token, '--name', 'flow', '--synthetic', '--data-dir', workerDir], {
    env: { ...process.env, ORCHARD_LOG_LEVEL: 'warn' },
    stdio: 'ignore',
  });
  const workerExited = new Promise<void>((r) => worker.once('exit', () => r()));
  // A TCP source on the worker host that sends 1 GiB as fast as the path lets it.
  // Random data (16 different 1 MiB chunks, in turn), hashed on both ends: a lost, repeated or
  // reordered piece changes the digest.
  let sent = 0;
  const chunks = Array.from({ length: 16 }, () => randomBytes(MiB));
  /** The digest of what each connection was sent in full. */
  const sentDigests: string[] = [];
  const source = net.createServer((sock) => {
    sock.on('error', () => {});
    const sentHash = createHash('sha256');
    const pump = () => {
      while (sent < GiB) {
        const chunk = chunks[(sent / MiB) % chunks.length];
        sent += chunk.length;
        sentHash.update(chunk);
        if (!sock.write(chunk)) return void sock.once('drain', pump);
      }
      sentDigests.push(sentHash.digest('hex'));
      sock.end();
    };
    pump();
  });
  await new Promise<void>((r) => source.listen(0, '127.0.0.1', r));
  const port = (source.address() as net.AddressInfo).port;
  try {
    await waitFor('the worker to connect', async () => (await admin.listWorkers()).some((w) => w.name === 'flow'), 20_000, 100);
    await new Promise((r) => setTimeout(r, 500));
    const base = { controller: rssOf(ctl.proc.pid!), worker: rssOf(worker.pid!) };
    const { stream } = await admin.portForwardWorker('flow', port);
    stream.pause();

    // Nobody reads: within 3 s the sender must be held back after a bounded amount.
    await new Promise((r) => setTimeout(r, 3000));
    const sentWhilePaused = sent;
    console.log(`# sent while the reader was paused: ${(sentWhilePaused / MiB).toFixed(1)} MiB`);
    assert.ok(sentWhilePaused < 64 * MiB, `the sender was not held back: ${sentWhilePaused / MiB} MiB sent to a reader that reads nothing`);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(sent, sentWhilePaused, 'the sender stays blocked while nobody reads');

    // Then read it all, sampling both processes' memory.
    const peak = { ...base };
    const sampler = setInterval(() => {
      peak.controller = Math.max(peak.controller, rssOf(ctl.proc.pid!));
      peak.worker = Math.max(peak.worker, rssOf(worker.pid!));
    }, 100);
    let received = 0;
    const receivedHash = createHash('sha256');
    const t0 = Date.now();
    await new Promise<void>((resolve, reject) => {
      stream.on('data', (d: Buffer) => {
        received += d.length;
        receivedHash.update(d);
      });
      stream.on('end', resolve);
      stream.on('error', reject);
      stream.resume();
    });
    clearInterval(sampler);
    console.log(`# 1 GiB in ${((Date.now() - t0) / 1000).toFixed(1)} s; RSS growth: controller ${((peak.controller - base.controller) / MiB).toFixed(0)} MiB, worker ${((peak.worker - base.worker) / MiB).toFixed(0)} MiB`);
    assert.equal(received, GiB);
    assert.equal(receivedHash.digest('hex'), sentDigests[0], 'the same bytes, in the same order');
    // Bounded, not proportional to the transfer: what remains is the garbage collector's slack for
    // 1 GiB of short-lived buffers (measured 60-90 MiB), not data held for the reader.
    for (const [proc, grew] of Object.entries({ controller: peak.controller - base.controller, worker: peak.worker - base.worker })) {
      assert.ok(grew < 160 * MiB, `${proc} memory grew by ${(grew / MiB).toFixed(0)} MiB while 1 GiB went through`);
    }

    // A worker that dies mid-transfer ends the tunnel with an error the client sees.
    sent = 0;
    const second = await admin.portForwardWorker('flow', port);
    const closed = new Promise<{ code: number; reason: string }>((r) => second.ws.once('close', (code, reason) => r({ code, reason: reason.toString() })));
    second.stream.on('error', () => {});
    second.stream.resume();
    await waitFor('data to flow', () => sent > 8 * MiB, 10_000, 20);
    worker.kill('SIGKILL');
    const { code, reason } = await closed;
    assert.equal(code, 1011);
    assert.match(reason, /worker connection was lost/);
  } finally {
    admin.close();
    worker.kill('SIGKILL');
    await workerExited;
    source.close();
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(workerDir, { recursive: true, force: true });
  }
});
