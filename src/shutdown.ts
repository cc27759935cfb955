/**
 * Stopping the server on SIGTERM/SIGINT: close everything, then exit 0; but never take longer
 * than SHUTDOWN_TIMEOUT_MS, and stop at once on a second signal.
 *
 * Past the deadline the process sends itself SIGKILL rather than calling process.exit: a worker
 * thread stuck in native code (issue 7 found a JWE thread deadlocked in Node's JWK export)
 * cannot be terminated, and Node joins its worker threads on every other way out (process.exit,
 * and the event loop running dry), so the process would hang forever and keep its port. SIGKILL
 * is also what an orchestrator sends at the end of its grace period (Kubernetes 30 s, docker
 * stop 10 s); the default deadline (8 s) is shorter, so the log line saying why is written first.
 * Nothing is lost by it: every change commits in its own transaction (and an open one is rolled
 * back by PostgreSQL), and no key exists only in memory.
 */
import type { Logger } from 'pino';

export interface ShutdownOptions {
  /** synchronous (pino.destination({ sync: true })): a line still queued in an asynchronous stream dies with the SIGKILL */
  logger: Pick<Logger, 'info' | 'error' | 'fatal'>;
  /** SHUTDOWN_TIMEOUT_MS: the longest a shutdown may take before the process kills itself */
  timeoutMs: number;
  /** stop accepting work and close every resource */
  close: () => Promise<void>;
  /** the normal way out, once `close` settled: process.exit */
  exit?: (code: number) => void;
  /** the way out that cannot hang: SIGKILL to this process */
  kill?: () => void;
}

/** The signal handler: the first call shuts down, a second one kills the process at once. */
export function createShutdown(options: ShutdownOptions): (signal: string) => Promise<void> {
  const { logger, timeoutMs, close } = options;
  const exit = options.exit ?? ((code: number) => process.exit(code));
  const kill = options.kill ?? (() => process.kill(process.pid, 'SIGKILL'));
  let closing = false;
  let done = false;

  return async (signal) => {
    if (done) return;
    if (closing) {
      done = true;
      logger.fatal({ signal }, 'second signal during shutdown: stopping now');
      kill();
      return;
    }
    closing = true;
    logger.info({ signal, timeoutMs }, 'shutting down');
    // ref'd on purpose: should everything left be a promise with nothing behind it, the deadline
    // still fires rather than the event loop running dry (which would hang on a stuck thread)
    const deadline = setTimeout(() => {
      if (done) return;
      done = true;
      logger.fatal({ signal, timeoutMs }, 'shutdown did not finish within SHUTDOWN_TIMEOUT_MS: killing the process');
      kill();
    }, timeoutMs);
    let code = 0;
    try {
      await close();
    } catch (error) {
      code = 1;
      logger.error({ err: error }, 'shutdown failed');
    }
    if (done) return;
    done = true;
    clearTimeout(deadline);
    exit(code);
  };
}
