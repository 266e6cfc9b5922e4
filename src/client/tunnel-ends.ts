// A tunnel that ends with an end frame each way instead of a close, so that its WebSocket, already
// authenticated, can carry the next tunnel (no TLS handshake or upgrade per tunnel). Used by the
// client on its ready connections and by the worker on its ready connections, when the other side
// agreed to it. Protocol: docs/tunnel-pool-protocol.md ("Reusing a connection").
import { Duplex } from 'node:stream';
import type { RawData, WebSocket } from 'ws';

/**
 * Largest frame sent on a tunnel: with its header (≤ 14 bytes) it fits one TLS record (16 KiB of
 * plaintext), so the receiving side gets each frame in one read and `ws` hands it on without copying
 * it together from several. With 64 KiB frames the controller spent ≈ 25 % more CPU per byte
 * relayed (copies and the garbage they make; BENCHMARKS.md).
 */
export const TUNNEL_FRAME_BYTES = 16 * 1024 - 14;

/** "No more bytes from me on this tunnel" (a text frame); the bytes before it are the tunnel's last. */
export const END_FRAME = '{"end":true}';

export function isEndFrame(data: RawData, isBinary: boolean): boolean {
  if (isBinary || !Buffer.isBuffer(data) || data.length > 64) return false;
  try {
    return (JSON.parse(data.toString()) as { end?: unknown } | null)?.end === true;
  } catch {
    return false;
  }
}

/**
 * The byte stream of one tunnel on `ws`: binary frames of at most one TLS record, `end()` sends the
 * end frame, the peer's end frame ends the readable side (half-close, as TCP's FIN). Once both end
 * frames have passed with `ws` still open, the stream lets go of `ws` and `onReusable` runs: `ws` is
 * idle again. Destroying the stream before that closes `ws` (the tunnel was cut, not ended); a text
 * frame other than one end, or bytes after the peer's end, break the protocol (1008).
 */
export function reusableStream(ws: WebSocket, onReusable: () => void): Duplex {
  let sentEnd = false;
  let gotEnd = false;
  let detached = false;
  const detach = () => {
    detached = true;
    ws.off('message', onMessage);
    ws.off('close', onClose);
    ws.resume();
  };
  const check = () => {
    if (detached || !sentEnd || !gotEnd || ws.readyState !== ws.OPEN) return;
    detach();
    onReusable();
  };
  const stream = new Duplex({
    allowHalfOpen: true,
    read() {
      if (!detached) ws.resume();
    },
    write(chunk: Buffer, _encoding, callback) {
      // One frame at a time, each handed to the socket on its own: a frame then travels in a TLS
      // record of its own, and the receiver takes it as read. Frames sent together were packed
      // across record boundaries, and the controller copied them together (≈ 20 % more CPU per byte).
      let offset = 0;
      const next = (err?: Error | null) => {
        if (err) return callback(err);
        if (offset >= chunk.length) return callback();
        if (detached || ws.readyState !== ws.OPEN) return callback(new Error('the tunnel connection is closed'));
        const frame = chunk.subarray(offset, offset + TUNNEL_FRAME_BYTES);
        offset += TUNNEL_FRAME_BYTES;
        ws.send(frame, { binary: true }, next);
      };
      next();
    },
    final(callback) {
      if (detached || ws.readyState !== ws.OPEN) return callback(new Error('the tunnel connection is closed'));
      // After every byte written: ws sends in order.
      ws.send(END_FRAME);
      sentEnd = true;
      check();
      callback();
    },
    destroy(err, callback) {
      if (!detached) {
        detach();
        if (ws.readyState === ws.OPEN || ws.readyState === ws.CONNECTING) ws.close(1000, 'tunnel closed');
      }
      callback(err);
    },
  });
  const onMessage = (data: RawData, isBinary: boolean) => {
    if (isBinary && !gotEnd) {
      if (!stream.push(data as Buffer)) ws.pause();
      return;
    }
    if (!gotEnd && isEndFrame(data, isBinary)) {
      gotEnd = true;
      stream.push(null);
      return check();
    }
    detach();
    ws.close(1008, gotEnd ? 'bytes after the end of the tunnel' : 'a text frame other than the end of the tunnel');
    stream.destroy(new Error('the other side broke the tunnel protocol'));
  };
  // Closed before both ends: the bytes that came are all there will be.
  const onClose = () => {
    detach();
    if (!gotEnd) stream.push(null);
  };
  ws.on('message', onMessage);
  ws.on('close', onClose);
  return stream;
}
