// VM rules: what a new VM is, and what of a VM each account may read.
//
// What of a VM each account may read: its password only to accounts that may connect to it
// (compute:write or compute:connect), its startup script's environment values only to compute:write
// (they may hold credentials). Workers act with compute:write and get everything.
import { randomUUID } from 'node:crypto';
import { localNameOf, VM_SPEC_KEYS, type ServiceAccount, type VM, type VMStateUpdate } from '../../api/schemas.ts';
import { badRequest, conflict } from '../errors.ts';
import { VM_DEFAULTS } from '../../api/defaults.ts';

export type VMSecrets = 'all' | 'password' | 'none';

export const REDACTED = '<redacted>';

export function secretsFor(account: ServiceAccount | undefined): VMSecrets {
  if (account?.roles.includes('compute:write')) return 'all';
  if (account?.roles.includes('compute:connect')) return 'password';
  return 'none';
}

/** The VM as `secrets` allows it to be read (the same object when nothing is hidden). */
export function redactVM(vm: VM, secrets: VMSecrets): VM {
  if (secrets === 'all') return vm;
  const env = vm.startup_script?.env;
  const hidePassword = secrets === 'none' && vm.password !== undefined;
  if (!hidePassword && !(env && Object.keys(env).length)) return vm;
  const out: VM = { ...vm };
  if (hidePassword) delete out.password;
  if (env && vm.startup_script) out.startup_script = { ...vm.startup_script, env: Object.fromEntries(Object.keys(env).map((k) => [k, REDACTED])) };
  return out;
}

/** Does the VM use Softnet (upstream turns it on when allow or block lists are given)? */
const softnet = (vm: VM) => !!(vm.netSoftnet || vm['net-softnet'] || vm.netSoftnetAllow?.length || vm.netSoftnetBlock?.length);

/**
 * Fields a runtime cannot carry out, refused as upstream refuses them for its Linux runtime (vetu:
 * no Softnet, no host directories, no suspending). Our qemu workers suspend (vCPUs paused, memory kept).
 */
export function checkRuntimeFields(vm: VM): void {
  const unsupported = (field: string) => badRequest(`field "${field}": runtime "${vm.runtime}" does not support it`);
  if (vm.runtime === 'vetu') {
    if (vm.netSoftnet || vm['net-softnet']) throw unsupported('netSoftnet');
    if (vm.netSoftnetAllow?.length) throw unsupported('netSoftnetAllow');
    if (vm.netSoftnetBlock?.length) throw unsupported('netSoftnetBlock');
    if (vm.hostDirs?.length) throw unsupported('hostDirs');
  }
  if (vm.runtime === 'vetu' && vm.suspendable) throw unsupported('suspendable');
}

/**
 * Spec changes (PUT /v1/vms/{name}) as upstream allows them, answered 409 (upstream: 412) because
 * they conflict with the VM's current state:
 * - a failed VM's spec does not change (a terminal state: its restart policy or a delete is next);
 * - a suspendable VM stays suspendable, and its Softnet setting stays as it is;
 * - only a VM that is suspendable already may be suspended;
 * - a stopped or suspended VM changes only by being started again (`powerState: running`, other
 *   changes may come with it). Upstream refuses any change then: starting it again is our addition.
 */
export function checkSpecChange(current: VM, next: VM): void {
  if (current.status === 'failed') {
    throw conflict(`VM "${current.name}" has failed (a terminal state): its spec cannot change; delete it${current.restart_policy === 'OnFailure' ? ', or wait for its restart' : ''}`);
  }
  if (current.suspendable && !next.suspendable) throw conflict('field "suspendable": cannot be turned off for a suspendable VM');
  if (current.suspendable && softnet(current) !== softnet(next)) throw conflict('field "netSoftnet": cannot be changed for a suspendable VM');
  const from = current.powerState ?? 'running';
  const to = next.powerState ?? 'running';
  if (to === 'suspended' && from !== 'suspended' && !current.suspendable) {
    throw conflict('field "powerState": only suspendable VMs can be suspended (create it with suspendable: true)');
  }
  if (from !== 'running' && to !== 'running') {
    throw conflict(`field "powerState": VM "${current.name}" is ${from}: it can only be started again (powerState: running)`);
  }
}

/** A new VM from a client's body: server-owned fields are replaced, defaults applied. */
export function newVM(body: VM): VM {
  if (!body.image) throw badRequest('field "image" is required');
  checkRuntimeFields(body);
  const spec: Partial<VM> = {};
  // null (a script sent as null) is left out, as Go's clients leave out what they do not set.
  for (const k of VM_SPEC_KEYS) if (body[k] !== undefined && body[k] !== null) (spec as Record<string, unknown>)[k] = body[k];
  const uid = randomUUID();
  // The VM's name on its worker, known from the start as upstream's (localName, and its deprecated tartName).
  const localName = localNameOf({ name: body.name, uid, restart_count: 0 });
  return {
    name: body.name,
    uid,
    createdAt: new Date().toISOString(),
    generation: 0,
    os: 'darwin',
    arch: 'arm64',
    imagePullPolicy: 'IfNotPresent',
    // cpu and memory stay unset unless given: the scheduler assigns the worker's defaults
    // (assignedCPU, assignedMemory), as upstream's.
    username: VM_DEFAULTS.username,
    password: VM_DEFAULTS.password,
    restart_policy: 'Never',
    resources: {},
    labels: {},
    ...spec,
    // Every VM starts running, as upstream's (it ignores a powerState sent at creation).
    powerState: 'running',
    status: 'pending',
    status_message: 'waiting to be scheduled',
    restart_count: 0,
    conditions: [],
    localName,
    tartName: localName,
  };
}

/**
 * A VM after its worker's state report: the state fields it carries (the others stay). `started_at`
 * is the controller's: set when the VM starts running (upstream's workers send a zero time).
 */
export function applyStateReport(vm: VM, report: Omit<VMStateUpdate, 'events'>, now: string): VM {
  const next: VM = { ...vm };
  // Unchanged (a repeated report): the same object, so nothing is written.
  let changed = false;
  const set = <K extends 'status' | 'status_message' | 'observedGeneration' | 'localName' | 'tartName' | 'image_fqn' | 'started_at'>(k: K, v: VM[K]) => {
    if (vm[k] !== v) changed = true;
    next[k] = v;
  };
  if (report.status) set('status', report.status);
  if (report.status_message !== undefined) set('status_message', report.status_message);
  if (report.observedGeneration !== undefined) set('observedGeneration', report.observedGeneration);
  if (report.conditions !== undefined) {
    if (JSON.stringify(report.conditions) !== JSON.stringify(vm.conditions)) changed = true;
    next.conditions = report.conditions;
  }
  if (report.localName !== undefined) set('localName', report.localName);
  if (report.tartName !== undefined) set('tartName', report.tartName);
  if (report.image_fqn !== undefined) set('image_fqn', report.image_fqn);
  if (report.status === 'running' && vm.status !== 'running') set('started_at', now);
  return changed ? next : vm;
}
