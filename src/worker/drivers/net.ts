// TCP helpers the VM drivers share: connecting to a guest port, and the SSH readiness probe.
import net from 'node:net';

/** A TCP connection to host:port, or an error after `timeoutMs`; `what` names it in errors. */
export function connectTCP(host: string, port: number, what: string, timeoutMs = 10_000): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host, port });
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

/**
 * true when host:port sends an SSH banner (`SSH-`) within `ms`. A TCP connect alone proves nothing:
 * QEMU's user network accepts connections before the guest is up.
 */
export function sshBanner(host: string, port: number, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.createConnection({ host, port });
    let got = '';
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), ms);
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      got += d;
      if (got.length >= 4) done(got.startsWith('SSH-'));
    });
    sock.on('error', () => done(false));
    sock.on('close', () => done(false));
  });
}
