// blob-http.ts against a plain node:http server: its reused buffers hand a slow consumer every byte
// in order, a body cut short is an error, and a chunked answer is read through node:http instead.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import { BlobResponse } from '../src/worker/oci/blob-http.ts';
import { downloadBlob } from '../src/worker/oci/download.ts';
import { RegistryClient } from '../src/worker/oci/registry.ts';
import { tempDir } from './helpers.ts';

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
