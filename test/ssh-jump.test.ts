// The controller's SSH jump host (`--listen-ssh`), driven by the real OpenSSH client: the host key
// is made once and kept; service accounts log in with their token (password or
// keyboard-interactive, given through SSH_ASKPASS); only direct-tcpip channels (ssh -J / -W) to
// VMs are allowed; and `ssh -J` reaches a real QEMU guest through the worker tunnel.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import ssh2 from 'ssh2';
import { startController } from '../src/controller/controller.ts';
import { HOST_KEY_FILE } from '../src/controller/connect/ssh-jump.ts';
import { resolveImage } from '../src/worker/images.ts';
import { createServer } from 'node:net';
import { ADMIN_TOKEN, clientOf, heavyFile, qemuCluster, runCLI, spawnController, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs the OpenSSH client (or sftp) with `token` as the answer to every password prompt. */
function openssh(bin: 'ssh' | 'sftp', args: string[], token: string, dir: string, input?: Buffer | string, timeoutMs = 60_000): Promise<Run> {
  const askpass = join(dir, 'askpass.sh');
  writeFileSync(askpass, '#!/bin/sh\nprintf \'%s\\n\' "$ORCHARD_TEST_TOKEN"\n');
  chmodSync(askpass, 0o755);
  const started = Date.now();
  const proc = spawn(bin, args, {
    env: { ...process.env, SSH_ASKPASS: askpass, SSH_ASKPASS_REQUIRE: 'force', ORCHARD_TEST_TOKEN: token },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const out: Buffer[] = [];
  let stderr = '';
  proc.stdout.on('data', (c: Buffer) => out.push(c));
  proc.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  proc.stdin.on('error', () => {});
  proc.stdin.end(input ?? '');
  const timer = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
  return new Promise((resolve, reject) => {
    proc.on('error', reject);
    proc.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out).toString('latin1'), stderr, ms: Date.now() - started });
    });
  });
}

/**
 * An ssh_config: host `jump` is the jump host (password/keyboard-interactive only, its host key
 * pinned), every other host is a guest (user admin, the image's key, its host keys pinned when
 * known). `ssh -J` passes `-F` on to the ssh it starts for the jump, so both hops use this file.
 */
function sshConfig(dir: string, jumpPort: number, jumpPublicKey: string, guest: { key?: string; knownHosts?: string } = {}): string {
  const jumpKnown = join(dir, 'jump_known_hosts');
  writeFileSync(jumpKnown, `[127.0.0.1]:${jumpPort} ${jumpPublicKey}\n`);
  const guestKnown = join(dir, 'guest_known_hosts');
  writeFileSync(guestKnown, guest.knownHosts ?? '');
  const cfg = join(dir, 'ssh_config');
  writeFileSync(cfg, [
    'Host jump',
    '  HostName 127.0.0.1',
    `  Port ${jumpPort}`,
    '  PreferredAuthentications password,keyboard-interactive',
    '  PubkeyAuthentication no',
    '  NumberOfPasswordPrompts 1',
    `  UserKnownHostsFile ${jumpKnown}`,
    '  StrictHostKeyChecking yes',
    'Host *',
    '  User admin',
    '  BatchMode no',
    '  ConnectTimeout 20',
    '  GlobalKnownHostsFile /dev/null',
    guest.key ? `  IdentityFile ${guest.key}\n  IdentitiesOnly yes\n  PreferredAuthentications publickey` : '',
    guest.knownHosts ? `  UserKnownHostsFile ${guestKnown}\n  StrictHostKeyChecking yes` : '  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no',
    '',
  ].join('\n'));
  return cfg;
}

