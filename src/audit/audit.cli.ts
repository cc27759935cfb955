/**
 * `keystrata audit verify [--from N | --from-checkpoint ID] [--json]`
 *
 * Exit codes: 0 the chain verifies, 1 it is broken (the first bad position is printed),
 * 2 the verification could not run (bad arguments, unknown checkpoint, database or KEK down).
 */
import { parseArgs } from 'node:util';
import type { AuditService, VerifyOptions, VerifyResult } from './audit.service.js';

export interface AuditVerifyDeps {
  audit: Pick<AuditService, 'verify'>;
  /** the arguments after `audit verify` */
  args: ReadonlyArray<string>;
  stdout: { write(text: string): unknown };
  stderr: { write(text: string): unknown };
}

export const AUDIT_VERIFY_USAGE = 'keystrata audit verify [--from <position> | --from-checkpoint <id>] [--json]\n';

function positiveInteger(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^[1-9]\d{0,15}$/.test(value) || !Number.isSafeInteger(Number(value))) throw new UsageError(`${flag} must be a positive integer`);
  return Number(value);
}

class UsageError extends Error {}

export function formatVerifyResult(result: VerifyResult): string {
  const range = result.headPosition === 0 ? 'the chain is empty' : `positions ${result.fromPosition}..${result.headPosition}`;
  if (result.ok) {
    return `audit chain OK: ${result.checked} events verified (${range}), ${result.checkpointsChecked} signed checkpoints matched, head matches\n`;
  }
  return `audit chain BROKEN at position ${result.firstBadPosition}: ${result.reason} — ${result.detail} (${result.checked} events verified before it, ${range})\n`;
}

export async function runAuditVerify(deps: AuditVerifyDeps): Promise<number> {
  let options: VerifyOptions;
  let json: boolean;
  try {
    const { values } = parseArgs({
      args: [...deps.args],
      options: { from: { type: 'string' }, 'from-checkpoint': { type: 'string' }, json: { type: 'boolean', default: false } },
      strict: true,
      allowPositionals: false,
    });
    if (values.from !== undefined && values['from-checkpoint'] !== undefined) throw new UsageError('give --from or --from-checkpoint, not both');
    options = { fromPosition: positiveInteger(values.from, '--from'), fromCheckpoint: positiveInteger(values['from-checkpoint'], '--from-checkpoint') };
    json = values.json === true;
  } catch (error) {
    deps.stderr.write(`keystrata audit verify: ${error instanceof Error ? error.message : String(error)}\nusage: ${AUDIT_VERIFY_USAGE}`);
    return 2;
  }

  let result: VerifyResult;
  try {
    result = await deps.audit.verify(options);
  } catch (error) {
    // no message here carries secrets (AppErrors are written for clients; others name ids, SQL states)
    const message = error instanceof Error ? error.message : String(error);
    deps.stderr.write(`keystrata audit verify: could not verify: ${message}\n`);
    return 2;
  }
  deps.stdout.write(json ? `${JSON.stringify(result, null, 2)}\n` : formatVerifyResult(result));
  return result.ok ? 0 : 1;
}
