// What a driver keeps on disk of each of its VMs, so that a restarted worker finds them again: one
// small JSON record per VM (the controller's uid, the image, what the driver needs to run it), and
// the local names that may name one.
import { open, readFile, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import { privateDir } from '../private-files.ts';

/** A local name: orchard-NAME-UID-N, with NAME in the controller's characters (names are at most 128). */
const LOCAL_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$/;

export const isLocalName = (name: string) => LOCAL_NAME_RE.test(name);

/** `name` when it can be a local name (and so a file name), else an error: never a path of its own. */
export function checkLocalName(name: string): string {
  if (!isLocalName(name)) throw new Error(`invalid VM name ${JSON.stringify(name)}`);
  return name;
}

/** The records of one driver's VMs, each in the file `pathOf(localName)` gives. */
export class VMRecords<T extends { localName: string }> {
  private readonly pathOf: (localName: string) => string;
  private readonly inVMDir: boolean;

  /**
   * `inVMDir`: each record is in its VM's own directory, which only preparing the VM makes. A write
   * then never makes that directory again: a VM removed while something wrote its record (a start
   * still booting) stays removed, and the write fails saying so.
   */
  constructor(pathOf: (localName: string) => string, options: { inVMDir?: boolean } = {}) {
    this.pathOf = (localName) => pathOf(checkLocalName(localName));
    this.inVMDir = options.inVMDir ?? false;
  }

  /** The VM's record, or undefined when it has none (or none that can be read). */
  async read(localName: string): Promise<T | undefined> {
    try {
      return JSON.parse(await readFile(this.pathOf(localName), 'utf8')) as T;
    } catch {
      return undefined;
    }
  }

  /**
   * Writes the record whole: to a private temporary file, flushed, then renamed over the old one, so
   * a crash (of the worker or the host) leaves the old record or the new one, never a torn one.
   */
  async write(record: T): Promise<void> {
    const path = this.pathOf(record.localName);
    if (!this.inVMDir) await privateDir(dirname(path));
    const tmp = `${path}.tmp`;
    // ENOENT in a VM's own directory: the VM was removed meanwhile (its directory with the temporary file).
    const removed = (err: NodeJS.ErrnoException) => {
      throw this.inVMDir && err.code === 'ENOENT' ? new Error(`VM ${record.localName} was removed while its record was being written`) : err;
    };
    const file = await open(tmp, 'w', 0o600).catch(removed);
    try {
      await file.writeFile(JSON.stringify(record, null, 2) + '\n');
      await file.sync();
    } finally {
      await file.close();
    }
    await rename(tmp, path).catch(removed);
  }

  async remove(localName: string): Promise<void> {
    await rm(this.pathOf(localName), { force: true });
  }
}
