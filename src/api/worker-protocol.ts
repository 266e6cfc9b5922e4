// What the controller sends a worker down its watch WebSocket (`/v1/rpc/watch`), one JSON object per
// frame, as upstream's v2 protocol has them; binary frames (upstream's workers read only those).
// Ours adds `vms` to `syncVMsAction` (the worker's VMs as committed; capability-free: upstream's
// workers ignore unknown fields and list the VMs themselves), and two instructions of its own, sent
// only to a worker whose record lists them in `capabilities` (upstream's workers list none).
import type { Event, VM, VMStateUpdate, WorkerImagesReport } from './schemas.ts';

/** The instructions of ours a worker may declare it understands (in its record's `capabilities`). */
export const REGISTRIES_ACTION = 'registriesAction';
export const PULL_IMAGE_ACTION = 'pullImageAction';
/** The worker keeps ready tunnel connections on /v1/rpc/port-forward-pool (docs/tunnel-pool-protocol.md). */
export const PORT_FORWARD_POOL = 'portForwardPool';
/** The worker keeps a tunnel mux connection on /v1/rpc/port-forward-mux (docs/tunnel-mux-protocol.md). */
export const PORT_FORWARD_MUX = 'portForwardMux';
/**
 * The controller's capability: a worker's tunnel mux may ride its watch WebSocket (the worker opens the
 * watch with `mux=1`; docs/tunnel-mux-protocol.md, "On the watch"), so the worker holds one connection.
 */
export const WATCH_MUX = 'watch-mux';
/** The watch's upgrade answer carries this header (value "1") when the mux rides it. */
export const WATCH_MUX_HEADER = 'x-orchard-watch-mux';

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

/** Credentials of one registry, in clear: only ever sent down a worker's watch. */
export interface RegistryCredentials {
  host: string;
  username?: string;
  password?: string;
  /** Plain HTTP. */
  insecure?: boolean;
  /** PEM certificate(s) the registry's certificate must chain to. */
  ca?: string;
}

/** The registry credentials, all of them (it replaces what the worker had): on connect and on every change. */
export interface RegistriesAction {
  registries: RegistryCredentials[];
}

/** Pull `image` now (orchard image pull); report progress with POST /v1/workers/{name}/images. */
export interface PullImageAction {
  image: string;
}

/** What every worker understands (upstream's too). */
export type BaseInstruction = { syncVMsAction: SyncVMsAction } | { portForwardAction: PortForwardAction } | { resolveIPAction: ResolveIPAction };
export type WorkerInstruction = BaseInstruction | { registriesAction: RegistriesAction } | { pullImageAction: PullImageAction };

/** A sync frame around the VMs' JSON as the controller keeps it made (no parse and stringify per send). */
export const syncVMsFrame = (vmsJSON: string) => `{"syncVMsAction":{"vms":${vmsJSON}}}`;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * A frame as a worker reads it: the instruction, or undefined for what it does not understand (not
 * JSON, another shape, a future instruction), which a worker ignores rather than trusting.
 */
export function parseInstruction(frame: string): BaseInstruction | undefined {
  return parseInstructionWith(frame, []) as BaseInstruction | undefined;
}

/**
 * As parseInstruction, for a worker that declared `capabilities` in its record: of our own
 * instructions it gets those it declared (any other is undefined, as a future one).
 */
export function parseInstructionWith(frame: string, capabilities: readonly string[]): WorkerInstruction | undefined {
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
  const g = msg.registriesAction;
  if (isObject(g) && Array.isArray(g.registries) && capabilities.includes(REGISTRIES_ACTION)) {
    const registries = g.registries.map(parseRegistry);
    // One malformed entry makes the whole list suspect: ignored rather than half-applied.
    if (registries.every((x) => x !== undefined)) return { registriesAction: { registries } };
    return undefined;
  }
  const pull = msg.pullImageAction;
  if (isObject(pull) && typeof pull.image === 'string' && pull.image !== '' && capabilities.includes(PULL_IMAGE_ACTION)) return { pullImageAction: { image: pull.image } };
  return undefined;
}

const optional = (v: unknown, type: 'string' | 'boolean') => v === undefined || typeof v === type;

