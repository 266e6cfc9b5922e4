// One run of one VM on this host: prepare its disk (waiting for a missing image), boot it or adopt
// it, report it running, run its startup script, and report how it ended. The reconciler starts
// and aborts runs; a run only carries out the spec it was given.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { VM, VMStateUpdate } from '../api/schemas.ts';
import { sshCredentials, VM_DEFAULTS } from '../api/defaults.ts';
import type { Driver, DriverVM, LocalVM } from './drivers/driver.ts';
import { Outbox, type OutboxContext } from './outbox.ts';
import { runScript } from './startup-script.ts';
import { Throttle } from './throttle.ts';

/** Abort reason of a worker that stops: its VMs keep running (a restarted worker adopts them). */
export const SHUTDOWN = 'worker shutdown';
/** Abort reason of a run whose VM the controller does not know any more: the VM is kept as it is (an orphan). */
export const ORPHANED = 'orphaned';
/** Abort reason of a run whose VM gets a new spec: it is stopped, then booted again with the new one. */
export const RESPEC = 'new spec';
/** Abort reason of a run whose VM is suspended or resumed (nothing else changed): the VM stays as it is for the next run. */
export const POWER = 'suspend or resume';
/** A VM whose image this host lacks is tried again: at once when the images change, else after 5 s doubling to 5 min. */
const IMAGE_RETRY_BASE_MS = 5_000;
const IMAGE_RETRY_MAX_MS = 300_000;
/**
 * A guest that answers SSH but refuses the VM's credentials is asked again for this long, every 2 s,
 * before the startup script gives up: a cloud image's sshd is up before cloud-init has made the VM's
 * user (or allowed passwords).
 */
const SCRIPT_LOGIN_WAIT_MS = 120_000;
const SCRIPT_LOGIN_EVERY_MS = 2_000;

/** The spec fields the host acts on; a change to any other (labels, scripts...) needs no restart. */
export const hostSpecOf = (vm: VM) =>
  JSON.stringify([vm.image, vm.cpu, vm.memory, vm.diskSize, vm.nested, vm.headless, vm.netSoftnet, vm['net-softnet'], vm.netSoftnetAllow, vm.netSoftnetBlock, vm['net-bridged'], vm.hostDirs, vm.powerState]);

export interface RunContext {
  driver: Driver;
  workerName: string;
  log: Logger;
  outbox: OutboxContext;
  /** Does this host hold `image` already (as far as the worker knows)? */
  holds?(image: string): boolean;
  /** A VM's disk was made (its image may have just come to this host). */
  onPrepared?(): void;
  /** CPUs and MiB of a VM that asks for none and was assigned none. */
  defaultCPU?: number;
  defaultMemory?: number;
}

/** A run of one VM, as the reconciler keeps it. */
export interface Task {
  uid: string;
  name: string;
  localName: string;
  abort: AbortController;
  out: Outbox;
  /** The spec generation this run carries out, and the host-relevant part of that spec. */
  generation?: number;
  hostSpec: string;
  powerState: NonNullable<VM['powerState']>;
  /** Settles when the run is over (a new run of the same VM waits for it). */
  finished: Promise<void>;
}

/** Reports `state` for the generation the task carries out (re-sent by the reconciler when the controller missed it). */
export function report(task: Task, state: VMStateUpdate) {
  task.out.report(state, task.generation);
}

/**
 * Brings one VM up (or adopts it as `found` on this host, or resumes it) after `after` settles, and
 * watches it until it exits or the run is aborted. A run that follows an earlier one (`after`) looks
 * at the host again once that one is over.
 */
export function startRun(ctx: RunContext, vm: VM, localName: string, found: LocalVM | undefined, after?: Promise<void>): Task {
  let finish!: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  const abort = new AbortController();
  const task: Task = {
    uid: vm.uid!, name: vm.name, localName, abort, out: new Outbox(ctx.outbox, vm.name, localName, abort.signal), generation: vm.generation,
    hostSpec: hostSpecOf(vm), powerState: vm.powerState ?? 'running', finished,
  };
  void run(ctx, vm, task, found, after).finally(finish);
  // The finished task stays with the reconciler, so a sync does not restart a failed VM in place:
  // the controller decides (restart policy) and unassigns it, which removes it here.
  return task;
}

