// An upstream Orchard 0.55 worker, replayed request by request as its Go code sends them (pkg/client,
// internal/worker): no Content-Type on JSON bodies, User-Agent Orchard/0.55.0, Go's JSON (zero times,
// omitempty), the WebSocket watch read as binary frames, dial-backs and IP answers in the query.
// It registers, receives its VM over the watch, reports it running with a log_line event, serves a
// port-forward and an IP lookup, heartbeats with its whole record, and is paused and resumed.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { WebSocket } from 'ws';
import { inProcessController, metric, rawRequest, waitFor } from '../helpers.ts';
import { account, upgrade, type Account, type Cluster } from '../security/attack.ts';

const UA = { 'user-agent': 'Orchard/0.55.0' };
const ZERO_TIME = '0001-01-01T00:00:00Z';

describe('an upstream 0.55 worker (replayed)', () => {
  let c: Cluster;
  let w: Account;
  let watch: WebSocket;
  const frames: { binary: boolean; json: Record<string, { session?: string; vmUID?: string; port?: number }> }[] = [];
  /** A request as upstream's client makes it: JSON body without Content-Type, its User-Agent, only 200 is success. */
  const go = (method: string, path: string, body?: object) =>
    rawRequest(c.ctl, method, path, { auth: w.auth, body: body === undefined ? undefined : JSON.stringify(body), contentType: null, headers: UA });

  before(async () => {
    c = await inProcessController();
    w = await account(c, 'mac-worker', ['compute:read', 'compute:write']);
  });
  after(async () => {
    watch?.close();
    await c.close();
    c.cleanup();
  });

  test('GET /v1/ answers 200 without credentials; controller info advertises rpc-v2 and vm-state-endpoint', async () => {
    assert.equal((await rawRequest(c.ctl, 'GET', '/v1/', { headers: UA })).status, 200);
    const info = await go('GET', '/v1/controller/info');
    assert.equal(info.status, 200);
    const caps = (info.json as { capabilities: string[] }).capabilities;
    assert.ok(caps.includes('rpc-v2') && caps.includes('vm-state-endpoint'), caps.join(','));
  });

  test('registers with a Go-marshalled body and no Content-Type, then watches over binary frames', async () => {
    // v1.Worker as encoding/json writes it: struct field order, omitempty, the embedded Meta last (zero createdAt).
    const registered = await go('POST', '/v1/workers', {
      last_seen: new Date().toISOString(),
      machine_id: '8F3A2C1E-0B7D-4E59-9A61-2D3C4B5A6F70',
      resources: { 'org.cirruslabs.tart-vms': 2, 'org.cirruslabs.logical-cores': 8, 'org.cirruslabs.memory-mib': 16384 },
      arch: 'arm64',
      runtime: 'tart',
      name: 'admins-Mac-mini.local',
      createdAt: ZERO_TIME,
    });
    assert.equal(registered.status, 200, registered.body);
    const opened = await upgrade(c.ctl, '/v1/rpc/watch?workerName=admins-Mac-mini.local', { auth: w.auth });
    assert.equal(opened.status, 101, opened.body);
    watch = opened.ws!;
    watch.on('message', (data, isBinary) => frames.push({ binary: isBinary, json: JSON.parse(data.toString()) }));
    await waitFor('the first sync', () => frames.length > 0 || undefined);
    assert.ok(frames.every((f) => f.binary), 'every watch instruction is a binary frame');
    assert.ok('syncVMsAction' in frames[0].json);
  });

  test('gets a VM created as upstream does (runtime tart), reports it running with a log_line event', async () => {
    const before = frames.length;
    // As upstream's `orchard create vm ci_build.1 --image …` marshals v1.VM: omitempty fields left out,
    // the others with their zero values (times, generation, observedGeneration); no Content-Type.
    const created = await rawRequest(c.ctl, 'POST', '/v1/vms', {
      auth: ['bootstrap-admin', 'test-admin-token'],
      contentType: null,
      headers: UA,
      body: JSON.stringify({
        image: 'ghcr.io/cirruslabs/macos-sonoma-base:latest',
        imagePullPolicy: 'IfNotPresent',
        cpu: 4,
        memory: 8192,
        os: 'darwin',
        arch: 'arm64',
        runtime: 'tart',
        observedGeneration: 0,
        restart_policy: 'Never',
        restarted_at: ZERO_TIME,
        scheduled_at: ZERO_TIME,
        started_at: ZERO_TIME,
        generation: 0,
        name: 'ci_build.1',
        createdAt: ZERO_TIME,
      }),
    });
    assert.equal(created.status, 200, created.body);
    await waitFor('a sync for the new VM', () => frames.slice(before).some((f) => 'syncVMsAction' in f.json) || undefined);
    // Upstream's worker lists its VMs on every syncVMsAction.
    const listed = await go('GET', '/v1/vms?filter=worker%3Dadmins-Mac-mini.local');
    assert.equal(listed.status, 200);
    const vm = (listed.json as { name: string; uid: string; generation: number }[]).find((v) => v.name === 'ci_build.1');
    assert.ok(vm, listed.body);
    const state = await go('PUT', '/v1/vms/ci_build.1/state', {
      image: 'ghcr.io/cirruslabs/macos-sonoma-base:latest',
      cpu: 4,
      memory: 8192,
      conditions: [{ type: 'scheduled', state: 'true' }, { type: 'running', state: 'true' }],
      status: 'running',
      status_message: 'VM is running',
      worker: 'admins-Mac-mini.local',
      restarted_at: ZERO_TIME,
      uid: vm.uid,
      scheduled_at: ZERO_TIME,
      started_at: ZERO_TIME,
      generation: vm.generation,
      name: 'ci_build.1',
      createdAt: ZERO_TIME,
      tartName: `orchard-ci_build.1-${vm.uid}-0`,
      image_fqn: 'ghcr.io/cirruslabs/macos-sonoma-base@sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0',
    });
    assert.equal(state.status, 200, state.body);
    const reported = await c.admin.getVM('ci_build.1');
    assert.equal(reported.tartName, `orchard-ci_build.1-${vm.uid}-0`, 'tartName is kept and returned');
    assert.match(reported.image_fqn ?? '', /@sha256:/);
    const events = await go('POST', '/v1/vms/ci_build.1/events', [{ kind: 'log_line', timestamp: Math.floor(Date.now() / 1000), payload: 'Booted.' }]);
    assert.equal(events.status, 200, events.body);
    assert.equal((await c.admin.getVM('ci_build.1')).status, 'running');
    // An event as Go marshals an empty one: every field left out (omitempty).
    assert.equal((await go('POST', '/v1/vms/ci_build.1/events', [{ kind: 'log_line', timestamp: 1 }, {}])).status, 200);
    assert.deepEqual((await c.admin.listEvents('ci_build.1')).events.map((e) => [e.kind, e.payload]), [['log_line', 'Booted.'], ['log_line', ''], ['', '']]);
  });

  test("an older upstream worker's state report through PUT /v1/vms/{name} (User-Agent Orchard/0…); started_at is the controller's", async () => {
    const vm = await c.admin.getVM('ci_build.1');
    const old = await rawRequest(c.ctl, 'PUT', '/v1/vms/ci_build.1', {
      auth: w.auth,
      contentType: null,
      headers: { 'user-agent': 'Orchard/0.40.1' },
      body: JSON.stringify({ ...vm, status: 'running', status_message: 'still running (old worker)', started_at: ZERO_TIME, restarted_at: ZERO_TIME }),
    });
    assert.equal(old.status, 200, old.body);
    const after = await c.admin.getVM('ci_build.1');
    assert.equal(after.status_message, 'still running (old worker)');
    assert.equal(after.generation, vm.generation, 'not a spec change');
    assert.notEqual(after.started_at, ZERO_TIME);
    assert.ok(Date.parse(after.started_at!) > Date.parse('2020-01-01'), after.started_at);
  });

  test('serves a port-forward (errorMessage= in the query) and an IP lookup (ip= in the query, no body)', async () => {
    const user = await account(c, 'user', ['compute:connect']);
    const before = frames.length;
    const client = upgrade(c.ctl, '/v1/vms/ci_build.1/port-forward?port=22&wait=5', { auth: user.auth });
    const pf = await waitFor('portForwardAction', () => frames.slice(before).find((f) => f.json.portForwardAction)?.json.portForwardAction);
    assert.equal(pf.port, 22);
    // url.Values.Encode sorts the keys: errorMessage first, empty when the worker reached the VM.
    const dial = await upgrade(c.ctl, `/v1/rpc/port-forward?errorMessage=&session=${encodeURIComponent(pf.session!)}`, { auth: w.auth });
    assert.equal(dial.status, 101, dial.body);
    const tunnel = await client;
    assert.equal(tunnel.status, 101);
    dial.ws!.on('message', (m) => dial.ws!.send(m, { binary: true }));
    const echoed = new Promise<string>((resolve) => tunnel.ws!.once('message', (m) => resolve(m.toString())));
    tunnel.ws!.send(Buffer.from('SSH-2.0-probe\r\n'));
    assert.equal(await echoed, 'SSH-2.0-probe\r\n');
    tunnel.ws!.close();

    const ipBefore = frames.length;
    const asked = rawRequest(c.ctl, 'GET', '/v1/vms/ci_build.1/ip?wait=5', { auth: user.auth });
    const ra = await waitFor('resolveIPAction', () => frames.slice(ipBefore).find((f) => f.json.resolveIPAction)?.json.resolveIPAction);
    const answered = await go('POST', `/v1/rpc/resolve-ip?errorMessage=&ip=192.168.64.7&session=${encodeURIComponent(ra.session!)}`);
    assert.equal(answered.status, 200, answered.body);
    assert.deepEqual((await asked).json, { ip: '192.168.64.7' });
  });

  test('heartbeats with its whole record (GET then PUT) and is paused and resumed by an operator', async () => {
    const got = await go('GET', '/v1/workers/admins-Mac-mini.local');
    assert.equal(got.status, 200);
    const record = got.json as Record<string, unknown>;
    const beat = await go('PUT', '/v1/workers/admins-Mac-mini.local', { ...record, last_seen: new Date().toISOString() });
    assert.equal(beat.status, 200, beat.body);
    // Upstream's `orchard pause|resume worker`: GET the record, flip scheduling_paused, PUT it back
    // (Go's omitempty leaves a false one out), as an operator's account.
    const admin = (method: string, path: string, body?: object) =>
      rawRequest(c.ctl, method, path, { auth: ['bootstrap-admin', 'test-admin-token'], body: body && JSON.stringify(body), contentType: null, headers: UA });
    const flip = async (pause: boolean) => {
      const { scheduling_paused: _drop, ...current } = (await admin('GET', '/v1/workers/admins-Mac-mini.local')).json as Record<string, unknown>;
      const put = await admin('PUT', '/v1/workers/admins-Mac-mini.local', pause ? { ...current, scheduling_paused: true } : current);
      assert.equal(put.status, 200, put.body);
      return (await c.admin.getWorker('admins-Mac-mini.local')).scheduling_paused ?? false;
    };
    assert.equal(await flip(true), true, 'paused');
    // The worker's own heartbeat (its whole record, paused included) keeps it paused.
    const paused = (await go('GET', '/v1/workers/admins-Mac-mini.local')).json as Record<string, unknown>;
    assert.equal((await go('PUT', '/v1/workers/admins-Mac-mini.local', { ...paused, last_seen: new Date().toISOString() })).status, 200);
    assert.equal((await c.admin.getWorker('admins-Mac-mini.local')).scheduling_paused, true);
    assert.equal(await flip(false), false, 'resumed');
  });

  test('watching a VM that does not exist yet waits for it and gets its ADDED', async () => {
    const ac = new AbortController();
    const events = c.admin.watch<{ name: string }>('/v1/vms/later-vm?watch=true', ac.signal);
    const before = await metric(c.ctl, 'orchard_watch_streams');
    const first = events.next();
    await waitFor('the watch to be established', async () => (await metric(c.ctl, 'orchard_watch_streams')) > before);
    await c.admin.createVM({ name: 'later-vm', image: 'img' });
    const got = await first;
    assert.deepEqual([got.value?.type, got.value?.object.name], ['ADDED', 'later-vm']);
    ac.abort();
  });

  test('a service account created as upstream marshals it (no roles: omitempty) has none', async () => {
    const r = await rawRequest(c.ctl, 'POST', '/v1/service-accounts', { auth: ['bootstrap-admin', 'test-admin-token'], body: JSON.stringify({ name: 'ci.bot', createdAt: ZERO_TIME }), contentType: null, headers: UA });
    assert.equal(r.status, 200, r.body);
    assert.deepEqual((r.json as { roles: string[] }).roles, []);
  });

  test("PUT /v1/cluster-settings replaces the settings, as upstream's (policies can be cleared)", async () => {
    const put = (body: object) => rawRequest(c.ctl, 'PUT', '/v1/cluster-settings', { auth: ['bootstrap-admin', 'test-admin-token'], body: JSON.stringify(body), contentType: null, headers: UA });
    assert.equal((await put({ hostDirPolicies: [{ pathPrefix: '/srv/cache', ro: true }], schedulerProfile: 'distribute-load' })).status, 200);
    assert.deepEqual((await c.admin.getClusterSettings()).hostDirPolicies, [{ pathPrefix: '/srv/cache', ro: true }]);
    assert.equal((await put({ schedulerProfile: 'optimize-utilization' })).status, 200);
    assert.deepEqual((await c.admin.getClusterSettings()).hostDirPolicies, [], 'the policies are cleared');
  });
});

