// blob-http.ts against a plain node:http server: its reused buffers hand a slow consumer every byte
// in order, a body cut short is an error, and a chunked blob is read through node:http instead. Then
// against a hostile server speaking raw bytes: every odd framing is refused, a trickled head times out,
// a chunked error answer is read once (not asked again), and TLS trusts only the CAs it is given.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import net from 'node:net';
import tls from 'node:tls';
import { join } from 'node:path';
import { BlobResponse } from '../src/worker/oci/blob-http.ts';
import { downloadBlob } from '../src/worker/oci/download.ts';
import { RegistryClient } from '../src/worker/oci/registry.ts';
import { tempDir } from './helpers.ts';
import { testCertificates } from './registry.ts';

const blob = randomBytes(20 * 1024 * 1024 + 12345);
const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;

async function serve(handler: Parameters<typeof createServer>[1]): Promise<{ server: Server; host: string }> {
  const server = createServer(handler);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, host: `127.0.0.1:${(server.address() as { port: number }).port}` };
}

test('a consumer slower than the socket gets every byte in order; a body cut short is an error', async () => {
  const { server, host } = await serve((req, res) => {
    if (req.url === '/short') {
      res.writeHead(200, { 'content-length': String(blob.length) });
      res.write(blob.subarray(0, 3 * 1024 * 1024), () => res.destroy());
      return;
    }
    res.writeHead(200, { 'content-length': String(blob.length) });
    res.end(blob);
  });
  try {
    const res = await BlobResponse.get({ url: new URL(`http://${host}/blob`), headers: {}, idleTimeoutMs: 10_000 });
    assert.equal(res.statusCode, 200);
    const hash = createHash('sha256');
    let n = 0;
    for await (const { data, release } of res.chunks()) {
      hash.update(data);
      n += data.length;
      await new Promise((r) => setTimeout(r, 2));
      release();
    }
    assert.equal(n, blob.length);
    assert.equal(`sha256:${hash.digest('hex')}`, digest);
    const short = await BlobResponse.get({ url: new URL(`http://${host}/short`), headers: {}, idleTimeoutMs: 10_000 });
    await assert.rejects(async () => {
      for await (const c of short.chunks()) c.release();
    }, /closed \d+ bytes before the end/);
  } finally {
    server.close();
  }
});

