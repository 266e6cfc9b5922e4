// The worker's answers to the controller's connection requests: a port-forward dials the target
// (a VM's port, or this host's) and dials back to the controller, which pairs the two; an IP
// request is answered with one POST.
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { WebSocket } from 'ws';
import type { Logger } from 'pino';
import { tunnelStream, type OrchardClient } from '../client/client.ts';
import type { PortForwardAction, ResolveIPAction } from '../api/worker-protocol.ts';
import type { Driver } from './drivers/driver.ts';
import { traceTunnel } from '../tunnel-trace.ts';

export interface DialBackContext {
  client: OrchardClient;
  driver: Driver;
  workerName: string;
  log: Logger;
  /** The local name of the VM with this uid running here; throws when there is none. */
  localNameOfUID(uid: string): string;
}

/** The target of a port-forward: the VM's port, or this host's without a VM. */
export function dialTarget(ctx: DialBackContext, action: PortForwardAction): Promise<Duplex> {
  if (action.vmUID) return ctx.driver.dial(ctx.localNameOfUID(action.vmUID), action.port);
  return new Promise<Duplex>((resolve, reject) => {
    // Half-open, as the VM targets (socat) and ssh -L: a target's end is passed on, and it still gets
    // what the client sends after it.
    const sock = net.connect({ host: '127.0.0.1', port: action.port, noDelay: true, allowHalfOpen: true }, () => resolve(sock));
    sock.once('error', reject);
  });
}

/** Splices an open tunnel WebSocket and its target; the target closing ends the tunnel cleanly (1000). */
export function joinTarget(ws: WebSocket, target: Duplex) {
  const stream = tunnelStream(ws);
  stream.on('error', () => target.destroy());
  target.pipe(stream);
  stream.pipe(target);
  target.on('close', () => ws.close(1000));
  ws.on('close', () => target.destroy());
}

/** portForwardAction: dial the VM's port (or this host's, without a VM), then dial back and splice. */
export async function portForward(ctx: DialBackContext, action: PortForwardAction) {
  const { client } = ctx;
  traceTunnel('wrk-recv', action.session);
  const query: Record<string, string> = { session: action.session, workerName: ctx.workerName };
  let target: Duplex | undefined;
  try {
    target = await dialTarget(ctx, action);
  } catch (err) {
    // `errorMessage`, as upstream's worker sends it (our controller reads it too).
    query.errorMessage = (err as Error).message.slice(0, 500);
  }
  traceTunnel('wrk-dialed', action.session);
  const url = client.urlOf('/v1/rpc/port-forward', true);
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
  const ws = new WebSocket(url, { ...client.wsOptions(url), handshakeTimeout: 15_000 });
  ws.on('error', (err) => {
    ctx.log.debug({ err: err.message }, 'port-forward dial-back failed');
    target?.destroy();
  });
  if (!target) return;
  const t = target;
  t.on('error', () => ws.terminate());
  ws.on('upgrade', () => traceTunnel('wrk-upgraded', action.session));
  ws.on('open', () => joinTarget(ws, t));
}

/** resolveIPAction: find the VM's IP and POST it back, in the query (`ip` or `errorMessage`) as upstream's worker does. */
export async function resolveIP(ctx: DialBackContext, action: ResolveIPAction) {
  const query = new URLSearchParams({ session: action.session });
  try {
    query.set('ip', await ctx.driver.ip(ctx.localNameOfUID(action.vmUID)));
  } catch (err) {
    query.set('errorMessage', (err as Error).message.slice(0, 1000));
  }
  await ctx.client.call('POST', `/v1/rpc/resolve-ip?${query}`).catch((err: Error) => {
    ctx.log.debug({ err: err.message }, 'resolve-ip answer failed');
  });
}
