// orchard start|stop|suspend vm NAME: set a VM's powerState and wait until its worker has carried it
// out. (Upstream has no such commands; its users PUT the VM with a new powerState, which works too.)
import type { Command } from 'commander';
import type { VM } from '../../api/schemas.ts';
import { parseInteger, withClient, withCommon, type CommonOptions } from '../common.ts';
import { waitForVM } from '../wait.ts';

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

/** The status with, for a VM that does not run, the short form of why (`pending (no worker fits)`): for `list vms`. */
export function statusWithReason(vm: VM): string {
  const status = statusOf(vm);
  if ((status !== 'pending' && status !== 'failed') || !vm.status_message) return status;
  const short = vm.status_message.split(/[:;\n]/)[0].trim();
  const reason = short.length > 40 ? short.slice(0, 39) + '…' : short;
  return reason && reason !== status ? `${status} (${reason})` : status;
}

const VERBS: { verb: string; to: PowerState; description: string }[] = [
  { verb: 'start', to: 'running', description: 'start a stopped or suspended VM (powerState running)' },
  { verb: 'stop', to: 'stopped', description: 'power a VM off, keeping its disk (powerState stopped)' },
  { verb: 'suspend', to: 'suspended', description: 'suspend a VM created with --suspendable: its memory and disk are kept, start resumes it (powerState suspended)' },
];

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
        if (opts.wait > 0) {
          // Carried out: the worker has seen this generation, and the VM runs (start) or no longer does.
          const carriedOut = (v: VM) => (v.observedGeneration ?? -1) >= generation && (to === 'running' ? v.status === 'running' : v.status !== 'running' && v.status !== 'failed');
          await waitForVM(c, name, { what: to, done: carriedOut, seconds: opts.wait, flag: '--wait' });
        }
        process.stderr.write(`VM ${name} ${to === 'running' ? 'running' : to}\n`);
      });
    });
  }
}