test('a blob sent chunked (no Content-Length) is downloaded through node:http and checked', async () => {
  const { server, host } = await serve((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'transfer-encoding': 'chunked' });
    for (let off = 0; off < blob.length; off += 1024 * 1024) res.write(blob.subarray(off, off + 1024 * 1024));
    res.end();
  });
  const dir = tempDir('orchard-blob-http-');
  const client = new RegistryClient(host, { insecure: true });
  try {
    await downloadBlob({ client, repo: 'x/y', digest, size: blob.length, partial: join(dir, 'partial'), final: join(dir, 'final') });
    assert.ok(readFileSync(join(dir, 'final')).equals(blob));
  } finally {
    client.close();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A server that answers every connection with `answer` (raw bytes, or a function that writes them). */
async function raw(answer: string | ((s: net.Socket) => void)): Promise<{ url: URL; connections: () => number; close: () => void }> {
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    connections++;
    sockets.add(s);
    s.on('error', () => {});
    s.once('data', () => (typeof answer === 'string' ? s.end(answer) : answer(s)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: new URL(`http://127.0.0.1:${(server.address() as { port: number }).port}/v2/x/blobs/sha256:0`),
    connections: () => connections,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

async function body(url: URL, idleTimeoutMs = 5_000): Promise<{ status: number; text: string }> {
  const res = await BlobResponse.get({ url, headers: {}, idleTimeoutMs });
  const parts: Buffer[] = [];
  for await (const c of res) parts.push(c);
  return { status: res.statusCode, text: Buffer.concat(parts).toString('latin1') };
}

test('a hostile answer\'s framing is refused: Content-Length negative, huge, repeated or beside Transfer-Encoding; odd status lines; too many header bytes or fields', async () => {
  const cases: [string, RegExp][] = [
    ['HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n', /Content-Length is not one number/],
    ['HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n', /Content-Length is not one number/],
    ['HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n', /Content-Length is not one number/],
    ['HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 500\r\n\r\nhello', /Content-Length is not one number/],
    ['HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', /both a Transfer-Encoding and a Content-Length/],
    ['HTTP/2 200\r\nContent-Length: 0\r\n\r\n', /does not start with an HTTP\/1 status line/],
    ['ICY 200 OK\r\n\r\n', /does not start with an HTTP\/1 status line/],
    ['HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\n', /switches protocols/],
    [`HTTP/1.1 200 OK\r\nX-Big: ${'a'.repeat(70 * 1024)}\r\n\r\n`, /headers are longer than 65536 bytes/],
    [`HTTP/1.1 200 OK\r\n${'X-A: b\r\n'.repeat(300)}\r\n`, /more than 256 header fields/],
    // 1xx answers count towards the limit: an endless run of them is no way around it.
    [`${'HTTP/1.1 100 Continue\r\nX-Pad: 0123456789012345678901234567890123456789\r\n\r\n'.repeat(2000)}HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n`, /headers are longer than 65536 bytes/],
    ['HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n', /chunk size that is not a hexadecimal number/],
    ['HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n', /chunk longer than its size/],
    ['HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n', /closed before the end of the chunked 401 answer/],
    [`HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n${'10000\r\n'}${'a'.repeat(0x10000)}\r\n0\r\n\r\n`, /chunked 404 answer has more than 65536 bytes/],
  ];
  for (const [answer, error] of cases) {
    const s = await raw(answer);
    try {
      await assert.rejects(body(s.url), error, JSON.stringify(answer.slice(0, 80)));
    } finally {
      s.close();
    }
  }
});

test('a body longer than announced is cut at its Content-Length; a chunked error answer is read whole on the one connection', async () => {
  const long = await raw('HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and then some more');
  const chunked = await raw('HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n6;ext=1\r\n{"err"\r\n3\r\n:1}\r\n0\r\nX-Trailer: t\r\n\r\n');
  try {
    assert.deepEqual(await body(long.url), { status: 200, text: 'hello' });
    assert.deepEqual(await body(chunked.url), { status: 401, text: '{"err":1}' });
    assert.equal(chunked.connections(), 1, 'asked once');
  } finally {
    long.close();
    chunked.close();
  }
});

test('a head trickled a byte at a time, and a body that stops, end within the idle time', async () => {
  const head = 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello';
  const trickle = await raw((s) => {
    let i = 0;
    const t = setInterval(() => (i < head.length ? s.write(head[i++]) : clearInterval(t)), 50);
    s.on('close', () => clearInterval(t));
  });
  const stall = await raw((s) => s.write('HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel'));
  try {
    const t0 = performance.now();
    await assert.rejects(body(trickle.url, 500), /did not answer within 0.5 s/);
    assert.ok(performance.now() - t0 < 1500, 'the trickle did not keep it waiting');
    await assert.rejects(body(stall.url, 500), /sent nothing for 0.5 s/);
  } finally {
    trickle.close();
    stall.close();
  }
});

test('TLS: the server name and the given CAs are checked, as for the registry\'s other requests', async () => {
  const certs = await testCertificates();
  const server = tls.createServer({ cert: certs.cert, key: certs.key }, (s) => {
    s.on('error', () => {});
    s.once('data', () => s.end('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  // The same certificate on another loopback address, which it does not name.
  const other = tls.createServer({ cert: certs.cert, key: certs.key }, (s) => s.end());
  await new Promise<void>((r) => other.listen(port, '127.0.0.2', r));
  const get = (host: string, ca?: string[]) => BlobResponse.get({ url: new URL(`https://${host}:${port}/b`), headers: {}, idleTimeoutMs: 5_000, ca }).then(async (res) => {
    for await (const c of res.chunks()) c.release();
    return res.statusCode;
  });
  try {
    assert.equal(await get('localhost', [certs.ca]), 200, 'a name the certificate holds, its CA given');
    assert.equal(await get('127.0.0.1', [certs.ca]), 200);
    await assert.rejects(get('localhost'), /self-signed|unable to verify|certificate/i, 'the host\'s CAs alone do not trust the test CA');
    await assert.rejects(get('127.0.0.2', [certs.ca]), /IP: 127.0.0.2 is not in the cert's list/, 'an address the certificate does not hold');
  } finally {
    server.close();
    other.close();
  }
});
