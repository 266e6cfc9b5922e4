// Where a pull learns how to reach a registry: the worker's own flags (plain HTTP for some hosts,
// an extra CA for all) and the credentials an admin set on the controller, which the controller
// sends the worker whole (registriesAction) and which are kept in memory only.
import type { RegistryCredentials } from '../../api/worker-protocol.ts';
import type { RegistryLookup, RegistrySettings } from './registry.ts';

export interface RegistryFlags {
  /** registries reached over plain HTTP (HOST[:PORT]) */
  insecure?: string[];
  /** a CA (PEM) trusted for every registry, on top of the host's */
  ca?: string;
}

export class Registries {
  private readonly insecure: Set<string>;
  private readonly ca?: string;
  private fromController = new Map<string, RegistryCredentials>();

  constructor(flags: RegistryFlags = {}) {
    this.insecure = new Set((flags.insecure ?? []).map((h) => h.toLowerCase()));
    this.ca = flags.ca;
  }

  /** The controller's list, replacing the one before. */
  set(list: RegistryCredentials[]) {
    this.fromController = new Map(list.map((r) => [r.host.toLowerCase(), r]));
  }

  /** The settings of `host`: the controller's entry, with the flags added (plain HTTP if either says so, both CAs). */
  readonly lookup: RegistryLookup = (host) => {
    const key = host.toLowerCase();
    const set = this.fromController.get(key);
    const ca = [set?.ca, this.ca].filter(Boolean).join('\n') || undefined;
    const settings: RegistrySettings = { username: set?.username, password: set?.password, insecure: this.insecure.has(key) || set?.insecure || undefined, ca };
    return settings;
  };
}
