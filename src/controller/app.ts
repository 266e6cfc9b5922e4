// The controller's HTTP application: Fastify with schema-first validation (the shared TypeBox
// schemas), authentication and role checks on every route, JSON errors, metrics and OpenAPI.
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import fastifySwagger from '@fastify/swagger';
import { Ajv, type ValidateFunction } from 'ajv';
import { SerializerSelector } from '@fastify/fast-json-stringify-compiler';
import { randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { Store } from './store/store.ts';
import { Access, authorize, hasAnyRole } from './access.ts';
import { authenticateCaller, Sessions } from './console/sessions.ts';
import { registerConsoleRoutes } from './console/routes.ts';
import type { BackoffOptions } from './auth-backoff.ts';
import type { AppContext } from './context.ts';
import { checkActsAs } from './domain/workers.ts';
import { errorHandler } from './errors.ts';
import { Metrics } from './metrics.ts';
import { VERSION } from '../api/version.ts';
import { registerVMRoutes } from './routes/vms.ts';
import { registerWorkerRoutes } from './routes/workers.ts';
import { registerAdminRoutes } from './routes/admin.ts';
import { compileReportChecks, takeReports } from './worker-reports.ts';
import { controllerHelloFrame, WATCH_MUX_HEADER } from '../api/worker-protocol.ts';
import { carryMux, WebSocketRoutes, WorkerChannels } from './rpc.ts';
import { Scheduler } from './scheduler.ts';
import { ClusterView } from './view.ts';
import { Tunnels } from './connect/tunnels.ts';
import { MuxTunnels } from './connect/mux.ts';
import { registerConnectRoutes } from './routes/connect.ts';
import { registerRegistryRoutes } from './routes/registries.ts';
import { registerImageRoutes } from './routes/images.ts';
import { RegistryDelivery } from './registry-delivery.ts';
import { badRequest, HttpError, notFound } from './errors.ts';
import { NAME_PATTERN } from '../api/schemas.ts';
import { limitsOf, type Limits } from './limits.ts';
import { closeSilentConnections } from './connections.ts';
import { answerPlainHTTP } from './plain-http.ts';
import { WarmUp } from './warm-up.ts';
import type { Server as TLSServer, TLSSocket } from 'node:tls';
import type { sessionResumption } from './tls.ts';

/** How often the controller refreshes last_seen of the workers whose watch is connected (at most a third of the offline timeout). */
const LIVENESS_REFRESH_MS = 10_000;
const CONNECT_TOUCH_BATCH_MS = 100;
/** How long a stopping controller lets requests in flight finish (systemd's stop timeout is 90 s; we aim at 5 s in all). */
const DRAIN_MS = 3000;

export interface AppOptions {
  store: Store;
  logger: Logger;
  /** A worker not seen for this long is offline. */
  workerOfflineTimeoutMs: number;
  https?: { cert: string; key: string } & Partial<ReturnType<typeof sessionResumption>>;
  bodyLimit?: number;
  /** Backoff base of OnFailure restarts (tests shorten it). */
  restartBackoffMs?: number;
  /** Back-off on failed authentication (default DEFAULT_BACKOFF); false turns it off. */
  authBackoff?: BackoffOptions | false;
  /** The cluster's identity (GET /v1/controller/info), kept with its data. */
  clusterID?: string;
  /** What one client may make the controller hold (defaults: DEFAULT_LIMITS). */
  limits?: Partial<Limits>;
  /**
   * Serve the whole API (REST, WebSockets, metrics, OpenAPI) under this path, e.g. `/orchard`, as
   * upstream's `--api-prefix`: for a controller behind a proxy that shares its host with other services.
   */
  apiPrefix?: string;
  /** How often WebSockets are pinged (a dead peer is cut after two intervals; upstream's --experimental-ping-interval). */
  pingIntervalMs?: number;
}

/** `orchard`, `/orchard/` → `/orchard`; '' or '/' → '' (no prefix). Refuses what is not a plain path. */
export function normalizeAPIPrefix(prefix: string | undefined): string {
  const p = (prefix ?? '').trim().replace(/\/+$/, '');
  if (p === '') return '';
  const withSlash = p.startsWith('/') ? p : '/' + p;
  if (!/^(\/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$/.test(withSlash) || withSlash.split('/').some((seg) => seg === '.' || seg === '..')) {
    throw new Error(`--api-prefix must be a URL path such as /orchard, got "${prefix}"`);
  }
  return withSlash;
}

/**
 * The path a request's URL names once the API prefix is taken off, or undefined when it is not
 * under the prefix (then nothing is served: upstream serves only under its prefix).
 */
export function stripAPIPrefix(url: string, prefix: string): string | undefined {
  if (!prefix) return url;
  if (url === prefix || url.startsWith(prefix + '/') || url.startsWith(prefix + '?')) return url.slice(prefix.length) || '/';
  return undefined;
}

/**
 * The routes whose compiles are warmed (paths as registered, without an API prefix): a VM's life
 * cycle (the workers' report checks are warmed apart: compileReportChecks). Warming every route held
 * 20 MB more of the idle controller's RSS, for routes an operator may never call.
 */
const WARM_ROUTES = new Set(['POST /v1/vms', 'GET /v1/vms', 'GET /v1/vms/:name', 'PUT /v1/vms/:name', 'DELETE /v1/vms/:name']);
const warmed = (method: string | undefined, url: string | undefined) => WARM_ROUTES.has(`${method} ${url}`);

/**
 * Bodies are validated strictly (no coercion: "4" is not a cpu count); query strings are coerced.
 * A route's validator is compiled when the route is first used (a WARM_ROUTES one when the
 * controller is first quiet, if that comes first), not when it starts: compiling them all took most
 * of a controller's start (bench/executable.ts).
 */
function validatorCompiler(warmUp: WarmUp) {
  const common = { strict: false, strictNumbers: true, allErrors: false, removeAdditional: false, useDefaults: false } as const;
  const body = new Ajv({ ...common, coerceTypes: false });
  const other = new Ajv({ ...common, coerceTypes: true });
  return ({ schema, httpPart, method, url }: { schema: object; httpPart?: string; method?: string; url?: string }) => {
    let compiled: ValidateFunction | undefined;
    const compile = () => (compiled ??= (httpPart === 'body' ? body : other).compile(schema));
    if (warmed(method, url)) warmUp.add(compile);
    // Fastify reads a failed validation's errors from the function it was given.
    const validate = (data: unknown) => {
      const check = compile();
      const valid = check(data);
      validate.errors = check.errors;
      return valid;
    };
    validate.errors = undefined as ValidateFunction['errors'];
    return validate;
  };
}

/** Fastify's own response serializers (fast-json-stringify), each compiled when first used (or warmed), as validators are. */
function serializerCompilers(warmUp: WarmUp): NonNullable<FastifyServerOptions['schemaController']>['compilersFactory'] {
  const buildSerializer = SerializerSelector();
  return {
    buildSerializer: (externalSchemas, options) => {
      const compile = buildSerializer(externalSchemas, options);
      return (route) => {
        let serialize: ((data: unknown) => string) | undefined;
        const compiled = () => (serialize ??= compile(route));
        // (Error answers' serializers stay lazy: rare, and alike.)
        if (warmed(route.method, route.url) && String(route.httpStatus).startsWith('2')) warmUp.add(compiled);
        return (data: unknown) => compiled()(data);
      };
    },
  };
}

/**
 * Requests are logged at debug (one line each, when it ends: method, URL, status, time), not at info:
 * a busy controller's info log says what changed, not every poll. A failed request is still an error.
 */
class RequestLog extends LogController {
  override incomingRequest(request: FastifyRequest) {
    if (!this.isLogDisabled(request)) request.log.trace({ req: request }, 'incoming request');
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply) {
    if (this.isLogDisabled(request)) return;
    if (error) reply.log.error({ req: request, res: reply, err: error, responseTime: reply.elapsedTime }, 'request errored');
    else reply.log.debug({ req: request, res: reply, responseTime: reply.elapsedTime }, 'request completed');
  }

  override routeNotFound(request: FastifyRequest) {
    if (!this.isLogDisabled(request)) request.log.debug(`Route ${request.raw.method}:${request.raw.url} not found`);
  }
}

/** What a stopping controller has open. */
export interface Activity {
  /** TCP connections (workers' and clients' WebSockets among them). */
  connections: number;
  requestsInFlight: number;
  workersConnected: number;
}

export async function buildApp(opts: AppOptions): Promise<{ app: FastifyInstance; ctx: AppContext; close: () => Promise<void>; activity: () => Activity }> {
  const limits = limitsOf(opts.limits);
  const warmUp = new WarmUp();
  const apiPrefix = normalizeAPIPrefix(opts.apiPrefix);
  const serverOptions: FastifyServerOptions & { https?: AppOptions['https'] } = {
    loggerInstance: opts.logger,
    logController: new RequestLog(),
    bodyLimit: opts.bodyLimit ?? 1024 * 1024,
    requestIdHeader: 'x-request-id',
    genReqId: () => randomUUID(),
    return503OnClosing: true,
    forceCloseConnections: true,
    // Names are up to 128 characters (percent-encoded up to 3 bytes each): a longer one gets a 400 naming the field, not a 414.
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: 1024 },
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    schemaController: { compilersFactory: serializerCompilers(warmUp) },
  };
  // Under an API prefix, routes see the path without it; a path outside the prefix matches no route.
  if (apiPrefix) serverOptions.rewriteUrl = (req) => stripAPIPrefix(req.url ?? '/', apiPrefix) ?? `/.outside-the-api-prefix${req.url ?? '/'}`;
  // Node checks its request and headers timeouts this often: well within the shortest of them.
  const nodeTimeouts = {
    headersTimeout: Math.min(60_000, limits.requestTimeoutMs),
    connectionsCheckingInterval: Math.max(100, Math.min(30_000, Math.floor(limits.requestTimeoutMs / 4))),
  };
  if (opts.https) serverOptions.https = { ...opts.https, ...nodeTimeouts, handshakeTimeout: limits.firstRequestTimeoutMs } as typeof opts.https;
  else (serverOptions as { http?: object }).http = nodeTimeouts;
  const app = Fastify(serverOptions) as unknown as FastifyInstance;
  const abort = new AbortController();
  const metrics = new Metrics(opts.store, opts.workerOfflineTimeoutMs);
  const view = new ClusterView(opts.store);
  // A sync push carries the worker's VMs, so the worker need not list them (upstream workers ignore the field and list).
  const channels = new WorkerChannels(opts.logger, (worker) => view.vmsJSON(worker), limits);
  const scheduler = new Scheduler(opts.store, view, opts.logger, {
    offlineTimeoutMs: opts.workerOfflineTimeoutMs,
    isConnected: (w) => channels.isConnected(w),
    backoffBaseMs: opts.restartBackoffMs,
  });
  const tunnels = new Tunnels(channels, view);
  metrics.gauge('orchard_vm_waits', 'Requests (port-forward, exec, SSH jump channels, IP) waiting for their VM to run', () => tunnels.waiting);
  const registries = new RegistryDelivery(opts.store, view, channels, opts.logger);
  const access = new Access(opts.store, opts.logger, opts.authBackoff);
  const muxes = new MuxTunnels(tunnels, view, access, limits.tunnelsPerAccount);
  const ctx: AppContext = { store: opts.store, clusterID: opts.clusterID, view, metrics, access, workerOfflineTimeoutMs: opts.workerOfflineTimeoutMs, channels, scheduler, tunnels, registries, limits, shutdown: abort.signal };

  // Push, not poll: a change a worker must act on (a VM assigned to it or taken away, a new spec, a
  // restart, a deletion) reaches it at once. State reports (status, messages, conditions: mostly
  // the worker's own) do not echo back to it.
  // (A deleted worker is disconnected: it registers again when it reconnects.)
  const unsubscribe = view.subscribe((change) => {
    if (change.kind === 'workers') {
      if (change.type === 'DELETED') {
        channels.disconnect(change.object.name);
        tunnels.ready.disconnect(change.object.name);
        muxes.disconnect(change.object.name);
      }
      else registries.workerChanged(change.object.name, change.before?.capabilities, change.object.capabilities);
      return;
    }
    const { object: vm, before } = change;
    const relevant =
      change.type !== 'MODIFIED' || !before || before.worker !== vm.worker || before.generation !== vm.generation || before.restart_count !== vm.restart_count;
    if (!relevant) return;
    if (before?.worker && before.worker !== vm.worker) channels.requestSync(before.worker);
    if (vm.worker) channels.requestSync(vm.worker);
  });
  // A worker whose watch is connected is alive: the controller keeps its last_seen current (all of
  // them in one commit), so our workers send no HTTP heartbeat meanwhile (capability "watch-liveness")
  // and an idle worker holds one connection.
  const touch = (workers: Iterable<string>) => {
    const now = new Date().toISOString();
    for (const w of workers) void opts.store.update('workers', w, (cur) => ({ ...cur, last_seen: now })).catch(() => {});
  };
  const liveness = setInterval(() => touch(channels.connected()), Math.min(LIVENESS_REFRESH_MS, opts.workerOfflineTimeoutMs / 3));
  liveness.unref();
  // Workers (re)connecting are touched together, in one commit per 100 ms: after a restart a thousand
  // of them would otherwise be as many commits (each an fsync) while they come back.
  const connecting = new Set<string>();
  let touchSoon: NodeJS.Timeout | undefined;
  channels.onChange = (worker, connected) => {
    if (connected) {
      connecting.add(worker);
      touchSoon ??= setTimeout(() => {
        touchSoon = undefined;
        touch([...connecting]);
        connecting.clear();
      }, CONNECT_TOUCH_BATCH_MS);
    }
    scheduler.workerConnection(worker);
  };

  const sessions = new Sessions(access, { limits, tls: opts.https !== undefined, pathPrefix: apiPrefix });
  const reportsContext = { store: opts.store, view, access, logger: opts.logger, metrics };
  const sockets = new WebSocketRoutes(access, opts.logger, (path) => stripAPIPrefix(path, apiPrefix), opts.pingIntervalMs);
  sockets.sessions = sessions;
  sockets.route('/v1/rpc/watch', ['compute:read'], { maxPayload: limits.controlFrameBytes }, async ({ url, account, responseHeaders }) => {
    const worker = url.searchParams.get('workerName') ?? url.searchParams.get('worker') ?? '';
    if (!new RegExp(NAME_PATTERN).test(worker)) throw badRequest('query parameter "workerName" must be the worker\'s name (letters, digits, \'-\', \'_\', \'.\', \':\')');
    await view.loaded; // the first push carries the worker's VMs: never a partial list
    const record = view.workers.get(worker);
    if (!record) throw notFound(`worker "${worker}" is not registered (POST /v1/workers first)`);
    checkActsAs(record, account);
    // A worker registered before workers were bound to accounts is bound by its first watch.
    if (record.serviceAccount === undefined) {
      authorize(account, ['compute:write']);
      await opts.store.update('workers', worker, (w) => (w.serviceAccount ? w : { ...w, serviceAccount: account.name }));
      checkActsAs(view.workers.get(worker) ?? record, account);
    }
    await registries.loaded;
    // Our worker asks for a hello (the cluster id) instead of an HTTPS request per reconnect, and
    // learns how widely to spread its reconnects: 2 ms per registered worker, 0.25 to 2.5 s (1,000
    // workers arrive at ≈ 500/s, a pace at which the controller still answers its API at once).
    const reconnectWindowMs = Math.min(2500, Math.max(250, view.workers.size * 2));
    const hello = url.searchParams.get('hello') === '1' ? [controllerHelloFrame({ clusterID: opts.clusterID ?? '', reconnectWindowMs })] : [];
    // Capability "watch-mux": our worker's tunnel mux rides its watch (one connection per worker).
    // Tunnels need what the mux's own route needs, compute:write, and count against its bound.
    const mux = url.searchParams.get('mux') === '1';
    if (mux) {
      if (!hasAnyRole(account, ['compute:write'])) {
        throw new HttpError(403, `service account "${account.name}" lacks the role "compute:write", which the tunnel mux on the watch (mux=1) needs; without mux=1 the watch needs "compute:read" only`);
      }
      muxes.checkWorker(worker);
      responseHeaders.push(`${WATCH_MUX_HEADER}: 1`);
    }
    return (ws) => {
      // Before anything is sent: the watch's messages then go as text frames, the mux's as binary ones.
      const shared = mux ? carryMux(ws) : undefined;
      takeReports(reportsContext, ws, worker, account, mux);
      if (shared) {
        muxes.addWorker(worker, ws, shared);
        // Losing compute:write ends the tunnels: the watch closes (1008), and the worker comes back without the mux.
        const release = access.hold(account, ['compute:write'], (why) => ws.close(1008, why.slice(0, 120)));
        ws.once('close', release);
      }
      channels.accept(worker, ws, [...hello, ...registries.greeting(worker)]);
    };
  });
  sockets.attach(app.server);
  // Before anything else watches connections: they then see every one, from its first byte on.
  if (opts.https) answerPlainHTTP(app.server as unknown as TLSServer, limits.firstRequestTimeoutMs);
  closeSilentConnections(app.server, opts.https !== undefined, limits.firstRequestTimeoutMs);
  if (opts.https) app.server.on('secureConnection', (socket: TLSSocket) => metrics.observeHandshake(socket.isSessionReused()));

  app.setValidatorCompiler(validatorCompiler(warmUp));
  // JSON only: a text/plain body is an unsupported media type, not a string to validate.
  app.removeContentTypeParser('text/plain');
  app.setErrorHandler(errorHandler);
  app.setNotFoundHandler((request, reply) => reply.code(404).send({ message: `no route for ${request.method} ${request.originalUrl.split('?')[0]}` }));

  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
    // Upstream's Go client sends JSON bodies without a Content-Type: a body without one is JSON (a wrong one is still refused).
    const hasBody = request.headers['transfer-encoding'] !== undefined || (request.headers['content-length'] ?? '0') !== '0';
    if (hasBody && request.headers['content-type'] === undefined) request.headers['content-type'] = 'application/json';
    const roles = request.routeOptions.config.roles;
    if (roles === undefined) return;
    // Basic auth, or the web console's session cookie (with its CSRF checks): the same roles either way.
    const caller = await authenticateCaller(access, sessions, { headers: request.headers, method: request.method, remoteAddress: request.ip });
    request.account = caller.account;
    request.session = caller.session;
    authorize(request.account, roles);
  });
  app.addHook('onResponse', async (request, reply) => {
    metrics.observeRequest(request.method, request.routeOptions.url ?? 'unknown', reply.statusCode, reply.elapsedTime / 1000);
  });

  await app.register(fastifySwagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'Orchard API', version: VERSION, description: 'Orchard v1 API: VMs, workers, service accounts, cluster settings' },
      components: { securitySchemes: { basicAuth: { type: 'http', scheme: 'basic' } } },
      security: [{ basicAuth: [] }],
    },
  });

  // Upstream's clients check that the API answers with GET /v1/ (no credentials needed).
  app.get('/v1/', { config: { roles: undefined }, schema: { hide: true } }, async (_req, reply) => reply.code(200).send());
  app.get('/v1/openapi.json', { config: { roles: [] }, schema: { hide: true } }, async () => app.swagger());
  app.get('/v1/openapi.yaml', { config: { roles: [] }, schema: { hide: true } }, async (_req, reply) =>
    reply.type('application/yaml').send(app.swagger({ yaml: true })),
  );
  app.get('/metrics', { config: { roles: ['admin:read'] }, schema: { hide: true } }, async (_req, reply) =>
    reply.type(metrics.contentType).send(await metrics.render()),
  );

  // Stopping finishes the requests in flight (for at most DRAIN_MS), then cuts every connection left:
  // idle keep-alive ones, and those that never sent a request.
  // (A TLS handshake that stalls would otherwise hold the server's close for its 120 s timeout.)
  let inFlight = 0;
  const connections = new Set<Socket>();
  app.server.on('connection', (socket: Socket) => {
    connections.add(socket);
    socket.once('close', () => connections.delete(socket));
  });
  app.server.on('request', (_req, res) => {
    inFlight++;
    res.once('close', () => inFlight--);
  });
  app.addHook('preClose', async () => {
    const deadline = Date.now() + DRAIN_MS;
    while (inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    if (inFlight > 0) opts.logger.warn({ requests: inFlight }, 'shutting down: cutting requests still in flight');
    for (const socket of connections) socket.destroy();
  });

  registerAdminRoutes(app, ctx);
  registerWorkerRoutes(app, ctx);
  registerVMRoutes(app, ctx);
  registerRegistryRoutes(app, ctx);
  registerImageRoutes(app, ctx);
  registerConnectRoutes(app, ctx, sockets, tunnels, muxes);
  registerConsoleRoutes(app, ctx, sessions, apiPrefix);

  scheduler.start();
  // Fastify hands routes to the compilers when it gets ready; they are compiled once it is quiet.
  let stopWarmUp = () => {};
  warmUp.add(compileReportChecks);
  app.addHook('onReady', async () => {
    stopWarmUp = warmUp.start();
  });
  return {
    app,
    ctx,
    activity: () => ({ connections: connections.size, requestsInFlight: inFlight, workersConnected: [...channels.connected()].length }),
    close: async () => {
      abort.abort();
      stopWarmUp();
      clearInterval(liveness);
      clearTimeout(touchSoon);
      unsubscribe();
      await scheduler.stop();
      view.close();
      tunnels.close();
      registries.close();
      sockets.close();
      sessions.close();
      access.close();
      await app.close();
    },
  };
}
