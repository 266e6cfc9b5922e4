// Waiting for a VM, said out loud: what is waited for, each change of the VM's status while waiting
// (with the controller's reason: "no worker fits: …", "booting", …), and on timeout the flag that
// gives more time. Used by create vm --wait, start|stop vm, ssh, port-forward and vnc.
import type { VM } from '../api/schemas.ts';
import type { OrchardClient } from '../client/client.ts';
import { ApiError } from '../client/errors.ts';

export interface WaitOptions {
  /** What the VM should become, as the messages say it: "running", "stopped". */
  what: string;
  /** Done when this holds (a failed VM ends the wait with an error unless `done` accepts it). */
  done: (vm: VM) => boolean;
  seconds: number;
  /** The flag that sets `seconds`, named in the timeout message. */
  flag?: string;
  /** Fails at once instead of waiting when this returns a reason (e.g. a stopped VM nobody will start). */
  hopeless?: (vm: VM) => string | undefined;
}

const statusLine = (vm: VM) => `${vm.status ?? 'pending'}${vm.status_message ? `: ${vm.status_message}` : ''}`;

/** Polls the VM every 500 ms until `done`; progress lines on stderr. Returns the VM as it was when done. */
export async function waitForVM(client: OrchardClient, name: string, o: WaitOptions): Promise<VM> {
  const deadline = Date.now() + o.seconds * 1000;
  let said: string | undefined;
  for (let first = true; ; first = false) {
    const vm = await client.getVM(name);
    if (o.done(vm)) return vm;
    if (vm.status === 'failed') throw new Error(`VM ${name} failed: ${vm.status_message ?? 'no reason given'}`);
    const hopeless = o.hopeless?.(vm);
    if (hopeless) throw new Error(hopeless);
    const now = statusLine(vm);
    if (first) process.stderr.write(`waiting up to ${o.seconds}s for VM ${name} to be ${o.what} (${now})\n`);
    else if (now !== said) process.stderr.write(`VM ${name}: ${now}\n`);
    said = now;
    if (Date.now() >= deadline) {
      throw new Error(`VM ${name} is not ${o.what} after ${o.seconds}s (${now})${o.flag ? `; wait longer with ${o.flag} SECONDS` : ''}`);
    }
    await new Promise((r) => setTimeout(r, Math.min(500, Math.max(0, deadline - Date.now()))));
  }
}

/** A VM powered off on request does not start by waiting: say how to start it. */
export const stoppedVM = (vm: VM) =>
  vm.powerState && vm.powerState !== 'running' ? `VM ${vm.name} is ${vm.powerState}; start it with: orchard start vm ${vm.name}` : undefined;

/**
 * Waits for the VM to run (ssh): at once if it does, else with progress. An account that may connect
 * but not read VMs (compute:connect alone) cannot watch: then the controller's own wait applies.
 */
export async function waitRunning(client: OrchardClient, name: string, seconds: number, flag = '--wait'): Promise<void> {
  try {
    await waitForVM(client, name, { what: 'running', done: (vm) => vm.status === 'running', seconds, flag, hopeless: stoppedVM });
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 403)) throw err;
  }
}
