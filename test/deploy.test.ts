// deploy/: the systemd units pass `systemd-analyze verify` with no warning (in a temporary root that
// has systemd's own units and a stand-in /usr/local/bin/orchard: verify requires ExecStart's binary to
// exist, and the real one is built elsewhere), their flags are flags orchard has, no token is on a
// command line; systemd-sysusers makes the user from deploy/; the launchd plist is a well-formed plist.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, runCLI, tempDir } from './helpers.ts';

const DEPLOY = join(ROOT, 'deploy');
const UNITS = ['orchard-controller.service', 'orchard-worker.service', 'orchard-backup.service', 'orchard-backup.timer'];
const SYSTEM_UNITS = ['/usr/lib/systemd/system', '/lib/systemd/system'].find((d) => existsSync(join(d, 'sysinit.target')));

function need(command: string) {
  const found = spawnSync('sh', ['-c', `command -v ${command}`]).status === 0;
  assert.ok(found, `${command} is needed for this test: scripts/setup.sh installs it (Debian package systemd)`);
}

/**
 * A root with systemd's units, the given units in /etc/systemd/system, and stand-ins for the programs
 * they run: /usr/local/bin/orchard, and the host's own programs that the units name (which must exist).
 */
function unitRoot(units: Record<string, string>): string {
  assert.ok(SYSTEM_UNITS, "systemd's own units (sysinit.target…) are needed: Debian package systemd");
  const root = tempDir('orchard-deploy-');
  mkdirSync(join(root, 'usr/lib/systemd'), { recursive: true });
  cpSync(SYSTEM_UNITS, join(root, 'usr/lib/systemd/system'), { recursive: true, verbatimSymlinks: true });
  mkdirSync(join(root, 'etc/systemd/system'), { recursive: true });
  for (const [name, text] of Object.entries(units)) writeFileSync(join(root, 'etc/systemd/system', name), text);
  const programs = new Set(['/usr/local/bin/orchard']);
  for (const text of Object.values(units)) for (const m of text.matchAll(/^Exec\w+=[-@:+!]*(\/\S+)/gm)) programs.add(m[1]);
  for (const program of programs) {
    assert.ok(program === '/usr/local/bin/orchard' || existsSync(program), `${program} (run by a unit) is on this host`);
    mkdirSync(join(root, program, '..'), { recursive: true });
    writeFileSync(join(root, program), '#!/bin/sh\nexit 0\n');
    chmodSync(join(root, program), 0o755);
  }
  return root;
}

function verify(root: string, units: string[]) {
  const r = spawnSync('systemd-analyze', ['verify', '--man=no', `--root=${root}`, ...units], { encoding: 'utf8' });
  return { code: r.status, output: `${r.stdout}${r.stderr}`.trim() };
}

const unitText = (name: string) => readFileSync(join(DEPLOY, 'systemd', name), 'utf8');
/** key → values of a unit file (continuation lines are not used in ours). */
function settings(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) out.set(m[1], [...(out.get(m[1]) ?? []), m[2]]);
  }
  return out;
}

/** The --flags of `orchard ARGS --help`. */
async function flagsOf(...args: string[]): Promise<Set<string>> {
  const help = await runCLI([...args, '--help']);
  assert.equal(help.code, 0, help.stderr);
  return new Set(help.stdout.match(/--[a-z][a-z0-9-]*/g));
}

