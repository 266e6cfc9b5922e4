/** Files under src/ that the program reads while it runs: the single executable embeds exactly these. */
export const ASSETS = ['worker/images/build-debian-dev.sh'] as const;
export type AssetName = (typeof ASSETS)[number];

/** The single executable's second script (lazy-single-executable.ts): its SEA assets and its name in stack traces. */
export const LAZY_SCRIPT = { source: 'lazy.cjs', cache: 'lazy.cache', filename: 'orchard-lazy.cjs' } as const;
/** How it is compiled: as a CommonJS module's function. The build makes its code cache from exactly this. */
export const LAZY_WRAPPER = ['(function (exports, require, module, __filename, __dirname) {', '\n})'] as const;
