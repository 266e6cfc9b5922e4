// The servers' log: lines for people on a terminal (a real pseudo-terminal, through script(1)), JSON
// lines in a pipe, --log-format to choose; requests at debug, not info; what stopping does.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { formatLine } from '../src/logging.ts';
import { ADMIN_TOKEN, inProcessController, ORCHARD_BIN, runCLI, tempDir, waitFor } from './helpers.ts';

const TIME = String.raw`\d\d:\d\d:\d\d\.\d\d\d`;

test('formatLine: time, level, message, fields; a request in one short line; an error with its stack', () => {
  const time = new Date(2026, 10, 30, 9, 5, 7, 42).getTime();
  assert.equal(
    formatLine(JSON.stringify({ level: 30, time, pid: 1, hostname: 'h', msg: 'controller is listening', url: 'https://127.0.0.1:6120' })),
    '09:05:07.042 INFO  controller is listening url=https://127.0.0.1:6120\n',
  );
  assert.equal(
    formatLine(JSON.stringify({ level: 20, time, reqId: '0b91142f-1111-2222', req: { method: 'GET', url: '/v1/vms' }, res: { statusCode: 200 }, responseTime: 3.81, msg: 'request completed' })),
    '09:05:07.042 DEBUG GET /v1/vms 200 3.8ms req=0b91142f\n',
  );
  assert.equal(
    formatLine(JSON.stringify({ level: 40, time, msg: 'authentication failed', account: 'x y', n: 3, o: { a: 1 } })),
    '09:05:07.042 WARN  authentication failed account="x y" n=3 o={"a":1}\n',
  );
  const err = formatLine(JSON.stringify({ level: 50, time, msg: 'internal error', err: { message: 'boom', stack: 'Error: boom\n    at f (x.ts:1:1)' } }));
  assert.equal(err, '09:05:07.042 ERROR internal error err=boom\n    Error: boom\n        at f (x.ts:1:1)\n');
  assert.match(formatLine('{"level":30,"msg":"x"}', { color: true }), /\x1b\[32mINFO /, 'colored on a terminal');
  assert.equal(formatLine('not json\n'), 'not json\n');
});

/** `orchard controller run` with `args`, its output collected; `tty`: in a pseudo-terminal (script -q), stdout and stderr together. */
function controller(args: string[], opts: { tty?: boolean; env?: Record<string, string> } = {}) {
  const dataDir = tempDir();
  const home = tempDir('orchard-home-');
  const cmd = [ORCHARD_BIN, 'controller', 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0', ...args];
  const quoted = cmd.map((a) => `'${a}'`).join(' ');
  const env = { ...process.env, ORCHARD_BOOTSTRAP_ADMIN_TOKEN: ADMIN_TOKEN, ORCHARD_HOME: home, ORCHARD_LOG_LEVEL: '', NO_COLOR: '1', ...opts.env };
  delete (env as Record<string, string | undefined>).ORCHARD_LOG_LEVEL;
  // In the terminal, the shell says its pid, then becomes the controller (bin/orchard execs node).
  const proc = opts.tty
    ? spawn('script', ['-qfec', `echo PID $$; exec ${quoted}`, '/dev/null'], { env, stdio: ['pipe', 'pipe', 'pipe'] })
    : spawn(cmd[0], cmd.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  return {
    out: () => out,
    err: () => err,
    async started() {
      const m = await waitFor('the controller listening', () => /listening on (\S+), certificate SHA-256 (\S+)/.exec(out + err) ?? undefined, 30_000);
      return { url: m[1].replace(/,$/, ''), fingerprint: m[2] };
    },
    async stop() {
      const pid = opts.tty ? Number(/PID (\d+)/.exec(out)?.[1]) : proc.pid!;
      process.kill(pid, 'SIGTERM');
      await exited;
    },
    cleanup() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
      rmSync(home, { recursive: true, force: true });
    },
  };
}

/** A few requests through the CLI: a context, a list, a 404. */
async function someRequests(ctl: { url: string; fingerprint: string }) {
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const created = await runCLI(['context', 'create', ctl.url, '--name', 'c', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', ctl.fingerprint], env);
  assert.equal(created.code, 0, created.stderr);
  assert.equal((await runCLI(['list', 'vms'], env)).code, 0);
  assert.equal((await runCLI(['get', 'vm', 'nope'], env)).code, 1);
  rmSync(env.ORCHARD_HOME, { recursive: true, force: true });
}

test('in a terminal: log lines for people, no JSON, no request at info; stopping says what it closes and how long it took', async () => {
  const c = controller([], { tty: true });
  try {
    const ctl = await c.started();
    await someRequests(ctl);
    await c.stop();
    const out = c.out();
    assert.match(out, new RegExp(`^${TIME} INFO  controller is listening url=https://127\\.0\\.0\\.1:\\d+\\r?$`, 'm'), out);
    assert.match(out, new RegExp(`^${TIME} INFO  created a self-signed certificate fingerprint=`, 'm'));
    assert.doesNotMatch(out, /^\{/m, 'no JSON line on a terminal');
    assert.doesNotMatch(out, /request completed|GET \/v1\/vms/, 'requests are not logged at info');
    assert.match(out, /orchard controller: SIGTERM: stopping: closing \d+ connections?.*closing the database…/);
    assert.match(out, /orchard controller: stopped in \d+ ms \(the database closed cleanly\)/);
  } finally {
    c.cleanup();
  }
});

test('in a terminal with --debug: every request in one line (method, URL, status, time)', async () => {
  const c = controller(['--debug'], { tty: true });
  try {
    const ctl = await c.started();
    await someRequests(ctl);
    await waitFor('the 404 logged', () => /DEBUG GET \/v1\/vms\/nope 404 /.test(c.out()) || undefined, 10_000);
    await c.stop();
    assert.match(c.out(), new RegExp(`^${TIME} DEBUG GET /v1/vms 200 \\d+\\.\\dms req=[0-9a-f]{8}\\r?$`, 'm'), c.out());
  } finally {
    c.cleanup();
  }
});

test('in a pipe: JSON lines, requests only at debug; --log-format text forces lines for people', async () => {
  const json = controller([]);
  try {
    const ctl = await json.started();
    await someRequests(ctl);
    await json.stop();
    const lines = json.out().trim().split('\n');
    const entries = lines.map((l) => JSON.parse(l) as { level: number; msg: string });
    assert.ok(entries.some((e) => e.level === 30 && e.msg === 'controller is listening'), json.out());
    assert.ok(!entries.some((e) => e.msg === 'request completed' || e.msg === 'incoming request'), 'no request at info');
    assert.match(json.err(), /stopped in \d+ ms/);
  } finally {
    json.cleanup();
  }
  const debug = controller(['--debug']);
  try {
    const ctl = await debug.started();
    await someRequests(ctl);
    await debug.stop();
    const requests = debug.out().trim().split('\n').map((l) => JSON.parse(l) as { level: number; msg: string; req?: { url: string }; res?: { statusCode: number } }).filter((e) => e.msg === 'request completed');
    assert.ok(requests.some((r) => r.level === 20 && r.req?.url === '/v1/vms/nope' && r.res?.statusCode === 404), debug.out());
  } finally {
    debug.cleanup();
  }
  const text = controller(['--log-format', 'text']);
  try {
    await text.started();
    await text.stop();
    assert.match(text.out(), new RegExp(`^${TIME} INFO  controller is listening url=`, 'm'), text.out());
    assert.doesNotMatch(text.out(), /^\{/m);
  } finally {
    text.cleanup();
  }
});

test('controller run: a SIGTERM right after "listening on" (the bootstrap admin still being written) stops it cleanly, not by SIGTERM\'s default', async () => {
  const dataDir = tempDir();
  const home = tempDir('orchard-home-');
  const env: Record<string, string | undefined> = { ...process.env, ORCHARD_HOME: home };
  delete env.ORCHARD_BOOTSTRAP_ADMIN_TOKEN; // so the start creates an account and writes a context after listening
  const proc = spawn(ORCHARD_BIN, ['controller', 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr.on('data', (b: Buffer) => {
    err += b.toString();
    if (/listening on /.test(err) && !proc.killed) proc.kill('SIGTERM');
  });
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) => proc.once('exit', (c, s) => r([c, s])));
  try {
    assert.equal(signal, null, `ended by ${signal}, not by its own stop: ${err}`);
    assert.equal(code, 0, err);
    assert.match(err, /created "bootstrap-admin"/, 'the start was finished');
    assert.match(err, /orchard controller: stopped in \d+ ms \(the database closed cleanly\)\n/);
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  }
});

test('worker run: a SIGTERM while the worker starts (its controller not answering yet) stops it saying so, not by SIGTERM\'s default', async () => {
  // A controller that takes the connection and never answers: the worker's start waits on it.
  const sockets = new Set<Socket>();
  let connected = () => {};
  const reached = new Promise<void>((r) => (connected = r));
  const silent = createServer((s) => {
    sockets.add(s);
    connected();
  });
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
  const c = await inProcessController(); // only for a certificate to put in the token
  const dataDir = tempDir();
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate });
  const url = `https://127.0.0.1:${(silent.address() as { port: number }).port}`;
  const proc = spawn(ORCHARD_BIN, ['worker', 'run', url, '--synthetic', '--name', 'w-start', '--data-dir', dataDir], {
    env: { ...process.env, ORCHARD_BOOTSTRAP_TOKEN: token, ORCHARD_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((r) => proc.once('exit', (code, signal) => r([code, signal])));
  try {
    await reached; // the start is under way
    proc.kill('SIGTERM');
    const [code, signal] = await exited;
    assert.equal(signal, null, `ended by ${signal}, not by its own stop: ${err}`);
    assert.equal(code, 0, err);
    assert.match(err, /orchard worker: SIGTERM: stopping the worker…\n/);
    assert.match(err, /orchard worker: stopped in \d+ ms\n/);
  } finally {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    for (const s of sockets) s.destroy();
    silent.close();
    await c.close();
    c.cleanup();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('worker run: --log-format text in a pipe gives lines for people; stopping says so and how long it took', async () => {
  const c = await inProcessController();
  const dataDir = tempDir();
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate });
  const proc = spawn(ORCHARD_BIN, ['worker', 'run', c.ctl.url, '--synthetic', '--name', 'w-log', '--data-dir', dataDir, '--log-format', 'text'], {
    env: { ...process.env, ORCHARD_BOOTSTRAP_TOKEN: token, ORCHARD_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  proc.stdout.on('data', (b: Buffer) => (out += b.toString()));
  proc.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise((r) => proc.once('exit', r));
  try {
    await waitFor('the worker registered', () => /INFO  worker registered/.test(out) || undefined, 20_000);
    assert.match(out, new RegExp(`^${TIME} INFO  worker registered`, 'm'), out);
    assert.doesNotMatch(out, /^\{/m, 'no JSON line');
    proc.kill('SIGTERM');
    await exited;
    assert.match(err, /orchard worker: SIGTERM: stopping the worker…\n/);
    assert.match(err, /orchard worker: stopped in \d+ ms\n/);
  } finally {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await c.close();
    c.cleanup();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
