// Young-generation collections paced by the bytes a relay moves, not by V8's own heuristics.
//
// Every read of a socket arrives in a Buffer of its own: memory outside V8's heap, garbage once the
// bytes are passed on, freed only by a collection. A relay allocates little on V8's heap per byte it
// moves, so scavenges come seldom, and the buffers pile up until they reach V8's global limit (heap
// and external memory, --external-memory-accounted-in-global-limit in bin/orchard), where V8 runs a
// full mark of the heap instead: dozens per GiB relayed (BENCHMARKS.md). A scavenge after every few
// MiB relayed frees them for a fraction of a millisecond each. Used by the CLI's and the worker's
// relays, not the controller's: with many tunnels' buffers in flight at once, a forced scavenge
// promotes those still in use to the old generation, which only a full collection frees, and the
// controller held 60-90 MB more under bench/abuse.ts's 40 tunnels.
import v8 from 'node:v8';
import vm from 'node:vm';

/** Bytes relayed between two scavenges. */
const EVERY = 8 * 1024 * 1024;

let gc: ((options: { type: 'minor' }) => void) | undefined;
let since = 0;

/** `bytes` were relayed (they sit in buffers that are garbage once written). */
export function relayed(bytes: number) {
  since += bytes;
  if (since < EVERY) return;
  since = 0;
  if (!gc) {
    // V8's gc() reaches a new context only; the flag is reset so that nothing else sees it.
    v8.setFlagsFromString('--expose-gc');
    gc = vm.runInNewContext('gc') as typeof gc;
    v8.setFlagsFromString('--no-expose-gc');
  }
  gc!({ type: 'minor' });
}
