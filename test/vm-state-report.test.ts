// A worker's state report applied to a VM (domain/vms.ts applyStateReport): a report that changes
// nothing gives back the same object, so the controller writes and publishes nothing for it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { applyStateReport, newVM } from '../src/controller/domain/vms.ts';
import type { VM } from '../src/api/schemas.ts';

const NOW = '2026-11-30T12:00:00.000Z';
const running = (): VM => ({
  ...newVM({ name: 'a', image: 'synthetic', cpu: 1, memory: 512 } as VM),
  worker: 'w1',
  status: 'running',
  status_message: 'VM is running',
  conditions: [{ type: 'running', state: 'true' }],
  started_at: '2026-11-30T11:00:00.000Z',
});

test('a report that repeats the VM state returns the same object (nothing to write)', () => {
  const vm = running();
  assert.equal(applyStateReport(vm, {}, NOW), vm);
  assert.equal(applyStateReport(vm, { status: 'running', status_message: 'VM is running', conditions: [{ type: 'running', state: 'true' }], localName: vm.localName }, NOW), vm);
});

test('each field a report changes makes a new VM with only that field changed', () => {
  const vm = running();
  const changes: [keyof VM, Parameters<typeof applyStateReport>[1]][] = [
    ['status_message', { status_message: 'still booting' }],
    ['observedGeneration', { observedGeneration: 7 }],
    ['conditions', { conditions: [{ type: 'running', state: 'false' }] }],
    ['localName', { localName: 'orchard-other' }],
    ['tartName', { tartName: 'orchard-other' }],
    ['image_fqn', { image_fqn: 'ghcr.io/x/y@sha256:' + '0'.repeat(64) }],
    ['status', { status: 'failed' }],
  ];
  for (const [field, report] of changes) {
    const next = applyStateReport(vm, report, NOW);
    assert.notEqual(next, vm, `a new ${field} is a change`);
    const without = (v: VM) => Object.fromEntries(Object.entries(v).filter(([k]) => k !== field));
    assert.deepEqual(without(next), without(vm), `only ${field} changed`);
  }
});

test('started_at is set when the VM starts running, and kept after', () => {
  const pending = { ...running(), status: 'pending' as const, started_at: undefined };
  const started = applyStateReport(pending, { status: 'running' }, NOW);
  assert.equal(started.started_at, NOW);
  assert.equal(applyStateReport(started, { status: 'running' }, '2026-11-30T13:00:00.000Z'), started);
});
