// Connections to VMs, always through their worker: the controller asks the worker (over its watch
// WebSocket) to dial the VM's port and to dial back on /v1/rpc/port-forward?session=ID; the two are
// paired by session id (a rendezvous). The same for IP resolution via /v1/rpc/resolve-ip.
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { createWebSocketStream, type RawData, type WebSocket } from 'ws';
import type { ServiceAccount, VM } from '../../api/schemas.ts';
import type { WorkerChannels } from '../rpc.ts';
import { HttpError } from '../errors.ts';
import type { ClusterView } from '../view.ts';
import { checkActsAs } from '../domain/workers.ts';
import { relay, wsSide } from './relay.ts';
import { PORT_FORWARD_POOL, type PortForwardAction, type WorkerInstruction } from '../../api/worker-protocol.ts';
import { parseReadyAnswer, ReadyTunnels, readyRequest } from './ready-tunnels.ts';
import { traceTunnel } from '../../tunnel-trace.ts';
import { spliceEnds } from './tunnel-ends.ts';
import { reusableStream } from '../../client/tunnel-ends.ts';
import type { MuxTunnel } from '../../client/mux.ts';

/** How long the worker has to dial back. */
const RENDEZVOUS_TIMEOUT_MS = 30_000;

export interface Tunnel {
  /** Bytes to and from the VM's port (flow-controlled: writes wait for the network); made when first used. */
  readonly stream: Duplex;
  /** The worker's WebSocket: its close code, and its messages for a relay that does not use `stream`. */
  ws: WebSocket;
  /**
   * Called once the relay listens to `ws`: delivers what arrived before (on a ready connection the
   * worker's first bytes can come in the same read as its answer). `stream` calls it itself.
   */
  start(): void;
  /** Set when the worker agreed to end this tunnel with end frames: puts `ws` back among its idle ready connections. */
  recycle?: () => void;
}

/** The worker's side of a tunnel being opened: `opened` once the worker connected; `tunnel`, on its mux connection, at once. */
export interface StartedStream {
  tunnel?: MuxTunnel;
  opened: Promise<Duplex>;
}

/** A tunnel being opened on a worker's mux connection (`tunnel` missing if none could be opened: `opened` rejects). */
export interface MuxStart extends StartedStream {
  opened: Promise<MuxTunnel>;
}

/** A tunnel over the worker's WebSocket `ws`; `early`: messages that arrived before anyone listened. */
function tunnelOf(ws: WebSocket, early?: { messages: [RawData, boolean][]; stop: () => void }): Tunnel {
  let stream: Duplex | undefined;
  let started = !early;
  const start = () => {
    if (started) return;
    started = true;
    early!.stop();
    ws.resume();
    for (const [data, isBinary] of early!.messages) ws.emit('message', data, isBinary);
  };
  return {
    ws,
    start,
    get stream() {
      if (!stream) {
        stream = createWebSocketStream(ws);
        start();
      }
      return stream;
    },
  };
}

interface Pending<T> {
  worker: string;
  resolve: (value: T) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  /** The caller left (its client went away) after the worker claimed the session. */
  cancelled?: boolean;
}

/** The answer to a waiter whose client went away: nobody reads it, but it ends the wait. */
export const clientGone = () => new HttpError(499, 'the client went away');
const shuttingDown = () => new HttpError(503, 'the controller is shutting down');
const newSession = () => randomBytes(32).toString('base64url');
const asBuffer = (data: RawData) => (Array.isArray(data) ? Buffer.concat(data) : data instanceof ArrayBuffer ? Buffer.from(data) : data);

export class Tunnels {
  private readonly forwards = new Map<string, Pending<Tunnel>>();
  private readonly ipRequests = new Map<string, Pending<string>>();
  /** Callers waiting for a VM to change (runningVM), by VM name: woken by the view, not by polling. */
  private readonly waiters = new Map<string, Set<() => void>>();

  /** How many requests wait for their VM to run. */
  get waiting(): number {
    let n = 0;
    for (const set of this.waiters.values()) n += set.size;
    return n;
  }
  private readonly channels: WorkerChannels;
  private readonly view: ClusterView;
  private readonly unsubscribe: () => void;
  /** Our workers' idle connections, ready to become tunnels (capability "tunnel-pool"). */
  readonly ready = new ReadyTunnels();
  private closed = false;

  constructor(channels: WorkerChannels, view: ClusterView) {
    this.channels = channels;
    this.view = view;
    this.unsubscribe = view.subscribe((change) => {
      if (change.kind !== 'vms') return;
      for (const wake of this.waiters.get(change.object.name) ?? []) wake();
    });
  }

