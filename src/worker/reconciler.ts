// Converges the VMs on this host to the controller's records for this worker: starts what is
// assigned and missing, adopts what already runs, restarts what got a new spec, and settles what is
// not assigned here any more (removed, or kept as an orphan when the controller does not know it).
import type { Orphan, VM } from '../api/schemas.ts';
import { localNameOf } from '../api/schemas.ts';
import type { OrchardClient } from '../client/client.ts';
import type { LocalVM } from './drivers/driver.ts';
import { hostSpecOf, ORPHANED, POWER, report, RESPEC, SHUTDOWN, startRun, type RunContext, type Task } from './vm-run.ts';

export interface ReconcilerOptions {
  client: OrchardClient;
  run: RunContext;
  /** Does the controller sort a worker's unassigned VMs into removable ones and orphans (capability "orphans")? */
  orphansCapable(): boolean;
  /** How long an orphan is kept before it is removed (default 24 h). */
  orphanGraceMs?: number;
}

export class Reconciler {
  private readonly tasks = new Map<string, Task>();
  private syncing = false;
  private syncAgain = false;
  /** The watch (re)connected: the next sync re-reports every VM whose state the controller does not have. */
  private resync = false;
  /** The VMs of the latest sync push, for the next sync (instead of listing them). */
  private pushed?: VM[];
  /** Did the last report leave orphans (then an empty report clears them on the controller)? */
  private hadOrphans = false;
  private graceTimer?: NodeJS.Timeout;

  private readonly o: ReconcilerOptions;

  constructor(o: ReconcilerOptions) {
    this.o = o;
  }

  private get stopped() {
    return this.o.run.outbox.stopped.aborted;
  }

  private get log() {
    return this.o.run.log;
  }

  /** The watch (re)connected: the next sync reports again what the controller may have missed. */
  reconnected() {
    this.resync = true;
  }

  /** The worker stops: runs end, their VMs keep running for the next worker process to adopt. */
  stop() {
    clearTimeout(this.graceTimer);
    for (const t of this.tasks.values()) t.abort.abort(SHUTDOWN);
  }

  /** The local name of the VM with this uid that runs here, for dial-backs. */
  localNameOfUID(uid: string): string {
    for (const t of this.tasks.values()) if (t.uid === uid && !t.abort.signal.aborted) return t.localName;
    throw new Error(`no VM with uid ${uid} runs on worker ${this.o.run.workerName}`);
  }

  /**
   * The controller asks for a sync (syncVMsAction), with the worker's VMs as committed (our
   * controller sends them; an upstream one does not, and the sync lists them).
   */
  syncPushed(vms: VM[] | undefined) {
    this.pushed = vms;
    this.requestSync();
  }

