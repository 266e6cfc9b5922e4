// TCP helpers the VM drivers share: connecting to a guest port, and the SSH readiness probe.
import net from 'node:net';
import type { Duplex } from 'node:stream';

/**
 * A TCP connection to host:port, or an error after `timeoutMs`; `what` names it in errors. Half-open:
 * the peer's end leaves ours to the caller (a tunnel passes it on, and the peer still gets what the
 * client sends after it, as through ssh -L).
 */
export function connectTCP(host: string, port: number, what: string, timeoutMs = 10_000): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host, port, allowHalfOpen: true });
    const timer = setTimeout(() => sock.destroy(new Error(`connect to ${what} timed out`)), timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeListener('error', reject);
      // Tunnelled protocols (SSH, VNC) send small packets; Nagle's algorithm would hold them back.
      sock.setNoDelay(true);
      resolve(sock);
    });
    sock.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** A connection to the unix socket at `path`, or an error after `timeoutMs`; `what` names it in errors. */
export function connectUnix(path: string, what: string, timeoutMs = 10_000): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ path });
    const timer = setTimeout(() => sock.destroy(new Error(`connect to ${what} timed out`)), timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeListener('error', reject);
      resolve(sock);
    });
    sock.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`connect to ${what}: ${err.message}`));
    });
  });
}

/**
 * true when host:port sends an SSH banner (`SSH-`) within `ms`. A TCP connect alone proves nothing:
 * QEMU's user network accepts connections before the guest is up.
 */
export async function sshBanner(host: string, port: number, ms: number): Promise<boolean> {
  const sock = net.createConnection({ host, port });
  sock.on('error', () => {});
  return sshBannerOn(sock, ms);
}

/**
 * true when `sock` starts with an SSH banner (`SSH-`) within `ms`. `sock` is closed afterwards,
 * unless `keep` and the banner came: then it is left paused with what it read put back, for an SSH
 * client to go on with (one connection rather than a second dial and login).
 */
export function sshBannerOn(sock: Duplex, ms: number, keep = false): Promise<boolean> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let got = 0;
    let settled = false;
    const done = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.off('data', onData).off('error', onEnd).off('close', onEnd);
      if (ok && keep) {
        // until the SSH client takes it over (and listens for errors itself)
        sock.on('error', () => {});
        sock.pause();
        sock.unshift(Buffer.concat(chunks));
      } else {
        sock.destroy();
      }
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), ms);
    const onData = (d: Buffer) => {
      chunks.push(d);
      got += d.length;
      if (got >= 4) done(Buffer.concat(chunks).subarray(0, 4).toString('latin1') === 'SSH-');
    };
    const onEnd = () => done(false);
    sock.on('data', onData);
    sock.on('error', onEnd);
    sock.on('close', onEnd);
  });
}
