// The worker's cache of images pulled from registries, beside its local images in the store
// (`<store>/.oci/`, a name no local image can have):
//   refs/NAME          a reference (HOST/REPO:TAG or @DIGEST) → the digest the registry gave it and its entry
//   entries/sha256-HEX an unpacked image, keyed by its manifest's digest, laid out as a local image
//                      (image.json, base.qcow2, kernel files) so the qemu driver boots it the same way;
//                      `oci.json` says where it came from, the mtime of `last-used` when a VM last took it
//   blobs/HEX          layers downloaded and checked, until they are unpacked
//   partial/HEX        layers being downloaded (kept for a resumed download after a crash)
//   tmp/PID-…          entries being unpacked; renamed into entries/ when complete, removed at start
//                      when their process is gone
// Any two references to one digest share one entry, and a VM shares it by hard links (its nlink then
// tells that a VM uses it). Everything is renamed into place only when complete, so a kill -9 at any
// moment leaves no entry half made; and its files and directory are fsynced before that rename (and
// the parent after it), so a power loss does not either: without it the rename can reach the disk
// before the data, and an entry with a zero-filled disk would count as complete. The cost is small
// next to the pull, whose bytes have to be written anyway.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import { diskImageProblem, imageDirName, resolveImage, type ImageKind, type ResolvedImage } from '../images.ts';
import { privateDir, privateFiles } from '../private-files.ts';
import { downloadBlob, freeBytes, fsyncPath, noSpace } from './download.ts';
import { PullError } from './errors.ts';
import { isIndex, isManifest, parseManifest, pickPlatform, type ImageManifest } from './manifest.ts';
import { ProgressMeter, type PullProgress, type PullProgressFn } from './progress.ts';
import { formatReference, manifestReference, parseReference, shortName, type ImageReference } from './reference.ts';
import { RegistryClient, type FetchedManifest, type RegistryLookup } from './registry.ts';
import { unpackLayers } from './unpack.ts';

const execFileP = promisify(execFile);

export type PullPolicy = 'IfNotPresent' | 'Always';

export interface ImageCacheOptions {
  /** the worker's image store (normally `<dataDir>/images`); the cache lives in its `.oci` */
  storeDir: string;
  /** evict least recently used images (no VM using them) to stay under this many bytes */
  maxBytes?: number;
  registries?: RegistryLookup;
  logger?: Logger;
}

/**
 * Hard links to cached images that are not VMs' (the qemu driver's warm-start snapshots, which live
 * and die with their image): `links` counts them by file (`dev:ino` -> links), `released` removes
 * those of images gone from the cache. Without them every image a snapshot was made of would count
 * as in use for ever, and the cache would outgrow its bound.
 */
export interface ImageFollowers {
  links(): Promise<Map<string, number>>;
  released(): Promise<void>;
}

export interface EnsureOptions {
  policy: PullPolicy;
  progress?: PullProgressFn;
  signal?: AbortSignal;
}

export interface CachedImage {
  /** the references that name it now (none once every tag moved on) */
  references: string[];
  digest: string;
  kind: ImageKind;
  size: number;
  created: string;
  lastUsed: string;
  /** the reference it was pulled as */
  source: string;
  /** a VM holds its disk (ImageFollowers' links do not count) */
  inUse: boolean;
  dir: string;
}

interface RefFile {
  reference: string;
  /** what the registry calls it (the index's digest for a multi-platform image) */
  digest: string;
  /** the entry: the manifest digest of this host's platform */
  entry: string;
  /** written by the cache beside a tag's ref (HOST/REPO@DIGEST), not asked for by anyone */
  derived?: boolean;
}

interface OciMeta {
  reference: string;
  digest: string;
  layers: number;
  downloaded: number;
}

/** Pulls share one run per key; each caller gets the progress while it waits. */
interface Shared<T> {
  promise: Promise<T>;
  listeners: Set<PullProgressFn>;
}

