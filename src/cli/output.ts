// Output in the terminal's conventions: --output table (default) | json | yaml; errors go to stderr.
import { InvalidArgumentError } from 'commander';
import * as lazy from '../build/lazy.ts';

export type OutputFormat = 'table' | 'json' | 'yaml';
export const OUTPUT_FORMATS: OutputFormat[] = ['table', 'json', 'yaml'];

export function parseOutput(value: string): OutputFormat {
  if (!(OUTPUT_FORMATS as string[]).includes(value)) throw new InvalidArgumentError(`--output must be one of ${OUTPUT_FORMATS.join(', ')}, got "${value}"`);
  return value as OutputFormat;
}

export function table(headers: string[], rows: (string | number | undefined)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map((c) => (c === undefined || c === '' ? '-' : String(c))))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  return cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('   ')).join('\n') + '\n';
}

/** A single object as aligned "key: value" lines. */
export function details(fields: [string, unknown][]): string {
  const width = Math.max(...fields.map(([k]) => k.length)) + 1;
  return (
    fields
      .map(([k, v]) => `${(k + ':').padEnd(width)} ${v === undefined || v === '' ? '-' : typeof v === 'object' ? JSON.stringify(v) : String(v)}`)
      .join('\n') + '\n'
  );
}

export async function print(format: OutputFormat, value: unknown, asTable: () => string): Promise<void> {
  if (format === 'json') process.stdout.write(JSON.stringify(value, null, 2) + '\n');
  // YAML is loaded when asked for: most CLI starts need none.
  else if (format === 'yaml') process.stdout.write((await lazy.yaml()).default.stringify(value));
  else process.stdout.write(asTable());
}

export function formatLabels(labels?: Record<string, string | number>): string {
  const entries = Object.entries(labels ?? {});
  return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(',') : '';
}

export function age(iso?: string): string {
  if (!iso) return '';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (Number.isNaN(s)) return '';
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

const DURATION_UNITS: Record<string, number> = { ns: 1e-6, us: 1e-3, µs: 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** A Go duration ("3m", "90s", "1h30m", "5m30s", "500ms") or plain seconds -> milliseconds. */
export function parseDuration(value: string): number {
  const v = value.trim();
  if (/^\d+(?:\.\d+)?$/.test(v)) return Number(v) * 1000;
  if (!/^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$/.test(v)) throw new Error(`"${value}" is not a duration (like 30s, 3m, 1h30m)`);
  let ms = 0;
  for (const [, n, unit] of v.matchAll(/(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)/g)) ms += Number(n) * DURATION_UNITS[unit];
  return ms;
}
