// One GET for a blob over its own connection (`Connection: close`), its body read straight into a
// few reused 1 MiB buffers. node:http hands a download its bytes as a fresh 64 KiB Buffer per socket
// read, through a parser callback and a stream each; for a large blob that costs about four times the
// CPU of the reads themselves (BENCHMARKS.md, image pulls; undici measured no better). Only what a
// blob needs is spoken: a status line, headers, and a body framed by Content-Length or by the end of
// the connection; an error answer sent chunked is read whole (it is small); a blob sent chunked says
// so, and the caller asks again through node:http. Anything else odd in the framing is an error.
import net from 'node:net';
import tls from 'node:tls';

/** The size of each body buffer: the unit of hashing and writing downstream. */
export const BODY_BUFFER = 1024 * 1024;
/** Buffers per response besides the one filling and a spare: in the consumer's hands (hashing, writes in flight). */
const BUFFERS = 3;
/** Status lines and headers, 1xx answers included, at most: bytes, and header fields. */
const MAX_HEAD = 64 * 1024;
const MAX_FIELDS = 256;
/** A chunked error answer's body, at most (what registry.ts reads of one). */
const MAX_CHUNKED = 64 * 1024;

export interface BlobRequest {
  url: URL;
  headers: Record<string, string>;
  /** CAs to trust for https (the host's plus the registry's) */
  ca?: string[];
  signal?: AbortSignal;
  idleTimeoutMs: number;
}

/** A body's bytes in one of the response's buffers; `release` gives the buffer back for more. */
export interface BodyChunk {
  data: Buffer;
  release(): void;
}

/** A response whose body this module cannot frame (chunked): ask again another way. */
export class UnsupportedFraming extends Error {}

type Waiter = { resolve: (c: IteratorResult<BodyChunk>) => void; reject: (e: Error) => void };

export class BlobResponse {
  statusCode = 0;
  statusMessage = '';
  readonly headers: Record<string, string> = {};
  private readonly socket: net.Socket;
  private readonly free: Buffer[] = [];
  /** the buffer being read into, from `fill` on */
  private cur: Buffer;
  private fill = 0;
  /** where the read after a pause lands (Node takes the next read's buffer before the pause) */
  private spare: Buffer;
  private paused = false;
  private inHead = true;
  /** head bytes parsed so far (1xx answers count) */
  private headBytes = 0;
  /** an error answer sent chunked: its body is gathered in `cur` and decoded once whole */
  private chunked = false;
  private readonly headTimer: NodeJS.Timeout;
  /** body bytes still to come (Infinity: until the connection ends) */
  private left = Infinity;
  private readonly ready: BodyChunk[] = [];
  private waiter: Waiter | undefined;
  private ended = false;
  private error: Error | undefined;
  private headWaiter: { resolve: () => void; reject: (e: Error) => void } | undefined;

