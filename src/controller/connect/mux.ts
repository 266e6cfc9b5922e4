// Multiplexed tunnels (capability "tunnel-mux"): a client opens many tunnels on one WebSocket
// (/v1/port-forward-mux), and a worker of ours carries many on one (/v1/rpc/port-forward-mux), each
// with its own credit window (../../client/mux.ts). Each tunnel opened by a client is checked as the
// per-tunnel route checks it (roles, the target, the port, the account's tunnel limit) and is spliced
// to the worker's mux connection when it has one, else to a ready connection or a dial-back, as any
// tunnel. Protocol: docs/tunnel-mux-protocol.md.
import type { WebSocket } from 'ws';
import type { Role, ServiceAccount } from '../../api/schemas.ts';
import { MuxConnection, MuxTunnel } from '../../client/mux.ts';
import { reusableStream } from '../../client/tunnel-ends.ts';
import { authorize, CONNECT_ROLES, type Access } from '../access.ts';
import { HttpError, CLIENT_GONE } from '../errors.ts';
import type { ClusterView } from '../view.ts';
import { spliceTunnelEnds, streamEnd, wsSide, type SpliceEnd } from './relay.ts';
import type { MuxStart, StartedStream, Tunnels } from './tunnels.ts';

/** Mux connections a worker may hold at once (429 beyond): one in use, one replacing it. */
export const MUX_PER_WORKER = 2;
/** Tunnels at once on one connection (including those being closed): an OPEN beyond breaks the protocol. */
export const MUX_TUNNELS_PER_CONNECTION = 1024;
/** How long a worker has to answer a tunnel request. */
const WORKER_ANSWER_MS = 30_000;
/**
 * What the windows of one connection may grow by here (on long links, src/client/mux.ts): memory a
 * client may fill (one that answers pings late makes any link look long), so a quarter of what a
 * client lets its own windows grow by: one tunnel's window reaches 4.5 MiB, 112 MiB/s at 40 ms.
 */
const MAX_GROWTH_HERE = 4 * 1024 * 1024;
/** How long a client's WebSocket may take to finish its close handshake before it is cut. */
const CLOSE_GRACE_MS = 5_000;
/** How long the VM's side of a tunnel whose per-tunnel WebSocket closed may take to end before it is reset. */
const ORPHAN_GRACE_MS = 60_000;

/** What a client's OPEN asks for. */
type Target = { vm: string; port: number; wait: number } | { worker: string; port: number };

function parseTarget(request: unknown): Target {
  const r = (typeof request === 'object' && request) as { vm?: unknown; worker?: unknown; port?: unknown; wait?: unknown };
  if (!r) throw new HttpError(400, 'the tunnel request is not a JSON object');
  const port = r.port;
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) throw new HttpError(400, `"port" must be a TCP port (1-65535), got ${JSON.stringify(port)}`);
  if (typeof r.vm === 'string' && r.vm) {
    const wait = r.wait ?? 10;
    if (typeof wait !== 'number' || !Number.isInteger(wait) || wait < 0) throw new HttpError(400, '"wait" must be a number of seconds');
    return { vm: r.vm, port, wait: Math.min(wait, 3600) };
  }
  if (typeof r.worker === 'string' && r.worker) return { worker: r.worker, port };
  throw new HttpError(400, 'the tunnel request names neither "vm" nor "worker"');
}

/** A multiplexed tunnel as a splice end, tapped: its bytes skip the stream's buffering (relay.ts pauses it, its window bounds it). */
function muxEnd(tunnel: MuxTunnel): SpliceEnd {
  let ended = () => {};
  return {
    side: {
      onData: (listener) => tunnel.tap((payload) => listener(payload, true), () => ended()),
      offData: () => {},
      pause: () => tunnel.hold(),
      resume: () => tunnel.release(),
      get open() {
        return !tunnel.destroyed && !tunnel.sentEnd;
      },
      // Little queued here: the tunnel's window already keeps its peer's bytes in flight (and in this process's memory).
      highWater: 64 * 1024,
      send: (data, _isBinary, sent) => tunnel.sendBytes(data as Buffer, sent),
    },
    end: () => tunnel.sendBytes(undefined, () => {}),
    onEnd: (fn) => (ended = fn),
    destroy: (err) => tunnel.destroy(err),
    onClose: (fn) => tunnel.on('close', () => fn(tunnel.endedBothWays, tunnel.errored ?? undefined)),
  };
}

