// Image pull benchmark against Debian's docker-registry on loopback (plain HTTP), one run:
//  1. download throughput of one uncompressed layer of random data (SIZE MiB) through ImageCache
//     (digest checked while it streams) next to `curl` of the same blob from the same registry into
//     the same file system, alternating, median of RUNS; the whole pull (with unpacking) too;
//  2. four concurrent ensures of one new image on one cache → how many blob downloads (must be 1).
//
//   node bench/images.ts [--size 512] [--runs 3]
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { tempDir } from '../test/helpers.ts';
import { ociLayout, qcow2WithData, skopeoPush, startRegistry } from '../test/registry.ts';

const { values } = parseArgs({ options: { size: { type: 'string', default: '512' }, runs: { type: 'string', default: '3' } } });
const SIZE = Number(values.size);
const RUNS = Number(values.runs);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
const MiB = 1024 * 1024;

const registry = await startRegistry();
const dir = tempDir('orchard-bench-images-');
const lookup = (h: string) => (h === registry.host ? { insecure: true } : undefined);
try {
  const disk = qcow2WithData(dir, 'disk', SIZE);
  const { layerDigests } = ociLayout(join(dir, 'layout'), [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip: false }], 'v1');
  skopeoPush(join(dir, 'layout'), 'v1', registry, 'bench/big');
  rmSync(join(dir, 'layout'), { recursive: true, force: true });
  const blobBytes = Number(execFileSync('stat', ['-c', '%s', registry.blobFile(layerDigests[0])], { encoding: 'utf8' }).trim());
  const ours: number[] = [];
  const whole: number[] = [];
  const unpack: number[] = [];
  const curl: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const out = join(dir, 'curl.blob');
    const t0 = performance.now();
    execFileSync('curl', ['-sSf', '-o', out, `http://${registry.host}/v2/bench/big/blobs/${layerDigests[0]}`]);
    curl.push(blobBytes / MiB / ((performance.now() - t0) / 1000));
    rmSync(out);
    const store = join(dir, `store-${run}`);
    const cache = new ImageCache({ storeDir: store, registries: lookup });
    const t1 = performance.now();
    let downloaded = 0;
    await cache.ensure(`${registry.host}/bench/big:v1`, {
      policy: 'IfNotPresent',
      progress: (p) => {
        if (p.phase === 'unpacking' && !downloaded) downloaded = performance.now();
      },
    });
    const t2 = performance.now();
    ours.push(blobBytes / MiB / ((downloaded - t1) / 1000));
    whole.push(blobBytes / MiB / ((t2 - t1) / 1000));
    unpack.push(blobBytes / MiB / ((t2 - downloaded) / 1000));
    cache.close();
    rmSync(store, { recursive: true, force: true });
  }
  const o = median(ours);
  const c = median(curl);
  console.log(`blob of ${(blobBytes / MiB).toFixed(0)} MiB, ${RUNS} runs, medians:`);
  console.log(`  curl -o FILE              ${c.toFixed(0)} MiB/s  (${spread(curl)})`);
  console.log(`  ImageCache download       ${o.toFixed(0)} MiB/s  (${spread(ours)}; ${(o / c).toFixed(2)}× curl; goal ≥ 0.9×)`);
  console.log(`  ImageCache unpack + check ${median(unpack).toFixed(0)} MiB/s  (${spread(unpack)})`);
  console.log(`  ImageCache whole pull     ${median(whole).toFixed(0)} MiB/s  (${spread(whole)}; download, unpack, qemu-img check)`);

  const small = qcow2WithData(dir, 'small', 64);
  ociLayout(join(dir, 'layout2'), [{ files: { 'disk/disk.qcow2': { copy: small } }, gzip: true }], 'v1');
  skopeoPush(join(dir, 'layout2'), 'v1', registry, 'bench/crowd');
  const cache = new ImageCache({ storeDir: join(dir, 'crowd'), registries: lookup });
  const t = performance.now();
  const images = await Promise.all([1, 2, 3, 4].map(() => cache.ensure(`${registry.host}/bench/crowd:v1`, { policy: 'IfNotPresent' })));
  console.log(`four concurrent ensures of one new image: ${cache.downloads} download(s), ${new Set(images.map((i) => i.dir)).size} entry, ${((performance.now() - t) / 1000).toFixed(2)} s`);
  cache.close();
} finally {
  await registry.stop();
  rmSync(dir, { recursive: true, force: true });
}
