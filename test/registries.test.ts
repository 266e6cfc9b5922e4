// Registry credentials (Orchard addition): admins set them, the API never answers a password (not in
// answers, lists, errors, nor the OpenAPI document), the controller never logs one (its debug log of a
// run that set, changed and delivered them is searched), and workers get them in clear over their watch
// (registriesAction) only when their record declares they understand it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import type { WebSocket } from 'ws';
import { startController } from '../src/controller/controller.ts';
import { MAX_REGISTRIES } from '../src/controller/domain/registries.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, rawRequest, runCLI, tempDir, waitFor } from './helpers.ts';
import { upgrade } from './security/attack.ts';

const ADMIN: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];

/** A worker driven by hand: registered with `capabilities`, its watch open, every frame it gets kept. */
async function fakeWorker(ctl: { url: string; certificate?: string }, name: string, capabilities?: string[]) {
  const reg = await rawRequest(ctl, 'POST', '/v1/workers', { auth: ADMIN, body: JSON.stringify({ name, capabilities, resources: { 'org.cirruslabs.tart-vms': 1 } }) });
  assert.equal(reg.status, 200, reg.body);
  const up = await upgrade(ctl, `/v1/rpc/watch?workerName=${name}`, { auth: ADMIN });
  assert.equal(up.status, 101, up.body);
  const frames: string[] = [];
  const ws = up.ws as WebSocket;
  ws.on('message', (data: Buffer) => frames.push(data.toString()));
  return { ws, frames, registries: () => frames.filter((f) => f.startsWith('{"registriesAction"')).map((f) => (JSON.parse(f) as { registriesAction: { registries: { host: string; username?: string; password?: string; insecure?: boolean; ca?: string }[] } }).registriesAction.registries) };
}

