// /v1/workers: workers register (POST) and heartbeat (PUT); operators list, pause/resume, delete.
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ErrorBody, Name, Worker } from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import { badRequest, HttpError, notFound } from '../errors.ts';

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
      const body = request.body;
      const now = new Date().toISOString();
      const existing = await store.get('workers', body.name);
      if (existing && existing.machine_id && body.machine_id && existing.machine_id !== body.machine_id) {
        throw new HttpError(409, `worker "${body.name}" is already registered by another machine (machine_id ${existing.machine_id})`);
      }
      return store.put('workers', {
        ...body,
        resources: body.resources ?? {},
        labels: body.labels ?? {},
        // Pausing is the operator's decision: a re-registering worker does not undo it.
        scheduling_paused: existing?.scheduling_paused ?? body.scheduling_paused ?? false,
        createdAt: existing?.createdAt ?? now,
        last_seen: now,
      });
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
      return store.update('workers', name, (current) => {
        if (body.machine_id && current.machine_id && body.machine_id !== current.machine_id) {
          throw new HttpError(409, `worker "${name}" belongs to another machine (machine_id ${current.machine_id})`);
        }
        const next: Worker = { ...current };
        for (const [k, v] of Object.entries(body)) if (v !== undefined && k !== 'createdAt') (next as Record<string, unknown>)[k] = v;
        // A heartbeat is a PUT from the worker itself; an operator's pause/resume is not a sign of life.
        const fromOperator = Object.keys(body).every((k) => k === 'name' || k === 'scheduling_paused' || k === 'last_seen');
        next.last_seen = fromOperator ? current.last_seen : new Date().toISOString();
        return next;
      });
    },
  );

  app.delete<{ Params: { name: string } }>(
    '/v1/workers/:name',
    { config: { roles: WRITE }, schema: { tags: ['workers'], summary: 'Delete a worker', params: NameParams, response: { 200: Worker, ...errors } } },
    async (request) => store.delete('workers', request.params.name),
  );
}
