// `orchard dev` as a newcomer runs it: one command starts a secure cluster with a qemu worker and
// writes the `dev` context; a VM from debian-dev runs its startup script; Ctrl-C (SIGINT) leaves no
// child process and no listening port behind; the next `orchard dev` finds the VM's record again. It
// names the web console, which the checkout serves.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev } from '../src/worker/images.ts';
import { devContext, freePort, heavyFile, ORCHARD_BIN, processesWith, rawRequest, runCLI, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs



const listening = (port: number) => readFileSync('/proc/net/tcp', 'utf8').split('\n').some((l) => l.includes(`:${port.toString(16).toUpperCase().padStart(4, '0')} `) && l.split(/\s+/)[4] === '0A');

function startDev(dataDir: string, port: number, env: Record<string, string>) {
  const proc = spawn(ORCHARD_BIN, ['dev', '--data-dir', dataDir, '--listen', `127.0.0.1:${port}`], { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return { proc, stderr: () => err, exited };
}

test('orchard dev: a working cluster in one command; Ctrl-C leaves nothing running', async () => {
  await buildDebianDev(TEST_IMAGES);
  const work = tempDir('orchard-dev-');
  const dataDir = join(work, '.dev-data');
  const env = { ORCHARD_HOME: join(work, 'home') };
  const port = await freePort();
  // The image cache of the test suite stands in for the first run's image build.
  mkdirSync(dataDir, { recursive: true });
  symlinkSync(TEST_IMAGES, join(dataDir, 'images'));
  let dev = startDev(dataDir, port, env);
  try {
    await waitFor('orchard dev to be ready', () => /Ctrl-C stops everything/.test(dev.stderr()), 60_000, 100);
    assert.match(dev.stderr(), /controller https:\/\/127\.0\.0\.1:\d+ \(certificate SHA-256 [0-9A-F:]+\)/);
    const { config, api, vmRunning } = devContext(env.ORCHARD_HOME);
    assert.equal(config['default-context'], 'dev');
    // (Kept as upstream's CLI keeps it: base64 of the PEM.)
    assert.match(Buffer.from(config.contexts.dev.certificate ?? '', 'base64').toString(), /BEGIN CERTIFICATE/, 'the dev context pins the certificate');
    assert.ok((config.contexts.dev.serviceAccountToken ?? '').length >= 40, 'a generated admin token');
    // The web console, served from the checkout (bundled when first asked for).
    const consoleURL = /web console: (https:\/\/\S+\/) /.exec(dev.stderr())?.[1];
    assert.ok(consoleURL, dev.stderr());
    const page = await rawRequest(api, 'GET', new URL(consoleURL).pathname);
    assert.equal(page.status, 200);
    assert.match(page.body, /<div id="app"><\/div>/);

    // Waits ask the API from this process (`orchard list vms` below shows the result as a user sees it).
    const demoRuns = () => vmRunning('demo');

    // The quick start, literally: defaults (4 vCPUs, 8 GiB) and all.
    let r = await runCLI(['create', 'vm', 'demo', '--image', 'debian-dev'], env);
    assert.equal(r.code, 0, r.stderr);
    await waitFor('demo to run', demoRuns, 180_000, 200);
    r = await runCLI(['ssh', 'vm', 'demo', '--', 'echo', 'it', 'works'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'it works\n');
    // Resumed from the warm-start snapshot of an 8 GiB template: the guest has its memory (nothing the
    // template's making left in it).
    r = await runCLI(['ssh', 'vm', 'demo', '--', 'cat', '/proc/meminfo'], env);
    const availableKiB = Number(/^MemAvailable:\s+(\d+) kB$/m.exec(r.stdout)?.[1]);
    assert.ok(availableKiB > 6 * 1024 * 1024, `MemAvailable of 8 GiB: ${availableKiB} kB\n${r.stdout}${r.stderr}`);
    r = await runCLI(['list', 'vms'], env);
    assert.match(r.stdout, /^demo\s+debian-dev\s+4\s+8192\s+running\s+dev-worker-1/m);
    assert.equal(processesWith(dataDir).length > 0, true, 'qemu runs from the dev data dir');

    // Ctrl-C: everything stops; no qemu, no port.
    dev.proc.kill('SIGINT');
    assert.equal(await dev.exited, 0, dev.stderr());
    assert.deepEqual(processesWith(dataDir), [], 'no process of the dev cluster is left');
    assert.equal(listening(port), false, 'the port is free');

    // The next run finds the VM's record and boots it again.
    dev = startDev(dataDir, port, env);
    await waitFor('orchard dev to be ready again', () => /Ctrl-C stops everything/.test(dev.stderr()), 60_000, 100);
    await waitFor('demo to run again', demoRuns, 180_000, 200);
    r = await runCLI(['delete', 'vm', 'demo'], env);
    assert.equal(r.code, 0, r.stderr);
    await waitFor("demo's disk to go", () => !readdirSync(join(dataDir, 'worker-1', 'vms')).some((d) => d.startsWith('orchard-demo-')), 30_000, 100);
    dev.proc.kill('SIGINT');
    assert.equal(await dev.exited, 0, dev.stderr());
    assert.deepEqual(processesWith(dataDir), []);
  } finally {
    if (dev.proc.exitCode === null) {
      dev.proc.kill('SIGKILL');
      await dev.exited;
    }
    for (const pid of processesWith(dataDir)) process.kill(Number(pid), 'SIGKILL');
    if (existsSync(work)) rmSync(work, { recursive: true, force: true });
  }
});
