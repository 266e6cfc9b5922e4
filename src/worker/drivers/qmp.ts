// QEMU's machine protocol (QMP) over the VM's qmp.sock, and what the qemu driver asks through it:
// the host forwards of QEMU's user-mode network (HMP `info usernet`, `hostfwd_add`).
import net from 'node:net';

interface QmpReply {
  id?: number;
  return?: unknown;
  error?: { class: string; desc: string };
  event?: string;
  QMP?: unknown;
}

/** A tiny QMP client: newline-delimited JSON over a unix socket. */
export class QmpClient {
  private readonly sock: net.Socket;
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closedError: Error | undefined;
  private greeted: Promise<void>;
  private readonly eventListeners = new Set<(event: string, data: unknown) => void>();

  private constructor(sock: net.Socket) {
    this.sock = sock;
    let onGreeting!: () => void;
    let onFail!: (e: Error) => void;
    this.greeted = new Promise<void>((res, rej) => {
      onGreeting = res;
      onFail = rej;
    });
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      this.buf += chunk;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        let msg: QmpReply;
        try {
          msg = JSON.parse(line) as QmpReply;
        } catch {
          continue;
        }
        if (msg.QMP) {
          onGreeting();
          continue;
        }
        if (msg.event) {
          for (const l of this.eventListeners) l(msg.event, (msg as { data?: unknown }).data);
          continue;
        }
        if (msg.id === undefined) continue;
        const p = this.pending.get(msg.id);
        if (!p) continue;
        this.pending.delete(msg.id);
        if (msg.error) p.reject(new Error(`QMP: ${msg.error.class}: ${msg.error.desc}`));
        else p.resolve(msg.return);
      }
    });
    const fail = (err: Error) => {
      this.closedError ??= err;
      onFail(err);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    sock.on('error', (err) => fail(err));
    sock.on('close', () => fail(new Error('QMP connection closed')));
  }

  /** Connect, read the greeting and leave capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = net.createConnection({ path });
    const client = new QmpClient(sock);
    const timer = setTimeout(() => sock.destroy(new Error(`QMP: no greeting on ${path} within ${timeoutMs} ms`)), timeoutMs);
    try {
      await client.greeted;
      await client.execute('qmp_capabilities');
      return client;
    } catch (err) {
      sock.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise((res, rej) => {
      this.pending.set(id, { resolve: res, reject: rej });
      this.sock.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n');
    });
  }

  /**
   * Resolves with the data of the first event `name` for which `accept` holds; rejects when the
   * connection closes first (QEMU exited) or after `timeoutMs`.
   */
  waitEvent<T>(name: string, accept: (data: T) => boolean, timeoutMs: number): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((res, rej) => {
      const timer = setTimeout(() => done(new Error(`QMP: no ${name} event within ${timeoutMs} ms`)), timeoutMs);
      const listener = (event: string, data: unknown) => {
        if (event === name && accept(data as T)) done(undefined, data as T);
      };
      const onClose = () => done(this.closedError ?? new Error('QMP connection closed'));
      const done = (err?: Error, data?: T) => {
        clearTimeout(timer);
        this.eventListeners.delete(listener);
        this.sock.off('close', onClose);
        if (err) rej(err);
        else res(data as T);
      };
      this.eventListeners.add(listener);
      this.sock.once('close', onClose);
    });
  }

  /** An HMP command through QMP; HMP reports errors as text, so a non-empty answer may be one. */
  async hmp(commandLine: string): Promise<string> {
    return String(await this.execute('human-monitor-command', { 'command-line': commandLine }));
  }

  close(): void {
    this.sock.end();
    this.sock.destroy();
  }
}

/** Host-side forwards from `info usernet`: guest port -> host port (TCP, HOST_FORWARD rows). */
export function parseHostForwards(infoUsernet: string): Map<number, number> {
  const out = new Map<number, number>();
  const re = /TCP\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)/g;
  for (const m of infoUsernet.matchAll(re)) out.set(Number(m[4]), Number(m[2]));
  return out;
}

/** Forwards guest TCP `port` from 127.0.0.1 of QEMU's network namespace (once); the port used. */
export async function forward(q: QmpClient, port: number): Promise<number> {
  let fwd = parseHostForwards(await q.hmp('info usernet'));
  if (!fwd.has(port)) {
    const err = (await q.hmp(`hostfwd_add net0 tcp:127.0.0.1:0-:${port}`)).trim();
    if (err) throw new Error(`cannot forward guest port ${port}: ${err}`);
    fwd = parseHostForwards(await q.hmp('info usernet'));
  }
  return fwd.get(port) ?? 0;
}
