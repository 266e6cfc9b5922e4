// What a VM takes from its worker, shared by the scheduler (through the view) and the web console's
// workers page (without the schemas: the browser bundle has no TypeBox).
import type { VM } from './schemas.ts';

/** The VM slot resource every VM takes one of (upstream's name, from Tart). */
export const RESOURCE_TART_VMS = 'org.cirruslabs.tart-vms';

/** What a VM takes from its worker: one VM slot, plus the resources it asks for. */
export function requirements(vm: Pick<VM, 'resources'>): Record<string, number> {
  return { [RESOURCE_TART_VMS]: 1, ...(vm.resources ?? {}) };
}
