// orchard start|stop|suspend vm NAME: set a VM's powerState and wait until its worker has carried it
// out. (Upstream has no such commands; its users PUT the VM with a new powerState, which works too.)
import type { Command } from 'commander';
import type { VM } from '../../api/schemas.ts';
import type { OrchardClient } from '../../client/client.ts';
import { parseInteger, withClient, withCommon, type CommonOptions } from '../common.ts';

type PowerState = NonNullable<VM['powerState']>;

/**
 * A VM's status as a person reads it: the API keeps upstream's three (pending, running, failed), and a
 * VM powered off on request is `pending` there; here it is `stopped` (or `suspended`) once its worker
 * has stopped it, `stopping` (`suspending`) until then.
 */
export function statusOf(vm: VM): string {
  const power = vm.powerState ?? 'running';
  if (power === 'running' || vm.status === 'failed') return vm.status ?? 'pending';
  const carriedOut = (vm.observedGeneration ?? -1) >= (vm.generation ?? 0) && vm.status !== 'running';
  if (carriedOut) return power;
  return power === 'stopped' ? 'stopping' : 'suspending';
}

const VERBS: { verb: string; to: PowerState; description: string }[] = [
  { verb: 'start', to: 'running', description: 'start a stopped or suspended VM (powerState running)' },
  { verb: 'stop', to: 'stopped', description: 'power a VM off, keeping its disk (powerState stopped)' },
  { verb: 'suspend', to: 'suspended', description: 'suspend a VM created with --suspendable (powerState suspended; the qemu runtime stops it)' },
];

/** Waits until the worker has carried out `generation` (and a started VM runs); says what it waits for on stderr. */
async function waitCarriedOut(c: OrchardClient, name: string, to: PowerState, generation: number, seconds: number): Promise<VM> {
  const deadline = Date.now() + seconds * 1000;
  let said = '';
  for (;;) {
    const vm = await c.getVM(name);
    if (vm.status === 'failed') throw new Error(`VM ${name} failed: ${vm.status_message ?? 'no reason given'}`);
    const seen = (vm.observedGeneration ?? -1) >= generation;
    if (seen && (to === 'running' ? vm.status === 'running' : vm.status !== 'running')) return vm;
    const now = !vm.worker ? `waiting for a worker: ${vm.status_message ?? 'not placed yet'}` : !seen ? `waiting for worker ${vm.worker} to act` : `${statusOf(vm)}: ${vm.status_message ?? ''}`;
    if (now !== said) process.stderr.write(`${name}: ${(said = now)}\n`);
    if (Date.now() > deadline) throw new Error(`VM ${name} is not ${to} after ${seconds}s (${statusOf(vm)}: ${vm.status_message ?? 'no message'}); wait longer with --wait SECONDS`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

export function registerPowerCommands(program: Command) {
  for (const { verb, to, description } of VERBS) {
    const cmd = program
      .command(verb)
      .description(`${verb} a VM`)
      .command('vm')
      .description(description)
      .argument('<name>')
      .option('--wait <seconds>', 'how long to wait for the worker to carry it out (0: do not wait)', parseInteger('--wait'), 120);
    withCommon(cmd, false).action(async (name: string, opts: CommonOptions & { wait: number }) => {
      await withClient(opts, async (c) => {
        const vm = await c.getVM(name);
        let generation = vm.generation ?? 0;
        if ((vm.powerState ?? 'running') === to) process.stderr.write(`VM ${name} is already set to ${to}\n`);
        else generation = (await c.updateVM({ ...vm, powerState: to })).generation ?? generation + 1;
        if (opts.wait > 0) await waitCarriedOut(c, name, to, generation, opts.wait);
        process.stderr.write(`VM ${name} ${to === 'running' ? 'running' : to}\n`);
      });
    });
  }
}
