// `orchard stop|start|suspend vm`: the powerState is set, the command waits until the worker has carried
// it out, and `list vms` shows a VM powered off on request as stopped (the API keeps upstream's
// `pending`), not as a VM waiting for a worker.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { VM } from '../src/api/schemas.ts';
import { ADMIN_TOKEN, runCLI, tempDir, waitFor } from './helpers.ts';
import { clusterWithVM } from './security/attack.ts';

test('stop vm, start vm, suspend vm: set, waited for, listed as stopped', async () => {
  const { c, close } = await clusterWithVM('box');
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const cli = (...args: string[]) => runCLI(args, env);
  try {
    const created = await cli('context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!);
    assert.equal(created.code, 0, created.stderr);
    const listed = async () => (await cli('list', 'vms')).stdout;

    const stop = await cli('stop', 'vm', 'box');
    assert.equal(stop.code, 0, stop.stderr);
    assert.match(stop.stderr, /VM box stopped\n$/);
    // Carried out by the worker when the command returns: the API's status is upstream's pending.
    const vm = await c.admin.getVM('box');
    assert.equal(vm.powerState, 'stopped');
    assert.equal(vm.status, 'pending');
    assert.ok((vm.observedGeneration ?? -1) >= (vm.generation ?? 0));
    // Placed on a synthetic (non-Tart) worker: a Linux VM of the worker's architecture, not upstream's darwin/arm64 defaults.
    assert.deepEqual([vm.os, vm.arch], ['linux', process.arch === 'x64' ? 'amd64' : process.arch]);
    assert.match(await listed(), /^box\s+synthetic\s+\S+\s+\S+\s+stopped\s+syn-1\s/m);
    assert.match((await cli('get', 'vm', 'box')).stdout, /^status:\s+stopped$/m);
    assert.equal((JSON.parse((await cli('get', 'vm', 'box', '-o', 'json')).stdout) as VM).status, 'pending', 'JSON keeps the API status');

    const again = await cli('stop', 'vm', 'box');
    assert.equal(again.code, 0);
    assert.match(again.stderr, /already set to stopped/);

    const start = await cli('start', 'vm', 'box');
    assert.equal(start.code, 0, start.stderr);
    assert.equal((await c.admin.getVM('box')).status, 'running');
    assert.match(await listed(), /^box\s+synthetic\s+\S+\s+\S+\s+running\s+syn-1\s/m);

    // Only a suspendable VM can be suspended: the controller's reason, exit code 1.
    const refused = await cli('suspend', 'vm', 'box');
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /only suspendable VMs can be suspended/);

    // --wait 0: set and return; the list says "stopping" until the worker has done it.
    const quick = await cli('stop', 'vm', 'box', '--wait', '0');
    assert.equal(quick.code, 0, quick.stderr);
    assert.match(await listed(), /^box\s.*\s(stopping|stopped)\s/m);
    await waitFor('box listed as stopped', async () => /^box\s.*\sstopped\s/m.test(await listed()), 10_000, 100);

    const unknown = await cli('start', 'vm', 'nope');
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /VM "nope" not found/);
  } finally {
    await close();
  }
});