  private constructor(r: BlobRequest, headWaiter: { resolve: () => void; reject: (e: Error) => void }) {
    this.headWaiter = headWaiter;
    const lines = [`GET ${r.url.pathname}${r.url.search} HTTP/1.1`, `Host: ${r.url.host}`, 'Connection: close', 'Accept-Encoding: identity'];
    for (const [k, v] of Object.entries(r.headers)) {
      if (/[\r\n:]/.test(k) || /[\r\n]/.test(v)) throw new Error(`header ${k} holds a line break`);
      lines.push(`${k}: ${v}`);
    }
    const request = `${lines.join('\r\n')}\r\n\r\n`;
    // Shared memory: a hashing thread reads the chunks where they are (hasher.ts).
    const memory = new SharedArrayBuffer((BUFFERS + 2) * BODY_BUFFER);
    const buffers = Array.from({ length: BUFFERS + 2 }, (_, i) => Buffer.from(memory, i * BODY_BUFFER, BODY_BUFFER));
    this.cur = buffers.pop()!;
    this.spare = buffers.pop()!;
    this.free.push(...buffers);
    // Any read resets the socket's idle timeout: a head trickled a byte at a time must still end in time.
    this.headTimer = setTimeout(() => this.fail(new Error(`the registry did not answer within ${r.idleTimeoutMs / 1000} s`)), r.idleTimeoutMs).unref();
    const port = Number(r.url.port) || (r.url.protocol === 'https:' ? 443 : 80);
    const host = r.url.hostname.replace(/^\[|\]$/g, '');
    const onread = { buffer: () => (this.paused ? this.spare : this.cur.subarray(this.fill)), callback: (n: number) => this.onRead(n) };
    // tls.connect reads into `onread` as net.connect does (Node's documentation; its types lack it).
    this.socket = r.url.protocol === 'https:'
      ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ca: r.ca, ALPNProtocols: ['http/1.1'], onread } as tls.ConnectionOptions)
      : net.connect({ host, port, onread });
    this.socket.setTimeout(r.idleTimeoutMs, () => this.fail(new Error(`the registry sent nothing for ${r.idleTimeoutMs / 1000} s`)));
    this.socket.on('error', (err) => this.fail(err));
    this.socket.on('end', () => this.onEnd());
    this.socket.on('close', () => this.onEnd());
    const abort = () => this.fail(Object.assign(new Error('the download was aborted'), { name: 'AbortError' }));
    if (r.signal?.aborted) abort();
    r.signal?.addEventListener('abort', abort, { once: true });
    this.socket.once('close', () => r.signal?.removeEventListener('abort', abort));
    this.socket.write(request);
  }

  /** Sends the request; resolves once the status line and headers are in. */
  static async get(r: BlobRequest): Promise<BlobResponse> {
    let res!: BlobResponse;
    await new Promise<void>((resolve, reject) => {
      res = new BlobResponse(r, { resolve, reject });
    });
    return res;
  }

  private onRead(n: number): boolean {
    this.fill += n;
    if (this.inHead && !this.parseHead()) return true;
    if (this.inHead) return true;
    if (this.chunked) return this.gatherChunked();
    return this.afterBody();
  }

  /** Whether a whole head (status line and headers; 1xx heads skipped) has been parsed from `cur`. */
  private parseHead(): boolean {
    for (;;) {
      const buf = this.cur;
      const end = buf.subarray(0, this.fill).indexOf('\r\n\r\n');
      if (end < 0 || this.headBytes + end > MAX_HEAD) {
        if (this.headBytes + Math.max(end, this.fill) > MAX_HEAD) this.fail(new Error(`the answer's headers are longer than ${MAX_HEAD} bytes`));
        return false;
      }
      this.headBytes += end + 4;
      const [status, ...fields] = buf.toString('latin1', 0, end).split('\r\n');
      buf.copyWithin(0, end + 4, this.fill);
      this.fill -= end + 4;
      const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(status);
      if (!m) {
        this.fail(new Error(`the answer does not start with an HTTP/1 status line (${JSON.stringify(status.slice(0, 60))})`));
        return false;
      }
      const code = Number(m[1]);
      if (code === 101) {
        this.fail(new Error('the answer switches protocols, which was not asked for'));
        return false;
      }
      if (code >= 100 && code < 200) continue;
      if (fields.length > MAX_FIELDS) {
        this.fail(new Error(`the answer has more than ${MAX_FIELDS} header fields`));
        return false;
      }
      this.statusCode = code;
      this.statusMessage = m[2] ?? '';
      for (const f of fields) {
        const colon = f.indexOf(':');
        if (colon <= 0) continue;
        const k = f.slice(0, colon).trim().toLowerCase();
        const v = f.slice(colon + 1).trim();
        this.headers[k] = this.headers[k] !== undefined ? `${this.headers[k]}, ${v}` : v;
      }
      this.inHead = false;
      const te = this.headers['transfer-encoding'];
      const length = this.headers['content-length'];
      if (te !== undefined && length !== undefined) {
        // Two framings: which one the sender meant is a guess, and a guess is how answers get smuggled.
        this.fail(new Error('the answer gives both a Transfer-Encoding and a Content-Length'));
        return false;
      }
      if (te !== undefined && te.toLowerCase() !== 'identity') {
        if (te.toLowerCase() !== 'chunked' || (code >= 200 && code < 300)) {
          this.fail(new UnsupportedFraming(`the answer is sent with Transfer-Encoding ${te}`));
          return false;
        }
        this.chunked = true;
      }
      if (code === 204 || code === 304) this.left = 0;
      else if (length !== undefined) {
        // One decimal number (a repeated field arrives joined with a comma, and is refused).
        if (!/^\d{1,15}$/.test(length)) {
          this.fail(new Error(`the answer's Content-Length is not one number below 10^15 (${length.slice(0, 60)})`));
          return false;
        }
        this.left = Number(length);
      }
      clearTimeout(this.headTimer);
      const head = this.headWaiter;
      this.headWaiter = undefined;
      head?.resolve();
      return true;
    }
  }

  /** An error answer's chunked body: gathered whole (at most MAX_CHUNKED bytes), then decoded and handed out. */
  private gatherChunked(): boolean {
    if (this.fill > MAX_CHUNKED) return this.failChunked(`more than ${MAX_CHUNKED} bytes`);
    const raw = this.cur.subarray(0, this.fill);
    const body: Buffer[] = [];
    let at = 0;
    for (;;) {
      const eol = raw.indexOf('\r\n', at);
      if (eol < 0) break;
      const size = /^([0-9a-fA-F]{1,8})(?:;.*)?$/.exec(raw.toString('latin1', at, eol));
      if (!size) return this.failChunked('a chunk size that is not a hexadecimal number');
      const n = parseInt(size[1], 16);
      if (n === 0) {
        // Trailers, if any, end with an empty line; none are used.
        if (raw.indexOf('\r\n\r\n', eol) < 0) break;
        const data = Buffer.concat(body);
        data.copy(this.cur);
        this.fill = data.length;
        this.left = data.length;
        this.chunked = false;
        return this.afterBody();
      }
      if (eol + 2 + n + 2 > raw.length) break;
      if (raw[eol + 2 + n] !== 0x0d || raw[eol + 3 + n] !== 0x0a) return this.failChunked('a chunk longer than its size');
      body.push(raw.subarray(eol + 2, eol + 2 + n));
      at = eol + 2 + n + 2;
    }
    return true;
  }

  private failChunked(what: string): boolean {
    this.fail(new Error(`the chunked ${this.statusCode} answer has ${what}`));
    return false;
  }

  /** Hands out full buffers (and the last one); pauses the socket when no buffer is free to read into. */
  private afterBody(): boolean {
    if (this.fill > this.left) this.fill = this.left; // bytes past the body: not ours (Connection: close)
    if (this.fill === this.left) {
      if (this.fill > 0) this.handOut();
      this.finish();
      return false;
    }
    if (this.fill === this.cur.length) {
      const next = this.free.pop();
      if (!next) {
        // Node asks for the next read's buffer now: the spare, which becomes `cur` when a buffer comes back.
        this.paused = true;
        return false;
      }
      this.handOut();
      this.cur = next;
    }
    return true;
  }

  private handOut(): void {
    const buf = this.cur;
    this.push({ data: buf.subarray(0, this.fill), release: this.releaser(buf) });
    this.left -= this.fill;
    this.fill = 0;
  }

  private releaser(buf: Buffer): () => void {
    let once = false;
    return () => {
      if (once) return;
      once = true;
      if (this.paused && !this.ended && !this.error) {
        this.paused = false;
        this.handOut();
        this.cur = this.spare;
        this.spare = buf;
        this.socket.resume();
      } else this.free.push(buf);
    };
  }

  private push(c: BodyChunk): void {
    const w = this.waiter;
    this.waiter = undefined;
    if (w) w.resolve({ value: c, done: false });
    else this.ready.push(c);
  }

  private finish(): void {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.headTimer);
    this.socket.destroy();
    const w = this.waiter;
    this.waiter = undefined;
    w?.resolve({ value: undefined, done: true });
  }

  private onEnd(): void {
    if (this.ended || this.error) return;
    if (this.headWaiter) return this.fail(new Error('the connection closed before an answer came'));
    if (this.chunked) return this.fail(new Error(`the connection closed before the end of the chunked ${this.statusCode} answer`));
    if (this.left !== Infinity) return this.fail(new Error(`the connection closed ${this.left - this.fill} bytes before the end of the answer`));
    if (this.fill > 0) this.handOut();
    this.finish();
  }

  private fail(err: Error): void {
    if (this.ended || this.error) return;
    this.error = err;
    clearTimeout(this.headTimer);
    this.socket.destroy();
    const head = this.headWaiter;
    this.headWaiter = undefined;
    head?.reject(err);
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }

  /** The body in the response's buffers: each chunk must be released for the reading to go on. */
  chunks(): AsyncIterableIterator<BodyChunk> {
    const it: AsyncIterableIterator<BodyChunk> = {
      next: () => {
        const c = this.ready.shift();
        if (c) return Promise.resolve({ value: c, done: false });
        if (this.error) return Promise.reject(this.error);
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
      },
      return: () => {
        this.destroy();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]: () => it,
    };
    return it;
  }

  /** The body as copies (for small answers: errors, tokens). */
  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for await (const c of this.chunks()) {
      const copy = Buffer.from(c.data);
      c.release();
      yield copy;
    }
  }

  /** Done with it: the connection goes. */
  destroy(): void {
    if (!this.ended && !this.error) this.fail(Object.assign(new Error('the response was dropped'), { name: 'AbortError' }));
  }

  resume(): void {
    this.destroy();
  }
}
