// One blob from the registry into a file, checked against its digest before it gets its final name.
// The bytes go to `<partial>` first; a download cut short (a crash, kill -9, a dropped connection)
// leaves them there and the next attempt asks for the rest with an HTTP Range (or starts over when
// the registry ignores ranges). A digest mismatch or a full disk removes the partial file.
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rename, rm, stat, statfs, truncate } from 'node:fs/promises';
import { dirname } from 'node:path';
import { PullError } from './errors.ts';
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
const WRITE_BATCH = 1024 * 1024;

async function hashFile(file: string, hash: Hash): Promise<void> {
  for await (const chunk of createReadStream(file, { highWaterMark: WRITE_BATCH })) hash.update(chunk as Buffer);
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
  let hash = createHash('sha256');
  if (have > 0) await hashFile(d.partial, hash);
  if (have === d.size && have > 0) {
    // Complete but not yet renamed (the process ended in between): check it as it is.
    if (`sha256:${hash.digest('hex')}` === d.digest) {
      d.onResume?.(have);
      await fsyncPath(d.partial);
      await rename(d.partial, d.final);
      return;
    }
    await truncate(d.partial, 0);
    hash = createHash('sha256');
    have = 0;
  }
  const { res, partial } = await d.client.getBlob(d.repo, d.digest, have, d.signal);
  if (!partial && have > 0) {
    // The registry sends the whole blob again: start over.
    hash = createHash('sha256');
    have = 0;
  }
  d.onResume?.(have);
  const fh = await open(d.partial, have > 0 ? 'a' : 'w', 0o600);
  let received = have;
  let batch: Buffer[] = [];
  let batched = 0;
  // One write in flight while the next batch arrives: reading, hashing and writing overlap, and at
  // most two batches are held.
  let writing: Promise<unknown> = Promise.resolve();
  const flush = async () => {
    await writing;
    if (batched === 0) return;
    const out = batch;
    batch = [];
    batched = 0;
    writing = fh.writev(out);
    // Awaited at the next flush or in the catch below; until then a failed write (ENOSPC) must not
    // count as an unhandled rejection, which would end the worker's process.
    writing.catch(() => {});
  };
  try {
    for await (const chunk of res as AsyncIterable<Buffer>) {
      received += chunk.length;
      if (received > d.size) {
        res.destroy();
        throw new PullError('DIGEST_MISMATCH', `${d.client.registry} sent more than the ${d.size} bytes the manifest gives for blob ${d.digest} of ${d.repo}`);
      }
      hash.update(chunk);
      batch.push(chunk);
      batched += chunk.length;
      if (batched >= WRITE_BATCH) await flush();
      d.onBytes?.(chunk.length);
    }
    await flush();
    await writing;
  } catch (err) {
    await writing.catch(() => {});
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
  const digest = `sha256:${hash.digest('hex')}`;
  if (digest !== d.digest) {
    await rm(d.partial, { force: true });
    throw new PullError('DIGEST_MISMATCH', `blob ${d.digest} of ${d.repo} from ${d.client.registry} has the wrong content: its digest is ${digest}`);
  }
  await rename(d.partial, d.final);
}
