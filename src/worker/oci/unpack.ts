// The files of a containerDisk image out of its layers: the disk (the one regular file under
// `/disk/`, qcow2 or raw, as KubeVirt lays it out) and, for a kernel-booted image, `/boot/vmlinux` or
// `/boot/vmlinuz`, `/boot/initrd.img` and `/boot/cmdline`. Layers apply in order with the OCI
// whiteouts (`.wh.NAME`, `.wh..wh..opq`); gzip, zstd or plain tar, told apart by their first bytes.
// Nothing else in a layer is written anywhere, and no link is followed: a layer cannot make the
// worker read or write a host file.
import { createReadStream } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline, type Readable } from 'node:stream';
import { createGunzip, createZstdDecompress } from 'node:zlib';
import { PullError } from './errors.ts';
import { readTar, TarError, type TarSink } from './tar.ts';

export const BOOT_FILES = ['vmlinux', 'vmlinuz', 'initrd.img', 'cmdline'] as const;
export type BootFile = (typeof BOOT_FILES)[number];

export interface Unpacked {
  /** the disk as found (qcow2 or raw), in the output dir */
  disk: string;
  /** the name it had under /disk/ */
  diskName: string;
  boot: Partial<Record<BootFile, string>>;
  /** bytes written */
  bytes: number;
}

const WRITE_BATCH = 1024 * 1024;

/** A file written in batches of about a MiB (the tar reader's chunks are small). */
async function fileSink(path: string, onBytes: (n: number) => void): Promise<TarSink> {
  const fh = await open(path, 'wx', 0o600);
  let batch: Buffer[] = [];
  let batched = 0;
  const flush = async () => {
    if (!batched) return;
    const out = batch;
    batch = [];
    batched = 0;
    await fh.writev(out);
  };
  return {
    async write(chunk) {
      batch.push(chunk);
      batched += chunk.length;
      onBytes(chunk.length);
      if (batched >= WRITE_BATCH) await flush();
    },
    async end() {
      try {
        await flush();
      } finally {
        await fh.close();
      }
    },
  };
}

/** The layer's tar stream, decompressed as its first bytes say. */
async function layerStream(file: string): Promise<Readable> {
  const fh = await open(file, 'r');
  const head = Buffer.alloc(4);
  try {
    await fh.read(head, 0, 4, 0);
  } finally {
    await fh.close();
  }
  const raw = createReadStream(file, { highWaterMark: WRITE_BATCH });
  const onError = () => {};
  if (head[0] === 0x1f && head[1] === 0x8b) return pipeline(raw, createGunzip({ chunkSize: 256 * 1024 }), onError);
  if (head.readUInt32LE(0) === 0xfd2fb528) return pipeline(raw, createZstdDecompress({ chunkSize: 256 * 1024 }), onError);
  return raw;
}

/** Which of our files an entry is: `disk/NAME` or `boot/KNOWN`, else undefined (ignored). */
function classify(path: string): { dir: 'disk' | 'boot'; name: string } | undefined {
  const m = /^(disk|boot)\/([^/]+)$/.exec(path);
  if (!m) return undefined;
  return { dir: m[1] as 'disk' | 'boot', name: m[2] };
}

/**
 * Applies `layers` (files, in manifest order) into `outDir` (existing, empty). `label` names the
 * image in messages. `beforeFile` hears of each file (`disk/NAME`, its size) before it is written:
 * a caller can refuse one that will not fit.
 */
export async function unpackLayers(
  layers: string[], outDir: string, label: string, onBytes: (n: number) => void = () => {},
  beforeFile?: (path: string, size: number) => Promise<void>,
): Promise<Unpacked> {
  /** `disk/NAME` or `boot/NAME` → the file in outDir holding it */
  const files = new Map<string, string>();
  let counter = 0;
  let bytes = 0;
  const drop = async (key: string) => {
    const f = files.get(key);
    if (f) await rm(f, { force: true });
    files.delete(key);
  };
  for (const [index, layer] of layers.entries()) {
    const thisLayer = new Set<string>();
    const bad = (why: string) => new PullError('BAD_IMAGE', `image ${label}, layer ${index + 1}: ${why}`);
    try {
      await readTar(await layerStream(layer), async (e) => {
        const base = e.path.split('/').pop() ?? '';
        // Whiteouts hide what lower layers had.
        if (base === '.wh..wh..opq') {
          const dir = e.path.slice(0, -base.length - 1);
          for (const key of [...files.keys()]) if (key.startsWith(`${dir}/`) && !thisLayer.has(key)) await drop(key);
          return undefined;
        }
        if (base.startsWith('.wh.')) {
          const hidden = `${e.path.slice(0, -base.length)}${base.slice(4)}`;
          for (const key of [...files.keys()]) if ((key === hidden || key.startsWith(`${hidden}/`)) && !thisLayer.has(key)) await drop(key);
          return undefined;
        }
        const which = classify(e.path);
        if (!which || (which.dir === 'boot' && !(BOOT_FILES as readonly string[]).includes(which.name))) return undefined;
        if (e.type === '5') return undefined;
        if (e.type !== '0' && e.type !== '7') {
          throw bad(`/${e.path} is a ${e.type === '1' ? 'hard link' : e.type === '2' ? 'symbolic link' : `tar entry of type ${e.type}`}, not a regular file`);
        }
        if (which.name === 'cmdline' && e.size > 4096) throw bad('/boot/cmdline is longer than 4096 bytes');
        await drop(e.path);
        await beforeFile?.(e.path, e.size);
        const out = join(outDir, `f${counter++}`);
        files.set(e.path, out);
        thisLayer.add(e.path);
        return fileSink(out, (n) => {
          bytes += n;
          onBytes(n);
        });
      });
    } catch (err) {
      if (err instanceof TarError) throw bad(`${err.message}`);
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== undefined && (code.startsWith('Z_') || /ZLIB|ZSTD/.test(code))) {
        throw bad(`it does not decompress: ${(err as Error).message}`);
      }
      throw err;
    }
  }
  const disks = [...files.keys()].filter((k) => k.startsWith('disk/'));
  if (disks.length === 0) throw new PullError('BAD_IMAGE', `image ${label} has no disk: a containerDisk image holds one qcow2 or raw file under /disk/`);
  if (disks.length > 1) throw new PullError('BAD_IMAGE', `image ${label} has ${disks.length} files under /disk/ (${disks.map((d) => `/${d}`).join(', ')}); a containerDisk holds one`);
  const boot: Unpacked['boot'] = {};
  for (const name of BOOT_FILES) {
    const f = files.get(`boot/${name}`);
    if (f) boot[name] = f;
  }
  return { disk: files.get(disks[0])!, diskName: disks[0].slice('disk/'.length), boot, bytes };
}
