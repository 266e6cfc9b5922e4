// Tunnels multiplexed on one WebSocket (controller capability "tunnel-mux"): each binary message is one
// frame, [type u8][tunnel id u32 BE][payload], with a credit window per tunnel and direction so that a
// slow reader stalls only its own tunnel. Used on both legs: client ↔ controller (the client opens
// tunnels) and controller ↔ worker (the controller opens them). Protocol: docs/tunnel-mux-protocol.md.
//
// Either side may be hostile: anything outside the protocol (a text frame, an unknown type or id, bytes
// beyond the window granted, a frame too big, an OPEN from the side that may not open, too many
// tunnels) closes the connection with 1008 and destroys all its tunnels.
import { Duplex, type Writable } from 'node:stream';
import type { RawData, WebSocket } from 'ws';
import { relayed } from './scavenge.ts';
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
 * What the controller holds per tunnel is bounded by it: a multiplexed connection cannot be paused
 * for one tunnel, so the bytes wait in its memory, not in the kernel's socket buffers. With 1 MiB, 40
 * tunnels of one client pushing as fast as they could took the controller to 424 MB (bench/abuse.ts,
 * goal 321); with 512 KiB to 293 MB, and one tunnel, quiet, was as fast (BENCHMARKS.md). With
 * 256 KiB one tunnel stalled waiting for grants.
 */
export const INITIAL_WINDOW = 512 * 1024;
/** Largest payload of a DATA frame accepted; ours send at most DATA_BYTES (one frame per TLS record). */
export const MAX_DATA = 64 * 1024;
const DATA_BYTES = TUNNEL_FRAME_BYTES - HEADER;
/** Largest OPEN or RESET payload (JSON). */
const MAX_CONTROL = 4096;
/**
 * Bytes the controller lets wait, unread, in a connection's socket before closing it: above what its
 * relays queue for all the tunnels an account may hold (256 × 64 KiB) and their control frames.
 */
const MAX_BACKLOG = 32 * 1024 * 1024;
/**
 * What a tunnel's stream takes from its writer before write() says to wait, beside the chunk being
 * sent: a socket read's worth. Its bytes count as sent once in the kernel (MuxConnection.send).
 */
const WRITE_BUFFER = 64 * 1024;
/** A window update is sent once this much was consumed (not per frame). */
const GRANT_STEP = INITIAL_WINDOW / 4;
/**
 * Windows grow on long links: a tunnel that took in a whole window within two round trips of its
 * connection, its reader keeping up, is held back by its window rather than by its reader or the
 * link, and its window doubles, up to MAX_WINDOW. (At 512 KiB a 40 ms link carried 10-11 MiB/s where
 * `ssh -L` with 2 MiB windows carried 31-42: bench/tunnel.ts.) What the windows may grow by is
 * bounded per connection (MuxOptions.maxGrowth) and per process, as it is memory the peer may fill.
 */
export const MAX_WINDOW = 8 * 1024 * 1024;
export const MAX_GROWTH_PER_CONNECTION = 16 * 1024 * 1024;
const MAX_GROWTH = 32 * 1024 * 1024;
/** Windows grown beyond INITIAL_WINDOW in this process, all connections together. */
let grown = 0;
/** A connection's round trip is measured with a WebSocket ping when it opens, then every so often while its windows are checked. */
const RTT_EVERY_MS = 10_000;
/** The ping payload of a round-trip measurement (the rest is its number). */
const RTT_PING = 0x6d;

export function frame(type: number, id: number, payload?: Buffer | string): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
  const buf = Buffer.allocUnsafe(HEADER + (body?.length ?? 0));
  buf[0] = type;
  buf.writeUInt32BE(id, 1);
  body?.copy(buf, HEADER);
  return buf;
}


export class MuxProtocolError extends Error {}

