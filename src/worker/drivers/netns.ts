// A VM's own network namespace: why QEMU runs in one, how it reaches the outside, and how the
// worker reaches into it.
//
// QEMU's user-mode network (slirp) maps the guest's gateway 10.0.2.2 to 127.0.0.1 of the network
// namespace QEMU runs in, and QEMU 7.2 has no switch to turn that off (libslirp's
// disable_host_loopback). In the host's namespace that is every loopback service of the worker host
// and every other VM's forwarded ports. So QEMU runs in a namespace of its own (`unshare --user
// --net`: no root needed, and the worker's user owns it), whose loopback holds nothing but that
// QEMU's own forwards. `pasta` (Debian's passt package) gives that namespace the host's outbound
// network, with --no-map-gw so the namespace's gateway is the real one, not the host's loopback.
// Measured alternative: passt in the host's namespace as the guest's network (-netdev stream) maps
// no gateway with --no-map-gw, but Debian 12's passt still connects a guest's frame addressed to
// 127.0.0.1 to the host's loopback; here only the namespace's kernel hands pasta its packets, and it
// never sends 127.0.0.0/8 out of the namespace.
// Nothing of a VM listens on the host's network: the worker reaches a guest port by entering the
// namespace for one connection (nsenter + socat to QEMU's forward on the namespace's 127.0.0.1), the
// console and QMP are unix sockets in the VM's directory (mode 0700).
import { spawn, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import { openSync, closeSync, readdirSync, readFileSync } from 'node:fs';
import { Duplex, type Readable, type Writable } from 'node:stream';

/** argv that runs `command` in a new user and network namespace (the caller's user is root in it). */
export function inNewNetns(command: string[]): string[] {
  return ['unshare', '--user', '--map-root-user', '--net', '--', ...command];
}

/**
 * Starts pasta for the network namespace of process `pid`: the namespace gets the host's outbound
 * network (addresses, routes, DNS copied from the host), and no port of the host is forwarded into it
 * or out of it. pasta runs detached (it outlives the worker, like QEMU) and quits with the namespace.
 */
export function startPasta(pid: number, logFile: string): ChildProcess {
  const out = openSync(logFile, 'w');
  try {
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    return spawn('pasta', [
      // pasta turns root into nobody, which may not enter a namespace root owns: keep our own user
      // (pasta still drops its capabilities and sandboxes itself).
      '--runas', `${uid}:${gid}`,
      '--foreground', '--quiet', '--config-net', '--no-map-gw',
      '--tcp-ports', 'none', '--udp-ports', 'none', '--tcp-ns', 'none', '--udp-ns', 'none',
      String(pid),
    ], { detached: true, stdio: ['ignore', out, out] });
  } finally {
    closeSync(out);
  }
}

/** Whether process `procPid` is a pasta serving the network namespace of process `pid` (startPasta's command line). */
function isPastaOf(procPid: number, pid: number): boolean {
  try {
    const cmdline = readFileSync(`/proc/${procPid}/cmdline`, 'utf8').split('\0');
    return !!cmdline[0]?.endsWith('pasta') && cmdline.at(-2) === String(pid);
  } catch {
    return false; // gone
  }
}

/**
 * Ends the pasta of QEMU `pid`'s namespace. pasta holds that namespace open itself, so it does not
 * notice when QEMU is gone. `netPid`, the pasta the VM's record names, is killed only if it is that
 * pasta. Without a record (a template whose maker was killed before it wrote one), every process is
 * looked at: then call this while QEMU `pid` still runs, so that the pid names no other process.
 */
export function killPastaOf(pid: number, netPid?: number): void {
  const candidates = netPid !== undefined ? [netPid] : readdirSync('/proc').filter((d) => /^\d+$/.test(d)).map(Number);
  for (const p of candidates) {
    if (!isPastaOf(p, pid)) continue;
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
  }
}

/**
 * A connection to 127.0.0.1:`port` inside the network namespace of process `pid`, as a Duplex over
 * a socat process that lives as long as the connection. Resolves once socat is connected.
 */
export function connectInNetns(pid: number, port: number, what: string, timeoutMs = 10_000): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    // -t 60: after one side ends, the other may still send for a while (a half-closed connection).
    // shut-close: the guest's end closes socat's stdout at once, so ours ends then too (socat's
    // default for a pipe leaves it open until socat exits: a connection the guest closed first,
    // as dropbear closes those over its limit, would end for the client only 60 s later).
    const child = spawn('nsenter', ['--target', String(pid), '--user', '--net', '--preserve-credentials', '--',
      'socat', '-d', '-d', '-t', '60', 'STDIO,shut-close', `TCP4:127.0.0.1:${port},nodelay`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let log = '';
    let connected = false;
    const fail = (err: Error) => {
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error(`connect to ${what} timed out`)), timeoutMs);
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      if (connected) return;
      log += d;
      if (!log.includes('starting data transfer loop')) return;
      connected = true;
      clearTimeout(timer);
      resolve(new ProcessStream(child));
    });
    child.once('error', (err: NodeJS.ErrnoException) =>
      fail(err.code === 'ENOENT' ? new Error('nsenter not found: apt-get install util-linux') : err));
    child.once('exit', (code) => {
      if (connected) return;
      // socat's own error line, e.g. "E connect(5, AF=2 127.0.0.1:22, 16): Connection refused"
      const why = /\bE (.*)$/m.exec(log)?.[1] ?? /nsenter: .*$/m.exec(log)?.[0] ?? `exit code ${code}`;
      fail(new Error(`connect to ${what}: ${/failed to execute socat/.test(log) ? 'socat not found: apt-get install socat' : why}`));
    });
  });
}

/** A process's stdout and stdin as one Duplex, like a socket: destroying it ends the process. */
class ProcessStream extends Duplex {
  private readonly child: ChildProcessByStdio<Writable, Readable, Readable>;

  constructor(child: ChildProcessByStdio<Writable, Readable, Readable>) {
    super();
    this.child = child;
    child.stdout.on('data', (d: Buffer) => {
      if (!this.push(d)) child.stdout.pause();
    });
    // The guest may have closed already (socat closes its stdout at once, shut-close): a socket at
    // its end with nothing unread emits 'end' even with no reader, so it may be over by now.
    if (child.stdout.readableEnded) this.push(null);
    else child.stdout.on('end', () => this.push(null));
    child.stdin.on('error', (err) => this.destroy(err));
  }

  override _read(): void {
    this.child.stdout.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.child.stdin.write(chunk, cb);
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.child.stdin.end(cb);
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.child.kill();
    cb(err);
  }
}
