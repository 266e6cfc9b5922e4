/** The encodings the console's scripts and style sheets are also stored in, the most compact first. */
export const CONSOLE_ENCODINGS = ['br', 'gzip'] as const;
export type ConsoleEncoding = (typeof CONSOLE_ENCODINGS)[number];
/** The file name suffix of an encoded copy (in dist/console and the SEA assets). */
export const ENCODED_SUFFIX: Record<ConsoleEncoding, string> = { br: '.br', gzip: '.gz' };

/** One file of the console's bundle, as the controller serves it, with its compressed copies (made when it was built). */
export interface ConsoleFile {
  name: string;
  type: string;
  body: Buffer;
  encoded?: Partial<Record<ConsoleEncoding, Buffer>>;
}

/** An entry of the manifest: a file, and the encodings it is also stored in (`NAME.br`, `NAME.gz`). */
export interface ConsoleManifestEntry {
  name: string;
  type: string;
  encodings?: ConsoleEncoding[];
}

/** The SEA asset that lists the console's files (each is the asset `console/NAME`). */
export const CONSOLE_MANIFEST = 'console/manifest.json';
