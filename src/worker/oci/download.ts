// One blob from the registry into a file, checked against its digest before it gets its final name.
// The bytes go to `<partial>` first; a download cut short (a crash, kill -9, a dropped connection)
// leaves them there and the next attempt asks for the rest with an HTTP Range (or starts over when
// the registry ignores ranges). A digest mismatch or a full disk removes the partial file.
import { open, rename, rm, stat, statfs, truncate, type FileHandle } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { dirname } from 'node:path';
import { BlobResponse, BODY_BUFFER, type BodyChunk } from './blob-http.ts';
import { PullError } from './errors.ts';
import { MainHasher, ThreadHasher, type Hasher } from './hasher.ts';
import type { RegistryClient } from './registry.ts';

export interface BlobDownload {
  client: RegistryClient;
  repo: string;
  digest: string;
  /** the size the manifest gives: more bytes than this are refused */
  size: number;
  partial: string;
  final: string;
  /** the image it is a layer of (HOST/REPO:TAG), for messages */
  image?: string;
  /** bytes already on disk from an earlier attempt (called once, before any `onBytes`) */
  onResume?: (bytes: number) => void;
  onBytes?: (bytes: number) => void;
  signal?: AbortSignal;
}

/** Gathers writes of up to this many bytes: fewer system calls, bounded memory. */
const WRITE_BATCH = BODY_BUFFER;
/** Chunks handed to the disk and the hasher and not yet done, at most. */
const WRITES_AHEAD = 2;
/** Written bytes are flushed to the disk in the background every this many, so the fsync before the rename has little left to do. */
const SYNC_EVERY = 64 * 1024 * 1024;
/** Blobs from this size on are hashed in a thread of their own (starting one costs a few ms). */
const THREAD_HASH_MIN = 16 * 1024 * 1024;

/** The body as chunks to release once written: blob-http.ts's buffers, or node:http's chunks gathered into batches. */
function bodyChunks(res: IncomingMessage | BlobResponse): AsyncIterable<BodyChunk> {
  if (res instanceof BlobResponse) return res.chunks();
  return (async function* () {
    let batch: Buffer[] = [];
    let batched = 0;
    const release = () => {};
    for await (const chunk of res as AsyncIterable<Buffer>) {
      batch.push(chunk);
      batched += chunk.length;
      if (batched >= WRITE_BATCH) {
        yield { data: Buffer.concat(batch, batched), release };
        batch = [];
        batched = 0;
      }
    }
    if (batched > 0) yield { data: Buffer.concat(batch, batched), release };
  })();
}

async function writeAll(fh: FileHandle, data: Buffer, position: number): Promise<void> {
  for (let off = 0; off < data.length;) {
    const { bytesWritten } = await fh.write(data, off, data.length - off, position + off);
    off += bytesWritten;
  }
}

/** Flushes a file's or a directory's data and metadata to the disk (a directory: the names in it). */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** How much room the file system of `dir` has left, in bytes (undefined when unknown). */
export async function freeBytes(dir: string): Promise<number | undefined> {
  try {
    const s = await statfs(dir);
    return s.bavail * s.bsize;
  } catch {
    return undefined;
  }
}

/**
 * A full-disk PullError that says what, where, and how much was needed (in all, not the shortfall:
 * `for` says for what) and is free now.
 */
export async function noSpace(what: string, dir: string, needed: number, forWhat = ''): Promise<PullError> {
  const free = await freeBytes(dir);
  const mib = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return new PullError('NO_SPACE', `no space left on the device of ${dir} while ${what}: it needs about ${mib(needed)}${forWhat ? ` ${forWhat}` : ''}${free !== undefined ? `, ${mib(free)} free` : ''}`);
}

export async function downloadBlob(d: BlobDownload): Promise<void> {
  const hasher: Hasher = d.size >= THREAD_HASH_MIN ? new ThreadHasher() : new MainHasher();
  try {
    await download(d, hasher);
  } finally {
    hasher.close();
  }
}

