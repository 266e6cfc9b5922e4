// The servers' log (controller, worker): JSON lines for machines (pino's own), or, on a terminal,
// one short line per entry for people. Both are written synchronously in this thread — no pino
// transport (those run in worker threads), so nothing is lost on exit and a single-file build works.
import { pino, type DestinationStream, type Logger } from 'pino';

export type LogFormat = 'json' | 'text';
export const LOG_FORMATS: LogFormat[] = ['json', 'text'];

export function parseLogFormat(value: string): LogFormat {
  if (!(LOG_FORMATS as string[]).includes(value)) throw new Error(`--log-format must be json or text, got "${value}"`);
  return value as LogFormat;
}

export interface LoggerOptions {
  level?: string;
  /** Default: text when the log goes to a terminal, JSON otherwise. */
  format?: LogFormat;
  /** Where JSON lines go (default: standard output); the text format always writes to standard output. */
  destination?: DestinationStream;
}

const REDACT = ['req.headers.authorization', '*.token', '*.password'];

/** The server's logger: `format` (or json when stdout is not a terminal, text when it is), at `level` (default $ORCHARD_LOG_LEVEL, else info). */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const level = opts.level ?? process.env.ORCHARD_LOG_LEVEL ?? 'info';
  const format = opts.format ?? (process.stdout.isTTY ? 'text' : 'json');
  if (format === 'json') return pino({ level, redact: REDACT }, opts.destination ?? pino.destination({ fd: 1, sync: true }));
  const out = pino.destination({ fd: 1, sync: true });
  const color = process.stdout.isTTY === true && !process.env.NO_COLOR && process.env.TERM !== 'dumb';
  return pino({ level, redact: REDACT }, { write: (line: string) => void out.write(formatLine(line, { color })) });
}

const LEVELS: Record<number, [name: string, color: string]> = {
  10: ['TRACE', '90'],
  20: ['DEBUG', '36'],
  30: ['INFO ', '32'],
  40: ['WARN ', '33'],
  50: ['ERROR', '31'],
  60: ['FATAL', '35'],
};

/** Fields pino adds to every line, which a person reading the terminal does not need. */
const SKIPPED = new Set(['level', 'time', 'msg', 'pid', 'hostname', 'v']);

const paint = (on: boolean, code: string, text: string) => (on ? `\x1b[${code}m${text}\x1b[0m` : text);

function value(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  if (v === null || typeof v !== 'object') return String(v);
  return JSON.stringify(v);
}

const pad = (n: number, w = 2) => String(n).padStart(w, '0');

/**
 * One pino JSON line as `HH:MM:SS.mmm LEVEL message key=value …`; a request as
 * `GET /v1/vms 200 1.2ms`; an error's stack on the lines after it.
 */
export function formatLine(line: string, opts: { color?: boolean } = {}): string {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line;
  }
  const color = opts.color ?? false;
  const t = new Date(typeof entry.time === 'number' ? entry.time : Date.now());
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}.${pad(t.getMilliseconds(), 3)}`;
  const [name, code] = LEVELS[entry.level as number] ?? [String(entry.level).padEnd(5), '0'];
  let msg = typeof entry.msg === 'string' ? entry.msg : '';
  const fields: string[] = [];
  let stack: string | undefined;
  const req = entry.req as { method?: string; url?: string } | undefined;
  const res = entry.res as { statusCode?: number } | undefined;
  const handled = new Set<string>();
  if (req?.method && res?.statusCode !== undefined) {
    // A request: what, how it ended, how long it took.
    msg = `${req.method} ${req.url} ${res.statusCode}` + (typeof entry.responseTime === 'number' ? ` ${entry.responseTime.toFixed(1)}ms` : '');
    handled.add('req').add('res').add('responseTime');
  }
  for (const [k, v] of Object.entries(entry)) {
    if (SKIPPED.has(k) || handled.has(k) || v === undefined) continue;
    if (k === 'reqId' && typeof v === 'string') {
      fields.push(`req=${v.slice(0, 8)}`);
      continue;
    }
    if ((k === 'err' || k === 'error') && v && typeof v === 'object') {
      const e = v as { message?: string; stack?: string };
      fields.push(`${k}=${value(e.message ?? '')}`);
      if ((entry.level as number) >= 50 && e.stack) stack = e.stack;
      continue;
    }
    fields.push(`${k}=${value(v)}`);
  }
  const text =
    `${paint(color, '2', time)} ${paint(color, code, name)} ${msg}` +
    (fields.length ? ' ' + paint(color, '2', fields.join(' ')) : '') +
    (stack ? '\n' + stack.replace(/^/gm, '    ') : '');
  return text + '\n';
}
