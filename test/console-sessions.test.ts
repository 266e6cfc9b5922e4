// The web console's sign-in sessions over raw HTTPS and WebSockets: the cookie's flags, CSRF on every
// state change made with it, the origin check on WebSocket upgrades, the same role checks and
// back-off as Basic auth, sign-out and expiry ending what the session holds, the bounds on sessions,
// and the console page's security and caching headers. Basic auth is unchanged beside it.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request as httpsRequest } from 'node:https';
import { WebSocket } from 'ws';
import { rmSync } from 'node:fs';
import { pino } from 'pino';
import { startController } from '../src/controller/controller.ts';
import { Sessions } from '../src/controller/console/sessions.ts';
import { chooseEncoding } from '../src/controller/console/routes.ts';
import { brotliDecompressSync, gunzipSync } from 'node:zlib';
import type { Access } from '../src/controller/access.ts';
import { ADMIN_TOKEN, inProcessController, rawRequest, tempDir, waitFor } from './helpers.ts';


type H = Awaited<ReturnType<typeof inProcessController>>;
const IMAGE = 'ghcr.io/cirruslabs/macos:latest';
let seq = 0;
const uniq = (p: string) => `${p}-${++seq}`;

/** GET `path` with these headers; the body as bytes (compressed ones are not text). */
function getBytes(h: H, path: string, headers: Record<string, string>): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(new URL(path, h.ctl.url), { headers, ca: h.ctl.certificate, checkServerIdentity: () => undefined }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Signs in; the cookie (name=value) and the CSRF token. */
async function signIn(h: H, name: string, token: string) {
  const res = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ name, token }) });
  assert.equal(res.status, 200, res.body);
  const setCookie = String(res.headers['set-cookie']);
  const cookie = setCookie.split(';')[0];
  return { cookie, setCookie, csrf: (res.json as { csrf: string }).csrf, body: res.json as { account: string; roles: string[]; csrf: string } };
}

async function account(h: H, roles: string[]) {
  const name = uniq('sa');
  const sa = await h.admin.createServiceAccount({ name, token: `${name}-token`, roles: roles as never });
  return { name, token: sa.token! };
}

const withCookie = (cookie: string, csrf?: string, extra: Record<string, string> = {}) => ({ ...(csrf ? { 'x-orchard-csrf': csrf } : {}), cookie, ...extra });

/** Opens a WebSocket with these headers: resolves 'open' or the HTTP status it was refused with. */
function upgrade(h: H, path: string, headers: Record<string, string>): Promise<{ ws?: WebSocket; status?: number; body?: string }> {
  const url = new URL(path, h.ctl.url.replace(/^https/, 'wss'));
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers, ca: h.ctl.certificate, checkServerIdentity: (() => undefined) as never });
    ws.once('open', () => resolve({ ws }));
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    ws.once('error', reject);
  });
}

