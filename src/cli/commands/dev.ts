// orchard dev: a whole cluster (controller + workers) in one process, secure by default (TLS and a
// generated admin token) with nothing to set up: the `dev` context gets the credentials and the
// pinned certificate. Ctrl-C stops every VM and exits; the next run finds the records again.
import { Option, type Command } from 'commander';
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { configPath, loadConfig, saveConfig } from '../../client/config.ts';
import { collectKeyValue, parseInteger, UsageError } from '../common.ts';
import type { Driver } from '../../worker/drivers/driver.ts';
import type { OrchardWorker } from '../../worker/worker.ts';
import * as lazy from '../../build/lazy.ts';

export function registerDevCommand(program: Command) {
  program
    .command('dev')
    .description('run a development cluster on this machine: a controller and workers, with real VMs')
    .option('-d, --data-dir <dir>', 'where everything is kept between runs', '.dev-data')
    .option('-l, --listen <address>', 'controller address', '127.0.0.1:6120')
    .option('--workers <n>', 'number of workers', parseInteger('--workers'), 1)
    .option('--synthetic', 'in-memory VMs (for load tests) instead of real ones')
    .option('--api-prefix <path>', 'serve the API under this path (as controller run --api-prefix)')
    .option('--resources <name=amount[,...]>', 'extra resources the workers advertise (repeatable)', collectKeyValue)
    .option('--listen-pprof <address>', "accepted for upstream's command lines and ignored (Go's pprof)")
    .addOption(new Option('--experimental-rpc-v2', 'deprecated, as upstream: v2 is always on').hideHelp())
    .action(async (opts: { dataDir: string; listen: string; workers: number; synthetic?: boolean; apiPrefix?: string; resources?: Record<string, string> }) => {
      const resources: Record<string, number> = {};
      for (const [k, v] of Object.entries(opts.resources ?? {})) {
        if (!/^\d+$/.test(v)) throw new UsageError(`--resources ${k}=${v}: the amount must be a whole number`);
        resources[k] = Number(v);
      }
      const { startController, defaultLogger } = await lazy.controller();
      const { startWorker, makeDriver } = await lazy.worker();
      const { newToken } = await lazy.accounts();
      const dataDir = resolve(opts.dataDir);
      const logger = defaultLogger(process.env.ORCHARD_LOG_LEVEL ?? 'error');
      // Our output may have no reader any more (a closed pipe or terminal): that must not stop the stop.
      let outputGone = false;
      const say = (msg: string) => {
        if (!outputGone && !process.stderr.destroyed) process.stderr.write(`orchard dev: ${msg}\n`, () => {});
      };
      const runtime = opts.synthetic ? 'synthetic' : process.platform === 'darwin' ? 'tart' : 'qemu';
      if (opts.workers < 1 || opts.workers > 64) throw new Error('--workers must be between 1 and 64');

      mkdirSync(dataDir, { recursive: true, mode: 0o700 });
      // Check the runtime before anything listens, so a missing prerequisite is one clear message.
      const drivers: Driver[] = [];
      for (let i = 1; i <= opts.workers; i++) {
        const dir = join(dataDir, `worker-${i}`);
        mkdirSync(dir, { recursive: true });
        if (runtime === 'qemu' && !existsSync(join(dir, 'images'))) {
          mkdirSync(join(dataDir, 'images'), { recursive: true });
          symlinkSync('../images', join(dir, 'images'));
        }
        drivers.push(await makeDriver(runtime, dir, logger));
      }
      if (runtime === 'qemu') {
        const { buildDebianDev } = await lazy.images();
        const t0 = Date.now();
        const built = await buildDebianDev(join(dataDir, 'images'), (msg) => say(`[image debian-dev ${((Date.now() - t0) / 1000).toFixed(0)}s] ${msg}`));
        if (!built.cached) say(`built the debian-dev image in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
        const accel = (drivers[0] as { accel?: string; accelReason?: string }).accel;
        if (accel === 'tcg') say(`warning: no usable hardware virtualisation (${(drivers[0] as { accelReason?: string }).accelReason}); VMs run under TCG, slower`);
      }

      const tokenFile = join(dataDir, 'admin-token');
      if (!existsSync(tokenFile)) writeFileSync(tokenFile, newToken() + '\n', { mode: 0o600 });
      const adminToken = readFileSync(tokenFile, 'utf8').trim();
      let ctl;
      try {
        ctl = await startController({ dataDir: join(dataDir, 'controller'), listen: opts.listen, bootstrapAdminToken: adminToken, logger, apiPrefix: opts.apiPrefix });
      } catch (err) {
        if ((err as { code?: string }).code === 'EADDRINUSE') {
          throw new Error(`${opts.listen} is in use (another "orchard dev" or controller?): stop it, or pick another address with --listen 127.0.0.1:PORT`, { cause: err });
        }
        throw err;
      }
      const config = await loadConfig();
      config.contexts.dev = { url: ctl.url, certificate: ctl.certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: adminToken };
      config['default-context'] = 'dev';
      await saveConfig(config);

      const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: adminToken, certificate: ctl.certificate };
      const workers: OrchardWorker[] = [];
      for (let i = 1; i <= opts.workers; i++) {
        workers.push(
          await startWorker({ url: ctl.url, token, name: `dev-worker-${i}`, runtime, labels: {}, resources, dataDir: join(dataDir, `worker-${i}`), driver: drivers[i - 1], logger }),
        );
      }
      say(`controller ${ctl.url} (certificate SHA-256 ${ctl.fingerprint})`);
      say(`${opts.workers} ${runtime} worker${opts.workers > 1 ? 's' : ''}; data in ${dataDir}`);
      say('context "dev" is the default now. Try, in another terminal:');
      const image = runtime === 'tart' ? 'ghcr.io/cirruslabs/macos-sequoia-base:latest' : 'debian-dev';
      process.stderr.write(
        [
          `    orchard create vm demo --image ${image}${runtime === 'qemu' ? ' --cpu 1 --memory 512' : ''}`,
          '    orchard list vms',
          '    orchard logs vm demo',
          '    orchard delete vm demo',
          `  web console: ${ctl.url}/ (sign in as bootstrap-admin with the token of context "dev" in ${configPath()})`,
          '  more workers: orchard worker run URL --bootstrap-token "$(orchard get bootstrap-token bootstrap-admin)"',
          '  Ctrl-C stops everything.\n',
        ].join('\n'),
      );

      // Every way of stopping leaves no VM behind (QEMU runs in its own process group, so nothing
      // else stops it): Ctrl-C, SIGTERM, the terminal closing (SIGHUP), our output's reader going
      // away (EPIPE: `orchard dev | tee log` stopped with Ctrl-C), or a crash. A second signal while
      // stopping does not cut the stop short.
      await new Promise<void>((done) => {
        let stopping: Promise<void> | undefined;
        const stop = (why: string, code = 0) => {
          if (stopping) return void say(`still stopping (${why})`);
          process.exitCode = code;
          say(`stopping (${why}): VMs, workers, controller`);
          stopping = (async () => {
            for (const w of workers) await w.stop().catch(() => {});
            // No VM outlives `orchard dev`; their disks stay, and the next run boots them again.
            await Promise.all(drivers.map(async (d) => Promise.all((await d.list().catch(() => [])).map((vm) => d.stop(vm.localName, 10_000).catch(() => {})))));
            await ctl.close().catch(() => {});
            done();
          })();
        };
        for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, () => stop(signal));
        const lostOutput = (err: Error & { code?: string }) => {
          // Nothing more is written (each write would fail again), and the stop goes on.
          if (outputGone) return;
          outputGone = true;
          if (!stopping) stop(`output: ${err.code ?? err.message}`);
        };
        for (const stream of [process.stdout, process.stderr]) stream.on('error', lostOutput);
        process.on('uncaughtException', (err: Error & { code?: string }) => {
          if (err.code === 'EPIPE' || err.code === 'EIO') return lostOutput(err);
          say(`error: ${err.stack ?? err.message}`);
          stop('error', 1);
        });
      });
    });
}
