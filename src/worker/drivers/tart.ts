// Tart driver for macOS workers: drives only the `tart` CLI (cirruslabs/tart), like upstream
// Orchard's worker does, never Tart's files.
//   prepare  `tart list --format json` to see whether the image is pulled; `tart pull IMAGE` when it is
//            not (or imagePullPolicy is Always), progress from tart's output; `tart clone IMAGE NAME`;
//            `tart set NAME --cpu N --memory MiB [--disk-size GB]` (disk only grown, never shrunk)
//   start    `tart run NAME --no-graphics [--net-softnet] [--net-softnet-allow=CIDRS]
//            [--net-softnet-block=CIDRS] [--net-bridged=IF] [--nested] [--dir=NAME:PATH[:ro]]...`,
//            detached (own session) with its output in <stateDir>/<name>.log, so the VM outlives the
//            worker; a new TartDriver adopts it through `tart list`
//   waitReady `tart ip NAME --wait N`, then the guest's TCP port 22 (`sshPort`) must send `SSH-`
//   stop     `tart stop NAME --timeout S`;  remove: stop, then `tart delete NAME`
//   suspend  `tart suspend NAME` (the VM runs `--suspendable`: tart run saves its state and exits;
//            `tart list` shows it suspended); resume: `tart run` again, which restores it (as upstream)
// Besides the log, <stateDir>/<name>.json keeps the controller's uid and the image of each VM, so
// list() can report the uid of adopted VMs and a repeated prepare() of the same VM keeps its disk.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import { join, resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { privateDir } from '../private-files.ts';
import { connectTCP, sshBanner } from './net.ts';
import { pino, type Logger } from 'pino';
import type { Driver, DriverVM, LocalVM, Progress } from './driver.ts';
import { checkLocalName, isLocalName, VMRecords } from './vm-records.ts';

export interface TartDriverOptions {
  /** Where the driver keeps each VM's `tart run` log and a small JSON file (uid, image). */
  stateDir: string;
  /** default `tart` (from PATH) */
  tartBinary?: string;
  /** The worker's logger (default: none). */
  log?: Logger;
  /** `tart ip --wait` seconds per attempt in waitReady (default 60, like upstream Orchard). */
  ipWaitSeconds?: number;
  /** The guest port waitReady probes for the SSH banner (default 22; tests point it at a stand-in). */
  sshPort?: number;
  /** waitReady gives up after this long (default 10 minutes); callers can abort earlier. */
  readyTimeoutMs?: number;
  /** How often `tart list` is polled while waiting for a VM to start or stop (default 1000 ms). */
  pollIntervalMs?: number;
}

/** One entry of `tart list --format json`. Older Tart versions have no State, newer ones may add fields. */
export interface TartListEntry {
  Source: string;
  Name: string;
  Disk?: number;
  Size?: number;
  Running?: boolean;
  State?: string;
}

/** A failed tart invocation; the message carries what tart printed (stderr, else stdout). */
export class TartError extends Error {
  readonly args: string[];
  readonly exitCode: number | null;
  readonly stderr: string;
  readonly stdout: string;
  constructor(args: string[], exitCode: number | null, signal: NodeJS.Signals | null, stdout: string, stderr: string) {
    const said = cleanOutput(stderr) || cleanOutput(stdout).split('\n').slice(-5).join('\n');
    const how = signal ? `killed by ${signal}` : `exit code ${exitCode}`;
    super(`tart ${args[0] ?? ''} failed (${how})${said ? `: ${said.slice(0, 4000)}` : ''}`);
    this.name = 'TartError';
    this.args = args;
    this.exitCode = exitCode;
    this.stderr = stderr;
    this.stdout = stdout;
  }
}

interface VmFile {
  uid: string;
  localName: string;
  image: string;
  netBridged?: string;
  created: string;
}

interface VmState {
  /** the `tart run` this driver instance started (absent for adopted VMs) */
  child?: ChildProcess;
  childExit?: Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>;
  exited?: boolean;
  stopping?: boolean;
}

