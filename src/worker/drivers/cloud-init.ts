// The NoCloud seed every qemu VM gets (a read-only FAT drive labelled `cidata`, see qemu.ts): a stock
// cloud image with cloud-init creates the VM's user with its password (SSH password logins on, sudo
// without a password), takes the VM's name as its hostname and the image's SSH key, if any, as an
// authorized key; the worker can then log in and run the startup script. Guests without cloud-init
// never look at the drive. No network-config: cloud-init's fallback (DHCP on the first NIC, matched
// by its MAC) is what QEMU's user-mode network needs, whatever the guest names the NIC.
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import ssh2 from 'ssh2';
import { privateDir } from '../private-files.ts';

export interface SeedInput {
  /** The VM's name (controller side): the guest's hostname when it is a valid one. */
  name: string;
  /** Changes when the VM is created again, so cloud-init treats a new VM as a new instance. */
  instanceId: string;
  username: string;
  password: string;
  /** An OpenSSH public key line (`ssh-ed25519 AAAA…`) to authorize for the user. */
  authorizedKey?: string;
}

/** The seed's directory inside a VM's directory (QEMU shows it to the guest as a FAT drive). */
export const SEED_DIR = 'cidata';
export const SEED_LABEL = 'cidata';

/**
 * `value` as YAML that any YAML parser, PyYAML (YAML 1.1, what cloud-init reads) included, takes
 * literally: JSON (flow style: every string double-quoted, so no `yes`, `on`, `1:20` or `0755` turns
 * into a boolean or number, no `#`, `:` or quote starts anything), and in ASCII, with every other
 * character escaped (`\uXXXX`, `\UXXXXXXXX`), since YAML reads raw line separators (U+0085, U+2028)
 * as line breaks and refuses raw control characters.
 */
export function yamlOf(value: unknown): string {
  return JSON.stringify(value, null, 2).replace(/[^\x20-\x7e\n]/gu, (c) => {
    const cp = c.codePointAt(0)!;
    return cp > 0xffff ? '\\U' + cp.toString(16).padStart(8, '0') : '\\u' + cp.toString(16).padStart(4, '0');
  }) + '\n';
}

/**
 * The guest's hostname for a VM name: the name itself when it is a DNS name Linux takes (letters,
 * digits and '-' in dot-separated labels of at most 63, 64 in all); else the name with every other
 * character made '-', cut to fit.
 */
export function hostnameOf(name: string): string {
  const label = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;
  const labels = name.split('.');
  if (name.length <= 64 && labels.every((l) => label.test(l))) return name;
  const cleaned = name.replace(/[^A-Za-z0-9-]+/g, '-').replace(/^-+/, '').slice(0, 63).replace(/-+$/, '');
  return cleaned || 'orchard-vm';
}

export function seedFiles(s: SeedInput): { 'meta-data': string; 'user-data': string } {
  const hostname = hostnameOf(s.name);
  const user: Record<string, unknown> = {
    name: s.username,
    plain_text_passwd: s.password,
    lock_passwd: false,
    sudo: 'ALL=(ALL) NOPASSWD:ALL',
  };
  if (s.authorizedKey) user.ssh_authorized_keys = [s.authorizedKey];
  return {
    'meta-data': yamlOf({ 'instance-id': s.instanceId, 'local-hostname': hostname }),
    'user-data': '#cloud-config\n' + yamlOf({
      hostname,
      fqdn: hostname,
      // a name with dots stays whole (Debian's cloud-init would set the first label only)
      prefer_fqdn_over_hostname: true,
      manage_etc_hosts: true,
      ssh_pwauth: true,
      // only this user: no image default user (debian, ubuntu, …) with a password nobody knows
      users: [user],
    }),
  };
}

/** The public key (OpenSSH line) of the private key file `file`, if it is one ssh2 can read. */
export async function publicKeyOf(file: string): Promise<string | undefined> {
  let text: Buffer;
  try {
    text = await readFile(file);
  } catch {
    return undefined;
  }
  const key = ssh2.utils.parseKey(text);
  if (key instanceof Error) return undefined;
  const k = Array.isArray(key) ? key[0] : key;
  return k ? `${k.type} ${k.getPublicSSH().toString('base64')}` : undefined;
}

/** Writes the seed into `<vmDir>/cidata/` (0700, files 0600), replacing an earlier one; returns that directory. */
export async function writeSeed(vmDir: string, s: SeedInput): Promise<string> {
  const dir = join(vmDir, SEED_DIR);
  await rm(dir, { recursive: true, force: true });
  await privateDir(dir);
  for (const [file, text] of Object.entries(seedFiles(s))) await writeFile(join(dir, file), text, { mode: 0o600 });
  return dir;
}
