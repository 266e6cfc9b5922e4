// What a worker reports: a VM's state (with its events), a VM's events, the images it holds and its
// pulls' progress. One set of rules for both ways in: the HTTP routes and the watch WebSocket's
// report frames (docs/worker-reports-protocol.md). Only the worker a VM is assigned to, through its
// own account, reports on it; each answer comes after the change is committed.
import { eventOf, localNameOf, type EventInput, type ServiceAccount, type VM, type VMStateUpdate, type Worker, type WorkerImagesReport } from '../../api/schemas.ts';
import type { Store } from '../store/store.ts';
import type { ClusterView } from '../view.ts';
import { badRequest, conflict, HttpError, notFound } from '../errors.ts';
import { checkActsAs } from './workers.ts';
import { applyStateReport } from './vms.ts';
import { withPull } from './images.ts';

export interface ReportContext {
  store: Store;
  view: ClusterView;
}

/**
 * JSON numbers like 1e400 parse to Infinity, which the integer schemas accept (and storing it
 * turns it into null): refuse integers that are not exactly representable.
 */
export function checkSafeInteger(field: string, value: number | undefined): void {
  if (value !== undefined && !Number.isSafeInteger(value)) throw badRequest(`field "${field}" must be an integer below 2^53`);
}

/**
 * State and events of a VM come only from the worker it is assigned to, through that worker's account.
 * `asWorker`: the worker the report came from, when the way in says (its watch WebSocket); over HTTP
 * one account may speak for all the workers it registered.
 */
function checkReporter(ctx: ReportContext, vm: VM, account: ServiceAccount, asWorker: string | undefined) {
  const worker = vm.worker ? ctx.view.workers.get(vm.worker) : undefined;
  if (!worker) throw conflict(`VM "${vm.name}" is not assigned to a worker: only its worker reports its state and events`);
  checkActsAs(worker, account);
  if (asWorker !== undefined && worker.name !== asWorker) throw new HttpError(403, `VM "${vm.name}" is assigned to worker "${worker.name}": worker "${asWorker}" may not report on it`);
}

/** A worker's report of a VM's state (and events, in the same commit). */
export async function reportVMState(ctx: ReportContext, name: string, report: VMStateUpdate, account: ServiceAccount, asWorker?: string): Promise<VM> {
  const { store } = ctx;
  const { events, ...b } = report;
  checkSafeInteger('observedGeneration', b.observedGeneration);
  events?.forEach((e, i) => checkSafeInteger(`events[${i}].timestamp`, e.timestamp));
  // A report about an earlier run of the VM (a late one from the worker it left, or from before
  // an OnFailure restart) must not overwrite the current run's state.
  const checkRun = (vm: VM) => {
    if (b.localName?.startsWith('orchard-') && vm.uid && b.localName !== localNameOf(vm)) {
      throw conflict(`field "localName": ${b.localName} is an earlier run of VM "${name}" (now ${localNameOf(vm)}); report ignored`);
    }
  };
  // From the view (what is durably committed; no read and parse of the row): the transaction
  // below checks again against the VM as it is then.
  await ctx.view.loaded;
  const current = ctx.view.vms.get(name);
  if (!current) throw notFound(`VM "${name}" not found`);
  checkReporter(ctx, current, account, asWorker);
  checkRun(current);
  // The state and its events: one transaction (a report refused leaves no events either).
  return store.transaction((tx) => {
    const vm = tx.update('vms', name, (latest) => {
      if (latest.worker !== current.worker) throw conflict(`VM "${name}" moved to another worker; report ignored`);
      checkRun(latest);
      return applyStateReport(latest, b, new Date().toISOString());
    });
    if (events?.length && current.uid) tx.appendEvents(current.uid, events.map(eventOf));
    return vm;
  });
}

/** A worker's events of a VM. */
export async function appendVMEvents(ctx: ReportContext, name: string, events: EventInput[], account: ServiceAccount, asWorker?: string): Promise<void> {
  events.forEach((e, i) => checkSafeInteger(`[${i}].timestamp`, e.timestamp));
  await ctx.view.loaded;
  const vm = ctx.view.vms.get(name);
  if (!vm?.uid) throw notFound(`VM "${name}" not found`);
  checkReporter(ctx, vm, account, asWorker);
  await ctx.store.appendEvents(vm.uid, events.map(eventOf));
}

/** What the worker holds and how its pulls go: from the worker's own account only. */
export async function reportWorkerImages(ctx: ReportContext, worker: string, report: WorkerImagesReport, account: ServiceAccount): Promise<Worker> {
  const { images, pull } = report;
  const updatedAt = new Date().toISOString();
  return ctx.store.update('workers', worker, (current) => {
    checkActsAs(current, account);
    const next = { ...current };
    if (images !== undefined) next.images = [...new Set(images)];
    if (pull) next.imagePulls = withPull(current.imagePulls, { ...pull, updatedAt });
    return next;
  });
}
