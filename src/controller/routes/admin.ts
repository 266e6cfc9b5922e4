// Controller info, cluster settings and service accounts.
import { Type, type Static } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ClusterSettings, ControllerInfo, ErrorBody, Name, ServiceAccount } from '../../api/schemas.ts';
import { commit, VERSION } from '../../api/version.ts';
import type { AppContext } from '../context.ts';
import { badRequest, notFound } from '../errors.ts';
import { accountOf } from '../access.ts';
import { newToken, presentAccount } from '../domain/accounts.ts';

const NameParams = Type.Object({ name: Name });
/** What clients send: `roles` may be left out (Go's omitempty drops an empty list), meaning none. */
const ServiceAccountBody = Type.Object({ ...ServiceAccount.properties, roles: Type.Optional(ServiceAccount.properties.roles) }, { additionalProperties: false });
type ServiceAccountBody = Static<typeof ServiceAccountBody>;
const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody };

// rpc-v2 (the WebSocket watch, instructions in binary frames) and vm-state-endpoint (PUT /v1/vms/{name}/state)
// are what upstream's workers look for; the rest are Orchard additions.
// registries: a worker whose record declares registriesAction gets the registry credentials over its
// watch; worker-images: POST /v1/workers/{name}/images (held images, pull progress), pullImageAction.
export const CAPABILITIES = ['rpc-v2', 'vm-state-endpoint', 'vm-events', 'watch', 'openapi', 'metrics', 'vm-state-events', 'watch-liveness', 'orphans', 'registries', 'worker-images', 'tunnel-pool', 'watch-reports', 'port-forward-ready', 'vm-events-watch', 'tunnel-mux', 'watch-mux'];


export function registerAdminRoutes(app: FastifyInstance, ctx: AppContext) {
  const { store } = ctx;

  app.get(
    '/v1/controller/info',
    { config: { roles: [] }, schema: { tags: ['controller'], summary: 'Version and capabilities', response: { 200: ControllerInfo, 401: ErrorBody } } },
    async (): Promise<ControllerInfo> => ({ version: VERSION, commit: commit(), capabilities: CAPABILITIES, clusterID: ctx.clusterID }),
  );

  app.get('/v1/cluster-settings', { config: { roles: ['admin:read'] }, schema: { tags: ['cluster'], response: { 200: ClusterSettings, ...errors } } }, async () => {
    const s = await store.getClusterSettings();
    return { hostDirPolicies: [], schedulerProfile: 'optimize-utilization', ...s };
  });

  app.put<{ Body: ClusterSettings }>(
    '/v1/cluster-settings',
    { config: { roles: ['admin:write'] }, schema: { tags: ['cluster'], body: ClusterSettings, response: { 200: ClusterSettings, ...errors } } },
    // Replaces, as upstream's does: what the body leaves out is cleared (its CLI sends the whole settings).
    async (request) => store.putClusterSettings(request.body),
  );

  app.post<{ Body: ServiceAccountBody }>(
    '/v1/service-accounts',
    {
      config: { roles: ['admin:write'] },
      schema: { tags: ['service-accounts'], summary: 'Create a service account (token generated when not given)', body: ServiceAccountBody, response: { 200: ServiceAccount, 409: ErrorBody, ...errors } },
    },
    async (request) =>
      store.create('serviceAccounts', {
        name: request.body.name,
        token: request.body.token ?? newToken(),
        roles: request.body.roles ?? [],
        createdAt: new Date().toISOString(),
      }),
  );

  app.get('/v1/service-accounts', { config: { roles: ['admin:read'] }, schema: { tags: ['service-accounts'], response: { 200: Type.Array(ServiceAccount), ...errors } } }, async (request) =>
    (await store.list('serviceAccounts')).map((sa) => presentAccount(sa, accountOf(request))),
  );

  app.get<{ Params: { name: string } }>(
    '/v1/service-accounts/:name',
    { config: { roles: ['admin:read'] }, schema: { tags: ['service-accounts'], params: NameParams, response: { 200: ServiceAccount, ...errors } } },
    async (request) => {
      const sa = await store.get('serviceAccounts', request.params.name);
      if (!sa) throw notFound(`service account "${request.params.name}" not found`);
      return presentAccount(sa, accountOf(request));
    },
  );

  app.put<{ Params: { name: string }; Body: ServiceAccountBody }>(
    '/v1/service-accounts/:name',
    { config: { roles: ['admin:write'] }, schema: { tags: ['service-accounts'], params: NameParams, body: ServiceAccountBody, response: { 200: ServiceAccount, ...errors } } },
    async (request) => {
      const { name } = request.params;
      if (request.body.name !== name) throw badRequest(`field "name": body says "${request.body.name}" but the URL says "${name}"`);
      return store.update('serviceAccounts', name, (current) => ({ ...current, roles: request.body.roles ?? [], token: request.body.token ?? current.token }));
    },
  );

  app.delete<{ Params: { name: string } }>(
    '/v1/service-accounts/:name',
    { config: { roles: ['admin:write'] }, schema: { tags: ['service-accounts'], params: NameParams, response: { 200: ServiceAccount, ...errors } } },
    async (request) => store.delete('serviceAccounts', request.params.name),
  );
}