export interface MuxOptions {
  /** Whether this side opens tunnels (the other side accepts them); only one side of a connection does. */
  opener: boolean;
  /** Tunnels open (or being closed) at once on the connection: an OPEN beyond breaks the protocol. */
  maxTunnels: number;
  /** The accepting side's handler of an OPEN: calls `accept` or `refuse` (the request is the OPEN's JSON). */
  onOpen?: (request: unknown, tunnel: MuxTunnel) => void;
  /**
   * Hand frames to the socket one at a time (the client's and the worker's side): the controller then
   * reads each in a TLS record of its own instead of copying frames together. The controller's relay
   * writes as frames come (more per event-loop turn), as it does on the other tunnels.
   */
  oneAtATime?: boolean;
  /** What the connection is called in errors ("the worker connection"). */
  name?: string;
  /** The error an open refused by the peer rejects with. */
  refused?: (status: number, message: string) => Error;
  /**
   * The connection is shared with another protocol that speaks in text frames (a worker's watch
   * carrying its mux): text frames are that protocol's, left to it rather than taken for a breach.
   */
  sharesText?: boolean;
  /**
   * Bytes waiting in the socket that are not this mux's (the watch's, on a watch that carries it): the
   * MAX_BACKLOG cut counts only the mux's own.
   */
  othersBuffered?: () => number;
  /** What this connection's windows may grow by, all its tunnels together (default MAX_GROWTH_PER_CONNECTION). */
  maxGrowth?: number;
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
  /** What the peer may have in flight: INITIAL_WINDOW, more once grown (see MAX_WINDOW). */
  window = INITIAL_WINDOW;
  /** When the bytes received since `epochBytes` started coming (0: none yet). */
  private epochStart = 0;
  private epochBytes = 0;
  gotEnd = false;
  sentEnd = false;
  /** Both ends passed (the peer's END came, ours went): it closed cleanly, not cut. */
  get endedBothWays(): boolean {
    return this.gotEnd && this.sentEnd;
  }
  private granting = false;
  /** Bytes to send, in order, each piece as the window allows; an item without `chunk` is the END. */
  private readonly out: { chunk?: Buffer; offset: number; done: () => void }[] = [];
  /** Relay mode (tap): payloads go straight to `data`, not through the Readable; `held` while paused. */
  private tapped?: { data: (payload: Buffer) => void; end: () => void; held: Buffer[]; heldBytes: number; paused: boolean; endPending: boolean };

  constructor(mux: MuxConnection, id: number) {
    super({ allowHalfOpen: true, readableHighWaterMark: INITIAL_WINDOW, writableHighWaterMark: WRITE_BUFFER });
    this.mux = mux;
    this.id = id;
    // A reset is an error of its stream; one nobody listens to yet (a tunnel being opened) must not end the process.
    this.on('error', () => {});
  }

  /** Called by the connection for a DATA frame within the window. */
  deliver(payload: Buffer) {
    if (!this.epochStart) this.epochStart = performance.now();
    this.receivedBytes += payload.length;
    const t = this.tapped;
    if (!t) this.push(payload);
    else if (t.paused || t.held.length) {
      t.held.push(payload);
      t.heldBytes += payload.length;
    } else t.data(payload);
    this.grant();
  }

  /** Called by the connection for the peer's END. */
  peerEnded() {
    const t = this.tapped;
    if (!t) this.push(null);
    else if (t.held.length) t.endPending = true;
    else t.end();
  }

  /**
   * Relay mode (the controller): what arrives, already or from now on, goes to `data` and the peer's
   * END to `end`, without the Readable's buffering; hold()/release() pause it (the window does the rest).
   * The tunnel is destroyed (closed) once both ends have passed.
   */
  tap(data: (payload: Buffer) => void, end: () => void) {
    const t = (this.tapped = { data, end, held: [] as Buffer[], heldBytes: 0, paused: true, endPending: this.gotEnd });
    for (let c = super.read() as Buffer | null; c !== null; c = super.read() as Buffer | null) {
      t.held.push(c);
      t.heldBytes += c.length;
    }
    this.release();
  }

  hold() {
    if (this.tapped) this.tapped.paused = true;
  }

  /**
   * What `pipe(dest)` does, without the Readable's buffering (a tap): each payload is written to `dest`
   * as it comes, `dest`'s back-pressure holds the tunnel (and its window the peer), the peer's END ends
   * `dest`. For a relay to a socket (the CLI's local connections, the worker's targets). What comes in
   * one turn of the event loop (the frames of one read) is written to `dest` in one system call: the CLI
   * relaying 100 tunnels made 86 write calls per MiB (one per frame) before, 32 now.
   */
  pipeInto(dest: Writable) {
    const release = () => this.release();
    let corked = false;
    const uncork = () => {
      corked = false;
      dest.uncork();
    };
    this.tap(
      (payload) => {
        relayed(payload.length);
        if (!corked) {
          corked = true;
          dest.cork();
          setImmediate(uncork);
        }
        if (dest.write(payload)) return;
        this.hold();
        dest.once('drain', release);
      },
      // A socket that ended already (its client closed first, and a net.Server's socket then ends
      // too) is left alone: end() would make an error, with its stack trace, to drop.
      () => {
        if (!dest.writableEnded && !dest.destroyed) dest.end();
      },
    );
  }

