// Measurement aid, preloaded into a controller: times each COMMIT that node:sqlite runs on the
// controller's main thread (the event loop is blocked exactly that long) and its event-loop delay,
// and writes a summary to $COMMIT_TIMER_DIR/PID.json every 250 ms (the benches stop the controller
// with SIGKILL, so nothing at exit). The figures in BENCHMARKS.md ("The commit's fsync off the event loop").
//
//   COMMIT_TIMER_DIR=/tmp/t NODE_OPTIONS="--import $PWD/bench/commit-timer.ts" node bench/api.ts
import { DatabaseSync } from 'node:sqlite';
import { writeFileSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { isMainThread } from 'node:worker_threads';

if (isMainThread && process.argv.includes('controller') && process.env.COMMIT_TIMER_DIR) {
  const dir = process.env.COMMIT_TIMER_DIR;
  const times: number[] = [];
  const exec = DatabaseSync.prototype.exec;
  DatabaseSync.prototype.exec = function (this: DatabaseSync, sql: string) {
    if (sql !== 'COMMIT') return exec.call(this, sql);
    const t0 = process.hrtime.bigint();
    try {
      return exec.call(this, sql);
    } finally {
      times.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
  };
  const loop = monitorEventLoopDelay({ resolution: 1 });
  loop.enable();
  setInterval(() => {
    const sorted = [...times].sort((a, b) => a - b);
    const pct = (p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))] : 0);
    const summary = {
      commits: sorted.length,
      totalMs: sorted.reduce((a, b) => a + b, 0),
      p50: pct(50),
      p99: pct(99),
      max: sorted.at(-1) ?? 0,
      loopP50: loop.percentile(50) / 1e6,
      loopP99: loop.percentile(99) / 1e6,
      loopMax: loop.max / 1e6,
    };
    writeFileSync(`${dir}/${process.pid}.json`, JSON.stringify(summary));
  }, 250).unref();
}
