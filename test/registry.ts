// Test helpers for image pulls: Debian's `docker-registry` (the CNCF distribution server) on loopback,
// plain HTTP, TLS (a test CA) or TLS with htpasswd users; and containerDisk images in OCI layout
// made with standard tools (tar, gzip, sha256sum), for skopeo to copy into it.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { webcrypto } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { createServer, connect, type Server } from 'node:net';
import { join } from 'node:path';
import { freePort, tempDir, waitFor } from './helpers.ts';

export interface TestRegistry {
  /** 127.0.0.1:PORT */
  host: string;
  storage: string;
  /** the test CA (PEM) when it speaks TLS */
  ca?: string;
  /** a dir with ca.crt, for skopeo's --dest-cert-dir / --src-cert-dir */
  certDir?: string;
  /** skopeo flags to reach it (TLS trust, credentials) as destination or source */
  skopeoArgs(side: 'dest' | 'src'): string[];
  /** the registry's own file of blob `digest` (to corrupt it) */
  blobFile(digest: string): string;
  /** CPU seconds the registry's process has used so far (user + system) */
  cpuSeconds(): number;
  stop(): Promise<void>;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/.{64}/g, '$&\n');
  return `-----BEGIN ${label}-----\n${b64}${b64.endsWith('\n') ? '' : '\n'}-----END ${label}-----\n`;
}

/** A test CA and a certificate it signed for 127.0.0.1 and localhost. */
export async function testCertificates(): Promise<{ ca: string; cert: string; key: string }> {
  const x509 = await import('@peculiar/x509');
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const caKeys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const now = Date.now();
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01', name: 'CN=Orchard Test Registry CA', notBefore: new Date(now - 60_000), notAfter: new Date(now + 24 * 3600_000),
    signingAlgorithm: alg, keys: caKeys,
    extensions: [new x509.BasicConstraintsExtension(true, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true)],
  });
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: '02', subject: 'CN=127.0.0.1', issuer: ca.subject, notBefore: new Date(now - 60_000), notAfter: new Date(now + 24 * 3600_000),
    signingAlgorithm: alg, publicKey: keys.publicKey, signingKey: caKeys.privateKey,
    extensions: [
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: 'ip', value: '127.0.0.1' }, { type: 'dns', value: 'localhost' }]),
    ],
  });
  return { ca: ca.toString('pem') + '\n', cert: cert.toString('pem') + '\n', key: pem('PRIVATE KEY', await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)) };
}

/** The registry's `auth: token:` settings: the token service (realm) it sends clients to and whose tokens it accepts. */
export interface RegistryTokenAuth {
  realm: string;
  service: string;
  issuer: string;
  /** PEM of the certificate(s) whose keys sign the tokens */
  rootCertBundle: string;
}

/**
 * `docker-registry` on 127.0.0.1; `tls` adds a test CA's certificate (`certs` to give one made by
 * testCertificates, shared with a token server), `users` htpasswd basic auth (needs tls), `token`
 * bearer tokens from a token service.
 */
