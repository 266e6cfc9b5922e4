// How long `orchard controller backup` takes, and how long its copy holds a read transaction, for a
// database of N VMs (each with 20 events):  node bench/backup.ts [N]
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { backupDataDir } from '../src/controller/store/backup.ts';

const n = Number(process.argv[2] ?? 20_000);
const dir = mkdtempSync(join(tmpdir(), 'orchard-bench-backup-'));
const store = new SQLiteStore(join(dir, 'orchard.db'));
store.initClusterID('bench');
for (let i = 0; i < n; i += 500) {
  await Promise.all(
    Array.from({ length: Math.min(500, n - i) }, async (_, j) => {
      const name = `vm-${i + j}`;
      const uid = `uid-${i + j}`;
      await store.create('vms', { name, uid, image: 'ghcr.io/cirruslabs/macos-sonoma-base:latest', cpu: 4, memory: 8192, status: 'running', worker: `w-${(i + j) % 50}`, labels: { rack: 'a' } } as never);
      await store.appendEvents(uid, Array.from({ length: 20 }, (_, k) => ({ kind: 'lifecycle', timestamp: k, payload: `event ${k} of ${name}: something happened` })));
    }),
  );
}
const b = await backupDataDir(dir, join(dir, 'backup.db'));
console.log(`${n} VMs, ${n * 20} events: backup ${(b.bytes / 1e6).toFixed(1)} MB in ${Math.round(b.totalMs)} ms; the copy's read transaction ${Math.round(b.copyMs)} ms`);
store.close();
rmSync(dir, { recursive: true, force: true });
