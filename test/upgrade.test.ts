// Upgrades: a newer orchard migrates an older data dir in one transaction (and says so in its log);
// an older orchard refuses a newer data dir with the version it needs, exits non-zero and changes
// nothing. test/fixtures/data-dir-v1 is what the release without a schema version marker wrote.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { cpSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { OrchardClient } from '../src/client/client.ts';
import { fileSchemaVersion, migrate, MIGRATIONS, SCHEMA_VERSION, userVersion, type Migration } from '../src/controller/store/schema.ts';
import { ADMIN_TOKEN, ROOT, spawnController, tempDir, waitFor } from './helpers.ts';

const FIXTURE_V1 = join(ROOT, 'test', 'fixtures', 'data-dir-v1');

/** Every file of `dir` with the SHA-256 of its bytes and its mode. */
function fingerprint(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of readdirSync(dir).sort()) {
    const path = join(dir, f);
    out[f] = `${createHash('sha256').update(readFileSync(path)).digest('hex')} ${(statSync(path).mode & 0o777).toString(8)} ${statSync(path).mtimeMs}`;
  }
  return out;
}

function copyOfFixture(): string {
  const dir = join(tempDir(), 'controller');
  cpSync(FIXTURE_V1, dir, { recursive: true });
  return dir;
}

