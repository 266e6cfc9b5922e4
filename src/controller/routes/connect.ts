// Reaching VMs through the controller: port-forward (VM or worker host), IP resolution, and the
// workers' side of both (/v1/rpc/port-forward, /v1/rpc/resolve-ip).
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ErrorBody, Name, type VM } from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import { badRequest, notFound, CLIENT_GONE } from '../errors.ts';
import type { WebSocketRoutes } from '../rpc.ts';
import { ExecSessions } from '../connect/exec/registry.ts';
import { parseExecQuery } from '../connect/exec/query.ts';
import { clientGone, splice, type Tunnels } from '../connect/tunnels.ts';
import type { WebSocket } from 'ws';
import { accountOf, CONNECT_ROLES as CONNECT } from '../access.ts';
import { awaitOpenRequest } from '../connect/ready-clients.ts';
import { spliceClient, type MuxTunnels } from '../connect/mux.ts';
import { MuxTunnel } from '../../client/mux.ts';
import { PORT_FORWARD_MUX } from '../../api/worker-protocol.ts';


export function parsePort(value: string | null): number {
  if (value === null || !/^\d{1,5}$/.test(value) || Number(value) < 1 || Number(value) > 65535) {
    throw badRequest(`query parameter "port" must be a TCP port (1-65535), got ${JSON.stringify(value)}`);
  }
  return Number(value);
}

export function parseWait(value: string | null, fallback: number): number {
  if (value === null) return fallback;
  if (!/^\d{1,5}$/.test(value)) throw badRequest(`query parameter "wait" must be a number of seconds, got ${JSON.stringify(value)}`);
  return Math.min(Number(value), 3600);
}

/**
 * What joins a client's WebSocket, about to open, to a tunnel (`join`); if the client has left
 * meanwhile, or leaves before its WebSocket opens, the tunnel is let go (`release`) on both sides.
 */
function whenClientOpens(signal: AbortSignal, release: () => void, join: (ws: WebSocket) => void): (ws: WebSocket) => void {
  if (signal.aborted) {
    release();
    throw clientGone();
  }
  signal.addEventListener('abort', release, { once: true });
  return (ws) => {
    signal.removeEventListener('abort', release);
    join(ws);
  };
}

