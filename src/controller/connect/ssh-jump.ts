// `orchard controller run --listen-ssh ADDR`: an SSH server that is only a jump host. A client
// authenticates as a service account (user = account name, password = its token; the account
// needs compute:write or compute:connect) and opens `direct-tcpip` channels — what `ssh -J` and
// `ssh -W` use — whose destination host is a VM name and whose port is a TCP port of that VM.
// Each channel is spliced to a tunnel through the VM's worker (the same path as the port-forward
// WebSocket). Sessions (shell/exec/subsystems such as sftp), remote forwarding and Unix sockets
// are refused. The host key is made on first start, kept in the data dir and reused.
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import ssh2 from 'ssh2';
import type { AuthContext, Connection, ParsedKey, ServerChannel, TcpipRequestInfo } from 'ssh2';
import { NAME_PATTERN, type ServiceAccount } from '../../api/schemas.ts';
import type { Tunnels } from './tunnels.ts';
import { relay, streamSide } from './relay.ts';
import { CONNECT_ROLES, hasAnyRole, type Access } from '../access.ts';
import { HttpError, OPEN_FAILURE, sshOpenFailure, CLIENT_GONE } from '../errors.ts';

export const HOST_KEY_FILE = 'ssh_host_ed25519_key';
const AUTH_METHODS: ('password' | 'keyboard-interactive')[] = ['password', 'keyboard-interactive'];
/** A failed authentication answers only after this long (slows down guessing). */
const AUTH_FAILURE_DELAY_MS = 200;
/** Failed sign-ins allowed on one connection before it is closed (OpenSSH's MaxAuthTries is 6). */
const MAX_AUTH_TRIES = 3;
/** A connection not authenticated within this long is closed (as OpenSSH's LoginGraceTime). */
const LOGIN_GRACE_MS = 60_000;
/** Dead clients are found by keepalives: every 15 s, dropped after 4 unanswered. */
const KEEPALIVE = { keepaliveInterval: 15_000, keepaliveCountMax: 4 };

export interface HostKey {
  /** OpenSSH private key (PEM-like text). */
  privateKey: string;
  /** `ssh-ed25519 BASE64`: a known_hosts line without the host part. */
  publicKey: string;
  /** `SHA256:...` as `ssh-keygen -l` prints it. */
  fingerprint: string;
  generated: boolean;
}

function describeKey(privateKey: string, path: string): Omit<HostKey, 'generated'> {
  const key: ParsedKey | Error = ssh2.utils.parseKey(privateKey);
  if (key instanceof Error || !key.isPrivateKey()) {
    throw new Error(`cannot use the SSH host key ${path}: ${key instanceof Error ? key.message : 'not a private key'}; remove it to have a new one made`);
  }
  const blob = key.getPublicSSH();
  return {
    privateKey,
    publicKey: `${key.type} ${blob.toString('base64')}`,
    fingerprint: `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`,
  };
}

/** Loads `file` (upstream's --ssh-host-key) or `DATA_DIR/ssh_host_ed25519_key`, or makes the latter (mode 0600) when there is none. */
export function loadHostKey(dataDir: string, logger?: Logger, file?: string): HostKey {
  if (file) return { ...describeKey(readFileSync(file, 'utf8'), file), generated: false };
  const path = join(dataDir, HOST_KEY_FILE);
  if (existsSync(path)) {
    const mode = statSync(path).mode & 0o777;
    if (mode & 0o077) {
      logger?.warn({ path, mode: mode.toString(8) }, 'the SSH host key was readable by others: setting its mode to 0600');
      chmodSync(path, 0o600);
    }
    return { ...describeKey(readFileSync(path, 'utf8'), path), generated: false };
  }
  // ssh2 drops a leading zero byte of the key it writes (about 1 key in 230 comes out malformed):
  // keep only a key that parses and signs what it verifies.
  const usable = (privateKey: string) => {
    const key = ssh2.utils.parseKey(privateKey);
    if (key instanceof Error) return false;
    const probe = Buffer.from('orchard');
    return key.verify(probe, key.sign(probe)) === true;
  };
  let pair;
  do pair = ssh2.utils.generateKeyPairSync('ed25519', { comment: 'orchard-controller' });
  while (!usable(pair.private));
  // Written aside and renamed, so a crash never leaves a half-written key behind.
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, pair.private, { mode: 0o600 });
  renameSync(tmp, path);
  return { ...describeKey(pair.private, path), generated: true };
}

