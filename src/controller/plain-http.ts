// Plain HTTP sent to the TLS port gets a readable answer ("use https://") instead of an empty reply.
// The first byte of a connection tells: a TLS handshake starts with 0x16. It is read, put back, and
// the connection handed to the TLS server, which takes bytes already read from the socket first.
import type { Socket } from 'node:net';
import type { Server } from 'node:tls';

const TLS_HANDSHAKE = 0x16;
const ignore = () => {};

/**
 * Installs the check on `server`, before other 'connection' listeners (those see every connection at
 * once). One that sends nothing for `timeoutMs` is closed (the TLS handshake timeout only starts after).
 */
export function answerPlainHTTP(server: Server, timeoutMs: number) {
  const tlsListeners = server.listeners('connection') as ((socket: Socket) => void)[];
  server.removeAllListeners('connection');
  server.on('connection', (socket: Socket) => {
    socket.on('error', ignore);
    socket.setTimeout(timeoutMs, () => socket.destroy());
    socket.once('data', (first: Buffer) => {
      socket.setTimeout(0);
      if (first[0] === TLS_HANDSHAKE) {
        socket.pause();
        socket.unshift(first);
        socket.off('error', ignore);
        for (const listener of tlsListeners) listener.call(server, socket);
        return;
      }
      const body = JSON.stringify({ message: 'this is an HTTPS port: use https:// (Orchard serves its API over TLS only)' });
      socket.end(`HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
      socket.resume(); // read (and drop) the rest, so the client's close is seen
    });
  });
}
