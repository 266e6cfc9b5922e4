// The worker's guest image store: one directory per image under a store directory (normally
// `<dataDir>/images`). Two kinds of image:
//   kernel  a kernel + initramfs + root disk booted with qemu -kernel (the `debian-dev` image that
//           `buildDebianDev` makes from Debian packages)
//   disk    any qcow2 disk that boots with its own bootloader (`importImage`)
// Every image directory holds `image.json` (name, kind, created) and `base.qcow2`. VMs never write
// to an image: the qemu driver hard-links its files and puts a copy-on-write overlay on top, so an
// image can be rebuilt or replaced while VMs made from it keep running.
import { spawn, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { assetText } from '../build/source-tree.ts';
import { privateDir, privateFiles } from './private-files.ts';

const execFileP = promisify(execFile);

export const DEBIAN_DEV = 'debian-dev';

/**
 * The image build script as a file bash can run (the single executable carries it inside itself):
 * `<store>/.build/build-debian-dev.sh`, rewritten only when its text changed. The script's text is
 * part of the image's stamp, so a checkout and an executable of the same commit share built images.
 */
async function buildScriptFile(buildRoot: string): Promise<string> {
  const text = assetText('worker/images/build-debian-dev.sh');
  const file = join(buildRoot, 'build-debian-dev.sh');
  if ((await readFile(file, 'utf8').catch(() => undefined)) !== text) {
    const tmp = `${file}.${process.pid}.tmp`;
    await writeFile(tmp, text, { mode: 0o700 });
    await rename(tmp, file);
  }
  return file;
}

export type ImageKind = 'kernel' | 'disk';

export interface ImageInfo {
  name: string;
  kind: ImageKind;
  /** Bytes the image's files take on disk (allocated, so sparse/qcow2 files count what they use). */
  size: number;
  /** ISO 8601 time the image was built or imported. */
  created: string;
  dir: string;
}

export interface ResolvedImage extends ImageInfo {
  /** The image's root disk (qcow2); VMs use it as the backing file of their overlay. */
  disk: string;
  /** kernel images only: the kernel (uncompressed `vmlinux` when available, else `vmlinuz`) */
  kernel?: string;
  initrd?: string;
  /** kernel images only: the kernel command line, without root= */
  cmdline?: string;
  /** An SSH private key the guest accepts for its users, when the image has one. */
  sshKey?: string;
  /**
   * The guest starts the worker's agent at boot (BOOT_AGENT_ARG on its command line, as debian-dev's
   * does): a warm-start template is reached through it, with no SSH key.
   */
  bootAgent?: boolean;
  /** The guest's SSH host keys as known_hosts lines (`* TYPE BASE64`), when known. */
  knownHosts?: string;
}

/** On a kernel image's command line: its guest starts the worker's agent at boot (guest-identity.ts AGENT_PORT). */
export const BOOT_AGENT_ARG = 'orchard.agent=1';

export interface BuildResult extends ResolvedImage {
  /** true when nothing had to be done (the image was up to date). */
  cached: boolean;
}

export class ImageNotFoundError extends Error {
  readonly code = 'IMAGE_NOT_FOUND';
  readonly image: string;
  constructor(image: string, message: string) {
    super(message);
    this.name = 'ImageNotFoundError';
    this.image = image;
  }
}

interface ImageMeta {
  name: string;
  kind: ImageKind;
  created: string;
  source?: string;
}

/**
 * What to run to get `name` onto this worker, for error messages. With the store, the command names
 * the worker's data dir when the store is `<data dir>/images` (as `orchard worker run` lays it out),
 * so it can be pasted as is.
 */
export function imageHowTo(name: string, storeDir?: string): string {
  const store = storeDir === undefined ? undefined : resolve(storeDir);
  const dataDir = store !== undefined && basename(store) === 'images' ? ` --data-dir ${shellWord(dirname(store))}` : '';
  return name === DEBIAN_DEV
    ? `orchard image build ${DEBIAN_DEV}${dataDir}`
    : `orchard image import ${shellWord(name)} FILE.qcow2${dataDir}`;
}

/** `s` quoted for a POSIX shell when it needs it. */
function shellWord(s: string): string {
  return /^[A-Za-z0-9._/:@%+=,-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}

/**
 * Image name -> directory name that is safe on any file system: [A-Za-z0-9.-] stay (a leading dot
 * does not), every other byte becomes `_XX` (hex). `debian-dev` stays `debian-dev`;
 * `ghcr.io/x/y:tag` becomes `ghcr.io_2Fx_2Fy_3Atag`. Injective; over-long names get a hash suffix.
 */
export function imageDirName(name: string): string {
  validateImageName(name);
  let out = '';
  for (const byte of Buffer.from(name, 'utf8')) {
    const c = String.fromCharCode(byte);
    if (/[A-Za-z0-9-]/.test(c) || (c === '.' && out.length > 0)) out += c;
    else out += '_' + byte.toString(16).toUpperCase().padStart(2, '0');
  }
  if (out.length > 200) out = out.slice(0, 180) + '_' + createHash('sha256').update(name).digest('hex').slice(0, 16);
  return out;
}

function validateImageName(name: string): void {
  if (typeof name !== 'string' || name.length === 0 || name.length > 1000 || /[\s\p{Cc}]/u.test(name)) {
    throw new Error(`invalid image name ${JSON.stringify(name)}`);
  }
}

export function imageDir(storeDir: string, name: string): string {
  return join(resolve(storeDir), imageDirName(name));
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

async function readMeta(dir: string): Promise<ImageMeta | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(dir, 'image.json'), 'utf8')) as Partial<ImageMeta>;
    if (typeof meta.name !== 'string' || (meta.kind !== 'kernel' && meta.kind !== 'disk')) return undefined;
    return { name: meta.name, kind: meta.kind, created: String(meta.created ?? ''), source: meta.source };
  } catch {
    return undefined;
  }
}

