import { readFileSync } from 'node:fs';

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
export const VERSION: string = pkg.version;
/** Set at release time; "dev" for a checkout. */
export const COMMIT: string = process.env.ORCHARD_COMMIT ?? 'dev';
