// The workers page: each worker's capacity used and free per resource (from the VMs placed on it),
// labels, when it was last seen, and pause/resume for accounts with compute:write. Live from the
// workers' and the VMs' watches.
import { useMemo, useState } from 'preact/hooks';
import type { ConsoleSession } from '../../api/console.ts';
import type { VM, Worker } from '../../api/schemas.ts';
import { requirements, RESOURCE_TART_VMS } from '../../api/resources.ts';
import { age, api, errorText } from './api.ts';
import { useWatched } from './watched.ts';

const resourceName = (r: string) => (r === RESOURCE_TART_VMS ? 'VM slots' : r.replace(/^org\.cirruslabs\./, ''));

export function WorkersPage({ session }: { session: ConsoleSession }) {
  const workers = useWatched<Worker>('/v1/workers?watch=true');
  const vms = useWatched<VM>('/v1/vms?watch=true');
  const [actionError, setActionError] = useState('');
  const canWrite = session.roles.includes('compute:write');
  const usage = useMemo(() => {
    const byWorker = new Map<string, { used: Record<string, number>; vms: number }>();
    for (const vm of vms.items.values()) {
      if (!vm.worker || vm.status === 'failed') continue;
      let u = byWorker.get(vm.worker);
      if (!u) byWorker.set(vm.worker, (u = { used: {}, vms: 0 }));
      u.vms++;
      for (const [k, v] of Object.entries(requirements(vm))) u.used[k] = (u.used[k] ?? 0) + v;
    }
    return byWorker;
  }, [vms.version]);
  const list = useMemo(() => [...workers.items.values()].sort((a, b) => (a.name < b.name ? -1 : 1)), [workers.version]);
  const setPaused = async (name: string, paused: boolean) => {
    setActionError('');
    try {
      await api('PUT', `/v1/workers/${encodeURIComponent(name)}`, { name, scheduling_paused: paused });
    } catch (err) {
      setActionError(errorText(err));
    }
  };
  const now = Date.now();
  return (
    <section class="workers">
      <div class="toolbar">
        <span class="count" data-testid="worker-count">{workers.loaded ? `${list.length} workers` : 'loading…'}</span>
      </div>
      {(workers.error || vms.error) && <p class="error" role="alert">{workers.error ?? vms.error}</p>}
      {actionError && <p class="error" role="alert">{actionError}</p>}
      <table class="grid">
        <thead>
          <tr>
            <th>Name</th>
            <th>Scheduling</th>
            <th>Last seen</th>
            <th>VMs</th>
            <th>Capacity (used / total, free)</th>
            <th>Labels</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {list.map((w) => {
            const u = usage.get(w.name) ?? { used: {}, vms: 0 };
            return (
              <tr data-worker={w.name} key={w.name}>
                <td>{w.name}</td>
                <td data-testid="scheduling">{w.scheduling_paused ? 'paused' : 'active'}</td>
                <td title={w.last_seen}>{w.last_seen ? `${age(w.last_seen, now)} ago` : 'never'}</td>
                <td>{u.vms}</td>
                <td class="capacity">
                  {Object.entries(w.resources ?? {}).map(([k, total]) => {
                    const used = u.used[k] ?? 0;
                    return (
                      <div class="resource" data-resource={k}>
                        <span class="rname">{resourceName(k)}</span>
                        <meter min={0} max={total} value={used} />
                        <span>{`${used} / ${total}, ${Math.max(0, total - used)} free`}</span>
                      </div>
                    );
                  })}
                </td>
                <td class="labels">{Object.entries(w.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(', ')}</td>
                <td>
                  {canWrite && (
                    <button onClick={() => void setPaused(w.name, !w.scheduling_paused)}>{w.scheduling_paused ? 'Resume' : 'Pause'}</button>
                  )}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
    </section>
  );
}
