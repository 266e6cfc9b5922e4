// Controller ↔ worker: each worker holds a WebSocket on /v1/rpc/watch; the controller pushes
// instructions down it (`syncVMsAction`, with the worker's VMs, the moment one of them changes). WebSocket
// pings keep the connection alive through proxies and load balancers and detect dead peers.
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Role, ServiceAccount } from '../api/schemas.ts';
import { authorize, type Access } from './access.ts';
import { authenticateCaller, type Sessions } from './console/sessions.ts';
import { HttpError, CLIENT_GONE } from './errors.ts';
import type { Logger } from 'pino';
import type { Limits } from './limits.ts';
import { syncVMsFrame, type WorkerInstruction } from '../api/worker-protocol.ts';
import { traceTunnel } from '../tunnel-trace.ts';

const PING_INTERVAL_MS = 20_000;
/**
 * Each round of pings goes out this many WebSockets at a time, a turn of the event loop apart: a
 * thousand workers' pings at once held the loop for 50 ms in the middle of a burst of creates.
 */
export const PING_SLICE = 64;
/** An account whose WebSocket broke the protocol (a frame over the limit, bad framing) opens none for this long, doubling per offence. */
const OFFENCE_HOLD_MS = { first: 1000, max: 60_000, forgetAfter: 10 * 60_000 };

/**
 * Accounts that broke the WebSocket protocol lately, held off from opening new ones for a while
 * (doubling from 1 s to 60 s; forgotten after 10 min of good behaviour). Honest clients never
 * offend (their frames are far below the limits); a hostile one reconnecting to send 15 MiB frames
 * would otherwise cost the controller a TLS handshake and a refused frame ten times a second each.
 */
class Offences {
  private readonly byAccount = new Map<string, { count: number; last: number; until: number }>();

  record(account: string, now = Date.now()): number {
    const prior = this.byAccount.get(account);
    const count = prior && now - prior.last < OFFENCE_HOLD_MS.forgetAfter ? prior.count + 1 : 1;
    const until = now + Math.min(OFFENCE_HOLD_MS.first * 2 ** (count - 1), OFFENCE_HOLD_MS.max);
    this.byAccount.set(account, { count, last: now, until });
    if (this.byAccount.size > 10_000) for (const [k, v] of this.byAccount) if (now - v.last > OFFENCE_HOLD_MS.forgetAfter) this.byAccount.delete(k);
    return count;
  }

  /** A 429 for an account that is held off. */
  check(account: string, now = Date.now()) {
    const o = this.byAccount.get(account);
    if (!o || now >= o.until) return;
    const seconds = Math.ceil((o.until - now) / 1000);
    throw new HttpError(429, `service account "${account}" broke the WebSocket protocol ${o.count} time${o.count === 1 ? '' : 's'} lately (frames over the limit); it may open WebSockets again in ${seconds}s`, { 'retry-after': String(seconds) });
  }
}

export interface RouteOptions {
  /** Largest frame accepted from the peer: a bigger one closes the connection with 1009. */
  maxPayload: number;
  /** Counted per account against `max` from the request on (waits included): 429 past it. */
  perAccount?: { what: string; max: number };
}

export interface UpgradeRequest {
  request: IncomingMessage;
  url: URL;
  /** Path parameters, e.g. {name} of /v1/vms/{name}/port-forward */
  params: Record<string, string>;
  account: ServiceAccount;
  /** Aborts when the client goes away before its WebSocket opens: waits end, and what they got is released. */
  signal: AbortSignal;
  /** Header lines ("name: value") the handler adds to the 101 answer. */
  responseHeaders: string[];
}
/**
 * Runs before the upgrade (so it can still answer with an HTTP error: throw an HttpError) and
 * returns what to do with the WebSocket once it is open.
 */
type UpgradeHandler = (req: UpgradeRequest) => Promise<(ws: WebSocket) => void> | ((ws: WebSocket) => void);

/** A percent-decoded path segment; malformed encoding is the client's error (400), not ours. */
function decodePathSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new HttpError(400, `malformed percent-encoding in the path: ${JSON.stringify(segment.slice(0, 100))}`);
  }
}

