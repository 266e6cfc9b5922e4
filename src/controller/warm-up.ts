// Compiles some of what the controller compiles lazily (each route's body validator and response
// serializer: compiling them all at start took most of a controller's start), while it is quiet
// rather than on a route's first request: the first creates after a start each waited 50–120 ms for
// their route's compiles, and made the burst's slowest percent.
import { performance } from 'node:perf_hooks';

/** How often the warm-up looks for a quiet moment. */
const CHECK_MS = 200;
/** Event-loop utilisation (0–1) over the last check below which the process counts as quiet. */
const QUIET_ELU = 0.3;
/** Compiles run back to back for at most this long, then wait for the next quiet check. */
const SLICE_MS = 10;

export class WarmUp {
  private readonly pending: (() => void)[] = [];
  private timer?: NodeJS.Timeout;

  /** `compile` runs here or on first use, whichever comes first (it must be idempotent). */
  add(compile: () => void) {
    this.pending.push(compile);
  }

  /** Starts compiling in quiet moments; returns its stop. */
  start(): () => void {
    let elu = performance.eventLoopUtilization();
    this.timer = setInterval(() => {
      const now = performance.eventLoopUtilization();
      const busy = performance.eventLoopUtilization(now, elu).utilization;
      elu = now;
      if (busy > QUIET_ELU) return;
      const until = performance.now() + SLICE_MS;
      while (this.pending.length && performance.now() < until) {
        try {
          this.pending.shift()!();
        } catch {
          // compiled again on first use, where its error is answered as usual
        }
      }
      if (!this.pending.length) clearInterval(this.timer);
    }, CHECK_MS);
    this.timer.unref();
    return () => clearInterval(this.timer);
  }
}
