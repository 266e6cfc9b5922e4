// Bad input of every kind gets a 4xx JSON error naming the field: never a 500, never a crash, and
// nothing half-stored. Plus the few odd-looking inputs that must work (what upstream Go clients send).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { VM } from '../src/api/schemas.ts';
import { ADMIN_TOKEN, inProcessController, rawRequest } from './helpers.ts';

const ADMIN: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];
const IMAGE = 'ghcr.io/cirruslabs/macos-sequoia-base:latest';

interface Case {
  what: string;
  method: string;
  path: string;
  /** A value sent as JSON, or `raw` bytes as they are. */
  body?: unknown;
  raw?: string | Buffer;
  contentType?: string;
  status: number;
  /** What the error message must contain: the field (or header, or name) at fault. */
  field: string;
  /** A known deviation: reported by the run, not failing it. */
}

// Names take upstream's characters: letters, digits, '-', '_', '.', ':' (test/conformance has good ones).
const BAD_NAMES: [string, string][] = [
  ['a space', 'bad name'],
  ['a slash', 'a/b'],
  ['a percent sign', 'a%b'],
  ['129 characters', 'a'.repeat(129)],
  ['one dot', '.'],
  ['two dots', '..'],
  ['non-ASCII', 'näme'],
];

describe('bad input', () => {
  let h: Awaited<ReturnType<typeof inProcessController>>;
  const ctl = () => h.ctl;
  // What the valid requests of this file create; the lists must end up holding exactly these.
  const expected = { vms: new Set<string>(), workers: new Set<string>(), serviceAccounts: new Set<string>(['bootstrap-admin']) };

  async function call(method: string, path: string, body?: unknown, opts: { raw?: string | Buffer; contentType?: string } = {}) {
    return rawRequest(ctl(), method, path, {
      auth: ADMIN,
      body: opts.raw ?? (body === undefined ? undefined : JSON.stringify(body)),
      contentType: opts.contentType,
    });
  }
  async function ok(method: string, path: string, body?: unknown): Promise<unknown> {
    const res = await call(method, path, body);
    assert.equal(res.status, 200, `${method} ${path}: ${res.status} ${res.body.slice(0, 300)}`);
    return res.json;
  }

  let baseVM: VM;
  before(async () => {
    h = await inProcessController();
    await ok('PUT', '/v1/cluster-settings', { hostDirPolicies: [{ pathPrefix: '/srv/shared', ro: true }, { pathPrefix: '/data/' }] });
    baseVM = (await ok('POST', '/v1/vms', { name: 'base-vm', image: IMAGE, runtime: 'tart', labels: { pool: 'a' } })) as VM;
    expected.vms.add('base-vm');
    await ok('POST', '/v1/workers', { name: 'w1', machine_id: 'machine-1' });
    expected.workers.add('w1');
    await ok('POST', '/v1/service-accounts', { name: 'sa1', roles: ['compute:read'] });
    expected.serviceAccounts.add('sa1');
  });
  after(async () => {
    await h?.close();
    h?.cleanup();
  });

  const vm = (extra: Record<string, unknown>) => ({ name: 'new-vm', image: IMAGE, ...extra });
  const cases: Case[] = [];
  const add = (c: Case) => cases.push(c);

  // -- not JSON, not an object, not the right content --------------------------------------------
  for (const [method, path] of [
    ['POST', '/v1/vms'],
    ['PUT', '/v1/vms/base-vm'],
    ['PUT', '/v1/vms/base-vm/state'],
    ['POST', '/v1/vms/base-vm/events'],
    ['POST', '/v1/workers'],
    ['PUT', '/v1/workers/w1'],
    ['POST', '/v1/service-accounts'],
    ['PUT', '/v1/service-accounts/sa1'],
    ['PUT', '/v1/cluster-settings'],
  ]) {
    add({ what: 'malformed JSON', method, path, raw: '{"name": "x", ', status: 400, field: 'JSON' });
    add({ what: 'trailing garbage after JSON', method, path, raw: '{"name": "x"} xyz', status: 400, field: 'JSON' });
    add({ what: 'empty body with a JSON content type', method, path, raw: '', status: 400, field: 'Body' });
    add({ what: 'form content type', method, path, raw: 'name=x', contentType: 'application/x-www-form-urlencoded', status: 415, field: 'content-type' });
    add({ what: 'XML content type', method, path, raw: '<vm/>', contentType: 'application/xml', status: 415, field: 'content-type' });
    add({ what: 'a body over 1 MiB', method, path, raw: JSON.stringify({ name: 'x', image: 'y'.repeat(1024 * 1024 + 10) }), status: 413, field: 'body' });
  }
  for (const [method, path] of [
    ['POST', '/v1/vms'],
    ['PUT', '/v1/vms/base-vm'],
    ['PUT', '/v1/vms/base-vm/state'],
    ['POST', '/v1/workers'],
    ['PUT', '/v1/workers/w1'],
    ['POST', '/v1/service-accounts'],
    ['PUT', '/v1/service-accounts/sa1'],
    ['PUT', '/v1/cluster-settings'],
  ]) {
    add({ what: 'a JSON array instead of an object', method, path, body: [{ name: 'x' }], status: 400, field: 'body' });
    add({ what: 'a JSON string instead of an object', method, path, body: 'x', status: 400, field: 'body' });
    add({ what: 'JSON null instead of an object', method, path, raw: 'null', status: 400, field: 'body' });
    add({ what: 'a number instead of an object', method, path, raw: '42', status: 400, field: 'body' });
  }
  // Fastify parses text/plain into a string by default, which then fails validation with a 400.
  add({ what: 'text/plain content type', method: 'POST', path: '/v1/vms', raw: '{"name":"x","image":"y"}', contentType: 'text/plain', status: 415, field: 'content-type' });
  add({ what: 'an object instead of the event array', method: 'POST', path: '/v1/vms/base-vm/events', body: { kind: 'log_line', timestamp: 1, payload: 'x' }, status: 400, field: 'body' });

  // -- unknown fields -------------------------------------------------------------------------
  add({ what: 'unknown top-level VM field', method: 'POST', path: '/v1/vms', body: vm({ foo: 1 }), status: 400, field: 'foo' });
  add({ what: 'unknown field in startup_script', method: 'POST', path: '/v1/vms', body: vm({ startup_script: { script_content: 'true', foo: 1 } }), status: 400, field: 'startup_script.foo' });
  add({ what: 'unknown field in hostDirs[0]', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'd', path: '/data/x', mode: 'rw' }] }), status: 400, field: 'hostDirs[0].mode' });
  add({ what: 'unknown VM field on PUT', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', cpus: 2 }, status: 400, field: 'cpus' });
  add({ what: 'unknown worker field', method: 'POST', path: '/v1/workers', body: { name: 'w2', hostname: 'x' }, status: 400, field: 'hostname' });
  add({ what: 'unknown service account field', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', roles: [], admin: true }, status: 400, field: 'admin' });
  add({ what: 'unknown cluster settings field', method: 'PUT', path: '/v1/cluster-settings', body: { scheduler: 'x' }, status: 400, field: 'scheduler' });
  add({ what: 'unknown field in hostDirPolicies[0]', method: 'PUT', path: '/v1/cluster-settings', body: { hostDirPolicies: [{ pathPrefix: '/x', readOnly: true }] }, status: 400, field: 'hostDirPolicies[0].readOnly' });
  add({ what: 'unknown event field', method: 'POST', path: '/v1/vms/base-vm/events', body: [{ kind: 'log_line', timestamp: 1, payload: 'x', level: 'info' }], status: 400, field: 'level' });

  // -- wrong types ----------------------------------------------------------------------------
  add({ what: 'cpu as a string', method: 'POST', path: '/v1/vms', body: vm({ cpu: '4' }), status: 400, field: 'cpu' });
  add({ what: 'cpu null', method: 'POST', path: '/v1/vms', body: vm({ cpu: null }), status: 400, field: 'cpu' });
  add({ what: 'memory 1.5', method: 'POST', path: '/v1/vms', body: vm({ memory: 1.5 }), status: 400, field: 'memory' });
  add({ what: 'labels as an array', method: 'POST', path: '/v1/vms', body: vm({ labels: ['a'] }), status: 400, field: 'labels' });
  add({ what: 'a label value that is a number', method: 'POST', path: '/v1/vms', body: vm({ labels: { a: 1 } }), status: 400, field: 'labels.a' });
  add({ what: 'headless as a string', method: 'POST', path: '/v1/vms', body: vm({ headless: 'yes' }), status: 400, field: 'headless' });
  add({ what: 'image as a number', method: 'POST', path: '/v1/vms', body: vm({ image: 7 }), status: 400, field: 'image' });
  add({ what: 'hostDirs as an object', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: { name: 'd', path: '/data' } }), status: 400, field: 'hostDirs' });
  add({ what: 'startup_script as a string', method: 'POST', path: '/v1/vms', body: vm({ startup_script: 'echo hi' }), status: 400, field: 'startup_script' });
  add({ what: 'negative resource amount', method: 'POST', path: '/v1/vms', body: vm({ resources: { 'org.cirruslabs.tart-vms': -1 } }), status: 400, field: 'resources' });
  add({ what: 'an unknown os', method: 'POST', path: '/v1/vms', body: vm({ os: 'windows' }), status: 400, field: 'os' });
  add({ what: 'an unknown powerState', method: 'POST', path: '/v1/vms', body: vm({ powerState: 'paused' }), status: 400, field: 'powerState' });
  add({ what: 'an unknown restart_policy', method: 'POST', path: '/v1/vms', body: vm({ restart_policy: 'Always' }), status: 400, field: 'restart_policy' });
  add({ what: 'an unknown status', method: 'POST', path: '/v1/vms', body: vm({ status: 'exploded' }), status: 400, field: 'status' });
  add({ what: 'no image', method: 'POST', path: '/v1/vms', body: { name: 'new-vm' }, status: 400, field: 'image' });
  add({ what: 'no name', method: 'POST', path: '/v1/vms', body: { image: IMAGE }, status: 400, field: 'name' });
  add({ what: 'cpu as a string on PUT', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', cpu: '8' }, status: 400, field: 'cpu' });
  add({ what: 'worker resources as strings', method: 'POST', path: '/v1/workers', body: { name: 'w2', resources: { 'org.cirruslabs.tart-vms': '2' } }, status: 400, field: 'resources' });
  add({ what: 'scheduling_paused as a string', method: 'PUT', path: '/v1/workers/w1', body: { name: 'w1', scheduling_paused: 'true' }, status: 400, field: 'scheduling_paused' });
  add({ what: 'roles as a string', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', roles: 'admin:read' }, status: 400, field: 'roles' });
  // (No roles at all is upstream's way of saying none: test/conformance.)
  add({ what: 'roles not a list', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', roles: 'compute:read' }, status: 400, field: 'roles' });
  add({ what: 'an empty token', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', token: '', roles: [] }, status: 400, field: 'token' });
  add({ what: 'a duplicated role', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', roles: ['admin:read', 'admin:read'] }, status: 400, field: 'roles' });
  add({ what: 'event timestamp as a string', method: 'POST', path: '/v1/vms/base-vm/events', body: [{ kind: 'log_line', timestamp: 'now', payload: 'x' }], status: 400, field: 'timestamp' });
  add({ what: 'event timestamp 1e400 (Infinity)', method: 'POST', path: '/v1/vms/base-vm/events', raw: '[{"kind":"log_line","timestamp":1e400,"payload":"x"}]', status: 400, field: 'timestamp' });
  // (An event without a payload, kind or timestamp is upstream's empty one: test/conformance.)
  add({ what: 'event payload as a number', method: 'POST', path: '/v1/vms/base-vm/events', body: [{ kind: 'log_line', timestamp: 1, payload: 7 }], status: 400, field: 'payload' });
  add({ what: 'a bad second event', method: 'POST', path: '/v1/vms/base-vm/events', body: [{ kind: 'log_line', timestamp: 1, payload: 'ok' }, { kind: 5, timestamp: 1, payload: 'x' }], status: 400, field: '[1].kind' });
  add({ what: 'state: unknown status', method: 'PUT', path: '/v1/vms/base-vm/state', body: { status: 'exploded' }, status: 400, field: 'status' });
  add({ what: 'state: negative observedGeneration', method: 'PUT', path: '/v1/vms/base-vm/state', body: { observedGeneration: -1 }, status: 400, field: 'observedGeneration' });
  add({ what: 'state: observedGeneration 1e400 (Infinity)', method: 'PUT', path: '/v1/vms/base-vm/state', raw: '{"observedGeneration":1e400}', status: 400, field: 'observedGeneration' });
  add({ what: 'state: an unknown condition type', method: 'PUT', path: '/v1/vms/base-vm/state', body: { conditions: [{ type: 'exploding', state: 'true' }] }, status: 400, field: 'conditions[0].type' });
  add({ what: 'state: a boolean condition state', method: 'PUT', path: '/v1/vms/base-vm/state', body: { conditions: [{ type: 'running', state: true }] }, status: 400, field: 'conditions[0].state' });

  // -- names with characters upstream does not take, too long, or path segments ------------------
  for (const [what, name] of [...BAD_NAMES, ['empty', ''] as [string, string]]) {
    add({ what: `VM name: ${what}`, method: 'POST', path: '/v1/vms', body: { name, image: IMAGE }, status: 400, field: 'name' });
    add({ what: `worker name: ${what}`, method: 'POST', path: '/v1/workers', body: { name }, status: 400, field: 'name' });
    add({ what: `service account name: ${what}`, method: 'POST', path: '/v1/service-accounts', body: { name, roles: [] }, status: 400, field: 'name' });
  }
  // ("." and ".." cannot be a name in a URL: clients resolve them as path segments; they are refused in bodies above.)
  for (const [what, name] of BAD_NAMES.filter(([, n]) => !/^\.{1,2}$/.test(n))) {
    const n = encodeURIComponent(name);
    for (const [method, path, body] of [
      ['GET', `/v1/vms/${n}`],
      ['PUT', `/v1/vms/${n}`, { name, image: IMAGE }],
      ['DELETE', `/v1/vms/${n}`],
      ['PUT', `/v1/vms/${n}/state`, { status: 'running' }],
      ['GET', `/v1/vms/${n}/events`],
      ['POST', `/v1/vms/${n}/events`, []],
      ['GET', `/v1/workers/${n}`],
      ['PUT', `/v1/workers/${n}`, { name }],
      ['DELETE', `/v1/workers/${n}`],
      ['GET', `/v1/service-accounts/${n}`],
      ['PUT', `/v1/service-accounts/${n}`, { name, roles: [] }],
      ['DELETE', `/v1/service-accounts/${n}`],
    ] as [string, string, unknown?][]) {
      add({ what: `name in the URL: ${what}`, method, path, body, status: 400, field: 'params.name' });
    }
  }
  add({ what: 'a slash in the URL name', method: 'GET', path: '/v1/vms/a%2Fb', status: 400, field: 'params.name' });
  // An empty name leaves no name segment: that is another route, or none.
  add({ what: 'empty name in the URL', method: 'DELETE', path: '/v1/vms/', status: 404, field: '/v1/vms' });
  add({ what: 'empty name in the URL', method: 'PUT', path: '/v1/workers/', body: { name: 'w1' }, status: 404, field: '/v1/workers' });
  add({ what: 'empty name in the URL', method: 'DELETE', path: '/v1/service-accounts/', status: 404, field: '/v1/service-accounts' });
  add({ what: 'empty name in the URL', method: 'GET', path: '/v1/vms//events', status: 400, field: 'params.name' });

  // -- numbers out of range -------------------------------------------------------------------
  for (const [field, value] of [
    ['cpu', 0],
    ['cpu', -1],
    ['cpu', 100000],
    ['cpu', 2.5],
    ['cpu', 2 ** 53],
    ['memory', 0],
    ['memory', -5],
    ['memory', 10 ** 12],
    ['diskSize', -1],
    ['diskSize', 10 ** 9],
  ] as [string, number][]) {
    add({ what: `${field} ${value}`, method: 'POST', path: '/v1/vms', body: vm({ [field]: value }), status: 400, field });
    add({ what: `${field} ${value} on PUT`, method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', [field]: value }, status: 400, field });
  }
  add({ what: 'cpu 1e400 (Infinity)', method: 'POST', path: '/v1/vms', raw: `{"name":"new-vm","image":"x","cpu":1e400}`, status: 400, field: 'cpu' });
  add({ what: 'worker defaultCPU 100000', method: 'POST', path: '/v1/workers', body: { name: 'w2', defaultCPU: 100000 }, status: 400, field: 'defaultCPU' });
  add({ what: 'worker resources 2^50', method: 'POST', path: '/v1/workers', body: { name: 'w2', resources: { 'org.cirruslabs.logical-cores': 2 ** 50 } }, status: 400, field: 'resources' });

  // -- conflicts and unknown names ----------------------------------------------------------------
  add({ what: 'duplicate VM name', method: 'POST', path: '/v1/vms', body: { name: 'base-vm', image: IMAGE }, status: 409, field: 'base-vm' });
  add({ what: 'duplicate service account name', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa1', roles: [] }, status: 409, field: 'sa1' });
  add({ what: 'taking over bootstrap-admin', method: 'POST', path: '/v1/service-accounts', body: { name: 'bootstrap-admin', token: 'mine', roles: [] }, status: 409, field: 'bootstrap-admin' });
  add({ what: 'a worker name held by another machine', method: 'POST', path: '/v1/workers', body: { name: 'w1', machine_id: 'machine-2' }, status: 409, field: 'w1' });
  add({ what: 'heartbeat from another machine', method: 'PUT', path: '/v1/workers/w1', body: { name: 'w1', machine_id: 'machine-2' }, status: 409, field: 'w1' });
  for (const [method, path, body] of [
    ['GET', '/v1/vms/no-such-vm'],
    ['PUT', '/v1/vms/no-such-vm', { name: 'no-such-vm', image: IMAGE }],
    ['DELETE', '/v1/vms/no-such-vm'],
    ['PUT', '/v1/vms/no-such-vm/state', { status: 'running' }],
    ['GET', '/v1/vms/no-such-vm/events'],
    ['POST', '/v1/vms/no-such-vm/events', [{ kind: 'log_line', timestamp: 1, payload: 'x' }]],
    ['GET', '/v1/workers/no-such-vm'],
    ['PUT', '/v1/workers/no-such-vm', { name: 'no-such-vm' }],
    ['DELETE', '/v1/workers/no-such-vm'],
    ['GET', '/v1/service-accounts/no-such-vm'],
    ['PUT', '/v1/service-accounts/no-such-vm', { name: 'no-such-vm', roles: [] }],
    ['DELETE', '/v1/service-accounts/no-such-vm'],
  ] as [string, string, unknown?][]) {
    add({ what: 'unknown name', method, path, body, status: 404, field: 'no-such-vm' });
  }

  // -- PUT rules ----------------------------------------------------------------------------------
  add({ what: 'changing os', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', os: 'linux' }, status: 400, field: 'os' });
  add({ what: 'changing arch', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', arch: 'amd64' }, status: 400, field: 'arch' });
  add({ what: 'changing runtime', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', runtime: 'qemu' }, status: 400, field: 'runtime' });
  add({ what: 'changing runtime with a valid cpu change', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', cpu: 2, runtime: 'vetu' }, status: 400, field: 'runtime' });
  add({ what: 'VM body name differs from the URL', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'other-vm', cpu: 2 }, status: 400, field: 'name' });
  add({ what: 'worker body name differs from the URL', method: 'PUT', path: '/v1/workers/w1', body: { name: 'w9' }, status: 400, field: 'name' });
  add({ what: 'service account body name differs from the URL', method: 'PUT', path: '/v1/service-accounts/sa1', body: { name: 'sa9', roles: [] }, status: 400, field: 'name' });

  // -- query parameters ---------------------------------------------------------------------------
  add({ what: 'filter=foo', method: 'GET', path: '/v1/vms?filter=foo', status: 400, field: 'filter' });
  add({ what: 'filter=name=x', method: 'GET', path: '/v1/vms?filter=name%3Dx', status: 400, field: 'filter' });
  add({ what: 'watch=maybe', method: 'GET', path: '/v1/vms?watch=maybe', status: 400, field: 'watch' });
  add({ what: 'watch=maybe on one VM', method: 'GET', path: '/v1/vms/base-vm?watch=maybe', status: 400, field: 'watch' });
  for (const [query, field] of [
    ['limit=0', 'limit'],
    ['limit=-1', 'limit'],
    ['limit=abc', 'limit'],
    ['limit=1.5', 'limit'],
    ['limit=1000000', 'limit'],
    ['order=sideways', 'order'],
    ['cursor=xyz', 'cursor'],
    ['cursor=-1', 'cursor'],
    ['cursor=99999999999999999999', 'cursor'],
  ]) {
    add({ what: `events ${query}`, method: 'GET', path: `/v1/vms/base-vm/events?${query}`, status: 400, field });
  }

  // -- roles, scheduler profile, hostDirs -----------------------------------------------------------
  add({ what: 'an unknown role', method: 'POST', path: '/v1/service-accounts', body: { name: 'sa2', roles: ['compute:read', 'compute:admin'] }, status: 400, field: 'roles[1]' });
  add({ what: 'an unknown role on PUT', method: 'PUT', path: '/v1/service-accounts/sa1', body: { name: 'sa1', roles: ['root'] }, status: 400, field: 'roles[0]' });
  add({ what: 'a bad scheduler profile', method: 'PUT', path: '/v1/cluster-settings', body: { schedulerProfile: 'random' }, status: 400, field: 'schedulerProfile' });
  add({ what: 'an empty hostDirPolicies pathPrefix', method: 'PUT', path: '/v1/cluster-settings', body: { hostDirPolicies: [{ pathPrefix: '' }] }, status: 400, field: 'hostDirPolicies[0].pathPrefix' });
  add({ what: 'a hostDir outside every policy', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'etc', path: '/etc' }] }), status: 400, field: 'hostDirs[0].path' });
  add({ what: 'a hostDir beside a policy prefix', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'd', path: '/srv/shared-evil', ro: true }] }), status: 400, field: 'hostDirs[0].path' });
  add({ what: 'a hostDir climbing out with ..', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'd', path: '/data/../etc' }] }), status: 400, field: 'hostDirs[0].path' });
  add({ what: 'a hostDir ending in ..', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'd', path: '/srv/shared/x/..', ro: true }] }), status: 400, field: 'hostDirs[0].path' });
  add({ what: 'a read-write hostDir under a read-only policy', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'd', path: '/srv/shared/src' }] }), status: 400, field: 'hostDirs[0].ro' });
  add({ what: 'the second hostDir not allowed', method: 'POST', path: '/v1/vms', body: vm({ hostDirs: [{ name: 'a', path: '/data/a' }, { name: 'b', path: '/home' }] }), status: 400, field: 'hostDirs[1].path' });
  add({ what: 'a hostDir not allowed, added by PUT', method: 'PUT', path: '/v1/vms/base-vm', body: { name: 'base-vm', hostDirs: [{ name: 'etc', path: '/etc' }] }, status: 400, field: 'hostDirs[0].path' });

  const seen = new Map<string, number>();
  for (const c of cases) {
    // Unique test names, so a failure points at one case.
    const base = `${c.status} ${c.what}: ${c.method} ${c.path.length > 80 ? c.path.slice(0, 80) + '…' : c.path}`;
    const n = (seen.get(base) ?? 0) + 1;
    seen.set(base, n);
    test(n > 1 ? `${base} (#${n})` : base, async () => {
      const res = await call(c.method, c.path, c.body, { raw: c.raw, contentType: c.contentType });
      assert.equal(res.status, c.status, `expected ${c.status}, got ${res.status}: ${res.body.slice(0, 300)}`);
      assert.match(String(res.headers['content-type']), /^application\/json/, 'the error is not JSON');
      const message = (res.json as { message?: unknown } | undefined)?.message;
      assert.equal(typeof message, 'string', `no {"message"} in ${res.body.slice(0, 300)}`);
      assert.ok((message as string).includes(c.field), `the message does not name ${JSON.stringify(c.field)}: ${message}`);
      if (process.env.ORCHARD_TEST_SHOW_MESSAGES) console.log(`${res.status} ${c.what}: ${message}`);
    });
  }

  // -- what must work --------------------------------------------------------------------------
  test('a VM as an upstream Go client sends it (zero times, empty state) is accepted; state is the controller’s', async () => {
    const zero = '0001-01-01T00:00:00Z';
    const body = {
      name: 'go-client-vm',
      createdAt: zero,
      uid: '',
      generation: 0,
      image: IMAGE,
      imagePullPolicy: 'IfNotPresent',
      cpu: 4,
      memory: 8192,
      'net-softnet': false,
      'net-bridged': '',
      headless: true,
      status: '',
      status_message: '',
      worker: '',
      username: 'admin',
      password: 'admin',
      startup_script: null,
      restart_policy: 'Never',
      restarted_at: zero,
      restart_count: 0,
      scheduled_at: zero,
      started_at: zero,
      assignedCPU: 0,
      assignedMemory: 0,
      observedGeneration: 0,
      resources: {},
      labels: {},
    };
    const created = (await ok('POST', '/v1/vms', body)) as VM;
    expected.vms.add('go-client-vm');
    assert.equal(created.status, 'pending');
    assert.notEqual(created.createdAt, zero);
    assert.ok(created.uid && created.uid.length > 0);
    assert.equal(created.generation, 0);
    for (const field of ['restarted_at', 'scheduled_at', 'started_at', 'worker'] as const) {
      assert.ok(created[field] === undefined || (created[field] !== zero && created[field] !== ''), `${field} came from the client: ${created[field]}`);
    }
    // A client also sends the VM it got back (all fields set): nothing changes.
    const same = (await ok('PUT', '/v1/vms/go-client-vm', { ...created, ...{ restarted_at: zero, status: '' } })) as VM;
    // (status_message is the scheduler's, which may have explained the pending state meanwhile)
    assert.deepEqual({ ...same, status_message: undefined }, { ...created, status_message: undefined });
  });

  test('PUT with a changed cpu bumps generation by one; an identical PUT does not', async () => {
    const before = (await ok('GET', '/v1/vms/base-vm')) as VM;
    const g = before.generation ?? 0;
    const changed = (await ok('PUT', '/v1/vms/base-vm', { ...before, cpu: (before.cpu ?? 4) + 1 })) as VM;
    assert.equal(changed.generation, g + 1);
    assert.equal(changed.cpu, (before.cpu ?? 4) + 1);
    const again = (await ok('PUT', '/v1/vms/base-vm', changed)) as VM;
    assert.equal(again.generation, g + 1);
    assert.deepEqual(again, changed);
    const partial = (await ok('PUT', '/v1/vms/base-vm', { name: 'base-vm', cpu: changed.cpu })) as VM;
    assert.equal(partial.generation, g + 1);
    baseVM = partial;
  });

  test('valid odd-looking requests work', async () => {
    const charset = await call('POST', '/v1/vms', { name: 'charset-vm', image: IMAGE }, { contentType: 'application/json; charset=utf-8' });
    assert.equal(charset.status, 200, charset.body);
    expected.vms.add('charset-vm');
    await ok('POST', '/v1/vms', vm({ name: 'hostdir-vm', hostDirs: [{ name: 'src', path: '/srv/shared/src', ro: true }, { name: 'data', path: '/data/cache' }, { name: 'top', path: '/srv/shared', ro: true }] }));
    expected.vms.add('hostdir-vm');
    // Same name again from the same machine: re-registration, not a conflict.
    await ok('POST', '/v1/workers', { name: 'w1', machine_id: 'machine-1' });
    await ok('GET', '/v1/vms/base-vm/events?limit=10&order=desc&cursor=5');
    await ok('GET', '/v1/vms?filter=worker%3Dw1');
  });

  test('the controller still answers and nothing was half-stored', async () => {
    const info = (await ok('GET', '/v1/controller/info')) as { version: string };
    assert.equal(typeof info.version, 'string');
    const names = async (path: string) => new Set(((await ok('GET', path)) as { name: string }[]).map((o) => o.name));
    assert.deepEqual(await names('/v1/vms'), expected.vms);
    assert.deepEqual(await names('/v1/workers'), expected.workers);
    assert.deepEqual(await names('/v1/service-accounts'), expected.serviceAccounts);
    // The VM every bad PUT and state report aimed at is exactly as the valid requests left it.
    const now = (await ok('GET', '/v1/vms/base-vm')) as VM;
    assert.deepEqual(now, baseVM);
    assert.deepEqual((await ok('GET', '/v1/vms/base-vm/events')) as unknown[], []);
    const sa1 = (await ok('GET', '/v1/service-accounts/sa1')) as { roles: string[] };
    assert.deepEqual(sa1.roles, ['compute:read']);
    const w1 = (await ok('GET', '/v1/workers/w1')) as { machine_id?: string; scheduling_paused?: boolean };
    assert.equal(w1.machine_id, 'machine-1');
    assert.equal(w1.scheduling_paused, false);
    const settings = (await ok('GET', '/v1/cluster-settings')) as { hostDirPolicies: unknown[]; schedulerProfile: string };
    assert.deepEqual(settings, { hostDirPolicies: [{ pathPrefix: '/srv/shared', ro: true }, { pathPrefix: '/data/' }], schedulerProfile: 'optimize-utilization' });
  });
});
