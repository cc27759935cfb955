/** `npm run openapi`: regenerate openapi/openapi.json from the route schemas. */
import fs from 'node:fs';
import { OPENAPI_FILE, generateOpenApi, serializeOpenApi } from '../src/http/openapi.js';

const document = await generateOpenApi();
fs.mkdirSync(new URL('../openapi', import.meta.url), { recursive: true });
fs.writeFileSync(OPENAPI_FILE, serializeOpenApi(document));
process.stdout.write(`wrote ${OPENAPI_FILE} (${Object.keys(document.paths as object).length} paths)\n`);