  release() {
    const t = this.tapped;
    if (!t) return;
    t.paused = false;
    while (!t.paused && t.held.length) {
      const c = t.held.shift()!;
      t.heldBytes -= c.length;
      t.data(c);
    }
    if (!t.held.length && t.endPending) {
      t.endPending = false;
      t.end();
    }
    this.grant();
  }

  /** The peer granted `n` more bytes. */
  credit(n: number) {
    this.sendCredit += n;
    if (this.out.length) this.flush();
  }

  /** Both ends passed: a tapped tunnel has nobody to end its stream, so it closes here. */
  settled() {
    if (this.tapped) this.destroy();
  }

  /** Grants the peer what was consumed, once there is enough of it. */
  private grant() {
    if (this.gotEnd || this.state === 'reset') return;
    const backlog = this.readableLength + (this.tapped?.heldBytes ?? 0);
    const consumed = this.receivedBytes - backlog - this.grantedBytes;
    if (consumed < GRANT_STEP) return;
    let grow = 0;
    if (this.receivedBytes - this.epochBytes >= this.window) {
      // A window's worth came since the epoch started: within two round trips, with nothing waiting
      // for the reader, it is the window that holds the tunnel back.
      const now = performance.now();
      const rtt = this.mux.roundTrip();
      if (!backlog && rtt !== undefined && now - this.epochStart < 2 * rtt) grow = this.mux.grow(Math.min(this.window, MAX_WINDOW - this.window));
      this.window += grow;
      this.epochStart = now;
      this.epochBytes = this.receivedBytes;
    }
    this.grantedBytes += consumed;
    this.peerCredit += consumed + grow;
    this.mux.send(frame(WINDOW, this.id, u32(consumed + grow)));
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

  /** Sends `chunk` (undefined: the END) after what is queued, as the window allows; `done` once all of it is handed to the connection. */
  sendBytes(chunk: Buffer | undefined, done: () => void) {
    this.out.push({ chunk, offset: 0, done });
    if (this.out.length === 1) this.flush();
  }

  private flush() {
    while (this.out.length) {
      if (this.state === 'reset' || !this.mux.open) return void (this.out.length = 0);
      const item = this.out[0];
      const chunk = item.chunk;
      if (!chunk) {
        this.out.shift();
        this.sentEnd = true;
        this.mux.send(frame(END, this.id));
        this.mux.settle(this);
        item.done();
        continue;
      }
      while (item.offset < chunk.length) {
        if (this.sendCredit <= 0) return; // credit() goes on
        const n = Math.min(chunk.length - item.offset, DATA_BYTES, this.sendCredit);
        this.sendCredit -= n;
        const last = item.offset + n === chunk.length;
        this.mux.send(this.id, item.offset === 0 && last ? chunk : chunk.subarray(item.offset, item.offset + n), last ? item.done : undefined);
        item.offset += n;
      }
      this.out.shift();
    }
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void) {
    if (this.state === 'reset' || !this.mux.open) return callback(new Error('the tunnel was reset'));
    relayed(chunk.length);
    this.sendBytes(chunk, callback);
  }

  override _final(callback: (err?: Error | null) => void) {
    if (this.state === 'reset' || !this.mux.open) return callback();
    this.sendBytes(undefined, callback);
  }

  override _destroy(err: Error | null, callback: (err: Error | null) => void) {
    this.out.length = 0;
    this.mux.shrink(this.window - INITIAL_WINDOW);
    this.mux.abandon(this, err);
    callback(err);
  }
}

const noop = () => {};

/** A frame to send: whole, or a DATA frame's tunnel id and payload; `written` once it is in the kernel. */
interface Outgoing {
  item: Buffer | [number, Buffer];
  written?: () => void;
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
    // Each tunnel's user may watch the connection's close (the CLI's splice does): one per tunnel, not a leak.
    ws.setMaxListeners(0);
    ws.on('message', (data: RawData, isBinary: boolean) => {
      if (this.closed) return;
      try {
        if (!isBinary) {
          if (this.options.sharesText) return;
          throw new MuxProtocolError('a text frame');
        }
        this.receive(asBuffer(data));
      } catch (err) {
        if (!(err instanceof MuxProtocolError)) throw err;
        this.fail(err.message);
      }
    });
    ws.on('pong', (data: Buffer) => this.ponged(data));
    if (this.open) this.roundTrip();
    else ws.once('open', () => this.roundTrip());
    ws.on('close', (code: number, reason: Buffer) => this.lost(`${options.name ?? 'the tunnel connection'} was lost (${code}${reason.length ? ` ${reason.toString()}` : ''})`));
  }

