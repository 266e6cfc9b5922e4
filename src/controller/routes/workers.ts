// /v1/workers: workers register (POST) and heartbeat (PUT); operators list, pause/resume, delete.
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ErrorBody, Name, Worker } from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import { badRequest, notFound } from '../errors.ts';
import { accountOf } from '../access.ts';
import { registration, update } from '../domain/workers.ts';

const NameParams = Type.Object({ name: Name });
const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody };
const READ = ['compute:read'] as const;
const WRITE = ['compute:write'] as const;

export function registerWorkerRoutes(app: FastifyInstance, ctx: AppContext) {
  const { store } = ctx;

  app.post<{ Body: Worker }>(
    '/v1/workers',
    {
      config: { roles: WRITE },
      schema: { tags: ['workers'], summary: 'Register a worker (or re-register the same machine)', body: Worker, response: { 200: Worker, 409: ErrorBody, ...errors } },
    },
    async (request) => {
      const existing = await store.get('workers', request.body.name);
      return store.put('workers', registration(request.body, existing, accountOf(request), new Date().toISOString()));
    },
  );

  app.get('/v1/workers', { config: { roles: READ }, schema: { tags: ['workers'], summary: 'List workers', response: { 200: Type.Array(Worker), ...errors } } }, async () =>
    store.list('workers'),
  );

  app.get<{ Params: { name: string } }>(
    '/v1/workers/:name',
    { config: { roles: READ }, schema: { tags: ['workers'], summary: 'Get a worker', params: NameParams, response: { 200: Worker, ...errors } } },
    async (request) => {
      const worker = await store.get('workers', request.params.name);
      if (!worker) throw notFound(`worker "${request.params.name}" not found`);
      return worker;
    },
  );

  app.put<{ Params: { name: string }; Body: Worker }>(
    '/v1/workers/:name',
    {
      config: { roles: WRITE },
      schema: { tags: ['workers'], summary: 'Update a worker (heartbeat, pause/resume)', params: NameParams, body: Worker, response: { 200: Worker, ...errors } },
    },
    async (request) => {
      const { name } = request.params;
      const body = request.body;
      if (body.name !== name) throw badRequest(`field "name": body says "${body.name}" but the URL says "${name}"`);
      return store.update('workers', name, (current) => update(current, body, accountOf(request), new Date().toISOString()));
    },
  );

  app.delete<{ Params: { name: string } }>(
    '/v1/workers/:name',
    { config: { roles: WRITE }, schema: { tags: ['workers'], summary: 'Delete a worker', params: NameParams, response: { 200: Worker, ...errors } } },
    async (request) => store.delete('workers', request.params.name),
  );
}
