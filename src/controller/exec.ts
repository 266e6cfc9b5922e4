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
// detaches; output is kept in a history buffer (at most HISTORY_LIMIT_BYTES of frames per session, the
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
// setExecLimits() changes it); a session whose command has ended goes as soon as its last frame was
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
import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { constants as osConstants } from 'node:os';
import type { Duplex, Readable } from 'node:stream';
import type { RawData, WebSocket } from 'ws';
import type { ServiceAccount, VM } from '../api/schemas.ts';
import { CONNECT_ROLES, type Access } from './access.ts';
import { sshCredentials } from '../api/defaults.ts';
import type { Store } from './store/store.ts';
import { badRequest, HttpError, notFound } from './errors.ts';
import type { Tunnel, Tunnels } from './tunnels.ts';

/** Frames (as sent) a session keeps for replay, in bytes; the oldest go first. */
export const HISTORY_LIMIT_BYTES = 4 * 1024 * 1024;
/** Frames are sent to a client only while less than this is waiting in its WebSocket. */
export const WS_HIGH_WATER = 1024 * 1024;
/** How long a session with nobody attached lives on. */
export const DEFAULT_RETENTION_MS = 10 * 60_000;
/** Reconnectable sessions per service account, and in all. */
export const MAX_SESSIONS_PER_ACCOUNT = 64;
export const MAX_SESSIONS = 1024;
/** After a KILL signal, how long the command gets to be reported gone before the connection is cut. */
const KILL_GRACE_MS = 3000;
/** Accounted per kept frame on top of its JSON text. */
const FRAME_OVERHEAD = 64;
const TERMINAL_MAX = 10_000;

const limits = { historyBytes: HISTORY_LIMIT_BYTES, retentionMs: DEFAULT_RETENTION_MS };

/** Changes the history cap and the retention TTL of every session registry (tests shorten them). */
export function setExecLimits(opts: { historyBytes?: number; retentionMs?: number }) {
  if (opts.historyBytes !== undefined) limits.historyBytes = opts.historyBytes;
  if (opts.retentionMs !== undefined) limits.retentionMs = opts.retentionMs;
}

export function execLimits(): Readonly<typeof limits> {
  return { ...limits };
}

// ---- the request ----

export interface ExecSpec {
  command: string;
  interactive: boolean;
  tty: boolean;
  rows: number;
  cols: number;
  env: Record<string, string>;
  workdir: string;
}

