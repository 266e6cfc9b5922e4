// Connections that hold the controller without using it are closed: one that finishes the TLS
// handshake and sends nothing, a request head or body sent too slowly, an idle keep-alive connection.
// A watch stream, idle but wanted, stays.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { inProcessController, waitFor } from '../helpers.ts';
import type { Cluster } from '../security/attack.ts';

const LIMITS = { firstRequestTimeoutMs: 500, requestTimeoutMs: 1000, keepAliveTimeoutMs: 700 };
const AUTH = 'Basic ' + Buffer.from('bootstrap-admin:test-admin-token').toString('base64');

/** A TLS connection with the handshake done; records what it receives and when it closes. */
async function connect(c: Cluster) {
  const url = new URL(c.ctl.url);
  const socket = tls.connect({ host: url.hostname, port: Number(url.port), ca: c.ctl.certificate, checkServerIdentity: () => undefined });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  const opened = Date.now();
  let received = '';
  socket.on('data', (d: Buffer) => (received += d.toString()));
  socket.on('error', () => {});
  const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now() - opened)));
  return { socket, closed, received: () => received, sinceOpen: () => Date.now() - opened };
}

const within = (p: Promise<number>, ms: number) =>
  Promise.race([p, new Promise<number>((_, reject) => setTimeout(() => reject(new Error(`still open after ${ms} ms`)), ms))]);

describe('idle and half-open connections', () => {
  let c: Cluster;
  before(async () => {
    c = await inProcessController({ limits: LIMITS });
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test('a TLS connection that sends no request is closed after firstRequestTimeoutMs', async () => {
    const conn = await connect(c);
    const ms = await within(conn.closed, 3000);
    assert.ok(ms >= 400, `closed after ${ms} ms`);
  });

  test('a TCP connection that sends nothing (not even a TLS hello) is closed too', async () => {
    const url = new URL(c.ctl.url);
    const socket = net.connect(Number(url.port), url.hostname);
    socket.on('error', () => {});
    await within(new Promise<number>((resolve) => socket.once('close', () => resolve(0))), 3000);
  });

  test('a request head that never ends is closed', async () => {
    const conn = await connect(c);
    conn.socket.write('GET /v1/vms HTTP/1.1\r\nHost: x\r\n');
    await within(conn.closed, 3000);
  });

  test('after a first request: a slow second head, a slow body, an idle keep-alive connection are closed', async () => {
    const request = `GET /v1/controller/info HTTP/1.1\r\nHost: x\r\nAuthorization: ${AUTH}\r\n\r\n`;
    // slow second head (headersTimeout)
    let conn = await connect(c);
    conn.socket.write(request);
    await waitFor('the first answer', () => conn.received().includes('200 OK'), 3000, 10);
    conn.socket.write('GET /v1/vms HTTP/1.1\r\nHost: x\r\n');
    await within(conn.closed, 4000);
    // slow body (requestTimeout)
    conn = await connect(c);
    conn.socket.write(request);
    await waitFor('the first answer', () => conn.received().includes('200 OK'), 3000, 10);
    conn.socket.write(`POST /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: ${AUTH}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"name":`);
    const closedAfter = await within(conn.closed, 4000);
    assert.ok(closedAfter >= 900, `closed after ${closedAfter} ms`);
    // idle keep-alive
    conn = await connect(c);
    conn.socket.write(request);
    await waitFor('the first answer', () => conn.received().includes('200 OK'), 3000, 10);
    const answered = conn.sinceOpen();
    const idle = (await within(conn.closed, 3000)) - answered;
    assert.ok(idle >= 600, `closed ${idle} ms after the answer`);
  });

  test('an idle watch stream stays open past every timeout', async () => {
    const conn = await connect(c);
    conn.socket.write(`GET /v1/vms?watch=true HTTP/1.1\r\nHost: x\r\nAuthorization: ${AUTH}\r\n\r\n`);
    await waitFor('the watch', () => conn.received().includes('200 OK'), 3000, 10);
    await new Promise((r) => setTimeout(r, 2500));
    await c.admin.createVM({ name: 'late', image: 'synthetic' });
    await waitFor('the change on the watch', () => conn.received().includes('"late"'), 3000, 10);
    conn.socket.destroy();
  });
});
