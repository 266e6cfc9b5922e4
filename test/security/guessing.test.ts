// Guessing tokens: after a few failures a source is backed off (429 with Retry-After, credentials not
// even checked), doubling each time; an account name guessed at from many sources is backed off too,
// except for sources that signed in to it before (so an attacker cannot lock its owner out). The same
// back-off covers REST, WebSocket upgrades and the SSH jump host, which also closes a connection after
// 3 failures. Every failure is logged with the account name and the source. Sources are told apart by
// binding to different loopback addresses (127.0.0.0/8 is all loopback on Linux).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import ssh2 from 'ssh2';
import { DEFAULT_BACKOFF } from '../../src/controller/auth-backoff.ts';
import { startController, type RunningController } from '../../src/controller/controller.ts';
import { ADMIN_TOKEN, clientOf, rawRequest, tempDir } from '../helpers.ts';
import { upgrade } from './attack.ts';

describe('guessing tokens', () => {
  let ctl: RunningController;
  const logs: string[] = [];
  const victimToken = 'victim-token-0123456789abcdef0123456789';

  before(async () => {
    const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(line) });
    // Blocks of 4 s, 8 s… rather than 1 s, 2 s…: the checks that a source is still blocked come after
    // 3 s of guesses, or after SSH handshakes that take a few hundred ms on a busy machine, and must
    // not find the block just over.
    const authBackoff = { ...DEFAULT_BACKOFF, baseMs: 4000 };
    ctl = await startController({ dataDir: tempDir(), listen: '127.0.0.1:0', listenSSH: '127.0.0.1:0', bootstrapAdminToken: ADMIN_TOKEN, logger, authBackoff });
    const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    await admin.createServiceAccount({ name: 'victim', token: victimToken, roles: ['compute:read', 'compute:connect'] });
    admin.close();
  });
  after(async () => {
    await ctl.close();
  });

  test('REST from one source: about 10 guesses are checked, then 429 with Retry-After; the right token waits too', async () => {
    const source = '127.0.0.2';
    const counts: Record<number, number> = {};
    let retryAfter: string | undefined;
    const t0 = Date.now();
    while (Date.now() - t0 < 3000) {
      const r = await rawRequest(ctl, 'GET', '/v1/vms', { auth: ['victim', `guess-${Math.random()}`], localAddress: source });
      counts[r.status] = (counts[r.status] ?? 0) + 1;
      if (r.status === 429) retryAfter ??= String(r.headers['retry-after']);
    }
    const seconds = (Date.now() - t0) / 1000;
    console.log(`# REST guesses from one source in ${seconds.toFixed(1)} s: ${counts[401] ?? 0} checked (401), ${counts[429] ?? 0} refused unchecked (429)`);
    assert.ok((counts[401] ?? 0) >= 10, 'the first failures are answered normally');
    assert.ok((counts[401] ?? 0) <= 13, `at most ~1 guess checked per back-off step: ${counts[401]} in ${seconds} s`);
    assert.ok((counts[429] ?? 0) > 0);
    assert.match(retryAfter ?? '', /^\d+$/);
    const right = await rawRequest(ctl, 'GET', '/v1/vms', { auth: ['victim', victimToken], localAddress: source });
    assert.equal(right.status, 429, 'a backed-off source is refused before its credentials are checked');
    assert.match((right.json as { message: string }).message, /too many failed sign-ins; try again in \d+ s/);
    // A WebSocket upgrade from there is backed off as well.
    const ws = await upgrade(ctl, '/v1/vms/x/port-forward?port=22', { auth: ['victim', victimToken], localAddress: source });
    assert.equal(ws.status, 429);
    assert.match(String(ws.headers['retry-after']), /^\d+$/);
    // Another source is not affected.
    assert.equal((await rawRequest(ctl, 'GET', '/v1/vms', { auth: ['victim', victimToken], localAddress: '127.0.0.3' })).status, 200);
  });

  test('an account guessed at from many sources is backed off, but not for sources that signed in to it before', async () => {
    const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    await admin.createServiceAccount({ name: 'target', token: 'target-token-0123456789abcdef0123456789', roles: ['compute:read'] });
    admin.close();
    const auth: [string, string] = ['target', 'target-token-0123456789abcdef0123456789'];
    const owner = '127.0.3.1';
    assert.equal((await rawRequest(ctl, 'GET', '/v1/vms', { auth, localAddress: owner })).status, 200);
    // 25 sources, 2 guesses each: below the per-source limit, above the per-account one (20).
    const statuses: number[] = [];
    for (let i = 1; i <= 25; i++) {
      for (let k = 0; k < 2; k++) statuses.push((await rawRequest(ctl, 'GET', '/v1/vms', { auth: ['target', `guess-${i}-${k}`], localAddress: `127.0.4.${i}` })).status);
    }
    assert.ok(statuses.filter((s) => s === 401).length <= 22, `the account name is backed off: ${statuses.join(',')}`);
    assert.ok(statuses.includes(429));
    assert.equal((await rawRequest(ctl, 'GET', '/v1/vms', { auth, localAddress: '127.0.5.1' })).status, 429, 'a new source waits');
    assert.equal((await rawRequest(ctl, 'GET', '/v1/vms', { auth, localAddress: owner })).status, 200, 'the owner is not locked out');
  });

  test('failures are logged with the account name and the source (never the token)', () => {
    const lines = logs.filter((l) => l.includes('authentication failed'));
    assert.ok(lines.some((l) => /"account":"victim"/.test(l) && /"source":"127\.0\.0\.2"/.test(l)), lines.slice(0, 3).join(''));
    assert.ok(!logs.some((l) => l.includes(victimToken) || l.includes('guess-')), 'no token in the log');
  });

  test('SSH jump host: a connection is closed after 3 failed passwords; the back-off is shared with REST', async () => {
    const attempt = (passwords: string[], localAddress: string) =>
      new Promise<{ tried: number; ready: boolean; closed: boolean; error?: string }>((resolve) => {
        const conn = new ssh2.Client();
        let tried = 0;
        let ready = false;
        conn.on('ready', () => {
          ready = true;
          conn.end();
        });
        conn.on('error', (err) => resolve({ tried, ready, closed: true, error: err.message }));
        conn.on('close', () => resolve({ tried, ready, closed: true }));
        conn.connect({
          host: '127.0.0.1',
          port: ctl.ssh!.port,
          localAddress,
          username: 'victim',
          hostVerifier: () => true,
          authHandler: (_methods, _partial, next) => {
            if (tried >= passwords.length) return next(false as unknown as ssh2.AuthenticationType);
            next({ type: 'password', username: 'victim', password: passwords[tried++] });
          },
        } as ssh2.ConnectConfig);
      });
    const five = await attempt(['a', 'b', 'c', 'd', 'e'], '127.0.6.1');
    assert.equal(five.ready, false);
    // The client may send a 4th attempt before it reads the hang-up that follows the 3rd failure.
    assert.ok(five.tried <= 4, `the server hung up after the third failure (the client tried ${five.tried} of 5)`);
    // The same source keeps guessing on new connections: after the free failures, refused unchecked.
    for (let i = 0; i < 4; i++) await attempt(['f', 'g', 'h'], '127.0.6.1');
    const right = await attempt([victimToken], '127.0.6.1');
    assert.equal(right.ready, false, 'even the right token waits out the back-off');
    assert.ok(logs.some((l) => /SSH jump host: authentication refused/.test(l) && /too many failed sign-ins/.test(l)));
    // "victim" is now backed off as an account too (all these failures); its owner's earlier source still signs in.
    assert.equal((await attempt([victimToken], '127.0.6.2')).ready, false);
    assert.equal((await attempt([victimToken], '127.0.0.3')).ready, true);
  });
});