function parseRegistry(r: unknown): RegistryCredentials | undefined {
  if (!isObject(r) || typeof r.host !== 'string' || r.host === '') return undefined;
  if (!optional(r.username, 'string') || !optional(r.password, 'string') || !optional(r.insecure, 'boolean') || !optional(r.ca, 'string')) return undefined;
  const out: RegistryCredentials = { host: r.host };
  if (r.username !== undefined) out.username = r.username as string;
  if (r.password !== undefined) out.password = r.password as string;
  if (r.insecure !== undefined) out.insecure = r.insecure as boolean;
  if (r.ca !== undefined) out.ca = r.ca as string;
  return out;
}

// Reports from the worker up the same WebSocket (docs/worker-reports-protocol.md): a controller that
// lists WATCH_REPORTS in its capabilities takes them; each gets a `reportAck` once committed (or
// refused, with the status and message its HTTP route would answer). Upstream's workers send none,
// so they never see an acknowledgement.

/** The controller's capability: worker reports over /v1/rpc/watch. */
export const WATCH_REPORTS = 'watch-reports';
/** Reports one watch connection may have unacknowledged; past it the controller answers 429. */
export const MAX_REPORTS_IN_FLIGHT = 64;
/**
 * The largest report frame a worker sends (UTF-8 bytes). The controller takes frames up to its
 * `controlFrameBytes` limit (1 MiB by default); a larger report goes by HTTP instead.
 */
export const MAX_REPORT_FRAME_BYTES = 512 * 1024;

/** What a worker reports: one of them per frame, with an id of its choosing. */
export type WorkerReport =
  | { vmState: { vm: string; state: VMStateUpdate } }
  | { vmEvents: { vm: string; events: Event[] } }
  | { workerImages: WorkerImagesReport };
export type WorkerReportFrame = { id: number } & WorkerReport;

/** The controller's answer to report `id`: status 200 when committed, else the HTTP route's status and message. */
export interface ReportAck {
  /** null answers a frame whose id could not be read. */
  id: number | null;
  status: number;
  message?: string;
}

export const reportAckFrame = (ack: ReportAck) => JSON.stringify({ reportAck: ack });

/** A frame as our worker reads it: an acknowledgement, or undefined for anything else (an instruction). */
export function parseReportAck(frame: string): ReportAck | undefined {
  // Instructions are far more frequent: only a frame that starts like an acknowledgement is parsed here.
  if (!frame.startsWith('{"reportAck"')) return undefined;
  let msg: unknown;
  try {
    msg = JSON.parse(frame);
  } catch {
    return undefined;
  }
  const a = isObject(msg) ? msg.reportAck : undefined;
  if (!isObject(a) || (a.id !== null && !Number.isSafeInteger(a.id)) || !Number.isInteger(a.status)) return undefined;
  const ack: ReportAck = { id: a.id as number | null, status: a.status as number };
  if (typeof a.message === 'string') ack.message = a.message;
  return ack;
}

/**
 * The first frame of a watch opened with `hello=1` (by our worker, against a controller with
 * WATCH_REPORTS): the controller's cluster id, which the worker would otherwise ask for with an HTTPS
 * request on every reconnect, and the window over which its workers should spread their reconnects
 * when the watch drops (the controller restarts): wider the more workers it has.
 */
export interface ControllerHello {
  clusterID: string;
  reconnectWindowMs?: number;
}

export const controllerHelloFrame = (hello: ControllerHello) => JSON.stringify({ controllerHello: hello });

/** A hello frame, or undefined for any other frame. */
export function parseControllerHello(frame: string): ControllerHello | undefined {
  if (!frame.startsWith('{"controllerHello"')) return undefined;
  try {
    const h = (JSON.parse(frame) as { controllerHello?: { clusterID?: unknown; reconnectWindowMs?: unknown } }).controllerHello;
    if (typeof h?.clusterID !== 'string') return undefined;
    const w = h.reconnectWindowMs;
    // Bounded here too: a wrong value must not keep a worker away for long, nor make it hammer.
    return { clusterID: h.clusterID, reconnectWindowMs: typeof w === 'number' && Number.isFinite(w) ? Math.min(Math.max(w, 100), 10_000) : undefined };
  } catch {
    return undefined;
  }
}
