/**
 * `keystrata/client` as a consumer gets it: the package.json exports map resolves (source
 * condition through tsx; compiled JS by default), the compiled client runs under plain Node
 * and imports nothing but Node built-ins, jose and lru-cache.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('../../', import.meta.url));
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { exports: Record<string, Record<string, string> | string> };
const outDir = path.join(root, 'test-artifacts', `client-build-${process.pid}`);
afterAll(() => fs.rmSync(outDir, { recursive: true, force: true }));

describe('keystrata/client', () => {
  it('when package.json is read, then ./client maps types and source to the TypeScript entry and default to the compiled one', () => {
    expect(pkg.exports['./client']).toEqual({
      types: './src/client/index.ts',
      source: './src/client/index.ts',
      default: './dist/src/client/index.js',
    });
  });

  it("when imported by name with the 'source' condition, then the public API resolves and the vector hook is not in it", () => {
    const out = execFileSync(
      process.execPath,
      ['--import', 'tsx', '--conditions=source', '--input-type=module', '-e', "const m = await import('keystrata/client'); console.log(JSON.stringify(Object.keys(m).sort()))"],
      { cwd: root, encoding: 'utf8' },
    );
    const names = JSON.parse(out) as string[];
    expect(names).toEqual(expect.arrayContaining(['createKeystrataClient', 'createDeviceEncryptor', 'encryptField', 'decryptField', 'parseEnvelope', 'KeystrataClientError']));
    expect(names).not.toContain('encryptFieldWithFixedNonceForVectors');
  });

  it('when compiled like dist/, then it runs under plain Node and imports only node:*, jose and lru-cache', () => {
    execFileSync(
      process.execPath,
      [
        path.join(root, 'node_modules/typescript/bin/tsc'),
        ...['--outDir', outDir, '--rootDir', root, '--module', 'NodeNext', '--moduleResolution', 'NodeNext', '--target', 'ES2022'],
        ...['--strict', '--noUncheckedIndexedAccess', '--skipLibCheck', '--types', 'node', '--declaration'],
        path.join(root, 'src/client/index.ts'),
      ],
      { cwd: root, encoding: 'utf8' },
    );
    const emitted = walk(outDir).filter((f) => f.endsWith('.js'));
    expect(emitted.map((f) => path.relative(outDir, f)).sort()).toEqual(
      ['src/client/cache.js', 'src/client/client.js', 'src/client/device.js', 'src/client/errors.js', 'src/client/http.js', 'src/client/index.js', 'src/client/keys.js', 'src/client/message.js', 'src/envelope/field-envelope.js', 'src/envelope/index.js'].sort(),
    );
    for (const file of emitted) {
      const specifiers = [...fs.readFileSync(file, 'utf8').matchAll(/(?:^|\n)\s*(?:import|export)\b[^'"]*?from\s+['"]([^'"]+)['"]/g)].map((m) => m[1] as string);
      for (const specifier of specifiers) expect(specifier, file).toMatch(/^(node:|jose$|lru-cache$|\.\.?\/)/);
    }
    const entry = path.join(outDir, 'src/client/index.js');
    const script = `
      import crypto from 'node:crypto';
      const m = await import(${JSON.stringify(new URL(`file://${entry}`).href)});
      const key = crypto.randomBytes(32);
      const dev = m.createDeviceEncryptor({ deviceId: 'd1', keys: [{ field: 'patient_id', version: 1, key }] });
      const sent = dev.encryptMessage({ timestamp: Date.UTC(2026, 0, 1), patient_id: 'P-1' });
      const clear = m.decryptField({ key, deviceId: 'd1', field: 'patient_id', timestamp: Date.UTC(2026, 0, 1), envelope: sent.patient_id });
      console.log(clear.toString());`;
    expect(execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: root, encoding: 'utf8' }).trim()).toBe('"P-1"');
  }, 120_000);
});

function walk(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(path.join(dir, e.name)) : [path.join(dir, e.name)]));
}