describe('console sessions', () => {
  let h: H;
  let origin: string;
  before(async () => {
    h = await inProcessController({ authBackoff: { freePerSource: 1000, freePerAccount: 3, baseMs: 60_000, maxMs: 60_000, forgetMs: 60_000 }, limits: { consoleSessionsPerAccount: 2, consoleSessions: 6 } });
    origin = new URL(h.ctl.url).origin;
  });
  after(async () => {
    await h.close();
    h.cleanup();
  });

  test('sign-in sets an HttpOnly, Secure, SameSite=Strict, host-only cookie and returns the roles and a CSRF token', async () => {
    const s = await signIn(h, 'bootstrap-admin', ADMIN_TOKEN);
    assert.match(s.setCookie, /^__Host-orchard-session=[A-Za-z0-9_-]{43};/);
    for (const flag of ['HttpOnly', 'Secure', 'SameSite=Strict', 'Path=/']) assert.ok(s.setCookie.split('; ').includes(flag), `${flag} in ${s.setCookie}`);
    assert.doesNotMatch(s.setCookie, /Domain=/i);
    assert.equal(s.body.account, 'bootstrap-admin');
    assert.ok(s.body.roles.includes('compute:write'));
    assert.match(s.csrf, /^[A-Za-z0-9_-]{43}$/);
    const me = await rawRequest(h.ctl, 'GET', '/console/session', { headers: withCookie(s.cookie) });
    assert.equal(me.status, 200);
    assert.equal((me.json as { csrf: string }).csrf, s.csrf, 'a reloaded page gets its CSRF token back');
    assert.equal(me.headers['cache-control'], 'no-store');
  });

  test('a wrong token is refused like Basic auth, and the same back-off stops guessing', async () => {
    const { name } = await account(h, ['compute:read']);
    // Three failures are free for an account (this controller's back-off); the fourth blocks it.
    for (let i = 0; i < 4; i++) {
      const res = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ name, token: 'guess' }) });
      assert.equal(res.status, 401);
      assert.equal(res.headers['set-cookie'], undefined);
    }
    const res = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ name, token: `${name}-token` }) });
    assert.equal(res.status, 429, 'even the right token waits out the back-off');
    assert.ok(res.headers['retry-after']);
  });

  test('bad sign-in bodies get a 400 naming the field', async () => {
    const missing = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ token: 'x' }) });
    assert.equal(missing.status, 400);
    assert.match((missing.json as { message: string }).message, /name/);
    const long = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ name: 'a', token: 'x'.repeat(5000) }) });
    assert.equal(long.status, 400);
    assert.match((long.json as { message: string }).message, /token/);
  });

  test('the cookie authenticates API reads; changes need the CSRF token and the own origin', async () => {
    const s = await signIn(h, 'bootstrap-admin', ADMIN_TOKEN);
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status, 200);
    const create = (headers: Record<string, string>) => rawRequest(h.ctl, 'POST', '/v1/vms', { body: JSON.stringify({ name: uniq('vm'), image: IMAGE }), headers });
    const none = await create(withCookie(s.cookie));
    assert.equal(none.status, 403);
    assert.match((none.json as { message: string }).message, /x-orchard-csrf/);
    assert.equal((await create(withCookie(s.cookie, 'forged-' + s.csrf.slice(7)))).status, 403);
    assert.equal((await create(withCookie(s.cookie, s.csrf, { origin: 'https://evil.example' }))).status, 403);
    assert.equal((await create(withCookie(s.cookie, s.csrf, { origin }))).status, 200);
    assert.equal((await create(withCookie(s.cookie, s.csrf))).status, 200);
    // The CSRF token of one session does not work with another's cookie.
    const other = await signIn(h, 'bootstrap-admin', ADMIN_TOKEN);
    assert.equal((await create(withCookie(other.cookie, s.csrf))).status, 403);
  });

  test('a compute:read session is refused a create whatever it sends', async () => {
    const { name, token } = await account(h, ['compute:read']);
    const s = await signIn(h, name, token);
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status, 200);
    const res = await rawRequest(h.ctl, 'POST', '/v1/vms', { body: JSON.stringify({ name: uniq('vm'), image: IMAGE }), headers: withCookie(s.cookie, s.csrf, { origin }) });
    assert.equal(res.status, 403);
    assert.match((res.json as { message: string }).message, /compute:write/);
  });

  test('Basic auth is unchanged, and wins over a cookie', async () => {
    const s = await signIn(h, 'bootstrap-admin', ADMIN_TOKEN);
    const res = await rawRequest(h.ctl, 'POST', '/v1/vms', { auth: ['bootstrap-admin', ADMIN_TOKEN], body: JSON.stringify({ name: uniq('vm'), image: IMAGE }) });
    assert.equal(res.status, 200, 'no CSRF token needed with Basic auth');
    const wrong = await rawRequest(h.ctl, 'GET', '/v1/vms', { auth: ['bootstrap-admin', 'wrong'], headers: withCookie(s.cookie) });
    assert.equal(wrong.status, 401, 'a valid cookie does not rescue a wrong Authorization header');
  });

  test('a WebSocket opened with the cookie must come from the own origin; signing out closes it', async () => {
    const { name, token } = await account(h, ['compute:read', 'compute:write']);
    const worker = uniq('w');
    await h.client(name, token).registerWorker({ name: worker, resources: {} });
    const s = await signIn(h, name, token);
    const path = `/v1/rpc/watch?workerName=${worker}`;
    const noOrigin = await upgrade(h, path, { cookie: s.cookie });
    assert.equal(noOrigin.status, 403, noOrigin.body);
    const evil = await upgrade(h, path, { cookie: s.cookie, origin: 'https://evil.example' });
    assert.equal(evil.status, 403, evil.body);
    assert.match(evil.body!, /own origin/);
    const ok = await upgrade(h, path, { cookie: s.cookie, origin });
    assert.ok(ok.ws, `same-origin upgrade refused: ${ok.status} ${ok.body}`);
    const closed = new Promise<number>((r) => ok.ws!.once('close', (code) => r(code)));
    // An NDJSON watch opened with the session ends too.
    const watchEnded = new Promise<void>((resolve, reject) => {
      const req = httpsRequest(new URL('/v1/vms?watch=true', h.ctl.url), { headers: { cookie: s.cookie }, ca: h.ctl.certificate, checkServerIdentity: () => undefined }, (res) => {
        assert.equal(res.statusCode, 200);
        res.resume();
        res.on('close', () => resolve());
        signOut();
      });
      req.on('error', (err) => (err.message.includes('aborted') || err.message.includes('socket hang up') ? resolve() : reject(err)));
      req.end();
    });
    let signedOut: Promise<Awaited<ReturnType<typeof rawRequest>>> | undefined;
    const signOut = () => {
      signedOut = (async () => {
        const forged = await rawRequest(h.ctl, 'DELETE', '/console/session', { headers: withCookie(s.cookie) });
        assert.equal(forged.status, 403, 'sign-out without the CSRF token is refused');
        return rawRequest(h.ctl, 'DELETE', '/console/session', { headers: withCookie(s.cookie, s.csrf) });
      })();
    };
    await watchEnded;
    assert.equal(await closed, 1008);
    const out = await signedOut!;
    assert.equal(out.status, 204);
    assert.match(String(out.headers['set-cookie']), /^__Host-orchard-session=; .*Max-Age=0/);
    const after = await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) });
    assert.equal(after.status, 401);
    assert.match((after.json as { message: string }).message, /sign in again/);
    assert.equal((await upgrade(h, path, { cookie: s.cookie, origin })).status, 401);
  });

  test('a changed token or a deleted account ends its sessions', async () => {
    const { name, token } = await account(h, ['compute:read']);
    const s = await signIn(h, name, token);
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status, 200);
    await h.admin.updateServiceAccount({ name, token: 'a-new-token', roles: ['compute:read'] });
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status, 401);
    const again = await signIn(h, name, 'a-new-token');
    await h.admin.updateServiceAccount({ name, token: 'a-new-token', roles: [] });
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(again.cookie) })).status, 403, 'roles are read on every request');
    await h.admin.deleteServiceAccount(name);
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(again.cookie) })).status, 401);
  });

  test('sessions are bounded: per account the oldest is signed out, in all a sign-in past the limit gets 429', async () => {
    const { name, token } = await account(h, ['compute:read']);
    const first = await signIn(h, name, token);
    await signIn(h, name, token);
    await signIn(h, name, token);
    assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(first.cookie) })).status, 401, 'the third sign-in (limit 2) signed the first out');
    // Fill the controller (limit 6) with other accounts' sessions.
    let refused: Awaited<ReturnType<typeof rawRequest>> | undefined;
    for (let i = 0; i < 8 && !refused; i++) {
      const a = await account(h, ['compute:read']);
      const res = await rawRequest(h.ctl, 'POST', '/console/session', { body: JSON.stringify({ name: a.name, token: a.token }) });
      if (res.status !== 200) refused = res;
    }
    assert.equal(refused?.status, 429);
    assert.match((refused!.json as { message: string }).message, /console sessions/);
  });

  test('garbage cookies get a 401, never a 500', async () => {
    for (const cookie of ['__Host-orchard-session=', '__Host-orchard-session=' + 'A'.repeat(5000), '__Host-orchard-session=%ff%00; x', '__Host-orchard-session']) {
      const res = await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: { cookie } });
      assert.equal(res.status, 401, `${cookie.slice(0, 40)}: ${res.body}`);
    }
  });

  test('the console page has a strict CSP (a fresh style nonce each time) and security headers; assets are cached for good', async () => {
    const page = await rawRequest(h.ctl, 'GET', '/');
    assert.equal(page.status, 200);
    assert.match(String(page.headers['content-type']), /^text\/html/);
    const csp = String(page.headers['content-security-policy']);
    const directives = new Map(csp.split('; ').map((d) => [d.split(' ')[0], d.split(' ').slice(1).join(' ')]));
    assert.equal(directives.get('default-src'), "'none'");
    assert.equal(directives.get('script-src'), "'self'");
    assert.equal(directives.get('connect-src'), "'self'");
    assert.equal(directives.get('frame-ancestors'), "'none'");
    assert.equal(directives.get('base-uri'), "'none'");
    const nonce = /^'self' 'nonce-([A-Za-z0-9_-]{24})'$/.exec(directives.get('style-src') ?? '')?.[1];
    assert.ok(nonce, csp);
    assert.ok(page.body.includes(`content="${nonce}"`), 'the page knows its nonce');
    const second = await rawRequest(h.ctl, 'GET', '/');
    assert.ok(!String(second.headers['content-security-policy']).includes(nonce), 'each response has its own nonce');
    assert.doesNotMatch(csp, /unsafe/);
    assert.equal(page.headers['x-content-type-options'], 'nosniff');
    assert.equal(page.headers['x-frame-options'], 'DENY');
    assert.equal(page.headers['referrer-policy'], 'no-referrer');
    assert.equal(page.headers['cache-control'], 'no-store');
    assert.doesNotMatch(page.body, /<script>|<style|style=/, 'no inline script or style');
    const assets = [...page.body.matchAll(/(?:src|href)="(\/console\/assets\/[^"]+)"/g)].map((m) => m[1]);
    // The style sheet, the script and the chunks it imports (modulepreloaded).
    assert.ok(assets.length >= 3, page.body);
    for (const path of assets) {
      const res = await rawRequest(h.ctl, 'GET', path);
      assert.equal(res.status, 200);
      assert.equal(res.headers['cache-control'], 'public, max-age=31536000, immutable');
      assert.equal((await rawRequest(h.ctl, 'GET', path, { headers: { 'if-none-match': String(res.headers.etag) } })).status, 304);
      assert.match(String(res.headers['content-type']), path.endsWith('.js') ? /^text\/javascript/ : /^text\/css/);
    }
    assert.equal((await rawRequest(h.ctl, 'GET', '/console/assets/..%2f..%2fpackage.json')).status, 404);
  });

  test('scripts and style sheets go brotli- or gzip-compressed as built, by Accept-Encoding (Vary, an ETag per encoding); the same bytes once decoded', async () => {
    const page = await rawRequest(h.ctl, 'GET', '/');
    const assets = [...page.body.matchAll(/(?:src|href)="(\/console\/assets\/[^"]+)"/g)].map((m) => m[1]);
    assert.ok(assets.length >= 3, page.body);
    for (const path of assets) {
      const plain = await getBytes(h, path, {});
      const br = await getBytes(h, path, { 'accept-encoding': 'gzip, deflate, br' });
      const gz = await getBytes(h, path, { 'accept-encoding': 'gzip' });
      const refused = await getBytes(h, path, { 'accept-encoding': 'br;q=0, gzip;q=0' });
      assert.equal(plain.headers['content-encoding'], undefined, path);
      assert.equal(refused.headers['content-encoding'], undefined, path);
      assert.equal(br.headers['content-encoding'], 'br', path);
      assert.equal(gz.headers['content-encoding'], 'gzip', path);
      for (const res of [plain, br, gz, refused]) {
        assert.equal(res.status, 200);
        assert.equal(res.headers.vary, 'accept-encoding', path);
        assert.equal(res.headers['content-security-policy'], plain.headers['content-security-policy']);
        assert.equal(res.headers['cache-control'], 'public, max-age=31536000, immutable');
      }
      assert.deepEqual(brotliDecompressSync(br.body), plain.body, `${path}: brotli decodes to the file`);
      assert.deepEqual(gunzipSync(gz.body), plain.body, `${path}: gzip decodes to the file`);
      assert.ok(br.body.length < plain.body.length / 2 && gz.body.length < plain.body.length / 2, `${path}: ${plain.body.length} → br ${br.body.length}, gzip ${gz.body.length}`);
      assert.equal(Number(br.headers['content-length']), br.body.length);
      // Each encoding is its own representation: a cache must not answer one with another's.
      const etags = new Set([plain, br, gz].map((r) => String(r.headers.etag)));
      assert.equal(etags.size, 3, [...etags].join(' '));
      assert.equal((await getBytes(h, path, { 'accept-encoding': 'br', 'if-none-match': String(br.headers.etag) })).status, 304);
      assert.equal((await getBytes(h, path, { 'accept-encoding': 'gzip', 'if-none-match': String(br.headers.etag) })).status, 200);
    }
    // The page itself is made per response (its nonce): not stored compressed.
    assert.equal((await getBytes(h, '/', { 'accept-encoding': 'br' })).headers['content-encoding'], undefined);
  });
});

