// A command's exit status on an SSH channel (ssh2), kept from the moment the channel opens: a quick
// command's status can come in the same read as the channel's opening, and ssh2 emits it then, before
// anything awaiting the channel could listen. Used by `orchard ssh` and the controller's exec.
import type { EventEmitter } from 'node:events';

/** The status as ssh2 reports it (empty until it comes). */
export interface ExitStatus {
  code?: number | null;
  signal?: string;
}

/** Keeps `ch`'s exit status in `into` from now: call it in the callback that opens the channel. */
export function keepExitStatus(ch: EventEmitter, into: ExitStatus) {
  ch.on('exit', (code: number | null, signal?: string) => Object.assign(into, { code, signal }));
}
