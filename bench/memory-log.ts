// Measurement aid, preloaded into a controller: appends where its memory sits to
// $MEMORY_LOG_DIR/PID.ndjson once a second (process.memoryUsage, V8's heap spaces, and the kernel's
// view from /proc/self/smaps_rollup), so a bench's figure can be split by part afterwards.
//
//   MEMORY_LOG_DIR=/tmp/m LOAD_CONTROLLER_NODE_OPTIONS="--import $PWD/bench/memory-log.ts" node bench/load.ts --scales 1000x10000 --no-restart
import { appendFileSync, readFileSync } from 'node:fs';
import { getHeapSpaceStatistics } from 'node:v8';

const dir = process.env.MEMORY_LOG_DIR;
const MB = (n: number) => Math.round(n / 104857.6) / 10;
if (dir) {
  setInterval(() => {
    const m = process.memoryUsage();
    const kB = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync('/proc/self/smaps_rollup', 'utf8'))?.[1] ?? NaN) * 1024;
    const spaces = Object.fromEntries(getHeapSpaceStatistics().map((s) => [s.space_name, MB(s.space_used_size) + '/' + MB(s.physical_space_size)]));
    const line = { t: Math.round(process.uptime()), rss: MB(m.rss), heapUsed: MB(m.heapUsed), heapTotal: MB(m.heapTotal), external: MB(m.external), arrayBuffers: MB(m.arrayBuffers), anonymous: MB(kB('Anonymous')), fileBacked: MB(kB('Rss') - kB('Anonymous')), spaces };
    appendFileSync(`${dir}/${process.pid}.ndjson`, JSON.stringify(line) + '\n');
  }, 1000).unref();
}
