// Test helpers: real controllers (in this process or as a child process) on loopback with real TLS,
// temporary data dirs, and clients that pin the controller's certificate.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import https from 'node:https';
import { connect, createServer, type AddressInfo, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pino, type Logger } from 'pino';
import YAML from 'yaml';
import { startController } from '../src/controller/controller.ts';
import { OrchardClient } from '../src/client/client.ts';
import { RESOURCE_TART_VMS } from '../src/api/schemas.ts';
import type { BackoffOptions } from '../src/controller/auth-backoff.ts';
import type { Limits } from '../src/controller/limits.ts';

export const ROOT = resolve(import.meta.dirname, '..');
export const ORCHARD_BIN = join(ROOT, 'bin', 'orchard');
export const ADMIN_TOKEN = 'test-admin-token';

const tempDirs: string[] = [];

/**
 * A new directory under the system's temporary dir, removed when the test file's process exits
 * (ORCHARD_KEEP_TEMP=1 keeps them, to look at after a failure).
 */
export function tempDir(prefix = 'orchard-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  if (tempDirs.push(dir) === 1 && !process.env.ORCHARD_KEEP_TEMP) {
    process.once('exit', () => {
      for (const d of tempDirs) {
        try {
          rmSync(d, { recursive: true, force: true });
        } catch {
          // still in use by a process that outlived the test (it is reported by the test itself)
        }
      }
    });
  }
  return dir;
}

/** A logger that hands each entry (pino's JSON, parsed) to `onEntry`: for tests that read what was logged. */
export function entriesLogger(onEntry: (entry: { msg: string; [field: string]: unknown }) => void, level = 'debug'): Logger {
  return pino({ level }, { write: (line: string) => onEntry(JSON.parse(line) as { msg: string }) });
}

/** A logger that prints `# PREFIX: msg {fields}` lines in the test's output (node:test shows them as diagnostics). */
export function printingLogger(prefix: string): Logger {
  return entriesLogger(({ msg, level: _l, time: _t, pid: _p, hostname: _h, ...fields }) =>
    console.log(`# ${prefix}: ${msg}${Object.keys(fields).length ? ' ' + JSON.stringify(fields) : ''}`), 'info');
}

