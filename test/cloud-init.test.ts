// The cloud-init NoCloud seed every qemu VM gets: what it says (unit), and that a stock cloud-init
// guest (built in the test from Debian packages) boots with it into the VM's user, password and name.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { hostnameOf, seedFiles, writeSeed, yamlOf } from '../src/worker/drivers/cloud-init.ts';
import { ADMIN_TOKEN, buildCloudInitTestImage, heavyFile, qemuCluster, runCLI, tempDir, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

// What YAML 1.1 (PyYAML, cloud-init's parser) would make of it: `yes`, `on`, `0755`, `1:20` resolve.
const asCloudInitReads = (text: string) => parse(text, { version: '1.1' }) as Record<string, unknown>;

const HOSTILE = [
  `p"w: #x'y`, 'yes', 'on', '0755', '1:20', '~', 'null', '- a', '{a: b}', '[c]', '&x *x !!str', '|', '>',
  '%YAML', '@at `tick`', ' lead and trail ', '\\', 'é😀', '\u0085nel\u2028ls', '\ttab', '"', "'",
];

test('the seed passes every user-supplied value literally: a hostile password, username or name injects no cloud-config', () => {
  for (const v of HOSTILE) {
    const f = seedFiles({ name: v, instanceId: v, username: v, password: v, authorizedKey: v });
    const ud = asCloudInitReads(f['user-data']);
    assert.ok(f['user-data'].startsWith('#cloud-config\n'));
    assert.deepEqual(Object.keys(ud).sort(), ['fqdn', 'hostname', 'manage_etc_hosts', 'prefer_fqdn_over_hostname', 'ssh_pwauth', 'users'], `keys for ${JSON.stringify(v)}`);
    assert.deepEqual(ud.users, [{ name: v, plain_text_passwd: v, lock_passwd: false, sudo: 'ALL=(ALL) NOPASSWD:ALL', ssh_authorized_keys: [v] }], JSON.stringify(v));
    assert.equal(ud.ssh_pwauth, true);
    const md = asCloudInitReads(f['meta-data']);
    assert.deepEqual(md, { 'instance-id': v, 'local-hostname': hostnameOf(v) });
    // ASCII only: no raw line separator or control character for a parser to read as structure
    assert.match(f['user-data'] + f['meta-data'], /^[\x20-\x7e\n]*$/);
  }
  assert.equal(yamlOf({ a: '😀' }), '{\n  "a": "\\U0001f600"\n}\n');
});

test('the hostname is the VM name when Linux takes it as one, else a valid name made from it', () => {
  assert.equal(hostnameOf('ci-vm-1'), 'ci-vm-1');
  assert.equal(hostnameOf('web.prod'), 'web.prod');
  assert.equal(hostnameOf('Team:ci_build.1'), 'Team-ci-build-1');
  assert.equal(hostnameOf('-x-'), 'x');
  assert.equal(hostnameOf('...'), 'orchard-vm');
  assert.equal(hostnameOf('a'.repeat(100)), 'a'.repeat(63));
});

test('the seed is written with private permissions, and a second write replaces the first', async () => {
  const dir = tempDir();
  const seed = await writeSeed(dir, { name: 'n', instanceId: 'i', username: 'u', password: 'first' });
  await writeSeed(dir, { name: 'n', instanceId: 'i', username: 'u', password: 'second' });
  assert.equal(statSync(seed).mode & 0o777, 0o700);
  for (const f of ['meta-data', 'user-data']) assert.equal(statSync(join(seed, f)).mode & 0o777, 0o600);
  assert.match(readFileSync(join(seed, 'user-data'), 'utf8'), /"second"/);
  assert.doesNotMatch(readFileSync(join(seed, 'user-data'), 'utf8'), /first/);
  rmSync(dir, { recursive: true, force: true });
});

describe('a stock cloud-init guest boots with the VM\'s credentials', { timeout: 420_000 }, () => {
  const VM = 'ci-vm-1';
  // Chosen after the image is built (it is cached across runs): only the seed can carry them.
  const username = `ci-${randomBytes(3).toString('hex')}`;
  const password = `${randomBytes(9).toString('base64url')} "q": #c 'x' - yes & *a {b} \\`;
  let q: Awaited<ReturnType<typeof qemuCluster>>;
  let home: string;
  let env: Record<string, string>;

  before(async () => {
    q = await qemuCluster();
    let t0 = Date.now();
    const built = await buildCloudInitTestImage();
    console.log(`# cloud-init-test image: ${built} in ${Date.now() - t0} ms`);
    home = tempDir('orchard-home-');
    env = { ORCHARD_HOME: home };
    const ctx = await runCLI(['context', 'create', q.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
    assert.equal(ctx.code, 0, ctx.stderr);
    t0 = Date.now();
    const vm = await q.runningVM(VM, {
      image: 'cloud-init-test', username, password, memory: 512,
      startup_script: { script_content: 'echo "startup script as $(id -un) on $(hostname)"' },
    });
    assert.equal(vm.status, 'running');
    console.log(`# cloud-init-test: create to running ${Date.now() - t0} ms`);
  });

  after(async () => {
    await q?.close();
    if (home) rmSync(home, { recursive: true, force: true });
  });

  test('orchard ssh logs in with the VM\'s (hostile) password as its user; hostname = VM name; sudo needs no password', async () => {
    const r = await runCLI(['ssh', 'vm', VM, '--', 'id -un; hostname; sudo -n id -u'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `${username}\n${VM}\n0\n`);
    // The guest does not take just any password: the seed's is the one.
    const wrong = await runCLI(['ssh', 'vm', VM, '-p', password + 'x', '--', 'true'], env);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /authentication .*failed/i);
  });

  test('the startup script ran over SSH with those credentials: its output is in the VM\'s events', async () => {
    const line = `startup script as ${username} on ${VM}`;
    await waitFor('the startup script\'s output', async () => {
      const { events } = await q.admin.listEvents(VM, { limit: 200 });
      return events.some((e) => e.kind === 'log_line' && e.payload === line)
        && events.some((e) => e.kind === 'startup-script' && e.payload === 'startup script exited with code 0');
    }, 30_000, 250);
  });
});
