// One NDJSON stream to one reader, as the watches (watch.ts, event-watch.ts) hold it: counted against
// the account's watch streams from the request on, cut when the account loses access (deleted, new
// token, role removed) and ended when the controller stops; a reader that leaves limits.watchBufferBytes
// unread is ended with a last line that says so (as Kubernetes does), and so is any other ending.
import type { FastifyReply } from 'fastify';
import type { ServerResponse } from 'node:http';
import type { AppContext } from './context.ts';

/** A reader that leaves the end line unread this long after it was written loses the connection. */
const END_GRACE_MS = 10_000;

/** Resolves when `raw` has room again (or is closed). */
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

export interface NdjsonStream {
  readonly raw: ServerResponse;
  /** The bytes a reader may leave unread. */
  readonly limit: number;
  /** True once it ended (a last line, the reader gone, a stop): nothing more goes out. */
  done(): boolean;
  /** Runs when the stream stops, for whatever reason (once). */
  onStop(fn: () => void): void;
  /** Answers 200 with the NDJSON headers (the reader learns the watch is established before the first line). */
  start(): void;
  /** One line as things happen; a reader that falls `limit` behind is ended with `behind`'s line. */
  write(line: Buffer): void;
  /** The last line, then the end (the connection is cut if the reader leaves it unread). */
  endWith(line: Buffer): void;
  /** Stops without a last line (an error before the answer: the route answers it). */
  stop(): void;
}

export function openStream(ctx: AppContext, reply: FastifyReply, behind: (bytes: number) => Buffer): NdjsonStream {
  const raw = reply.raw;
  const limit = ctx.limits.watchBufferBytes;
  const account = reply.request.account;
  // Counted from the request on, so that waiting for what comes first counts too.
  const untake = account ? ctx.access.take(account.name, 'watch streams', ctx.limits.watchesPerAccount) : () => {};
  const release = account ? ctx.access.hold(account, reply.request.routeOptions.config.roles ?? [], () => raw.destroy(), reply.request.session) : () => {};
  const stops: (() => void)[] = [];
  let ended = false;
  let stopped = false;
  let counted = false;
  const end = () => raw.end();
  const stop = () => {
    if (stopped) return;
    stopped = true;
    for (const fn of stops) fn();
    release();
    untake();
    if (counted) ctx.metrics.watchStreams.dec();
    ctx.shutdown.removeEventListener('abort', end);
  };
  raw.on('close', stop);
  ctx.shutdown.addEventListener('abort', end);
  const endWith = (line: Buffer) => {
    if (ended) return;
    ended = true;
    stop();
    if (raw.destroyed || !reply.sent) return;
    raw.end(line);
    const timer = setTimeout(() => raw.destroy(), END_GRACE_MS);
    timer.unref();
    raw.once('close', () => clearTimeout(timer));
  };
  return {
    raw,
    limit,
    done: () => ended || raw.destroyed,
    onStop: (fn) => void stops.push(fn),
    start() {
      reply.hijack();
      raw.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store', 'x-request-id': String(reply.request.id) });
      raw.flushHeaders();
      if (!stopped) {
        counted = true;
        ctx.metrics.watchStreams.inc();
      }
    },
    write(line) {
      if (ended || raw.destroyed) return;
      raw.write(line);
      if (raw.writableLength > limit) endWith(behind(raw.writableLength));
    },
    endWith,
    stop,
  };
}
