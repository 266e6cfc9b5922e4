// powerState and `suspendable` as upstream 0.55's controller checks them (internal/controller/api_vms.go,
// updateVMSpec), with the whole record PUT back as upstream's client library does (GET, change, PUT;
// no Content-Type; its User-Agent "Orchard/unknown-unknown": "Orchard/0…" would be an old worker's
// state report, as upstream tells them apart). Upstream answers 412 to each refusal; here a change that conflicts with the VM's
// current state is 409 and a value no VM may have is 400 (README: upstream compatibility).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { VM } from '../../src/api/schemas.ts';
import { ADMIN_TOKEN, inProcessController, placeOn, rawRequest } from '../helpers.ts';

const UA = { 'user-agent': 'Orchard/unknown-unknown' };

describe('powerState and suspendable (upstream rules)', () => {
  let c: Awaited<ReturnType<typeof inProcessController>>;
  const go = (method: string, path: string, body?: object) =>
    rawRequest(c.ctl, method, path, { auth: ['bootstrap-admin', ADMIN_TOKEN], body: body === undefined ? undefined : JSON.stringify(body), contentType: null, headers: UA });
  /** Upstream's client: GET the VM, change it, PUT the whole record back. */
  const change = async (name: string, fields: Partial<VM>) => {
    const got = await go('GET', `/v1/vms/${name}`);
    assert.equal(got.status, 200, got.body);
    return go('PUT', `/v1/vms/${name}`, { ...(got.json as VM), ...fields });
  };
  const create = async (name: string, fields: Partial<VM> = {}) => {
    const r = await go('POST', '/v1/vms', { name, image: 'ghcr.io/cirruslabs/macos-tahoe-base:latest', os: 'darwin', arch: 'arm64', runtime: 'tart', ...fields });
    assert.equal(r.status, 200, r.body);
    return r.json as VM;
  };
  const refused = (r: { status: number; json: unknown; body: string }, status: number, message: RegExp) => {
    assert.equal(r.status, status, r.body);
    assert.match((r.json as { message: string }).message, message);
  };

  before(async () => {
    c = await inProcessController();
  });
  after(async () => {
    await c.close();
    c.cleanup();
  });

  test('a VM starts running whatever powerState the create sends, as upstream', async () => {
    const vm = await create('created-stopped', { powerState: 'stopped' });
    assert.equal(vm.powerState, 'running');
    refused(await go('POST', '/v1/vms', { name: 'bad-power', image: 'img', powerState: 'paused' }), 400, /field "powerState" must be one of "running", "stopped", "suspended"/);
  });

  test('only a VM that is suspendable already may be suspended', async () => {
    await create('plain');
    refused(await change('plain', { powerState: 'suspended' }), 409, /field "powerState": only suspendable VMs can be suspended/);
    // Upstream checks the stored VM: turning suspendable on in the same request does not make it suspendable yet.
    refused(await change('plain', { suspendable: true, powerState: 'suspended' }), 409, /only suspendable VMs can be suspended/);
    const on = await change('plain', { suspendable: true });
    assert.equal(on.status, 200, on.body);
    assert.equal((on.json as VM).suspendable, true);
  });

  test('a suspendable VM stays suspendable, keeps its Softnet setting, and is suspended and resumed', async () => {
    const vm = await create('suspendable', { suspendable: true });
    assert.equal(vm.generation, 0);
    refused(await change('suspendable', { suspendable: false }), 409, /field "suspendable": cannot be turned off/);
    refused(await change('suspendable', { netSoftnet: true }), 409, /field "netSoftnet": cannot be changed for a suspendable VM/);
    refused(await change('suspendable', { netSoftnetAllow: ['10.0.0.0/8'] }), 409, /field "netSoftnet"/);
    const suspended = await change('suspendable', { powerState: 'suspended' });
    assert.equal(suspended.status, 200, suspended.body);
    assert.deepEqual([(suspended.json as VM).powerState, (suspended.json as VM).generation], ['suspended', 1]);
    // From suspended (a terminal power state upstream) only back to running.
    refused(await change('suspendable', { powerState: 'stopped' }), 409, /field "powerState": VM "suspendable" is suspended: it can only be started again/);
    refused(await change('suspendable', { labels: { pool: 'a' } }), 409, /can only be started again/);
    const same = await change('suspendable', {});
    assert.equal(same.status, 200, 'an unchanged record is no change');
    const resumed = await change('suspendable', { powerState: 'running' });
    assert.equal(resumed.status, 200, resumed.body);
    assert.deepEqual([(resumed.json as VM).powerState, (resumed.json as VM).generation], ['running', 2]);
  });

  test('a stopped VM changes only by being started again', async () => {
    await create('stoppable');
    const stopped = await change('stoppable', { powerState: 'stopped' });
    assert.equal(stopped.status, 200, stopped.body);
    refused(await change('stoppable', { powerState: 'suspended' }), 409, /only suspendable VMs|can only be started again/);
    refused(await change('stoppable', { cpu: 2 }), 409, /VM "stoppable" is stopped: it can only be started again/);
    const started = await change('stoppable', { powerState: 'running', cpu: 2 });
    assert.equal(started.status, 200, started.body);
    assert.deepEqual([(started.json as VM).powerState, (started.json as VM).cpu], ['running', 2]);
  });

  test("a failed VM's spec does not change (a terminal state)", async () => {
    await create('doomed');
    await placeOn(c.admin, 'w-doomed', 'doomed');
    await c.admin.updateVMState('doomed', { status: 'failed', status_message: 'tart run exited' });
    refused(await change('doomed', { powerState: 'stopped' }), 409, /VM "doomed" has failed \(a terminal state\): its spec cannot change/);
    refused(await change('doomed', { cpu: 8 }), 409, /has failed/);
  });

  test("fields a runtime cannot carry out are refused, naming the field (upstream's vetu rules); qemu VMs may be suspendable, under the same rules", async () => {
    refused(await go('POST', '/v1/vms', { name: 'vetu-dirs', image: 'img', os: 'linux', runtime: 'vetu', hostDirs: [{ name: 'src', path: '/tmp' }] }), 400, /field "hostDirs": runtime "vetu" does not support it/);
    refused(await go('POST', '/v1/vms', { name: 'vetu-softnet', image: 'img', os: 'linux', runtime: 'vetu', netSoftnet: true }), 400, /field "netSoftnet": runtime "vetu"/);
    refused(await go('POST', '/v1/vms', { name: 'vetu-susp', image: 'img', os: 'linux', runtime: 'vetu', suspendable: true }), 400, /field "suspendable": runtime "vetu"/);
    const susp = await go('POST', '/v1/vms', { name: 'qemu-susp', image: 'img', os: 'linux', runtime: 'qemu', suspendable: true });
    assert.equal(susp.status, 200, susp.body);
    assert.equal((susp.json as VM).suspendable, true);
    refused(await change('qemu-susp', { suspendable: false }), 409, /field "suspendable": cannot be turned off/);
    const q = await go('POST', '/v1/vms', { name: 'qemu-ok', image: 'img', os: 'linux', runtime: 'qemu' });
    assert.equal(q.status, 200, q.body);
    refused(await change('qemu-ok', { powerState: 'suspended' }), 409, /only suspendable VMs can be suspended/);
    const on = await change('qemu-ok', { suspendable: true });
    assert.equal(on.status, 200, on.body);
  });
});
