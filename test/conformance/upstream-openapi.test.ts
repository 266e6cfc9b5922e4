// Our controller's real answers, checked against what upstream Orchard 0.55 declares in its API
// description (api/openapi.yaml), as restated by us in ./upstream-contract.ts: for every endpoint
// upstream's client (pkg/client) calls, requests as it makes them (no Content-Type, Go's JSON, its
// User-Agent), and each answer's status must be one upstream lists for that operation (or one of the
// differences the README lists) and its JSON body must match the declared schema. Endpoints the
// description leaves out (worker registration and heartbeat, state reports, event appends) are
// checked against its component schemas (Worker, VM, ...).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Ajv, type ValidateFunction } from 'ajv';
import type { WebSocket } from 'ws';
import { ADMIN_TOKEN, inProcessController, rawRequest, waitFor } from '../helpers.ts';
import { syntheticWorker, upgrade, type Cluster } from '../security/attack.ts';
import { EVENTS_AS_UPSTREAM_SERVES_THEM, operations, schemas, type Schema, type UpstreamOperation } from './upstream-contract.ts';

/**
 * Status codes that differ from upstream's on purpose (README, "Upstream compatibility"): validation
 * is 400 (upstream 412), a missing role 403 (upstream 401), a conflict with the VM's state 409 (upstream 412).
 */
const DOCUMENTED_DIFFERENCES = new Set([400, 403, 409]);

/**
 * Where upstream's description contradicts upstream's own controller and client, which are what
 * clients depend on: `Events` is declared `type: object` (with `items`), but upstream's controller
 * answers a JSON array and its client decodes one ([]v1.Event). Checked as an array of `Event`.
 */
const SPEC_DEFECTS = new Map<Schema, Schema>([[schemas.Events, EVENTS_AS_UPSTREAM_SERVES_THEM]]);

// Strict: a misspelt keyword in the contract is an error, not a schema that accepts everything.
const ajv = new Ajv({ strict: true, validateFormats: false, allErrors: true });
const compiled = new Map<Schema, ValidateFunction>();
function validatorOf(schema: Schema): ValidateFunction {
  const checked = SPEC_DEFECTS.get(schema) ?? schema;
  let v = compiled.get(checked);
  if (!v) compiled.set(checked, (v = ajv.compile(checked)));
  return v;
}
const component = (name: keyof typeof schemas) => validatorOf(schemas[name]);

const coverage = new Set<string>();

/** Upstream's operation `method path` (path as upstream writes it, without /v1). */
function operation(method: string, path: string): UpstreamOperation {
  const op = operations[`${method} ${path}`];
  assert.ok(op, `upstream's description has ${method} ${path}`);
  return op;
}

/** Checks an answer against upstream's description of `method path` (path as the description writes it, without /v1). */
function conforms(method: string, path: string, r: { status: number; json: unknown; body: string; headers: Record<string, unknown> }, expected: number) {
  const op = operation(method, path);
  coverage.add(`${method} ${path}`);
  assert.equal(r.status, expected, `${method} ${path}: ${r.body}`);
  assert.ok(op.statuses.includes(r.status) || DOCUMENTED_DIFFERENCES.has(r.status), `${method} ${path} answered ${r.status}; upstream's description lists ${op.statuses.join(', ')}`);
  if (op.body?.status !== r.status) return;
  assert.match(String(r.headers['content-type']), /^application\/json/);
  const validate = validatorOf(op.body.schema);
  assert.ok(validate(r.json), `${method} ${path} ${r.status}: ${ajv.errorsText(validate.errors)}\n${r.body}`);
}

/** Checks a body against one of upstream's component schemas (for endpoints its description leaves out). */
function isA(name: keyof typeof schemas, value: unknown, what: string) {
  const validate = component(name);
  assert.ok(validate(value), `${what}: not a ${name}: ${ajv.errorsText(validate.errors)}\n${JSON.stringify(value)}`);
}