test('an upstream Linux (Vetu) worker, which counts no VM slots, gets a VM that asks for none', async () => {
  const c = await inProcessController();
  try {
    await c.admin.registerWorker({ name: 'linux-1', runtime: 'vetu', arch: 'amd64', resources: { 'org.cirruslabs.logical-cores': 8, 'org.cirruslabs.memory-mib': 32768 } });
    await c.admin.createVM({ name: 'ubuntu-1', image: 'ghcr.io/cirruslabs/ubuntu:latest', os: 'linux', arch: 'amd64', runtime: 'vetu' });
    const vm = await waitFor('ubuntu-1 placed', async () => {
      const v = await c.admin.getVM('ubuntu-1');
      return v.worker ? v : undefined;
    });
    assert.equal(vm.worker, 'linux-1');
    // A VM that asks for a slot explicitly still needs a worker that has one.
    await c.admin.createVM({ name: 'slotted', image: 'i', runtime: 'vetu', resources: { 'org.cirruslabs.tart-vms': 1 } });
    const slotted = await waitFor('the scheduler to say why slotted waits', async () => {
      const v = await c.admin.getVM('slotted');
      return /has 0 of 1 VM slots free/.test(v.status_message ?? '') ? v : undefined;
    });
    assert.equal(slotted.worker, undefined);
  } finally {
    await c.close();
    c.cleanup();
  }
});