test('jump host: host key kept across restarts; tokens, roles, sessions, remote forwarding and unknown or stopped VMs refused', async () => {
  const dataDir = tempDir();
  const work = tempDir('orchard-ssh-');
  const logs: string[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(line) });
  const start = () => startController({ dataDir, listen: '127.0.0.1:0', listenSSH: '127.0.0.1:0', bootstrapAdminToken: ADMIN_TOKEN, logger });
  let ctl = await start();
  try {
    // The host key: made on first start (0600), the same one after a restart.
    const first = ctl.ssh!;
    assert.ok(first.port > 0);
    assert.match(first.fingerprint, /^SHA256:[A-Za-z0-9+/]{43}$/);
    assert.equal(statSync(join(dataDir, HOST_KEY_FILE)).mode & 0o777, 0o600);
    const keyBefore = readFileSync(join(dataDir, HOST_KEY_FILE), 'utf8');
    await ctl.close();
    ctl = await start();
    assert.equal(ctl.ssh!.fingerprint, first.fingerprint);
    assert.equal(ctl.ssh!.publicKey, first.publicKey);
    assert.equal(readFileSync(join(dataDir, HOST_KEY_FILE), 'utf8'), keyBefore);
    // The key file is the controller's: `ssh-keygen -l` agrees on the fingerprint.
    const keygen = await new Promise<string>((resolve) => {
      const p = spawn('ssh-keygen', ['-l', '-f', join(dataDir, HOST_KEY_FILE)]);
      let out = '';
      p.stdout.on('data', (c: Buffer) => (out += c.toString()));
      p.on('close', () => resolve(out));
    });
    assert.ok(keygen.includes(first.fingerprint), keygen);

    const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    const jumper = await admin.createServiceAccount({ name: 'jumper', roles: ['compute:connect'] });
    const reader = await admin.createServiceAccount({ name: 'reader', roles: ['compute:read'] });
    // A VM no worker will ever run: it stays pending.
    await admin.createVM({ name: 'pending-vm', image: 'debian-dev', cpu: 1, memory: 512 });
    admin.close();

    // The jump host's key pinned from the FIRST start: strict checking passes after the restart.
    const port = ctl.ssh!.port;
    const cfg = sshConfig(work, port, first.publicKey);
    const ssh = (args: string[], token: string) => openssh('ssh', ['-F', cfg, ...args], token, work);
    const [wrongToken, readOnly, session, kbdSession, sftp, remoteForward, unknownVM, badName, jumpToUnknown, pending] = await Promise.all([
      ssh(['jumper@jump', 'echo hi'], 'not-the-token'),
      ssh(['reader@jump', 'echo hi'], reader.token!),
      ssh(['jumper@jump', 'echo hi'], jumper.token!),
      ssh(['-o', 'PreferredAuthentications=keyboard-interactive', 'jumper@jump', 'echo hi'], jumper.token!),
      openssh('sftp', ['-F', cfg, 'jumper@jump'], jumper.token!, work),
      ssh(['-N', '-o', 'ExitOnForwardFailure=yes', '-R', '0:127.0.0.1:22', 'jumper@jump'], jumper.token!),
      ssh(['-W', 'no-such-vm:22', 'jumper@jump'], jumper.token!),
      ssh(['-W', 'bad%name:22', 'jumper@jump'], jumper.token!),
      ssh(['-J', 'jumper@jump', 'no-such-vm', 'true'], jumper.token!),
      ssh(['-W', 'pending-vm:22', 'jumper@jump'], jumper.token!),
    ]);
    const show = (r: Run) => `exit ${r.code}, ${r.ms} ms, stderr:\n${r.stderr}`;
    for (const r of [wrongToken, readOnly]) {
      assert.equal(r.code, 255, show(r));
      assert.match(r.stderr, /Permission denied \(password,keyboard-interactive\)/, show(r));
    }
    for (const r of [session, kbdSession, sftp]) {
      assert.notEqual(r.code, 0, show(r));
      assert.match(r.stderr, /open failed: administratively prohibited: this is an Orchard jump host: only TCP forwarding/, show(r));
    }
    assert.equal(remoteForward.code, 255, show(remoteForward));
    assert.match(remoteForward.stderr, /remote port forwarding failed/, show(remoteForward));
    assert.match(unknownVM.stderr, /channel 0: open failed: connect failed: VM "no-such-vm" not found/, show(unknownVM));
    assert.match(unknownVM.stderr, /stdio forwarding failed/, show(unknownVM));
    assert.match(badName.stderr, /open failed: connect failed: "bad%name" is not a VM name/, show(badName));
    assert.equal(jumpToUnknown.code, 255, show(jumpToUnknown));
    assert.match(jumpToUnknown.stderr, /open failed: connect failed: VM "no-such-vm" not found/, show(jumpToUnknown));
    assert.equal(pending.code, 255, show(pending));
    assert.match(pending.stderr, /open failed: connect failed: VM "pending-vm" is not running \(pending.*after waiting 5s/, show(pending));
    assert.doesNotMatch(pending.stderr, /wait=|--wait/, 'advice for API and CLI users does not reach an SSH user');
    assert.ok(pending.ms >= 4500, show(pending));

    // An account deleted after logging in loses its connection at once (and with it any channel).
    const conn = new ssh2.Client();
    await new Promise<void>((resolve, reject) => {
      conn.on('ready', () => resolve()).on('error', reject);
      conn.connect({ host: '127.0.0.1', port, username: 'jumper', password: jumper.token!, hostVerifier: (key: Buffer) => first.publicKey.endsWith(key.toString('base64')) });
    });
    const forwardOut = () =>
      new Promise<Error | undefined>((resolve) => {
        try {
          conn.forwardOut('127.0.0.1', 0, 'no-such-vm', 22, (err) => resolve(err));
        } catch (err) {
          resolve(err as Error);
        }
      });
    assert.match(String(await forwardOut()), /not found/);
    const closed = new Promise<number>((resolve) => conn.on('close', () => resolve(Date.now())));
    const admin2 = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    const deletedAt = Date.now();
    await admin2.deleteServiceAccount('jumper');
    admin2.close();
    assert.ok((await closed) - deletedAt < 1000, 'the connection of a deleted account closes within a second');
    assert.match(String(await forwardOut()), /No response|Not connected|closed/i);

    // Why each refusal happened is logged at info, and never a token.
    const log = logs.join('');
    assert.match(log, /"account":"jumper","method":"password".*"reason":"no such service account or wrong token"/);
    assert.match(log, /"account":"reader","method":"password".*lacks one of the roles \\"compute:write\\" or \\"compute:connect\\"/);
    assert.match(log, /"account":"jumper","vm":"no-such-vm","port":22.*"reason":"VM \\"no-such-vm\\" not found"/);
    assert.match(log, /"request":"tcpip-forward"/);
    assert.match(log, /refused a session/);
    for (const secret of [jumper.token!, reader.token!, ADMIN_TOKEN, 'not-the-token']) assert.ok(!log.includes(secret), 'a token was logged');
  } finally {
    await ctl.close();
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(work, { recursive: true, force: true });
  }
});

