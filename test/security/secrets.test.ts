// Secrets are read only by accounts that need them: service account tokens only by admin:write (which
// `orchard get bootstrap-token` needs), a VM's password only by accounts that may connect to it, a
// startup script's environment values only by compute:write — in gets, lists and watches alike. The
// database that holds them all is the controller user's alone, whatever the data dir's mode.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { ServiceAccount, VM } from '../../src/api/schemas.ts';
import { inProcessController, rawRequest, runCLI, tempDir } from '../helpers.ts';
import { account } from './attack.ts';

test('tokens are returned only to admin:write; admin:read sees accounts without them', async () => {
  const c = await inProcessController();
  try {
    const auditor = await account(c, 'auditor', ['admin:read']);
    const owner = await account(c, 'owner', ['admin:read', 'admin:write']);
    for (const path of ['/v1/service-accounts', '/v1/service-accounts/bootstrap-admin']) {
      const seen = await rawRequest(c.ctl, 'GET', path, { auth: auditor.auth });
      assert.equal(seen.status, 200, seen.body);
      assert.doesNotMatch(seen.body, /test-admin-token|"token"/, `${path} as admin:read`);
      assert.match(seen.body, /"bootstrap-admin"/);
      const full = await rawRequest(c.ctl, 'GET', path, { auth: owner.auth });
      assert.match(full.body, /"token":"test-admin-token"/, `${path} as admin:write`);
    }
    const list = (await auditor.client.listServiceAccounts()) as ServiceAccount[];
    assert.ok(list.every((sa) => sa.token === undefined));
    // `orchard get bootstrap-token` works for admin:write and refuses without the token.
    const home = tempDir();
    const env = { ORCHARD_HOME: home };
    const ctx = async (a: { name: string; token: string }) =>
      runCLI(['context', 'create', c.ctl.url, '--name', a.name, '--service-account-name', a.name, '--service-account-token', a.token, '--trust-fingerprint', c.ctl.fingerprint!], env);
    const created = await ctx(owner);
    assert.equal(created.code, 0, created.stderr);
    const got = await runCLI(['get', 'bootstrap-token', 'bootstrap-admin', '--context', 'owner'], env);
    assert.equal(got.code, 0, got.stderr);
    assert.ok(got.stdout.trim().length > 20);
    assert.equal((await ctx(auditor)).code, 0);
    const refused = await runCLI(['get', 'bootstrap-token', 'bootstrap-admin', '--context', 'auditor'], env);
    assert.notEqual(refused.code, 0);
    assert.doesNotMatch(refused.stdout + refused.stderr, /test-admin-token/);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test("a VM's password only to compute:write and compute:connect; startup-script env values only to compute:write", async () => {
  const c = await inProcessController();
  try {
    const reader = await account(c, 'reader', ['compute:read']);
    const connector = await account(c, 'connector', ['compute:read', 'compute:connect']);
    const writer = await account(c, 'writer', ['compute:read', 'compute:write']);
    await c.admin.createVM({ name: 's1', image: 'img', password: 'pw-of-s1', startup_script: { script_content: 'echo $API_KEY', env: { API_KEY: 'key-of-s1' } } });
    const views = async (who: typeof reader) => {
      const get = (await rawRequest(c.ctl, 'GET', '/v1/vms/s1', { auth: who.auth })).body;
      const list = (await rawRequest(c.ctl, 'GET', '/v1/vms', { auth: who.auth })).body;
      const ac = new AbortController();
      const stream = who.client.watch<VM>('/v1/vms?watch=true', ac.signal);
      const first = JSON.stringify((await stream.next()).value);
      ac.abort();
      const single = who.client.watch<VM>('/v1/vms/s1?watch=true', new AbortController().signal);
      const one = JSON.stringify((await single.next()).value);
      await single.return(undefined);
      return { get, list, first, one };
    };
    for (const [who, password, env] of [[reader, false, false], [connector, true, false], [writer, true, true]] as const) {
      for (const [where, body] of Object.entries(await views(who))) {
        assert.equal(body.includes('pw-of-s1'), password, `${who.name} ${where}: password ${password ? 'shown' : 'hidden'}: ${body}`);
        assert.equal(body.includes('key-of-s1'), env, `${who.name} ${where}: env values ${env ? 'shown' : 'hidden'}: ${body}`);
        assert.match(body, /API_KEY/, `${who.name} ${where}: the env keys stay visible`);
      }
    }
    // Watching at the same time, the writer first: a change's line is made once per kind of reader
    // and shared, never the writer's line handed to the reader.
    const streams = [writer, connector, reader].map((who) => who.client.watch<VM>('/v1/vms/s1?watch=true', new AbortController().signal));
    for (const stream of streams) await stream.next();
    await c.admin.updateVM({ name: 's1', image: 'img', cpu: 3, password: 'pw-of-s1', startup_script: { script_content: 'echo $API_KEY', env: { API_KEY: 'key-of-s1' } } });
    const modified = await Promise.all(streams.map(async (stream) => JSON.stringify((await stream.next()).value)));
    for (const stream of streams) await stream.return(undefined);
    for (const [i, [who, password, env]] of ([[writer, true, true], [connector, true, false], [reader, false, false]] as const).entries()) {
      assert.match(modified[i], /"MODIFIED"/);
      assert.equal(modified[i].includes('pw-of-s1'), password, `${who.name} concurrent watch: password ${password ? 'shown' : 'hidden'}`);
      assert.equal(modified[i].includes('key-of-s1'), env, `${who.name} concurrent watch: env values ${env ? 'shown' : 'hidden'}`);
    }
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('orchard.db and its WAL are created 0600 even in an existing 0755 data dir under umask 022', async () => {
  const dataDir = join(tempDir(), 'data');
  mkdirSync(dataDir);
  chmodSync(dataDir, 0o755);
  const umask = process.umask(0o022);
  try {
    const c = await inProcessController({ dataDir });
    try {
      await c.admin.createVM({ name: 'm', image: 'img' });
      for (const f of ['orchard.db', 'orchard.db-wal', 'orchard.db-shm']) {
        assert.equal(statSync(join(dataDir, f)).mode & 0o777, 0o600, `${f} is readable by its owner only`);
      }
    } finally {
      await c.close();
      c.cleanup();
    }
  } finally {
    process.umask(umask);
  }
});
