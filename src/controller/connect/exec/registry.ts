// The controller's exec sessions: every exec starts here (checks, the wait for the VM, SSH through a
// tunnel to the VM's port 22, the command), and reconnectable sessions are kept by (VM, id), at most
// MAX_SESSIONS_PER_ACCOUNT per account and MAX_SESSIONS in all. The protocol: session.ts.
import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { WebSocket } from 'ws';
import type { ServiceAccount, VM } from '../../../api/schemas.ts';
import { sshCredentials } from '../../../api/defaults.ts';
import { CONNECT_ROLES, type Access } from '../../access.ts';
import type { Store } from '../../store/store.ts';
import { badRequest, HttpError, notFound } from '../../errors.ts';
import type { Tunnels } from '../tunnels.ts';
import { killScript, remoteCommand, sameSpec, type ExecQuery, type ExecSpec } from './query.ts';
import { keepExitStatus, type ExitStatus } from '../../../client/ssh-exit.ts';
import { DEFAULT_EXEC_LIMITS, ExecSession, type CommandChannel, type ExecLimits } from './session.ts';

/** Reconnectable sessions per service account, and in all. */
export const MAX_SESSIONS_PER_ACCOUNT = 64;
export const MAX_SESSIONS = 1024;

interface Logger {
  debug(obj: object, msg: string): void;
}

export interface ExecSessionsOptions {
  store: Store;
  tunnels: Tunnels;
  /** Ends the sessions of an account that is revoked (deleted, new token, lost its connect role). */
  access?: Access;
  logger?: Logger;
  limits?: ExecLimits;
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
  private readonly limits: ExecLimits;
  private closed = false;

  constructor(opts: ExecSessionsOptions) {
    this.store = opts.store;
    this.tunnels = opts.tunnels;
    this.access = opts.access;
    this.logger = opts.logger;
    this.limits = opts.limits ?? DEFAULT_EXEC_LIMITS;
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
    const stream = await this.tunnels.openStream(vm.worker!, 22, vm);
    const conn = new Client();
    const marker = randomUUID();
    let connError: string | undefined;
    conn.on('error', (err) => (connError ??= err.message));
    stream.on('error', () => {});
    const disconnect = () => {
      conn.end();
      stream.destroy();
    };
    try {
      await new Promise<void>((resolve, reject) => {
        conn.once('ready', () => resolve());
        conn.once('error', reject);
        conn.once('close', () => reject(new Error(connError ?? 'the connection closed during the SSH handshake')));
        conn.connect({
          sock: stream,
          ...sshCredentials(vm),
          readyTimeout: 20_000,
          keepaliveInterval: 30_000,
          keepaliveCountMax: 3,
          // The tunnel goes through the VM's worker, which the controller authenticated.
          hostVerifier: () => true,
        });
      });
      const exit: ExitStatus = {};
      const channel = await new Promise<CommandChannel>((resolve, reject) => {
        conn.once('close', () => reject(new Error(connError ?? 'the SSH connection closed')));
        conn.exec(remoteCommand(spec, marker), spec.tty ? { pty: { rows: spec.rows, cols: spec.cols, term: 'xterm-256color' } } : {}, (err, ch) => {
          if (err) return reject(err);
          keepExitStatus(ch, exit);
          resolve(ch as CommandChannel);
        });
      });
      let release = () => {};
      const session: ExecSession = new ExecSession({
        id,
        account: account.name,
        vmName: vm.name,
        vmUID: vm.uid ?? '',
        spec,
        channel,
        exit,
        disconnect,
        connectionError: () => connError,
        limits: this.limits,
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