export interface SSHJumpOptions {
  host: string;
  port: number;
  dataDir: string;
  /** The host key's file instead of the data dir's (upstream's --ssh-host-key). */
  hostKeyFile?: string;
  access: Access;
  tunnels: Tunnels;
  logger: Logger;
  /** How long a channel open waits for its VM to run (default 5 s). */
  waitSeconds?: number;
  /** Tunnels an account may hold open, counted with its port-forwards (limits.tunnelsPerAccount). */
  tunnelsPerAccount: number;
}

export interface SSHJumpServer {
  port: number;
  hostKey: HostKey;
  close(): Promise<void>;
}

/**
 * Rejects a channel open with a reason code and a description the client shows (OpenSSH:
 * "channel 0: open failed: connect failed: <description>"). ssh2's `reject()` sends no
 * description, so its one call to the protocol's `channelOpenFail` is given ours; if ssh2's
 * internals ever change, this degrades to a plain `reject()`.
 */
function rejectChannel(client: Connection, reject: () => void, code: number, description: string) {
  type Proto = { channelOpenFail?: (recipient: number, reason: number, desc?: string) => void };
  const proto = (client as unknown as { _protocol?: Proto })._protocol;
  const original = proto?.channelOpenFail;
  if (!proto || typeof original !== 'function') return reject();
  const own = Object.getOwnPropertyDescriptor(proto, 'channelOpenFail');
  const text = description.replace(/[^\x20-\x7e]+/g, ' ').slice(0, 240);
  proto.channelOpenFail = (recipient: number) => original.call(proto, recipient, code, text);
  try {
    reject();
  } finally {
    if (own) Object.defineProperty(proto, 'channelOpenFail', own);
    else delete proto.channelOpenFail;
  }
}

