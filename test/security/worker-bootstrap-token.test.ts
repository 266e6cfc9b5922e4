// The worker's bootstrap token stays out of `ps`: `orchard worker run` takes it from stdin
// (--bootstrap-token-stdin, as upstream) or $ORCHARD_BOOTSTRAP_TOKEN, from exactly one source.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { encodeBootstrapToken } from '../../src/api/bootstrap-token.ts';
import { OrchardClient } from '../../src/client/client.ts';
import { ADMIN_TOKEN, ORCHARD_BIN, runCLI, spawnController, tempDir, waitFor } from '../helpers.ts';

/** The processes among `pids` whose command line (what `ps` shows every user) holds one of `secrets`. */
function commandLinesShowing(secrets: string[], pids: number[]): number[] {
  return pids.filter((pid) => {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      return secrets.some((s) => cmdline.includes(s));
    } catch {
      return false; // gone meanwhile
    }
  });
}

test('orchard worker run takes the bootstrap token from stdin or the environment, never from ps', async () => {
  const dataDir = tempDir();
  const ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  const admin = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
  const dirs: string[] = [dataDir];
  const { ORCHARD_BOOTSTRAP_TOKEN: _, ...cleanEnv } = process.env;
  try {
    for (const how of ['stdin', 'env'] as const) {
      const name = `w-${how}`;
      const workerDir = tempDir('orchard-worker-');
      dirs.push(workerDir);
      const args = ['worker', 'run', ctl.url, '--name', name, '--synthetic', '--data-dir', workerDir];
      if (how === 'stdin') args.push('--bootstrap-token-stdin');
      const worker = spawn(ORCHARD_BIN, args, {
        env: { ...cleanEnv, ORCHARD_LOG_LEVEL: 'warn', ...(how === 'env' ? { ORCHARD_BOOTSTRAP_TOKEN: token } : {}) },
        stdio: ['pipe', 'ignore', 'pipe'],
      });
      let stderr = '';
      worker.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<void>((r) => worker.once('exit', () => r()));
      worker.stdin!.end(how === 'stdin' ? token + '\n' : '');
      try {
        await waitFor(`the worker (${how}) to register`, async () => {
          if (worker.exitCode !== null) throw new Error(`worker exited: ${stderr}`);
          return (await admin.listWorkers()).some((w) => w.name === name);
        }, 20_000, 100);
        // bin/orchard is a shell script that execs node: the worker is this pid or its child.
        const pids = [worker.pid!, ...readFileSync(`/proc/${worker.pid}/task/${worker.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)];
        // (The environment, unlike the command line, is readable only by the worker's own user.)
        assert.deepEqual(commandLinesShowing([token, ADMIN_TOKEN], pids), [], `${how}: the token is in a command line`);
        assert.doesNotMatch(stderr, /warning/);
      } finally {
        worker.kill('SIGTERM');
        await exited;
      }
    }

    // Exactly one source, and a clear error otherwise (usage errors exit with code 2).
    const workerDir = tempDir('orchard-worker-');
    dirs.push(workerDir);
    const base = ['worker', 'run', ctl.url, '--synthetic', '--data-dir', workerDir];
    const none = await runCLI(base, cleanEnv as Record<string, string>);
    assert.equal(none.code, 2, none.stderr);
    assert.match(none.stderr, /a bootstrap token is needed: pipe it into --bootstrap-token-stdin, or set \$ORCHARD_BOOTSTRAP_TOKEN/);
    const two = await runCLI([...base, '--bootstrap-token-stdin'], { ...cleanEnv, ORCHARD_BOOTSTRAP_TOKEN: token } as Record<string, string>, token);
    assert.equal(two.code, 2, two.stderr);
    assert.match(two.stderr, /the bootstrap token comes from one place only, got --bootstrap-token-stdin and \$ORCHARD_BOOTSTRAP_TOKEN/);
    const three = await runCLI([...base, '--bootstrap-token', token], { ...cleanEnv, ORCHARD_BOOTSTRAP_TOKEN: token } as Record<string, string>);
    assert.equal(three.code, 2, three.stderr);
    assert.match(three.stderr, /got \$ORCHARD_BOOTSTRAP_TOKEN and --bootstrap-token/);
    const empty = await runCLI([...base, '--bootstrap-token-stdin'], cleanEnv as Record<string, string>, '\n');
    assert.equal(empty.code, 2, empty.stderr);
    assert.match(empty.stderr, /--bootstrap-token-stdin: the bootstrap token is empty/);
  } finally {
    admin.close();
    await ctl.kill();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
});
