/**
 * Errors of the keystrata client. Messages name kids, states and the service's problem fields,
 * never key material, tokens or plaintext.
 */

/** An RFC 9457 problem document as keystrata writes it. */
export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  code?: string;
  instance?: string;
  requestId?: string;
  [extra: string]: unknown;
}

export interface KeystrataClientErrorOptions {
  status?: number | undefined;
  problem?: Problem | undefined;
  /** how many HTTP attempts were made before giving up */
  attempts?: number | undefined;
  /** the server's Retry-After, in milliseconds, when it sent one */
  retryAfterMs?: number | undefined;
  cause?: unknown;
}

/** Every error of the client: `code` is stable, `status` and `problem` are set for HTTP failures. */
export class KeystrataClientError extends Error {
  readonly code: string;
  readonly status: number | undefined;
  readonly problem: Problem | undefined;
  readonly requestId: string | undefined;
  readonly attempts: number | undefined;
  readonly retryAfterMs: number | undefined;

  constructor(code: string, message: string, options: KeystrataClientErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = options.status;
    this.problem = options.problem;
    this.requestId = options.problem?.requestId;
    this.attempts = options.attempts;
    this.retryAfterMs = options.retryAfterMs;
  }
}

export type MissingReason = 'not_found' | 'not_deliverable' | 'destroyed';

/** The service did not deliver a key version: unknown, not deliverable (disabled, scheduled for destruction) or destroyed. */
export class KeyUnavailableError extends KeystrataClientError {
  constructor(
    readonly kid: string,
    readonly reason: MissingReason,
  ) {
    const why =
      reason === 'not_found'
        ? 'is unknown to the service (or outside the groups of your token)'
        : reason === 'destroyed'
          ? 'has been destroyed'
          : 'is not deliverable: it is disabled or scheduled for destruction';
    super(`key_${reason}`, `Key ${kid} ${why}`);
  }
}

export type KeyStateRefusal = 'key_decrypt_only' | 'key_pending' | 'key_disabled';

/** The key was delivered, but its state forbids accepting this message (DESIGN §2). */
export class KeyStateError extends KeystrataClientError {
  constructor(
    code: KeyStateRefusal,
    readonly kid: string,
    readonly state: string,
    message: string,
  ) {
    super(code, message);
  }
}

/** The telemetry message breaks the message rules (timestamp, nesting, field names). */
export class MessageFormatError extends KeystrataClientError {
  constructor(message: string) {
    super('invalid_message', message);
  }
}

/** One field of a message could not be decrypted; `cause` is the underlying error, `code` is copied from it. */
export class FieldDecryptionError extends KeystrataClientError {
  constructor(
    readonly field: string,
    readonly kid: string | undefined,
    cause: unknown,
  ) {
    const code = typeof (cause as { code?: unknown })?.code === 'string' ? (cause as { code: string }).code : 'decrypt_failed';
    const reason = cause instanceof Error ? cause.message : 'decryption failed';
    super(code, `Field "${field}"${kid ? ` (${kid})` : ''}: ${reason}`, { cause });
  }
}
