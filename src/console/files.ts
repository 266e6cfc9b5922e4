/** One file of the console's bundle, as the controller serves it. */
export interface ConsoleFile {
  name: string;
  type: string;
  body: Buffer;
}

/** The SEA asset that lists the console's files (each is the asset `console/NAME`). */
export const CONSOLE_MANIFEST = 'console/manifest.json';
