// The web console: sign-in, then the pages (hash routes: #/vms, #/vms/NAME).
import './nonce.ts';
import { render } from 'preact';
import { lazy, Suspense } from 'preact/compat';
import { useEffect, useState } from 'preact/hooks';
import type { ConsoleSession } from '../../api/console.ts';
import { currentSession, prefetchWatch, setCsrf, SIGNED_OUT_EVENT, signIn, signOut, errorText } from './api.ts';
import { VMList } from './vms.tsx';
import { VMPage } from './vm.tsx';
import { WorkersPage } from './workers.tsx';
import { AdminPage } from './admin.tsx';
import './style.css';

// Loaded when a terminal is first opened: most of the bundle's bytes are the terminal emulator's.
const TerminalPage = lazy(() => import('./terminal.tsx').then((m) => m.TerminalPage));
const ScreenPage = lazy(() => import('./screen.tsx').then((m) => m.ScreenPage));

function useRoute(): string {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const on = () => setHash(location.hash);
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return hash.replace(/^#/, '') || '/vms';
}

function SignIn({ onSignedIn }: { onSignedIn: (s: ConsoleSession) => void }) {
  const [name, setName] = useState('');
  const [token, setToken] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError('');
    try {
      onSignedIn(await signIn(name, token));
    } catch (err) {
      setError(errorText(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <form class="signin" onSubmit={submit}>
      <h1>Orchard</h1>
      <label>
        Service account
        <input name="name" autocomplete="username" value={name} onInput={(e) => setName(e.currentTarget.value)} required />
      </label>
      <label>
        Token
        <input name="token" type="password" autocomplete="current-password" value={token} onInput={(e) => setToken(e.currentTarget.value)} required />
      </label>
      <button type="submit" disabled={busy}>Sign in</button>
      {error && <p class="error" role="alert">{error}</p>}
    </form>
  );
}

function App() {
  const [session, setSession] = useState<ConsoleSession | null | undefined>(undefined);
  const route = useRoute();
  useEffect(() => {
    currentSession().then(
      (s) => {
        setCsrf(s.csrf);
        setSession(s);
      },
      () => setSession(null),
    );
    // A session that ended (expired, signed out elsewhere, token changed) brings the sign-in back.
    const ended = () => setSession(null);
    addEventListener(SIGNED_OUT_EVENT, ended);
    return () => removeEventListener(SIGNED_OUT_EVENT, ended);
  }, []);
  if (session === undefined) return <p class="loading">Loading…</p>;
  if (session === null)
    return (
      <SignIn
        onSignedIn={(s) => {
          setCsrf(s.csrf);
          setSession(s);
        }}
      />
    );
  const vm = /^\/vms\/([^/]+)$/.exec(route);
  const terminal = /^\/vms\/([^/]+)\/terminal$/.exec(route);
  const screen = /^\/vms\/([^/]+)\/screen$/.exec(route);
  return (
    <div class="shell">
      <header>
        <a class="brand" href="#/vms">Orchard</a>
        <nav>
          <a href="#/vms" class={route.startsWith('/vms') ? 'active' : ''}>VMs</a>
          <a href="#/workers" class={route.startsWith('/workers') ? 'active' : ''}>Workers</a>
          {session.roles.includes('admin:read') && (
            <a href="#/admin" class={route === '/admin' ? 'active' : ''}>Accounts & settings</a>
          )}
        </nav>
        <span class="who" title={session.roles.join(', ')}>{session.account}</span>
        <button class="signout" onClick={() => void signOut().finally(() => setSession(null))}>Sign out</button>
      </header>
      <main>{screen ? <Suspense fallback={<p class="loading">Loading the screen…</p>}><ScreenPage name={decodeURIComponent(screen[1])} /></Suspense> : terminal ? <Suspense fallback={<p class="loading">Loading the terminal…</p>}><TerminalPage name={decodeURIComponent(terminal[1])} /></Suspense> : vm ? <VMPage name={decodeURIComponent(vm[1])} session={session} /> : route === '/workers' ? <WorkersPage session={session} /> : route === '/admin' ? <AdminPage session={session} /> : <VMList session={session} />}</main>
    </div>
  );
}

// The VM list (the page most loads open on) asks for its data alongside the session check.
if (/^#?(\/vms)?$/.test(location.hash)) prefetchWatch('/v1/vms?watch=true');
render(<App />, document.getElementById('app')!);
