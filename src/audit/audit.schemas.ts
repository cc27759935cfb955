/** The HTTP contract of the audit log (TypeBox: validation, types and OpenAPI). */
import { Type, type Static } from '@sinclair/typebox';
import { PageQuery } from '../http/schemas.js';

const Hash = Type.String({ pattern: '^[0-9a-f]{64}$', description: 'SHA-256 size, hex' });
const Position = Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'position in the chain (1, 2, 3, …)' });
const Outcome = Type.Union([Type.Literal('success'), Type.Literal('failure'), Type.Literal('denied')]);
const Text = (maxLength: number, description: string) => Type.String({ minLength: 1, maxLength, description });

export const AuditEvent = Type.Object(
  {
    position: Position,
    time: Type.String({ format: 'date-time' }),
    actor: Type.String({ description: 'token `sub`, `system:…`, `cli` or `anonymous`' }),
    action: Type.String({ description: 'dotted, e.g. `key.deliver`, `device.rotate`, `auth.failed`' }),
    outcome: Outcome,
    keyId: Type.Union([Type.String(), Type.Null()], { description: '`group:<id>`, `device:<id>`, `field:<deviceId>/<field>`, `client:<id>`, `kek:<name>`' }),
    details: Type.Record(Type.String(), Type.Unknown(), { description: 'non-secret details: versions, states, counts, reasons' }),
    requestId: Type.Union([Type.String(), Type.Null()]),
    prevHash: Hash,
    hash: { ...Hash, description: 'HMAC-SHA256(audit key, prevHash ‖ canonical JSON of the event), hex' },
  },
  { additionalProperties: false },
);

export const AuditEventsQuery = Type.Object(
  {
    actor: Type.Optional(Text(256, 'exactly this actor')),
    action: Type.Optional(Text(128, 'exactly this action')),
    keyId: Type.Optional(Text(512, 'exactly this key id, e.g. `device:sensor-0001`')),
    keyIdPrefix: Type.Optional(Text(512, 'key ids starting with this, e.g. `field:sensor-0001/` for all of a device\'s field keys')),
    outcome: Type.Optional(Outcome),
    from: Type.Optional(Type.String({ format: 'date-time', description: 'events at or after this time' })),
    to: Type.Optional(Type.String({ format: 'date-time', description: 'events before this time' })),
    order: Type.Optional(Type.Union([Type.Literal('asc'), Type.Literal('desc')], { default: 'asc', description: 'by position; asc is chain order' })),
    ...PageQuery,
  },
  { additionalProperties: false },
);
export type AuditEventsQuery = Static<typeof AuditEventsQuery>;

export const AuditEventPage = Type.Object(
  { items: Type.Array(AuditEvent), nextCursor: Type.Optional(Type.String()) },
  { additionalProperties: false },
);

export const VerifyBody = Type.Object(
  {
    fromPosition: Type.Optional({ ...Position, description: 'start here, trusting the stored hash of the event before it' }),
    fromCheckpoint: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'start at this checkpoint (its signature is checked first)' })),
  },
  { additionalProperties: false, description: 'neither: verify the whole chain' },
);
export type VerifyBody = Static<typeof VerifyBody>;

export const VerifyReason = Type.Union(
  ['missing_event', 'broken_link', 'hash_mismatch', 'head_missing', 'head_mismatch', 'event_after_head', 'checkpoint_invalid', 'checkpoint_mismatch'].map((r) =>
    Type.Literal(r),
  ),
);

export const VerifyResult = Type.Object(
  {
    ok: Type.Boolean(),
    checked: Type.Integer({ description: 'events whose hash was recomputed' }),
    fromPosition: Type.Integer({ description: 'first position walked' }),
    headPosition: Type.Integer({ description: 'chain head when the walk started' }),
    checkpointsChecked: Type.Integer({ description: 'signed checkpoints matched against the chain on the way' }),
    firstBadPosition: Type.Optional(Type.Integer()),
    reason: Type.Optional(VerifyReason),
    detail: Type.Optional(Type.String()),
  },
  { additionalProperties: false },
);

export const Checkpoint = Type.Object(
  {
    id: Type.Integer(),
    position: Type.Integer({ minimum: 0, description: 'chain head position when signed (0: empty chain)' }),
    hash: Hash,
    time: Type.String({ format: 'date-time' }),
    kid: Type.String(),
    jws: Type.String({ description: 'compact JWS (alg Ed25519); payload {position, hash, time, kekName}' }),
  },
  { additionalProperties: false },
);

export const CheckpointPublicKey = Type.Object(
  {
    kty: Type.Literal('OKP'),
    crv: Type.Literal('Ed25519'),
    x: Type.String(),
    kid: Type.String({ description: 'RFC 7638 thumbprint: pin it' }),
    alg: Type.Literal('Ed25519'),
    use: Type.Literal('sig'),
  },
  { additionalProperties: false, description: 'public JWK that verifies every checkpoint offline' },
);

export const CheckpointsQuery = Type.Object(PageQuery, { additionalProperties: false });

export const CheckpointPage = Type.Object(
  { publicKey: CheckpointPublicKey, items: Type.Array(Checkpoint, { description: 'newest first' }), nextCursor: Type.Optional(Type.String()) },
  { additionalProperties: false },
);
