// What the tests with a stand-in SSH guest share: its host key, and a synthetic VM whose port 22 is it.
import net from 'node:net';
import type { Duplex } from 'node:stream';
import ssh2 from 'ssh2';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';

/**
 * An ed25519 host key. ssh2's generator drops a public key's leading zero byte (one key in 256), and
 * its own parser then refuses the key: such a key is drawn again (as the controller's jump host does).
 */
export function standInHostKey(): string {
  for (;;) {
    const key = ssh2.utils.generateKeyPairSync('ed25519').private;
    if (!(ssh2.utils.parseKey(key) instanceof Error)) return key;
  }
}

/** A synthetic runtime whose VMs' port 22 is the stand-in guest listening on `guestPort` of this host. */
export function driverWithGuest(guestPort: number): SyntheticDriver {
  return new (class extends SyntheticDriver {
    override async dial(localName: string, port: number): Promise<Duplex> {
      if (port !== 22) return super.dial(localName, port);
      return new Promise((resolve, reject) => {
        const sock = net.connect(guestPort, '127.0.0.1', () => resolve(sock));
        sock.once('error', reject);
      });
    }
  })();
}