const PARTIAL_MAX_AGE_MS = 7 * 24 * 3600_000;
/** An entry handed out is not evicted this soon after (the VM has not linked it yet). */
const HANDED_OUT_GRACE_MS = 5 * 60_000;

const hexOf = (digest: string) => digest.slice('sha256:'.length);

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

async function allocated(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    if (e.isFile()) total += ((await stat(join(dir, e.name)).catch(() => undefined))?.blocks ?? 0) * 512;
  }
  return total;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function writeAtomic(file: string, text: string): Promise<void> {
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    await writeFile(tmp, text, { mode: 0o600 });
    await fsyncPath(tmp);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncPath(dirname(file));
}

export class ImageCache {
  readonly dir: string;
  readonly maxBytes?: number;
  /** blob downloads started (a test checks that concurrent pulls of one image download once) */
  downloads = 0;
  /** bytes taken from partial files left by an earlier, interrupted download */
  resumedBytes = 0;
  private readonly lookup: RegistryLookup;
  private readonly log?: Logger;
  private readonly clients = new Map<string, RegistryClient>();
  private readonly byReference = new Map<string, Shared<ResolvedImage>>();
  private readonly byEntry = new Map<string, Shared<void>>();
  private readonly handedOut = new Map<string, number>();
  private ready?: Promise<void>;
  /** Set by the driver that keeps snapshots of these images (ImageFollowers). */
  followers?: ImageFollowers;

  constructor(opts: ImageCacheOptions) {
    this.dir = join(resolve(opts.storeDir), '.oci');
    this.maxBytes = opts.maxBytes;
    this.lookup = opts.registries ?? (() => undefined);
    this.log = opts.logger;
  }

  private path(...parts: string[]): string {
    return join(this.dir, ...parts);
  }

  /** Directories made; what a killed process left removed (its temp dirs; partial downloads older than a week). */
  private init(): Promise<void> {
    this.ready ??= (async () => {
      await privateDir(resolve(this.dir, '..'));
      await privateDir(this.dir);
      for (const d of ['refs', 'entries', 'blobs', 'partial', 'tmp']) await privateDir(this.path(d));
      for (const name of await readdir(this.path('tmp'))) {
        const pid = Number(name.split('-')[0]);
        if (!Number.isInteger(pid) || pid === process.pid || !pidAlive(pid)) {
          await rm(this.path('tmp', name), { recursive: true, force: true });
        }
      }
      for (const name of await readdir(this.path('partial'))) {
        const st = await stat(this.path('partial', name)).catch(() => undefined);
        if (st && Date.now() - st.mtimeMs > PARTIAL_MAX_AGE_MS) await rm(this.path('partial', name), { force: true });
      }
    })();
    return this.ready;
  }

  private client(registry: string): RegistryClient {
    let c = this.clients.get(registry);
    if (!c) {
      c = new RegistryClient(registry, this.lookup(registry) ?? {});
      this.clients.set(registry, c);
    }
    return c;
  }

  close(): void {
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }

  /**
   * The image `image` (a registry reference) ready to boot: from the cache when it is there and the
   * policy allows (IfNotPresent; Always when the registry still gives the same digest), else pulled.
   */
  async ensure(image: string, opts: EnsureOptions): Promise<ResolvedImage> {
    let ref: ImageReference;
    try {
      ref = parseReference(image);
    } catch (err) {
      throw new PullError('BAD_IMAGE', (err as Error).message);
    }
    await this.init();
    const key = formatReference(ref);
    const emit = opts.progress ?? (() => {});
    // A digest names one content forever: no need to ask the registry again.
    if (opts.policy === 'IfNotPresent' || ref.digest) {
      const cached = await this.cachedEntry(key);
      if (cached) {
        emit({ image: shortName(ref), phase: 'cached', done: 0, total: 0, detail: cached.digest });
        return this.handOut(cached.entry, image);
      }
    }
    const entry = await this.share(this.byReference, key, emit, (send) => this.pull(ref, key, opts.policy, send, opts.signal).then((e) => this.handOut(e, image)));
    return { ...entry, name: image };
  }