  /** A rendezvous that gives up when `signal` aborts (its client went away): the session is withdrawn. */
  private rendezvous<T>(map: Map<string, Pending<T>>, worker: string, action: (session: string) => WorkerInstruction, what: string, signal?: AbortSignal): Promise<T> {
    if (this.closed) return Promise.reject(shuttingDown());
    // Unguessable and single-use: whoever could guess one could claim someone else's tunnel.
    const session = newSession();
    return new Promise<T>((resolve, reject) => {
      const done = () => {
        clearTimeout(pending.timer);
        map.delete(session);
        signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = () => {
        pending.cancelled = true;
        done();
        reject(clientGone());
      };
      const pending: Pending<T> = {
        worker,
        resolve: (v) => (done(), resolve(v)),
        reject: (e) => (done(), reject(e)),
        timer: setTimeout(() => pending.reject(new HttpError(503, `worker ${worker} did not answer the ${what} request within ${RENDEZVOUS_TIMEOUT_MS / 1000}s`)), RENDEZVOUS_TIMEOUT_MS),
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      map.set(session, pending);
      traceTunnel('ctl-send', session);
      if (!this.channels.send(worker, action(session))) pending.reject(new HttpError(503, `worker ${worker} is not connected to the controller`));
    });
  }

  /**
   * Waits up to `waitSeconds` for the VM to run; 404 if there is no such VM, 503 if it does not run in
   * time. Woken by the controller's view as the VM changes; `signal` (the client went away) ends the wait.
   */
  async runningVM(name: string, waitSeconds: number, signal?: AbortSignal): Promise<VM> {
    await this.view.loaded;
    const deadline = Date.now() + waitSeconds * 1000;
    const check = (timedOut: boolean): VM | undefined => {
      const vm = this.view.vms.get(name);
      if (!vm) throw new HttpError(404, `VM "${name}" not found`);
      if (vm.status === 'running' && vm.worker) return vm;
      if (vm.status === 'failed') throw new HttpError(503, `VM "${name}" has failed: ${vm.status_message ?? ''}`);
      if (timedOut) {
        throw new HttpError(503, `VM "${name}" is not running (${vm.status}: ${vm.status_message ?? ''})${waitSeconds ? ` after waiting ${waitSeconds}s` : ''}`, {}, 'wait longer with the query parameter wait=SECONDS (the CLI\'s --wait SECONDS)');
      }
      return undefined;
    };
    const now = check(waitSeconds === 0);
    if (now) return now;
    if (this.closed) throw shuttingDown();
    return new Promise<VM>((resolve, reject) => {
      let set = this.waiters.get(name);
      if (!set) this.waiters.set(name, (set = new Set()));
      const finish = (fn: () => void) => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        set.delete(wake);
        if (set.size === 0 && this.waiters.get(name) === set) this.waiters.delete(name);
        fn();
      };
      const settle = (timedOut: boolean) => {
        try {
          const vm = check(timedOut);
          if (vm) finish(() => resolve(vm));
        } catch (err) {
          finish(() => reject(err as Error));
        }
      };
      const wake = () => (this.closed ? finish(() => reject(shuttingDown())) : settle(false));
      const onAbort = () => finish(() => reject(clientGone()));
      const timer = setTimeout(() => settle(true), Math.max(0, deadline - Date.now()));
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      set.add(wake);
    });
  }

  /**
   * A tunnel on the worker's own mux connection, when it has one open (set by MuxTunnels): every path
   * that can take a byte stream uses it first, so a worker of ours needs no other tunnel connection.
   * `tunnel` is given as soon as its OPEN is sent.
   */
  viaMux?: (worker: string, vmUID: string, port: number) => MuxStart | undefined;

  private onMux(worker: string, port: number, vm: VM | undefined): MuxStart | undefined {
    return this.closed ? undefined : this.viaMux?.(worker, vm?.uid ?? '', port);
  }

  /** The worker's side of a client's tunnel: on its mux connection if it has one, else as open() makes it. */
  openTunnel(worker: string, port: number, vm: VM | undefined, signal: AbortSignal, reuse = false): Promise<Tunnel | MuxTunnel> {
    return this.onMux(worker, port, vm)?.opened ?? this.open(worker, port, vm, signal, reuse);
  }

  /** The worker's side of a tunnel as a byte stream: on its mux connection if it has one, else as open() makes it. */
  openStream(worker: string, port: number, vm?: VM, signal?: AbortSignal, reuse = false): Promise<Duplex> {
    return this.startStream(worker, port, vm, signal, reuse).opened;
  }

  /**
   * openStream's stream, and on the worker's mux connection also its tunnel before the worker's
   * answer: what is written to it goes at once, and the worker holds it until it has connected.
   */
  startStream(worker: string, port: number, vm?: VM, signal?: AbortSignal, reuse = false): StartedStream {
    return this.onMux(worker, port, vm) ?? { opened: this.openElsewhere(worker, port, vm, signal, reuse) };
  }

  private async openElsewhere(worker: string, port: number, vm: VM | undefined, signal: AbortSignal | undefined, reuse: boolean): Promise<Duplex> {
    const tunnel = await this.open(worker, port, vm, signal, reuse);
    if (!tunnel.recycle) return tunnel.stream;
    const stream = reusableStream(tunnel.ws, tunnel.recycle);
    tunnel.start();
    return stream;
  }

  /**
   * A connection to TCP `port` of the VM (or, without a VM, of the worker host itself) on a ready
   * connection or the dial-back; `signal`: the client went away. `reuse`: the caller's splice handles
   * end frames (a tunnel's `recycle`).
   */
  async open(worker: string, port: number, vm?: VM, signal?: AbortSignal, reuse = false): Promise<Tunnel> {
    const action = (session: string) => ({ session, vmUID: vm?.uid ?? '', port });
    // A ready connection of the worker's own if it has one; the dial-back (upstream's way) if not, or if it was lost meanwhile.
    const ready = this.closed ? undefined : this.ready.take(worker);
    const tunnel = ready && (await this.viaReady(ready, worker, action(newSession()), signal, reuse));
    return tunnel ?? this.rendezvous(this.forwards, worker, (session) => ({ portForwardAction: action(session) }), 'port-forward', signal);
  }

  /**
   * Hands `action` to an idle ready connection of `worker` and waits for its answer: the tunnel, or
   * undefined if the connection closed before answering (the caller falls back to a dial-back).
   */
  private viaReady(ws: WebSocket, worker: string, action: PortForwardAction, signal: AbortSignal | undefined, reuse: boolean): Promise<Tunnel | undefined> {
    return new Promise<Tunnel | undefined>((resolve, reject) => {
      const early: [RawData, boolean][] = [];
      let answered = false;
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        ws.off('close', onClose);
      };
      const fail = (err: HttpError, close: () => void) => {
        done();
        ws.off('message', onMessage);
        close();
        reject(err);
      };
      const onAbort = () => fail(clientGone(), () => ws.close(1000, 'the client went away'));
      const onClose = () => {
        done();
        ws.off('message', onMessage);
        resolve(undefined);
      };
      const timer = setTimeout(
        () => fail(new HttpError(503, `worker ${worker} did not answer the port-forward request within ${RENDEZVOUS_TIMEOUT_MS / 1000}s`), () => ws.terminate()),
        RENDEZVOUS_TIMEOUT_MS,
      );
      const onMessage = (data: RawData, isBinary: boolean) => {
        if (answered) return void early.push([data, isBinary]);
        answered = true;
        const answer = parseReadyAnswer(asBuffer(data), isBinary);
        if (!answer) return fail(new HttpError(503, `worker ${worker} broke the ready-tunnel protocol`), () => ws.close(1008, 'expected the answer to a port-forward request'));
        if ('error' in answer) return fail(new HttpError(503, `worker ${worker} could not connect: ${answer.error}`), () => ws.close(1000));
        done();
        traceTunnel('ctl-paired', action.session);
        // Held until the relay listens (start()); what came with the answer waits in `early`.
        ws.pause();
        const tunnel = tunnelOf(ws, { messages: early, stop: () => ws.off('message', onMessage) });
        if (reuse && answer.reuse) tunnel.recycle = () => this.recycle(worker, ws);
        resolve(tunnel);
      };
      ws.on('message', onMessage);
      ws.on('close', onClose);
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      traceTunnel('ctl-send', action.session);
      ws.send(readyRequest(action, reuse));
    });
  }

