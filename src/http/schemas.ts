/** Schemas shared by every route: ids, the problem document, pagination. */
import { Type, type TSchema } from '@sinclair/typebox';

export const ID_PATTERN = '^[A-Za-z0-9._:-]{1,128}$';
export const FIELD_PATTERN = '^[a-z][a-z0-9_]{0,63}$';

export const GroupId = Type.String({ pattern: ID_PATTERN, description: 'caller-chosen group id', examples: ['icu-monitors-eu'] });
export const DeviceId = Type.String({ pattern: ID_PATTERN, description: 'caller-chosen device id', examples: ['sensor-0001'] });
export const ClientId = Type.String({ pattern: ID_PATTERN, description: 'backend client id (the `sub` of its tokens)' });
export const FieldName = Type.String({ pattern: FIELD_PATTERN, description: 'sensitive field type', examples: ['patient_id'] });
export const Version = Type.Integer({ minimum: 1, maximum: 2_147_483_647 });

export const VersionState = Type.Union(
  ['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroy_scheduled', 'destroyed'].map((s) => Type.Literal(s)),
);

export const VersionInfo = Type.Object(
  {
    version: Version,
    state: VersionState,
    parentVersion: Type.Integer({ description: 'version of the parent key this version is wrapped under (KEK version for groups)' }),
    createdAt: Type.String({ format: 'date-time' }),
    stateChangedAt: Type.String({ format: 'date-time' }),
    stateUntil: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  },
  { additionalProperties: false },
);

export const Problem = Type.Object(
  {
    type: Type.String(),
    title: Type.String(),
    status: Type.Integer(),
    detail: Type.String(),
    code: Type.String(),
    instance: Type.Optional(Type.String()),
    requestId: Type.Optional(Type.String()),
    field: Type.Optional(Type.String()),
    errors: Type.Optional(Type.Array(Type.Object({ field: Type.String(), message: Type.String() }))),
    conflicts: Type.Optional(Type.Array(Type.String())),
  },
  { $id: 'Problem', title: 'Problem (RFC 9457)' },
);

export const ProblemRef = Type.Ref('Problem');

/** The error statuses every authenticated route can answer, pointing at the shared problem schema. */
export function errorResponses(...statuses: number[]): Record<number, TSchema> {
  const all = new Set([400, 401, 403, 429, 500, 503, ...statuses]);
  return Object.fromEntries([...all].map((s) => [s, ProblemRef]));
}

export const PageQuery = {
  limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
  cursor: Type.Optional(Type.String({ maxLength: 512, pattern: '^[A-Za-z0-9_-]+$', description: 'opaque cursor from nextCursor' })),
};

export function encodeCursor(value: unknown): string {
  return Buffer.from(JSON.stringify(value), 'utf8').toString('base64url');
}

export function decodeCursor<T>(cursor: string | undefined, isValid: (value: unknown) => value is T): T | undefined {
  if (cursor === undefined) return undefined;
  try {
    const value: unknown = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
    if (isValid(value)) return value;
  } catch {
    // fall through
  }
  return undefined;
}
