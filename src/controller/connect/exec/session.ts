// Exec in a VM through the controller: GET /v1/vms/{name}/exec upgrades to a WebSocket, and the
// controller runs the command over SSH (ssh2, with the VM's username/password) through a tunnel to
// port 22 of the VM via its worker. JSON text frames both ways (the API contract's "Exec frames").
//
// Query: command (the command line, run by the login shell), interactive (stdin forwarded), tty
// (a PTY; rows and cols, together, give its size: default 24x80), env[K]=V (repeatable), workdir, wait
// (seconds for the VM to run, default 10), session (a reconnectable session id). Booleans take
// true/false/1/0 (an empty value, `?tty`, is true). Bad input is a 400 before the upgrade naming the
// parameter; an unknown VM 404; a VM not running after `wait`, or SSH that cannot be reached, 503.
//
// Watermarks: every frame the command produces (stdout, stderr, and the final exit or error) is
// numbered 1, 2, 3, ... in order; the number is its `watermark` (frame numbers, as upstream Orchard
// does, not byte offsets). A client that has seen frame N resumes with {"type":"history","watermark":N}.
//
// Sessions (?session=ID): the command outlives its connection. A disconnect or a `detach` frame
// detaches; output is kept in a history buffer (at most ExecLimits.historyBytes of frames per session, 4 MiB by default, the
// oldest dropped first; `ack` drops everything up to a watermark). A new connection with the same id
// (same VM, same service account: another account gets 403) receives nothing until it sends `history`:
// then every kept frame newer than its watermark, then `no_more_history`, then live output. If frames
// newer than the watermark were dropped by the cap, an `error` frame says so first (which ones), and
// the replay continues from the oldest kept. A watermark beyond anything the session produced (the id
// names a newer session than the one the client saw) also gets an `error` frame and a full replay.
// Reconnecting with an unknown (ended or expired) id and no `command` is a 404 before the upgrade; with
// a `command` it starts a new session under that id (as upstream does). Reconnecting with a different
// command/options than the running session's is a 409. `close` kills the command and ends the session.
// A session nobody is attached to is killed after the retention TTL (10 min by default,
// the registry's limits set it); a session whose command has ended goes as soon as its last frame was
// delivered (the client answered the WebSocket close that follows the exit frame), else after the TTL.
//
// Without a session, the connection is the command's only one: a disconnect kills it. The exit (or
// error) frame is always the last; the controller then closes the WebSocket with 1000. A command
// ended by a signal exits with 128 + the signal's number (137 for KILL); an SSH connection lost before
// an exit status is an `error` frame instead.
//
// Killing (close, a plain exec's disconnect, TTL): an SSH "signal" request (KILL; OpenSSH sends it to
// the command's process group) and, on a second channel, killScript(): every process whose
// environment carries the session's ORCHARD_EXEC_ID marker (exported to the command; Linux guests,
// via /proc) — dropbear ignores signal requests and leaves a PTY-less command running when the
// connection closes. Then the SSH connection is closed (a PTY's hangup ends what is left). At
// controller shutdown this is best effort: the tunnels close right after, before a kill script runs.
//
// Flow control: frames go to a client only while its WebSocket's bufferedAmount is under
// WS_HIGH_WATER; while a connected client is behind, the SSH channel is paused (so the guest's sshd
// stops on a full SSH window). With nobody attached, a session keeps reading and the history cap
// applies. Stdin: when the SSH channel does not take more, the client's WebSocket is paused.
import { constants as osConstants } from 'node:os';
import type { Duplex, Readable } from 'node:stream';
import type { RawData, WebSocket } from 'ws';
import { keepExitStatus, type ExitStatus } from '../../../client/ssh-exit.ts';
import { TERMINAL_MAX, type ExecSpec } from './query.ts';

/** What a session may keep, and for how long with nobody attached (the controller's Limits set them). */
export interface ExecLimits {
  /** Frames (as sent) kept for replay, in bytes; the oldest go first. */
  historyBytes: number;
  /** How long a session with nobody attached lives on. */
  retentionMs: number;
}