test('orchard controller run --listen-ssh: prints the address and host key; bad or busy addresses are clear errors', async () => {
  const dataDir = tempDir();
  try {
    const child = await spawnController(dataDir, ['--listen-ssh', '127.0.0.1:0']);
    try {
      const line = await waitFor('the SSH line', () => /SSH jump host on 127\.0\.0\.1:(\d+), host key (SHA256:\S+)/.exec(child.stderr()), 10_000);
      assert.notEqual(Number(line[1]), 0);
      // The key the CLI's controller made is the one a later in-process start uses.
      await child.kill('SIGTERM');
      const ctl = await startController({ dataDir, listen: '127.0.0.1:0', listenSSH: '127.0.0.1:0', logger: pino({ level: 'silent' }) });
      assert.equal(ctl.ssh!.fingerprint, line[2]);
      await ctl.close();
    } finally {
      await child.kill();
    }
    const bad = await runCLI(['controller', 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0', '--listen-ssh', 'nonsense']);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /--listen-ssh must be HOST:PORT or :PORT, got "nonsense"/);

    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', () => resolve()));
    const busyPort = (busy.address() as { port: number }).port;
    try {
      await assert.rejects(
        startController({ dataDir, listen: '127.0.0.1:0', listenSSH: `127.0.0.1:${busyPort}`, logger: pino({ level: 'silent' }) }),
        new RegExp(`--listen-ssh: cannot listen on 127\\.0\\.0\\.1:${busyPort}: the port is in use`),
      );
      // The failed start released everything: the data dir opens again at once.
      const again = await startController({ dataDir, listen: '127.0.0.1:0', logger: pino({ level: 'silent' }) });
      assert.equal(again.ssh, undefined);
      await again.close();
    } finally {
      busy.close();
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('ssh -J through the jump host reaches a real guest: commands, bulk data both ways, ssh -W with ProxyCommand', async () => {
  // Booted, not resumed: the guest keeps the image's host keys, which ssh checks strictly here (a VM
  // resumed from a snapshot is given host keys of its own).
  const cluster = await qemuCluster({ listenSSH: '127.0.0.1:0', warmStart: false });
  const work = tempDir('orchard-ssh-');
  try {
    const jumper = await cluster.admin.createServiceAccount({ name: 'jumper', roles: ['compute:connect'] });
    const image = await resolveImage(TEST_IMAGES, 'debian-dev');
    assert.ok(image.sshKey, 'the debian-dev image has an SSH key');
    await cluster.runningVM('jump-vm');
    const jump = cluster.ctl.ssh!;
    const cfg = sshConfig(work, jump.port, jump.publicKey, { key: image.sshKey, knownHosts: image.knownHosts });
    const ssh = (args: string[], input?: Buffer) => openssh('ssh', ['-F', cfg, ...args], jumper.token!, work, input);
    const show = (r: Run) => `exit ${r.code}, ${r.ms} ms, stderr:\n${r.stderr}`;

    const r = await ssh(['-J', 'jumper@jump', 'jump-vm', 'echo jumped; uname -n']);
    assert.equal(r.code, 0, show(r));
    assert.match(r.stdout, /^jumped\n\S+\n$/, show(r));

    // The same hop spelled out: ProxyCommand running `ssh -W %h:%p` (what -J does).
    const proxy = await ssh(['-o', `ProxyCommand=ssh -F ${cfg} -W %h:%p jumper@jump`, 'jump-vm', 'id -un; exit 3']);
    assert.equal(proxy.code, 3, show(proxy));
    assert.equal(proxy.stdout, 'admin\n');

    // 8 MiB up and the same 8 MiB back at once: flow control on both sides, nothing lost.
    const data = randomBytes(8 << 20);
    const t0 = Date.now();
    const echo = await ssh(['-J', 'jumper@jump', 'jump-vm', 'cat'], data);
    assert.equal(echo.code, 0, show(echo));
    assert.equal(echo.stdout.length, data.length, show(echo));
    assert.equal(createHash('sha256').update(Buffer.from(echo.stdout, 'latin1')).digest('hex'), createHash('sha256').update(data).digest('hex'));
    console.log(`# ssh -J: first command ${r.ms} ms; 8 MiB echoed through the jump in ${Date.now() - t0} ms`);
  } finally {
    await cluster.close();
    rmSync(work, { recursive: true, force: true });
  }
});
