// The part of noVNC's RFB client (@novnc/novnc, JavaScript without types) the screen page uses.
declare module '@novnc/novnc' {
  export default class RFB extends EventTarget {
    constructor(target: HTMLElement, url: string, options?: { credentials?: { username?: string; password?: string }; wsProtocols?: string[]; shared?: boolean });
    scaleViewport: boolean;
    resizeSession: boolean;
    viewOnly: boolean;
    background: string;
    sendCredentials(credentials: { username?: string; password?: string }): void;
    disconnect(): void;
  }
}
