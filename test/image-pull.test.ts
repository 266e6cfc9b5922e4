// Pre-pulls (Orchard addition): POST /v1/images/pull sends pullImageAction to every matching connected
// worker that declared it (and says which matched but were offline or could not), and `orchard image
// pull` follows the workers' records over a watch, printing a line per change of each worker's pull,
// until every worker asked is done or failed. The workers are driven by hand over the real watch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { WebSocket } from 'ws';
import type { ImagePullAnswer, Worker } from '../src/api/schemas.ts';
import { ADMIN_TOKEN, inProcessController, ORCHARD_BIN, rawRequest, runCLI, tempDir, waitFor } from './helpers.ts';
import { upgrade } from './security/attack.ts';

type Cluster = Awaited<ReturnType<typeof inProcessController>>;
const ADMIN: [string, string] = ['bootstrap-admin', ADMIN_TOKEN];
const IMAGE = 'team/ubuntu:24.04';

/** A worker driven by hand: registered (with `capabilities`, if any), its watch open unless `offline`, its frames kept. */
async function fakeWorker(c: Cluster, name: string, labels: Record<string, string>, capabilities?: string[], offline = false) {
  const reg = await rawRequest(c.ctl, 'POST', '/v1/workers', { auth: ADMIN, body: JSON.stringify({ name, labels, capabilities }) });
  assert.equal(reg.status, 200, reg.body);
  const frames: string[] = [];
  let ws: WebSocket | undefined;
  if (!offline) {
    const up = await upgrade(c.ctl, `/v1/rpc/watch?workerName=${name}`, { auth: ADMIN });
    assert.equal(up.status, 101, up.body);
    ws = up.ws!;
    ws.on('message', (data: Buffer) => frames.push(data.toString()));
  }
  return {
    frames,
    pulls: () => frames.filter((f) => f.includes('pullImageAction')).map((f) => JSON.parse(f) as unknown),
    report: async (pull: { image: string; state: string; message?: string }, images?: string[]) => {
      const res = await rawRequest(c.ctl, 'POST', `/v1/workers/${name}/images`, { auth: ADMIN, body: JSON.stringify({ pull, images }) });
      assert.equal(res.status, 200, res.body);
    },
    close: () => ws?.close(),
  };
}