export async function startSSHJump(opts: SSHJumpOptions): Promise<SSHJumpServer> {
  const { access, tunnels, logger } = opts;
  const log = logger.child({ component: 'ssh-jump' });
  const waitSeconds = opts.waitSeconds ?? 5;
  const hostKey = loadHostKey(opts.dataDir, log, opts.hostKeyFile);
  const clients = new Set<Connection>();
  const nameRE = new RegExp(NAME_PATTERN);

  /** The account if `token` is its token and it may connect; otherwise why not (never the token). */
  async function check(name: string, token: string, source: string): Promise<ServiceAccount | string> {
    let account: ServiceAccount;
    try {
      account = await access.authenticate({ name, token }, source);
    } catch (err) {
      if (!(err instanceof HttpError)) throw err;
      return err.statusCode === 429 ? err.message : 'no such service account or wrong token';
    }
    if (!hasAnyRole(account, CONNECT_ROLES)) return `service account lacks one of the roles ${CONNECT_ROLES.map((r) => `"${r}"`).join(' or ')}`;
    return account;
  }

  const server = new ssh2.Server({ hostKeys: [hostKey.privateKey], ident: 'Orchard-jump', ...KEEPALIVE }, (client, info) => {
    const remote = `${info.ip}:${info.port}`;
    let account: ServiceAccount | undefined;
    let failures = 0;
    let release = () => {};
    const open = new Set<Duplex>();
    // The client leaving cancels what its channel opens are waiting for (a VM to run, a worker to dial back).
    const gone = new AbortController();
    clients.add(client);
    // Without this, Nagle holds back the small packets interactive use and the inner SSH
    // connection's window adjustments are made of (40 ms each against delayed ACKs).
    (client as Connection & { setNoDelay(noDelay: boolean): void }).setNoDelay(true);
    client.on('error', (err: Error) => log.debug({ remote, err: err.message }, 'SSH client connection error'));
    const grace = setTimeout(() => {
      log.info({ remote }, 'SSH jump host: no authentication in time, closing the connection');
      client.end();
    }, LOGIN_GRACE_MS);
    client.on('close', () => {
      clearTimeout(grace);
      release();
      clients.delete(client);
      gone.abort(CLIENT_GONE);
      for (const t of open) t.destroy();
    });

    client.on('authentication', (ctx: AuthContext) => {
      const decide = (result: ServiceAccount | string) => {
        if (typeof result === 'string') {
          log.info({ account: ctx.username, method: ctx.method, remote, reason: result }, 'SSH jump host: authentication refused');
          const last = ++failures >= MAX_AUTH_TRIES;
          setTimeout(() => {
            try {
              ctx.reject(AUTH_METHODS);
              if (last) client.end();
            } catch {
              // the client is gone
            }
          }, AUTH_FAILURE_DELAY_MS);
          return;
        }
        account = result;
        // Revoking the account (deleted, new token, role removed) ends the connection and its channels.
        release = access.hold(result, CONNECT_ROLES, (why) => {
          log.info({ account: result.name, remote, reason: why }, 'SSH jump host: closing the connection of a revoked account');
          client.end();
        });
        ctx.accept();
      };
      const fail = (err: unknown) => {
        log.error({ err, remote }, 'SSH jump host: authentication failed with an error');
        try {
          ctx.reject(AUTH_METHODS);
        } catch {
          // the client is gone
        }
      };
      switch (ctx.method) {
        case 'password':
          check(ctx.username, ctx.password, info.ip).then(decide, fail);
          return;
        case 'keyboard-interactive':
          ctx.prompt([{ prompt: `Token of service account "${ctx.username}": `, echo: false }], 'Orchard SSH jump host', '', (answers) => {
            check(ctx.username, answers[0] ?? '', info.ip).then(decide, fail);
          });
          return;
        default:
          // "none" (the client asking which methods there are), public keys, host-based: not offered.
          ctx.reject(AUTH_METHODS);
      }
    });

    client.on('ready', () => clearTimeout(grace));
    client.on('ready', () => log.info({ account: account?.name, remote }, 'SSH jump host: client authenticated'));

    client.on('tcpip', (accept, reject, dest: TcpipRequestInfo) => {
      forward(client, remote, account!, accept, reject, dest, open, gone.signal).catch((err: unknown) => {
        log.error({ err, remote }, 'SSH jump host: forwarding failed with an error');
        rejectChannel(client, reject, OPEN_FAILURE.CONNECT_FAILED, 'internal error');
      });
    });

    const onlyJump = 'this is an Orchard jump host: only TCP forwarding to VMs is allowed (ssh -J ACCOUNT@HOST:PORT USER@VM, or ssh -W VM:PORT)';
    client.on('session', (_accept, reject) => {
      log.info({ account: account?.name, remote }, 'SSH jump host: refused a session (shell, exec, sftp) channel');
      rejectChannel(client, reject, OPEN_FAILURE.ADMINISTRATIVELY_PROHIBITED, onlyJump);
    });
    client.on('openssh.streamlocal', (_accept, reject) => {
      log.info({ account: account?.name, remote }, 'SSH jump host: refused a Unix socket channel');
      rejectChannel(client, reject, OPEN_FAILURE.ADMINISTRATIVELY_PROHIBITED, onlyJump);
    });
    // Global requests: remote forwarding (tcpip-forward, streamlocal-forward) is refused.
    // ("no-more-sessions@openssh.com" is answered by ssh2 itself.)
    client.on('request', (_accept: unknown, reject: (() => void) | undefined, name: string) => {
      log.info({ account: account?.name, remote, request: name }, 'SSH jump host: refused a global request');
      reject?.();
    });
  });

  async function forward(
    client: Connection,
    remote: string,
    authenticated: ServiceAccount,
    accept: () => ServerChannel | undefined,
    reject: () => void,
    dest: TcpipRequestInfo,
    open: Set<Duplex>,
    signal: AbortSignal,
  ) {
    const vmName = dest.destIP;
    const port = dest.destPort;
    const fields = { account: authenticated.name, vm: vmName, port, remote };
    const refuse = (code: number, why: string) => {
      log.info({ ...fields, reason: why }, 'SSH jump host: refused a connection');
      rejectChannel(client, reject, code, why);
    };
    if (!nameRE.test(vmName)) return refuse(OPEN_FAILURE.CONNECT_FAILED, `"${vmName}" is not a VM name: the destination host must be the name of a VM`);
    if (!Number.isInteger(port) || port < 1 || port > 65535) return refuse(OPEN_FAILURE.CONNECT_FAILED, `port ${port} is out of range`);
    let untake: () => void;
    try {
      untake = access.take(authenticated.name, 'tunnels', opts.tunnelsPerAccount);
    } catch (err) {
      if (!(err instanceof HttpError)) throw err;
      const failure = sshOpenFailure(err);
      return refuse(failure.code, failure.description);
    }
    let vm;
    let tunnel: Duplex;
    try {
      vm = await tunnels.runningVM(vmName, waitSeconds, signal);
      tunnel = await tunnels.openStream(vm.worker!, port, vm, signal);
    } catch (err) {
      untake();
      if (!(err instanceof HttpError)) throw err;
      if (signal.aborted) return;
      const failure = sshOpenFailure(err);
      const why = err.statusCode === 404 ? `VM "${vmName}" not found` : vm ? `cannot connect to port ${port} of VM "${vmName}": ${failure.description}` : failure.description;
      return refuse(failure.code, why);
    }
    const channel = clients.has(client) ? accept() : undefined;
    if (!channel) {
      untake();
      tunnel.destroy();
      return;
    }
    open.add(tunnel);
    const started = Date.now();
    log.info({ ...fields, worker: vm.worker }, 'SSH jump host: connected to the VM');
    splice(channel, tunnel, (stats) => {
      open.delete(tunnel);
      untake();
      log.info({ ...fields, ...stats, durationMs: Date.now() - started }, 'SSH jump host: connection closed');
    });
  }

  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error & { code?: string }) => {
      const where = `${opts.host.includes(':') ? `[${opts.host}]` : opts.host}:${opts.port}`;
      const why = err.code === 'EADDRINUSE' ? 'the port is in use' : err.code === 'EACCES' ? 'permission denied (use a port above 1023)' : err.message;
      reject(new Error(`--listen-ssh: cannot listen on ${where}: ${why}`, { cause: err }));
    };
    server.once('error', onError);
    server.listen(opts.port, opts.host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (err: Error) => log.error({ err }, 'SSH jump host server error'));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : opts.port;
  log.info({ host: opts.host, port, fingerprint: hostKey.fingerprint, generated: hostKey.generated }, 'SSH jump host is listening');

  return {
    port,
    hostKey,
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const client of clients) client.end();
      // Connections that do not close politely within a second are cut.
      const timer = setTimeout(() => {
        for (const client of clients) (client as unknown as { _sock?: { destroy(): void } })._sock?.destroy();
      }, 1000);
      await closed;
      clearTimeout(timer);
    },
  };
}

