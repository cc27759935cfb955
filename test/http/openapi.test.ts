import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { OPENAPI_FILE, generateOpenApi, serializeOpenApi } from '../../src/http/openapi.js';

describe('the committed OpenAPI document', () => {
  it('when generated from the routes, then it equals openapi/openapi.json (run `npm run openapi` after changing a route)', async () => {
    const generated = serializeOpenApi(await generateOpenApi());
    expect(fs.readFileSync(OPENAPI_FILE, 'utf8')).toBe(generated);
  });

  it('when read, then every route has an operationId, a summary, tags and error responses pointing at Problem', async () => {
    const document = (await generateOpenApi()) as { paths: Record<string, Record<string, { operationId?: string; summary?: string; tags?: string[]; responses: Record<string, unknown> }>> };
    const operations = Object.entries(document.paths).flatMap(([p, methods]) => Object.entries(methods).map(([m, op]) => ({ id: `${m.toUpperCase()} ${p}`, op })));
    expect(operations.length).toBeGreaterThan(10);
    for (const { id, op } of operations) {
      if (id.includes('/docs')) continue;
      expect(op.operationId, id).toBeTruthy();
      expect(op.summary, id).toBeTruthy();
      expect(op.tags?.length, id).toBeGreaterThan(0);
      if (id.includes('/v1/')) expect(JSON.stringify(op.responses['401']), id).toContain('Problem');
    }
  });
});
