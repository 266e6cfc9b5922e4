// QEMU driver for Linux workers. One directory per VM, `<dataDir>/vms/<localName>/`:
//   vm.json       what a restarted worker needs to find the VM again (uid, image, cpu, memory, ports)
//   base.qcow2    hard link to the image's disk (kernel images: vmlinux|vmlinuz, initrd.img too), so
//                 rebuilding or removing the image never breaks the VM
//   disk.qcow2    copy-on-write overlay on base.qcow2 (grown to diskSize)
//   console.log   serial console;  qemu.log: QEMU's stdout/stderr;  qmp.sock;  qemu.pid
//   vnc.sock      QEMU's VNC server (the VM's display);  net.log: pasta's messages
//   net.pid       pasta's pid and the pid of the QEMU it serves, written as pasta starts
//   cidata/       cloud-init NoCloud seed, rewritten on each start (cloud-init.ts)
// QEMU runs in its own session (setsid), so it outlives the worker process; a new QemuDriver on
// the same directories adopts it (list() checks that the pid really is the VM's QEMU).
// Networking is QEMU user-mode (slirp), guest 10.0.2.15, in a network namespace of the VM's own
// (see netns.ts): the guest reaches the outside but nothing on the host's loopback. QMP: qmp.ts;
// which accelerator: accel.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants as fsConstants, existsSync, mkdirSync, openSync, writeFileSync, watch, type FSWatcher } from 'node:fs';
import { copyFile, link, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { basename, dirname, join, resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildDebianDev, DEBIAN_DEV, diskImageProblem, imageHowTo, ImageNotFoundError, listImages, resolveImage, type ResolvedImage } from '../images.ts';
import { privateDir, privateFiles } from '../private-files.ts';
import { connectTCP, connectUnix, sshBannerOn } from './net.ts';
import { connectInNetns, inNewNetns, killPastaOf, startPasta } from './netns.ts';
import { pino, type Logger } from 'pino';
import type { Driver, DriverImages, DriverVM, LocalVM, Progress } from './driver.ts';
import { checkLocalName, isLocalName, VMRecords } from './vm-records.ts';
import { detectAccel, type Accel } from './accel.ts';
import type { ImageCache } from '../oci/cache.ts';
import type { Registries } from '../oci/registries.ts';
import { formatPullProgress } from '../oci/progress.ts';
import { isImageReference } from '../oci/reference.ts';
import { forward, QmpClient } from './qmp.ts';
import { qemuIn, qemuPidIn } from './qemu-process.ts';
import { type Standby, Standbys } from './standby.ts';
import { hostnameOf, publicKeyOf, SEED_LABEL, writeSeed } from './cloud-init.ts';
import { AGENT_PORT, DROPBEAR_RESTARTED, type Identity, identityScript, keyBlob, newIdentity, newMac, offeredHostKey, runAsRoot, runOverAgent, warmUpScript } from './guest-identity.ts';
import { MEMORY_FILE, STATE_FILE, type SnapshotMeta } from './snapshots.ts';
import { type Shape, SnapshotMaker } from './snapshot-maker.ts';
import { qemuImg } from './qemu-img.ts';
import { parseLocalName } from '../../api/schemas.ts';
// dial(name, VNC_PORT) reaches QEMU's VNC server for the VM's display (a unix socket, no guest port).
import { VNC_PORT } from '../../api/defaults.ts';


/** The guest's address on QEMU's user-mode network (the first address its DHCP server hands out). */
export const USER_NET_GUEST_IP = '10.0.2.15';
/** After the image store changes, the snapshots no VM will resume are looked for once it has been quiet this long. */
const TIDY_SETTLE_MS = 1000;

/** pino-like logger (`log.info(obj, msg)`), or a plain function that takes a message. */
export interface QemuDriverOptions {
  dataDir: string;
  imagesDir: string;
  accel?: 'auto' | Accel;
  /** The worker's logger (default: none). */
  log?: Logger;
  /** default `qemu-system-x86_64` (from PATH) */
  qemuBinary?: string;
  /** waitReady gives up after this long (default 10 minutes); callers can abort earlier. */
  readyTimeoutMs?: number;
  /**
   * Build the `debian-dev` image when a VM asks for it and the store lacks it (a worker's first use),
   * with the Debian packages already on the host: a VM's request never installs packages.
   */
  buildMissingDebianDev?: boolean;
  /** Pulls images named by a registry reference (HOST/REPO:TAG) that are not local images. */
  imageCache?: ImageCache;
  /** The registry settings the image cache reads; the controller's credentials are set here. */
  registries?: Registries;
  /**
   * Start VMs from their image's snapshot when it can (default true): see snapshots.ts. Off, every
   * VM cold-boots.
   */
  warmStart?: boolean;
  /**
   * How many standbys the worker keeps in all (default 1; none with warm starts off): VMs resumed
   * from a snapshot ahead of the VMs that take them (standby.ts).
   */
  standbys?: number;
}


interface VmFile {
  uid: string;
  localName: string;
  image: string;
  kind: 'kernel' | 'disk';
  cpu: number;
  memory: number;
  diskSize?: number;
  /** kernel images: file names in the VM dir and the command line */
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  hostDirs?: { name: string; path: string; ro?: boolean }[];
  created: string;
  accel?: Accel;
  /**
   * Ports of the running QEMU (`pid`): ssh = forward to guest 22 on 127.0.0.1 of the VM's network
   * namespace. A VM started by an earlier version (no `netns`) has them on the host's 127.0.0.1,
   * with vnc = QEMU's VNC server: they are used as they are until the VM restarts.
   */
  pid?: number;
  ports?: { ssh?: number; vnc?: number };
  netns?: boolean;
  /** pasta's pid (outbound network of the namespace) */
  netPid?: number;
  /** The pid of the QEMU whose vCPUs suspend() paused (a suspended VM, while that QEMU lives). */
  paused?: number;
  /** The NIC's MAC (VMs prepared by an earlier version have none: QEMU's default). */
  mac?: string;
  /**
   * Warm start (snapshots.ts): the VM's disk is backed by the snapshot's template.qcow2 and its first
   * start resumes snapshot.state. While `pending`, the guest still has the template's identity: it
   * gets its own (name, user, password: what it needs for that) before it is reported running.
   */
  warm?: { snapshotCreated: string; pending?: { name: string; username: string; password: string }; agent?: boolean };
  /** The SSH host keys the guest was given (known_hosts lines), once it has its own identity. */
  hostKeys?: string[];
  /** Why a fresh VM cold-boots rather than resume its image's snapshot (said by its first start). */
  coldReason?: string;
  /** A snapshot's template (snapshot-maker.ts): its memory is the file MEMORY_FILE, mapped shared. */
  template?: boolean;
}

interface VmState {
  /** The QEMU process this driver instance started (absent for adopted VMs). */
  child?: ChildProcess;
  childExit?: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stopping?: boolean;
  /** guest port -> forwarded port, valid for the QEMU with pid `fwdPid` */
  fwd: Map<number, number>;
  fwdPid?: number;
  /** whether the QEMU with pid `fwdPid` runs in its own network namespace */
  netns?: boolean;
  /** serialises QMP sessions: QEMU serves one QMP client at a time */
  qmpChain: Promise<unknown>;
  /** the poll that sees an adopted QEMU (not our child) exit, shared by every waitExit */
  adoptedExit?: { pid: number; gone: Promise<void> };
  /** performance.now() when start() spawned QEMU, and when it returned (for a warm start's stage timings) */
  spawnedAt?: number;
  upAt?: number;
  /** A standby this VM took (standby.ts): its agent's connected socket, until the VM's identity is given. */
  standbyAgent?: Duplex;
  /** Whether this VM's QEMU was a standby's. */
  fromStandby?: boolean;
}

export class QemuDriver implements Driver {
  readonly runtime = 'qemu';
  readonly accel: Accel;
  /** Why `accel` was chosen (for a warning when it is TCG). */
  readonly accelReason: string;
  readonly dataDir: string;
  /** `vm.json` in each VM's directory. */
  private readonly records: VMRecords<VmFile>;
  readonly imagesDir: string;
  private readonly qemuBinary: string;
  private readonly readyTimeoutMs: number;
  private readonly log: Logger;
  private readonly state = new Map<string, VmState>();
  private readonly buildMissingDebianDev: boolean;
  private readonly imageCache?: ImageCache;
  /** With an image cache: pre-pulls, registry credentials, the images held. */
  readonly images?: DriverImages;
  /** The on-demand build of debian-dev under way: VMs that ask meanwhile wait for the same one. */
  private building?: Promise<unknown>;
  private readonly buildListeners = new Set<Progress>();
  /** The warm-start snapshots of this worker's images (snapshot-maker.ts). */
  private readonly snapshots: SnapshotMaker;
  /** Warm starts off (QemuDriverOptions.warmStart false). */
  private readonly warmStart: boolean;
  /** VMs resumed from snapshots ahead of the VMs that take them. */
  private readonly standbys: Standbys;
  /** tidyImages runs one after the other; the timer of the next, after the image store changed. */
  private tidying: Promise<void> = Promise.resolve();
  private tidyTimer?: NodeJS.Timeout;
  /** The DriverVM each VM was last started with (a warm start that falls back to a cold boot starts it again). */
  private readonly started = new Map<string, DriverVM>();

  constructor(opts: QemuDriverOptions) {
    this.dataDir = resolve(opts.dataDir);
    this.records = new VMRecords((localName) => join(this.vmDir(localName), 'vm.json'), { inVMDir: true });
    this.imagesDir = resolve(opts.imagesDir);
    this.qemuBinary = opts.qemuBinary ?? 'qemu-system-x86_64';
    this.readyTimeoutMs = opts.readyTimeoutMs ?? 600_000;
    this.buildMissingDebianDev = opts.buildMissingDebianDev ?? false;
    this.warmStart = opts.warmStart ?? true;
    this.imageCache = opts.imageCache;
    const cache = opts.imageCache;
    if (cache) {
      this.images = {
        setRegistries: (list) => opts.registries?.set(list),
        // A pre-pull asks the registry whether the tag moved (downloading only what changed).
        pull: async (image, progress) => {
          if (!isImageReference(image)) throw new Error(`${image} is not a registry reference (HOST/REPOSITORY:TAG): only those can be pulled`);
          await cache.ensure(image, { policy: 'Always', progress: (p) => progress(formatPullProgress(p)) });
        },
        // Local images by name, pulled ones by reference and digest: what VMs name.
        held: async () => {
          const local = (await listImages(this.imagesDir)).map((i) => i.name);
          const pulled = (await cache.held()).flatMap((h) => [...h.references, h.digest]);
          return [...new Set([...local, ...pulled])].sort();
        },
      };
    }
    const want = opts.accel ?? 'auto';
    if (want === 'auto') {
      const d = detectAccel();
      this.accel = d.accel;
      this.accelReason = d.reason;
    } else {
      this.accel = want;
      this.accelReason = 'configured';
    }
    this.log = opts.log ?? pino({ level: 'silent' });
    this.snapshots = new SnapshotMaker({
      accel: this.accel, qemuBinary: this.qemuBinary, imagesDir: this.imagesDir, dataDir: this.dataDir, log: this.log,
      prepare: (vm, progress, o) => this.prepare(vm, progress, o),
      start: (vm) => this.start(vm),
      waitReady: (localName) => this.waitReady(localName),
      dial: (localName, port) => this.dial(localName, port),
      agent: (localName) => this.connectAgent(localName),
      stop: (localName, graceMs) => this.stop(localName, graceMs),
      qmp: (localName, fn) => this.qmp(localName, fn),
      record: (localName) => this.records.read(localName),
      forget: (localName) => this.forget(localName),
    });
    this.standbys = new Standbys({
      vmsDir: join(this.dataDir, 'vms'), log: this.log,
      prepare: async (vm) => {
        await this.prepare(vm, () => {}, { standby: true });
        const file = await this.records.read(vm.localName);
        // (the warm-up and the VM's identity go through the agent)
        return file?.warm?.agent ? { snapshot: this.snapshotKey(file), created: file.warm.snapshotCreated } : undefined;
      },
      start: (vm) => this.startQemu(vm, () => {}),
      load: async (localName) => {
        const agent = await this.connectAgent(localName);
        try {
          await this.continueWarm(localName);
        } catch (err) {
          agent.destroy();
          throw err;
        }
        return agent;
      },
      warmUp: async (localName, agent) => {
        const file = await this.records.read(localName);
        await runOverAgent(agent, warmUpScript(file!.mac!, Date.now() / 1000), { keepOpen: true, timeoutMs: 60_000 });
      },
      pause: (localName) => this.qmp(localName, (q) => q.execute('stop')).then(() => {}),
      forget: (localName) => this.forget(localName),
    }, this.warmStart ? opts.standbys ?? 1 : 0, join(this.dataDir, 'standbys.json'));
    if (cache) cache.followers = { links: () => this.snapshots.imageLinks(), released: () => this.tidyImages() };
  }

  // --- paths and small helpers -----------------------------------------------------------------

  /** Drops what this driver keeps in memory of a VM (a template's, a standby's) that is gone or another's now. */
  private forget(localName: string): void {
    this.state.delete(localName);
    this.started.delete(localName);
  }

  vmDir(localName: string): string {
    return this.snapshots.templateDir(localName) ?? this.standbys.dirOf(localName) ?? join(this.dataDir, 'vms', checkLocalName(localName));
  }

  /** The name of the snapshot (its directory's) a VM of this record resumes. */
  private snapshotKey(file: Pick<VmFile, 'image' | 'cpu' | 'memory'>): string {
    return basename(this.snapshotDir(file.image, { cpu: file.cpu, memory: file.memory }));
  }

  /** Where the warm-start snapshot of image `name` for VMs of `shape` is kept (snapshots.ts). */
  snapshotDir(name: string, shape: Shape): string {
    return this.snapshots.snapshotDir(name, shape);
  }

  /**
   * The warm-start snapshot of image `name` (a local image, else one in the cache: pulled before) for
   * VMs of `shape` on this worker: the one there when it is up to date, else a new one, made once
   * however many VMs ask meanwhile.
   */
  async snapshot(name: string, shape: Shape, progress: Progress = () => {}): Promise<SnapshotMeta> {
    const [image] = await this.imagesNamed(name);
    if (!image && isImageReference(name) && this.imageCache) {
      throw new ImageNotFoundError(name, `image "${name}" is not on this worker: it is pulled by the first VM of it here, or by: orchard image pull ${name}`);
    }
    // (none: the maker's own lookup of a local image says how to get it)
    return this.snapshots.snapshot(name, shape, progress, image);
  }

  /**
   * Removes the warm-start snapshots no VM will resume (SnapshotMaker.removeStale): of images gone
   * (removed, evicted from the cache), changed (rebuilt, re-pulled) or made by another QEMU. Never
   * rejects; one run at a time. The worker runs it at its start, and it runs when the store changes.
   */
  tidyImages(): Promise<void> {
    const run = this.tidying.then(async () => {
      await this.snapshots.removeStale((name) => this.imagesNamed(name));
      await this.standbys.prune(async (snapshot) => (await this.snapshots.meta(snapshot))?.created);
      await this.standbys.removeLeftBehind();
      await this.standbys.restore(async (snapshot) => (await this.snapshots.meta(snapshot)) !== undefined);
    });
    this.tidying = run.catch((err: Error) => this.log.warn({ err: err.message }, 'cannot remove the snapshots no VM will resume'));
    return this.tidying;
  }

  /** The images named `name` this worker has now: its store's, and its cache's (a VM resumes the snapshot of either). */
  private async imagesNamed(name: string): Promise<ResolvedImage[]> {
    const found: ResolvedImage[] = [];
    try {
      found.push(await resolveImage(this.imagesDir, name));
    } catch (err) {
      if (!(err instanceof ImageNotFoundError)) throw err;
    }
    const cached = this.imageCache && isImageReference(name) ? await this.imageCache.cached(name) : undefined;
    if (cached) found.push(cached);
    return found;
  }

  private st(localName: string): VmState {
    let s = this.state.get(localName);
    if (!s) {
      s = { fwd: new Map(), qmpChain: Promise.resolve() };
      this.state.set(localName, s);
    }
    return s;
  }

  /** The pid of the VM's QEMU if it is alive and really is that QEMU (not a reused pid). */
  private livePid(localName: string): number | undefined {
    const dir = this.vmDir(localName);
    const child = this.state.get(localName)?.child;
    if (child?.pid && child.exitCode === null && child.signalCode === null && qemuIn(child.pid, dir)) return child.pid;
    return qemuPidIn(dir);
  }

  private isRunning(localName: string): boolean {
    return this.livePid(localName) !== undefined;
  }

  private requirePid(localName: string): number {
    const pid = this.livePid(localName);
    if (pid === undefined) throw new Error(`VM ${localName} is not running`);
    return pid;
  }

  private socketPath(localName: string, pid: number, name: 'qmp.sock' | 'vnc.sock' | 'agent.sock'): string {
    const path = join(this.vmDir(localName), name);
    // unix socket paths are limited to 107 bytes; QEMU's cwd is the VM dir, reachable via /proc.
    return Buffer.byteLength(path) < 100 ? path : `/proc/${pid}/cwd/${name}`;
  }

  /** Run `fn` with a QMP session to the VM (sessions are serialised per VM). */
  private qmp<T>(localName: string, fn: (q: QmpClient) => Promise<T>, timeoutMs = 10_000): Promise<T> {
    const s = this.st(localName);
    const run = async () => {
      const pid = this.requirePid(localName);
      const q = await QmpClient.connect(this.socketPath(localName, pid, 'qmp.sock'), timeoutMs);
      let timer: NodeJS.Timeout | undefined;
      try {
        return await Promise.race([
          fn(q),
          new Promise<never>((_, rej) => {
            timer = setTimeout(() => rej(new Error(`QMP: VM ${localName} did not answer within ${timeoutMs} ms`)), timeoutMs);
          }),
        ]);
      } finally {
        clearTimeout(timer);
        q.close();
      }
    };
    const result = s.qmpChain.then(run, run);
    s.qmpChain = result.catch(() => {});
    return result;
  }

  private async tail(localName: string, file: string, lines: number): Promise<string> {
    try {
      const text = await readFile(join(this.vmDir(localName), file), 'utf8');
      // pasta reports to syslog too, and says so on every line where there is none
      return text.replace(/\r/g, '').split('\n').filter((l) => !l.startsWith('Failed to send ')).join('\n')
        .trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  // --- Driver -------------------------------------------------------------------------------------

  async list(): Promise<LocalVM[]> {
    let entries;
    try {
      entries = await readdir(join(this.dataDir, 'vms'), { withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: LocalVM[] = [];
    for (const e of entries) {
      if (!e.isDirectory() || !isLocalName(e.name)) continue;
      const vm = await this.records.read(e.name);
      const pid = this.livePid(e.name);
      const suspended = pid !== undefined && vm?.paused === pid ? { suspended: true } : {};
      out.push({ localName: e.name, uid: vm?.uid, running: pid !== undefined, ...suspended, image: vm?.image, cpu: vm?.cpu, memory: vm?.memory });
    }
    return out.sort((a, b) => a.localName.localeCompare(b.localName));
  }

  /** The standbys ready (standby.ts): the snapshot each is of, and its directory. */
  standbysReady(): { snapshot: string; dir: string }[] {
    return this.standbys.list();
  }

  /** Ends the standbys (the worker stops; VMs run on). */
  close(): Promise<void> {
    return this.standbys.close();
  }

  /** `standby`: a standby's own (standby.ts), which takes no other standby. */
  async prepare(vm: DriverVM, progress: Progress = () => {}, opts: { cold?: boolean; template?: boolean; standby?: boolean } = {}): Promise<void> {
    // The image's snapshot stays while this VM links its files (tidyImages).
    const release = this.snapshots.hold(vm.image);
    try {
      await this.prepareHeld(vm, progress, opts);
    } finally {
      release();
    }
  }

  private async prepareHeld(vm: DriverVM, progress: Progress, opts: { cold?: boolean; template?: boolean; standby?: boolean }): Promise<void> {
    const dir = this.vmDir(vm.localName);
    if (this.isRunning(vm.localName)) throw new Error(`VM ${vm.localName} is running; stop it before preparing it again`);
    progress(`resolving image ${vm.image}`);
    const image = await this.resolveOrBuild(vm.image, progress, vm.imagePullPolicy);
    const old = await this.records.read(vm.localName);
    await privateDir(dirname(dir));
    await privateDir(dir);
    const file: VmFile = {
      uid: vm.uid,
      localName: vm.localName,
      image: vm.image,
      kind: image.kind,
      cpu: vm.cpu,
      memory: vm.memory,
      diskSize: vm.diskSize || undefined,
      hostDirs: vm.hostDirs?.length ? vm.hostDirs : undefined,
      created: new Date().toISOString(),
      accel: this.accel,
      mac: newMac(),
      template: opts.template,
    };
    if (old && old.uid === vm.uid && old.image === vm.image && existsSync(join(dir, 'disk.qcow2'))) {
      // Same VM prepared again (e.g. a restart): keep its disk and files.
      Object.assign(file, { kernel: old.kernel, initrd: old.initrd, cmdline: old.cmdline, created: old.created, mac: old.mac, warm: old.warm, hostKeys: old.hostKeys });
      await this.growDisk(vm.localName, vm.diskSize, progress);
      await this.records.write(file);
      await privateFiles(dir);
      progress('disk kept from an earlier start');
      return;
    }
    // A fresh VM: drop whatever a VM of this name left, link the image's files, clone the disk.
    // The image is checked again here: one put in the store by an older version may name host files.
    const problem = await diskImageProblem(image.disk);
    if (problem) throw new Error(`image ${vm.image}: ${problem}`);
    const chosen = opts.cold ? undefined : this.warmStart ? await this.snapshots.snapshotFor(vm, image, progress) : { cold: 'warm starts are off on this worker' };
    const snapshot = chosen && !('cold' in chosen) ? chosen : undefined;
    if (chosen && 'cold' in chosen) file.coldReason = chosen.cold;
    if (snapshot && !opts.standby && !opts.template) {
      const taken = this.standbys.take(this.snapshotKey(vm), snapshot.created);
      if (taken && await this.takeStandby(vm, taken, file, progress)) return;
    }
    for (const f of await readdir(dir)) await rm(join(dir, f), { recursive: true, force: true });
    const from = snapshot ? this.snapshotDir(vm.image, snapshot) : undefined;
    progress(snapshot ? `creating copy-on-write disk on the snapshot of image ${vm.image}` : 'creating copy-on-write disk');
    await linkOrCopy(from ? join(from, 'base.qcow2') : image.disk, join(dir, 'base.qcow2'));
    if (image.kind === 'kernel') {
      file.kernel = image.kernel!.endsWith('vmlinux') ? 'vmlinux' : 'vmlinuz';
      file.initrd = 'initrd.img';
      file.cmdline = image.cmdline;
      if (snapshot) Object.assign(file, { kernel: snapshot.kernel, initrd: snapshot.initrd, cmdline: snapshot.cmdline });
      await linkOrCopy(from ? join(from, file.kernel!) : image.kernel!, join(dir, file.kernel!));
      await linkOrCopy(from ? join(from, file.initrd) : image.initrd!, join(dir, file.initrd));
    }
    await this.copyImageKeys(image, dir);
    if (snapshot && from) {
      // base.qcow2 <- template.qcow2 (the template's frozen overlay, which names base.qcow2 relative
      // to itself) <- disk.qcow2; the state and memory files are linked too, and unlinked once loaded.
      await linkOrCopy(join(from, 'disk.qcow2'), join(dir, 'template.qcow2'));
      for (const f of [STATE_FILE, MEMORY_FILE]) await linkOrCopy(join(from, f), join(dir, f));
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'template.qcow2', '-F', 'qcow2', join(dir, 'disk.qcow2')]);
      file.warm = {
        snapshotCreated: snapshot.created,
        pending: { name: vm.name ?? parseLocalName(vm.localName)?.name ?? vm.localName, username: vm.username, password: vm.password },
        agent: snapshot.agent,
      };
    } else {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'disk.qcow2')]);
      await this.growDisk(vm.localName, vm.diskSize, progress);
    }
    await this.records.write(file);
    // base.qcow2 and the kernel files are hard links: this makes the image's own files 0600 too.
    await privateFiles(dir);
    this.log.info({ vm: vm.localName, image: vm.image, warm: !!snapshot }, 'VM prepared');
  }

  /**
   * A fresh VM takes standby `taken` (standby.ts): its directory becomes the VM's, and the VM gets its
   * own identity when it starts (resumeWarm), from the standby's paused guest. False (the standby
   * removed) when it cannot be taken: the VM is prepared as usual then.
   */
  private async takeStandby(vm: DriverVM, taken: Standby, file: VmFile, progress: Progress): Promise<boolean> {
    const dir = this.vmDir(vm.localName);
    const s = this.state.get(taken.localName);
    this.forget(taken.localName);
    try {
      await rm(dir, { recursive: true, force: true });
      await rename(taken.dir, dir);
    } catch (err) {
      this.log.warn({ vm: vm.localName, err: (err as Error).message }, 'cannot take the standby: removed');
      await this.standbys.discard(taken);
      await privateDir(dir);
      return false;
    } finally {
      this.standbys.taken(taken.localName);
    }
    const was = (await this.records.read(vm.localName))!;
    await this.records.write({
      ...was, uid: vm.uid, localName: vm.localName, created: file.created, diskSize: file.diskSize,
      warm: { snapshotCreated: was.warm!.snapshotCreated, pending: { name: vm.name ?? parseLocalName(vm.localName)?.name ?? vm.localName, username: vm.username, password: vm.password }, agent: true },
    });
    const now = performance.now();
    this.state.set(vm.localName, { ...(s ?? { fwd: new Map(), qmpChain: Promise.resolve() }), standbyAgent: taken.agent, fromStandby: true, spawnedAt: now, upAt: now });
    progress(`taking this worker's standby of image ${vm.image}: resumed from its snapshot (made ${was.warm!.snapshotCreated}) and paused`);
    this.log.info({ vm: vm.localName, image: vm.image }, 'VM prepared: a standby taken');
    return true;
  }

  /**
   * The snapshot a fresh VM starts from, made first when this worker has none for the image yet (or
   * an out-of-date one); or why the VM cold-boots.
   */
  /** The image; `debian-dev`, when missing, built first (buildMissingDebianDev), once for all the VMs that wait for it. */
  private async resolveOrBuild(name: string, progress: Progress, policy: DriverVM['imagePullPolicy'] = 'IfNotPresent'): Promise<ResolvedImage> {
    // A registry reference is pulled, unless a local image of that exact name stands in for it.
    const pull = this.imageCache && isImageReference(name) ? this.imageCache : undefined;
    try {
      if (!pull || policy === 'IfNotPresent') return await resolveImage(this.imagesDir, name);
    } catch (err) {
      if (!(err instanceof ImageNotFoundError) || (!pull && (name !== DEBIAN_DEV || !this.buildMissingDebianDev))) throw err;
    }
    if (pull) return pull.ensure(name, { policy, progress: (p) => progress(formatPullProgress(p)) });
    this.buildListeners.add(progress);
    try {
      if (!this.building) {
        progress(`image ${DEBIAN_DEV} is not on this worker yet: building it from Debian packages (once; later VMs reuse it)`);
        const t0 = Date.now();
        this.log.info({ image: DEBIAN_DEV, store: this.imagesDir }, 'building a missing image that a VM asked for');
        this.building = buildDebianDev(this.imagesDir, (msg) => {
          for (const l of this.buildListeners) l(`building image ${DEBIAN_DEV}: ${msg}`);
        }, { installPackages: false }).then(
          () => this.log.info({ image: DEBIAN_DEV, seconds: (Date.now() - t0) / 1000 }, 'image built'),
          (e: Error) => {
            throw new ImageNotFoundError(DEBIAN_DEV, `image "${DEBIAN_DEV}" is not on this worker (store ${this.imagesDir}) and this worker could not build it: ${e.message}; once that is fixed the worker builds it by itself, or build it as the worker's user with: ${imageHowTo(DEBIAN_DEV, this.imagesDir)}`);
          },
        ).finally(() => (this.building = undefined));
      } else progress(`waiting for the build of image ${DEBIAN_DEV} under way`);
      await this.building;
    } finally {
      this.buildListeners.delete(progress);
    }
    return resolveImage(this.imagesDir, DEBIAN_DEV);
  }

  /**
   * Calls `onChange` when the image store changes (an image built, imported or removed by another
   * process); returns what stops it. A worker retries VMs that wait for an image then.
   */
  watchImages(onChange: () => void): () => void {
    let watcher: FSWatcher | undefined;
    try {
      mkdirSync(this.imagesDir, { recursive: true, mode: 0o700 });
      watcher = watch(this.imagesDir, () => {
        onChange();
        // An image removed or replaced leaves its snapshot stale: removed once the store settles.
        clearTimeout(this.tidyTimer);
        this.tidyTimer = setTimeout(() => void this.tidyImages(), TIDY_SETTLE_MS).unref();
      });
      watcher.on('error', () => watcher?.close());
    } catch (err) {
      this.log.warn({ store: this.imagesDir, err: (err as Error).message }, 'cannot watch the image store: VMs waiting for an image are retried on a timer only');
    }
    return () => watcher?.close();
  }

  private async copyImageKeys(image: ResolvedImage, dir: string): Promise<void> {
    if (image.sshKey) await copyFile(image.sshKey, join(dir, 'id_ed25519'));
    if (image.knownHosts) await writeFile(join(dir, 'known_hosts'), image.knownHosts);
  }

  /** Grow disk.qcow2 to diskSize GiB (never shrinks: that would cut the guest's file system). */
  private async growDisk(localName: string, diskSize: number | undefined, progress: Progress): Promise<void> {
    if (!diskSize || diskSize <= 0) return;
    const disk = join(this.vmDir(localName), 'disk.qcow2');
    const { stdout } = await qemuImg(['info', '--output=json', '-U', disk]);
    const current = (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
    const want = Math.round(diskSize * 1024 ** 3);
    if (want > current) {
      await qemuImg(['resize', '-q', disk, String(want)]);
      progress(`disk grown to ${diskSize} GiB`);
    } else if (want < current) {
      progress(`disk stays at ${(current / 1024 ** 3).toFixed(1)} GiB (the image is larger than diskSize ${diskSize})`);
    }
  }

  async start(vm: DriverVM, progress: Progress = () => {}): Promise<void> {
    try {
      await this.startQemu(vm, progress);
    } catch (err) {
      // A state QEMU cannot load may end it at once (or only once the guest resumes: waitReady).
      const file = await this.records.read(vm.localName);
      if (!file?.warm?.pending) throw err;
      const log = (await this.tail(vm.localName, 'qemu.log', 4)).split('\n').filter((l) => l && !l.startsWith('VNC server running')).join('; ');
      this.warmFailed(vm.localName, new Error(`QEMU exited while loading the snapshot${log ? `: ${log}` : ''}`), progress);
      await this.coldAgain(vm.localName, file, progress);
    }
  }

  private warmFailed(localName: string, err: Error, progress: Progress) {
    this.log.warn({ vm: localName, err: err.message }, 'warm start failed; cold boot instead');
    progress(`warm start failed (${err.message}): cold boot instead`);
  }

  private async startQemu(vm: DriverVM, progress: Progress): Promise<void> {
    const dir = this.vmDir(vm.localName);
    if (this.isRunning(vm.localName)) return;
    this.started.set(vm.localName, vm);
    const file = await this.records.read(vm.localName);
    if (!file || !existsSync(join(dir, 'disk.qcow2'))) throw new Error(`VM ${vm.localName} is not prepared`);
    await this.reapNetwork(vm.localName); // the pasta of the QEMU before, if it outlived it
    file.cpu = vm.cpu || file.cpu;
    file.memory = vm.memory || file.memory;
    if (vm.hostDirs) file.hostDirs = vm.hostDirs.length ? vm.hostDirs : undefined;
    for (const f of ['qmp.sock', 'vnc.sock', 'agent.sock', 'qemu.pid']) await unlink(join(dir, f)).catch(() => {});
    // Every guest gets a cloud-init NoCloud seed with this start's credentials (cloud-init.ts); a
    // guest without cloud-init never reads it. The VM's own key, if its image has one, is authorized.
    const seed = await writeSeed(dir, {
      name: vm.name ?? parseLocalName(vm.localName)?.name ?? vm.localName,
      instanceId: vm.uid,
      username: vm.username,
      password: vm.password,
      authorizedKey: await publicKeyOf(join(dir, 'id_ed25519')),
    });

    // Warm start: the template's state, loaded from the file (the devices below are the template's).
    const incoming = !!file.warm?.pending && existsSync(join(dir, STATE_FILE));
    const memory = Math.max(32, Math.floor(file.memory));
    // The memory of a snapshot's template is a file, shared: what the guest writes is in it (the
    // save leaves it out of the state). A warm start maps that file private: the guest's pages are
    // the template's until it writes them (copy on write), and nothing is read before it runs.
    const memoryFile = file.template || (incoming && existsSync(join(dir, MEMORY_FILE)));
    const args = [
      '-name', `guest=${vm.localName},debug-threads=on`,
      ...(memoryFile ? ['-M', 'q35,memory-backend=ram0', '-object', `memory-backend-file,id=ram0,size=${memory}M,mem-path=${MEMORY_FILE},share=${file.template ? 'on' : 'off'}`] : ['-M', 'q35']),
      ...(this.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,thread=multi', '-cpu', 'max']),
      '-smp', String(Math.max(1, Math.floor(file.cpu))),
      '-m', String(memory),
      '-nodefaults', '-no-user-config', '-msg', 'timestamp=on',
      '-drive', `file=${join(dir, 'disk.qcow2')},if=virtio,format=qcow2,discard=unmap,cache=writeback`,
      // After the root disk (it stays /dev/vda): the seed directory as a read-only FAT drive (vvfat).
      '-drive', `file.driver=vvfat,file.dir=${seed.replace(/,/g, ',,')},file.label=${SEED_LABEL},if=virtio,format=raw,readonly=on`,
      // No hostfwd yet: the namespace's loopback is down until pasta has configured it.
      '-netdev', 'user,id=net0', '-device', `virtio-net-pci,netdev=net0${file.mac ? `,mac=${file.mac}` : ''}`,
      '-device', 'virtio-rng-pci',
      // A new generation id on each start: a guest resumed from a snapshot reseeds its random
      // number generator at once (Linux's vmgenid driver), rather than go on from the template's state.
      '-device', `vmgenid,guid=${randomUUID()}`,
      // No password: only the worker's user can open the socket (the VM dir is 0700).
      '-vga', 'std', '-vnc', 'unix:vnc.sock',
      '-serial', `file:${join(dir, 'console.log')}`,
      // the channel of a warm start's identity agent (guest-identity.ts); unused otherwise
      '-device', 'virtio-serial-pci,id=agent0', '-chardev', 'socket,id=agent,path=agent.sock,server=on,wait=off',
      '-device', `virtserialport,bus=agent0.0,chardev=agent,name=${AGENT_PORT}`,
      // relative: unix socket paths are short (QEMU runs in the VM dir)
      '-qmp', 'unix:qmp.sock,server=on,wait=off',
      // relative (QEMU runs in the VM dir): the directory may be renamed under it (qemu-process.ts)
      '-pidfile', 'qemu.pid',
    ];
    if (file.kind === 'kernel') {
      args.push('-kernel', join(dir, file.kernel!), '-initrd', join(dir, file.initrd!),
        '-append', `${file.cmdline ?? 'console=ttyS0'} root=/dev/vda`);
    }
    (file.hostDirs ?? []).forEach((d, i) => {
      args.push('-virtfs', `local,path=${resolve(d.path).replace(/,/g, ',,')},mount_tag=${d.name.replace(/,/g, ',,')},security_model=none,id=share${i}${d.ro ? ',readonly=on' : ''}`);
    });
    if (incoming) {
      // loaded by resumeWarm (migrate-incoming), once it holds the agent's socket
      args.push('-incoming', 'defer');
      progress(`resuming the snapshot of image ${file.image} (made ${file.warm!.snapshotCreated})`);
    } else if (file.coldReason) {
      progress(`cold boot: ${file.coldReason}`);
      file.coldReason = undefined;
    }
    for (const unsupported of ['netBridged', 'netSoftnet', 'nested'] as const) {
      if (vm[unsupported]) this.log.warn({ vm: vm.localName }, `${unsupported} is not supported by the qemu driver; ignored`);
    }

    const out = openSync(join(dir, 'qemu.log'), 'w'); // this run's messages only, like console.log
    let child: ChildProcess;
    try {
      // detached: own session and process group, so QEMU survives the worker (and its signals).
      const [cmd, ...argv] = inNewNetns([this.qemuBinary, ...args]);
      child = spawn(cmd, argv, { cwd: dir, detached: true, stdio: ['ignore', out, out] });
    } finally {
      closeSync(out);
    }
    const s = this.st(vm.localName);
    s.spawnedAt = performance.now();
    s.upAt = undefined;
    s.child = child;
    s.stopping = false;
    s.fwd = new Map();
    s.fwdPid = undefined;
    let spawnError: Error | undefined;
    s.childExit = new Promise((res) => {
      child.once('exit', (code, signal) => res({ code, signal }));
      child.once('error', (err) => {
        spawnError = (err as NodeJS.ErrnoException).code === 'ENOENT'
          ? new Error('unshare not found: apt-get install util-linux') : err;
        res({ code: null, signal: null });
      });
    });
    child.unref();
    const exited = s.childExit;

    // Up once QEMU wrote its pid file (its namespaces exist): then pasta for the outbound network,
    // and the forward of guest port 22 once pasta has brought the namespace's loopback up.
    const deadline = Date.now() + 30_000;
    let ssh: number | undefined;
    let pasta: ChildProcess | undefined;
    let netError: Error | undefined;
    let lastErr: unknown;
    // pasta is not in the VM's record until the record below is written: till then only this start can end it.
    const endPasta = () => {
      if (pasta && pasta.exitCode === null && pasta.signalCode === null) pasta.kill('SIGKILL');
    };
    while (!ssh && !netError && Date.now() < deadline) {
      const done = await Promise.race([exited, sleep(50).then(() => undefined)]);
      if (done) break;
      if (!child.pid || !existsSync(join(dir, 'qemu.pid'))) continue;
      if (!pasta) {
        pasta = startPasta(child.pid, join(dir, 'net.log'));
        // At once (no await in between): a worker killed before the record below is written leaves
        // this pasta named here, for reapNetwork. (The record names it too; this is the early copy.)
        try {
          if (pasta.pid) writeFileSync(join(dir, 'net.pid'), `${pasta.pid} ${child.pid}\n`, { mode: 0o600 });
        } catch {
          // the directory is gone (a remove meanwhile): this start ends the pasta itself
        }
        pasta.once('error', (err: NodeJS.ErrnoException) => {
          netError = err.code === 'ENOENT' ? new Error('pasta not found: apt-get install passt') : err;
        });
        pasta.once('exit', (code, signal) => {
          netError ??= new Error(`VM ${vm.localName}: pasta (its network) exited (${signal ?? `exit code ${code}`})`);
        });
        pasta.unref();
      }
      try {
        ssh = await this.qmp(vm.localName, (q) => forward(q, 22), 5000);
      } catch (err) {
        lastErr = err;
      }
    }
    if (!ssh) {
      const r = await Promise.race([exited, sleep(500).then(() => undefined)]);
      if (spawnError) throw spawnError;
      if (!r && child.pid) process.kill(child.pid, 'SIGKILL');
      endPasta();
      if (netError) {
        const log = await this.tail(vm.localName, 'net.log', 5);
        throw new Error(netError.message + (log ? `:\n${log}` : ''));
      }
      const log = await this.tail(vm.localName, 'qemu.log', 15);
      if (r?.code === 127 && log.includes('failed to execute')) throw new Error(`${this.qemuBinary} not found: apt-get install qemu-system-x86`);
      throw new Error(`VM ${vm.localName}: QEMU did not start` +
        (r ? ` (${r.signal ?? `exit code ${r.code}`})` : lastErr ? ` (${(lastErr as Error).message})` : '') +
        (log ? `:\n${log}` : ''));
    }
    file.pid = child.pid;
    file.paused = undefined;
    file.ports = { ssh };
    file.netns = true;
    file.netPid = pasta?.pid;
    file.accel = this.accel;
    try {
      await this.records.write(file);
    } catch (err) {
      // Unrecorded (a VM removed meanwhile, its directory gone; a full disk): no stop would find the pasta.
      if (child.pid && this.livePid(vm.localName) === child.pid) process.kill(child.pid, 'SIGKILL');
      endPasta();
      throw err;
    }
    // A stop or remove while the record was being written read the record before it named this
    // pasta: if it ended QEMU meanwhile, the pasta is this start's to end.
    if (this.livePid(vm.localName) !== child.pid) endPasta();
    s.fwd.set(22, ssh);
    s.fwdPid = child.pid;
    s.netns = true;
    s.upAt = performance.now();
    this.log.info({ vm: vm.localName, pid: child.pid, netPid: pasta?.pid, accel: this.accel }, 'QEMU started');
  }

  /**
   * Port on 127.0.0.1 of the VM's network namespace (the host's, for a VM started by an earlier
   * version: `netns` false) that reaches guest TCP `port` (adds a forward over QMP when needed).
   */
  private async forwardOf(localName: string, port: number): Promise<{ port: number; pid: number; netns: boolean }> {
    const pid = this.requirePid(localName);
    const s = this.st(localName);
    if (s.fwdPid !== pid) {
      s.fwd = new Map();
      s.fwdPid = pid;
      const file = await this.records.read(localName);
      s.netns = file?.pid !== pid || file.netns === true;
      if (file?.pid === pid && file.ports?.ssh) s.fwd.set(22, file.ports.ssh);
      if (file?.pid === pid && file.ports?.vnc) s.fwd.set(-VNC_PORT, file.ports.vnc);
    }
    const netns = s.netns ?? true;
    if (netns && port === VNC_PORT) return { port, pid, netns };
    const key = port === VNC_PORT ? -VNC_PORT : port;
    const known = s.fwd.get(key);
    if (known) return { port: known, pid, netns };
    const found = await this.qmp(localName, async (q) => {
      if (port === VNC_PORT) {
        const vnc = (await q.execute('query-vnc')) as { service?: string };
        return Number(vnc.service ?? 0);
      }
      return forward(q, port);
    });
    if (!found) throw new Error(`VM ${localName}: no host port for guest port ${port}`);
    s.fwd.set(key, found);
    return { port: found, pid, netns };
  }

  /**
   * Resolves once the guest answers SSH; a warm-started VM (vm.json's `warm.pending`) first resumes
   * and gets its own identity, and anything that goes wrong there turns it into a cold boot (the
   * reason in `progress`): it is never ready with the template's identity.
   */
  async waitReady(localName: string, signal?: AbortSignal, progress: Progress = () => {}): Promise<void> {
    const file = await this.records.read(localName);
    if (!file?.warm?.pending) return this.waitBanner(localName, signal);
    try {
      await this.resumeWarm(localName, file, progress, signal);
      // the next VM of this snapshot takes a standby (made now: not while this one resumed)
      this.standbys.fill(file, this.snapshotKey(file));
    } catch (err) {
      if (signal?.aborted) throw err;
      this.warmFailed(localName, err as Error, progress);
      await this.coldAgain(localName, file, progress);
      await this.waitBanner(localName, signal);
    }
  }

  /** After a failed warm start: QEMU killed, the disk made anew on the image, and a cold boot. */
  private async coldAgain(localName: string, file: VmFile, progress: Progress): Promise<void> {
    const dir = this.vmDir(localName);
    const pending = file.warm!.pending!;
    await this.stop(localName, 0);
    for (const f of ['disk.qcow2', 'template.qcow2', STATE_FILE, MEMORY_FILE]) await rm(join(dir, f), { force: true });
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'disk.qcow2')]);
    await this.growDisk(localName, file.diskSize, progress);
    await this.records.write({ ...file, warm: undefined });
    const vm: DriverVM = this.started.get(localName) ?? {
      localName, uid: file.uid, name: pending.name, image: file.image, imagePullPolicy: 'IfNotPresent',
      cpu: file.cpu, memory: file.memory, username: pending.username, password: pending.password,
    };
    await this.start(vm, progress);
  }

  /** The resume of a warm start (or the standby taken), then the VM's own identity (guest-identity.ts), checked. */
  private async resumeWarm(localName: string, file: VmFile, progress: Progress, signal?: AbortSignal): Promise<void> {
    const dir = this.vmDir(localName);
    const s = this.st(localName);
    const t0 = s.spawnedAt ?? performance.now();
    const pending = file.warm!.pending!;
    const taken = s.standbyAgent;
    s.standbyAgent = undefined;
    // The agent's socket is connected before the state loads: the template's was, so the guest sees
    // no change (else a read of its agent would end). A standby's is, since its own load.
    const agent = taken ?? (file.warm!.agent ? await this.connectAgent(localName) : undefined);
    try {
      // made before the load (host keys, password hash: a few ms of the worker's CPU)
      // (an image reached through its own agent may have no key: pulled ones)
      const key = await readFile(join(dir, 'id_ed25519')).catch(() => undefined);
      const id = newIdentity({ name: pending.name, username: pending.username, password: pending.password, authorizedKey: await publicKeyOf(join(dir, 'id_ed25519')) }, file.mac);
      await this.continueWarm(localName, signal);
      await this.identifyWarm(localName, file, { t0, key, id, agent }, progress, signal);
    } finally {
      agent?.destroy();
    }
  }

  /** The socket of the VM's agent channel (guest-identity.ts AGENT_START). */
  private async connectAgent(localName: string): Promise<Duplex> {
    const sock = await connectUnix(this.socketPath(localName, this.requirePid(localName), 'agent.sock'), `VM ${localName}'s agent`);
    sock.on('error', () => {}); // its reader (runOverAgent) says what failed
    return sock;
  }

  /**
   * A warm start's QEMU, started with `-incoming defer`: its snapshot's state loaded (unless the load
   * began before: a worker restarted meanwhile, or a standby's), then the guest continued (the
   * template was stopped when saved, so the loaded VM stays paused; a standby is paused too).
   */
  private async continueWarm(localName: string, signal?: AbortSignal): Promise<void> {
    const dir = this.vmDir(localName);
    const continued = await this.qmp(localName, async (q) => {
      if (((await q.execute('query-migrate')) as { status?: string }).status) {
        // loaded before: continued here if paused (a standby), else by the loop below
        if (((await q.execute('query-status')) as { status: string }).status !== 'paused') return false;
      } else {
        // the memory is the template's file (startQemu), left out of the state as the save did
        const capabilities = [{ capability: 'events', state: true }];
        if (existsSync(join(dir, MEMORY_FILE))) capabilities.push({ capability: 'x-ignore-shared', state: true });
        await q.execute('migrate-set-capabilities', { capabilities });
        const loaded = q.waitEvent<{ status: string }>('MIGRATION', (d) => d.status === 'completed' || d.status === 'failed', 60_000);
        await q.execute('migrate-incoming', { uri: `exec:cat ${STATE_FILE}` });
        // (anything else, QEMU's exit on a state it cannot load included, is the loop's to say)
        if ((await loaded.catch(() => undefined))?.status !== 'completed') return false;
      }
      await q.execute('cont');
      return ((await q.execute('query-status')) as { status: string }).status === 'running';
    }, 65_000);
    const deadline = Date.now() + 120_000;
    let qmpErrors = 0;
    while (!continued) {
      signal?.throwIfAborted();
      if (!this.isRunning(localName)) {
        const log = (await this.tail(localName, 'qemu.log', 4)).split('\n').filter((l) => l && !l.startsWith('VNC server running')).join('; ');
        throw new Error(`QEMU exited while loading the snapshot${log ? `: ${log}` : ''}`);
      }
      let status: string;
      try {
        status = ((await this.qmp(localName, (q) => q.execute('query-status'))) as { status: string }).status;
      } catch (err) {
        // QEMU closes its QMP socket as it exits on a state it cannot load: the check above says so
        if (++qmpErrors > 40) throw err;
        await sleep(25);
        continue;
      }
      if (status === 'running') break;
      if (status === 'paused' || status === 'postmigrate' || status === 'prelaunch') await this.qmp(localName, (q) => q.execute('cont'));
      else if (status !== 'inmigrate') throw new Error(`QEMU is ${status} after loading the snapshot`);
      if (Date.now() > deadline) throw new Error('the snapshot did not load within 120 s');
      await sleep(10);
    }
    for (const f of [STATE_FILE, MEMORY_FILE]) await unlink(join(dir, f)).catch(() => {}); // (QEMU keeps its mapping)
  }

  /** resumeWarm, once the guest runs: the VM's own identity, checked. */
  private async identifyWarm(localName: string, file: VmFile, w: { t0: number; key?: Buffer; id: Identity; agent?: Duplex }, progress: Progress, signal?: AbortSignal): Promise<void> {
    const { t0, key, id, agent } = w;
    const dir = this.vmDir(localName);
    const s = this.st(localName);
    const pending = file.warm!.pending!;
    const loaded = performance.now();
    // Checked from outside: a new connection gets one of the new host keys. The check starts as
    // soon as the script says its new dropbear listens, while the script goes on (it may take a
    // moment to listen: retried); both must be done before the VM is running.
    const check = async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          return await offeredHostKey(await this.dial(localName, 22));
        } catch (err) {
          if (attempt >= 40) throw err;
          await sleep(25);
        }
      }
    };
    let checking: Promise<Buffer> | undefined;
    const onLine = (l: string) => {
      if (l !== DROPBEAR_RESTARTED || checking) return;
      checking = check();
      checking.catch(() => {}); // awaited below; the script may fail first
    };
    let sshUp: number | undefined;
    let said: string[];
    if (agent) {
      // The template's agent waits on its port: no SSH login.
      said = (await runOverAgent(agent, identityScript(id, Date.now() / 1000), { onLine })).trim().split('\n');
    } else {
      if (!key) throw new Error(`image ${file.image} has no SSH key, and the snapshot no agent`);
      // The connection that first gets dropbear's banner is the one the identity is given over:
      // under TCG each new connection costs the guest a dropbear process, and the worker an nsenter + socat.
      const sock = await this.waitBanner(localName, signal, true);
      sshUp = performance.now();
      said = (await runAsRoot(sock, key, identityScript(id, Date.now() / 1000), { onLine })).trim().split('\n');
    }
    const identified = performance.now();
    const [hostname, mac] = said.slice(-2);
    if (hostname !== hostnameOf(pending.name)) throw new Error(`the guest calls itself ${hostname}, not ${hostnameOf(pending.name)}`);
    if (mac !== id.mac) throw new Error(`the guest's MAC is ${mac}, not ${id.mac}`);
    const offered = await (checking ?? check());
    if (!id.hostKeys.some((k) => keyBlob(k.publicLine).equals(offered))) throw new Error('the guest still offers a host key that is not its new one');
    const done = performance.now();
    await writeFile(join(dir, 'known_hosts'), id.hostKeys.map((k) => `* ${k.publicLine}\n`).join(''), { mode: 0o600 });
    await this.records.write({ ...file, mac: id.mac, warm: { snapshotCreated: file.warm!.snapshotCreated }, hostKeys: id.hostKeys.map((k) => k.publicLine) });
    const sec = (a: number, b: number) => ((b - a) / 1000).toFixed(2);
    const stages = { qemuStart: sec(t0, s.upAt ?? t0), stateLoaded: sec(t0, loaded), sshUp: sshUp && sec(t0, sshUp), identity: sec(sshUp ?? loaded, identified), checked: sec(identified, done), total: sec(t0, done) };
    this.log.info({ vm: localName, ...stages }, 'warm start: resumed with its own identity');
    const given = 'hostname, SSH host keys, machine-id, MAC, clock, user';
    progress(s.fromStandby
      ? `warm start: took a standby resumed from the snapshot of image ${file.image}, in ${stages.total}s (continued ${stages.stateLoaded}s, own identity ${stages.identity}s through the agent: ${given}; checked ${stages.checked}s)`
      : `warm start: resumed the snapshot of image ${file.image} in ${stages.total}s (QEMU up ${stages.qemuStart}s, state loaded ${stages.stateLoaded}s, ` +
        `${stages.sshUp ? `SSH ${stages.sshUp}s, own identity ${stages.identity}s` : `own identity ${stages.identity}s through the agent`}: ${given}; checked ${stages.checked}s)`);
  }

  /** Resolves once the guest answers SSH; with `keep`, with the connection that got the banner. */
  private async waitBanner(localName: string, signal?: AbortSignal): Promise<void>;
  private async waitBanner(localName: string, signal: AbortSignal | undefined, keep: true): Promise<Duplex>;
  private async waitBanner(localName: string, signal?: AbortSignal, keep = false): Promise<Duplex | void> {
    const deadline = Date.now() + this.readyTimeoutMs;
    for (;;) {
      signal?.throwIfAborted();
      if (!this.isRunning(localName)) {
        const consoleTail = await this.tail(localName, 'console.log', 20);
        const log = (await this.tail(localName, 'qemu.log', 6)).split('\n').filter((l) => l && !l.startsWith('VNC server running')).join('\n');
        const child = this.state.get(localName)?.child;
        const how = child?.signalCode ? ` (killed by ${child.signalCode})` : child?.exitCode != null ? ` (exit code ${child.exitCode})` : '';
        throw new Error(`VM ${localName}: QEMU exited before the guest was ready${how}` +
          (log ? `\nqemu: ${log}` : '') + (consoleTail ? `\nlast console lines:\n${consoleTail}` : ''));
      }
      if (Date.now() > deadline) {
        const consoleTail = await this.tail(localName, 'console.log', 20);
        throw new Error(`VM ${localName}: no SSH after ${Math.round(this.readyTimeoutMs / 1000)} s` +
          (consoleTail ? `\nlast console lines:\n${consoleTail}` : ''));
      }
      // User-mode networking accepts the TCP connection before the guest is up, and a SYN it
      // forwards too early is only retried seconds later: wait for the banner, short attempts.
      const sock = await this.dial(localName, 22).catch(() => undefined);
      if (sock && (await sshBannerOn(sock, 500, keep))) return keep ? sock : undefined;
      await sleep(100, undefined, { signal }).catch(() => signal?.throwIfAborted());
    }
  }

  async waitExit(localName: string): Promise<{ reason: string }> {
    const s = this.st(localName);
    const pid = this.livePid(localName);
    if (s.child && s.childExit && (pid === undefined || pid === s.child.pid)) {
      const { code, signal } = await s.childExit;
      await this.reapNetwork(localName);
      if (s.stopping) return { reason: 'stopped' };
      if (signal) return { reason: `QEMU was killed by ${signal}` };
      if (code === 0) return { reason: 'the guest powered off' };
      const log = await this.tail(localName, 'qemu.log', 3);
      return { reason: `QEMU exited with code ${code}${log ? `: ${log}` : ''}` };
    }
    if (pid === undefined) return { reason: 'not running' };
    // An adopted QEMU is not our child: its exit is polled, once for every caller (runs come and go
    // with suspends and resumes; their waits share the one poll).
    if (s.adoptedExit?.pid !== pid) {
      const gone = (async () => {
        while (this.livePid(localName) === pid) await sleep(250);
      })();
      s.adoptedExit = { pid, gone };
    }
    await s.adoptedExit.gone;
    await this.reapNetwork(localName);
    return { reason: s.stopping ? 'stopped' : 'QEMU exited' };
  }

  async ip(localName: string): Promise<string> {
    if (!(await this.records.read(localName))) throw new Error(`no VM ${localName}`);
    return USER_NET_GUEST_IP;
  }

  async dial(localName: string, port: number): Promise<Duplex> {
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`invalid port ${port}`);
    const what = `VM ${localName} port ${port}`;
    const fwd = await this.forwardOf(localName, port);
    if (!fwd.netns) return connectTCP('127.0.0.1', fwd.port, what);
    if (port === VNC_PORT) return connectUnix(this.socketPath(localName, fwd.pid, 'vnc.sock'), what);
    return connectInNetns(fwd.pid, fwd.port, what);
  }

  /**
   * Suspends by pausing the vCPUs (QMP `stop`); resume is QMP `cont`. The memory stays in the QEMU
   * process, which outlives the worker, so a restarted worker finds the VM suspended (vm.json's
   * `paused` names that QEMU's pid). Measured against saving the state to a file and exiting (QMP
   * `migrate` to a file, then `-incoming` to resume) with a 512 MiB debian-dev guest under TCG on a
   * 2-core host: pausing took 2 ms and resuming 1 ms (SSH answered 14 ms later), and the paused
   * QEMU used 0.00 s of CPU in 5 s while holding its 325 MiB RSS; saving took 0.63 s (95 MiB
   * written: the memory the guest had touched) and resuming 0.17 s plus a new QEMU, freeing that
   * memory meanwhile. Pausing wins: the suspended VM keeps its slot anyway, it is instant whatever
   * the guest's size (a save grows with the memory used), and it keeps what a save loses or refuses
   * to save: the user-mode network's connections and forwards, and host directories (9p exports
   * block migration). What it does not survive is a host reboot: the VM then boots afresh.
   */
  async suspend(localName: string): Promise<void> {
    const pid = this.requirePid(localName);
    const status = await this.qmp(localName, async (q) => {
      await q.execute('stop');
      return (await q.execute('query-status')) as { status: string };
    });
    if (status.status !== 'paused') throw new Error(`VM ${localName}: QEMU did not pause (status ${status.status})`);
    const file = await this.records.read(localName);
    if (file) await this.records.write({ ...file, paused: pid });
    this.log.info({ vm: localName, pid }, 'VM suspended (vCPUs paused)');
  }

  async resume(vm: DriverVM): Promise<boolean> {
    const pid = this.livePid(vm.localName);
    if (pid === undefined) return false;
    const file = await this.records.read(vm.localName);
    const status = (await this.qmp(vm.localName, (q) => q.execute('query-status'))) as { status: string };
    if (status.status === 'paused') await this.qmp(vm.localName, (q) => q.execute('cont'));
    if (file?.paused !== undefined) await this.records.write({ ...file, paused: undefined });
    if (status.status !== 'paused') return false;
    this.log.info({ vm: vm.localName, pid }, 'VM resumed');
    return true;
  }

  async stop(localName: string, graceMs = 10_000): Promise<void> {
    const pid = this.livePid(localName);
    if (pid === undefined) return;
    const s = this.st(localName);
    s.stopping = true;
    const gone = (ms: number) => this.waitGone(localName, pid, ms);
    if (graceMs > 0) {
      try {
        // A suspended guest cannot power off: it continues first, to shut down cleanly (its disk writes).
        await this.qmp(localName, async (q) => {
          if (((await q.execute('query-status')) as { status: string }).status === 'paused') await q.execute('cont');
          await q.execute('system_powerdown');
        }, 3000);
        if (await gone(graceMs)) return await this.stopped(localName, 'powered off');
      } catch (err) {
        this.log.warn({ vm: localName, err: String(err) }, 'system_powerdown failed');
      }
    }
    try {
      await this.qmp(localName, (q) => q.execute('quit'), 3000);
    } catch {
      // the connection may close before the reply arrives; checked below
    }
    if (await gone(3000)) return await this.stopped(localName, 'quit');
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
    if (await gone(5000)) return await this.stopped(localName, 'killed');
    throw new Error(`VM ${localName}: QEMU (pid ${pid}) did not exit`);
  }

  private async stopped(localName: string, how: string): Promise<void> {
    await this.reapNetwork(localName);
    this.log.info({ vm: localName }, `VM stopped (${how})`);
  }

  /**
   * Ends the pasta of a VM whose QEMU is gone. pasta does not notice on its own: it holds the
   * namespace open itself, so without this every stopped, crashed or restarted VM left one behind.
   * Only a process that is that VM's pasta (its command line names the QEMU pid it served) is killed.
   * net.pid names the last pasta started, which the record does not when the worker was killed
   * between pasta's start and the record's write.
   */
  private async reapNetwork(localName: string): Promise<void> {
    const started = await readFile(join(this.vmDir(localName), 'net.pid'), 'utf8').catch(() => '');
    const [netPid, pid] = started.split(' ').map(Number);
    if (netPid > 1 && pid > 1 && this.livePid(localName) !== pid) killPastaOf(pid, netPid);
    const file = await this.records.read(localName);
    if (!file?.netPid || !file.pid || this.livePid(localName) === file.pid) return;
    killPastaOf(file.pid, file.netPid);
  }

  private async waitGone(localName: string, pid: number, ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (this.livePid(localName) === pid) {
      if (Date.now() >= deadline) return false;
      await sleep(50);
    }
    return true;
  }

  async remove(localName: string): Promise<void> {
    const dir = this.vmDir(localName);
    await this.stop(localName, 0); // the disk goes too: no point in a graceful guest shutdown
    await this.reapNetwork(localName); // (a QEMU that had exited on its own left its pasta)
    await rm(dir, { recursive: true, force: true });
    this.state.delete(localName);
    this.log.info({ vm: localName }, 'VM removed');
  }
}

async function linkOrCopy(src: string, dst: string): Promise<void> {
  try {
    await link(src, dst);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EXDEV' && code !== 'EPERM' && code !== 'EMLINK') throw err;
    await copyFile(src, dst, fsConstants.COPYFILE_FICLONE);
  }
  await stat(dst);
}