export class MuxTunnels {
  /** Workers' mux connections, by worker. */
  private readonly workers = new Map<string, Set<MuxConnection>>();
  private readonly tunnels: Tunnels;
  private readonly view: ClusterView;
  private readonly access: Access;
  private readonly tunnelsPerAccount: number;

  constructor(tunnels: Tunnels, view: ClusterView, access: Access, tunnelsPerAccount: number) {
    this.tunnels = tunnels;
    this.view = view;
    this.access = access;
    this.tunnelsPerAccount = tunnelsPerAccount;
    tunnels.viaMux = (worker, vmUID, port) => this.onWorker(worker, vmUID, port);
  }

  /** Before a worker's mux connection is upgraded: 429 when it holds its share. */
  checkWorker(worker: string) {
    if ((this.workers.get(worker)?.size ?? 0) >= MUX_PER_WORKER) throw new HttpError(429, `worker ${worker} holds ${MUX_PER_WORKER} tunnel mux connections already`);
  }

  /**
   * A worker's authenticated mux connection: the controller opens tunnels on it, the worker none.
   * `watch`: the connection is the worker's watch (capability "watch-mux"), whose text frames are its
   * own and whose bytes waiting in the socket `othersBuffered` tells apart from the tunnels'.
   */
  addWorker(worker: string, ws: WebSocket, watch?: { othersBuffered: () => number }) {
    let set = this.workers.get(worker);
    if (!set) this.workers.set(worker, (set = new Set()));
    if (set.size >= MUX_PER_WORKER) return ws.close(1008, 'too many tunnel mux connections');
    const mux = new MuxConnection(ws, {
      opener: true,
      // The same words on the watch: what a client is told when its tunnel's worker is lost.
      name: 'the worker connection',
      maxTunnels: MUX_TUNNELS_PER_CONNECTION,
      maxGrowth: MAX_GROWTH_HERE,
      refused: (_status, message) => new HttpError(503, `worker ${worker} could not connect: ${message}`),
      ...(watch ? { sharesText: true, othersBuffered: watch.othersBuffered } : {}),
    });
    set.add(mux);
    ws.once('close', () => {
      set.delete(mux);
      if (set.size === 0 && this.workers.get(worker) === set) this.workers.delete(worker);
    });
  }

  /** Closes a deleted worker's mux connections. */
  disconnect(worker: string) {
    for (const mux of [...(this.workers.get(worker) ?? [])]) mux.close(1000, 'worker deleted');
  }

  /** Mux connections of `worker` open now. */
  count(worker: string): number {
    return this.workers.get(worker)?.size ?? 0;
  }

  /** A client's mux connection: each tunnel it opens is checked, counted and opened as the per-tunnel route's. */
  addClient(account: ServiceAccount, ws: WebSocket) {
    const mux: MuxConnection = new MuxConnection(ws, {
      opener: false,
      maxTunnels: MUX_TUNNELS_PER_CONNECTION,
      maxGrowth: MAX_GROWTH_HERE,
      onOpen: (request, tunnel) => {
        const refuse = (err: unknown) => tunnel.destroyed || mux.refuse(tunnel, err instanceof HttpError ? err.statusCode : 500, err instanceof HttpError ? err.message : 'internal error');
        this.openForClient(account, request, tunnel).then(({ tunnel: early, opened }) => {
          if (!early) {
            return opened.then((side) => {
              if (tunnel.destroyed) return void side.destroy();
              mux.accept(tunnel);
              spliceTunnelEnds(muxEnd(tunnel), streamEnd(side));
            }, refuse);
          }
          if (tunnel.destroyed) return void early.destroy();
          // On the worker's mux connection: the client's bytes (those it sent with its OPEN, too) go
          // to the worker before its answer, which saves a worker far away a round trip.
          const accepted = opened.then(() => mux.accept(tunnel));
          accepted.catch(refuse);
          spliceTunnelEnds(muxEnd(tunnel), muxEnd(early), accepted);
        }, refuse);
      },
    });
  }

