// The CLI's contexts: ~/.orchard/orchard.yml (or $ORCHARD_HOME/orchard.yml), one per controller,
// with the credentials and the pinned controller certificate.
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import YAML from 'yaml';

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

export function loadConfig(): Config {
  const path = configPath();
  if (!existsSync(path)) return { contexts: {} };
  let parsed: unknown;
  try {
    parsed = YAML.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${path}: ${(err as Error).message}`);
  }
  const config = (parsed ?? {}) as Partial<Config>;
  return { ...config, contexts: config.contexts ?? {} };
}

export function saveConfig(config: Config): void {
  const dir = orchardHome();
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const path = configPath();
  // Write-then-rename, so a crash never leaves a half-written file; 0600: it holds tokens.
  writeFileSync(path + '.tmp', YAML.stringify(config), { mode: 0o600 });
  chmodSync(path + '.tmp', 0o600);
  renameSync(path + '.tmp', path);
}

export function resolveContext(name?: string): { name: string; context: Context } {
  const config = loadConfig();
  const wanted = name ?? process.env.ORCHARD_CONTEXT ?? config['default-context'];
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
