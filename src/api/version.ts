import { buildCommit, VERSION as BUILD_VERSION } from '../build/source-tree.ts';

export const VERSION: string = BUILD_VERSION;
/** The git commit of this build: fixed by `npm run build`; a checkout's own; $ORCHARD_COMMIT overrides. */
export function commit(): string {
  return process.env.ORCHARD_COMMIT ?? buildCommit();
}
