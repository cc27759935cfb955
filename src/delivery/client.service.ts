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

export function createClientService(deps: { db: Kysely<DB>; audit: AuditSink; clock: Clock }) {
  const { db, audit, clock } = deps;
  // imported keys by client, checked against the stored kid so a key change is seen at once
  const imported = new Map<string, { kid: string; key: DeliveryKey }>();

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
    const row = await repo.findClient(db, clientId);
    if (!row) return undefined;
    const cached = imported.get(clientId);
    if (cached && cached.kid === row.delivery_kid) return cached;
    const entry = { kid: row.delivery_kid, key: await importDeliveryKey(JSON.parse(row.delivery_jwk) as DeliveryJwk) };
    imported.set(clientId, entry);
    return entry;
  }

  return { setDeliveryKey, deliveryKeyFor };
}

export type ClientService = ReturnType<typeof createClientService>;
