// Malformed requests at the protocol level get a clear 4xx, never a 500 or an empty reply: a bad
// percent-encoding in a WebSocket path, and plain HTTP sent to the TLS port. The controller speaks
// TLS 1.3 only (its session tickets' keys outlive a process: tls.ts, sessionResumption).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import tls from 'node:tls';
import { ADMIN_TOKEN, inProcessController } from '../helpers.ts';
import { upgrade } from './attack.ts';

test('a malformed percent-encoding in a WebSocket path is a 400 naming the problem', async () => {
  const c = await inProcessController();
  try {
    const r = await upgrade(c.ctl, '/v1/vms/%E0%A4%A/port-forward?port=22', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
    assert.equal(r.status, 400, r.body);
    assert.match(r.body, /malformed percent-encoding/);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('plain HTTP to the TLS port gets a 400 saying to use https://', async () => {
  const c = await inProcessController();
  try {
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port: c.ctl.port, path: '/v1/vms', method: 'GET' }, (r) => {
        let body = '';
        r.on('data', (d: Buffer) => (body += d.toString()));
        r.on('end', () => resolve({ status: r.statusCode ?? 0, body }));
      });
      req.on('error', reject);
      req.end();
    });
    assert.equal(res.status, 400);
    assert.match(res.body, /use https:\/\//);
    // And TLS on the same port still works.
    assert.ok((await c.admin.info()).version);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('a TLS 1.2 client is refused at the handshake; TLS 1.3 is served', async () => {
  const c = await inProcessController();
  try {
    const handshake = (maxVersion: tls.SecureVersion) => new Promise<string>((resolve, reject) => {
      const sock = tls.connect({ host: '127.0.0.1', port: c.ctl.port, maxVersion, rejectUnauthorized: false }, () => {
        resolve(sock.getProtocol() ?? '');
        sock.end();
      });
      sock.on('error', reject);
    });
    await assert.rejects(handshake('TLSv1.2'), /protocol version|alert/i);
    assert.equal(await handshake('TLSv1.3'), 'TLSv1.3');
  } finally {
    await c.close();
    c.cleanup();
  }
});
