/**
 * The MQTT settings of key distribution (DESIGN §4, §7). Parsed by config.ts (the only reader
 * of the environment) through the helpers it passes in, so every problem is reported together
 * with the others. Without MQTT_URL the publisher is off and outbox rows simply wait.
 *
 * Never echo MQTT_URL or MQTT_PASSWORD in a message: the URL may carry credentials.
 */
import os from 'node:os';
import path from 'node:path';

export interface MqttConfig {
  url: string;
  /** host:port only, for logs */
  endpoint: string;
  username: string | undefined;
  password: string | undefined;
  caFile: string | undefined;
  certFile: string | undefined;
  keyFile: string | undefined;
  clientId: string;
  /** 0: clean session (default); > 0: clean start off and the broker keeps the session this long */
  sessionExpirySeconds: number;
  keepaliveSeconds: number;
  /** reconnect backoff: first delay, doubling per failed attempt up to the max */
  reconnectMinMs: number;
  reconnectMaxMs: number;
  /** shared-subscription group of the acknowledgement subscription (one replica handles each ack) */
  ackShareGroup: string;
  outbox: {
    batchSize: number;
    pollIntervalMs: number;
    leaseSeconds: number;
    retryBaseMs: number;
    retryMaxMs: number;
  };
}

export const MQTT_SETTINGS: ReadonlyArray<{ name: string; default: string; meaning: string }> = [
  { name: 'MQTT_URL', default: 'unset → publisher off (outbox waits)', meaning: 'broker for key distribution: mqtts://host:8883 (mqtt:// only on loopback unless MQTT_ALLOW_PLAINTEXT)' },
  { name: 'MQTT_USERNAME', default: 'unset', meaning: 'broker user name' },
  { name: 'MQTT_PASSWORD', default: '(secret)', meaning: 'broker password' },
  { name: 'MQTT_CA_FILE', default: 'unset → system CAs', meaning: 'PEM CA bundle the broker certificate is verified against' },
  { name: 'MQTT_CERT_FILE', default: 'unset', meaning: 'PEM client certificate for mutual TLS (with MQTT_KEY_FILE)' },
  { name: 'MQTT_KEY_FILE', default: 'unset', meaning: 'PEM private key of the client certificate' },
  { name: 'MQTT_CLIENT_ID', default: 'keystrata-<host>-<pid>-<random>', meaning: 'MQTT client id; must differ between replicas (the broker disconnects a duplicate)' },
  { name: 'MQTT_SESSION_EXPIRY_SECONDS', default: '0', meaning: '0: clean session; > 0: the broker keeps this replica\'s session (needs a stable MQTT_CLIENT_ID)' },
  { name: 'MQTT_KEEPALIVE_SECONDS', default: '30', meaning: 'MQTT keep-alive interval' },
  { name: 'MQTT_RECONNECT_MIN_MS', default: '1000', meaning: 'first reconnect delay after the broker connection is lost (doubles per failed attempt)' },
  { name: 'MQTT_RECONNECT_MAX_MS', default: '30000', meaning: 'largest reconnect delay' },
  { name: 'MQTT_ALLOW_PLAINTEXT', default: 'false', meaning: 'allow mqtt:// (no TLS) to a host other than loopback' },
  { name: 'MQTT_ACK_SHARE_GROUP', default: 'keystrata', meaning: 'shared-subscription group for keystrata/devices/+/keys/ack' },
  { name: 'OUTBOX_BATCH_SIZE', default: '100', meaning: 'outbox rows one publisher claims at a time (also its in-flight bound)' },
  { name: 'OUTBOX_POLL_INTERVAL_MS', default: '1000', meaning: 'how often a publisher looks for due outbox rows' },
  { name: 'OUTBOX_LEASE_SECONDS', default: '60', meaning: 'lease on a claimed row, renewed while it is in flight; a dead replica\'s rows return after it' },
  { name: 'OUTBOX_RETRY_BASE_MS', default: '1000', meaning: 'first retry delay after a failed publish (doubles per attempt, with jitter)' },
  { name: 'OUTBOX_RETRY_MAX_MS', default: '300000', meaning: 'largest retry delay' },
];

export interface ConfigReaders {
  read(name: string): string | undefined;
  int(name: string, fallback: number, min: number, max: number): number;
  bool(name: string, fallback: boolean): boolean;
  problems: string[];
}

const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]', '::1']);

