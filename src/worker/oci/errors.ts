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

/**
 * What a token service says when it refuses: the registry's JSON errors, or the fields token
 * services use instead (`details` on Docker Hub, OAuth2's `error_description` and `error`, `message`).
 */
export function tokenServiceErrorText(body: string): string | undefined {
  const registry = registryErrorText(body);
  if (registry) return registry;
  try {
    const parsed = JSON.parse(body) as Record<string, unknown>;
    for (const key of ['details', 'error_description', 'error', 'message']) {
      if (typeof parsed[key] === 'string' && parsed[key]) return parsed[key].slice(0, 300);
    }
    return undefined;
  } catch {
    return undefined;
  }
}
