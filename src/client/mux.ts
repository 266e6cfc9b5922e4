// Tunnels multiplexed on one WebSocket (controller capability "tunnel-mux"): each binary message is one
// frame, [type u8][tunnel id u32 BE][payload], with a credit window per tunnel and direction so that a
// slow reader stalls only its own tunnel. Used on both legs: client ↔ controller (the client opens
// tunnels) and controller ↔ worker (the controller opens them). Protocol: docs/tunnel-mux-protocol.md.
//
// Either side may be hostile: anything outside the protocol (a text frame, an unknown type or id, bytes
// beyond the window granted, a frame too big, an OPEN from the side that may not open, too many
// tunnels) closes the connection with 1008 and destroys all its tunnels.
import { Duplex } from 'node:stream';
import type { RawData, WebSocket } from 'ws';
import { TUNNEL_FRAME_BYTES } from './tunnel-ends.ts';

export const TUNNEL_MUX = 'tunnel-mux';

export const OPEN = 1;
export const OPEN_OK = 2;
export const DATA = 3;
export const WINDOW = 4;
export const END = 5;
export const RESET = 6;
const HEADER = 5;

/**
 * Bytes each side may send on a tunnel before the other grants more (both directions start with it).
 * With 256 KiB one tunnel moved half as much per second, stalled waiting for grants (BENCHMARKS.md).
 */
export const INITIAL_WINDOW = 1024 * 1024;
/** Largest payload of a DATA frame accepted; ours send at most DATA_BYTES (one frame per TLS record). */
export const MAX_DATA = 64 * 1024;
const DATA_BYTES = TUNNEL_FRAME_BYTES - HEADER;
/** Largest OPEN or RESET payload (JSON). */
const MAX_CONTROL = 4096;
/** A window update is sent once this much was consumed (not per frame). */
const GRANT_STEP = INITIAL_WINDOW / 4;

/** Frames are cut from slabs: a fresh 16 KiB buffer per DATA frame cost more (allocation, GC) than the copy into it. */
const SLAB_BYTES = 1024 * 1024;
let slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
let slabUsed = 0;

function allocFrame(bytes: number): Buffer {
  if (bytes > SLAB_BYTES / 8) return Buffer.allocUnsafeSlow(bytes);
  if (slabUsed + bytes > SLAB_BYTES) {
    slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
    slabUsed = 0;
  }
  const buf = slab.subarray(slabUsed, slabUsed + bytes);
  slabUsed += bytes;
  return buf;
}

export function frame(type: number, id: number, payload?: Buffer | string): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
  const buf = allocFrame(HEADER + (body?.length ?? 0));
  buf[0] = type;
  buf.writeUInt32BE(id, 1);
  body?.copy(buf, HEADER);
  return buf;
}

/**
 * Marks the payload of a DATA frame received: the HEADER bytes before it are ours to overwrite (a relay
 * forwards it without copying). A property, not a WeakSet: one entry per frame made the garbage
 * collector's work grow by half.
 */
const RECEIVED = Symbol('mux payload');
type Marked = Buffer & { [RECEIVED]?: true };

export class MuxProtocolError extends Error {}

export interface MuxOptions {
  /** Whether this side opens tunnels (the other side accepts them); only one side of a connection does. */
  opener: boolean;
  /** Tunnels open (or being closed) at once on the connection: an OPEN beyond breaks the protocol. */
  maxTunnels: number;
  /** The accepting side's handler of an OPEN: calls `accept` or `refuse` (the request is the OPEN's JSON). */
  onOpen?: (request: unknown, tunnel: MuxTunnel) => void;
  /** What the connection is called in errors ("the worker connection"). */
  name?: string;
  /** The error an open refused by the peer rejects with. */
  refused?: (status: number, message: string) => Error;
}

type State = 'opening' | 'open' | 'reset';

/** One tunnel's bytes (a Duplex: end() is a half-close, destroy() a reset). */
export class MuxTunnel extends Duplex {
  readonly id: number;
  private readonly mux: MuxConnection;
  state: State = 'opening';
  /** What we may still send, and what the peer may still send. */
  sendCredit = INITIAL_WINDOW;
  peerCredit = INITIAL_WINDOW;
  private receivedBytes = 0;
  private grantedBytes = 0;
  gotEnd = false;
  sentEnd = false;
  private granting = false;
  /** A write waiting for the peer's window. */
  private waiting?: () => void;

