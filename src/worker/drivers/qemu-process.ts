// Which process is the QEMU of a VM directory. QEMU runs with the directory as its working directory
// and writes its pid file there (`-pidfile qemu.pid`), so the directory may be renamed under it (a
// standby taken by a VM: standby.ts) and it stays that directory's QEMU.
import { readFileSync, readlinkSync, realpathSync } from 'node:fs';
import { join } from 'node:path';
import { killPastaOf } from './netns.ts';

/** Whether live process `pid` is the QEMU of directory `dir` (not a reused pid, nor a zombie). */
export function qemuIn(pid: number, dir: string): boolean {
  if (!Number.isInteger(pid) || pid <= 1) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    if (state === 'Z' || state === 'X') return false;
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    // (a QEMU started by an earlier version names its pid file by its full path)
    if (cmdline.includes(join(dir, 'qemu.pid'))) return true;
    const at = cmdline.indexOf('-pidfile');
    // (the kernel names the working directory by its real path: `dir` may be reached through a symlink)
    return at > 0 && cmdline[at + 1] === 'qemu.pid' && readlinkSync(`/proc/${pid}/cwd`) === realpathSync.native(dir);
  } catch {
    return false; // gone
  }
}

/** The pid in `dir`'s qemu.pid if that process is the directory's QEMU. */
export function qemuPidIn(dir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(dir, 'qemu.pid'), 'utf8').trim());
    return qemuIn(pid, dir) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Kills the QEMU of `dir`, if one runs, and the pasta of its network namespace (a VM nobody will take). */
export function killQemuIn(dir: string): void {
  const pid = qemuPidIn(dir);
  if (pid === undefined) return;
  killPastaOf(pid); // first, while the pid is still this QEMU's
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone meanwhile
  }
}
