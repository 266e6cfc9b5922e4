// The quick start through the real `orchard` command: a controller process, a context with a
// pinned certificate, VMs and service accounts, every output format, errors on stderr with exit codes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import YAML from 'yaml';
import { decodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import type { VM } from '../src/api/schemas.ts';
import { ADMIN_TOKEN, runCLI, spawnController, tempDir } from './helpers.ts';

test('quick start: controller run, context create, create/list/get/delete vm, service accounts, bootstrap token', async () => {
  const dataDir = tempDir();
  const home = tempDir('orchard-home-');
  const env = { ORCHARD_HOME: home };
  const ctl = await spawnController(dataDir);
  const cli = async (...args: string[]) => {
    const r = await runCLI(args, env);
    assert.equal(r.code, 0, `orchard ${args.join(' ')} failed: ${r.stderr}`);
    return r.stdout;
  };
  try {
    assert.match(ctl.stderr(), /certificate SHA-256/);
    await cli('context', 'create', ctl.url, '--name', 'local', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes');
    assert.match(await cli('context', 'list'), /^local\s+https:\/\/127\.0\.0\.1:\d+\s+bootstrap-admin\s+\*\s+yes$/m);

    await cli('create', 'vm', 'ci-1', '--image', 'ghcr.io/cirruslabs/macos-sequoia-base:latest', '--cpu', '4', '--memory', '8192', '--label', 'model=m2');
    assert.match(await cli('list', 'vms'), /^ci-1\s+ghcr\.io\/cirruslabs\/macos-sequoia-base:latest\s+4\s+8192\s+pending \(waiting for a worker\)\s+-\s+model=m2\s+\d+s$/m);
    const vm = JSON.parse(await cli('get', 'vm', 'ci-1', '--output', 'json')) as VM;
    assert.equal(vm.name, 'ci-1');
    assert.deepEqual(vm.labels, { model: 'm2' });
    assert.equal(vm.status, 'pending');
    assert.deepEqual((YAML.parse(await cli('get', 'vm', 'ci-1', '-o', 'yaml')) as VM).uid, vm.uid);

    const sa = JSON.parse(await cli('create', 'service-account', 'ro', '--roles', 'compute:read', '-o', 'json')) as { token: string; roles: string[] };
    assert.deepEqual(sa.roles, ['compute:read']);
    assert.ok(sa.token.length >= 40, 'a generated token has 256 bits');
    const token = decodeBootstrapToken((await cli('get', 'bootstrap-token', 'ro')).trim());
    assert.equal(token.serviceAccountName, 'ro');
    assert.equal(token.serviceAccountToken, sa.token);
    assert.match(token.certificate ?? '', /BEGIN CERTIFICATE/);

    // A read-only account can list but not create: 403 on stderr, exit code 1, nothing on stdout.
    const ro = await runCLI(['context', 'create', ctl.url, '--name', 'ro', '--service-account-name', 'ro', '--service-account-token', sa.token, '--trust-fingerprint', ctl.fingerprint, '--no-default'], env);
    assert.equal(ro.code, 0, ro.stderr);
    assert.match(ro.stderr, /context "ro" saved to .*; the default context is still "local"/);
    // Without --no-default a new context is the one the next commands use, and it says so.
    const other = await runCLI(['context', 'create', ctl.url, '--name', 'other', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', ctl.fingerprint], env);
    assert.match(other.stderr, /context "other" saved to .*; it is the default context now \(was "local"\)/);
    assert.match(await cli('context', 'list'), /^other\s.*\*/m);
    await cli('context', 'default', 'local');
    assert.match(await cli('list', 'vms', '--context', 'ro'), /ci-1/);
    const denied = await runCLI(['create', 'vm', 'x', '--image', 'i', '--context', 'ro'], env);
    assert.equal(denied.code, 1);
    assert.equal(denied.stdout, '');
    // The message alone, no "(HTTP 403)": an expected error, told as such.
    assert.match(denied.stderr, /^orchard: .*lacks the role "compute:write"[^\n]*\n$/);
    assert.doesNotMatch(denied.stderr, /HTTP/);
    // ORCHARD_DEBUG=1 shows the HTTP status (and the stack).
    const deniedDebug = await runCLI(['create', 'vm', 'x', '--image', 'i', '--context', 'ro'], { ...env, ORCHARD_DEBUG: '1' });
    assert.equal(deniedDebug.code, 1);
    assert.match(deniedDebug.stderr, /lacks the role "compute:write" \(HTTP 403\)/);

    await cli('delete', 'vm', 'ci-1');
    assert.deepEqual(JSON.parse(await cli('list', 'vms', '-o', 'json')), []);
    const missing = await runCLI(['get', 'vm', 'ci-1'], env);
    assert.equal(missing.code, 1);
    assert.equal(missing.stderr, 'orchard: VM "ci-1" not found\n');

    // Usage errors: exit code 2 and a message naming the flag.
    const bad = await runCLI(['create', 'vm', 'y', '--image', 'i', '--cpu', 'four'], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--cpu must be an integer/);
    const badOutput = await runCLI(['list', 'vms', '-o', 'xml'], env);
    assert.equal(badOutput.code, 2);
    assert.match(badOutput.stderr, /--output must be one of table, json, yaml/);
    // The controller validates too: the field is named.
    const invalid = await runCLI(['create', 'vm', 'bad name', '--image', 'i'], env);
    assert.equal(invalid.code, 1);
    assert.match(invalid.stderr, /field "name" must be a name: letters, digits/);

    // Workers and cluster settings.
    await cli('set', 'cluster-settings', '--scheduler-profile', 'distribute-load');
    assert.match(await cli('get', 'cluster-settings'), /scheduler profile:\s+distribute-load/);
    assert.equal(JSON.parse(await cli('list', 'workers', '-o', 'json')).length, 0);
    assert.match((await runCLI(['--help'], env)).stdout, /Usage: orchard/);
  } finally {
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  }
});

test('usage errors are one line and a hint, not the whole help; exit code 2', async () => {
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const typo = await runCLI(['lst', 'vms'], env);
  assert.equal(typo.code, 2);
  assert.equal(typo.stdout, '');
  assert.equal(typo.stderr, `orchard: unknown command 'lst'. Did you mean 'list'?\nrun "orchard --help" for the commands\n`);
  const sub = await runCLI(['list', 'vmz'], env);
  assert.equal(sub.code, 2);
  assert.equal(sub.stderr, `orchard: unknown command 'vmz'. Did you mean 'vms'?\nrun "orchard list --help" for the subcommands\n`);
  // A leaf command: its usage line, not its help.
  const missing = await runCLI(['get', 'vm'], env);
  assert.equal(missing.code, 2);
  assert.equal(missing.stderr, `orchard: missing required argument 'name'\nusage: orchard get vm [options] <name>\nrun "orchard get vm --help" for more\n`);
  const flag = await runCLI(['list', 'vms', '--qiet'], env);
  assert.equal(flag.code, 2);
  assert.match(flag.stderr, /^orchard: unknown option '--qiet'. Did you mean '--quiet'\?\n/);
  for (const r of [typo, sub, missing, flag]) assert.doesNotMatch(r.stderr, /Options:|Commands:/, 'no help text');
  // Asking for help still prints it, with exit code 0.
  const help = await runCLI(['list', '--help'], env);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Commands:/);
});

test('a controller that cannot be reached is named, with its context and URL', async () => {
  const dataDir = tempDir();
  const home = tempDir('orchard-home-');
  const env = { ORCHARD_HOME: home };
  const ctl = await spawnController(dataDir);
  try {
    const created = await runCLI(['context', 'create', ctl.url, '--name', 'dev', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', ctl.fingerprint], env);
    assert.equal(created.code, 0, created.stderr);
  } finally {
    await ctl.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
  // The controller is gone: its port refuses connections.
  const r = await runCLI(['list', 'vms'], env);
  assert.equal(r.code, 1);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr, `orchard: cannot reach the controller of context "dev" at ${ctl.url}: connection refused (is it running?)\n`);
  // Through ORCHARD_URL there is no context to name: the URL alone.
  const env2 = await runCLI(['list', 'workers'], { ...env, ORCHARD_URL: ctl.url });
  assert.equal(env2.code, 1);
  assert.equal(env2.stderr, `orchard: cannot reach the controller at ${ctl.url}: connection refused (is it running?)\n`);
  // A plain HTTP server where TLS was expected, and a host that does not exist.
  const plain = createServer((_req, res) => res.end('hello'));
  await new Promise<void>((r) => plain.listen(0, '127.0.0.1', r));
  try {
    const url = `https://127.0.0.1:${(plain.address() as AddressInfo).port}`;
    const r2 = await runCLI(['list', 'vms'], { ...env, ORCHARD_URL: url });
    assert.equal(r2.stderr, `orchard: cannot reach the controller at ${url}: it does not speak TLS (is it an http:// controller, run with --insecure-no-tls?)\n`);
  } finally {
    plain.close();
  }
  const nohost = await runCLI(['list', 'vms'], { ...env, ORCHARD_URL: 'https://no-such-host.invalid:6120' });
  // (ENOTFOUND, or EAI_AGAIN on a machine without a DNS server)
  assert.match(nohost.stderr, /^orchard: cannot reach the controller at https:\/\/no-such-host\.invalid:6120: (no such host|cannot resolve) "no-such-host\.invalid"/);
  rmSync(home, { recursive: true, force: true });
});