  /** A ready connection back from a tunnel that ended with end frames: idle again (closed if the controller is closing). */
  private recycle(worker: string, ws: WebSocket) {
    if (this.closed || ws.readyState !== ws.OPEN || !this.view.workers.has(worker)) return void ws.close(1000);
    this.ready.add(worker, ws);
  }

  /** Before a worker's ready connection is upgraded: only its own account, only if it declared the capability, only its share. */
  checkReady(worker: string | null, account: ServiceAccount) {
    const name = this.checkWorkerConnection(worker, account, PORT_FORWARD_POOL);
    this.ready.check(name);
    return name;
  }

  /** Before a worker's own connection (ready, mux) is upgraded: only its own account, only if it declared `capability`. */
  checkWorkerConnection(worker: string | null, account: ServiceAccount, capability: string): string {
    if (this.closed) throw shuttingDown();
    if (!worker) throw new HttpError(400, 'query parameter "workerName" is required');
    this.checkWorker(worker, account, null);
    if (!this.view.workers.get(worker)?.capabilities?.includes(capability)) {
      throw new HttpError(403, `worker "${worker}" did not declare "${capability}" in its record's capabilities`);
    }
    return worker;
  }

  resolveIP(vm: VM, signal?: AbortSignal): Promise<string> {
    return this.rendezvous(this.ipRequests, vm.worker!, (session) => ({ resolveIPAction: { session, vmUID: vm.uid ?? '' } }), 'IP resolution', signal);
  }

