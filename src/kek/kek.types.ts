/**
 * The KEK (key-encryption key) is the root of the hierarchy. It never leaves its provider:
 * keystrata only sends group-DEK material in to be wrapped and receives it back unwrapped.
 *
 * Every call carries a `context`: the binding string of the row that stores the blob
 * (crypto/binding.ts). Providers use it as the key-derivation context (transit `derived` keys),
 * so a blob copied to another row fails to unwrap, while rewrap keeps working (transit's
 * rewrap accepts `context` but not `associated_data`).
 */
export type KekProviderKind = 'local' | 'vault';

export interface KekVersionInfo {
  version: number;
  createdAt: string; // ISO 8601
}

export interface KekInfo {
  name: string;
  provider: KekProviderKind;
  type: string; // e.g. aes256-gcm96
  derived: boolean;
  latestVersion: number;
  minDecryptionVersion: number;
  minEncryptionVersion: number;
  versions: KekVersionInfo[];
}

/** The few logger methods providers use (pino's logger fits). Never pass secrets to it. */
export interface KekLogger {
  warn(message: string): void;
  info?(message: string): void;
}

export type RewrapResult = { ok: true; blob: string } | { ok: false; error: string };

export interface KekProvider {
  readonly kind: KekProviderKind;
  readonly keyName: string;
  /** Ensure the KEK exists (created explicitly as a derived aes256-gcm96 key; never via upsert). */
  init(): Promise<void>;
  /** Wrap plaintext key material; returns `<prefix>:v<N>:<base64>` (vault: `vault:vN:…`). */
  wrap(plaintext: Buffer, context: string): Promise<string>;
  /** Unwrap; throws UnwrapError when the blob/context do not authenticate, KekUnavailableError when unreachable. */
  unwrap(blob: string, context: string): Promise<Buffer>;
  /** Rewrap blobs to the latest KEK version in one batch; one result per item, in order. No plaintext leaves the provider. */
  rewrapBatch(items: ReadonlyArray<{ blob: string; context: string }>): Promise<RewrapResult[]>;
  /** Create a new KEK version; returns the new state. */
  rotate(): Promise<KekInfo>;
  info(): Promise<KekInfo>;
  /** Raise (never lower below 1) the minimum version allowed to decrypt. */
  setMinDecryptionVersion(version: number): Promise<void>;
  /** Cheap reachability check for /readyz. */
  health(): Promise<{ ok: boolean; detail?: string }>;
  close(): Promise<void>;
}

/** The KEK version a blob was wrapped under, from its `<prefix>:v<N>:` prefix. */
export function kekBlobVersion(blob: string): number {
  const match = /^[a-z]+:v(\d+):/.exec(blob);
  if (!match) throw new Error('Not a KEK blob');
  return Number(match[1]);
}
