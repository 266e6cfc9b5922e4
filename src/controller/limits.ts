// What one client may make the controller hold: stored events, buffered bytes, open streams, frame
// sizes and how long a connection may stay silent. Tests shrink them; the defaults are for production.

export interface Limits {
  /** Events kept per VM; the oldest go first (the cut is recorded and shown). */
  eventsPerVM: number;
  /** Bytes of events (their JSON) kept per VM. */
  eventBytesPerVM: number;
  /** A page of GET /v1/vms/{name}/events stops at about this many bytes (X-Next-Cursor gives the rest). */
  eventPageBytes: number;
  /** An NDJSON watch stream whose reader leaves this much unread is ended, with the reason as its last line. */
  watchBufferBytes: number;
  /** Open NDJSON watch streams per service account. */
  watchesPerAccount: number;
  /** Port-forward tunnels per service account, counted from the request (waiting for the VM included). */
  tunnelsPerAccount: number;
  /**
   * Largest WebSocket frame accepted on tunnels (port-forward, its worker side, exec). Clients send a
   * frame per socket read (upstream's Go clients 32 KiB, ours at most 64 KiB); each tunnel may hold a
   * few frames in flight, so this bounds what 40 tunnels pushing big frames make the controller hold.
   */
  tunnelFrameBytes: number;
  /** Largest WebSocket frame accepted on a worker's watch connection. */
  controlFrameBytes: number;
  /** A worker whose watch connection leaves this much unread is disconnected (it reconnects and resyncs). */
  workerBufferBytes: number;
  /** Output an exec session keeps for replay (its frames, in bytes); the oldest go first. */
  execHistoryBytes: number;
  /** How long an exec session with nobody attached lives on (controller run --exec-session-exit-ttl). */
  execRetentionMs: number;
  /** A connection that has not sent a complete request head within this time is closed. */
  firstRequestTimeoutMs: number;
  /** Time allowed to receive a whole request (head and body). */
  requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** Web console sessions held in all; sign-in answers 429 past it. */
  consoleSessions: number;
  /** Web console sessions per service account; one more signs the account's oldest out. */
  consoleSessionsPerAccount: number;
  /** A console session not used for this long ends. */
  consoleSessionIdleMs: number;
  /** A console session ends this long after its sign-in. */
  consoleSessionMaxAgeMs: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_LIMITS: Readonly<Limits> = {
  eventsPerVM: 10_000,
  eventBytesPerVM: 4 * MiB,
  eventPageBytes: 2 * MiB,
  watchBufferBytes: 1 * MiB,
  watchesPerAccount: 100,
  tunnelsPerAccount: 256,
  tunnelFrameBytes: MiB / 4,
  controlFrameBytes: 1 * MiB,
  workerBufferBytes: 64 * MiB,
  execHistoryBytes: 4 * MiB,
  execRetentionMs: 10 * 60_000,
  firstRequestTimeoutMs: 30_000,
  requestTimeoutMs: 60_000,
  keepAliveTimeoutMs: 72_000,
  consoleSessions: 10_000,
  consoleSessionsPerAccount: 32,
  consoleSessionIdleMs: 8 * 3600_000,
  consoleSessionMaxAgeMs: 24 * 3600_000,
};

export function limitsOf(overrides: Partial<Limits> = {}): Limits {
  return { ...DEFAULT_LIMITS, ...overrides };
}