  get open(): boolean {
    return !this.closed && this.ws.readyState === this.ws.OPEN;
  }

  /** Window growth of this connection's tunnels (see MAX_WINDOW). */
  private grown = 0;
  /** The last round trips measured (ms); the smallest is the link's, the others had bytes queued before them. */
  private readonly roundTrips: number[] = [];
  private ping?: { id: number; at: number };
  private pings = 0;

  /** The connection's round trip (ms) as measured so far, if it was; measures it again when it is time. */
  roundTrip(): number | undefined {
    const now = performance.now();
    if (this.open && (!this.ping || now - this.ping.at > RTT_EVERY_MS)) {
      const payload = Buffer.allocUnsafe(5);
      payload[0] = RTT_PING;
      this.ping = { id: ++this.pings, at: now };
      payload.writeUInt32BE(this.ping.id, 1);
      this.ws.ping(payload);
    }
    return this.roundTrips.length ? Math.min(...this.roundTrips) : undefined;
  }

  private ponged(data: Buffer) {
    // Only our own ping's answer counts, and with the time we sent it (the payload is the peer's to forge).
    const ping = this.ping;
    if (!ping || data.length !== 5 || data[0] !== RTT_PING || data.readUInt32BE(1) !== ping.id) return;
    this.roundTrips.push(performance.now() - ping.at);
    if (this.roundTrips.length > 4) this.roundTrips.shift();
    this.ping = { id: 0, at: ping.at };
  }

  /** Takes up to `wanted` bytes of window growth for a tunnel, as the connection's and the process's bounds allow. */
  grow(wanted: number): number {
    const n = Math.max(0, Math.min(wanted, (this.options.maxGrowth ?? MAX_GROWTH_PER_CONNECTION) - this.grown, MAX_GROWTH - grown));
    this.grown += n;
    grown += n;
    return n;
  }

  /** Gives back a closed tunnel's window growth. */
  shrink(n: number) {
    this.grown -= n;
    grown -= n;
  }

  /** Tunnels open or being opened (or closed by one side only). */
  get size(): number {
    return this.tunnels.size;
  }

  /**
   * Sends one frame (a whole one, or DATA as its tunnel id and payload); `written` runs once the frame
   * is in the kernel, and a tunnel's writer waits for it (MuxTunnel.flush). A window is the peer's to
   * grant, and it is not what should wait here: a client granting itself gigabytes would have the
   * controller queue all it relays, and with 100 tunnels at 512 KiB the worker queued 40-47 MB, which
   * every new tunnel's first bytes waited behind (bench/tunnel.ts). So this process holds a chunk or
   * so per tunnel (WRITE_BUFFER), and the rest waits in the kernel or at its source.
   * With `oneAtATime`, each frame is handed to the socket once the one before has left: frames written
   * together are packed across TLS records, and the receiver copies them together again (as with the
   * ready connections' frames). Without it (the controller's side, which relays as frames come), a
   * peer that lets more than MAX_BACKLOG wait in the socket (it reads nothing while its tunnels'
   * replies pile up) is closed.
   */
  send(buf: Buffer): void;
  send(id: number, payload: Buffer, written?: () => void): void;
  send(a: Buffer | number, payload?: Buffer, written?: () => void) {
    if (!this.open) return;
    const item: Buffer | [number, Buffer] = typeof a === 'number' ? [a, payload!] : a;
    if (!this.options.oneAtATime) {
      if (this.ws.bufferedAmount - (this.options.othersBuffered?.() ?? 0) > MAX_BACKLOG) {
        // Cut, not closed: a close frame would wait behind what it does not read.
        this.ws.terminate();
        return this.lost(`${this.options.name ?? 'the tunnel connection'} was cut: ${MAX_BACKLOG / 1024 / 1024} MiB unread`);
      }
      return this.write(item, written ?? noop);
    }
    if (this.sending) return void this.queue.push({ item, written });
    this.sending = { item, written };
    this.write(item, this.sent);
  }

