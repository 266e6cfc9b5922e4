// The connect commands of the real CLI (bin/orchard) against one real debian-dev guest:
// `ssh vm -- CMD` (output, exit code), `port-forward vm` with the real OpenSSH client and scp
// (8 MiB both ways, same sha256), `vnc vm --no-open` (an RFB handshake through the forward, and
// a screenshot by a real VNC client that shows the guest's login prompt),
// `get vm --ip`; unknown VM, missing role, and a worker killed (kill -9) in the middle of a transfer.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, createReadStream, createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { resolveImage } from '../src/worker/images.ts';
import { ADMIN_TOKEN, heavyFile, ORCHARD_BIN, qemuCluster, runCLI, spawnOrchard, tempDir, TEST_IMAGES, waitFor, type OrchardProcess } from './helpers.ts';

await heavyFile(); // boots VMs

const execFileP = promisify(execFile);
const VM = 'web-1';

/** Long-running CLI processes (port-forward, vnc), killed by the suite at the latest. */
const live = new Set<OrchardProcess>();
const spawnCLI = (args: string[], env: Record<string, string>) => spawnOrchard(args, { env, live });

function fail(message: string): never {
  throw new Error(message);
}

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

describe('connect commands against a real guest', { timeout: 240_000 }, () => {
  let q: Awaited<ReturnType<typeof qemuCluster>>;
  let home: string;
  let env: Record<string, string>;
  let sshKey: string;

  before(async () => {
    q = await qemuCluster();
    home = tempDir('orchard-home-');
    env = { ORCHARD_HOME: home };
    sshKey = (await resolveImage(TEST_IMAGES, 'debian-dev')).sshKey ?? fail('the debian-dev image has no SSH key');
    const [vm] = await Promise.all([
      q.runningVM(VM),
      (async () => {
        const ctx = await runCLI(['context', 'create', q.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
        assert.equal(ctx.code, 0, ctx.stderr);
        await q.admin.createServiceAccount({ name: 'reader', roles: ['compute:read'], token: 'reader-token' });
        const r = await runCLI(['context', 'create', q.ctl.url, '--name', 'reader', '--service-account-name', 'reader', '--service-account-token', 'reader-token', '--yes', '--no-default'], env);
        assert.equal(r.code, 0, r.stderr);
      })(),
    ]);
    assert.equal(vm.status, 'running');
  });

  after(async () => {
    for (const p of [...live]) await p.stop('SIGKILL');
    await q?.close();
    if (home) rmSync(home, { recursive: true, force: true });
  });

  test('ssh vm NAME -- CMD: output on stdout/stderr, the remote exit code, host key with -v, stdin, key auth', async () => {
    const r = await runCLI(['ssh', 'vm', VM, '-v', '--', 'uname -a; echo to-stderr >&2; exit 3'], env);
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stdout, /^Linux \S+ .*GNU\/Linux\n$/);
    assert.match(r.stderr, /to-stderr/);
    assert.match(r.stderr, /host key ssh-ed25519 SHA256:[A-Za-z0-9+/]{43} /);

    // Without -v the host key is not shown; stdin reaches the command.
    const cat = await runCLI(['ssh', 'vm', VM, '--', 'wc -c; whoami'], env, 'hello world\n');
    assert.equal(cat.code, 0, cat.stderr);
    assert.equal(cat.stdout, '12\nadmin\n');
    assert.doesNotMatch(cat.stderr, /SHA256/);

    const root = await runCLI(['ssh', 'vm', VM, '-u', 'root', '-i', sshKey, '--', 'whoami'], env);
    assert.equal(root.code, 0, root.stderr);
    assert.equal(root.stdout, 'root\n');

    const wrong = await runCLI(['ssh', 'vm', VM, '--password', 'wrong', '--', 'true'], env);
    assert.equal(wrong.code, 255);
    assert.match(wrong.stderr, /authentication as "admin" .* failed/);
  });

  test('port-forward vm NAME 0:22: the real OpenSSH client logs in; connections the guest closes end at once; scp copies 8 MiB in and out intact; rsync works', async () => {
    const pf = spawnCLI(['port-forward', 'vm', VM, '0:22'], env);
    const dir = mkdtempSync(join(home, 'scp-'));
    try {
      const port = Number((await pf.waitOutput(/forwarding 127\.0\.0\.1:(\d+) -> web-1:22/))[1]);
      const opts = ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR', '-i', sshKey];
      const ssh = (cmd: string) => execFileP('ssh', [...opts, '-p', String(port), 'admin@127.0.0.1', cmd], { timeout: 60_000 });
      const login = await ssh('echo "$(whoami)@$(hostname)"; uname -s');
      assert.match(login.stdout, /^admin@\S+\nLinux\n$/);
      // A dozen connections at once, all on the forward's one mux connection (dropbear answers 5 unauthenticated
      // ones per address at a time with its banner and closes the others). Each ends at once, those the guest
      // closes too: its close reaches the client then, not when the worker's socat times out (-t 60).
      // (A connection still open after 15 s is given up on, and named.)
      /** Whether `s` closes within 15 s; one still open then is destroyed. */
      const closesWithin15s = (s: net.Socket) =>
        new Promise<boolean>((resolve) => {
          const timer = setTimeout(() => {
            resolve(false);
            s.destroy();
          }, 15_000);
          s.once('close', () => {
            clearTimeout(timer);
            resolve(true);
          });
        });
      const STILL_OPEN = 'still open after 15 s';
      const banners = await Promise.all(Array.from({ length: 12 }, () => new Promise<string>((resolve, reject) => {
        const s = net.connect(port, '127.0.0.1');
        let got = '';
        s.on('data', (d: Buffer) => {
          got += d.toString();
          s.destroy();
        });
        s.once('error', reject);
        void closesWithin15s(s).then((closed) => resolve(closed ? got : STILL_OPEN));
      })));
      assert.ok(!banners.includes(STILL_OPEN) && banners.filter((b) => b.startsWith('SSH-2.0-')).length >= 5, banners.map((b) => JSON.stringify(b.split('\r\n')[0])).join(' '));
      // One the guest closes first, whatever the others did: dropbear hangs up on an SSH-1 client.
      const refused = net.connect(port, '127.0.0.1');
      refused.on('error', () => {});
      let answer = '';
      refused.on('data', (d: Buffer) => (answer += d.toString()));
      refused.write('SSH-1.5-orchard-test\r\n');
      const closed = await closesWithin15s(refused);
      assert.ok(closed, `the guest's close did not reach the client in 15 s (it got ${JSON.stringify(answer)})`);
      // (Its banner first, unless dropbear still counts the dozen above and refuses it outright.)
      assert.match(answer, /^(SSH-2\.0-dropbear.*)?$/s);

      const src = join(dir, 'random.bin');
      const out = createWriteStream(src);
      // 8 MiB: more than the tunnel's 1 MiB window (and every buffer on the way) many times over, each way
      // (32 MiB took 15–23 s of the suite's time: the guest's sshd under TCG is the bottleneck).
      for (let i = 0; i < 8; i++) if (!out.write(randomBytes(1024 * 1024))) await new Promise<void>((r) => out.once('drain', () => r()));
      await new Promise<void>((r) => out.end(() => r()));
      const want = await sha256(src);

      const t0 = Date.now();
      await execFileP('scp', [...opts, '-P', String(port), src, 'admin@127.0.0.1:/home/admin/random.bin'], { timeout: 120_000 });
      const t1 = Date.now();
      assert.equal((await ssh('sha256sum /home/admin/random.bin')).stdout.split(' ')[0], want);
      await execFileP('scp', [...opts, '-P', String(port), 'admin@127.0.0.1:/home/admin/random.bin', join(dir, 'back.bin')], { timeout: 120_000 });
      const t2 = Date.now();
      assert.equal(await sha256(join(dir, 'back.bin')), want);
      // rsync over the same forward (the guest has rsync, as the README says): a directory, then an update.
      const tree = join(dir, 'tree');
      mkdirSync(join(tree, 'sub'), { recursive: true });
      writeFileSync(join(tree, 'a.txt'), 'first\n');
      writeFileSync(join(tree, 'sub', 'b.txt'), 'second\n');
      const rsync = () => execFileP('rsync', ['-a', '-e', ['ssh', ...opts, '-p', String(port)].join(' '), `${tree}/`, 'admin@127.0.0.1:/home/admin/tree/'], { timeout: 60_000 });
      await rsync();
      writeFileSync(join(tree, 'a.txt'), 'changed\n');
      await rsync();
      assert.equal((await ssh('cat /home/admin/tree/a.txt /home/admin/tree/sub/b.txt')).stdout, 'changed\nsecond\n');
      await ssh('rm -rf /home/admin/random.bin /home/admin/tree');
      console.log(`scp 8 MiB through the tunnel: in ${((t1 - t0) / 1000).toFixed(1)} s, out ${((t2 - t1) / 1000).toFixed(1)} s (the guest's sshd under TCG is the bottleneck)`);
      assert.doesNotMatch(pf.stderr(), /orchard:|Warning/, 'no tunnel errors, no warnings (as a listener leak\'s)');
    } finally {
      assert.equal(await pf.stop('SIGINT'), 0);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('vnc vm NAME --no-open: prints a vnc:// URL; an RFB handshake works through it; the screen shows the login prompt', async () => {
    const vnc = spawnCLI(['vnc', 'vm', VM, '--no-open'], env);
    try {
      const m = await vnc.waitOutput(/vnc:\/\/admin:admin@127\.0\.0\.1:(\d+)\n/);
      assert.match(vnc.stdout(), /^vnc:\/\/admin:admin@127\.0\.0\.1:\d+\n$/);
      const sock = net.connect(Number(m[1]), '127.0.0.1');
      let buf = Buffer.alloc(0);
      const readAtLeast = (n: number) =>
        waitFor(`${n} bytes from the VNC server`, () => (buf.length >= n ? true : sock.destroyed ? fail(`closed after ${buf.length} bytes`) : undefined), 15_000, 10);
      sock.on('data', (c: Buffer) => (buf = Buffer.concat([buf, c])));
      try {
        await readAtLeast(12);
        const version = buf.subarray(0, 12).toString('latin1');
        assert.match(version, /^RFB 003\.00\d\n$/);
        buf = buf.subarray(12);
        sock.write(version);
        if (version === 'RFB 003.003\n') {
          await readAtLeast(4);
          assert.notEqual(buf.readUInt32BE(0), 0, 'a security type');
        } else {
          await readAtLeast(1);
          const count = buf[0];
          assert.ok(count > 0, 'the server offers security types');
          await readAtLeast(1 + count);
          assert.ok([...buf.subarray(1, 1 + count)].every((t) => t > 0));
        }
      } finally {
        sock.destroy();
      }
      // What a VNC client shows: the guest's login console, not only the BIOS. A screenshot by
      // Debian's vncsnapshot through the same forward, read by tesseract (OCR).
      const dir = mkdtempSync(join(tmpdir(), 'orchard-vnc-'));
      try {
        const shot = join(dir, 'screen.jpg');
        let seen = '';
        await waitFor('the login prompt on the VM screen', async () => {
          await execFileP('vncsnapshot', ['-quiet', '-quality', '95', `127.0.0.1::${m[1]}`, shot], { timeout: 30_000 });
          // ORCHARD_SCREENSHOT=FILE keeps the screenshot (the README's comes from here).
          if (process.env.ORCHARD_SCREENSHOT) copyFileSync(shot, process.env.ORCHARD_SCREENSHOT);
          seen = (await execFileP('tesseract', [shot, 'stdout', '--psm', '6'], { timeout: 30_000 })).stdout;
          return /login:/.test(seen);
        }, 90_000, 1000).catch((err: Error) => fail(`${err.message}; the screen read: ${JSON.stringify(seen)}`));
        // (The OCR may read "vm" as "um".)
        assert.match(seen, /orchard-\w\w login:/);
        assert.doesNotMatch(seen, /SeaBIOS|Booting from/);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    } finally {
      assert.equal(await vnc.stop('SIGINT'), 0);
    }
  });

  test('get vm NAME --ip prints an IPv4 address', async () => {
    const r = await runCLI(['get', 'vm', VM, '--ip'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^(\d{1,3}\.){3}\d{1,3}\n$/);
    const json = await runCLI(['get', 'vm', VM, '--ip', '-o', 'json'], env);
    assert.equal(JSON.parse(json.stdout).ip, r.stdout.trim());
  });

  test('unknown VM: exit 1 with the message on stderr', async () => {
    for (const args of [['ssh', 'vm', 'nope', '--', 'true'], ['get', 'vm', 'nope', '--ip'], ['port-forward', 'vm', 'nope', '0:22'], ['vnc', 'vm', 'nope', '--no-open']]) {
      const r = await runCLI(args, env);
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /VM "nope" not found/, args.join(' '));
      assert.doesNotMatch(r.stderr, /HTTP 404/, `${args.join(' ')}: an expected error, without the HTTP status`);
      assert.equal(r.stdout, '');
    }
    const bad = await runCLI(['port-forward', 'vm', VM, '22:0'], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /invalid remote port/);
  });

  test('a compute:read account cannot connect: 403 with the roles needed', async () => {
    const ssh = await runCLI(['ssh', 'vm', VM, '--context', 'reader', '--', 'true'], env);
    assert.equal(ssh.code, 1, ssh.stderr);
    assert.match(ssh.stderr, /compute:write.*compute:connect|compute:connect.*compute:write/);
    assert.doesNotMatch(ssh.stderr, /HTTP 403/, 'an expected error, without the HTTP status');
    const ip = await runCLI(['get', 'vm', VM, '--ip', '--context', 'reader'], env);
    assert.equal(ip.code, 1);
    assert.match(ip.stderr, /^orchard: service account "reader" lacks /);
    assert.doesNotMatch(ip.stderr, /HTTP 403/);

    // port-forward listens (the role is checked per connection), and each connection is refused with the reason.
    const pf = spawnCLI(['port-forward', 'vm', VM, '0:22', '--context', 'reader'], env);
    try {
      const port = Number((await pf.waitOutput(/forwarding 127\.0\.0\.1:(\d+)/))[1]);
      const sock = net.connect(port, '127.0.0.1');
      sock.on('error', () => {});
      await new Promise((r) => sock.once('close', r));
      const refused = await pf.waitOutput(/orchard: 127\.0\.0\.1:\d+ -> web-1:22: [^\n]*compute:connect[^\n]*\n/);
      assert.doesNotMatch(refused[0], /HTTP 403/, 'an expected error, without the HTTP status');
    } finally {
      assert.equal(await pf.stop('SIGTERM'), 0);
    }
  });

  test('the worker killed (kill -9) in the middle of a transfer: the local connection closes and the reason is printed', async () => {
    // A second worker, as a real process, whose host port we forward to: a TCP source that never stops sending.
    const source = net.createServer((s) => {
      s.on('error', () => {});
      const chunk = randomBytes(64 * 1024);
      const pump = () => {
        while (!s.destroyed && s.write(chunk));
      };
      s.on('drain', pump);
      pump();
    });
    await new Promise<void>((r) => source.listen(0, '127.0.0.1', () => r()));
    const sourcePort = (source.address() as net.AddressInfo).port;
    const workerDir = tempDir('orchard-worker2-');
    const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: q.ctl.certificate });
    const worker = spawn(ORCHARD_BIN, ['worker', 'run', q.ctl.url, '--bootstrap-token', token, '--name', 'doomed', '--runtime', 'synthetic', '--slots', '1', '--data-dir', workerDir], {
      env: { ...process.env, ORCHARD_LOG_LEVEL: 'warn' },
      stdio: 'ignore',
    });
    const workerExited = new Promise((r) => worker.once('exit', r));
    let pf: OrchardProcess | undefined;
    let sock: net.Socket | undefined;
    try {
      // Ready once a tunnel through it works.
      await waitFor('worker "doomed" to take port-forwards', async () => {
        try {
          const t = await q.admin.portForwardWorker('doomed', sourcePort);
          t.ws.terminate();
          return true;
        } catch {
          return false;
        }
      }, 20_000, 200);
      pf = spawnCLI(['port-forward', 'worker', 'doomed', `0:${sourcePort}`], env);
      const port = Number((await pf.waitOutput(/forwarding 127\.0\.0\.1:(\d+) -> worker doomed:/))[1]);
      sock = net.connect(port, '127.0.0.1');
      let received = 0;
      let closeError: string | undefined;
      sock.on('data', (c: Buffer) => (received += c.length));
      sock.on('error', (err: Error & { code?: string }) => (closeError = err.code ?? err.message));
      const closed = new Promise<void>((r) => sock!.once('close', () => r()));
      await waitFor('4 MiB through the tunnel', () => received >= 4 * 1024 * 1024, 20_000, 20);

      const killedAt = Date.now();
      worker.kill('SIGKILL');
      await workerExited;
      await Promise.race([closed, new Promise((_, reject) => setTimeout(() => reject(new Error(`the local connection is still open 10 s after the worker died (${received} bytes received)`)), 10_000))]);
      const ms = Date.now() - killedAt;
      assert.equal(closeError, 'ECONNRESET', 'an aborted tunnel resets the local connection (not a clean EOF)');
      await pf.waitOutput(/orchard: 127\.0\.0\.1:\d+ -> worker doomed:\d+: the worker connection was lost/);
      console.log(`worker killed after ${(received / 1024 / 1024).toFixed(0)} MiB; local connection reset ${ms} ms later`);

      // The forward keeps listening; a new connection fails fast with the controller's reason.
      const again = net.connect(port, '127.0.0.1');
      again.on('error', () => {});
      await new Promise((r) => again.once('close', r));
      await pf.waitOutput(/worker doomed:\d+: .*not connected.*\(HTTP 503\)/);
      assert.equal(pf.proc.exitCode, null, 'port-forward is still running');
    } finally {
      sock?.destroy();
      if (worker.exitCode === null && worker.signalCode === null) worker.kill('SIGKILL');
      await workerExited;
      if (pf) await pf.stop('SIGKILL');
      source.close();
      rmSync(workerDir, { recursive: true, force: true });
    }
  });
});