/**
 * Splices an SSH channel and a tunnel to the VM, both ways, through the relay every tunnel's bytes
 * take (relay.ts: flow control on each side and the per-turn budget shared with the port-forwards).
 * The client's EOF ends the tunnel's way to the VM (a half-close on the worker's mux connection; a
 * dial-back's WebSocket closes instead), the VM's end sends EOF and CLOSE on the channel after what
 * it sent before, and either side closing or failing closes the other.
 */
function splice(channel: ServerChannel, tunnel: Duplex, onEnd: (stats: { bytesToVM: number; bytesFromVM: number; closedBy: string }) => void) {
  let bytesToVM = 0;
  let bytesFromVM = 0;
  let ended = false;
  const end = (closedBy: string) => {
    if (ended) return;
    ended = true;
    onEnd({ bytesToVM, bytesFromVM, closedBy });
  };
  const vm = streamSide(tunnel);
  const client = streamSide(channel);
  vm.onData((data) => (bytesFromVM += Buffer.isBuffer(data) ? data.length : 0));
  client.onData((data) => (bytesToVM += Buffer.isBuffer(data) ? data.length : 0));
  relay(client, vm);
  relay(vm, client);
  let lost: Error | undefined;
  tunnel.on('error', (err: Error) => {
    lost = err;
    channel.close();
  });
  tunnel.on('end', () => channel.end());
  tunnel.on('close', () => end(lost ? `worker connection lost (${lost.message})` : 'vm'));
  channel.on('error', () => tunnel.destroy());
  channel.on('end', () => tunnel.end());
  channel.on('close', () => {
    tunnel.destroy();
    end('client');
  });
}
