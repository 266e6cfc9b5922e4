// The Orchard v1 API model, defined once: these TypeBox schemas are the JSON Schema the controller
// validates with, the TypeScript types every part of the program uses, and the OpenAPI components.
// Field names follow the upstream wire format exactly (its mix of camelCase and snake_case included).
import { Type, type Static } from '@sinclair/typebox';
import { ROLES, SCHEDULER_PROFILES, type Role } from './enums.ts';

export { ROLES, SCHEDULER_PROFILES, type Role };

/**
 * What VM, worker and service account names may be: upstream's characters (letters, digits, '-', '_',
 * '.', ':'), so host-named workers (admins-Mac-mini.local) and names like ci_build.1 work. Not "." or
 * ".." (they are path segments in URLs); at most 128 characters, so a worker's name for a VM
 * (orchard-NAME-UID-N) fits in a file name.
 */
export const NAME_PATTERN = '^(?!\\.{1,2}$)[A-Za-z0-9._:-]{1,128}$';
export const Name = Type.String({ pattern: NAME_PATTERN, minLength: 1, maxLength: 128, description: "letters, digits, '-', '_', '.' and ':'" });

const Timestamp = Type.String({ description: 'RFC 3339 time', maxLength: 64 });
const StringMap = (description: string) =>
  Type.Record(Type.String({ maxLength: 253 }), Type.String({ maxLength: 4096 }), { description, maxProperties: 256 });
const Counters = Type.Record(Type.String({ maxLength: 253 }), Type.Integer({ minimum: 0, maximum: 2 ** 40 }), {
  description: 'resource name to amount',
  maxProperties: 256,
});

export { RESOURCE_TART_VMS } from './resources.ts';
export const RESOURCE_LOGICAL_CORES = 'org.cirruslabs.logical-cores';
export const RESOURCE_MEMORY_MIB = 'org.cirruslabs.memory-mib';

// ---- VM ----------------------------------------------------------------------------------------

export const MAX_CPU = 512;
export const MAX_MEMORY_MIB = 4 * 1024 * 1024;
export const MAX_DISK_GB = 64 * 1024;

export const HostDir = Type.Object(
  {
    name: Type.String({ minLength: 1, maxLength: 255 }),
    path: Type.String({ minLength: 1, maxLength: 4096 }),
    ro: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);

export const StartupScript = Type.Object(
  {
    script_content: Type.String({ maxLength: 256 * 1024 }),
    env: Type.Optional(StringMap('environment of the script')),
  },
  { additionalProperties: false },
);

export const Condition = Type.Object(
  {
    type: Type.Union([
      Type.Literal('scheduled'),
      Type.Literal('running'),
      Type.Literal('cloning'),
      Type.Literal('suspending'),
      Type.Literal('stopping'),
    ]),
    state: Type.Union([Type.Literal('true'), Type.Literal('false')]),
  },
  { additionalProperties: false },
);

/** Fields the user sets (the spec). Changing any of them bumps `generation`. */
export const VMSpecFields = {
  os: Type.Optional(Type.Union([Type.Literal('darwin'), Type.Literal('linux')], { default: 'darwin' })),
  arch: Type.Optional(Type.Union([Type.Literal('arm64'), Type.Literal('amd64')], { default: 'arm64' })),
  runtime: Type.Optional(Type.String({ pattern: '^[a-z][a-z0-9-]{0,31}$', description: 'tart, vetu, qemu, synthetic' })),
  image: Type.Optional(Type.String({ minLength: 1, maxLength: 1024 })),
  imagePullPolicy: Type.Optional(Type.Union([Type.Literal('IfNotPresent'), Type.Literal('Always')])),
  cpu: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_CPU, description: 'virtual CPUs (default 4)' })),
  memory: Type.Optional(Type.Integer({ minimum: 64, maximum: MAX_MEMORY_MIB, description: 'MiB (default 8192)' })),
  diskSize: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_DISK_GB, description: 'GB' })),
  netSoftnet: Type.Optional(Type.Boolean()),
  'net-softnet': Type.Optional(Type.Boolean({ description: 'deprecated spelling of netSoftnet' })),
  netSoftnetAllow: Type.Optional(Type.Array(Type.String({ maxLength: 64 }), { maxItems: 256 })),
  netSoftnetBlock: Type.Optional(Type.Array(Type.String({ maxLength: 64 }), { maxItems: 256 })),
  'net-bridged': Type.Optional(Type.String({ maxLength: 64 })),
  headless: Type.Optional(Type.Boolean()),
  nested: Type.Optional(Type.Boolean()),
  suspendable: Type.Optional(Type.Boolean()),
  username: Type.Optional(Type.String({ maxLength: 255 })),
  password: Type.Optional(Type.String({ maxLength: 1024 })),
  startup_script: Type.Optional(Type.Union([StartupScript, Type.Null()])),
  restart_policy: Type.Optional(Type.Union([Type.Literal('Never'), Type.Literal('OnFailure')])),
  resources: Type.Optional(Counters),
  labels: Type.Optional(StringMap('worker labels the VM requires')),
  hostDirs: Type.Optional(Type.Array(HostDir, { maxItems: 64 })),
  powerState: Type.Optional(
    Type.Union([Type.Literal('running'), Type.Literal('stopped'), Type.Literal('suspended')]),
  ),
  randomSerial: Type.Optional(Type.Boolean()),
};
export const IMMUTABLE_VM_FIELDS = ['os', 'arch', 'runtime'] as const;
export const VM_SPEC_KEYS = Object.keys(VMSpecFields) as (keyof typeof VMSpecFields)[];

