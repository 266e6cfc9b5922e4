// orchard worker run; orchard image build|import|push|list
import { Option, type Command } from 'commander';
import type { Logger } from 'pino';
import { VM_DEFAULTS } from '../../api/defaults.ts';
import { readFileSync } from 'node:fs';
import { hostname, homedir } from 'node:os';
import { join } from 'node:path';
import { decodeBootstrapToken } from '../../api/bootstrap-token.ts';
import { collect, collectKeyValue, parseInteger, parseSize, UsageError } from '../common.ts';
import { parseDuration, print, table, type OutputFormat } from '../output.ts';
import { parseOutput } from '../output.ts';
import * as lazy from '../../build/lazy.ts';
import type { LogFormat } from '../../logging.ts';
import type { SnapshotListing } from '../../worker/drivers/snapshots.ts';
import { registerImagePullCommand } from './image-pull.ts';

export const defaultWorkerDataDir = () => join(homedir(), '.orchard', 'worker');

const BOOTSTRAP_TOKEN_ENV = 'ORCHARD_BOOTSTRAP_TOKEN';

/** The controller's URL as upstream's worker takes it: a bare HOST[:PORT] is https://HOST:PORT, port 6120 by default. */
export function controllerURL(raw: string): string {
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `https://${raw}`);
  } catch {
    throw new UsageError(`"${raw}" is not a controller URL (https://HOST:PORT)`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new UsageError(`"${raw}": the controller URL must be https:// (or http:// for --insecure-no-tls controllers)`);
  if (!url.port && !/^[a-z]+:\/\/[^/]*:\d+/i.test(raw)) url.port = '6120';
  return url.href.replace(/\/$/, '');
}

/**
 * The worker's bootstrap token from exactly one source. A command-line argument is readable by
 * every user of the host (ps, /proc/PID/cmdline); stdin and the environment are not.
 */
async function bootstrapTokenFrom(opts: { bootstrapToken?: string; bootstrapTokenStdin?: boolean }): Promise<string> {
  const env = process.env[BOOTSTRAP_TOKEN_ENV];
  // Not passed on to what the worker starts (QEMU, Tart, startup scripts).
  delete process.env[BOOTSTRAP_TOKEN_ENV];
  const sources = [
    opts.bootstrapTokenStdin ? '--bootstrap-token-stdin' : undefined,
    env !== undefined ? `$${BOOTSTRAP_TOKEN_ENV}` : undefined,
    opts.bootstrapToken !== undefined ? '--bootstrap-token' : undefined,
  ].filter((s) => s !== undefined);
  if (sources.length === 0) throw new UsageError(`a bootstrap token is needed: pipe it into --bootstrap-token-stdin, or set $${BOOTSTRAP_TOKEN_ENV}`);
  if (sources.length > 1) throw new UsageError(`the bootstrap token comes from one place only, got ${sources.join(' and ')}`);
  let token: string;
  if (opts.bootstrapTokenStdin) {
    const chunks: Buffer[] = [];
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
    token = Buffer.concat(chunks).toString('utf8').trim();
  } else {
    token = (env ?? opts.bootstrapToken ?? '').trim();
  }
  if (!token) throw new UsageError(`${sources[0]}: the bootstrap token is empty`);
  if (opts.bootstrapToken !== undefined) {
    process.stderr.write(`warning: --bootstrap-token is visible to every user of this host (ps); use --bootstrap-token-stdin or $${BOOTSTRAP_TOKEN_ENV}\n`);
  }
  return token;
}

export function registerWorkerCommands(program: Command) {
  const worker = program.command('worker').description('run a worker');
  worker
    .command('run')
    .description('run a worker: register with the controller and run the VMs it assigns here')
    .argument('<controller-url>', 'e.g. https://controller:6120 (a bare HOST[:PORT] means https://HOST:PORT, port 6120 by default)')
    .option('--bootstrap-token <token>', 'from `orchard get bootstrap-token NAME` (credentials and the controller certificate); visible in ps, prefer the next two')
    .option('--bootstrap-token-stdin', 'read the bootstrap token from standard input')
    .option('--name <name>', 'worker name (default: the host name, as upstream)', hostname().replace(/[^A-Za-z0-9._:-]/g, '-').slice(0, 128))
    .option('--label, --labels <key=value[,...]>', 'labels VMs can require (repeatable)', collectKeyValue)
    .option('--resources <name=amount[,...]>', 'extra resources to advertise (repeatable)', collectKeyValue)
    .option('--runtime <runtime>', 'qemu (Linux), tart (macOS) or synthetic', process.platform === 'darwin' ? 'tart' : 'qemu')
    .option('--synthetic', 'same as --runtime synthetic: in-memory VMs for load tests')
    .option('--slots <n>', 'VMs this host runs at once (default: 2 for tart, memory/1 GiB for qemu, 1000 synthetic)', parseInteger('--slots'))
    .option('--default-cpu <n>', 'CPUs of a VM that asks for none', parseInteger('--default-cpu'), VM_DEFAULTS.cpu)
    .option('--default-memory <mib>', 'memory (MiB) of a VM that asks for none', parseInteger('--default-memory'), VM_DEFAULTS.memory)
    .option('--data-dir <dir>', 'VM disks, images and state (default: ~/.orchard/worker of the user the worker runs as)')
    .option('--heartbeat <duration>', 'how often to report liveness', '10s')
    .option('--orphan-grace <duration>', 'how long to keep a VM the controller does not know (it lost its data) before removing it', '24h')
    .option('--log-file <file>', 'write the log (JSON lines) to this file instead of standard output; rotated at 100 MB (the full one becomes FILE.1)')
    .addOption(new Option('--log-format <format>', 'the log on standard output: text (lines for people) or json (JSON lines); default: text on a terminal, json otherwise').choices(['text', 'json']))
    .option('--debug', 'debug log level (same as ORCHARD_LOG_LEVEL=debug)')
    .option('--user <name>', 'started as root: run as this user (its groups and HOME) from the start on; VMs, their files and startup scripts belong to it')
    .option('--no-pki', "trust only the certificate in the bootstrap token (refuse to start if it has none), never the host's CAs")
    .option('--image-cache-size <size>', 'bound on the images pulled from registries (e.g. 50G, 500M): the least recently used ones no VM uses are removed to make room (default: no bound)', parseSize('--image-cache-size'))
    .option('--insecure-registry <host[:port]>', 'pull from this registry over plain HTTP (repeatable)', collect)
    .option('--registry-ca-file <file>', "a CA certificate (PEM) to trust for registries, on top of the host's")
    .option('--no-warm-start', 'boot every VM cold: no snapshot of a booted image is made or resumed (qemu)')
    .option('--warm-standby <n>', 'VMs kept resumed from the snapshots VMs last started from, paused, for the next VMs of those to take: they start faster still (qemu; at most n in all, each holding about 100 MiB; 0 for none)', parseInteger('--warm-standby'), 1)
    .option('--listen-pprof <address>', "accepted for upstream's command lines and ignored (Go's pprof)")
    .addOption(new Option('--workers <n>', 'run this many workers in this process, named NAME-1…NAME-N (load tests)').argParser(parseInteger('--workers')).default(1).hideHelp())
    .addHelpText('after', `\nThe bootstrap token comes from exactly one of --bootstrap-token-stdin, $${BOOTSTRAP_TOKEN_ENV} or --bootstrap-token.`)
    .action(
      async (
        rawURL: string,
        opts: {
          bootstrapToken?: string;
          bootstrapTokenStdin?: boolean;
          name: string;
          labels?: Record<string, string>;
          resources?: Record<string, string>;
          runtime: string;
          synthetic?: boolean;
          slots?: number;
          defaultCpu: number;
          defaultMemory: number;
          dataDir?: string;
          heartbeat: string;
          orphanGrace: string;
          logFile?: string;
          logFormat?: LogFormat;
          debug?: boolean;
          user?: string;
          pki: boolean;
          imageCacheSize?: number;
          insecureRegistry?: string[];
          registryCaFile?: string;
          warmStart: boolean;
          warmStandby: number;
          listenPprof?: string;
          workers: number;
        },
      ) => {
        if (opts.warmStandby < 0) throw new UsageError(`--warm-standby must be 0 or more, got ${opts.warmStandby}`);
        const { startWorker, createLogger } = await lazy.worker();
        const { pino } = await lazy.pino();
        const url = controllerURL(rawURL);
        for (const [flag, n] of [['--default-cpu', opts.defaultCpu], ['--default-memory', opts.defaultMemory], ['--workers', opts.workers]] as const) {
          if (n < 1) throw new UsageError(`${flag} must be at least 1, got ${n}`);
        }
        const token = decodeBootstrapToken(await bootstrapTokenFrom(opts));
        if (!opts.pki && !token.certificate) throw new UsageError('--no-pki was given, but the bootstrap token carries no certificate to trust');
        const resources: Record<string, number> = {};
        for (const [k, v] of Object.entries(opts.resources ?? {})) {
          if (!/^\d+$/.test(v)) throw new UsageError(`--resources ${k}=${v}: the amount must be a whole number`);
          resources[k] = Number(v);
        }
        if (opts.listenPprof) process.stderr.write("orchard worker: --listen-pprof is ignored (Go's pprof has no counterpart here)\n");
        // As upstream: drop privileges before anything else (the log file, the data dir, the VMs belong to the user).
        if (opts.user) {
          const { dropPrivileges } = await lazy.privdrop();
          const dropped = dropPrivileges(opts.user);
          process.stderr.write(`orchard worker: running as ${opts.user} (uid ${dropped.uid}, gid ${dropped.gid})\n`);
        }
        const dataDir = opts.dataDir ?? defaultWorkerDataDir();
        const level = opts.debug ? 'debug' : (process.env.ORCHARD_LOG_LEVEL ?? 'info');
        let logger: Logger;
        let logFile: { close(): void } | undefined;
        if (opts.logFile) {
          const { RotatingLogFile } = await lazy.logFile();
          const file = new RotatingLogFile(opts.logFile);
          logFile = file;
          logger = pino({ level }, file);
        } else logger = createLogger({ level, format: opts.logFormat });
        const runtime = opts.synthetic ? 'synthetic' : opts.runtime;
        const registries = { cacheBytes: opts.imageCacheSize, insecure: opts.insecureRegistry, ca: opts.registryCaFile ? readFileSync(opts.registryCaFile, 'utf8') : undefined };
        const running: { stop(): Promise<void> }[] = [];
        // Signals are taken from before the start: with no handler yet, SIGTERM's default would kill
        // the process at once, even right after "worker registered". One during the start stops the
        // workers started so far and ends the process (one still starting ends with it, as it would
        // have); one after it stops them all, and the command returns.
        /** Ends the command once the workers stopped; set when the start is over. */
        let stopped: (() => void) | undefined;
        const stop = (signal: NodeJS.Signals) => {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          const started = performance.now();
          const duringStart = !stopped;
          process.stderr.write(`orchard worker: ${signal}: stopping ${opts.workers === 1 ? 'the worker' : `${opts.workers} workers`}…\n`);
          const done = (err?: unknown) => {
            const ms = Math.round(performance.now() - started);
            process.stderr.write(`orchard worker: stopped in ${ms} ms${err ? `, with an error: ${(err as Error).message}` : ''}\n`);
            if (duringStart || !stopped) process.exit(0);
            stopped();
          };
          Promise.all(running.map((w) => w.stop())).then(() => done(), done);
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
        try {
          for (let i = 1; i <= opts.workers; i++) {
            const many = opts.workers > 1;
            running.push(
              await startWorker({
                url,
                token,
                name: many ? `${opts.name}-${i}` : opts.name,
                runtime,
                labels: opts.labels ?? {},
                resources,
                slots: opts.slots,
                dataDir: many ? join(dataDir, `${opts.name}-${i}`) : dataDir,
                heartbeatMs: parseDuration(opts.heartbeat),
                orphanGraceMs: parseDuration(opts.orphanGrace),
                defaultCPU: opts.defaultCpu,
                defaultMemory: opts.defaultMemory,
                logger,
                registries,
                warmStart: opts.warmStart,
                standbys: opts.warmStandby,
              }),
            );
          }
        } catch (err) {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          await Promise.all(running.map((w) => w.stop()));
          throw err;
        }
        await new Promise<void>((resolve) => (stopped = resolve));
        logFile?.close();
      },
    );

  const image = program.command('image').description("QEMU guest images: build, import, list and push those of this host (--data-dir); pull one on the cluster's workers");
  registerImagePullCommand(image);
  image
    .command('build')
    .description('build a guest image from Debian packages (debian-dev: SSH server, user admin/admin)')
    .argument('<name>', 'only debian-dev is known')
    .option('--data-dir <dir>', "the worker's data dir", defaultWorkerDataDir())
    .action(async (name: string, opts: { dataDir: string }) => {
      if (name !== 'debian-dev') throw new UsageError(`no recipe for "${name}": only debian-dev can be built; import other qcow2 disks with "orchard image import"`);
      const { buildDebianDev } = await lazy.images();
      const t0 = Date.now();
      const result = await buildDebianDev(join(opts.dataDir, 'images'), (msg) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`));
      process.stderr.write(result.cached ? `debian-dev is up to date (${result.dir})\n` : `built debian-dev in ${((Date.now() - t0) / 1000).toFixed(1)}s (${result.dir})\n`);
    });
  image
    .command('snapshot')
    .description('make (or confirm up to date) the snapshot VMs of this image warm-start from on this worker: the image booted once, its state saved')
    .argument('<name>', "an image of this worker (local, or pulled before) that starts the worker's agent or has an SSH key (debian-dev)")
    .option('--cpu <n>', 'the CPU count of the VMs that will resume it (one snapshot per CPU count and memory)', '1')
    .option('--memory <MiB>', 'their memory', '512')
    .option('--data-dir <dir>', "the worker's data dir", defaultWorkerDataDir())
    .action(async (name: string, opts: { cpu: string; memory: string; dataDir: string }) => {
      const cpu = Number(opts.cpu);
      const memory = Number(opts.memory);
      if (!Number.isInteger(cpu) || cpu < 1 || !Number.isInteger(memory) || memory < 32) throw new UsageError('--cpu takes a whole number ≥ 1, --memory a number of MiB ≥ 32');
      const [{ QemuDriver }, { ImageCache }] = await Promise.all([lazy.qemu(), lazy.ociCache()]);
      const imagesDir = join(opts.dataDir, 'images');
      // (the cache for an image pulled before, by a VM or `orchard image pull`; nothing is pulled here)
      const driver = new QemuDriver({ dataDir: opts.dataDir, imagesDir, imageCache: new ImageCache({ storeDir: imagesDir }) });
      const t0 = Date.now();
      const meta = await driver.snapshot(name, { cpu, memory }, (msg) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`));
      if (meta.unusable) throw new Error(meta.unusable);
      process.stderr.write(`snapshot of ${name}: ${meta.cpu} CPU, ${meta.memory} MiB, made ${meta.created} (${driver.snapshotDir(name, meta)})\n`);
    });
  image
    .command('import')
    .description('add a qcow2 disk as an image')
    .argument('<name>')
    .argument('<file>', 'a .qcow2 disk that boots by itself')
    .option('--data-dir <dir>', "the worker's data dir", defaultWorkerDataDir())
    .option('--replace', 'replace an image of the same name')
    .action(async (name: string, file: string, opts: { dataDir: string; replace?: boolean }) => {
      const { importImage } = await lazy.images();
      const info = await importImage(join(opts.dataDir, 'images'), name, file, { replace: opts.replace });
      process.stderr.write(`imported ${info.name} (${(info.size / 1024 / 1024).toFixed(1)} MiB)\n`);
    });
  image
    .command('push')
    .description('publish an image to a registry as a containerDisk (a qcow2 under /disk/; kernel images also /boot/), for workers to pull')
    .argument('<name>', 'a local image (or one pulled before)')
    .argument('<reference>', 'HOST[:PORT]/REPOSITORY[:TAG]')
    .option('--username <user>', 'registry user (the password comes from --password-stdin)')
    .option('--password-stdin', 'read the registry password from standard input')
    .option('--insecure', 'plain HTTP (no TLS)')
    .option('--ca-file <file>', "a CA certificate (PEM) to trust, on top of the host's")
    .option('--data-dir <dir>', "the worker's data dir", defaultWorkerDataDir())
    .action(async (name: string, reference: string, opts: { username?: string; passwordStdin?: boolean; insecure?: boolean; caFile?: string; dataDir: string }) => {
      const [{ resolveImage, ImageNotFoundError }, { ImageCache }, { pushImage }, { isImageReference }] = await Promise.all([lazy.images(), lazy.ociCache(), lazy.ociPush(), lazy.ociReference()]);
      if (!isImageReference(reference)) throw new UsageError(`"${reference}" is not a registry reference: HOST[:PORT]/REPOSITORY[:TAG]`);
      if (opts.passwordStdin && opts.username === undefined) throw new UsageError('--password-stdin needs --username');
      let password: string | undefined;
      if (opts.passwordStdin) {
        const chunks: Buffer[] = [];
        for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
        password = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
      }
      const store = join(opts.dataDir, 'images');
      let local;
      try {
        local = await resolveImage(store, name);
      } catch (err) {
        if (!(err instanceof ImageNotFoundError)) throw err;
        local = await new ImageCache({ storeDir: store }).cached(name);
        if (!local) throw err;
      }
      const result = await pushImage(local, reference, {
        username: opts.username, password, insecure: opts.insecure, ca: opts.caFile ? readFileSync(opts.caFile, 'utf8') : undefined,
      }, (line) => process.stderr.write(`${line}\n`));
      process.stdout.write(`${result.digest}\n`);
    });
  image
    .command('list')
    .description('list images: local ones and those pulled from registries, with their warm-start snapshots (one per shape of VM) and what those take on disk')
    .option('--data-dir <dir>', "the worker's data dir", defaultWorkerDataDir())
    .option('-o, --output <format>', 'table, json or yaml', parseOutput, 'table' as OutputFormat)
    .action(async (opts: { dataDir: string; output: OutputFormat }) => {
      const [{ listImages }, { ImageCache }, { listSnapshots, snapshotLinks }] = await Promise.all([lazy.images(), lazy.ociCache(), lazy.snapshots()]);
      const store = join(opts.dataDir, 'images');
      const local = await listImages(store);
      // The warm-start snapshots of each image (a snapshot per shape of VM), and what they take on disk.
      const snapshots = await listSnapshots(join(opts.dataDir, 'snapshots'));
      const cache = new ImageCache({ storeDir: store });
      cache.followers = { links: async () => snapshotLinks(snapshots), released: async () => {} };
      const pulled = await cache.list();
      type Snapshot = Omit<SnapshotListing, 'image' | 'base'>;
      const of = (name: string): { snapshots?: Snapshot[] } => {
        const mine: Snapshot[] = snapshots.filter((s) => s.image === name).map(({ image: _, base: __, ...rest }) => rest);
        return mine.length ? { snapshots: mine.sort((a, b) => a.cpu - b.cpu || a.memory - b.memory) } : {};
      };
      const rows: { name: string; kind: string; size: number; created: string; dir: string; digest?: string; lastUsed?: string; inUse?: boolean; snapshots?: Snapshot[] }[] = [
        ...local.map((i) => ({ name: i.name, kind: i.kind, size: i.size, created: i.created, dir: i.dir, ...of(i.name) })),
        ...pulled.flatMap((p) => (p.references.length ? p.references : [`${p.source} (untagged)`]).map((name) => ({
          name, kind: p.kind, size: p.size, created: p.created, dir: p.dir, digest: p.digest, lastUsed: p.lastUsed, inUse: p.inUse, ...of(name),
        }))),
      ];
      const mib = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;
      const shapes = (s: Snapshot[] = []) => s.length ? `${s.map((x) => `${x.cpu}cpu-${x.memory}mib`).join(' ')} (${mib(s.reduce((n, x) => n + x.bytes, 0))})` : '';
      await print(opts.output, rows, () => table(['NAME', 'KIND', 'SIZE', 'CREATED', 'DIGEST', 'SNAPSHOTS'], rows.map((i) => [i.name, i.kind, mib(i.size), i.created, i.digest ?? '', shapes(i.snapshots)])));
    });
}
