// Standbys: a warm start done ahead of the VM that takes it. A standby is a VM of a snapshot's image
// and shape that the worker has resumed from the snapshot (QEMU started, its state loaded), whose
// guest has run the identity script once with an identity of its own (guest-identity.ts
// warmUpScript) and then been paused. A fresh VM of that snapshot takes it (the driver renames the
// standby's directory to the VM's, qemu-process.ts) and only gives it its own identity: no QEMU to
// start, no state to load, and code the guest runs already translated by TCG (measured on 2 TCG
// cores: QEMU's start and the load 0.4-0.5 s, the identity 0.46-0.62 s the first time in a QEMU and
// 0.15-0.21 s after). The standby taken is then replaced, in the background.
//
// A standby holds its QEMU's own memory (70-130 MiB for debian-dev, besides the snapshot's memory
// file it shares) and no CPU while paused. The worker keeps at most `max` of them (none when warm
// starts are off): one at least of the snapshot a VM last resumed, the least recently wanted
// snapshot's making room, and more of it while there is room (for VMs asked for together). They are
// killed when the worker stops, when their snapshot goes, and, left behind by a worker that died, at
// the next start. Which snapshots were wanted is kept in a file: a worker that starts again makes
// the standbys it had (of snapshots still there), so its first VM too takes one.
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { DriverVM } from './driver.ts';
import { killQemuIn } from './qemu-process.ts';
import { leftBehind } from './snapshot-maker.ts';

const PREFIX = '.standby-';
/** After a standby of a snapshot failed, none is made for it for this long. */
const RETRY_MS = 60_000;

/** A ready standby: what a fresh VM of its snapshot takes over. */
export interface Standby {
  localName: string;
  dir: string;
  /** The snapshot's directory name (image@shape) and its `created`. */
  snapshot: string;
  created: string;
  /** The connected socket of the guest's agent: the VM's identity goes through it. */
  agent: Duplex;
}

/** What the standbys need of the driver. */
export interface StandbyHost {
  readonly vmsDir: string;
  readonly log: Logger;
  /** Prepares the standby like a VM (never from another standby); resolves with its snapshot, or undefined when it would boot cold. */
  prepare(vm: DriverVM): Promise<{ snapshot: string; created: string } | undefined>;
  start(vm: DriverVM): Promise<void>;
  /** Loads the snapshot's state into the started QEMU and continues the guest; resolves with its agent's socket. */
  load(localName: string): Promise<Duplex>;
  /** Runs the warm-up (guest-identity.ts warmUpScript) through the agent, which stays open. */
  warmUp(localName: string, agent: Duplex): Promise<void>;
  /** Pauses the guest (QMP stop). */
  pause(localName: string): Promise<void>;
  /** Drops what the driver keeps in memory of a standby gone or taken. */
  forget(localName: string): void;
}

export class Standbys {
  private readonly host: StandbyHost;
  private readonly max: number;
  /** Standbys being made or ready: their local name -> directory (not a VM's name: list() never sees them). */
  private readonly dirs = new Map<string, string>();
  /** Ready standbys, the least recently wanted snapshot's first. */
  private ready: Standby[] = [];
  /** The standby being made (one at a time: each is a QEMU's start and a guest's first run). */
  private making?: Promise<void>;
  /** Snapshots VMs resumed, the most recent last, with what their standbys are made like. */
  private readonly wanted = new Map<string, Pick<DriverVM, 'image' | 'cpu' | 'memory'>>();
  /** When a standby of a snapshot last failed. */
  private readonly failed = new Map<string, number>();
  private closed = false;
  /** Where `wanted` is kept across the worker's restarts. */
  private readonly wantedFile: string;
  private restored = false;
  private saving = Promise.resolve();

  constructor(host: StandbyHost, max: number, wantedFile: string) {
    this.host = host;
    this.max = max;
    this.wantedFile = wantedFile;
  }

  /** The directory of a standby (undefined for any other VM). */
  dirOf(localName: string): string | undefined {
    return this.dirs.get(localName);
  }

