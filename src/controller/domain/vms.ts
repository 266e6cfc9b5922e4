// What of a VM each account may read: its password only to accounts that may connect to it
// (compute:write or compute:connect), its startup script's environment values only to compute:write
// (they may hold credentials). Workers act with compute:write and get everything.
import type { ServiceAccount, VM } from '../../api/schemas.ts';

export type VMSecrets = 'all' | 'password' | 'none';

export const REDACTED = '<redacted>';

export function secretsFor(account: ServiceAccount | undefined): VMSecrets {
  if (account?.roles.includes('compute:write')) return 'all';
  if (account?.roles.includes('compute:connect')) return 'password';
  return 'none';
}

/** The VM as `secrets` allows it to be read (the same object when nothing is hidden). */
export function redactVM(vm: VM, secrets: VMSecrets): VM {
  if (secrets === 'all') return vm;
  const env = vm.startup_script?.env;
  const hidePassword = secrets === 'none' && vm.password !== undefined;
  if (!hidePassword && !(env && Object.keys(env).length)) return vm;
  const out: VM = { ...vm };
  if (hidePassword) delete out.password;
  if (env && vm.startup_script) out.startup_script = { ...vm.startup_script, env: Object.fromEntries(Object.keys(env).map((k) => [k, REDACTED])) };
  return out;
}
