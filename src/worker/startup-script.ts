// Runs a VM's startup script over SSH (ssh2) through the driver's connection to the guest's port 22,
// with the VM's username and password, streaming its output as it comes.
import { Client } from 'ssh2';
import type { Duplex } from 'node:stream';

export interface ScriptResult {
  exitCode: number | null;
  signal?: string;
}

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export function runScript(opts: {
  sock: Duplex;
  username: string;
  password: string;
  script: string;
  env?: Record<string, string>;
  onOutput: (stream: 'stdout' | 'stderr', data: Buffer) => void;
  signal?: AbortSignal;
}): Promise<ScriptResult> {
  // The environment goes in front of the script: SSH servers often refuse env requests (AcceptEnv).
  const exports = Object.entries(opts.env ?? {})
    .filter(([k]) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
    .map(([k, v]) => `export ${k}=${shellQuote(v)}\n`)
    .join('');
  return new Promise((resolve, reject) => {
    const conn = new Client();
    const abort = () => conn.end();
    opts.signal?.addEventListener('abort', abort, { once: true });
    const done = (err: Error | null, result?: ScriptResult) => {
      opts.signal?.removeEventListener('abort', abort);
      conn.end();
      if (err) reject(err);
      else resolve(result!);
    };
    conn.on('error', (err) => done(err));
    conn.on('ready', () => {
      conn.exec('/bin/sh -s', (err, channel) => {
        if (err) return done(err);
        let exitCode: number | null = null;
        let signal: string | undefined;
        channel.on('exit', (code: number | null, sig?: string) => {
          exitCode = code;
          signal = sig;
        });
        channel.on('data', (d: Buffer) => opts.onOutput('stdout', d));
        channel.stderr.on('data', (d: Buffer) => opts.onOutput('stderr', d));
        channel.on('close', () => done(null, { exitCode, signal }));
        channel.end(exports + opts.script + '\n');
      });
    });
    conn.connect({ sock: opts.sock, username: opts.username, password: opts.password, readyTimeout: 30_000, hostVerifier: () => true });
  });
}
