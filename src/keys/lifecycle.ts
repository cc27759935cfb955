/**
 * The version lifecycle (DESIGN §2): which states exist, which transitions are legal, and
 * which states may be delivered. Every state change in keystrata goes through
 * `assertTransition`, so an illegal one (re-enable a destroyed version, rotate onto a disabled
 * one) is a 409 wherever it is attempted.
 *
 *   pending ──► primary ──► grace ──► decrypt_only ──► destroy_scheduled ──► destroyed
 *                  │           │            │                 ▲     │
 *                  └───────────┴────────────┴──► disabled ────┘     │ restore: each version back
 *                                                   │               ▼ to the state it had before
 *                         enable returns it to decrypt_only (never to primary: a new primary
 *                         comes only from a rotation)
 */
import type { VersionState } from '../db/tables.js';
import { ConflictError } from '../http/errors.js';

export type { VersionState };

export const VERSION_STATES: readonly VersionState[] = ['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroy_scheduled', 'destroyed'];

/** Delivered to backends (decrypt_only flagged by its state). */
export const DELIVERABLE_STATES: readonly VersionState[] = ['pending', 'primary', 'grace', 'decrypt_only'];

/** Devices may still encrypt with these. */
export const ENCRYPTING_STATES: readonly VersionState[] = ['primary', 'grace'];

/** Material still present (can be unwrapped, must be rewrapped when its parent rotates). */
export const LIVE_STATES: readonly VersionState[] = ['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroy_scheduled'];

const TRANSITIONS: Readonly<Record<VersionState, readonly VersionState[]>> = {
  pending: ['primary', 'disabled', 'destroy_scheduled'],
  // primary → disabled: a halted rollout disables the new version it had made primary
  primary: ['grace', 'decrypt_only', 'disabled', 'destroy_scheduled'],
  // grace → primary: rollback of a rotation restores the previous primary
  grace: ['primary', 'decrypt_only', 'disabled', 'destroy_scheduled'],
  decrypt_only: ['disabled', 'destroy_scheduled'],
  disabled: ['decrypt_only', 'destroy_scheduled'],
  // restore (cancelling a crypto-shred within its waiting period) puts every version back in the
  // state it had, so a former primary is primary again and the device stays usable
  destroy_scheduled: ['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroyed'],
  destroyed: [],
};

export function canTransition(from: VersionState, to: VersionState): boolean {
  return TRANSITIONS[from].includes(to);
}

export function assertTransition(what: string, from: VersionState, to: VersionState): void {
  if (!canTransition(from, to)) {
    throw new ConflictError(`${what} cannot go from ${from} to ${to}`, 'illegal_state_transition');
  }
}

export function isDeliverable(state: VersionState): boolean {
  return DELIVERABLE_STATES.includes(state);
}
