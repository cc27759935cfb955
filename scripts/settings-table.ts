/** Prints the README's settings table from config.ts: `npx tsx scripts/settings-table.ts`. */
import { SETTINGS } from '../src/config.js';

process.stdout.write(SETTINGS.map((s) => `| \`${s.name}\` | ${s.default} | ${s.meaning} |`).join('\n') + '\n');
