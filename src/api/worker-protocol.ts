// What the controller sends a worker down its watch WebSocket (`/v1/rpc/watch`), one JSON object per
// frame, as upstream's v2 protocol has them; binary frames (upstream's workers read only those).
// Ours adds `vms` to `syncVMsAction` (the worker's VMs as committed; capability-free: upstream's
// workers ignore unknown fields and list the VMs themselves).
import type { VM } from './schemas.ts';

/** The worker's VMs changed: sync them (with ours: here they are). */
export interface SyncVMsAction {
  vms?: VM[];
}

/** Dial `port` of the VM `vmUID` (or, with vmUID empty, of the worker host) and dial back with `session`. */
export interface PortForwardAction {
  session: string;
  vmUID: string;
  port: number;
}

/** Find the IP of the VM `vmUID` and answer it with `session`. */
export interface ResolveIPAction {
  session: string;
  vmUID: string;
}

export type WorkerInstruction = { syncVMsAction: SyncVMsAction } | { portForwardAction: PortForwardAction } | { resolveIPAction: ResolveIPAction };

/** A sync frame around the VMs' JSON as the controller keeps it made (no parse and stringify per send). */
export const syncVMsFrame = (vmsJSON: string) => `{"syncVMsAction":{"vms":${vmsJSON}}}`;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * A frame as a worker reads it: the instruction, or undefined for what it does not understand (not
 * JSON, another shape, a future instruction), which a worker ignores rather than trusting.
 */
export function parseInstruction(frame: string): WorkerInstruction | undefined {
  let msg: unknown;
  try {
    msg = JSON.parse(frame);
  } catch {
    return undefined;
  }
  if (!isObject(msg)) return undefined;
  if ('syncVMsAction' in msg) {
    const sync = msg.syncVMsAction;
    // Upstream's controller may send an empty (or null) action: a sync without the VMs.
    const vms = isObject(sync) && Array.isArray(sync.vms) ? (sync.vms as VM[]) : undefined;
    return { syncVMsAction: { vms } };
  }
  const p = msg.portForwardAction;
  if (isObject(p) && typeof p.session === 'string' && Number.isInteger(p.port)) {
    return { portForwardAction: { session: p.session, vmUID: typeof p.vmUID === 'string' ? p.vmUID : '', port: p.port as number } };
  }
  const r = msg.resolveIPAction;
  if (isObject(r) && typeof r.session === 'string' && typeof r.vmUID === 'string') return { resolveIPAction: { session: r.session, vmUID: r.vmUID } };
  return undefined;
}