export const DEFAULT_EXEC_LIMITS: Readonly<ExecLimits> = { historyBytes: 4 * 1024 * 1024, retentionMs: 10 * 60_000 };
/** Frames are sent to a client only while less than this is waiting in its WebSocket. */
export const WS_HIGH_WATER = 1024 * 1024;
/** After a KILL signal, how long the command gets to be reported gone before the connection is cut. */
const KILL_GRACE_MS = 3000;
/** Accounted per kept frame on top of its JSON text. */
const FRAME_OVERHEAD = 64;

/** The command's SSH channel (ssh2's ClientChannel; tests use a stand-in). */
export interface CommandChannel extends Duplex {
  stderr: Readable;
  setWindow(rows: number, cols: number, height: number, width: number): void;
  signal(signalName: string): void;
}

interface Kept {
  watermark: number;
  text: string;
  terminal: boolean;
}

interface Attachment {
  ws: WebSocket;
  /** The watermark of the last frame sent on this connection (nothing older is ever resent on it). */
  cursor: number;
  /** Receives frames: from the start for a session's first connection, after `history` for a reconnection. */
  live: boolean;
  /** `no_more_history` is due once the cursor reaches this watermark. */
  historyUntil?: number;
  /** The exit/error frame went out on this connection. */
  gotTerminal: boolean;
  closing: boolean;
}

type Frame = Record<string, unknown> & { type: string };

export interface ExecSessionOptions {
  id?: string;
  account: string;
  vmName: string;
  vmUID: string;
  spec: ExecSpec;
  channel: CommandChannel;
  /** Its exit status, kept since it opened (keepExitStatus); without it, kept from now. */
  exit?: ExitStatus;
  /** Ends the SSH connection (and the tunnel under it). */
  disconnect: () => void;
  /** Kills the command's processes some other way than the channel's signal (see killScript). */
  killTree?: () => void;
  /** Called once when the session ends (the registry forgets it). */
  onEnd?: () => void;
  /** An error of the SSH connection, for the message when it is lost. */
  connectionError?: () => string | undefined;
  limits?: ExecLimits;
}

export class ExecSession {
  readonly id?: string;
  readonly account: string;
  readonly vmName: string;
  readonly vmUID: string;
  readonly spec: ExecSpec;
  /** Reconnectable (has a session id): outlives its connections. */
  readonly reconnectable: boolean;
  private readonly channel: CommandChannel;
  private readonly disconnect: () => void;
  private readonly killTree: () => void;
  private readonly connectionError: () => string | undefined;
  private onEnd?: () => void;
  private readonly limits: ExecLimits;

  private readonly frames: (Kept | undefined)[] = [];
  private head = 0;
  /** Frames 1..dropped are gone (acknowledged, or over the cap). */
  private dropped = 0;
  private acked = 0;
  private bytes = 0;
  /** The watermark of the newest frame. */
  private last = 0;

  private readonly attachments = new Set<Attachment>();
  private everAttached = false;
  private stdinOpen: boolean;
  private stdinBlocked = false;
  private paused = false;
  private finished = false;
  private terminalDelivered = false;
  private killing = false;
  private ended = false;
  private ttlTimer?: NodeJS.Timeout;
  private killTimer?: NodeJS.Timeout;
  private readonly exit: ExitStatus;

  constructor(opts: ExecSessionOptions) {
    this.id = opts.id;
    this.account = opts.account;
    this.vmName = opts.vmName;
    this.vmUID = opts.vmUID;
    this.spec = opts.spec;
    this.reconnectable = opts.id !== undefined;
    this.channel = opts.channel;
    this.disconnect = opts.disconnect;
    this.killTree = opts.killTree ?? (() => {});
    this.onEnd = opts.onEnd;
    this.connectionError = opts.connectionError ?? (() => undefined);
    this.limits = opts.limits ?? DEFAULT_EXEC_LIMITS;
    this.stdinOpen = opts.spec.interactive;

    const ch = this.channel;
    ch.on('error', () => {});
    ch.stderr.on('error', () => {});
    ch.on('data', (d: Buffer) => this.record({ type: 'stdout', data: d.toString('base64') }));
    ch.stderr.on('data', (d: Buffer) => this.record({ type: 'stderr', data: d.toString('base64') }));
    if (opts.exit) this.exit = opts.exit;
    else keepExitStatus(ch, (this.exit = {}));
    let open = 2;
    const closed = () => {
      if (--open === 0) this.commandEnded();
    };
    ch.once('close', closed);
    let stderrDone = false;
    const stderrClosed = () => {
      if (stderrDone) return;
      stderrDone = true;
      closed();
    };
    ch.stderr.once('end', stderrClosed);
    ch.stderr.once('close', stderrClosed);
    if (!this.stdinOpen) ch.end();
    // Nobody to deliver to yet: a session's history takes it; a plain exec waits for its connection.
    this.updateFlow();
    if (this.reconnectable) this.startTTL();
  }

