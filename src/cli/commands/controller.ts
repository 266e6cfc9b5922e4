// orchard controller run | backup | restore
import { Option, type Command } from 'commander';
import { UsageError } from '../common.ts';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parseDuration } from '../output.ts';
import { ROLES } from '../../api/enums.ts';
import { loadConfig, saveConfig } from '../../client/config.ts';
import type { RunningController } from '../../controller/controller.ts';
import * as lazy from '../../build/lazy.ts';
import type { Activity } from '../../controller/app.ts';
import type { LogFormat } from '../../logging.ts';

/**
 * As upstream's: a fresh controller started without ORCHARD_BOOTSTRAP_ADMIN_TOKEN makes the
 * "bootstrap-admin" account with a random token and prints it once; while that account exists, the
 * "bootstrap-context" context on this host holds its credentials (the default if there is none).
 */
async function bootstrapAdmin(ctl: RunningController, fromEnvironment: boolean) {
  let created: string | undefined;
  if (!fromEnvironment && (await ctl.store.list('serviceAccounts')).length === 0) {
    const { newToken } = await lazy.accounts();
    created = newToken();
    await ctl.store.create('serviceAccounts', { name: 'bootstrap-admin', token: created, roles: [...ROLES], createdAt: new Date().toISOString() });
  }
  const admin = await ctl.store.get('serviceAccounts', 'bootstrap-admin');
  if (admin?.token) {
    const config = await loadConfig();
    config.contexts['bootstrap-context'] = { url: ctl.url, certificate: ctl.certificate, serviceAccountName: admin.name, serviceAccountToken: admin.token };
    config['default-context'] ??= 'bootstrap-context';
    await saveConfig(config);
  }
  // Said once the context is saved: whoever reads the token can use the context at once.
  if (created) {
    process.stderr.write(
      'orchard controller: no service accounts found: created "bootstrap-admin" with every role and a random token:\n' +
        `  service account name: bootstrap-admin\n  service account token: ${created}\n` +
        (ctl.fingerprint ? `  certificate SHA-256 fingerprint: ${ctl.fingerprint}\n` : ''),
    );
  }
}

