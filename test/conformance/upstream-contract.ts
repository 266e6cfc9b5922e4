// What upstream Orchard 0.55 promises its HTTP API clients, written down by us as plain JSON Schemas
// (draft-07, as Ajv reads them) and a table of operations.
//
// Source of the facts: github.com/cirruslabs/orchard at tag 0.55.0 (commit 3083b541), its OpenAPI
// description api/openapi.yaml. Only facts are restated here: which operations exist (method and
// path, without the /v1 prefix), which status codes it lists for each, and the shape of each body
// (field names, JSON types, enums, defaults, required fields, read-only and deprecated fields). None
// of upstream's text (summaries, descriptions, examples) is reproduced; the comments are ours.
//
// Where that description says one thing and upstream's own controller and client do another, the
// schema below still says what the description says, and the difference is written down next to it
// (see `Events` and `EVENTS_AS_UPSTREAM_SERVES_THEM`): clients depend on what the code does.
//
// Facts of the description worth knowing before reading the schemas:
// - No object declares `required` fields, except the exec WebSocket frames, and none is closed
//   (no `additionalProperties: false`): an answer may carry fields the description does not name.
// - Nothing is declared `nullable`: a `null` where a field is declared is a mismatch.
// - Numbers declared `number` (cpu, memory, generation, ...) accept fractions; `integer` ones do not.
// - It has no operation for what only workers call (POST /workers, PUT /workers/{name},
//   PUT /vms/{name}/state, POST /vms/{name}/events): answers to those can only be checked against
//   the component schemas (`Worker`, `VM`, ...).

/** A JSON Schema, as a plain object. */
export type Schema = { readonly [keyword: string]: unknown };

const str = (more: Schema = {}): Schema => ({ type: 'string', ...more });
const bool = (byDefault?: boolean): Schema => (byDefault === undefined ? { type: 'boolean' } : { type: 'boolean', default: byDefault });
const num = (byDefault?: number): Schema => (byDefault === undefined ? { type: 'number' } : { type: 'number', default: byDefault });
const int = (more: Schema = {}): Schema => ({ type: 'integer', ...more });
/** A string that is one of `values`; `values[0]` is the default when `defaulted`. */
const choice = (values: readonly string[], defaulted: boolean): Schema =>
  defaulted ? { type: 'string', enum: [...values], default: values[0] } : { type: 'string', enum: [...values] };
const listOf = (items: Schema, more: Schema = {}): Schema => ({ type: 'array', items, ...more });
/** An object whose keys are free and whose values are all `value`. */
const mapOf = (value: Schema): Schema => ({ type: 'object', additionalProperties: value });
/** An open object: the named fields are typed, none is required unless listed. */
const obj = (properties: Record<string, Schema>, required: readonly string[] = []): Schema =>
  required.length ? { type: 'object', properties, required: [...required] } : { type: 'object', properties };

// ---- Workers, service accounts, the controller, the cluster ----------------------------------------

/** A worker as listed: only its name and the resources it offers (name → integer amount) are declared. */
const Worker = obj({ name: str(), resources: mapOf(int()) });

/** Roles are plain strings here (the description enumerates none). */
const ServiceAccount = obj({ name: str(), token: str(), roles: listOf(str()) });

const ControllerInfo = obj({ version: str(), commit: str(), capabilities: listOf(str()) });

const ClusterSettings = obj({
  hostDirPolicies: listOf(obj({ pathPrefix: str(), ro: bool() }), { default: [] }),
  // The first value is the default (the busiest worker that fits first).
  schedulerProfile: choice(['optimize-utilization', 'distribute-load'], true),
});

// ---- VMs ------------------------------------------------------------------------------------------

/** What names a VM; `generation` is the controller's to bump. */
const VMMeta = obj({ name: str(), generation: { ...num(), readOnly: true } });