  private readonly queue: Outgoing[] = [];
  /** Bytes of frames waiting here for the socket (oneAtATime). */
  get queuedBytes(): number {
    return this.queue.reduce((n, { item }) => n + (Buffer.isBuffer(item) ? item.length : HEADER + item[1].length), 0);
  }
  /** The frame being written (oneAtATime). */
  private sending?: Outgoing;
  private readonly sent = () => {
    const done = this.sending?.written;
    this.sending = this.open ? this.queue.shift() : undefined;
    if (this.sending) this.write(this.sending.item, this.sent);
    else this.queue.length = 0;
    done?.();
  };

  /**
   * A DATA frame is written as its WebSocket and mux headers, then the payload as it is: no copy of the
   * payload into a frame (that copy was ≈ 9 % of a worker's CPU). ws frames a message the same way; its
   * socket carries only our frames, its pings and pongs and (on a worker's watch that carries the mux)
   * the watch's text frames, each written whole and at once (no compression is negotiated). Where `ws` would mask
   * with a random key (ws://, not wss://: src/client/client.ts wsMasking), the frame goes through ws.
   */
  private write(item: Buffer | [number, Buffer], sent: () => void) {
    if (Buffer.isBuffer(item)) return void this.ws.send(item, sent);
    const [id, payload] = item;
    const internals = this.ws as unknown as { _socket?: Duplex; _isServer?: boolean };
    const socket = internals._socket;
    const masked = !internals._isServer;
    if (!socket || (masked && !this.ws.url?.startsWith('wss:'))) return void this.ws.send(frame(DATA, id, payload), sent);
    const length = HEADER + payload.length;
    const ext = length < 126 ? 0 : length < 65536 ? 2 : 8;
    const head = Buffer.allocUnsafe(2 + ext + (masked ? 4 : 0) + HEADER);
    head[0] = 0x82; // FIN, binary
    head[1] = (masked ? 0x80 : 0) | (ext === 0 ? length : ext === 2 ? 126 : 127);
    let o = 2;
    if (ext === 2) head.writeUInt16BE(length, o);
    else if (ext === 8) head.writeBigUInt64BE(BigInt(length), o);
    o += ext;
    if (masked) {
      // The all-zero mask, as our wss:// clients' (the payload goes as it is).
      head.writeUInt32BE(0, o);
      o += 4;
    }
    head[o] = DATA;
    head.writeUInt32BE(id, o + 1);
    socket.cork();
    socket.write(head);
    socket.write(payload, sent);
    socket.uncork();
  }

  /** Opens a tunnel with `request` (the OPEN's JSON); rejects with the peer's refusal, or after `timeoutMs` without an answer. */
  openTunnel(request: object, timeoutMs: number): Promise<MuxTunnel> {
    try {
      return this.startTunnel(request, timeoutMs).opened;
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  /**
   * Sends the OPEN and gives the tunnel at once: what is written to it before the answer goes out
   * within its window, and the peer holds it until the tunnel is open (the protocol allows it), so a
   * client that speaks first saves a round trip. `opened` rejects as openTunnel does, and the tunnel
   * is then destroyed. Throws if no tunnel can be opened on the connection now.
   */
  startTunnel(request: object, timeoutMs: number): { tunnel: MuxTunnel; opened: Promise<MuxTunnel> } {
    if (!this.options.opener) throw new Error('this side does not open tunnels');
    if (!this.open) throw this.refusal(503, 'the tunnel connection is closed');
    if (this.tunnels.size >= this.options.maxTunnels) throw this.refusal(503, `${this.options.maxTunnels} tunnels are open on the connection already`);
    const id = ++this.lastId;
    const tunnel = new MuxTunnel(this, id);
    this.tunnels.set(id, tunnel);
    const opened = new Promise<MuxTunnel>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        tunnel.destroy();
        reject(this.refusal(503, `no answer to the tunnel request within ${timeoutMs / 1000}s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
    });
    this.send(frame(OPEN, id, JSON.stringify(request)));
    return { tunnel, opened };
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
    if (!tunnel.endedBothWays || tunnel.state !== 'open') return;
    this.tunnels.delete(tunnel.id);
    tunnel.settled();
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
    if (tunnel.endedBothWays) return void this.tunnels.delete(tunnel.id);
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
      // A window update, or a RESET that crossed our END (the peer reset before our END reached it), may
      // come after a tunnel ended both ways here: ignored. Anything else names no open tunnel.
      if ((type === WINDOW || type === RESET) && id <= this.lastId) return;
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
        tunnel.peerEnded();
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
