// Connections to VMs, always through their worker: the controller asks the worker (over its watch
// WebSocket) to dial the VM's port and to dial back on /v1/rpc/port-forward?session=ID; the two are
// paired by session id (a rendezvous). The same for IP resolution via /v1/rpc/resolve-ip.
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { createWebSocketStream, type WebSocket } from 'ws';
import type { ServiceAccount, VM } from '../api/schemas.ts';
import type { Store } from './store/store.ts';
import type { WorkerChannels } from './rpc.ts';
import { HttpError } from './errors.ts';
import type { ClusterView } from './view.ts';
import { checkActsAs } from './domain/workers.ts';

/** How long the worker has to dial back. */
const RENDEZVOUS_TIMEOUT_MS = 30_000;

export interface Tunnel {
  /** Bytes to and from the VM's port (flow-controlled: writes wait for the network). */
  stream: Duplex;
  /** The worker's WebSocket, for its close code. */
  ws: WebSocket;
}

interface Pending<T> {
  worker: string;
  resolve: (value: T) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class Tunnels {
  private readonly forwards = new Map<string, Pending<Tunnel>>();
  private readonly ipRequests = new Map<string, Pending<string>>();
  private readonly store: Store;
  private readonly channels: WorkerChannels;
  private readonly view: ClusterView;

  constructor(store: Store, channels: WorkerChannels, view: ClusterView) {
    this.store = store;
    this.channels = channels;
    this.view = view;
  }

  private rendezvous<T>(map: Map<string, Pending<T>>, worker: string, action: (session: string) => object, what: string): Promise<T> {
    // Unguessable and single-use: whoever could guess one could claim someone else's tunnel.
    const session = randomBytes(32).toString('base64url');
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        map.delete(session);
        reject(new HttpError(503, `worker ${worker} did not answer the ${what} request within ${RENDEZVOUS_TIMEOUT_MS / 1000}s`));
      }, RENDEZVOUS_TIMEOUT_MS);
      map.set(session, { worker, resolve, reject, timer });
      if (!this.channels.send(worker, action(session))) {
        clearTimeout(timer);
        map.delete(session);
        reject(new HttpError(503, `worker ${worker} is not connected to the controller`));
      }
    });
  }

  /** Waits up to `waitSeconds` for the VM to run; 404 if there is no such VM, 503 if it does not run in time. */
  async runningVM(name: string, waitSeconds: number): Promise<VM> {
    const deadline = Date.now() + waitSeconds * 1000;
    for (;;) {
      const vm = await this.store.get('vms', name);
      if (!vm) throw new HttpError(404, `VM "${name}" not found`);
      if (vm.status === 'running' && vm.worker) return vm;
      if (vm.status === 'failed') throw new HttpError(503, `VM "${name}" has failed: ${vm.status_message ?? ''}`);
      if (Date.now() >= deadline) {
        throw new HttpError(503, `VM "${name}" is not running (${vm.status}: ${vm.status_message ?? ''})${waitSeconds ? ` after waiting ${waitSeconds}s` : ''}; try a longer ?wait=`);
      }
      await new Promise((r) => setTimeout(r, Math.min(200, deadline - Date.now())));
    }
  }

  /** A connection to TCP `port` of the VM (or, without a VM, of the worker host itself). */
  open(worker: string, port: number, vm?: VM): Promise<Tunnel> {
    return this.rendezvous(this.forwards, worker, (session) => ({ portForwardAction: { session, vmUID: vm?.uid ?? '', port } }), 'port-forward');
  }

  resolveIP(vm: VM): Promise<string> {
    return this.rendezvous(this.ipRequests, vm.worker!, (session) => ({ resolveIPAction: { session, vmUID: vm.uid } }), 'IP resolution');
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
    this.forwards.delete(session);
    clearTimeout(pending.timer);
    return pending;
  }

  /** Completes a claimed session with the worker's WebSocket, or with the worker's error. */
  completeForward(pending: Pending<Tunnel>, ws: WebSocket, error: string | null) {
    if (error) {
      pending.reject(new HttpError(503, `worker ${pending.worker} could not connect: ${error}`));
      ws.close(1000);
      return;
    }
    pending.resolve({ stream: createWebSocketStream(ws), ws });
  }

  answerIP(session: string, body: { ip?: string; error?: string }, account: ServiceAccount) {
    const pending = this.ipRequests.get(session);
    if (!pending) throw new HttpError(404, 'no IP resolution session with this id is waiting');
    this.checkWorker(pending.worker, account, null);
    this.ipRequests.delete(session);
    clearTimeout(pending.timer);
    if (body.ip) pending.resolve(body.ip);
    else pending.reject(new HttpError(503, `worker ${pending.worker} could not resolve the IP: ${body.error ?? 'no IP'}`));
  }

  close() {
    for (const map of [this.forwards, this.ipRequests] as Map<string, Pending<unknown>>[]) {
      for (const p of map.values()) {
        clearTimeout(p.timer);
        p.reject(new HttpError(503, 'the controller is shutting down'));
      }
      map.clear();
    }
  }
}

/**
 * Splices a client's WebSocket and a tunnel, both ways, with flow control on each side. Closing
 * either end closes the whole path; a tunnel lost abnormally closes the client with 1011 and why.
 */
export function splice(client: WebSocket, tunnel: Tunnel, onEnd?: () => void) {
  const clientStream = createWebSocketStream(client);
  const worker = tunnel.stream;
  let ended = false;
  const end = (code: number, reason: string) => {
    if (ended) return;
    ended = true;
    if (client.readyState === client.OPEN) client.close(code, reason.slice(0, 120));
    if (tunnel.ws.readyState === tunnel.ws.OPEN) tunnel.ws.close(code === 1011 ? 1000 : code, 'client closed');
    onEnd?.();
  };
  clientStream.on('error', () => end(1000, 'client gone'));
  worker.on('error', () => {});
  clientStream.pipe(worker);
  worker.pipe(clientStream);
  client.on('close', () => end(1000, 'client closed'));
  tunnel.ws.on('close', (code, reason) => {
    if (code === 1000 || code === 1005) end(1000, 'the VM closed the connection');
    else end(1011, `the worker connection was lost (${code}${reason.length ? ` ${reason.toString()}` : ''})`);
  });
}
