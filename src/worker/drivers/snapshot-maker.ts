// Makes and finds the warm-start snapshots of a qemu worker's images (the files: snapshots.ts): boots
// an image once as a template with a fixed identity, saves its state and freezes its disk, once per
// image however many VMs ask meanwhile; says why a VM must cold-boot instead. It runs the template
// through the driver like any VM (TemplateHost), in a directory of its own outside `vms/`.
import { existsSync } from 'node:fs';
import { readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { imageDirName, resolveImage, type ResolvedImage } from '../images.ts';
import { privateFiles } from '../private-files.ts';
import type { DriverVM, Progress } from './driver.ts';
import type { Accel } from './accel.ts';
import type { QmpClient } from './qmp.ts';
import { AGENT_START, runAsRoot, runOverAgent } from './guest-identity.ts';
import { virtualSize } from './qemu-img.ts';
import { killQemuIn } from './qemu-process.ts';
import { fsyncPath } from '../oci/download.ts';
import { binaryId, fileId, listSnapshots, MEMORY_FILE, readSnapshotMeta, SNAPSHOT_FILE, snapshotLinks, staleReason, STATE_FILE, type SnapshotMeta } from './snapshots.ts';

/** Snapshot directories being removed are first renamed to this prefix + their name + `-<pid>-<ms>`. */
const GONE_PREFIX = '.gone-';

/** What a snapshot is made for: the CPU count and memory (MiB) of the VMs that resume it. */
export interface Shape {
  cpu: number;
  memory: number;
}

/**
 * Snapshots an image has on a worker, one per shape, made by the first VM of each: a VM of a further
 * shape cold-boots (each snapshot costs a template boot and the disk the guest's memory takes).
 */
export const SHAPES_PER_IMAGE = 4;

/** What the maker needs of the driver: its settings, and running a template like any VM. */
export interface TemplateHost {
  readonly accel: Accel;
  readonly qemuBinary: string;
  readonly imagesDir: string;
  readonly dataDir: string;
  readonly log: Logger;
  /** `template`: the VM's memory is the file MEMORY_FILE in its directory, mapped shared. */
  prepare(vm: DriverVM, progress: Progress, opts: { cold: true; template: true }): Promise<void>;
  start(vm: DriverVM): Promise<void>;
  waitReady(localName: string): Promise<void>;
  dial(localName: string, port: number): Promise<Duplex>;
  /** The socket of a VM's agent channel (guest-identity.ts AGENT_START). */
  agent(localName: string): Promise<Duplex>;
  stop(localName: string, graceMs: number): Promise<void>;
  qmp<T>(localName: string, fn: (q: QmpClient) => Promise<T>): Promise<T>;
  /** The template's record (vm.json): its kernel files, command line and MAC. */
  record(localName: string): Promise<{ kernel?: string; initrd?: string; cmdline?: string; mac?: string } | undefined>;
  /** Drops what the driver keeps in memory of a template that is gone. */
  forget(localName: string): void;
}

interface Snapshotting {
  done: Promise<SnapshotMeta>;
  making: boolean;
  onMaking: (() => void)[];
}

export class SnapshotMaker {
  private readonly host: TemplateHost;
  /** Templates being booted for a snapshot: their local name -> their directory (not under vms/, so list() never sees them). */
  private readonly templateDirs = new Map<string, string>();
  /**
   * Snapshots being looked at, and made if need be (`making`), by their directory's name: VMs that
   * need one meanwhile wait for the same answer (and say so once it is being made: `onMaking`).
   */
  private readonly snapshotting = new Map<string, Snapshotting>();
  /** Image names whose snapshot VMs are being prepared from (its files linked): removeStale leaves those. */
  private readonly holds = new Map<string, number>();

  constructor(host: TemplateHost) {
    this.host = host;
  }

  /** The directory of a template being booted (undefined for any other VM). */
  templateDir(localName: string): string | undefined {
    return this.templateDirs.get(localName);
  }

  /** Where the warm-start snapshot of image `name` for VMs of `shape` is kept (snapshots.ts). */
  snapshotDir(name: string, shape: Shape): string {
    return join(this.root, `${imageDirName(name)}@${shape.cpu}cpu-${shape.memory}mib`);
  }

  /** The record of the snapshot in directory `snapshot` (a snapshotDir's name), if there is one. */
  meta(snapshot: string): Promise<SnapshotMeta | undefined> {
    return readSnapshotMeta(join(this.root, snapshot));
  }

  private get root(): string {
    return join(this.host.dataDir, 'snapshots');
  }

  /** The shapes image `name` has snapshots of, or being made, on this worker. */
  private async shapesOf(name: string): Promise<string[]> {
    const prefix = `${imageDirName(name)}@`;
    const made = (await readdir(this.root).catch(() => [] as string[])).filter((e) => e.startsWith(prefix) && existsSync(join(this.root, e, SNAPSHOT_FILE)));
    return [...new Set([...made, ...[...this.snapshotting.keys()].filter((e) => e.startsWith(prefix))])];
  }

  /** Keeps image `name`'s snapshot from removeStale until the function returned is called (a VM's prepare links its files). */
  hold(name: string): () => void {
    this.holds.set(name, (this.holds.get(name) ?? 0) + 1);
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      const n = this.holds.get(name)! - 1;
      if (n) this.holds.set(name, n);
      else this.holds.delete(name);
    };
  }

  /**
   * Removes the snapshots no VM will resume: of images this worker no longer has (`current` gives
   * the images of that name it has now: none) or that changed since, and those made by another QEMU
   * or accelerator or an older version (the next VM would make a new one anyway); and the templates
   * of makers that died (removeAbandonedTemplates). A snapshot holds hard links to its image's files:
   * left alone, a rebuilt, re-pulled or evicted image would keep its disk space. VMs made from a
   * snapshot keep working: they hold links of their own to its files. Snapshots being made, or
   * being linked by a VM's prepare (hold), stay.
   */
  async removeStale(current: (name: string) => Promise<ResolvedImage[]>): Promise<void> {
    await this.removeAbandonedTemplates();
    const root = this.root;
    const qemu = await binaryId(this.host.qemuBinary);
    for (const e of await readdir(root).catch(() => [] as string[])) {
      const dir = join(root, e);
      if (e.startsWith(GONE_PREFIX)) {
        // One this process or a dead one began to remove (renamed away first, then removed).
        if (leftBehind(e)) await rm(dir, { recursive: true, force: true });
        continue;
      }
      if (e.startsWith('.')) continue;
      const meta = await readSnapshotMeta(dir);
      if (!meta) continue; // not one of ours as we know them
      try {
        let why: string | undefined;
        if (this.snapshotDir(meta.image, meta) !== dir) why = 'made by an older version (one snapshot per image, whatever the shape)';
        else {
          why = `image ${meta.image} is no longer on this worker`;
          for (const image of await current(meta.image)) {
            why = await staleReason(meta, this.imageFiles(image), this.host.accel, qemu);
            if (!why) break;
          }
        }
        // Checked again after the awaits, and the rename issued in the same turn: a snapshot made
        // meanwhile is renamed into place only once its making is over.
        if (!why || this.snapshotting.has(e) || this.holds.has(meta.image)) continue;
        const gone = join(root, `${GONE_PREFIX}${e}-${process.pid}-${Date.now()}`);
        await rename(dir, gone);
        await rm(gone, { recursive: true, force: true });
        this.host.log.info({ image: meta.image, why }, 'removed a snapshot no VM will resume');
      } catch (err) {
        this.host.log.warn({ image: meta.image, err: (err as Error).message }, 'cannot tell whether a snapshot is still of use: kept');
      }
    }
  }

  /** The image files the snapshots link, by `dev:ino`, with how many links of theirs each has: no VM's use of the image. */
  async imageLinks(): Promise<Map<string, number>> {
    return snapshotLinks(await listSnapshots(this.root));
  }

  /** The snapshot a VM resumes, or why it cold-boots. */
  async snapshotFor(vm: DriverVM, image: ResolvedImage, progress: Progress): Promise<SnapshotMeta | { cold: string }> {
    const cold = (why: string) => ({ cold: why });
    if (!image.sshKey && !image.bootAgent) return cold(`image ${vm.image} has no SSH key nor agent for the worker to give a VM resumed from a snapshot its own identity`);
    if (vm.hostDirs?.length) return cold('host directories (9p) cannot be part of a saved state');
    if (vm.diskSize && vm.diskSize > 0) {
      const size = await virtualSize(image.disk);
      if (Math.round(vm.diskSize * 1024 ** 3) > size) return cold(`diskSize ${vm.diskSize} GB is larger than the image's disk, and a resumed guest would not grow its file system`);
    }
    const shape = { cpu: vm.cpu, memory: vm.memory };
    const shapes = await this.shapesOf(vm.image);
    if (shapes.length >= SHAPES_PER_IMAGE && !shapes.includes(basename(this.snapshotDir(vm.image, shape)))) {
      return cold(`image ${vm.image} has snapshots for ${shapes.length} other shapes of VM on this worker, the most it keeps (${shapes.map((e) => e.slice(e.lastIndexOf('@') + 1)).sort().join(', ')}); this VM asks for ${vm.cpu} CPU and ${vm.memory} MiB`);
    }
    let meta: SnapshotMeta;
    try {
      meta = await this.snapshot(vm.image, shape, progress, image);
    } catch (err) {
      this.host.log.warn({ image: vm.image, err: (err as Error).message }, 'cannot make a snapshot');
      return cold(`the snapshot of image ${vm.image} could not be made: ${(err as Error).message}`);
    }
    if (meta.unusable) return cold(meta.unusable);
    if (meta.cpu !== vm.cpu || meta.memory !== vm.memory) {
      return cold(`the snapshot of image ${vm.image} on this worker has ${meta.cpu} CPU and ${meta.memory} MiB; this VM asks for ${vm.cpu} CPU and ${vm.memory} MiB`);
    }
    return meta;
  }

  /** Snapshot file name -> the image file it is a link to. */
  private imageFiles(image: ResolvedImage): Record<string, string> {
    const files: Record<string, string> = { 'base.qcow2': image.disk };
    if (image.kind === 'kernel') {
      files[image.kernel!.endsWith('vmlinux') ? 'vmlinux' : 'vmlinuz'] = image.kernel!;
      files['initrd.img'] = image.initrd!;
    }
    return files;
  }

  /**
   * The warm-start snapshot of image `name` for VMs of `shape` on this worker (snapshots.ts): the one
   * there when it is up to date, else a new one, made once however many VMs ask meanwhile.
   */
  async snapshot(name: string, shape: Shape, progress: Progress = () => {}, resolved?: ResolvedImage): Promise<SnapshotMeta> {
    const image = resolved ?? await resolveImage(this.host.imagesDir, name);
    const key = basename(this.snapshotDir(name, shape));
    const qemu = await binaryId(this.host.qemuBinary);
    for (;;) {
      const other = this.snapshotting.get(key);
      if (other) {
        const waiting = () => progress(`waiting for the snapshot of image ${name} being made on this worker`);
        if (other.making) waiting();
        else other.onMaking.push(waiting);
        await other.done.catch(() => {});
        continue;
      }
      // Looked at, and made if need be, by one VM at a time, registered before the first await: two
      // VMs of a new shape asking at once each made one, and the second's rename replaced the
      // directory the first VM was linking its files from (CI: ENOENT on its initrd.img).
      const state = { making: false, onMaking: [] as (() => void)[] };
      const entry: Snapshotting = Object.assign(state, { done: this.lookOrMake(state, name, image, shape, qemu, progress) });
      this.snapshotting.set(key, entry);
      try {
        return await entry.done;
      } finally {
        if (this.snapshotting.get(key) === entry) this.snapshotting.delete(key);
      }
    }
  }

  /** The snapshot of image `name` for `shape` if it is there and up to date, else a new one (`state.making` then). */
  private async lookOrMake(state: Omit<Snapshotting, 'done'>, name: string, image: ResolvedImage, shape: Shape, qemu: string, progress: Progress): Promise<SnapshotMeta> {
    const meta = await readSnapshotMeta(this.snapshotDir(name, shape));
    const stale = meta && await staleReason(meta, this.imageFiles(image), this.host.accel, qemu);
    if (meta && !stale) return meta;
    state.making = true;
    for (const say of state.onMaking) say();
    progress(stale ? `the snapshot of image ${name} is out of date (${stale}): making a new one`
      : `making a snapshot of image ${name} for warm starts of VMs with ${shape.cpu} CPU and ${shape.memory} MiB (once on this worker)`);
    await this.removeAbandonedTemplates(name);
    return this.makeSnapshot(image, shape, qemu, progress);
  }

  /**
   * A template whose maker is gone (a worker killed or stopped while it made a snapshot) keeps its
   * QEMU and its pasta running, detached like every VM's: both are killed and its directory removed.
   */
  private async removeAbandonedTemplates(name?: string): Promise<void> {
    const root = this.root;
    const prefix = name === undefined ? '.make-' : `.make-${imageDirName(name)}@`;
    const entries = await readdir(root).catch(() => [] as string[]);
    for (const e of entries) {
      if (!e.startsWith(prefix)) continue;
      const dir = join(root, e);
      if ([...this.templateDirs.values()].includes(dir)) continue;
      // .make-<snapshot dir name>-<maker's pid>-<ms>: another process (orchard image snapshot,
      // another worker on this data dir) may still be at it
      if (!leftBehind(e)) continue;
      killQemuIn(dir);
      await rm(dir, { recursive: true, force: true });
      this.host.log.info({ dir }, 'removed an abandoned snapshot template');
    }
  }

  /**
   * Boots the image once (a template with a fixed identity), waits for SSH, checks that the guest
   * has what re-identification uses (through the image's own agent, else logged in over SSH with
   * the image's key, and then starts the agent: AGENT_START), saves its state (QMP `migrate` to a file, the vCPUs
   * stopped first so the memory and the disk overlay are one consistent moment) and keeps its disk
   * overlay frozen next to it. Made in a temporary directory, renamed into place when complete.
   */
  private async makeSnapshot(image: ResolvedImage, shape: Shape, qemu: string, progress: Progress): Promise<SnapshotMeta> {
    const final = this.snapshotDir(image.name, shape);
    const tmp = join(dirname(final), `.make-${basename(final)}-${process.pid}-${Date.now()}`);
    const localName = `orchard-snapshot-${randomUUID()}-0`;
    this.templateDirs.set(localName, tmp);
    const vm: DriverVM = {
      localName, uid: 'snapshot-template', name: 'orchard-template', image: image.name, imagePullPolicy: 'IfNotPresent',
      cpu: shape.cpu, memory: shape.memory, username: 'admin', password: 'admin',
    };
    const t0 = Date.now();
    let t1 = 0;
    let agentSock: Duplex | undefined;
    try {
      await this.host.prepare(vm, () => {}, { cold: true, template: true });
      const file = (await this.host.record(localName))!;
      const files: Record<string, string> = {};
      for (const f of Object.keys(this.imageFiles(image))) files[f] = await fileId(join(tmp, f));
      progress(`snapshot of image ${image.name}: booting the template`);
      await this.host.start(vm);
      // The image's own agent (bootAgent) keeps running only if its port's host side is connected
      // when the guest starts it: now, before the guest boots.
      if (image.bootAgent) agentSock = await this.host.agent(localName);
      await this.host.waitReady(localName);
      const bootSeconds = (Date.now() - t0) / 1000;
      const meta: SnapshotMeta = {
        image: image.name, files, kind: image.kind, kernel: file.kernel, initrd: file.initrd, cmdline: file.cmdline,
        cpu: shape.cpu, memory: shape.memory, accel: this.host.accel, qemu, mac: file.mac!, knownHosts: image.knownHosts,
        created: new Date().toISOString(), bootSeconds, memoryFile: MEMORY_FILE,
      };
      // What identityScript uses.
      const probe = 'set -e; for c in dropbear ip arping date rm; do command -v $c >/dev/null || { echo "no $c" >&2; exit 1; }; done; ' +
        'test -s /run/dropbear.pid; test -d /etc/dropbear';
      try {
        if (agentSock) await runOverAgent(agentSock, probe + '\n', { timeoutMs: 60_000, keepOpen: true });
        else await runAsRoot(await this.host.dial(localName, 22), await readFile(join(tmp, 'id_ed25519')), probe + '\n', { timeoutMs: 60_000 });
      } catch (err) {
        meta.unusable = `the guest of image ${image.name} cannot be given its own identity after a resume (it needs dropbear and busybox's ip, arping, date, rm${agentSock ? ', and the agent its command line starts' : ''}): ${(err as Error).message}`;
      }
      // Its own agent waits for the next script, the VM's identity, on its connected port.
      if (agentSock && !meta.unusable) meta.agent = true;
      if (!agentSock && !meta.unusable) {
        // Last before the save: the agent that gives VMs their identity without an SSH login (else
        // over SSH). Its port is saved connected (each VM's is connected before the load).
        meta.agent = await (async () => {
          agentSock = await this.host.agent(localName);
          await runAsRoot(await this.host.dial(localName, 22), await readFile(join(tmp, 'id_ed25519')), AGENT_START, { timeoutMs: 60_000 });
          return true;
        })().catch((err: Error) => {
          this.host.log.warn({ image: image.name, err: err.message }, 'cannot start the identity agent in the template: VMs get their identity over SSH');
          return false;
        });
      }
      if (!meta.unusable) {
        progress(`snapshot of image ${image.name}: saving the template's state`);
        t1 = Date.now();
        await this.host.qmp(localName, async (q) => {
          await q.execute('stop');
          // The memory is in MEMORY_FILE already (mapped shared): the state is the devices'.
          await q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
          // QEMU 7.2 has no file: migration URI; its cwd is the directory, so the path is relative.
          await q.execute('migrate', { uri: `exec:cat > ${STATE_FILE}` });
        });
        for (;;) {
          const m = (await this.host.qmp(localName, (q) => q.execute('query-migrate'))) as { status?: string; 'error-desc'?: string };
          if (m.status === 'completed') break;
          if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`saving the template's state failed: ${m['error-desc'] ?? m.status}`);
          if (Date.now() - t1 > 300_000) throw new Error('saving the template\'s state took more than 5 minutes');
          await sleep(20);
        }
        meta.stateBytes = (await stat(join(tmp, STATE_FILE))).size;
        meta.memoryBytes = (await stat(join(tmp, MEMORY_FILE))).blocks * 512;
      }
      await this.host.stop(localName, 0);
      // On disk before the snapshot is in place: the template wrote its memory through a mapping.
      if (!meta.unusable) for (const f of [MEMORY_FILE, STATE_FILE, 'disk.qcow2']) await fsyncPath(join(tmp, f));
      meta.saveSeconds = meta.unusable ? undefined : (Date.now() - t1) / 1000;
      // (an unusable snapshot keeps no memory: no VM resumes it)
      for (const f of ['cidata', 'qmp.sock', 'vnc.sock', 'agent.sock', 'qemu.pid', 'net.pid', 'vm.json', ...(meta.unusable ? [MEMORY_FILE] : [])]) await rm(join(tmp, f), { recursive: true, force: true });
      await writeFile(join(tmp, SNAPSHOT_FILE), JSON.stringify(meta, null, 2) + '\n', { mode: 0o600 });
      // QEMU's `cat` made the state file with the worker's umask: 0600 like every VM file.
      await privateFiles(tmp);
      await rm(final, { recursive: true, force: true });
      await rename(tmp, final);
      this.host.log.info({ image: image.name, bootSeconds, saveSeconds: meta.saveSeconds, stateBytes: meta.stateBytes, memoryBytes: meta.memoryBytes, unusable: meta.unusable }, 'image snapshot made');
      progress(meta.unusable ? `snapshot of image ${image.name}: not usable: ${meta.unusable}`
        : `snapshot of image ${image.name} made in ${((Date.now() - t0) / 1000).toFixed(1)}s (template booted in ${bootSeconds.toFixed(1)}s, state saved in ${meta.saveSeconds!.toFixed(2)}s: ${Math.round(meta.stateBytes! / 2 ** 20)} MiB of devices, ${Math.round(meta.memoryBytes! / 2 ** 20)} MiB of memory)`);
      return meta;
    } finally {
      agentSock?.destroy();
      await this.host.stop(localName, 0).catch(() => {});
      this.templateDirs.delete(localName);
      this.host.forget(localName);
      await rm(tmp, { recursive: true, force: true });
    }
  }
}

/**
 * Whether what `entry` (`…-<pid>-<ms>`: a template being made, a snapshot being removed) was named for
 * is left behind: its process is this one, or no longer runs.
 */
export function leftBehind(entry: string): boolean {
  const pid = Number(/-(\d+)-\d+$/.exec(entry)?.[1]);
  return pid === process.pid || !(pid > 0 && existsSync(`/proc/${pid}`));
}