  /** The number of connections attached now. */
  get attached(): number {
    return this.attachments.size;
  }

  /** Ended, or ending (killed): no longer attachable. */
  get gone(): boolean {
    return this.ended || this.killing;
  }

  /** For tests and metrics: what is kept and whether the command's output is paused. */
  stats() {
    return { keptFrames: this.frames.length - this.head, keptBytes: this.bytes, firstKept: this.dropped + 1, last: this.last, paused: this.paused, attached: this.attachments.size };
  }

  /** A connection: `live` for the one that started the session (or any plain exec), not for reconnections. */
  attach(ws: WebSocket, live: boolean, resize?: { rows: number; cols: number }) {
    if (this.gone) {
      ws.close(1000, 'the exec session has ended');
      return;
    }
    clearTimeout(this.ttlTimer);
    this.ttlTimer = undefined;
    const a: Attachment = { ws, cursor: 0, live, gotTerminal: false, closing: false };
    this.attachments.add(a);
    this.everAttached = true;
    if (this.stdinBlocked) ws.pause();
    ws.on('message', (data: RawData, isBinary: boolean) => this.onMessage(a, data, isBinary));
    ws.on('close', (code: number) => this.onClose(a, code));
    if (resize && this.spec.tty && !this.finished) this.channel.setWindow(resize.rows, resize.cols, 0, 0);
    this.pump(a);
    this.updateFlow();
  }

  // -- output --

  private record(frame: Frame, terminal = false) {
    if (this.ended) return;
    const watermark = ++this.last;
    const text = JSON.stringify({ ...frame, watermark });
    this.frames.push({ watermark, text, terminal });
    this.bytes += text.length + FRAME_OVERHEAD;
    // Keep the newest frame whatever its size; drop the oldest beyond the cap.
    while (this.bytes > this.limits.historyBytes && this.frames.length - this.head > 1) this.dropOldest();
    for (const a of this.attachments) this.pump(a);
    this.updateFlow();
  }

  private dropOldest() {
    const f = this.frames[this.head]!;
    this.bytes -= f.text.length + FRAME_OVERHEAD;
    this.frames[this.head++] = undefined;
    this.dropped++;
    if (this.head > 1024 && this.head * 2 > this.frames.length) {
      this.frames.splice(0, this.head);
      this.head = 0;
    }
  }

  private trimTo(watermark: number) {
    while (this.dropped < watermark && this.head < this.frames.length) this.dropOldest();
  }

  private frameAt(watermark: number): Kept {
    return this.frames[this.head + (watermark - this.dropped - 1)]!;
  }

  private sendControl(a: Attachment, frame: Frame) {
    a.ws.send(JSON.stringify(frame), () => this.flushed(a));
  }

  /** Sends what this connection is due, while its WebSocket takes it. */
  private pump(a: Attachment) {
    if (!a.live || a.closing || a.ws.readyState !== a.ws.OPEN) return;
    while (a.ws.bufferedAmount < WS_HIGH_WATER) {
      if (a.cursor < this.dropped) {
        const from = Math.max(a.cursor, this.acked) + 1;
        if (from <= this.dropped) {
          const span = from === this.dropped ? `frame ${from}` : `frames ${from} to ${this.dropped}`;
          this.sendControl(a, { type: 'error', error: `output was lost: ${span} no longer kept (the session keeps the newest ${this.limits.historyBytes} bytes of frames); continuing from frame ${this.dropped + 1}` });
        }
        a.cursor = this.dropped;
        continue;
      }
      if (a.historyUntil !== undefined && a.cursor >= a.historyUntil) {
        this.sendControl(a, { type: 'no_more_history', watermark: a.historyUntil });
        a.historyUntil = undefined;
        continue;
      }
      if (a.cursor >= this.last) break;
      const f = this.frameAt(++a.cursor);
      a.ws.send(f.text, () => this.flushed(a));
      if (f.terminal) {
        // The exit (or error) frame is the last: close; the client's answer to the close confirms delivery.
        a.gotTerminal = true;
        a.closing = true;
        a.ws.close(1000, 'command finished');
        break;
      }
    }
    if (!this.reconnectable) this.trimTo(a.cursor);
  }

