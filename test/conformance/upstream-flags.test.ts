// Upstream 0.55's command lines, as its users type them: `get vm NAME/FIELD`, Go's `--flag=false`,
// `set cluster-settings --host-dir-policies` (adds), `controller run --api-prefix` (the whole API,
// WebSockets included, under the prefix) and `--debug`, `worker run --default-cpu/--default-memory`,
// `--log-file`, `--user`, `--no-pki`, and the flags that are refused with a reason.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { encodeBootstrapToken } from '../../src/api/bootstrap-token.ts';
import { HOST_KEY_FILE, loadHostKey } from '../../src/controller/ssh-jump.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, ORCHARD_BIN, rawRequest, runCLI, spawnController, tempDir, waitFor } from '../helpers.ts';

test('get vm|worker|service-account NAME/FIELD, Go boolean forms, --host-dir-policies adds', async () => {
  const c = await inProcessController();
  try {
    const env = { ORCHARD_HOME: tempDir(), ORCHARD_URL: c.ctl.url, ORCHARD_SERVICE_ACCOUNT_NAME: 'bootstrap-admin', ORCHARD_SERVICE_ACCOUNT_TOKEN: ADMIN_TOKEN };
    const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 'admin', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(ctx.code, 0, ctx.stderr);
    // Go's boolean forms: --nested=true is --nested, --headless=false leaves it off.
    const created = await runCLI(['create', 'vm', 'macos', '--image', 'ghcr.io/cirruslabs/macos-tahoe-base:latest', '--nested=true', '--headless=false', '--random-serial=1'], env);
    assert.equal(created.code, 0, created.stderr);
    const vm = await c.admin.getVM('macos');
    assert.deepEqual([vm.nested, vm.headless, vm.randomSerial], [true, undefined, true]);

    const get = async (...args: string[]) => {
      const r = await runCLI(['get', ...args], env);
      assert.equal(r.code, 0, r.stderr);
      return r.stdout;
    };
    // As upstream's `orchard get vm macos/status`: JSON keys or Go field names, any case.
    assert.equal(await get('vm', 'macos/status'), 'pending\n');
    assert.equal(await get('vm', 'macos/image'), 'ghcr.io/cirruslabs/macos-tahoe-base:latest\n');
    assert.equal(await get('vm', 'macos/StatusMessage'), `${vm.status_message}\n`);
    assert.equal(await get('vm', 'macos/status_message'), `${vm.status_message}\n`);
    assert.equal(await get('vm', 'macos/UID'), `${vm.uid}\n`);
    const missing = await runCLI(['get', 'vm', 'macos/nonsense'], env);
    assert.notEqual(missing.code, 0);
    assert.match(missing.stderr, /failed to find the specified field "nonsense"/);

    await c.admin.createServiceAccount({ name: 'workers', roles: ['compute:read', 'compute:write'], token: 'the-workers-token' });
    assert.equal(await get('service-account', 'workers/token'), 'the-workers-token\n');
    await c.admin.registerWorker({ name: 'dev-mini.local', machine_id: 'm-1', resources: { 'org.cirruslabs.tart-vms': 2 } });
    assert.equal(await get('worker', 'dev-mini.local/name'), 'dev-mini.local\n');
    assert.equal(await get('worker', 'dev-mini.local/MachineID'), 'm-1\n');

    // --host-dir-policies adds to the policies, as upstream's; --host-dir-policy replaces them.
    for (const args of [['--host-dir-policy', '/srv'], ['--host-dir-policies', '/Users/ci/sources:ro,/tmp']]) {
      const r = await runCLI(['set', 'cluster-settings', ...args], env);
      assert.equal(r.code, 0, r.stderr);
    }
    assert.deepEqual((await c.admin.getClusterSettings()).hostDirPolicies, [{ pathPrefix: '/srv' }, { pathPrefix: '/Users/ci/sources', ro: true }, { pathPrefix: '/tmp' }]);
  } finally {
    await c.close();
    c.cleanup();
  }
});

