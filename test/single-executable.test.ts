// Orchard as one file: dist/orchard-linux-x64 (built here when missing or stale, `npm run build --
// --host-only`), copied alone into an empty directory and run with a PATH in which there is no
// `node`, a fresh HOME and no other environment, drives a whole cluster: `controller run`, a `worker
// run` (qemu) joined with a bootstrap token, a real debian-dev VM (create, list, logs, ssh,
// port-forward with the real OpenSSH client, delete), `image push` to a registry and a pre-pull on
// the worker (its hashing thread's code is inside the executable), `image build` from the embedded script, the
// OpenAPI document, and `orchard dev --synthetic`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { buildDebianDev, resolveImage } from '../src/worker/images.ts';
import { startRegistry } from './registry.ts';
import { freePort, heavyFile, linkTestSnapshots, processesWith, rawRequest, ROOT, spawnOrchard, tempDir, TEST_IMAGES, waitFor, type OrchardProcess } from './helpers.ts';

await heavyFile(); // boots VMs

const execFileP = promisify(execFile);
const EXECUTABLE = join(ROOT, 'dist', `orchard-linux-${process.arch}`);
const TOKEN = 'single-executable-admin-token';

/** What `--version` of an up-to-date executable names as its commit. */
function expectedCommit(): string {
  try {
    const git = (...a: string[]) => execFileSync('git', a, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return git('rev-parse', '--short=12', 'HEAD') + (git('status', '--porcelain', '--untracked-files=no') ? '-dirty' : '');
  } catch {
    return 'unknown';
  }
}

function newestSource(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestSource(p) : statSync(p).mtimeMs);
  }
  return newest;
}

/** Builds this host's executable unless it is newer than every input (bin/orchard too: its Node flags) and names the current commit. */
function ensureBuilt(): { built: boolean; ms: number } {
  const inputs = Math.max(newestSource(join(ROOT, 'src')), ...['package.json', 'package-lock.json', 'scripts/build.ts', 'bin/orchard'].map((f) => statSync(join(ROOT, f)).mtimeMs));
  if (existsSync(EXECUTABLE) && statSync(EXECUTABLE).mtimeMs > inputs) {
    const version = execFileSync(EXECUTABLE, ['--version'], { encoding: 'utf8', env: {} });
    if (version.includes(`(commit ${expectedCommit()})`)) return { built: false, ms: 0 };
  }
  const t0 = Date.now();
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'build.ts'), '--host-only'], { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  return { built: true, ms: Date.now() - t0 };
}

/**
 * A directory of links to every program of the system's usual directories except Node's (the
 * machine's /usr/bin/node is another Node): the workers' tools (QEMU, pasta, nsenter, socat, the
 * image script's coreutils) are there, a `node` is not.
 */
function pathWithoutNode(dir: string): string {
  mkdirSync(dir);
  for (const d of ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin']) {
    if (!existsSync(d)) continue;
    for (const name of readdirSync(d)) {
      if (/^(node|nodejs|npm|npx|corepack)$/.test(name) || existsSync(join(dir, name))) continue;
      symlinkSync(join(d, name), join(dir, name));
    }
  }
  return dir;
}



