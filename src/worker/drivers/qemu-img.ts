// qemu-img, as the qemu driver and its snapshots use it: errors that say what failed, and a disk's size.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export async function qemuImg(args: string[]): Promise<{ stdout: string }> {
  try {
    return await execFileP('qemu-img', args);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT' && !e.stderr) throw new Error('qemu-img not found: apt-get install qemu-utils');
    throw new Error(`qemu-img ${args[0]} failed: ${(e.stderr ?? e.message).trim()}`);
  }
}

/** A disk image's virtual size in bytes (what the guest sees). */
export async function virtualSize(file: string): Promise<number> {
  const { stdout } = await qemuImg(['info', '--output=json', '-U', file]);
  return (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
}
