/**
 * Who is calling, once their bearer token has been verified, and what they may do.
 * Authorization is deny-by-default: a scope or group that is not stated is not granted.
 */

export type Scope = 'keystrata:admin' | 'keystrata:keys:read' | 'keystrata:rotate' | 'keystrata:audit:read';

export const SCOPES: readonly Scope[] = Object.freeze([
  'keystrata:admin',
  'keystrata:keys:read',
  'keystrata:rotate',
  'keystrata:audit:read',
] as const);

/** Group and device ids are caller-chosen strings of this shape (DESIGN §9). */
export const GROUP_ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

export interface Principal {
  /** The token's `sub`: a backend client id or an operator. */
  sub: string;
  /** Known scopes only; unknown scopes in the token are dropped. */
  scopes: ReadonlySet<Scope>;
  /** The token's `keystrata_groups` claim: the groups a keys:read token may reach. */
  groups: ReadonlySet<string>;
  /** The token's `jti`, for the audit log. */
  tokenId?: string;
}

const SCOPE_SET: ReadonlySet<string> = new Set(SCOPES);

export function isScope(value: unknown): value is Scope {
  return typeof value === 'string' && SCOPE_SET.has(value);
}

/** `keystrata:admin` implies every other scope. */
export function hasScope(principal: Principal, scope: Scope): boolean {
  return principal.scopes.has('keystrata:admin') || principal.scopes.has(scope);
}

/**
 * May this principal touch keys of `groupId`? Admins reach every group; a keys:read token
 * reaches exactly the groups named in its `keystrata_groups` claim; anyone else, none.
 */
export function canReachGroup(principal: Principal, groupId: string): boolean {
  if (principal.scopes.has('keystrata:admin')) return true;
  return principal.scopes.has('keystrata:keys:read') && principal.groups.has(groupId);
}
