// The controller's TLS identity: a self-signed certificate made on first start and kept in the data
// dir (key mode 0600), or the operator's own certificate and key.
import { hkdfSync, webcrypto, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync, chmodSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

export interface TLSMaterial {
  cert: string;
  key: string;
  /** SHA-256 fingerprint, colon-separated upper-case hex (as `openssl x509 -fingerprint -sha256`). */
  fingerprint: string;
}

export function fingerprintOf(certPEM: string): string {
  return new X509Certificate(certPEM).fingerprint256;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/.{64}/g, '$&\n');
  return `-----BEGIN ${label}-----\n${b64}${b64.endsWith('\n') ? '' : '\n'}-----END ${label}-----\n`;
}

/**
 * TLS server options that let sessions resume across the controller's restarts, so the workers
 * reconnecting after one resume theirs (no certificate, no signature) instead of making a thousand
 * full handshakes:
 * - the keys that encrypt session tickets are derived from the controller's private key (Node makes
 *   random ones per process). Only the key's holder can read a ticket; TLS 1.3 resumption still
 *   makes a fresh (EC)DHE exchange, so a ticket key gives no past traffic away;
 * - hence TLS 1.3 only: a TLS 1.2 ticket carries the session's master secret, so whoever got the
 *   key one day could read every recorded 1.2 session that was given a ticket. Every client the
 *   controller has (ours, upstream's Go CLI and workers, browsers, curl) speaks 1.3;
 * - the session id context is fixed (Node's default is a hash of the command line, which may differ
 *   from one start to the next, and a ticket from another context is refused);
 * - tickets last TLS 1.3's longest, 7 days (RFC 8446, 4.6.1): a worker's watch stays open for days,
 *   and its session must still resume when the controller restarts.
 */
export function sessionResumption(keyPEM: string): { minVersion: 'TLSv1.3'; ticketKeys: Buffer; sessionIdContext: string; sessionTimeout: number } {
  return {
    minVersion: 'TLSv1.3',
    ticketKeys: Buffer.from(hkdfSync('sha256', keyPEM, 'orchard', 'controller TLS session ticket keys', 48)),
    sessionIdContext: 'orchard-controller',
    sessionTimeout: 7 * 24 * 3600,
  };
}

export async function createSelfSigned(extraNames: string[] = []): Promise<{ cert: string; key: string }> {
  const x509 = await import('@peculiar/x509'); // only needed on a controller's first start
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const names = [...new Set(['localhost', hostname(), ...extraNames])];
  const isIP = (n: string) => /^[\d.]+$/.test(n) || n.includes(':');
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: Buffer.from(webcrypto.getRandomValues(new Uint8Array(16))).toString('hex').replace(/^[89a-f]/, '1'),
    name: `CN=Orchard Controller (${hostname()})`,
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + 10 * 365 * 24 * 3600_000),
    signingAlgorithm: alg,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyCertSign, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([
        ...names.filter((n) => !isIP(n)).map((value) => ({ type: 'dns' as const, value })),
        ...['127.0.0.1', '::1', ...names.filter(isIP)].map((value) => ({ type: 'ip' as const, value })),
      ]),
    ],
  });
  const key = pem('PRIVATE KEY', await webcrypto.subtle.exportKey('pkcs8', keys.privateKey));
  return { cert: cert.toString('pem') + '\n', key };
}

/** Loads the operator's certificate, or the data dir's self-signed one (made on first start). */
export async function loadTLS(opts: { dataDir: string; certFile?: string; keyFile?: string }): Promise<TLSMaterial & { generated: boolean }> {
  if (opts.certFile || opts.keyFile) {
    if (!opts.certFile || !opts.keyFile) throw new Error('--controller-cert and --controller-key must be given together');
    const cert = readFileSync(opts.certFile, 'utf8');
    const key = readFileSync(opts.keyFile, 'utf8');
    return { cert, key, fingerprint: fingerprintOf(cert), generated: false };
  }
  const certPath = join(opts.dataDir, 'controller.crt');
  const keyPath = join(opts.dataDir, 'controller.key');
  if (existsSync(certPath) && existsSync(keyPath)) {
    const cert = readFileSync(certPath, 'utf8');
    return { cert, key: readFileSync(keyPath, 'utf8'), fingerprint: fingerprintOf(cert), generated: false };
  }
  const { cert, key } = await createSelfSigned();
  writeFileSync(keyPath, key, { mode: 0o600 });
  chmodSync(keyPath, 0o600);
  writeFileSync(certPath, cert, { mode: 0o644 });
  return { cert, key, fingerprint: fingerprintOf(cert), generated: true };
}
