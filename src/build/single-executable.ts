// The single executable's version of source-tree.ts (scripts/build.ts bundles this module in its
// place): the version and commit were fixed by the build, and the asset files are the executable's
// SEA assets.
import { getAsset } from 'node:sea';
import type { AssetName } from './assets.ts';
import { CONSOLE_MANIFEST, ENCODED_SUFFIX, type ConsoleFile, type ConsoleManifestEntry } from '../console/files.ts';

// Replaced by the build (esbuild's `define`).
declare const ORCHARD_BUILD_VERSION: string;
declare const ORCHARD_BUILD_COMMIT: string;

export const VERSION: string = ORCHARD_BUILD_VERSION;

export function buildCommit(): string {
  return ORCHARD_BUILD_COMMIT;
}

export function assetText(name: AssetName): string {
  return getAsset(name, 'utf8');
}

/** The web console's files, built with the executable (scripts/build.ts). */
export function consoleFiles(): Promise<ConsoleFile[]> {
  const manifest = JSON.parse(getAsset(CONSOLE_MANIFEST, 'utf8')) as ConsoleManifestEntry[];
  const read = (name: string) => Buffer.from(getAsset(`console/${name}`));
  return Promise.resolve(
    manifest.map(({ name, type, encodings = [] }) => ({ name, type, body: read(name), encoded: Object.fromEntries(encodings.map((e) => [e, read(name + ENCODED_SUFFIX[e])])) })),
  );
}

export const SINGLE_EXECUTABLE = true;
