/**
 * Typed application errors. Services throw these; one handler (http/error-handler.ts) turns
 * them into RFC 9457 problem+json. A message must never contain key material, tokens or
 * wrapped blobs: it goes to the client verbatim.
 */
export class AppError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class BadRequestError extends AppError {
  constructor(message: string, extra: Record<string, unknown> = {}) {
    super(400, 'bad_request', message, extra);
  }
}

export class UnauthorizedError extends AppError {
  constructor(message = 'A valid bearer token is required') {
    super(401, 'unauthorized', message);
  }
}

export class ForbiddenError extends AppError {
  constructor(message: string, code = 'forbidden') {
    super(403, code, message);
  }
}

export class NotFoundError extends AppError {
  constructor(message: string) {
    super(404, 'not_found', message);
  }
}

export class ConflictError extends AppError {
  constructor(message: string, code = 'conflict') {
    super(409, code, message);
  }
}

export class GoneError extends AppError {
  constructor(message: string) {
    super(410, 'gone', message);
  }
}

/** A dependency (database, KEK provider) is unreachable: 503 with Retry-After. */
export class UnavailableError extends AppError {
  constructor(
    message: string,
    readonly retryAfterSeconds = 5,
  ) {
    super(503, 'unavailable', message);
  }
}

/** The KEK provider could not be reached or answered with a server error (retryable). */
export class KekUnavailableError extends UnavailableError {
  constructor(message = 'The KEK provider is unavailable', retryAfterSeconds = 5) {
    super(message, retryAfterSeconds);
  }
}

/**
 * Stored material failed to unwrap: wrong AAD/context, tampering, or a KEK version below the
 * minimum decryption version. Not the caller's fault, and never retryable.
 */
export class UnwrapError extends AppError {
  constructor(message = 'Stored key material failed to unwrap') {
    super(500, 'unwrap_failed', message);
  }
}
