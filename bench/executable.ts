// The single executable's figures, in one run (after `npm run build`):
//   - `orchard --help` wall time: the executable, the bare start of the same Node binary
//     (`node -e 0`), and the checkout's bin/orchard; interleaved runs, medians (goal: ≤ 1.5× node)
//   - a client command's wall time (`orchard list vms`, one VM, against a controller of the executable)
//   - controller start to the first served request (GET /v1/vms, authenticated), empty store and
//     10,000 VMs stored (goals: ≤ 0.3 s, ≤ 0.6 s), the executable and bin/orchard alternating
//   - worker start to registered (synthetic and qemu runtimes; goal ≤ 0.5 s)
//   - the size of each executable next to its Node binary (goal ≤ 1.2×)
//
//   node bench/executable.ts [--runs 5] [--help-runs 30] [--vms 10000] [--only help,client,controller,worker,size]
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { OrchardClient } from '../src/client/client.ts';
import { closedLoop } from './load-harness.ts';
import { ADMIN_TOKEN, ORCHARD_BIN, ROOT, tempDir, waitFor } from '../test/helpers.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, 'help-runs': { type: 'string', default: '30' }, vms: { type: 'string', default: '10000' }, only: { type: 'string', default: 'help,client,controller,worker,size' } } });
const ONLY = new Set(values.only.split(','));
const RUNS = Number(values.runs);
const HELP_RUNS = Number(values['help-runs']);
const N_VMS = Number(values.vms);
const NODE = join(ROOT, 'node_modules', 'node', 'bin', 'node');
const EXE = join(ROOT, 'dist', `orchard-linux-${process.arch}`);
if (!existsSync(EXE)) throw new Error(`${EXE} is missing: run npm run build first`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const min = (xs: number[]) => Math.min(...xs);
const ms = (x: number) => `${x.toFixed(1).padStart(6)} ms`;
const met = (ok: boolean) => (ok ? 'met' : 'MISSED');

const version = spawnSync(EXE, ['--version'], { encoding: 'utf8' }).stdout.trim();
console.log(`single executable benchmark: ${version}, ${EXE}\n`);

// 1. --help: interleaved, so the machine's load hits all three alike.
if (ONLY.has('help')) {
  const helpCommands: [string, string[]][] = [
    ['node -e 0 (same Node binary)', [NODE, '-e', '0']],
    ['orchard --help (executable)', [EXE, '--help']],
    ['orchard --help (bin/orchard)', [ORCHARD_BIN, '--help']],
  ];
  const helpTimes = helpCommands.map(() => [] as number[]);
  for (let i = 0; i < HELP_RUNS + 2; i++) {
    helpCommands.forEach(([, [cmd, ...args]], j) => {
      const t0 = performance.now();
      const r = spawnSync(cmd, args, { stdio: 'ignore' });
      if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${r.status}`);
      if (i >= 2) helpTimes[j].push(performance.now() - t0); // two warm-up rounds (page cache, compile cache)
    });
  }
  helpCommands.forEach(([label], j) => console.log(`${label.padEnd(34)} median ${ms(median(helpTimes[j]))}   min ${ms(min(helpTimes[j]))}`));
  const helpRatio = median(helpTimes[1]) / median(helpTimes[0]);
  console.log(`ratio executable --help ÷ node -e 0: ${helpRatio.toFixed(2)} (min ÷ min ${(min(helpTimes[1]) / min(helpTimes[0])).toFixed(2)})   bin/orchard ÷ executable: ${(median(helpTimes[2]) / median(helpTimes[1])).toFixed(2)}\n`);
}

// 2. Controller start to the first served request.
interface Started {
  ms: number;
  url: string;
  stop(): Promise<void>;
}
async function startController(bin: string, dataDir: string): Promise<Started> {
  const t0 = performance.now();
  const proc = spawn(bin, ['controller', 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0'], {
    env: { ...process.env, ORCHARD_BOOTSTRAP_ADMIN_TOKEN: ADMIN_TOKEN, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_HOME: join(dataDir, 'home') },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const url = (await waitFor(`the controller to listen (${err})`, () => /listening on (\S+),/.exec(err)?.[1] ?? (proc.exitCode !== null ? Promise.reject(new Error(err)) : undefined), 30_000, 1));
  const client = new OrchardClient({ url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  await client.listVMs();
  const took = performance.now() - t0;
  client.close();
  return {
    ms: took,
    url,
    stop: async () => {
      proc.kill('SIGTERM');
      await exited;
    },
  };
}

const work = tempDir('orchard-bench-exe-');
try {
  const emptyDir = join(work, 'empty');
  const fullDir = join(work, 'full');
  if (ONLY.has('controller')) {
    // First starts make the certificates; the full store gets its VMs through the API.
    await (await startController(EXE, emptyDir)).stop();
    const filling = await startController(EXE, fullDir);
    const admin = new OrchardClient({ url: filling.url, certificate: readFileSync(join(fullDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
    await closedLoop(N_VMS, 16, (i) => admin.createVM({ name: `vm-${i}`, image: 'synthetic', cpu: 1, memory: 512 }));
    admin.close();
    await filling.stop();

    const starts: Record<string, number[]> = {};
    for (let i = 0; i < RUNS; i++) {
      for (const [bin, label] of [[EXE, 'executable'], [ORCHARD_BIN, 'bin/orchard']] as const) {
        for (const [dir, store] of [[emptyDir, 'empty store'], [fullDir, `${N_VMS} VMs`]] as const) {
          const s = await startController(bin, dir);
          await s.stop();
          (starts[`${label}, ${store}`] ??= []).push(s.ms);
        }
      }
    }
    for (const [label, xs] of Object.entries(starts)) console.log(`controller start → first request, ${label.padEnd(24)} median ${ms(median(xs))}   min ${ms(min(xs))}`);
    const exeEmpty = median(starts['executable, empty store']);
    const exeFull = median(starts[`executable, ${N_VMS} VMs`]);
    console.log(`goals: empty ≤ 300 ms (${met(exeEmpty <= 300)}), ${N_VMS} VMs ≤ 600 ms (${met(exeFull <= 600)})\n`);
  }

  // A client command: the CLI and the API client (the executable's second script) against a controller.
  if (ONLY.has('client')) {
    const ctl = await startController(EXE, emptyDir);
    const env = { ...process.env, ORCHARD_HOME: join(work, 'client-home') };
    const ok = (cmd: string, args: string[]) => {
      const r = spawnSync(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
    };
    ok(EXE, ['context', 'create', ctl.url, '--name', 'bench', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes']);
    ok(EXE, ['create', 'vm', 'bench-vm', '--image', 'synthetic']);
    const commands: [string, string, string[]][] = [
      ['node -e 0 (same Node binary)', NODE, ['-e', '0']],
      ['orchard list vms (executable)', EXE, ['list', 'vms']],
      ['orchard list vms (bin/orchard)', ORCHARD_BIN, ['list', 'vms']],
    ];
    const times = commands.map(() => [] as number[]);
    for (let i = 0; i < HELP_RUNS + 2; i++) {
      commands.forEach(([, cmd, args], j) => {
        const t0 = performance.now();
        ok(cmd, args);
        if (i >= 2) times[j].push(performance.now() - t0);
      });
    }
    commands.forEach(([label], j) => console.log(`${label.padEnd(34)} median ${ms(median(times[j]))}   min ${ms(min(times[j]))}`));
    console.log(`ratio executable list vms ÷ node -e 0: ${(median(times[1]) / median(times[0])).toFixed(2)}   bin/orchard ÷ executable: ${(median(times[2]) / median(times[1])).toFixed(2)}\n`);
    await ctl.stop();
  }

  // 3. Worker start to registered, against a controller of the executable.
  if (ONLY.has('worker')) {
    const ctl = await startController(EXE, emptyDir);
    const certificate = readFileSync(join(emptyDir, 'controller.crt'), 'utf8');
    const client = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
    const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
    const runtimes = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64 && command -v pasta'], { stdio: 'ignore' }).status === 0 ? ['synthetic', 'qemu'] : ['synthetic'];
    const registered: Record<string, number[]> = {};
    let n = 0;
    for (let i = 0; i < RUNS; i++) {
      for (const runtime of runtimes) {
        for (const [bin, label] of [[EXE, 'executable'], [ORCHARD_BIN, 'bin/orchard']] as const) {
          const name = `bench-worker-${++n}`;
          const dataDir = join(work, name);
          mkdirSync(dataDir);
          const t0 = performance.now();
          const proc = spawn(bin, ['worker', 'run', ctl.url, '--bootstrap-token-stdin', '--name', name, '--runtime', runtime, '--data-dir', dataDir], {
            env: { ...process.env, ORCHARD_LOG_LEVEL: 'warn' },
            stdio: ['pipe', 'ignore', 'ignore'],
          });
          proc.stdin!.end(token);
          await waitFor(`worker ${name} to register`, async () => (await client.listWorkers()).some((w) => w.name === name), 30_000, 2);
          (registered[`${label}, ${runtime}`] ??= []).push(performance.now() - t0);
          const exited = new Promise<void>((r) => proc.once('exit', () => r()));
          proc.kill('SIGTERM');
          await exited;
          await client.deleteWorker(name);
        }
      }
    }
    client.close();
    await ctl.stop();
    for (const [label, xs] of Object.entries(registered)) console.log(`worker start → registered, ${label.padEnd(24)} median ${ms(median(xs))}   min ${ms(min(xs))}`);
    const exeWorker = Math.max(...runtimes.map((r) => median(registered[`executable, ${r}`])));
    console.log(`goal: ≤ 500 ms (${met(exeWorker <= 500)})\n`);
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}

// 4. Sizes: each executable next to the Node binary it was made from.
if (ONLY.has('size')) {
  const cache = join(ROOT, 'node_modules', '.cache', 'orchard-sea');
  const nodeVersion = spawnSync(NODE, ['--version'], { encoding: 'utf8' }).stdout.trim().slice(1);
  let worst = 0;
  for (const arch of ['x64', 'arm64']) {
    const exe = join(ROOT, 'dist', `orchard-linux-${arch}`);
    const node = arch === process.arch ? NODE : join(cache, `node-linux-${arch}-${nodeVersion}`, 'package', 'bin', 'node');
    if (!existsSync(exe) || !existsSync(node)) {
      console.log(`orchard-linux-${arch}: not built (npm run build makes it)`);
      continue;
    }
    const ratio = statSync(exe).size / statSync(node).size;
    worst = Math.max(worst, ratio);
    console.log(`orchard-linux-${arch}`.padEnd(22) + `${(statSync(exe).size / 1e6).toFixed(1)} MB, its Node binary ${(statSync(node).size / 1e6).toFixed(1)} MB: ${ratio.toFixed(3)}×`);
  }
  console.log(`goal: ≤ 1.2× (${met(worst <= 1.2)}); the script with its assets adds ${(statSync(join(ROOT, 'dist', 'orchard.blob')).size / 1e6).toFixed(1)} MB (without code cache)`);
}
