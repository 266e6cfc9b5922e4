// How the worker's reports reach the controller: up its watch WebSocket when the controller takes
// them there (capability "watch-reports", docs/worker-reports-protocol.md), else one HTTPS request
// each, as upstream's worker sends them. Either way a report resolves only once the controller has
// committed it and rejects with an ApiError carrying the controller's status and message when
// refused; any other rejection (connection lost, no acknowledgement in time) is worth another try.
import { WebSocket } from 'ws';
import type { Event, VMStateUpdate, WorkerImagesReport } from '../api/schemas.ts';
import { MAX_REPORT_FRAME_BYTES, MAX_REPORTS_IN_FLIGHT, parseReportAck, type WorkerReport } from '../api/worker-protocol.ts';
import { ApiError, type OrchardClient } from '../client/client.ts';

/** A report not acknowledged within this long is taken as lost (the sender tries again). */
const ACK_TIMEOUT_MS = 30_000;
/** A report waits this long for the watch to (re)connect, then fails (and is tried again later). */
const CONNECT_WAIT_MS = 10_000;

export interface Reports {
  vmState(vm: string, state: VMStateUpdate): Promise<void>;
  vmEvents(vm: string, events: Event[]): Promise<void>;
  workerImages(report: WorkerImagesReport): Promise<void>;
}

interface Waiting {
  /** The frame's JSON without its id: `{"id":N,` goes in front when it is sent. */
  body: string;
  resolve(): void;
  reject(err: Error): void;
  timer?: NodeJS.Timeout;
}

/** Reports up the watch WebSocket: numbered, at most MAX_REPORTS_IN_FLIGHT unacknowledged, the rest queued. */
export class WatchReports {
  private ws?: WebSocket;
  private nextId = 1;
  private readonly inFlight = new Map<number, Waiting>();
  private readonly queue: Waiting[] = [];

  /** Reports sent up the watch and not acknowledged yet. */
  get unacknowledged(): number {
    return this.inFlight.size;
  }

  /** The watch is open: queued reports go. */
  attach(ws: WebSocket) {
    this.ws = ws;
    this.pump();
  }

  /** The watch closed: what it carried unacknowledged fails, to be sent again (the controller may or may not have committed it). */
  detach(ws: WebSocket) {
    if (this.ws !== ws) return;
    this.ws = undefined;
    for (const [id, w] of this.inFlight) {
      this.inFlight.delete(id);
      clearTimeout(w.timer);
      w.reject(new Error('the watch connection closed before the controller acknowledged the report'));
    }
  }

  /** The worker stops: everything fails at once. */
  close() {
    const ws = this.ws;
    if (ws) this.detach(ws);
    for (const w of this.queue.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new Error('the worker is stopping'));
    }
  }

  /** Takes an acknowledgement frame (true), or leaves any other frame to the instructions (false). */
  handle(frame: string): boolean {
    const ack = parseReportAck(frame);
    if (!ack) return false;
    const w = ack.id === null ? undefined : this.inFlight.get(ack.id);
    if (!w) return true; // late (timed out) or not ours
    this.inFlight.delete(ack.id!);
    clearTimeout(w.timer);
    if (ack.status >= 200 && ack.status < 300) w.resolve();
    else w.reject(new ApiError(ack.status, ack.message ?? `report refused (${ack.status})`));
    this.pump();
    return true;
  }

  /** The report's frame body, or undefined when it is too large for a frame. */
  static encode(report: WorkerReport): string | undefined {
    const body = JSON.stringify(report);
    return Buffer.byteLength(body) + 32 > MAX_REPORT_FRAME_BYTES ? undefined : body;
  }

  send(body: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const w: Waiting = { body, resolve, reject };
      w.timer = setTimeout(() => {
        const i = this.queue.indexOf(w);
        if (i >= 0) this.queue.splice(i, 1);
        reject(new Error(`the watch connection did not open within ${CONNECT_WAIT_MS / 1000} s`));
      }, CONNECT_WAIT_MS);
      this.queue.push(w);
      this.pump();
    });
  }

  private pump() {
    const ws = this.ws;
    while (ws?.readyState === WebSocket.OPEN && this.inFlight.size < MAX_REPORTS_IN_FLIGHT && this.queue.length) {
      const w = this.queue.shift()!;
      const id = this.nextId++;
      clearTimeout(w.timer);
      w.timer = setTimeout(() => {
        if (this.inFlight.get(id) !== w) return;
        this.inFlight.delete(id);
        w.reject(new Error(`the controller did not acknowledge the report within ${ACK_TIMEOUT_MS / 1000} s`));
        this.pump();
      }, ACK_TIMEOUT_MS);
      this.inFlight.set(id, w);
      ws.send(`{"id":${id},${w.body.slice(1)}`);
    }
  }
}

/** Each report by the watch when the controller takes it there (and it fits a frame), else by HTTP. */
export class ControllerReports implements Reports {
  private readonly client: OrchardClient;
  private readonly workerName: string;
  private readonly watch: WatchReports;
  private readonly viaWatch: () => boolean;

  constructor(client: OrchardClient, workerName: string, watch: WatchReports, viaWatch: () => boolean) {
    this.client = client;
    this.workerName = workerName;
    this.watch = watch;
    this.viaWatch = viaWatch;
  }

  private by(report: WorkerReport, http: () => Promise<unknown>): Promise<void> {
    const body = this.viaWatch() ? WatchReports.encode(report) : undefined;
    return body !== undefined ? this.watch.send(body) : http().then(() => {});
  }

  vmState(vm: string, state: VMStateUpdate) {
    return this.by({ vmState: { vm, state } }, () => this.client.updateVMState(vm, state));
  }

  vmEvents(vm: string, events: Event[]) {
    return this.by({ vmEvents: { vm, events } }, () => this.client.appendEvents(vm, events));
  }

  workerImages(report: WorkerImagesReport) {
    return this.by({ workerImages: report }, () => this.client.reportImages(this.workerName, report));
  }
}