export interface ExecQuery {
  /** Undefined when no command was given (allowed only to reattach to a session). */
  spec?: ExecSpec;
  /** Rows and cols as given (0 when not), for resizing a reattached TTY. */
  size?: { rows: number; cols: number };
  session?: string;
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const SESSION_ID = /^[\x21-\x7e]{1,128}$/;

function parseBool(q: URLSearchParams, name: string): boolean | undefined {
  const v = q.get(name);
  if (v === null) return undefined;
  const l = v.toLowerCase();
  if (['', '1', 't', 'true', 'yes', 'on'].includes(l)) return true;
  if (['0', 'f', 'false', 'no', 'off'].includes(l)) return false;
  throw badRequest(`query parameter "${name}" must be a boolean (true or false), got ${JSON.stringify(v)}`);
}

function parseSize(q: URLSearchParams, name: string): number {
  const v = q.get(name);
  if (v === null || v === '') return 0;
  if (!/^\d{1,6}$/.test(v) || Number(v) > TERMINAL_MAX) {
    throw badRequest(`query parameter "${name}" must be a terminal size from 1 to ${TERMINAL_MAX}, got ${JSON.stringify(v)}`);
  }
  return Number(v);
}

/** Parses and checks the query; throws 400s naming the parameter. */
export function parseExecQuery(url: URL): ExecQuery {
  const q = url.searchParams;
  const command = q.get('command') ?? '';
  if (command.includes('\0')) throw badRequest('query parameter "command" must not contain NUL characters');
  const stdin = parseBool(q, 'stdin');
  const interactiveParam = parseBool(q, 'interactive');
  if (stdin !== undefined && interactiveParam !== undefined && stdin !== interactiveParam) {
    throw badRequest('query parameters "interactive" and "stdin" contradict each other');
  }
  const tty = parseBool(q, 'tty') ?? false;
  const interactive = (interactiveParam ?? stdin ?? false) || tty;
  const rows = parseSize(q, 'rows');
  const cols = parseSize(q, 'cols');
  if ((rows === 0) !== (cols === 0)) throw badRequest('query parameters "rows" and "cols" go together: give both or neither');
  const env: Record<string, string> = {};
  for (const [key, value] of q) {
    if (!key.startsWith('env')) continue;
    if (key === 'env') throw badRequest('query parameter "env" must be given as env[NAME]=VALUE');
    const m = /^env\[(.*)\]$/s.exec(key);
    if (!m) continue;
    if (!ENV_NAME.test(m[1])) {
      throw badRequest(`query parameter ${JSON.stringify(key)}: ${JSON.stringify(m[1])} is not an environment variable name (letters, digits and _, not starting with a digit)`);
    }
    if (value.includes('\0')) throw badRequest(`query parameter ${JSON.stringify(key)} must not contain NUL characters`);
    if (!(m[1] in env)) env[m[1]] = value;
  }
  const workdir = q.get('workdir') ?? '';
  if (workdir.includes('\0')) throw badRequest('query parameter "workdir" must not contain NUL characters');
  const session = q.get('session') || undefined;
  if (session !== undefined && !SESSION_ID.test(session)) {
    throw badRequest('query parameter "session" must be 1 to 128 printable ASCII characters without spaces');
  }
  const size = rows ? { rows, cols } : undefined;
  if (!command) return { session, size };
  return { spec: { command, interactive, tty, rows: rows || 24, cols: cols || 80, env, workdir }, size, session };
}

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** The variable that marks a command's processes, so that they can be found and killed. */
export const MARKER_VAR = 'ORCHARD_EXEC_ID';

/**
 * What the SSH server runs (through the user's login shell): the command, after `cd` and `export`s.
 * The environment goes in the command line because sshd accepts env requests only for AcceptEnv names.
 * With a `marker`, the login shell exports it (ORCHARD_EXEC_ID) and execs itself (`$SHELL -c`) on
 * the rest, so that the shell running the command and everything it starts carry it in their
 * environment from the start (/proc/PID/environ shows what a process was started with).
 */
export function remoteCommand(spec: ExecSpec, marker?: string): string {
  const keys = Object.keys(spec.env).sort();
  let inner = '';
  if (spec.workdir) inner += `cd ${shellQuote(spec.workdir)} || exit $?\n`;
  for (const k of keys) inner += `export ${k}=${shellQuote(spec.env[k])}\n`;
  inner += spec.command;
  if (marker === undefined) return inner;
  return `export ${MARKER_VAR}=${shellQuote(marker)}; exec "\${SHELL:-/bin/sh}" -c ${shellQuote(inner)}`;
}

/**
 * Kills every process whose environment carries the marker (Linux guests: /proc). The SSH "signal"
 * request covers servers that support it (OpenSSH, e.g. macOS); dropbear does not, and closing a
 * session without a PTY leaves its processes running. Twice, for processes forked during the first pass.
 */
export function killScript(marker: string): string {
  // (No grep -F: busybox's stops at the first NUL of an environ file. The marker has no regex metacharacters.)
  const m = `${MARKER_VAR}=${marker}`;
  return `for pass in 1 2; do for f in $(grep -l ${shellQuote(m)} /proc/[0-9]*/environ 2>/dev/null); do p=\${f#/proc/}; kill -KILL "\${p%/environ}" 2>/dev/null; done; done; true`;
}

function sameSpec(a: ExecSpec, b: ExecSpec): boolean {
  const ka = Object.keys(a.env).sort();
  const kb = Object.keys(b.env).sort();
  return (
    a.command === b.command &&
    a.interactive === b.interactive &&
    a.tty === b.tty &&
    a.workdir === b.workdir &&
    ka.length === kb.length &&
    ka.every((k, i) => k === kb[i] && a.env[k] === b.env[k])
  );
}

// ---- one running command ----

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
  /** Ends the SSH connection (and the tunnel under it). */
  disconnect: () => void;
  /** Kills the command's processes some other way than the channel's signal (see killScript). */
  killTree?: () => void;
  /** Called once when the session ends (the registry forgets it). */
  onEnd?: () => void;
  /** An error of the SSH connection, for the message when it is lost. */
  connectionError?: () => string | undefined;
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
  private exit: { code?: number | null; signal?: string } = {};

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
    this.stdinOpen = opts.spec.interactive;

