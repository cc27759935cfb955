/**
 * A lease on singleton work (the KEK rotation), so two cron runs or replicas never rotate the
 * KEK twice: taken with one conditional upsert, renewed after every batch, released at the
 * end. A holder that is killed keeps it only until it expires. Time is the injected clock.
 */
import crypto from 'node:crypto';
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import { ConflictError } from '../http/errors.js';
import * as repo from './rotation.repository.js';
import type { RotationDB } from './rotation.tables.js';

export interface Lease {
  readonly name: string;
  /** Extend the lease; throws ConflictError when it was lost (expired and taken by another holder). */
  renew(): Promise<void>;
  release(): Promise<void>;
}

export async function tryAcquireLease(db: Kysely<RotationDB>, clock: Clock, name: string, durationMs: number): Promise<Lease | undefined> {
  const holder = crypto.randomUUID();
  const expiry = () => new Date(clock.now().getTime() + durationMs);
  if (!(await repo.acquireLease(db, name, holder, clock.now(), expiry()))) return undefined;
  return {
    name,
    async renew() {
      if (!(await repo.renewLease(db, name, holder, expiry()))) {
        throw new ConflictError(`The ${name} lease expired and was taken by another run; this run stops`, 'rotation_lease_lost');
      }
    },
    async release() {
      await repo.releaseLease(db, name, holder);
    },
  };
}
