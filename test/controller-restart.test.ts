// The controller as a real process: kill -9 right after 2xx answers loses nothing, the certificate is
// made once and reused, and a client refuses a controller whose certificate changed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { OrchardClient } from '../src/client/client.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { ADMIN_TOKEN, placeOn, rawRequest, runCLI, spawnController, tempDir, waitFor } from './helpers.ts';

const adminOf = (url: string, certificate: string) => new OrchardClient({ url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });

test('kill -9 after acknowledged writes, restart: everything is there, with the same certificate', async () => {
  const dataDir = tempDir();
  let ctl = await spawnController(dataDir);
  try {
    const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
    assert.equal(statSync(join(dataDir, 'controller.key')).mode & 0o777, 0o600, 'the key is readable by its owner only');
    let admin = adminOf(ctl.url, certificate);
    // Many concurrent writes; the controller is killed the moment the last one is acknowledged.
    const names = Array.from({ length: 200 }, (_, i) => `vm-${i}`);
    // vm-3 gets events, which only its worker may post: it is placed on one (with room for it alone) first.
    await admin.createVM({ name: 'vm-3', image: 'debian-dev', cpu: 1, memory: 512 });
    await placeOn(admin, 'w', 'vm-3', 1);
    await Promise.all(names.filter((n) => n !== 'vm-3').map((name) => admin.createVM({ name, image: 'debian-dev', cpu: 1, memory: 512 })));
    await admin.createServiceAccount({ name: 'ci', roles: ['compute:read'], token: 'ci-token' });
    await admin.setClusterSettings({ schedulerProfile: 'distribute-load' });
    const updated = await admin.updateVM({ name: 'vm-7', cpu: 2 });
    await admin.appendEvents('vm-3', [{ kind: 'test', timestamp: 1, payload: 'hello' }]);
    await ctl.kill('SIGKILL');
    admin.close();

    ctl = await spawnController(dataDir);
    assert.equal(readFileSync(join(dataDir, 'controller.crt'), 'utf8'), certificate, 'the certificate is reused');
    admin = adminOf(ctl.url, certificate);
    const vms = await admin.listVMs();
    assert.deepEqual(vms.map((v) => v.name).sort(), [...names].sort());
    const vm7 = await admin.getVM('vm-7');
    assert.equal(vm7.cpu, 2);
    assert.equal(vm7.generation, updated.generation);
    assert.equal((await admin.getServiceAccount('ci')).token, 'ci-token');
    assert.equal((await admin.getClusterSettings()).schedulerProfile, 'distribute-load');
    assert.deepEqual((await admin.listEvents('vm-3')).events, [{ kind: 'test', timestamp: 1, payload: 'hello' }]);
    admin.close();
  } finally {
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('a worker coming back to its restarted controller resumes its TLS session: no full handshake', async () => {
  const dataDir = tempDir();
  let ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const port = new URL(ctl.url).port;
  const worker = new OrchardWorker({ client: adminOf(ctl.url, certificate), name: 'w', driver: new SyntheticDriver(), dataDir: tempDir(), slots: 1, logger: pino({ level: 'silent' }) });
  const handshakes = async (resumed: boolean) => {
    const metrics = await rawRequest({ url: ctl.url, certificate }, 'GET', '/metrics', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
    return Number(new RegExp(`^orchard_tls_handshakes_total\\{resumed="${resumed}"\\} (\\d+)$`, 'm').exec(metrics.body)?.[1] ?? 0);
  };
  try {
    await worker.start();
    await waitFor('the worker to connect', () => worker.connected, 10_000, 20);
    await ctl.kill('SIGKILL');
    await waitFor('the worker to see its watch drop', () => !worker.connected, 10_000, 20);
    ctl = await spawnController(dataDir, ['--listen', `127.0.0.1:${port}`]);
    await waitFor('the worker to reconnect', () => worker.connected, 15_000, 20);
    // Its watch came back on a resumed session (the tickets' keys come from the controller's key);
    // this test's own requests, each on a new connection, make full ones.
    assert.ok((await handshakes(true)) >= 1, 'a resumed handshake');
    assert.ok((await handshakes(false)) >= 1, 'full handshakes are counted apart');
  } finally {
    await worker.stop();
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('the CLI pins the certificate and refuses a controller whose certificate changed', async () => {
  const dataDir = tempDir();
  const home = tempDir('orchard-home-');
  const env = { ORCHARD_HOME: home };
  let ctl = await spawnController(dataDir);
  try {
    const create = ['context', 'create', ctl.url, '--name', 'local', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN];

    // Not a terminal and no flag: refuses, shows the fingerprint, saves nothing.
    let r = await runCLI(create, env);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, new RegExp(ctl.fingerprint));
    assert.match(r.stderr, /--trust-fingerprint/);
    // A wrong expected fingerprint is refused too.
    r = await runCLI([...create, '--trust-fingerprint', 'AA:BB'], env);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /not the expected/);
    r = await runCLI([...create, '--trust-fingerprint', ctl.fingerprint], env);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(statSync(join(home, 'orchard.yml')).mode & 0o777, 0o600);
    r = await runCLI(['list', 'vms'], env);
    assert.equal(r.code, 0, r.stderr);

    // Same data dir and port: same certificate, the context keeps working after a restart.
    const port = new URL(ctl.url).port;
    await ctl.kill('SIGTERM');
    ctl = await spawnController(dataDir, ['--listen', `127.0.0.1:${port}`]);
    r = await runCLI(['list', 'vms', '--context', 'local'], env);
    assert.equal(r.code, 0, r.stderr);

    // A new certificate (as an impostor would have): every call is refused with a clear error.
    await ctl.kill('SIGTERM');
    rmSync(join(dataDir, 'controller.crt'));
    rmSync(join(dataDir, 'controller.key'));
    ctl = await spawnController(dataDir, ['--listen', `127.0.0.1:${port}`]);
    r = await runCLI(['list', 'vms'], env);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /differs from the one pinned/);
    assert.match(r.stderr, new RegExp(ctl.fingerprint), 'names the certificate it was shown');
    assert.equal(r.stdout, '');
  } finally {
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  }
});