/** `orchard worker run …` as a child process. */
function spawnWorker(args: string[], token: string) {
  const proc = spawn(ORCHARD_BIN, ['worker', 'run', ...args], {
    env: { ...process.env, ORCHARD_BOOTSTRAP_TOKEN: token, ORCHARD_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
  proc.stderr.on('data', (c: Buffer) => (out += c.toString()));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return {
    proc,
    output: () => out,
    exited,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}

test('controller run --api-prefix serves the whole API (REST and WebSockets) under the prefix; a worker with --default-cpu/--default-memory and --log-file', async () => {
  const dataDir = tempDir();
  const ctl = await spawnController(dataDir, ['--api-prefix', '/orchard/']);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const dir = tempDir();
  chmodSync(dir, 0o755);
  const logFile = join(dir, 'log', 'worker.log');
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
  // The URL as upstream's users type it for a prefixed controller: host:port/prefix.
  const worker = spawnWorker([ctl.url.replace(/^https:\/\//, ''), '--synthetic', '--name', 'w-prefix', '--data-dir', join(dir, 'data'), '--default-cpu', '2', '--default-memory', '1536', '--log-file', logFile], token);
  try {
    assert.match(ctl.url, /^https:\/\/127\.0\.0\.1:\d+\/orchard$/, 'the printed URL has the prefix');
    const base = { url: ctl.url.replace(/\/orchard$/, ''), certificate };
    const at = async (path: string, auth = true) => rawRequest(base, 'GET', path, { auth: auth ? ['bootstrap-admin', ADMIN_TOKEN] : undefined });
    assert.equal((await at('/orchard/v1/', false)).status, 200);
    assert.equal((await at('/orchard/v1/controller/info')).status, 200);
    assert.equal((await at('/orchard/v1/openapi.yaml')).status, 200);
    assert.equal((await at('/v1/controller/info')).status, 404, 'nothing is served outside the prefix');
    assert.equal((await at('/orchardx/v1/controller/info')).status, 404);

    // The worker registers and holds its watch WebSocket under the prefix; a VM that asks for no cpu
    // or memory gets the worker's defaults; the CLI works through a context with the prefix.
    const admin = clientOf({ url: ctl.url, certificate }, 'bootstrap-admin', ADMIN_TOKEN);
    const w = await waitFor('the worker registered', () => admin.getWorker('w-prefix').catch(() => undefined), 20_000);
    assert.deepEqual([w.defaultCPU, w.defaultMemory], [2, 1536]);
    const env = { ORCHARD_HOME: tempDir() };
    const ctx = await runCLI(['context', 'create', ctl.url, '--name', 'prefixed', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', ctl.fingerprint], env);
    assert.equal(ctx.code, 0, ctx.stderr);
    const created = await runCLI(['create', 'vm', 'defaults', '--image', 'img', '--runtime', 'synthetic'], env);
    assert.equal(created.code, 0, created.stderr);
    const running = await waitFor('the VM running', async () => {
      const vm = await admin.getVM('defaults');
      return vm.status === 'running' ? vm : undefined;
    }, 20_000);
    assert.deepEqual([running.cpu, running.memory, running.assignedCPU, running.assignedMemory], [undefined, undefined, 2, 1536]);
    const listed = await runCLI(['list', 'vms'], env);
    assert.equal(listed.code, 0, listed.stderr);
    assert.match(listed.stdout, /^defaults\s+img\s+2\s+1536\s+running\s+w-prefix/m);
    // A port-forward (client WebSocket, worker dial-back WebSocket) under the prefix.
    const ip = await runCLI(['get', 'vm', 'defaults', '--ip'], env);
    assert.equal(ip.code, 0, ip.stderr);
    admin.close();

    // The worker's log is in its --log-file.
    const lines = readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { msg: string });
    assert.ok(lines.some((l) => l.msg === 'worker registered'), 'the worker logs to its --log-file');
    assert.doesNotMatch(worker.output(), /worker registered/, 'and not to its standard streams');
  } finally {
    await worker.stop();
    await ctl.kill('SIGTERM');
  }
});

test('controller --data-dir DIR run --debug --ssh-host-key FILE: the data dir given before run (as upstream), debug log level, the jump host key from the file', async () => {
  const dataDir = tempDir();
  // A host key made elsewhere (another data dir), given as a file.
  const keyDir = tempDir();
  const key = loadHostKey(keyDir);
  const proc = spawn(ORCHARD_BIN, ['controller', '--data-dir', dataDir, 'run', '--listen', '127.0.0.1:0', '--debug', '--listen-ssh', '127.0.0.1:0', '--ssh-host-key', join(keyDir, HOST_KEY_FILE)], {
    env: { ...process.env, ORCHARD_BOOTSTRAP_ADMIN_TOKEN: ADMIN_TOKEN, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_HOME: tempDir() },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
  proc.stderr.on('data', (c: Buffer) => (out += c.toString()));
  try {
    await waitFor('the controller listening', () => /listening on/.test(out) || undefined, 20_000);
    const lines = out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { level: number; msg: string });
    assert.ok(lines.some((l) => l.level === 20 && l.msg === 'starting the controller'), out);
    assert.ok(existsSync(join(dataDir, 'controller.crt')), 'the data dir given before run is used');
    await waitFor('the jump host', () => /SSH jump host on/.test(out) || undefined, 10_000);
    assert.ok(out.includes(`host key ${key.fingerprint}`), `the jump host uses the key from --ssh-host-key (${key.fingerprint}): ${out}`);
    assert.ok(!existsSync(join(dataDir, HOST_KEY_FILE)), 'none is made in the data dir');
  } finally {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
  }
});

test('worker run --user drops root to that user; --no-pki needs a certificate; flags that cannot apply are refused with why', async () => {
  const dataDir = tempDir();
  const ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  try {
    const dir = tempDir();
    chmodSync(dir, 0o777);
    const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
    const worker = spawnWorker([ctl.url, '--synthetic', '--name', 'w-user', '--user', 'nobody', '--data-dir', join(dir, 'data'), '--log-file', join(dir, 'w.log')], token);
    try {
      if (process.getuid?.() === 0) {
        const admin = clientOf({ url: ctl.url, certificate }, 'bootstrap-admin', ADMIN_TOKEN);
        await waitFor('the worker registered', () => admin.getWorker('w-user').catch(() => undefined), 20_000);
        admin.close();
        // The worker process itself (not a helper) runs as nobody, and what it made belongs to nobody.
        const status = readFileSync(`/proc/${worker.proc.pid}/status`, 'utf8');
        const nobody = Number(/^Uid:\s+(\d+)/m.exec(status)![1]);
        assert.notEqual(nobody, 0);
        assert.match(status, new RegExp(`^Uid:\\s+${nobody}\\s+${nobody}\\s+${nobody}\\s+${nobody}$`, 'm'), 'real, effective, saved and fs uid all dropped');
        assert.equal(statSync(join(dir, 'w.log')).uid, nobody);
        assert.equal(statSync(join(dir, 'data', 'machine-id')).uid, nobody);
        assert.match(worker.output(), /running as nobody/);
      } else {
        assert.equal(await worker.exited, 1);
        assert.match(worker.output(), /only a worker started as root can drop its privileges/);
      }
    } finally {
      await worker.stop();
    }

    const noCert = spawnWorker([ctl.url, '--synthetic', '--no-pki', '--data-dir', join(dir, 'x')], encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN }));
    assert.equal(await noCert.exited, 2);
    assert.match(noCert.output(), /--no-pki was given, but the bootstrap token carries no certificate/);

    for (const [args, why] of [
      [['--insecure-ssh-no-client-auth'], /always authenticates/],
      [['--no-experimental-rpc-v2'], /only the v2 worker protocol/],
      [['--experimental-ping-interval', '1s'], /cannot be less than 5 seconds/],
    ] as const) {
      const r = await runCLI(['controller', 'run', '--data-dir', tempDir(), '--listen', '127.0.0.1:0', ...args]);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, why);
    }
    assert.ok(existsSync(join(dataDir, 'controller.crt')));
  } finally {
    await ctl.kill('SIGTERM');
  }
});
