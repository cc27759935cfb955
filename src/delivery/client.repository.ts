import type { Executor } from '../db/database.js';

export interface ClientRow {
  id: string;
  delivery_jwk: string;
  delivery_kid: string;
  updated_at: Date;
}

export async function findClient(ex: Executor, clientId: string): Promise<ClientRow | undefined> {
  return ex.selectFrom('clients').select(['id', 'delivery_jwk', 'delivery_kid', 'updated_at']).where('id', '=', clientId).executeTakeFirst();
}

export async function upsertClientDeliveryKey(ex: Executor, clientId: string, jwk: string, kid: string, now: Date): Promise<void> {
  await ex
    .insertInto('clients')
    .values({ id: clientId, delivery_jwk: jwk, delivery_kid: kid, created_at: now, updated_at: now })
    .onConflict((oc) => oc.column('id').doUpdateSet({ delivery_jwk: jwk, delivery_kid: kid, updated_at: now }))
    .execute();
}