/** Routes WebSocket upgrades by path, after the same authentication and role checks as the REST API. */
export class WebSocketRoutes {
  /** One server per frame size limit (ws takes it per server). */
  private readonly servers = new Map<number, WebSocketServer>();
  private readonly routes: { pattern: RegExp; keys: string[]; roles: readonly Role[]; handler: UpgradeHandler; options: RouteOptions }[] = [];
  private readonly pinger: NodeJS.Timeout;
  private readonly alive = new WeakSet<WebSocket>();
  private readonly offences = new Offences();
  /** What handlers add to their upgrades' 101 answers. */
  private readonly responseHeaders = new WeakMap<IncomingMessage, string[]>();
  private readonly access: Access;
  private readonly logger: Logger;
  /** The route's path of a request's path (the API prefix taken off), or undefined outside the API. */
  private readonly routePath: (path: string) => string | undefined;
  /** The console's sessions: a WebSocket may be opened with a session cookie instead of Basic auth. */
  sessions: Sessions | undefined;

  constructor(access: Access, logger: Logger, routePath: (path: string) => string | undefined = (path) => path, pingIntervalMs = PING_INTERVAL_MS) {
    this.access = access;
    this.logger = logger;
    this.routePath = routePath;
    this.pinger = setInterval(() => void this.pingRound(), pingIntervalMs);
    this.pinger.unref();
  }

  /** Pings every WebSocket, PING_SLICE at a time; one that answered none since the last round is cut. */
  private async pingRound() {
    const all = Array.from(this.clients());
    for (let i = 0; i < all.length; i += PING_SLICE) {
      if (i > 0) await new Promise((resolve) => setImmediate(resolve));
      for (const ws of all.slice(i, i + PING_SLICE)) {
        if (!this.alive.has(ws)) {
          ws.terminate();
          continue;
        }
        this.alive.delete(ws);
        ws.ping();
      }
    }
  }

  private *clients(): Iterable<WebSocket> {
    for (const wss of this.servers.values()) yield* wss.clients;
  }

  /** `path` may have parameters: /v1/vms/{name}/port-forward */
  route(path: string, roles: readonly Role[], options: RouteOptions, handler: UpgradeHandler) {
    const keys: string[] = [];
    const pattern = new RegExp('^' + path.replace(/\{(\w+)\}/g, (_m, k: string) => (keys.push(k), '([^/]+)')) + '$');
    if (!this.servers.has(options.maxPayload)) {
      const wss = new WebSocketServer({ noServer: true, maxPayload: options.maxPayload });
      wss.on('headers', (headers: string[], request: IncomingMessage) => headers.push(...(this.responseHeaders.get(request) ?? [])));
      this.servers.set(options.maxPayload, wss);
    }
    this.routes.push({ pattern, keys, roles, handler, options });
  }

  attach(server: Server) {
    server.on('upgrade', (request: IncomingMessage, socket: Duplex, head: Buffer) => {
      void this.upgrade(request, socket, head);
    });
  }

