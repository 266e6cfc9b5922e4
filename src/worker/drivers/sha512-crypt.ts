// SHA-512 crypt (`$6$`, Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512", the default of
// glibc's crypt(3) and of `mkpasswd -m sha512`). A warm-started guest's password hash is made here on
// the worker: under TCG the guest's own mkpasswd (a process, then 5000 rounds of SHA-512) costs it
// tens of milliseconds before the VM can be reported running.
import { createHash, randomBytes } from 'node:crypto';

const ALPHABET = './0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';

const sha512 = (...parts: Buffer[]) => {
  const h = createHash('sha512');
  for (const p of parts) h.update(p);
  return h.digest();
};

/** `src` repeated up to `n` bytes. */
const repeatTo = (src: Buffer, n: number) => {
  const out = Buffer.alloc(n);
  for (let i = 0; i < n; i += src.length) src.copy(out, i, 0, Math.min(src.length, n - i));
  return out;
};

// The order in which the final digest's bytes are encoded, three at a time (the spec's b64_from_24bit calls).
const ORDER = [
  [0, 21, 42], [22, 43, 1], [44, 2, 23], [3, 24, 45], [25, 46, 4], [47, 5, 26], [6, 27, 48],
  [28, 49, 7], [50, 8, 29], [9, 30, 51], [31, 52, 10], [53, 11, 32], [12, 33, 54], [34, 55, 13],
  [56, 14, 35], [15, 36, 57], [37, 58, 16], [59, 17, 38], [18, 39, 60], [40, 61, 19], [62, 20, 41],
];

/** A random salt of 16 characters from crypt's alphabet. */
export const newSalt = () => [...randomBytes(16)].map((b) => ALPHABET[b & 63]).join('');

/** `$6$SALT$HASH` for `password` (default rounds: 5000, so no `rounds=` field). */
export function sha512Crypt(password: string, salt = newSalt()): string {
  const p = Buffer.from(password);
  const s = Buffer.from(salt.slice(0, 16));
  const b = sha512(p, s, p);
  const a = createHash('sha512').update(p).update(s).update(repeatTo(b, p.length));
  for (let n = p.length; n > 0; n >>= 1) a.update(n & 1 ? b : p);
  let c = a.digest();
  const pRep = repeatTo(sha512(...Array<Buffer>(p.length).fill(p)), p.length);
  const sRep = repeatTo(sha512(...Array<Buffer>(16 + c[0]).fill(s)), s.length);
  for (let i = 0; i < 5000; i++) {
    const h = createHash('sha512');
    h.update(i & 1 ? pRep : c);
    if (i % 3) h.update(sRep);
    if (i % 7) h.update(pRep);
    h.update(i & 1 ? c : pRep);
    c = h.digest();
  }
  let out = '';
  const emit = (w: number, chars: number) => {
    for (let k = 0; k < chars; k++, w >>= 6) out += ALPHABET[w & 63];
  };
  for (const [x, y, z] of ORDER) emit((c[x] << 16) | (c[y] << 8) | c[z], 4);
  emit(c[63], 2);
  return `$6$${s.toString()}$${out}`;
}
