// Shared plumbing for CLI commands: the client of the chosen context, output flags, prompts.
import { Command, InvalidArgumentError, Option } from 'commander';
import type { OrchardClient } from '../client/client.ts';
import { ApiError } from '../client/errors.ts';
import { resolveContext } from '../client/config.ts';
import { parseOutput, type OutputFormat } from './output.ts';
import * as lazy from '../build/lazy.ts';

export class UsageError extends Error {}

/**
 * An error as the CLI prints it: the message alone for the errors one expects (a 4xx: not found,
 * lacks a role, invalid…); a 5xx, the controller's own failure, also says "(HTTP 500)". With
 * ORCHARD_DEBUG set every API error shows its HTTP status.
 */
export function errorText(err: Error): string {
  if (!(err instanceof ApiError)) return err.message;
  return err.status >= 500 || process.env.ORCHARD_DEBUG ? `${err.message} (HTTP ${err.status})` : err.message;
}

export interface CommonOptions {
  context?: string;
  output: OutputFormat;
}

/** Adds --context and --output to a command. */
export function withCommon(cmd: Command, output = true): Command {
  cmd.addOption(new Option('--context <name>', 'context to use (default: the default context, or $ORCHARD_CONTEXT)'));
  if (output) cmd.addOption(new Option('-o, --output <format>', 'output format: table, json or yaml').default('table').argParser(parseOutput));
  return cmd;
}

/** A client of the chosen context (the client's modules are loaded on first use, not at start-up). */
export async function clientFor(opts: { context?: string }): Promise<OrchardClient> {
  const { name, context } = await resolveContext(opts.context);
  const { OrchardClient } = await lazy.client();
  // Errors name the context (`cannot reach the controller of context "dev" at …`), unless ORCHARD_URL chose the controller.
  return new OrchardClient({ ...context, contextName: process.env.ORCHARD_URL ? undefined : name });
}

/** Runs `fn` with a client of the chosen context, closing its connections afterwards. */
export async function withClient<T>(opts: { context?: string }, fn: (client: OrchardClient) => Promise<T>): Promise<T> {
  const client = await clientFor(opts);
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

export async function confirm(question: string): Promise<boolean> {
  const { createInterface } = await import('node:readline/promises');
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(question);
    return /^y(es)?$/i.test(answer.trim());
  } finally {
    rl.close();
  }
}

/** `--label k=v` (repeatable), or upstream's `--labels a=1,b=2`, into a map. */
export function collectKeyValue(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const out = { ...previous };
  for (const pair of value.split(',')) {
    const eq = pair.indexOf('=');
    if (eq <= 0) throw new InvalidArgumentError(`expected KEY=VALUE[,KEY=VALUE...], got "${value}"`);
    out[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return out;
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** A repeatable list flag that also takes upstream's comma-separated form (`--host-dirs a,b`). */
export function collectList(value: string, previous: string[] = []): string[] {
  return [...previous, ...value.split(',').filter(Boolean)];
}

export function parseInteger(name: string) {
  return (value: string) => {
    if (!/^-?\d+$/.test(value)) throw new InvalidArgumentError(`${name} must be an integer, got "${value}"`);
    return Number(value);
  };
}

/** A size in bytes: a number with an optional binary unit, `500M`, `50G`, `1.5T` (K, M, G, T; `GiB`, `GB` alike). */
export function parseSize(name: string) {
  return (value: string) => {
    const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(value.trim());
    if (!m) throw new InvalidArgumentError(`${name} must be a size such as 500M or 50G, got "${value}"`);
    const unit = m[2].toUpperCase();
    return Math.round(Number(m[1]) * 1024 ** (unit ? 'KMGT'.indexOf(unit) + 1 : 0));
  };
}
