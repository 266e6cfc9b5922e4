/** Files under src/ that the program reads while it runs: the single executable embeds exactly these. */
export const ASSETS = ['worker/images/build-debian-dev.sh'] as const;
export type AssetName = (typeof ASSETS)[number];