/** What a VM's owner asks for. Defaults are the description's, for fields a request leaves out. */
const VMSpec = obj({
  os: choice(['darwin', 'linux'], true),
  arch: choice(['arm64', 'amd64'], true),
  runtime: choice(['tart', 'vetu'], true),
  image: str(),
  imagePullPolicy: choice(['IfNotPresent', 'Always'], true),
  cpu: num(4),
  memory: num(8192),
  diskSize: num(),
  'net-softnet': { ...bool(false), deprecated: true },
  netSoftnet: bool(false),
  netSoftnetAllow: listOf(str()),
  netSoftnetBlock: listOf(str()),
  suspendable: bool(false),
  'net-bridged': str(),
  headless: bool(false),
  nested: bool(false),
  username: str({ default: 'admin' }),
  password: str({ default: 'admin' }),
  startup_script: obj({ script_content: str(), env: mapOf(str()) }),
  restart_policy: choice(['Never', 'OnFailure'], true),
  resources: mapOf(int()),
  labels: mapOf(str()),
  hostDirs: listOf(obj({ name: str(), path: str(), ro: bool() })),
  powerState: choice(['running', 'stopped', 'suspended'], true),
  localName: { ...str(), readOnly: true },
  tartName: { ...str(), readOnly: true, deprecated: true },
});

/** What the controller and the worker report. `status` has three values in the description. */
const VMState = obj({
  status: choice(['pending', 'running', 'failed'], false),
  status_message: str(),
  worker: str(),
  observedGeneration: num(),
});

/** A VM as answered: all three parts at once. */
const VM: Schema = { type: 'object', allOf: [VMMeta, VMSpec, VMState] };

/** One line of `GET /vms/{name}?watch=true` (application/x-ndjson). */
const VMWatchLine = obj({ type: choice(['ADDED', 'MODIFIED', 'DELETED'], false), object: VM });

const Event = obj({ kind: str(), payload: str(), timestamp: int() });

/**
 * As the description declares it: an object (with an `items` keyword, which only arrays use). Upstream's
 * controller answers a JSON array (internal/controller/api_vms.go, listVMEvents: `page.Items`, a
 * []v1.Event) and its client decodes one (pkg/client/vms.go, `[]v1.Event`): see EVENTS_AS_UPSTREAM_SERVES_THEM.
 * (Ajv in strict mode refuses to compile it as declared: `items` without `type: 'array'`.)
 */
const Events: Schema = { type: 'object', items: Event };

/** What upstream's controller and client actually exchange for `GET /vms/{name}/events`. */
export const EVENTS_AS_UPSTREAM_SERVES_THEM: Schema = listOf(Event);

const IP = obj({ ip: str() });

// ---- Exec WebSocket frames (JSON text messages after the 101 of GET /vms/{name}/exec) -------------
// Each kind of frame is told apart by its `type`; `data` is base64, watermarks are int64.

const base64 = str({ format: 'byte' });
const int64 = (more: Schema = {}) => int({ format: 'int64', ...more });
const frame = (type: string, properties: Record<string, Schema>, required: readonly string[]): Schema =>
  obj({ type: choice([type], false), ...properties }, ['type', ...required]);

const ExecTerminalSize = obj({ rows: int64({ minimum: 0 }), cols: int64({ minimum: 0 }) }, ['rows', 'cols']);

/** Client → controller. */
const ExecClientFrame: Schema = {
  oneOf: [
    frame('stdin', { data: base64 }, ['data']), // empty data closes the command's stdin
    frame('resize', { terminal: ExecTerminalSize }, ['terminal']),
    frame('history', { watermark: int64({ minimum: 0 }) }, ['watermark']),
    frame('ack', { watermark: int64({ minimum: 0 }) }, ['watermark']),
    frame('detach', {}, []),
    frame('close', {}, []),
  ],
};

/** Controller → client. The watermark of output frames is only there on reconnectable sessions. */
const ExecControllerFrame: Schema = {
  oneOf: [
    frame('stdout', { data: base64, watermark: int64() }, ['data']),
    frame('stderr', { data: base64, watermark: int64() }, ['data']),
    frame('exit', { exit: obj({ code: int({ format: 'int32' }) }, ['code']), watermark: int64() }, ['exit']),
    frame('error', { error: str(), watermark: int64() }, ['error']),
    frame('no_more_history', { watermark: int64() }, ['watermark']),
  ],
};

