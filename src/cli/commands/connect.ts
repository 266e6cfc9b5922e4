// orchard port-forward vm|worker, orchard ssh vm, orchard vnc vm|worker: reaching a VM's (or a
// worker host's) TCP ports from this machine, through the controller's port-forward WebSockets
// (controller → worker → VM). Nothing needs to be reachable but the controller.
import { readFileSync } from 'node:fs';
import type net from 'node:net';
import { constants as osConstants } from 'node:os';
import type { Duplex } from 'node:stream';
import type { Command } from 'commander';
import type { ClientChannel, Client as SSHClient } from 'ssh2';
import type { WebSocket } from 'ws';
import type { OrchardClient } from '../../client/client.ts';
import { ApiError } from '../../client/errors.ts';
import type { ReadyTunnels } from '../../client/ready-tunnels.ts';
import { MuxTunnel } from '../../client/mux.ts';
import { keepExitStatus, type ExitStatus } from '../../client/ssh-exit.ts';
import { sshCredentials, VM_DEFAULTS, VNC_PORT } from '../../api/defaults.ts';
import type { VM } from '../../api/schemas.ts';
import { clientFor, errorText, parseInteger, UsageError, withCommon } from '../common.ts';
import * as lazy from '../../build/lazy.ts';
import { stoppedVM, waitRunning } from '../wait.ts';

/** Upstream's default for --wait: how long a connection waits for the VM to be running. */
const DEFAULT_WAIT = 60;
const SSH_PORT = 22;

export interface PortSpec {
  /** 0: any free port */
  local: number;
  remote: number;
}

/** `[LOCAL:]REMOTE`, as upstream; LOCAL 0 (or no LOCAL) picks a free port. */
export function parsePortSpec(spec: string): PortSpec {
  const m = /^(?:(\d{1,5}):)?(\d{1,5})$/.exec(spec);
  if (!m) throw new UsageError(`invalid port-forwarding specification "${spec}": expected [LOCAL:]REMOTE, e.g. 2222:22`);
  const local = m[1] === undefined ? 0 : Number(m[1]);
  const remote = Number(m[2]);
  if (local > 65535) throw new UsageError(`invalid local port ${local} in "${spec}": 0 (any free port) or 1-65535`);
  if (remote < 1 || remote > 65535) throw new UsageError(`invalid remote port ${remote} in "${spec}": 1-65535`);
  return { local, remote };
}

/** `opened`, when given, rejects if the tunnel (written to already) was refused after all. */
type Tunnel = { ws: WebSocket; stream: Duplex; opened?: Promise<unknown> };

const warn = (msg: string) => process.stderr.write(`orchard: ${msg}\n`);

const describe = (err: unknown): string => (err instanceof Error ? errorText(err) : String(err));

/** Why a WebSocket closed, for codes that are not a normal end. */
function closeText(code: number, reason: Buffer): string {
  if (reason.length) return reason.toString();
  if (code === 1006) return 'the connection to the controller was lost';
  return `the controller closed the tunnel (code ${code})`;
}

const normalClose = (code: number) => code === 1000 || code === 1005;

/**
 * Joins an accepted local connection and a tunnel, both ways, with back-pressure on each side.
 * The local end closing closes the tunnel; the tunnel closing ends the local connection (after the
 * bytes in flight are written); a tunnel lost abnormally resets the local connection and says why.
 */
export function splice(sock: net.Socket, tunnel: Tunnel, label: string, report: (msg: string) => void) {
  const { ws, stream } = tunnel;
  let aborted = false;
  /** The tunnel was cut: the local connection is reset (not a clean EOF), and why is said once. */
  const abort = (why: string) => {
    if (aborted) return;
    aborted = true;
    report(`${label}: ${why}`);
    if (!sock.destroyed) sock.resetAndDestroy();
  };
  sock.on('error', () => stream.destroy());
  // A multiplexed tunnel reset (its worker lost, say) errors its stream; its connection stays open.
  stream.on('error', (err) => (sock.destroyed ? undefined : abort(describe(err))));
  const onClose = (code: number, reason: Buffer) => {
    if (normalClose(code)) return; // the stream ends, and with it the local connection
    abort(closeText(code, reason));
  };
  ws.on('close', onClose);
  // A tunnel that ended with end frames leaves its WebSocket open for the next one: not ours to watch.
  stream.once('close', () => ws.off('close', onClose));
  // Local side gone without an orderly end (reset, error): drop the tunnel. An orderly end has
  // already closed the WebSocket through the stream's end.
  sock.on('close', () => {
    if (!stream.writableEnded) stream.destroy();
  });
  tunnel.opened?.catch((err: unknown) => abort(describe(err)));
  if (stream instanceof MuxTunnel) stream.pipeInto(sock);
  else stream.pipe(sock);
  sock.pipe(stream);
}