test('the systemd units pass systemd-analyze verify without a warning, and verify would catch a mistake', () => {
  need('systemd-analyze');
  const root = unitRoot(Object.fromEntries(UNITS.map((u) => [u, unitText(u)])));
  try {
    const ok = verify(root, UNITS);
    assert.equal(ok.output, '', 'no warning at all');
    assert.equal(ok.code, 0);
    // The same check notices a misspelt setting and a missing executable.
    writeFileSync(join(root, 'etc/systemd/system', UNITS[0]), unitText(UNITS[0]).replace('ProtectHome=yes', 'ProtecHome=yes'));
    assert.match(verify(root, [UNITS[0]]).output, /Unknown key 'ProtecHome'/);
    rmSync(join(root, 'usr/local/bin/orchard'));
    const missing = verify(root, ['orchard-worker.service']);
    assert.notEqual(missing.code, 0);
    assert.match(missing.output, /\/usr\/local\/bin\/orchard is not executable/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('the units run the real flags of orchard, keep tokens off command lines, and keep VMs through a worker restart', async () => {
  const controller = settings(unitText('orchard-controller.service'));
  const worker = settings(unitText('orchard-worker.service'));
  const controllerFlags = await flagsOf('controller', 'run');
  const workerFlags = await flagsOf('worker', 'run');
  for (const [unit, s, flags, command] of [['controller', controller, controllerFlags, 'controller run'], ['worker', worker, workerFlags, 'worker run']] as const) {
    const exec = s.get('ExecStart')?.[0] ?? '';
    assert.ok(exec.startsWith(`/usr/local/bin/orchard ${command} `), `${unit}: ${exec}`);
    for (const flag of exec.match(/--[a-z][a-z0-9-]*/g) ?? []) assert.ok(flags.has(flag), `${unit}: orchard ${command} has no ${flag}`);
    assert.doesNotMatch(exec, /--bootstrap-token(?!-stdin)|TOKEN/, `${unit}: no token on the command line`);
    assert.deepEqual(s.get('Restart'), ['on-failure']);
    assert.deepEqual(s.get('User'), ['orchard'], `${unit} does not run as root`);
    assert.deepEqual(s.get('NoNewPrivileges'), ['yes']);
    assert.deepEqual(s.get('ProtectSystem'), ['strict']);
    assert.deepEqual(s.get('PrivateTmp'), ['yes']);
  }
  assert.deepEqual(worker.get('StandardInput'), ['file:/etc/orchard/worker-bootstrap-token']);
  assert.ok(worker.get('ExecStart')?.[0].includes('--bootstrap-token-stdin'));
  assert.deepEqual(worker.get('KillMode'), ['process'], 'a restart of the worker leaves its VMs running');
  assert.deepEqual(worker.get('SupplementaryGroups'), ['kvm']);
  assert.ok(worker.get('DeviceAllow')?.includes('/dev/kvm rw'));
  assert.deepEqual(controller.get('EnvironmentFile'), ['-/etc/orchard/controller.env']);
  // The backup timer's service backs up the controller's data dir, with flags `controller backup` has.
  const backup = settings(unitText('orchard-backup.service')).get('ExecStart')?.[0] ?? '';
  assert.match(backup, /\/usr\/local\/bin\/orchard controller backup "\/var\/lib\/orchard\/backups\/[^"]+" --data-dir \/var\/lib\/orchard\/controller'$/);
  const backupFlags = await flagsOf('controller', 'backup');
  for (const flag of backup.match(/--[a-z][a-z0-9-]*/g) ?? []) assert.ok(backupFlags.has(flag), `orchard controller backup has no ${flag}`);
});

test('systemd-sysusers makes the user orchard, in the group kvm, from deploy/', () => {
  need('systemd-sysusers');
  const root = tempDir('orchard-sysusers-');
  try {
    mkdirSync(join(root, 'etc'));
    execFileSync('systemd-sysusers', [`--root=${root}`, join(DEPLOY, 'systemd', 'orchard.sysusers.conf')], { stdio: 'pipe' });
    assert.match(readFileSync(join(root, 'etc/passwd'), 'utf8'), /^orchard:x:\d+:\d+:[^:]*:\/var\/lib\/orchard:\/usr\/sbin\/nologin$/m);
    assert.match(readFileSync(join(root, 'etc/group'), 'utf8'), /^kvm:x:\d+:orchard$/m);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

// ---- launchd -------------------------------------------------------------------------------------

type PlistValue = string | number | boolean | PlistValue[] | { [key: string]: PlistValue };

/**
 * A strict reader of XML property lists (plutil is macOS-only): the XML must be well formed, and the
 * plist structure valid — one value in <plist>, <dict> alternating <key> and a value, known types only.
 */
function parsePlist(xml: string): PlistValue {
  const body = xml
    .replace(/^\uFEFF?<\?xml[^?]*\?>\s*/, '')
    .replace(/<!--[\s\S]*?-->/g, '')
    .replace(/^\s*<!DOCTYPE plist PUBLIC "-\/\/Apple\/\/DTD PLIST 1\.0\/\/EN" "http:\/\/www\.apple\.com\/DTDs\/PropertyList-1\.0\.dtd">\s*/, '');
  const tokens = body.match(/<[^>]*>|[^<]+/g) ?? [];
  let i = 0;
  const decode = (s: string) => {
    if (/&(?!(amp|lt|gt|quot|apos);)/.test(s)) throw new Error(`bad entity in "${s}"`);
    return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&amp;/g, '&');
  };
  const skipSpace = () => {
    while (i < tokens.length && !tokens[i].startsWith('<') && tokens[i].trim() === '') i++;
  };
  const expect = (tag: string) => {
    skipSpace();
    if (tokens[i] !== tag) throw new Error(`expected ${tag}, found ${tokens[i] ?? 'the end'}`);
    i++;
  };
  const text = (tag: string) => {
    let s = '';
    if (tokens[i] !== undefined && !tokens[i].startsWith('<')) s = decode(tokens[i++]);
    expect(`</${tag}>`);
    return s;
  };
  const value = (): PlistValue => {
    skipSpace();
    const open = tokens[i++];
    switch (open) {
      case '<string>':
        return text('string');
      case '<string/>':
        return '';
      case '<integer>': {
        const s = text('integer');
        if (!/^[+-]?\d+$/.test(s)) throw new Error(`bad integer "${s}"`);
        return Number(s);
      }
      case '<true/>':
        return true;
      case '<false/>':
        return false;
      case '<array>': {
        const out: PlistValue[] = [];
        for (skipSpace(); tokens[i] !== '</array>'; skipSpace()) out.push(value());
        i++;
        return out;
      }
      case '<dict>': {
        const out: Record<string, PlistValue> = {};
        for (skipSpace(); tokens[i] !== '</dict>'; skipSpace()) {
          expect('<key>');
          const key = text('key');
          if (key in out) throw new Error(`duplicate key ${key}`);
          out[key] = value();
        }
        i++;
        return out;
      }
      default:
        throw new Error(`unexpected ${open ?? 'end'}`);
    }
  };
  expect('<plist version="1.0">');
  const v = value();
  expect('</plist>');
  skipSpace();
  if (i !== tokens.length) throw new Error(`trailing ${tokens[i]}`);
  return v;
}

test('the launchd plist of the macOS worker is a valid plist that runs orchard worker run with the token on stdin', async () => {
  assert.throws(() => parsePlist('<plist version="1.0"><dict><key>a</key></dict></plist>'), /unexpected <\/dict>/, 'the reader is strict');
  assert.throws(() => parsePlist('<plist version="1.0"><dict><key>a</key><string>x</dict></plist>'), /expected <\/string>/);
  const plist = parsePlist(readFileSync(join(DEPLOY, 'launchd', 'org.cirruslabs.orchard.worker.plist'), 'utf8')) as Record<string, PlistValue>;
  assert.equal(plist.Label, 'org.cirruslabs.orchard.worker');
  const args = plist.ProgramArguments as string[];
  assert.deepEqual(args.slice(0, 3), ['/usr/local/bin/orchard', 'worker', 'run']);
  const flags = await flagsOf('worker', 'run');
  for (const a of args.filter((x) => x.startsWith('--'))) assert.ok(flags.has(a), `orchard worker run has no ${a}`);
  assert.ok(args.includes('--bootstrap-token-stdin') && !args.some((a) => a === '--bootstrap-token'));
  assert.equal(args[args.indexOf('--runtime') + 1], 'tart');
  assert.equal(plist.StandardInPath, '/usr/local/etc/orchard/worker-bootstrap-token');
  assert.equal(typeof plist.UserName, 'string', 'not root');
  assert.deepEqual(plist.KeepAlive, { SuccessfulExit: false }, 'restarted when it fails');
  assert.equal(plist.AbandonProcessGroup, true, 'the VMs outlive the worker');
  assert.equal(plist.RunAtLoad, true);
});
