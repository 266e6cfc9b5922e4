// /v1/registries (Orchard addition): registry credentials, written by admin:write, read by admin:read
// without their passwords. Workers get them in clear over their watch (registry-delivery.ts).
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ErrorBody, Registry, RegistryHost, RegistryInput } from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import { badRequest, conflict, notFound } from '../errors.ts';
import { MAX_REGISTRIES, normalizeHost, presentRegistry, registryRecord } from '../domain/registries.ts';

const HostParams = Type.Object({ host: RegistryHost });
const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody };
const READ = ['admin:read'] as const;
const WRITE = ['admin:write'] as const;
const tags = ['registries'];

export function registerRegistryRoutes(app: FastifyInstance, ctx: AppContext) {
  const { store } = ctx;
  const now = () => new Date().toISOString();

  app.post<{ Body: RegistryInput }>(
    '/v1/registries',
    {
      config: { roles: WRITE },
      schema: {
        tags,
        summary: 'Set the credentials of a registry, for workers to pull with (Orchard addition; the password is write-only)',
        body: RegistryInput,
        response: { 200: Registry, 409: ErrorBody, ...errors },
      },
    },
    async (request) => {
      // Every worker gets the whole list in one frame: the list is bounded.
      if ((await store.list('registries')).length >= MAX_REGISTRIES) throw conflict(`there are ${MAX_REGISTRIES} registries already (the most a cluster keeps); delete one first`);
      return presentRegistry(await store.create('registries', registryRecord(request.body, undefined, now())));
    },
  );

  app.get('/v1/registries', { config: { roles: READ }, schema: { tags, summary: 'List registry credentials (without passwords)', response: { 200: Type.Array(Registry), ...errors } } }, async () =>
    (await store.list('registries')).map(presentRegistry),
  );

  app.get<{ Params: { host: string } }>(
    '/v1/registries/:host',
    { config: { roles: READ }, schema: { tags, summary: "A registry's credentials (without the password)", params: HostParams, response: { 200: Registry, ...errors } } },
    async (request) => {
      const r = await store.get('registries', normalizeHost(request.params.host));
      if (!r) throw notFound(`registry "${request.params.host}" not found`);
      return presentRegistry(r);
    },
  );

  app.put<{ Params: { host: string }; Body: RegistryInput }>(
    '/v1/registries/:host',
    {
      config: { roles: WRITE },
      schema: {
        tags,
        summary: "Replace a registry's credentials (a password left out is kept, null removes it)",
        params: HostParams,
        body: RegistryInput,
        response: { 200: Registry, ...errors },
      },
    },
    async (request) => {
      const host = normalizeHost(request.params.host);
      if (normalizeHost(request.body.host) !== host) throw badRequest(`field "host": body says "${request.body.host}" but the URL says "${request.params.host}"`);
      return presentRegistry(await store.update('registries', host, (current) => registryRecord(request.body, current, now())));
    },
  );

  app.delete<{ Params: { host: string } }>(
    '/v1/registries/:host',
    { config: { roles: WRITE }, schema: { tags, summary: "Delete a registry's credentials", params: HostParams, response: { 200: Registry, ...errors } } },
    async (request) => presentRegistry(await store.delete('registries', normalizeHost(request.params.host))),
  );
}
