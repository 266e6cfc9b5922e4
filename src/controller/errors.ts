// Errors the API answers with: always JSON `{"message": ...}`, a 4xx naming what was wrong, and a
// 500 only for real bugs (logged, with no details sent to the client).
import type { FastifyBaseLogger, FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import type { ErrorObject } from 'ajv';
import { ConflictError, NotFoundError, StoreFailedError } from './store/store.ts';
import { NAME_PATTERN } from '../api/schemas.ts';

/**
 * What a request's work is aborted with when its client goes away (its AbortController). Nothing reads
 * it; abort() without a reason makes a DOMException, stack trace and all, each time: 111 ms of the
 * controller's CPU in a profile of some 2,000 multiplexed tunnel set-ups.
 */
export const CLIENT_GONE: Error = new Error('the client went away');

/**
 * What went wrong, for any access path: HTTP answers `statusCode` with the message (and `httpHint`,
 * advice that only makes sense to an API or CLI user); the SSH jump host maps it to a channel-open
 * failure with the message alone (sshOpenFailure).
 */
export class HttpError extends Error {
  readonly statusCode: number;
  /** Extra response headers (Retry-After of a 429, say). */
  readonly headers: Record<string, string>;
  /** Appended to the message in an HTTP answer only (e.g. which query parameter to change). */
  readonly httpHint?: string;
  constructor(statusCode: number, message: string, headers: Record<string, string> = {}, httpHint?: string) {
    super(message);
    this.statusCode = statusCode;
    this.headers = headers;
    this.httpHint = httpHint;
  }
}

/** SSH_MSG_CHANNEL_OPEN_FAILURE reason codes (RFC 4254 §5.1). */
export const OPEN_FAILURE = { ADMINISTRATIVELY_PROHIBITED: 1, CONNECT_FAILED: 2, RESOURCE_SHORTAGE: 4 } as const;

/** The channel-open failure an SSH client gets for `err`: a refusal, a shortage (too many, try later), or a failed connect. */
export function sshOpenFailure(err: HttpError): { code: number; description: string } {
  const code = err.statusCode === 401 || err.statusCode === 403 ? OPEN_FAILURE.ADMINISTRATIVELY_PROHIBITED
    : err.statusCode === 429 ? OPEN_FAILURE.RESOURCE_SHORTAGE
      : OPEN_FAILURE.CONNECT_FAILED;
  return { code, description: err.message };
}

export const badRequest = (message: string) => new HttpError(400, message);
export const notFound = (message: string) => new HttpError(404, message);
export const conflict = (message: string) => new HttpError(409, message);

/** `body.cpu`, `body.labels["a b"]`, `querystring.limit` from an Ajv error path. */
function fieldPath(part: string, instancePath: string, extra?: string): string {
  const segments = instancePath.split('/').slice(1).map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
  if (extra !== undefined) segments.push(extra);
  let out = part === 'body' ? '' : part;
  for (const s of segments) out += /^\d+$/.test(s) ? `[${s}]` : /^[A-Za-z_][\w-]*$/.test(s) ? `${out ? '.' : ''}${s}` : `[${JSON.stringify(s)}]`;
  return out || part;
}

export function formatValidationError(errors: ErrorObject[], part: string): string {
  let e = errors[0];
  // A union of literals (an enum) fails with one `const` error per member and then the `anyOf`:
  // report the `anyOf`, listing the members' values, instead of the first member's "must be equal to constant".
  const allowed = errors.filter((x) => x.keyword === 'const' && x.instancePath === e.instancePath).map((x) => (x.params as { allowedValue?: unknown }).allowedValue);
  if (e.keyword === 'const') e = errors.find((x) => x.keyword === 'anyOf' && x.instancePath === e.instancePath) ?? e;
  const params = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case 'additionalProperties':
      return `unknown field "${fieldPath(part, e.instancePath, String(params.additionalProperty))}"`;
    case 'required':
      return `field "${fieldPath(part, e.instancePath, String(params.missingProperty))}" is required`;
    case 'pattern':
      if (params.pattern === NAME_PATTERN)
        return `field "${fieldPath(part, e.instancePath)}" must be a name: letters, digits, '-', '_', '.' and ':', at most 128 characters, not "." or ".."`;
      return `field "${fieldPath(part, e.instancePath)}" must match ${String(params.pattern)}`;
    case 'anyOf': {
      // A union of literals (an enum): list the allowed values.
      const values = allowed.filter((v) => v !== undefined);
      return values.length
        ? `field "${fieldPath(part, e.instancePath)}" must be one of ${values.map((v) => JSON.stringify(v)).join(', ')}`
        : `field "${fieldPath(part, e.instancePath)}" has an invalid value`;
    }
    default:
      return `field "${fieldPath(part, e.instancePath)}" ${e.message ?? 'is invalid'}`;
  }
}

