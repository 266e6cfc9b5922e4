// The one small interface every VM runtime (qemu, tart, synthetic) implements. The worker owns the
// desired state and the controller protocol; a driver only knows how to make one VM exist on this host.
import type { Duplex } from 'node:stream';
import type { RegistryCredentials } from '../../api/worker-protocol.ts';

/** What the worker asks a driver to run: the VM spec, reduced to what a hypervisor needs. */
export interface DriverVM {
  /** Name of the VM on this host; unique per host and recognisable as ours (prefix `orchard-`). */
  localName: string;
  /** The VM's name on the controller (the guest's hostname, for drivers that set it). */
  name?: string;
  /** Controller-side identity, kept with the VM so a restarted worker can match it again. */
  uid: string;
  image: string;
  imagePullPolicy: 'IfNotPresent' | 'Always';
  cpu: number;
  /** MiB */
  memory: number;
  /** GB; 0 or undefined keeps the image's size */
  diskSize?: number;
  username: string;
  password: string;
  nested?: boolean;
  headless?: boolean;
  netSoftnet?: boolean;
  netSoftnetAllow?: string[];
  netSoftnetBlock?: string[];
  netBridged?: string;
  hostDirs?: { name: string; path: string; ro?: boolean }[];
  /** The VM may be suspended (tart: `tart run --suspendable`, which leaves out devices that cannot be saved). */
  suspendable?: boolean;
}

/** A VM this driver finds on the host (for adoption after a worker restart, or clean-up). */
export interface LocalVM {
  localName: string;
  uid?: string;
  running: boolean;
  /**
   * Suspended: its memory is kept for a resume. (qemu: its vCPUs are paused in a QEMU that still
   * runs, so `running` is true too; tart: saved to its state file by `tart suspend`, not running.)
   */
  suspended?: boolean;
  /** What the driver knows of its spec (for an admin adopting it when the controller lost its record). */
  image?: string;
  cpu?: number;
  memory?: number;
}

export type Progress = (message: string) => void;

/** What a driver that pulls images from registries (qemu with an image cache) offers the worker. */
export interface DriverImages {
  /** The registries' credentials and settings as the controller sends them (replacing earlier ones). */
  setRegistries(registries: RegistryCredentials[]): void;
  /** Pull `image` now (a pre-pull), or confirm it is current; progress as for prepare. */
  pull(image: string, progress: Progress, signal?: AbortSignal): Promise<void>;
  /** The images held here: references as VMs name them, and their sha256: digests. */
  held(): Promise<string[]>;
}

export interface Driver {
  readonly runtime: string;
  /** Every VM on this host that this driver created (name prefix `orchard-`), running or not. */
  list(): Promise<LocalVM[]>;
  /** Make the VM's disk: resolve/pull the image, copy-on-write clone, apply cpu/memory/disk size. */
  prepare(vm: DriverVM, progress?: Progress): Promise<void>;
  /**
   * Optional: calls `onChange` when this host's images may have changed (built, imported, pulled by
   * another process); returns what stops it. VMs waiting for a missing image are retried then.
   */
  watchImages?(onChange: () => void): () => void;
  /**
   * Optional: removes what the driver keeps of images that are gone or changed (qemu: warm-start
   * snapshots no VM will resume, which hold on to their image's disk). Never rejects. The worker runs it at its start.
   */
  tidyImages?(): Promise<void>;
  /** Optional: ends what the driver runs besides VMs (qemu: standbys). The worker calls it as it stops; VMs run on. */
  close?(): Promise<void>;
  /** Optional: pulling images from registries (pre-pulls, credentials, what is held for placement). */
  readonly images?: DriverImages;
  /**
   * Start the hypervisor; resolves once the process runs (not yet when the guest is ready).
   * `progress`: what the VM's events should say (qemu: a warm start from an image's snapshot).
   */
  start(vm: DriverVM, progress?: Progress): Promise<void>;
  /**
   * Resolves when the guest accepts SSH (the `SSH-` banner answers) and is the VM's own (qemu: a
   * guest resumed from a snapshot has its own identity by then); rejects if the VM dies or on abort.
   */
  waitReady(localName: string, signal?: AbortSignal, progress?: Progress): Promise<void>;
  /** Resolves when the VM's hypervisor process exits (for restart policies); reason in the value. */
  waitExit(localName: string): Promise<{ reason: string }>;
  /** The guest's IP as the guest sees it. */
  ip(localName: string): Promise<string>;
  /** A TCP connection to `port` inside the guest, reachable from this host. */
  dial(localName: string, port: number): Promise<Duplex>;
  /**
   * Optional: suspend a running VM, keeping its memory and disk so that `resume` continues it where
   * it stopped (same processes, same memory, no boot). Idempotent. A suspended VM is `suspended` in
   * list(), and waitExit does not report it as exited.
   */
  suspend?(localName: string): Promise<void>;
  /** Optional, with suspend: continue a suspended VM; resolves false (and does nothing) when it is not suspended. */
  resume?(vm: DriverVM): Promise<boolean>;
  /** Graceful power-off, then kill after `graceMs`. Idempotent. */
  stop(localName: string, graceMs?: number): Promise<void>;
  /** Stop if needed and remove every file of the VM. Idempotent. */
  remove(localName: string): Promise<void>;
}
