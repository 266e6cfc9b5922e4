// The store's durability promise with its fsync off the event loop (src/controller/store/sqlite.ts,
// `flush`): a write is acknowledged only after an fsync of the WAL that ran in another thread and
// finished first; acknowledged writes survive kill -9; a read never shows a change before it is
// durable. (A power cut cannot be tested here: the order of the system calls is what can be.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync, rmSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import type { VM } from '../src/api/schemas.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { ADMIN_TOKEN, inProcessController, rawRequest, tempDir } from './helpers.ts';

const WRITER = join(import.meta.dirname, 'fixtures', 'store-writer.ts');
const vm = (name: string) => ({ name, uid: `uid-${name}`, image: 'debian', status: 'pending' }) as VM;

test('a write is answered only after an fsync of the WAL, made by another thread than the event loop, has returned', () => {
  const dir = tempDir();
  try {
    const log = join(dir, 'strace.log');
    const db = join(dir, 'orchard.db');
    const run = spawnSync('strace', ['-f', '-qq', '-s', '256', '-o', log, '-e', 'trace=fsync,fdatasync,pwrite64,write', process.execPath, WRITER, db, '5'], { encoding: 'utf8' });
    assert.equal(run.status, 0, run.stderr);
    const lines = readFileSync(log, 'utf8').split('\n');
    const start = lines.findIndex((l) => l.includes('write(1, "START'));
    const [, pid, wal] = /START pid=(\d+) wal=([\d,]+)/.exec(lines[start])!;
    const walFds = new Set(wal.split(','));
    const tid = (l: string) => l.split(/\s+/)[0];
    const fdOf = (l: string) => /(?:fsync|fdatasync|pwrite64)\((\d+)/.exec(l)?.[1];
    let acks = 0;
    let lastAck = start;
    for (let i = start + 1; i < lines.length; i++) {
      if (!lines[i].includes('write(1, "ACK')) continue;
      acks++;
      const between = lines.slice(lastAck + 1, i);
      // No fsync on the event loop's thread between two answers.
      assert.deepEqual(between.filter((l) => tid(l) === pid && /fsync|fdatasync/.test(l)), [], 'the event loop never waits for an fsync');
      // The batch's frames are written to the WAL (by the event loop), then a thread fsyncs the WAL,
      // and the fsync has returned (its complete or resumed line) before the answer is written.
      const frames = between.findIndex((l) => tid(l) === pid && l.includes('pwrite64(') && walFds.has(fdOf(l)!));
      assert.ok(frames >= 0, `ACK ${acks}: its commit wrote WAL frames before the answer:\n${between.join('\n')}`);
      const synced = between.slice(frames).find((l) => tid(l) !== pid && /^\d+\s+(fsync\(\d+\)\s+=\s+0|<\.\.\. fsync resumed>.*=\s+0)/.test(l));
      assert.ok(synced, `ACK ${acks}: an fsync by another thread returned between the WAL write and the answer:\n${between.join('\n')}`);
      if (/^\d+\s+fsync\(/.test(synced)) assert.ok(walFds.has(fdOf(synced)!), `the fsync is of the WAL: ${synced}`);
      lastAck = i;
    }
    assert.equal(acks, 5);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('WAL checkpoints run in another thread: the event loop never fsyncs the database, and the WAL only when it starts it over', () => {
  const dir = tempDir();
  try {
    const log = join(dir, 'strace.log');
    const db = join(dir, 'orchard.db');
    // 1,500 × 3 VMs of ≈ 2 kB: ≈ 40 MB of WAL frames, ten times the checkpoint threshold.
    const run = spawnSync('strace', ['-f', '-qq', '-s', '256', '-o', log, '-e', 'trace=fsync,fdatasync,write', process.execPath, WRITER, db, '1500', '2000'], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    assert.equal(run.status, 0, run.stderr);
    const lines = readFileSync(log, 'utf8').split('\n');
    const start = lines.findIndex((l) => l.includes('write(1, "START'));
    const end = lines.findIndex((l) => l.includes('write(1, "FDS'));
    const pid = /START pid=(\d+)/.exec(lines[start])![1];
    const [, wal, dbFds] = /FDS wal=([\d,]+) db=([\d,]+)/.exec(lines.find((l) => l.includes('write(1, "FDS'))!)!;
    const syncs = lines
      .slice(start + 1, end)
      .map((l) => /^(\d+)\s+(?:fsync|fdatasync)\((\d+)/.exec(l))
      .filter((m) => m !== null)
      .map(([, tid, fd]) => ({ main: tid === pid, fd }));
    const isDb = new Set(dbFds.split(','));
    const isWal = new Set(wal.split(','));
    assert.ok(syncs.some((s) => !s.main && isDb.has(s.fd)), 'a checkpoint (an fsync of the database) ran in another thread');
    // Before the final close (which checkpoints on this thread, after the last answer), none on the event loop.
    const lastAck = lines.findLastIndex((l) => l.includes('write(1, "ACK'));
    const mainSyncs = lines
      .slice(start + 1, lastAck)
      .map((l) => /^(\d+)\s+(?:fsync|fdatasync)\((\d+)/.exec(l))
      .filter((m) => m !== null && m[1] === pid)
      .map((m) => m![2]);
    assert.deepEqual(mainSyncs.filter((fd) => !isWal.has(fd)), [], 'the event loop never fsyncs the database');
    // The WAL header when SQLite starts the WAL over after a checkpoint (synchronous=NORMAL keeps that
    // sync): about once per 4 MB of WAL, against one fsync per commit before.
    const commits = syncs.filter((s) => !s.main && isWal.has(s.fd)).length;
    assert.ok(mainSyncs.length <= 20, `${mainSyncs.length} fsyncs of the WAL on the event loop (restarts), ${commits} in other threads`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('kill -9 of a writing process: every acknowledged write is in the database afterwards', async () => {
  const dir = tempDir();
  try {
    const db = join(dir, 'orchard.db');
    const child = spawn(process.execPath, [WRITER, db, '100000'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const acked: string[] = [];
    let buffered = '';
    await new Promise<void>((resolve) => {
      child.stdout.on('data', (chunk: Buffer) => {
        buffered += chunk.toString();
        const lines = buffered.split('\n');
        buffered = lines.pop()!;
        for (const l of lines) if (l.startsWith('ACK ')) acked.push(...l.slice(4).split(' '));
        if (acked.length >= 600 && child.exitCode === null) {
          child.kill('SIGKILL');
          resolve();
        }
      });
    });
    await new Promise((r) => child.once('exit', r));
    const store = new SQLiteStore(db);
    try {
      const names = new Set((await store.list('vms')).map((v) => v.name));
      const lost = acked.filter((n) => !names.has(n));
      assert.deepEqual(lost, [], 'no acknowledged write is lost');
      assert.ok(acked.length >= 600);
    } finally {
      store.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a read that sees a commit is answered only after that commit is durable (after its write is answered)', async () => {
  const dir = tempDir();
  const store = new SQLiteStore(join(dir, 'orchard.db'));
  try {
    const order: string[] = [];
    const created = store.create('vms', vm('a')).then(() => order.push('create answered'));
    // Two turns later the batch is committed (setImmediate), its fsync possibly still running.
    const read = new Promise<void>((resolve) =>
      setImmediate(() => setImmediate(() => void store.get('vms', 'a').then((v) => (order.push(v ? 'read found it' : 'read missed it'), resolve())))),
    );
    await Promise.all([created, read]);
    assert.deepEqual(order, ['create answered', 'read found it']);
  } finally {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a commit that cannot be made durable fails, and so does every later call, instead of being answered as if it were on disk', async () => {
  const dir = tempDir();
  const db = join(dir, 'orchard.db');
  const store = new SQLiteStore(db);
  try {
    await store.create('vms', vm('a'));
    // The WAL removed behind SQLite's back: the commit's frames still go to the open (now nameless)
    // file, and fsyncing it makes nothing durable.
    unlinkSync(`${db}-wal`);
    await assert.rejects(store.create('vms', vm('b')), /cannot make its writes durable.*WAL file was removed/);
    await assert.rejects(store.create('vms', vm('c')), /cannot make its writes durable/);
    await assert.rejects(store.get('vms', 'a'), /cannot make its writes durable/);
  } finally {
    try {
      store.close();
    } catch {
      // closing a store without its WAL may fail too: not what this test is about
    }
    rmSync(dir, { recursive: true, force: true });
  }
});

test('through the API, a store that cannot make writes durable answers 503 saying so (not a 500), and nothing more is acknowledged', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'kept', image: 'img' });
    unlinkSync(join(c.dataDir, 'orchard.db-wal'));
    for (const [method, path, body] of [['POST', '/v1/vms', { name: 'lost', image: 'img' }], ['GET', '/v1/vms/kept', undefined]] as const) {
      const r = await rawRequest(c.ctl, method, path, { auth: ['bootstrap-admin', ADMIN_TOKEN], body: body && JSON.stringify(body) });
      assert.equal(r.status, 503, `${method} ${path}: ${r.body}`);
      assert.match((r.json as { message: string }).message, /cannot make its writes durable.*restart the controller/);
    }
  } finally {
    await c.close().catch(() => {});
    c.cleanup();
  }
});