interface Forward {
  label: string;
  address: string;
  close(): void;
}

/** Listens on 127.0.0.1:`localPort`; each accepted connection gets its own tunnel from `open`. */
export async function listenForward(localPort: number, target: string, open: () => Promise<Tunnel>, report: (msg: string) => void = warn): Promise<Forward> {
  const active = new Set<net.Socket>();
  // node:net when a forward starts, not on every start of the CLI (bench/executable.ts).
  const server = process.getBuiltinModule('node:net').createServer({ noDelay: true, pauseOnConnect: true }, (sock) => {
    active.add(sock);
    sock.on('close', () => active.delete(sock));
    sock.on('error', () => {});
    const label = `${sock.remoteAddress}:${sock.remotePort} -> ${target}`;
    open().then(
      (tunnel) => {
        if (sock.destroyed) {
          // Not the WebSocket: on a mux connection it carries other tunnels.
          tunnel.stream.destroy();
          return;
        }
        splice(sock, tunnel, label, report);
      },
      (err: unknown) => {
        report(`${label}: ${describe(err)}`);
        sock.destroy();
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: Error & { code?: string }) =>
      reject(err.code === 'EADDRINUSE' ? new Error(`cannot listen on 127.0.0.1:${localPort}: the port is in use`) : err),
    );
    server.listen(localPort, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as net.AddressInfo;
  return {
    label: `127.0.0.1:${port} -> ${target}`,
    address: `127.0.0.1:${port}`,
    close() {
      server.close();
      for (const s of active) s.destroy();
    },
  };
}

/** Resolves on SIGINT or SIGTERM. */
function untilInterrupted(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve(signal);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

/** A 404 is final; anything else (e.g. a compute:connect account may not read VMs) is left to the tunnel to report. */
/** The resource, or undefined when the account may not read it (compute:connect alone): the tunnel says the rest. */
async function mustExist<T>(what: () => Promise<T>): Promise<T | undefined> {
  try {
    return await what();
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return undefined;
    throw err;
  }
}

/** A forward to a VM that does not run yet says so at the start, instead of connections hanging silently. */
function noticeNotRunning(vm: VM | undefined, waitSeconds: number) {
  if (!vm || vm.status === 'running') return;
  const stopped = stoppedVM(vm);
  if (stopped) warn(`${stopped}; until then connections to it fail`);
  else warn(`VM ${vm.name} is ${vm.status}${vm.status_message ? ` (${vm.status_message})` : ''}: each connection waits up to ${waitSeconds}s for it to run (--wait SECONDS)`);
}

/** The guest's credentials: flags first, then the VM record, then upstream's admin/admin fallback. */
async function credentials(client: OrchardClient, name: string, username?: string, password?: string): Promise<{ username: string; password: string }> {
  if (username !== undefined && password !== undefined) return { username, password };
  try {
    const vm = await client.getVM(name);
    const own = sshCredentials(vm);
    return { username: username ?? own.username, password: password ?? own.password };
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) throw err;
    warn(`could not read VM ${name}'s credentials (${describe(err)}); trying admin/admin`);
    return { username: username ?? VM_DEFAULTS.username, password: password ?? VM_DEFAULTS.password };
  }
}

/** Runs forwards until SIGINT/SIGTERM, then closes them and the client. */
async function serveUntilInterrupted(client: OrchardClient, forwards: Forward[], started?: () => void) {
  try {
    started?.();
    await untilInterrupted();
  } finally {
    for (const f of forwards) f.close();
    client.close();
  }
}

/** How a forward gets its tunnels: one WebSocket each (`open`), or a client's ready connections too (`close` when done). */
type Tunnels = { open: () => Promise<Tunnel>; close?: () => void };

/** A port forwarder's tunnels, written to before the controller's answer (the local side may speak first). */
const early = (forwarder: ReadyTunnels): Tunnels => ({ open: () => forwarder.openEarly(), close: () => forwarder.close() });

async function openForwards(specs: PortSpec[], target: (spec: PortSpec) => string, tunnels: (spec: PortSpec) => Tunnels): Promise<Forward[]> {
  const forwards: Forward[] = [];
  try {
    for (const spec of specs) {
      const t = tunnels(spec);
      try {
        const f = await listenForward(spec.local, target(spec), () => t.open());
        forwards.push({ ...f, close: () => (f.close(), t.close?.()) });
      } catch (err) {
        t.close?.();
        throw err;
      }
    }
  } catch (err) {
    for (const f of forwards) f.close();
    throw err;
  }
  for (const f of forwards) process.stderr.write(`forwarding ${f.label}\n`);
  return forwards;
}

// ---------------------------------------------------------------- ssh

interface SSHOptions {
  context?: string;
  username?: string;
  password?: string;
  identity?: string;
  wait: number;
  verbose?: boolean;
}

/** `SHA256:...` of an SSH public key blob, as OpenSSH prints it. */
export function sshFingerprint(key: Buffer): { type: string; fingerprint: string } {
  const len = key.length >= 4 ? key.readUInt32BE(0) : 0;
  const type = len > 0 && len < 64 && key.length >= 4 + len ? key.subarray(4, 4 + len).toString() : 'unknown';
  return { type, fingerprint: 'SHA256:' + process.getBuiltinModule('node:crypto').createHash('sha256').update(key).digest('base64').replace(/=+$/, '') };
}

class SSHError extends Error {}

function sshConnect(stream: Duplex, opts: { username: string; password?: string; privateKey?: Buffer; verbose?: boolean; host: string }): Promise<SSHClient> {
  return lazy.ssh2().then(
    ({ Client }) =>
      new Promise<SSHClient>((resolve, reject) => {
        const conn = new Client();
        conn.once('ready', () => {
          if (opts.verbose) process.stderr.write(`authenticated to ${opts.host} as ${opts.username}\n`);
          resolve(conn);
        });
        const onError = (err: Error & { level?: string }) => {
          reject(
            new SSHError(
              err.level === 'client-authentication'
                ? `SSH authentication as "${opts.username}" to ${opts.host} failed (${opts.privateKey ? 'private key' : 'password'} rejected)`
                : `SSH connection to ${opts.host} failed: ${err.message}`,
            ),
          );
        };
        // Stays attached: only the first error matters (it rejects before 'ready'); later ones, e.g.
        // the tunnel closing under a disconnect, end the session through 'close'.
        conn.on('error', onError);
        // Guests that only offer keyboard-interactive (macOS) get the password as the answer.
        conn.on('keyboard-interactive', (_name, _instructions, _lang, prompts, finish) => finish(prompts.map(() => opts.password ?? '')));
        conn.connect({
          sock: stream,
          username: opts.username,
          ...(opts.privateKey ? { privateKey: opts.privateKey } : { password: opts.password, tryKeyboard: true }),
          readyTimeout: 60_000,
          keepaliveInterval: 15_000,
          // The guest's host key is not known anywhere to check it against: accept it, and show it with -v.
          hostVerifier: (key: Buffer) => {
            if (opts.verbose) {
              const { type, fingerprint } = sshFingerprint(key);
              process.stderr.write(`${opts.host} host key ${type} ${fingerprint} (not verified)\n`);
            }
            return true;
          },
        });
      }),
  );
}

/** A session channel, watched from the moment it opens. */
interface Session {
  ch: ClientChannel;
  exit: ExitStatus;
  closed: boolean;
}

/** Watches `ch` for its exit status and its close from now: called in the callback that opens it (see keepExitStatus). */
function opened(ch: ClientChannel): Session {
  const session: Session = { ch, exit: {}, closed: false };
  keepExitStatus(ch, session.exit);
  ch.once('close', () => (session.closed = true));
  return session;
}

/** Pipes our stdio and the channel; resolves with the remote exit code when the channel closes. */
function attach(conn: SSHClient, session: Session, lost: () => string | undefined): Promise<number> {
  const { ch } = session;
  return new Promise((resolve) => {
    ch.pipe(process.stdout, { end: false });
    ch.stderr.pipe(process.stderr, { end: false });
    process.stdin.pipe(ch);
    let done = false;
    const finish = (what: 'session' | 'connection') => {
      if (done) return;
      done = true;
      process.stdin.unpipe(ch);
      process.stdin.pause();
      const { exit } = session;
      if (exit.code !== undefined && exit.code !== null) return resolve(exit.code);
      if (exit.signal) {
        warn(`the remote command was killed by signal ${exit.signal}`);
        const signo = (osConstants.signals as Record<string, number | undefined>)[`SIG${exit.signal.replace(/^SIG/, '')}`];
        return resolve(signo ? 128 + signo : 255);
      }
      if (what === 'session') warn('the VM ended the session without an exit status');
      else warn(`the connection to the VM was lost${lost() ? `: ${lost()}` : ''}`);
      resolve(255);
    };
    if (session.closed) finish('session');
    ch.on('close', () => finish('session'));
    conn.on('close', () => finish('connection'));
  });
}

async function sshVM(name: string, command: string[], opts: SSHOptions): Promise<number> {
  const client = await clientFor(opts);
  let tunnel: Tunnel | undefined;
  let conn: SSHClient | undefined;
  try {
    let privateKey: Buffer | undefined;
    if (opts.identity) {
      try {
        privateKey = readFileSync(opts.identity);
      } catch (err) {
        throw new UsageError(`cannot read the identity file: ${(err as Error).message}`);
      }
    }
    const { username, password } = privateKey
      ? { username: opts.username ?? (await credentials(client, name, undefined, '')).username, password: undefined }
      : await credentials(client, name, opts.username, opts.password);
    // Said, not silent: what the VM is waiting for, and the flag for more time.
    await waitRunning(client, name, opts.wait);
    if (opts.verbose) process.stderr.write(`connecting to ${name}:${SSH_PORT} through ${client.url.origin}\n`);
    tunnel = await client.portForwardVM(name, SSH_PORT, opts.wait);
    let lostReason: string | undefined;
    tunnel.ws.on('close', (code, reason) => {
      if (!normalClose(code)) lostReason = closeText(code, reason);
    });
    // A tunnel that the worker or the controller reset, or that the VM's side closed.
    tunnel.stream.on('error', (err: Error) => (lostReason ??= err.message));
    tunnel.stream.once('end', () => (lostReason ??= "the VM's side closed it"));
    try {
      conn = await sshConnect(tunnel.stream, { username, password, privateKey, verbose: opts.verbose, host: `VM ${name}` });
    } catch (err) {
      if (lostReason) throw new SSHError(`${(err as Error).message}: ${lostReason}`);
      throw err;
    }
    const c = conn;
    const ttyIn = process.stdin.isTTY === true;
    if (command.length) {
      const session = await new Promise<Session>((resolve, reject) => c.exec(command.join(' '), (err, ch) => (err ? reject(new SSHError(`the VM refused to run the command: ${err.message}`)) : resolve(opened(ch)))));
      return await attach(c, session, () => lostReason);
    }
    // Interactive: a PTY the size of our terminal when stdin is one (like ssh), else a plain shell.
    const pty = ttyIn && process.stdout.isTTY === true;
    const session = await new Promise<Session>((resolve, reject) =>
      c.shell(pty ? { term: process.env.TERM || 'xterm-256color', rows: process.stdout.rows, cols: process.stdout.columns } : false, (err, ch) => (err ? reject(new SSHError(`the VM refused a shell: ${err.message}`)) : resolve(opened(ch)))),
    );
    const { ch } = session;
    const onResize = () => ch.setWindow(process.stdout.rows, process.stdout.columns, 0, 0);
    if (pty) {
      process.stdin.setRawMode(true);
      process.stdout.on('resize', onResize);
    }
    try {
      return await attach(c, session, () => lostReason);
    } finally {
      if (pty) {
        process.stdout.off('resize', onResize);
        process.stdin.setRawMode(false);
      }
    }
  } finally {
    // Ending the SSH connection ends its stream, which closes the WebSocket in order.
    if (conn) conn.end();
    else tunnel?.ws.close(1000);
    client.close();
  }
}

// ---------------------------------------------------------------- vnc

function openURL(url: string, shown: string) {
  const opener = process.platform === 'darwin' ? 'open' : process.platform === 'win32' ? 'explorer' : 'xdg-open';
  process.stderr.write(`opening ${shown}\n`);
  const { spawn } = process.getBuiltinModule('node:child_process');
  const child = spawn(opener, [url], { stdio: 'ignore', detached: true });
  // Without an opener, the URL (with the credentials) goes to stdout, as with --no-open.
  child.on('error', (err) => {
    warn(`cannot open ${shown} with ${opener} (${err.message}); point a VNC viewer at:`);
    process.stdout.write(url + '\n');
  });
  child.on('exit', (code) => {
    if (!code) return;
    warn(`${opener} ${shown} exited with code ${code}; point a VNC viewer at:`);
    process.stdout.write(url + '\n');
  });
  child.unref();
}

function vncURL(address: string, username?: string, password?: string): { url: string; shown: string } {
  if (username === undefined) return { url: `vnc://${address}`, shown: `vnc://${address}` };
  const user = encodeURIComponent(username);
  const creds = password !== undefined && password !== '' ? `${user}:${encodeURIComponent(password)}` : user;
  return { url: `vnc://${creds}@${address}`, shown: `vnc://${user}@${address}` };
}

// ---------------------------------------------------------------- commands

export function registerConnectCommands(program: Command) {
  // ---- port-forward ----
  const pf = program.command('port-forward').description('forward local TCP ports to a VM or a worker host, through the controller');
  withCommon(
    pf
      .command('vm')
      .description('forward 127.0.0.1:LOCAL to port REMOTE of a VM (LOCAL 0 or omitted: a free port) until Ctrl-C')
      .argument('<name>', 'VM name')
      .argument('<ports...>', '[LOCAL:]REMOTE, e.g. 2222:22 (repeatable)')
      .option('-t, --wait <seconds>', 'how long each connection waits for the VM to be running', parseInteger('--wait'), DEFAULT_WAIT),
    false,
  ).action(async (name: string, ports: string[], opts: { context?: string; wait: number }) => {
    const specs = ports.map(parsePortSpec);
    const client = await clientFor(opts);
    let forwards: Forward[];
    try {
      noticeNotRunning(await mustExist(() => client.getVM(name)), opts.wait);
      forwards = await openForwards(specs, (s) => `${name}:${s.remote}`, (s) => early(client.portForwarder({ vm: name, port: s.remote, waitSeconds: opts.wait })));
    } catch (err) {
      client.close();
      throw err;
    }
    await serveUntilInterrupted(client, forwards);
  });
  withCommon(
    pf
      .command('worker')
      .description('forward 127.0.0.1:LOCAL to port REMOTE of a worker host (needs admin:write) until Ctrl-C')
      .argument('<name>', 'worker name')
      .argument('<ports...>', '[LOCAL:]REMOTE (repeatable)'),
    false,
  ).action(async (name: string, ports: string[], opts: { context?: string }) => {
    const specs = ports.map(parsePortSpec);
    const client = await clientFor(opts);
    let forwards: Forward[];
    try {
      await mustExist(() => client.getWorker(name));
      forwards = await openForwards(specs, (s) => `worker ${name}:${s.remote}`, (s) => early(client.portForwarder({ worker: name, port: s.remote })));
    } catch (err) {
      client.close();
      throw err;
    }
    await serveUntilInterrupted(client, forwards);
  });

  // ---- ssh ----
  withCommon(
    program
      .command('ssh')
      .description('SSH into a VM through the controller')
      .command('vm')
      .description('an SSH session with a VM: a shell (with a PTY when stdin is a terminal), or `-- COMMAND` whose exit code becomes ours')
      .argument('<name>', 'VM name')
      .argument('[command...]', 'command to run (after --), instead of a shell')
      .option('-u, --username <user>', 'SSH user (default: the VM\'s username, else admin)')
      .option('-p, --password <password>', 'SSH password (default: the VM\'s password, else admin)')
      .option('-i, --identity <file>', 'authenticate with this private key instead of the password')
      .option('-t, --wait <seconds>', 'how long to wait for the VM to be running', parseInteger('--wait'), DEFAULT_WAIT)
      .option('-v, --verbose', "show the connection's progress and the guest's host key fingerprint"),
    false,
  ).action(async (name: string, command: string[], opts: SSHOptions) => {
    // Exit codes as OpenSSH: the remote command's, or 255 when SSH itself fails. API errors before
    // the session (no such VM, missing role) go to the common handler (exit 1).
    const safety = () => setTimeout(() => process.exit(), 5000).unref();
    try {
      process.exitCode = await sshVM(name, command, opts);
      safety();
    } catch (err) {
      if (!(err instanceof SSHError)) throw err;
      warn(err.message);
      process.exitCode = 255;
      safety();
    }
  });

  // ---- vnc ----
  const vnc = program.command('vnc').description('open a VNC session with a VM or a worker host, through the controller');
  withCommon(
    vnc
      .command('vm')
      .description(`forward a local port to the VM's VNC server (port ${VNC_PORT}) and open vnc://USER:PASSWORD@127.0.0.1:PORT`)
      .argument('<name>', 'VM name')
      .option('-u, --username <user>', 'VNC user (default: the VM\'s username, else admin)')
      .option('-p, --password <password>', 'VNC password (default: the VM\'s password, else admin)')
      .option('-w, --wait <seconds>', 'how long each connection waits for the VM to be running', parseInteger('--wait'), DEFAULT_WAIT)
      .option('--no-open', 'only print the URL (on stdout) and keep forwarding until Ctrl-C'),
    false,
  ).action(async (name: string, opts: { context?: string; username?: string; password?: string; wait: number; open: boolean }) => {
    const client = await clientFor(opts);
    let forwards: Forward[];
    let creds: { username: string; password: string };
    try {
      creds = await credentials(client, name, opts.username, opts.password);
      noticeNotRunning(await mustExist(() => client.getVM(name)), opts.wait);
      forwards = await openForwards([{ local: 0, remote: VNC_PORT }], () => `${name}:${VNC_PORT}`, () => ({ open: () => client.portForwardVM(name, VNC_PORT, opts.wait) }));
    } catch (err) {
      client.close();
      throw err;
    }
    const { url, shown } = vncURL(forwards[0].address, creds.username, creds.password);
    await serveUntilInterrupted(client, forwards, () => (opts.open ? openURL(url, shown) : process.stdout.write(url + '\n')));
  });
  withCommon(
    vnc
      .command('worker')
      .description(`forward a local port to the worker host's VNC server (port ${VNC_PORT}, needs admin:write) and open it`)
      .argument('<name>', 'worker name')
      .option('-u, --username <user>', 'VNC user')
      .option('-p, --password <password>', 'VNC password')
      .option('--no-open', 'only print the URL (on stdout) and keep forwarding until Ctrl-C'),
    false,
  ).action(async (name: string, opts: { context?: string; username?: string; password?: string; open: boolean }) => {
    const client = await clientFor(opts);
    let forwards: Forward[];
    try {
      await mustExist(() => client.getWorker(name));
      forwards = await openForwards([{ local: 0, remote: VNC_PORT }], () => `worker ${name}:${VNC_PORT}`, () => ({ open: () => client.portForwardWorker(name, VNC_PORT) }));
    } catch (err) {
      client.close();
      throw err;
    }
    const { url, shown } = vncURL(forwards[0].address, opts.username, opts.password);
    await serveUntilInterrupted(client, forwards, () => (opts.open ? openURL(url, shown) : process.stdout.write(url + '\n')));
  });
}
