// Just enough of the tar format for image layers: a streaming reader (ustar, pax and GNU long names;
// every header's checksum checked) and the ustar header of one file or directory, for writing.

export interface TarEntry {
  /** without a leading `./` or `/` */
  path: string;
  /** '0' file, '1' hard link, '2' symlink, '5' directory, others as found */
  type: string;
  size: number;
}

/** Where an entry's bytes go; `readTar` awaits each write (so memory stays bounded). */
export interface TarSink {
  write(chunk: Buffer): Promise<void>;
  end(): Promise<void>;
}

export class TarError extends Error {}

const BLOCK = 512;
const MAX_META = 1024 * 1024;

function text(b: Buffer, start: number, len: number): string {
  const field = b.subarray(start, start + len);
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? len : nul).toString('utf8');
}

function number(b: Buffer, start: number, len: number): number {
  const field = b.subarray(start, start + len);
  if (field[0] & 0x80) {
    // base-256 (GNU): big-endian, the top bit of the first byte marks it
    let n = field[0] & 0x7f;
    for (let i = 1; i < len; i++) n = n * 256 + field[i];
    return n;
  }
  const s = text(b, start, len).trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new TarError(`a header field is not an octal number (${JSON.stringify(s)})`);
  return parseInt(s, 8);
}

function checksumOk(h: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i];
  return sum === number(h, 148, 8);
}

/** pax extended header records: `LEN key=value\n` */
function paxRecords(b: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let off = 0;
  while (off < b.length) {
    const space = b.indexOf(0x20, off);
    if (space < 0) break;
    const len = Number(b.subarray(off, space).toString('ascii'));
    if (!Number.isInteger(len) || len <= 0 || off + len > b.length) throw new TarError('a pax header is malformed');
    const record = b.subarray(space + 1, off + len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq > 0) out[record.slice(0, eq)] = record.slice(eq + 1);
    off += len;
  }
  return out;
}

function cleanPath(p: string): string {
  return p.replace(/^(\.?\/)+/, '').replace(/\/+$/, '');
}

/**
 * Reads a tar stream; for each entry `onEntry` returns a sink for its bytes, or undefined to skip
 * them. Ends at the end-of-archive blocks; a stream that ends inside an entry is a TarError.
 */
export async function readTar(src: AsyncIterable<Buffer>, onEntry: (e: TarEntry) => Promise<TarSink | undefined>): Promise<void> {
  let carry: Buffer | undefined;
  /** bytes of the current entry still to come, then its padding */
  let remaining = 0;
  let padding = 0;
  let sink: TarSink | undefined;
  let meta: Buffer[] | undefined;
  let metaType = '';
  let pax: Record<string, string> = {};
  let longName: string | undefined;
  let ended = false;

  const finishEntry = async () => {
    if (sink) await sink.end();
    sink = undefined;
    if (meta) {
      const body = Buffer.concat(meta);
      meta = undefined;
      if (metaType === 'x') pax = { ...pax, ...paxRecords(body) };
      else if (metaType === 'L') longName = text(body, 0, body.length);
    }
  };

  for await (const chunk of src) {
    if (ended) continue;
    const data = carry ? Buffer.concat([carry, chunk]) : chunk;
    carry = undefined;
    let off = 0;
    while (off < data.length && !ended) {
      if (remaining > 0) {
        const n = Math.min(remaining, data.length - off);
        const part = data.subarray(off, off + n);
        if (sink) await sink.write(part);
        else if (meta) meta.push(Buffer.from(part));
        remaining -= n;
        off += n;
        if (remaining === 0) await finishEntry();
        continue;
      }
      if (padding > 0) {
        const n = Math.min(padding, data.length - off);
        padding -= n;
        off += n;
        continue;
      }
      if (data.length - off < BLOCK) {
        carry = Buffer.from(data.subarray(off));
        break;
      }
      const h = data.subarray(off, off + BLOCK);
      off += BLOCK;
      if (h.every((b) => b === 0)) {
        ended = true;
        break;
      }
      if (!checksumOk(h)) throw new TarError('a header checksum is wrong (not a tar archive, or a damaged one)');
      const type = String.fromCharCode(h[156] || 0x30);
      let size = number(h, 124, 12);
      const ustar = text(h, 257, 6).startsWith('ustar');
      let path = text(h, 0, 100);
      if (ustar && h[345] !== 0) path = `${text(h, 345, 155)}/${path}`;
      if (type === 'x' || type === 'g' || type === 'L' || type === 'K') {
        if (size > MAX_META) throw new TarError(`a ${type} header of ${size} bytes is too large`);
        metaType = type === 'x' || type === 'L' ? type : '';
        meta = [];
      } else {
        if (pax.path !== undefined) path = pax.path;
        if (longName !== undefined) path = longName;
        if (pax.size !== undefined) size = Number(pax.size);
        if (!Number.isSafeInteger(size) || size < 0) throw new TarError('an entry size is not a number');
        pax = {};
        longName = undefined;
        // Links and directories carry no bytes, whatever their size field says.
        if (type === '1' || type === '2' || type === '5') size = 0;
        sink = await onEntry({ path: cleanPath(path), type, size });
      }
      remaining = size;
      padding = (BLOCK - (size % BLOCK)) % BLOCK;
      if (size === 0) await finishEntry();
    }
  }
  if (!ended && (remaining > 0 || carry || sink || meta)) throw new TarError('the archive ends in the middle of an entry');
}

/** A ustar header for a file ('0') or directory ('5'); names up to 100 bytes. */
export function tarHeader(path: string, type: '0' | '5', size: number, mtime: number): Buffer {
  const h = Buffer.alloc(BLOCK);
  if (Buffer.byteLength(path) > 100) throw new Error(`tar path too long: ${path}`);
  const oct = (n: number, len: number) => n.toString(8).padStart(len - 1, '0') + '\0';
  h.write(path, 0, 100, 'utf8');
  h.write(oct(type === '5' ? 0o755 : 0o644, 8), 100, 'ascii');
  h.write(oct(0, 8), 108, 'ascii');
  h.write(oct(0, 8), 116, 'ascii');
  if (size >= 8 ** 11) {
    // base-256 for sizes of 8 GiB and more
    h[124] = 0x80;
    let n = size;
    for (let i = 135; i > 124; i--) {
      h[i] = n % 256;
      n = Math.floor(n / 256);
    }
  } else h.write(oct(size, 12), 124, 'ascii');
  h.write(oct(Math.floor(mtime), 12), 136, 'ascii');
  h.write('        ', 148, 'ascii');
  h.write(type, 156, 'ascii');
  h.write('ustar\0', 257, 'ascii');
  h.write('00', 263, 'ascii');
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += h[i];
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'ascii');
  return h;
}

/** Zero bytes after `size` bytes of content, to the next block. */
export function tarPadding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** The end-of-archive marker: two zero blocks. */
export const TAR_END = Buffer.alloc(2 * BLOCK);
