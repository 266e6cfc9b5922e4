// /v1/workers: workers register (POST) and heartbeat (PUT); operators list, pause/resume, delete.
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { ErrorBody, ImagePull, MAX_HELD_IMAGES, Name, Orphan, parseLocalName, Worker, WorkerImagesReport } from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import type { Transaction } from '../store/store.ts';
import { badRequest, conflict, notFound } from '../errors.ts';
import { accountOf } from '../access.ts';
import { checkActsAs, registration, sortUnassigned, uidOf, update } from '../domain/workers.ts';
import { newVM } from '../domain/vms.ts';
import { reportWorkerImages } from '../domain/reports.ts';
import { streamWatch } from '../watch.ts';

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
    // Read and write in one transaction: the rules see the record the registration replaces.
    async (request) =>
      store.transaction((tx) => tx.put('workers', registration(request.body, tx.get('workers', request.body.name), accountOf(request), new Date().toISOString()))),
  );

  app.get<{ Querystring: { watch?: boolean } }>(
    '/v1/workers',
    {
      config: { roles: READ },
      schema: {
        tags: ['workers'],
        summary: 'List workers, or watch them (NDJSON of ADDED/MODIFIED/DELETED; Orchard addition)',
        querystring: Type.Object({ watch: Type.Optional(Type.Boolean()) }),
        response: { 200: Type.Array(Worker), ...errors },
      },
    },
    async (request, reply) => (request.query.watch ? streamWatch(ctx, reply, 'workers', () => true) : store.list('workers')),
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

  // What the worker holds and how its pulls go: from the worker's own account only.
  app.post<{ Params: { name: string }; Body: WorkerImagesReport }>(
    '/v1/workers/:name/images',
    {
      config: { roles: WRITE },
      schema: {
        tags: ['workers'],
        summary: `The images the worker holds (replaces the list; at most ${MAX_HELD_IMAGES}), and/or the progress of one pull (Orchard addition, capability "worker-images")`,
        params: NameParams,
        body: WorkerImagesReport,
        response: { 200: Type.Object({ images: Type.Array(Type.String()), imagePulls: Type.Array(ImagePull) }), ...errors },
      },
    },
    async (request) => {
      const w = await reportWorkerImages(ctx, request.params.name, request.body, accountOf(request));
      return { images: w.images ?? [], imagePulls: w.imagePulls ?? [] };
    },
  );

  // Orphans: VMs a worker runs that the controller does not know (it lost or swapped its records).
  // The worker reports what it runs that is not assigned to it; what the controller knows went
  // elsewhere or was deleted it may remove, the rest it keeps until an admin adopts or deletes them.
  const OrphanParams = Type.Object({ name: Name, localName: Type.String({ minLength: 1, maxLength: 255 }) });
  app.post<{ Params: { name: string }; Body: { vms: Orphan[] } }>(
    '/v1/workers/:name/orphans',
    {
      config: { roles: WRITE },
      schema: {
        tags: ['workers'],
        summary: "A worker's VMs that are not assigned to it: answers which it may remove; the others are kept as orphans (Orchard addition, capability \"orphans\")",
        params: NameParams,
        body: Type.Object({ vms: Type.Array(Orphan, { maxItems: 1000 }) }, { additionalProperties: false }),
        response: { 200: Type.Object({ remove: Type.Array(Type.String()), orphans: Type.Array(Orphan) }), ...errors },
      },
    },
    async (request) => {
      const { name } = request.params;
      const worker = await store.get('workers', name);
      if (!worker) throw notFound(`worker "${name}" not found`);
      checkActsAs(worker, accountOf(request));
      await ctx.view.loaded;
      const uids = request.body.vms.map(uidOf).filter((u): u is string => !!u);
      // The releases read and the record written in one transaction: a release made meanwhile is not missed.
      const result = await store.transaction((tx) => {
        const released = tx.releasedFrom(name, uids);
        let sorted!: ReturnType<typeof sortUnassigned>;
        tx.update('workers', name, (w) => {
          sorted = sortUnassigned(request.body.vms, (vm) => ctx.view.vms.get(vm), released, w.orphans, new Date().toISOString());
          if (JSON.stringify(sorted.orphans) === JSON.stringify(w.orphans ?? [])) return w;
          return { ...w, orphans: sorted.orphans.length ? sorted.orphans : undefined };
        });
        return sorted;
      });
      if (result.orphans.length) request.log.warn({ worker: name, orphans: result.orphans.map((o) => o.localName) }, 'the worker runs VMs this controller does not know: kept as orphans');
      return result;
    },
  );

  /** The orphan `localName` of worker `name`, taken off its record in one transaction with what `then` writes. */
  const takeOrphan = (name: string, localName: string, then: (tx: Transaction, orphan: Orphan) => void) =>
    store.transaction((tx) => {
      const worker = tx.get('workers', name);
      if (!worker) throw notFound(`worker "${name}" not found`);
      const orphan = worker.orphans?.find((o) => o.localName === localName);
      if (!orphan) throw notFound(`worker "${name}" reports no orphan "${localName}" (orchard list orphans)`);
      then(tx, orphan);
      const rest = worker.orphans!.filter((o) => o.localName !== localName);
      tx.put('workers', { ...worker, orphans: rest.length ? rest : undefined });
      return orphan;
    });

  app.delete<{ Params: { name: string; localName: string } }>(
    '/v1/workers/:name/orphans/:localName',
    {
      config: { roles: WRITE },
      schema: { tags: ['workers'], summary: 'Delete an orphan: its worker stops it and removes its disk (Orchard addition)', params: OrphanParams, response: { 200: Orphan, ...errors } },
    },
    async (request) => {
      const orphan = await takeOrphan(request.params.name, request.params.localName, (tx, orphan) => {
        const uid = uidOf(orphan);
        if (!uid) throw conflict(`orphan "${orphan.localName}" has no uid: remove it on the worker host`);
        tx.release(request.params.name, uid);
      });
      ctx.channels.requestSync(request.params.name);
      return orphan;
    },
  );

  app.post<{ Params: { name: string; localName: string } }>(
    '/v1/workers/:name/orphans/:localName/adopt',
    {
      config: { roles: WRITE },
      schema: {
        tags: ['workers'],
        summary: 'Adopt an orphan: the controller knows it again as the VM it was, on its worker (Orchard addition)',
        params: OrphanParams,
        response: { 200: Orphan, 409: ErrorBody, ...errors },
      },
    },
    async (request) =>
      takeOrphan(request.params.name, request.params.localName, (tx, orphan) => {
        const parsed = parseLocalName(orphan.localName);
        if (!parsed) throw conflict(`orphan "${orphan.localName}" was not made by Orchard (its name does not say which VM it was)`);
        const vm = newVM({ name: parsed.name, image: orphan.image ?? 'unknown', cpu: orphan.cpu || undefined, memory: orphan.memory || undefined });
        tx.create('vms', {
          ...vm,
          uid: parsed.uid,
          restart_count: parsed.restartCount,
          localName: orphan.localName,
          tartName: orphan.localName,
          worker: request.params.name,
          scheduled_at: new Date().toISOString(),
          status_message: `adopted from worker ${request.params.name}`,
        });
      }),
  );
}
