// What upstream's users type and keep: `context create HOST:PORT --bootstrap-token …`, the
// ~/.orchard/orchard.yml upstream's CLI reads and writes (certificate as base64 of its PEM), and the
// ORCHARD_URL / ORCHARD_SERVICE_ACCOUNT_NAME / ORCHARD_SERVICE_ACCOUNT_TOKEN overrides.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import YAML from 'yaml';
import { inProcessController, runCLI, spawnController, tempDir, waitFor } from '../helpers.ts';

test('context create HOST:PORT --bootstrap-token, the config file as upstream writes it, and the environment overrides', async () => {
  const c = await inProcessController();
  try {
    const home = tempDir();
    const env = { ORCHARD_HOME: home };
    await c.admin.createServiceAccount({ name: 'ci', roles: ['compute:read', 'compute:write'] });
    const admin = await runCLI(['context', 'create', c.ctl.url, '--name', 'admin', '--service-account-name', 'bootstrap-admin', '--service-account-token', 'test-admin-token', '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(admin.code, 0, admin.stderr);
    const got = await runCLI(['get', 'bootstrap-token', 'ci', '--context', 'admin'], env);
    assert.equal(got.code, 0, got.stderr);

    // A bare host:port, as upstream users type it; the token's certificate is pinned (checked against the presented one).
    const hostPort = c.ctl.url.replace(/^https:\/\//, '');
    const created = await runCLI(['context', 'create', hostPort, '--name', 'ci', '--bootstrap-token', got.stdout.trim()], env);
    assert.equal(created.code, 0, created.stderr);
    const listed = await runCLI(['list', 'vms', '--context', 'ci'], env);
    assert.equal(listed.code, 0, listed.stderr);

    // The file as upstream's CLI keeps it: the certificate is base64 of the PEM.
    const file = YAML.parse(readFileSync(join(home, 'orchard.yml'), 'utf8')) as { contexts: Record<string, { url: string; certificate: string; serviceAccountName: string }> };
    assert.equal(file.contexts.ci.serviceAccountName, 'ci');
    assert.match(Buffer.from(file.contexts.ci.certificate, 'base64').toString(), /^-----BEGIN CERTIFICATE-----/);
    assert.equal(Buffer.from(file.contexts.ci.certificate, 'base64').toString().trim(), c.ctl.certificate!.trim());

    // The environment overrides the default context's credentials, as upstream's.
    const viaEnv = await runCLI(['list', 'service-accounts'], { ...env, ORCHARD_SERVICE_ACCOUNT_NAME: 'bootstrap-admin', ORCHARD_SERVICE_ACCOUNT_TOKEN: 'test-admin-token' });
    assert.equal(viaEnv.code, 0, viaEnv.stderr);
    assert.match(viaEnv.stdout, /\bci\b/);
    const wrong = await runCLI(['list', 'vms'], { ...env, ORCHARD_SERVICE_ACCOUNT_TOKEN: 'not-the-token' });
    assert.notEqual(wrong.code, 0, 'the override is used');
    assert.match(wrong.stderr, /401|invalid service account/);

    // A bootstrap token for another controller's certificate is refused.
    const other = await inProcessController();
    try {
      const forged = got.stdout.trim().split('.').slice(0, 3).concat(Buffer.from(other.ctl.certificate!).toString('base64url')).join('.');
      const refused = await runCLI(['context', 'create', hostPort, '--name', 'forged', '--bootstrap-token', forged], env);
      assert.notEqual(refused.code, 0);
      assert.match(refused.stderr, /other than the bootstrap token's/);
    } finally {
      await other.close();
      other.cleanup();
    }
  } finally {
    await c.close();
    c.cleanup();
  }
});

test("upstream's flag forms: --labels a=1,b=2, --resources a=1,b=2, --net-softnet-allow a,b, Go durations", async () => {
  const c = await inProcessController();
  try {
    const home = tempDir();
    const env = { ORCHARD_HOME: home, ORCHARD_URL: c.ctl.url, ORCHARD_SERVICE_ACCOUNT_NAME: 'bootstrap-admin', ORCHARD_SERVICE_ACCOUNT_TOKEN: 'test-admin-token' };
    const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 'admin', '--service-account-name', 'bootstrap-admin', '--service-account-token', 'test-admin-token', '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(ctx.code, 0, ctx.stderr);
    const created = await runCLI(
      ['create', 'vm', 'ci_build.2', '--image', 'ghcr.io/cirruslabs/macos-sonoma-base:latest', '--labels', 'os=sonoma,model=m2', '--label', 'rack=a',
        '--resources', 'gpu=1,license=2', '--net-softnet', '--net-softnet-allow', '10.0.0.0/8,192.168.0.0/16', '--suspendable'],
      env,
    );
    assert.equal(created.code, 0, created.stderr);
    const vm = await c.admin.getVM('ci_build.2');
    assert.deepEqual(vm.labels, { os: 'sonoma', model: 'm2', rack: 'a' });
    assert.deepEqual(vm.resources, { gpu: 1, license: 2 });
    assert.deepEqual(vm.netSoftnetAllow, ['10.0.0.0/8', '192.168.0.0/16']);
    assert.equal(vm.suspendable, true);
    // list -q (before or after the resource), logs --tail, pause worker --wait.
    for (const args of [['list', '-q', 'vms'], ['list', 'vms', '-q']]) {
      const q = await runCLI(args, env);
      assert.equal(q.code, 0, q.stderr);
      assert.equal(q.stdout, 'ci_build.2\n');
    }
    await c.admin.registerWorker({ name: 'w-tail', resources: { 'org.cirruslabs.tart-vms': 1 } });
    await c.admin.createVM({ name: 'busy', image: 'img', labels: { pool: 'tail' } });
    await c.admin.updateWorker({ name: 'w-tail', labels: { pool: 'tail' } });
    await waitFor('busy placed', async () => (await c.admin.getVM('busy')).worker === 'w-tail' || undefined);
    await c.admin.appendEvents('busy', [1, 2, 3, 4, 5].map((i) => ({ kind: 'log_line', timestamp: 1_700_000_000 + i, payload: `line ${i}` })));
    const tail = await runCLI(['logs', 'vm', 'busy', '--tail', '2'], env);
    assert.equal(tail.code, 0, tail.stderr);
    assert.deepEqual(tail.stdout.trim().split('\n').map((l) => l.replace(/^\S+ /, '')), ['log_line: line 5', 'log_line: line 4'], 'the last two, newest first');
    const t0 = Date.now();
    const timedOut = await runCLI(['pause', 'worker', 'w-tail', '--wait', '1'], env);
    assert.notEqual(timedOut.code, 0, 'busy still runs');
    assert.match(timedOut.stderr, /still runs 1 VM after 1s: busy/);
    assert.ok(Date.now() - t0 >= 1000);
    await c.admin.deleteVM('busy');
    const done = await runCLI(['pause', 'worker', 'w-tail', '--wait', '5'], env);
    assert.equal(done.code, 0, done.stderr);
    const { parseDuration } = await import('../../src/cli/output.ts');
    assert.deepEqual(['5m30s', '1h', '90', '1.5s', '250ms', '2h45m10s'].map(parseDuration), [330_000, 3_600_000, 90_000, 1500, 250, 9_910_000]);
    assert.throws(() => parseDuration('5 minutes'), /not a duration/);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('controller run on a fresh data dir without ORCHARD_BOOTSTRAP_ADMIN_TOKEN makes bootstrap-admin and a bootstrap-context, as upstream', async () => {
  const home = tempDir();
  const ctl = await spawnController(tempDir(), [], { ORCHARD_BOOTSTRAP_ADMIN_TOKEN: '', ORCHARD_HOME: home });
  try {
    await waitFor('the bootstrap message', () => /service account token: (\S+)/.exec(ctl.stderr())?.[1]);
    const token = /service account token: (\S+)/.exec(ctl.stderr())![1];
    assert.ok(token.length >= 40, 'a long random token');
    const file = YAML.parse(readFileSync(join(home, 'orchard.yml'), 'utf8')) as { 'default-context': string; contexts: Record<string, { serviceAccountToken: string }> };
    assert.equal(file['default-context'], 'bootstrap-context');
    assert.equal(file.contexts['bootstrap-context'].serviceAccountToken, token);
    const listed = await runCLI(['list', 'service-accounts', '-q'], { ORCHARD_HOME: home });
    assert.equal(listed.code, 0, listed.stderr);
    assert.equal(listed.stdout, 'bootstrap-admin\n');
  } finally {
    await ctl.kill('SIGTERM');
  }
});
