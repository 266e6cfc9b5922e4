// Authentication (HTTP Basic: service account name and token) and role checks.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import type { Role, ServiceAccount } from '../api/schemas.ts';
import type { Store } from './store/store.ts';
import { HttpError } from './errors.ts';

const digest = (s: string) => createHash('sha256').update(s).digest();

/** Constant-time token comparison (hashing first makes lengths equal and hides them). */
export function tokensEqual(a: string, b: string): boolean {
  return timingSafeEqual(digest(a), digest(b));
}

export function parseBasicAuth(header: string | undefined): { name: string; token: string } | undefined {
  if (!header) return undefined;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!m) return undefined;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  return { name: decoded.slice(0, colon), token: decoded.slice(colon + 1) };
}

export async function authenticate(store: Store, header: string | undefined): Promise<ServiceAccount> {
  const creds = parseBasicAuth(header);
  if (!creds) throw new HttpError(401, 'authentication required: HTTP Basic auth with a service account name and token');
  const account = await store.get('serviceAccounts', creds.name);
  // Compare even when the account is missing, so timing does not tell which names exist.
  const ok = tokensEqual(account?.token ?? '\0no-such-account', creds.token) && account !== undefined;
  if (!ok) throw new HttpError(401, 'invalid service account name or token');
  return account;
}

/** `anyOf` empty: any authenticated account. Otherwise one of the roles is needed. */
export function authorize(account: ServiceAccount, anyOf: readonly Role[]): void {
  if (anyOf.length === 0 || anyOf.some((r) => account.roles.includes(r))) return;
  const need = anyOf.length === 1 ? `the role "${anyOf[0]}"` : `one of the roles ${anyOf.map((r) => `"${r}"`).join(' or ')}`;
  throw new HttpError(403, `service account "${account.name}" lacks ${need}`);
}

declare module 'fastify' {
  interface FastifyRequest {
    account?: ServiceAccount;
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
