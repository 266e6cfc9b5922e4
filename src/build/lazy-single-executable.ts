// lazy.ts in the single executable's first script: the parts are the SEA asset `lazy.cjs` (lazy.ts
// and all it imports, bundled), a CommonJS script compiled on first use with its V8 code cache
// (asset `lazy.cache`, this host's build only). It gets
// the modules it shares with the first script from the first script (`orchard-shared:` ids, see
// scripts/build.ts), and Node's built-in modules; nothing else can be required in a SEA.
import { getAsset, getAssetKeys } from 'node:sea';
import { Script } from 'node:vm';
import { LAZY_SCRIPT, LAZY_WRAPPER } from './assets.ts';
import type * as Parts from './lazy.ts';
import { shared } from 'orchard:shared';

let parts: typeof Parts | undefined;

function load(): typeof Parts {
  if (parts) return parts;
  const cachedData = getAssetKeys().includes(LAZY_SCRIPT.cache) ? Buffer.from(getAsset(LAZY_SCRIPT.cache)) : undefined;
  const script = new Script(LAZY_WRAPPER[0] + getAsset(LAZY_SCRIPT.source, 'utf8') + LAZY_WRAPPER[1], { filename: LAZY_SCRIPT.filename, cachedData });
  if (script.cachedDataRejected && process.env.ORCHARD_DEBUG) process.stderr.write('orchard: the code cache of the second script was rejected\n');
  const require = (id: string): unknown => {
    if (id.startsWith('orchard-shared:') && Object.hasOwn(shared, id.slice('orchard-shared:'.length))) return shared[id.slice('orchard-shared:'.length)];
    const builtin = process.getBuiltinModule(id);
    if (builtin) return builtin;
    // What an optional native addon's require says (ssh2, ws try theirs and go on without).
    throw Object.assign(new Error(`Cannot find module '${id}'`), { code: 'MODULE_NOT_FOUND' });
  };
  const module = { exports: {} as typeof Parts };
  (script.runInThisContext() as (...args: unknown[]) => void)(module.exports, require, module, LAZY_SCRIPT.filename, '.');
  return (parts = module.exports);
}

export const controller: typeof Parts.controller = () => load().controller();
export const accounts: typeof Parts.accounts = () => load().accounts();
export const backup: typeof Parts.backup = () => load().backup();
export const worker: typeof Parts.worker = () => load().worker();
export const images: typeof Parts.images = () => load().images();
export const qemu: typeof Parts.qemu = () => load().qemu();
export const ociCache: typeof Parts.ociCache = () => load().ociCache();
export const snapshots: typeof Parts.snapshots = () => load().snapshots();
export const ociPush: typeof Parts.ociPush = () => load().ociPush();
export const ociReference: typeof Parts.ociReference = () => load().ociReference();
export const privdrop: typeof Parts.privdrop = () => load().privdrop();
export const logFile: typeof Parts.logFile = () => load().logFile();
export const client: typeof Parts.client = () => load().client();
export const pino: typeof Parts.pino = () => load().pino();
export const yaml: typeof Parts.yaml = () => load().yaml();
export const ssh2: typeof Parts.ssh2 = () => load().ssh2();
