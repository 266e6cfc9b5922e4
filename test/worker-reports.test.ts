// Worker reports up the watch WebSocket (docs/worker-reports-protocol.md), as a hostile worker would
// send them: a report on another worker's VM is refused with the HTTP route's status and message, bad
// frames get a clear error and the connection carries on, a connection past its in-flight bound gets
// 429s; and a report the controller was killed (-9) before acknowledging is sent again after the
// restart, not lost, by a worker that makes no HTTPS request to reconnect.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { pino } from 'pino';
import { WebSocket } from 'ws';
import { localNameOf } from '../src/api/schemas.ts';
import { MAX_REPORTS_IN_FLIGHT, parseControllerHello, parseReportAck, type ReportAck } from '../src/api/worker-protocol.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { OrchardClient } from '../src/client/client.ts';
import { ADMIN_TOKEN, freePort, inProcessController, placeOn, rawRequest, spawnController, tempDir, waitFor } from './helpers.ts';

type Controller = Awaited<ReturnType<typeof inProcessController>>;

/** A raw watch connection of worker `worker` as `account`, collecting the acknowledgements it gets. */
async function rawWatch(c: Controller, worker: string, account: [string, string], query: Record<string, string> = {}) {
  const client = c.client(...account);
  const url = client.urlOf('/v1/rpc/watch', true);
  url.searchParams.set('workerName', worker);
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
  const ws = new WebSocket(url, { headers: { authorization: client.authorization ?? '' }, ...client.tlsOptions() });
  const acks: ReportAck[] = [];
  const frames: string[] = [];
  ws.on('message', (data) => {
    const ack = parseReportAck(data.toString());
    if (ack) acks.push(ack);
    else frames.push(data.toString());
  });
  await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
  const ackOf = (id: number | null) => waitFor(`the acknowledgement of ${id}`, () => acks.find((a) => a.id === id), 10_000, 10);
  return { ws, acks, frames, ackOf };
}

