/**
 * Request validation. Bodies are validated strictly (a number is never coerced into an id
 * string); path parameters and query strings arrive as text, so only they are coerced to the
 * integers their schemas ask for.
 */
import { Ajv, type Options } from 'ajv';
import addFormats from 'ajv-formats';
import type { FastifyInstance } from 'fastify';

const COMMON: Options = { allErrors: false, removeAdditional: false, useDefaults: true, strict: false };

function createAjv(coerceTypes: Options['coerceTypes']): Ajv {
  const ajv = new Ajv({ ...COMMON, coerceTypes });
  addFormats.default(ajv);
  return ajv;
}

export function registerValidation(app: FastifyInstance): void {
  const strict = createAjv(false);
  const coercing = createAjv('array');
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === 'body' ? strict : coercing).compile(schema));
  // only JSON is accepted: a text/plain body is a 415, not a string to validate
  app.removeContentTypeParser(['text/plain']);
}
