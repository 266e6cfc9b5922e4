// One VM run's reports to the controller: state reports and event batches, sent one request at a
// time without holding up the VM's lifecycle, merged while queued, retried with back-off until the
// controller takes them.
import type { Logger } from 'pino';
import type { Event, VMStateUpdate } from '../api/schemas.ts';
import { ApiError } from '../client/client.ts';
import type { Reports } from './reports.ts';

/** Back-off of state reports and event batches the controller did not take: 0.5 s doubling to 30 s. */
const RETRY_BASE_MS = 500;
const RETRY_MAX_MS = 30_000;
/** Events per request, and unsent events kept per VM while the controller is unreachable. */
const MAX_EVENTS_PER_REQUEST = 500;
const MAX_QUEUED_EVENTS = 10_000;

type Item = { events: Event[] } | { state: VMStateUpdate };

export interface OutboxContext {
  /** Where reports go (the watch WebSocket or HTTP). */
  reports: Reports;
  log: Logger;
  /** Does the controller take events with a state report (capability "vm-state-events")? */
  stateWithEvents(): boolean;
  /** Aborts when the worker stops: nothing more is sent, back-off waits end. */
  stopped: AbortSignal;
}

export class Outbox {
  private items: Item[] = [];
  private sending?: Promise<void>;
  /** The last state reported: re-sent when the controller missed it (e.g. it restarted meanwhile). */
  reported?: VMStateUpdate;
  /** Has the controller acknowledged `reported` (committed it)? */
  acked = false;

  private readonly ctx: OutboxContext;
  private readonly vmName: string;
  private readonly localName: string;
  private readonly runOver: AbortSignal;

  /** `runOver` aborts when the run is over: its queued state reports are not sent any more. */
  constructor(ctx: OutboxContext, vmName: string, localName: string, runOver: AbortSignal) {
    this.ctx = ctx;
    this.vmName = vmName;
    this.localName = localName;
    this.runOver = runOver;
  }

  /** Is a request under way (or about to start)? */
  get busy(): boolean {
    return this.sending !== undefined;
  }

  event(kind: string, payload: string) {
    this.events([{ kind, timestamp: Math.floor(Date.now() / 1000), payload }]);
  }

  events(events: Event[]) {
    this.send({ events });
  }

  /** Reports `state` as this run's, for spec generation `observedGeneration`. */
  report(state: VMStateUpdate, observedGeneration: number | undefined) {
    this.reported = state;
    this.acked = false;
    this.send({ state: { localName: this.localName, observedGeneration, ...state } });
  }

  /**
   * Queued (unsent) items merge: events into one batch, and of the states only the newest is sent,
   * ahead of queued events, and with them when the controller takes both in one request. Sending
   * starts on the next turn of the event loop, so the steps of a quick transition (scheduled, cloned,
   * booted, running) leave together.
   */
  private send(item: Item) {
    if ('events' in item) {
      const queued = this.queuedEvents();
      if (queued) queued.events.push(...item.events);
      else this.items.push(item);
      this.trimEvents();
    } else {
      // The state goes first: readiness should not wait behind log lines.
      this.items = [item, ...this.items.filter((i) => !('state' in i))];
    }
    this.sending ??= this.drain();
  }

