// A VM's screen: noVNC over the port-forward WebSocket to the VM's VNC server (port 5900), with the
// VM's credentials filled in. Reconnects when the connection breaks.
import { useEffect, useRef, useState } from 'preact/hooks';
import RFB from '@novnc/novnc';
import type { VM } from '../../api/schemas.ts';
import { sshCredentials, VNC_PORT } from '../../api/defaults.ts';
import { api, BASE } from './api.ts';

export function ScreenPage({ name }: { name: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState('connecting…');
  useEffect(() => {
    let rfb: RFB | undefined;
    let stopped = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let retry = 1000;
    const connect = async () => {
      // The VM's own VNC credentials (QEMU's display needs none; a Tart VM's VNC asks for them).
      const vm = await api<VM>('GET', `/v1/vms/${encodeURIComponent(name)}`).catch(() => undefined);
      if (stopped) return;
      const credentials = sshCredentials(vm ?? {});
      const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${BASE}/v1/vms/${encodeURIComponent(name)}/port-forward?port=${VNC_PORT}&wait=60`;
      const r = new RFB(box.current!, url, { credentials, shared: true });
      rfb = r;
      r.scaleViewport = true;
      r.background = '#000';
      r.addEventListener('connect', () => {
        retry = 1000;
        setState('connected');
      });
      r.addEventListener('credentialsrequired', () => r.sendCredentials(credentials));
      r.addEventListener('securityfailure', (e) => setState(`refused: ${String((e as CustomEvent<{ reason?: string }>).detail?.reason ?? 'security failure')}`));
      r.addEventListener('disconnect', (e) => {
        if (stopped || rfb !== r) return;
        const clean = (e as CustomEvent<{ clean: boolean }>).detail?.clean;
        setState(`disconnected${clean ? '' : ' (connection lost)'}; reconnecting…`);
        timer = setTimeout(() => void connect(), retry);
        retry = Math.min(retry * 2, 10_000);
      });
    };
    void connect();
    return () => {
      stopped = true;
      clearTimeout(timer);
      rfb?.disconnect();
    };
  }, [name]);
  return (
    <section class="terminal-page">
      <div class="toolbar">
        <h2>
          <a href={`#/vms/${encodeURIComponent(name)}`}>{name}</a> — screen
        </h2>
        <span class="count" data-testid="screen-state">{state}</span>
      </div>
      <div class="screen" ref={box} data-testid="screen" />
    </section>
  );
}