export function registerControllerCommands(program: Command) {
  // --data-dir also before `run`, as upstream's (a flag of `orchard controller`): orchard controller --data-dir DIR run
  // Positional: a --data-dir after the subcommand is the subcommand's (each has its own), one before it is this one's.
  const controller = program
    .command('controller')
    .description('run the controller')
    .enablePositionalOptions()
    .option('--data-dir <dir>', `where the database, certificate and key live (default ${defaultDataDir()})`);
  controller
    .command('run')
    .description('run the controller: the API, the embedded database and the scheduler')
    .option('--data-dir <dir>', `where the database, certificate and key live (default ${defaultDataDir()})`)
    .option('-l, --listen <address>', 'address to listen on (HOST:PORT or :PORT; default :$PORT, else :6120, as upstream)', `:${process.env.PORT || 6120}`)
    .option('--api-prefix <path>', 'serve the whole API under this path (e.g. /orchard), for a controller behind a proxy shared with other services; contexts then use https://HOST:PORT/orchard')
    .option('--debug', 'debug log level (same as ORCHARD_LOG_LEVEL=debug): every request, too')
    .addOption(new Option('--log-format <format>', 'the log on standard output: text (lines for people) or json (JSON lines); default: text on a terminal, json otherwise').choices(['text', 'json']))
    .option('--ssh-host-key <file>', "the SSH jump host's private key from this file instead of the one made in the data dir")
    .option('--exec-session-exit-ttl <duration>', 'how long a reconnectable exec session with nobody attached (its command exited or not) keeps its history', '10m')
    .option('--experimental-ping-interval <duration>', 'how often WebSockets to workers and clients are pinged (at least 5s; default 20s), for proxies with shorter idle timeouts')
    .option('--experimental-disable-db-compression', "accepted for upstream's command lines; nothing to do (the SQLite store does not compress)")
    .option('--listen-pprof <address>', "accepted for upstream's command lines and ignored (Go's pprof; see GET /metrics)")
    .option('--insecure-ssh-no-client-auth', 'refused: the SSH jump host always authenticates the service account')
    .option('--no-experimental-rpc-v2', 'refused: only the v2 worker protocol is served')
    .addOption(new Option('--experimental-rpc-v2', 'deprecated, as upstream: v2 is always on').hideHelp())
    .addOption(new Option('--synthetic', "upstream's hidden flag (it changes nothing there either)").hideHelp())
    .option('--controller-cert <file>', 'use this TLS certificate (PEM) instead of the self-signed one')
    .option('--controller-key <file>', 'the key of --controller-cert (PEM)')
    .option('--insecure-no-tls', 'serve plain HTTP (tokens cross the network in clear text!)')
    .option('--worker-offline-timeout <duration>', 'a worker not seen for this long is offline', '3m')
    .option('--accept-damaged-database', 'start even when the database fails its start-up checks (damaged or missing WAL, emptied or swapped orchard.db): VMs it does not know stay on their workers as orphans')
    .option('--listen-ssh <address>', 'also run an SSH jump host to the VMs on this address (HOST:PORT or :PORT): ssh -J ACCOUNT@HOST:PORT USER@VM, password = the account\'s token')
    .addHelpText('after', '\nEnvironment:\n  ORCHARD_BOOTSTRAP_ADMIN_TOKEN  create (or update) the service account "bootstrap-admin" with every role and this token')
    .action(async (opts: {
      dataDir?: string;
      listen: string;
      controllerCert?: string;
      controllerKey?: string;
      insecureNoTls?: boolean;
      workerOfflineTimeout: string;
      listenSsh?: string;
      acceptDamagedDatabase?: boolean;
      apiPrefix?: string;
      debug?: boolean;
      logFormat?: LogFormat;
      sshHostKey?: string;
      execSessionExitTtl: string;
      experimentalPingInterval?: string;
      experimentalDisableDbCompression?: boolean;
      listenPprof?: string;
      insecureSshNoClientAuth?: boolean;
      experimentalRpcV2: boolean;
    }) => {
      opts.dataDir ??= (controller.opts() as { dataDir?: string }).dataDir ?? defaultDataDir();
      if (opts.insecureSshNoClientAuth) throw new UsageError('--insecure-ssh-no-client-auth is not supported: the SSH jump host always authenticates (user = service account, password = its token)');
      // Commander's --no-experimental-rpc-v2 sets experimentalRpcV2 to false; the hidden --experimental-rpc-v2 leaves it true.
      if (opts.experimentalRpcV2 === false) throw new UsageError('--no-experimental-rpc-v2 is not supported: the controller serves only the v2 worker protocol (the gRPC v1 one is not served)');
      if (opts.sshHostKey && !opts.listenSsh) throw new UsageError('--ssh-host-key is for the SSH jump host: add --listen-ssh');
      const pingIntervalMs = opts.experimentalPingInterval === undefined ? undefined : parseDuration(opts.experimentalPingInterval);
      if (pingIntervalMs !== undefined && pingIntervalMs < 5000) throw new UsageError("--experimental-ping-interval's value cannot be less than 5 seconds");
      const execTTL = parseDuration(opts.execSessionExitTtl);
      if (opts.listenPprof) process.stderr.write('orchard controller: --listen-pprof is ignored (Go\'s pprof has no counterpart here; GET /metrics has the metrics)\n');
      if (opts.debug) process.env.ORCHARD_LOG_LEVEL = 'debug';
      // Loaded on demand: the other commands need none of the server's modules.
      const { startController, defaultLogger } = await lazy.controller();
      // One handler from before the start to the end: with none yet, SIGTERM's default would kill the
      // process at once (after "listening on", say, while the bootstrap admin is written); and one
      // removed before the next is added loses a signal that arrived but was not yet dispatched.
      // A signal during the start stops the controller once the start is over; a second one kills it.
      let signalled: NodeJS.Signals | undefined;
      let shutDown: ((signal: NodeJS.Signals) => void) | undefined;
      const onSignal = (signal: NodeJS.Signals) => {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        signalled = signal;
        // Requests in flight get a few seconds (see app.ts); should anything still hang, exit anyway before systemd's kill.
        setTimeout(() => {
          process.stderr.write('orchard controller: the shutdown did not finish in 10 s; exiting anyway\n');
          process.exit(1);
        }, 10_000).unref();
        if (shutDown) shutDown(signal);
        else process.stderr.write(`orchard controller: ${signal} during the start: stopping once it is over…\n`);
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      let ctl;
      try {
        ctl = await startController({
          dataDir: opts.dataDir,
          listen: opts.listen,
          certFile: opts.controllerCert,
          keyFile: opts.controllerKey,
          insecureNoTLS: opts.insecureNoTls,
          workerOfflineTimeoutMs: parseDuration(opts.workerOfflineTimeout),
          bootstrapAdminToken: process.env.ORCHARD_BOOTSTRAP_ADMIN_TOKEN || undefined,
          listenSSH: opts.listenSsh,
          acceptDamagedDatabase: opts.acceptDamagedDatabase,
          apiPrefix: opts.apiPrefix,
          sshHostKeyFile: opts.sshHostKey,
          pingIntervalMs,
          limits: { execRetentionMs: execTTL },
          logger: defaultLogger(undefined, opts.logFormat),
        });
      } catch (err) {
        const e = err as Error & { code?: string };
        if (e.code === 'EADDRINUSE') throw new Error(`cannot listen on ${opts.listen}: the port is in use (another controller?); choose another with --listen`, { cause: e });
        if (e.code === 'EACCES') throw new Error(`cannot listen on ${opts.listen}: permission denied; use a port above 1023`, { cause: e });
        throw e;
      }
      if (ctl.fingerprint) process.stderr.write(`orchard controller: listening on ${ctl.url}, certificate SHA-256 ${ctl.fingerprint}\n`);
      await bootstrapAdmin(ctl, !!process.env.ORCHARD_BOOTSTRAP_ADMIN_TOKEN);
      if (ctl.ssh) {
        const address = opts.listenSsh!.replace(/\d+$/, String(ctl.ssh.port));
        process.stderr.write(`orchard controller: SSH jump host on ${address}, host key ${ctl.ssh.fingerprint} (ssh -J ACCOUNT@HOST:${ctl.ssh.port} USER@VM)\n`);
      }
      await new Promise<void>((resolve) => {
        shutDown = (signal: NodeJS.Signals) => {
          const started = performance.now();
          const a = ctl.activity();
          ctl.logger.debug({ signal, ...a }, 'shutting down');
          process.stderr.write(`orchard controller: ${signal}: stopping: ${stoppingText(a)}\n`);
          const done = (err?: unknown) => {
            const ms = Math.round(performance.now() - started);
            if (err) process.stderr.write(`orchard controller: stopped in ${ms} ms, with an error: ${(err as Error).message}\n`);
            else process.stderr.write(`orchard controller: stopped in ${ms} ms (the database closed cleanly)\n`);
            resolve();
          };
          ctl.close().then(() => done(), done);
        };
        if (signalled) shutDown(signalled);
      });
    });
  registerBackupCommands(controller);
}

const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** "closing 5 connections (2 workers), finishing 1 request in flight (up to 3 s), closing the database…" */
function stoppingText(a: Activity): string {
  const parts = [`closing ${plural(a.connections, 'connection')}${a.workersConnected ? ` (${plural(a.workersConnected, 'worker')} among them)` : ''}`];
  if (a.requestsInFlight) parts.unshift(`finishing ${plural(a.requestsInFlight, 'request')} in flight (up to 3 s)`);
  parts.push('closing the database…');
  return parts.join(', ');
}

/** As `controller run`'s --data-dir default. */
const defaultDataDir = () => join(homedir(), '.orchard', 'controller');

function registerBackupCommands(controller: Command) {
  controller
    .command('backup')
    .description("copy a controller's state into FILE while it serves (SQLite online backup): the database, its TLS certificate and key, its SSH host key")
    .argument('<file>', 'the backup file to write (replaced atomically; mode 0600: it holds every token and key)')
    .option('--data-dir <dir>', "the controller's data dir", defaultDataDir())
    .action(async (file: string, opts: { dataDir: string }) => {
      const { backupDataDir } = await lazy.backup();
      const b = await backupDataDir(opts.dataDir, file);
      process.stderr.write(
        `orchard controller backup: cluster ${b.clusterID} (schema version ${b.schemaVersion}) written to ${b.file}: ${b.bytes} bytes, ` +
          `with ${b.files.length ? b.files.join(', ') : 'no certificate or key files'}; ${Math.round(b.totalMs)} ms, the copy itself ${Math.round(b.copyMs)} ms\n`,
      );
    });
  controller
    .command('restore')
    .description('make a data dir the state of a backup (from orchard controller backup); start the controller on it afterwards')
    .argument('<file>', 'the backup file')
    .option('--data-dir <dir>', "the controller's data dir to restore into", defaultDataDir())
    .option('--force', "replace the data dir's current controller files (they are moved to a before-restore-… folder in it, not deleted)")
    .action(async (file: string, opts: { dataDir: string; force?: boolean }) => {
      const { restoreDataDir } = await lazy.backup();
      const r = restoreDataDir(file, opts.dataDir, { force: opts.force });
      process.stderr.write(
        `orchard controller restore: ${r.dataDir} now holds cluster ${r.clusterID} as backed up at ${r.created} (schema version ${r.schemaVersion}` +
          `${r.files.length ? `; ${r.files.join(', ')}` : ''})${r.movedAside ? `; its previous files are in ${r.movedAside}` : ''}. Start the controller with --data-dir ${r.dataDir}\n`,
      );
    });
}
