// Who may do what, in one place for HTTP, WebSocket and the SSH jump host: authentication (a service
// account's name and token, with back-off on failures), role checks, and revocation — whatever an
// account holds open (watch streams, tunnels, exec sessions, SSH connections, a worker's watch) is
// closed the moment the account is deleted, its token changes or it loses the roles it was opened with.
import { hash, timingSafeEqual } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Role, ServiceAccount } from '../api/schemas.ts';
import type { Store } from './store/store.ts';
import { HttpError } from './errors.ts';
import { AuthBackoff, DEFAULT_BACKOFF, sourceKey, type BackoffOptions } from './auth-backoff.ts';

const digest = (s: string) => hash('sha256', s, 'buffer');

/** Constant-time token comparison (hashing first makes lengths equal and hides them). */
export function tokensEqual(a: string, b: string): boolean {
  return timingSafeEqual(digest(a), digest(b));
}

/** What a missing account's token is compared with, so that timing does not tell which names exist. */
const NO_ACCOUNT_DIGEST = digest('\0no-such-account');

export interface Credentials {
  name: string;
  token: string;
}

export function parseBasicAuth(header: string | undefined): Credentials | undefined {
  if (!header) return undefined;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!m) return undefined;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  return { name: decoded.slice(0, colon), token: decoded.slice(colon + 1) };
}

/** Roles of which an account needs one to reach a VM (port-forward, exec, IP, SSH jump host). */
export const CONNECT_ROLES = ['compute:write', 'compute:connect'] as const;

/** `anyOf` empty: any authenticated account. Otherwise one of the roles is needed. */
export function hasAnyRole(account: ServiceAccount, anyOf: readonly Role[]): boolean {
  return anyOf.length === 0 || anyOf.some((r) => account.roles.includes(r));
}

export function authorize(account: ServiceAccount, anyOf: readonly Role[]): void {
  if (hasAnyRole(account, anyOf)) return;
  const need = anyOf.length === 1 ? `the role "${anyOf[0]}"` : `one of the roles ${anyOf.map((r) => `"${r}"`).join(' or ')}`;
  throw new HttpError(403, `service account "${account.name}" lacks ${need}`);
}

/** Something an account holds open, closed when the account may no longer hold it. */
interface Hold {
  token: string | undefined;
  roles: readonly Role[];
  close: (reason: string) => void;
  /** The console session it was opened with (signing out closes it). */
  session?: string;
}

export class Access {
  private readonly store: Store;
  private readonly log: Logger;
  private readonly backoff: AuthBackoff | undefined;
  private readonly holds = new Map<string, Set<Hold>>();
  /** How many of each limited thing (watch streams, tunnels) each account has open: "account\0what" → count. */
  private readonly counts = new Map<string, number>();
  private readonly unsubscribe: () => void;
  /**
   * The accounts authentication has read, by name: read on every request, so they come from memory.
   * An entry goes when a change of its account is committed; `changes` counts those, so that a read
   * overtaken by a change is not cached.
   */
  private readonly accounts = new Map<string, ServiceAccount>();
  private changes = 0;
  /** The digest of each cached account's token, made once: a request then hashes only the token it presents. */
  private readonly tokenDigests = new WeakMap<ServiceAccount, Buffer>();

  /** `backoff: false` turns the back-off off (tests of many refused requests). */
  constructor(store: Store, logger: Logger, backoff: BackoffOptions | false = DEFAULT_BACKOFF) {
    this.store = store;
    this.log = logger.child({ component: 'access' });
    this.backoff = backoff === false ? undefined : new AuthBackoff(backoff);
    this.unsubscribe = store.subscribe((change) => {
      if (change.kind !== 'serviceAccounts') return;
      const account = change.object as ServiceAccount;
      this.changes++;
      this.accounts.delete(account.name);
      this.revoke(account.name, change.type === 'DELETED' ? undefined : account);
    });
  }

  /** The committed account `name` (undefined when there is none). */
  named(name: string): Promise<ServiceAccount | undefined> {
    return this.account(name);
  }

  private async account(name: string): Promise<ServiceAccount | undefined> {
    const cached = this.accounts.get(name);
    if (cached) return cached;
    const changes = this.changes;
    const account = await this.store.get('serviceAccounts', name);
    if (account && changes === this.changes) this.accounts.set(name, account);
    return account;
  }

  /**
   * `account` as committed now, for what a connection authenticated earlier does later (a report up a
   * worker's watch): 401 when it was deleted or given a new token since.
   */
  async current(account: ServiceAccount): Promise<ServiceAccount> {
    const now = await this.account(account.name);
    // The same committed object (the cache keeps it until the account changes): the same token.
    if (now === account) return now;
    if (!now || !timingSafeEqual(this.tokenDigest(now), this.tokenDigest(account))) throw new HttpError(401, 'invalid service account name or token');
    return now;
  }