async function run(ctx: RunContext, vm: VM, task: Task, found: LocalVM | undefined, after?: Promise<void>) {
  const { driver, log } = ctx;
  const { localName, out } = task;
  const signal = task.abort.signal;
  const aborted = () => new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }));
  const t0 = Date.now();
  try {
    if (after) {
      await after;
      found = (await driver.list()).find((l) => l.localName === localName);
    }
    if (vm.powerState === 'suspended' && driver.suspend && driver.resume) {
      await suspend(ctx, vm, task, found);
      await aborted();
    }
    if (vm.powerState === 'stopped' || vm.powerState === 'suspended') {
      // Powered off on request: the disk stays; a powerState of running boots it again.
      // (A driver that cannot suspend stops a suspended VM too.)
      await driver.stop(localName);
      out.event('lifecycle', `stopped (powerState ${vm.powerState})`);
      report(task, { status: 'pending', status_message: `stopped (powerState ${vm.powerState})`, conditions: [{ type: 'scheduled', state: 'true' }] });
      await aborted();
    }
    // Resumed: the same guest continues (its processes, its memory); no boot, no startup script.
    const resumed = found?.suspended && driver.resume ? await driver.resume(toDriverVM(ctx, vm, localName)) : false;
    const alreadyRunning = resumed || (found?.running ?? false);
    if (resumed) {
      out.event('lifecycle', 'resumed: the VM continues where it was suspended');
    } else if (alreadyRunning) {
      log.info({ vm: vm.name }, 'adopting a running VM');
      out.event('lifecycle', `adopted by worker ${ctx.workerName} after a restart`);
    } else {
      const here = vm.image && ctx.holds?.(vm.image) ? ' (already on this worker)' : '';
      out.event('lifecycle', `scheduled on worker ${ctx.workerName}; cloning image ${vm.image}${here}`);
      report(task, { status: 'pending', status_message: `cloning image ${vm.image}`, conditions: [{ type: 'scheduled', state: 'true' }, { type: 'cloning', state: 'true' }] });
      await prepare(ctx, vm, task);
      signal.throwIfAborted();
      out.event('lifecycle', 'booting');
      report(task, { status: 'pending', status_message: 'booting', conditions: [{ type: 'scheduled', state: 'true' }] });
      await driver.start(toDriverVM(ctx, vm, localName), (msg) => out.event('lifecycle', msg));
    }
    await driver.waitReady(localName, signal, (msg) => out.event('lifecycle', msg));
    signal.throwIfAborted();
    report(task, { status: 'running', status_message: 'running', conditions: [{ type: 'scheduled', state: 'true' }, { type: 'running', state: 'true' }] });
    if (!alreadyRunning) {
      out.event('lifecycle', `running: the guest answers SSH ${((Date.now() - t0) / 1000).toFixed(1)}s after the clone started`);
      if (vm.startup_script?.script_content) await startupScript(ctx, vm, task);
    }
    const exit = await Promise.race([driver.waitExit(localName), aborted()]);
    out.event('lifecycle', `failed: the VM stopped (${exit.reason})`);
    report(task, { status: 'failed', status_message: `the VM stopped: ${exit.reason}`, conditions: [] });
  } catch (err) {
    if (signal.aborted) {
      if (signal.reason === SHUTDOWN) return; // the worker stops; the VM keeps running for the next one
      if (signal.reason === ORPHANED) return; // the controller does not know it: kept as it is
      if (signal.reason === POWER) return; // the next run suspends or resumes it
      if (signal.reason === RESPEC) {
        out.event('lifecycle', 'stopping to apply a new spec');
        await driver.stop(localName).catch((e: Error) => log.warn({ vm: vm.name, err: e.message }, 'stop failed'));
        return;
      }
      log.info({ vm: vm.name }, 'VM no longer assigned here; stopping it');
      await driver.remove(localName).catch((e: Error) => log.warn({ vm: vm.name, err: e.message }, 'remove failed'));
      return;
    }
    const message = (err as Error).message;
    log.warn({ vm: vm.name, err: message }, 'VM failed');
    out.event('lifecycle', `failed: ${message}`);
    report(task, { status: 'failed', status_message: message, conditions: [] });
    await driver.stop(localName, 5000).catch(() => {});
  }
}

