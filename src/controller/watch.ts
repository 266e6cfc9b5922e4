// NDJSON watch streams: a snapshot of the matching objects as ADDED, then every committed change in
// commit order. Changes come from the store's own commit notifications, never from a re-read.
import type { FastifyReply } from 'fastify';
import type { Change, Kind, Kinds } from './store/store.ts';
import type { AppContext } from './context.ts';

/** A watcher that falls this far behind is disconnected (it can watch again) instead of buffering without bound. */
const MAX_BUFFERED_BYTES = 16 * 1024 * 1024;

export async function streamWatch<K extends Kind>(
  ctx: AppContext,
  reply: FastifyReply,
  kind: K,
  matches: (object: Kinds[K]) => boolean,
  filter?: { worker?: string },
  /** What the caller may see of an object (secrets hidden). */
  present: (object: Kinds[K]) => Kinds[K] = (o) => o,
): Promise<void> {
  const raw = reply.raw;
  let ready = false;
  let snapshotRevision = 0;
  const pending: Change[] = [];
  const write = (change: Pick<Change, 'type' | 'object'>) => {
    if (raw.destroyed) return;
    raw.write(JSON.stringify({ type: change.type, object: present(change.object as Kinds[K]) }) + '\n');
    if (raw.writableLength > MAX_BUFFERED_BYTES) raw.destroy();
  };
  // Subscribe before taking the snapshot, so nothing between the two is lost.
  const unsubscribe = ctx.store.subscribe((change) => {
    if (change.kind !== kind || !matches(change.object as Kinds[K])) return;
    if (!ready) pending.push(change);
    else write(change);
  });
  // Revoking the account (deleted, new token, role removed) ends the stream at once.
  const account = reply.request.account;
  const release = account ? ctx.access.hold(account, reply.request.routeOptions.config.roles ?? [], () => raw.destroy()) : () => {};
  const stop = () => {
    unsubscribe();
    release();
    ctx.shutdown.removeEventListener('abort', end);
  };
  const end = () => raw.end();
  raw.on('close', stop);
  ctx.shutdown.addEventListener('abort', end);
  try {
    const snapshot = await ctx.store.snapshot(kind, filter);
    snapshotRevision = snapshot.revision;
    reply.hijack();
    raw.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store', 'x-request-id': String(reply.request.id) });
    raw.flushHeaders(); // the client learns the watch is established even before the first event
    for (const object of snapshot.items) if (matches(object)) write({ type: 'ADDED', object });
    for (const change of pending) if (change.revision > snapshotRevision) write(change);
    pending.length = 0;
    ready = true;
  } catch (err) {
    stop();
    throw err;
  }
}
