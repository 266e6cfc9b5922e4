// A worker's reports up its watch WebSocket (docs/worker-reports-protocol.md): parsed, checked and
// authorised as their HTTP routes would, committed through the same domain functions, and answered
// with a `reportAck` only once committed. A connection has at most MAX_REPORTS_IN_FLIGHT of them
// under way; frames are bounded by the route's maxPayload.
import { Ajv, type ValidateFunction } from 'ajv';
import type { TSchema } from '@sinclair/typebox';
import type { WebSocket } from 'ws';
import type { Logger } from 'pino';
import { EventInputList, Name, VMStateUpdate, WorkerImagesReport, type ServiceAccount } from '../api/schemas.ts';
import { MAX_REPORTS_IN_FLIGHT, reportAckFrame, type ReportAck } from '../api/worker-protocol.ts';
import { authorize, type Access } from './access.ts';
import { HttpError, formatValidationError, badRequest, storeErrorAnswer } from './errors.ts';
import { appendVMEvents, reportVMState, reportWorkerImages, type ReportContext } from './domain/reports.ts';
import type { Metrics } from './metrics.ts';

const WRITE = ['compute:write'] as const;
/** What one connection's reports under way may hold (their frames' text), besides their count. */
const MAX_REPORT_BYTES_IN_FLIGHT = 8 * 1024 * 1024;

// The HTTP routes' body validation: the same schemas and options (no type coercion).
const ajv = new Ajv({ strict: false, strictNumbers: true, allErrors: false, removeAdditional: false, useDefaults: false, coerceTypes: false });
const compiled = new Map<TSchema, ValidateFunction>();
function validatorOf(schema: TSchema): ValidateFunction {
  let validate = compiled.get(schema);
  if (!validate) compiled.set(schema, (validate = ajv.compile(schema)));
  return validate;
}
function check<T>(schema: TSchema, value: unknown, part: string): T {
  const validate = validatorOf(schema);
  if (!validate(value)) throw badRequest(formatValidationError(validate.errors ?? [], part));
  return value as T;
}

/** Compiles the reports' validators now (the warm-up's, src/controller/warm-up.ts) rather than on the first report. */
export const compileReportChecks = () => void [Name, VMStateUpdate, EventInputList, WorkerImagesReport].forEach(validatorOf);

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

export interface ReportsContext extends ReportContext {
  access: Access;
  logger: Logger;
  metrics: Metrics;
}

/** The status and message an HTTP route would answer for `err` (a 500 is logged, its details kept here). */
function answerOf(err: unknown, logger: Logger, worker: string): { status: number; message: string } {
  if (err instanceof HttpError) return { status: err.statusCode, message: err.message };
  const known = storeErrorAnswer(err, logger.child({ worker }));
  if (known) return known;
  logger.error({ err, worker }, 'internal error in a worker report');
  return { status: 500, message: 'internal error; see the controller log' };
}

/**
 * Takes the reports `worker` sends up `ws` (its watch, opened with `account`; `carriesMux`: the watch
 * carries the worker's tunnel mux too, whose frames are the binary ones). A report may only
 * concern this worker: its own images, VMs assigned to it (and, as over HTTP, only through the
 * worker's own account, holding compute:write). `opener` is the account that opened the watch.
 */
export function takeReports(ctx: ReportsContext, ws: WebSocket, worker: string, opener: ServiceAccount, carriesMux = false) {
  let inFlight = 0;
  let bytesInFlight = 0;
  const answer = (ack: ReportAck) => {
    if (ws.readyState === ws.OPEN) ws.send(reportAckFrame(ack));
  };

  ws.on('message', (data: Buffer | Buffer[] | ArrayBuffer, isBinary: boolean) => {
    // A watch that carries the worker's tunnel mux: its binary frames are the mux's (reports are text).
    if (carriesMux && isBinary) return;
    // Upstream's workers send nothing up the watch; a frame from one would be answered like any other.
    const text = Array.isArray(data) ? Buffer.concat(data).toString('utf8') : Buffer.from(data as ArrayBuffer).toString('utf8');
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      return answer({ id: null, status: 400, message: `malformed JSON in a report frame: ${(err as Error).message}` });
    }
    const id = isObject(msg) && Number.isSafeInteger(msg.id) && (msg.id as number) >= 0 ? (msg.id as number) : null;
    if (id === null) return answer({ id: null, status: 400, message: 'a report frame must be a JSON object with "id", a non-negative integer' });
    if (inFlight >= MAX_REPORTS_IN_FLIGHT || bytesInFlight + text.length > MAX_REPORT_BYTES_IN_FLIGHT) {
      return answer({ id, status: 429, message: `too many reports in flight on this connection (at most ${MAX_REPORTS_IN_FLIGHT} unacknowledged, ${MAX_REPORT_BYTES_IN_FLIGHT / 1024 / 1024} MiB): wait for acknowledgements` });
    }
    inFlight++;
    bytesInFlight += text.length;
    let kind = 'unknown';
    void (async () => {
      const m = msg as Record<string, unknown>;
      const kinds = ['vmState', 'vmEvents', 'workerImages'].filter((k) => k in m);
      if (kinds.length !== 1) throw badRequest('a report frame must have exactly one of "vmState", "vmEvents", "workerImages"');
      kind = kinds[0];
      // The watch needs compute:read only; reports need compute:write, as their HTTP routes do, checked on the account as it is now.
      const account = await ctx.access.current(opener);
      authorize(account, WRITE);
      const body = m[kind];
      if (kind === 'workerImages') return reportWorkerImages(ctx, worker, check(WorkerImagesReport, body, 'body'), account);
      if (!isObject(body)) throw badRequest(`field "${kind}" must be an object`);
      const vm = check<string>(Name, body.vm, 'params.name');
      // Stricter than HTTP, where one account may speak for several workers: on its own watch, a worker speaks for itself.
      if (kind === 'vmState') return reportVMState(ctx, vm, check(VMStateUpdate, body.state, 'body'), account, worker);
      return appendVMEvents(ctx, vm, check(EventInputList, body.events, 'body'), account, worker);
    })().then(
      () => answer({ id, status: 200 }),
      (err: unknown) => {
        const { status, message } = answerOf(err, ctx.logger, worker);
        answer({ id, status, message });
        return status;
      },
    ).then((status) => {
      inFlight--;
      bytesInFlight -= text.length;
      ctx.metrics.observeReport(kind, typeof status === 'number' ? status : 200);
    });
  });
}