    const ch = this.channel;
    ch.on('error', () => {});
    ch.stderr.on('error', () => {});
    ch.on('data', (d: Buffer) => this.record({ type: 'stdout', data: d.toString('base64') }));
    ch.stderr.on('data', (d: Buffer) => this.record({ type: 'stderr', data: d.toString('base64') }));
    ch.on('exit', (code: number | null, signal?: string) => (this.exit = { code, signal }));
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
    while (this.bytes > limits.historyBytes && this.frames.length - this.head > 1) this.dropOldest();
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
          this.sendControl(a, { type: 'error', error: `output was lost: ${span} no longer kept (the session keeps the newest ${limits.historyBytes} bytes of frames); continuing from frame ${this.dropped + 1}` });
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
    this.ttlTimer = setTimeout(() => this.kill(`nobody attached for ${limits.retentionMs / 1000}s`), limits.retentionMs);
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

// ---- the registry ----

interface Logger {
  debug(obj: object, msg: string): void;
}

export interface ExecSessionsOptions {
  store: Store;
  tunnels: Tunnels;
  /** Ends the sessions of an account that is revoked (deleted, new token, lost its connect role). */
  access?: Access;
  logger?: Logger;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The controller's exec sessions: reconnectable ones by (VM, id), and the start of every exec. */
export class ExecSessions {
  private readonly sessions = new Map<string, ExecSession>();
  private readonly creating = new Map<string, { account: string; promise: Promise<unknown> }>();
  private readonly plain = new Set<ExecSession>();
  private readonly store: Store;
  private readonly tunnels: Tunnels;
  private readonly access?: Access;
  private readonly logger?: Logger;
  private closed = false;

  constructor(opts: ExecSessionsOptions) {
    this.store = opts.store;
    this.tunnels = opts.tunnels;
    this.access = opts.access;
    this.logger = opts.logger;
  }

  /** For tests: a reconnectable session by VM and id. */
  get(vmName: string, id: string): ExecSession | undefined {
    return this.sessions.get(key(vmName, id));
  }

  get size(): number {
    return this.sessions.size;
  }

  /**
   * Everything before the WebSocket upgrade (HTTP errors can still be answered): checks, waits for
   * the VM, connects over SSH and starts the command. Returns what to do with the WebSocket.
   */
  async open(req: { vmName: string; account: ServiceAccount; query: ExecQuery; waitSeconds: number; request?: IncomingMessage; signal?: AbortSignal }): Promise<(ws: WebSocket) => void> {
    if (this.closed) throw new HttpError(503, 'the controller is shutting down');
    const { vmName, query } = req;
    const account = req.account.name;
    if (query.session === undefined) {
      if (!query.spec) throw badRequest('query parameter "command" is required: the command line to run in the VM');
      // A client that leaves while the VM is awaited ends the wait (a named session outlives its client).
      const session = await this.start(vmName, req.account, query.spec, req.waitSeconds, undefined, req.signal);
      this.plain.add(session);
      const socket = req.request?.socket;
      if (socket) {
        // The client may go away before the upgrade: then nobody will ever attach.
        const gone = () => {
          if (session.attached === 0) session.kill('the client went away before the WebSocket opened');
        };
        if (socket.destroyed) gone();
        else socket.once('close', gone);
      }
      return (ws) => session.attach(ws, true);
    }

    const k = key(vmName, query.session);
    for (;;) {
      const existing = this.sessions.get(k);
      if (existing && !existing.gone) {
        this.checkOwner(existing.account, account, query.session);
        const vm = await this.store.get('vms', vmName);
        if (vm && vm.uid === existing.vmUID) {
          if (query.spec && !sameSpec(query.spec, existing.spec)) {
            throw new HttpError(409, `exec session "${query.session}" is already running a different command or options on VM "${vmName}"`);
          }
          return (ws) => existing.attach(ws, false, query.size);
        }
        existing.kill('the VM was deleted');
      }
      const inflight = this.creating.get(k);
      if (!inflight) break;
      this.checkOwner(inflight.account, account, query.session);
      await inflight.promise.catch(() => {});
    }
    if (!query.spec) {
      throw notFound(`exec session "${query.session}" does not exist on VM "${vmName}" (it ended or expired); give ?command= to start a new one`);
    }
    let mine = 0;
    for (const s of this.sessions.values()) if (s.account === account) mine++;
    for (const c of this.creating.values()) if (c.account === account) mine++;
    if (mine >= MAX_SESSIONS_PER_ACCOUNT) throw new HttpError(429, `service account "${account}" has ${mine} exec sessions already (the limit is ${MAX_SESSIONS_PER_ACCOUNT}); close some`);
    if (this.sessions.size + this.creating.size >= MAX_SESSIONS) throw new HttpError(429, `the controller has ${MAX_SESSIONS} exec sessions already`);

    const id = query.session;
    const spec = query.spec;
    const promise = this.start(vmName, req.account, spec, req.waitSeconds, id);
    this.creating.set(k, { account, promise });
    let session: ExecSession;
    try {
      session = await promise;
    } finally {
      this.creating.delete(k);
    }
    if (this.closed) {
      session.end(1001, 'the controller is shutting down');
      throw new HttpError(503, 'the controller is shutting down');
    }
    this.sessions.set(k, session);
    return (ws) => session.attach(ws, true);
  }