/**
 * powerState suspended: a running VM is suspended (its memory and disk kept, its CPU freed; it keeps
 * its slot); one suspended already (adopted after a worker restart) stays so; one that does not run
 * has nothing to keep, and boots when started. The API's status is `pending` as for a stopped VM.
 */
async function suspend(ctx: RunContext, vm: VM, task: Task, found: LocalVM | undefined) {
  const { out } = task;
  const conditions = [{ type: 'scheduled', state: 'true' }, { type: 'running', state: 'false' }] as const;
  const suspended = () =>
    report(task, { status: 'pending', status_message: 'suspended (powerState suspended): its memory and disk are kept; powerState running resumes it', conditions: [...conditions] });
  if (found?.suspended) {
    suspended();
    return;
  }
  if (!found?.running) {
    out.event('lifecycle', 'suspended (powerState suspended): the VM was not running, so there was nothing to keep; it boots when started');
    report(task, { status: 'pending', status_message: 'suspended (powerState suspended): not running; powerState running boots it', conditions: [...conditions] });
    return;
  }
  report(task, { status: 'pending', status_message: 'suspending', conditions: [{ type: 'scheduled', state: 'true' }, { type: 'suspending', state: 'true' }] });
  const t0 = Date.now();
  await ctx.driver.suspend!(task.localName);
  out.event('lifecycle', `suspended (powerState suspended) in ${((Date.now() - t0) / 1000).toFixed(1)}s: its memory and disk are kept, it uses no CPU; powerState running resumes it`);
  suspended();
}

function toDriverVM(ctx: RunContext, vm: VM, localName: string): DriverVM {
  return {
    localName,
    name: vm.name,
    uid: vm.uid!,
    image: vm.image!,
    imagePullPolicy: vm.imagePullPolicy ?? 'IfNotPresent',
    // What the VM asks for, else what the controller assigned when it placed the VM (from this
    // worker's defaults), else this worker's defaults (a controller that assigns nothing).
    cpu: vm.cpu || vm.assignedCPU || (ctx.defaultCPU ?? VM_DEFAULTS.cpu),
    memory: vm.memory || vm.assignedMemory || (ctx.defaultMemory ?? VM_DEFAULTS.memory),
    diskSize: vm.diskSize,
    ...sshCredentials(vm),
    nested: vm.nested,
    headless: vm.headless,
    netSoftnet: vm.netSoftnet || vm['net-softnet'],
    netSoftnetAllow: vm.netSoftnetAllow,
    netSoftnetBlock: vm.netSoftnetBlock,
    netBridged: vm['net-bridged'],
    hostDirs: vm.hostDirs,
    suspendable: vm.suspendable,
  };
}

/**
 * The driver's prepare; a VM whose image this host lacks does not fail: like a Kubernetes pod in
 * ImagePullBackOff it stays pending here, its reason saying which image is missing and how to add
 * it, and is tried again as soon as the host's images change (driver.watchImages) and else with
 * back-off (5 s doubling to 5 min), until the image is there or the VM is deleted or changed.
 */
