// The Node flags bin/orchard runs with (why: there), read from its exec line so that what else runs
// Orchard's code the same way (the single executable, a benchmark's stand-in relays) cannot drift.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

export function orchardNodeFlags(): string[] {
  const bin = join(resolve(import.meta.dirname, '..'), 'bin', 'orchard');
  const execLine = /^exec "\$root\/node_modules\/node\/bin\/node" ((?:--\S+ )*)"\$root\/src\/cli\/main\.ts" "\$@"$/m.exec(readFileSync(bin, 'utf8'));
  if (!execLine) throw new Error(`${bin}: its exec line was not found, so its Node flags are unknown`);
  return execLine[1].split(' ').filter(Boolean);
}
