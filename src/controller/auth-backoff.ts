// Back-off on failed authentication, per source address and per account name: a few free failures,
// then each further one blocks the key for twice as long as the last (1 s, 2 s, 4 s ... 5 min). A
// blocked key is refused (429) without its credentials being checked, so guessing is slowed to a
// trickle. An account's block does not apply to sources that signed in to it successfully before, so
// an attacker elsewhere cannot lock its owner out. Memory is bounded: least recently used keys go.

export interface BackoffOptions {
  /** Failures from one source before it is blocked. */
  freePerSource: number;
  /** Failures for one account name (from all sources) before it is blocked. */
  freePerAccount: number;
  baseMs: number;
  maxMs: number;
  /** A key with no failure for this long starts over. */
  forgetMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { freePerSource: 10, freePerAccount: 20, baseMs: 1000, maxMs: 5 * 60_000, forgetMs: 15 * 60_000 };

const MAX_KEYS = 10_000;
/** Sources remembered per account as having signed in successfully (most recent). */
const MAX_GOOD_SOURCES = 32;
const GOOD_SOURCE_TTL_MS = 24 * 3600_000;

interface Failures {
  count: number;
  last: number;
  blockedUntil: number;
}

/** A Map that keeps at most `max` entries, dropping the least recently set. */
class BoundedMap<V> extends Map<string, V> {
  override set(key: string, value: V): this {
    super.delete(key);
    super.set(key, value);
    if (this.size > MAX_KEYS) this.delete(this.keys().next().value!);
    return this;
  }
}

/**
 * The key of a source address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64 (one host usually
 * has a whole /64, so per-address keys would not slow it down).
 */
export function sourceKey(address: string | undefined): string {
  if (!address) return 'unknown';
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return mapped[1];
  if (!address.includes(':')) return address;
  const [head, tail = ''] = address.split('::');
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const groups = address.includes('::') ? [...left, ...Array(8 - left.length - right.length).fill('0'), ...right] : left;
  return groups.slice(0, 4).map((g) => g.toLowerCase().replace(/^0+(?=.)/, '')).join(':') + '::/64';
}

export class AuthBackoff {
  private readonly sources = new BoundedMap<Failures>();
  private readonly accounts = new BoundedMap<Failures>();
  private readonly goodSources = new BoundedMap<Map<string, number>>();
  private readonly opts: BackoffOptions;
  private readonly now: () => number;

  constructor(opts: BackoffOptions = DEFAULT_BACKOFF, now: () => number = Date.now) {
    this.opts = opts;
    this.now = now;
  }

  /** Milliseconds until `source` may try to sign in as `account` again; 0 when it may now. */
  retryAfterMs(source: string, account: string): number {
    const now = this.now();
    const bySource = Math.max(0, (this.sources.get(source)?.blockedUntil ?? 0) - now);
    const known = (this.goodSources.get(account)?.get(source) ?? -Infinity) > now - GOOD_SOURCE_TTL_MS;
    const byAccount = known ? 0 : Math.max(0, (this.accounts.get(account)?.blockedUntil ?? 0) - now);
    return Math.max(bySource, byAccount);
  }

  failed(source: string, account: string) {
    this.count(this.sources, source, this.opts.freePerSource);
    this.count(this.accounts, account, this.opts.freePerAccount);
  }

  /** A successful sign-in clears the source's failures (not the account's: they may come from elsewhere). */
  succeeded(source: string, account: string) {
    this.sources.delete(source);
    const good = this.goodSources.get(account) ?? new Map<string, number>();
    good.delete(source);
    good.set(source, this.now());
    if (good.size > MAX_GOOD_SOURCES) good.delete(good.keys().next().value!);
    this.goodSources.set(account, good);
  }

  private count(map: BoundedMap<Failures>, key: string, free: number) {
    const now = this.now();
    const prev = map.get(key);
    const f: Failures = prev && now - prev.last < this.opts.forgetMs ? prev : { count: 0, last: now, blockedUntil: 0 };
    f.count++;
    f.last = now;
    if (f.count > free) f.blockedUntil = now + Math.min(this.opts.maxMs, this.opts.baseMs * 2 ** Math.min(30, f.count - free - 1));
    map.set(key, f);
  }
}
