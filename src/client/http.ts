/**
 * One HTTP exchange with keystrata: bearer token (static or refreshed on 401), JSON in and out,
 * RFC 9457 problems turned into KeystrataClientError, and bounded retries of 503 (and 429,
 * 502, 504, network errors) that honour Retry-After. Every request the client makes is a read
 * (key fetch), so retrying is safe.
 */
import { KeystrataClientError, type Problem } from './errors.js';

export type TokenSource = string | (() => string | Promise<string>);

export interface RetryOptions {
  /** total attempts, the first included (default 4) */
  maxAttempts?: number;
  /** longest wait between attempts; a Retry-After above it is not waited for (default 10 s) */
  maxDelayMs?: number;
  /** first backoff step when the server sends no Retry-After (default 250 ms, doubled per attempt, full jitter) */
  baseDelayMs?: number;
}

export interface HttpDeps {
  baseUrl: URL;
  token: TokenSource;
  fetch: typeof fetch;
  retry: Required<RetryOptions>;
  requestTimeoutMs: number;
  now: () => number;
  sleep: (ms: number) => Promise<void>;
  random: () => number;
}

const RETRYABLE = new Set([429, 502, 503, 504]);
const MAX_ERROR_BODY = 64 * 1024;

/** Normalise and check the service URL: https, or http only to loopback unless allowed. */
export function serviceUrl(baseUrl: string | URL, allowInsecureHttp: boolean): URL {
  let url: URL;
  try {
    url = new URL(String(baseUrl));
  } catch {
    throw new KeystrataClientError('invalid_option', 'baseUrl is not a valid URL');
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new KeystrataClientError('invalid_option', 'baseUrl must be an http(s) URL');
  if (url.username || url.password) throw new KeystrataClientError('invalid_option', 'baseUrl must not carry credentials: pass a token');
  const loopback = ['127.0.0.1', '[::1]', 'localhost'].includes(url.hostname);
  if (url.protocol === 'http:' && !loopback && !allowInsecureHttp) {
    throw new KeystrataClientError('insecure_base_url', 'baseUrl must use https (plain http is allowed to loopback, or with allowInsecureHttp: true behind a TLS-terminating mesh)');
  }
  url.search = '';
  url.hash = '';
  if (!url.pathname.endsWith('/')) url.pathname += '/';
  return url;
}

export function createHttp(deps: HttpDeps) {
  const { retry } = deps;

  async function tokenValue(): Promise<string> {
    if (typeof deps.token === 'string') return deps.token;
    let value: unknown;
    try {
      value = await deps.token();
    } catch (error) {
      throw new KeystrataClientError('token_unavailable', 'The token source failed', { cause: error });
    }
    if (typeof value !== 'string' || value === '') throw new KeystrataClientError('token_unavailable', 'The token source returned no token');
    return value;
  }

  /** POST/GET a JSON document; resolves with the parsed 2xx body. */
  async function requestJson(method: 'GET' | 'POST', path: string, body?: unknown): Promise<unknown> {
    const url = new URL(path, deps.baseUrl);
    let refreshedAfter401 = false;
    for (let attempt = 1; ; attempt++) {
      const token = await tokenValue();
      let response: Response;
      try {
        response = await deps.fetch(url, {
          method,
          headers: {
            authorization: `Bearer ${token}`,
            accept: 'application/json, application/problem+json',
            ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          },
          ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
          // a key service has no business redirecting a request that carries a bearer token
          redirect: 'error',
          signal: AbortSignal.timeout(deps.requestTimeoutMs),
        });
      } catch (error) {
        if (attempt < retry.maxAttempts) {
          await deps.sleep(backoff(attempt));
          continue;
        }
        const reason = error instanceof Error ? `${error.name}: ${error.message}` : 'network error';
        throw new KeystrataClientError('network_error', `keystrata could not be reached after ${attempt} attempt(s) (${reason})`, { attempts: attempt, cause: error });
      }

      if (response.ok) {
        try {
          return await response.json();
        } catch {
          throw new KeystrataClientError('invalid_response', `keystrata answered ${response.status} with a body that is not JSON`, { status: response.status, attempts: attempt });
        }
      }

      const problem = await readProblem(response);
      if (response.status === 401 && typeof deps.token === 'function' && !refreshedAfter401) {
        // the token may have expired between the source handing it out and the server reading it
        refreshedAfter401 = true;
        attempt--;
        continue;
      }
      const retryAfterMs = parseRetryAfter(response.headers.get('retry-after'), deps.now());
      const retryable = RETRYABLE.has(response.status);
      const waitMs = retryAfterMs ?? backoff(attempt);
      if (retryable && attempt < retry.maxAttempts && waitMs <= retry.maxDelayMs) {
        await deps.sleep(waitMs);
        continue;
      }
      const what = problem?.detail ?? problem?.title ?? response.statusText;
      throw new KeystrataClientError(problem?.code ?? `http_${response.status}`, `keystrata answered ${response.status}${what ? `: ${what}` : ''}`, {
        status: response.status,
        problem,
        attempts: attempt,
        retryAfterMs,
      });
    }
  }

  function backoff(attempt: number): number {
    const ceiling = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** (attempt - 1));
    return Math.floor(deps.random() * ceiling);
  }

  return { requestJson };
}

/** Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), in ms from now. */
export function parseRetryAfter(value: string | null, now: number): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d{1,9}$/.test(text)) return Number(text) * 1000;
  // HTTP-date formats all start with a day name ("Sun, 06 Nov 1994 08:49:37 GMT")
  const at = /^[A-Za-z]{3}/.test(text) ? Date.parse(text) : NaN;
  return Number.isFinite(at) ? Math.max(0, at - now) : undefined;
}

async function readProblem(response: Response): Promise<Problem | undefined> {
  const type = response.headers.get('content-type') ?? '';
  let text: string;
  try {
    text = await response.text();
  } catch {
    return undefined;
  }
  if (!/json/i.test(type) || text.length > MAX_ERROR_BODY) return undefined;
  try {
    const parsed: unknown = JSON.parse(text);
    return parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed) ? (parsed as Problem) : undefined;
  } catch {
    return undefined;
  }
}
