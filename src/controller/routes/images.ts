// POST /v1/images/pull (Orchard addition): asks every matching connected worker that understands
// pullImageAction to pull an image now; progress shows in each worker's record (imagePulls).
import type { FastifyInstance } from 'fastify';
import { ErrorBody, ImagePullAnswer, ImagePullRequest } from '../../api/schemas.ts';
import { PULL_IMAGE_ACTION } from '../../api/worker-protocol.ts';
import type { AppContext } from '../context.ts';
import { hasLabels, withPull } from '../domain/images.ts';

const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody };

export function registerImageRoutes(app: FastifyInstance, ctx: AppContext) {
  app.post<{ Body: ImagePullRequest }>(
    '/v1/images/pull',
    {
      config: { roles: ['compute:write'] },
      schema: {
        tags: ['images'],
        summary: "Pre-pull an image on every matching worker (Orchard addition): follow each worker's imagePulls for progress",
        body: ImagePullRequest,
        response: { 200: ImagePullAnswer, ...errors },
      },
    },
    async (request): Promise<ImagePullAnswer> => {
      const { image, labels } = request.body;
      await ctx.view.loaded;
      const answer: ImagePullAnswer = { image, asked: [], offline: [], unsupported: [] };
      for (const w of ctx.view.workers.values()) {
        if (!hasLabels(w, labels)) continue;
        if (!ctx.channels.isConnected(w.name)) answer.offline.push(w.name);
        else if (!w.capabilities?.includes(PULL_IMAGE_ACTION)) answer.unsupported.push(w.name);
        else answer.asked.push(w.name);
      }
      if (answer.asked.length === 0) return answer;
      // Each asked worker's entry starts over before it is asked: what it reports next is about this pull.
      const updatedAt = new Date().toISOString();
      await ctx.store.transaction((tx) => {
        for (const name of answer.asked) {
          if (!tx.get('workers', name)) continue;
          tx.update('workers', name, (w) => ({ ...w, imagePulls: withPull(w.imagePulls, { image, state: 'pulling', message: 'asked to pull', updatedAt }) }));
        }
      });
      for (const name of answer.asked) ctx.channels.send(name, { pullImageAction: { image } });
      request.log.info({ image, workers: answer.asked }, 'workers asked to pull an image');
      return answer;
    },
  );
}
