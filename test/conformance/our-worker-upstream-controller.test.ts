// Our worker against upstream Orchard 0.55's controller: a stand-in that answers as upstream's does
// (internal/controller: api_workers.go, api_vms.go, api_rpc_*.go; its v1 endpoints only, its
// capabilities "rpc-v2" and "vm-state-endpoint" and none of ours; watch instructions as binary
// frames; PUT /v1/workers/{name} sets last_seen and scheduling_paused from the body; a state report
// replaces status, status_message, image_fqn, observedGeneration and conditions; dial-backs and IP
// answers read session, ip and errorMessage from the query). Our worker registers, keeps its worker
// alive without resuming it, runs the VM it is given, reports it, posts its events, answers an IP
// lookup and a port-forward (and a failed one), removes the VM when it goes, and calls nothing else.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage } from 'node:http';
import { randomUUID } from 'node:crypto';
import { WebSocketServer, createWebSocketStream, type WebSocket } from 'ws';
import { pino } from 'pino';
import { loadTLS } from '../../src/controller/tls.ts';
import { OrchardClient } from '../../src/client/client.ts';
import { SyntheticDriver } from '../../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../../src/worker/worker.ts';
import { tempDir, waitFor } from '../helpers.ts';

const ZERO_TIME = '0001-01-01T00:00:00Z';
const AUTH = 'Basic ' + Buffer.from('workers:workers-token').toString('base64');

type Json = Record<string, unknown>;

/** What upstream 0.55's controller does for the endpoints a worker calls, in memory. */
class UpstreamController {
  server!: Server;
  url!: string;
  certificate!: string;
  readonly workers = new Map<string, Json>();
  readonly vms = new Map<string, Json>();
  readonly events = new Map<string, Json[]>();
  readonly requests: { method: string; path: string; query: URLSearchParams; body?: unknown; contentType?: string }[] = [];
  private readonly wss = new WebSocketServer({ noServer: true });
  watch?: WebSocket;
  readonly dialBacks = new Map<string, { errorMessage: string; ws: WebSocket }>();
  readonly ipAnswers = new Map<string, { ip: string; errorMessage: string }>();

