#!/usr/bin/env node
// The `keystrata` command (package.json "bin"): `keystrata migrate | rotate | audit verify | token`.
//
// Two layouts, found relative to this file so it works from any working directory:
// * a checkout (src/cli.ts present): run the TypeScript source through tsx, so the command
//   always runs the code you are looking at, never a stale dist/ left by an earlier build;
// * the container image (no src/, only the compiled dist/): import dist/src/cli.js.
// src/cli.ts does its work when imported and reads its arguments from process.argv.slice(2).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = new URL('../', import.meta.url);
const source = new URL('src/cli.ts', root);
const compiled = new URL('dist/src/cli.js', root);

if (existsSync(fileURLToPath(source))) {
  const { register } = await import('tsx/esm/api');
  // The repository's tsconfig, not whatever tsconfig.json the caller's working directory has.
  register({ tsconfig: fileURLToPath(new URL('tsconfig.json', root)) });
  await import(source.href);
} else if (existsSync(fileURLToPath(compiled))) {
  await import(compiled.href);
} else {
  process.stderr.write(
    `keystrata: found neither ${fileURLToPath(source)} nor ${fileURLToPath(compiled)} ` +
      '(run `npm install` in a checkout, or `npm run build`)\n',
  );
  process.exitCode = 1;
}
