// How the console talks to the controller: the v1 API with the session cookie, the session's CSRF
// token on every change, and NDJSON watches read as they stream (no polling).
import type { ConsoleSession } from '../../api/console.ts';

/** The API prefix: the console is served at PREFIX/. */
export const BASE = location.pathname.replace(/\/+$/, '');

let csrf = '';
export const setCsrf = (token: string) => (csrf = token);

/** Fired on `window` when the controller says the session has ended (401): the page shows the sign-in. */
/** What to show of an error: its message (a thrown non-Error as text). */
export const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err));

export const SIGNED_OUT_EVENT = 'orchard-signed-out';
const signedOut = () => dispatchEvent(new Event(SIGNED_OUT_EVENT));

export class ApiError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

/** One API call; an error answer becomes an ApiError with the controller's message. */
export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  return (await apiWithHeaders<T>(method, path, body)).body;
}

export async function apiWithHeaders<T>(method: string, path: string, body?: unknown): Promise<{ body: T; headers: Headers }> {
  const headers: Record<string, string> = {};
  if (method !== 'GET') headers['x-orchard-csrf'] = csrf;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(BASE + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: 'same-origin', cache: 'no-store' });
  const text = await res.text();
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = undefined;
  }
  // (Not for the sign-in and session check themselves: the page handles those.)
  if (res.status === 401 && !path.startsWith('/console/session')) signedOut();
  if (!res.ok) throw new ApiError(res.status, (json as { message?: string } | undefined)?.message ?? `${res.status} ${res.statusText}`);
  return { body: json as T, headers: res.headers };
}

export const signIn = (name: string, token: string) => api<ConsoleSession>('POST', '/console/session', { name, token });
export const currentSession = () => api<ConsoleSession>('GET', '/console/session');
export const signOut = () => api<void>('DELETE', '/console/session');

/** Watches started before the page knew it was signed in (prefetchWatch), each used once by watch(). */
const early = new Map<string, Promise<Response>>();

/**
 * Starts a watch's request now, before the session is checked, so that the list's data and the
 * session come in one round trip instead of two; watch() takes it up. (Signed out, it is a 401 left unread.)
 */
export function prefetchWatch(path: string) {
  const request = fetch(BASE + path, { credentials: 'same-origin', cache: 'no-store' });
  request.catch(() => {});
  early.set(path, request);
  // Not taken up soon (another page, a sign-in first): it would only hold a watch open.
  setTimeout(() => {
    if (early.get(path) !== request) return;
    early.delete(path);
    void request.then((res) => res.body?.cancel()).catch(() => {});
  }, 5000);
}

export interface WatchEvent<T> {
  type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'ERROR';
  object: T;
  /** A VM's events' watch: where to resume after this event. */
  cursor?: string;
}

/**
 * Follows an NDJSON watch: `onReset` when a (re)connection starts (a watch begins with every object
 * as ADDED), `onEvents` with each chunk's events. Reconnects when the stream ends, after a growing
 * pause; `onError` says why. `path` may be a function, asked again at each (re)connection (a cursor
 * to resume from). Returns the function that stops it.
 */
export function watch<T>(pathOf: string | (() => string), handlers: { onReset: () => void; onEvents: (events: WatchEvent<T>[]) => void; onError: (message: string | undefined) => void }): () => void {
  const abort = new AbortController();
  let pause = 500;
  const run = async () => {
    while (!abort.signal.aborted) {
      const path = typeof pathOf === 'string' ? pathOf : pathOf();
      try {
        const prefetched = early.get(path);
        early.delete(path);
        let res = await prefetched?.catch(() => undefined);
        if (res?.ok) {
          const body = res.body;
          abort.signal.addEventListener('abort', () => void body?.cancel().catch(() => {}), { once: true });
        } else res = await fetch(BASE + path, { credentials: 'same-origin', cache: 'no-store', signal: abort.signal });
        if (!res.ok || !res.body) {
          const message = ((await res.json().catch(() => undefined)) as { message?: string } | undefined)?.message ?? `${res.status}`;
          throw new ApiError(res.status, message);
        }
        handlers.onReset();
        handlers.onError(undefined);
        pause = 500;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let rest = '';
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          const lines = (rest + value).split('\n');
          rest = lines.pop() ?? '';
          const events: WatchEvent<T>[] = [];
          for (const line of lines) if (line) events.push(JSON.parse(line) as WatchEvent<T>);
          const error = events.find((e) => e.type === 'ERROR');
          if (error) handlers.onError((error.object as { message?: string }).message);
          if (events.length) handlers.onEvents(events.filter((e) => e.type !== 'ERROR'));
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        if (err instanceof ApiError && err.status === 401) {
          signedOut();
          return handlers.onError('signed out: ' + err.message);
        }
        handlers.onError(errorText(err));
      }
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 10_000);
    }
  };
  void run();
  return () => abort.abort();
}

/** "3m", "2h", "5d" since an ISO time. */
export function age(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '';
  const s = Math.max(0, Math.floor((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}