  /** Syncs never overlap; requests during a sync cause one more. */
  requestSync() {
    if (this.syncing) {
      this.syncAgain = true;
      return;
    }
    this.syncing = true;
    void (async () => {
      try {
        do {
          this.syncAgain = false;
          await this.sync();
        } while (this.syncAgain && !this.stopped);
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'sync failed; retrying');
        setTimeout(() => this.requestSync(), 2000);
      } finally {
        this.syncing = false;
      }
    })();
  }

  private start(vm: VM, localName: string, found: LocalVM | undefined, after?: Promise<void>) {
    this.tasks.set(localName, startRun(this.o.run, vm, localName, found, after));
  }

  /** Converge: start what is assigned and missing, adopt what already runs, remove what is not ours any more. */
  private async sync() {
    if (this.stopped) return;
    const pushed = this.pushed;
    this.pushed = undefined;
    const resync = this.resync;
    this.resync = false;
    const desired = pushed ?? (await this.o.client.listVMs(this.o.run.workerName));
    const local = await this.o.run.driver.list();
    const localByName = new Map(local.map((l) => [l.localName, l]));
    const wanted = new Set<string>();
    for (const vm of desired) {
      if (!vm.uid) continue;
      const localName = localNameOf(vm);
      wanted.add(localName);
      const task = this.tasks.get(localName);
      if (task && task.generation !== vm.generation && vm.status !== 'failed') {
        if (task.hostSpec !== hostSpecOf(vm)) {
          // Suspended or resumed, nothing else changed: the next run does it to the VM as it is.
          // Any other new spec the host must carry out (cpu, memory, disk, stopped...): stop, boot again.
          const to = vm.powerState ?? 'running';
          const power = to !== task.powerState && [to, task.powerState].includes('suspended') && [to, task.powerState].includes('running') &&
            hostSpecOf({ ...vm, powerState: task.powerState }) === task.hostSpec;
          task.abort.abort(power ? POWER : RESPEC);
          this.tasks.delete(localName);
          this.start(vm, localName, undefined, task.finished);
        } else {
          task.generation = vm.generation; // nothing to do here: acknowledge the generation
          if (task.out.reported) report(task, task.out.reported);
        }
        continue;
      }
      if (task) {
        const { reported, acked, busy } = task.out;
        // A report lost while the controller was away: the controller still thinks the VM is
        // pending, but it has moved on here. (A failed VM is the controller's call, not re-asserted.)
        // (A push made before the report was committed also shows it pending: only an unacknowledged report is sent again.)
        if (vm.status === 'pending' && reported && reported.status !== 'pending' && !acked && !busy) report(task, reported);
        // After a reconnect, the whole state: whatever the controller shows that differs from what was
        // reported (it lost it: restored, restarted) is reported again.
        else if (resync && vm.status !== 'failed' && reported && !busy && !task.abort.signal.aborted && (vm.status !== reported.status || vm.status_message !== reported.status_message)) {
          report(task, reported);
        }
        continue;
      }
      if (vm.status === 'failed') continue;
      const existing = localByName.get(localName);
      this.start(vm, localName, existing);
    }
    const desiredUIDs = new Set(desired.map((vm) => vm.uid));
    await this.settleUnassigned(
      local.filter((l) => !wanted.has(l.localName)),
      [...this.tasks.values()].filter((t) => !wanted.has(t.localName)),
      desiredUIDs,
    );
  }

  /**
   * What runs here but is not assigned here. An earlier run of a VM assigned here (same uid) is
   * removed at once. Of the rest, our controller says which it knows to have gone (deleted, moved):
   * those are stopped and removed (no leaks). The others it does not know at all (it lost or swapped
   * its data): they are kept as orphans, never destroyed for that, until an admin adopts or deletes
   * them or the orphan grace period ends. (An upstream controller cannot tell the two apart: then
   * everything unassigned is removed, as upstream workers do.)
   */
  private async settleUnassigned(local: LocalVM[], tasks: Task[], assignedUIDs: Set<string | undefined>) {
    const { client, run } = this.o;
    const entries = new Map<string, Orphan>();
    for (const t of tasks) entries.set(t.localName, { localName: t.localName, uid: t.uid, name: t.name });
    for (const l of local) entries.set(l.localName, { localName: l.localName, uid: l.uid, running: l.running, image: l.image, cpu: l.cpu, memory: l.memory });
    if (entries.size === 0 && !this.hadOrphans) return;
    let remove: Set<string>;
    let orphans: Orphan[] = [];
    if (this.o.orphansCapable()) {
      const earlierRuns = [...entries.values()].filter((e) => e.uid && assignedUIDs.has(e.uid)).map((e) => e.localName);
      const ask = [...entries.values()].filter((e) => !earlierRuns.includes(e.localName));
      const answer = ask.length || this.hadOrphans ? await client.reportUnassigned(run.workerName, ask) : { remove: [], orphans: [] };
      remove = new Set([...earlierRuns, ...answer.remove]);
      orphans = answer.orphans;
      this.hadOrphans = orphans.length > 0;
      const grace = this.o.orphanGraceMs ?? 24 * 3600_000;
      let next = Infinity;
      for (const o of orphans) {
        const left = Date.parse(o.since ?? '') + grace - Date.now();
        if (left <= 0) {
          this.log.warn({ vm: o.localName, since: o.since }, 'removing an orphan: its grace period is over');
          remove.add(o.localName);
        } else next = Math.min(next, left);
      }
      // Look again when the next orphan's grace period ends.
      clearTimeout(this.graceTimer);
      if (next < Infinity) this.graceTimer = setTimeout(() => this.requestSync(), Math.min(next + 100, 2 ** 31 - 1));
    } else remove = new Set(entries.keys());
    for (const t of tasks) {
      this.tasks.delete(t.localName);
      t.abort.abort(remove.has(t.localName) ? undefined : ORPHANED);
    }
    for (const l of local) {
      // (A live run removes its VM itself when aborted; a finished one does not: remove is idempotent.)
      if (remove.has(l.localName)) {
        this.log.info({ vm: l.localName }, 'removing a VM the controller no longer assigns here');
        await run.driver.remove(l.localName).catch((err: Error) => this.log.warn({ vm: l.localName, err: err.message }, 'remove failed'));
      }
    }
    for (const o of orphans) if (!remove.has(o.localName)) this.log.warn({ vm: o.localName, since: o.since }, 'keeping a VM the controller does not know (an orphan: orchard list orphans)');
  }
}