  /** The cached image `image` names, without asking any registry; undefined when there is none. */
  async cached(image: string): Promise<ResolvedImage | undefined> {
    let key: string;
    try {
      key = formatReference(parseReference(image));
    } catch {
      return undefined;
    }
    await this.init();
    const hit = await this.cachedEntry(key);
    return hit ? { ...(await resolveImage(this.path('entries'), `sha256-${hit.entry}`)), name: image } : undefined;
  }

  /** Runs `start` once per key; later callers wait for the same run and get its progress too. */
  private async share<T>(map: Map<string, Shared<T>>, key: string, listener: PullProgressFn, start: (send: PullProgressFn) => Promise<T>): Promise<T> {
    let run = map.get(key);
    if (!run) {
      const listeners = new Set<PullProgressFn>();
      const send: PullProgressFn = (p) => {
        for (const l of listeners) l(p);
      };
      run = { listeners, promise: start(send).finally(() => map.delete(key)) };
      map.set(key, run);
    }
    run.listeners.add(listener);
    try {
      return await run.promise;
    } finally {
      run.listeners.delete(listener);
    }
  }

  private async readRef(key: string): Promise<RefFile | undefined> {
    try {
      return JSON.parse(await readFile(this.path('refs', imageDirName(key)), 'utf8')) as RefFile;
    } catch {
      return undefined;
    }
  }

  private async cachedEntry(key: string): Promise<{ entry: string; digest: string } | undefined> {
    const r = await this.readRef(key);
    if (!r || !/^[a-f0-9]{64}$/.test(r.entry)) return undefined;
    return (await exists(this.path('entries', `sha256-${r.entry}`, 'image.json'))) ? { entry: r.entry, digest: r.digest } : undefined;
  }

  /** The entry as the driver needs it; its last use is now. */
  private async handOut(entry: string, name: string): Promise<ResolvedImage> {
    const dir = this.path('entries', `sha256-${entry}`);
    const now = new Date();
    await utimes(join(dir, 'last-used'), now, now).catch(async () => writeFile(join(dir, 'last-used'), ''));
    this.handedOut.set(entry, Date.now());
    const image = await resolveImage(this.path('entries'), `sha256-${entry}`);
    return { ...image, name };
  }

  private async pull(ref: ImageReference, key: string, policy: PullPolicy, send: PullProgressFn, signal?: AbortSignal): Promise<string> {
    const label = shortName(ref);
    const client = this.client(ref.registry);
    send({ image: label, phase: 'resolving', done: 0, total: 0, detail: ref.registry });
    const known = policy === 'Always' ? await this.cachedEntry(key) : undefined;
    if (known && !ref.digest) {
      const now = await client.manifestDigest(ref.repository, manifestReference(ref), signal);
      if (now === known.digest) {
        send({ image: label, phase: 'cached', done: 0, total: 0, detail: `${now}, unchanged in the registry` });
        return known.entry;
      }
    }
    const top = await client.getManifest(ref.repository, manifestReference(ref), signal);
    let manifest: FetchedManifest = top;
    if (isIndex(top.mediaType)) {
      const chosen = pickPlatform(top.body, label);
      manifest = await client.getManifest(ref.repository, chosen.digest, signal);
    }
    if (!isManifest(manifest.mediaType) && manifest.mediaType !== '') {
      throw new PullError('BAD_IMAGE', `image ${label}: the registry sent a ${manifest.mediaType}, not an image manifest`);
    }
    const parsed = parseManifest(manifest.body, label);
    const entry = hexOf(manifest.digest);
    if (!(await exists(this.path('entries', `sha256-${entry}`, 'image.json')))) {
      await this.share(this.byEntry, entry, send, (sendEntry) => this.fetchEntry(client, ref, parsed, manifest.digest, sendEntry, signal));
    } else {
      send({ image: label, phase: 'cached', done: 0, total: 0, detail: manifest.digest });
    }
    const refFile = (reference: string, derived?: boolean): RefFile => ({ reference, digest: top.digest, entry, derived });
    await writeAtomic(this.path('refs', imageDirName(key)), JSON.stringify(refFile(key)) + '\n');
    const byDigest = formatReference({ ...ref, tag: undefined, digest: top.digest });
    if (byDigest !== key && !(await this.readRef(byDigest))) await writeAtomic(this.path('refs', imageDirName(byDigest)), JSON.stringify(refFile(byDigest, true)) + '\n');
    return entry;
  }

