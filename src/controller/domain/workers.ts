// Worker rules: registration, updates, and who may act as a worker. A worker belongs to the service
// account that registered it: only that account may register it again, heartbeat for it, hold its
// watch, answer its dial-backs and report the state of its VMs. Operators (any compute:write account)
// may pause, resume and delete it. Upstream workers use one account throughout, so they keep working.
import { parseLocalName, type Orphan, type ServiceAccount, type VM, type Worker } from '../../api/schemas.ts';
import { conflict, HttpError } from '../errors.ts';

/** Why `account` may not act as `worker`, or undefined when it may. A worker registered before accounts were bound (no `serviceAccount`) is claimed by the first one that acts as it. */
export function notWorkerReason(worker: Worker, account: ServiceAccount): string | undefined {
  if (worker.serviceAccount === undefined || worker.serviceAccount === account.name) return undefined;
  return `worker "${worker.name}" belongs to service account "${worker.serviceAccount}": service account "${account.name}" may not act as it`;
}

export function checkActsAs(worker: Worker, account: ServiceAccount): void {
  const why = notWorkerReason(worker, account);
  if (why) throw new HttpError(403, why);
}

/** The record a registration (POST /v1/workers) stores, given what is stored now. */
export function registration(body: Worker, existing: Worker | undefined, account: ServiceAccount, now: string): Worker {
  if (existing) {
    const why = notWorkerReason(existing, account);
    if (why) throw new HttpError(403, `${why} (delete the worker first to register it under another account)`);
    if (existing.machine_id && body.machine_id && existing.machine_id !== body.machine_id) {
      throw conflict(`worker "${body.name}" is already registered by another machine (machine_id ${existing.machine_id})`);
    }
  }
  return {
    ...body,
    resources: body.resources ?? {},
    labels: body.labels ?? {},
    // Pausing is the operator's decision: a re-registering worker does not undo it.
    scheduling_paused: existing?.scheduling_paused ?? body.scheduling_paused ?? false,
    createdAt: existing?.createdAt ?? now,
    last_seen: now,
    serviceAccount: account.name,
    orphans: existing?.orphans,
    version: undefined, // upstream's resource version: not kept
  };
}

/**
 * PUT /v1/workers/{name}: the worker's own account updates its record (a heartbeat: a sign of
 * life); any other account may only pause or resume it (other fields it sends are ignored, as
 * upstream's CLI sends the whole record back). A whole record (with `resources`) replaces
 * `scheduling_paused` as upstream's PUT does — Go leaves a false one out, so that is how upstream's
 * `orchard resume worker` resumes; a partial body (our worker's heartbeat) leaves it as it is.
 */
export function update(current: Worker, body: Worker, account: ServiceAccount, now: string): Worker {
  const own = notWorkerReason(current, account) === undefined;
  const paused = body.scheduling_paused ?? (body.resources !== undefined ? false : current.scheduling_paused);
  if (!own) return paused === current.scheduling_paused ? current : { ...current, scheduling_paused: paused };
  if (body.machine_id && current.machine_id && body.machine_id !== current.machine_id) {
    throw conflict(`worker "${current.name}" belongs to another machine (machine_id ${current.machine_id})`);
  }
  const next: Worker = { ...current };
  for (const [k, v] of Object.entries(body)) if (v !== undefined && k !== 'createdAt' && k !== 'serviceAccount' && k !== 'orphans' && k !== 'version') (next as Record<string, unknown>)[k] = v;
  // An operator's pause/resume through its own worker account is not a sign of life either.
  const fromOperator = Object.keys(body).every((k) => k === 'name' || k === 'scheduling_paused' || k === 'last_seen');
  next.scheduling_paused = paused;
  next.last_seen = fromOperator ? current.last_seen : now;
  if (!fromOperator) next.serviceAccount = account.name;
  return next;
}

/** The uid of a VM a worker reports: as reported, or from its local name. */
export const uidOf = (o: Orphan) => o.uid ?? parseLocalName(o.localName)?.uid;

/**
 * Sorts the VMs a worker runs that are not assigned to it: those it may remove (the controller knows
 * the VM went elsewhere, was deleted, or is a newer run of it) and the rest, the orphans, which it
 * keeps. An orphan keeps the time it was first reported.
 */
export function sortUnassigned(
  reported: Orphan[],
  known: (name: string) => VM | undefined,
  released: Set<string>,
  current: Orphan[] = [],
  now: string,
): { remove: string[]; orphans: Orphan[] } {
  const remove: string[] = [];
  const orphans: Orphan[] = [];
  const since = new Map(current.map((o) => [o.localName, o.since]));
  for (const r of reported) {
    const uid = uidOf(r);
    const name = r.name ?? parseLocalName(r.localName)?.name;
    if (uid && (released.has(uid) || (name !== undefined && known(name)?.uid === uid))) remove.push(r.localName);
    else orphans.push({ ...r, uid, name, since: since.get(r.localName) ?? now });
  }
  return { remove, orphans };
}
