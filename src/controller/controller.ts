// `orchard controller run`: the TLS identity, the embedded store, the first admin, the HTTP API.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { createLogger, type LogFormat } from '../logging.ts';
import { ROLES } from '../api/schemas.ts';
import { SQLiteStore } from './store/sqlite.ts';
import type { Store } from './store/store.ts';
import { buildApp, normalizeAPIPrefix, type Activity } from './app.ts';
import { loadTLS, sessionResumption } from './tls.ts';
import type { BackoffOptions } from './auth-backoff.ts';
import { randomUUID } from 'node:crypto';
import { checkBeforeOpen, checkIdentity, checkSchemaVersion, writeClusterFile } from './store/integrity.ts';
import { SCHEMA_VERSION } from './store/schema.ts';
import { VERSION } from '../api/version.ts';
import type { SSHJumpServer } from './connect/ssh-jump.ts';
import { limitsOf, type Limits } from './limits.ts';
import { giveBackMemoryWhenQuiet } from './memory.ts';

export interface ControllerOptions {
  dataDir: string;
  /** host:port; port 0 picks a free one. */
  listen: string;
  certFile?: string;
  keyFile?: string;
  insecureNoTLS?: boolean;
  workerOfflineTimeoutMs?: number;
  bootstrapAdminToken?: string;
  logger?: Logger;
  /** Backoff base of OnFailure restarts (default 1 s, doubling up to 5 min). */
  restartBackoffMs?: number;
  /** host:port of the SSH jump host (`ssh -J ACCOUNT@HOST:PORT USER@VM`); none when unset. Port 0 picks a free one. */
  listenSSH?: string;
  /** Back-off on failed authentication (default DEFAULT_BACKOFF); false turns it off. */
  authBackoff?: BackoffOptions | false;
  /** Start even on a database that fails the start-up checks (store/integrity.ts). */
  acceptDamagedDatabase?: boolean;
  /** What one client may make the controller hold (defaults: DEFAULT_LIMITS). */
  limits?: Partial<Limits>;
  /** Serve the API under this path (upstream's --api-prefix); `url` then ends with it. */
  apiPrefix?: string;
  /** The SSH jump host's key from this file instead of the data dir (upstream's --ssh-host-key). */
  sshHostKeyFile?: string;
  /** How often WebSockets are pinged (upstream's --experimental-ping-interval). */
  pingIntervalMs?: number;
}

export interface RunningController {
  url: string;
  /** The cluster's identity, kept with its data. */
  clusterID: string;
  port: number;
  /** PEM of the certificate served (undefined without TLS). */
  certificate?: string;
  fingerprint?: string;
  /** The SSH jump host, when `listenSSH` was given: its bound port and its host key. */
  ssh?: { port: number; fingerprint: string; publicKey: string };
  store: Store;
  logger: Logger;
  /** What it has open now (to say what stopping it closes). */
  activity(): Activity;
  close(): Promise<void>;
}

export const DEFAULT_PORT = 6120;