  private async upgrade(request: IncomingMessage, socket: Duplex, head: Buffer) {
    const url = new URL(request.url ?? '/', 'http://controller');
    traceTunnel(`ctl-upgrade:${url.pathname.includes('/rpc/') ? 'worker' : 'client'}`);
    let onOpen: (ws: WebSocket) => void;
    let account: ServiceAccount;
    let session: string | undefined;
    let roles: readonly Role[];
    let wss: WebSocketServer;
    let untake = () => {};
    socket.on('error', () => {});
    socket.once('close', () => untake());
    // A client that leaves before the WebSocket opens ends what its handler waits for.
    const gone = new AbortController();
    const leave = () => gone.abort(CLIENT_GONE);
    socket.once('close', leave);
    try {
      let match: RegExpExecArray | null = null;
      const path = this.routePath(url.pathname);
      const route = path === undefined ? undefined : this.routes.find((r) => (match = r.pattern.exec(path)) !== null);
      if (!route || !match) throw new HttpError(404, `no WebSocket route for ${url.pathname}`);
      const m: RegExpExecArray = match;
      ({ account, session } = await authenticateCaller(this.access, this.sessions, { headers: request.headers, method: 'GET', remoteAddress: request.socket.remoteAddress, websocket: true }));
      authorize(account, route.roles);
      this.offences.check(account.name);
      const params = Object.fromEntries(route.keys.map((k, i) => [k, decodePathSegment(m[i + 1])]));
      const limit = route.options.perAccount;
      if (limit) untake = this.access.take(account.name, limit.what, limit.max);
      const responseHeaders: string[] = [];
      this.responseHeaders.set(request, responseHeaders);
      onOpen = await route.handler({ request, url, params, account, signal: gone.signal, responseHeaders });
      roles = route.roles;
      wss = this.servers.get(route.options.maxPayload)!;
    } catch (err) {
      untake();
      const status = err instanceof HttpError ? err.statusCode : 500;
      if (!(err instanceof HttpError)) this.logger.error({ err }, 'websocket route failed');
      const body = JSON.stringify({ message: err instanceof HttpError ? err.message : 'internal error' });
      const reason = { 400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found', 409: 'Conflict', 429: 'Too Many Requests', 503: 'Service Unavailable', 504: 'Gateway Timeout' }[status] ?? 'Error';
      const extra = err instanceof HttpError ? Object.entries(err.headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') : '';
      socket.off('close', leave);
      socket.end(`HTTP/1.1 ${status} ${reason}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${extra}connection: close\r\n\r\n${body}`);
      return;
    }
    if (socket.destroyed) {
      untake();
      return leave();
    }
    wss.handleUpgrade(request, socket, head, (ws) => {
      socket.off('close', leave);
      this.alive.add(ws);
      ws.on('pong', () => this.alive.add(ws));
      ws.on('error', (err: Error & { code?: string }) => {
        this.logger.debug({ err }, 'websocket error');
        // ws's errors of a peer that broke the protocol (a frame over maxPayload: WS_ERR_UNSUPPORTED_MESSAGE_LENGTH).
        if (!err.code?.startsWith('WS_ERR_')) return;
        const count = this.offences.record(account.name);
        this.logger.warn({ account: account.name, path: url.pathname, err: err.message, offences: count }, 'a WebSocket broke the protocol: its account is held off for a while');
      });
      // Revoking the account (deleted, new token, role removed) closes the connection at once.
      const release = this.access.hold(account, roles, (why) => ws.close(1008, why.slice(0, 120)), session);
      ws.on('close', release);
      traceTunnel(`ctl-opened:${url.pathname.includes('/rpc/') ? 'worker' : 'client'}`);
      onOpen(ws);
    });
  }

  /** Closes every WebSocket with 1001 and the reason; those that do not finish the closing handshake within `graceMs` are cut. */
  close(graceMs = 1000) {
    clearInterval(this.pinger);
    for (const ws of this.clients()) ws.close(1001, 'the controller is shutting down');
    const cut = setTimeout(() => {
      for (const ws of this.clients()) ws.terminate();
    }, graceMs);
    cut.unref();
    for (const wss of this.servers.values()) wss.close();
  }
}

/**
 * Watches that carry their worker's tunnel mux (capability "watch-mux"), with the bytes of their own
 * frames handed to the socket and not yet in the kernel. On such a watch the watch's messages go as
 * text frames (the mux's are binary), and its unread bytes are told apart from the tunnels'.
 */
const muxWatches = new WeakMap<WebSocket, { unsent: number }>();

/** `ws` is a watch that carries its worker's mux (before anything is sent on it). */
export function carryMux(ws: WebSocket): { othersBuffered: () => number } {
  const counts = { unsent: 0 };
  muxWatches.set(ws, counts);
  return { othersBuffered: () => counts.unsent };
}

/**
 * Sends a watch message (an instruction, a hello; not a report's acknowledgement, sent as text by
 * takeReports and bounded by the reports in flight): a binary frame, as upstream's workers read the
 * watch (ours take either), or a text frame on a watch that carries the mux.
 */
export function sendWatchFrame(ws: WebSocket, text: string) {
  const counts = muxWatches.get(ws);
  if (!counts) return ws.send(Buffer.from(text), { binary: true });
  const n = Buffer.byteLength(text);
  counts.unsent += n;
  ws.send(text, { binary: false }, () => (counts.unsent -= n));
}

/**
 * What the worker has not read of its watch's own frames: the socket's whole backlog on a plain watch;
 * on one that carries the mux, only the watch's frames (the tunnels' bytes there are bounded apart, by
 * their windows, the relay's queues and the mux's MAX_BACKLOG cut).
 */
function watchBacklog(ws: WebSocket): number {
  return muxWatches.get(ws)?.unsent ?? ws.bufferedAmount;
}

/** The workers' instruction channels. */
export class WorkerChannels {
  private readonly sockets = new Map<string, Set<WebSocket>>();
  private readonly pendingSync = new Set<string>();
  private readonly logger: Logger;
  private readonly vmsJSON: (worker: string) => string;
  private readonly maxBuffered: number;
  /** Called when a worker connects or disconnects (the scheduler reacts). */
  onChange: (worker: string, connected: boolean) => void = () => {};

  /** `vmsJSON` gives the worker's VMs as a JSON array, sent with each sync (our addition to `syncVMsAction`). */
  constructor(logger: Logger, vmsJSON: (worker: string) => string, limits: Pick<Limits, 'workerBufferBytes'>) {
    this.logger = logger;
    this.vmsJSON = vmsJSON;
    this.maxBuffered = limits.workerBufferBytes;
  }

  /** `greeting`: frames for this connection before anything else (the registry credentials of a worker that takes them). */
  accept(worker: string, ws: WebSocket, greeting: readonly string[] = []) {
    let set = this.sockets.get(worker);
    if (!set) this.sockets.set(worker, (set = new Set()));
    // One live watch per worker: a new one (a reconnect) replaces any older one.
    for (const old of set) old.close(1008, 'replaced by a newer watch connection of this worker');
    set.add(ws);
    this.logger.info({ worker }, 'worker connected');
    ws.on('close', () => {
      set.delete(ws);
      if (set.size === 0) this.sockets.delete(worker);
      this.logger.info({ worker }, 'worker disconnected');
      this.onChange(worker, false);
    });
    for (const frame of greeting) this.deliver(worker, ws, frame);
    // A (re)connected worker converges to the full desired state at once.
    this.sync(worker);
    this.onChange(worker, true);
  }

  /** The workers whose watch is connected now. */
  connected(): Iterable<string> {
    return this.sockets.keys();
  }

  /** Closes a worker's watch connections (its record was deleted). */
  disconnect(worker: string) {
    for (const ws of this.sockets.get(worker) ?? []) ws.close(1000, 'worker deleted');
  }

  isConnected(worker: string) {
    return this.sockets.has(worker);
  }

  /** An instruction, or a frame already made (syncVMsFrame). */
  send(worker: string, message: WorkerInstruction | string): boolean {
    const set = this.sockets.get(worker);
    if (!set) return false;
    const text = typeof message === 'string' ? message : JSON.stringify(message);
    for (const ws of set) this.deliver(worker, ws, text);
    return true;
  }

  private deliver(worker: string, ws: WebSocket, text: string) {
    sendWatchFrame(ws, text);
    // A worker that does not read is dropped (it reconnects and gets the full state) rather than buffered for.
    // On a watch that carries the mux only the watch's own frames count: a busy tunnel does not cut the
    // watch, and one that stops reading altogether is cut all the same once its syncs pile up (the
    // tunnels' bytes it leaves unread are bounded apart, and the pinger cuts a worker that answers no
    // ping). The cost of sharing the socket: a sync waits behind the tunnel bytes already in it, at
    // most what the tunnels' windows and the relay's queues let in (≈ 64 KiB per busy tunnel).
    const unread = watchBacklog(ws);
    if (unread > this.maxBuffered) {
      this.logger.warn({ worker, buffered: unread }, 'worker does not read its watch connection: disconnecting it');
      ws.close(1008, `too slow: ${unread} bytes unread`);
      setTimeout(() => ws.terminate(), 5_000).unref();
    }
  }

  /** `syncVMsAction` with the worker's VMs as they are committed now. */
  private sync(worker: string) {
    if (this.sockets.has(worker)) this.send(worker, syncVMsFrame(this.vmsJSON(worker)));
  }

  /** Coalesces the sync requests of one event-loop turn into one message per worker. */
  requestSync(worker: string) {
    if (this.pendingSync.has(worker)) return;
    this.pendingSync.add(worker);
    queueMicrotask(() => {
      this.pendingSync.delete(worker);
      this.sync(worker);
    });
  }
}
