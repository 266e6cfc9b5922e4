// A worker given a bootstrap token that does not fit its controller says so in a worker's terms
// (a worker has a bootstrap token, no CLI context), and how to get one that fits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { ADMIN_TOKEN, inProcessController, runCLI, tempDir } from './helpers.ts';

const workerRun = (url: string, token: string) =>
  runCLI(['worker', 'run', url, '--bootstrap-token-stdin', '--runtime', 'synthetic', '--name', 'w1', '--data-dir', tempDir('orchard-join-')], { ORCHARD_LOG_LEVEL: 'error' }, token + '\n');

test('a token from another controller: the worker names the certificate mismatch and how to get a new token', async (t) => {
  const a = await inProcessController();
  const b = await inProcessController();
  t.after(async () => {
    await a.close();
    await b.close();
    a.cleanup();
    b.cleanup();
  });
  // Made on controller A, used against controller B.
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: a.ctl.certificate });
  const r = await workerRun(b.ctl.url, token);
  assert.notEqual(r.code, 0);
  assert.doesNotMatch(r.stderr, /context create|pinned for this context/, r.stderr);
  assert.match(r.stderr, new RegExp(`the controller at ${b.ctl.url.replace(/\/$/, '').replace(/[.]/g, '\\.')} presents a certificate other than the bootstrap token's`), r.stderr);
  assert.match(r.stderr, /the token was made by another controller \(or the controller's certificate changed\)/);
  assert.match(r.stderr, /orchard get bootstrap-token bootstrap-admin/);
  // Both fingerprints, so the operator can see which controller is which.
  const { X509Certificate } = await import('node:crypto');
  assert.ok(r.stderr.includes(new X509Certificate(a.ctl.certificate!).fingerprint256), r.stderr);
  assert.ok(r.stderr.includes(new X509Certificate(b.ctl.certificate!).fingerprint256), r.stderr);
});

test('an account the controller does not know: the worker says so, and how to get a new token', async (t) => {
  const c = await inProcessController();
  t.after(async () => {
    await c.close();
    c.cleanup();
  });
  // The right certificate, but an account (or token) this controller does not have.
  for (const [name, secret] of [['worker', 'made-elsewhere'], ['bootstrap-admin', 'not-the-token']]) {
    const r = await workerRun(c.ctl.url, encodeBootstrapToken({ serviceAccountName: name, serviceAccountToken: secret, certificate: c.ctl.certificate }));
    assert.notEqual(r.code, 0);
    assert.doesNotMatch(r.stderr, /context create|pinned for this context/, r.stderr);
    assert.match(r.stderr, new RegExp(`does not know the bootstrap token's service account "${name}" or its token`), r.stderr);
    assert.match(r.stderr, new RegExp(`orchard get bootstrap-token ${name}`));
  }
});
