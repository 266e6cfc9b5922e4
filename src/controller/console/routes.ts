// The web console's routes: its page at `/`, its bundled assets, sign-in, the session and sign-out.
// The console reads and changes things through the v1 API like any client, authenticated by the
// session cookie instead of Basic auth (app.ts), so the same role checks apply to it.
import { createHash, randomBytes } from 'node:crypto';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { Type } from '@sinclair/typebox';
import { ErrorBody } from '../../api/schemas.ts';
import { CONSOLE_PATH, ConsoleSession, ConsoleSignIn } from '../../api/console.ts';
import { consoleFiles } from '../../build/source-tree.ts';
import { CONSOLE_ENCODINGS, type ConsoleEncoding, type ConsoleFile } from '../../console/files.ts';
import type { AppContext } from '../context.ts';
import { HttpError } from '../errors.ts';
import type { Sessions } from './sessions.ts';

/**
 * What the console's page may load and talk to: its own origin only, no inline script; styles from
 * its own origin or <style> elements carrying this response's nonce (the terminal emulator makes
 * some: the page gives them the nonce, which a markup injection cannot know).
 */
export const contentSecurityPolicy = (styleNonce: string) => [
  "default-src 'none'",
  "script-src 'self'",
  `style-src 'self' 'nonce-${styleNonce}'`,
  "img-src 'self' data:",
  "font-src 'self'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join('; ');

const SECURITY_HEADERS: Record<string, string> = {
  'content-security-policy': contentSecurityPolicy('none'),
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-resource-policy': 'same-origin',
  'permissions-policy': 'camera=(), microphone=(), geolocation=(), payment=(), usb=()',
};

interface Served extends ConsoleFile {
  etag: string;
}

/**
 * The most compact of the file's stored encodings that the request's Accept-Encoding takes (a
 * coding, or `*`, with q > 0; one named with q=0 is refused even if `*` takes others).
 */
export function chooseEncoding(acceptEncoding: string | undefined, stored: readonly ConsoleEncoding[]): ConsoleEncoding | undefined {
  if (!acceptEncoding || !stored.length) return undefined;
  const q = new Map<string, number>();
  for (const part of acceptEncoding.split(',')) {
    const [coding, ...params] = part.trim().toLowerCase().split(';');
    if (!coding) continue;
    const qParam = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    const value = qParam ? Number(qParam.slice(2)) : 1;
    q.set(coding.trim(), Number.isFinite(value) ? value : 0);
  }
  return CONSOLE_ENCODINGS.filter((e) => stored.includes(e)).find((e) => (q.get(e) ?? q.get('*') ?? 0) > 0);
}

const errors = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 429: ErrorBody };

export function registerConsoleRoutes(app: FastifyInstance, ctx: AppContext, sessions: Sessions, apiPrefix: string) {
  let files: Promise<Map<string, Served>> | undefined;
  const load = () =>
    (files ??= consoleFiles().then(
      (list) => new Map(list.map((f) => [f.name, { ...f, etag: `"${createHash('sha256').update(f.body).digest('base64url').slice(0, 22)}"` }])),
      (err: unknown) => {
        files = undefined;
        app.log.error({ err }, 'the web console could not be built');
        throw new HttpError(503, 'the web console is not available: its files could not be built (see the controller log)');
      },
    ));

  const secure = (reply: FastifyReply) => {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) reply.header(k, v);
    return reply;
  };

  // Scripts and style sheets go compressed as built (brotli, else gzip) to a browser that takes it;
  // each encoding is its own representation (Vary, and its own ETag).
  const serve = async (name: string, headers: { 'if-none-match'?: string; 'accept-encoding'?: string }, reply: FastifyReply, cacheControl: string) => {
    const file = (await load()).get(name);
    if (!file) throw new HttpError(404, `the console has no file ${JSON.stringify(name.slice(0, 200))}`);
    const stored = Object.keys(file.encoded ?? {}) as ConsoleEncoding[];
    const encoding = chooseEncoding(headers['accept-encoding'], stored);
    const etag = encoding ? `${file.etag.slice(0, -1)}-${encoding}"` : file.etag;
    secure(reply).header('cache-control', cacheControl).header('etag', etag);
    if (stored.length) reply.header('vary', 'accept-encoding');
    if (headers['if-none-match'] === etag) return reply.code(304).send();
    if (encoding) reply.header('content-encoding', encoding);
    return reply.type(file.type).send(encoding ? file.encoded![encoding] : file.body);
  };

  // The page is made for each response (its nonce) and never stored; the assets, named by their
  // hash, never change.
  app.get('/', { config: { roles: undefined }, schema: { hide: true } }, async (_request, reply) => {
    const page = (await load()).get('index.html')!;
    const nonce = randomBytes(18).toString('base64url');
    secure(reply).header('content-security-policy', contentSecurityPolicy(nonce)).header('cache-control', 'no-store');
    return reply.type(page.type).send(page.body.toString('utf8').replaceAll('%BASE%', apiPrefix).replaceAll('%NONCE%', nonce));
  });
  app.get(`${CONSOLE_PATH}/assets/:file`, { config: { roles: undefined }, schema: { hide: true, params: Type.Object({ file: Type.String({ maxLength: 200 }) }) } }, async (request, reply) =>
    serve((request.params as { file: string }).file, request.headers, reply, 'public, max-age=31536000, immutable'),
  );

  const sessionOf = (request: { session?: string }) => {
    if (!request.session) throw new HttpError(400, 'this request was not made with a console session (sign in at POST /console/session)');
    return request.session;
  };

  app.post(
    `${CONSOLE_PATH}/session`,
    { config: { roles: undefined }, schema: { hide: true, body: ConsoleSignIn, response: { 200: ConsoleSession, ...errors } } },
    async (request, reply) => {
      sessions.checkSignInOrigin(request.headers);
      const { name, token } = request.body as ConsoleSignIn;
      // The same check, and the same back-off against guessing, as Basic auth.
      const account = await ctx.access.authenticate({ name, token }, request.ip);
      const { cookie, csrf } = sessions.create(account);
      request.log.info({ account: account.name }, 'signed in to the console');
      return secure(reply).header('cache-control', 'no-store').header('set-cookie', cookie).send({ account: account.name, roles: account.roles, csrf });
    },
  );
  app.get(`${CONSOLE_PATH}/session`, { config: { roles: [] }, schema: { hide: true, response: { 200: ConsoleSession, ...errors } } }, async (request, reply) => {
    const account = request.account!;
    return secure(reply).header('cache-control', 'no-store').send({ account: account.name, roles: account.roles, csrf: sessions.csrfOf(sessionOf(request)) });
  });
  app.delete(`${CONSOLE_PATH}/session`, { config: { roles: [] }, schema: { hide: true, response: { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody } } }, async (request, reply) => {
    sessions.end(sessionOf(request));
    request.log.info({ account: request.account?.name }, 'signed out of the console');
    return secure(reply).header('cache-control', 'no-store').header('set-cookie', sessions.clearCookie()).code(204).send();
  });
}
