// Gives memory back after a load. V8 keeps the heap it grew to during a burst (1,000 watch streams,
// tunnels pushing big frames) and frees Buffers only when it next collects, which a quiet controller
// rarely does: RSS stayed 50–250 MB above idle for good. So, when the process has grown well past
// what it held after the last collection and the event loop is quiet, this asks for one full,
// memory-reducing collection (tens of milliseconds, only when nothing much is being served).
import { performance } from 'node:perf_hooks';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/** How often the check runs. */
const CHECK_MS = 2_000;
/** Growth of RSS over what was left after the last collection that is worth a collection. */
const GROWTH_BYTES = 32 * 1024 * 1024;
/** Event-loop utilisation (0–1) over the last check below which the process counts as quiet. */
const QUIET_ELU = 0.25;

type GC = (options: { type: 'major'; execution: 'sync'; flavor: 'last-resort' }) => void;

let users = 0;
let timer: NodeJS.Timeout | undefined;

function exposedGC(): GC | undefined {
  try {
    setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as GC;
  } catch {
    return undefined; // a runtime that refuses the flag: memory is given back only as V8 decides
  }
}

/** Starts the check (one per process, however many controllers run in it); returns its stop. */
export function giveBackMemoryWhenQuiet(): () => void {
  if (users++ === 0) {
    const gc = exposedGC();
    if (gc) {
      let floor = process.memoryUsage.rss();
      let elu = performance.eventLoopUtilization();
      timer = setInterval(() => {
        const now = performance.eventLoopUtilization();
        const busy = performance.eventLoopUtilization(now, elu).utilization;
        elu = now;
        const rss = process.memoryUsage.rss();
        if (rss < floor) floor = rss;
        if (rss - floor < GROWTH_BYTES || busy > QUIET_ELU) return;
        gc({ type: 'major', execution: 'sync', flavor: 'last-resort' });
        floor = process.memoryUsage.rss();
      }, CHECK_MS);
      timer.unref();
    }
  }
  let stopped = false;
  return () => {
    if (stopped) return;
    stopped = true;
    if (--users === 0) clearInterval(timer);
  };
}
