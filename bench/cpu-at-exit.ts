// Measurement aid, preloaded into a controller: writes the CPU time it used (user + system) and its
// life to $CPU_AT_EXIT_DIR/PID.json when it exits (a stop by SIGTERM, as bench/load.ts --no-restart
// ends its controllers). A fixed workload's CPU, which the machine's load moves less than its rates.
//
//   CPU_AT_EXIT_DIR=/tmp/c LOAD_CONTROLLER_NODE_OPTIONS="--import $PWD/bench/cpu-at-exit.ts" node bench/load.ts --scales 100x1000 --no-restart
import { writeFileSync } from 'node:fs';

const dir = process.env.CPU_AT_EXIT_DIR;
if (dir) {
  process.on('exit', () => {
    const { user, system } = process.cpuUsage();
    writeFileSync(`${dir}/${process.pid}.json`, JSON.stringify({ cpuMs: (user + system) / 1000, lifeMs: process.uptime() * 1000 }) + '\n');
  });
}