  /** Only the account of the session's worker may answer it. */
  private checkWorker(name: string, account: ServiceAccount, claimed: string | null) {
    if (claimed && claimed !== name) throw new HttpError(403, 'the session belongs to another worker');
    const worker = this.view.workers.get(name);
    if (!worker) throw new HttpError(403, `worker "${name}" is no longer registered`);
    checkActsAs(worker, account);
  }

  /** The worker's dial-back: checks the session belongs to it, before the WebSocket upgrade. */
  claimForward(session: string, worker: string | null, account: ServiceAccount): Pending<Tunnel> {
    const pending = this.forwards.get(session);
    if (!pending) throw new HttpError(404, 'no port-forward session with this id is waiting (it may have timed out)');
    this.checkWorker(pending.worker, account, worker);
    traceTunnel('ctl-claim', session);
    // Claimed: the worker's WebSocket completes it (or, if the client leaves meanwhile, is closed).
    this.forwards.delete(session);
    clearTimeout(pending.timer);
    return pending;
  }

  /** Completes a claimed session with the worker's WebSocket, or with the worker's error. */
  completeForward(pending: Pending<Tunnel>, ws: WebSocket, error: string | null) {
    traceTunnel('ctl-paired');
    if (pending.cancelled) {
      ws.close(1000, 'the client went away');
      return;
    }
    if (error) {
      pending.reject(new HttpError(503, `worker ${pending.worker} could not connect: ${error}`));
      ws.close(1000);
      return;
    }
    pending.resolve(tunnelOf(ws));
  }

  answerIP(session: string, body: { ip?: string; error?: string }, account: ServiceAccount) {
    const pending = this.ipRequests.get(session);
    if (!pending) throw new HttpError(404, 'no IP resolution session with this id is waiting');
    this.checkWorker(pending.worker, account, null);
    if (body.ip) pending.resolve(body.ip);
    else pending.reject(new HttpError(503, `worker ${pending.worker} could not resolve the IP: ${body.error ?? 'no IP'}`));
  }

  /** Answers every wait with 503 (the controller is shutting down). */
  close() {
    this.closed = true;
    this.unsubscribe();
    for (const map of [this.forwards, this.ipRequests] as Map<string, Pending<unknown>>[]) {
      for (const p of [...map.values()]) p.reject(shuttingDown());
    }
    for (const set of [...this.waiters.values()]) for (const wake of [...set]) wake();
  }
}

/** How long a tunnel's side may take to finish its close handshake before its connection is cut. */
const CLOSE_GRACE_MS = 5_000;

/**
 * Splices a client's WebSocket and a tunnel, both ways, message for message (relay.ts: flow control
 * on each side, the thread shared fairly with everything else). Closing
 * either end closes the whole path; a tunnel lost abnormally closes the client with 1011 and why.
 * A client that vanishes (no close frame) has the worker side cut at once, dropping what was queued
 * for it; a side that does not finish closing within CLOSE_GRACE_MS is cut too, so nothing a tunnel
 * buffered outlives it for long.
 */
export function splice(client: WebSocket, tunnel: Tunnel, clientRecycle?: () => void) {
  // Either side ends with end frames (its connection is reused): tunnel-ends.ts.
  if (clientRecycle || tunnel.recycle) return spliceEnds(client, clientRecycle, tunnel);
  let ended = false;
  const end = (code: number, reason: string, clientVanished = false) => {
    if (ended) return;
    ended = true;
    if (client.readyState === client.OPEN) client.close(code, reason.slice(0, 120));
    if (clientVanished) tunnel.ws.terminate();
    else if (tunnel.ws.readyState === tunnel.ws.OPEN) tunnel.ws.close(code === 1011 ? 1000 : code, 'client closed');
    const cut = setTimeout(() => {
      client.terminate();
      tunnel.ws.terminate();
    }, CLOSE_GRACE_MS);
    cut.unref();
    let open = 2;
    const closed = () => --open || clearTimeout(cut);
    for (const ws of [client, tunnel.ws]) {
      if (ws.readyState === ws.CLOSED) closed();
      else ws.once('close', closed);
    }
  };
  client.on('error', () => end(1000, 'client gone', true));
  tunnel.ws.on('error', () => {});
  relay(wsSide(client), wsSide(tunnel.ws));
  relay(wsSide(tunnel.ws), wsSide(client));
  tunnel.start();
  client.on('close', (code) => end(1000, 'client closed', code === 1006));
  tunnel.ws.on('close', (code, reason) => {
    if (code === 1000 || code === 1005) end(1000, 'the VM closed the connection');
    else end(1011, `the worker connection was lost (${code}${reason.length ? ` ${reason.toString()}` : ''})`);
  });
}