export function registerConnectRoutes(app: FastifyInstance, ctx: AppContext, sockets: WebSocketRoutes, tunnels: Tunnels, muxes: MuxTunnels) {
  const { store, limits } = ctx;
  const tunnel = { maxPayload: limits.tunnelFrameBytes, perAccount: { what: 'tunnels', max: limits.tunnelsPerAccount } };

  /** The worker's side of a client's tunnel: on its mux connection if it has one, else a ready connection or the dial-back. */
  const workerTunnel = (worker: string, port: number, vm: VM | undefined, signal: AbortSignal) => tunnels.openTunnel(worker, port, vm, signal, true);

  /** The worker's side of a per-tunnel WebSocket, spliced to it once the client's WebSocket opens. */
  const workerSide = async (worker: string, port: number, vm: VM | undefined, signal: AbortSignal) => {
    const tunnel = await workerTunnel(worker, port, vm, signal);
    if (tunnel instanceof MuxTunnel) return whenClientOpens(signal, () => tunnel.destroy(), (ws) => spliceClient(ws, tunnel));
    return whenClientOpens(signal, () => tunnel.ws.close(1000, 'the client went away'), (ws) => splice(ws, tunnel));
  };

  sockets.route('/v1/vms/{name}/port-forward', CONNECT, tunnel, async ({ url, params, signal }) => {
    const port = parsePort(url.searchParams.get('port'));
    const vm = await tunnels.runningVM(params.name, parseWait(url.searchParams.get('wait'), 10), signal);
    return workerSide(vm.worker!, port, vm, signal);
  });

  // A client's ready connection (capability "port-forward-ready"): the same tunnel, opened when the client asks.
  sockets.route('/v1/vms/{name}/port-forward/ready', CONNECT, tunnel, ({ url, params }) => {
    const port = parsePort(url.searchParams.get('port'));
    const wait = parseWait(url.searchParams.get('wait'), 10);
    return (ws) =>
      awaitOpenRequest(ws, async (signal) => {
        const vm = await tunnels.runningVM(params.name, wait, signal);
        return workerTunnel(vm.worker!, port, vm, signal);
      });
  });

  // A client's mux connection (capability "tunnel-mux"): many tunnels, each checked as the routes above check theirs.
  // The connection counts as one of the account's tunnels, and each tunnel on it as one more.
  sockets.route('/v1/port-forward-mux', [...CONNECT, 'admin:write'], tunnel, ({ account }) => (ws) => muxes.addClient(account, ws));

  // Exec over SSH through the worker tunnel; frames, sessions and limits: see ../exec.ts.
  const exec = new ExecSessions({ store, tunnels, access: ctx.access, logger: app.log, limits: { historyBytes: limits.execHistoryBytes, retentionMs: limits.execRetentionMs } });
  ctx.shutdown.addEventListener('abort', () => exec.close(), { once: true });
  sockets.route('/v1/vms/{name}/exec', CONNECT, { maxPayload: limits.tunnelFrameBytes }, async ({ url, params, account, request, signal }) => {
    const query = parseExecQuery(url);
    const waitSeconds = parseWait(url.searchParams.get('wait'), 10);
    return exec.open({ vmName: params.name, account, query, waitSeconds, request, signal });
  });

  // From the view, not the store: a read of the database per tunnel was ≈ 1 ms of its set-up under load.
  const workerMustExist = async (name: string) => {
    await ctx.view.loaded;
    if (!ctx.view.workers.has(name)) throw notFound(`worker "${name}" not found`);
  };

  sockets.route('/v1/workers/{name}/port-forward', ['admin:write'], tunnel, async ({ url, params, signal }) => {
    const port = parsePort(url.searchParams.get('port'));
    await workerMustExist(params.name);
    return workerSide(params.name, port, undefined, signal);
  });

  sockets.route('/v1/workers/{name}/port-forward/ready', ['admin:write'], tunnel, ({ url, params }) => {
    const port = parsePort(url.searchParams.get('port'));
    return (ws) =>
      awaitOpenRequest(ws, async (signal) => {
        await workerMustExist(params.name);
        return workerTunnel(params.name, port, undefined, signal);
      });
  });

  // The worker's side of a tunnel: counted on the client's side already.
  sockets.route('/v1/rpc/port-forward', ['compute:write'], { maxPayload: limits.tunnelFrameBytes }, ({ url, account }) => {
    const pending = tunnels.claimForward(url.searchParams.get('session') ?? '', url.searchParams.get('workerName'), account);
    // The worker's error: `errorMessage` (upstream's workers, empty when there is none) or `error` (ours).
    return (ws) => tunnels.completeForward(pending, ws, url.searchParams.get('errorMessage') || url.searchParams.get('error'));
  });

  // Our workers' ready connections (capability "tunnel-pool"), idle until a port-forward takes one.
  sockets.route('/v1/rpc/port-forward-pool', ['compute:write'], { maxPayload: limits.tunnelFrameBytes }, ({ url, account }) => {
    const worker = tunnels.checkReady(url.searchParams.get('workerName'), account);
    return (ws) => tunnels.ready.add(worker, ws);
  });

  // Our workers' mux connections (capability "tunnel-mux"): the controller opens tunnels on them.
  sockets.route('/v1/rpc/port-forward-mux', ['compute:write'], { maxPayload: limits.tunnelFrameBytes }, ({ url, account }) => {
    const worker = tunnels.checkWorkerConnection(url.searchParams.get('workerName'), account, PORT_FORWARD_MUX);
    muxes.checkWorker(worker);
    return (ws) => muxes.addWorker(worker, ws);
  });

  app.get<{ Params: { name: string }; Querystring: { wait?: number } }>(
    '/v1/vms/:name/ip',
    {
      config: { roles: CONNECT },
      schema: {
        tags: ['vms'],
        summary: "The VM's IP address, resolved on its worker (waits up to ?wait seconds, default 10, for the VM to run)",
        params: Type.Object({ name: Name }),
        querystring: Type.Object({ wait: Type.Optional(Type.Integer({ minimum: 0, maximum: 3600 })) }),
        response: { 200: Type.Object({ ip: Type.String() }), 400: ErrorBody, 404: ErrorBody, 503: ErrorBody },
      },
    },
    async (request, reply) => {
      // A client that hangs up ends the wait (and the worker's answer is not waited for).
      const gone = new AbortController();
      const leave = () => gone.abort(CLIENT_GONE);
      reply.raw.once('close', leave);
      try {
        const vm = await tunnels.runningVM(request.params.name, request.query.wait ?? 10, gone.signal);
        return { ip: await tunnels.resolveIP(vm, gone.signal) };
      } finally {
        reply.raw.off('close', leave);
      }
    },
  );

  // Upstream workers answer in the query (ip, errorMessage) with no body; ours in a JSON body.
  app.post<{ Querystring: { session: string; ip?: string; errorMessage?: string }; Body: { ip?: string; error?: string } }>(
    '/v1/rpc/resolve-ip',
    {
      config: { roles: ['compute:write'] },
      preValidation: async (request) => {
        request.body ??= {};
      },
      schema: {
        tags: ['rpc'],
        summary: "A worker's answer to a resolveIPAction",
        querystring: Type.Object({
          session: Type.String({ minLength: 1, maxLength: 64 }),
          ip: Type.Optional(Type.String({ maxLength: 64 })),
          errorMessage: Type.Optional(Type.String({ maxLength: 1024 })),
        }),
        body: Type.Object({ ip: Type.Optional(Type.String({ maxLength: 64 })), error: Type.Optional(Type.String({ maxLength: 1024 })) }, { additionalProperties: false }),
        response: { 200: Type.Object({}), 400: ErrorBody, 404: ErrorBody },
      },
    },
    async (request) => {
      const { ip, errorMessage } = request.query;
      const answer = request.body.ip || request.body.error ? request.body : { ip: ip || undefined, error: errorMessage || undefined };
      tunnels.answerIP(request.query.session, answer, accountOf(request));
      return {};
    },
  );
}
