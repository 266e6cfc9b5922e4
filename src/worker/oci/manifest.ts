// The JSON documents of an image as far as a containerDisk needs them: an index (or Docker manifest
// list) picks the manifest of this host's platform; a manifest lists the layers. Everything a
// registry sends is checked before a digest becomes a file name or a size a limit.
import { arch } from 'node:os';
import { PullError } from './errors.ts';
import { MEDIA } from './registry.ts';
import { DIGEST_RE } from './reference.ts';

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string; variant?: string };
}

export interface ImageManifest {
  config: Descriptor;
  layers: Descriptor[];
}

const LAYER_TYPES = new Set([
  'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.oci.image.layer.v1.tar+zstd',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.diff.tar',
]);

export const isIndex = (mediaType: string) => mediaType === MEDIA.ociIndex || mediaType === MEDIA.dockerList;
export const isManifest = (mediaType: string) => mediaType === MEDIA.ociManifest || mediaType === MEDIA.dockerManifest;

/** This host's architecture as OCI platforms name it. */
export function hostArchitecture(): string {
  const a = arch();
  return a === 'x64' ? 'amd64' : a === 'ia32' ? '386' : a;
}

function descriptor(value: unknown, where: string, label: string): Descriptor {
  const d = value as Partial<Descriptor> | null;
  if (!d || typeof d !== 'object' || typeof d.digest !== 'string' || !DIGEST_RE.test(d.digest)) {
    throw new PullError('BAD_IMAGE', `image ${label}: ${where} has no sha256 digest`);
  }
  if (typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw new PullError('BAD_IMAGE', `image ${label}: ${where} has no valid size`);
  }
  return { mediaType: typeof d.mediaType === 'string' ? d.mediaType : '', digest: d.digest, size: d.size, platform: d.platform };
}

function parse(body: Buffer, label: string): Record<string, unknown> {
  try {
    const v = JSON.parse(body.toString('utf8')) as unknown;
    if (v && typeof v === 'object') return v as Record<string, unknown>;
  } catch {
    // below
  }
  throw new PullError('BAD_IMAGE', `image ${label}: the registry's manifest is not a JSON object`);
}

/** The index's manifest for linux and this host's architecture. */
export function pickPlatform(body: Buffer, label: string): Descriptor {
  const manifests = parse(body, label).manifests;
  if (!Array.isArray(manifests)) throw new PullError('BAD_IMAGE', `image ${label}: its index lists no manifests`);
  const all = manifests.map((m, i) => descriptor(m, `manifest ${i + 1} of the index`, label));
  const want = hostArchitecture();
  const match = all.find((d) => d.platform?.os === 'linux' && d.platform.architecture === want && isManifest(d.mediaType));
  if (match) return match;
  const plain = all.filter((d) => !d.platform && isManifest(d.mediaType));
  if (plain.length === 1) return plain[0];
  const has = all.map((d) => (d.platform ? `${d.platform.os}/${d.platform.architecture}` : 'no platform')).join(', ');
  throw new PullError('NOT_FOUND', `image ${label} has no linux/${want} variant (it has: ${has || 'nothing'})`);
}

export function parseManifest(body: Buffer, label: string): ImageManifest {
  const m = parse(body, label);
  if (m.schemaVersion !== 2) throw new PullError('BAD_IMAGE', `image ${label}: manifest schema version ${String(m.schemaVersion)} is not supported (only 2)`);
  const config = descriptor(m.config, 'the config', label);
  if (!Array.isArray(m.layers) || m.layers.length === 0) throw new PullError('BAD_IMAGE', `image ${label} has no layers`);
  if (m.layers.length > 128) throw new PullError('BAD_IMAGE', `image ${label} has ${m.layers.length} layers (at most 128)`);
  const layers = m.layers.map((l, i) => descriptor(l, `layer ${i + 1}`, label));
  for (const [i, l] of layers.entries()) {
    if (!LAYER_TYPES.has(l.mediaType)) throw new PullError('BAD_IMAGE', `image ${label}: layer ${i + 1} is a ${l.mediaType || 'blob without a media type'}, not a file system layer`);
  }
  return { config, layers };
}
