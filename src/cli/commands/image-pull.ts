// orchard image pull REF [--label k=v]...: asks the controller to have every matching worker pull an
// image now, then follows the workers' records (a watch, not polling) and prints a line per worker
// each time its pull's progress changes, until every worker asked is done or failed.
import type { Command } from 'commander';
import type { ImagePull, Worker } from '../../api/schemas.ts';
import { collectKeyValue, withClient, withCommon, type CommonOptions } from '../common.ts';
import { parseDuration, print } from '../output.ts';

export interface PullResult {
  worker: string;
  state: ImagePull['state'];
  message?: string;
}

/** A progress line: the worker's message while it pulls, its verdict once it is done or failed. */
export function progressLine(worker: string, pull: Pick<ImagePull, 'state' | 'message'>): string {
  if (pull.state === 'pulling') return `${worker}: ${pull.message ?? 'pulling'}\n`;
  return `${worker}: ${pull.state}${pull.message ? `: ${pull.message}` : ''}\n`;
}

export function registerImagePullCommand(image: Command) {
  withCommon(
    image
      .command('pull')
      .description('pull an image now on every matching worker (through the controller), showing each worker\'s progress')
      .argument('<image>', 'the reference, as VMs name it (e.g. ghcr.io/team/ubuntu:24.04)')
      .option('--label, --labels <key=value[,...]>', 'only workers with these labels (repeatable)', collectKeyValue)
      .option('--timeout <duration>', 'give up on workers that have not finished by then', '30m'),
  ).action(async (ref: string, opts: CommonOptions & { labels?: Record<string, string>; timeout: string }) => {
    const timeoutMs = parseDuration(opts.timeout);
    // With --output json|yaml stdout holds the result alone: progress goes to stderr.
    const progress = (line: string) => (opts.output === 'table' ? process.stdout : process.stderr).write(line);
    await withClient(opts, async (c) => {
      const answer = await c.pullImage({ image: ref, labels: opts.labels });
      for (const w of answer.offline) process.stderr.write(`${w}: not asked: the worker is offline\n`);
      for (const w of answer.unsupported) process.stderr.write(`${w}: not asked: the worker does not pull on request (an older or upstream worker)\n`);
      if (answer.asked.length === 0) {
        const matching = answer.offline.length + answer.unsupported.length;
        throw new Error(matching ? `no worker could be asked to pull ${ref}` : `no worker matches${opts.labels ? ' the labels' : ''}`);
      }
      const results = new Map<string, PullResult>();
      const shown = new Map<string, string>();
      const finish = (worker: string, result: PullResult) => {
        if (results.has(worker)) return;
        results.set(worker, result);
        progress(progressLine(worker, result));
      };
      const stop = new AbortController();
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        stop.abort();
      }, timeoutMs);
      timer.unref();
      try {
        for await (const e of c.watch<Worker>('/v1/workers?watch=true', stop.signal)) {
          const name = e.object.name;
          if (!answer.asked.includes(name) || results.has(name)) continue;
          const pull = e.object.imagePulls?.find((p) => p.image === ref);
          if (e.type === 'DELETED') finish(name, { worker: name, state: 'failed', message: 'the worker was deleted' });
          else if (!pull) finish(name, { worker: name, state: 'failed', message: 'the worker registered again: its pull is gone' });
          else if (pull.state !== 'pulling') finish(name, { worker: name, state: pull.state, message: pull.message });
          else if (shown.get(name) !== pull.message) {
            shown.set(name, pull.message ?? '');
            progress(progressLine(name, pull));
          }
          if (results.size === answer.asked.length) break;
        }
      } finally {
        clearTimeout(timer);
        stop.abort();
      }
      for (const w of answer.asked) finish(w, { worker: w, state: 'failed', message: timedOut ? `not finished within ${opts.timeout}` : 'the watch ended' });
      const workers = answer.asked.map((w) => results.get(w)!);
      if (opts.output !== 'table') await print(opts.output, { image: ref, workers, offline: answer.offline, unsupported: answer.unsupported }, () => '');
      const failed = workers.filter((r) => r.state !== 'done');
      if (failed.length) throw new Error(`${failed.length} of ${workers.length} worker${workers.length === 1 ? '' : 's'} failed to pull ${ref}: ${failed.map((r) => r.worker).join(', ')}`);
    });
  });
}