export const VMStatus = Type.Union([Type.Literal('pending'), Type.Literal('running'), Type.Literal('failed')]);
export type VMStatus = Static<typeof VMStatus>;

/** Fields the controller and the VM's worker set (the state). */
export const VMStateFields = {
  status: Type.Optional(VMStatus),
  status_message: Type.Optional(Type.String({ maxLength: 4096 })),
  worker: Type.Optional(Type.String({ maxLength: 253 })),
  observedGeneration: Type.Optional(Type.Integer({ minimum: 0 })),
  conditions: Type.Optional(Type.Array(Condition, { maxItems: 16 })),
  scheduled_at: Type.Optional(Timestamp),
  started_at: Type.Optional(Timestamp),
  restarted_at: Type.Optional(Timestamp),
  restart_count: Type.Optional(Type.Integer({ minimum: 0 })),
  assignedCPU: Type.Optional(Type.Integer({ minimum: 0 })),
  assignedMemory: Type.Optional(Type.Integer({ minimum: 0 })),
  localName: Type.Optional(Type.String({ maxLength: 255 })),
  /** Set by upstream's Tart workers: the VM's name in Tart, and the image's fully qualified reference. */
  tartName: Type.Optional(Type.String({ maxLength: 255 })),
  image_fqn: Type.Optional(Type.String({ maxLength: 1024 })),
};

export const MetaFields = {
  name: Name,
  uid: Type.Optional(Type.String({ maxLength: 64 })),
  createdAt: Type.Optional(Timestamp),
  generation: Type.Optional(Type.Integer({ minimum: 0 })),
  /** Upstream's resource version (its watch implementation): accepted, not used. */
  version: Type.Optional(Type.Integer({ minimum: 0 })),
};

/** A VM as the API returns it, and as clients send it (server-owned fields are accepted and ignored). */
export const VM = Type.Object({ ...MetaFields, ...VMSpecFields, ...VMStateFields }, { additionalProperties: false, title: 'VM' });
export type VM = Static<typeof VM>;

/**
 * The VM's name on its worker host: recognisably ours, unique per VM incarnation. The restart count
 * is part of it (as upstream's orchard-NAME-UID-RESTARTCOUNT): an OnFailure restart on the same
 * worker is a new local VM, not the finished run of the failed one.
 */
export const localNameOf = (vm: VM) => `orchard-${vm.name}-${vm.uid}-${vm.restart_count ?? 0}`;

/** The VM name, uid and restart count in a local name made by localNameOf (VM names may hold '-'; uids are UUIDs). */
export function parseLocalName(localName: string): { name: string; uid: string; restartCount: number } | undefined {
  const m = /^orchard-(.+)-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(\d+)$/.exec(localName);
  return m ? { name: m[1], uid: m[2], restartCount: Number(m[3]) } : undefined;
}