  private tokenDigest(account: ServiceAccount): Buffer {
    let d = this.tokenDigests.get(account);
    if (!d) this.tokenDigests.set(account, (d = digest(account.token ?? '')));
    return d;
  }

  /**
   * The account these credentials sign in as. 401 without credentials or with wrong ones (logged
   * with the account name and source), 429 while the source or the account name is backed off.
   */
  async authenticate(creds: Credentials | undefined, remoteAddress: string | undefined): Promise<ServiceAccount> {
    if (!creds) throw new HttpError(401, 'authentication required: HTTP Basic auth with a service account name and token');
    const source = sourceKey(remoteAddress);
    const wait = this.backoff?.retryAfterMs(source, creds.name) ?? 0;
    if (wait > 0) {
      const seconds = Math.ceil(wait / 1000);
      this.log.warn({ account: creds.name, source }, 'authentication refused: too many failures (backed off)');
      throw new HttpError(429, `too many failed sign-ins; try again in ${seconds} s`, { 'retry-after': String(seconds) });
    }
    const account = await this.account(creds.name);
    // Compare even when the account is missing, so timing does not tell which names exist.
    const ok = timingSafeEqual(account?.token !== undefined ? this.tokenDigest(account) : NO_ACCOUNT_DIGEST, digest(creds.token)) && account !== undefined;
    if (!ok) {
      this.backoff?.failed(source, creds.name);
      this.log.warn({ account: creds.name, source }, 'authentication failed: no such service account or wrong token');
      throw new HttpError(401, 'invalid service account name or token');
    }
    this.backoff?.succeeded(source, creds.name);
    return account;
  }

  /**
   * Registers something `account` keeps open because it has one of `roles`; `close` is called (once)
   * when that stops being true. Returns the function to call when it ends by itself.
   */
  hold(account: ServiceAccount, roles: readonly Role[], close: (reason: string) => void, session?: string): () => void {
    let set = this.holds.get(account.name);
    if (!set) this.holds.set(account.name, (set = new Set()));
    const hold: Hold = { token: account.token, roles, close, session };
    set.add(hold);
    return () => {
      set.delete(hold);
      if (set.size === 0 && this.holds.get(account.name) === set) this.holds.delete(account.name);
    };
  }

  /**
   * Counts one more `what` (e.g. "watch streams") open for `account`; a 429 naming the limit when it
   * already has `max`. Returns the release (calling it more than once releases once).
   */
  take(account: string, what: string, max: number): () => void {
    const key = `${account}\0${what}`;
    const open = this.counts.get(key) ?? 0;
    if (open >= max) {
      this.log.warn({ account, what, max }, 'refused: per-account limit reached');
      throw new HttpError(429, `service account "${account}" has ${open} ${what} open, its limit is ${max}: close some first`);
    }
    this.counts.set(key, open + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.counts.get(key) ?? 1) - 1;
      if (left > 0) this.counts.set(key, left);
      else this.counts.delete(key);
    };
  }

  /** How many `what` the account has open now. */
  opened(account: string, what: string): number {
    return this.counts.get(`${account}\0${what}`) ?? 0;
  }

  /** How many things are held open (for tests and metrics). */
  heldBy(name: string): number {
    return this.holds.get(name)?.size ?? 0;
  }

  /** Closes what was opened with console session `session` (it was signed out or ended). */
  endSession(session: string, reason: string) {
    for (const [name, set] of this.holds) {
      for (const hold of [...set]) {
        if (hold.session !== session) continue;
        set.delete(hold);
        try {
          hold.close(reason);
        } catch (err) {
          this.log.error({ err, account: name }, 'closing what a session held failed');
        }
      }
      if (set.size === 0) this.holds.delete(name);
    }
  }

  private revoke(name: string, now: ServiceAccount | undefined) {
    const set = this.holds.get(name);
    if (!set) return;
    for (const hold of [...set]) {
      const reason = !now
        ? `service account "${name}" was deleted`
        : now.token !== hold.token
          ? `the token of service account "${name}" changed`
          : !hasAnyRole(now, hold.roles)
            ? `service account "${name}" lost the role it needed`
            : undefined;
      if (!reason) continue;
      set.delete(hold);
      this.log.info({ account: name, reason }, 'closing what a revoked account held open');
      try {
        hold.close(reason);
      } catch (err) {
        this.log.error({ err, account: name }, 'closing a revoked hold failed');
      }
    }
    if (set.size === 0) this.holds.delete(name);
  }

  close() {
    this.unsubscribe();
    this.holds.clear();
    this.accounts.clear();
  }
}

declare module 'fastify' {
  interface FastifyRequest {
    account?: ServiceAccount;
    /** The console session the request was authenticated by (none with Basic auth). */
    session?: string;
  }
  interface FastifyContextConfig {
    /** Roles of which the caller needs one; [] = any authenticated account; undefined = public. */
    roles?: readonly Role[];
  }
}

export function accountOf(request: FastifyRequest): ServiceAccount {
  if (!request.account) throw new HttpError(401, 'authentication required');
  return request.account;
}
