// /v1/vms: create, list (filter, watch), get (watch), update spec, report state, delete, events.
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import {
  ErrorBody,
  Event,
  EventInputList,
  EventList,
  EventWatchLine,
  type EventInput,
  IMMUTABLE_VM_FIELDS,
  Name,
  VM,
  VM_SPEC_KEYS,
  VMStateUpdate,
  VMStatus,
  type ClusterSettings,
  type ServiceAccount,
} from '../../api/schemas.ts';
import type { AppContext } from '../context.ts';
import { badRequest, notFound } from '../errors.ts';
import { streamWatch } from '../watch.ts';
import { streamEvents } from '../event-watch.ts';
import { accountOf } from '../access.ts';
import { appendVMEvents, reportVMState } from '../domain/reports.ts';
import { checkRuntimeFields, checkSpecChange, newVM, redactVM, secretsFor, type VMSecrets } from '../domain/vms.ts';

const NameParams = Type.Object({ name: Name });
const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody, 409: ErrorBody };

const READ = ['compute:read'] as const;
const WRITE = ['compute:write'] as const;

/** The spec fields of a VM, for comparing versions (generation bumps only on a real change). */
function specOf(vm: VM): string {
  return JSON.stringify(VM_SPEC_KEYS.map((k) => vm[k] ?? null));
}

export function checkHostDirs(vm: VM, settings: ClusterSettings): void {
  (vm.hostDirs ?? []).forEach((dir, i) => {
    // A ".." segment would climb out of the allowed prefix (upstream refuses it the same way).
    if (/(^|\/)\.\.(\/|$)/.test(dir.path)) throw badRequest(`field "hostDirs[${i}].path": ${dir.path} must not contain ".." segments`);
    const policies = (settings.hostDirPolicies ?? []).filter((p) => dir.path === p.pathPrefix || dir.path.startsWith(p.pathPrefix.replace(/\/?$/, '/')));
    if (!policies.length) throw badRequest(`field "hostDirs[${i}].path": ${dir.path} is not allowed by the cluster's hostDirPolicies`);
    if (!dir.ro && policies.every((p) => p.ro)) throw badRequest(`field "hostDirs[${i}].ro": ${dir.path} may only be mounted read-only (hostDirPolicies)`);
  });
}


/**
 * The body of POST and PUT /v1/vms: a VM. Upstream Go clients send state fields with their zero
 * values (`"status":""`, zero times); state fields are ignored there, so "" is accepted for status.
 */
const VMBody = Type.Object(
  { ...VM.properties, status: Type.Optional(Type.Union([...VMStatus.anyOf, Type.Literal('')])) },
  { additionalProperties: false, description: 'a VM; state fields are ignored' },
);

/** Stands in for the events retention dropped. */
/** A watch's view of the VMs for a reader allowed `secrets` (streams with the same view share each line). */
const shownAs = (secrets: VMSecrets) => ({ as: secrets, present: (vm: VM) => redactVM(vm, secrets) });

function droppedEvent(dropped: number, at: number | undefined): Event {
  return {
    kind: 'events-dropped',
    timestamp: Math.floor((at ?? Date.now()) / 1000),
    payload: `${dropped} earlier event${dropped === 1 ? ' was' : 's were'} dropped: the controller keeps only the newest events of each VM`,
  };
}

