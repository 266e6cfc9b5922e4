// Connections that hold the controller without asking anything: one that completes the TLS handshake
// (or connects, without TLS) and sends no request is closed after limits.firstRequestTimeoutMs. After
// its first request, Node's own timeouts apply (headers, whole request, keep-alive idle).
import type { IncomingMessage, Server } from 'node:http';
import type { Socket } from 'node:net';

const awaiting = new WeakSet<Socket>();

export function closeSilentConnections(server: Server, tls: boolean, timeoutMs: number) {
  server.on(tls ? 'secureConnection' : 'connection', (socket: Socket) => {
    awaiting.add(socket);
    // Node's HTTP server destroys a socket whose timeout fires when nothing else handles it.
    socket.setTimeout(timeoutMs);
  });
  const started = (request: IncomingMessage) => {
    if (!awaiting.delete(request.socket)) return;
    request.socket.setTimeout(0);
  };
  server.on('request', started);
  server.on('upgrade', started);
}