async function download(d: BlobDownload, hasher: Hasher): Promise<void> {
  let have = 0;
  try {
    have = (await stat(d.partial)).size;
  } catch {
    have = 0;
  }
  if (have > d.size) {
    await truncate(d.partial, 0);
    have = 0;
  }
  if (have > 0) await hasher.file(d.partial);
  if (have === d.size && have > 0) {
    // Complete but not yet renamed (the process ended in between): check it as it is.
    if ((await hasher.digest()) === d.digest) {
      d.onResume?.(have);
      await fsyncPath(d.partial);
      await rename(d.partial, d.final);
      return;
    }
    await truncate(d.partial, 0);
    have = 0;
  }
  const { res, partial } = await d.client.getBlob(d.repo, d.digest, have, d.signal);
  if (!partial && have > 0) {
    // The registry sends the whole blob again: start over.
    hasher.reset();
    have = 0;
  }
  d.onResume?.(have);
  const fh = await open(d.partial, have > 0 ? 'r+' : 'w', 0o600);
  let received = have;
  // Each chunk is hashed (in order) and written at its place once the one before it is on disk (in
  // order: a kill -9 leaves a prefix of the blob, never a hole), while the next ones are read; at
  // most WRITES_AHEAD chunks wait, so memory stays bounded. A chunk's buffer goes back when both are done.
  let writing: Promise<void> = Promise.resolve();
  // The flush of what is written so far, while the rest arrives (one at a time; it only moves work
  // earlier: the fsync below is what the rename waits for).
  let flushing: Promise<void> | undefined;
  let flushFailed: unknown;
  let unflushed = 0;
  const written = (n: number) => {
    unflushed += n;
    if (unflushed >= SYNC_EVERY && !flushing) {
      unflushed = 0;
      flushing = fh
        .datasync()
        .catch((err: unknown) => (flushFailed ??= err))
        .then(() => (flushing = undefined));
    }
  };
  const queued: Promise<unknown>[] = [];
  let last: Promise<unknown> = Promise.resolve();
  try {
    for await (const { data, release } of bodyChunks(res)) {
      if (received + data.length > d.size) {
        release();
        res.destroy();
        throw new PullError('DIGEST_MISMATCH', `${d.client.registry} sent more than the ${d.size} bytes the manifest gives for blob ${d.digest} of ${d.repo}`);
      }
      const at = received;
      received += data.length;
      const hashed = hasher.update(data);
      writing = writing.then(() => writeAll(fh, data, at)).then(() => written(data.length));
      last = Promise.all([hashed, writing]).finally(release);
      last.catch(() => {});
      queued.push(last);
      if (queued.length > WRITES_AHEAD) await queued.shift();
      d.onBytes?.(data.length);
    }
    await Promise.all(queued);
    await flushing;
    // (a write-back error is reported once: the fsync below would not see it again)
    if (flushFailed) throw flushFailed;
  } catch (err) {
    await Promise.allSettled([...queued, flushing]);
    await fh.close().catch(() => {});
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      await rm(d.partial, { force: true });
      throw await noSpace(`downloading ${d.image ?? d.repo} (blob ${d.digest})`, dirname(d.partial), d.size - have);
    }
    if (err instanceof PullError) {
      if (err.code === 'DIGEST_MISMATCH') await rm(d.partial, { force: true });
      throw err;
    }
    if ((err as Error).name === 'AbortError') throw err;
    // A dropped connection: what arrived stays for the next attempt.
    throw new PullError('UNREACHABLE', `the download of blob ${d.digest} of ${d.repo} from ${d.client.registry} broke off after ${received} of ${d.size} bytes: ${(err as Error).message}`, { cause: err });
  }
  // A checked blob is unpacked later without checking it again: its bytes reach the disk before its name does.
  await fh.sync();
  await fh.close();
  if (received < d.size) {
    throw new PullError('UNREACHABLE', `${d.client.registry} ended blob ${d.digest} of ${d.repo} after ${received} of ${d.size} bytes`);
  }
  const digest = await hasher.digest();
  if (digest !== d.digest) {
    await rm(d.partial, { force: true });
    throw new PullError('DIGEST_MISMATCH', `blob ${d.digest} of ${d.repo} from ${d.client.registry} has the wrong content: its digest is ${digest}`);
  }
  await rename(d.partial, d.final);
}
