// Exec through the controller (GET /v1/vms/{name}/exec): first the session logic alone (history cap,
// lost output, ack, reattach ordering, flow control, TTL) against a stand-in SSH channel and real
// WebSockets on loopback; then end to end against a real guest (one debian-dev VM for the whole file):
// output and exit codes, env and workdir, stdin, TTYs and resize, sessions that survive a disconnect,
// close, ownership, and the HTTP errors before the upgrade.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { Duplex, Readable } from 'node:stream';
import { WebSocket, WebSocketServer } from 'ws';
import { ApiError, type ExecOptions, type OrchardClient } from '../src/client/client.ts';
import { ExecSession, type ExecLimits } from '../src/controller/connect/exec/session.ts';
import type { ExecSpec } from '../src/controller/connect/exec/query.ts';
import { clientOf, heavyFile, qemuCluster, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

interface Frame {
  type: string;
  data?: string;
  watermark?: number;
  exit?: { code: number };
  error?: string;
}

/** The client side of an exec WebSocket: every frame received, and waits on them. */
class Conn {
  readonly ws: WebSocket;
  readonly frames: Frame[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  isClosed = false;
  private wake: () => void = () => {};

  constructor(ws: WebSocket) {
    this.ws = ws;
    ws.on('message', (d: Buffer) => {
      this.frames.push(JSON.parse(d.toString()) as Frame);
      this.wake();
    });
    this.closed = new Promise((resolve) =>
      ws.once('close', (code: number, reason: Buffer) => {
        this.isClosed = true;
        this.wake();
        resolve({ code, reason: reason.toString() });
      }),
    );
  }

  send(frame: object) {
    this.ws.send(JSON.stringify(frame));
  }

  stdin(text: string) {
    this.send({ type: 'stdin', data: Buffer.from(text).toString('base64') });
  }

  /** The decoded data of the stdout (or stderr) frames so far. */
  text(type: 'stdout' | 'stderr' = 'stdout', frames = this.frames): string {
    return Buffer.concat(frames.filter((f) => f.type === type).map((f) => Buffer.from(f.data!, 'base64'))).toString();
  }

  get exit(): Frame | undefined {
    return this.frames.find((f) => f.type === 'exit');
  }

  /** The highest watermark received. */
  get watermark(): number {
    return Math.max(0, ...this.frames.map((f) => (f.type === 'no_more_history' ? 0 : (f.watermark ?? 0))));
  }

  /** Resolves once `pred` holds; fails after `timeoutMs`, or when the connection closes before. */
  async until(what: string, pred: () => boolean, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      if (this.isClosed) throw new Error(`the connection closed before ${what}; frames: ${JSON.stringify(this.frames).slice(0, 2000)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames).slice(0, 2000)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 200));
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  /** Waits for the exit frame and the close that follows it. */
  async finished(timeoutMs = 30_000) {
    await this.until('the exit frame', () => this.exit !== undefined || this.frames.some((f) => f.type === 'error' && f.watermark), timeoutMs);
    const closed = await this.closed;
    return { code: this.exit?.exit?.code, close: closed.code };
  }
}

// ---- the session logic alone ----

/** Stands in for ssh2's ClientChannel: stdout/stderr pushed by the test, with ssh2's backpressure. */
class FakeChannel extends Duplex {
  readonly stderr = new Readable({ read() {}, emitClose: false, highWaterMark: 2 * 1024 * 1024 });
  readonly stdinChunks: Buffer[] = [];
  readonly signals: string[] = [];
  readonly windows: [number, number][] = [];
  private wanted: () => void = () => {};

  constructor() {
    super({ emitClose: false, autoDestroy: false, highWaterMark: 2 * 1024 * 1024, allowHalfOpen: true });
  }

  override _read() {
    this.wanted();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void) {
    this.stdinChunks.push(chunk);
    cb();
  }

  /** Pushes stdout, waiting like ssh2 does when the reader is not taking it (the SSH window closes). */
  async out(data: Buffer | string) {
    if (!this.push(typeof data === 'string' ? Buffer.from(data) : data)) await new Promise<void>((r) => (this.wanted = r));
  }

  setWindow(rows: number, cols: number) {
    this.windows.push([rows, cols]);
  }

  signal(name: string) {
    this.signals.push(name);
    if (name === 'KILL') this.finish(null, 'SIGKILL');
  }

  finish(code: number | null, signal?: string) {
    this.push(null);
    this.stderr.push(null);
    this.emit('exit', code, signal);
    if (this.readableEnded) this.emit('close');
    else this.once('end', () => this.emit('close'));
  }
}

const SPEC: ExecSpec = { command: 'x', interactive: false, tty: false, rows: 24, cols: 80, env: {}, workdir: '' };

function fakeSession(id?: string, limits?: ExecLimits) {
  const channel = new FakeChannel();
  const state = { disconnected: 0, ended: 0 };
  const session = new ExecSession({
    id,
    account: 'a',
    vmName: 'vm',
    vmUID: 'uid',
    spec: SPEC,
    channel,
    disconnect: () => state.disconnected++,
    onEnd: () => state.ended++,
    limits,
  });
  return { channel, session, state };
}

/** A WebSocket server on loopback; `pair()` gives a connected (server side, client side). */
async function wsPair() {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const port = (wss.address() as AddressInfo).port;
  return {
    async pair(): Promise<[WebSocket, Conn]> {
      const serverSide = once(wss, 'connection') as Promise<[WebSocket]>;
      const client = new WebSocket(`ws://127.0.0.1:${port}`);
      await once(client, 'open');
      const [ws] = await serverSide;
      return [ws, new Conn(client)];
    },
    close: () => {
      for (const c of wss.clients) c.terminate();
      wss.close();
    },
  };
}

describe('exec sessions (stand-in SSH channel)', () => {
  let sockets: Awaited<ReturnType<typeof wsPair>>;
  before(async () => (sockets = await wsPair()));
  after(() => sockets.close());

  test('history cap drops the oldest frames; history below them says output was lost, then replays the rest; ack drops history', async () => {
    const { channel, session, state } = fakeSession('s1', { historyBytes: 2000, retentionMs: 600_000 });
    for (let i = 1; i <= 50; i++) await channel.out(`line ${String(i).padStart(2, '0')} ${'x'.repeat(90)}\n`);
    await waitFor('50 frames recorded', () => session.stats().last === 50, 5000, 5);
    const kept = session.stats();
    assert.ok(kept.keptBytes <= 2000, `history stays under the cap (${kept.keptBytes})`);
    assert.ok(kept.firstKept > 40 && kept.firstKept < 50, `the oldest frames went (first kept: ${kept.firstKept})`);

    const [ws, c] = await sockets.pair();
    session.attach(ws, false);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(c.frames.length, 0, 'a reconnection gets nothing before it asks for history');
    c.send({ type: 'history', watermark: 3 });
    await c.until('no_more_history', () => c.frames.some((f) => f.type === 'no_more_history'));
    assert.equal(c.frames[0].type, 'error');
    assert.match(c.frames[0].error!, new RegExp(`output was lost: frames 4 to ${kept.firstKept - 1}`));
    const replayed = c.frames.slice(1, -1);
    assert.deepEqual(replayed.map((f) => f.watermark), Array.from({ length: 51 - kept.firstKept }, (_, i) => kept.firstKept + i));
    assert.equal(c.text('stdout', replayed).split('\n')[0].slice(0, 7), `line ${kept.firstKept}`);
    assert.deepEqual(c.frames.at(-1), { type: 'no_more_history', watermark: 50 });

    await channel.out('live\n');
    await c.until('the live frame', () => c.frames.at(-1)?.watermark === 51);
    assert.equal(c.text('stdout', [c.frames.at(-1)!]), 'live\n');
    c.send({ type: 'ack', watermark: 51 });
    await waitFor('the acked history to go', () => session.stats().keptFrames === 0, 5000, 5);
    // A later history below the acknowledged watermark is no loss: nothing is missing.
    const [ws2, c2] = await sockets.pair();
    session.attach(ws2, false);
    c2.send({ type: 'history', watermark: 10 });
    await c2.until('no_more_history', () => c2.frames.some((f) => f.type === 'no_more_history'));
    assert.deepEqual(c2.frames, [{ type: 'no_more_history', watermark: 51 }]);

    channel.finish(0);
    const [r1, r2] = await Promise.all([c.finished(), c2.finished()]);
    assert.deepEqual(r1, { code: 0, close: 1000 });
    assert.deepEqual(r2, { code: 0, close: 1000 });
    assert.equal(c.exit!.watermark, 52);
    await waitFor('the session to end once its exit was delivered', () => state.ended === 1 && state.disconnected >= 1, 5000, 5);
  });

  test('a watermark beyond the session (a new session under an old id) gets an error and a full replay', async () => {
    const { channel, session } = fakeSession('s2');
    await channel.out('a');
    await channel.out('b');
    const [ws, c] = await sockets.pair();
    session.attach(ws, false);
    c.send({ type: 'history', watermark: 99 });
    await c.until('no_more_history', () => c.frames.some((f) => f.type === 'no_more_history'));
    assert.equal(c.frames[0].type, 'error');
    assert.match(c.frames[0].error!, /watermark 99 is beyond this session's newest frame \(2\)/);
    assert.equal(c.text(), 'ab');
    // Bad frames are answered, and the connection goes on.
    c.send({ type: 'stdin', data: 'aGk=' });
    c.ws.send('{not json');
    c.send({ type: 'resize', terminal: { rows: 1, cols: 1 } });
    c.send({ type: 'bogus' });
    c.send({ type: 'history', watermark: -1 });
    await c.until('five errors', () => c.frames.filter((f) => f.type === 'error').length === 6);
    const errors = c.frames.filter((f) => f.type === 'error').slice(1).map((f) => f.error);
    assert.match(errors[0]!, /stdin is not forwarded/);
    assert.match(errors[1]!, /malformed frame/);
    assert.match(errors[2]!, /resize needs a terminal/);
    assert.match(errors[3]!, /unknown frame type "bogus"/);
    assert.match(errors[4]!, /watermark/);
    c.send({ type: 'close' });
    const r = await c.finished();
    assert.equal(r.code, 128 + 9, 'killed: 128 + SIGKILL');
    assert.deepEqual(channel.signals, ['KILL']);
  });

  test('flow control: a client that does not read pauses the command; everything arrives in order once it reads', async () => {
    const { channel, session } = fakeSession();
    const [ws, c] = await sockets.pair();
    session.attach(ws, true);
    c.ws.pause(); // the client stops reading
    const chunk = 64 * 1024;
    const total = 48 * 1024 * 1024;
    let produced = 0;
    const producer = (async () => {
      for (let i = 0; produced < total; i++) {
        await channel.out(Buffer.alloc(chunk, i % 251));
        produced += chunk;
      }
    })();
    // The producer stalls: the session paused the channel, and ssh2's window would be closed.
    let last = -1;
    await waitFor('the producer to stall', async () => {
      const stalled = produced === last && produced > 0;
      last = produced;
      await new Promise((r) => setTimeout(r, 300));
      return stalled && session.stats().paused;
    }, 20_000, 0);
    assert.ok(produced < total, `the command was held back (${produced} of ${total} bytes produced)`);
    assert.ok(session.stats().keptBytes < 4 * 1024 * 1024, `memory stays bounded (${session.stats().keptBytes} bytes kept)`);
    c.ws.resume();
    await producer;
    channel.finish(0);
    await c.finished(60_000);
    const data = Buffer.concat(c.frames.filter((f) => f.type === 'stdout').map((f) => Buffer.from(f.data!, 'base64')));
    assert.equal(data.length, total);
    for (let i = 0; i < total / chunk; i++) assert.equal(data[i * chunk + chunk - 1], i % 251, `chunk ${i} in order`);
    const marks = c.frames.map((f) => f.watermark);
    assert.deepEqual(marks, marks.map((_, i) => i + 1), 'watermarks count the frames, 1, 2, 3, ...');
  });

  test('a session nobody is attached to is killed after the retention TTL', async () => {
    const [ws, c] = await sockets.pair();
    const { channel, session, state } = fakeSession('s3', { historyBytes: 4 * 1024 * 1024, retentionMs: 200 });
    session.attach(ws, true);
    await new Promise((r) => setTimeout(r, 400));
    assert.deepEqual(channel.signals, [], 'alive while attached');
    c.send({ type: 'detach' });
    assert.equal((await c.closed).code, 1000);
    await waitFor('the TTL to kill it', () => channel.signals.includes('KILL') && state.ended === 1, 5000, 10);
    assert.equal(session.gone, true);
  });
});

// ---- end to end, against a real guest ----

describe('exec in a real VM', () => {
  let q: Awaited<ReturnType<typeof qemuCluster>>;
  const VM_NAME = 'exec-vm';
  const exec = async (opts: ExecOptions, client: OrchardClient = q.admin) => new Conn(await client.openExec(VM_NAME, opts));
  /** Runs a command to the end; its stdout and exit code. */
  const run = async (command: string) => {
    const c = await exec({ command });
    const { code } = await c.finished();
    return { out: c.text(), code };
  };
  const processCount = async (cmdline: string) =>
    Number((await run(`for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^${cmdline} ' || true`)).out.trim());

  before(async () => {
    const t0 = Date.now();
    // Detached sessions expire after 3 s here (the TTL test); the other tests reattach well within it.
    q = await qemuCluster({ limits: { execRetentionMs: 3000 } });
    await q.runningVM(VM_NAME);
    console.log(`# cluster and VM up in ${Date.now() - t0} ms`);
  }, { timeout: 300_000 });
  after(async () => {
    await q?.close();
  });

  test('stdout, stderr and the exit code; the controller closes with 1000 after the exit frame', async () => {
    const c = await exec({ command: 'echo out; echo err >&2; exit 3' });
    const r = await c.finished();
    assert.deepEqual(r, { code: 3, close: 1000 });
    assert.equal(c.text('stdout'), 'out\n');
    assert.equal(c.text('stderr'), 'err\n');
    assert.equal(c.frames.at(-1)!.type, 'exit', 'exit is the last frame');
    assert.deepEqual(c.frames.map((f) => f.watermark), c.frames.map((_, i) => i + 1));
  });

  test('env and workdir', async () => {
    const c = await exec({ command: 'printf "%s|%s|%s" "$GREETING" "$OTHER" "$(pwd)"', env: { GREETING: "hello world 'quoted' $HOME", OTHER: 'x' }, workdir: '/etc' });
    assert.equal((await c.finished()).code, 0);
    assert.equal(c.text(), "hello world 'quoted' $HOME|x|/etc");
    const missing = await exec({ command: 'echo never', workdir: '/no/such/dir' });
    const r = await missing.finished();
    assert.notEqual(r.code, 0, 'a workdir that does not exist fails the command');
    assert.equal(missing.text(), '');
    assert.match(missing.text('stderr'), /no\/such\/dir/);
  });

  test('interactive stdin: cat echoes what it is sent, and ends at EOF', async () => {
    const c = await exec({ command: 'cat; echo done', interactive: true });
    c.stdin('hello\n');
    await c.until('the first line back', () => c.text() === 'hello\n');
    c.stdin('second line\n');
    c.send({ type: 'stdin', data: '' }); // EOF
    const r = await c.finished();
    assert.deepEqual(r, { code: 0, close: 1000 });
    assert.equal(c.text(), 'hello\nsecond line\ndone\n');
  });

  test('tty: rows and cols set the terminal size; resize changes it', async () => {
    const c = await exec({ command: 'stty size', tty: true, rows: 33, cols: 111 });
    assert.equal((await c.finished()).code, 0);
    assert.equal(c.text(), '33 111\r\n');
    assert.equal(c.text('stderr'), '');

    const s = await exec({ command: 'read a; stty size; read b; stty size', tty: true, rows: 10, cols: 20 });
    s.stdin('\n');
    await s.until('the first size', () => /10 20\r\n/.test(s.text()));
    s.send({ type: 'resize', terminal: { rows: 50, cols: 160 } });
    s.stdin('\n');
    const r = await s.finished();
    assert.equal(r.code, 0);
    assert.match(s.text(), /10 20\r\n[\s\S]*50 160\r\n/);
  });

  test('a session survives a disconnect: reconnect, history from the last watermark, every line exactly once, then exit', async () => {
    const id = `lines-${Date.now()}`;
    const command = 'for i in $(seq 1 20); do echo line $i; sleep 0.1; done';
    const first = await exec({ command, session: id });
    await first.until('line 3', () => first.text().includes('line 3\n'));
    const seen = first.frames.slice();
    first.ws.terminate(); // an abrupt disconnect
    await first.closed;
    await new Promise((r) => setTimeout(r, 500)); // more lines come while nobody is attached

    const again = await exec({ session: id });
    again.send({ type: 'history', watermark: Math.max(...seen.map((f) => f.watermark!)) });
    const r = await again.finished();
    assert.deepEqual(r, { code: 0, close: 1000 });
    const historyEnd = again.frames.findIndex((f) => f.type === 'no_more_history');
    assert.ok(historyEnd >= 1, 'some lines were replayed from history, then no_more_history');
    assert.ok(historyEnd < again.frames.length - 2, 'and then live output');
    const all = [...seen, ...again.frames.filter((f) => f.type !== 'no_more_history')];
    const text = Buffer.concat(all.filter((f) => f.type === 'stdout').map((f) => Buffer.from(f.data!, 'base64'))).toString();
    assert.equal(text, Array.from({ length: 20 }, (_, i) => `line ${i + 1}\n`).join(''));
    const marks = all.map((f) => f.watermark);
    assert.deepEqual(marks, marks.map((_, i) => i + 1), 'no frame missing or twice');
    // The exit was delivered: the session is gone.
    await assert.rejects(exec({ session: id }), (err: ApiError) => err.status === 404 && /does not exist/.test(err.message));
  });

  test('without a session, a disconnect kills the command', async () => {
    const c = await exec({ command: 'sleep 1235' });
    await waitFor('sleep to run', async () => (await processCount('sleep 1235')) === 1, 20_000, 200);
    c.ws.terminate();
    await waitFor('sleep to be killed', async () => (await processCount('sleep 1235')) === 0, 20_000, 200);
  });

  test("deleting the account ends its detached session at once and kills the command", async () => {
    await q.admin.createServiceAccount({ name: 'temp-user', token: 'temp-user-token-0123456789abcdef', roles: ['compute:read', 'compute:connect'] });
    const temp = clientOf(q.ctl, 'temp-user', 'temp-user-token-0123456789abcdef');
    const id = `revoked-${Date.now()}`;
    const c = await exec({ command: 'sleep 4321', session: id }, temp);
    await waitFor('sleep to run', async () => (await processCount('sleep 4321')) === 1, 20_000, 200);
    c.send({ type: 'detach' });
    await c.closed;
    await q.admin.deleteServiceAccount('temp-user');
    // The same name with a new token finds no session: it ended with the account.
    await q.admin.createServiceAccount({ name: 'temp-user', token: 'temp-user-token-new-0123456789abcd', roles: ['compute:read', 'compute:connect'] });
    const again = clientOf(q.ctl, 'temp-user', 'temp-user-token-new-0123456789abcd');
    await assert.rejects(exec({ session: id }, again), (err: ApiError) => err.status === 404);
    await waitFor('the command killed', async () => (await processCount('sleep 4321')) === 0, 10_000, 200);
    temp.close();
    again.close();
  });

  test('close kills a long command and ends the session; detach keeps it', async () => {
    const id = `sleep-${Date.now()}`;
    const c = await exec({ command: 'sleep 1234', session: id });
    await waitFor('sleep to run', async () => (await processCount('sleep 1234')) === 1, 20_000, 200);
    c.send({ type: 'detach' });
    assert.equal((await c.closed).code, 1000);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await processCount('sleep 1234'), 1, 'a detached session keeps running');

    const again = await exec({ session: id });
    again.send({ type: 'close' });
    const r = await again.closed;
    assert.equal(r.code, 1000);
    assert.equal(await processCount('sleep 1234'), 0, 'the command was killed');
    await assert.rejects(exec({ session: id }), (err: ApiError) => err.status === 404);
  });

  test('a detached session expires after the retention TTL', async () => {
    const id = `ttl-${Date.now()}`;
    const c = await exec({ command: 'sleep 1236', session: id });
    await waitFor('sleep to run', async () => (await processCount('sleep 1236')) === 1, 20_000, 200);
    c.ws.terminate();
    await c.closed;
    const t0 = Date.now();
    assert.equal(await processCount('sleep 1236'), 1, 'alive within the TTL');
    assert.ok(Date.now() - t0 < 2500, 'checked well within the TTL');
    // (Reattaching now would restart the TTL: look only once it is over.)
    await new Promise((r) => setTimeout(r, t0 + 3500 - Date.now()));
    await assert.rejects(exec({ session: id }), (err: ApiError) => err.status === 404);
    await waitFor('sleep to be killed', async () => (await processCount('sleep 1236')) === 0, 10_000, 200);
  });

  test("a session id is refused to another service account; a different command under a running id is a conflict", async () => {
    const id = `mine-${Date.now()}`;
    const c = await exec({ command: 'sleep 30', session: id });
    const sa = await q.admin.createServiceAccount({ name: 'exec-other', roles: ['compute:connect'] });
    const other = q.client('exec-other', sa.token!);
    try {
      await assert.rejects(exec({ session: id }, other), (err: ApiError) => err.status === 403 && /belongs to another service account/.test(err.message));
      await assert.rejects(exec({ command: 'sleep 30', session: id }, other), (err: ApiError) => err.status === 403);
      await assert.rejects(exec({ command: 'sleep 31', session: id }), (err: ApiError) => err.status === 409);
      // compute:connect is enough for an exec of its own.
      const own = await exec({ command: 'echo mine' }, other);
      assert.equal((await own.finished()).code, 0);
      assert.equal(own.text(), 'mine\n');
    } finally {
      other.close();
      c.send({ type: 'close' });
      await c.closed;
    }
  });

  test('HTTP errors before the upgrade: 400 naming the parameter, 404, 503, 403', async () => {
    const status = async (opts: ExecOptions, vm = VM_NAME, client = q.admin): Promise<ApiError> => {
      try {
        const ws = await client.openExec(vm, opts);
        ws.terminate();
      } catch (err) {
        return err as ApiError;
      }
      throw new Error(`exec ${JSON.stringify(opts)} was accepted`);
    };
    const cases: [ExecOptions, number, RegExp][] = [
      [{}, 400, /"command" is required/],
      [{ command: 'true', tty: true, rows: 'abc' as unknown as number, cols: 80 }, 400, /"rows"/],
      [{ command: 'true', tty: true, rows: 99999, cols: 80 }, 400, /"rows"/],
      [{ command: 'true', tty: true, rows: 30 }, 400, /"rows" and "cols"/],
      [{ command: 'true', env: { '1BAD': 'x' } }, 400, /env\[1BAD\]/],
      [{ command: 'true', env: { 'A-B': 'x' } }, 400, /env\[A-B\]/],
      [{ command: 'true', wait: -1 }, 400, /"wait"/],
      [{ command: 'true', session: 'has space' }, 400, /"session"/],
      [{ session: 'no-such-session' }, 404, /does not exist/],
    ];
    for (const [opts, code, message] of cases) {
      const err = await status(opts);
      assert.equal(err.status, code, `${JSON.stringify(opts)}: ${err.message}`);
      assert.match(err.message, message);
    }
    const bad = await q.admin.openWebSocket(`/v1/vms/${VM_NAME}/exec?command=true&interactive=maybe`).catch((e: ApiError) => e);
    assert.ok(bad instanceof ApiError && bad.status === 400 && /"interactive"/.test(bad.message));

    const missing = await status({ command: 'true' }, 'no-such-vm');
    assert.equal(missing.status, 404);
    assert.match(missing.message, /VM "no-such-vm" not found/);

    // A VM that cannot be placed stays pending: 503 after the wait.
    await q.admin.createVM({ name: 'exec-pending', image: 'debian-dev', cpu: 1, memory: 512, resources: { 'no-worker-has-this': 1 } });
    try {
      const t0 = Date.now();
      const pending = await status({ command: 'true', wait: 1 }, 'exec-pending');
      assert.equal(pending.status, 503, pending.message);
      assert.match(pending.message, /not running/);
      assert.ok(Date.now() - t0 >= 900, 'it waited');
    } finally {
      await q.admin.deleteVM('exec-pending');
    }

    const sa = await q.admin.createServiceAccount({ name: 'exec-reader', roles: ['compute:read'] });
    const reader = q.client('exec-reader', sa.token!);
    try {
      const denied = await status({ command: 'true' }, VM_NAME, reader);
      assert.equal(denied.status, 403);
      assert.match(denied.message, /compute:write|compute:connect/);
    } finally {
      reader.close();
    }
  });
});
