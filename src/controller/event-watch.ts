// GET /v1/vms/{name}/events?watch=true: a VM's kept events from a cursor, then each event as its
// append is committed, as NDJSON lines {"type":"ADDED","object":EVENT,"cursor":"ID"} (the cursor
// resumes after that event). Same rules as the objects' watches (watch.ts): bounded for its reader (one
// that falls watchBufferBytes behind is ended with an ERROR line saying so), counted per account, ended
// when the account's access is revoked. It ends after a DELETED line when the VM is deleted.
import type { FastifyReply } from 'fastify';
import type { Event, EventWatchLine, VM } from '../api/schemas.ts';
import type { AppContext } from './context.ts';
import type { EventAppend } from './store/store.ts';
import { drained, openStream } from './ndjson-stream.ts';
import { notFound } from './errors.ts';

const lineOf = (line: EventWatchLine) => Buffer.from(JSON.stringify(line) + '\n');

export async function streamEvents(
  ctx: AppContext,
  reply: FastifyReply,
  name: string,
  opts: { cursor?: string; dropped: (count: number, at: number | undefined) => Event },
): Promise<void> {
  const behind = (bytes: number) =>
    lineOf({ type: 'ERROR', object: { message: `the watch was ended because its reader fell ${bytes} bytes behind (the limit is ${ctx.limits.watchBufferBytes}); watch again from the last cursor` } });
  const stream = openStream(ctx, reply, behind);
  const { raw, limit } = stream;
  let uid: string | undefined;
  let ready = false;
  let lastID = opts.cursor !== undefined ? Number(opts.cursor) : 0;
  /** Appends published while the kept events are read; those past the last one read go out after them. */
  const pending: { id: number; line: Buffer }[] = [];
  let pendingBytes = 0;
  /** The VM's deletion, when seen before the stream is ready (its uid may not be known yet). */
  const deletedUIDs = new Set<string>();
  const deleted = () => stream.endWith(lineOf({ type: 'DELETED', object: { kind: 'vm-deleted', timestamp: Math.floor(Date.now() / 1000), payload: `VM "${name}" was deleted` } }));

  // Subscribed before the VM and its events are read, so nothing committed in between is missed.
  // (Appends published before the VM's uid is known are committed before the first page is read: it has them.)
  stream.onStop(
    ctx.store.subscribeEvents((append: EventAppend) => {
      if (!stream.done() && uid !== undefined && append.vmUID === uid) take(append);
    }),
  );
  const take = (append: EventAppend) => {
    for (const { id, event } of append.events) {
      const line = lineOf({ type: 'ADDED', object: event, cursor: String(id) });
      if (ready) {
        if (id > lastID) {
          lastID = id;
          stream.write(line);
        }
        continue;
      }
      pending.push({ id, line });
      pendingBytes += line.length;
    }
    if (!ready && pendingBytes > limit && reply.sent) stream.endWith(behind(pendingBytes + raw.writableLength));
  };
  stream.onStop(
    ctx.store.subscribe((change) => {
      if (change.kind !== 'vms' || change.type !== 'DELETED') return;
      const gone = (change.object as VM).uid;
      if (!gone) return;
      if (uid === undefined) deletedUIDs.add(gone);
      else if (gone === uid) {
        if (ready) deleted();
        else deletedUIDs.add(gone);
      }
    }),
  );
  try {
    const vm = await ctx.store.get('vms', name);
    if (!vm?.uid || deletedUIDs.has(vm.uid)) throw notFound(`VM "${name}" not found`);
    uid = vm.uid;
    stream.start();
    if (pendingBytes > limit) return stream.endWith(behind(pendingBytes));
    // The kept events, page by page, as fast as the reader takes them (they may be more than the limit).
    let cursor = opts.cursor;
    let first = true;
    for (;;) {
      const page = await ctx.store.listEvents(uid, { limit: 1000, order: 'asc', cursor });
      if (stream.done()) return;
      if (first && cursor === undefined && page.dropped > 0) raw.write(lineOf({ type: 'ADDED', object: opts.dropped(page.dropped, page.droppedAt) }));
      first = false;
      page.events.forEach((event, i) => {
        raw.write(lineOf({ type: 'ADDED', object: event, cursor: String(page.ids[i]) }));
        lastID = Math.max(lastID, page.ids[i]);
      });
      if (raw.writableLength >= limit) await drained(raw);
      if (stream.done()) return;
      if (pendingBytes > limit) return stream.endWith(behind(pendingBytes + raw.writableLength));
      if (!page.nextCursor) break;
      cursor = page.nextCursor;
    }
    ready = true;
    for (const p of pending) {
      if (p.id <= lastID) continue;
      lastID = p.id;
      stream.write(p.line);
    }
    pending.length = 0;
    if (deletedUIDs.has(uid)) deleted();
  } catch (err) {
    stream.stop();
    throw err;
  }
}