  async start() {
    const tls = await loadTLS({ dataDir: tempDir() });
    this.certificate = tls.cert;
    this.server = createServer({ cert: tls.cert, key: tls.key }, (req, res) => {
      let raw = '';
      req.on('data', (c: Buffer) => (raw += c.toString()));
      req.on('end', () => {
        const answer = (status: number, body?: unknown) => {
          res.writeHead(status, body === undefined ? {} : { 'content-type': 'application/json; charset=utf-8' });
          res.end(body === undefined ? undefined : JSON.stringify(body));
        };
        try {
          const [status, body] = this.handle(req, raw);
          answer(status, body);
        } catch (err) {
          answer(500, { message: (err as Error).message });
        }
      });
    });
    this.server.on('upgrade', (req: IncomingMessage, socket, head) => {
      const url = new URL(req.url ?? '/', 'https://x');
      this.requests.push({ method: 'GET', path: url.pathname, query: url.searchParams });
      if (req.headers.authorization !== AUTH) return void socket.end('HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n');
      this.wss.handleUpgrade(req, socket, head, (ws) => {
        if (url.pathname === '/v1/rpc/watch') this.watch = ws;
        else if (url.pathname === '/v1/rpc/port-forward') this.dialBacks.set(url.searchParams.get('session') ?? '', { errorMessage: url.searchParams.get('errorMessage') ?? '', ws });
        else ws.close(1008, 'no such endpoint');
      });
    });
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    const address = this.server.address();
    this.url = `https://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
  }

  /** A watch instruction as upstream sends it: JSON in a binary frame. */
  instruct(instruction: Json) {
    this.watch!.send(Buffer.from(JSON.stringify(instruction)), { binary: true });
  }

  private handle(req: IncomingMessage, raw: string): [number, unknown?] {
    const url = new URL(req.url ?? '/', 'https://x');
    const body = raw ? (JSON.parse(raw) as Json) : undefined;
    this.requests.push({ method: req.method!, path: url.pathname, query: url.searchParams, body, contentType: req.headers['content-type'] });
    if (url.pathname === '/v1/' && req.method === 'GET') return [200];
    if (req.headers.authorization !== AUTH) return [401, { message: 'unauthorized' }];
    const p = url.pathname;
    let m: RegExpExecArray | null;
    if (p === '/v1/controller/info' && req.method === 'GET') return [200, { version: '0.55.0', commit: 'upstream', capabilities: ['rpc-v2', 'vm-state-endpoint'] }];
    if (p === '/v1/workers' && req.method === 'POST') {
      const w = body!;
      const now = new Date().toISOString();
      const record: Json = { ...w, arch: w.arch || 'arm64', runtime: w.runtime || 'tart', last_seen: !w.last_seen || w.last_seen === ZERO_TIME ? now : w.last_seen, createdAt: now };
      const existing = this.workers.get(String(w.name));
      if (!existing) {
        this.workers.set(String(w.name), record);
        return [200, record];
      }
      if (existing.machine_id !== w.machine_id) return [409, { message: 'this worker is managed from a different machine ID' }];
      for (const k of ['arch', 'runtime', 'last_seen', 'resources', 'labels', 'defaultCPU', 'defaultMemory']) existing[k] = record[k];
      return [200, existing];
    }
    if ((m = /^\/v1\/workers\/([^/]+)$/.exec(p))) {
      const name = decodeURIComponent(m[1]);
      const w = this.workers.get(name);
      if (req.method === 'GET') return w ? [200, w] : [404, { message: 'not found' }];
      if (req.method === 'PUT') {
        if (!w) return [404, { message: 'not found' }];
        // As upstream's updateWorker: both taken from the body, Go's zero values when left out.
        w.last_seen = body?.last_seen ?? ZERO_TIME;
        w.scheduling_paused = body?.scheduling_paused ?? false;
        return [200, w];
      }
    }
    if (p === '/v1/vms' && req.method === 'GET') {
      const worker = /^worker=(.*)$/.exec(url.searchParams.get('filter') ?? '')?.[1];
      return [200, [...this.vms.values()].filter((vm) => worker === undefined || vm.worker === worker)];
    }
    if ((m = /^\/v1\/vms\/([^/]+)$/.exec(p)) && req.method === 'GET') {
      const vm = this.vms.get(decodeURIComponent(m[1]));
      return vm ? [200, vm] : [404, { message: 'not found' }];
    }
    if ((m = /^\/v1\/vms\/([^/]+)\/state$/.exec(p)) && req.method === 'PUT') {
      const vm = this.vms.get(decodeURIComponent(m[1]));
      if (!vm) return [404, { message: 'not found' }];
      if (vm.status === 'failed' && vm.status !== body?.status) return [412, { message: 'cannot update status for a VM in a terminal state' }];
      if (body?.status === 'running' && !vm.started_at) vm.started_at = new Date().toISOString();
      vm.status = body?.status ?? '';
      vm.status_message = body?.status_message ?? '';
      vm.image_fqn = body?.image_fqn ?? '';
      vm.observedGeneration = body?.observedGeneration ?? 0;
      vm.conditions = body?.conditions;
      return [200, vm];
    }
    if ((m = /^\/v1\/vms\/([^/]+)\/events$/.exec(p)) && req.method === 'POST') {
      const vm = this.vms.get(decodeURIComponent(m[1]));
      if (!vm) return [404, { message: 'not found' }];
      const list = this.events.get(String(vm.uid)) ?? [];
      list.push(...((body as unknown as Json[]) ?? []));
      this.events.set(String(vm.uid), list);
      return [200];
    }
    if (p === '/v1/rpc/resolve-ip' && req.method === 'POST') {
      this.ipAnswers.set(url.searchParams.get('session') ?? '', { ip: url.searchParams.get('ip') ?? '', errorMessage: url.searchParams.get('errorMessage') ?? '' });
      return [200];
    }
    return [404, { message: `404 page not found: ${req.method} ${p}` }];
  }

  async close() {
    this.watch?.terminate();
    for (const d of this.dialBacks.values()) d.ws.terminate();
    this.wss.close();
    this.server.closeAllConnections();
    await new Promise((r) => this.server.close(r));
  }
}

describe("our worker against upstream 0.55's controller (a stand-in built from its code)", () => {
  const up = new UpstreamController();
  let worker: OrchardWorker;
  let client: OrchardClient;
  const driver = new SyntheticDriver();
  const name = 'linux-builder-1.local';

  before(async () => {
    await up.start();
    client = new OrchardClient({ url: up.url, certificate: up.certificate, serviceAccountName: 'workers', serviceAccountToken: 'workers-token' });
    worker = new OrchardWorker({ client, name, driver, dataDir: tempDir(), slots: 4, heartbeatMs: 200, defaultCPU: 2, defaultMemory: 2048, logger: pino({ level: 'silent' }) });
    await worker.start();
  });
  after(async () => {
    await worker.stop();
    await up.close();
  });

  test('registers with a record upstream takes, and holds the watch', async () => {
    const w = up.workers.get(name)!;
    assert.ok(w, 'registered');
    assert.equal(typeof w.machine_id, 'string');
    assert.equal((w.resources as Record<string, number>)['org.cirruslabs.tart-vms'], 4);
    assert.deepEqual([w.defaultCPU, w.defaultMemory, w.runtime], [2, 2048, 'synthetic']);
    await waitFor('the watch connected', () => up.watch || undefined, 10_000);
  });

  test('heartbeats keep last_seen current without resuming a paused worker', async () => {
    const w = up.workers.get(name)!;
    w.scheduling_paused = true;
    const before = up.requests.filter((r) => r.method === 'PUT' && r.path.startsWith('/v1/workers/')).length;
    await waitFor('two more heartbeats', () => up.requests.filter((r) => r.method === 'PUT' && r.path.startsWith('/v1/workers/')).length >= before + 2 || undefined, 10_000);
    assert.equal(w.scheduling_paused, true, 'still paused: the heartbeat sends the record back as it is');
    assert.notEqual(w.last_seen, ZERO_TIME);
    assert.ok(Date.now() - Date.parse(String(w.last_seen)) < 5000, `last_seen is current: ${String(w.last_seen)}`);
    w.scheduling_paused = false;
  });

  test('runs the VM it is given over a binary syncVMsAction, reports it running and posts its events apart', async () => {
    const uid = randomUUID();
    // As upstream's scheduler leaves a VM it placed: worker, localName, assigned cpu and memory.
    up.vms.set('ci-1', {
      name: 'ci-1', uid, image: 'synthetic', os: 'linux', arch: 'amd64', runtime: 'tart', status: 'pending', worker: name, generation: 0, observedGeneration: 0,
      localName: `orchard-ci-1-${uid}-0`, tartName: `orchard-ci-1-${uid}-0`, assignedCPU: 2, assignedMemory: 2048, restart_count: 0, createdAt: new Date().toISOString(),
      conditions: [{ type: 'scheduled', state: 'true' }], powerState: 'running',
    });
    up.instruct({ syncVMsAction: {} });
    await waitFor('ci-1 running', () => up.vms.get('ci-1')!.status === 'running' || undefined, 15_000);
    await waitFor('its events', () => (up.events.get(uid)?.length ?? 0) >= 2 || undefined, 10_000);
    assert.ok(up.requests.some((r) => r.method === 'GET' && r.path === '/v1/vms' && r.query.get('filter') === `worker=${name}`), 'lists its VMs (the sync carries none)');
    const reports = up.requests.filter((r) => r.path === '/v1/vms/ci-1/state');
    assert.ok(reports.length >= 1 && reports.every((r) => typeof (r.body as Json).status === 'string' && (r.body as Json).status !== ''), 'every state report carries a status (upstream replaces it)');
    assert.ok(reports.every((r) => !('events' in (r.body as Json))), 'no events in state reports (capability "vm-state-events" not advertised)');
    const local = (await driver.list()).find((l) => l.uid === uid);
    assert.deepEqual([local?.cpu, local?.memory], [2, 2048], 'the cpu and memory upstream assigned');
  });

  test('answers an IP lookup and port-forwards in the query form upstream reads', async () => {
    const uid = String(up.vms.get('ci-1')!.uid);
    up.instruct({ resolveIPAction: { session: 'ip-1', vmUID: uid } });
    const ip = await waitFor('the IP answer', () => up.ipAnswers.get('ip-1'), 10_000);
    assert.match(ip.ip, /^\d+\.\d+\.\d+\.\d+$/);
    assert.equal(ip.errorMessage, '');
    up.instruct({ resolveIPAction: { session: 'ip-2', vmUID: randomUUID() } });
    const failed = await waitFor('the failed IP answer', () => up.ipAnswers.get('ip-2'), 10_000);
    assert.equal(failed.ip, '');
    assert.match(failed.errorMessage, /no VM with uid/);

    up.instruct({ portForwardAction: { session: 'pf-1', vmUID: uid, port: 22 } });
    const dial = await waitFor('the dial-back', () => up.dialBacks.get('pf-1'), 10_000);
    assert.equal(dial.errorMessage, '');
    // The synthetic VM echoes: bytes through the tunnel come back (binary frames, as upstream's NetConn reads them).
    const stream = createWebSocketStream(dial.ws);
    const echoed = new Promise<string>((resolve) => stream.once('data', (c: Buffer) => resolve(c.toString())));
    stream.write('SSH-2.0-probe\r\n');
    assert.equal(await echoed, 'SSH-2.0-probe\r\n');
    stream.destroy();
    up.instruct({ portForwardAction: { session: 'pf-2', vmUID: randomUUID(), port: 22 } });
    const refused = await waitFor('the failed dial-back', () => up.dialBacks.get('pf-2'), 10_000);
    assert.match(refused.errorMessage, /no VM with uid/);
  });

  test('removes the VM when upstream deletes it, and calls only upstream endpoints', async () => {
    const uid = String(up.vms.get('ci-1')!.uid);
    up.vms.delete('ci-1');
    up.instruct({ syncVMsAction: {} });
    await waitFor('the local VM removed', async () => !(await driver.list()).some((l) => l.uid === uid) || undefined, 10_000);
    const upstreamEndpoints = [
      'GET /v1/controller/info', 'POST /v1/workers', 'GET /v1/workers/{name}', 'PUT /v1/workers/{name}', 'GET /v1/vms', 'GET /v1/vms/{name}',
      'PUT /v1/vms/{name}/state', 'POST /v1/vms/{name}/events', 'GET /v1/rpc/watch', 'GET /v1/rpc/port-forward', 'POST /v1/rpc/resolve-ip',
    ];
    const called = new Set(up.requests.map((r) => `${r.method} ${r.path.replace(/^\/v1\/(workers|vms)\/[^/]+/, '/v1/$1/{name}')}`));
    assert.deepEqual([...called].filter((e) => !upstreamEndpoints.includes(e)), [], 'nothing outside upstream API');
    const unanswered = up.requests.filter((r) => r.path.includes('orphans'));
    assert.equal(unanswered.length, 0, 'no orphan reports (capability "orphans" not advertised)');
  });
});
