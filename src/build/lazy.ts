// The parts of the program that a command loads when it runs, not when `orchard` starts: the
// controller, the worker, the API client and the heavier libraries. In a checkout these are plain
// dynamic imports. In the single executable this module is the entry of a second script, which holds
// the parts; lazy-single-executable.ts, in its place in the first script, compiles that second script
// (with its code cache) for the first command that needs a part, so that `orchard --help` starts
// without them (bench/executable.ts). Each part is evaluated only when asked for, in both.
export const controller = () => import('../controller/controller.ts');
export const accounts = () => import('../controller/domain/accounts.ts');
export const backup = () => import('../controller/store/backup.ts');
export const worker = () => import('../worker/run.ts');
export const images = () => import('../worker/images.ts');
export const qemu = () => import('../worker/drivers/qemu.ts');
export const ociCache = () => import('../worker/oci/cache.ts');
export const snapshots = () => import('../worker/drivers/snapshots.ts');
export const ociPush = () => import('../worker/oci/push.ts');
export const ociReference = () => import('../worker/oci/reference.ts');
export const privdrop = () => import('../worker/privdrop.ts');
export const logFile = () => import('../worker/log-file.ts');
export const client = () => import('../client/client.ts');
export const pino = () => import('pino');
export const yaml = () => import('yaml');
export const ssh2 = () => import('ssh2');
