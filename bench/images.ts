// Image pull benchmark against Debian's docker-registry on loopback (plain HTTP), one run:
//  1. download throughput of one uncompressed layer of random data (SIZE MiB) through ImageCache
//     (digest checked while it streams) next to `curl` of the same blob from the same registry into
//     the same file system, alternating, median of RUNS; the whole pull (with unpacking) too;
//  2. four concurrent ensures of one new image on one cache → how many blob downloads (must be 1);
//  3. through a real controller and qemu worker (warm starts off, so both boot the same way):
//     create → running of a VM whose image is already in the worker's cache (debian-dev pushed to
//     the registry and pulled once), next to the locally built debian-dev, alternating, RUNS each;
//  4. four VMs of one new image created at once on that worker → how many downloads (must be 1).
//
//   node bench/images.ts [--size 512] [--runs 3] [--download-only]   (--download-only: part 1 alone)
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { pushImage } from '../src/worker/oci/push.ts';
import { buildDebianDev, resolveImage } from '../src/worker/images.ts';
import { inProcessController, qemuWorker, TEST_IMAGES, tempDir } from '../test/helpers.ts';
import { ociLayout, qcow2WithData, skopeoPush, startRegistry } from '../test/registry.ts';

const { values } = parseArgs({ options: { size: { type: 'string', default: '512' }, runs: { type: 'string', default: '3' }, 'download-only': { type: 'boolean' } } });
const SIZE = Number(values.size);
const RUNS = Number(values.runs);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[], digits = 0) => `${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)}`;
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
  const cpuOurs: number[] = [];
  const cpuCurl: number[] = [];
  const cpuRegistryOurs: number[] = [];
  const cpuRegistryCurl: number[] = [];
  const GiB = blobBytes / (1024 * MiB);
  for (let run = 0; run < RUNS; run++) {
    const out = join(dir, 'curl.blob');
    const t0 = performance.now();
    const r0 = registry.cpuSeconds();
    const times = join(dir, 'curl.time');
    execFileSync('/usr/bin/time', ['-f', '%U %S', '-o', times, 'curl', '-sSf', '-o', out, `http://${registry.host}/v2/bench/big/blobs/${layerDigests[0]}`]);
    curl.push(blobBytes / MiB / ((performance.now() - t0) / 1000));
    const [user, sys] = readFileSync(times, 'utf8').trim().split(/\s+/).map(Number);
    cpuCurl.push((user + sys) / GiB);
    cpuRegistryCurl.push((registry.cpuSeconds() - r0) / GiB);
    rmSync(out);
    const store = join(dir, `store-${run}`);
    const cache = new ImageCache({ storeDir: store, registries: lookup });
    const t1 = performance.now();
    const cpu0 = process.cpuUsage();
    const r1 = registry.cpuSeconds();
    let downloaded = 0;
    await cache.ensure(`${registry.host}/bench/big:v1`, {
      policy: 'IfNotPresent',
      progress: (p) => {
        if (p.phase === 'unpacking' && !downloaded) {
          downloaded = performance.now();
          const { user, system } = process.cpuUsage(cpu0);
          cpuOurs.push((user + system) / 1e6 / GiB);
          cpuRegistryOurs.push((registry.cpuSeconds() - r1) / GiB);
        }
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
  console.log(`  CPU s per GiB downloaded  curl ${median(cpuCurl).toFixed(2)}, ImageCache ${median(cpuOurs).toFixed(2)} (all its threads: reads, sha256, writes); the registry ${median(cpuRegistryCurl).toFixed(2)} and ${median(cpuRegistryOurs).toFixed(2)}`);
  console.log(`  ImageCache unpack + check ${median(unpack).toFixed(0)} MiB/s  (${spread(unpack)})`);
  console.log(`  ImageCache whole pull     ${median(whole).toFixed(0)} MiB/s  (${spread(whole)}; download, unpack, qemu-img check)`);

  if (!values['download-only']) {
    const small = qcow2WithData(dir, 'small', 64);
    ociLayout(join(dir, 'layout2'), [{ files: { 'disk/disk.qcow2': { copy: small } }, gzip: true }], 'v1');
    skopeoPush(join(dir, 'layout2'), 'v1', registry, 'bench/crowd');
    const cache = new ImageCache({ storeDir: join(dir, 'crowd'), registries: lookup });
    const t = performance.now();
    const images = await Promise.all([1, 2, 3, 4].map(() => cache.ensure(`${registry.host}/bench/crowd:v1`, { policy: 'IfNotPresent' })));
    console.log(`four concurrent ensures of one new image: ${cache.downloads} download(s), ${new Set(images.map((i) => i.dir)).size} entry, ${((performance.now() - t) / 1000).toFixed(2)} s`);
    cache.close();

    // 3 and 4: through the cluster.
    await buildDebianDev(TEST_IMAGES);
    const ref = `${registry.host}/orchard/debian-dev:bench`;
    await pushImage(await resolveImage(TEST_IMAGES, 'debian-dev'), ref, { insecure: true });
    const cl = await inProcessController();
    const workerDir = join(dir, 'worker');
    const workerCache = new ImageCache({ storeDir: join(workerDir, 'images'), registries: lookup });
    // The worker's store has the local debian-dev (hard links to the built one) and pulls into its cache.
    mkdirSync(join(workerDir, 'images'), { recursive: true });
    execFileSync('cp', ['-al', join(TEST_IMAGES, 'debian-dev'), join(workerDir, 'images', 'debian-dev')]);
    const w = await qemuWorker(cl, 'bench-images', workerDir, { imageCache: workerCache, slots: 4 });
    try {
      let n = 0;
      const createToRunning = async (image: string) => {
        const name = `b-${n++}`;
        const t0 = performance.now();
        await cl.admin.createVM({ name, image, cpu: 1, memory: 512 });
        for (;;) {
          const vm = await cl.admin.getVM(name);
          if (vm.status === 'running') break;
          if (vm.status === 'failed') throw new Error(`${name} failed: ${vm.status_message}`);
          await new Promise((r) => setTimeout(r, 20));
        }
        const ms = performance.now() - t0;
        await cl.admin.deleteVM(name);
        return ms;
      };
      await createToRunning(ref); // the pull: the cache holds the image from now on
      const downloadsAfterPull = workerCache.downloads;
      const cached: number[] = [];
      const local: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        cached.push(await createToRunning(ref));
        local.push(await createToRunning('debian-dev'));
      }
      const cm = median(cached);
      const lm = median(local);
      console.log(`create → running through a qemu worker (warm starts off), ${RUNS} runs each, medians:`);
      console.log(`  local debian-dev                  ${(lm / 1000).toFixed(2)} s  (${spread(local.map((x) => x / 1000), 2)} s)`);
      console.log(`  pulled debian-dev, already cached ${(cm / 1000).toFixed(2)} s  (${spread(cached.map((x) => x / 1000), 2)} s; ${(cm / lm).toFixed(2)}× local; goal ≤ 1.05×; ${workerCache.downloads - downloadsAfterPull} downloads meanwhile)`);

      // Four VMs of one image the worker does not have yet, created at once.
      // (debian-dev with another kernel command line: other bytes, so another digest the cache lacks)
      const variant = join(dir, 'variant');
      mkdirSync(variant);
      execFileSync('cp', ['-al', join(TEST_IMAGES, 'debian-dev'), join(variant, 'debian-dev')]);
      const cmdline = join(variant, 'debian-dev', 'cmdline');
      const text = readFileSync(cmdline, 'utf8').trim();
      rmSync(cmdline);
      writeFileSync(cmdline, `${text} orchard.bench=crowd\n`);
      const crowd = `${registry.host}/orchard/debian-dev:crowd`;
      await pushImage(await resolveImage(variant, 'debian-dev'), crowd, { insecure: true });
      const before = workerCache.downloads;
      const names = ['c-1', 'c-2', 'c-3', 'c-4'];
      await Promise.all(names.map((name) => cl.admin.createVM({ name, image: crowd, cpu: 1, memory: 256 })));
      for (;;) {
        const vms = await Promise.all(names.map((name) => cl.admin.getVM(name)));
        if (vms.some((vm) => vm.status === 'failed')) throw new Error(vms.map((vm) => `${vm.name}: ${vm.status_message}`).join('; '));
        if (vms.every((vm) => vm.status === 'running' || vm.status_message === 'booting')) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      console.log(`four VMs of one new image created at once on one worker: ${workerCache.downloads - before} download(s)`);
      for (const name of names) await cl.admin.deleteVM(name);
    } finally {
      await w.close();
      workerCache.close();
      await cl.close();
      cl.cleanup();
    }
  }
} finally {
  await registry.stop();
  rmSync(dir, { recursive: true, force: true });
}