  private async drain() {
    await new Promise((r) => setImmediate(r));
    let attempt = 0;
    while (!this.ctx.stopped.aborted) {
      const next = this.items.shift();
      if (!next) break;
      let state: VMStateUpdate | undefined;
      let events: Event[] | undefined;
      if ('state' in next) {
        // A run that is over reports nothing more (its VM went elsewhere or was removed).
        if (this.runOver.aborted) continue;
        state = next.state;
        const queued = this.items[0];
        if (this.ctx.stateWithEvents() && queued && 'events' in queued) {
          events = queued.events.splice(0, MAX_EVENTS_PER_REQUEST);
          if (!queued.events.length) this.items.shift();
        }
      } else {
        events = next.events.splice(0, MAX_EVENTS_PER_REQUEST);
        if (next.events.length) this.items.unshift(next); // the rest of the batch goes next
      }
      const outcome = await this.deliver(state, events, attempt);
      if (outcome === 'retry') {
        // Back in front; a state only if no newer one has come meanwhile (that one replaces it).
        if (events?.length) this.prependEvents(events);
        if (state && !this.items.some((i) => 'state' in i)) this.items.unshift({ state });
        await this.backoff(++attempt);
        continue;
      }
      attempt = 0;
      if (state && outcome === 'sent') this.acked = !this.items.some((i) => 'state' in i); // no newer state queued: the latest is in
    }
    this.sending = undefined;
  }

  /**
   * One request: a state report (with events when the controller takes both) or an event batch.
   * 401, 403, 408, 429, 5xx and network errors are worth another try (a revoked role may come back, a
   * full disk may be cleared, a controller restarts); any other 4xx will never succeed (a deleted VM,
   * a report about an earlier run): it is dropped, with a log line.
   */
  private async deliver(state: VMStateUpdate | undefined, events: Event[] | undefined, attempt: number): Promise<'sent' | 'dropped' | 'retry'> {
    const what = state ? 'state report' : 'event batch';
    const { reports, log } = this.ctx;
    try {
      if (state) await reports.vmState(this.vmName, events?.length ? { ...state, events } : state);
      else if (events?.length) await reports.vmEvents(this.vmName, events);
      if (attempt > 0) log.info({ vm: this.vmName, attempts: attempt + 1 }, `${what} delivered after retrying`);
      return 'sent';
    } catch (err) {
      const status = err instanceof ApiError ? err.status : 0;
      const message = (err as Error).message;
      if (status >= 400 && status < 500 && ![401, 403, 408, 429].includes(status)) {
        log.warn({ vm: this.vmName, status, err: message, state: state?.status, events: events?.length ?? 0 }, `${what} refused; dropped`);
        return 'dropped';
      }
      // The first failure is worth a warning; the retries that follow, a debug line each.
      log[attempt === 0 ? 'warn' : 'debug']({ vm: this.vmName, status: status || undefined, err: message, attempt: attempt + 1 }, `${what} failed; retrying with back-off`);
      return 'retry';
    }
  }

  /** Exponential back-off with jitter (0.5 s doubling to 30 s); cut short when the worker stops. */
  private backoff(attempt: number): Promise<void> {
    const ms = Math.min(RETRY_BASE_MS * 2 ** (attempt - 1), RETRY_MAX_MS) * (0.5 + Math.random() / 2);
    return new Promise((resolve) => {
      const signal = this.ctx.stopped;
      const stop = () => (clearTimeout(timer), resolve());
      const timer = setTimeout(() => (signal.removeEventListener('abort', stop), resolve()), ms);
      signal.addEventListener('abort', stop, { once: true });
    });
  }

  private queuedEvents() {
    return this.items.find((i): i is { events: Event[] } => 'events' in i);
  }

  private prependEvents(events: Event[]) {
    const queued = this.queuedEvents();
    if (queued) queued.events.unshift(...events);
    else this.items.push({ events });
    this.trimEvents();
  }

  /** While the controller is away, a VM's unsent events are bounded: the oldest go, and an event says how many. */
  private trimEvents() {
    const queued = this.queuedEvents();
    if (!queued || queued.events.length <= MAX_QUEUED_EVENTS) return;
    const dropped = queued.events.length - MAX_QUEUED_EVENTS + 1;
    const first = queued.events[dropped];
    queued.events.splice(0, dropped, { kind: 'lifecycle', timestamp: first.timestamp, payload: `${dropped} earlier events were dropped while the controller was unreachable` });
    this.ctx.log.warn({ vm: this.vmName, dropped }, 'the controller is unreachable: dropped the oldest unsent events');
  }
}
