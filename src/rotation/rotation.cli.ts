/**
 * `keystrata rotate [--dry-run] [--limit N]`: the cron entry from the command line, doing
 * exactly what `POST /v1/rotation/run` does, with the service's configuration. Prints the
 * summary as JSON on stdout; exit 0 when no step failed (even if the limit left work for the
 * next run: `complete` says so), 1 when a step failed, 2 for bad arguments.
 */
import { parseArgs } from 'node:util';
import type { Runtime } from '../runtime.js';
import { createKeyCache } from '../keys/key-cache.js';
import { createKeyMaterial } from '../keys/key-material.js';
import { createRotation } from './index.js';
import { MAX_RUN_LIMIT } from './rotation.schemas.js';

export const ROTATE_USAGE = '  rotate [--dry-run] [--limit N] rotate what is due, finish rewraps, expire grace, destroy what is due (JSON summary)';

export async function rotateCommand(
  argv: string[],
  openRuntime: () => Promise<Pick<Runtime, 'database' | 'kek' | 'audit' | 'clock' | 'config' | 'logger' | 'close'>>,
  out: { write(text: string): unknown },
  err: { write(text: string): unknown },
): Promise<number> {
  let values: { 'dry-run'?: boolean; limit?: string };
  try {
    ({ values } = parseArgs({ args: argv, options: { 'dry-run': { type: 'boolean' }, limit: { type: 'string' } }, strict: true, allowPositionals: false }));
  } catch (error) {
    err.write(`keystrata rotate: ${error instanceof Error ? error.message : 'bad arguments'}\n`);
    return 2;
  }
  const limit = values.limit === undefined ? undefined : Number(values.limit);
  if (limit !== undefined && (!Number.isInteger(limit) || limit < 1 || limit > MAX_RUN_LIMIT)) {
    err.write(`keystrata rotate: --limit must be an integer from 1 to ${MAX_RUN_LIMIT}\n`);
    return 2;
  }
  const runtime = await openRuntime();
  try {
    const material = createKeyMaterial({ kek: runtime.kek, cache: createKeyCache(runtime.config.keyCache) });
    const rotation = createRotation({ db: runtime.database.db, kek: runtime.kek, material, audit: runtime.audit, clock: runtime.clock, mqttEnabled: runtime.config.mqtt !== undefined });
    const summary = await rotation.runner.run({ actor: 'cli' }, { dryRun: values['dry-run'] === true, limit, log: runtime.logger });
    out.write(`${JSON.stringify(summary, null, 2)}\n`);
    return summary.errors.length === 0 ? 0 : 1;
  } finally {
    await runtime.close();
  }
}
