// The Orchard API client: HTTPS with a pinned controller certificate, Basic auth, JSON errors as
// exceptions. Used by the CLI, the worker and the tests.
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { createWebSocketStream, WebSocket } from 'ws';
import { ReadyTunnels } from './ready-tunnels.ts';
import { TUNNEL_FRAME_BYTES } from './tunnel-ends.ts';
import type {
  ClusterSettings,
  ControllerInfo,
  Event,
  ImagePull,
  ImagePullAnswer,
  ImagePullRequest,
  Orphan,
  Registry,
  RegistryInput,
  ServiceAccount,
  VM,
  VMStateUpdate,
  WatchEvent,
  Worker,
  WorkerImagesReport,
  EventWatchLine,
} from '../api/schemas.ts';

export interface ClientOptions {
  url: string;
  serviceAccountName?: string;
  serviceAccountToken?: string;
  /** PEM of the pinned controller certificate: only a controller presenting exactly it is trusted. */
  certificate?: string;
  /**
   * Connections kept to the controller for API requests (more requests queue). Bounded, so that a
   * thousand workers cost the controller a few thousand TLS connections, not one per request in flight.
   */
  maxSockets?: number;
  /** The CLI context these options come from: named in errors ("cannot reach the controller of context …"). */
  contextName?: string;
}

import { ApiError, CertificateMismatchError } from './errors.ts';

export { ApiError, CertificateMismatchError };

/** The controller could not be reached at all (refused, unresolvable, timed out, not TLS…); `code` is the system's (ECONNREFUSED…). */
export class UnreachableError extends Error {
  readonly code?: string;
  constructor(message: string, cause: Error & { code?: string }) {
    super(message, { cause });
    this.code = cause.code;
  }
}

/** What a network error code means, in words. */
const NETWORK_ERRORS: Record<string, (host: string) => string> = {
  ECONNREFUSED: () => 'connection refused (is it running?)',
  ENOTFOUND: (host) => `no such host "${host}"`,
  EAI_AGAIN: (host) => `cannot resolve "${host}" (DNS lookup failed; try again)`,
  EAI_FAIL: (host) => `cannot resolve "${host}"`,
  ETIMEDOUT: () => 'the connection timed out',
  ECONNRESET: () => 'the connection was reset before it answered',
  EPIPE: () => 'the connection was closed',
  EHOSTUNREACH: () => 'no route to the host',
  ENETUNREACH: () => 'the network is unreachable',
  EHOSTDOWN: () => 'the host is down',
  EADDRNOTAVAIL: () => 'the address is not available',
  ERR_SSL_WRONG_VERSION_NUMBER: () => 'it does not speak TLS (is it an http:// controller, run with --insecure-no-tls?)',
  ERR_SSL_PACKET_LENGTH_TOO_LONG: () => 'it does not speak TLS (is it an http:// controller, run with --insecure-no-tls?)',
  ECONNABORTED: () => 'the connection was aborted',
};

/** Fetches the certificate a TLS server presents, without trusting it or sending anything. */
export function probeCertificate(url: string): Promise<{ pem: string; fingerprint: string; trusted: boolean; error?: string }> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port || 443), servername: isIP(u.hostname) ? undefined : u.hostname, rejectUnauthorized: false });
    socket.setTimeout(10_000, () => socket.destroy(new Error(`timed out connecting to ${url}`)));
    socket.once('secureConnect', () => {
      const raw = socket.getPeerCertificate().raw;
      const cert = new X509Certificate(raw);
      const trusted = socket.authorized;
      socket.end();
      resolve({ pem: cert.toString(), fingerprint: cert.fingerprint256, trusted, error: socket.authorizationError?.toString() });
    });
    socket.once('error', reject);
  });
}

/**
 * Frame masking for client WebSockets. RFC 6455 masks client frames so that plain-text proxies can't
 * be confused into caching attacker-chosen bytes; inside TLS no intermediary sees them, and masking
 * (a byte-by-byte loop in JavaScript on both ends) was 40-50 % of a tunnel's CPU (BENCHMARKS.md).
 * So: an all-zero mask (which `ws` skips) on wss://, random masks on plain ws://.
 */
