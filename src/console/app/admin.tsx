// Service accounts and cluster settings, for accounts with admin:read (changes: admin:write). Read
// when the page opens and after each change (these have no watch).
import { useEffect, useState } from 'preact/hooks';
import type { ConsoleSession } from '../../api/console.ts';
import type { ClusterSettings, ServiceAccount } from '../../api/schemas.ts';
import { ROLES, SCHEDULER_PROFILES, type Role } from '../../api/enums.ts';
import { api, errorText } from './api.ts';

export function AdminPage({ session }: { session: ConsoleSession }) {
  const canWrite = session.roles.includes('admin:write');
  return (
    <section class="admin">
      <ServiceAccounts canWrite={canWrite} self={session.account} />
      <Settings canWrite={canWrite} />
    </section>
  );
}

function RolePicker({ roles, onChange, disabled }: { roles: readonly Role[]; onChange: (roles: Role[]) => void; disabled: boolean }) {
  return (
    <span class="roles">
      {ROLES.map((r) => (
        <label>
          <input type="checkbox" name={r} checked={roles.includes(r)} disabled={disabled} onChange={(e) => onChange(e.currentTarget.checked ? [...roles, r] : roles.filter((x) => x !== r))} />
          {r}
        </label>
      ))}
    </span>
  );
}

function ServiceAccounts({ canWrite, self }: { canWrite: boolean; self: string }) {
  const [accounts, setAccounts] = useState<ServiceAccount[] | undefined>();
  const [edits, setEdits] = useState<Record<string, Role[]>>({});
  const [error, setError] = useState('');
  const [created, setCreated] = useState<{ name: string; token: string } | undefined>();
  const [fresh, setFresh] = useState<{ name: string; roles: Role[] }>({ name: '', roles: ['compute:read'] });
  const load = () =>
    api<ServiceAccount[]>('GET', '/v1/service-accounts').then(
      (list) => setAccounts(list.sort((a, b) => (a.name < b.name ? -1 : 1))),
      (err: unknown) => setError(errorText(err)),
    );
  useEffect(() => void load(), []);
  const act = async (what: () => Promise<unknown>) => {
    setError('');
    try {
      await what();
      await load();
    } catch (err) {
      setError(errorText(err));
    }
  };
  const create = (e: Event) => {
    e.preventDefault();
    void act(async () => {
      const sa = await api<ServiceAccount>('POST', '/v1/service-accounts', { name: fresh.name.trim(), roles: fresh.roles });
      setCreated({ name: sa.name, token: sa.token ?? '' });
      setFresh({ name: '', roles: ['compute:read'] });
    });
  };
  return (
    <div class="panel">
      <h3>Service accounts</h3>
      {error && <p class="error" role="alert">{error}</p>}
      {created && (
        <p class="notice" data-testid="created-token">
          Token of <b>{created.name}</b> (shown once): <code>{created.token}</code>
        </p>
      )}
      <table class="grid">
        <thead>
          <tr>
            <th>Name</th>
            <th>Roles</th>
            <th>Created</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {(accounts ?? []).map((sa) => {
            const roles = edits[sa.name] ?? sa.roles;
            const changed = edits[sa.name] !== undefined;
            return (
              <tr data-account={sa.name} key={sa.name}>
                <td>{sa.name}</td>
                <td>
                  <RolePicker roles={roles} disabled={!canWrite} onChange={(r) => setEdits({ ...edits, [sa.name]: r })} />
                </td>
                <td>{sa.createdAt ?? ''}</td>
                <td>
                  {canWrite && changed && (
                    <button onClick={() => void act(async () => {
                      await api('PUT', `/v1/service-accounts/${encodeURIComponent(sa.name)}`, { name: sa.name, roles });
                      const { [sa.name]: _done, ...rest } = edits;
                      setEdits(rest);
                    })}>Save</button>
                  )}
                  {canWrite && sa.name !== self && (
                    <button class="danger" onClick={() => confirm(`Delete service account ${sa.name}?`) && void act(() => api('DELETE', `/v1/service-accounts/${encodeURIComponent(sa.name)}`))}>Delete</button>
                  )}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      {canWrite && (
        <form class="create-account" onSubmit={create}>
          <input name="account-name" placeholder="new account name" value={fresh.name} onInput={(e) => setFresh({ ...fresh, name: e.currentTarget.value })} required />
          <RolePicker roles={fresh.roles} disabled={false} onChange={(roles) => setFresh({ ...fresh, roles })} />
          <button class="primary" type="submit">Create account</button>
        </form>
      )}
    </div>
  );
}

/** Host directory policies as lines: "PATH_PREFIX" or "PATH_PREFIX ro". */
const policiesText = (s: ClusterSettings) => (s.hostDirPolicies ?? []).map((p) => `${p.pathPrefix}${p.ro ? ' ro' : ''}`).join('\n');
function parsePolicies(text: string): NonNullable<ClusterSettings['hostDirPolicies']> {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .map((l) => {
      const m = /^(\S+)(?:\s+(ro))?$/.exec(l);
      if (!m) throw new Error(`host directory policy "${l}" is not "PATH_PREFIX" or "PATH_PREFIX ro"`);
      return m[2] ? { pathPrefix: m[1], ro: true } : { pathPrefix: m[1] };
    });
}

function Settings({ canWrite }: { canWrite: boolean }) {
  const [settings, setSettings] = useState<ClusterSettings | undefined>();
  const [profile, setProfile] = useState('');
  const [policies, setPolicies] = useState('');
  const [error, setError] = useState('');
  const [saved, setSaved] = useState(false);
  const show = (s: ClusterSettings) => {
    setSettings(s);
    setProfile(s.schedulerProfile ?? SCHEDULER_PROFILES[0]);
    setPolicies(policiesText(s));
  };
  useEffect(() => void api<ClusterSettings>('GET', '/v1/cluster-settings').then(show, (err: unknown) => setError(errorText(err))), []);
  const save = async (e: Event) => {
    e.preventDefault();
    setError('');
    setSaved(false);
    try {
      show(await api<ClusterSettings>('PUT', '/v1/cluster-settings', { ...settings, schedulerProfile: profile, hostDirPolicies: parsePolicies(policies) }));
      setSaved(true);
    } catch (err) {
      setError(errorText(err));
    }
  };
  return (
    <form class="panel settings" onSubmit={save}>
      <h3>Cluster settings</h3>
      {error && <p class="error" role="alert">{error}</p>}
      <label>
        Scheduler profile
        <select name="schedulerProfile" value={profile} disabled={!canWrite} onChange={(e) => setProfile(e.currentTarget.value)}>
          {SCHEDULER_PROFILES.map((p) => (
            <option value={p}>{p}</option>
          ))}
        </select>
      </label>
      <label>
        Host directories VMs may mount (one path prefix a line; add " ro" for read-only)
        <textarea name="hostDirPolicies" rows={4} value={policies} disabled={!canWrite} onInput={(e) => setPolicies(e.currentTarget.value)} />
      </label>
      {canWrite && <button class="primary" type="submit">Save settings</button>}
      {saved && <span class="notice" data-testid="settings-saved">Saved.</span>}
    </form>
  );
}
