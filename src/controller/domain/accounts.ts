// Service account rules: what a new token is, and who reads tokens.
import { randomBytes } from 'node:crypto';
import type { ServiceAccount } from '../../api/schemas.ts';
import { hasAnyRole } from '../access.ts';

/** A new service account token: 32 bytes from the CSPRNG. */
export const newToken = () => randomBytes(32).toString('base64url');

/** Tokens are shown only to admin:write (which can set them anyway, and which `get bootstrap-token` needs). */
export function presentAccount(sa: ServiceAccount, reader: ServiceAccount): ServiceAccount {
  if (hasAnyRole(reader, ['admin:write'])) return sa;
  const { token: _hidden, ...rest } = sa;
  return rest;
}