  private flushed(a: Attachment) {
    if (this.ended || !this.attachments.has(a)) return;
    this.pump(a);
    this.updateFlow();
  }

  /** Pauses the command's output while a connected client is behind (or a plain exec has no connection yet). */
  private updateFlow() {
    if (this.ended) return;
    let pause = !this.reconnectable && !this.everAttached;
    for (const a of this.attachments) {
      if (a.live && !a.closing && a.ws.readyState === a.ws.OPEN && a.ws.bufferedAmount >= WS_HIGH_WATER && a.cursor < this.last) pause = true;
    }
    if (this.killing) pause = false;
    if (pause === this.paused) return;
    this.paused = pause;
    if (pause) {
      this.channel.pause();
      this.channel.stderr.pause();
    } else {
      this.channel.resume();
      this.channel.stderr.resume();
    }
  }

  private commandEnded() {
    if (this.finished || this.ended) return;
    const { code, signal } = this.exit;
    this.finished = true;
    this.stdinOpen = false;
    if (typeof code === 'number') {
      this.record({ type: 'exit', exit: { code } }, true);
    } else if (signal) {
      const n = (osConstants.signals as Record<string, number>)[signal] ?? 0;
      this.record({ type: 'exit', exit: { code: 128 + n } }, true);
    } else {
      const why = this.connectionError();
      this.record({ type: 'error', error: `the SSH connection to VM "${this.vmName}" ended before the command reported an exit status${why ? `: ${why}` : ''}` }, true);
    }
    this.disconnect();
    if (this.killing) this.end(1000, 'the exec session was closed');
    else if (!this.reconnectable && this.attachments.size === 0 && this.everAttached) this.end(1000, 'the client went away');
  }

  // -- input --

  private error(a: Attachment, message: string) {
    if (a.ws.readyState === a.ws.OPEN) this.sendControl(a, { type: 'error', error: message });
  }