export const Event = Type.Object(
  {
    kind: Type.String({ maxLength: 64 }),
    timestamp: Type.Integer({ minimum: 0, description: 'unix seconds' }),
    payload: Type.String({ maxLength: 1024 * 1024 }),
  },
  { additionalProperties: false, title: 'Event' },
);
export type Event = Static<typeof Event>;
export const EventList = Type.Array(Event, { maxItems: 10000 });

/**
 * A line of GET /v1/vms/{name}/events?watch=true (NDJSON): ADDED for each event, oldest first, with its
 * cursor (watching again from it resumes after that event; the stand-in for events retention dropped
 * has none); DELETED (an Event saying so) when the VM is deleted, the stream's last line; ERROR
 * ({message}) when the controller ended the stream, its last line.
 */
export const EventWatchLine = Type.Object(
  {
    type: Type.Union([Type.Literal('ADDED'), Type.Literal('DELETED'), Type.Literal('ERROR')]),
    object: Type.Union([Event, Type.Object({ message: Type.String() })]),
    cursor: Type.Optional(Type.String({ pattern: '^[0-9]{1,15}$' })),
  },
  { title: 'EventWatchLine' },
);
export type EventWatchLine = Static<typeof EventWatchLine>;

/** An event as clients send it: each field may be left out (upstream's Go structs leave empty ones out), meaning "" or 0. */
export const EventInput = Type.Object(
  { kind: Type.Optional(Event.properties.kind), timestamp: Type.Optional(Event.properties.timestamp), payload: Type.Optional(Event.properties.payload) },
  { additionalProperties: false, title: 'EventInput' },
);
export type EventInput = Static<typeof EventInput>;
export const EventInputList = Type.Array(EventInput, { maxItems: 10000 });
export const eventOf = (e: EventInput): Event => ({ kind: e.kind ?? '', timestamp: e.timestamp ?? 0, payload: e.payload ?? '' });

/** Body of PUT /v1/vms/{name}/state. */
export const VMStateUpdate = Type.Object(
  {
    status: Type.Optional(VMStatus),
    status_message: Type.Optional(Type.String({ maxLength: 4096 })),
    observedGeneration: Type.Optional(Type.Integer({ minimum: 0 })),
    conditions: Type.Optional(Type.Array(Condition, { maxItems: 16 })),
    started_at: Type.Optional(Timestamp),
    localName: Type.Optional(Type.String({ maxLength: 255 })),
    tartName: Type.Optional(Type.String({ maxLength: 255 })),
    image_fqn: Type.Optional(Type.String({ maxLength: 1024 })),
    events: Type.Optional(
      Type.Array(EventInput, { maxItems: 10000, description: 'Orchard addition (capability "vm-state-events"): events appended in the same commit as the state' }),
    ),
  },
  { additionalProperties: true, title: 'VMStateUpdate', description: 'other VM fields are ignored' },
);
export type VMStateUpdate = Static<typeof VMStateUpdate>;

// ---- Worker ------------------------------------------------------------------------------------

/**
 * A VM a worker runs that the controller does not know (it lost or swapped its records): kept as it
 * is, for an admin to adopt or delete (or removed by the worker after its orphan grace period).
 */
export const Orphan = Type.Object(
  {
    localName: Type.String({ minLength: 1, maxLength: 255 }),
    uid: Type.Optional(Type.String({ maxLength: 64 })),
    name: Type.Optional(Type.String({ maxLength: 63 })),
    running: Type.Optional(Type.Boolean()),
    image: Type.Optional(Type.String({ maxLength: 1024 })),
    cpu: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_CPU })),
    memory: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_MEMORY_MIB })),
    since: Type.Optional(Timestamp),
  },
  { additionalProperties: false, title: 'Orphan' },
);
export type Orphan = Static<typeof Orphan>;

/** An image reference or digest, as VMs name images (no whitespace or control characters). */
export const ImageRef = Type.String({ minLength: 1, maxLength: 1024, pattern: '^[^\\s\\x00-\\x1f\\x7f]+$' });
export const MAX_HELD_IMAGES = 256;
export const MAX_IMAGE_PULLS = 32;

