// A guest whose SSH server answers before it accepts the VM's credentials (a cloud image: sshd is up
// before cloud-init has made the user) still runs its startup script: the worker asks again, every
// 2 s, and says so in the VM's events. The guest is a stand-in SSH server (ssh2) behind a synthetic VM.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import ssh2 from 'ssh2';
import { pino } from 'pino';
import { startWorker } from '../src/worker/run.ts';
import { driverWithGuest, standInHostKey } from './ssh-stand-in.ts';
import { ADMIN_TOKEN, inProcessController, tempDir, waitFor } from './helpers.ts';

/** An SSH server that refuses every password until `acceptAfterMs`, then takes admin/admin and answers a script with one line. */
async function lateGuest(acceptAfterMs: number) {
  const opensAt = Date.now() + acceptAfterMs;
  let refused = 0;
  const server = new ssh2.Server({ hostKeys: [standInHostKey()] }, (client) => {
    client.on('authentication', (ctx) => {
      if (ctx.method === 'password' && Date.now() >= opensAt && ctx.username === 'admin' && ctx.password === 'admin') return ctx.accept();
      if (ctx.method === 'password') refused++;
      ctx.reject(['password']);
    });
    client.on('ready', () => {
      client.on('session', (accept) => {
        accept().on('exec', (acceptExec) => {
          const channel = acceptExec();
          let script = '';
          channel.on('data', (d: Buffer) => (script += d.toString()));
          channel.on('end', () => {
            channel.write(`ran ${script.trim().length} bytes of script\n`);
            channel.exit(0);
            channel.end();
          });
        });
      });
    });
    client.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as net.AddressInfo).port, refused: () => refused, close: () => server.close() };
}

test('a guest that refuses the VM\'s credentials at first still runs the startup script: the worker asks again', async () => {
  const guest = await lateGuest(3000);
  const driver = driverWithGuest(guest.port);
  const c = await inProcessController();
  const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate };
  const worker = await startWorker({ url: c.ctl.url, token, name: 'w', runtime: 'synthetic', labels: {}, dataDir: tempDir('orchard-worker-'), driver, logger: pino({ level: 'silent' }) });
  try {
    await c.admin.createVM({ name: 'late', image: 'img', startup_script: { script_content: 'echo hello' } });
    const events = await waitFor('the startup script to end', async () => {
      const all = (await c.admin.listEvents('late')).events.map((e) => `${e.kind}: ${e.payload}`);
      return all.some((e) => e.startsWith('startup-script: startup script ')) ? all : undefined;
    }, 30_000, 100);
    assert.ok(guest.refused() >= 1, 'the guest refused at first');
    assert.ok(events.some((e) => /^startup-script: the guest refuses the VM's credentials for now .*trying again/.test(e)), events.join('\n'));
    assert.ok(events.includes('log_line: ran 10 bytes of script'), events.join('\n'));
    assert.ok(events.includes('startup-script: startup script exited with code 0'), events.join('\n'));
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
    guest.close();
  }
});
