// The frames a tunnel's stream sends (client and worker side) each fit one TLS record with their
// header (16 KiB of plaintext), whatever the size of the writes, and carry the bytes intact and in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';
import { tunnelStream } from '../src/client/client.ts';

test('a tunnel stream splits writes into frames of at most 16 KiB − 14 bytes (one TLS record with the header), bytes intact', async () => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise((r) => wss.once('listening', r));
  const sizes: number[] = [];
  const got: Buffer[] = [];
  const total = 1024 * 1024 + 7;
  const done = new Promise<void>((resolve) =>
    wss.once('connection', (ws) =>
      ws.on('message', (m: Buffer) => {
        sizes.push(m.length);
        got.push(m);
        if (got.reduce((n, b) => n + b.length, 0) === total) resolve();
      }),
    ),
  );
  const ws = new WebSocket(`ws://127.0.0.1:${(wss.address() as AddressInfo).port}`);
  await new Promise((r) => ws.once('open', r));
  const stream = tunnelStream(ws);
  const data = randomBytes(total);
  // Writes of mixed sizes: one of 1 MiB, small ones, one of exactly a frame.
  stream.write(data.subarray(0, 1024 * 1024 - 16370));
  stream.write(data.subarray(1024 * 1024 - 16370, 1024 * 1024));
  stream.write(data.subarray(1024 * 1024));
  await done;
  assert.ok(Math.max(...sizes) <= 16 * 1024 - 14, `largest frame ${Math.max(...sizes)} bytes`);
  assert.ok(sizes.filter((n) => n === 16 * 1024 - 14).length >= 60, 'big writes go out as full frames');
  assert.ok(Buffer.concat(got).equals(data));
  ws.close();
  wss.close();
});
