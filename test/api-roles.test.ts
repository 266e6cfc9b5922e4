// The role × endpoint matrix: every implemented endpoint, called by an account with each single
// role, with no role, with every role, and without valid credentials. Allowed calls must really
// succeed (fixtures are created for them), refused ones must be 403 naming the needed role(s), and
// unauthenticated ones 401 — all with JSON bodies. Also: tokens never reach the controller's log.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { pino } from 'pino';
import { ROLES, type Role } from '../src/api/schemas.ts';
import { startController } from '../src/controller/controller.ts';
import { ADMIN_TOKEN, inProcessController, rawRequest, tempDir, waitFor } from './helpers.ts';

type Ctl = { url: string; certificate?: string };
interface Response {
  status: number;
  body: string;
  json: unknown;
  headers: Record<string, string | string[] | undefined>;
}

const basic = (name: string, token: string) => 'Basic ' + Buffer.from(`${name}:${token}`).toString('base64');

/** One HTTPS request with exactly the Authorization header given (or none). */
const send = (ctl: Ctl, method: string, path: string, authorization?: string, body?: unknown): Promise<Response> =>
  rawRequest(ctl, method, path, { authorization, body: body === undefined ? undefined : JSON.stringify(body) });

const messageOf = (res: Response) => {
  assert.equal(typeof res.json, 'object', `expected a JSON body, got ${JSON.stringify(res.body.slice(0, 200))}`);
  const message = (res.json as { message?: unknown }).message;
  assert.equal(typeof message, 'string', `expected {"message": string}, got ${res.body.slice(0, 200)}`);
  return message as string;
};

let seq = 0;
const uniq = (prefix: string) => `${prefix}-${++seq}`;

