// Publishes a local image in the containerDisk layout, so any worker (or KubeVirt) can pull it: one
// gzip layer with `disk/disk.qcow2` and, for a kernel-booted image, `boot/vmlinux|vmlinuz`,
// `boot/initrd.img` and `boot/cmdline`; OCI media types. The layer is packed into a temp file first
// (the upload needs its digest up front), then sent unless the registry has it already.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { PassThrough, Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import type { ResolvedImage } from '../images.ts';
import { PullError } from './errors.ts';
import { hostArchitecture } from './manifest.ts';
import { formatPullProgress, ProgressMeter } from './progress.ts';
import { parseReference, shortName } from './reference.ts';
import { MEDIA, RegistryClient, type RegistrySettings } from './registry.ts';
import { TAR_END, tarHeader, tarPadding } from './tar.ts';

export interface PushResult {
  reference: string;
  /** the manifest's digest: `REGISTRY/REPO@DIGEST` names exactly what was pushed */
  digest: string;
  /** bytes of the (compressed) layer */
  size: number;
  /** false when the registry had the layer already */
  uploaded: boolean;
}

interface LayerFile {
  path: string;
  /** a file to copy, or the bytes */
  from: string | Buffer;
}

function layerFiles(image: ResolvedImage): LayerFile[] {
  const files: LayerFile[] = [{ path: 'disk/disk.qcow2', from: image.disk }];
  if (image.kind === 'kernel') {
    files.push({ path: `boot/${basename(image.kernel!)}`, from: image.kernel! }, { path: 'boot/initrd.img', from: image.initrd! });
    files.push({ path: 'boot/cmdline', from: Buffer.from(`${image.cmdline ?? 'console=ttyS0'}\n`) });
  }
  return files;
}

/** The layer's tar stream: directories, then each file's header, bytes and padding. */
async function* tarStream(files: LayerFile[], mtime: number): AsyncGenerator<Buffer> {
  for (const dir of [...new Set(files.map((f) => f.path.split('/')[0]))]) yield tarHeader(`${dir}/`, '5', 0, mtime);
  for (const f of files) {
    const size = typeof f.from === 'string' ? (await stat(f.from)).size : f.from.length;
    yield tarHeader(f.path, '0', size, mtime);
    if (typeof f.from === 'string') {
      let sent = 0;
      for await (const chunk of createReadStream(f.from, { highWaterMark: 1024 * 1024 })) {
        sent += (chunk as Buffer).length;
        yield chunk as Buffer;
      }
      if (sent !== size) throw new Error(`${f.from} changed while it was packed`);
    } else yield f.from;
    yield tarPadding(size);
  }
  yield TAR_END;
}

function hashing(hash: ReturnType<typeof createHash>, count?: (n: number) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      count?.(chunk.length);
      done(null, chunk);
    },
  });
}

/** Pushes `image` as `ref` (HOST/REPO:TAG); `progress` gets lines like a pull's (`pushing repo:tag: 37 % of …`). */
export async function pushImage(image: ResolvedImage, ref: string, settings: RegistrySettings = {}, progress: (line: string) => void = () => {}): Promise<PushResult> {
  const parsed = parseReference(ref);
  if (parsed.digest) throw new PullError('BAD_IMAGE', `push to a tag, not a digest: ${ref}`);
  const tag = parsed.tag ?? 'latest';
  const label = shortName(parsed);
  const files = layerFiles(image);
  const tmp = join(dirname(image.dir), `.push-${process.pid}-${randomBytes(6).toString('hex')}`);
  await mkdir(tmp, { recursive: true, mode: 0o700 });
  const client = new RegistryClient(parsed.registry, settings);
  try {
    // Pack: tar → sha256 (the diff id) → gzip → sha256 (the blob digest) → file.
    const layerFile = join(tmp, 'layer.tar.gz');
    const diffHash = createHash('sha256');
    const blobHash = createHash('sha256');
    let raw = 0;
    progress(`pushing ${label}: packing ${files.map((f) => f.path).join(', ')}`);
    await pipeline(Readable.from(tarStream(files, Math.floor(Date.now() / 1000))), hashing(diffHash, (n) => (raw += n)), createGzip({ level: 6 }), hashing(blobHash), createWriteStream(layerFile, { mode: 0o600 }));
    const size = (await stat(layerFile)).size;
    const layer = { mediaType: MEDIA.ociLayerGzip, digest: `sha256:${blobHash.digest('hex')}`, size };
    const configBody = Buffer.from(JSON.stringify({
      created: new Date().toISOString(),
      architecture: hostArchitecture(),
      os: 'linux',
      config: {},
      rootfs: { type: 'layers', diff_ids: [`sha256:${diffHash.digest('hex')}`] },
    }));
    const config = { mediaType: MEDIA.ociConfig, digest: `sha256:${createHash('sha256').update(configBody).digest('hex')}`, size: configBody.length };
    let uploaded = false;
    if (!(await client.blobExists(parsed.repository, layer.digest))) {
      const meter = new ProgressMeter(label, size, (p) => progress(formatPullProgress({ ...p, verb: 'pushing' })));
      await client.uploadBlob(parsed.repository, layer.digest, size, () => {
        const counted = new PassThrough();
        counted.on('data', (c: Buffer) => meter.add(c.length));
        return createReadStream(layerFile, { highWaterMark: 1024 * 1024 }).pipe(counted);
      });
      uploaded = true;
    }
    if (!(await client.blobExists(parsed.repository, config.digest))) {
      await client.uploadBlob(parsed.repository, config.digest, config.size, () => Readable.from([configBody]));
    }
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA.ociManifest, config, layers: [layer] }));
    const digest = await client.putManifest(parsed.repository, tag, MEDIA.ociManifest, manifest);
    progress(`pushed ${label} (${(size / 1024 / 1024).toFixed(1)} MiB compressed from ${(raw / 1024 / 1024).toFixed(1)} MiB${uploaded ? '' : ', the layer was there already'}; ${digest})`);
    return { reference: ref, digest, size, uploaded };
  } finally {
    client.close();
    await rm(tmp, { recursive: true, force: true });
  }
}