export function wsMasking(url: URL): { generateMask?: (mask: Buffer) => void } {
  return url.protocol === 'wss:' ? { generateMask: (mask: Buffer) => void mask.fill(0) } : {};
}

const isIP = (host: string) => /^[\d.]+$/.test(host) || host.startsWith('[');


/** A tunnel's byte stream (client and worker side); a big write goes out as several frames, so any write size works. */
export function tunnelStream(ws: WebSocket): Duplex {
  const stream = createWebSocketStream(ws);
  const writeFrame = stream._write.bind(stream);
  stream._write = (chunk: Buffer, encoding, callback) => {
    if (chunk.length <= TUNNEL_FRAME_BYTES) return writeFrame(chunk, encoding, callback);
    const next = (offset: number) => (err?: Error | null) => {
      if (err || offset >= chunk.length) return callback(err);
      writeFrame(chunk.subarray(offset, offset + TUNNEL_FRAME_BYTES), encoding, next(offset + TUNNEL_FRAME_BYTES));
    };
    next(0)();
  };
  return stream;
}

export class OrchardClient {
  readonly url: URL;
  private readonly agent: http.Agent;
  private readonly auth?: string;
  readonly options: ClientOptions;
  private readonly fingerprint?: string;
  private secureContext?: tls.SecureContext;
  /** The controller's last TLS session ticket: the next WebSocket resumes it (no certificate exchange). */
  private tlsSession?: Buffer;

  constructor(options: ClientOptions) {
    this.options = options;
    this.url = new URL(options.url.replace(/\/+$/, ''));
    if (options.serviceAccountName !== undefined && options.serviceAccountToken !== undefined) {
      this.auth = 'Basic ' + Buffer.from(`${options.serviceAccountName}:${options.serviceAccountToken}`).toString('base64');
    }
    // Idle connections close after 5 s (as Node's global agent), not when the server gives up on them
    // (72 s): a controller serving hundreds of workers keeps only the connections in use.
    const pool = { keepAlive: true, timeout: 5000, maxSockets: options.maxSockets ?? 32 };
    if (this.url.protocol === 'https:') {
      this.fingerprint = options.certificate ? new X509Certificate(options.certificate).fingerprint256 : undefined;
      this.agent = new https.Agent({ ...pool, ...this.tlsOptions() });
    } else {
      this.agent = new http.Agent(pool);
    }
  }

  /** TLS options for any connection to the controller (HTTP requests, WebSockets). */
  tlsOptions(): https.AgentOptions {
    if (!this.options.certificate) return {};
    const fingerprint = this.fingerprint;
    // One TLS context for every connection (building one per connection costs ~0.4 ms each).
    this.secureContext ??= tls.createSecureContext({ ca: this.options.certificate });
    return {
      secureContext: this.secureContext,
      // The pinned certificate is trusted for any host name, and no other certificate is.
      checkServerIdentity: (_host, cert) =>
        cert.fingerprint256 === fingerprint ? undefined : new CertificateMismatchError(`certificate fingerprint ${cert.fingerprint256} is not the pinned ${fingerprint}`),
    };
  }

  get authorization(): string | undefined {
    return this.auth;
  }

  close() {
    this.agent.destroy();
  }

  /** "the controller of context "dev" at https://…" (or without the context, for a client not made from one). */
  describeController(): string {
    const where = this.url.href.replace(/\/$/, '');
    return this.options.contextName ? `the controller of context "${this.options.contextName}" at ${where}` : `the controller at ${where}`;
  }

