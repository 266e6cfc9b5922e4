// NDJSON watch streams: a snapshot of the matching objects as ADDED, then every committed change in
// commit order. Changes come from the store's own commit notifications, never from a re-read.
// A stream holds a bounded amount for its reader: the snapshot is written as the reader takes it, and
// a reader that falls limits.watchBufferBytes behind is ended with the reason as the last line
// ({"type":"ERROR","object":{"message":...}}, as Kubernetes does); it can watch again.
import type { FastifyReply } from 'fastify';
import type { Change, Kind, Kinds } from './store/store.ts';
import type { AppContext } from './context.ts';
import { drained, openStream } from './ndjson-stream.ts';

/** Snapshot lines written in one event-loop turn. */
const SNAPSHOT_SLICE = 500;

const lineOf = (type: Change['type'], object: object, present: (object: never) => object) => Buffer.from(JSON.stringify({ type, object: present(object as never) }) + '\n');

/** How the object is shown when nothing is hidden: `present` is then the identity. */
const AS_IS = 'all';

/**
 * Each change's line, made once for every stream that shows it the same way (`as` names the way: which
 * secrets are hidden) and shared by them: 50 streams of a 200 kB VM serialise it once, not 50 times.
 * Kept with the change, not with the object: the view keeps every VM's object, and lines kept with
 * them were one more copy of every VM for as long as it did not change. (Snapshot lines are made per
 * stream and not kept.)
 */
const lines = new WeakMap<Change, Map<string, Buffer>>();
function lineFor(change: Change, as: string, present: (object: never) => object): Buffer {
  let made = lines.get(change);
  if (!made) lines.set(change, (made = new Map()));
  let line = made.get(as);
  // Shown as is: the JSON the store made as it stored the object, not a second serialisation.
  if (!line) made.set(as, (line = as === AS_IS && change.json !== undefined ? Buffer.from(`{"type":"${change.type}","object":${change.json}}\n`) : lineOf(change.type, change.object, present)));
  return line;
}

export async function streamWatch<K extends Kind>(
  ctx: AppContext,
  reply: FastifyReply,
  kind: K,
  matches: (object: Kinds[K]) => boolean,
  filter?: { worker?: string },
  /** What the caller may see of an object (secrets hidden); `as` names that view, the same for every caller who sees the same ('all': nothing hidden, `present` gives the object itself). */
  shown: { as: string; present: (object: Kinds[K]) => Kinds[K] } = { as: AS_IS, present: (o) => o },
): Promise<void> {
  const behind = (bytes: number) =>
    Buffer.from(
      JSON.stringify({ type: 'ERROR', object: { message: `the watch was ended because its reader fell ${bytes} bytes behind (the limit is ${ctx.limits.watchBufferBytes}); watch again to get the current state` } }) + '\n',
    );
  const stream = openStream(ctx, reply, behind);
  const { raw, limit } = stream;
  let ready = false;
  let snapshotRevision = 0;
  const pending: { revision: number; line: Buffer }[] = [];
  let pendingBytes = 0;
  // Subscribe before taking the snapshot, so nothing between the two is lost.
  stream.onStop(
    ctx.store.subscribe((change) => {
      if (change.kind !== kind || !matches(change.object as Kinds[K])) return;
      const line = lineFor(change, shown.as, shown.present);
      if (ready) return stream.write(line);
      pending.push({ revision: change.revision, line });
      pendingBytes += line.length;
      if (pendingBytes > limit && reply.sent) stream.endWith(behind(pendingBytes + raw.writableLength));
    }),
  );
  try {
    // VMs and workers from the in-memory view (10,000 VMs: no 7 MB read and parse on the event loop).
    const fromView = kind === 'vms' || kind === 'workers' ? ctx.view.snapshot(kind as 'vms' | 'workers', filter) : undefined;
    const snapshot = (fromView as { items: Kinds[K][]; revision: number } | undefined) ?? (await ctx.store.snapshot(kind, filter));
    snapshotRevision = snapshot.revision;
    stream.start();
    if (pendingBytes > limit) stream.endWith(behind(pendingBytes));
    // The snapshot goes out as fast as the reader takes it (it may be larger than the limit).
    // In slices, so that a big snapshot (10,000 VMs: tens of ms) does not hold up other requests.
    let sliced = 0;
    for (const object of snapshot.items) {
      if (stream.done()) return;
      if (!matches(object)) continue;
      if (!raw.write(lineOf('ADDED', object, shown.present)) && raw.writableLength >= limit) await drained(raw);
      else if (++sliced % SNAPSHOT_SLICE === 0) await new Promise((r) => setImmediate(r));
    }
    for (const change of pending) if (change.revision > snapshotRevision) stream.write(change.line);
    pending.length = 0;
    ready = true;
  } catch (err) {
    stream.stop();
    throw err;
  }
}