  constructor(mux: MuxConnection, id: number) {
    super({ allowHalfOpen: true, readableHighWaterMark: INITIAL_WINDOW, writableHighWaterMark: INITIAL_WINDOW });
    this.mux = mux;
    this.id = id;
    // A reset is an error of its stream; one nobody listens to yet (a tunnel being opened) must not end the process.
    this.on('error', () => {});
  }

  /** Called by the connection for a DATA frame within the window. */
  deliver(payload: Buffer) {
    this.receivedBytes += payload.length;
    (payload as Marked)[RECEIVED] = true;
    this.push(payload);
    this.grant();
  }

  /** The peer granted `n` more bytes. */
  credit(n: number) {
    this.sendCredit += n;
    const next = this.waiting;
    this.waiting = undefined;
    next?.();
  }

  /** Grants the peer what was consumed, once there is enough of it. */
  private grant() {
    if (this.gotEnd || this.state === 'reset') return;
    const consumed = this.receivedBytes - this.readableLength - this.grantedBytes;
    if (consumed < GRANT_STEP) return;
    this.grantedBytes += consumed;
    this.peerCredit += consumed;
    this.mux.send(frame(WINDOW, this.id, u32(consumed)));
  }

  override _read() {}

  // Every way of consuming a Readable (data events, pipe, read()) goes through read(): what it takes is granted back, a batch at a time.
  override read(size?: number) {
    const chunk: unknown = super.read(size);
    if (chunk !== null && !this.granting && this.receivedBytes - this.grantedBytes >= GRANT_STEP) {
      this.granting = true;
      process.nextTick(() => {
        this.granting = false;
        this.grant();
      });
    }
    return chunk;
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void) {
    let offset = 0;
    const next = () => {
      while (offset < chunk.length) {
        if (this.state === 'reset' || !this.mux.open) return callback(new Error('the tunnel was reset'));
        if (this.sendCredit <= 0) return void (this.waiting = next);
        const n = Math.min(chunk.length - offset, DATA_BYTES, this.sendCredit);
        this.sendCredit -= n;
        if (offset === 0 && n === chunk.length && (chunk as Marked)[RECEIVED] && chunk.byteOffset >= HEADER) {
          // A payload received on another tunnel: our header goes into the bytes its own had.
          const whole = Buffer.from(chunk.buffer, chunk.byteOffset - HEADER, HEADER + n);
          whole[0] = DATA;
          whole.writeUInt32BE(this.id, 1);
          this.mux.send(whole);
        } else {
          this.mux.send(frame(DATA, this.id, chunk.subarray(offset, offset + n)));
        }
        offset += n;
      }
      callback();
    };
    next();
  }

  override _final(callback: (err?: Error | null) => void) {
    if (this.state !== 'reset' && this.mux.open) {
      this.sentEnd = true;
      this.mux.send(frame(END, this.id));
      this.mux.settle(this);
    }
    callback();
  }

  override _destroy(err: Error | null, callback: (err: Error | null) => void) {
    this.waiting = undefined;
    this.mux.abandon(this, err);
    callback(err);
  }
}

const u32 = (n: number) => {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n);
  return b;
};

const asBuffer = (data: RawData) => (Array.isArray(data) ? Buffer.concat(data) : data instanceof ArrayBuffer ? Buffer.from(data) : data);

/** Tunnels multiplexed on `ws`. */
export class MuxConnection {
  readonly ws: WebSocket;
  private readonly options: MuxOptions;
  private readonly tunnels = new Map<number, MuxTunnel>();
  /** Opens waiting for their answer. */
  private readonly pending = new Map<number, { resolve: (t: MuxTunnel) => void; reject: (err: Error) => void; timer: NodeJS.Timeout }>();
  /** The highest id opened so far (ids only grow: an id is never reused on a connection). */
  private lastId = 0;
  private closed = false;