test("a report on another worker's VM up the watch is refused as over HTTP; bad frames get a clear error and the connection carries on", async () => {
  const c = await inProcessController();
  try {
    await c.admin.createServiceAccount({ name: 'evil', token: 'evil-token-0123456789', roles: ['compute:read', 'compute:write'] });
    const evil = c.client('evil', 'evil-token-0123456789');
    await c.admin.createVM({ name: 'victim', image: 'synthetic' });
    const vm = await placeOn(c.admin, 'honest', 'victim');
    await evil.registerWorker({ name: 'hostile', resources: { 'org.cirruslabs.tart-vms': 0 } });
    await c.admin.registerWorker({ name: 'sibling', resources: { 'org.cirruslabs.tart-vms': 0 } });
    const report = { status: 'failed', status_message: 'pwned', localName: localNameOf(vm) };

    // Another account's worker: refused with what PUT /v1/vms/victim/state answers that account.
    const http = await rawRequest(c.ctl, 'PUT', '/v1/vms/victim/state', { auth: ['evil', 'evil-token-0123456789'], body: JSON.stringify(report) });
    assert.equal(http.status, 403);
    const h = await rawWatch(c, 'hostile', ['evil', 'evil-token-0123456789']);
    h.ws.send(JSON.stringify({ id: 1, vmState: { vm: 'victim', state: report } }));
    h.ws.send(JSON.stringify({ id: 2, vmEvents: { vm: 'victim', events: [{ kind: 'x', timestamp: 1, payload: 'pwned' }] } }));
    assert.deepEqual(await h.ackOf(1), { id: 1, status: 403, message: (http.json as { message: string }).message });
    assert.equal((await h.ackOf(2)).status, 403);

    // The same account as the VM's worker, but another worker's watch: it speaks for itself only.
    const s = await rawWatch(c, 'sibling', ['bootstrap-admin', ADMIN_TOKEN]);
    s.ws.send(JSON.stringify({ id: 7, vmState: { vm: 'victim', state: report } }));
    assert.deepEqual(await s.ackOf(7), { id: 7, status: 403, message: 'VM "victim" is assigned to worker "honest": worker "sibling" may not report on it' });

    const after = await c.admin.getVM('victim');
    assert.deepEqual([after.status, after.status_message], [vm.status, vm.status_message], 'no refused report changed the VM');
    assert.deepEqual((await c.admin.listEvents('victim')).events, [], 'no refused report added events');

    // Bad frames: a clear error each, and the connection still takes reports.
    h.ws.send('{not json');
    h.ws.send(JSON.stringify({ vmState: {} }));
    await waitFor('two answers without an id', () => (h.acks.filter((a) => a.id === null).length === 2 ? true : undefined), 10_000, 10);
    assert.match(h.acks.filter((a) => a.id === null)[0].message!, /^malformed JSON in a report frame/);
    assert.match(h.acks.filter((a) => a.id === null)[1].message!, /"id", a non-negative integer/);
    h.ws.send(JSON.stringify({ id: 3, launchMissiles: {} }));
    assert.deepEqual(await h.ackOf(3), { id: 3, status: 400, message: 'a report frame must have exactly one of "vmState", "vmEvents", "workerImages"' });
    // A body the HTTP route refuses: the same message.
    const bad = { status: 'exploded' };
    const badHTTP = await rawRequest(c.ctl, 'PUT', '/v1/vms/victim/state', { auth: ['bootstrap-admin', ADMIN_TOKEN], body: JSON.stringify(bad) });
    s.ws.send(JSON.stringify({ id: 8, vmState: { vm: 'victim', state: bad } }));
    assert.deepEqual(await s.ackOf(8), { id: 8, status: 400, message: (badHTTP.json as { message: string }).message });
    // Its own images: taken, acknowledged after the commit.
    h.ws.send(JSON.stringify({ id: 4, workerImages: { images: ['ghcr.io/x/y:1'] } }));
    assert.deepEqual(await h.ackOf(4), { id: 4, status: 200 });
    assert.deepEqual((await c.admin.getWorker('hostile')).images, ['ghcr.io/x/y:1']);
    assert.equal(h.ws.readyState, WebSocket.OPEN);
    h.ws.close();
    s.ws.close();
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('a watch connection has at most MAX_REPORTS_IN_FLIGHT reports under way: past it, 429 at once, each report answered once', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'v', image: 'synthetic' });
    await placeOn(c.admin, 'w', 'v');
    const w = await rawWatch(c, 'w', ['bootstrap-admin', ADMIN_TOKEN]);
    const n = MAX_REPORTS_IN_FLIGHT * 3;
    // All frames in one write, so the controller reads them before any commit is done.
    const socket = (w.ws as unknown as { _socket: TLSSocket })._socket;
    socket.cork();
    for (let id = 1; id <= n; id++) w.ws.send(JSON.stringify({ id, vmEvents: { vm: 'v', events: [{ kind: 'x', timestamp: id, payload: String(id) }] } }));
    socket.uncork();
    await waitFor('every report answered', () => (w.acks.length >= n ? true : undefined), 10_000, 10);
    assert.equal(w.acks.length, n, 'one answer per report');
    const ok = w.acks.filter((a) => a.status === 200).length;
    const refused = w.acks.filter((a) => a.status === 429);
    assert.equal(ok + refused.length, n);
    assert.ok(ok >= MAX_REPORTS_IN_FLIGHT && refused.length > 0, `${ok} taken, ${refused.length} refused`);
    assert.match(refused[0].message!, /too many reports in flight on this connection/);
    assert.equal((await c.admin.listEvents('v')).events.length, ok, 'exactly the acknowledged reports were committed');
    w.ws.close();
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('kill -9 of the controller between a report and its acknowledgement loses nothing: the worker sends it again after the restart', async () => {
  const dataDir = tempDir('orchard-ctl-');
  const workerDir = tempDir('orchard-worker-');
  const port = await freePort();
  let ctl = await spawnController(dataDir, ['--listen', `127.0.0.1:${port}`]);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const client = () => new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  const admin = client();
  const worker = new OrchardWorker({ client: client(), name: 'w', driver: new SyntheticDriver({ bootDelayMs: 1000 }), dataDir: workerDir, slots: 2, logger: pino({ level: 'silent' }) });
  try {
    await worker.start();
    await admin.createVM({ name: 'k', image: 'synthetic' });
    await waitFor('k booting', async () => (await admin.getVM('k')).status_message === 'booting' || undefined, 10_000);
    // Frozen, the controller reads nothing more: the "running" report goes out and waits for its acknowledgement...
    ctl.proc.kill('SIGSTOP');
    await waitFor('the running report sent and not acknowledged', () => worker.unacknowledgedReports || undefined, 10_000, 10);
    // ...which never comes: the controller dies.
    await ctl.kill('SIGKILL');
    ctl = await spawnController(dataDir, ['--listen', `127.0.0.1:${port}`]);
    const again = client();
    await waitFor('k running after the restart', async () => (await again.getVM('k')).status === 'running' || undefined, 20_000, 50);
    const metrics = await again.call<string>('GET', '/metrics');
    assert.match(metrics, /orchard_worker_reports_total\{kind="vmState",status="200"\} [1-9]/, 'the report came again up the watch');
    assert.doesNotMatch(metrics, /route="\/v1\/vms\/:name\/state"/, 'not by HTTP');
    assert.doesNotMatch(metrics, /route="\/v1\/controller\/info"/, 'the reconnected worker learnt the cluster id from the hello frame, not by HTTPS');
    const events = (await again.listEvents('k')).events.map((e) => e.payload);
    assert.ok(events.some((p) => p.startsWith('running')), `the report's events came with it: ${events.join(' | ')}`);
    again.close();
  } finally {
    await worker.stop();
    admin.close();
    await ctl.kill('SIGKILL');
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(workerDir, { recursive: true, force: true });
  }
});

test('a watch opened with hello=1 starts with the hello: the cluster id and the reconnect window (2 ms per registered worker, 0.25 to 2.5 s); without it, no hello', async () => {
  const c = await inProcessController();
  try {
    for (let i = 0; i < 200; i++) await c.admin.registerWorker({ name: `w${i}`, resources: { 'org.cirruslabs.tart-vms': 1 } });
    const info = await c.admin.info();
    const ours = await rawWatch(c, 'w0', ['bootstrap-admin', ADMIN_TOKEN], { hello: '1' });
    await waitFor('the first frames', () => (ours.frames.length >= 2 ? true : undefined), 10_000, 10);
    assert.deepEqual(parseControllerHello(ours.frames[0]), { clusterID: info.clusterID, reconnectWindowMs: 400 });
    const upstreamLike = await rawWatch(c, 'w1', ['bootstrap-admin', ADMIN_TOKEN]);
    await waitFor('the first frame', () => (upstreamLike.frames.length >= 1 ? true : undefined), 10_000, 10);
    assert.ok(upstreamLike.frames.every((f) => !parseControllerHello(f)), 'no hello for a worker that did not ask (upstream\'s)');
    assert.match(upstreamLike.frames[0], /^\{"syncVMsAction"/);
    ours.ws.close();
    upstreamLike.ws.close();
  } finally {
    await c.close();
    c.cleanup();
  }
});