  /** Checks a client's tunnel request and starts the worker's side of it (aborted if the tunnel is reset meanwhile). */
  private async openForClient(account: ServiceAccount, request: unknown, tunnel: MuxTunnel): Promise<StartedStream> {
    const target = parseTarget(request);
    const roles: readonly Role[] = 'vm' in target ? CONNECT_ROLES : ['admin:write'];
    authorize(account, roles);
    const release = this.access.take(account.name, 'tunnels', this.tunnelsPerAccount);
    // Revoking the account or the role the tunnel needs resets it (the connection's own hold closes all of them).
    const unhold = this.access.hold(account, roles, (why) => tunnel.destroy(new Error(why)));
    const gone = new AbortController();
    tunnel.once('close', () => {
      release();
      unhold();
      gone.abort(CLIENT_GONE);
    });
    if ('vm' in target) {
      const vm = await this.tunnels.runningVM(target.vm, target.wait, gone.signal);
      return this.tunnels.startStream(vm.worker!, target.port, vm, gone.signal, true);
    }
    await this.view.loaded;
    if (!this.view.workers.has(target.worker)) throw new HttpError(404, `worker "${target.worker}" not found`);
    return this.tunnels.startStream(target.worker, target.port, undefined, gone.signal, true);
  }

  /** A tunnel started on `worker`'s own mux connection, if it has one open (the newest). */
  private onWorker(worker: string, vmUID: string, port: number): MuxStart | undefined {
    const mux = [...(this.workers.get(worker) ?? [])].reverse().find((m) => m.open);
    if (!mux) return undefined;
    try {
      return mux.startTunnel({ vmUID, port }, WORKER_ANSWER_MS);
    } catch (err) {
      return { opened: Promise.reject(err as Error) };
    }
  }

}

/**
 * Splices a client's per-tunnel WebSocket (upstream's CLI, and ours without the mux) and a tunnel on
 * the worker's mux connection. That WebSocket has no half-close: the VM's end closes it (1000), as
 * the dial-back's close did. Its close handshake completed (1000, or no code) is the client's end:
 * what it sent before still goes to the VM, then the end (a reset would drop what is still on its
 * way, up to a window). A VM side that has not ended ORPHAN_GRACE_MS later is reset; any other
 * close resets the tunnel at once.
 */
export function spliceClient(ws: WebSocket, tunnel: MuxTunnel) {
  ws.on('error', () => {});
  const closeClient = (code: number, reason: string) => {
    if (ws.readyState !== ws.OPEN) return;
    ws.close(code, reason.slice(0, 120));
    setTimeout(() => ws.terminate(), CLOSE_GRACE_MS).unref();
  };
  // Orderly: a close frame came, with 1000 or no code (1005); not a cut (1006) or an error's code.
  const closed = new Promise<boolean>((resolve) => ws.once('close', (code: number) => resolve(code === 1000 || code === 1005)));
  void closed.then((orderly) => {
    if (!orderly || tunnel.destroyed) return;
    // What the VM's side still sends is dropped (the relay has nowhere to send it), as sshd drops a closed channel's.
    const orphaned = setTimeout(() => tunnel.destroy(), ORPHAN_GRACE_MS).unref();
    tunnel.once('close', () => clearTimeout(orphaned));
  });
  const client: SpliceEnd = {
    side: wsSide(ws),
    end: () => closeClient(1000, 'the VM closed the connection'),
    onEnd: (fn) => void closed.then((orderly) => orderly && fn()),
    destroy: (err) => closeClient(1011, `the worker connection was lost (${err?.message ?? 'reset'})`),
    onClose: (fn) => void closed.then(fn),
  };
  spliceTunnelEnds(client, muxEnd(tunnel));
}

/**
 * Splices a client's ready connection (docs/tunnel-pool-protocol.md) and a tunnel on the worker's mux
 * connection. A client that ends its tunnels with end frames (`recycle`: our clients) gets the mux's
 * half-close end to end (a target that ends first still gets what the client sends after), and its
 * connection waits for the next request once both ends have passed; without, as upstream's per-tunnel
 * WebSocket (spliceClient). Before, these tunnels took the worker's dial-back, whose WebSocket has no
 * half-close: what the client sent after the target's end and beyond the buffers was lost.
 */
export function spliceReady(ws: WebSocket, tunnel: MuxTunnel, recycle: (() => void) | undefined) {
  if (!recycle) return spliceClient(ws, tunnel);
  spliceTunnelEnds(streamEnd(reusableStream(ws, recycle)), muxEnd(tunnel));
}
