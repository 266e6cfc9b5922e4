// A VM's page: its spec, status and conditions live from the VM's watch, and its events (the
// startup script's output among them) following as they are appended.
import { useEffect, useState } from 'preact/hooks';
import type { ConsoleSession } from '../../api/console.ts';
import type { Event as VMEvent, VM } from '../../api/schemas.ts';
import { age, api, watch, errorText } from './api.ts';

/** Events kept on the page (the newest). */
const MAX_EVENTS = 2000;

function useVM(name: string) {
  const [vm, setVM] = useState<VM | null | undefined>(undefined);
  const [error, setError] = useState<string | undefined>();
  useEffect(() => {
    setVM(undefined);
    return watch<VM>(`/v1/vms/${encodeURIComponent(name)}?watch=true`, {
      onReset: () => {},
      onEvents: (events) => {
        const last = events[events.length - 1];
        setVM(last.type === 'DELETED' ? null : last.object);
      },
      onError: (message) => {
        setError(message);
        if (message?.includes('not found') || message?.includes('no VM')) setVM(null);
      },
    });
  }, [name]);
  return { vm, error };
}

/**
 * The VM's events: all that are kept, then each one as it is committed (the controller's watch of
 * them, no polling); a broken watch resumes after the last event shown.
 */
function useEvents(name: string, uid: string | undefined) {
  const [events, setEvents] = useState<VMEvent[]>([]);
  useEffect(() => {
    if (!uid) return;
    let all: VMEvent[] = [];
    let cursor: string | undefined;
    let frame: number | undefined;
    setEvents(all);
    const stop = watch<VMEvent>(() => `/v1/vms/${encodeURIComponent(name)}/events?watch=true${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`, {
      onReset: () => {},
      onEvents: (lines) => {
        const added = lines.filter((l) => l.type === 'ADDED');
        if (!added.length) return;
        cursor = added.findLast((l) => l.cursor !== undefined)?.cursor ?? cursor;
        all = all.concat(added.map((l) => l.object)).slice(-MAX_EVENTS);
        // Rendered once per frame, however many chunks came in it (the kept events arrive in many).
        frame ??= requestAnimationFrame(() => {
          frame = undefined;
          setEvents(all);
        });
      },
      onError: () => {
        /* the VM's watch says what is wrong */
      },
    });
    return () => {
      stop();
      if (frame !== undefined) cancelAnimationFrame(frame);
    };
  }, [name, uid]);
  return events;
}

const Field = ({ k, v }: { k: string; v: string | number | undefined }) => (
  <>
    <dt>{k}</dt>
    <dd>{v === undefined || v === '' ? '—' : String(v)}</dd>
  </>
);

export function VMPage({ name, session }: { name: string; session: ConsoleSession }) {
  const { vm, error } = useVM(name);
  const events = useEvents(name, vm?.uid);
  const canWrite = session.roles.includes('compute:write');
  const canConnect = canWrite || session.roles.includes('compute:connect');
  const [actionError, setActionError] = useState('');
  if (vm === undefined) return <p class="loading">Loading VM {name}…{error && <span class="error"> {error}</span>}</p>;
  if (vm === null)
    return (
      <section class="vm">
        <p>
          VM <b>{name}</b> does not exist (any more). <a href="#/vms">All VMs</a>
        </p>
      </section>
    );
  const remove = async () => {
    if (!confirm(`Delete VM ${name}?`)) return;
    try {
      await api('DELETE', `/v1/vms/${encodeURIComponent(name)}`);
      location.hash = '#/vms';
    } catch (err) {
      setActionError(errorText(err));
    }
  };
  return (
    <section class="vm">
      <div class="toolbar">
        <h2>{vm.name}</h2>
        <span class={`status ${vm.status ?? ''}`} data-testid="status">{vm.status}</span>
        {canConnect && vm.status === 'running' && (
          <a class="button" href={`#/vms/${encodeURIComponent(vm.name)}/terminal`}>
            Terminal
          </a>
        )}
        {canConnect && vm.status === 'running' && (
          <a class="button" href={`#/vms/${encodeURIComponent(vm.name)}/screen`}>
            Screen
          </a>
        )}
        {canWrite && <button class="danger" onClick={remove}>Delete</button>}
      </div>
      {error && <p class="error" role="alert">{error}</p>}
      {actionError && <p class="error" role="alert">{actionError}</p>}
      <div class="panels">
        <div class="panel">
          <h3>Status</h3>
          <dl>
            <Field k="status" v={vm.status} />
            <Field k="message" v={vm.status_message} />
            <Field k="worker" v={vm.worker} />
            <Field k="age" v={age(vm.createdAt)} />
            <Field k="started" v={vm.started_at} />
            <Field k="restarts" v={vm.restart_count} />
          </dl>
          <h3>Conditions</h3>
          <table class="conditions">
            <tbody>
              {(vm.conditions ?? []).map((c) => (
                <tr>
                  {Object.entries(c).map(([k, v]) => (
                    <td title={k}>{String(v)}</td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <div class="panel">
          <h3>Spec</h3>
          <dl>
            <Field k="image" v={vm.image} />
            <Field k="cpu" v={vm.cpu} />
            <Field k="memory" v={vm.memory} />
            <Field k="disk" v={vm.diskSize} />
            <Field k="restart policy" v={vm.restart_policy} />
            <Field k="power" v={vm.powerState} />
            <Field k="labels" v={Object.entries(vm.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(', ')} />
          </dl>
          {vm.startup_script && (
            <>
              <h3>Startup script</h3>
              <pre class="script">{vm.startup_script.script_content}</pre>
            </>
          )}
        </div>
      </div>
      <h3>Events</h3>
      <div class="events" data-testid="events">
        {events.map((e) => (
          <div class="event">
            <span class="time">{new Date(e.timestamp * 1000).toLocaleTimeString()}</span>
            <span class="kind">{e.kind}</span>
            <pre class="payload">{e.payload}</pre>
          </div>
        ))}
      </div>
    </section>
  );
}