  /** Downloads, checks and unpacks one image into entries/; on failure leaves nothing of it behind (but resumable downloads). */
  private async fetchEntry(client: RegistryClient, ref: ImageReference, manifest: ImageManifest, digest: string, send: PullProgressFn, signal?: AbortSignal): Promise<void> {
    const label = shortName(ref);
    const reference = formatReference(ref);
    const total = manifest.layers.reduce((n, l) => n + l.size, 0);
    const started = Date.now();
    await this.evict(total);
    // Room for the layers still to download and for what they unpack to, at least as much again
    // (compressed layers unpack larger; a sparse disk much larger, which the unpacking checks file by file).
    let toDownload = 0;
    for (const [digest, size] of new Map(manifest.layers.map((l) => [l.digest, l.size]))) {
      if (await exists(this.path('blobs', hexOf(digest)))) continue;
      const partial = (await stat(this.path('partial', hexOf(digest))).catch(() => undefined))?.size ?? 0;
      toDownload += Math.max(0, size - partial);
    }
    const free = await freeBytes(this.dir);
    if (free !== undefined && free < toDownload + total) {
      throw await noSpace(`pulling ${reference}`, this.dir, toDownload + total, `(${(toDownload / 1024 / 1024).toFixed(1)} MiB to download and at least ${(total / 1024 / 1024).toFixed(1)} MiB unpacked)`);
    }
    const meter = new ProgressMeter(label, total, send);
    const blobs: string[] = [];
    const seen = new Set<string>();
    let downloaded = 0;
    const tmp = this.path('tmp', `${process.pid}-${randomBytes(6).toString('hex')}`);
    /** what unpacking was writing, for the message of a disk that fills under it */
    let writing: { what: string; size: number } | undefined;
    try {
      for (const layer of manifest.layers) {
        const hex = hexOf(layer.digest);
        const final = this.path('blobs', hex);
        blobs.push(final);
        if (seen.has(hex) || (await exists(final))) {
          if (!seen.has(hex)) meter.skip(layer.size);
          seen.add(hex);
          continue;
        }
        seen.add(hex);
        this.downloads++;
        await downloadBlob({
          client, repo: ref.repository, image: reference, digest: layer.digest, size: layer.size,
          partial: this.path('partial', hex), final, signal,
          onResume: (n) => {
            this.resumedBytes += n;
            meter.skip(n);
          },
          onBytes: (n) => {
            downloaded += n;
            meter.add(n);
          },
        });
      }
      send({ image: label, phase: 'unpacking', done: total, total });
      await privateDir(tmp);
      const unpacked = await unpackLayers(blobs, tmp, label, undefined, async (path, size) => {
        writing = { what: `for /${path}`, size };
        const free = await freeBytes(tmp);
        if (free !== undefined && free < size) throw await noSpace(`unpacking ${reference}`, this.dir, size, writing.what);
      });
      const disk = join(tmp, 'base.qcow2');
      if (await isQcow2(unpacked.disk)) await rename(unpacked.disk, disk);
      else {
        send({ image: label, phase: 'converting', done: total, total });
        // qcow2 of a raw disk: at most the raw disk's allocated size again.
        writing = { what: `to convert /disk/${unpacked.diskName} to qcow2`, size: ((await stat(unpacked.disk)).blocks ?? 0) * 512 };
        try {
          await execFileP('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '--', unpacked.disk, disk]);
        } catch (err) {
          const text = (err as { stderr?: string }).stderr ?? (err as Error).message;
          if (/No space left/i.test(text)) throw Object.assign(new Error(text), { code: 'ENOSPC' });
          throw new PullError('BAD_IMAGE', `image ${label}: its raw disk does not convert to qcow2: ${text.trim()}`);
        }
        await rm(unpacked.disk, { force: true });
      }
      const problem = await diskImageProblem(disk);
      if (problem) throw new PullError('BAD_IMAGE', `image ${label}: ${problem.replaceAll(disk, `/disk/${unpacked.diskName}`)}`);
      const kernel = unpacked.boot.vmlinux ?? unpacked.boot.vmlinuz;
      const kind: ImageKind = kernel && unpacked.boot['initrd.img'] ? 'kernel' : 'disk';
      if (kind === 'kernel') {
        for (const name of ['vmlinux', 'vmlinuz', 'initrd.img', 'cmdline'] as const) {
          const f = unpacked.boot[name];
          if (f) await rename(f, join(tmp, name));
        }
      }
      // Whatever else came out of the layers (boot files of a disk image) goes.
      for (const f of await readdir(tmp)) if (/^f\d+$/.test(f)) await rm(join(tmp, f), { force: true });
      const created = new Date().toISOString();
      await writeFile(join(tmp, 'image.json'), JSON.stringify({ name: reference, kind, created, source: `pull of ${reference} (${digest})` }) + '\n');
      const meta: OciMeta = { reference, digest, layers: manifest.layers.length, downloaded };
      await writeFile(join(tmp, 'oci.json'), JSON.stringify(meta) + '\n');
      await writeFile(join(tmp, 'last-used'), '');
      await privateFiles(tmp);
      const dest = this.path('entries', `sha256-${hexOf(digest)}`);
      if (await exists(join(dest, 'image.json'))) await rm(tmp, { recursive: true, force: true });
      else {
        // Durable before it is published (see the top of this file).
        for (const f of await readdir(tmp)) await fsyncPath(join(tmp, f));
        await fsyncPath(tmp);
        await rm(dest, { recursive: true, force: true });
        await rename(tmp, dest);
        await fsyncPath(this.path('entries'));
      }
      for (const b of blobs) await rm(b, { force: true });
      const seconds = (Date.now() - started) / 1000;
      send({ image: label, phase: 'done', done: total, total, seconds, detail: digest });
      this.log?.info({ image: reference, digest, bytes: total, downloaded, seconds }, 'image pulled');
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOSPC' || code === 'EDQUOT') {
        for (const b of blobs) await rm(b, { force: true });
        throw await noSpace(`unpacking ${reference}`, this.dir, writing?.size ?? total, writing?.what);
      }
      if (err instanceof PullError && (err.code === 'NO_SPACE' || err.code === 'DIGEST_MISMATCH' || err.code === 'BAD_IMAGE')) {
        for (const b of blobs) await rm(b, { force: true });
      }
      throw err;
    }
  }