/** Allocated bytes of the regular files directly in `dir`. */
async function dirSize(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const st = await stat(join(dir, entry.name));
    total += st.blocks * 512;
  }
  return total;
}

async function info(dir: string, meta: ImageMeta): Promise<ImageInfo> {
  return { name: meta.name, kind: meta.kind, size: await dirSize(dir), created: meta.created, dir };
}

/** Every complete image in the store, sorted by name. */
export async function listImages(storeDir: string): Promise<ImageInfo[]> {
  let entries;
  try {
    entries = await readdir(resolve(storeDir), { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const out: ImageInfo[] = [];
  for (const entry of entries) {
    if (!entry.isDirectory() || entry.name.startsWith('.')) continue;
    const dir = join(resolve(storeDir), entry.name);
    const meta = await readMeta(dir);
    if (!meta || !(await exists(join(dir, 'base.qcow2')))) continue;
    out.push(await info(dir, meta));
  }
  return out.sort((a, b) => a.name.localeCompare(b.name));
}

/** The files of image `name`, or an ImageNotFoundError that says how to get it. */
export async function resolveImage(storeDir: string, name: string): Promise<ResolvedImage> {
  const dir = imageDir(storeDir, name);
  const meta = await readMeta(dir);
  const disk = join(dir, 'base.qcow2');
  const notFound = (what: string) =>
    new ImageNotFoundError(name, `image "${name}" ${what} on this worker (store ${resolve(storeDir)}); run: ${imageHowTo(name, storeDir)}`);
  if (!meta || !(await exists(disk))) throw notFound('is not');
  const image: ResolvedImage = { ...(await info(dir, meta)), disk };
  if (meta.kind === 'kernel') {
    const vmlinux = join(dir, 'vmlinux');
    image.kernel = (await exists(vmlinux)) ? vmlinux : join(dir, 'vmlinuz');
    image.initrd = join(dir, 'initrd.img');
    if (!(await exists(image.kernel)) || !(await exists(image.initrd))) throw notFound('is incomplete');
    image.cmdline = (await readFile(join(dir, 'cmdline'), 'utf8').catch(() => 'console=ttyS0')).trim();
    image.bootAgent = image.cmdline.split(/\s+/).includes(BOOT_AGENT_ARG);
  }
  if (await exists(join(dir, 'id_ed25519'))) image.sshKey = join(dir, 'id_ed25519');
  if (await exists(join(dir, 'known_hosts'))) image.knownHosts = await readFile(join(dir, 'known_hosts'), 'utf8');
  return image;
}

/**
 * Build (or confirm up to date) the `debian-dev` image: Debian's kernel, an initramfs with busybox,
 * dropbear SSH and bash, and an ext4 root disk; users root and admin, password `admin`, plus the
 * image's SSH key. Installs missing Debian packages with apt-get (needs root). With unchanged
 * inputs it does nothing (well under a second).
 */
export async function buildDebianDev(storeDir: string, progress: (msg: string) => void = () => {}, opts: { installPackages?: boolean } = {}): Promise<BuildResult> {
  const store = resolve(storeDir);
  if (opts.installPackages === false) {
    // Even as root: a build that a VM asked for must not change the host's packages.
    const missing = await missingBuildPackages();
    if (missing.length) {
      throw new Error(`missing Debian packages: ${missing.join(' ')}. Install them with: sudo apt-get install -y --no-install-recommends ${missing.join(' ')}`);
    }
  }
  // 0700 before the build: the store encloses the build tree and the image while they are made.
  await privateDir(store);
  await mkdir(join(store, '.build'), { recursive: true });
  const dir = imageDir(store, DEBIAN_DEV);
  const buildDir = join(store, '.build', imageDirName(DEBIAN_DEV));
  const script = await buildScriptFile(join(store, '.build'));
  let result = '';
  const stderr: string[] = [];
  await new Promise<void>((resolveRun, reject) => {
    const child = spawn('bash', [script, dir, buildDir], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      out += chunk;
      let nl;
      while ((nl = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, nl);
        out = out.slice(nl + 1);
        if (line.startsWith('step: ')) progress(line.slice(6));
        else if (line.startsWith('result: ')) result = line.slice(8);
      }
    });
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      stderr.push(...chunk.split('\n').filter((l) => l.trim() !== ''));
      if (stderr.length > 40) stderr.splice(0, stderr.length - 40);
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code === 0 && result) return resolveRun();
      const tail = stderr.slice(-15).join('\n');
      // The script's own messages ("build-debian-dev: ...") are meant for people: pass them on as is.
      const own = stderr.filter((l) => l.startsWith('build-debian-dev: ')).pop();
      reject(new Error(own ? own.slice('build-debian-dev: '.length) :
        `building image ${DEBIAN_DEV} failed (${signal ?? `exit ${code}`}):\n${tail}`));
    });
  });
  await privateDir(dir);
  await privateFiles(dir);
  if (result === 'built') progress(`image ${DEBIAN_DEV} built`);
  return { ...(await resolveImage(store, DEBIAN_DEV)), cached: result === 'cached' };
}