describe('role × endpoint matrix', () => {
  let h: Awaited<ReturnType<typeof inProcessController>>;
  const adminAuth = basic('bootstrap-admin', ADMIN_TOKEN);

  /** Calls as bootstrap-admin and insists on 200 (fixture setup). */
  async function admin(method: string, path: string, body?: unknown): Promise<unknown> {
    const res = await send(h.ctl, method, path, adminAuth, body);
    assert.equal(res.status, 200, `fixture ${method} ${path}: ${res.status} ${res.body}`);
    return res.json;
  }
  const freshVM = async () => ((await admin('POST', '/v1/vms', { name: uniq('vm'), image: 'ghcr.io/cirruslabs/macos:latest' })) as { name: string }).name;
  const freshWorker = async () => ((await admin('POST', '/v1/workers', { name: uniq('worker') })) as { name: string }).name;
  const freshRegistry = async () => ((await admin('POST', '/v1/registries', { host: `${uniq('reg')}.example.com`, username: 'u', password: REGISTRY_PASSWORD })) as { host: string }).host;
  const freshSA = async () => ((await admin('POST', '/v1/service-accounts', { name: uniq('sa'), roles: [] })) as { name: string }).name;

  // Long-lived fixtures for the read and update calls.
  const VM = 'matrix-vm';
  const WORKER = 'matrix-worker';
  const SA = 'matrix-sa';
  const REGISTRY = 'registry.matrix.example:5000';
  const REGISTRY_PASSWORD = 'matrix-registry-password-3f9a';

  type Needs = readonly Role[] | 'any';
  interface Endpoint {
    route: string;
    needs: Needs;
    /** Prepares what the call needs and returns its path and body. */
    req: () => Promise<{ path: string; body?: unknown }>;
    /** Checks the body of a successful call. */
    check?: (res: Response) => void;
    /** A worker-side call about VM: besides the role, the caller must be the account of the VM's worker. */
    asWorker?: boolean;
  }
  const ANY = 'any' as const;
  const R = ['compute:read'] as const;
  const W = ['compute:write'] as const;
  const AR = ['admin:read'] as const;
  const AW = ['admin:write'] as const;
  const isArray = (res: Response) => assert.ok(Array.isArray(res.json), res.body.slice(0, 200));
  const noPassword = (res: Response) => assert.ok(!res.body.includes(REGISTRY_PASSWORD) && !res.body.includes('"password"'), `a registry password in ${res.body.slice(0, 300)}`);

  // One line per endpoint.
  const endpoints: Endpoint[] = [
    { route: 'GET /v1/controller/info', needs: ANY, req: async () => ({ path: '/v1/controller/info' }), check: (r) => assert.equal(typeof (r.json as { version: unknown }).version, 'string') },
    { route: 'GET /v1/cluster-settings', needs: AR, req: async () => ({ path: '/v1/cluster-settings' }) },
    { route: 'PUT /v1/cluster-settings', needs: AW, req: async () => ({ path: '/v1/cluster-settings', body: { schedulerProfile: 'optimize-utilization' } }) },
    { route: 'POST /v1/service-accounts', needs: AW, req: async () => ({ path: '/v1/service-accounts', body: { name: uniq('sa'), roles: ['compute:read'] } }) },
    { route: 'GET /v1/service-accounts', needs: AR, req: async () => ({ path: '/v1/service-accounts' }), check: isArray },
    { route: 'GET /v1/service-accounts/{name}', needs: AR, req: async () => ({ path: `/v1/service-accounts/${SA}` }) },
    { route: 'PUT /v1/service-accounts/{name}', needs: AW, req: async () => ({ path: `/v1/service-accounts/${SA}`, body: { name: SA, roles: ['compute:read'] } }) },
    { route: 'DELETE /v1/service-accounts/{name}', needs: AW, req: async () => ({ path: `/v1/service-accounts/${await freshSA()}` }) },
    { route: 'POST /v1/workers', needs: W, req: async () => ({ path: '/v1/workers', body: { name: uniq('worker') } }) },
    { route: 'GET /v1/workers', needs: R, req: async () => ({ path: '/v1/workers' }), check: isArray },
    { route: 'GET /v1/workers/{name}', needs: R, req: async () => ({ path: `/v1/workers/${WORKER}` }) },
    { route: 'PUT /v1/workers/{name}', needs: W, req: async () => ({ path: `/v1/workers/${WORKER}`, body: { name: WORKER, scheduling_paused: false } }) },
    { route: 'DELETE /v1/workers/{name}', needs: W, req: async () => ({ path: `/v1/workers/${await freshWorker()}` }) },
    { route: 'POST /v1/vms', needs: W, req: async () => ({ path: '/v1/vms', body: { name: uniq('vm'), image: 'ghcr.io/cirruslabs/macos:latest' } }) },
    { route: 'GET /v1/vms', needs: R, req: async () => ({ path: '/v1/vms' }), check: isArray },
    { route: 'GET /v1/vms/{name}', needs: R, req: async () => ({ path: `/v1/vms/${VM}` }), check: (r) => assert.equal((r.json as { name: unknown }).name, VM) },
    { route: 'PUT /v1/vms/{name}', needs: W, req: async () => ({ path: `/v1/vms/${VM}`, body: { name: VM, cpu: 1 + (++seq % 8) } }) },
    { route: 'DELETE /v1/vms/{name}', needs: W, req: async () => ({ path: `/v1/vms/${await freshVM()}` }) },
    { route: 'PUT /v1/vms/{name}/state', needs: W, asWorker: true, req: async () => ({ path: `/v1/vms/${VM}/state`, body: { status: 'pending', status_message: uniq('msg') } }) },
    { route: 'GET /v1/vms/{name}/events', needs: R, req: async () => ({ path: `/v1/vms/${VM}/events` }), check: isArray },
    { route: 'POST /v1/vms/{name}/events', needs: W, asWorker: true, req: async () => ({ path: `/v1/vms/${VM}/events`, body: [{ kind: 'log_line', timestamp: 1700000000, payload: 'hello' }] }) },
    { route: 'POST /v1/workers/{name}/images', needs: W, asWorker: true, req: async () => ({ path: `/v1/workers/${WORKER}/images`, body: { images: ['ghcr.io/cirruslabs/macos:latest'] } }) },
    { route: 'POST /v1/images/pull', needs: W, req: async () => ({ path: '/v1/images/pull', body: { image: 'ghcr.io/cirruslabs/macos:latest' } }) },
    { route: 'POST /v1/registries', needs: AW, req: async () => ({ path: '/v1/registries', body: { host: `${uniq('reg')}.example.com`, username: 'u', password: REGISTRY_PASSWORD } }), check: noPassword },
    { route: 'GET /v1/registries', needs: AR, req: async () => ({ path: '/v1/registries' }), check: (r) => (isArray(r), noPassword(r)) },
    { route: 'GET /v1/registries/{host}', needs: AR, req: async () => ({ path: `/v1/registries/${REGISTRY}` }), check: noPassword },
    { route: 'PUT /v1/registries/{host}', needs: AW, req: async () => ({ path: `/v1/registries/${REGISTRY}`, body: { host: REGISTRY, username: uniq('user') } }), check: noPassword },
    { route: 'DELETE /v1/registries/{host}', needs: AW, req: async () => ({ path: `/v1/registries/${await freshRegistry()}` }), check: noPassword },
    { route: 'GET /metrics', needs: AR, req: async () => ({ path: '/metrics' }), check: (r) => assert.match(r.body, /^# (HELP|TYPE) /m) },
    { route: 'GET /v1/openapi.json', needs: ANY, req: async () => ({ path: '/v1/openapi.json' }), check: (r) => assert.ok((r.json as { paths?: unknown }).paths) },
    { route: 'GET /v1/openapi.yaml', needs: ANY, req: async () => ({ path: '/v1/openapi.yaml' }), check: (r) => assert.match(r.body, /^openapi: /m) },
  ];

  // Who calls: one account per role, one with none, one with all (bootstrap-admin).
  interface Caller {
    label: string;
    roles: readonly Role[];
    token: string;
    name: string;
  }
  const callers: Caller[] = [
    ...ROLES.map((role) => ({ label: role, roles: [role], name: `role-${role.replace(':', '-')}`, token: `token-of-${role}-${Math.random().toString(36).slice(2)}` })),
    { label: 'no roles', roles: [], name: 'role-none', token: `token-of-nobody-${Math.random().toString(36).slice(2)}` },
    { label: 'every role', roles: [...ROLES], name: 'bootstrap-admin', token: ADMIN_TOKEN },
  ];
  const readerToken = callers[0].token;
  // Credentials that must all be refused with 401.
  const unauthenticated: { label: string; authorization?: string }[] = [
    { label: 'no credentials' },
    { label: 'wrong token', authorization: basic(callers[0].name, 'not-the-token') },
    { label: 'token of another account', authorization: basic(callers[0].name, callers[1].token) },
    { label: 'empty token', authorization: basic(callers[0].name, '') },
    { label: 'unknown account', authorization: basic('no-such-account', readerToken) },
    { label: 'malformed: Bearer scheme', authorization: `Bearer ${readerToken}` },
    { label: 'malformed: "Basic" alone', authorization: 'Basic' },
    { label: 'malformed: not base64', authorization: 'Basic !!!not-base64***' },
    { label: 'malformed: no colon', authorization: 'Basic ' + Buffer.from(callers[0].name + readerToken).toString('base64') },
    { label: 'malformed: empty header', authorization: '' },
  ];

  before(async () => {
    // ~100 wrong credentials from one address: the back-off would answer 429 (test/security covers it).
    h = await inProcessController({ authBackoff: false });
    for (const c of callers) if (c.name !== 'bootstrap-admin') await admin('POST', '/v1/service-accounts', { name: c.name, token: c.token, roles: c.roles });
    await admin('POST', '/v1/vms', { name: VM, image: 'ghcr.io/cirruslabs/macos:latest' });
    // The VM runs on a worker registered by the compute:write account: only it reports the VM's state.
    const writer = callers.find((c) => c.label === 'compute:write')!;
    const registered = await send(h.ctl, 'POST', '/v1/workers', basic(writer.name, writer.token), { name: WORKER, resources: { 'org.cirruslabs.tart-vms': 1 } });
    assert.equal(registered.status, 200, registered.body);
    await waitFor('the fixture VM placed', async () => ((await admin('GET', `/v1/vms/${VM}`)) as { worker?: string }).worker === WORKER || undefined);
    await admin('POST', '/v1/service-accounts', { name: SA, roles: [] });
    await admin('POST', '/v1/registries', { host: REGISTRY, username: 'u', password: REGISTRY_PASSWORD });
  });
  after(async () => {
    await h?.close();
    h?.cleanup();
  });

  for (const ep of endpoints) {
    const [method] = ep.route.split(' ');
    test(ep.route, async () => {
      for (const caller of callers) {
        const allowed = ep.needs === ANY || ep.needs.some((r) => caller.roles.includes(r));
        const notTheWorker = allowed && ep.asWorker && caller.label !== 'compute:write';
        const { path, body } = await ep.req();
        const res = await send(h.ctl, method, path, basic(caller.name, caller.token), body);
        const who = `${ep.route} as ${caller.label}`;
        if (notTheWorker) {
          assert.equal(res.status, 403, `${who}: expected 403 (not the VM's worker), got ${res.status} ${res.body.slice(0, 300)}`);
          assert.match(messageOf(res), /worker "matrix-worker" belongs to service account "role-compute-write"/, who);
        } else if (allowed) {
          assert.equal(res.status, 200, `${who}: expected 200, got ${res.status} ${res.body.slice(0, 300)}`);
          ep.check?.(res);
        } else {
          assert.equal(res.status, 403, `${who}: expected 403, got ${res.status} ${res.body.slice(0, 300)}`);
          const message = messageOf(res);
          for (const role of ep.needs as readonly Role[]) assert.ok(message.includes(role), `${who}: 403 message does not name ${role}: ${message}`);
        }
      }
      for (const u of unauthenticated) {
        const { path, body } = await ep.req();
        const res = await send(h.ctl, method, path, u.authorization, body);
        assert.equal(res.status, 401, `${ep.route} with ${u.label}: expected 401, got ${res.status} ${res.body.slice(0, 300)}`);
        assert.match(String(res.headers['content-type']), /^application\/json/, `${ep.route} with ${u.label}: 401 is not JSON`);
        assert.ok(messageOf(res).length > 0);
      }
    });
  }

  test('refused calls change nothing', async () => {
    // A reader cannot delete, a writer cannot touch service accounts; the fixtures are still there.
    const reader = callers.find((c) => c.label === 'compute:read')!;
    const writer = callers.find((c) => c.label === 'compute:write')!;
    assert.equal((await send(h.ctl, 'DELETE', `/v1/vms/${VM}`, basic(reader.name, reader.token))).status, 403);
    assert.equal((await send(h.ctl, 'DELETE', `/v1/service-accounts/${SA}`, basic(writer.name, writer.token))).status, 403);
    assert.equal((await send(h.ctl, 'PUT', `/v1/service-accounts/${writer.name}`, basic(writer.name, writer.token), { name: writer.name, roles: [...ROLES] })).status, 403);
    assert.equal((await send(h.ctl, 'DELETE', `/v1/vms/${VM}`, `Bearer ${ADMIN_TOKEN}`)).status, 401);
    await admin('GET', `/v1/vms/${VM}`);
    await admin('GET', `/v1/service-accounts/${SA}`);
    const w = (await admin('GET', `/v1/service-accounts/${writer.name}`)) as { roles: string[] };
    assert.deepEqual(w.roles, ['compute:write']);
  });

  test('a 401 is a JSON error body', async () => {
    const res = await send(h.ctl, 'GET', '/v1/vms');
    assert.equal(res.status, 401);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    assert.deepEqual(Object.keys(res.json as object), ['message']);
    assert.match(messageOf(res), /auth/i);
  });
});

describe('tokens stay out of the log', () => {
  test('authenticated, refused and failed requests log no token', async () => {
    let log = '';
    const dataDir = tempDir();
    const adminToken = `admin-secret-${Math.random().toString(36).slice(2)}`;
    const userToken = `user-secret-${Math.random().toString(36).slice(2)}`;
    const ctl = await startController({
      dataDir,
      listen: '127.0.0.1:0',
      bootstrapAdminToken: adminToken,
      logger: pino({ level: 'debug' }, { write: (s: string) => void (log += s) }),
    });
    try {
      const asAdmin = basic('bootstrap-admin', adminToken);
      const asUser = basic('log-user', userToken);
      assert.equal((await send(ctl, 'GET', '/v1/controller/info', asAdmin)).status, 200);
      assert.equal((await send(ctl, 'POST', '/v1/service-accounts', asAdmin, { name: 'log-user', token: userToken, roles: ['compute:read'] })).status, 200);
      assert.equal((await send(ctl, 'GET', '/v1/service-accounts', asAdmin)).status, 200);
      assert.equal((await send(ctl, 'GET', '/v1/service-accounts/log-user', asAdmin)).status, 200);
      assert.equal((await send(ctl, 'GET', '/v1/vms', asUser)).status, 200);
      assert.equal((await send(ctl, 'POST', '/v1/vms', asUser, { name: 'x', image: 'y' })).status, 403);
      assert.equal((await send(ctl, 'GET', '/v1/vms', basic('log-user', adminToken))).status, 401);
      assert.equal((await send(ctl, 'GET', '/v1/vms', basic('nobody', userToken))).status, 401);
      assert.equal((await send(ctl, 'GET', '/v1/vms', `Bearer ${userToken}`)).status, 401);
      assert.equal((await send(ctl, 'POST', '/v1/service-accounts', asAdmin, { name: 'bad name', token: userToken, roles: [] })).status, 400);
      assert.equal((await send(ctl, 'PUT', '/v1/service-accounts/log-user', asAdmin, { name: 'log-user', token: `${userToken}-2`, roles: [] })).status, 200);
    } finally {
      await ctl.close();
      rmSync(dataDir, { recursive: true, force: true });
    }
    // Requests are logged at debug (20), one line each with the method, URL and status.
    const requests = log.split('\n').filter((l) => l.includes('"request completed"')).map((l) => JSON.parse(l) as { level: number; req: { method: string; url: string }; res: { statusCode: number } });
    assert.ok(requests.length >= 11, `the logger did not record the requests at level debug:\n${log}`);
    assert.ok(requests.every((r) => r.level === 20), 'requests are logged at debug');
    assert.ok(requests.some((r) => r.req.method === 'POST' && r.req.url === '/v1/vms' && r.res.statusCode === 403));
    for (const secret of [adminToken, userToken, `${userToken}-2`]) {
      assert.ok(!log.includes(secret), `token ${secret} appears in the log`);
      for (const name of ['bootstrap-admin', 'log-user', 'nobody']) {
        const b64 = Buffer.from(`${name}:${secret}`).toString('base64');
        assert.ok(!log.includes(b64), `Basic credentials of ${name} appear in the log`);
      }
    }
  });
});
