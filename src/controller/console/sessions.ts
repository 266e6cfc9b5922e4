// The web console's sign-in sessions. A browser cannot put an Authorization header on a WebSocket,
// so the console signs in once (name and token, checked by Access exactly as Basic auth is) and then
// carries a session cookie. The cookie is HttpOnly, Secure and SameSite=Strict; on top of that every
// state-changing request made with it must carry the session's CSRF token in a header (which a
// cross-site page cannot read), and every WebSocket opened with it must come from the controller's
// own origin. Sessions live in memory: a restarted controller signs everyone out.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import type { ServiceAccount } from '../../api/schemas.ts';
import { parseBasicAuth, type Access } from '../access.ts';
import { HttpError } from '../errors.ts';
import type { Limits } from '../limits.ts';

/** The header that carries a session's CSRF token. */
export const CSRF_HEADER = 'x-orchard-csrf';

type SessionLimits = Pick<Limits, 'consoleSessions' | 'consoleSessionsPerAccount' | 'consoleSessionIdleMs' | 'consoleSessionMaxAgeMs'>;

interface Session {
  key: string;
  account: string;
  /** The digest of the token it signed in with: a changed token ends the session. */
  token: Buffer;
  csrf: string;
  created: number;
  used: number;
}

/** What a request's session is: its account (as committed now) and the session's key. */
export interface SessionAuth {
  account: ServiceAccount;
  session: string;
  csrf: string;
}

