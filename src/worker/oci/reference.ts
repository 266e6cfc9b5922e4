// Image references as registries spell them: HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX]. Only
// references that name their registry host are pulled; a bare name (`debian-dev`) is a local image.

export interface ImageReference {
  /** host[:port] as written (docker.io is reached at registry-1.docker.io, see registryEndpoint) */
  registry: string;
  repository: string;
  /** `latest` when neither a tag nor a digest is given */
  tag?: string;
  /** `sha256:HEX`; when both are given the digest decides what is pulled */
  digest?: string;
}

const COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*';
const REPOSITORY_RE = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`);
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const HOST_RE = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/;
export const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

/** The first path component names a registry host when it looks like one (as Docker decides). */
function looksLikeHost(component: string): boolean {
  return component.includes('.') || component.includes(':') || component === 'localhost';
}

/** The reference, or an Error saying what is wrong with it. */
export function parseReference(image: string): ImageReference {
  const fail = (why: string) => new Error(`invalid image reference ${JSON.stringify(image)}: ${why}`);
  if (image.length > 1024) throw fail('longer than 1024 characters');
  const slash = image.indexOf('/');
  if (slash < 0 || !looksLikeHost(image.slice(0, slash))) throw fail('it names no registry host (HOST[:PORT]/REPOSITORY[:TAG])');
  const registry = image.slice(0, slash);
  if (!HOST_RE.test(registry)) throw fail(`"${registry}" is not a host[:port]`);
  let rest = image.slice(slash + 1);
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_RE.test(digest)) throw fail(`"${digest}" is not a sha256 digest (sha256: and 64 lower-case hex digits)`);
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) throw fail(`"${tag}" is not a tag`);
  }
  if (!REPOSITORY_RE.test(rest)) throw fail(`"${rest}" is not a repository name (lower-case letters, digits, separators . _ - and /)`);
  return { registry, repository: rest, tag: tag ?? (digest ? undefined : 'latest'), digest };
}

/** Whether `image` is a registry reference (pulled) rather than the name of a local image. */
export function isImageReference(image: string): boolean {
  try {
    parseReference(image);
    return true;
  } catch {
    return false;
  }
}

/** The reference written in full: `host/repo:tag`, `host/repo@sha256:…` or `host/repo:tag@sha256:…`. */
export function formatReference(ref: ImageReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag ? `:${ref.tag}` : ''}${ref.digest ? `@${ref.digest}` : ''}`;
}

/** How progress messages name it: repository and tag without the host (`team/ubuntu:24.04`), or a short digest. */
export function shortName(ref: ImageReference): string {
  if (ref.tag) return `${ref.repository}:${ref.tag}`;
  return `${ref.repository}@${ref.digest!.slice(0, 'sha256:'.length + 12)}`;
}

/** What to ask the registry for: the digest when there is one, else the tag. */
export function manifestReference(ref: ImageReference): string {
  return ref.digest ?? ref.tag ?? 'latest';
}

/** Docker Hub's registry is named docker.io in references but served at registry-1.docker.io. */
export function registryEndpoint(registry: string): string {
  return registry === 'docker.io' || registry === 'index.docker.io' ? 'registry-1.docker.io' : registry;
}
