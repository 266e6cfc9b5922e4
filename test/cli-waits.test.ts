// No silent waits in the CLI: create vm --wait shows the VM's progress and names --wait when it gives
// up; ssh to a VM that does not run says what it waits for (the pending reason) and, to a stopped VM,
// how to start it; port-forward says so at the start; logs vm --follow prints events as they come.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { ADMIN_TOKEN, ORCHARD_BIN, metric, runCLI, tempDir, waitFor } from './helpers.ts';
import { clusterWithVM } from './security/attack.ts';

test('create --wait, ssh and port-forward to a VM that does not run, logs --follow: every wait is said', async () => {
  const { c, close } = await clusterWithVM('box');
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const cli = (...args: string[]) => runCLI(args, env);
  try {
    assert.equal((await cli('context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!)).code, 0);

    // A VM that runs: create --wait returns once it does.
    const ok = await cli('create', 'vm', 'quick', '--image', 'synthetic', '--wait', '30');
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^VM quick running on worker syn-1\n$/);

    // A VM no worker fits: the reason while waiting, and the flag when the wait ends.
    const stuck = await cli('create', 'vm', 'stuck', '--image', 'synthetic', '--label', 'rack=nowhere', '--wait', '2');
    assert.equal(stuck.code, 1);
    assert.match(stuck.stderr, /^waiting up to 2s for VM stuck to be running \(pending: /m);
    assert.match(stuck.stderr, /pending: no worker fits: .*rack=nowhere/);
    assert.match(stuck.stderr, /VM stuck is not running after 2s \(pending: no worker fits.*\); wait longer with --wait SECONDS/);

    const ssh = await cli('ssh', 'vm', 'stuck', '--wait', '1', '--', 'true');
    assert.equal(ssh.code, 1);
    assert.match(ssh.stderr, /waiting up to 1s for VM stuck to be running \(pending: no worker fits/);
    assert.match(ssh.stderr, /wait longer with --wait SECONDS/);
    // The API's own answer names its query parameter (the SSH jump host leaves that advice out: test/ssh-jump).
    await assert.rejects(c.admin.vmIP('stuck', 1), (err: Error & { status?: number }) =>
      err.status === 503 && /VM "stuck" is not running \(pending: .*\) after waiting 1s; wait longer with the query parameter wait=SECONDS/.test(err.message));

    // A stopped VM is not waited for: how to start it, at once.
    assert.equal((await cli('stop', 'vm', 'quick')).code, 0);
    const t0 = Date.now();
    const toStopped = await cli('ssh', 'vm', 'quick', '--', 'true');
    assert.equal(toStopped.code, 1);
    assert.match(toStopped.stderr, /VM quick is stopped; start it with: orchard start vm quick/);
    assert.ok(Date.now() - t0 < 10_000, 'no 60 s wait');

    // port-forward starts listening, and says that connections will wait.
    const pf = spawn(ORCHARD_BIN, ['port-forward', 'vm', 'stuck', '0:22', '--wait', '5'], { env: { ...process.env, ...env } });
    let pfErr = '';
    pf.stderr.on('data', (d: Buffer) => (pfErr += d.toString()));
    try {
      await waitFor('port-forward to start', () => /forwarding 127\.0\.0\.1:\d+ -> stuck:22/.test(pfErr), 20_000, 50);
      assert.match(pfErr, /VM stuck is pending \(no worker fits: .*\): each connection waits up to 5s for it to run \(--wait SECONDS\)/);
    } finally {
      pf.kill('SIGINT');
    }

    // logs --follow: what is there, then what is appended (from the events' watch: one stream held,
    // no asking each second), until the VM is deleted.
    const streams = await metric(c.ctl, 'orchard_watch_streams');
    const follow = spawn(ORCHARD_BIN, ['logs', 'vm', 'box', '--follow'], { env: { ...process.env, ...env } });
    let out = '';
    let err = '';
    follow.stdout.on('data', (d: Buffer) => (out += d.toString()));
    follow.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((r) => follow.once('exit', (code) => r(code)));
    await waitFor('the existing events', () => /lifecycle: /.test(out), 20_000, 50);
    await waitFor('the events\' watch held by logs --follow', async () => (await metric(c.ctl, 'orchard_watch_streams')) === streams + 1, 10_000, 50);
    await c.admin.appendEvents('box', [{ kind: 'log_line', timestamp: Math.floor(Date.now() / 1000), payload: 'appended while following' }]);
    await waitFor('the appended event', () => /log_line: appended while following\n/.test(out), 10_000, 50);
    assert.equal(out.match(/appended while following/g)!.length, 1, 'printed once');
    await c.admin.deleteVM('box');
    assert.equal(await exited, 0, err);
    assert.match(err, /VM box was deleted/);
  } finally {
    await close();
  }
});