  /** Every image in the cache, newest use first. */
  async list(): Promise<CachedImage[]> {
    await this.init();
    const refs = new Map<string, string[]>();
    for (const file of await this.refFiles()) {
      if (!file.derived) refs.set(file.entry, [...(refs.get(file.entry) ?? []), file.reference]);
    }
    const out: CachedImage[] = [];
    const followed = (await this.followers?.links()) ?? new Map<string, number>();
    for (const name of await readdir(this.path('entries'))) {
      const m = /^sha256-([a-f0-9]{64})$/.exec(name);
      if (!m) continue;
      const dir = this.path('entries', name);
      try {
        const meta = JSON.parse(await readFile(join(dir, 'image.json'), 'utf8')) as { kind: ImageKind; created: string };
        const oci = JSON.parse(await readFile(join(dir, 'oci.json'), 'utf8')) as OciMeta;
        const used = await stat(join(dir, 'last-used')).catch(() => undefined);
        const disk = await stat(join(dir, 'base.qcow2'));
        out.push({
          references: (refs.get(m[1]) ?? []).sort(),
          digest: oci.digest,
          source: oci.reference,
          kind: meta.kind,
          size: await allocated(dir),
          created: meta.created,
          lastUsed: new Date(used?.mtimeMs ?? 0).toISOString(),
          inUse: disk.nlink - (followed.get(`${disk.dev}:${disk.ino}`) ?? 0) > 1,
          dir,
        });
      } catch {
        continue;
      }
    }
    return out.sort((a, b) => b.lastUsed.localeCompare(a.lastUsed));
  }

