// Timestamps of a tunnel's set-up stages, for bench/tunnel-setup.ts: with ORCHARD_TUNNEL_TRACE=1 each
// stage writes one line `tunnel-trace STAGE ID MS` to stderr (MS: wall-clock milliseconds with
// microseconds, comparable between processes on one host). Off, it costs one call to a no-op.
import { performance } from 'node:perf_hooks';

const on = process.env.ORCHARD_TUNNEL_TRACE === '1';

export const traceTunnel: (stage: string, id?: string) => void = on
  ? (stage, id = '-') => void process.stderr.write(`tunnel-trace ${stage} ${id.slice(0, 8)} ${(performance.timeOrigin + performance.now()).toFixed(3)}\n`)
  : () => {};