export async function startRegistry(opts: { tls?: boolean; certs?: { ca: string; cert: string; key: string }; users?: Record<string, string>; token?: RegistryTokenAuth } = {}): Promise<TestRegistry> {
  const dir = tempDir('orchard-registry-');
  const storage = join(dir, 'storage');
  mkdirSync(storage);
  const port = await freePort();
  let config = `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${storage}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:${port}\n  secret: orchard-test\n`;
  let ca: string | undefined;
  let certDir: string | undefined;
  if (opts.tls || opts.certs || opts.users) {
    const certs = opts.certs ?? (await testCertificates());
    ca = certs.ca;
    writeFileSync(join(dir, 'server.crt'), certs.cert);
    writeFileSync(join(dir, 'server.key'), certs.key);
    certDir = join(dir, 'certs');
    mkdirSync(certDir);
    writeFileSync(join(certDir, 'ca.crt'), certs.ca);
    config += `  tls:\n    certificate: ${join(dir, 'server.crt')}\n    key: ${join(dir, 'server.key')}\n`;
  }
  if (opts.users) {
    const file = join(dir, 'htpasswd');
    writeFileSync(file, '');
    for (const [user, password] of Object.entries(opts.users)) execFileSync('htpasswd', ['-B', '-b', file, user, password], { stdio: 'ignore' });
    config += `auth:\n  htpasswd:\n    realm: orchard-test\n    path: ${file}\n`;
  }
  if (opts.token) {
    writeFileSync(join(dir, 'token-signers.pem'), opts.token.rootCertBundle);
    const { realm, service, issuer } = opts.token;
    config += `auth:\n  token:\n    realm: ${realm}\n    service: ${service}\n    issuer: ${issuer}\n    rootcertbundle: ${join(dir, 'token-signers.pem')}\n`;
  }
  writeFileSync(join(dir, 'config.yml'), config);
  const proc: ChildProcess = spawn('docker-registry', ['serve', join(dir, 'config.yml')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const host = `127.0.0.1:${port}`;
  await waitFor(`docker-registry on ${host}`, async () => {
    if (proc.exitCode !== null) throw new Error(`docker-registry exited: ${stderr}`);
    const status = await new Promise<number>((resolve) => {
      const req = ca ? httpsRequest(`https://${host}/v2/`, { ca }) : httpRequest(`http://${host}/v2/`);
      req.on('response', (r) => (r.resume(), resolve(r.statusCode ?? 0))).on('error', () => resolve(0)).end();
    });
    return status === 200 || status === 401;
  }, 15_000, 50);
  const [user, password] = Object.entries(opts.users ?? {})[0] ?? [];
  return {
    host,
    storage,
    ca,
    certDir,
    skopeoArgs: (side) => [
      ...(certDir ? [`--${side}-cert-dir`, certDir] : [`--${side}-tls-verify=false`]),
      ...(user ? [`--${side}-creds`, `${user}:${password}`] : []),
    ],
    blobFile: (digest) => join(storage, 'docker/registry/v2/blobs/sha256', digest.slice(7, 9), digest.slice(7), 'data'),
    cpuSeconds: () => {
      // /proc/PID/stat: utime and stime are fields 14 and 15, in clock ticks (100 per second here)
      const fields = readFileSync(`/proc/${proc.pid}/stat`, 'utf8').split(') ')[1].split(' ');
      return (Number(fields[11]) + Number(fields[12])) / 100;
    },
    async stop() {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const sha256 = (file: string) => execFileSync('sha256sum', [file], { encoding: 'utf8' }).split(' ')[0];

/**
 * A containerDisk image in an OCI layout dir, made with tar, gzip and sha256sum: one layer per entry
 * of `layers`, each a dir tree to tar (relative paths → file contents, or a path of a file to copy).
 */
export function ociLayout(dir: string, layers: { files: Record<string, Buffer | { copy: string }>; gzip: boolean }[], tag = 'latest'): { dir: string; layerDigests: string[] } {
  mkdirSync(join(dir, 'blobs', 'sha256'), { recursive: true });
  const blob = (file: string) => {
    const hex = sha256(file);
    execFileSync('cp', [file, join(dir, 'blobs', 'sha256', hex)]);
    return { digest: `sha256:${hex}`, size: Number(execFileSync('stat', ['-c', '%s', file], { encoding: 'utf8' }).trim()) };
  };
  const work = tempDir('orchard-layout-');
  const layerDescs: { mediaType: string; digest: string; size: number }[] = [];
  const diffIds: string[] = [];
  for (const [i, layer] of layers.entries()) {
    const root = join(work, `root${i}`);
    for (const [path, content] of Object.entries(layer.files)) {
      mkdirSync(join(root, path, '..'), { recursive: true });
      if (Buffer.isBuffer(content)) writeFileSync(join(root, path), content);
      else execFileSync('cp', [content.copy, join(root, path)]);
    }
    const tar = join(work, `layer${i}.tar`);
    const top = [...new Set(Object.keys(layer.files).map((p) => p.split('/')[0]))];
    execFileSync('tar', ['--format=posix', '--owner=0', '--group=0', '--numeric-owner', '-cf', tar, '-C', root, ...top]);
    diffIds.push(`sha256:${sha256(tar)}`);
    let file = tar;
    if (layer.gzip) {
      execFileSync('gzip', ['-n', '-k', tar]);
      file = `${tar}.gz`;
    }
    layerDescs.push({ mediaType: `application/vnd.oci.image.layer.v1.tar${layer.gzip ? '+gzip' : ''}`, ...blob(file) });
  }
  const write = (name: string, value: unknown) => {
    writeFileSync(join(work, name), JSON.stringify(value));
    return blob(join(work, name));
  };
  const config = write('config.json', { architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: diffIds }, config: {} });
  const manifest = write('manifest.json', { schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config }, layers: layerDescs });
  writeFileSync(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  writeFileSync(join(dir, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...manifest, annotations: { 'org.opencontainers.image.ref.name': tag } }],
  }));
  rmSync(work, { recursive: true, force: true });
  return { dir, layerDigests: layerDescs.map((l) => l.digest) };
}

/** skopeo copies `oci:DIR:TAG` to `docker://HOST/REPO:TAG`, layers as they are (not recompressed). */
export function skopeoPush(layoutDir: string, tag: string, registry: TestRegistry, repo: string): void {
  execFileSync('skopeo', ['copy', '--quiet', '--preserve-digests', ...registry.skopeoArgs('dest'), `oci:${layoutDir}:${tag}`, `docker://${registry.host}/${repo}:${tag}`], { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A qcow2 disk of `mib` MiB holding random data (so a wrong byte shows). */
export function qcow2WithData(dir: string, name: string, mib: number): string {
  const raw = join(dir, `${name}.raw`);
  writeFileSync(raw, execFileSync('head', ['-c', String(mib * 1024 * 1024), '/dev/urandom'], { maxBuffer: mib * 1024 * 1024 + 1 }));
  const out = join(dir, `${name}.qcow2`);
  execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, out]);
  rmSync(raw);
  return out;
}

/** A TCP forwarder to `target` that passes at most `bytesPerSecond` from it (a slow link to the registry). */
export function throttledProxy(target: string, bytesPerSecond: number): Promise<{ server: Server; host: string }> {
  const [host, port] = target.split(':');
  const server = createServer((client) => {
    const upstream = connect(Number(port), host);
    client.pipe(upstream);
    upstream.on('data', (chunk: Buffer) => {
      upstream.pause();
      client.write(chunk);
      setTimeout(() => upstream.resume(), (chunk.length / bytesPerSecond) * 1000);
    });
    upstream.on('end', () => client.end());
    const close = () => (client.destroy(), upstream.destroy());
    client.on('error', close);
    upstream.on('error', close);
    client.on('close', close);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, host: `127.0.0.1:${(server.address() as { port: number }).port}` })));
}

export const fileText = (path: string) => readFileSync(path, 'utf8');
