// A VM's terminal: xterm.js over the exec WebSocket (GET /v1/vms/NAME/exec, a login shell on a PTY),
// with resize, and reconnection with replay: the exec runs as a session, and a connection that
// breaks is made again, asking for the frames after the last one shown (the controller keeps them).
import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import { BASE } from './api.ts';

const COMMAND = 'exec "${SHELL:-/bin/sh}" -l';
const MAX_RETRY_MS = 10_000;

interface Frame {
  type: 'stdout' | 'stderr' | 'exit' | 'error' | 'no_more_history';
  data?: string;
  exit?: { code: number };
  error?: string;
  watermark?: number;
}

const toBase64 = (bytes: Uint8Array) => {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
};
const fromBase64 = (s: string) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

export function TerminalPage({ name }: { name: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState('connecting…');
  useEffect(() => {
    const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000, convertEol: false });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box.current!);
    fit.fit();
    term.focus();
    const session = crypto.randomUUID();
    const encoder = new TextEncoder();
    let ws: WebSocket | undefined;
    let seen = 0;
    let ended = false;
    let retry = 500;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const send = (frame: object) => ws?.readyState === WebSocket.OPEN && ws.send(JSON.stringify(frame));
    const connect = () => {
      const q = new URLSearchParams({ command: COMMAND, tty: 'true', interactive: 'true', rows: String(term.rows), cols: String(term.cols), session, wait: '60' });
      const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${BASE}/v1/vms/${encodeURIComponent(name)}/exec?${q}`;
      const socket = new WebSocket(url);
      ws = socket;
      socket.onopen = () => {
        setState('connected');
        retry = 500;
        // Everything after the last frame shown: all of it on the first connection, the missed part after a break.
        send({ type: 'history', watermark: seen });
        send({ type: 'resize', terminal: { rows: term.rows, cols: term.cols } });
      };
      socket.onmessage = (e) => {
        const f = JSON.parse(String(e.data)) as Frame;
        if (f.watermark !== undefined && f.type !== 'no_more_history') {
          if (f.watermark <= seen) return;
          seen = f.watermark;
        }
        if ((f.type === 'stdout' || f.type === 'stderr') && f.data) term.write(fromBase64(f.data));
        else if (f.type === 'exit') {
          ended = true;
          setState(`exited with code ${f.exit?.code}`);
          term.write(`\r\n[exited with code ${f.exit?.code}]\r\n`);
        } else if (f.type === 'error' && f.error) term.write(`\r\n\x1b[31m${f.error.replace(/[\x00-\x1f\x7f]/g, ' ')}\x1b[0m\r\n`);
        if (seen % 64 === 0) send({ type: 'ack', watermark: seen });
      };
      socket.onclose = (e) => {
        if (ws !== socket || ended) return;
        if (e.code === 1008 || e.code === 1000) {
          ended = true;
          setState(`closed: ${e.reason || e.code}`);
          return;
        }
        setState(`disconnected (${e.code}${e.reason ? ': ' + e.reason : ''}); reconnecting…`);
        timer = setTimeout(connect, retry);
        retry = Math.min(retry * 2, MAX_RETRY_MS);
      };
    };
    connect();
    const input = term.onData((d) => send({ type: 'stdin', data: toBase64(encoder.encode(d)) }));
    const resized = term.onResize(({ rows, cols }) => send({ type: 'resize', terminal: { rows, cols } }));
    const ro = new ResizeObserver(() => fit.fit());
    ro.observe(box.current!);
    return () => {
      ended = true;
      clearTimeout(timer);
      ro.disconnect();
      input.dispose();
      resized.dispose();
      send({ type: 'close' });
      ws?.close(1000);
      term.dispose();
    };
  }, [name]);
  return (
    <section class="terminal-page">
      <div class="toolbar">
        <h2>
          <a href={`#/vms/${encodeURIComponent(name)}`}>{name}</a> — terminal
        </h2>
        <span class="count" data-testid="terminal-state">{state}</span>
      </div>
      <div class="terminal" ref={box} data-testid="terminal" />
    </section>
  );
}