export function loadMqttConfig(r: ConfigReaders): MqttConfig | undefined {
  const raw = r.read('MQTT_URL');
  const file = (name: string) => {
    const value = r.read(name);
    return value === undefined ? undefined : path.resolve(value);
  };
  const certFile = file('MQTT_CERT_FILE');
  const keyFile = file('MQTT_KEY_FILE');
  const caFile = file('MQTT_CA_FILE');
  const allowPlaintext = r.bool('MQTT_ALLOW_PLAINTEXT', false);
  const sessionExpirySeconds = r.int('MQTT_SESSION_EXPIRY_SECONDS', 0, 0, 4_294_967_295);
  const keepaliveSeconds = r.int('MQTT_KEEPALIVE_SECONDS', 30, 5, 65_535);
  const reconnectMinMs = r.int('MQTT_RECONNECT_MIN_MS', 1000, 10, 600_000);
  const reconnectMaxMs = r.int('MQTT_RECONNECT_MAX_MS', 30_000, 10, 3_600_000);
  if (reconnectMaxMs < reconnectMinMs) r.problems.push('MQTT_RECONNECT_MAX_MS must not be below MQTT_RECONNECT_MIN_MS');
  const outbox = {
    batchSize: r.int('OUTBOX_BATCH_SIZE', 100, 1, 10_000),
    pollIntervalMs: r.int('OUTBOX_POLL_INTERVAL_MS', 1000, 10, 600_000),
    leaseSeconds: r.int('OUTBOX_LEASE_SECONDS', 60, 5, 3600),
    retryBaseMs: r.int('OUTBOX_RETRY_BASE_MS', 1000, 10, 3_600_000),
    retryMaxMs: r.int('OUTBOX_RETRY_MAX_MS', 300_000, 10, 86_400_000),
  };
  const ackShareGroup = r.read('MQTT_ACK_SHARE_GROUP') ?? 'keystrata';
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(ackShareGroup)) r.problems.push('MQTT_ACK_SHARE_GROUP must match ^[A-Za-z0-9_-]{1,64}$');
  const clientIdRaw = r.read('MQTT_CLIENT_ID');
  if (clientIdRaw !== undefined && !/^[A-Za-z0-9._:-]{1,128}$/.test(clientIdRaw)) r.problems.push('MQTT_CLIENT_ID must match ^[A-Za-z0-9._:-]{1,128}$');
  if ((certFile === undefined) !== (keyFile === undefined)) r.problems.push('MQTT_CERT_FILE and MQTT_KEY_FILE go together (mutual TLS)');
  if (sessionExpirySeconds > 0 && clientIdRaw === undefined) r.problems.push('MQTT_SESSION_EXPIRY_SECONDS needs a stable MQTT_CLIENT_ID (one per replica)');
  if (r.read('MQTT_PASSWORD') !== undefined && r.read('MQTT_USERNAME') === undefined) r.problems.push('MQTT_PASSWORD needs MQTT_USERNAME');
  if (outbox.retryMaxMs < outbox.retryBaseMs) r.problems.push('OUTBOX_RETRY_MAX_MS must not be below OUTBOX_RETRY_BASE_MS');
  if (raw === undefined) {
    if (certFile || caFile || r.read('MQTT_USERNAME')) r.problems.push('MQTT_* settings are given but MQTT_URL is not');
    return undefined;
  }

  let parsed: URL;
  try {
    parsed = new URL(raw);
  } catch {
    r.problems.push('MQTT_URL must be an mqtt:// or mqtts:// URL');
    return undefined;
  }
  if (parsed.protocol !== 'mqtt:' && parsed.protocol !== 'mqtts:') {
    r.problems.push('MQTT_URL must be an mqtt:// or mqtts:// URL');
    return undefined;
  }
  if (parsed.username !== '' || parsed.password !== '') r.problems.push('MQTT_URL must not carry credentials: use MQTT_USERNAME and MQTT_PASSWORD');
  // credentials, acknowledgements and the wrapped keys' metadata would cross the network in clear
  if (parsed.protocol === 'mqtt:' && !LOOPBACK.has(parsed.hostname) && !allowPlaintext) {
    r.problems.push('MQTT_URL must use mqtts:// (plain mqtt:// only on loopback, or with MQTT_ALLOW_PLAINTEXT=true)');
  }
  if (parsed.protocol === 'mqtt:' && (certFile || caFile)) r.problems.push('MQTT_CA_FILE / MQTT_CERT_FILE need an mqtts:// MQTT_URL');
  const port = parsed.port || (parsed.protocol === 'mqtts:' ? '8883' : '1883');
  return {
    url: raw,
    endpoint: `${parsed.protocol}//${parsed.hostname}:${port}`,
    username: r.read('MQTT_USERNAME'),
    password: r.read('MQTT_PASSWORD'),
    caFile,
    certFile,
    keyFile,
    clientId: clientIdRaw ?? `keystrata-${os.hostname().replace(/[^A-Za-z0-9._-]/g, '').slice(0, 40)}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`,
    sessionExpirySeconds,
    keepaliveSeconds,
    reconnectMinMs,
    reconnectMaxMs,
    ackShareGroup,
    outbox,
  };
}
