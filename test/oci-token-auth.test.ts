// Bearer-token auth as Docker Hub, ghcr.io and quay do it, against the real thing: Debian's
// docker-registry (CNCF distribution 2.8) with `auth: token:`, and a token service on loopback
// (test/token-server.ts) whose ES256 tokens the registry checks against the signing certificate.
// Anonymous pulls of a public repository, a private one with and without credentials, a push, one
// token per scope, an expired token refreshed, where the credentials go, and that no log line holds
// a password or a token.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { createServer, request, type Server } from 'node:http';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { importImage, resolveImage } from '../src/worker/images.ts';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { PullError } from '../src/worker/oci/errors.ts';
import { pushImage } from '../src/worker/oci/push.ts';
import type { RegistrySettings } from '../src/worker/oci/registry.ts';
import { tempDir } from './helpers.ts';
import { ociLayout, qcow2WithData, startRegistry, testCertificates, type TestRegistry } from './registry.ts';
import { startTokenServer, type TokenServer } from './token-server.ts';

const USER = 'builder';
const PASSWORD = 'tok3n-pa55-7d1e';
const BASIC = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`;
const SERVICE = 'orchard-test-registry';
const grants = { anonymous: { 'public/disk': ['pull'] }, grants: { [USER]: { 'public/disk': ['pull', 'push'], 'private/disk': ['pull', 'push'] } } };

let certs: Awaited<ReturnType<typeof testCertificates>>;
let tokens: TokenServer;
let registry: TestRegistry;
let work: string;
/** every log line of every cache in this file, at debug */
let logs = '';
const logger = pino({ level: 'debug' }, { write: (line: string) => void (logs += line) });
// skopeo asks the token server, which runs in this process: never block the event loop on it.
const run = promisify(execFile);
const hashOf = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

before(async () => {
  certs = await testCertificates();
  tokens = await startTokenServer({ service: SERVICE, tls: certs, users: { [USER]: PASSWORD }, ...grants });
  registry = await startRegistry({ certs, token: { realm: tokens.realm, service: SERVICE, issuer: tokens.issuer, rootCertBundle: tokens.certificate } });
  work = tempDir('orchard-token-');
});
after(async () => {
  await registry.stop();
  await tokens.stop();
  rmSync(work, { recursive: true, force: true });
});

const creds = (side: 'dest' | 'src', host = registry) => [`--${side}-cert-dir`, host.certDir!, `--${side}-creds`, `${USER}:${PASSWORD}`];

/** An image of a `mib` MiB disk and `extra` more layers, pushed by skopeo (with the user's credentials) as REPO:TAG. */
async function pushDisk(repo: string, tag: string, mib = 1, extra = 0, to = registry, args = creds('dest', to)): Promise<string> {
  const dir = tempDir('orchard-img-');
  const disk = qcow2WithData(dir, 'disk', mib);
  const layers: Parameters<typeof ociLayout>[1] = [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip: true }];
  for (let i = 0; i < extra; i++) layers.push({ files: { [`etc/extra-${i}`]: { copy: disk } }, gzip: false });
  ociLayout(join(dir, 'layout'), layers, tag);
  await run('skopeo', ['copy', '--quiet', '--preserve-digests', ...args, `oci:${join(dir, 'layout')}:${tag}`, `docker://${to.host}/${repo}:${tag}`]);
  return disk;
}

const cacheAs = (name: string, settings: RegistrySettings) => new ImageCache({ storeDir: join(work, name), registries: (h) => (h === registry.host ? { ca: registry.ca, ...settings } : undefined), logger });

test('anonymous pull of a public repository through the token service: one token per scope, not one per request', async () => {
  const disk = await pushDisk('public/disk', 'v1', 2, 2);
  await pushDisk('public/disk', 'v2', 1);
  const before = tokens.requests.length;
  const cache = cacheAs('anon', {});
  const image = await cache.ensure(`${registry.host}/public/disk:v1`, { policy: 'IfNotPresent' });
  assert.equal(hashOf(image.disk), hashOf(disk));
  assert.equal(cache.downloads, 3, 'three layers, three blob downloads');
  await cache.ensure(`${registry.host}/public/disk:v2`, { policy: 'Always' });
  assert.equal(cache.downloads, 4);
  const mine = tokens.requests.slice(before);
  assert.equal(mine.length, 1, `one token for the manifests and blobs of both pulls: ${JSON.stringify(mine.map((r) => r.scopes))}`);
  assert.deepEqual(mine[0].scopes, ['repository:public/disk:pull']);
  assert.equal(mine[0].service, SERVICE);
  assert.equal(mine[0].authorization, undefined, 'no credentials configured, none sent');
  assert.deepEqual(mine[0].granted, ['repository:public/disk:pull']);
  cache.close();
});

