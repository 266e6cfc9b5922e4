// How `orchard ssh vm NAME -- CMD` ends. A command's exit status that comes at once, in the same read
// as the session's opening, is its exit code (the CLI took it for a lost connection, 255). Without an
// exit status, because the guest closes the session without one or drops the connection, the CLI
// exits 255 and says which. The controller's exec keeps such a status too. The guest is a stand-in SSH
// server (ssh2) behind a synthetic VM.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import ssh2 from 'ssh2';
import { pino } from 'pino';
import { startWorker } from '../src/worker/run.ts';
import { driverWithGuest, standInHostKey } from './ssh-stand-in.ts';
import { ADMIN_TOKEN, inProcessController, runCLI, tempDir, waitFor } from './helpers.ts';

/**
 * Answers every command at once with a line, then: "exit N" the exit status N, "no-exit" closes the
 * session without an exit status, "drop" ends the connection.
 */
async function standInGuest() {
  const server = new ssh2.Server({ hostKeys: [standInHostKey()] }, (client) => {
    client.on('authentication', (ctx) => (ctx.method === 'password' ? ctx.accept() : ctx.reject(['password'])));
    client.on('ready', () => {
      client.on('session', (accept) => {
        accept().on('exec', (acceptExec, _reject, info) => {
          const channel = acceptExec();
          channel.write(`ran ${info.command}\n`);
          const exit = /\bexit (\d+)\b/.exec(info.command);
          if (exit) {
            channel.exit(Number(exit[1]));
            channel.end();
          } else if (info.command === 'no-exit') channel.end();
          else if (info.command === 'drop') setTimeout(() => client.end(), 50);
        });
      });
    });
    client.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

test("orchard ssh and exec: an exit status that comes at once is the exit code; a session closed without one, or a connection the guest drops, exit 255 saying which", async () => {
  const guest = await standInGuest();
  const driver = driverWithGuest(guest.port);
  const c = await inProcessController();
  const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate };
  const worker = await startWorker({ url: c.ctl.url, token, name: 'w', runtime: 'synthetic', labels: {}, dataDir: tempDir('orchard-worker-'), driver, logger: pino({ level: 'silent' }) });
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  try {
    await c.admin.createVM({ name: 'v', image: 'img' });
    await waitFor('the VM running', async () => ((await c.admin.getVM('v')).status === 'running' ? true : undefined), 20_000, 50);
    const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
    assert.equal(ctx.code, 0, ctx.stderr);

    const exit = await runCLI(['ssh', 'vm', 'v', '--', 'exit 3'], env);
    assert.equal(exit.code, 3, exit.stderr);
    assert.equal(exit.stdout, 'ran exit 3\n');

    const noExit = await runCLI(['ssh', 'vm', 'v', '--', 'no-exit'], env);
    assert.equal(noExit.code, 255, noExit.stderr);
    assert.equal(noExit.stdout, 'ran no-exit\n');
    assert.match(noExit.stderr, /the VM ended the session without an exit status/);

    const drop = await runCLI(['ssh', 'vm', 'v', '--', 'drop'], env);
    assert.equal(drop.code, 255, drop.stderr);
    assert.equal(drop.stdout, 'ran drop\n');
    assert.match(drop.stderr, /the connection to the VM was lost: the VM's side closed it/);

    // The controller's exec (the API under `orchard exec`), whose wrapper around the command the
    // stand-in answers at once too: the exit frame carries the status.
    const ws = await c.admin.openExec('v', { command: 'exit 3' });
    const frames: { type: string; exit?: { code: number } }[] = [];
    ws.on('message', (d: Buffer) => frames.push(JSON.parse(d.toString()) as (typeof frames)[number]));
    await new Promise((r) => ws.once('close', r));
    const last = frames.at(-1);
    assert.equal(last?.type, 'exit', JSON.stringify(frames));
    assert.deepEqual(last.exit, { code: 3 });
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
    guest.close();
  }
});