  /**
   * Turns a network error into one naming the controller (and context) that could not be reached,
   * and a TLS verification failure against a pinned certificate into a clear message.
   */
  private async explain(err: Error & { code?: string }): Promise<Error> {
    // A plain-HTTP server answering TLS: OpenSSL's "wrong version number" (EPROTO).
    const notTLS = err.code === 'EPROTO' && /wrong version number|packet length too long|http request/i.test(err.message);
    const why = notTLS ? NETWORK_ERRORS.ERR_SSL_WRONG_VERSION_NUMBER : err.code ? NETWORK_ERRORS[err.code] : undefined;
    if (why) return new UnreachableError(`cannot reach ${this.describeController()}: ${why(this.url.hostname)}`, err);
    if (!this.options.certificate || this.url.protocol !== 'https:') return err;
    const tlsCodes = ['DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'CERT_SIGNATURE_FAILURE', 'ERR_TLS_CERT_ALTNAME_INVALID'];
    if (!(err instanceof CertificateMismatchError) && !tlsCodes.includes(err.code ?? '')) return err;
    let actual = 'unknown';
    try {
      actual = (await probeCertificate(this.url.href)).fingerprint;
    } catch {
      // keep "unknown"
    }
    return new CertificateMismatchError(
      `the controller at ${this.url.origin} presents a certificate that differs from the one pinned for this context ` +
        `(pinned SHA-256 ${this.fingerprint}, presented ${actual}); refusing to talk to it. If the controller's certificate ` +
        `was changed on purpose, run "orchard context create" again.`,
    );
  }

  /** The URL of an API path under the controller's URL (which may have a path prefix); `ws` gives ws: or wss:. */
  urlOf(path: string, ws = false): URL {
    const u = new URL(this.url.pathname.replace(/\/$/, '') + path, this.url);
    if (ws) u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    return u;
  }

  async request<T>(method: string, path: string, body?: unknown, opts: { raw?: boolean } = {}): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: T }> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const u = this.urlOf(path);
    const lib = u.protocol === 'https:' ? https : http;
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.auth) headers.authorization = this.auth;
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(payload.length);
    }
    try {
      return await new Promise((resolve, reject) => {
        const req = lib.request(u, { method, headers, agent: this.agent }, (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            let parsed: unknown = text;
            if (!opts.raw && text && (res.headers['content-type'] ?? '').includes('json')) {
              try {
                parsed = JSON.parse(text);
              } catch {
                return reject(new ApiError(status, `controller sent malformed JSON (HTTP ${status})`));
              }
            }
            if (status >= 400) {
              const message = (parsed as { message?: string })?.message ?? (text || `HTTP ${status}`);
              return reject(new ApiError(status, message));
            }
            resolve({ status, headers: res.headers, body: parsed as T });
          });
        });
        req.on('error', reject);
        req.end(payload);
      });
    } catch (err) {
      throw await this.explain(err as Error);
    }
  }

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    return (await this.request<T>(method, path, body)).body;
  }

  /** Streams NDJSON watch events until the signal aborts or the server ends the stream. */
  async *watch<T>(path: string, signal?: AbortSignal): AsyncGenerator<WatchEvent<T>> {
    const u = this.urlOf(path);
    const lib = u.protocol === 'https:' ? https : http;
    let res: http.IncomingMessage;
    try {
      res = await new Promise<http.IncomingMessage>((resolve, reject) => {
        const req = lib.request(u, { method: 'GET', headers: this.auth ? { authorization: this.auth } : {}, agent: false, ...this.tlsOptions(), signal }, resolve);
        req.on('error', reject);
        req.end();
      });
    } catch (err) {
      if (signal?.aborted) return;
      throw await this.explain(err as Error);
    }
    if ((res.statusCode ?? 0) >= 400) {
      const chunks: Buffer[] = [];
      for await (const c of res) chunks.push(c as Buffer);
      let message = Buffer.concat(chunks).toString();
      try {
        message = (JSON.parse(message) as { message: string }).message;
      } catch {
        // plain text
      }
      throw new ApiError(res.statusCode ?? 0, message);
    }
    let buffered = '';
    try {
      for await (const chunk of res) {
        buffered += (chunk as Buffer).toString('utf8');
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (!line.trim()) continue;
          const event = JSON.parse(line) as WatchEvent<T> | { type: 'ERROR'; object: { message?: string } };
          // The controller ended the watch and says why (e.g. this reader fell too far behind).
          if (event.type === 'ERROR') throw new Error(`the controller ended the watch: ${event.object.message ?? 'no reason given'}`);
          yield event;
        }
      }
    } catch (err) {
      if (!signal?.aborted) throw err;
    } finally {
      res.destroy();
    }
  }

  /** As ws's own TLS connect, resuming the previous connection's session (the pinned fingerprint is checked all the same). */
  private readonly resumingConnect = (options: tls.ConnectionOptions & { path?: string; host?: string }) => {
    options.path = undefined;
    options.servername ??= net.isIP(options.host ?? '') ? '' : options.host;
    const socket = tls.connect({ ...options, session: this.tlsSession });
    socket.on('session', (session: Buffer) => (this.tlsSession = session));
    return socket;
  };

  /** Options for a WebSocket to `url` of this controller: credentials, pinned TLS resuming the last session, masking. */
  wsOptions(url: URL) {
    return {
      headers: this.auth ? { authorization: this.auth } : {},
      ...this.tlsOptions(),
      ...wsMasking(url),
      ...(url.protocol === 'wss:' ? { createConnection: this.resumingConnect as unknown as http.ClientRequestArgs['createConnection'] } : {}),
    };
  }

  /** Opens a WebSocket to an API path; HTTP errors reject as ApiError with the server's message. */
  async openWebSocket(path: string, handshakeTimeoutMs = 60_000): Promise<WebSocket> {
    const u = this.urlOf(path, true);
    const ws = new WebSocket(u, {
      ...this.wsOptions(u),
      handshakeTimeout: handshakeTimeoutMs,
      maxPayload: 64 * 1024 * 1024,
    });
    try {
      await new Promise<void>((resolve, reject) => {
        ws.once('open', () => resolve());
        ws.once('error', reject);
        ws.once('unexpected-response', (_req, res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            let message = Buffer.concat(chunks).toString() || `HTTP ${res.statusCode}`;
            try {
              message = (JSON.parse(message) as { message: string }).message;
            } catch {
              // plain text
            }
            reject(new ApiError(res.statusCode ?? 0, message));
          });
        });
      });
    } catch (err) {
      ws.terminate();
      throw err instanceof ApiError ? err : await this.explain(err as Error);
    }
    ws.on('error', () => {});
    return ws;
  }

  /** A flow-controlled byte stream to TCP `port` of a VM, through the controller and its worker. */
  async portForwardVM(name: string, port: number, waitSeconds = 10): Promise<{ ws: WebSocket; stream: Duplex }> {
    // The controller may wait `waitSeconds` for the VM, then up to 30 s for the worker to dial back.
    const ws = await this.openWebSocket(`/v1/vms/${encodeURIComponent(name)}/port-forward?port=${port}&wait=${waitSeconds}`, (waitSeconds + 35) * 1000);
    return { ws, stream: tunnelStream(ws) };
  }

  async portForwardWorker(name: string, port: number): Promise<{ ws: WebSocket; stream: Duplex }> {
    const ws = await this.openWebSocket(`/v1/workers/${encodeURIComponent(name)}/port-forward?port=${port}`);
    return { ws, stream: tunnelStream(ws) };
  }

  /**
   * Tunnels to one target, each opened on an idle connection kept ready ahead of time (`ready` of
   * them) when the controller supports it: see ./ready-tunnels.ts. close() it when done.
   */
  portForwarder(target: { vm: string; port: number; waitSeconds?: number } | { worker: string; port: number }, ready = 4, opts: { mux?: boolean } = {}): ReadyTunnels {
    const direct = 'vm' in target ? () => this.portForwardVM(target.vm, target.port, target.waitSeconds) : () => this.portForwardWorker(target.worker, target.port);
    const path =
      'vm' in target
        ? `/v1/vms/${encodeURIComponent(target.vm)}/port-forward/ready?port=${target.port}&wait=${target.waitSeconds ?? 10}`
        : `/v1/workers/${encodeURIComponent(target.worker)}/port-forward/ready?port=${target.port}`;
    const pool = new ReadyTunnels({
      size: ready,
      connect: () => this.openWebSocket(path),
      direct,
      streamOf: tunnelStream,
      capabilities: async () => (await this.info()).capabilities,
      // Many tunnels on one connection when the controller takes it (unless opts.mux is false, or ORCHARD_TUNNEL_MUX=0).
      mux:
        (opts.mux ?? process.env.ORCHARD_TUNNEL_MUX !== '0') === false
          ? undefined
          : {
              connect: () => this.openWebSocket('/v1/port-forward-mux'),
              request: 'vm' in target ? { vm: target.vm, port: target.port, wait: target.waitSeconds ?? 10 } : { worker: target.worker, port: target.port },
              timeoutMs: (('vm' in target ? target.waitSeconds ?? 10 : 0) + 35) * 1000,
            },
    });
    void pool.start();
    return pool;
  }

  vmIP = async (name: string, waitSeconds = 10) => (await this.call<{ ip: string }>('GET', `/v1/vms/${encodeURIComponent(name)}/ip?wait=${waitSeconds}`)).ip;

  // ---- typed helpers ----
  info = () => this.call<ControllerInfo>('GET', '/v1/controller/info');
  listVMs = (worker?: string) => this.call<VM[]>('GET', '/v1/vms' + (worker !== undefined ? `?filter=${encodeURIComponent(`worker=${worker}`)}` : ''));
  getVM = (name: string) => this.call<VM>('GET', `/v1/vms/${encodeURIComponent(name)}`);
  createVM = (vm: VM) => this.call<VM>('POST', '/v1/vms', vm);
  updateVM = (vm: VM) => this.call<VM>('PUT', `/v1/vms/${encodeURIComponent(vm.name)}`, vm);
  updateVMState = (name: string, state: VMStateUpdate) => this.call<VM>('PUT', `/v1/vms/${encodeURIComponent(name)}/state`, state);
  deleteVM = (name: string) => this.call<VM>('DELETE', `/v1/vms/${encodeURIComponent(name)}`);
  appendEvents = (name: string, events: Event[]) => this.call<unknown>('POST', `/v1/vms/${encodeURIComponent(name)}/events`, events);
  async listEvents(name: string, opts: { limit?: number; order?: 'asc' | 'desc'; cursor?: string } = {}) {
    const q = new URLSearchParams();
    if (opts.limit !== undefined) q.set('limit', String(opts.limit));
    if (opts.order) q.set('order', opts.order);
    if (opts.cursor) q.set('cursor', opts.cursor);
    const res = await this.request<Event[]>('GET', `/v1/vms/${encodeURIComponent(name)}/events${q.size ? '?' + q : ''}`);
    return { events: res.body, nextCursor: res.headers['x-next-cursor'] as string | undefined, newestCursor: res.headers['x-newest-cursor'] as string | undefined };
  }
  /** GET /v1/vms/{name}/events?watch=true (capability `vm-events-watch`): the kept events after `cursor`, then each new one, until the VM is deleted. */
  watchEvents(name: string, opts: { cursor?: string; signal?: AbortSignal } = {}) {
    const q = opts.cursor ? `&cursor=${encodeURIComponent(opts.cursor)}` : '';
    return this.watch<Event>(`/v1/vms/${encodeURIComponent(name)}/events?watch=true${q}`, opts.signal) as AsyncGenerator<EventWatchLine>;
  }
  listWorkers = () => this.call<Worker[]>('GET', '/v1/workers');
  getWorker = (name: string) => this.call<Worker>('GET', `/v1/workers/${encodeURIComponent(name)}`);
  registerWorker = (w: Worker) => this.call<Worker>('POST', '/v1/workers', w);
  reportUnassigned = (worker: string, vms: Orphan[]) =>
    this.call<{ remove: string[]; orphans: Orphan[] }>('POST', `/v1/workers/${encodeURIComponent(worker)}/orphans`, { vms });
  deleteOrphan = (worker: string, localName: string) => this.call<Orphan>('DELETE', `/v1/workers/${encodeURIComponent(worker)}/orphans/${encodeURIComponent(localName)}`);
  adoptOrphan = (worker: string, localName: string) => this.call<Orphan>('POST', `/v1/workers/${encodeURIComponent(worker)}/orphans/${encodeURIComponent(localName)}/adopt`);
  updateWorker = (w: Worker) => this.call<Worker>('PUT', `/v1/workers/${encodeURIComponent(w.name)}`, w);
  deleteWorker = (name: string) => this.call<Worker>('DELETE', `/v1/workers/${encodeURIComponent(name)}`);
  listServiceAccounts = () => this.call<ServiceAccount[]>('GET', '/v1/service-accounts');
  getServiceAccount = (name: string) => this.call<ServiceAccount>('GET', `/v1/service-accounts/${encodeURIComponent(name)}`);
  createServiceAccount = (sa: ServiceAccount) => this.call<ServiceAccount>('POST', '/v1/service-accounts', sa);
  updateServiceAccount = (sa: ServiceAccount) => this.call<ServiceAccount>('PUT', `/v1/service-accounts/${encodeURIComponent(sa.name)}`, sa);
  deleteServiceAccount = (name: string) => this.call<ServiceAccount>('DELETE', `/v1/service-accounts/${encodeURIComponent(name)}`);
  /** The worker's held images and/or one pull's progress (Orchard addition, capability "worker-images"). */
  reportImages = (worker: string, report: WorkerImagesReport) =>
    this.call<{ images: string[]; imagePulls: ImagePull[] }>('POST', `/v1/workers/${encodeURIComponent(worker)}/images`, report);
  pullImage = (request: ImagePullRequest) => this.call<ImagePullAnswer>('POST', '/v1/images/pull', request);
  listRegistries = () => this.call<Registry[]>('GET', '/v1/registries');
  getRegistry = (host: string) => this.call<Registry>('GET', `/v1/registries/${encodeURIComponent(host)}`);
  createRegistry = (r: RegistryInput) => this.call<Registry>('POST', '/v1/registries', r);
  updateRegistry = (r: RegistryInput) => this.call<Registry>('PUT', `/v1/registries/${encodeURIComponent(r.host)}`, r);
  deleteRegistry = (host: string) => this.call<Registry>('DELETE', `/v1/registries/${encodeURIComponent(host)}`);
  getClusterSettings = () => this.call<ClusterSettings>('GET', '/v1/cluster-settings');
  setClusterSettings = (s: ClusterSettings) => this.call<ClusterSettings>('PUT', '/v1/cluster-settings', s);

  /** Opens GET /v1/vms/{name}/exec: JSON frames both ways (see src/controller/connect/exec/session.ts); HTTP errors reject as ApiError. */
  openExec(name: string, opts: ExecOptions): Promise<WebSocket> {
    const q = new URLSearchParams();
    if (opts.command !== undefined) q.set('command', opts.command);
    if (opts.interactive) q.set('interactive', 'true');
    if (opts.tty) q.set('tty', 'true');
    if (opts.rows !== undefined) q.set('rows', String(opts.rows));
    if (opts.cols !== undefined) q.set('cols', String(opts.cols));
    for (const [k, v] of Object.entries(opts.env ?? {})) q.append(`env[${k}]`, v);
    if (opts.workdir !== undefined) q.set('workdir', opts.workdir);
    if (opts.wait !== undefined) q.set('wait', String(opts.wait));
    if (opts.session !== undefined) q.set('session', opts.session);
    return this.openWebSocket(`/v1/vms/${encodeURIComponent(name)}/exec?${q}`);
  }
}

export interface ExecOptions {
  /** The command line (run by the guest user's login shell); may be left out only to reattach to a session. */
  command?: string;
  interactive?: boolean;
  tty?: boolean;
  rows?: number;
  cols?: number;
  env?: Record<string, string>;
  workdir?: string;
  /** Seconds to wait for the VM to run (the controller's default is 10). */
  wait?: number;
  /** A reconnectable session id. */
  session?: string;
}
