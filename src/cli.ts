/**
 * `keystrata migrate | token | audit verify | rotate`: the same configuration (environment)
 * as the server.
 */
import { parseArgs } from 'node:util';
import { loadOrCreateDevIssuer, parseTtl } from './auth/dev-issuer.js';
import { isScope, type Scope } from './auth/principal.js';
import { ConfigError, loadConfig, SETTINGS } from './config.js';
import { migrateToLatest } from './db/migrator.js';
import { createLogger } from './logger.js';
import { createRuntime, openDatabase } from './runtime.js';
import { runAuditVerify } from './audit/audit.cli.js';
import { ROTATE_USAGE, rotateCommand } from './rotation/rotation.cli.js';

const USAGE = `Usage: keystrata <command>

Commands:
  migrate                      apply pending database migrations
  token --scope S [--scope S2] [--groups a,b] [--sub ID] [--ttl 1h]
                               print a development token (embedded default only)
  audit verify [--from N | --from-checkpoint ID] [--json]
                               verify the audit hash chain (exit 1 when broken)
${ROTATE_USAGE}

Scopes: keystrata:admin, keystrata:keys:read, keystrata:rotate, keystrata:audit:read
Settings come from the environment:
${SETTINGS.map((s) => `  ${s.name.padEnd(30)} ${s.meaning} (default: ${s.default})`).join('\n')}
`;

async function main(argv: string[]): Promise<number> {
  const [command, sub] = argv;
  if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(USAGE);
    return command === undefined ? 2 : 0;
  }
  const config = loadConfig();
  // CLI logs go to stderr so stdout stays machine-readable (a token, a JSON result)
  const logger = createLogger(config.logLevel === 'info' ? 'warn' : config.logLevel, process.stderr);

  switch (command) {
    case 'migrate': {
      const database = await openDatabase(config, logger);
      try {
        const result = await migrateToLatest(database.db);
        const applied = result.results?.filter((r) => r.status === 'Success').map((r) => r.migrationName) ?? [];
        process.stdout.write(applied.length > 0 ? `applied: ${applied.join(', ')}\n` : 'database is up to date\n');
        return 0;
      } finally {
        await database.close();
      }
    }
    case 'token': {
      const { values } = parseArgs({
        args: argv.slice(1),
        options: { scope: { type: 'string', multiple: true }, groups: { type: 'string' }, sub: { type: 'string' }, ttl: { type: 'string', default: '1h' } },
        strict: true,
      });
      if (config.auth.jwksUrl !== undefined) {
        process.stderr.write('keystrata token: AUTH_JWKS_URL is set; get tokens from your identity provider\n');
        return 2;
      }
      const scopes = (values.scope ?? []).flatMap((s) => s.split(/[ ,]+/)).filter((s) => s !== '');
      const bad = scopes.filter((s) => !isScope(s));
      if (scopes.length === 0 || bad.length > 0) {
        process.stderr.write(`keystrata token: --scope must be one or more of keystrata:admin, keystrata:keys:read, keystrata:rotate, keystrata:audit:read${bad.length ? ` (got ${bad.join(', ')})` : ''}\n`);
        return 2;
      }
      const issuer = await loadOrCreateDevIssuer(config.dataDir);
      const token = await issuer.mintToken({
        sub: values.sub ?? 'dev-admin',
        scopes: scopes as Scope[],
        groups: values.groups ? values.groups.split(',').filter((g) => g !== '') : [],
        ttlSeconds: parseTtl(values.ttl ?? '1h'),
        issuer: config.auth.issuer,
        audience: config.auth.audience,
      });
      process.stdout.write(`${token}\n`);
      return 0;
    }
    case 'audit': {
      if (sub !== 'verify') {
        process.stderr.write(USAGE);
        return 2;
      }
      const runtime = await createRuntime(config, logger);
      try {
        return await runAuditVerify({ audit: runtime.audit, args: argv.slice(2), stdout: process.stdout, stderr: process.stderr });
      } finally {
        await runtime.close();
      }
    }
    case 'rotate':
      return rotateCommand(argv.slice(1), () => createRuntime(config, logger), process.stdout, process.stderr);
    default:
      process.stderr.write(`keystrata: unknown command "${command}"\n\n${USAGE}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    if (error instanceof ConfigError) process.stderr.write(`keystrata: ${error.message}\n`);
    else process.stderr.write(`keystrata: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  },
);
