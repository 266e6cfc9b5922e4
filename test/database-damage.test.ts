// A damaged database must stop the controller with a message that says what to do, never start it
// empty (its workers would then see every VM as unknown): a lost or damaged WAL after an unclean stop,
// an emptied orchard.db, another cluster's orchard.db. A clean stop leaves one self-contained file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, cpSync, existsSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { OrchardClient } from '../src/client/client.ts';
import { ADMIN_TOKEN, spawnController, tempDir } from './helpers.ts';
import { SCHEMA_VERSION } from '../src/controller/store/schema.ts';
import { VERSION } from '../src/api/version.ts';

const adminOf = (url: string, certificate: string) => new OrchardClient({ url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });

/** Starts a controller on a copy of `dataDir` damaged by `damage`; resolves with the refusal's text, or undefined if it started. */
async function startOnCopy(dataDir: string, damage: (dir: string) => void, extra: string[] = []): Promise<{ refused?: string; vms?: number }> {
  const copy = join(tempDir(), 'data');
  cpSync(dataDir, copy, { recursive: true });
  damage(copy);
  try {
    const ctl = await spawnController(copy, extra);
    const admin = adminOf(ctl.url, readFileSync(join(copy, 'controller.crt'), 'utf8'));
    const vms = (await admin.listVMs()).length;
    admin.close();
    await ctl.kill('SIGTERM');
    return { vms };
  } catch (err) {
    return { refused: (err as Error).message };
  }
}

test('a damaged, missing, emptied or swapped database is refused with what to do; the intact one starts with everything', async () => {
  const dataDir = tempDir();
  let ctl = await spawnController(dataDir);
  const certificate = readFileSync(join(dataDir, 'controller.crt'), 'utf8');
  let admin = adminOf(ctl.url, certificate);
  for (let i = 0; i < 50; i++) await admin.createVM({ name: `vm-${i}`, image: 'img' });
  const clusterID = (await admin.info()).clusterID;
  assert.match(clusterID ?? '', /^[0-9a-f-]{36}$/);
  admin.close();
  await ctl.kill('SIGKILL');
  const wal = (dir: string) => join(dir, 'orchard.db-wal');
  assert.ok(statSync(wal(dataDir)).size > 50 * 1024, 'after kill -9 the latest changes are in the WAL');

  const lostWAL = await startOnCopy(dataDir, (d) => rmSync(wal(d)));
  assert.match(lostWAL.refused ?? '', /orchard\.db-wal is missing, but the controller did not stop cleanly/);
  assert.match(lostWAL.refused ?? '', /restore orchard\.db together with orchard\.db-wal from a backup.*--accept-damaged-database/);

  const damagedWAL = await startOnCopy(dataDir, (d) => {
    const fd = openSync(wal(d), 'r+');
    writeSync(fd, Buffer.from('damage'), 0, 6, 32 + 24 + 200); // inside the first frame's page
    closeSync(fd);
  });
  assert.match(damagedWAL.refused ?? '', /orchard\.db-wal is damaged: frame 1 of \d+ is damaged and \d+ later frames would be ignored/);

  const emptied = await startOnCopy(dataDir, (d) => {
    truncateSync(join(d, 'orchard.db'), 0);
    rmSync(wal(d));
  });
  assert.match(emptied.refused ?? '', new RegExp(`orchard\\.db holds no cluster \\(it is empty or was replaced\\), but this data dir belongs to cluster ${clusterID}`));

  const other = tempDir();
  const otherCtl = await spawnController(other);
  await otherCtl.kill('SIGTERM');
  const swapped = await startOnCopy(dataDir, (d) => {
    for (const f of ['orchard.db', 'orchard.db-wal', 'orchard.db-shm']) rmSync(join(d, f), { force: true });
    cpSync(join(other, 'orchard.db'), join(d, 'orchard.db'));
    writeFileSync(join(d, 'cluster.json'), JSON.stringify({ clusterID, cleanStop: true })); // as if it had stopped cleanly before
  });
  assert.match(swapped.refused ?? '', /orchard\.db belongs to cluster .* but this data dir to cluster .*: the database was swapped/);

  // The operator may choose to go on with what there is.
  const accepted = await startOnCopy(dataDir, (d) => rmSync(wal(d)), ['--accept-damaged-database']);
  assert.equal(accepted.refused, undefined);
  assert.ok((accepted.vms ?? 50) < 50, `started with what orchard.db alone holds (${accepted.vms} VMs)`);

  // The intact data starts with everything; a clean stop checkpoints it all into orchard.db.
  ctl = await spawnController(dataDir);
  admin = adminOf(ctl.url, certificate);
  assert.equal((await admin.listVMs()).length, 50);
  assert.equal((await admin.info()).clusterID, clusterID, 'the same cluster');
  admin.close();
  await ctl.kill('SIGTERM');
  assert.ok(!existsSync(wal(dataDir)) || statSync(wal(dataDir)).size === 0, 'the WAL is empty after a clean stop');
  assert.deepEqual(JSON.parse(readFileSync(join(dataDir, 'cluster.json'), 'utf8')), { clusterID, cleanStop: true, schemaVersion: SCHEMA_VERSION, release: VERSION });
  const copyAfterClean = await startOnCopy(dataDir, (d) => rmSync(wal(d), { force: true }));
  assert.equal(copyAfterClean.vms, 50, 'after a clean stop, orchard.db alone holds everything');
});
