// A worker's VM disks and images are readable by its own user only: a guest's disk holds that
// guest's secrets, and the worker may share its host with other users. Modes are set explicitly,
// not through mkdir/open modes alone, so neither the umask nor a directory an earlier version made
// (0755) leaves them open.
import { chmod, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';

/** mkdir -p `dir`, then mode 0700. */
export async function privateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
}

/** Mode 0600 for every regular file directly in `dir` (not below it; sockets and links stay as they are). */
export async function privateFiles(dir: string): Promise<void> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isFile()) await chmod(join(dir, entry.name), 0o600);
  }
}