  private onMessage(a: Attachment, data: RawData, isBinary: boolean) {
    if (this.ended) return;
    if (isBinary) return this.error(a, 'binary messages are not part of the exec protocol: send JSON text frames');
    let frame: { type?: unknown; data?: unknown; watermark?: unknown; terminal?: { rows?: unknown; cols?: unknown } };
    try {
      frame = JSON.parse((Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer)).toString('utf8'));
      if (typeof frame !== 'object' || frame === null) throw new Error('not an object');
    } catch {
      return this.error(a, 'malformed frame: expected a JSON object like {"type":"stdin","data":"..."}');
    }
    const watermark = () => {
      const w = frame.watermark ?? 0;
      if (typeof w !== 'number' || !Number.isSafeInteger(w) || w < 0) {
        this.error(a, `"${String(frame.type)}" needs "watermark" to be a frame number (an integer >= 0)`);
        return undefined;
      }
      return w;
    };
    switch (frame.type) {
      case 'stdin': {
        if (!this.spec.interactive) return this.error(a, 'stdin is not forwarded: start the exec with ?interactive=true');
        if (!this.stdinOpen) return this.error(a, 'stdin is already closed');
        const d = frame.data ?? '';
        if (typeof d !== 'string' || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(d)) return this.error(a, '"stdin" needs "data" in base64');
        if (d === '') {
          this.stdinOpen = false;
          this.channel.end();
          return;
        }
        if (!this.channel.write(Buffer.from(d, 'base64')) && !this.stdinBlocked) {
          // Backpressure: read no more from the clients until the SSH channel takes more.
          this.stdinBlocked = true;
          for (const x of this.attachments) x.ws.pause();
          this.channel.once('drain', () => {
            this.stdinBlocked = false;
            for (const x of this.attachments) x.ws.resume();
          });
        }
        return;
      }
      case 'resize': {
        if (!this.spec.tty) return this.error(a, 'resize needs a terminal: start the exec with ?tty=true');
        const rows = frame.terminal?.rows;
        const cols = frame.terminal?.cols;
        const ok = (n: unknown): n is number => typeof n === 'number' && Number.isInteger(n) && n >= 1 && n <= TERMINAL_MAX;
        if (!ok(rows) || !ok(cols)) return this.error(a, `"resize" needs "terminal": {"rows", "cols"}, integers from 1 to ${TERMINAL_MAX}`);
        if (!this.finished) this.channel.setWindow(rows, cols, 0, 0);
        return;
      }
      case 'history': {
        if (!this.reconnectable) return this.error(a, 'history needs a session: start the exec with ?session=ID');
        let w = watermark();
        if (w === undefined) return;
        if (w > this.last) {
          this.error(a, `watermark ${w} is beyond this session's newest frame (${this.last}): session "${this.id}" is not the one that watermark came from (it ended and a new one started under the same id); replaying this session from its start`);
          w = 0;
        }
        a.cursor = Math.max(a.cursor, w);
        a.historyUntil = this.last;
        a.live = true;
        this.pump(a);
        this.updateFlow();
        return;
      }
      case 'ack': {
        if (!this.reconnectable) return;
        const w = watermark();
        if (w === undefined) return;
        const upTo = Math.min(w, this.last);
        if (upTo > this.acked) {
          this.acked = upTo;
          this.trimTo(upTo);
        }
        return;
      }
      case 'detach':
        if (!this.reconnectable) return this.error(a, 'detach needs a session (?session=ID); without one, disconnecting kills the command');
        a.closing = true;
        a.ws.close(1000, 'detached');
        return;
      case 'close':
        this.kill('closed by the client');
        return;
      default:
        return this.error(a, `unknown frame type ${JSON.stringify(frame.type)}: expected stdin, resize, history, ack, detach or close`);
    }
  }

  private onClose(a: Attachment, code: number) {
    this.attachments.delete(a);
    if (this.ended) return;
    if (a.gotTerminal && code === 1000) this.terminalDelivered = true;
    if (!this.reconnectable) {
      if (this.finished) this.end(1000, 'done');
      else this.kill('the client disconnected');
      return;
    }
    if (this.finished && this.terminalDelivered) {
      this.end(1000, 'done');
      return;
    }
    if (this.attachments.size === 0) this.startTTL();
    this.updateFlow();
  }

  private startTTL() {
    clearTimeout(this.ttlTimer);
    this.ttlTimer = setTimeout(() => this.kill(`nobody attached for ${this.limits.retentionMs / 1000}s`), this.limits.retentionMs);
    this.ttlTimer.unref();
  }

  // -- the end --

  /** Kills the command (SIGKILL to its process group) and ends the session once it is gone. */
  kill(_reason: string) {
    if (this.ended || this.killing) return;
    this.forget();
    if (this.finished) {
      this.end(1000, 'the exec session was closed');
      return;
    }
    this.killing = true;
    clearTimeout(this.ttlTimer);
    this.signalKill();
    this.updateFlow();
    this.killTimer = setTimeout(() => this.end(1000, 'the exec session was closed'), KILL_GRACE_MS);
    this.killTimer.unref();
  }

  /** Ends everything now: the SSH connection and every attached WebSocket. */
  end(code = 1000, reason = 'the exec session ended') {
    if (this.ended) return;
    this.forget();
    if (!this.finished && !this.killing) this.signalKill();
    this.ended = true;
    clearTimeout(this.ttlTimer);
    clearTimeout(this.killTimer);
    this.disconnect();
    for (const a of this.attachments) {
      if (!a.closing && a.ws.readyState === a.ws.OPEN) a.ws.close(code, reason);
      a.ws.resume();
    }
    this.frames.length = 0;
    this.head = 0;
    this.bytes = 0;
  }

  private signalKill() {
    try {
      this.channel.signal('KILL');
    } catch {
      // the channel is gone already
    }
    try {
      this.killTree();
    } catch {
      // the connection is gone already
    }
  }

  private forget() {
    const f = this.onEnd;
    this.onEnd = undefined;
    f?.();
  }
}