export const ImagePull = Type.Object(
  {
    image: ImageRef,
    state: Type.Union([Type.Literal('pulling'), Type.Literal('done'), Type.Literal('failed')]),
    message: Type.Optional(Type.String({ maxLength: 1024 })),
    updatedAt: Type.Optional(Timestamp),
  },
  { additionalProperties: false, title: 'ImagePull' },
);
export type ImagePull = Static<typeof ImagePull>;

const HeldImages = Type.Array(ImageRef, {
  maxItems: MAX_HELD_IMAGES,
  description: "Orchard addition, set by the worker: the images it holds, as references and sha256: digests; the scheduler prefers, all else equal, a worker holding the VM's image (the same string)",
});

export const Worker = Type.Object(
  {
    name: Name,
    machine_id: Type.Optional(Type.String({ maxLength: 255 })),
    last_seen: Type.Optional(Timestamp),
    scheduling_paused: Type.Optional(Type.Boolean()),
    resources: Type.Optional(Counters),
    labels: Type.Optional(StringMap('labels VMs can require')),
    defaultCPU: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_CPU })),
    defaultMemory: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_MEMORY_MIB })),
    arch: Type.Optional(Type.String({ maxLength: 32 })),
    runtime: Type.Optional(Type.String({ maxLength: 32 })),
    createdAt: Type.Optional(Timestamp),
    version: Type.Optional(Type.Integer({ minimum: 0, description: "upstream's resource version: accepted, not used" })),
    serviceAccount: Type.Optional(
      Type.String({ maxLength: 253, description: 'Orchard addition, set by the controller: the service account that registered the worker; only it may act as the worker' }),
    ),
    orphans: Type.Optional(Type.Array(Orphan, { maxItems: 1000, description: 'Orchard addition, set by the controller: VMs on the worker the controller does not know' })),
    capabilities: Type.Optional(
      Type.Array(Type.String({ maxLength: 64 }), {
        maxItems: 64,
        description: 'Orchard addition, set by the worker: the watch instructions it understands beyond upstream\'s (registriesAction, pullImageAction); the controller sends a worker no others',
      }),
    ),
    images: Type.Optional(HeldImages),
    imagePulls: Type.Optional(Type.Array(ImagePull, { maxItems: MAX_IMAGE_PULLS, description: 'Orchard addition: the latest image pulls asked of the worker (orchard image pull), with their progress' })),
  },
  { additionalProperties: false, title: 'Worker' },
);
export type Worker = Static<typeof Worker>;

/** Body of POST /v1/workers/{name}/images: the worker's held images, and/or the progress of one pull. */
export const WorkerImagesReport = Type.Object(
  {
    images: Type.Optional(HeldImages),
    pull: Type.Optional(Type.Object({ image: ImageRef, state: ImagePull.properties.state, message: ImagePull.properties.message }, { additionalProperties: false })),
  },
  { additionalProperties: false, title: 'WorkerImagesReport' },
);
export type WorkerImagesReport = Static<typeof WorkerImagesReport>;

/** Body of POST /v1/images/pull (Orchard addition). */
export const ImagePullRequest = Type.Object(
  { image: ImageRef, labels: Type.Optional(StringMap('only workers with all of these labels')) },
  { additionalProperties: false, title: 'ImagePullRequest' },
);
export type ImagePullRequest = Static<typeof ImagePullRequest>;

/** The answer of POST /v1/images/pull: which of the matching workers were asked, and why the others were not. */
export const ImagePullAnswer = Type.Object(
  {
    image: Type.String(),
    asked: Type.Array(Type.String(), { description: 'connected workers that understand pullImageAction: each was sent one' }),
    offline: Type.Array(Type.String(), { description: 'matching workers whose watch is not connected' }),
    unsupported: Type.Array(Type.String(), { description: 'matching connected workers that do not declare pullImageAction (upstream workers, older ones)' }),
  },
  { title: 'ImagePullAnswer' },
);
export type ImagePullAnswer = Static<typeof ImagePullAnswer>;

// ---- Registry credentials (Orchard addition) ----------------------------------------------------

