/**
 * Backend clients and their public delivery keys. A client is identified by the `sub` of its
 * tokens; every key it fetches is encrypted to the key registered here, so a stolen token
 * alone yields nothing.
 */
import type { Kysely } from 'kysely';
import type { AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { importDeliveryKey, parseDeliveryJwk, type DeliveryJwk, type DeliveryKey } from '../crypto/jwe.js';
import type { DB } from '../db/database.js';
import type { Actor } from '../keys/key.service.js';
import * as repo from './client.repository.js';

export interface DeliveryKeyView {
  clientId: string;
  kid: string;
  jwk: DeliveryJwk;
  updatedAt: string;
}

export function createClientService(deps: { db: Kysely<DB>; audit: AuditSink; clock: Clock; /** DELIVERY_KEY_CACHE_SECONDS */ cacheSeconds?: number }) {
  const { db, audit, clock } = deps;
  const cacheMs = (deps.cacheSeconds ?? 0) * 1000;
  // Imported keys by client. Within cacheMs of the last read the entry is used as is (one query
  // less on every key fetch, issue 7); after that the row is read again and the import kept if
  // the kid did not change. These are public keys: what a stale entry risks is only a delivery
  // to a key an admin just replaced elsewhere, for at most cacheMs.
  const imported = new Map<string, { kid: string; key: DeliveryKey; checkedAt: number }>();

  async function setDeliveryKey(who: Actor, clientId: string, input: Record<string, unknown>): Promise<DeliveryKeyView> {
    const { jwk, kid } = await parseDeliveryJwk(input);
    const now = clock.now();
    const previous = await repo.findClient(db, clientId);
    await db.transaction().execute(async (trx) => {
      await repo.upsertClientDeliveryKey(trx, clientId, JSON.stringify(jwk), kid, now);
      await audit.record(trx, [
        {
          actor: who.actor,
          requestId: who.requestId,
          action: 'client.delivery_key.set',
          outcome: 'success',
          keyId: `client:${clientId}`,
          details: { kid, kty: jwk.kty, crv: jwk.crv, previousKid: previous?.delivery_kid ?? null },
        },
      ]);
    });
    imported.delete(clientId);
    return { clientId, kid, jwk, updatedAt: now.toISOString() };
  }

  /** The client's delivery key, imported and ready for ECDH; undefined when none is registered. */
  async function deliveryKeyFor(clientId: string): Promise<{ kid: string; key: DeliveryKey } | undefined> {
    const cached = imported.get(clientId);
    // performance.now(), not the injectable clock: tests move that clock by days
    if (cached && performance.now() - cached.checkedAt < cacheMs) return cached;
    const row = await repo.findClient(db, clientId);
    if (!row) {
      imported.delete(clientId);
      return undefined;
    }
    if (cached && cached.kid === row.delivery_kid) {
      cached.checkedAt = performance.now();
      return cached;
    }
    const entry = { kid: row.delivery_kid, key: await importDeliveryKey(JSON.parse(row.delivery_jwk) as DeliveryJwk), checkedAt: performance.now() };
    imported.set(clientId, entry);
    return entry;
  }

  return { setDeliveryKey, deliveryKeyFor };
}

export type ClientService = ReturnType<typeof createClientService>;
