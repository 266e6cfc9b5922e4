// The single executable's version of source-tree.ts (scripts/build.ts bundles this module in its
// place): the version and commit were fixed by the build, and the asset files are the executable's
// SEA assets.
import { getAsset } from 'node:sea';
import type { AssetName } from './assets.ts';

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

export const SINGLE_EXECUTABLE = true;
