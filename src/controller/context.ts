// The controller's services, built once in app.ts and handed to the routes.
import type { Store } from './store/store.ts';
import type { ClusterView } from './view.ts';
import type { Metrics } from './metrics.ts';
import type { WorkerChannels } from './rpc.ts';
import type { Scheduler } from './scheduler.ts';
import type { Tunnels } from './connect/tunnels.ts';
import type { Access } from './access.ts';
import type { Limits } from './limits.ts';
import type { RegistryDelivery } from './registry-delivery.ts';

export interface AppContext {
  store: Store;
  clusterID?: string;
  view: ClusterView;
  metrics: Metrics;
  access: Access;
  workerOfflineTimeoutMs: number;
  channels: WorkerChannels;
  scheduler: Scheduler;
  tunnels: Tunnels;
  registries: RegistryDelivery;
  limits: Limits;
  /** Closed when the controller shuts down: long-lived streams end on it. */
  shutdown: AbortSignal;
}
