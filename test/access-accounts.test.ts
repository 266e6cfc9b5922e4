// Authentication keeps the accounts it reads in memory (every request signs in): a committed change of
// an account (new token, roles, deletion) is seen by the next sign-in, also when it overtakes a read.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { pino } from 'pino';
import { Access } from '../src/controller/access.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import type { Store } from '../src/controller/store/store.ts';
import { tempDir } from './helpers.ts';

const logger = pino({ level: 'silent' });

test('a changed token, changed roles and a deleted account are seen at the next sign-in; the accounts are read once', async () => {
  const store = new SQLiteStore(join(tempDir(), 'orchard.db'));
  let reads = 0;
  const counting: Store = Object.create(store, { get: { value: (kind: never, name: string) => (reads++, store.get(kind, name)) } });
  const access = new Access(counting, logger, false);
  try {
    await store.create('serviceAccounts', { name: 'ci', token: 'one', roles: ['compute:read'] });
    assert.equal((await access.authenticate({ name: 'ci', token: 'one' }, '127.0.0.1')).name, 'ci');
    assert.equal((await access.authenticate({ name: 'ci', token: 'one' }, '127.0.0.1')).name, 'ci');
    assert.equal(reads, 1, 'the second sign-in came from memory');
    await store.update('serviceAccounts', 'ci', (a) => ({ ...a, token: 'two', roles: ['compute:write'] }));
    await assert.rejects(access.authenticate({ name: 'ci', token: 'one' }, '127.0.0.1'), /invalid service account name or token/);
    assert.deepEqual((await access.authenticate({ name: 'ci', token: 'two' }, '127.0.0.1')).roles, ['compute:write']);
    await store.delete('serviceAccounts', 'ci');
    await assert.rejects(access.authenticate({ name: 'ci', token: 'two' }, '127.0.0.1'), /invalid service account name or token/);
  } finally {
    store.close();
  }
});

test('a read that a change overtakes is not kept: the next sign-in reads again', async () => {
  const store = new SQLiteStore(join(tempDir(), 'orchard.db'));
  let hold: Promise<void> | undefined;
  // A store whose reads take a while (as a remote database's would): the change commits meanwhile.
  const slow: Store = Object.create(store, {
    get: {
      value: async (kind: never, name: string) => {
        const value = await store.get(kind, name);
        await hold;
        return value;
      },
    },
  });
  const access = new Access(slow, logger, false);
  try {
    await store.create('serviceAccounts', { name: 'ci', token: 'one', roles: ['compute:read'] });
    let release!: () => void;
    hold = new Promise((r) => (release = r));
    const signingIn = access.authenticate({ name: 'ci', token: 'one' }, '127.0.0.1');
    await store.update('serviceAccounts', 'ci', (a) => ({ ...a, token: 'two' }));
    release();
    hold = undefined;
    assert.equal((await signingIn).token, 'one', 'read before the change: signed in with the token then valid');
    await assert.rejects(access.authenticate({ name: 'ci', token: 'one' }, '127.0.0.1'), /invalid service account name or token/);
  } finally {
    store.close();
  }
});