  /** The ready standbys: their snapshot and their QEMU's directory. */
  list(): { snapshot: string; dir: string }[] {
    return this.ready.map((s) => ({ snapshot: s.snapshot, dir: s.dir }));
  }

  /**
   * A ready standby of `snapshot` as it was `created`, now the caller's: it renames the directory,
   * then calls `taken` (till then the directory is still a standby's, which no tidy removes). Stale
   * ones are removed.
   */
  take(snapshot: string, created: string): Standby | undefined {
    for (const s of this.ready.filter((r) => r.snapshot === snapshot)) {
      if (s.created !== created) {
        void this.drop(s);
        continue;
      }
      this.ready = this.ready.filter((r) => r !== s);
      return s;
    }
    return undefined;
  }

  /** Standby `localName`, taken, is the caller's VM now (its directory renamed) or gone. */
  taken(localName: string): void {
    this.dirs.delete(localName);
  }

  /**
   * A VM like `vm` (image, shape) resumed `snapshot`: the worker keeps standbys of it, one at least
   * (the least recently wanted snapshot's making room), more while there is room. Made one after
   * the other, in the background: never rejects.
   */
  fill(vm: Pick<DriverVM, 'image' | 'cpu' | 'memory'>, snapshot: string): void {
    if (this.max < 1 || this.closed) return;
    this.wanted.delete(snapshot);
    this.wanted.set(snapshot, { image: vm.image, cpu: vm.cpu, memory: vm.memory });
    if (this.wanted.size > 64) this.wanted.delete(this.wanted.keys().next().value!);
    this.save();
    // its standbys last in line for eviction
    this.ready = [...this.ready.filter((s) => s.snapshot !== snapshot), ...this.ready.filter((s) => s.snapshot === snapshot)];
    this.topUp();
  }

  /** Writes `wanted` to its file, one write after the other (not synced: a lost file costs the next start its standbys, nothing else). */
  private save(): void {
    this.saving = this.saving
      .then(() => writeFile(this.wantedFile, JSON.stringify([...this.wanted]) + '\n', { mode: 0o600 }))
      .catch((err: Error) => this.host.log.debug({ err: err.message }, 'cannot keep the standbys wanted'));
  }

  /**
   * Once, at the worker's start: the snapshots wanted before it (the file `fill` keeps), those that
   * `exists` still, the most recent last; their standbys are made as after a VM resumed the last one.
   */
  async restore(exists: (snapshot: string) => Promise<boolean>): Promise<void> {
    if (this.restored || this.max < 1) return;
    this.restored = true;
    let kept: unknown;
    try {
      kept = JSON.parse(await readFile(this.wantedFile, 'utf8'));
    } catch {
      return; // none yet, or unreadable: VMs will say what is wanted
    }
    if (!Array.isArray(kept)) return;
    const valid = (e: unknown): e is [string, Pick<DriverVM, 'image' | 'cpu' | 'memory'>] => {
      if (!Array.isArray(e) || typeof e[0] !== 'string' || typeof e[1] !== 'object' || e[1] === null) return false;
      const { image, cpu, memory } = e[1] as Record<string, unknown>;
      return typeof image === 'string' && typeof cpu === 'number' && typeof memory === 'number';
    };
    const before: [string, Pick<DriverVM, 'image' | 'cpu' | 'memory'>][] = [];
    for (const [snapshot, { image, cpu, memory }] of kept.filter(valid).slice(-64)) {
      if (await exists(snapshot)) before.push([snapshot, { image, cpu, memory }]);
    }
    // older than what VMs wanted since this start (meanwhile)
    const merged = [...before.filter(([snapshot]) => !this.wanted.has(snapshot)), ...this.wanted];
    this.wanted.clear();
    for (const [snapshot, like] of merged) this.wanted.set(snapshot, like);
    this.topUp();
  }