test('the current controller starts on a data dir of the release without schema versions, migrates it, and finds everything', async () => {
  const fixtureBefore = fingerprint(FIXTURE_V1);
  const fixtureCluster = JSON.parse(readFileSync(join(FIXTURE_V1, 'cluster.json'), 'utf8')) as { clusterID: string };
  const dataDir = copyOfFixture();
  assert.equal(fileSchemaVersion(join(dataDir, 'orchard.db')), 0, 'the fixture has no marker');
  const ctl = await spawnController(dataDir, [], { ORCHARD_LOG_LEVEL: 'info' });
  const admin = new OrchardClient({ url: ctl.url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  try {
    await waitFor('the migration in the log', () => ctl.stdout().includes(`migrated orchard.db from schema version 1 to ${SCHEMA_VERSION}`), 5000);
    assert.equal((await admin.info()).clusterID, fixtureCluster.clusterID, 'the same cluster');

    const accounts = Object.fromEntries((await admin.listServiceAccounts()).map((a) => [a.name, a]));
    assert.deepEqual(Object.keys(accounts).sort(), ['bootstrap-admin', 'ci', 'viewer', 'worker']);
    assert.equal(accounts.ci.token, 'ci-token');
    assert.deepEqual(accounts.viewer.roles, ['compute:read']);
    // The old tokens still sign in.
    const ci = new OrchardClient({ url: ctl.url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'ci', serviceAccountToken: 'ci-token' });
    assert.equal((await ci.listVMs()).length, 4);
    ci.close();

    const workers = Object.fromEntries((await admin.listWorkers()).map((w) => [w.name, w]));
    assert.deepEqual(Object.keys(workers).sort(), ['host-1', 'host-2']);
    assert.deepEqual(workers['host-1'].labels, { rack: 'a' });
    assert.equal(workers['host-2'].scheduling_paused, true);
    assert.deepEqual(workers['host-1'].orphans?.map((o) => o.localName), ['orchard-stray']);

    const vms = Object.fromEntries((await admin.listVMs()).map((v) => [v.name, v]));
    assert.deepEqual(Object.keys(vms).sort(), ['build.1', 'pending-1', 'web-1', 'web-2']);
    assert.equal(vms['web-1'].status, 'running');
    assert.equal(vms['web-1'].worker, 'host-1');
    assert.equal(vms['web-1'].cpu, 2);
    assert.equal(vms['web-1'].startup_script?.script_content, 'echo hi');
    assert.equal(vms['web-2'].restart_policy, 'OnFailure');
    assert.equal(vms['build.1'].image, 'ghcr.io/cirruslabs/macos-sonoma-base:latest');
    assert.equal(vms['pending-1'].worker ?? '', '');
    const events = (await admin.listEvents('web-1')).events.map((e) => `${e.kind}: ${e.payload}`);
    assert.deepEqual(events, ['lifecycle: booting', 'lifecycle: running', 'startup-script-output: hi']);
    assert.equal((await admin.getClusterSettings()).schedulerProfile, 'distribute-load');

    // It keeps working: a write after the migration.
    await admin.createVM({ name: 'after-upgrade', image: 'debian-dev' });
  } finally {
    admin.close();
    await ctl.kill('SIGTERM');
  }
  assert.equal(fileSchemaVersion(join(dataDir, 'orchard.db')), SCHEMA_VERSION, 'the file header carries the new version');
  const cluster = JSON.parse(readFileSync(join(dataDir, 'cluster.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(cluster.schemaVersion, SCHEMA_VERSION);
  assert.deepEqual(fingerprint(FIXTURE_V1), fixtureBefore, 'the fixture itself is untouched');

  // A second start has nothing to migrate and still finds everything.
  const again = await spawnController(dataDir, [], { ORCHARD_LOG_LEVEL: 'info' });
  try {
    await waitFor('the log', () => again.stdout().includes('controller is listening'), 5000);
    assert.doesNotMatch(again.stdout(), /migrated orchard\.db/);
  } finally {
    await again.kill('SIGTERM');
  }
  rmSync(join(dataDir, '..'), { recursive: true, force: true });
});

test('an older orchard refuses a newer data dir, says which version it needs, exits non-zero and changes no byte', async () => {
  const dataDir = copyOfFixture();
  const first = await spawnController(dataDir);
  await first.kill('SIGTERM');
  // As a future release would leave it: a higher version in the header, and its release in cluster.json.
  const db = new DatabaseSync(join(dataDir, 'orchard.db'));
  db.exec(`PRAGMA user_version = ${SCHEMA_VERSION + 1}`);
  db.close();
  const cluster = JSON.parse(readFileSync(join(dataDir, 'cluster.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(join(dataDir, 'cluster.json'), JSON.stringify({ ...cluster, schemaVersion: SCHEMA_VERSION + 1, release: '9.9.9' }));
  const before = fingerprint(dataDir);

  let refusal = '';
  try {
    const ctl = await spawnController(dataDir);
    await ctl.kill('SIGTERM');
    assert.fail('the controller started on a newer data dir');
  } catch (err) {
    refusal = (err as Error).message;
  }
  assert.match(refusal, /controller exited with 1/, 'a non-zero exit');
  assert.match(refusal, new RegExp(`has schema version ${SCHEMA_VERSION + 1}, written by orchard 9\\.9\\.9, but this orchard knows schema versions up to ${SCHEMA_VERSION}: run orchard 9\\.9\\.9 or newer`));
  assert.match(refusal, /Nothing was changed/);
  assert.deepEqual(fingerprint(dataDir), before, 'every file of the data dir is as it was (bytes, mode, mtime), and no file was added');
  rmSync(join(dataDir, '..'), { recursive: true, force: true });
});

test('a migration is all or nothing: a failing step leaves the database exactly as it was', () => {
  const dir = tempDir();
  const path = join(dir, 'orchard.db');
  const db = new DatabaseSync(path);
  db.exec('PRAGMA journal_mode = WAL');
  assert.deepEqual(migrate(db, MIGRATIONS.slice(0, 1)), { from: 0, to: 1, unmarked: false });
  db.prepare(`INSERT INTO objects (kind, name, body) VALUES ('vms', 'a', '{}')`).run();
  const schemaBefore = db.prepare('SELECT type, name, sql FROM sqlite_master ORDER BY name').all();

  const failing: Migration[] = [
    ...MIGRATIONS,
    { to: SCHEMA_VERSION + 1, what: 'a new table', up: (d) => d.exec('CREATE TABLE extra (x)') },
    {
      to: SCHEMA_VERSION + 2,
      what: 'a step that fails half-way',
      up: (d) => {
        d.exec(`UPDATE objects SET body = '{"changed":true}'`);
        throw new Error('disk on fire');
      },
    },
  ];
  assert.throws(() => migrate(db, failing), new RegExp(`from schema version 1 to ${SCHEMA_VERSION + 2} failed at step ${SCHEMA_VERSION + 2} \\(a step that fails half-way\\): disk on fire\\. Nothing was changed`));
  assert.equal(userVersion(db), 1);
  assert.deepEqual(db.prepare('SELECT type, name, sql FROM sqlite_master ORDER BY name').all(), schemaBefore, 'neither step 2 nor the new table is there');
  assert.deepEqual(db.prepare('SELECT body FROM objects').all().map((r) => (r as { body: string }).body), ['{}']);

  // The same steps without the failing one all apply, in order, in one go.
  assert.deepEqual(migrate(db, failing.slice(0, -1)), { from: 1, to: SCHEMA_VERSION + 1, unmarked: false });
  assert.equal(userVersion(db), SCHEMA_VERSION + 1);
  // This release's list refuses it now: it is newer.
  assert.throws(() => migrate(db), new RegExp(`has schema version ${SCHEMA_VERSION + 1}, but this orchard knows schema versions up to ${SCHEMA_VERSION}`));
  db.close();
  rmSync(dir, { recursive: true, force: true });
});

test('a SQLite file that is not an Orchard database is refused, not adopted', () => {
  const dir = tempDir();
  const db = new DatabaseSync(join(dir, 'orchard.db'));
  db.exec('CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)');
  assert.throws(() => migrate(db), /not an Orchard controller's database \(it has no version marker and the tables customers\)/);
  assert.equal(userVersion(db), 0);
  db.close();
  writeFileSync(join(dir, 'text.db'), 'x'.repeat(200));
  assert.throws(() => fileSchemaVersion(join(dir, 'text.db')), /is not a SQLite database/);
  rmSync(dir, { recursive: true, force: true });
});