export function registerVMRoutes(app: FastifyInstance, ctx: AppContext) {
  const { store } = ctx;

  app.post<{ Body: VM }>(
    '/v1/vms',
    { config: { roles: WRITE }, schema: { tags: ['vms'], summary: 'Create a VM', body: VMBody, response: { 200: VM, ...errors } } },
    async (request) => {
      const vm = newVM(request.body);
      checkHostDirs(vm, await store.getClusterSettings());
      return store.create('vms', vm);
    },
  );

  app.get<{ Querystring: { filter?: string; watch?: boolean } }>(
    '/v1/vms',
    {
      config: { roles: READ },
      schema: {
        tags: ['vms'],
        summary: 'List VMs, or watch them (NDJSON of ADDED/MODIFIED/DELETED)',
        querystring: Type.Object({
          filter: Type.Optional(Type.String({ description: 'worker=NAME', maxLength: 300 })),
          watch: Type.Optional(Type.Boolean()),
        }),
        response: { 200: Type.Array(VM), ...errors },
      },
    },
    async (request, reply) => {
      let worker: string | undefined;
      if (request.query.filter !== undefined) {
        const m = /^worker=(.*)$/.exec(request.query.filter);
        if (!m) throw badRequest('query parameter "filter" must look like worker=NAME');
        worker = m[1];
      }
      const filter = worker !== undefined ? { worker } : undefined;
      const secrets = secretsFor(request.account);
      if (request.query.watch) return streamWatch(ctx, reply, 'vms', (vm) => worker === undefined || vm.worker === worker, filter, shownAs(secrets));
      // From the in-memory view: each VM's JSON, and the whole list's, is made once per change, not per list.
      await ctx.view.loaded;
      return reply.type('application/json').send(worker === undefined ? ctx.view.allVMsJSON(secrets) : ctx.view.vmsJSON(worker, secrets));
    },
  );

  app.get<{ Params: { name: string }; Querystring: { watch?: boolean } }>(
    '/v1/vms/:name',
    {
      config: { roles: READ },
      schema: {
        tags: ['vms'],
        summary: 'Get a VM, or watch it',
        params: NameParams,
        querystring: Type.Object({ watch: Type.Optional(Type.Boolean()) }),
        response: { 200: VM, ...errors },
      },
    },
    async (request, reply) => {
      const { name } = request.params;
      const secrets = secretsFor(request.account);
      // Watching a VM that does not exist yet waits for it (its ADDED), as upstream's watch does.
      if (request.query.watch) return streamWatch(ctx, reply, 'vms', (v) => v.name === name, undefined, shownAs(secrets));
      const vm = await store.get('vms', name);
      if (!vm) throw notFound(`VM "${name}" not found`);
      return redactVM(vm, secrets);
    },
  );

  const reportState = (name: string, report: VMStateUpdate, account: ServiceAccount) => reportVMState(ctx, name, report, account);

  app.put<{ Params: { name: string }; Body: VM }>(
    '/v1/vms/:name',
    {
      config: { roles: WRITE },
      schema: { tags: ['vms'], summary: 'Change a VM spec (bumps generation)', params: NameParams, body: VMBody, response: { 200: VM, ...errors } },
    },
    async (request) => {
      const { name } = request.params;
      const body = request.body;
      // Upstream's workers before the state endpoint report state with PUT /v1/vms/{name}; they say
      // "Orchard/0…" in their User-Agent (its library's users say "Orchard/unknown"), as upstream tells them apart.
      if (request.headers['user-agent']?.startsWith('Orchard/0')) {
        const { status, status_message, observedGeneration, conditions, localName, tartName, image_fqn } = body;
        return reportState(name, { status: status || undefined, status_message, observedGeneration, conditions, localName, tartName, image_fqn }, accountOf(request));
      }
      if (body.name !== name) throw badRequest(`field "name": body says "${body.name}" but the URL says "${name}"; names cannot change`);
      const settings = await store.getClusterSettings();
      return store.update('vms', name, (current) => {
        for (const field of IMMUTABLE_VM_FIELDS) {
          if (body[field] !== undefined && body[field] !== current[field]) {
            throw badRequest(`field "${field}" cannot be changed after creation (is ${JSON.stringify(current[field] ?? null)})`);
          }
        }
        const next: VM = { ...current };
        for (const k of VM_SPEC_KEYS) {
          // null removes the field (a startup script): a VM never holds a null, as upstream's never does.
          if (body[k] === null) delete (next as Record<string, unknown>)[k];
          else if (body[k] !== undefined) (next as Record<string, unknown>)[k] = body[k];
        }
        if (specOf(next) === specOf(current)) return current;
        checkSpecChange(current, next);
        checkRuntimeFields(next);
        checkHostDirs(next, settings);
        next.generation = (current.generation ?? 0) + 1;
        return next;
      });
    },
  );

  app.put<{ Params: { name: string }; Body: VMStateUpdate }>(
    '/v1/vms/:name/state',
    {
      config: { roles: WRITE },
      schema: { tags: ['vms'], summary: "Report a VM's state (workers)", params: NameParams, body: VMStateUpdate, response: { 200: VM, ...errors } },
    },
    async (request) => reportState(request.params.name, request.body, accountOf(request)),
  );

  app.delete<{ Params: { name: string } }>(
    '/v1/vms/:name',
    { config: { roles: WRITE }, schema: { tags: ['vms'], summary: 'Delete a VM', params: NameParams, response: { 200: VM, ...errors } } },
    async (request) => store.delete('vms', request.params.name),
  );

  app.get<{ Params: { name: string }; Querystring: { limit?: number; order?: 'asc' | 'desc'; cursor?: string; watch?: boolean } }>(
    '/v1/vms/:name/events',
    {
      config: { roles: READ },
      schema: {
        tags: ['vms'],
        summary:
          "A VM's events: without `limit` all of them (as upstream's); with `limit` a page (X-Next-Cursor header gives the next page's cursor; a page also ends at about 2 MiB). Only the newest events are kept: X-Events-Dropped says how many older ones were dropped, and an `events-dropped` event stands in for them at the oldest end. X-Newest-Cursor: with order=asc and this cursor, only the events appended later. With watch=true: NDJSON (EventWatchLine) of the kept events after `cursor`, then each new one as it is committed, until the VM is deleted",
        params: NameParams,
        querystring: Type.Object({
          limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 10000 })),
          order: Type.Optional(Type.Union([Type.Literal('asc'), Type.Literal('desc')])),
          cursor: Type.Optional(Type.String({ pattern: '^[0-9]{1,15}$' })),
          watch: Type.Optional(Type.Boolean({ description: 'follow: NDJSON lines (EventWatchLine), oldest first; `limit` and `order` do not apply' })),
        }),
        response: {
          200: { content: { 'application/json': { schema: EventList }, 'application/x-ndjson': { schema: EventWatchLine } } },
          ...errors,
        },
      },
    },
    async (request, reply) => {
      if (request.query.watch) {
        if (request.query.order === 'desc') throw badRequest('query parameter "order": a watch gives events oldest first (asc)');
        if (request.query.limit !== undefined) throw badRequest('query parameter "limit": a watch gives every event after the cursor; leave limit out');
        return streamEvents(ctx, reply, request.params.name, { cursor: request.query.cursor, dropped: droppedEvent });
      }
      const vm = await store.get('vms', request.params.name);
      if (!vm?.uid) throw notFound(`VM "${request.params.name}" not found`);
      const order = request.query.order ?? 'asc';
      let page = await store.listEvents(vm.uid, { limit: request.query.limit ?? ctx.limits.eventsPerVM, order, cursor: request.query.cursor });
      if (request.query.limit === undefined) {
        // No limit, as upstream's clients ask (`orchard logs vm`, which reads no X-Next-Cursor): every
        // kept event in one answer, as upstream's controller gives it. Retention bounds it (eventsPerVM,
        // eventBytesPerVM); the store's pages (eventPageBytes each) are joined here.
        const events = [...page.events];
        let newest = page.newestCursor;
        while (page.nextCursor) {
          page = await store.listEvents(vm.uid, { limit: ctx.limits.eventsPerVM, order, cursor: page.nextCursor });
          events.push(...page.events);
          if (order === 'asc') newest = page.newestCursor ?? newest;
        }
        page = { ...page, events, newestCursor: newest };
      }
      if (page.nextCursor) reply.header('x-next-cursor', page.nextCursor);
      // Where to continue, in ascending order, for what is appended later (`orchard logs vm --follow`).
      if (page.newestCursor) reply.header('x-newest-cursor', page.newestCursor);
      if (page.dropped === 0) return page.events;
      // Retention dropped the oldest events: the header says so on every page, and the page that
      // reaches the oldest kept event says it in the list itself (what `orchard logs` shows).
      reply.header('x-events-dropped', String(page.dropped));
      const oldestEnd = order === 'asc' ? request.query.cursor === undefined : page.nextCursor === undefined;
      if (!oldestEnd) return page.events;
      const cut = droppedEvent(page.dropped, page.droppedAt);
      return order === 'asc' ? [cut, ...page.events] : [...page.events, cut];
    },
  );

  app.post<{ Params: { name: string }; Body: EventInput[] }>(
    '/v1/vms/:name/events',
    {
      config: { roles: WRITE },
      schema: { tags: ['vms'], summary: 'Append events to a VM (workers)', params: NameParams, body: EventInputList, response: { 200: Type.Object({}), ...errors } },
    },
    async (request) => {
      await appendVMEvents(ctx, request.params.name, request.body, accountOf(request));
      return {};
    },
  );
}