  /** Makes the next standby the most recently wanted snapshot should have, if any. */
  private topUp(): void {
    if (this.making || this.closed) return;
    const [snapshot, like] = [...this.wanted].at(-1) ?? [];
    if (!snapshot || !like || Date.now() - (this.failed.get(snapshot) ?? -Infinity) < RETRY_MS) return;
    if (this.ready.length >= this.max) {
      if (this.ready.some((s) => s.snapshot === snapshot)) return;
      void this.drop(this.ready[0]);
    }
    this.making = this.make(like, snapshot).catch((err: Error) => {
      if (this.closed) return;
      this.failed.set(snapshot, Date.now());
      this.host.log.warn({ image: like.image, err: err.message }, 'cannot make a standby');
    }).finally(() => {
      this.making = undefined;
      this.topUp();
    });
  }

  private async make(like: Pick<DriverVM, 'image' | 'cpu' | 'memory'>, snapshot: string): Promise<void> {
    const localName = `orchard-standby-${randomUUID()}-0`;
    const dir = join(this.host.vmsDir, `${PREFIX}${process.pid}-${Date.now()}`);
    this.dirs.set(localName, dir);
    const vm: DriverVM = {
      // (a standby pulls nothing: its image is there, the VM before it resumed its snapshot)
      localName, uid: 'standby', name: 'orchard-standby', image: like.image, imagePullPolicy: 'IfNotPresent',
      cpu: like.cpu, memory: like.memory, username: 'admin', password: randomUUID(),
    };
    let agent: Duplex | undefined;
    const open = () => {
      if (this.closed) throw new Error('the worker stops');
    };
    try {
      const made = await this.host.prepare(vm);
      if (!made) throw new Error(`VMs of image ${vm.image} with ${vm.cpu} CPU and ${vm.memory} MiB boot cold on this worker`);
      if (made.snapshot !== snapshot) throw new Error(`prepared from snapshot ${made.snapshot}, not ${snapshot}`);
      open();
      await this.host.start(vm);
      open();
      agent = await this.host.load(localName);
      open();
      await this.host.warmUp(localName, agent);
      await this.host.pause(localName);
      open();
      const standby = { localName, dir, snapshot, created: made.created, agent };
      this.ready.push(standby);
      // Its agent's connection ends only with its QEMU (killed by someone else, crashed): no VM takes it then.
      agent.once('close', () => {
        if (!this.ready.includes(standby)) return;
        this.host.log.warn({ image: vm.image, snapshot }, 'a standby\'s QEMU ended: removed');
        void this.drop(standby);
      });
      this.host.log.info({ image: vm.image, snapshot }, 'standby ready');
    } catch (err) {
      agent?.destroy();
      this.dirs.delete(localName);
      await this.removeDir(localName, dir);
      throw err;
    }
  }

  /** Removes the standbys whose snapshot is no longer `current` (gone or made again). */
  async prune(current: (snapshot: string) => Promise<string | undefined>): Promise<void> {
    for (const s of this.ready) {
      if ((await current(s.snapshot)) === s.created || !this.ready.includes(s)) continue;
      await this.drop(s);
    }
  }

  /** Removes the standbys of workers that died (their agent's connection went with them: useless now). */
  async removeLeftBehind(): Promise<void> {
    for (const e of await readdir(this.host.vmsDir).catch(() => [] as string[])) {
      const dir = join(this.host.vmsDir, e);
      if (!e.startsWith(PREFIX) || [...this.dirs.values()].includes(dir) || !leftBehind(e)) continue;
      killQemuIn(dir);
      await rm(dir, { recursive: true, force: true });
      this.host.log.info({ dir }, 'removed a standby left behind');
    }
  }

  /** Removes every standby; none is made after. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...[...this.ready].map((s) => this.drop(s)), this.making]);
  }

  /** Ends ready standby `s`: out of the ready ones at once, then discarded. */
  private drop(s: Standby): Promise<void> {
    this.ready = this.ready.filter((r) => r !== s);
    this.dirs.delete(s.localName);
    return this.discard(s);
  }

  /** Ends standby `s` (ready, or taken and not wanted after all): its QEMU killed, its directory removed. */
  async discard(s: Standby): Promise<void> {
    s.agent.destroy();
    await this.removeDir(s.localName, s.dir);
  }

  private async removeDir(localName: string, dir: string): Promise<void> {
    killQemuIn(dir);
    this.host.forget(localName);
    await rm(dir, { recursive: true, force: true }).catch(() => {});
  }
}
