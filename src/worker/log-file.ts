// The worker's log in a file (upstream's `worker run --log-file`): appended to, and rotated when it
// reaches 100 MB (the full file becomes FILE.1, replacing an older FILE.1), so it never grows without bound.
import { closeSync, existsSync, mkdirSync, openSync, renameSync, statSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';

export const LOG_FILE_MAX_BYTES = 100 * 1024 * 1024;

/** A pino destination (anything with `write(line)`) that appends to `path`. Writes are synchronous: nothing is lost on exit. */
export class RotatingLogFile {
  private fd: number;
  private size: number;
  readonly path: string;
  private readonly maxBytes: number;

  constructor(path: string, maxBytes = LOG_FILE_MAX_BYTES) {
    this.path = path;
    this.maxBytes = maxBytes;
    mkdirSync(dirname(path), { recursive: true });
    this.fd = openSync(path, 'a', 0o640);
    this.size = existsSync(path) ? statSync(path).size : 0;
  }

  write(line: string): void {
    const bytes = Buffer.byteLength(line);
    if (this.size > 0 && this.size + bytes > this.maxBytes) this.rotate();
    writeSync(this.fd, line);
    this.size += bytes;
  }

  private rotate() {
    closeSync(this.fd);
    renameSync(this.path, this.path + '.1');
    this.fd = openSync(this.path, 'a', 0o640);
    this.size = 0;
  }

  close() {
    closeSync(this.fd);
  }
}