test('a private repository: anonymous is UNAUTHORIZED with the registry\'s answer, a wrong password is refused by the token service, the right one pulls', async () => {
  const disk = await pushDisk('private/disk', 'v1');
  const ref = `${registry.host}/private/disk:v1`;
  const anonymous = cacheAs('private-anon', {});
  await assert.rejects(anonymous.ensure(ref, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'UNAUTHORIZED');
    assert.match(err.message, new RegExp(`^${registry.host} refused manifest private/disk:v1: 401 Unauthorized: authentication required \\(UNAUTHORIZED\\); no credentials are configured for it$`));
    return true;
  });
  const wrong = cacheAs('private-wrong', { username: USER, password: 'not-the-password' });
  await assert.rejects(wrong.ensure(ref, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'UNAUTHORIZED');
    assert.equal(err.message, `the token service of ${registry.host} (${new URL(tokens.realm).origin}) refused user ${USER}: 401 Unauthorized: incorrect username or password`);
    return true;
  });
  const before = tokens.requests.length;
  const right = cacheAs('private-right', { username: USER, password: PASSWORD });
  assert.equal(hashOf((await right.ensure(ref, { policy: 'IfNotPresent' })).disk), hashOf(disk));
  const mine = tokens.requests.slice(before);
  assert.deepEqual(mine.map((r) => [r.scopes, r.user, r.granted]), [[['repository:private/disk:pull'], USER, ['repository:private/disk:pull']]]);
  for (const c of [anonymous, wrong, right]) c.close();
  for (const d of ['private-anon', 'private-wrong']) assert.deepEqual((await new ImageCache({ storeDir: join(work, d) }).list()), [], `${d} holds nothing`);
});

test('pushImage with credentials takes one pull,push token; skopeo --creds inspects what it pushed; the cache pulls it back', async () => {
  const dir = tempDir('orchard-push-');
  const disk = qcow2WithData(dir, 'local', 2);
  await importImage(join(dir, 'images'), 'local-disk', disk);
  const ref = `${registry.host}/private/disk:pushed`;
  const before = tokens.requests.length;
  const pushed = await pushImage(await resolveImage(join(dir, 'images'), 'local-disk'), ref, { username: USER, password: PASSWORD, ca: registry.ca });
  assert.equal(pushed.uploaded, true);
  const mine = tokens.requests.slice(before);
  assert.deepEqual(mine.map((r) => [r.scopes, r.user, r.granted]), [[['repository:private/disk:pull,push'], USER, ['repository:private/disk:pull,push']]], 'one token for every request of the push');
  const { stdout: raw } = await run('skopeo', ['inspect', '--raw', '--cert-dir', registry.certDir!, '--creds', `${USER}:${PASSWORD}`, `docker://${ref}`]);
  assert.equal(`sha256:${createHash('sha256').update(raw).digest('hex')}`, pushed.digest, 'skopeo sees the manifest that was pushed');
  await assert.rejects(run('skopeo', ['inspect', '--raw', '--cert-dir', registry.certDir!, '--no-creds', `docker://${ref}`]), /unauthorized|authentication required/i);
  // Anonymous may not push to the public repository either.
  await assert.rejects(pushImage(await resolveImage(join(dir, 'images'), 'local-disk'), `${registry.host}/public/disk:nope`, { ca: registry.ca }), (err: PullError) => {
    assert.equal(err.code, 'UNAUTHORIZED');
    assert.match(err.message, /401 Unauthorized: authentication required \(UNAUTHORIZED\); no credentials are configured/);
    return true;
  });
  const cache = cacheAs('pushed', { username: USER, password: PASSWORD });
  assert.equal(hashOf((await cache.ensure(ref, { policy: 'IfNotPresent' })).disk), hashOf(disk));
  cache.close();
  rmSync(dir, { recursive: true, force: true });
});