async function prepare(ctx: RunContext, vm: VM, task: Task) {
  const signal = task.abort.signal;
  // Progress (a pull's bytes and rate, a build's steps) is the VM's reason while it lasts, and an
  // event: at most one a second, the newest held back sent when the second is over, and at the end.
  const throttle = new Throttle((msg) => {
    if (signal.aborted) return;
    task.out.event('progress', msg);
    report(task, { status: 'pending', status_message: msg, conditions: [{ type: 'scheduled', state: 'true' }, { type: 'cloning', state: 'true' }] });
  }, 1000);
  let lastReason = '';
  for (let attempt = 0; ; attempt++) {
    try {
      await ctx.driver.prepare(toDriverVM(ctx, vm, task.localName), (msg) => throttle.push(msg)).finally(() => throttle.flush());
      ctx.onPrepared?.();
      if (attempt > 0) task.out.event('lifecycle', `image ${vm.image} is here now (after ${attempt + 1} attempts); cloning it`);
      return;
    } catch (err) {
      if ((err as { code?: string }).code !== 'IMAGE_NOT_FOUND' || signal.aborted) throw err;
      const delay = Math.min(IMAGE_RETRY_BASE_MS * 2 ** attempt, IMAGE_RETRY_MAX_MS);
      const reason = `image ${vm.image} not found on worker ${ctx.workerName}: ${(err as Error).message}`;
      if (reason !== lastReason) {
        lastReason = reason;
        ctx.log.warn({ vm: vm.name, image: vm.image, err: (err as Error).message }, 'VM waits for its image; retrying when the images change, else with back-off');
        task.out.event('lifecycle', `${reason} (retrying when the worker's images change, else with back-off up to ${IMAGE_RETRY_MAX_MS / 60_000} min)`);
        report(task, { status: 'pending', status_message: reason, conditions: [{ type: 'scheduled', state: 'true' }] });
      }
      await imagesChangedOr(ctx.driver, delay, signal);
    }
  }
}

/** Resolves after `ms`, or soon after the driver sees the host's images change; rejects on abort. */
function imagesChangedOr(driver: Driver, ms: number, signal: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let settle: NodeJS.Timeout | undefined;
    const done = (err?: unknown) => {
      clearTimeout(timer);
      clearTimeout(settle);
      unwatch?.();
      signal.removeEventListener('abort', onAbort);
      if (err === undefined) resolve();
      else reject(err as Error);
    };
    const onAbort = () => done(signal.reason);
    const timer = setTimeout(() => done(), ms);
    // A change comes in bursts (a build writes many files, an import renames a directory into place): try after they settle.
    const unwatch = driver.watchImages?.(() => {
      clearTimeout(settle);
      settle = setTimeout(() => done(), 500);
    });
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  });
}

async function startupScript(ctx: RunContext, vm: VM, task: Task) {
  const { out } = task;
  out.event('startup-script', 'running the startup script');
  // The script's output as upstream's workers give it: one `log_line` event per line (what upstream's
  // `orchard logs vm` shows), sent in batches every 0.5 s; a line still open goes out at the end.
  let buffered = '';
  const flush = (all = false) => {
    const end = all ? buffered.length : buffered.lastIndexOf('\n') + 1;
    if (end === 0) return;
    const text = buffered.slice(0, end);
    buffered = buffered.slice(end);
    const now = Math.floor(Date.now() / 1000);
    const lines = text.replace(/\r?\n$/, '').split(/\r?\n/);
    out.events(lines.map((payload) => ({ kind: 'log_line', timestamp: now, payload })));
  };
  const timer = setInterval(flush, 500);
  const signal = task.abort.signal;
  const run = async () =>
    runScript({
      sock: await ctx.driver.dial(task.localName, 22),
      ...sshCredentials(vm),
      script: vm.startup_script!.script_content,
      env: vm.startup_script!.env,
      onOutput: (_stream, data) => (buffered += data.toString('utf8')),
      signal,
    });
  try {
    let result;
    const deadline = Date.now() + SCRIPT_LOGIN_WAIT_MS;
    for (let attempt = 1; !result; attempt++) {
      try {
        result = await run();
      } catch (err) {
        const refused = (err as { level?: string }).level === 'client-authentication';
        if (!refused || Date.now() + SCRIPT_LOGIN_EVERY_MS > deadline) throw err;
        if (attempt === 1) {
          out.event('startup-script', `the guest refuses the VM's credentials for now (cloud-init may still be making the user); trying again for up to ${SCRIPT_LOGIN_WAIT_MS / 1000} s`);
        }
        await sleep(SCRIPT_LOGIN_EVERY_MS, undefined, { signal });
      }
    }
    clearInterval(timer);
    flush(true);
    out.event('startup-script', result.signal ? `startup script killed by signal ${result.signal}` : `startup script exited with code ${result.exitCode}`);
  } catch (err) {
    clearInterval(timer);
    flush(true);
    out.event('startup-script', `startup script could not run: ${(err as Error).message}`);
  }
}