const PREFIX = 'orchard-';

/** Tart's progress output: lines, percentages redrawn with escape sequences (sometimes literal ones). */
function cleanOutput(text: string): string {
  return text
    .replace(/\x1b\[[0-9;]*[A-Za-z]/g, '')
    .replace(/\\x1B\[[0-9;]*[A-Za-z]/gi, '')
    .split(/\r?\n|\r/)
    .map((l) => l.trim())
    .filter(Boolean)
    .join('\n');
}

/**
 * The name `tart list` shows for an OCI image: `host/namespace:tag` (`:latest` when no tag or
 * digest is given). Undefined for names that are not remote (local VMs used as images).
 */
export function normalizeRemoteName(image: string): string | undefined {
  const m = /^([A-Za-z0-9.-]+(?::\d+)?)\/([^\s@:]+)(:[^\s@/:]+|@sha256:[a-f0-9]+)?$/.exec(image);
  if (!m) return undefined;
  return `${m[1]}/${m[2]}${m[3] ?? ':latest'}`;
}

export class TartDriver implements Driver {
  readonly runtime = 'tart';
  readonly stateDir: string;
  /** `<stateDir>/<localName>.json` of each VM. */
  private readonly records: VMRecords<VmFile>;
  private readonly tartBinary: string;
  private readonly log: Logger;
  private readonly ipWaitSeconds: number;
  private readonly sshPort: number;
  private readonly readyTimeoutMs: number;
  private readonly pollIntervalMs: number;
  private readonly state = new Map<string, VmState>();

  constructor(opts: TartDriverOptions) {
    this.stateDir = resolve(opts.stateDir);
    this.records = new VMRecords((localName) => join(this.stateDir, `${localName}.json`));
    this.tartBinary = opts.tartBinary ?? 'tart';
    this.log = opts.log ?? pino({ level: 'silent' });
    this.ipWaitSeconds = Math.max(0, Math.floor(opts.ipWaitSeconds ?? 60));
    this.sshPort = opts.sshPort ?? 22;
    this.readyTimeoutMs = opts.readyTimeoutMs ?? 600_000;
    this.pollIntervalMs = opts.pollIntervalMs ?? 1000;
  }

  // --- tart ---------------------------------------------------------------------------------------

  /** Runs `tart ...args` (no shell); resolves with stdout, rejects with a TartError carrying stderr. */
  tart(args: string[], opts: { signal?: AbortSignal; timeoutMs?: number; onLine?: (line: string) => void } = {}): Promise<string> {
    return new Promise((res, rej) => {
      const child = spawn(this.tartBinary, args, { stdio: ['ignore', 'pipe', 'pipe'], signal: opts.signal });
      let stdout = '';
      let stderr = '';
      let partial = '';
      child.stdout.setEncoding('utf8');
      child.stderr.setEncoding('utf8');
      child.stdout.on('data', (d: string) => {
        stdout += d;
        if (!opts.onLine) return;
        partial += d;
        const parts = partial.split(/\r?\n|\r/);
        partial = parts.pop() ?? '';
        for (const p of parts) {
          const line = cleanOutput(p);
          if (line) opts.onLine(line);
        }
      });
      child.stderr.on('data', (d: string) => {
        stderr += d;
      });
      const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : undefined;
      let failed: Error | undefined;
      child.once('error', (err) => {
        const e = err as NodeJS.ErrnoException;
        failed = e.code === 'ENOENT'
          ? new Error(`${this.tartBinary} not found: install Tart (brew install cirruslabs/cli/tart) or set the tart binary's path`)
          : err;
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (opts.onLine && cleanOutput(partial)) opts.onLine(cleanOutput(partial));
        if (failed) return rej(failed);
        if (code === 0) return res(stdout);
        rej(new TartError(args, code, signal, stdout, stderr));
      });
    });
  }

  /** `tart list --format json`. */
  async tartList(): Promise<TartListEntry[]> {
    const out = await this.tart(['list', '--format', 'json']);
    const parsed = JSON.parse(out.trim() || '[]') as unknown;
    if (!Array.isArray(parsed)) throw new Error(`tart list --format json: unexpected output ${out.slice(0, 200)}`);
    return parsed as TartListEntry[];
  }

  private static isLocal(e: TartListEntry): boolean {
    return e.Source.toLowerCase() === 'local';
  }

  private static isRunning(e: TartListEntry): boolean {
    return e.State !== undefined ? e.State === 'running' : e.Running === true;
  }

  private static isSuspended(e: TartListEntry): boolean {
    return e.State === 'suspended';
  }

  private async localEntry(localName: string): Promise<TartListEntry | undefined> {
    return (await this.tartList()).find((e) => TartDriver.isLocal(e) && e.Name === localName);
  }

  // --- state files ----------------------------------------------------------------------------------

  /** `<stateDir>/<localName>.log`: the output of the VM's `tart run`. */
  logPath(localName: string): string {
    return join(this.stateDir, `${checkLocalName(localName)}.log`);
  }

  private st(localName: string): VmState {
    let s = this.state.get(localName);
    if (!s) {
      s = {};
      this.state.set(localName, s);
    }
    return s;
  }

  private async logTail(localName: string, lines: number): Promise<string> {
    try {
      return cleanOutput(await readFile(this.logPath(localName), 'utf8')).split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  /** Our own `tart run` child still runs: the VM runs. Otherwise ask `tart list`. */
  private async running(localName: string): Promise<boolean> {
    const s = this.state.get(localName);
    if (s?.child && !s.exited) return true;
    const e = await this.localEntry(localName);
    return e !== undefined && TartDriver.isRunning(e);
  }

  // --- Driver -------------------------------------------------------------------------------------

  async list(): Promise<LocalVM[]> {
    const out: LocalVM[] = [];
    for (const e of await this.tartList()) {
      if (!TartDriver.isLocal(e) || !e.Name.startsWith(PREFIX) || !isLocalName(e.Name)) continue;
      const file = await this.records.read(e.Name);
      out.push({ localName: e.Name, uid: file?.uid, running: TartDriver.isRunning(e), ...(TartDriver.isSuspended(e) ? { suspended: true } : {}), image: file?.image });
    }
    return out.sort((a, b) => a.localName.localeCompare(b.localName));
  }

  async prepare(vm: DriverVM, progress: Progress = () => {}): Promise<void> {
    const name = checkLocalName(vm.localName);
    const entries = await this.tartList();
    const existing = entries.find((e) => TartDriver.isLocal(e) && e.Name === name);
    if (existing && TartDriver.isRunning(existing)) throw new Error(`VM ${name} is running; stop it before preparing it again`);
    const old = await this.records.read(name);
    let disk = existing?.Disk;

    if (existing && old && old.uid === vm.uid && old.image === vm.image) {
      // Same VM prepared again (e.g. a restart): keep its disk.
      progress('disk kept from an earlier start');
      if (old.netBridged !== (vm.netBridged || undefined)) await this.records.write({ ...old, netBridged: vm.netBridged || undefined });
    } else {
      if (existing) {
        progress(`deleting an earlier VM named ${name}`);
        await this.tart(['delete', name]);
      }
      const remote = normalizeRemoteName(vm.image);
      const present = entries.some((e) => remote
        ? !TartDriver.isLocal(e) && e.Name === remote
        : TartDriver.isLocal(e) && e.Name === vm.image);
      if (vm.imagePullPolicy === 'Always' || (!present && remote)) {
        progress(`pulling image ${vm.image}`);
        await this.tart(['pull', vm.image], { onLine: (line) => progress(line) });
      }
      progress(`cloning ${vm.image}`);
      await this.tart(['clone', vm.image, name]);
      // Like upstream: clones of one image would share a MAC address, and so a DHCP lease and an IP.
      await this.tart(['set', name, '--random-mac']);
      disk = (await this.localEntry(name))?.Disk;
      await this.records.write({
        uid: vm.uid, localName: name, image: vm.image, netBridged: vm.netBridged || undefined, created: new Date().toISOString(),
      });
    }

    const set = ['set', name];
    if (vm.cpu > 0) set.push('--cpu', String(Math.floor(vm.cpu)));
    if (vm.memory > 0) set.push('--memory', String(Math.floor(vm.memory)));
    if (vm.diskSize && vm.diskSize > 0) {
      const want = Math.ceil(vm.diskSize);
      // `tart set --disk-size` refuses to shrink (it would cut the guest's file system).
      if (disk === undefined || want > disk) set.push('--disk-size', String(want));
      else if (want < disk) progress(`disk stays at ${disk} GB (the image is larger than diskSize ${vm.diskSize})`);
    }
    if (set.length > 2) {
      progress('configuring VM');
      await this.tart(set);
    }
    this.log.info({ vm: name, image: vm.image }, 'VM prepared');
  }

  /** The `tart run` arguments for a VM. */
  runArgs(vm: DriverVM): string[] {
    const args = ['run', vm.localName];
    if (vm.headless !== false) args.push('--no-graphics');
    const allow = vm.netSoftnetAllow?.filter(Boolean) ?? [];
    const block = vm.netSoftnetBlock?.filter(Boolean) ?? [];
    // Older Tart needs --net-softnet next to the allow/block lists; newer Tart implies it.
    if (vm.netSoftnet || allow.length || block.length) args.push('--net-softnet');
    if (allow.length) args.push(`--net-softnet-allow=${allow.join(',')}`);
    if (block.length) args.push(`--net-softnet-block=${block.join(',')}`);
    if (vm.netBridged) args.push(`--net-bridged=${vm.netBridged}`);
    if (vm.nested) args.push('--nested');
    if (vm.suspendable) args.push('--suspendable');
    for (const d of vm.hostDirs ?? []) args.push(`--dir=${d.name}:${resolve(d.path)}${d.ro ? ':ro' : ''}`);
    return args;
  }

  async start(vm: DriverVM): Promise<void> {
    const name = checkLocalName(vm.localName);
    if (await this.running(name)) return;
    await privateDir(this.stateDir);
    const args = this.runArgs(vm);
    const out = openSync(this.logPath(name), 'w', 0o600); // this run's output only
    let child: ChildProcess;
    try {
      // detached: own session and process group, so the VM survives the worker (and its signals)
      child = spawn(this.tartBinary, args, { detached: true, stdio: ['ignore', out, out] });
    } finally {
      closeSync(out);
    }
    const s = this.st(name);
    s.child = child;
    s.exited = false;
    s.stopping = false;
    s.childExit = new Promise((res) => {
      child.once('exit', (code, signal) => {
        s.exited = true;
        res({ code, signal });
      });
      child.once('error', (err) => {
        s.exited = true;
        const e = err as NodeJS.ErrnoException;
        res({
          code: null, signal: null,
          error: e.code === 'ENOENT' ? new Error(`${this.tartBinary} not found: install Tart (brew install cirruslabs/cli/tart)`) : err,
        });
      });
    });
    child.unref();
    const file = await this.records.read(name);
    if (file && file.netBridged !== (vm.netBridged || undefined)) await this.records.write({ ...file, netBridged: vm.netBridged || undefined });

    // Up once tart shows the VM running (`tart run` holds the VM's lock), or failed if it exits first.
    const deadline = Date.now() + 60_000;
    const exited = s.childExit;
    for (;;) {
      const r = await Promise.race([exited, sleep(Math.min(this.pollIntervalMs, 200)).then(() => undefined)]);
      if (r) {
        if (r.error) throw r.error;
        const log = await this.logTail(name, 15);
        throw new Error(`VM ${name}: tart run exited (${r.signal ?? `exit code ${r.code}`})${log ? `: ${log}` : ''}`);
      }
      const e = await this.localEntry(name).catch(() => undefined);
      if (e && TartDriver.isRunning(e)) break;
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`VM ${name}: tart run did not bring the VM up within 60 s`);
      }
    }
    this.log.info({ vm: name, pid: child.pid }, 'tart run started');
  }

  /** Resolves once the VM is no longer running (child exit, or `tart list` polling); `stop()` ends the polling. */
  private watchExit(localName: string, signal: AbortSignal): Promise<void> {
    const s = this.state.get(localName);
    if (s?.child && s.childExit && !s.exited) return s.childExit.then(() => undefined);
    return (async () => {
      while (!signal.aborted) {
        const e = await this.localEntry(localName).catch(() => 'error' as const);
        if (e !== 'error' && (!e || !TartDriver.isRunning(e))) return;
        await sleep(this.pollIntervalMs, undefined, { signal }).catch(() => {});
      }
    })();
  }

  async waitReady(localName: string, signal?: AbortSignal): Promise<void> {
    const name = checkLocalName(localName);
    const deadline = Date.now() + this.readyTimeoutMs;
    const file = await this.records.read(name);
    const watch = new AbortController();
    let dead = false;
    const died = this.watchExit(name, watch.signal).then(() => {
      if (!watch.signal.aborted) dead = true;
    });
    const diedError = async () => {
      const log = await this.logTail(name, 10);
      return new Error(`VM ${name} stopped running before the guest was ready${log ? `; tart run said: ${log}` : ''}`);
    };
    try {
      for (;;) {
        signal?.throwIfAborted();
        if (dead) throw await diedError();
        if (Date.now() > deadline) throw new Error(`VM ${name}: no SSH after ${Math.round(this.readyTimeoutMs / 1000)} s`);
        // `tart ip --wait` blocks until the guest has an address; stop waiting if the VM dies meanwhile.
        const attempt = new AbortController();
        const onAbort = () => attempt.abort();
        signal?.addEventListener('abort', onAbort, { once: true });
        const ipArgs = ['ip', name, '--wait', String(this.ipWaitSeconds)];
        // Tart's default DHCP-lease resolver does not see bridged guests; ARP does.
        if (file?.netBridged) ipArgs.push('--resolver', 'arp');
        let ip: string | undefined;
        try {
          ip = await Promise.race([
            this.tart(ipArgs, { signal: attempt.signal }).then((o) => o.trim().split('\n').pop()?.trim()),
            died.then(() => undefined),
          ]);
        } catch {
          ip = undefined; // no address yet (or aborted: checked above on the next round)
        } finally {
          attempt.abort();
          signal?.removeEventListener('abort', onAbort);
        }
        signal?.throwIfAborted();
        if (dead) throw await diedError();
        if (ip && net.isIP(ip) && (await sshBanner(ip, this.sshPort, 2000))) {
          this.log.info({ vm: name, ip }, 'VM ready (SSH answers)');
          return;
        }
        await sleep(Math.min(this.pollIntervalMs, 500), undefined, { signal }).catch(() => signal?.throwIfAborted());
      }
    } finally {
      watch.abort();
    }
  }

  async waitExit(localName: string): Promise<{ reason: string }> {
    const name = checkLocalName(localName);
    const s = this.st(name);
    if (s.child && s.childExit && !s.exited) {
      const { code, signal, error } = await s.childExit;
      if (s.stopping) return { reason: 'stopped' };
      if (error) return { reason: `tart run failed: ${error.message}` };
      if (signal) return { reason: `tart run was killed by ${signal}` };
      if (code === 0) return { reason: 'the VM shut down' };
      const log = await this.logTail(name, 3);
      return { reason: `tart run exited with code ${code}${log ? `: ${log}` : ''}` };
    }
    if (!(await this.running(name))) return { reason: 'not running' };
    for (;;) {
      await sleep(this.pollIntervalMs);
      const e = await this.localEntry(name).catch(() => 'error' as const);
      if (e === 'error') continue;
      if (!e || !TartDriver.isRunning(e)) return { reason: s.stopping ? 'stopped' : 'the VM stopped' };
    }
  }

  async ip(localName: string): Promise<string> {
    const name = checkLocalName(localName);
    const file = await this.records.read(name);
    const out = await this.tart(file?.netBridged ? ['ip', name, '--resolver', 'arp'] : ['ip', name]);
    const ip = out.trim().split('\n').pop()?.trim() ?? '';
    if (!net.isIP(ip)) throw new Error(`tart ip ${name}: unexpected output ${JSON.stringify(out.trim())}`);
    return ip;
  }

  async dial(localName: string, port: number): Promise<Duplex> {
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`invalid port ${port}`);
    const ip = await this.ip(localName);
    return connectTCP(ip, port, `VM ${localName} port ${port} (${ip})`);
  }

  /** `tart suspend`, then waits (up to 5 min: a large guest's memory is written) until tart list says suspended. */
  async suspend(localName: string): Promise<void> {
    const name = checkLocalName(localName);
    const e = await this.localEntry(name);
    if (e && TartDriver.isSuspended(e)) return;
    const s = this.st(name);
    s.stopping = true; // the `tart run` exits: that is no failure
    await this.tart(['suspend', name]);
    const deadline = Date.now() + 300_000;
    for (;;) {
      const now = await this.localEntry(name).catch(() => undefined);
      if (now && TartDriver.isSuspended(now)) break;
      if (now && !TartDriver.isRunning(now)) {
        const log = await this.logTail(name, 3);
        throw new Error(`VM ${name}: tart suspend did not suspend it (it stopped instead)${log ? `: ${log}` : ''}`);
      }
      if (Date.now() > deadline) throw new Error(`VM ${name}: not suspended 5 min after tart suspend`);
      await sleep(Math.min(this.pollIntervalMs, 200));
    }
    if (s.child && s.childExit && !s.exited) await Promise.race([s.childExit, sleep(5000)]);
    this.log.info({ vm: name }, 'VM suspended');
  }

  /** A suspended VM runs again: `tart run` restores its saved state. */
  async resume(vm: DriverVM): Promise<boolean> {
    const e = await this.localEntry(checkLocalName(vm.localName));
    if (!e || !TartDriver.isSuspended(e)) return false;
    await this.start(vm);
    return true;
  }

  async stop(localName: string, graceMs = 10_000): Promise<void> {
    const name = checkLocalName(localName);
    if (!(await this.running(name))) return;
    const s = this.st(name);
    s.stopping = true;
    const timeout = Math.max(0, Math.ceil(graceMs / 1000));
    try {
      await this.tart(['stop', name, '--timeout', String(timeout)], { timeoutMs: (timeout + 30) * 1000 });
    } catch (err) {
      // Older Tart fails a stop of a VM that stopped meanwhile; only a VM still running is an error.
      if (await this.running(name).catch(() => true)) throw err;
    }
    // `tart stop` returns once the VM's lock is gone; let our own child's exit be seen too.
    if (s.child && s.childExit && !s.exited) await Promise.race([s.childExit, sleep(5000)]);
    this.log.info({ vm: name }, 'VM stopped');
  }

  async remove(localName: string): Promise<void> {
    const name = checkLocalName(localName);
    await this.stop(name, 0); // the disk goes too: no point in a graceful guest shutdown
    try {
      await this.tart(['delete', name]);
    } catch (err) {
      if (!(err instanceof TartError && /does not exist/.test(err.message))) throw err;
    }
    await this.records.remove(name);
    await rm(this.logPath(name), { force: true });
    this.state.delete(name);
    this.log.info({ vm: name }, 'VM removed');
  }
}
