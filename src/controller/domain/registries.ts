// Registry credentials (Orchard addition): set by admins, handed to workers in clear over their watch
// (registriesAction), and never answered by the API in clear: answers say only whether a password is set.
import { X509Certificate } from 'node:crypto';
import type { Registry, RegistryInput, StoredRegistry } from '../../api/schemas.ts';
import type { RegistryCredentials } from '../../api/worker-protocol.ts';
import { badRequest } from '../errors.ts';

/** Registries a cluster keeps at most (each worker gets all of them in one registriesAction frame). */
export const MAX_REGISTRIES = 64;

/** Host names are case-insensitive: kept in lower case, so `GHCR.io` and `ghcr.io` are one registry. */
export const normalizeHost = (host: string) => host.toLowerCase();

/** Why `host` (already matching REGISTRY_HOST_PATTERN) is not a registry host, or undefined. */
function hostProblem(host: string): string | undefined {
  const port = /:(\d+)$/.exec(host)?.[1];
  if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) return `field "host": port ${port} is not between 1 and 65535`;
  return undefined;
}

/** The certificates of a PEM text, or a 400 saying which block is not one (never echoing the text). */
function checkCA(pem: string): void {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw badRequest('field "ca": no PEM certificate in it (expected -----BEGIN CERTIFICATE----- … -----END CERTIFICATE-----)');
  if (blocks.length > 32) throw badRequest(`field "ca": ${blocks.length} certificates, at most 32`);
  const rest = pem.replace(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g, '').trim();
  if (rest !== '') throw badRequest('field "ca": it holds something other than PEM certificates');
  for (const [i, block] of blocks.entries()) {
    try {
      new X509Certificate(block);
    } catch {
      throw badRequest(`field "ca": certificate ${i + 1} of ${blocks.length} is not a valid X.509 certificate`);
    }
  }
}

/**
 * The record a POST (no `existing`) or PUT stores. A password left out of a PUT keeps the stored
 * one (clients cannot send back what they are never shown); null removes it.
 */
export function registryRecord(input: RegistryInput, existing: StoredRegistry | undefined, now: string): StoredRegistry {
  const host = normalizeHost(input.host);
  const problem = hostProblem(host);
  if (problem) throw badRequest(problem);
  if (input.ca !== undefined) checkCA(input.ca);
  const password = input.password === undefined ? existing?.password : (input.password ?? undefined);
  if (password !== undefined && input.username === undefined) throw badRequest('field "username" is required with a password');
  const record: StoredRegistry = { name: host, username: input.username, password, insecure: input.insecure, ca: input.ca, createdAt: existing?.createdAt ?? now };
  if (existing) record.updatedAt = now;
  for (const k of Object.keys(record) as (keyof StoredRegistry)[]) if (record[k] === undefined) delete record[k];
  return record;
}

/** As the API answers it: no password, only whether one is set. */
export function presentRegistry(r: StoredRegistry): Registry {
  const out: Registry = { host: r.name, passwordSet: r.password !== undefined };
  if (r.username !== undefined) out.username = r.username;
  if (r.insecure !== undefined) out.insecure = r.insecure;
  if (r.ca !== undefined) out.ca = r.ca;
  if (r.createdAt !== undefined) out.createdAt = r.createdAt;
  if (r.updatedAt !== undefined) out.updatedAt = r.updatedAt;
  return out;
}

/** As workers get it (registriesAction): in clear. */
export function credentialsOf(r: StoredRegistry): RegistryCredentials {
  const out: RegistryCredentials = { host: r.name };
  if (r.username !== undefined) out.username = r.username;
  if (r.password !== undefined) out.password = r.password;
  if (r.insecure !== undefined) out.insecure = r.insecure;
  if (r.ca !== undefined) out.ca = r.ca;
  return out;
}