test('a token that expired is refreshed: the registry\'s 401 gets a new token and the pull goes on', async () => {
  const first = await pushDisk('private/disk', 'short-1');
  const second = await pushDisk('private/disk', 'short-2');
  const cache = cacheAs('expiry', { username: USER, password: PASSWORD });
  const before = tokens.requests.length;
  // Tokens the registry accepts for 3 s only (distribution adds 60 s of leeway to `exp`: the server
  // sets `exp` in the past to make up for it).
  tokens.acceptedFor = 3;
  const issuedAt = Date.now();
  try {
    assert.equal(hashOf((await cache.ensure(`${registry.host}/private/disk:short-1`, { policy: 'IfNotPresent' })).disk), hashOf(first));
  } finally {
    tokens.acceptedFor = 300;
  }
  assert.equal(tokens.requests.length - before, 1);
  await new Promise((r) => setTimeout(r, Math.max(0, issuedAt + 4_200 - Date.now())));
  assert.equal(hashOf((await cache.ensure(`${registry.host}/private/disk:short-2`, { policy: 'IfNotPresent' })).disk), hashOf(second));
  assert.equal(tokens.requests.length - before, 2, 'the expired token was replaced once');
  cache.close();
});

/**
 * An HTTP forwarder to `target` that records the Authorization header of every request it passes;
 * with `blobsTo`, it redirects blob downloads there instead (as registries do to a storage host).
 */