/** Upstream's named shapes, under the names its description gives them. */
export const schemas = {
  Worker,
  ServiceAccount,
  ControllerInfo,
  ClusterSettings,
  VMMeta,
  VMSpec,
  VMState,
  VM,
  Event,
  Events,
  IP,
  ExecTerminalSize,
  ExecClientFrame,
  ExecControllerFrame,
} as const satisfies Record<string, Schema>;

// ---- Operations -----------------------------------------------------------------------------------

export interface UpstreamOperation {
  /** Every status code the description lists for the operation, and no other. */
  statuses: readonly number[];
  /** The one answer that has a body (the description gives at most one per operation): its status and JSON schema. */
  body?: { status: number; schema: Schema };
  /** `GET /vms/{name}?watch=true`: the schema of each application/x-ndjson line, answered with status 200. */
  ndjson?: Schema;
  /** The JSON request body the description declares (all are required when declared). */
  request?: Schema;
  /** A WebSocket endpoint (Connection and Upgrade headers required); for exec, the frames each way. */
  websocket?: { frames?: { fromClient: Schema; fromController: Schema } };
  /** Response headers the description declares, by status. */
  headers?: Record<number, Record<string, Schema>>;
}

const ok = (schema: Schema) => ({ status: 200, schema });

/** Upstream's operations, keyed `METHOD /path` (paths as upstream writes them, after /v1). */
export const operations: Readonly<Record<string, UpstreamOperation>> = {
  'GET /controller/info': { statuses: [200], body: ok(ControllerInfo) },

  'GET /cluster-settings': { statuses: [200], body: ok(ClusterSettings) },
  'PUT /cluster-settings': { statuses: [200], body: ok(ClusterSettings), request: ClusterSettings },

  'POST /service-accounts': { statuses: [200, 409], body: ok(ServiceAccount), request: ServiceAccount },
  'GET /service-accounts': { statuses: [200], body: ok(listOf(ServiceAccount)) },
  'GET /service-accounts/{name}': { statuses: [200, 404], body: ok(ServiceAccount) },
  'PUT /service-accounts/{name}': { statuses: [200, 404], body: ok(ServiceAccount), request: ServiceAccount },
  'DELETE /service-accounts/{name}': { statuses: [200, 404] },

  'GET /workers': { statuses: [200], body: ok(listOf(Worker)) },
  'GET /workers/{name}': { statuses: [200, 404], body: ok(Worker) },
  'DELETE /workers/{name}': { statuses: [200, 404] },
  // No 101 is listed for either port-forward, only the refusals.
  'GET /workers/{name}/port-forward': { statuses: [400, 404, 503], websocket: {} },

  'POST /vms': { statuses: [200, 409], body: ok(VM), request: { allOf: [VMMeta, VMSpec] } },
  'GET /vms': { statuses: [200], body: ok(listOf(VM)) },
  'GET /vms/{name}': { statuses: [200, 404], body: ok(VM), ndjson: VMWatchLine },
  'PUT /vms/{name}': { statuses: [200, 404], body: ok(VM), request: VMSpec },
  'DELETE /vms/{name}': { statuses: [200, 404] },
  'GET /vms/{name}/events': { statuses: [200, 404], body: ok(Events), headers: { 200: { 'X-Next-Cursor': str() } } },
  'GET /vms/{name}/port-forward': { statuses: [400, 404, 503], websocket: {} },
  'GET /vms/{name}/exec': {
    statuses: [101, 400, 404, 409, 503],
    websocket: { frames: { fromClient: ExecClientFrame, fromController: ExecControllerFrame } },
  },
  'GET /vms/{name}/ip': { statuses: [200, 404, 503], body: ok(IP) },
};
