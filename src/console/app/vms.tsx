// The VMs page: a live list from the VM watch (no polling), rendered in a window (only the rows in
// view exist in the page, so 10,000 VMs cost what 30 do), with search, a status filter, create and
// delete for accounts that may (the controller refuses them anyway for those that may not).
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import type { ConsoleSession } from '../../api/console.ts';
import type { VM } from '../../api/schemas.ts';
import { age, api, errorText } from './api.ts';
import { useWatched } from './watched.ts';

const ROW_HEIGHT = 34;
const OVERSCAN = 8;

const labelsText = (labels: Record<string, string> | undefined) =>
  Object.entries(labels ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(', ');

function matches(vm: VM, query: string, status: string): boolean {
  if (status && vm.status !== status) return false;
  if (!query) return true;
  const q = query.toLowerCase();
  return vm.name.toLowerCase().includes(q) || (vm.worker ?? '').toLowerCase().includes(q) || labelsText(vm.labels).toLowerCase().includes(q) || (vm.image ?? '').toLowerCase().includes(q);
}

export function VMList({ session }: { session: ConsoleSession }) {
  const { items: vms, version, error, loaded } = useWatched<VM>('/v1/vms?watch=true');
  const [query, setQuery] = useState('');
  const [status, setStatus] = useState('');
  const [creating, setCreating] = useState(false);
  const [actionError, setActionError] = useState('');
  const canWrite = session.roles.includes('compute:write');
  const sorted = useMemo(() => [...vms.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)), [version]);
  const shown = useMemo(() => sorted.filter((vm) => matches(vm, query, status)), [sorted, query, status]);

  const remove = async (name: string) => {
    if (!confirm(`Delete VM ${name}?`)) return;
    setActionError('');
    try {
      await api('DELETE', `/v1/vms/${encodeURIComponent(name)}`);
    } catch (err) {
      setActionError(errorText(err));
    }
  };

  return (
    <section class="vms">
      <div class="toolbar">
        <input type="search" placeholder="Search name, worker, label, image" aria-label="Search" value={query} onInput={(e) => setQuery(e.currentTarget.value)} />
        <select aria-label="Status" value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
          <option value="">any status</option>
          {['pending', 'running', 'suspended', 'stopped', 'failed'].map((s) => (
            <option value={s}>{s}</option>
          ))}
        </select>
        <span class="count" data-testid="vm-count">
          {loaded ? `${shown.length} of ${sorted.length} VMs` : 'loading…'}
        </span>
        {canWrite && (
          <button class="primary" onClick={() => setCreating(!creating)}>
            {creating ? 'Cancel' : 'Create VM'}
          </button>
        )}
      </div>
      {error && <p class="error" role="alert">{error}</p>}
      {actionError && <p class="error" role="alert">{actionError}</p>}
      {creating && canWrite && <CreateVM onDone={() => setCreating(false)} />}
      <VMTable vms={shown} canWrite={canWrite} onDelete={remove} />
    </section>
  );
}

function VMTable({ vms, canWrite, onDelete }: { vms: VM[]; canWrite: boolean; onDelete: (name: string) => void }) {
  const box = useRef<HTMLDivElement>(null);
  const [scrollTop, setScrollTop] = useState(0);
  const [height, setHeight] = useState(800);
  useEffect(() => {
    const el = box.current!;
    const ro = new ResizeObserver(() => setHeight(el.clientHeight));
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const first = Math.max(0, Math.floor(scrollTop / ROW_HEIGHT) - OVERSCAN);
  const last = Math.min(vms.length, Math.ceil((scrollTop + height) / ROW_HEIGHT) + OVERSCAN);
  const now = Date.now();
  return (
    <div class="table">
      <div class="row head">
        <span>Name</span>
        <span>Status</span>
        <span>Worker</span>
        <span>Age</span>
        <span>Labels</span>
        <span>Reason</span>
        <span />
      </div>
      <div class="rows" ref={box} onScroll={(e) => setScrollTop(e.currentTarget.scrollTop)}>
        <div style={{ height: `${vms.length * ROW_HEIGHT}px`, position: 'relative' }}>
          {vms.slice(first, last).map((vm, i) => (
            <div class="row vm" key={vm.name} data-vm={vm.name} style={{ top: `${(first + i) * ROW_HEIGHT}px` }}>
              <span>
                <a href={`#/vms/${encodeURIComponent(vm.name)}`}>{vm.name}</a>
              </span>
              <span class={`status ${vm.status ?? ''}`} data-testid="status">{vm.status ?? ''}</span>
              <span>{vm.worker ?? ''}</span>
              <span>{age(vm.createdAt, now)}</span>
              <span class="labels">{labelsText(vm.labels)}</span>
              <span class="reason">{vm.status === 'pending' || vm.status === 'failed' ? (vm.status_message ?? '') : ''}</span>
              <span>{canWrite && <button class="danger" onClick={() => onDelete(vm.name)}>Delete</button>}</span>
            </div>
          ))}
        </div>
      </div>
    </div>
  );
}

function parseLabels(text: string): Record<string, string> | undefined {
  const out: Record<string, string> = {};
  for (const part of text.split(',')) {
    const p = part.trim();
    if (!p) continue;
    const eq = p.indexOf('=');
    if (eq <= 0) throw new Error(`label "${p}" is not KEY=VALUE`);
    out[p.slice(0, eq).trim()] = p.slice(eq + 1).trim();
  }
  return Object.keys(out).length ? out : undefined;
}

function CreateVM({ onDone }: { onDone: () => void }) {
  const [f, setF] = useState({ name: '', image: '', cpu: '', memory: '', labels: '', script: '' });
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const set = (k: keyof typeof f) => (e: { currentTarget: { value: string } }) => setF({ ...f, [k]: e.currentTarget.value });
  const submit = async (e: Event) => {
    e.preventDefault();
    setError('');
    setBusy(true);
    try {
      const body: Record<string, unknown> = { name: f.name.trim(), image: f.image.trim() };
      if (f.cpu) body.cpu = Number(f.cpu);
      if (f.memory) body.memory = Number(f.memory);
      const labels = parseLabels(f.labels);
      if (labels) body.labels = labels;
      if (f.script.trim()) body.startup_script = { script_content: f.script };
      await api('POST', '/v1/vms', body);
      onDone();
    } catch (err) {
      setError(errorText(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <form class="create" onSubmit={submit}>
      <label>Name<input name="name" value={f.name} onInput={set('name')} required /></label>
      <label>Image<input name="image" value={f.image} onInput={set('image')} required /></label>
      <label>CPUs<input name="cpu" type="number" min="1" value={f.cpu} onInput={set('cpu')} /></label>
      <label>Memory (MiB)<input name="memory" type="number" min="1" value={f.memory} onInput={set('memory')} /></label>
      <label class="wide">Labels<input name="labels" placeholder="key=value, key2=value2" value={f.labels} onInput={set('labels')} /></label>
      <label class="wide">Startup script<textarea name="script" rows={4} value={f.script} onInput={set('script')} /></label>
      <button class="primary" type="submit" disabled={busy}>Create</button>
      {error && <p class="error" role="alert">{error}</p>}
    </form>
  );
}
