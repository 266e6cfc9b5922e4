// The worker reads the controller's instructions through one typed parser (src/api/worker-protocol.ts):
// upstream's frames and ours are understood; anything else (not JSON, wrong types, unknown actions)
// is ignored rather than half-trusted.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseInstruction, parseInstructionWith, syncVMsFrame } from '../src/api/worker-protocol.ts';

test('worker instructions: upstream and ours parsed, malformed frames ignored', () => {
  assert.deepEqual(parseInstruction('{"syncVMsAction":{}}'), { syncVMsAction: { vms: undefined } }, "upstream's sync carries no VMs");
  assert.deepEqual(parseInstruction('{"syncVMsAction":null}'), { syncVMsAction: { vms: undefined } });
  assert.deepEqual(parseInstruction(syncVMsFrame('[{"name":"a"}]')), { syncVMsAction: { vms: [{ name: 'a' }] } });
  assert.deepEqual(parseInstruction('{"portForwardAction":{"session":"s","vmUID":"u","port":22}}'), { portForwardAction: { session: 's', vmUID: 'u', port: 22 } });
  assert.deepEqual(parseInstruction('{"portForwardAction":{"session":"s","port":22}}'), { portForwardAction: { session: 's', vmUID: '', port: 22 } }, 'no VM: the worker host');
  assert.deepEqual(parseInstruction('{"resolveIPAction":{"session":"s","vmUID":"u"}}'), { resolveIPAction: { session: 's', vmUID: 'u' } });
  for (const bad of ['not json', '[]', 'null', '{}', '{"portForwardAction":{"session":1,"port":22}}', '{"portForwardAction":{"session":"s","port":"22"}}', '{"resolveIPAction":{"session":"s"}}', '{"somethingNew":{}}']) {
    assert.equal(parseInstruction(bad), undefined, bad);
  }
});

test("our instructions reach only a worker that declared them; malformed credentials are ignored whole", () => {
  const creds = '{"registriesAction":{"registries":[{"host":"ghcr.io","username":"u","password":"p","insecure":false,"ca":"PEM"},{"host":"r.local:5000"}]}}';
  const pull = '{"pullImageAction":{"image":"team/ubuntu:24.04"}}';
  assert.equal(parseInstruction(creds), undefined, 'a worker that declared nothing does not act on them');
  assert.equal(parseInstruction(pull), undefined);
  const both = ['registriesAction', 'pullImageAction'];
  assert.deepEqual(parseInstructionWith(creds, both), {
    registriesAction: { registries: [{ host: 'ghcr.io', username: 'u', password: 'p', insecure: false, ca: 'PEM' }, { host: 'r.local:5000' }] },
  });
  assert.deepEqual(parseInstructionWith('{"registriesAction":{"registries":[]}}', both), { registriesAction: { registries: [] } }, 'an empty list clears them');
  assert.deepEqual(parseInstructionWith(pull, both), { pullImageAction: { image: 'team/ubuntu:24.04' } });
  assert.equal(parseInstructionWith(pull, ['registriesAction']), undefined, 'only what was declared');
  assert.deepEqual(parseInstructionWith('{"syncVMsAction":{}}', both), { syncVMsAction: { vms: undefined } });
  for (const bad of [
    '{"registriesAction":{}}',
    '{"registriesAction":{"registries":[{"username":"u"}]}}',
    '{"registriesAction":{"registries":[{"host":"ghcr.io"},{"host":"x","password":1}]}}',
    '{"pullImageAction":{}}',
    '{"pullImageAction":{"image":""}}',
  ]) {
    assert.equal(parseInstructionWith(bad, both), undefined, bad);
  }
});
