// Stopping the controller: SIGTERM with idle keep-alive connections, a silent TLS connection, watch
// streams, an in-flight request and a tunnel open ends within 5 s with exit code 0; the in-flight
// request is answered and the streams are closed with a reason.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import { join } from 'node:path';
import { pino } from 'pino';
import { OrchardClient } from '../../src/client/client.ts';
import { startWorker } from '../../src/worker/run.ts';
import { ADMIN_TOKEN, metric, spawnController, tempDir, waitFor } from '../helpers.ts';

test('SIGTERM with idle connections, streams and a tunnel open: exits 0 within 5 s', async () => {
  const dataDir = tempDir();
  const workerDir = tempDir('orchard-worker-');
  const ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const admin = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate };
  const worker = await startWorker({ url: ctl.url, token, name: 'w1', runtime: 'synthetic', labels: {}, dataDir: workerDir, logger: pino({ level: 'silent' }) });
  const echo = net.createServer((s) => {
    s.on('error', () => {});
    s.pipe(s);
  });
  await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
  const opened: net.Socket[] = [];
  try {
    await waitFor('the worker to connect', async () => (await admin.listWorkers()).some((w) => w.name === 'w1'), 20_000, 100);
    const url = new URL(ctl.url);
    const auth = 'Basic ' + Buffer.from(`bootstrap-admin:${ADMIN_TOKEN}`).toString('base64');

    // Idle keep-alive connections: a request each, then silence.
    const agent = new https.Agent({ keepAlive: true, maxSockets: 10, ca: certificate, checkServerIdentity: () => undefined });
    await Promise.all(
      Array.from({ length: 5 }, () =>
        new Promise<void>((resolve, reject) => {
          https
            .get(new URL('/v1/controller/info', ctl.url), { agent, headers: { authorization: auth } }, (res) => {
              res.resume();
              res.on('end', () => resolve());
            })
            .on('error', reject);
        }),
      ),
    );
    // A TLS connection that never sends a request, and a TCP connection that never starts TLS.
    const silentTLS = tls.connect({ host: url.hostname, port: Number(url.port), ca: certificate, checkServerIdentity: () => undefined });
    await new Promise<void>((r) => silentTLS.once('secureConnect', () => r()));
    const silentTCP = net.connect(Number(url.port), url.hostname);
    await new Promise<void>((r) => silentTCP.once('connect', () => r()));
    // And one that starts a TLS handshake and stalls in the middle of it.
    const halfTLS = net.connect(Number(url.port), url.hostname);
    await new Promise<void>((r) => halfTLS.once('connect', () => r()));
    halfTLS.write(Buffer.from([0x16, 0x03, 0x01]));
    opened.push(silentTLS, silentTCP, halfTLS);
    for (const s of opened) s.on('error', () => {});

    // Watch streams.
    const watches = [admin.watch('/v1/vms?watch=true'), admin.watch('/v1/workers?watch=true')];
    const watchEnds = watches.map(async (w) => {
      try {
        for await (const _ of w);
        return 'ended';
      } catch (err) {
        return `error: ${(err as Error).message}`;
      }
    });
    // A tunnel to the worker host, with bytes going through it.
    const tunnel = await admin.portForwardWorker('w1', (echo.address() as net.AddressInfo).port);
    tunnel.stream.write('ping');
    await new Promise<void>((r) => tunnel.stream.once('data', () => r()));
    const tunnelClosed = new Promise<{ code: number; reason: string }>((r) => tunnel.ws.once('close', (code, reason) => r({ code, reason: reason.toString() })));
    // An in-flight request: waits for a VM that will not run before the controller stops.
    await admin.createVM({ name: 'never', image: 'img', resources: { 'no-such-resource': 1 } });
    const inFlight = admin.vmIP('never', 60).then(
      () => 'answered 200',
      (err: Error & { status?: number }) => `${err.status ?? 'no status'}: ${err.message}`,
    );
    await waitFor('the request to wait for its VM', async () => (await metric({ url: ctl.url, certificate }, 'orchard_vm_waits')) === 1, 5000, 20);

    const t0 = Date.now();
    const exited = new Promise<number | null>((r) => ctl.proc.once('exit', (code) => r(code)));
    ctl.proc.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([exited, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), 20_000)))]);
    clearTimeout(timer);
    const elapsed = Date.now() - t0;
    console.log(`# SIGTERM to exit: ${elapsed} ms (code ${code})`);
    assert.equal(code, 0, ctl.stderr());
    assert.ok(elapsed < 5000, `the controller took ${elapsed} ms to stop`);
    assert.match(await inFlight, /^503: .*shutting down/, 'the in-flight request is answered');
    const closed = await tunnelClosed;
    assert.equal(closed.code, 1001, `tunnel close ${JSON.stringify(closed)}`);
    assert.match(closed.reason, /shutting down/);
    for (const end of watchEnds) assert.equal(await end, 'ended');
    agent.destroy();
  } finally {
    for (const s of opened) s.destroy();
    await worker.stop();
    echo.close();
    admin.close();
    await ctl.kill();
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(workerDir, { recursive: true, force: true });
  }
});