export function parseListen(listen: string, flag = '--listen'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(listen);
  if (!m) throw new Error(`${flag} must be HOST:PORT or :PORT, got "${listen}"`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`${flag}: port ${port} is out of range`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

/** The log on standard output: lines for people on a terminal, JSON lines otherwise (or as `format` says). */
export function defaultLogger(level = process.env.ORCHARD_LOG_LEVEL ?? 'info', format?: LogFormat): Logger {
  return createLogger({ level, format });
}

function logMigration(logger: Logger, m: SQLiteStore['migration']) {
  if (m.from === 0 && !m.unmarked) logger.info({ schemaVersion: m.to }, `created orchard.db with schema version ${m.to}`);
  else if (m.from !== m.to) logger.info({ from: m.from, to: m.to }, `migrated orchard.db from schema version ${m.from} to ${m.to}`);
  else if (m.unmarked) logger.info({ schemaVersion: m.to }, `marked orchard.db (written before schema versions were recorded) as schema version ${m.to}`);
}

export async function startController(opts: ControllerOptions): Promise<RunningController> {
  const logger = opts.logger ?? defaultLogger();
  const { host, port } = parseListen(opts.listen);
  const apiPrefix = normalizeAPIPrefix(opts.apiPrefix);
  logger.debug(
    { dataDir: opts.dataDir, listen: opts.listen, apiPrefix, tls: !opts.insecureNoTLS, workerOfflineTimeoutMs: opts.workerOfflineTimeoutMs, listenSSH: opts.listenSSH, pingIntervalMs: opts.pingIntervalMs },
    'starting the controller',
  );
  const sshListen = opts.listenSSH === undefined ? undefined : parseListen(opts.listenSSH, '--listen-ssh');
  // First of all: a data dir of a newer release is left exactly as it is.
  checkSchemaVersion(opts.dataDir);
  mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  let tls: Awaited<ReturnType<typeof loadTLS>> | undefined;
  if (opts.insecureNoTLS) {
    logger.warn('TLS IS DISABLED (--insecure-no-tls): service account tokens and all traffic cross the network in clear text');
  } else {
    tls = await loadTLS({ dataDir: opts.dataDir, certFile: opts.certFile, keyFile: opts.keyFile });
    logger.info({ fingerprint: tls.fingerprint, generated: tls.generated }, tls.generated ? 'created a self-signed certificate' : 'loaded the certificate');
  }
  if (!opts.acceptDamagedDatabase) checkBeforeOpen(opts.dataDir);
  const limits = limitsOf(opts.limits);
  const store = new SQLiteStore(join(opts.dataDir, 'orchard.db'), limits);
  logMigration(logger, store.migration);
  let clusterID: string | undefined;
  // A clean close checkpoints everything into orchard.db and removes the WAL: cluster.json says so.
  const closeStore = () => {
    store.close();
    if (clusterID) writeClusterFile(opts.dataDir, { clusterID, cleanStop: true, schemaVersion: SCHEMA_VERSION, release: VERSION });
  };
  try {
    const init = (id: string) => store.initClusterID(id);
    if (opts.acceptDamagedDatabase) {
      clusterID = store.clusterID() ?? randomUUID();
      if (!store.clusterID()) init(clusterID);
      logger.warn({ clusterID }, 'started with --accept-damaged-database: the database is used as it is');
    } else clusterID = checkIdentity(opts.dataDir, store.clusterID(), store.quickCheck(), init);
    writeClusterFile(opts.dataDir, { clusterID, cleanStop: false, schemaVersion: SCHEMA_VERSION, release: VERSION });
    if (opts.bootstrapAdminToken) {
      const existing = await store.get('serviceAccounts', 'bootstrap-admin');
      await store.put('serviceAccounts', {
        name: 'bootstrap-admin',
        token: opts.bootstrapAdminToken,
        roles: [...ROLES],
        createdAt: existing?.createdAt ?? new Date().toISOString(),
      });
      logger.info('service account "bootstrap-admin" has every role and the token from ORCHARD_BOOTSTRAP_ADMIN_TOKEN');
    }
    const { app, ctx, close, activity } = await buildApp({
      store,
      logger,
      workerOfflineTimeoutMs: opts.workerOfflineTimeoutMs ?? 3 * 60_000,
      https: tls ? { cert: tls.cert, key: tls.key, ...sessionResumption(tls.key) } : undefined,
      restartBackoffMs: opts.restartBackoffMs,
      authBackoff: opts.authBackoff,
      clusterID,
      limits,
      apiPrefix,
      pingIntervalMs: opts.pingIntervalMs,
    });
    let ssh: SSHJumpServer | undefined;
    try {
      // A deep accept queue: after a restart a thousand workers reconnect within a few seconds, and
      // a SYN dropped from a full queue (Node's default is 511) costs its worker a 1 s retransmit.
      await app.listen({ host, port, backlog: 4096 });
      // ssh2 only for a controller with a jump host.
      if (sshListen) ssh = await (await import('./connect/ssh-jump.ts')).startSSHJump({ ...sshListen, dataDir: opts.dataDir, hostKeyFile: opts.sshHostKeyFile, access: ctx.access, tunnels: ctx.tunnels, logger, tunnelsPerAccount: limits.tunnelsPerAccount });
    } catch (err) {
      await close();
      throw err;
    }
    const address = app.server.address();
    const boundPort = typeof address === 'object' && address ? address.port : port;
    const urlHost = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;
    const url = `${tls ? 'https' : 'http'}://${urlHost}:${boundPort}${apiPrefix}`;
    logger.info({ url }, 'controller is listening');
    const stopMemoryCheck = giveBackMemoryWhenQuiet();
    return {
      url,
      clusterID,
      port: boundPort,
      certificate: tls?.cert,
      fingerprint: tls?.fingerprint,
      ssh: ssh && { port: ssh.port, fingerprint: ssh.hostKey.fingerprint, publicKey: ssh.hostKey.publicKey },
      store,
      logger,
      activity,
      close: async () => {
        // The jump host first: its connections ride on the tunnels the app closes.
        stopMemoryCheck();
        await ssh?.close();
        await close();
        closeStore();
      },
    };
  } catch (err) {
    closeStore();
    throw err;
  }
}