/** The Debian packages the debian-dev build needs (the build script's PKGS) that are not installed. */
export async function missingBuildPackages(): Promise<string[]> {
  const m = /^PKGS="([^"]+)"/m.exec(assetText('worker/images/build-debian-dev.sh'));
  if (!m) throw new Error('build-debian-dev.sh names no packages (PKGS="…")');
  const pkgs = m[1].split(/\s+/).filter(Boolean);
  const { stdout } = await execFileP('dpkg-query', ['-W', '-f=${db:Status-Status} ${Package}\\n', ...pkgs]).catch((err: { stdout?: string }) => ({ stdout: err.stdout ?? '' }));
  const installed = new Set(stdout.split('\n').filter((l) => l.startsWith('installed ')).map((l) => l.slice('installed '.length)));
  return pkgs.filter((p) => !installed.has(p));
}

/**
 * Why `file` may not become (or stay) a disk image, or undefined when it may. A qcow2 can name other
 * files that QEMU then reads as part of the disk: a backing file (`-b /etc/shadow` made a host file
 * the guest's disk) or an external data file. An image must be one self-contained qcow2 file.
 * `qemu-img info` does not open backing files unless asked (--backing-chain).
 */
export async function diskImageProblem(file: string): Promise<string | undefined> {
  // An absolute path: qemu-img reads `json:{...}` or `nbd:...` as protocols, never `/…`.
  const path = resolve(file);
  let details: {
    format?: string;
    'backing-filename'?: string;
    'full-backing-filename'?: string;
    'format-specific'?: { data?: { 'data-file'?: string } };
  };
  try {
    const { stdout } = await execFileP('qemu-img', ['info', '--output=json', '-U', '--', path]);
    details = JSON.parse(stdout) as typeof details;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT' && !e.stderr) throw new Error('qemu-img not found: apt-get install qemu-utils');
    return `cannot read ${file} as a disk image: ${(e.stderr ?? e.message).trim()}`;
  }
  if (details.format !== 'qcow2') return `${file} is ${details.format ?? 'not a disk image'}, not qcow2 (convert it with: qemu-img convert -O qcow2 ${file} OUT.qcow2)`;
  const backing = details['backing-filename'] ?? details['full-backing-filename'];
  if (backing !== undefined) {
    return `${file} has a backing file (${backing}), which QEMU would read as part of the disk; an image must be one self-contained qcow2 file (flatten it with: qemu-img convert -O qcow2 ${file} OUT.qcow2)`;
  }
  const dataFile = details['format-specific']?.data?.['data-file'];
  if (dataFile !== undefined) {
    return `${file} keeps its data in an external data file (${dataFile}); an image must be one self-contained qcow2 file (convert it with: qemu-img convert -O qcow2 ${file} OUT.qcow2)`;
  }
  return undefined;
}