  private checkOwner(owner: string, account: string, id: string) {
    if (owner !== account) throw new HttpError(403, `exec session "${id}" belongs to another service account`);
  }

  /** Waits for the VM, connects over SSH (retrying until the wait is over) and starts the command. */
  private async start(vmName: string, account: ServiceAccount, spec: ExecSpec, waitSeconds: number, id?: string, signal?: AbortSignal): Promise<ExecSession> {
    const deadline = Date.now() + waitSeconds * 1000;
    const vm = await this.tunnels.runningVM(vmName, waitSeconds, signal);
    for (;;) {
      try {
        return await this.startOnce(vm, account, spec, id);
      } catch (err) {
        const message = (err as Error).message;
        const auth = /authentication/i.test(message);
        this.logger?.debug({ err, vm: vmName }, 'exec: could not start the command over SSH');
        if (this.closed) throw new HttpError(503, 'the controller is shutting down');
        if (err instanceof HttpError && err.statusCode !== 503) throw err;
        if (auth || Date.now() + 1000 > deadline) {
          throw new HttpError(503, auth
            ? `could not log in to VM "${vmName}" over SSH as "${sshCredentials(vm).username}": ${message} (check the VM's username and password)`
            : `could not run the command in VM "${vmName}" over SSH: ${message}`);
        }
        await sleep(1000);
      }
    }
  }

  private async startOnce(vm: VM, account: ServiceAccount, spec: ExecSpec, id?: string): Promise<ExecSession> {
    // ssh2 is loaded with the first exec, not with every controller.
    const { Client } = await import('ssh2');
    const tunnel: Tunnel = await this.tunnels.open(vm.worker!, 22, vm);
    const conn = new Client();
    const marker = randomUUID();
    let connError: string | undefined;
    conn.on('error', (err) => (connError ??= err.message));
    tunnel.stream.on('error', () => {});
    const disconnect = () => {
      conn.end();
      tunnel.stream.destroy();
    };
    try {
      await new Promise<void>((resolve, reject) => {
        conn.once('ready', () => resolve());
        conn.once('error', reject);
        conn.once('close', () => reject(new Error(connError ?? 'the connection closed during the SSH handshake')));
        conn.connect({
          sock: tunnel.stream,
          ...sshCredentials(vm),
          readyTimeout: 20_000,
          keepaliveInterval: 30_000,
          keepaliveCountMax: 3,
          // The tunnel goes through the VM's worker, which the controller authenticated.
          hostVerifier: () => true,
        });
      });
      const channel = await new Promise<CommandChannel>((resolve, reject) => {
        conn.once('close', () => reject(new Error(connError ?? 'the SSH connection closed')));
        conn.exec(remoteCommand(spec, marker), spec.tty ? { pty: { rows: spec.rows, cols: spec.cols, term: 'xterm-256color' } } : {}, (err, ch) =>
          err ? reject(err) : resolve(ch as CommandChannel),
        );
      });
      let release = () => {};
      const session: ExecSession = new ExecSession({
        id,
        account: account.name,
        vmName: vm.name,
        vmUID: vm.uid ?? '',
        spec,
        channel,
        disconnect,
        connectionError: () => connError,
        killTree: () =>
          conn.exec(killScript(marker), (err, ch) => {
            if (err) return;
            ch.on('error', () => {});
            ch.stderr.resume();
            ch.resume();
          }),
        onEnd: () => {
          release();
          this.plain.delete(session);
          if (id !== undefined && this.sessions.get(key(vm.name, id)) === session) this.sessions.delete(key(vm.name, id));
        },
      });
      release = this.access?.hold(account, CONNECT_ROLES, (why) => session.kill(why)) ?? release;
      return session;
    } catch (err) {
      disconnect();
      throw err;
    }
  }

  /** Kills every command and ends every session (the controller is shutting down). */
  close() {
    this.closed = true;
    for (const s of [...this.sessions.values(), ...this.plain]) s.end(1001, 'the controller is shutting down');
    this.sessions.clear();
    this.plain.clear();
  }
}

const key = (vmName: string, id: string) => `${vmName}\0${id}`;
