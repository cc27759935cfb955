/**
 * The transit emulator (test/support/transit-emulator.ts) in its own process for figure 6, as
 * Vault is in production: the rewrap crypto does not share a core's event loop with keystrata.
 * Forked by kek-rewrap.ts with an IPC channel: sends `{ url, token, mount }` once listening,
 * answers `{ type: 'requests' }` with the requests it has answered so far, `{ type: 'close' }`
 * closes and exits; `{ type: 'profile-start' }` / `{ type: 'profile-stop', file }` take a CPU profile
 * (answered with `profiling` / `profiled`).
 */
import fs from 'node:fs';
import inspector from 'node:inspector/promises';
import { startTransitEmulator } from '../support/transit-emulator.js';

const emulator = await startTransitEmulator();
const send = (message: unknown) => process.send?.(message);

let profiler: inspector.Session | undefined;
process.on('message', (message: { type?: string; file?: string }) => {
  if (message.type === 'profile-start') {
    profiler = new inspector.Session();
    profiler.connect();
    void profiler
      .post('Profiler.enable')
      .then(() => profiler?.post('Profiler.start'))
      .then(() => send({ type: 'profiling' }));
  }
  if (message.type === 'profile-stop' && profiler) {
    const session = profiler;
    profiler = undefined;
    void session.post('Profiler.stop').then(({ profile }) => {
      session.disconnect();
      if (message.file !== undefined) fs.writeFileSync(message.file, JSON.stringify(profile));
      send({ type: 'profiled' });
    });
  }
  if (message.type === 'requests') send({ type: 'requests', requests: emulator.requests.map((r) => ({ method: r.method, path: r.path, status: r.status })) });
  if (message.type === 'close') void emulator.close().finally(() => process.exit(0));
});
process.on('disconnect', () => void emulator.close().finally(() => process.exit(0)));

send({ type: 'ready', url: emulator.url, token: emulator.token, mount: emulator.mount });
