// What the hostile-client tests share: accounts with chosen roles, raw WebSocket upgrades with exactly
// the credentials (and source address) an attacker would use, and a synthetic worker.
import assert from 'node:assert/strict';
import type { Duplex } from 'node:stream';
import { WebSocket } from 'ws';
import { pino } from 'pino';
import type { Role } from '../../src/api/schemas.ts';
import type { OrchardClient } from '../../src/client/client.ts';
import { SyntheticDriver } from '../../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../../src/worker/worker.ts';
import { clientOf, inProcessController, tempDir, waitFor } from '../helpers.ts';

export type Cluster = Awaited<ReturnType<typeof inProcessController>>;

export interface Account {
  name: string;
  token: string;
  auth: [string, string];
  client: OrchardClient;
}

export async function account(c: Cluster, name: string, roles: Role[]): Promise<Account> {
  const token = `${name}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
  await c.admin.createServiceAccount({ name, token, roles });
  return { name, token, auth: [name, token], client: clientOf(c.ctl, name, token) };
}

export interface Upgrade {
  /** 101 when the WebSocket opened, else the HTTP status of the refusal. */
  status: number;
  body: string;
  headers: Record<string, string | string[] | undefined>;
  ws?: WebSocket;
}

/** A WebSocket upgrade with exactly these credentials; resolves with the socket or the refusal. */
export function upgrade(ctl: { url: string; certificate?: string }, path: string, opts: { auth?: [string, string]; localAddress?: string } = {}): Promise<Upgrade> {
  const url = new URL(path, ctl.url.replace(/^http/, 'ws'));
  const headers: Record<string, string> = {};
  if (opts.auth) headers.authorization = 'Basic ' + Buffer.from(`${opts.auth[0]}:${opts.auth[1]}`).toString('base64');
  return new Promise((resolve, reject) => {
    // The certificate is pinned (ca); the name in it is not checked (as helpers.rawRequest).
    const ws = new WebSocket(url, { headers, ca: ctl.certificate, checkServerIdentity: (() => undefined) as unknown as () => boolean, localAddress: opts.localAddress });
    ws.once('open', () => resolve({ status: 101, body: '', headers: {}, ws }));
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    ws.once('error', reject);
  });
}

/** Resolves with the close code and reason of `ws`, and when it closed. */
export const closed = (ws: WebSocket) =>
  new Promise<{ code: number; reason: string; at: number }>((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() })));

/** Counts the WebSockets `client` opens, for itself (openWebSocket) and for a worker using it (wsOptions). */
export function countWebSockets(client: OrchardClient): { client: string[]; worker: string[] } {
  const seen = { client: [] as string[], worker: [] as string[] };
  const open = client.openWebSocket.bind(client);
  client.openWebSocket = (path: string, timeout?: number) => (seen.client.push(path.split('?')[0]), open(path, timeout));
  const options = client.wsOptions.bind(client);
  client.wsOptions = (url: URL) => (url.pathname.startsWith('/v1/rpc/port-forward') && seen.worker.push(url.pathname), options(url));
  return seen;
}

/** A real worker (synthetic VMs: dial gives an echo stream) acting through `client`'s account. */
export function syntheticWorker(client: OrchardClient, name: string, labels: Record<string, string> = {}, tunnelMux?: boolean) {
  return new OrchardWorker({ client, name, labels, driver: new SyntheticDriver(), dataDir: tempDir(), slots: 10, heartbeatMs: 1000, tunnelMux, logger: pino({ level: 'silent' }) });
}

/**
 * A controller with a synthetic worker (acting as the admin) running the synthetic VM `vm`; with
 * `tunnelMux: false`, the worker keeps ready connections instead of a mux connection.
 */
export async function clusterWithVM(vm: string, opts: Parameters<typeof inProcessController>[0] & { tunnelMux?: boolean } = {}) {
  const c = await inProcessController(opts);
  const worker = syntheticWorker(c.admin, 'syn-1', {}, opts.tunnelMux);
  await worker.start();
  await c.admin.createVM({ name: vm, image: 'synthetic' });
  await waitFor(`${vm} running`, async () => (await c.admin.getVM(vm)).status === 'running', 10_000);
  return {
    c,
    worker,
    async close() {
      await worker.stop();
      await c.close();
      c.cleanup();
    },
  };
}

/** Writes `bytes` and reads them back through an echo; ends its side and waits for the tunnel's end. */
export async function echo(stream: Duplex, bytes: Buffer) {
  const chunks: Buffer[] = [];
  const ended = new Promise<void>((resolve, reject) => {
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.once('error', reject);
    stream.once('end', () => resolve());
  });
  stream.end(bytes);
  await ended;
  assert.ok(Buffer.concat(chunks).equals(bytes), `echoed ${Buffer.concat(chunks).length} of ${bytes.length} bytes`);
}