  /** The images this worker holds, by digest and the references that name them (for placing VMs where their image already is). */
  async held(): Promise<{ digest: string; references: string[] }[]> {
    return (await this.list()).map((i) => ({ digest: i.digest, references: i.references }));
  }

  private async refFiles(): Promise<(RefFile & { file: string })[]> {
    const out: (RefFile & { file: string })[] = [];
    for (const name of await readdir(this.path('refs'))) {
      if (name.endsWith('.tmp')) continue;
      const file = this.path('refs', name);
      const r = await readFile(file, 'utf8').then((t) => JSON.parse(t) as RefFile).catch(() => undefined);
      if (r && typeof r.reference === 'string' && typeof r.entry === 'string') out.push({ ...r, file });
    }
    return out;
  }

  /**
   * Removes the least recently used images no VM uses until the cache (plus `incoming` bytes about
   * to be pulled) fits in maxBytes. An image handed out moments ago counts as used.
   */
  async evict(incoming = 0): Promise<string[]> {
    if (this.maxBytes === undefined) return [];
    const images = await this.list();
    let total = images.reduce((n, i) => n + i.size, 0) + incoming;
    const evicted: string[] = [];
    for (const image of [...images].reverse()) {
      if (total <= this.maxBytes) break;
      const entry = hexOf(image.digest);
      const handed = this.handedOut.get(entry);
      if (image.inUse || (handed !== undefined && Date.now() - handed < HANDED_OUT_GRACE_MS) || this.byEntry.has(entry)) continue;
      // Renamed away first: a reader sees the entry whole or not at all.
      const gone = this.path('tmp', `${process.pid}-evict-${entry.slice(0, 12)}`);
      await rename(image.dir, gone);
      await rm(gone, { recursive: true, force: true });
      total -= image.size;
      evicted.push(image.digest);
      this.log?.info({ digest: image.digest, references: image.references, bytes: image.size }, 'image evicted from the cache (least recently used)');
    }
    if (evicted.length) {
      for (const r of await this.refFiles()) if (evicted.includes(`sha256:${r.entry}`)) await rm(r.file, { force: true });
      // Their snapshots linked the disks: the space is free once those are gone too.
      await this.followers?.released().catch((err: Error) => this.log?.warn({ err: err.message }, 'cannot remove what followed the evicted images'));
    }
    if (total > this.maxBytes) this.log?.warn({ bytes: total, maxBytes: this.maxBytes }, 'the image cache is over its size: the images left are in use');
    return evicted;
  }
}

/** Whether `file` starts with the qcow2 magic (told apart from a raw disk without asking qemu-img to guess). */
async function isQcow2(file: string): Promise<boolean> {
  const fh = await open(file, 'r');
  try {
    const head = Buffer.alloc(4);
    await fh.read(head, 0, 4, 0);
    return head.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]));
  } finally {
    await fh.close();
  }
}

export type { PullProgress };