describe("our controller's answers against upstream 0.55's api/openapi.yaml", () => {
  let c: Cluster;
  let worker: ReturnType<typeof syntheticWorker>;
  /** As upstream's client library: JSON without a Content-Type, its User-Agent. */
  const go = (method: string, path: string, body?: unknown) =>
    rawRequest(c.ctl, method, `/v1${path}`, {
      auth: ['bootstrap-admin', ADMIN_TOKEN],
      body: body === undefined ? undefined : JSON.stringify(body),
      contentType: null,
      headers: { 'user-agent': 'Orchard/unknown-unknown' },
    });

  before(async () => {
    c = await inProcessController();
  });
  after(async () => {
    await worker?.stop();
    await c.close();
    c.cleanup();
    // Every operation of upstream's description was exercised (the WebSocket ones by their refusals).
    assert.deepEqual(Object.keys(operations).filter((o) => !coverage.has(o)), [], 'operations not checked');
  });

  test('GET /v1/ and controller info', async () => {
    assert.equal((await rawRequest(c.ctl, 'GET', '/v1/')).status, 200);
    conforms('GET', '/controller/info', await go('GET', '/controller/info'), 200);
  });

  test('cluster settings: get, put (replaces)', async () => {
    conforms('GET', '/cluster-settings', await go('GET', '/cluster-settings'), 200);
    conforms('PUT', '/cluster-settings', await go('PUT', '/cluster-settings', { hostDirPolicies: [{ pathPrefix: '/Users/ci/src', ro: true }], schedulerProfile: 'distribute-load' }), 200);
    conforms('GET', '/cluster-settings', await go('GET', '/cluster-settings'), 200);
    conforms('PUT', '/cluster-settings', await go('PUT', '/cluster-settings', {}), 200);
  });

  test('service accounts: create, conflict, list, get, update, delete, not found', async () => {
    const sa = { name: 'ci', token: 'ci-token-0123456789', roles: ['compute:read', 'compute:write'], createdAt: '0001-01-01T00:00:00Z' };
    conforms('POST', '/service-accounts', await go('POST', '/service-accounts', sa), 200);
    conforms('POST', '/service-accounts', await go('POST', '/service-accounts', sa), 409);
    conforms('GET', '/service-accounts', await go('GET', '/service-accounts'), 200);
    conforms('GET', '/service-accounts/{name}', await go('GET', '/service-accounts/ci'), 200);
    conforms('PUT', '/service-accounts/{name}', await go('PUT', '/service-accounts/ci', { ...sa, roles: ['compute:read'] }), 200);
    conforms('GET', '/service-accounts/{name}', await go('GET', '/service-accounts/nobody'), 404);
    conforms('PUT', '/service-accounts/{name}', await go('PUT', '/service-accounts/nobody', { name: 'nobody', roles: [] }), 404);
    conforms('DELETE', '/service-accounts/{name}', await go('DELETE', '/service-accounts/ci'), 200);
    conforms('DELETE', '/service-accounts/{name}', await go('DELETE', '/service-accounts/ci'), 404);
  });

  test('workers: register and heartbeat (component Worker), list, get, delete, not found', async () => {
    // POST and PUT /workers are not in upstream's description: their answers are checked as a Worker.
    const record = {
      last_seen: new Date().toISOString(),
      machine_id: 'A1B2',
      resources: { 'org.cirruslabs.tart-vms': 2, 'org.cirruslabs.logical-cores': 8, 'org.cirruslabs.memory-mib': 16384 },
      defaultCPU: 4,
      defaultMemory: 8192,
      arch: 'arm64',
      runtime: 'tart',
      name: 'admins-Mac-mini.local',
      createdAt: '0001-01-01T00:00:00Z',
    };
    const registered = await go('POST', '/workers', record);
    assert.equal(registered.status, 200, registered.body);
    isA('Worker', registered.json, 'POST /workers');
    const beat = await go('PUT', '/workers/admins-Mac-mini.local', { ...record, last_seen: new Date().toISOString() });
    assert.equal(beat.status, 200, beat.body);
    isA('Worker', beat.json, 'PUT /workers/{name}');
    conforms('GET', '/workers', await go('GET', '/workers'), 200);
    conforms('GET', '/workers/{name}', await go('GET', '/workers/admins-Mac-mini.local'), 200);
    conforms('GET', '/workers/{name}', await go('GET', '/workers/nobody'), 404);
    conforms('DELETE', '/workers/{name}', await go('DELETE', '/workers/admins-Mac-mini.local'), 200);
    conforms('DELETE', '/workers/{name}', await go('DELETE', '/workers/admins-Mac-mini.local'), 404);
  });

  test('VMs: create as upstream CLI marshals it, conflict, list, filter, get, watch, update, events, IP, delete', async () => {
    // As upstream's `orchard create vm ci_build.1 …` marshals v1.VM (omitempty, zero times, generation 0).
    const created = await go('POST', '/vms', {
      image: 'ghcr.io/cirruslabs/macos-tahoe-base:latest',
      imagePullPolicy: 'IfNotPresent',
      cpu: 4,
      memory: 8192,
      headless: true,
      os: 'darwin',
      arch: 'arm64',
      runtime: 'tart',
      observedGeneration: 0,
      username: 'admin',
      password: 'admin',
      restart_policy: 'Never',
      restarted_at: '0001-01-01T00:00:00Z',
      scheduled_at: '0001-01-01T00:00:00Z',
      started_at: '0001-01-01T00:00:00Z',
      generation: 0,
      name: 'ci_build.1',
      createdAt: '0001-01-01T00:00:00Z',
    });
    conforms('POST', '/vms', created, 200);
    // localName (and the deprecated tartName) from the start, as upstream's: orchard-NAME-UID-RESTARTCOUNT.
    const made = created.json as { uid: string; localName?: string; tartName?: string };
    assert.deepEqual([made.localName, made.tartName], [`orchard-ci_build.1-${made.uid}-0`, `orchard-ci_build.1-${made.uid}-0`]);
    conforms('POST', '/vms', await go('POST', '/vms', { name: 'ci_build.1', image: 'x' }), 409);
    conforms('GET', '/vms', await go('GET', '/vms'), 200);
    conforms('GET', '/vms', await go('GET', '/vms?filter=worker%3Dnone'), 200);
    conforms('GET', '/vms/{name}', await go('GET', '/vms/ci_build.1'), 200);
    conforms('GET', '/vms/{name}', await go('GET', '/vms/nobody'), 404);
    const vm = (await go('GET', '/vms/ci_build.1')).json as Record<string, unknown>;
    conforms('PUT', '/vms/{name}', await go('PUT', '/vms/ci_build.1', { ...vm, labels: { pool: 'm4' } }), 200);
    conforms('PUT', '/vms/{name}', await go('PUT', '/vms/nobody', { ...vm, name: 'nobody' }), 404);
    // A null startup script (not a Go client's, but JSON allows it) is no script: never answered as null.
    conforms('POST', '/vms', await go('POST', '/vms', { name: 'null-script', image: 'img', startup_script: null }), 200);
    conforms('PUT', '/vms/{name}', await go('PUT', '/vms/ci_build.1', { ...vm, startup_script: { script_content: 'echo hi' } }), 200);
    conforms('PUT', '/vms/{name}', await go('PUT', '/vms/ci_build.1', { ...vm, startup_script: null }), 200);
    assert.equal(((await go('GET', '/vms/ci_build.1')).json as Record<string, unknown>).startup_script, undefined);
    // An illegal powerState change: 409 here (412 upstream), a documented difference.
    conforms('PUT', '/vms/{name}', await go('PUT', '/vms/ci_build.1', { ...vm, powerState: 'suspended' }), 409);

    // The watch stream: application/x-ndjson lines of {type, object: VM}.
    const { OrchardClient } = await import('../../src/client/client.ts');
    const watcher = new OrchardClient({ url: c.ctl.url, certificate: c.ctl.certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
    const abort = new AbortController();
    const first = await watcher.watch<unknown>('/v1/vms/ci_build.1?watch=true', abort.signal).next();
    abort.abort();
    watcher.close();
    const ndjson = validatorOf(operation('GET', '/vms/{name}').ndjson!);
    assert.ok(ndjson(first.value), `watch line: ${ajv.errorsText(ndjson.errors)}`);
    assert.equal((first.value as { type: string }).type, 'ADDED');

    // A VM that runs, on a worker: events (appended as upstream's worker does), its IP.
    worker = syntheticWorker(c.admin, 'syn-1');
    await worker.start();
    const anyRuntime = await go('POST', '/vms', { image: 'synthetic', name: 'runs', createdAt: '0001-01-01T00:00:00Z', generation: 0, observedGeneration: 0 });
    conforms('POST', '/vms', anyRuntime, 200);
    await waitFor('runs running', async () => ((await go('GET', '/vms/runs')).json as { status?: string }).status === 'running' || undefined, 15_000);
    conforms('GET', '/vms', await go('GET', '/vms?filter=worker%3Dsyn-1'), 200);
    const appended = await go('POST', '/vms/runs/events', [{ kind: 'log_line', timestamp: 1_700_000_000, payload: 'hello' }, { payload: 'no kind' }]);
    assert.equal(appended.status, 200, appended.body);
    const page = await go('GET', '/vms/runs/events?limit=1&order=desc');
    conforms('GET', '/vms/{name}/events', page, 200);
    assert.equal((page.json as unknown[]).length, 1);
    assert.ok(typeof page.headers['x-next-cursor'] === 'string', 'X-Next-Cursor names the next page');
    conforms('GET', '/vms/{name}/events', await go('GET', `/vms/runs/events?cursor=${page.headers['x-next-cursor'] as string}`), 200);
    conforms('GET', '/vms/{name}/events', await go('GET', '/vms/nobody/events'), 404);
    conforms('GET', '/vms/{name}/ip', await go('GET', '/vms/runs/ip?wait=5'), 200);
    conforms('GET', '/vms/{name}/ip', await go('GET', '/vms/nobody/ip'), 404);

    conforms('DELETE', '/vms/{name}', await go('DELETE', '/vms/ci_build.1'), 200);
    conforms('DELETE', '/vms/{name}', await go('DELETE', '/vms/ci_build.1'), 404);
  });

  test('the state report a worker sends (PUT /vms/{name}/state) answers a VM', async () => {
    const r = await go('PUT', '/vms/runs/state', { status: 'running', status_message: 'still running', observedGeneration: 0, localName: 'x' });
    // Only its worker's account may report it: the admin here is that account (the synthetic worker acts as it).
    assert.equal(r.status, 200, r.body);
    isA('VM', r.json, 'PUT /vms/{name}/state');
  });

  test('WebSocket endpoints refuse with the status codes upstream lists', async () => {
    const ws = async (path: string) => upgrade(c.ctl, path, { auth: ['bootstrap-admin', ADMIN_TOKEN] });
    const opened: WebSocket[] = [];
    try {
      const cases: [string, string, number][] = [
        ['/vms/{name}/port-forward', '/v1/vms/nobody/port-forward?port=22', 404],
        ['/vms/{name}/port-forward', '/v1/vms/runs/port-forward?port=0', 400],
        ['/vms/{name}/port-forward', '/v1/vms/runs/port-forward?port=70000', 400],
        ['/workers/{name}/port-forward', '/v1/workers/nobody/port-forward?port=22', 404],
        ['/workers/{name}/port-forward', '/v1/workers/syn-1/port-forward', 400],
        ['/vms/{name}/exec', '/v1/vms/nobody/exec?command=true', 404],
        ['/vms/{name}/exec', '/v1/vms/runs/exec', 400],
      ];
      for (const [specPath, path, status] of cases) {
        const r = await ws(path);
        if (r.ws) opened.push(r.ws);
        assert.equal(r.status, status, `${path}: ${r.body}`);
        const op = operation('GET', specPath);
        assert.ok(op.websocket, `${specPath} is a WebSocket`);
        assert.ok(op.statuses.includes(status), `${specPath} lists ${status}`);
        coverage.add(`GET ${specPath}`);
      }
      const ok = await ws('/v1/vms/runs/port-forward?port=22&wait=5');
      if (ok.ws) opened.push(ok.ws);
      assert.equal(ok.status, 101, ok.body);
    } finally {
      for (const s of opened) s.terminate();
    }
  });
});

test("upstream's `orchard logs vm` (events without `limit`, X-Next-Cursor unread) gets every kept event; with `limit`, pages", async () => {
  const c = await inProcessController({ limits: { eventPageBytes: 16 * 1024 } });
  try {
    await c.admin.createVM({ name: 'chatty', image: 'img' });
    const { placeOn } = await import('../helpers.ts');
    await placeOn(c.admin, 'w-chatty', 'chatty');
    const events = Array.from({ length: 1500 }, (_, i) => ({ kind: 'log_line', timestamp: 1_700_000_000 + i, payload: `line ${i} `.padEnd(100, '.') }));
    for (let i = 0; i < events.length; i += 500) await c.admin.appendEvents('chatty', events.slice(i, i + 500));
    const get = (query: string) =>
      rawRequest(c.ctl, 'GET', `/v1/vms/chatty/events${query}`, { auth: ['bootstrap-admin', ADMIN_TOKEN], headers: { 'user-agent': 'Orchard/0.55.0' } });
    const all = await get('');
    assert.equal(all.status, 200);
    assert.equal((all.json as unknown[]).length, 1500, 'more than a page of bytes and more than 1000 events, in one answer');
    assert.equal(all.headers['x-next-cursor'], undefined);
    const desc = (await get('?order=desc')).json as { payload: string }[];
    assert.deepEqual([desc.length, desc[0].payload.split(' ')[1]], [1500, '1499'], 'newest first, all of them');
    // `--tail 5`: limit and order desc.
    const tail = await get('?limit=5&order=desc');
    assert.deepEqual((tail.json as { payload: string }[]).map((e) => e.payload.split(' ')[1]), ['1499', '1498', '1497', '1496', '1495']);
    const page = await get('?limit=1000');
    assert.ok((page.json as unknown[]).length < 1000, 'a page with a limit still stops at its byte budget');
    assert.ok(typeof page.headers['x-next-cursor'] === 'string');
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('the restated contract: every schema in it compiles under strict Ajv and tells right from wrong', () => {
  for (const [key, op] of Object.entries(operations)) {
    for (const s of [op.body?.schema, op.ndjson, op.request, op.websocket?.frames?.fromClient, op.websocket?.frames?.fromController]) if (s) assert.doesNotThrow(() => validatorOf(s), key);
  }
  for (const name of Object.keys(schemas) as (keyof typeof schemas)[]) assert.doesNotThrow(() => component(name), name);
  const frames = operation('GET', '/vms/{name}/exec').websocket!.frames!;
  assert.ok(validatorOf(frames.fromClient)({ type: 'resize', terminal: { rows: 40, cols: 120 } }));
  assert.ok(!validatorOf(frames.fromClient)({ type: 'stdin' }), 'a stdin frame has data');
  assert.ok(validatorOf(frames.fromController)({ type: 'exit', exit: { code: 0 } }));
  assert.ok(!validatorOf(frames.fromController)({ type: 'exit', exit: { code: 1.5 } }), 'an exit code is an integer');
  assert.ok(!component('VM')({ name: 'a', status: 'stopped' }), 'status is pending, running or failed');
  assert.ok(!component('VM')({ name: 'a', startup_script: null }), 'nothing is nullable');
  assert.ok(validatorOf(schemas.Events)([{ kind: 'log_line', timestamp: 1, payload: 'x' }]), 'events are checked as the array upstream serves');
});
