// NDJSON watch streams: a snapshot of the matching objects as ADDED, then every committed change in
// commit order. Changes come from the store's own commit notifications, never from a re-read.
// A stream holds a bounded amount for its reader: the snapshot is written as the reader takes it, and
// a reader that falls limits.watchBufferBytes behind is ended with the reason as the last line
// ({"type":"ERROR","object":{"message":...}}, as Kubernetes does); it can watch again.
import type { FastifyReply } from 'fastify';
import type { ServerResponse } from 'node:http';
import type { Change, Kind, Kinds } from './store/store.ts';
import type { AppContext } from './context.ts';

/** A reader that leaves the end line unread this long after it was written loses the connection. */
export const END_GRACE_MS = 10_000;
/** Snapshot lines written in one event-loop turn. */
const SNAPSHOT_SLICE = 500;

/**
 * Each change's line, made once for every stream that shows it the same way (`as` names the way: which
 * secrets are hidden) and shared by them: 50 streams of a 200 kB VM serialise it once, not 50 times.
 */
const lines = new WeakMap<object, Map<string, Buffer>>();
function lineFor(type: Change['type'], object: object, as: string, present: (object: never) => object): Buffer {
  let made = lines.get(object);
  if (!made) lines.set(object, (made = new Map()));
  const key = `${type} ${as}`;
  let line = made.get(key);
  if (!line) made.set(key, (line = Buffer.from(JSON.stringify({ type, object: present(object as never) }) + '\n')));
  return line;
}

export const drained = (raw: ServerResponse) =>
  new Promise<void>((resolve) => {
    const done = () => {
      raw.off('drain', done);
      raw.off('close', done);
      resolve();
    };
    raw.on('drain', done);
    raw.on('close', done);
  });

export async function streamWatch<K extends Kind>(
  ctx: AppContext,
  reply: FastifyReply,
  kind: K,
  matches: (object: Kinds[K]) => boolean,
  filter?: { worker?: string },
  /** What the caller may see of an object (secrets hidden); `as` names that view, the same for every caller who sees the same. */
  shown: { as: string; present: (object: Kinds[K]) => Kinds[K] } = { as: 'all', present: (o) => o },
): Promise<void> {
  const raw = reply.raw;
  const limit = ctx.limits.watchBufferBytes;
  const account = reply.request.account;
  // Counted from the request on, so that waiting for the snapshot counts too.
  const untake = account ? ctx.access.take(account.name, 'watch streams', ctx.limits.watchesPerAccount) : () => {};
  let ready = false;
  let ended = false;
  let counted = false;
  let snapshotRevision = 0;
  const pending: { revision: number; line: Buffer }[] = [];
  let pendingBytes = 0;
  const lineOf = (change: Pick<Change, 'type' | 'object'>) => lineFor(change.type, change.object, shown.as, shown.present);
  const endWith = (message: string) => {
    if (ended) return;
    ended = true;
    stop();
    if (raw.destroyed) return;
    raw.end(JSON.stringify({ type: 'ERROR', object: { message } }) + '\n');
    const timer = setTimeout(() => raw.destroy(), END_GRACE_MS);
    timer.unref();
    raw.once('close', () => clearTimeout(timer));
  };
  const behind = (bytes: number) =>
    `the watch was ended because its reader fell ${bytes} bytes behind (the limit is ${limit}); watch again to get the current state`;
  const write = (line: Buffer) => {
    if (ended || raw.destroyed) return;
    raw.write(line);
    if (raw.writableLength > limit) endWith(behind(raw.writableLength));
  };
  // Subscribe before taking the snapshot, so nothing between the two is lost.
  const unsubscribe = ctx.store.subscribe((change) => {
    if (change.kind !== kind || !matches(change.object as Kinds[K])) return;
    const line = lineOf(change);
    if (ready) return write(line);
    pending.push({ revision: change.revision, line });
    pendingBytes += line.length;
    if (pendingBytes > limit && reply.sent) endWith(behind(pendingBytes + raw.writableLength));
  });
  // Revoking the account (deleted, new token, role removed) ends the stream at once.
  const release = account ? ctx.access.hold(account, reply.request.routeOptions.config.roles ?? [], () => raw.destroy(), reply.request.session) : () => {};
  let stopped = false;
  const stop = () => {
    if (stopped) return;
    stopped = true;
    unsubscribe();
    release();
    untake();
    if (counted) ctx.metrics.watchStreams.dec();
    ctx.shutdown.removeEventListener('abort', end);
  };
  const end = () => raw.end();
  raw.on('close', stop);
  ctx.shutdown.addEventListener('abort', end);
  try {
    // VMs and workers from the in-memory view (10,000 VMs: no 7 MB read and parse on the event loop).
    const fromView = kind === 'vms' || kind === 'workers' ? ctx.view.snapshot(kind as 'vms' | 'workers', filter) : undefined;
    const snapshot = (fromView as { items: Kinds[K][]; revision: number } | undefined) ?? (await ctx.store.snapshot(kind, filter));
    snapshotRevision = snapshot.revision;
    reply.hijack();
    raw.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store', 'x-request-id': String(reply.request.id) });
    raw.flushHeaders(); // the client learns the watch is established even before the first event
    if (!stopped) {
      counted = true;
      ctx.metrics.watchStreams.inc();
    }
    if (pendingBytes > limit) endWith(behind(pendingBytes));
    // The snapshot goes out as fast as the reader takes it (it may be larger than the limit).
    // In slices, so that a big snapshot (10,000 VMs: tens of ms) does not hold up other requests.
    let sliced = 0;
    for (const object of snapshot.items) {
      if (ended || raw.destroyed) return;
      if (!matches(object)) continue;
      if (!raw.write(lineOf({ type: 'ADDED', object })) && raw.writableLength >= limit) await drained(raw);
      else if (++sliced % SNAPSHOT_SLICE === 0) await new Promise((r) => setImmediate(r));
    }
    for (const change of pending) if (change.revision > snapshotRevision) write(change.line);
    pending.length = 0;
    ready = true;
  } catch (err) {
    stop();
    throw err;
  }
}
