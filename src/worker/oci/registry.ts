// A client of one registry's v2 API (the OCI distribution spec): manifests, blobs (streamed, with
// Range for resumed downloads), uploads; auth by the registry's challenge (bearer token from its
// token service, anonymous or with a user; or Basic); HTTPS with the host's CAs plus an optional
// one, plain HTTP only for a registry marked insecure. Passwords and tokens are never logged or
// put in a message.
import { createHash } from 'node:crypto';
import http, { type IncomingMessage } from 'node:http';
import https from 'node:https';
import type { Readable } from 'node:stream';
import tls from 'node:tls';
import { BlobResponse, UnsupportedFraming } from './blob-http.ts';
import { PullError, registryErrorText, tokenServiceErrorText } from './errors.ts';
import { registryEndpoint } from './reference.ts';

/** How to reach one registry; the worker's lookup is the single source of these. */
export interface RegistrySettings {
  username?: string;
  password?: string;
  /** plain HTTP (no TLS) */
  insecure?: boolean;
  /** an extra CA to trust (PEM), on top of the host's */
  ca?: string;
}

export type RegistryLookup = (host: string) => RegistrySettings | undefined;

export const MEDIA = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
} as const;

const MANIFEST_ACCEPT = [MEDIA.ociIndex, MEDIA.ociManifest, MEDIA.dockerList, MEDIA.dockerManifest].join(', ');
/** Manifests are small JSON documents; a larger answer is not one. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
const IDLE_TIMEOUT_MS = 60_000;

export interface FetchedManifest {
  /** sha256 of the bytes, checked against what was asked for and what the registry said */
  digest: string;
  mediaType: string;
  body: Buffer;
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/** `Bearer realm="…",service="…",scope="…"` → its scheme and parameters. */
export function parseChallenge(header: string | undefined): Challenge | undefined {
  if (!header) return undefined;
  const m = /^\s*(\S+)\s*(.*)$/.exec(header);
  if (!m) return undefined;
  const params: Record<string, string> = {};
  for (const p of m[2].matchAll(/([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    params[p[1].toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3];
  }
  return { scheme: m[1].toLowerCase(), params };
}

let hostCAs: string[] | undefined;
/** Node's bundled CAs and the host's own store (what `--use-system-ca` would add), once. */
function trustedCAs(extra?: string): string[] {
  hostCAs ??= [...new Set([...tls.getCACertificates('default'), ...tls.getCACertificates('system')])];
  return extra ? [...hostCAs, extra] : hostCAs;
}

/** An answer: node:http's, or a blob's read by blob-http.ts. */
type Answer = IncomingMessage | BlobResponse;

async function readBody(res: Answer, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of res as AsyncIterable<Buffer>) {
    n += chunk.length;
    if (n > limit) {
      res.destroy();
      throw new PullError('BAD_IMAGE', `the answer is larger than ${limit} bytes`);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

type Body = Buffer | (() => Readable);

interface CallOptions {
  method: 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH';
  /** a path on the registry or an absolute URL (an upload's Location) */
  url: string;
  repo: string;
  push?: boolean;
  headers?: Record<string, string>;
  body?: Body;
  /** what this asks for, in error messages: `manifest team/ubuntu:24.04` */
  what: string;
  expect: number[];
  signal?: AbortSignal;
  /** a blob's GET: read by blob-http.ts when the answer's framing allows */
  blob?: boolean;
}

export class RegistryClient {
  readonly registry: string;
  private readonly base: URL;
  private readonly settings: RegistrySettings;
  private readonly agent: http.Agent;
  /** Authorization header per scope (repository and pull/push) */
  private readonly auth = new Map<string, string>();

  constructor(registry: string, settings: RegistrySettings = {}) {
    this.registry = registry;
    this.settings = settings;
    this.base = new URL(`${settings.insecure ? 'http' : 'https'}://${registryEndpoint(registry)}/`);
    this.agent = settings.insecure
      ? new http.Agent({ keepAlive: true, maxSockets: 8 })
      : new https.Agent({ keepAlive: true, maxSockets: 8, ca: trustedCAs(settings.ca) });
  }

  close(): void {
    this.agent.destroy();
  }

  /** The manifest (or index) `reference` (a tag or a digest) of `repo`, its digest checked. */
  async getManifest(repo: string, reference: string, signal?: AbortSignal): Promise<FetchedManifest> {
    const what = `manifest ${repo}${reference.startsWith('sha256:') ? '@' : ':'}${reference}`;
    const res = await this.call({ method: 'GET', url: `/v2/${repo}/manifests/${reference}`, repo, headers: { accept: MANIFEST_ACCEPT }, what, expect: [200], signal });
    const body = await readBody(res, MAX_MANIFEST_BYTES);
    const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`;
    const claimed = res.headers['docker-content-digest'];
    if (reference.startsWith('sha256:') && digest !== reference) {
      throw new PullError('DIGEST_MISMATCH', `${this.registry} sent a ${what} whose content has digest ${digest}`);
    }
    if (typeof claimed === 'string' && claimed.startsWith('sha256:') && claimed !== digest) {
      throw new PullError('DIGEST_MISMATCH', `${this.registry} says ${what} has digest ${claimed} but its content has ${digest}`);
    }
    const type = (res.headers['content-type'] ?? '').split(';')[0].trim();
    let mediaType = type;
    try {
      const declared = (JSON.parse(body.toString('utf8')) as { mediaType?: unknown }).mediaType;
      if (typeof declared === 'string') mediaType = declared;
    } catch {
      throw new PullError('BAD_IMAGE', `${this.registry} sent a ${what} that is not JSON`);
    }
    return { digest, mediaType, body };
  }

  /** The digest `reference` has now (HEAD; a GET when the registry does not say it). */
  async manifestDigest(repo: string, reference: string, signal?: AbortSignal): Promise<string> {
    const what = `manifest ${repo}:${reference}`;
    const res = await this.call({ method: 'HEAD', url: `/v2/${repo}/manifests/${reference}`, repo, headers: { accept: MANIFEST_ACCEPT }, what, expect: [200], signal });
    res.resume();
    const claimed = res.headers['docker-content-digest'];
    if (typeof claimed === 'string' && /^sha256:[a-f0-9]{64}$/.test(claimed)) return claimed;
    return (await this.getManifest(repo, reference, signal)).digest;
  }

  /**
   * The blob's bytes from `start` on: `partial` says whether the registry honoured the range (206);
   * when it did not (200) the stream starts at byte 0.
   */
  async getBlob(repo: string, digest: string, start: number, signal?: AbortSignal): Promise<{ res: Answer; partial: boolean }> {
    const headers: Record<string, string> = start > 0 ? { range: `bytes=${start}-` } : {};
    const res = await this.call({ method: 'GET', url: `/v2/${repo}/blobs/${digest}`, repo, headers, what: `blob ${digest} of ${repo}`, expect: [200, 206], signal, blob: true });
    if (res.statusCode === 206) {
      const m = /^bytes (\d+)-/.exec(String(res.headers['content-range'] ?? ''));
      if (!m || Number(m[1]) !== start) {
        res.destroy();
        throw new PullError('UNREACHABLE', `${this.registry} answered a range request for blob ${digest} with the wrong range (${res.headers['content-range']})`);
      }
      return { res, partial: true };
    }
    return { res, partial: false };
  }

  async blobExists(repo: string, digest: string): Promise<boolean> {
    const res = await this.call({ method: 'HEAD', url: `/v2/${repo}/blobs/${digest}`, repo, push: true, what: `blob ${digest} of ${repo}`, expect: [200, 404] });
    res.resume();
    return res.statusCode === 200;
  }

  /** Uploads a blob in one PUT (the spec's monolithic upload); `body` makes its bytes. */
  async uploadBlob(repo: string, digest: string, size: number, body: () => Readable): Promise<void> {
    const what = `an upload of blob ${digest} to ${repo}`;
    const started = await this.call({ method: 'POST', url: `/v2/${repo}/blobs/uploads/`, repo, push: true, headers: { 'content-length': '0' }, body: Buffer.alloc(0), what, expect: [202] });
    started.resume();
    const location = started.headers.location;
    if (!location) throw new PullError('UNREACHABLE', `${this.registry} started ${what} without saying where to send it (no Location)`);
    const url = new URL(location, this.base);
    url.searchParams.set('digest', digest);
    const done = await this.call({
      method: 'PUT', url: url.href, repo, push: true, what,
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
      body, expect: [201],
    });
    done.resume();
  }

  /** Stores a manifest under `reference` (a tag); returns its digest. */
  async putManifest(repo: string, reference: string, mediaType: string, body: Buffer): Promise<string> {
    const res = await this.call({
      method: 'PUT', url: `/v2/${repo}/manifests/${reference}`, repo, push: true, what: `manifest ${repo}:${reference}`,
      headers: { 'content-type': mediaType, 'content-length': String(body.length) }, body, expect: [201],
    });
    res.resume();
    return `sha256:${createHash('sha256').update(body).digest('hex')}`;
  }

  // --- requests and auth -------------------------------------------------------------------------

  private scope(repo: string, push?: boolean): string {
    return `repository:${repo}:${push ? 'pull,push' : 'pull'}`;
  }

  private async call(o: CallOptions): Promise<Answer> {
    const scope = this.scope(o.repo, o.push);
    for (let attempt = 0; ; attempt++) {
      const auth = this.auth.get(scope);
      const { res, url } = await this.follow(o, auth);
      if (res.statusCode === 401 && url.origin !== this.base.origin) {
        // Only the registry's own challenge names where credentials go: a host it redirected to
        // (a storage host) could otherwise send them to a token service of its choosing.
        const text = (await readBody(res, 65536).catch(() => Buffer.alloc(0))).toString('utf8');
        const detail = registryErrorText(text);
        throw new PullError('UNAUTHORIZED', `${this.registry} redirected ${o.what} to ${url.origin}, which answered 401 Unauthorized${detail ? `: ${detail}` : ''}; credentials go only to the registry and the token service it names`);
      }
      if (res.statusCode === 401 && attempt === 0) {
        const text = (await readBody(res, 65536).catch(() => Buffer.alloc(0))).toString('utf8');
        await this.authenticate(parseChallenge(res.headers['www-authenticate'] as string | undefined), scope, o.what, text);
        continue;
      }
      if (o.expect.includes(res.statusCode ?? 0)) return res;
      const text = o.method === 'HEAD' ? '' : (await readBody(res, 65536).catch(() => Buffer.alloc(0))).toString('utf8');
      res.resume();
      throw this.statusError(res, o.what, text);
    }
  }

  /** Sends the request, following redirects (a blob is often served by a storage host: no credentials go there). */
  private async follow(o: CallOptions, auth: string | undefined): Promise<{ res: Answer; url: URL }> {
    let url = new URL(o.url, this.base);
    for (let hops = 0; ; hops++) {
      const sameOrigin = url.origin === this.base.origin;
      const headers: Record<string, string> = { ...o.headers };
      if (auth && sameOrigin) headers.authorization = auth;
      const res = o.blob && o.method === 'GET' ? await this.sendBlob(url, headers, o.signal) : await this.send(o.method, url, headers, o.body, o.signal);
      const location = res.headers.location;
      if ((o.method === 'GET' || o.method === 'HEAD') && [301, 302, 303, 307, 308].includes(res.statusCode ?? 0) && location && hops < 5) {
        res.resume();
        url = new URL(location, url);
        if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new PullError('UNREACHABLE', `${this.registry} redirected ${o.what} to ${url.protocol}`);
        continue;
      }
      return { res, url };
    }
  }

  private send(method: string, url: URL, headers: Record<string, string>, body: Body | undefined, signal?: AbortSignal): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      const mod = url.protocol === 'http:' ? http : https;
      // A redirect to another scheme gets a fresh connection with the same trust.
      const agent = (url.protocol === 'http:') === (this.agent instanceof https.Agent) ? undefined : this.agent;
      const req = mod.request(url, {
        method, headers, agent, signal,
        ...(url.protocol === 'https:' && !agent ? { ca: trustedCAs(this.settings.ca) } : {}),
      });
      req.setTimeout(IDLE_TIMEOUT_MS, () => req.destroy(new Error(`no answer in ${IDLE_TIMEOUT_MS / 1000} s`)));
      req.on('response', (res) => {
        res.setTimeout(IDLE_TIMEOUT_MS, () => res.destroy(new Error(`the registry sent nothing for ${IDLE_TIMEOUT_MS / 1000} s`)));
        resolve(res);
      });
      req.on('error', (err: NodeJS.ErrnoException) => reject(this.requestError(url, err)));
      if (body === undefined) req.end();
      else if (Buffer.isBuffer(body)) req.end(body);
      else {
        const stream = body();
        stream.on('error', (err) => req.destroy(err));
        stream.pipe(req);
      }
    });
  }

  private requestError(url: URL, err: NodeJS.ErrnoException): Error {
    if (err.name === 'AbortError') return err;
    const tlsHint = /certificate|self.signed|CERT_|unable to verify/i.test(`${err.code} ${err.message}`)
      ? ' (a private CA? trust it with --registry-ca-file; plain HTTP needs --insecure-registry)' : '';
    return new PullError('UNREACHABLE', `cannot reach registry ${this.registry} (${url.protocol.slice(0, -1)}): ${err.message}${tlsHint}`, { cause: err });
  }

  /** A blob's GET through blob-http.ts; node:http when the answer comes in a framing it does not read. */
  private async sendBlob(url: URL, headers: Record<string, string>, signal?: AbortSignal): Promise<Answer> {
    try {
      return await BlobResponse.get({ url, headers, signal, idleTimeoutMs: IDLE_TIMEOUT_MS, ca: url.protocol === 'https:' ? trustedCAs(this.settings.ca) : undefined });
    } catch (err) {
      if (err instanceof UnsupportedFraming) return this.send('GET', url, headers, undefined, signal);
      throw this.requestError(url, err as NodeJS.ErrnoException);
    }
  }

  private credentials(): string | undefined {
    const { username, password } = this.settings;
    return username !== undefined ? `Basic ${Buffer.from(`${username}:${password ?? ''}`).toString('base64')}` : undefined;
  }

  private async authenticate(challenge: Challenge | undefined, scope: string, what: string, body: string): Promise<void> {
    const basic = this.credentials();
    if (challenge?.scheme === 'basic') {
      if (!basic) throw this.unauthorized(what, body, 'no credentials are configured for it');
      this.auth.set(scope, basic);
      return;
    }
    if (challenge?.scheme !== 'bearer' || !challenge.params.realm) {
      throw this.unauthorized(what, body, `it asked for an authentication this client does not speak (${challenge?.scheme ?? 'no WWW-Authenticate'})`);
    }
    let realm: URL;
    try {
      realm = new URL(challenge.params.realm);
    } catch {
      throw new PullError('UNAUTHORIZED', `${this.registry} names a token service that is not a URL (${challenge.params.realm})`);
    }
    if (realm.protocol !== 'https:' && !(realm.protocol === 'http:' && this.settings.insecure)) {
      throw new PullError('UNAUTHORIZED', `${this.registry} names a token service over ${realm.protocol} (${realm.origin}); only HTTPS is used unless the registry is insecure`);
    }
    if (challenge.params.service) realm.searchParams.set('service', challenge.params.service);
    realm.searchParams.set('scope', scope);
    const headers: Record<string, string> = basic ? { authorization: basic } : {};
    const res = await this.send('GET', realm, headers, undefined);
    const text = (await readBody(res, 1024 * 1024)).toString('utf8');
    if (res.statusCode !== 200) {
      const detail = tokenServiceErrorText(text) ?? (text.length < 200 ? text.trim() : '');
      throw new PullError('UNAUTHORIZED', `the token service of ${this.registry} (${realm.origin}) refused ${basic ? `user ${this.settings.username}` : 'an anonymous request'}: ${res.statusCode} ${res.statusMessage}${detail ? `: ${detail}` : ''}`);
    }
    let token: unknown;
    try {
      const json = JSON.parse(text) as { token?: unknown; access_token?: unknown };
      token = json.token ?? json.access_token;
    } catch {
      token = undefined;
    }
    if (typeof token !== 'string' || !token) throw new PullError('UNAUTHORIZED', `the token service of ${this.registry} (${realm.origin}) sent no token`);
    this.auth.set(scope, `Bearer ${token}`);
  }

  private unauthorized(what: string, body: string, why: string): PullError {
    const detail = registryErrorText(body);
    return new PullError('UNAUTHORIZED', `${this.registry} refused ${what}: 401 Unauthorized${detail ? `: ${detail}` : ''}; ${why}`);
  }

  private statusError(res: Answer, what: string, body: string): PullError {
    const status = `${res.statusCode} ${res.statusMessage ?? ''}`.trim();
    const detail = registryErrorText(body);
    const answer = `${status}${detail ? `: ${detail}` : ''}`;
    switch (res.statusCode) {
      case 401: {
        const user = this.settings.username;
        return new PullError('UNAUTHORIZED', `${this.registry} refused ${what}: ${answer}; ${user !== undefined ? `user ${user} was not accepted (wrong password?)` : 'no credentials are configured for it'}`);
      }
      case 403:
        return new PullError('UNAUTHORIZED', `${this.registry} denied ${what}: ${answer}`);
      case 404:
        return new PullError('NOT_FOUND', `${this.registry} has no ${what}: ${answer}`);
      default:
        return new PullError('UNREACHABLE', `${this.registry} answered ${what} with ${answer}`);
    }
  }
}