  constructor(ws: WebSocket, options: MuxOptions) {
    this.ws = ws;
    this.options = options;
    ws.on('message', (data: RawData, isBinary: boolean) => {
      if (this.closed) return;
      try {
        if (!isBinary) throw new MuxProtocolError('a text frame');
        this.receive(asBuffer(data));
      } catch (err) {
        if (!(err instanceof MuxProtocolError)) throw err;
        this.fail(err.message);
      }
    });
    ws.on('close', (code: number, reason: Buffer) => this.lost(`${options.name ?? 'the tunnel connection'} was lost (${code}${reason.length ? ` ${reason.toString()}` : ''})`));
  }

  get open(): boolean {
    return !this.closed && this.ws.readyState === this.ws.OPEN;
  }

  /** Tunnels open or being opened (or closed by one side only). */
  get size(): number {
    return this.tunnels.size;
  }

  send(buf: Buffer) {
    if (this.open) this.ws.send(buf);
  }

  /** Opens a tunnel with `request` (the OPEN's JSON); rejects with the peer's refusal, or after `timeoutMs` without an answer. */
  openTunnel(request: object, timeoutMs: number): Promise<MuxTunnel> {
    if (!this.options.opener) throw new Error('this side does not open tunnels');
    if (!this.open) return Promise.reject(this.refusal(503, 'the tunnel connection is closed'));
    if (this.tunnels.size >= this.options.maxTunnels) return Promise.reject(this.refusal(503, `${this.options.maxTunnels} tunnels are open on the connection already`));
    const id = ++this.lastId;
    const tunnel = new MuxTunnel(this, id);
    this.tunnels.set(id, tunnel);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        tunnel.destroy();
        reject(this.refusal(503, `no answer to the tunnel request within ${timeoutMs / 1000}s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send(frame(OPEN, id, JSON.stringify(request)));
    });
  }

  /** The accepting side: the tunnel is connected. */
  accept(tunnel: MuxTunnel) {
    if (tunnel.state !== 'opening' || tunnel.destroyed) return;
    tunnel.state = 'open';
    this.send(frame(OPEN_OK, tunnel.id));
  }

  /** The accepting side: the tunnel could not be opened (an HTTP status and why). */
  refuse(tunnel: MuxTunnel, status: number, message: string) {
    this.resetWith(tunnel, { error: message.slice(0, 500), status });
    tunnel.destroy();
  }

  /** Closes the connection (and so all its tunnels). */
  close(code = 1000, reason = '') {
    this.ws.close(code, reason.slice(0, 120));
    this.lost(`${this.options.name ?? 'the tunnel connection'} was closed${reason ? `: ${reason}` : ''}`);
  }

  private refusal(status: number, message: string): Error {
    return this.options.refused?.(status, message) ?? Object.assign(new Error(message), { status });
  }

  /** Both ends passed: nothing more on this id but late window updates. */
  settle(tunnel: MuxTunnel) {
    if (tunnel.gotEnd && tunnel.sentEnd && tunnel.state === 'open') this.tunnels.delete(tunnel.id);
  }

  /** A tunnel destroyed: reset it unless it ended (or was reset) already. */
  abandon(tunnel: MuxTunnel, err: Error | null) {
    const wait = this.pending.get(tunnel.id);
    if (wait) {
      this.pending.delete(tunnel.id);
      clearTimeout(wait.timer);
      wait.reject(err ?? new Error('the tunnel was closed before it opened'));
    }
    if (this.tunnels.get(tunnel.id) !== tunnel || tunnel.state === 'reset') return;
    if (tunnel.gotEnd && tunnel.sentEnd) return void this.tunnels.delete(tunnel.id);
    this.resetWith(tunnel, err ? { error: err.message.slice(0, 500) } : undefined);
  }

  private resetWith(tunnel: MuxTunnel, why?: { error: string; status?: number }) {
    if (tunnel.state === 'reset') return;
    tunnel.state = 'reset';
    // Kept until the peer's RESET: what it sent meanwhile is still checked against the window.
    this.send(frame(RESET, tunnel.id, why && JSON.stringify(why)));
    if (!this.open) this.tunnels.delete(tunnel.id);
  }

  private receive(buf: Buffer) {
    if (buf.length < HEADER) throw new MuxProtocolError('a frame shorter than its header');
    const type = buf[0];
    const id = buf.readUInt32BE(1);
    const payload = buf.subarray(HEADER);
    if (type === OPEN) return this.receiveOpen(id, payload);
    const tunnel = this.tunnels.get(id);
    if (!tunnel) {
      // A window update may come after a tunnel ended both ways; anything else names no open tunnel.
      if (type === WINDOW && id <= this.lastId) return;
      throw new MuxProtocolError(`a frame for tunnel ${id}, which is not open`);
    }
    switch (type) {
      case DATA:
        if (payload.length > MAX_DATA) throw new MuxProtocolError('a DATA frame over 64 KiB');
        if (tunnel.gotEnd) throw new MuxProtocolError('bytes after the end of a tunnel');
        if (payload.length > tunnel.peerCredit) throw new MuxProtocolError('bytes beyond the window granted');
        tunnel.peerCredit -= payload.length;
        if (tunnel.state !== 'reset') tunnel.deliver(payload);
        return;
      case WINDOW: {
        if (payload.length !== 4) throw new MuxProtocolError('a malformed WINDOW frame');
        const n = payload.readUInt32BE(0);
        if (n === 0 || tunnel.sendCredit + n > 2 ** 31) throw new MuxProtocolError('a window over 2 GiB');
        if (tunnel.state !== 'reset') tunnel.credit(n);
        return;
      }
      case END:
        if (tunnel.gotEnd) throw new MuxProtocolError('a second END');
        tunnel.gotEnd = true;
        if (tunnel.state === 'reset') return;
        tunnel.push(null);
        this.settle(tunnel);
        return;
      case OPEN_OK: {
        const wait = this.pending.get(id);
        if (!wait) throw new MuxProtocolError(`OPEN_OK for tunnel ${id}, which was not being opened`);
        this.pending.delete(id);
        clearTimeout(wait.timer);
        tunnel.state = 'open';
        wait.resolve(tunnel);
        return;
      }
      case RESET: {
        if (payload.length > MAX_CONTROL) throw new MuxProtocolError('a RESET frame over 4 KiB');
        this.tunnels.delete(id);
        if (tunnel.state === 'reset') return;
        tunnel.state = 'reset';
        this.send(frame(RESET, id));
        const why = parseJSON(payload) as { error?: unknown; status?: unknown } | undefined;
        const message = typeof why?.error === 'string' ? why.error.slice(0, 500) : 'the tunnel was reset by the other side';
        const status = typeof why?.status === 'number' ? why.status : 502;
        const wait = this.pending.get(id);
        if (!wait) return void tunnel.destroy(new Error(message));
        // Refused: the open's promise carries why (nobody listens to the stream yet).
        this.pending.delete(id);
        clearTimeout(wait.timer);
        wait.reject(this.refusal(status, message));
        tunnel.destroy();
        return;
      }
      default:
        throw new MuxProtocolError(`an unknown frame type ${type}`);
    }
  }

  private receiveOpen(id: number, payload: Buffer) {
    const { onOpen, opener, maxTunnels } = this.options;
    if (opener || !onOpen) throw new MuxProtocolError('an OPEN from the side that may not open tunnels');
    if (id <= this.lastId) throw new MuxProtocolError('an OPEN reusing a tunnel id');
    if (payload.length > MAX_CONTROL) throw new MuxProtocolError('an OPEN frame over 4 KiB');
    if (this.tunnels.size >= maxTunnels) throw new MuxProtocolError(`more than ${maxTunnels} tunnels on one connection`);
    this.lastId = id;
    const tunnel = new MuxTunnel(this, id);
    this.tunnels.set(id, tunnel);
    onOpen(parseJSON(payload), tunnel);
  }

  /** A protocol error: the connection and all its tunnels are closed. */
  private fail(reason: string) {
    this.close(1008, reason);
  }

  private lost(reason: string) {
    if (this.closed) return;
    this.closed = true;
    for (const [id, wait] of this.pending) {
      clearTimeout(wait.timer);
      this.pending.delete(id);
      wait.reject(this.refusal(503, reason));
    }
    const err = new Error(reason);
    for (const tunnel of this.tunnels.values()) tunnel.destroy(err);
    this.tunnels.clear();
  }
}

function parseJSON(buf: Buffer): unknown {
  try {
    return JSON.parse(buf.toString());
  } catch {
    return undefined;
  }
}
