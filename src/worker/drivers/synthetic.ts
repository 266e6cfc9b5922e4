// In-memory VMs for load tests (upstream's --synthetic): they "boot" after an optional delay and
// every port answers as an echo server; images "pull" (progress included) in an optional time and
// are then held. Nothing survives the worker process.
import { Duplex } from 'node:stream';
import type { RegistryCredentials } from '../../api/worker-protocol.ts';
import type { Driver, DriverImages, DriverVM, LocalVM, Progress } from './driver.ts';

interface SyntheticVM {
  vm: DriverVM;
  running: boolean;
  /** paused, its memory kept (running stays true, as a qemu VM's) */
  suspended?: boolean;
  starts: number;
  exit: Promise<{ reason: string }>;
  stopped: (reason: string) => void;
}

/** A connected pair where whatever is written comes back (an echo server, without a socket). */
function echoStream(): Duplex {
  const echo: Duplex = new Duplex({
    read() {},
    write(chunk, _enc, cb) {
      echo.push(chunk);
      cb();
    },
    final(cb) {
      echo.push(null);
      cb();
    },
  });
  return echo;
}

export class SyntheticDriver implements Driver {
  readonly runtime = 'synthetic';
  private readonly vms = new Map<string, SyntheticVM>();
  private readonly bootDelayMs: number;
  private readonly pullMs: number;
  private readonly heldImages = new Set<string>();
  /** The registry settings the controller sent last (tests read them). */
  registries: RegistryCredentials[] = [];
  readonly images: DriverImages = {
    setRegistries: (registries) => (this.registries = registries),
    pull: (image, progress) => this.pull(image, progress),
    held: async () => [...this.heldImages].sort(),
  };

  constructor(opts: { bootDelayMs?: number; pullMs?: number } = {}) {
    this.bootDelayMs = opts.bootDelayMs ?? 0;
    this.pullMs = opts.pullMs ?? 0;
  }

  /** A pull of a made-up 100 MiB image that takes pullMs, with progress every 100 ms. */
  private async pull(image: string, progress: Progress) {
    const total = 100;
    const t0 = Date.now();
    for (let done = 0; ; ) {
      const seconds = (Date.now() - t0) / 1000;
      const rate = seconds > 0 ? done / seconds : 0;
      progress(`pulling ${image}: ${done} % of ${total} MiB, ${rate.toFixed(0)} MiB/s${rate > 0 ? `, about ${Math.ceil((total - done) / rate)} s left` : ''}`);
      if (done >= total || this.pullMs === 0) break;
      await new Promise((r) => setTimeout(r, 100));
      done = Math.min(total, Math.round(((Date.now() - t0) / this.pullMs) * total));
    }
    this.heldImages.add(image);
  }

  private get(localName: string): SyntheticVM {
    const vm = this.vms.get(localName);
    if (!vm) throw new Error(`synthetic VM ${localName} does not exist`);
    return vm;
  }

  async list(): Promise<LocalVM[]> {
    return [...this.vms.values()].map((v) => ({ localName: v.vm.localName, uid: v.vm.uid, running: v.running, ...(v.suspended ? { suspended: true } : {}), image: v.vm.image, cpu: v.vm.cpu, memory: v.vm.memory }));
  }

  async prepare(vm: DriverVM): Promise<void> {
    const existing = this.vms.get(vm.localName);
    if (existing) {
      existing.vm = vm; // a new spec for the same VM
      return;
    }
    let stopped!: (reason: string) => void;
    const exit = new Promise<{ reason: string }>((resolve) => (stopped = (reason) => resolve({ reason })));
    this.vms.set(vm.localName, { vm, running: false, starts: 0, exit, stopped });
    this.heldImages.add(vm.image);
  }

  async start(vm: DriverVM): Promise<void> {
    const v = this.get(vm.localName);
    if (!v.running) {
      // A fresh exit promise for this boot (the previous one settled when it stopped).
      v.exit = new Promise((resolve) => (v.stopped = (reason) => resolve({ reason })));
      v.starts++;
    }
    v.running = true;
  }

  /** The spec a VM was last prepared with, and how often it was started (tests). */
  describe(localName: string): { vm: DriverVM; running: boolean; starts: number } | undefined {
    const v = this.vms.get(localName);
    return v && { vm: v.vm, running: v.running, starts: v.starts };
  }

  async waitReady(localName: string, signal?: AbortSignal): Promise<void> {
    this.get(localName);
    if (this.bootDelayMs > 0) await new Promise((r) => setTimeout(r, this.bootDelayMs));
    signal?.throwIfAborted();
    if (!this.get(localName).running) throw new Error(`synthetic VM ${localName} stopped while booting`);
  }

  waitExit(localName: string) {
    return this.get(localName).exit;
  }

  async ip(localName: string) {
    this.get(localName);
    return '127.0.0.1';
  }

  async dial(localName: string, _port: number): Promise<Duplex> {
    if (!this.get(localName).running) throw new Error(`synthetic VM ${localName} is not running`);
    return echoStream();
  }

  async suspend(localName: string): Promise<void> {
    const v = this.get(localName);
    if (!v.running) throw new Error(`synthetic VM ${localName} is not running`);
    v.suspended = true;
  }

  async resume(vm: DriverVM): Promise<boolean> {
    const v = this.get(vm.localName);
    if (!v.suspended) return false;
    v.suspended = false;
    return true;
  }

  async stop(localName: string): Promise<void> {
    const vm = this.vms.get(localName);
    if (!vm || !vm.running) return;
    vm.running = false;
    vm.suspended = false;
    vm.stopped('stopped');
  }

  async remove(localName: string): Promise<void> {
    await this.stop(localName);
    this.vms.delete(localName);
  }
}
