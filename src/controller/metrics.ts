// Prometheus metrics (GET /metrics): request counts and latencies, VMs by status, workers online.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Store } from './store/store.ts';

export class Metrics {
  readonly registry = new Registry();
  private readonly requests: Counter<'method' | 'route' | 'status'>;
  private readonly latency: Histogram<'method' | 'route'>;
  /** API watch streams established (snapshot under way or sent) and not yet ended. */
  readonly watchStreams: Gauge;
  private readonly reports: Counter<'kind' | 'status'>;
  private readonly handshakes: Counter<'resumed'>;

  constructor(store: Store, workerOfflineTimeoutMs: number) {
    collectDefaultMetrics({ register: this.registry, prefix: 'orchard_controller_' });
    this.requests = new Counter({
      name: 'orchard_http_requests_total',
      help: 'HTTP requests served, by method, route and status code',
      labelNames: ['method', 'route', 'status'],
      registers: [this.registry],
    });
    this.latency = new Histogram({
      name: 'orchard_http_request_duration_seconds',
      help: 'HTTP request latency, by method and route',
      labelNames: ['method', 'route'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [this.registry],
    });
    this.watchStreams = new Gauge({
      name: 'orchard_watch_streams',
      help: 'API watch streams open (from the answer\'s headers to the end of the stream)',
      registers: [this.registry],
    });
    this.reports = new Counter({
      name: 'orchard_worker_reports_total',
      help: 'Worker reports taken over the watch WebSocket (not HTTP), by kind (vmState, vmEvents, workerImages) and status code',
      labelNames: ['kind', 'status'],
      registers: [this.registry],
    });
    this.handshakes = new Counter({
      name: 'orchard_tls_handshakes_total',
      help: 'TLS handshakes completed, by whether they resumed a session (no certificate sent, nothing signed)',
      labelNames: ['resumed'],
      registers: [this.registry],
    });
    new Gauge({
      name: 'orchard_vms',
      help: 'VMs by status',
      labelNames: ['status'],
      registers: [this.registry],
      async collect() {
        this.reset();
        const counts = await store.countVMsByStatus();
        for (const status of ['pending', 'running', 'failed']) this.set({ status }, counts[status] ?? 0);
      },
    });
    new Gauge({
      name: 'orchard_workers',
      help: 'Workers by state (online: seen within the offline timeout)',
      labelNames: ['state'],
      registers: [this.registry],
      async collect() {
        const now = Date.now();
        let online = 0;
        const workers = await store.list('workers');
        for (const w of workers) if (w.last_seen && now - Date.parse(w.last_seen) <= workerOfflineTimeoutMs) online++;
        this.set({ state: 'online' }, online);
        this.set({ state: 'offline' }, workers.length - online);
      },
    });
  }

  /** A gauge read when scraped: what a service holds right now. */
  gauge(name: string, help: string, read: () => number) {
    new Gauge({ name, help, registers: [this.registry], collect() { this.set(read()); } });
  }

  get contentType() {
    return this.registry.contentType;
  }

  observeRequest(method: string, route: string, status: number, seconds: number) {
    this.requests.inc({ method, route, status: String(status) });
    this.latency.observe({ method, route }, seconds);
  }

  observeReport(kind: string, status: number) {
    this.reports.inc({ kind, status: String(status) });
  }

  observeHandshake(resumed: boolean) {
    this.handshakes.inc({ resumed: String(resumed) });
  }

  render() {
    return this.registry.metrics();
  }
}
