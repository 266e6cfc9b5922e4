// Why a pull failed, as a code a caller can act on and a message that names the registry's answer.

export type PullErrorCode = 'UNAUTHORIZED' | 'NOT_FOUND' | 'DIGEST_MISMATCH' | 'NO_SPACE' | 'BAD_IMAGE' | 'UNREACHABLE';

export class PullError extends Error {
  readonly code: PullErrorCode;
  constructor(code: PullErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PullError';
    this.code = code;
  }
}

/** The error codes a registry puts in its JSON body (distribution spec), as a short text. */
export function registryErrorText(body: string): string | undefined {
  try {
    const parsed = JSON.parse(body) as { errors?: { code?: unknown; message?: unknown }[] };
    const texts = (parsed.errors ?? [])
      .map((e) => [typeof e.message === 'string' ? e.message : '', typeof e.code === 'string' ? `(${e.code})` : ''].filter(Boolean).join(' '))
      .filter(Boolean);
    return texts.length ? texts.join('; ').slice(0, 300) : undefined;
  } catch {
    return undefined;
  }
}
