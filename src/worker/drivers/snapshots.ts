// An image's warm-start snapshot on a qemu worker for VMs of one shape (CPU count, memory),
// `<dataDir>/snapshots/<image dir name>@<cpu>cpu-<memory>mib/`:
//   snapshot.json   what it was made from and with (below); `unusable` when the guest cannot be re-identified
//   memory.ram      the template's memory: its RAM was this file, mapped shared, so the save wrote it
//                   (sparse: what the guest touched); a VM resumed from the snapshot maps it private
//                   (copy on write: the file never changes, VMs share its pages until they write them)
//   snapshot.state  the template's device state (QMP `migrate` to `exec:cat > FILE`, with QEMU's
//                   x-ignore-shared: the memory, in memory.ram already, is left out)
//   disk.qcow2      the template's disk overlay, frozen at the save; a VM's overlay is backed by it
//   base.qcow2, vmlinux, initrd.img: hard links to the image files the template booted
// The template is the image booted once on this worker with a fixed identity (hostname
// orchard-template, the image's host keys); a VM started from the snapshot resumes it and is given
// its own identity (guest-identity.ts) before it is reported running.
//
// Kept with the worker's data, not in the image's directory: a build or an import replaces that
// directory as a whole (maybe from another process while a snapshot is being made), and the image
// stays the same content for `orchard image push`/`list`. A snapshot names the image files it was
// made from by device, inode, size and mtime, so a rebuilt, replaced or deleted image no longer
// matches it and the next VM makes a new one.
import { readdir, readFile, stat } from 'node:fs/promises';
import { delimiter, isAbsolute, join } from 'node:path';
import type { Accel } from './accel.ts';

export const SNAPSHOT_FILE = 'snapshot.json';
export const STATE_FILE = 'snapshot.state';
export const MEMORY_FILE = 'memory.ram';

export interface SnapshotMeta {
  image: string;
  /** file name in the snapshot dir -> fileId() of the image file it links to */
  files: Record<string, string>;
  kind: 'kernel' | 'disk';
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  cpu: number;
  memory: number;
  accel: Accel;
  /** fileId() of the QEMU binary that saved the state (a QEMU update may not load it) */
  qemu: string;
  /** The template's MAC and SSH host keys (known_hosts lines): what no VM may keep. */
  mac: string;
  knownHosts?: string;
  created: string;
  /** seconds: the template's boot to SSH, and the save */
  bootSeconds?: number;
  saveSeconds?: number;
  stateBytes?: number;
  /** The memory file (MEMORY_FILE): absent in snapshots of earlier versions, whose state held the memory. */
  memoryFile?: string;
  /** What the memory file takes on disk (it is sparse). */
  memoryBytes?: number;
  /**
   * The template's identity agent waits on its virtio-serial port (guest-identity.ts AGENT_START):
   * VMs get their identity through it (false: over SSH). Absent: made before VMs had that port.
   */
  agent?: boolean;
  /** Set when this image's guest cannot be given a new identity: VMs cold-boot, with this reason. */
  unusable?: string;
}

/** What identifies a file's content without reading it: a rebuild or replacement changes it. */
export async function fileId(path: string): Promise<string> {
  const st = await stat(path);
  return `${st.dev}:${st.ino}:${st.size}:${Math.round(st.mtimeMs)}`;
}

/** The file that `binary` (a path, or a name looked up in PATH) runs. */
export async function binaryId(binary: string): Promise<string> {
  const candidates = isAbsolute(binary) || binary.includes('/') ? [binary]
    : (process.env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, binary));
  for (const c of candidates) {
    try {
      return await fileId(c);
    } catch {
      // not here
    }
  }
  return `unknown ${binary}`;
}

export async function readSnapshotMeta(dir: string): Promise<SnapshotMeta | undefined> {
  try {
    return JSON.parse(await readFile(join(dir, SNAPSHOT_FILE), 'utf8')) as SnapshotMeta;
  } catch {
    return undefined;
  }
}

/** A snapshot as `orchard image list` shows it, and what the image cache needs to know of it. */
export interface SnapshotListing {
  image: string;
  cpu: number;
  memory: number;
  created: string;
  unusable?: string;
  /** what it takes on disk besides the links to its image's files (its memory, state and disk overlay) */
  bytes: number;
  /** its link to the image's disk, as `dev:ino` */
  base?: string;
}

/** The snapshots in `root` (a worker's `snapshots/`; not those being made or removed). */
export async function listSnapshots(root: string): Promise<SnapshotListing[]> {
  const out: SnapshotListing[] = [];
  for (const e of await readdir(root).catch(() => [] as string[])) {
    if (e.startsWith('.')) continue;
    const dir = join(root, e);
    const meta = await readSnapshotMeta(dir);
    if (!meta) continue;
    let bytes = 0;
    let base: string | undefined;
    for (const f of await readdir(dir).catch(() => [] as string[])) {
      const st = await stat(join(dir, f)).catch(() => undefined);
      if (!st) continue;
      if (f === 'base.qcow2') base = `${st.dev}:${st.ino}`;
      if (!(f in meta.files)) bytes += st.blocks * 512;
    }
    out.push({ image: meta.image, cpu: meta.cpu, memory: meta.memory, created: meta.created, unusable: meta.unusable, bytes, base });
  }
  return out;
}

/** The image disks `snapshots` link, by `dev:ino`, with how many links of theirs each has: no VM's use of the image (the image cache's followers). */
export function snapshotLinks(snapshots: SnapshotListing[]): Map<string, number> {
  const links = new Map<string, number>();
  for (const { base } of snapshots) if (base) links.set(base, (links.get(base) ?? 0) + 1);
  return links;
}

/**
 * Why the snapshot in `dir` cannot serve `image` now (the image files changed, another accelerator
 * or QEMU), or undefined when it can. `imageFiles`: snapshot file name -> the image's file now.
 */
export async function staleReason(meta: SnapshotMeta, imageFiles: Record<string, string>, accel: Accel, qemu: string): Promise<string | undefined> {
  for (const [name, path] of Object.entries(imageFiles)) {
    const id = await fileId(path).catch(() => 'missing');
    if (meta.files[name] !== id) return `image ${meta.image} changed since (${name})`;
  }
  if (Object.keys(meta.files).length !== Object.keys(imageFiles).length) return `image ${meta.image} changed since`;
  if (meta.accel !== accel) return `it was made with ${meta.accel}, this worker runs ${accel}`;
  if (meta.qemu !== qemu) return 'QEMU changed since';
  if (meta.agent === undefined) return 'it was made by an older version, for VMs without the identity agent\'s port';
  if (meta.memoryFile !== MEMORY_FILE) return 'it was made by an older version, with the memory in its state file';
  return undefined;
}
