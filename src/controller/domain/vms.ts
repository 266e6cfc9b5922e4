// VM rules: what a new VM is, and what of a VM each account may read.
//
// What of a VM each account may read: its password only to accounts that may connect to it
// (compute:write or compute:connect), its startup script's environment values only to compute:write
// (they may hold credentials). Workers act with compute:write and get everything.
import { randomUUID } from 'node:crypto';
import { VM_SPEC_KEYS, type ServiceAccount, type VM, type VMStateUpdate } from '../../api/schemas.ts';
import { badRequest } from '../errors.ts';
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

/** A new VM from a client's body: server-owned fields are replaced, defaults applied. */
export function newVM(body: VM): VM {
  if (!body.image) throw badRequest('field "image" is required');
  const spec: Partial<VM> = {};
  for (const k of VM_SPEC_KEYS) if (body[k] !== undefined) (spec as Record<string, unknown>)[k] = body[k];
  return {
    name: body.name,
    uid: randomUUID(),
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
    powerState: 'running',
    ...spec,
    status: 'pending',
    status_message: 'waiting to be scheduled',
    restart_count: 0,
    conditions: [],
  };
}

/**
 * A VM after its worker's state report: the state fields it carries (the others stay). `started_at`
 * is the controller's: set when the VM starts running (upstream's workers send a zero time).
 */
export function applyStateReport(vm: VM, report: Omit<VMStateUpdate, 'events'>, now: string): VM {
  const next: VM = { ...vm };
  if (report.status) next.status = report.status;
  if (report.status_message !== undefined) next.status_message = report.status_message;
  if (report.observedGeneration !== undefined) next.observedGeneration = report.observedGeneration;
  if (report.conditions !== undefined) next.conditions = report.conditions;
  if (report.localName !== undefined) next.localName = report.localName;
  if (report.tartName !== undefined) next.tartName = report.tartName;
  if (report.image_fqn !== undefined) next.image_fqn = report.image_fqn;
  if (report.status === 'running' && vm.status !== 'running') next.started_at = now;
  return JSON.stringify(next) === JSON.stringify(vm) ? vm : next;
}
