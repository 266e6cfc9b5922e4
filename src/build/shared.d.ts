// The first script's modules that the single executable's second script uses (a module the build
// writes: scripts/build.ts), by path under the repository.
declare module 'orchard:shared' {
  export const shared: Record<string, unknown>;
}
