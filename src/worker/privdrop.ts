// `orchard worker run --user NAME` (upstream's flag): started as root, the worker drops to that user
// (its primary group and supplementary groups, e.g. kvm for /dev/kvm) before it does anything else, so
// QEMU or Tart and startup scripts run as that user, with its HOME.
// (Upstream also starts a helper that keeps root to open connections for it, a workaround for macOS's
// "Local Network" permission; there is no such helper here.)
import { execFileSync } from 'node:child_process';
import { userInfo } from 'node:os';

/** The POSIX process calls Node has (not all in its type definitions). */
type PosixProcess = {
  getuid(): number;
  geteuid(): number;
  setuid(id: number | string): void;
  setgid(id: number | string): void;
  initgroups(user: number | string, extraGroup: number | string): void;
};

export function dropPrivileges(user: string): { uid: number; gid: number; home: string } {
  const proc = process as unknown as Partial<PosixProcess>;
  if (!proc.getuid || !proc.geteuid || !proc.setuid || !proc.setgid || !proc.initgroups) throw new Error('--user: this platform cannot change the user of a process');
  const posix = proc as PosixProcess;
  if (posix.getuid() !== 0) throw new Error(`--user ${user}: only a worker started as root can drop its privileges to another user`);
  if (!/^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$/.test(user)) throw new Error(`--user: "${user}" is not a user name`);
  let gid: number;
  try {
    gid = Number(execFileSync('id', ['-g', user], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim());
  } catch {
    throw new Error(`--user: no user named "${user}" on this host`);
  }
  posix.initgroups(user, gid);
  posix.setgid(gid);
  posix.setuid(user);
  // Gone for good: the saved ids follow setuid when it is called as root.
  if (posix.getuid() === 0 || posix.geteuid() === 0) throw new Error(`--user ${user}: still root after dropping privileges`);
  const info = userInfo();
  process.env.HOME = info.homedir;
  process.env.USER = info.username;
  process.env.LOGNAME = info.username;
  return { uid: info.uid, gid: info.gid, home: info.homedir };
}
