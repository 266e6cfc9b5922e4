// The CLI's contexts: ~/.orchard/orchard.yml (or $ORCHARD_HOME/orchard.yml), one per controller,
// with the credentials and the pinned controller certificate.
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import * as lazy from '../build/lazy.ts';

export interface Context {
  url: string;
  /** PEM of the pinned certificate; absent when the controller's certificate is trusted by the system. */
  certificate?: string;
  serviceAccountName?: string;
  serviceAccountToken?: string;
}

export interface Config {
  'default-context'?: string;
  contexts: Record<string, Context>;
}

export function orchardHome(): string {
  return process.env.ORCHARD_HOME || join(homedir(), '.orchard');
}

export const configPath = () => join(orchardHome(), 'orchard.yml');

/** The YAML library, loaded on first use (most CLI starts, such as --help, need none). */
const yaml = async () => (await lazy.yaml()).default;

export async function loadConfig(): Promise<Config> {
  const path = configPath();
  if (!existsSync(path)) return { contexts: {} };
  const YAML = await yaml();
  let parsed: unknown;
  try {
    parsed = YAML.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${path}: ${(err as Error).message}`);
  }
  const config = (parsed ?? {}) as Partial<Config>;
  const contexts = config.contexts ?? {};
  for (const c of Object.values(contexts)) if (c?.certificate) c.certificate = pemOf(c.certificate);
  return { ...config, contexts };
}

/** Upstream's CLI keeps the certificate as base64 of its PEM; older files of ours, as PEM: both are read. */
function pemOf(stored: string): string {
  return stored.trimStart().startsWith('-----BEGIN') ? stored : Buffer.from(stored, 'base64').toString('utf8');
}

export async function saveConfig(config: Config): Promise<void> {
  const dir = orchardHome();
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const path = configPath();
  // Write-then-rename, so a crash never leaves a half-written file; 0600: it holds tokens.
  // The certificate as upstream's CLI writes it (base64 of the PEM), so both CLIs share the file.
  const contexts = Object.fromEntries(
    Object.entries(config.contexts).map(([name, c]) => [name, c.certificate ? { ...c, certificate: Buffer.from(c.certificate).toString('base64') } : c]),
  );
  const YAML = await yaml();
  writeFileSync(path + '.tmp', YAML.stringify({ ...config, contexts }), { mode: 0o600 });
  chmodSync(path + '.tmp', 0o600);
  renameSync(path + '.tmp', path);
}

/** ORCHARD_URL, ORCHARD_SERVICE_ACCOUNT_NAME and ORCHARD_SERVICE_ACCOUNT_TOKEN override the default context (as upstream's). */
function withEnvironment(context: Context): Context {
  const env = process.env;
  return {
    ...context,
    url: env.ORCHARD_URL ? normalizeURL(env.ORCHARD_URL) : context.url,
    serviceAccountName: env.ORCHARD_SERVICE_ACCOUNT_NAME ?? context.serviceAccountName,
    serviceAccountToken: env.ORCHARD_SERVICE_ACCOUNT_TOKEN ?? context.serviceAccountToken,
  };
}

/** A bare `host:port` (as upstream users type it) means https://host:port. */
export function normalizeURL(url: string): string {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? url : `https://${url}`;
}

export async function resolveContext(name?: string): Promise<{ name: string; context: Context }> {
  const config = await loadConfig();
  const wanted = name ?? process.env.ORCHARD_CONTEXT ?? config['default-context'];
  if (!name && !process.env.ORCHARD_CONTEXT) {
    const chosen = wanted ? config.contexts[wanted] : Object.keys(config.contexts).length === 1 ? Object.values(config.contexts)[0] : undefined;
    if (process.env.ORCHARD_URL) return { name: wanted ?? 'environment', context: withEnvironment(chosen ?? { url: '' }) };
    if (chosen) return { name: wanted ?? Object.keys(config.contexts)[0], context: withEnvironment(chosen) };
  }
  if (!wanted) {
    const names = Object.keys(config.contexts);
    if (names.length === 1) return { name: names[0], context: config.contexts[names[0]] };
    throw new Error(
      names.length === 0
        ? 'no context configured: run "orchard context create URL --service-account-name NAME --service-account-token TOKEN" (or "orchard dev")'
        : `no default context: pick one with "orchard context default NAME" (have: ${names.join(', ')})`,
    );
  }
  const context = config.contexts[wanted];
  if (!context) throw new Error(`no context named "${wanted}" in ${configPath()}`);
  return { name: wanted, context };
}