/** `orchard` as a child, its output readable while it runs. */
function orchard(args: string[], env: Record<string, string>) {
  const proc = spawn(ORCHARD_BIN, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((r) => proc.once('close', (code) => r(code ?? -1)));
  return { out: () => stdout, err: () => stderr, exited };
}

test('POST /v1/images/pull asks the matching connected workers that declared pullImageAction, says which it did not ask, and records the pull', async () => {
  const c = await inProcessController();
  try {
    const a = await fakeWorker(c, 'a', { pool: 'x' }, ['pullImageAction']);
    const old = await fakeWorker(c, 'old', { pool: 'x' });
    const away = await fakeWorker(c, 'away', { pool: 'x' }, ['pullImageAction'], true);
    const other = await fakeWorker(c, 'other', { pool: 'y' }, ['pullImageAction']);
    const res = await rawRequest(c.ctl, 'POST', '/v1/images/pull', { auth: ADMIN, body: JSON.stringify({ image: IMAGE, labels: { pool: 'x' } }) });
    assert.equal(res.status, 200, res.body);
    assert.deepEqual(res.json as ImagePullAnswer, { image: IMAGE, asked: ['a'], offline: ['away'], unsupported: ['old'] });
    await waitFor('the instruction', () => a.pulls().length === 1);
    assert.deepEqual(a.pulls(), [{ pullImageAction: { image: IMAGE } }]);
    const record = (await c.admin.getWorker('a')).imagePulls;
    assert.deepEqual(record?.map((p) => [p.image, p.state, p.message]), [[IMAGE, 'pulling', 'asked to pull']]);
    await new Promise((r) => setTimeout(r, 100));
    for (const w of [old, away, other]) assert.equal(w.pulls().length, 0, 'no one else was sent one');
    assert.ok(old.frames.length > 0 && old.frames.every((f) => f.startsWith('{"syncVMsAction"')), 'an upstream-like worker gets only syncs');

    // Only the worker's own account reports for it; held images replace the list.
    await c.admin.createServiceAccount({ name: 'intruder', token: 'intruder-token', roles: ['compute:write'] });
    const refused = await rawRequest(c.ctl, 'POST', '/v1/workers/a/images', { auth: ['intruder', 'intruder-token'], body: JSON.stringify({ images: ['evil'] }) });
    assert.equal(refused.status, 403, refused.body);
    await a.report({ image: IMAGE, state: 'done', message: 'pulled' }, [IMAGE, IMAGE, 'sha256:' + 'b'.repeat(64)]);
    const w = await c.admin.getWorker('a');
    assert.deepEqual(w.images, [IMAGE, 'sha256:' + 'b'.repeat(64)]);
    assert.deepEqual(w.imagePulls?.map((p) => [p.state, p.message]), [['done', 'pulled']]);
    const bad = await rawRequest(c.ctl, 'POST', '/v1/images/pull', { auth: ADMIN, body: JSON.stringify({ image: 'two words' }) });
    assert.equal(bad.status, 400, bad.body);
    for (const x of [a, old, away, other]) x.close();
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('orchard image pull prints each worker\'s progress as it comes (from the watch) and ends when all are done; a failure exits 1', async () => {
  const c = await inProcessController();
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  try {
    const created = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(created.code, 0, created.stderr);
    const w1 = await fakeWorker(c, 'w1', { pool: 'x' }, ['pullImageAction']);
    const w2 = await fakeWorker(c, 'w2', { pool: 'x' }, ['pullImageAction']);
    await fakeWorker(c, 'legacy', { pool: 'x' });

    const run = orchard(['image', 'pull', IMAGE, '--label', 'pool=x'], env);
    await waitFor('both asked', () => w1.pulls().length === 1 && w2.pulls().length === 1, 20_000);
    // Each step waits until the CLI has shown the one before: every change is a line of its own.
    const steps = [
      'pulling team/ubuntu:24.04: 37 % of 612 MiB, 110 MiB/s, about 4 s left',
      'pulling team/ubuntu:24.04: 74 % of 612 MiB, 112 MiB/s, about 2 s left',
    ];
    for (const message of steps) {
      for (const [name, w] of [['w1', w1], ['w2', w2]] as const) {
        await w.report({ image: IMAGE, state: 'pulling', message });
        await waitFor(`the CLI to show ${name}'s ${message}`, () => run.out().includes(`${name}: ${message}\n`), 10_000);
      }
    }
    await w1.report({ image: IMAGE, state: 'done', message: 'pulled team/ubuntu:24.04 (612 MiB in 6 s)' }, [IMAGE]);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(!run.out().includes('w2: done'), 'still waiting for w2');
    await w2.report({ image: IMAGE, state: 'done', message: 'pulled team/ubuntu:24.04 (612 MiB in 5 s)' }, [IMAGE]);
    assert.equal(await run.exited, 0, run.err());
    // The initial "asked to pull" shows when the watch starts before a worker's first report.
    const lines = run.out().split('\n').filter((l) => l && !l.endsWith(': asked to pull'));
    assert.deepEqual(lines, [
      `w1: ${steps[0]}`,
      `w2: ${steps[0]}`,
      `w1: ${steps[1]}`,
      `w2: ${steps[1]}`,
      'w1: done: pulled team/ubuntu:24.04 (612 MiB in 6 s)',
      'w2: done: pulled team/ubuntu:24.04 (612 MiB in 5 s)',
    ]);
    assert.match(run.err(), /^legacy: not asked: the worker does not pull on request/m);
    assert.deepEqual((await c.admin.getWorker('w1')).images, [IMAGE]);

    // Again, with one failing, as JSON: progress on stderr, the per-worker result on stdout, exit 1.
    const again = orchard(['image', 'pull', IMAGE, '--label', 'pool=x', '-o', 'json'], env);
    await waitFor('both asked again', () => w1.pulls().length === 2 && w2.pulls().length === 2, 20_000);
    await w1.report({ image: IMAGE, state: 'done', message: 'already there' });
    await w2.report({ image: IMAGE, state: 'failed', message: 'registry answered 401 Unauthorized' });
    assert.equal(await again.exited, 1);
    assert.deepEqual(JSON.parse(again.out()), {
      image: IMAGE,
      workers: [
        { worker: 'w1', state: 'done', message: 'already there' },
        { worker: 'w2', state: 'failed', message: 'registry answered 401 Unauthorized' },
      ],
      offline: [],
      unsupported: ['legacy'],
    });
    assert.match(again.err(), /^w2: failed: registry answered 401 Unauthorized$/m);
    assert.match(again.err(), /^orchard: 1 of 2 workers failed to pull team\/ubuntu:24.04: w2$/m);

    // No worker that can be asked: an error at once.
    const none = await runCLI(['image', 'pull', IMAGE, '--label', 'pool=nowhere'], env);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no worker matches the labels/);
    w1.close();
    w2.close();
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('a worker deleted while it pulls ends its part as failed', async () => {
  const c = await inProcessController();
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  try {
    await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], env);
    const w = await fakeWorker(c, 'gone', {}, ['pullImageAction']);
    const run = orchard(['image', 'pull', IMAGE], env);
    await waitFor('asked', () => w.pulls().length === 1, 20_000);
    await w.report({ image: IMAGE, state: 'pulling', message: 'pulling team/ubuntu:24.04: 5 %' });
    await waitFor('shown', () => run.out().includes('gone: pulling team/ubuntu:24.04: 5 %'), 10_000);
    await c.admin.deleteWorker('gone');
    assert.equal(await run.exited, 1);
    assert.match(run.out(), /^gone: failed: the worker was deleted$/m);
    const list = (await c.admin.listWorkers()) as Worker[];
    assert.equal(list.length, 0);
  } finally {
    await c.close();
    c.cleanup();
  }
});
