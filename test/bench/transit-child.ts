/**
 * The transit emulator (test/support/transit-emulator.ts) in its own process for figure 6, as
 * Vault is in production: the rewrap crypto does not share a core's event loop with keystrata.
 * Forked by kek-rewrap.ts with an IPC channel: sends `{ url, token, mount }` once listening,
 * answers `{ type: 'requests' }` with the requests it has answered so far, `{ type: 'close' }`
 * closes and exits.
 */
import { startTransitEmulator } from '../support/transit-emulator.js';

const emulator = await startTransitEmulator();
const send = (message: unknown) => process.send?.(message);

process.on('message', (message: { type?: string }) => {
  if (message.type === 'requests') send({ type: 'requests', requests: emulator.requests.map((r) => ({ method: r.method, path: r.path, status: r.status })) });
  if (message.type === 'close') void emulator.close().finally(() => process.exit(0));
});
process.on('disconnect', () => void emulator.close().finally(() => process.exit(0)));

send({ type: 'ready', url: emulator.url, token: emulator.token, mount: emulator.mount });
