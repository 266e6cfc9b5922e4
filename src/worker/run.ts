// Builds a worker from its command-line options: the client (credentials and pinned certificate
// from the bootstrap token), the driver of its runtime, and the measured host resources.
import { join } from 'node:path';
import { totalmem } from 'node:os';
import { execFileSync } from 'node:child_process';
import type { Logger } from 'pino';
import { createLogger } from '../logging.ts';
import type { BootstrapToken } from '../api/bootstrap-token.ts';
import { OrchardClient } from '../client/client.ts';
import type { Driver } from './drivers/driver.ts';
import { Registries, type RegistryFlags } from './oci/registries.ts';
import { OrchardWorker } from './worker.ts';

// For `orchard worker run`, which loads this module when it runs (src/build/lazy.ts), not at start-up.
export { createLogger } from '../logging.ts';

export interface StartWorkerOptions {
  url: string;
  token: BootstrapToken;
  name: string;
  runtime: string;
  labels: Record<string, string>;
  resources?: Record<string, number>;
  slots?: number;
  dataDir: string;
  heartbeatMs?: number;
  orphanGraceMs?: number;
  /** CPUs and MiB of a VM that asks for none (upstream's --default-cpu and --default-memory). */
  defaultCPU?: number;
  defaultMemory?: number;
  logger?: Logger;
  /** Use this driver instead of making one for `runtime` (tests, dev mode). */
  driver?: Driver;
  /** Images pulled from registries (qemu runtime). */
  registries?: WorkerRegistryOptions;
  /** Resume VMs from a snapshot of their booted image (qemu runtime; default on). */
  warmStart?: boolean;
  /** Standbys kept (qemu runtime, with warm starts; default 1): VMs resumed ahead of the VMs that take them. */
  standbys?: number;
}

export interface WorkerRegistryOptions extends RegistryFlags {
  /** bytes the cache of pulled images may take (least recently used ones not in use go); none: no bound */
  cacheBytes?: number;
}

function hasCommand(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export async function makeDriver(runtime: string, dataDir: string, logger: Logger, registries: WorkerRegistryOptions = {}, warm: { warmStart?: boolean; standbys?: number } = {}): Promise<Driver> {
  switch (runtime) {
    case 'qemu': {
      if (!hasCommand('qemu-system-x86_64') || !hasCommand('qemu-img')) {
        throw new Error('the qemu runtime needs QEMU: install it with "sudo apt-get install qemu-system-x86 qemu-utils" (or run scripts/setup.sh)');
      }
      const [{ QemuDriver }, { ImageCache }] = await Promise.all([import('./drivers/qemu.ts'), import('./oci/cache.ts')]);
      const imagesDir = join(dataDir, 'images');
      const settings = new Registries(registries);
      const imageCache = new ImageCache({ storeDir: imagesDir, maxBytes: registries.cacheBytes, registries: settings.lookup, logger });
      const driver = new QemuDriver({ dataDir, imagesDir, log: logger, buildMissingDebianDev: true, imageCache, registries: settings, ...warm });
      if (driver.accel === 'tcg') logger.warn({ reason: driver.accelReason }, 'no usable hardware virtualisation: VMs run under TCG (software emulation), slower');
      return driver;
    }
    case 'tart': {
      const { TartDriver } = await import('./drivers/tart.ts');
      return new TartDriver({ stateDir: join(dataDir, 'tart'), log: logger });
    }
    case 'synthetic': {
      const { SyntheticDriver } = await import('./drivers/synthetic.ts');
      return new SyntheticDriver();
    }
    default:
      throw new Error(`unknown runtime "${runtime}": use qemu, tart or synthetic`);
  }
}

export function defaultSlots(runtime: string): number {
  if (runtime === 'tart') return 2; // macOS allows two VMs per host
  if (runtime === 'synthetic') return 1000;
  return Math.max(1, Math.min(64, Math.floor(totalmem() / 1024 / 1024 / 1024)));
}

/**
 * HTTPS connections a worker keeps to the controller (its reports and heartbeats queue on them; the
 * watch WebSocket and tunnels are apart). Each TLS connection costs the controller ≈ 80 kB, so with
 * hundreds of workers this is most of its memory (bench/load.ts: 4 → 1 took 589 → 404 MB).
 */
export const WORKER_HTTP_CONNECTIONS = 1;

export async function startWorker(opts: StartWorkerOptions): Promise<OrchardWorker> {
  const logger = opts.logger ?? createLogger();
  const driver = opts.driver ?? (await makeDriver(opts.runtime, opts.dataDir, logger, opts.registries, { warmStart: opts.warmStart, standbys: opts.standbys }));
  const client = new OrchardClient({
    url: opts.url,
    certificate: opts.token.certificate,
    serviceAccountName: opts.token.serviceAccountName,
    serviceAccountToken: opts.token.serviceAccountToken,
    maxSockets: WORKER_HTTP_CONNECTIONS,
  });
  const worker = new OrchardWorker({
    client,
    name: opts.name,
    driver,
    dataDir: opts.dataDir,
    labels: opts.labels,
    resources: opts.resources,
    slots: opts.slots ?? defaultSlots(driver.runtime),
    heartbeatMs: opts.heartbeatMs,
    orphanGraceMs: opts.orphanGraceMs,
    defaultCPU: opts.defaultCPU,
    defaultMemory: opts.defaultMemory,
    logger,
  });
  await worker.start();
  return worker;
}
