// What a multiplexed connection's sending side (the worker's, the client's) holds when its socket is
// the bottleneck: a tunnel's writer waits until its frames are in the kernel, so the process holds a
// chunk or so per tunnel, not each tunnel's whole window (with 100 tunnels the worker had queued
// 40-47 MB, which every new tunnel's first bytes waited behind: BENCHMARKS.md). And the receiving
// side's relay hands what comes in one read to its target in one write (one system call for a socket).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Writable } from 'node:stream';
import { WebSocket, WebSocketServer } from 'ws';
import { INITIAL_WINDOW, MuxConnection, type MuxTunnel } from '../src/client/mux.ts';
import { startFirehose, waitFor } from './helpers.ts';

test('a mux whose socket backs up holds about a chunk per tunnel, not its window; every tunnel moves again once the socket drains', async () => {
  const TUNNELS = 50;
  const firehose = await startFirehose();
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise((r) => wss.once('listening', r));
  // The accepting side (as the worker): each tunnel dialled to a firehose and piped, as WorkerMux.serve does.
  const sending: MuxTunnel[] = [];
  const ws = new WebSocket(`ws://127.0.0.1:${(wss.address() as net.AddressInfo).port}`);
  const sender = new MuxConnection(ws, {
    opener: false,
    oneAtATime: true,
    maxTunnels: 100,
    onOpen: (_request, tunnel) => {
      sending.push(tunnel);
      const target = net.connect((firehose.address() as net.AddressInfo).port, '127.0.0.1', () => {
        sender.accept(tunnel);
        target.pipe(tunnel);
      });
      target.on('error', () => tunnel.destroy());
      tunnel.on('close', () => target.destroy());
    },
  });
  const [serverWs] = await Promise.all([new Promise<WebSocket>((r) => wss.once('connection', r)), new Promise((r) => ws.once('open', r))]);
  const opener = new MuxConnection(serverWs, { opener: true, maxTunnels: 100 });
  const socket = (serverWs as unknown as { _socket: net.Socket })._socket;
  try {
    const tunnels = await Promise.all(Array.from({ length: TUNNELS }, () => opener.openTunnel({}, 5000)));
    const got = tunnels.map(() => 0);
    tunnels.forEach((t: MuxTunnel, i) => t.on('data', (c: Buffer) => (got[i] += c.length)));
    await waitFor('bytes on every tunnel', () => got.every((n) => n > 0) || undefined, 10_000, 5);
    // The receiver stops reading its socket: the sender's socket fills, then its writes wait.
    socket.pause();
    let most = 0;
    for (let i = 0; i < 40; i++) {
      await new Promise((r) => setTimeout(r, 25));
      most = Math.max(most, sender.queuedBytes + sending.reduce((n, t) => n + t.writableLength, 0));
    }
    // Each tunnel's window would let 512 KiB wait here (25 MiB in all). What its stream buffers may
    // (64 KiB and the chunk being written, counted again as frames in the queue).
    console.log(`# held by the sender for ${TUNNELS} tunnels: ${(most / 1024).toFixed(0)} KiB at most`);
    assert.ok(most <= TUNNELS * 200 * 1024, `the sender held ${most} bytes for ${TUNNELS} tunnels (windows of ${INITIAL_WINDOW})`);
    const before = [...got];
    socket.resume();
    await waitFor('every tunnel moving again', () => got.every((n, i) => n > before[i] + INITIAL_WINDOW) || undefined, 20_000, 5);
  } finally {
    opener.close();
    ws.terminate();
    wss.close();
    firehose.close();
  }
});

test('frames that come in one read reach the target in one write (a tapped tunnel corks its target for the turn)', async () => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise((r) => wss.once('listening', r));
  // The target: counts the writes it is handed (a socket makes a system call for each).
  let writes = 0;
  let bytes = 0;
  const target = new Writable({
    highWaterMark: 1024 * 1024,
    writev(chunks, callback) {
      writes++;
      for (const { chunk } of chunks) bytes += (chunk as Buffer).length;
      callback();
    },
  });
  const ws = new WebSocket(`ws://127.0.0.1:${(wss.address() as net.AddressInfo).port}`);
  const receiver = new MuxConnection(ws, { opener: false, oneAtATime: true, maxTunnels: 10, onOpen: (_request, tunnel) => (receiver.accept(tunnel), tunnel.pipeInto(target)) });
  const [serverWs] = await Promise.all([new Promise<WebSocket>((r) => wss.once('connection', r)), new Promise((r) => ws.once('open', r))]);
  const opener = new MuxConnection(serverWs, { opener: true, maxTunnels: 10 });
  let frames = 0;
  ws.on('message', (m: Buffer) => m[0] === 3 && frames++); // DATA
  try {
    const tunnel = await opener.openTunnel({}, 5000);
    const total = 8 * 1024 * 1024;
    const chunk = Buffer.alloc(256 * 1024, 1);
    for (let sent = 0; sent < total; sent += chunk.length) if (!tunnel.write(chunk)) await new Promise((r) => tunnel.once('drain', r));
    await waitFor('every byte at the target', () => bytes >= total || undefined, 20_000, 5);
    console.log(`# ${frames} DATA frames reached the target in ${writes} writes`);
    assert.ok(writes < frames / 2, `${writes} writes for ${frames} frames`);
  } finally {
    opener.close();
    ws.terminate();
    wss.close();
  }
});
