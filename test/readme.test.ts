import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { SETTINGS } from '../src/config.js';

describe('README', () => {
  it('when a setting exists in config.ts, then the README settings table lists it', () => {
    const readme = fs.readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    const missing = SETTINGS.filter((s) => !readme.includes(`| \`${s.name}\` |`)).map((s) => s.name);
    expect(missing).toEqual([]);
  });
});
