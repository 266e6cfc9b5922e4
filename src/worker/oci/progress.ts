// What a pull is doing, as a value and as the one line people read in a VM's events and status:
//   pulling team/ubuntu:24.04: 37 % of 612 MiB, 110 MiB/s, about 4 s left

export type PullPhase = 'resolving' | 'downloading' | 'unpacking' | 'converting' | 'done' | 'cached';

export interface PullProgress {
  /** repository:tag without the registry host (shortName) */
  image: string;
  phase: PullPhase;
  /** bytes downloaded so far (downloading), of `total` (the image's compressed layers) */
  done: number;
  total: number;
  /** averaged over the last few seconds; absent until there is a measure */
  bytesPerSecond?: number;
  /** seconds since the pull started (done) */
  seconds?: number;
  /** the registry host (resolving) or the manifest digest (done, cached) */
  detail?: string;
  /** `pulling` unless said (a push's upload says `pushing`) */
  verb?: string;
}

export type PullProgressFn = (p: PullProgress) => void;

const MiB = 1024 * 1024;

export function formatBytes(n: number): string {
  if (n >= 10 * 1024 * MiB) return `${(n / 1024 / MiB).toFixed(1)} GiB`;
  if (n >= 10 * MiB) return `${Math.round(n / MiB)} MiB`;
  return `${(n / MiB).toFixed(1)} MiB`;
}

function formatRate(bps: number): string {
  const m = bps / MiB;
  return `${m >= 10 ? Math.round(m) : m.toFixed(1)} MiB/s`;
}

function formatSeconds(s: number): string {
  if (s < 90) return `${Math.max(1, Math.round(s))} s`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function formatPullProgress(p: PullProgress): string {
  switch (p.phase) {
    case 'resolving':
      return `pulling ${p.image}: asking ${p.detail ?? 'the registry'}`;
    case 'downloading': {
      const pct = p.total > 0 ? Math.floor((p.done / p.total) * 100) : 0;
      let line = `${p.verb ?? 'pulling'} ${p.image}: ${pct} % of ${formatBytes(p.total)}`;
      if (p.bytesPerSecond && p.bytesPerSecond > 0) {
        line += `, ${formatRate(p.bytesPerSecond)}`;
        if (p.done < p.total) line += `, about ${formatSeconds((p.total - p.done) / p.bytesPerSecond)} left`;
      }
      return line;
    }
    case 'unpacking':
      return `pulling ${p.image}: unpacking ${formatBytes(p.total)}`;
    case 'converting':
      return `pulling ${p.image}: converting its raw disk to qcow2`;
    case 'done':
      return `pulled ${p.image} (${formatBytes(p.total)}${p.seconds !== undefined ? ` in ${p.seconds.toFixed(1)} s` : ''}${p.detail ? `, ${p.detail}` : ''})`;
    case 'cached':
      return `image ${p.image} is in this worker's cache${p.detail ? ` (${p.detail})` : ''}`;
  }
}

/**
 * Counts downloaded bytes and tells `emit` at most every `everyMs` (and always on a phase change);
 * the rate is taken over the last few seconds so it follows the link, not the start.
 */
export class ProgressMeter {
  private readonly samples: { t: number; done: number }[] = [];
  private lastEmit = 0;
  private done = 0;
  private readonly started = Date.now();
  private readonly image: string;
  private readonly total: number;
  private readonly emit: PullProgressFn;
  private readonly everyMs: number;

  constructor(image: string, total: number, emit: PullProgressFn, everyMs = 250) {
    this.image = image;
    this.total = total;
    this.emit = emit;
    this.everyMs = everyMs;
  }

  /** Bytes already there (a resumed download) count as done but not towards the rate. */
  skip(bytes: number): void {
    this.done += bytes;
    this.samples.length = 0;
  }

  add(bytes: number): void {
    this.done += bytes;
    const now = Date.now();
    if (now - this.lastEmit < this.everyMs) return;
    this.lastEmit = now;
    this.samples.push({ t: now, done: this.done });
    while (this.samples.length > 2 && now - this.samples[0].t > 3000) this.samples.shift();
    const first = this.samples[0];
    const bytesPerSecond = now > first.t ? ((this.done - first.done) * 1000) / (now - first.t) : undefined;
    this.emit({ image: this.image, phase: 'downloading', done: this.done, total: this.total, bytesPerSecond });
  }

  /** Seconds since the meter started. */
  elapsed(): number {
    return (Date.now() - this.started) / 1000;
  }
}