test('Accept-Encoding: the most compact stored encoding the request takes, none for q=0', () => {
  const both = ['br', 'gzip'] as const;
  assert.equal(chooseEncoding('gzip, deflate, br, zstd', both), 'br');
  assert.equal(chooseEncoding('gzip', both), 'gzip');
  assert.equal(chooseEncoding('br;q=0, gzip;q=0.5', both), 'gzip');
  assert.equal(chooseEncoding('*', both), 'br');
  assert.equal(chooseEncoding('*;q=0', both), undefined);
  assert.equal(chooseEncoding('br;q=0, *', both), 'gzip');
  assert.equal(chooseEncoding('identity', both), undefined);
  assert.equal(chooseEncoding(undefined, both), undefined);
  assert.equal(chooseEncoding('gzip, br', []), undefined);
});

describe('console sessions: expiry', () => {
  test('a session ends at its maximum age', async () => {
    const h = await inProcessController({ limits: { consoleSessionMaxAgeMs: 400 } });
    try {
      const s = await signIn(h, 'bootstrap-admin', ADMIN_TOKEN);
      const start = Date.now();
      assert.equal((await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status, 200);
      await waitFor('the session to expire', async () => (await rawRequest(h.ctl, 'GET', '/v1/vms', { headers: withCookie(s.cookie) })).status === 401, 5000);
      assert.ok(Date.now() - start >= 400 - 50, 'not before its time');
    } finally {
      await h.close();
      h.cleanup();
    }
  });
});

describe('console sessions: under an API prefix', () => {
  test('the console is at PREFIX/, its assets and cookie under the prefix only', async () => {
    const dataDir = tempDir();
    const ctl = await startController({ dataDir, listen: '127.0.0.1:0', apiPrefix: '/orchard', bootstrapAdminToken: ADMIN_TOKEN, logger: pino({ level: 'silent' }) });
    try {
      const at = { url: new URL(ctl.url).origin, certificate: ctl.certificate };
      const page = await rawRequest(at, 'GET', '/orchard/');
      assert.equal(page.status, 200);
      const assets = [...page.body.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1]);
      assert.ok(assets.length >= 2 && assets.every((a) => a.startsWith('/orchard/console/assets/')), assets.join(' '));
      for (const a of assets) assert.equal((await rawRequest(at, 'GET', a)).status, 200, a);
      assert.equal((await rawRequest(at, 'GET', '/')).status, 404, 'nothing outside the prefix');
      const res = await rawRequest(at, 'POST', '/orchard/console/session', { body: JSON.stringify({ name: 'bootstrap-admin', token: ADMIN_TOKEN }) });
      assert.equal(res.status, 200, res.body);
      const setCookie = String(res.headers['set-cookie']);
      assert.match(setCookie, /^orchard-session=[A-Za-z0-9_-]{43}; Path=\/orchard\/;/);
      for (const flag of ['HttpOnly', 'Secure', 'SameSite=Strict']) assert.ok(setCookie.split('; ').includes(flag));
      assert.equal((await rawRequest(at, 'GET', '/orchard/v1/vms', { headers: { cookie: setCookie.split(';')[0] } })).status, 200);
    } finally {
      await ctl.close();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});

describe('console sessions: idle expiry (a clock of the test)', () => {
  test('a session unused for the idle time ends; one in use lives on, until its maximum age', async () => {
    let now = 1_000_000;
    const account = { name: 'a', token: 't', roles: ['compute:read' as const] };
    const ended: string[] = [];
    const access = { named: async (name: string) => (name === 'a' ? account : undefined), endSession: (key: string) => ended.push(key) } as unknown as Access;
    const sessions = new Sessions(access, { limits: { consoleSessions: 10, consoleSessionsPerAccount: 10, consoleSessionIdleMs: 1000, consoleSessionMaxAgeMs: 5000 }, tls: true, now: () => now });
    const cookieOf = (c: { cookie: string }) => ({ cookie: c.cookie.split(';')[0] });
    const idle = sessions.create(account);
    const busy = sessions.create(account);
    for (let i = 0; i < 4; i++) {
      now += 900;
      await sessions.authenticate(cookieOf(busy), 'GET');
    }
    await assert.rejects(sessions.authenticate(cookieOf(idle), 'GET'), /session has ended/);
    assert.equal(ended.length, 1, 'what the idle session held was closed');
    now += 900; // 4,500 ms old, used 900 ms ago
    await sessions.authenticate(cookieOf(busy), 'GET');
    now += 600; // 5,100 ms: past its maximum age
    await assert.rejects(sessions.authenticate(cookieOf(busy), 'GET'), /session has ended/);
    assert.equal(sessions.size, 0);
  });
});