/** A controller in this process on a free loopback port, with a bootstrap admin. */
export async function inProcessController(
  opts: { dataDir?: string; workerOfflineTimeoutMs?: number; restartBackoffMs?: number; listenSSH?: string; authBackoff?: BackoffOptions | false; limits?: Partial<Limits>; logger?: Logger } = {},
) {
  const dataDir = opts.dataDir ?? tempDir();
  const ctl = await startController({
    dataDir,
    listen: '127.0.0.1:0',
    bootstrapAdminToken: ADMIN_TOKEN,
    workerOfflineTimeoutMs: opts.workerOfflineTimeoutMs,
    restartBackoffMs: opts.restartBackoffMs,
    listenSSH: opts.listenSSH,
    authBackoff: opts.authBackoff,
    limits: opts.limits,
    logger: opts.logger ?? pino({ level: process.env.ORCHARD_TEST_LOG ?? 'silent' }),
  });
  const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
  return {
    ctl,
    dataDir,
    admin,
    client: (name: string, token: string) => clientOf(ctl, name, token),
    async close() {
      admin.close();
      await ctl.close();
    },
    cleanup() {
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Registers worker `worker` as `client`'s account (room for 100 VMs) and waits until VM `vm` is placed
 * on it: that account may then report the VM's state and events, as its worker.
 */
export async function placeOn(client: OrchardClient, worker: string, vm: string, slots = 100) {
  await client.registerWorker({ name: worker, resources: { [RESOURCE_TART_VMS]: slots } });
  return waitFor(`VM ${vm} placed on worker ${worker}`, async () => {
    const v = await client.getVM(vm);
    return v.worker === worker ? v : undefined;
  }, 10_000);
}

export function clientOf(ctl: { url: string; certificate?: string }, name: string, token: string) {
  return new OrchardClient({ url: ctl.url, certificate: ctl.certificate, serviceAccountName: name, serviceAccountToken: token });
}

export interface ChildController {
  proc: ChildProcess;
  url: string;
  fingerprint: string;
  stderr: () => string;
  /** What it wrote to stdout: its log (pino JSON lines). */
  stdout: () => string;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/** `orchard controller run` (`bin`: bin/orchard unless another, the single executable say) as a real child process; resolves once it listens. */
export function spawnController(dataDir: string, extraArgs: string[] = [], env: Record<string, string> = {}, bin = ORCHARD_BIN): Promise<ChildController> {
  const proc = spawn(bin, ['controller', 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0', ...extraArgs], {
    // ORCHARD_HOME: the controller writes a bootstrap-context there (as upstream's), not in the user's ~/.orchard.
    env: { ...process.env, ORCHARD_BOOTSTRAP_ADMIN_TOKEN: ADMIN_TOKEN, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_HOME: tempDir('orchard-home-'), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  let out = '';
  proc.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`controller did not start in 20 s:\n${err}`)), 20_000);
    proc.stderr!.on('data', (chunk: Buffer) => {
      err += chunk.toString();
      const m = /listening on (\S+), certificate SHA-256 (\S+)/.exec(err);
      if (m) {
        clearTimeout(timer);
        resolvePromise({
          proc,
          url: m[1].replace(/,$/, ''),
          fingerprint: m[2],
          stderr: () => err,
          stdout: () => out,
          kill: async (signal = 'SIGKILL') => {
            if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
            await exited;
          },
        });
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`controller exited with ${code}:\n${err}`));
    });
  });
}

/** Runs the real `orchard` CLI; resolves with its exit code and output. */
export function runCLI(args: string[], env: Record<string, string> = {}, input?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const proc = spawn(ORCHARD_BIN, args, { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    proc.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    proc.on('error', reject);
    proc.on('close', (code) => resolvePromise({ code: code ?? -1, stdout, stderr }));
    proc.stdin.end(input ?? '');
  });
}

/** A raw HTTPS request (pinned certificate), for tests that send exactly the bytes they mean. */
export async function rawRequest(
  ctl: { url: string; certificate?: string },
  method: string,
  path: string,
  /** `contentType: null` sends a body without a Content-Type (as upstream's Go client does). */
  opts: { auth?: [string, string]; authorization?: string; body?: string | Buffer; contentType?: string | null; localAddress?: string; headers?: Record<string, string> } = {},
): Promise<{ status: number; body: string; json: unknown; headers: Record<string, string | string[] | undefined> }> {
  const headers: Record<string, string> = { ...opts.headers };
  // `auth` makes a Basic header; `authorization` sends exactly the header given (malformed ones too).
  if (opts.auth) headers.authorization = 'Basic ' + Buffer.from(`${opts.auth[0]}:${opts.auth[1]}`).toString('base64');
  if (opts.authorization !== undefined) headers.authorization = opts.authorization;
  if (opts.body !== undefined && opts.contentType !== null) headers['content-type'] = opts.contentType ?? 'application/json';
  return new Promise((resolvePromise, reject) => {
    const req = https.request(new URL(path, ctl.url), { method, headers, ca: ctl.certificate, checkServerIdentity: () => undefined, ...(opts.localAddress ? { localAddress: opts.localAddress, agent: false } : {}) }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => {
        let json: unknown;
        try {
          json = JSON.parse(body);
        } catch {
          json = undefined;
        }
        resolvePromise({ status: res.statusCode ?? 0, body, json, headers: res.headers });
      });
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

/**
 * The context `orchard dev` wrote to `orchardHome`: the whole config, the API as rawRequest takes it
 * (pinned certificate), the admin's credentials, and whether VM `name` is reported running (asked of
 * the API from the test's process: a CLI process every fraction of a second would take the CPU a VM
 * boots with).
 */
export function devContext(orchardHome: string) {
  const config = YAML.parse(readFileSync(join(orchardHome, 'orchard.yml'), 'utf8')) as {
    'default-context': string;
    contexts: Record<string, { url: string; certificate?: string; serviceAccountToken?: string }>;
  };
  const dev = config.contexts.dev;
  const api = { url: dev.url, certificate: Buffer.from(dev.certificate ?? '', 'base64').toString() };
  const auth: [string, string] = ['bootstrap-admin', dev.serviceAccountToken ?? ''];
  const vmRunning = async (name: string) => ((await rawRequest(api, 'GET', `/v1/vms/${name}`, { auth })).json as { status?: string } | undefined)?.status === 'running';
  return { config, api, auth, vmRunning };
}

/** The value of metric `name` (summed over its labels) that the controller at `ctl` exports. */
export async function metric(ctl: { url: string; certificate?: string }, name: string): Promise<number> {
  const res = await rawRequest(ctl, 'GET', '/metrics', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
  let n = 0;
  for (const line of res.body.split('\n')) if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) n += Number(line.split(' ').pop());
  return n;
}

/** Opens a watch (GET `path`) as `auth` and does not read it: the answer is paused at once. */
export function pausedWatch(ctl: { url: string; certificate?: string }, auth: [string, string], path: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = https.request(new URL(path, ctl.url), {
      headers: { authorization: 'Basic ' + Buffer.from(auth.join(':')).toString('base64') },
      ca: ctl.certificate,
      checkServerIdentity: () => undefined,
      agent: false,
    }, (res) => {
      res.pause();
      resolve(res);
    });
    req.on('error', reject);
    req.end();
  });
}

/** Everything a (paused) answer still has to say, until it ends or breaks off. */
export const readAll = (res: IncomingMessage) =>
  new Promise<string>((resolve) => {
    let text = '';
    res.on('data', (chunk: Buffer) => (text += chunk.toString()));
    res.on('end', () => resolve(text));
    res.on('error', () => resolve(text));
    res.on('close', () => resolve(text));
    res.resume();
  });

/** Polls `fn` until it returns a truthy value (or throws after `timeoutMs`, with the last value). */
export async function waitFor<T>(what: string, fn: () => Promise<T> | T, timeoutMs = 30_000, everyMs = 50): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  for (;;) {
    last = await fn();
    if (last) return last as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Is `pid` a live process (a killed child not yet reaped is a zombie: not alive)? */
export function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * The suite runs two test files at once (scripts/run-tests.ts). A file that boots real VMs (QEMU under
 * TCG takes a core each) awaits this first: it waits until no other such file runs, and
 * holds the turn until its process ends. The turn is an abstract Unix socket, which the kernel frees
 * with the process, even one killed. The runner orders files by finding this call in them.
 */
export async function heavyFile(): Promise<void> {
  if (process.platform !== 'linux') return; // no abstract sockets: files run as the runner starts them
  const name = `\0orchard-tests-heavy-${process.getuid?.() ?? 0}`;
  for (;;) {
    const server = createServer();
    const mine = await new Promise<boolean>((resolveTurn, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => (err.code === 'EADDRINUSE' ? resolveTurn(false) : reject(err)));
      server.listen(name, () => resolveTurn(true));
    });
    if (mine) return void server.unref();
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The test suite's cache of built guest images (built once, reused by every test and run). */
export const TEST_IMAGES = process.env.ORCHARD_TEST_IMAGES ?? join(tmpdir(), 'orchard-test-images');

/**
 * Builds (once per machine; later calls take well under a second) `cloud-init-test` in TEST_IMAGES:
 * a guest with Debian's stock cloud-init and no login until a NoCloud seed makes one
 * (fixtures/build-cloud-init-image.sh). Needs debian-dev built there first, and root.
 */
export async function buildCloudInitTestImage(): Promise<string> {
  const { execFile } = await import('node:child_process');
  const script = join(ROOT, 'test', 'fixtures', 'build-cloud-init-image.sh');
  return new Promise((resolvePromise, reject) =>
    execFile('bash', [script, TEST_IMAGES], { maxBuffer: 16 << 20 }, (err, stdout, stderr) =>
      err ? reject(new Error(`${script} failed: ${err.message}\n${stderr.slice(-3000)}`)) : resolvePromise(stdout.trim().split('\n').pop() ?? '')));
}

/**
 * A real qemu worker of `c` (the bootstrap admin's account) with its data in `workerDir`; its images
 * in `imagesDir` (default: `workerDir`/images). `close` stops it and removes its VMs.
 */
export async function qemuWorker(
  c: Awaited<ReturnType<typeof inProcessController>>,
  name: string,
  workerDir: string,
  opts: {
    imagesDir?: string; slots?: number; buildMissingDebianDev?: boolean;
    /** Warm starts from image snapshots (off by default here: each test's fresh worker would first boot a template). */
    warmStart?: boolean;
    /** Standbys (off by default here: each would keep a QEMU for the rest of the test). */
    standbys?: number;
    imageCache?: import('../src/worker/oci/cache.ts').ImageCache; registries?: import('../src/worker/oci/registries.ts').Registries; logger?: Logger;
  } = {},
) {
  const [{ QemuDriver }, { startWorker }] = await Promise.all([import('../src/worker/drivers/qemu.ts'), import('../src/worker/run.ts')]);
  const { imageCache, registries, buildMissingDebianDev } = opts;
  const driver = new QemuDriver({ dataDir: workerDir, imagesDir: opts.imagesDir ?? join(workerDir, 'images'), buildMissingDebianDev, imageCache, registries, log: opts.logger, warmStart: opts.warmStart ?? false, standbys: opts.standbys ?? 0 });
  const worker = await startWorker({
    url: c.ctl.url,
    token: { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate },
    name,
    runtime: 'qemu',
    labels: {},
    slots: opts.slots ?? 4,
    dataDir: workerDir,
    driver,
    logger: opts.logger ?? pino({ level: process.env.ORCHARD_TEST_LOG ?? 'silent' }),
  });
  return {
    worker,
    driver,
    async close() {
      await worker.stop();
      for (const vm of await driver.list()) await driver.remove(vm.localName).catch(() => {});
    },
  };
}

/**
 * Creates a debian-dev VM (1 vCPU, 512 MiB unless `extra` says otherwise) and waits until it runs;
 * with its create→running time and its events (what its warm or cold start said).
 */
export async function createdVM(admin: OrchardClient, name: string, extra: Partial<import('../src/api/schemas.ts').VM> = {}) {
  const t0 = Date.now();
  await admin.createVM({ name, image: 'debian-dev', cpu: 1, memory: 512, ...extra });
  const vm = await waitFor(`${name} to run`, async () => {
    const vm = await admin.getVM(name);
    if (vm.status === 'failed') throw new Error(`${name} failed: ${vm.status_message}`);
    return vm.status === 'running' ? vm : undefined;
  }, 180_000, 20);
  const events = (await admin.listEvents(name, { limit: 100 })).events.map((e) => e.payload ?? '');
  return { vm, seconds: (Date.now() - t0) / 1000, events };
}

/**
 * The warm-start snapshots of TEST_IMAGES' images that the suite's workers share (linkTestSnapshots):
 * their VMs resume them (README, "Warm starts") instead of booting, and no worker makes its own: a
 * cold boot under TCG costs several CPU seconds.
 */
const TEST_SNAPSHOTS = join(TEST_IMAGES, '..', 'orchard-test-snapshots');

/**
 * Links `workerDataDir`/snapshots to TEST_SNAPSHOTS once its debian-dev snapshot (1 vCPU, 512 MiB) is
 * there and up to date (made here if not): a worker run as `orchard worker run` or by `orchard dev`
 * then resumes it like qemuCluster's. (Made before the worker starts: workers of two processes that
 * both found none would make it at once, and one's rename could land while the other's VM links it.
 * Two callers at once could too: the runner runs the files that boot VMs one at a time.)
 */
export async function linkTestSnapshots(workerDataDir: string): Promise<void> {
  const [{ QemuDriver }, fs] = await Promise.all([import('../src/worker/drivers/qemu.ts'), import('node:fs')]);
  const home = join(TEST_IMAGES, '..', 'orchard-test-snapshot-maker');
  fs.mkdirSync(home, { recursive: true, mode: 0o700 });
  fs.mkdirSync(TEST_SNAPSHOTS, { recursive: true, mode: 0o700 });
  if (!fs.existsSync(join(home, 'snapshots'))) fs.symlinkSync(TEST_SNAPSHOTS, join(home, 'snapshots'));
  await new QemuDriver({ dataDir: home, imagesDir: TEST_IMAGES }).snapshot('debian-dev', { cpu: 1, memory: 512 });
  fs.mkdirSync(workerDataDir, { recursive: true });
  fs.symlinkSync(TEST_SNAPSHOTS, join(workerDataDir, 'snapshots'));
}

/**
 * An in-process controller and an in-process worker with the real QEMU driver, the debian-dev image
 * built (or cached), warm starts from TEST_SNAPSHOTS (unless `warmStart: false`: every VM boots), and a
 * helper that creates a VM and waits until it runs.
 */
export async function qemuCluster(opts: { workerName?: string; listenSSH?: string; limits?: Partial<Limits>; warmStart?: boolean } = {}) {
  const [{ buildDebianDev }, fs] = await Promise.all([import('../src/worker/images.ts'), import('node:fs')]);
  await buildDebianDev(TEST_IMAGES);
  const c = await inProcessController({ listenSSH: opts.listenSSH, limits: opts.limits });
  const workerDir = tempDir('orchard-worker-');
  fs.symlinkSync(TEST_IMAGES, join(workerDir, 'images'));
  if (opts.warmStart !== false) await linkTestSnapshots(workerDir);
  const name = opts.workerName ?? 'qemu-1';
  const { worker, driver, close: stopWorker } = await qemuWorker(c, name, workerDir, { imagesDir: TEST_IMAGES, warmStart: opts.warmStart ?? true });
  return {
    ...c,
    worker,
    workerName: name,
    driver,
    workerDir,
    /** Creates a debian-dev VM (1 vCPU, 512 MiB unless overridden) and waits until it runs. */
    async runningVM(vmName: string, extra: Partial<import('../src/api/schemas.ts').VM> = {}) {
      await c.admin.createVM({ name: vmName, image: 'debian-dev', cpu: 1, memory: 512, ...extra });
      return waitFor(`${vmName} to run`, async () => {
        const vm = await c.admin.getVM(vmName);
        if (vm.status === 'failed') throw new Error(`${vmName} failed: ${vm.status_message}`);
        return vm.status === 'running' ? vm : undefined;
      }, 180_000, 100);
    },
    async close() {
      for (const vm of await c.admin.listVMs().catch(() => [])) await c.admin.deleteVM(vm.name).catch(() => {});
      await stopWorker();
      await c.close();
      c.cleanup();
      rmSync(workerDir, { recursive: true, force: true });
    },
  };
}

/** A TCP port free on 127.0.0.1 right now. */
export const freePort = () =>
  new Promise<number>((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });

/** Processes (pids) whose command line (its arguments, as a list) `matches`. */
const processesWhose = (matches: (argv: string[]) => boolean) =>
  readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        return matches(readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0'));
      } catch {
        return false; // gone meanwhile
      }
    });

/** Processes (pids) whose command line mentions `needle`. */
export const processesWith = (needle: string) => processesWhose((argv) => argv.join('\0').includes(needle));

/**
 * The pasta process serving the network namespace of process `pid` (its command line names `pid`), if
 * any. (Debian's pasta runs as `passt.avx2`: `pgrep pasta` does not find it, its command line does.)
 */
export function pastaServing(pid: number): number | undefined {
  const found = processesWhose((argv) => argv[0].endsWith('pasta') && argv.includes(String(pid)))[0];
  return found === undefined ? undefined : Number(found);
}

/** A long-running `orchard` (port-forward, vnc, controller or worker run) with its output. */
export interface OrchardProcess {
  proc: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** stdout and stderr as they came, interleaved. */
  output: () => string;
  /** Resolves with the first match of `re` in the output; rejects if the process exits first. */
  waitOutput(re: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  exited: Promise<number | null>;
  /** Signals it (unless it has exited) and resolves with its exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Starts `orchard ARGS` (the checkout's bin/orchard unless `bin`), with `env` added to this process's
 * environment (or, with `inheritEnv: false`, only `env`). `live` collects what runs, for an after hook
 * to stop whatever a failed test left.
 */
export function spawnOrchard(
  args: string[],
  opts: { env?: Record<string, string>; inheritEnv?: boolean; bin?: string; cwd?: string; input?: string; live?: Set<OrchardProcess> } = {},
): OrchardProcess {
  const env = opts.inheritEnv === false ? opts.env : { ...process.env, ...opts.env };
  const proc = spawn(opts.bin ?? ORCHARD_BIN, args, { cwd: opts.cwd, env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
  if (opts.input !== undefined) proc.stdin!.end(opts.input);
  let out = '';
  let err = '';
  let all = '';
  proc.stdout!.on('data', (c: Buffer) => ((out += c.toString()), (all += c.toString())));
  proc.stderr!.on('data', (c: Buffer) => ((err += c.toString()), (all += c.toString())));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  const p: OrchardProcess = {
    proc,
    stdout: () => out,
    stderr: () => err,
    output: () => all,
    exited,
    waitOutput: (re, timeoutMs = 30_000) =>
      waitFor(`${re} from orchard ${args.join(' ')}`, () => {
        const m = re.exec(all);
        if (!m && proc.exitCode !== null) throw new Error(`orchard ${args.join(' ')} exited with ${proc.exitCode}:\n${all}`);
        return m;
      }, timeoutMs),
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const code = await exited;
      opts.live?.delete(p);
      return code;
    },
  };
  opts.live?.add(p);
  return p;
}

/**
 * A long link on loopback: a TCP proxy to `target` that hands each chunk on `oneWayMs` after it came,
 * in order, both ways (ends too). It buffers without limit: the link has latency, not a bandwidth cap.
 */
export function delayProxy(target: number, oneWayMs: number): Promise<{ port: number; close: () => void }> {
  const server = createServer({ noDelay: true, allowHalfOpen: true }, (a) => {
    const b = connect({ port: target, host: '127.0.0.1', noDelay: true, allowHalfOpen: true });
    for (const [from, to] of [
      [a, b],
      [b, a],
    ]) {
      from.on('data', (c: Buffer) => setTimeout(() => to.write(c), oneWayMs));
      from.on('end', () => setTimeout(() => to.end(), oneWayMs));
      from.on('error', () => setTimeout(() => to.destroy(), oneWayMs));
    }
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ port: (server.address() as AddressInfo).port, close: () => server.close() })));
}

/** A port of this host that sends without end to whoever connects (a worker-host target for tunnels). */
export async function startFirehose(): Promise<Server> {
  const server = createServer((sock) => {
    sock.on('error', () => {});
    const chunk = Buffer.alloc(64 * 1024, 7);
    const pump = () => {
      while (sock.write(chunk));
    };
    sock.on('drain', pump);
    pump();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return server;
}