/**
 * Add `qcow2File` as disk image `name` (booted with its own bootloader). The file is copied, so the
 * original can go; only a self-contained qcow2 is accepted (see diskImageProblem). Replaces an image
 * of that name only with `{ replace: true }`; VMs made from the old one keep their own links to it.
 */
export async function importImage(storeDir: string, name: string, qcow2File: string,
  opts: { replace?: boolean } = {}): Promise<ImageInfo> {
  const store = resolve(storeDir);
  const dir = imageDir(store, name);
  if (!opts.replace && (await readMeta(dir))) throw new Error(`image "${name}" already exists; remove it first or replace it`);
  const problem = await diskImageProblem(qcow2File);
  if (problem) throw new Error(`cannot import ${name}: ${problem}`);
  await privateDir(store);
  const tmp = join(store, `.import-${process.pid}-${Date.now()}`);
  await privateDir(tmp);
  try {
    const disk = join(tmp, 'base.qcow2');
    await copyFile(resolve(qcow2File), disk, fsConstants.COPYFILE_FICLONE);
    // Checked again on the copy: the original could have been swapped between the check and the copy.
    const copied = await diskImageProblem(disk);
    if (copied) throw new Error(`cannot import ${name}: ${copied.replaceAll(disk, qcow2File)}`);
    const meta: ImageMeta = { name, kind: 'disk', created: new Date().toISOString(), source: `import of ${resolve(qcow2File)}` };
    await writeFile(join(tmp, 'image.json'), JSON.stringify(meta) + '\n');
    await privateFiles(tmp);
    const old = join(store, `.old-${process.pid}-${Date.now()}`);
    if (await exists(dir)) await rename(dir, old);
    await rename(tmp, dir);
    await rm(old, { recursive: true, force: true });
    return info(dir, meta);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** Delete image `name` from the store. VMs made from it keep working (they hold hard links). */
export async function removeImage(storeDir: string, name: string): Promise<void> {
  const dir = imageDir(storeDir, name);
  if (!(await readMeta(dir))) throw new ImageNotFoundError(name, `image "${name}" is not on this worker`);
  await rm(dir, { recursive: true, force: true });
}