test('registry credentials: the password is never answered nor logged; workers that declare registriesAction get them in clear, others never', async () => {
  let log = '';
  const dataDir = tempDir();
  const ctl = await startController({
    dataDir,
    listen: '127.0.0.1:0',
    bootstrapAdminToken: ADMIN_TOKEN,
    logger: pino({ level: 'debug' }, { write: (s: string) => void (log += s) }),
  });
  // Random-looking, so that any 6 characters of one in a row are found wherever they appear (a JSON
  // parser's message quotes part of a malformed body, say).
  const PASSWORD = 'Xk7qPz2mWv9Lr4Tn';
  const PASSWORD2 = 'Jh3sBn8cQw5Ey1Ua';
  const pieces = [PASSWORD, PASSWORD2].flatMap((p) => Array.from({ length: p.length - 5 }, (_, i) => p.slice(i, i + 6)));
  const leaked = (text: string) => pieces.find((piece) => text.includes(piece));
  /** A request whose answer must hold neither password (nor, but for the API description, a password field). */
  const call = async (method: string, path: string, body?: unknown, auth = ADMIN) => {
    const res = await rawRequest(ctl, method, path, { auth, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) });
    assert.equal(leaked(res.body), undefined, `${method} ${path} answered (part of) a password: ${res.body.slice(0, 500)}`);
    if (!path.startsWith('/v1/openapi')) assert.ok(!/"password"/.test(res.body), `${method} ${path} answered a password field: ${res.body.slice(0, 500)}`);
    return res;
  };
  const admin = clientOf(ctl, ...ADMIN);
  try {
    // A worker that declared it understands registriesAction, and one (as upstream's) that did not.
    const ours = await fakeWorker(ctl, 'ours', ['registriesAction', 'pullImageAction']);
    const theirs = await fakeWorker(ctl, 'theirs');
    await waitFor('both watches synced', () => ours.frames.some((f) => f.startsWith('{"syncVMsAction"')) && theirs.frames.length > 0);
    assert.ok(ours.frames[0].startsWith('{"registriesAction"'), `the credentials come before the first sync: ${ours.frames[0]}`);
    assert.deepEqual(ours.registries(), [[]], 'none yet');

    // Created: answered without the password; the capable worker gets it in clear at once.
    let res = await call('POST', '/v1/registries', { host: 'Registry.Example.com:5000', username: 'puller', password: PASSWORD, ca: ctl.certificate });
    assert.equal(res.status, 200, res.body);
    assert.deepEqual({ ...(res.json as object), createdAt: undefined }, { host: 'registry.example.com:5000', username: 'puller', passwordSet: true, ca: ctl.certificate, createdAt: undefined });
    await waitFor('the worker got the credentials', () => ours.registries().length === 2);
    assert.deepEqual(ours.registries()[1], [{ host: 'registry.example.com:5000', username: 'puller', password: PASSWORD, ca: ctl.certificate }]);
    assert.equal((await call('POST', '/v1/registries', { host: 'registry.example.com:5000', username: 'x', password: PASSWORD })).status, 409);

    // Read back (list, get, any case of the host): no password.
    res = await call('GET', '/v1/registries');
    assert.deepEqual((res.json as { host: string; passwordSet: boolean }[]).map((r) => [r.host, r.passwordSet]), [['registry.example.com:5000', true]]);
    res = await call('GET', '/v1/registries/REGISTRY.example.com:5000');
    assert.equal(res.status, 200, res.body);
    assert.equal((await call('GET', '/v1/registries/nowhere.example.com')).status, 404);

    // A PUT without the password keeps it (clients never see it to send it back); a new one replaces it.
    res = await call('PUT', '/v1/registries/registry.example.com:5000', { host: 'registry.example.com:5000', username: 'puller2', insecure: true });
    assert.equal(res.status, 200, res.body);
    assert.equal((res.json as { passwordSet: boolean }).passwordSet, true);
    await waitFor('the change delivered', () => ours.registries().length === 3);
    assert.deepEqual(ours.registries()[2], [{ host: 'registry.example.com:5000', username: 'puller2', password: PASSWORD, insecure: true }]);
    res = await call('PUT', '/v1/registries/registry.example.com:5000', { host: 'registry.example.com:5000', username: 'puller2', password: PASSWORD2 });
    await waitFor('the new password delivered', () => ours.registries().length === 4);
    assert.equal(ours.registries()[3][0].password, PASSWORD2);
    await call('POST', '/v1/registries', { host: 'ghcr.io' });
    await waitFor('the second registry delivered', () => ours.registries().length === 5);
    assert.deepEqual(ours.registries()[4].map((r) => r.host), ['registry.example.com:5000', 'ghcr.io']);

    // Refused bodies name the field and never echo what was sent.
    const refusals: [unknown, RegExp][] = [
      [{ host: 'https://ghcr.io', username: 'u', password: PASSWORD }, /field "host" must match/],
      [{ host: 'ghcr.io/team', username: 'u', password: PASSWORD }, /field "host"/],
      [{ host: 'ghcr.io:99999', username: 'u', password: PASSWORD }, /port 99999/],
      [{ host: 'a.example', password: PASSWORD }, /field "username" is required with a password/],
      [{ host: 'a.example', username: 'u', password: PASSWORD, ca: 'not a certificate' }, /field "ca": no PEM certificate/],
      [{ host: 'a.example', username: 'u', password: PASSWORD, ca: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n' }, /field "ca": certificate 1 of 1 is not a valid X.509 certificate/],
      [{ host: 'a.example', username: 'u', password: PASSWORD, token: PASSWORD }, /unknown field "token"/],
      [{ host: 'a.example', username: 'u', password: 12 }, /field "password"/],
      [`{"host":"a.example","username":"u","password":${PASSWORD}}`, /malformed JSON body/],
      [`{"host":"a.example","username":"u","password":"${PASSWORD}",}`, /malformed JSON body/],
    ];
    for (const [body, message] of refusals) {
      res = await call('POST', '/v1/registries', body);
      assert.equal(res.status, 400, `${JSON.stringify(body)}: ${res.body}`);
      assert.match((res.json as { message: string }).message, message);
    }
    assert.equal((await call('PUT', '/v1/registries/ghcr.io', { host: 'quay.io' })).status, 400);

    // Roles: compute:write may neither read nor set them; admin:read reads them without the password.
    await admin.createServiceAccount({ name: 'writer', token: 'writer-token', roles: ['compute:write', 'compute:read'] });
    await admin.createServiceAccount({ name: 'auditor', token: 'auditor-token', roles: ['admin:read'] });
    for (const [method, path, body] of [['GET', '/v1/registries'], ['GET', '/v1/registries/ghcr.io'], ['POST', '/v1/registries', { host: 'x.example' }], ['PUT', '/v1/registries/ghcr.io', { host: 'ghcr.io' }], ['DELETE', '/v1/registries/ghcr.io']] as const) {
      res = await call(method, path, body, ['writer', 'writer-token']);
      assert.equal(res.status, 403, `${method} ${path} as compute:write: ${res.body}`);
    }
    res = await call('GET', '/v1/registries', undefined, ['auditor', 'auditor-token']);
    assert.equal(res.status, 200);
    assert.equal((res.json as unknown[]).length, 2);
    assert.equal((await call('POST', '/v1/registries', { host: 'x.example' }, ['auditor', 'auditor-token'])).status, 403);

    // Null removes the password; deleting a registry takes it off the workers' list.
    res = await call('PUT', '/v1/registries/registry.example.com:5000', { host: 'registry.example.com:5000', password: null });
    assert.equal((res.json as { passwordSet: boolean }).passwordSet, false);
    res = await call('DELETE', '/v1/registries/ghcr.io');
    assert.equal(res.status, 200, res.body);
    await waitFor('the deletion delivered', () => ours.registries().at(-1)?.length === 1 && ours.registries().at(-1)?.[0].password === undefined);

    // The OpenAPI document describes the write-only field, with no password as an example.
    const doc = await call('GET', '/v1/openapi.json');
    assert.ok((doc.json as { paths: Record<string, unknown> }).paths['/v1/registries']);
    await call('GET', '/v1/openapi.yaml');

    // The worker that did not declare registriesAction never got one; a watch of the workers shows no credentials.
    assert.ok(theirs.frames.every((f) => !f.includes('registriesAction')), theirs.frames.join('\n'));
    for (const p of [PASSWORD, PASSWORD2]) assert.ok(!theirs.frames.some((f) => f.includes(p)));
    ours.ws.close();
    theirs.ws.close();
  } finally {
    admin.close();
    await ctl.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
  const lines = log.split('\n').filter(Boolean);
  assert.ok(lines.some((l) => l.includes('"request completed"') && l.includes('/v1/registries')), 'the run was logged at debug');
  assert.ok(lines.some((l) => l.includes('registry credentials sent')), 'the deliveries were logged');
  const piece = leaked(log);
  assert.equal(piece, undefined, `(part of) a registry password appears in the controller's log:\n${lines.filter((l) => piece && l.includes(piece)).join('\n')}`);
  for (const p of [PASSWORD, PASSWORD2]) assert.ok(!log.includes(Buffer.from(p).toString('base64')), 'a registry password appears base64-encoded in the log');
});

test('a worker that declares registriesAction while connected (it registered again) gets the credentials then', async () => {
  const dataDir = tempDir();
  const ctl = await startController({ dataDir, listen: '127.0.0.1:0', bootstrapAdminToken: ADMIN_TOKEN, logger: pino({ level: 'silent' }) });
  try {
    assert.equal((await rawRequest(ctl, 'POST', '/v1/registries', { auth: ADMIN, body: JSON.stringify({ host: 'ghcr.io', username: 'u', password: 'p-1' }) })).status, 200);
    const w = await fakeWorker(ctl, 'late');
    await waitFor('synced', () => w.frames.length > 0);
    assert.equal(w.registries().length, 0);
    const reg = await rawRequest(ctl, 'POST', '/v1/workers', { auth: ADMIN, body: JSON.stringify({ name: 'late', capabilities: ['registriesAction'] }) });
    assert.equal(reg.status, 200, reg.body);
    await waitFor('the credentials', () => w.registries().length === 1);
    assert.deepEqual(w.registries()[0], [{ host: 'ghcr.io', username: 'u', password: 'p-1' }]);
    w.ws.close();
  } finally {
    await ctl.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('the registries a cluster keeps are bounded (every worker gets them all in one frame)', async () => {
  const c = await inProcessController();
  try {
    for (let i = 0; i < MAX_REGISTRIES; i++) await c.admin.createRegistry({ host: `r${i}.example`, username: 'u', password: 'p' });
    const over = await rawRequest(c.ctl, 'POST', '/v1/registries', { auth: ADMIN, body: JSON.stringify({ host: 'one-more.example' }) });
    assert.equal(over.status, 409, over.body);
    assert.match(over.body, /there are 64 registries already .*delete one first/);
    await c.admin.deleteRegistry('r0.example');
    await c.admin.createRegistry({ host: 'one-more.example' });
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('orchard create|list|get|delete registry: the password from stdin, never printed back', async () => {
  const c = await inProcessController();
  const home = tempDir('orchard-home-');
  const env = { ORCHARD_HOME: home };
  const cli = (args: string[], input?: string) => runCLI(args, env, input);
  const PASSWORD = 'Rq8vTz3nKp6Ws1Ld';
  try {
    assert.equal((await cli(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!])).code, 0);
    const caFile = join(home, 'ca.pem');
    writeFileSync(caFile, c.ctl.certificate!);
    let r = await cli(['create', 'registry', 'registry.local:5000', '--username', 'ci', '--password-stdin', '--ca-file', caFile], PASSWORD + '\n');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'registry registry.local:5000 created (with a password)\n');
    r = await cli(['create', 'registry', 'plain.local:8080', '--insecure', '-o', 'json']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual({ ...JSON.parse(r.stdout), createdAt: undefined }, { host: 'plain.local:8080', insecure: true, passwordSet: false, createdAt: undefined });
    assert.equal((await cli(['create', 'registry', 'x.local', '--password-stdin'], 'pw\n')).code, 2, 'a password needs a user name');

    const outputs: string[] = [];
    r = await cli(['list', 'registries']);
    outputs.push(r.stdout);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^HOST\s+USERNAME\s+PASSWORD\s+INSECURE\s+CA\s+AGE$/m);
    assert.match(r.stdout, /^registry\.local:5000\s+ci\s+yes\s+no\s+yes\s+\d+s$/m);
    assert.match(r.stdout, /^plain\.local:8080\s+-\s+no\s+yes\s+no\s+\d+s$/m);
    for (const args of [['list', 'registries', '-o', 'yaml'], ['get', 'registry', 'registry.local:5000', '-o', 'json'], ['get', 'registry', 'registry.local:5000']]) {
      r = await cli(args);
      assert.equal(r.code, 0, r.stderr);
      outputs.push(r.stdout);
    }
    assert.equal((await cli(['get', 'registry', 'registry.local:5000/passwordSet'])).stdout, 'true\n');
    assert.equal((await cli(['list', 'registries', '-q'])).stdout, 'registry.local:5000\nplain.local:8080\n');
    assert.equal((await cli(['__complete', 'registries'])).stdout, 'registry.local:5000\nplain.local:8080\n');
    for (const o of outputs) assert.ok(!o.includes(PASSWORD) && !o.includes('"password"'), o);
    r = await cli(['delete', 'registry', 'plain.local:8080']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, 'registry plain.local:8080 deleted\n');
    assert.deepEqual((await c.admin.listRegistries()).map((x) => x.host), ['registry.local:5000']);
  } finally {
    await c.close();
    c.cleanup();
    rmSync(home, { recursive: true, force: true });
  }
});