const SQLITE_FULL = 13;

/** The cause when `error` (or its cause) is the disk filling up: SQLite's SQLITE_FULL, or ENOSPC from a file write. */
export function diskFullCause(error: unknown): string | undefined {
  for (let e = error as { errcode?: number; errstr?: string; code?: string; cause?: unknown } | undefined, depth = 0; e && depth < 5; e = e.cause as typeof e, depth++) {
    if (typeof e.errcode === 'number' && (e.errcode & 0xff) === SQLITE_FULL) return `SQLITE_FULL: ${e.errstr ?? 'database or disk is full'}`;
    if (e.code === 'ENOSPC') return 'ENOSPC: no space left on device';
  }
  return undefined;
}

/**
 * The answer to an error of the store (not found, conflict) or of its disk (full, failed), the same
 * for an HTTP request and a worker's report up its watch; logged when it is the disk. Undefined for
 * anything else.
 */
export function storeErrorAnswer(error: unknown, log: Pick<FastifyBaseLogger, 'error' | 'fatal'>): { status: number; message: string } | undefined {
  if (error instanceof NotFoundError) return { status: 404, message: error.message };
  if (error instanceof ConflictError) return { status: 409, message: error.message };
  // Not a bug either: the disk failed under the store. Nothing more is saved until a restart, which reads what is really on disk.
  if (error instanceof StoreFailedError) {
    log.fatal({ err: error }, 'the store failed: the controller must be restarted');
    return { status: 503, message: error.message };
  }
  // Not a bug: the controller's disk is full. Nothing was saved; it works again once there is space.
  const full = diskFullCause(error);
  if (full) {
    log.error({ err: error }, 'the disk is full: a change was not saved');
    return { status: 507, message: `the controller's disk is full (${full}): the change was not saved; free space on the controller's data volume and retry` };
  }
  return undefined;
}

export function errorHandler(this: unknown, error: FastifyError & { validationContext?: string }, request: FastifyRequest, reply: FastifyReply) {
  if (error.validation) {
    return reply.code(400).send({ message: formatValidationError(error.validation as ErrorObject[], error.validationContext ?? 'body') });
  }
  if (error instanceof HttpError) {
    return reply.code(error.statusCode).headers(error.headers).send({ message: error.httpHint ? `${error.message}; ${error.httpHint}` : error.message });
  }
  const known = storeErrorAnswer(error, request.log);
  if (known) return reply.code(known.status).send({ message: known.message });
  const status = error.statusCode ?? 500;
  if (status >= 400 && status < 500) {
    const message =
      error.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || error instanceof SyntaxError
        ? `malformed JSON body: ${error.message}`
        : error.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE'
          ? `unsupported content-type ${JSON.stringify(request.headers['content-type'] ?? '')}: send application/json`
          : error.code === 'FST_ERR_CTP_BODY_TOO_LARGE'
            ? `request body is too large (the limit is ${request.routeOptions.bodyLimit} bytes)`
            : error.message;
    return reply.code(status).send({ message });
  }
  request.log.error({ err: error }, 'internal error');
  return reply.code(500).send({ message: 'internal error; see the controller log for request ' + request.id });
}