const digest = (s: string) => createHash('sha256').update(s).digest();
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** The value of cookie `name` in a Cookie header (the first one), or undefined. */
export function cookieValue(header: string | undefined, name: string): string | undefined {
  if (!header || header.length > 16_384) return undefined;
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

/** The origin (scheme://host[:port]) a request was addressed to, from its Host header. */
function ownOrigin(headers: IncomingHttpHeaders, tls: boolean): string | undefined {
  const host = headers.host;
  return host ? `${tls ? 'https' : 'http'}://${host.toLowerCase()}` : undefined;
}

export class Sessions {
  private readonly access: Access;
  private readonly limits: SessionLimits;
  private readonly now: () => number;
  private readonly tls: boolean;
  /** By the digest of the session id (the id itself is only in the browser's cookie). */
  private readonly byKey = new Map<string, Session>();
  readonly cookieName: string;
  readonly cookiePath: string;

  constructor(access: Access, opts: { limits: SessionLimits; tls: boolean; pathPrefix?: string; now?: () => number }) {
    this.access = access;
    this.limits = opts.limits;
    this.now = opts.now ?? Date.now;
    this.tls = opts.tls;
    // __Host- makes the browser refuse the cookie unless Secure, host-only and Path=/; under an API
    // prefix the cookie is kept to the prefix instead, so other services on the host never see it.
    this.cookiePath = opts.pathPrefix ? opts.pathPrefix + '/' : '/';
    this.cookieName = opts.pathPrefix ? 'orchard-session' : '__Host-orchard-session';
  }

  get size() {
    return this.byKey.size;
  }

  /** Signs `account` in (already authenticated): the cookie to set and the session's CSRF token. */
  create(account: ServiceAccount): { cookie: string; csrf: string } {
    const now = this.now();
    this.prune(now);
    const mine = [...this.byKey.values()].filter((s) => s.account === account.name).sort((a, b) => a.created - b.created);
    while (mine.length >= this.limits.consoleSessionsPerAccount) this.end(mine.shift()!.key);
    if (this.byKey.size >= this.limits.consoleSessions) throw new HttpError(429, `the controller holds ${this.byKey.size} console sessions, its limit: sign out elsewhere or try later`);
    const id = randomBytes(32).toString('base64url');
    const session: Session = { key: digest(id).toString('base64url'), account: account.name, token: digest(account.token ?? ''), csrf: randomBytes(32).toString('base64url'), created: now, used: now };
    this.byKey.set(session.key, session);
    return { cookie: this.cookie(id, Math.floor(this.limits.consoleSessionMaxAgeMs / 1000)), csrf: session.csrf };
  }

  /** A Set-Cookie value that clears the cookie. */
  clearCookie(): string {
    return this.cookie('', 0);
  }

  private cookie(value: string, maxAgeSeconds: number): string {
    return `${this.cookieName}=${value}; Path=${this.cookiePath}; Max-Age=${maxAgeSeconds}; HttpOnly; Secure; SameSite=Strict`;
  }

  /** Whether the request carries a session cookie at all (then it is authenticated by it). */
  carries(headers: IncomingHttpHeaders): boolean {
    return cookieValue(headers.cookie, this.cookieName) !== undefined;
  }

  /**
   * The session of a request with the cookie: 401 when it has none that is live, 403 when a
   * state-changing request lacks the session's CSRF token or comes from another origin.
   * `websocket`: an upgrade, which must come from the controller's own origin.
   */
  async authenticate(headers: IncomingHttpHeaders, method: string, websocket = false): Promise<SessionAuth> {
    const id = cookieValue(headers.cookie, this.cookieName);
    const session = id && id.length <= 64 ? this.byKey.get(digest(id).toString('base64url')) : undefined;
    const now = this.now();
    if (!session || this.expired(session, now)) {
      if (session) this.end(session.key);
      throw new HttpError(401, 'the console session has ended (signed out or expired): sign in again');
    }
    const account = await this.access.named(session.account);
    if (!account || !timingSafeEqual(digest(account.token ?? ''), session.token)) {
      this.end(session.key);
      throw new HttpError(401, `service account "${session.account}" was deleted or its token changed: sign in again`);
    }
    // Browsers send Origin on every WebSocket and on every cross-site or state-changing fetch.
    const origin = headers.origin;
    if (websocket) {
      if (origin === undefined || origin !== ownOrigin(headers, this.tls)) throw new HttpError(403, `a WebSocket opened with a console session must come from the console's own origin (Origin: ${JSON.stringify(origin ?? null)})`);
    } else if (!SAFE_METHODS.has(method)) {
      if (origin !== undefined && origin !== ownOrigin(headers, this.tls)) throw new HttpError(403, `a console request from another origin (${JSON.stringify(origin)}) is refused`);
      const sent = headers[CSRF_HEADER];
      if (typeof sent !== 'string' || !timingSafeEqual(digest(sent), digest(session.csrf))) throw new HttpError(403, `a console request that changes something must carry the session's CSRF token in the ${CSRF_HEADER} header`);
    }
    session.used = now;
    return { account, session: session.key, csrf: session.csrf };
  }

  /** The CSRF token of a live session (for a page loaded again: it reads it from GET /console/session). */
  csrfOf(key: string): string {
    const session = this.byKey.get(key);
    if (!session) throw new HttpError(401, 'the console session has ended (signed out or expired): sign in again');
    return session.csrf;
  }

  /** Ends a session: whatever it holds open (watches, WebSockets) is closed. */
  end(key: string) {
    if (!this.byKey.delete(key)) return;
    this.access.endSession(key, 'signed out of the console');
  }

  /** Checks that a sign-in came from the console's own origin (a cross-site form cannot sign a browser in). */
  checkSignInOrigin(headers: IncomingHttpHeaders) {
    const origin = headers.origin;
    if (origin !== undefined && origin !== ownOrigin(headers, this.tls)) throw new HttpError(403, `a console sign-in from another origin (${JSON.stringify(origin)}) is refused`);
  }

  private expired(s: Session, now: number) {
    return now - s.used >= this.limits.consoleSessionIdleMs || now - s.created >= this.limits.consoleSessionMaxAgeMs;
  }

  private prune(now: number) {
    for (const s of [...this.byKey.values()]) if (this.expired(s, now)) this.end(s.key);
  }

  close() {
    this.byKey.clear();
  }
}

/**
 * Who is calling, for HTTP and WebSocket alike: Basic auth when the request has an Authorization
 * header (the API, unchanged), else the console session its cookie names.
 */
export async function authenticateCaller(
  access: Access,
  sessions: Sessions | undefined,
  request: { headers: IncomingHttpHeaders; method: string; remoteAddress: string | undefined; websocket?: boolean },
): Promise<{ account: ServiceAccount; session?: string }> {
  const { headers } = request;
  if (headers.authorization === undefined && sessions?.carries(headers)) return sessions.authenticate(headers, request.method, request.websocket);
  return { account: await access.authenticate(parseBasicAuth(headers.authorization), request.remoteAddress) };
}