/** A registry host as image references name it: a DNS name or IPv4 address, optionally with a port (no scheme, no path). */
export const REGISTRY_HOST_PATTERN = '^(?=[^:]{1,253}(:[0-9]{1,5})?$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:[0-9]{1,5})?$';
export const RegistryHost = Type.String({ pattern: REGISTRY_HOST_PATTERN, minLength: 1, maxLength: 259, description: 'registry host[:port], e.g. ghcr.io or registry.local:5000' });

const RegistryFields = {
  username: Type.Optional(Type.String({ minLength: 1, maxLength: 255 })),
  insecure: Type.Optional(Type.Boolean({ description: 'plain HTTP instead of HTTPS' })),
  ca: Type.Optional(Type.String({ minLength: 1, maxLength: 64 * 1024, description: 'PEM certificate(s) the registry\'s TLS certificate must chain to (instead of the system\'s)' })),
};

/** What an admin sends (POST /v1/registries, PUT /v1/registries/{host}). */
export const RegistryInput = Type.Object(
  {
    host: RegistryHost,
    ...RegistryFields,
    password: Type.Optional(
      Type.Union([Type.String({ minLength: 1, maxLength: 8192 }), Type.Null()], {
        description: 'write-only: never answered. On PUT, left out keeps the stored one, null removes it',
      }),
    ),
  },
  { additionalProperties: false, title: 'RegistryInput' },
);
export type RegistryInput = Static<typeof RegistryInput>;

/** Registry credentials as the API answers them: never the password, only whether one is set. */
export const Registry = Type.Object(
  { host: Type.String(), ...RegistryFields, passwordSet: Type.Boolean(), createdAt: Type.Optional(Timestamp), updatedAt: Type.Optional(Timestamp) },
  { additionalProperties: false, title: 'Registry' },
);
export type Registry = Static<typeof Registry>;

/** Registry credentials as the store keeps them (named by host) and as workers get them. */
export interface StoredRegistry {
  /** The host: the store keys objects by name. */
  name: string;
  username?: string;
  password?: string;
  insecure?: boolean;
  ca?: string;
  createdAt?: string;
  updatedAt?: string;
}

// ---- Service account, cluster settings, events, info ---------------------------------------------

export const ServiceAccount = Type.Object(
  {
    name: Name,
    token: Type.Optional(Type.String({ minLength: 1, maxLength: 1024 })),
    roles: Type.Array(Type.Union(ROLES.map((r) => Type.Literal(r))), { maxItems: ROLES.length, uniqueItems: true }),
    createdAt: Type.Optional(Timestamp),
    version: Type.Optional(Type.Integer({ minimum: 0, description: "upstream's resource version: accepted, not used" })),
  },
  { additionalProperties: false, title: 'ServiceAccount' },
);
export type ServiceAccount = Static<typeof ServiceAccount>;

export const ClusterSettings = Type.Object(
  {
    hostDirPolicies: Type.Optional(
      Type.Array(
        Type.Object(
          { pathPrefix: Type.String({ minLength: 1, maxLength: 4096 }), ro: Type.Optional(Type.Boolean()) },
          { additionalProperties: false },
        ),
        { maxItems: 256 },
      ),
    ),
    schedulerProfile: Type.Optional(Type.Union(SCHEDULER_PROFILES.map((p) => Type.Literal(p)))),
  },
  { additionalProperties: false, title: 'ClusterSettings' },
);
export type ClusterSettings = Static<typeof ClusterSettings>;


export const ControllerInfo = Type.Object(
  {
    version: Type.String(),
    commit: Type.String(),
    capabilities: Type.Array(Type.String()),
    clusterID: Type.Optional(Type.String({ description: 'Orchard addition: the identity of the cluster whose data this controller serves' })),
  },
  { title: 'ControllerInfo' },
);
export type ControllerInfo = Static<typeof ControllerInfo>;

export const ErrorBody = Type.Object({ message: Type.String() }, { title: 'Error' });

export type WatchEventType = 'ADDED' | 'MODIFIED' | 'DELETED';
export interface WatchEvent<T> {
  type: WatchEventType;
  object: T;
}
