/**
 * What other modules use from key distribution:
 *  - `enqueueKeyUpdate(trx, …)` / `enqueueKeyUpdates(trx, [...])` (a chunk): in the same transaction as every new device DEK / field key
 *    version and every rollback/disable that changes which version a device must use;
 *  - `listAwaitingAck` / `countAwaitingAck`: devices that have not acknowledged their current
 *    versions (rotation debt, rollout progress);
 *  - `successorUnacknowledged` (SQL) / `isHeldForAck`: the grace → decrypt_only hold-back
 *    predicate, for where the policy asks to wait for acknowledgements.
 */
export { enqueueKeyUpdate, enqueueKeyUpdates, type EnqueuedUpdate, type KeyUpdate } from './outbox.js';
export {
  countAwaitingAck,
  isHeldForAck,
  listAwaitingAck,
  successorAcknowledgedAt,
  successorSent,
  successorUnacknowledged,
  type AwaitingAck,
  type KeyFilter,
  type SentRows,
} from './distribution.repository.js';
export { distributionDb, type DistributionDB, type DistributionTables } from './distribution.tables.js';