async function recordingProxy(target: string, blobsTo?: string): Promise<{ host: string; seen: { method: string; url: string; authorization?: string }[]; server: Server }> {
  const seen: { method: string; url: string; authorization?: string }[] = [];
  const [host, port] = target.split(':');
  const server = createServer((req, res) => {
    seen.push({ method: req.method ?? '', url: req.url ?? '', authorization: req.headers.authorization });
    if (blobsTo && req.method === 'GET' && /\/blobs\/sha256:/.test(req.url ?? '') && req.headers.authorization) {
      res.writeHead(307, { location: `${blobsTo}${req.url}` }).end();
      return;
    }
    const upstream = request({ host, port: Number(port), method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
    });
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { host: `127.0.0.1:${(server.address() as { port: number }).port}`, seen, server };
}

test('credentials go only to the token service the registry names, and over plain HTTP only when the registry itself is plain HTTP', async () => {
  // A plain-HTTP registry (marked insecure) whose token service is plain HTTP too, behind a forwarder that sees every header.
  const plainTokens = await startTokenServer({ service: SERVICE, users: { [USER]: PASSWORD }, ...grants });
  const plain = await startRegistry({ token: { realm: plainTokens.realm, service: SERVICE, issuer: plainTokens.issuer, rootCertBundle: plainTokens.certificate } });
  // A TLS registry that names that plain-HTTP token service.
  const downgrade = await startRegistry({ certs, token: { realm: plainTokens.realm, service: SERVICE, issuer: plainTokens.issuer, rootCertBundle: plainTokens.certificate } });
  const proxy = await recordingProxy(plain.host);
  try {
    const disk = await pushDisk('private/disk', 'v1', 1, 0, plain, ['--dest-tls-verify=false', '--dest-creds', `${USER}:${PASSWORD}`]);
    plainTokens.requests.length = 0;
    const cache = new ImageCache({ storeDir: join(work, 'plain'), registries: (h) => (h === proxy.host ? { insecure: true, username: USER, password: PASSWORD } : undefined), logger });
    assert.equal(hashOf((await cache.ensure(`${proxy.host}/private/disk:v1`, { policy: 'IfNotPresent' })).disk), hashOf(disk));
    cache.close();
    assert.ok(proxy.seen.length >= 3, 'the pull went through the forwarder');
    assert.deepEqual(proxy.seen.filter((r) => r.authorization !== undefined && !r.authorization.startsWith('Bearer ')), [], 'the registry got bearer tokens, never the password');
    assert.equal(plainTokens.requests.length, 1);
    assert.equal(plainTokens.requests[0].authorization, BASIC, 'the token service got the credentials');

    plainTokens.requests.length = 0;
    const tls = new ImageCache({ storeDir: join(work, 'downgrade'), registries: (h) => (h === downgrade.host ? { username: USER, password: PASSWORD, ca: downgrade.ca } : undefined), logger });
    await assert.rejects(tls.ensure(`${downgrade.host}/private/disk:v1`, { policy: 'IfNotPresent' }), (err: PullError) => {
      assert.equal(err.code, 'UNAUTHORIZED');
      assert.equal(err.message, `${downgrade.host} names a token service over http: (${new URL(plainTokens.realm).origin}); only HTTPS is used unless the registry is insecure`);
      return true;
    });
    tls.close();
    assert.equal(plainTokens.requests.length, 0, 'nothing, and so no password, went to a plain-HTTP token service for a TLS registry');
  } finally {
    proxy.server.close();
    await Promise.all([plain.stop(), downgrade.stop(), plainTokens.stop()]);
  }
});

test('a host the registry redirects to cannot name a token service: nothing is sent to it and the pull fails saying why', async () => {
  const plainTokens = await startTokenServer({ service: SERVICE, users: { [USER]: PASSWORD }, ...grants });
  const plain = await startRegistry({ token: { realm: plainTokens.realm, service: SERVICE, issuer: plainTokens.issuer, rootCertBundle: plainTokens.certificate } });
  // The "storage host" answers 401 with a challenge naming a token service of its own.
  const evil = await startTokenServer({ service: 'evil', users: {} });
  const storageSaw: (string | undefined)[] = [];
  const storage = createServer((req, res) => {
    storageSaw.push(req.headers.authorization);
    res.writeHead(401, { 'www-authenticate': `Bearer realm="${evil.realm}",service="evil",scope="repository:private/disk:pull"`, 'content-type': 'application/json' });
    res.end(JSON.stringify({ errors: [{ code: 'UNAUTHORIZED', message: 'authentication required' }] }));
  });
  await new Promise<void>((r) => storage.listen(0, '127.0.0.1', r));
  const storageOrigin = `http://127.0.0.1:${(storage.address() as { port: number }).port}`;
  const proxy = await recordingProxy(plain.host, storageOrigin);
  try {
    await pushDisk('private/disk', 'v1', 1, 0, plain, ['--dest-tls-verify=false', '--dest-creds', `${USER}:${PASSWORD}`]);
    const cache = new ImageCache({ storeDir: join(work, 'redirected'), registries: (h) => (h === proxy.host ? { insecure: true, username: USER, password: PASSWORD } : undefined), logger });
    await assert.rejects(cache.ensure(`${proxy.host}/private/disk:v1`, { policy: 'IfNotPresent' }), (err: PullError) => {
      assert.equal(err.code, 'UNAUTHORIZED');
      assert.match(err.message, new RegExp(`^${proxy.host} redirected blob sha256:[a-f0-9]{64} of private/disk to ${storageOrigin}, which answered 401 Unauthorized: authentication required \\(UNAUTHORIZED\\); credentials go only to the registry and the token service it names$`));
      return true;
    });
    cache.close();
    assert.equal(evil.requests.length, 0, 'the storage host\'s token service got nothing');
    assert.deepEqual(storageSaw, [undefined], 'the storage host was asked once, without the registry\'s token');
  } finally {
    proxy.server.close();
    storage.close();
    await Promise.all([plain.stop(), plainTokens.stop(), evil.stop()]);
  }
});

test('no log line, at debug, holds the password, its Basic form or any token', () => {
  assert.match(logs, /image pulled/, 'the pulls were logged');
  assert.ok(tokens.issued.length >= 5, `tokens were issued (${tokens.issued.length})`);
  for (const secret of [PASSWORD, BASIC.slice('Basic '.length), ...tokens.issued]) assert.ok(!logs.includes(secret), 'a secret is in the logs');
  // Nor a token's signature alone (a log line might cut the token).
  for (const t of tokens.issued) assert.ok(!logs.includes(t.split('.')[2]), 'a token signature is in the logs');
});
