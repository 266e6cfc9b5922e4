// Shell completion: `orchard completion bash|zsh|fish` loaded into the real shells, completing
// commands, subcommands and flags from the command tree, and VM, worker and context names from a real
// controller through `orchard __complete`. Bash and zsh: their completion function called with
// COMP_WORDS/COMP_CWORD set, as the shell does on TAB; fish: `complete -C LINE`, fish's own completion.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ADMIN_TOKEN, inProcessController, ROOT, runCLI, tempDir, waitFor } from './helpers.ts';

const execFileP = promisify(execFile);
type Shell = 'bash' | 'zsh' | 'fish';
const SHELLS: Shell[] = ['bash', 'zsh', 'fish'];

describe('shell completion', { timeout: 180_000 }, () => {
  let c: Awaited<ReturnType<typeof inProcessController>>;
  let home: string;
  const scripts = {} as Record<Shell, string>;
  // A "controller" that accepts connections and never answers.
  let silent: Server;
  const held: Socket[] = [];
  const env = () => ({ ...process.env, ORCHARD_HOME: home, PATH: `${join(ROOT, 'bin')}:${process.env.PATH}` });

  before(async () => {
    c = await inProcessController();
    home = tempDir('orchard-home-');
    for (const name of ['web-1', 'web-2', 'db-1']) await c.admin.createVM({ name, image: 'img' });
    await c.admin.registerWorker({ name: 'mac-mini-1', machine_id: 'm1' });
    const created = await runCLI(['context', 'create', c.ctl.url, '--name', 'dev', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], { ORCHARD_HOME: home });
    assert.equal(created.code, 0, created.stderr);
    silent = createServer((s) => void held.push(s));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    // A second context, at the silent server; added by hand (context create would wait for it to answer).
    const { loadConfig, saveConfig } = await import('../src/client/config.ts');
    process.env.ORCHARD_HOME = home;
    const config = await loadConfig();
    config.contexts.silent = { url: `https://127.0.0.1:${(silent.address() as { port: number }).port}`, serviceAccountName: 'x', serviceAccountToken: 'y' };
    await saveConfig(config);
    delete process.env.ORCHARD_HOME;
    for (const shell of SHELLS) {
      const r = await runCLI(['completion', shell], { ORCHARD_HOME: home });
      assert.equal(r.code, 0, r.stderr);
      scripts[shell] = join(home, `orchard.${shell}`);
      writeFileSync(scripts[shell], r.stdout);
    }
  });

  after(async () => {
    for (const s of held) s.destroy();
    silent?.close();
    await c?.close();
    c?.cleanup();
    rmSync(home, { recursive: true, force: true });
  });

  /** What `shell` offers for LINE with the cursor at its end (a trailing space: a new, empty word). */
  async function complete(shell: Shell, line: string): Promise<string[]> {
    const words = line.split(' ');
    let stdout: string;
    if (shell === 'fish') {
      ({ stdout } = await execFileP('fish', ['--no-config', '-c', 'source $argv[1]; complete -C $argv[2]', scripts.fish, line], { env: env() }));
    } else {
      const call = 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _orchard; printf "%s\\n" "${COMPREPLY[@]}"';
      const args = shell === 'bash' ? ['--norc', '--noprofile', '-c', call, '_'] : ['-f', '-c', call, '_'];
      ({ stdout } = await execFileP(shell, [...args, scripts[shell], ...words], { env: env() }));
    }
    // fish adds a description after a tab to some (files); the words are what counts.
    return stdout.split('\n').map((l) => l.split('\t')[0]).filter(Boolean).sort();
  }

  for (const shell of SHELLS) {
    test(`${shell}: commands, subcommands and flags from the command tree`, async () => {
      assert.deepEqual(await complete(shell, 'orchard li'), ['list']);
      const top = await complete(shell, 'orchard ');
      for (const cmd of ['completion', 'context', 'controller', 'create', 'delete', 'get', 'list', 'logs', 'port-forward', 'ssh', 'vnc', 'worker']) assert.ok(top.includes(cmd), `${cmd} in ${top}`);
      assert.ok(!top.includes('__complete'), 'the hidden command is not offered');
      assert.deepEqual(
        (await complete(shell, 'orchard list ')).filter((w) => w !== 'help'),
        ['orphans', 'registries', 'service-accounts', 'vms', 'workers'],
      );
      const flags = await complete(shell, 'orchard get vm --');
      for (const f of ['--context', '--help', '--ip', '--output', '--wait']) assert.ok(flags.includes(f), `${f} in ${flags}`);
      assert.deepEqual(await complete(shell, 'orchard list vms -o '), ['json', 'table', 'yaml']);
      assert.deepEqual(await complete(shell, 'orchard list vms --output=y'), ['--output=yaml']);
      assert.deepEqual(await complete(shell, 'orchard completion '), ['bash', 'fish', 'zsh']);
    });

    test(`${shell}: VM, worker and context names from the controller of the current context`, async () => {
      assert.deepEqual(await complete(shell, 'orchard get vm '), ['db-1', 'web-1', 'web-2']);
      assert.deepEqual(await complete(shell, 'orchard ssh vm web'), ['web-1', 'web-2']);
      // After flags and their values, still the VM.
      assert.deepEqual(await complete(shell, 'orchard delete vm --context dev '), ['db-1', 'web-1', 'web-2']);
      assert.deepEqual(await complete(shell, 'orchard port-forward vm -t 5 d'), ['db-1']);
      assert.deepEqual(await complete(shell, 'orchard get worker '), ['mac-mini-1']);
      assert.deepEqual(await complete(shell, 'orchard list vms --worker m'), ['mac-mini-1']);
      assert.deepEqual(await complete(shell, 'orchard list vms --context '), ['dev', 'silent']);
      assert.deepEqual(await complete(shell, 'orchard context default d'), ['dev']);
      // A new VM's name is not completed; nor the second argument of get vm.
      assert.deepEqual(await complete(shell, 'orchard create vm '), []);
      assert.deepEqual(await complete(shell, 'orchard get vm web-1 '), []);
    });
  }

  test('bash in a pseudo-terminal: TAB completes a command; on a VM name, the common prefix, then the choices', async () => {
    const proc = spawn('script', ['-qfc', 'bash --norc --noprofile -i', '/dev/null'], { env: { ...env(), TERM: 'dumb' }, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const exited = new Promise((r) => proc.once('exit', r));
    try {
      proc.stdin.write(`source ${scripts.bash}\n`);
      proc.stdin.write('orchard li\t');
      await waitFor('orchard li<TAB> completed', () => /orchard list $/m.test(out) || undefined, 20_000);
      // Ctrl-U: a new line; a TAB completes the common prefix "web-".
      proc.stdin.write('\x15orchard get vm w\t');
      // (bash echoes the w, rings the bell, then inserts the rest of the common prefix)
      await waitFor('the common prefix', () => /orchard get vm w\x07?eb-$/.test(out) || undefined, 20_000);
      // Readline lists the choices on the second TAB of a word it cannot complete further.
      proc.stdin.write('\t\t');
      await waitFor('the VMs listed', () => /web-1\s+web-2/.test(out) || undefined, 20_000).catch((e: Error) => assert.fail(`${e.message}: ${JSON.stringify(out)}`));
      assert.doesNotMatch(out, /db-1/, 'only the names that start with w');
    } finally {
      // Ctrl-U, `exit`: the shell ends, and script(1) with it (the end of its input alone does not end it).
      proc.stdin.end('\x15exit\n');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGKILL');
        await exited;
      }
    }
  });

  test('a controller that does not answer: nothing is offered, within the 2 s the completion waits', async () => {
    // The three shells at once: each one's own time is measured.
    await Promise.all(SHELLS.map(async (shell) => {
      const t0 = Date.now();
      assert.deepEqual(await complete(shell, 'orchard get vm --context silent '), [], shell);
      const ms = Date.now() - t0;
      assert.ok(ms >= 1900 && ms < 8000, `${shell}: ${ms} ms`);
    }));
    // No context at all: nothing, quietly, at once.
    const none = await runCLI(['__complete', 'vms'], { ORCHARD_HOME: tempDir('orchard-home-') });
    assert.deepEqual([none.code, none.stdout, none.stderr], [0, '', '']);
  });

  test('orchard __complete lists names, one a line', async () => {
    const r = await runCLI(['__complete', 'vms'], { ORCHARD_HOME: home });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n').sort(), ['db-1', 'web-1', 'web-2']);
    const sa = await runCLI(['__complete', 'service-accounts', '--context', 'dev'], { ORCHARD_HOME: home });
    assert.match(sa.stdout, /^bootstrap-admin$/m);
  });
});
