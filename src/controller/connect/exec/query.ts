// The exec request: its query parameters, parsed and checked (400s naming the parameter), and the
// command line the guest runs (marked so that its processes can be found and killed).
import { badRequest } from '../../errors.ts';

/** The largest terminal size (rows, cols) accepted. */
export const TERMINAL_MAX = 10_000;

export interface ExecSpec {
  command: string;
  interactive: boolean;
  tty: boolean;
  rows: number;
  cols: number;
  env: Record<string, string>;
  workdir: string;
}

export interface ExecQuery {
  /** Undefined when no command was given (allowed only to reattach to a session). */
  spec?: ExecSpec;
  /** Rows and cols as given (0 when not), for resizing a reattached TTY. */
  size?: { rows: number; cols: number };
  session?: string;
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const SESSION_ID = /^[\x21-\x7e]{1,128}$/;

function parseBool(q: URLSearchParams, name: string): boolean | undefined {
  const v = q.get(name);
  if (v === null) return undefined;
  const l = v.toLowerCase();
  if (['', '1', 't', 'true', 'yes', 'on'].includes(l)) return true;
  if (['0', 'f', 'false', 'no', 'off'].includes(l)) return false;
  throw badRequest(`query parameter "${name}" must be a boolean (true or false), got ${JSON.stringify(v)}`);
}

function parseSize(q: URLSearchParams, name: string): number {
  const v = q.get(name);
  if (v === null || v === '') return 0;
  if (!/^\d{1,6}$/.test(v) || Number(v) > TERMINAL_MAX) {
    throw badRequest(`query parameter "${name}" must be a terminal size from 1 to ${TERMINAL_MAX}, got ${JSON.stringify(v)}`);
  }
  return Number(v);
}

/** Parses and checks the query; throws 400s naming the parameter. */
export function parseExecQuery(url: URL): ExecQuery {
  const q = url.searchParams;
  const command = q.get('command') ?? '';
  if (command.includes('\0')) throw badRequest('query parameter "command" must not contain NUL characters');
  const stdin = parseBool(q, 'stdin');
  const interactiveParam = parseBool(q, 'interactive');
  if (stdin !== undefined && interactiveParam !== undefined && stdin !== interactiveParam) {
    throw badRequest('query parameters "interactive" and "stdin" contradict each other');
  }
  const tty = parseBool(q, 'tty') ?? false;
  const interactive = (interactiveParam ?? stdin ?? false) || tty;
  const rows = parseSize(q, 'rows');
  const cols = parseSize(q, 'cols');
  if ((rows === 0) !== (cols === 0)) throw badRequest('query parameters "rows" and "cols" go together: give both or neither');
  const env: Record<string, string> = {};
  for (const [key, value] of q) {
    if (!key.startsWith('env')) continue;
    if (key === 'env') throw badRequest('query parameter "env" must be given as env[NAME]=VALUE');
    const m = /^env\[(.*)\]$/s.exec(key);
    if (!m) continue;
    if (!ENV_NAME.test(m[1])) {
      throw badRequest(`query parameter ${JSON.stringify(key)}: ${JSON.stringify(m[1])} is not an environment variable name (letters, digits and _, not starting with a digit)`);
    }
    if (value.includes('\0')) throw badRequest(`query parameter ${JSON.stringify(key)} must not contain NUL characters`);
    if (!(m[1] in env)) env[m[1]] = value;
  }
  const workdir = q.get('workdir') ?? '';
  if (workdir.includes('\0')) throw badRequest('query parameter "workdir" must not contain NUL characters');
  const session = q.get('session') || undefined;
  if (session !== undefined && !SESSION_ID.test(session)) {
    throw badRequest('query parameter "session" must be 1 to 128 printable ASCII characters without spaces');
  }
  const size = rows ? { rows, cols } : undefined;
  if (!command) return { session, size };
  return { spec: { command, interactive, tty, rows: rows || 24, cols: cols || 80, env, workdir }, size, session };
}

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** The variable that marks a command's processes, so that they can be found and killed. */
export const MARKER_VAR = 'ORCHARD_EXEC_ID';

/**
 * What the SSH server runs (through the user's login shell): the command, after `cd` and `export`s.
 * The environment goes in the command line because sshd accepts env requests only for AcceptEnv names.
 * With a `marker`, the login shell exports it (ORCHARD_EXEC_ID) and execs itself (`$SHELL -c`) on
 * the rest, so that the shell running the command and everything it starts carry it in their
 * environment from the start (/proc/PID/environ shows what a process was started with).
 */
export function remoteCommand(spec: ExecSpec, marker?: string): string {
  const keys = Object.keys(spec.env).sort();
  let inner = '';
  if (spec.workdir) inner += `cd ${shellQuote(spec.workdir)} || exit $?\n`;
  for (const k of keys) inner += `export ${k}=${shellQuote(spec.env[k])}\n`;
  inner += spec.command;
  if (marker === undefined) return inner;
  return `export ${MARKER_VAR}=${shellQuote(marker)}; exec "\${SHELL:-/bin/sh}" -c ${shellQuote(inner)}`;
}

/**
 * Kills every process whose environment carries the marker (Linux guests: /proc). The SSH "signal"
 * request covers servers that support it (OpenSSH, e.g. macOS); dropbear does not, and closing a
 * session without a PTY leaves its processes running. Twice, for processes forked during the first pass.
 */
export function killScript(marker: string): string {
  // (No grep -F: busybox's stops at the first NUL of an environ file. The marker has no regex metacharacters.)
  const m = `${MARKER_VAR}=${marker}`;
  return `for pass in 1 2; do for f in $(grep -l ${shellQuote(m)} /proc/[0-9]*/environ 2>/dev/null); do p=\${f#/proc/}; kill -KILL "\${p%/environ}" 2>/dev/null; done; done; true`;
}

export function sameSpec(a: ExecSpec, b: ExecSpec): boolean {
  const ka = Object.keys(a.env).sort();
  const kb = Object.keys(b.env).sort();
  return (
    a.command === b.command &&
    a.interactive === b.interactive &&
    a.tty === b.tty &&
    a.workdir === b.workdir &&
    ka.length === kb.length &&
    ka.every((k, i) => k === kb[i] && a.env[k] === b.env[k])
  );
}