test('the single executable runs a whole cluster with no node on the PATH', { timeout: 600_000 }, async (t) => {
  const build = ensureBuilt();
  t.diagnostic(build.built ? `built ${EXECUTABLE} in ${build.ms} ms` : `${EXECUTABLE} is up to date`);
  await buildDebianDev(TEST_IMAGES);
  const sshKey = (await resolveImage(TEST_IMAGES, 'debian-dev')).sshKey;
  assert.ok(sshKey, 'the debian-dev image has an SSH key');

  const work = tempDir('orchard-sea-');
  const binDir = join(work, 'bin');
  mkdirSync(binDir);
  const orchard = join(binDir, 'orchard');
  copyFileSync(EXECUTABLE, orchard);
  // Nothing but what a user of the one file has: no checkout, no node, no NODE_* variables.
  const env: Record<string, string> = { PATH: `${binDir}:${pathWithoutNode(join(work, 'path'))}`, HOME: join(work, 'home'), LANG: 'C.UTF-8' };
  mkdirSync(env.HOME);
  const noNode = await execFileP('sh', ['-c', 'command -v node || echo none'], { env });
  assert.equal(noNode.stdout.trim(), 'none', 'no node on the PATH');
  assert.equal((await execFileP('sh', ['-c', 'command -v orchard'], { env })).stdout.trim(), orchard);

  const live = new Set<OrchardProcess>();
  // Run from an empty directory: nothing of the checkout is at hand.
  const start = (args: string[], extraEnv: Record<string, string> = {}, input?: string) =>
    spawnOrchard(args, { bin: 'orchard', cwd: work, env: { ...env, ...extraEnv }, inheritEnv: false, input, live });
  const run = (args: string[], input?: string) =>
    new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      execFile('orchard', args, { cwd: work, env, timeout: 60_000 }, (err, stdout, stderr) => {
        if (err && typeof err.code !== 'number') return reject(err);
        resolve({ code: err ? (err.code as number) : 0, stdout, stderr });
      }).stdin!.end(input ?? '');
    });
  const ok = async (args: string[], input?: string) => {
    const r = await run(args, input);
    assert.equal(r.code, 0, `orchard ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };

  const controllerDir = join(work, 'controller');
  const workerDir = join(work, 'worker');
  mkdirSync(workerDir);
  symlinkSync(TEST_IMAGES, join(workerDir, 'images'));
  await linkTestSnapshots(workerDir); // (the suite's warm-start snapshot, as the image is)
  try {
    const version = await run(['--version']);
    assert.match(version.stdout, new RegExp(`^orchard \\d+\\.\\d+\\.\\d+\\S* \\(commit ${expectedCommit()}\\)\\n$`));
    // Nothing on stderr: V8 took the main script's code cache (one made under other V8 flags than the
    // executable runs with is rejected, and Node says so on every command).
    assert.equal(version.stderr, '');
    assert.match(await ok(['--help']), /Usage: orchard/);

    // The controller; the admin's context; a worker account and its bootstrap token.
    // ORCHARD_DEBUG: the second script says when V8 rejected its code cache.
    const controller = start(['controller', 'run', '--data-dir', controllerDir, '--listen', '127.0.0.1:0'], { ORCHARD_BOOTSTRAP_ADMIN_TOKEN: TOKEN, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_DEBUG: '1' });
    const url = (await controller.waitOutput(/listening on (https:\/\/127\.0\.0\.1:\d+)/))[1];
    assert.doesNotMatch(controller.output(), /code cache|Warning/, 'the code caches were taken');
    await ok(['context', 'create', url, '--name', 'sea', '--service-account-name', 'bootstrap-admin', '--service-account-token', TOKEN, '--yes']);
    assert.ok(existsSync(join(env.HOME, '.orchard', 'orchard.yml')), 'the context is in the fresh HOME');
    await ok(['create', 'service-account', 'worker', '--roles', 'compute:read', '--roles', 'compute:write']);
    const bootstrapToken = (await ok(['get', 'bootstrap-token', 'worker'])).trim();

    // The OpenAPI document and the build's version come from inside the executable.
    const certificate = readFileSync(join(controllerDir, 'controller.crt'), 'utf8');
    const openapi = await rawRequest({ url, certificate }, 'GET', '/v1/openapi.yaml', { auth: ['bootstrap-admin', TOKEN] });
    assert.equal(openapi.status, 200);
    assert.match(openapi.body, /^openapi: 3\.0\.3\n/);
    assert.match(openapi.body, /\/v1\/vms\/\{name\}:/);
    // The web console: its page and bundle are inside the executable (nothing to build or fetch).
    const page = await rawRequest({ url, certificate }, 'GET', '/');
    assert.equal(page.status, 200);
    const bundle = /src="(\/console\/assets\/app-[^"]+\.js)"/.exec(page.body);
    assert.ok(bundle, page.body);
    const script = await rawRequest({ url, certificate }, 'GET', bundle[1]);
    assert.equal(script.status, 200);
    assert.match(String(script.headers['content-type']), /^text\/javascript/);
    assert.ok(script.body.length > 1000, 'the bundle is there');
    // Its compressed copies too, made by the build: served to a browser that takes them.
    const compressed = await rawRequest({ url, certificate }, 'GET', bundle[1], { headers: { 'accept-encoding': 'gzip, deflate, br' } });
    assert.equal(compressed.status, 200);
    assert.equal(compressed.headers['content-encoding'], 'br');
    assert.equal(compressed.headers.vary, 'accept-encoding');
    assert.ok(Number(compressed.headers['content-length']) < Buffer.byteLength(script.body) / 2, `br ${String(compressed.headers['content-length'])} of ${Buffer.byteLength(script.body)} bytes`);
    const info = await rawRequest({ url, certificate }, 'GET', '/v1/controller/info', { auth: ['bootstrap-admin', TOKEN] });
    assert.equal((info.json as { commit: string }).commit, expectedCommit());

    // A qemu worker joined with the bootstrap token (from stdin).
    const worker = start(['worker', 'run', url, '--bootstrap-token-stdin', '--name', 'sea-worker', '--runtime', 'qemu', '--data-dir', workerDir, '--slots', '2'], { ORCHARD_LOG_LEVEL: 'warn' }, bootstrapToken);
    await waitFor('the worker to register', async () => /^sea-worker\s/m.test((await run(['list', 'workers'])).stdout), 30_000, 200);

    // A real VM: create, list, logs, ssh, port-forward, delete.
    await ok(['create', 'vm', 'one', '--image', 'debian-dev', '--cpu', '1', '--memory', '512', '--startup-script', 'echo "hello from $(hostname)"']);
    await waitFor('the VM to run', async () => {
      const vm = JSON.parse((await ok(['get', 'vm', 'one', '--output', 'json'])).trim()) as { status: string; status_message?: string };
      assert.notEqual(vm.status, 'failed', vm.status_message);
      return vm.status === 'running';
    }, 180_000, 500);
    assert.match(await ok(['list', 'vms']), /^one\s+debian-dev\s+1\s+512\s+running\s+sea-worker/m);
    await waitFor('the startup script output', async () => /log_line: hello from /.test(await ok(['logs', 'vm', 'one'])), 60_000, 500);

    const ssh = await run(['ssh', 'vm', 'one', '--', 'echo "$(whoami) on $(uname -s)"; exit 3']);
    assert.equal(ssh.code, 3, ssh.stderr);
    assert.equal(ssh.stdout, 'admin on Linux\n');

    const forward = start(['port-forward', 'vm', 'one', '0:22']);
    const port = (await forward.waitOutput(/forwarding 127\.0\.0\.1:(\d+) -> one:22/))[1];
    const viaForward = await execFileP('ssh', ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR',
      '-i', sshKey, '-p', port, 'admin@127.0.0.1', 'echo through the forward'], { timeout: 60_000 });
    assert.equal(viaForward.stdout, 'through the forward\n');
    assert.equal(await forward.stop('SIGINT'), 0, forward.output());

    const localName = JSON.parse(await ok(['get', 'vm', 'one', '--output', 'json'])).localName as string;
    assert.equal(processesWith(localName).length, 1, 'one qemu process runs the VM');
    await ok(['delete', 'vm', 'one']);
    await waitFor('the qemu process to go', () => processesWith(localName).length === 0, 30_000, 100);
    await waitFor('the VM directory to go', () => !existsSync(join(workerDir, 'vms', localName)), 10_000, 100);

    // Registries from the executable: push debian-dev (this host's image) to a registry on loopback,
    // then pre-pull it on the worker (the blob's digest checked in a worker thread, code inside the executable).
    const registry = await startRegistry();
    try {
      const ref = `${registry.host}/sea/debian-dev:v1`;
      const push = await run(['image', 'push', 'debian-dev', ref, '--insecure', '--data-dir', workerDir]);
      assert.equal(push.code, 0, push.stderr);
      await ok(['create', 'registry', registry.host, '--insecure']);
      const pull = await run(['image', 'pull', ref]);
      assert.equal(pull.code, 0, pull.stderr);
      assert.match(pull.stdout, /^sea-worker: done: /m, pull.stdout);
      assert.ok(JSON.parse(await ok(['get', 'worker', 'sea-worker', '--output', 'json'])).images.includes(ref), 'the worker holds the pulled image');
    } finally {
      await registry.stop();
    }

    // The image script inside the executable is the checkout's, byte for byte: same stamp, cached.
    const imageBuild = await run(['image', 'build', 'debian-dev', '--data-dir', workerDir]);
    assert.equal(imageBuild.code, 0, imageBuild.stderr);
    assert.match(imageBuild.stderr, /debian-dev is up to date/);

    assert.equal(await worker.stop(), 0, worker.output());
    assert.equal(await controller.stop(), 0, controller.output());

    // orchard dev --synthetic: the whole cluster in one process of the executable.
    const devPort = await freePort();
    const dev = start(['dev', '--synthetic', '--data-dir', join(work, 'dev-data'), '--listen', `127.0.0.1:${devPort}`]);
    await dev.waitOutput(/Ctrl-C stops everything/, 60_000);
    await ok(['create', 'vm', 'synthetic-1', '--image', 'anything']);
    await waitFor('the synthetic VM to run', async () => /^synthetic-1\s.*\srunning\s+dev-worker-1/m.test(await ok(['list', 'vms'])), 30_000, 200);
    assert.equal(await dev.stop('SIGINT'), 0, dev.output());
  } finally {
    for (const p of [...live]) await p.stop('SIGKILL');
    for (const pid of processesWith(workerDir)) process.kill(Number(pid), 'SIGKILL');
    rmSync(work, { recursive: true, force: true });
  }
});
