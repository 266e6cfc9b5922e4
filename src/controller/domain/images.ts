// Images on workers (Orchard additions): what each worker holds (for the scheduler's locality) and the
// pulls asked of it (orchard image pull), each with its latest progress, kept on the worker's record.
import { MAX_IMAGE_PULLS, type ImagePull, type Worker } from '../../api/schemas.ts';

/**
 * The worker's pulls with `pull` recorded (replacing the entry of the same image). Past the bound,
 * the oldest finished entry goes first, else the oldest.
 */
export function withPull(pulls: readonly ImagePull[] | undefined, pull: ImagePull): ImagePull[] {
  const next = (pulls ?? []).filter((p) => p.image !== pull.image);
  next.push(pull);
  while (next.length > MAX_IMAGE_PULLS) {
    const finished = next.findIndex((p) => p.state !== 'pulling');
    next.splice(finished >= 0 ? finished : 0, 1);
  }
  return next;
}

/** Does the worker have every one of `labels`? */
export const hasLabels = (w: Worker, labels: Record<string, string> | undefined) => Object.entries(labels ?? {}).every(([k, v]) => w.labels?.[k] === v);

/** Does the worker hold `image` (the same reference string, or digest, as the VM names it)? */
export const holds = (w: Worker, image: string | undefined) => image !== undefined && (w.images?.includes(image) ?? false);
