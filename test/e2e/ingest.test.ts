/**
 * End-to-end ingest (issue 9, part 4): a fleet of 200 simulated devices encrypts telemetry
 * with the device reference (`createDeviceEncryptor`), and a backend decrypts it through
 * `createKeystrataClient` over real HTTP (the app listens on a loopback port), while
 *
 *   (a) a staggered rollout rotates every device DEK (25 % a wave, a wave every 12 h), and
 *   (b) field keys rotate: a field-level rollout of `patient_id` (50 % a wave) and an immediate
 *       rotation (`POST /v1/devices/{id}/fields/medical_record/rotate`) of a fifth of the fleet.
 *
 * Time is the app's manual clock, moved 12 h per tick (ticks 0–7: 3.5 simulated days, inside
 * the 7-day field policy period, so cron starts no rollout of its own); cron (`POST
 * /v1/rotation/run`, keystrata:rotate token) runs every tick, moving waves forward and grace
 * versions to `decrypt_only` once the 2-day field grace is over. The backend client runs on the
 * same clock, so its 1 h cache TTL expires between ticks as it would in production.
 *
 * Devices receive new keys the way they would over MQTT: the key-update messages of their
 * outbox rows, built by the service's message builder (sealed under the device DEK version the
 * row names) and opened with the test device of test/distribution (written from the wire
 * format only), in outbox order, each id once. Their enrolment key (device DEK v1) is unwrapped
 * independently from the stored rows, as provisioning would hand it over.
 *
 * Four kinds of device, chosen when the field rollout starts (tick 1) from its waves, so that
 * every case below happens on every run:
 *   - online (175): fetch key updates every tick before sending, always on the newest primary;
 *   - stuck (5 of each patient_id wave): telemetry flows but key updates do not arrive from
 *     tick 1 to tick 6, so they keep encrypting patient_id with v1 after its grace has ended;
 *   - offline (5 of each wave): from tick 1 to tick 6 they buffer telemetry (encrypted when
 *     measured, with the keys held then) and send the backlog when back;
 *   - stuckLater (5 of the first wave whose medical_record is rotated): they receive patient_id v2 at
 *     tick 1, then key updates stop from tick 2 to 6, so medical_record v1 outlives its grace.
 * All come back at tick 7: backlog first, then key updates, then fresh telemetry.
 *
 * Every device sends two messages a tick (at tick + index seconds, and 30 minutes later). The
 * backend ingests a batch as documented in docs/ingest.md: one `prefetch` for the batch, then
 * `decryptFields` per message. The verdict every message must get is computed from the stored
 * version rows by the DESIGN §2 rule (accepted under primary, under grace until its end, under
 * decrypt_only if stamped at or before the state change) and, independently, by hand from the
 * rollout's wave of each device; the test asserts exact counts.
 */
import type { AddressInfo } from 'node:net';
import { isDeepStrictEqual } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FieldDecryptionError, KeyStateError, createDeviceEncryptor, createKeystrataClient, isEnvelope, parseEnvelope, type DeviceEncryptor, type KeyRef, type KeystrataClient, type TelemetryMessage } from '../../src/client/index.js';
import type { createManualClock } from '../../src/clock.js';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, groupBinding } from '../../src/crypto/binding.js';
import { createDistributionKeys } from '../../src/distribution/distribution.keys.js';
import { distributionDb } from '../../src/distribution/distribution.tables.js';
import { createMessageBuilder } from '../../src/distribution/message.builder.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { bucketOffset, planWaves, waveOfDevice } from '../../src/rotation/rollout.waves.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, newDeliveryKeyPair } from '../support/flow.js';
import { countingFetch } from '../client/support.js';
import { openKeyUpdate, type KeyUpdate } from '../distribution/device.js';

const GROUP = 'icu-monitors-eu';
const BACKEND = 'telemetry-ingest';
const FIELDS = ['patient_id', 'medical_record'] as const;
const DEVICE_COUNT = 200;
const HOUR = 3_600_000;
const TICK = 12 * HOUR;
const LAST_TICK = 7;
/** the tick at which the stuck and offline devices come back */
const BACK_AT = 7;
/** the tick of the immediate medical_record rotations */
const MEDICAL_ROTATION_AT = 2;
const FIELD_GRACE_TICKS = 4; // the built-in field policy: 2 days of grace
/** the cron job does not run at this tick (an outage): grace versions past their end are still `grace` while the backend ingests */
const MISSED_CRON_AT = 5;

type Kind = 'online' | 'stuck' | 'offline' | 'stuckLater';

interface SimDevice {
  id: string;
  index: number;
  kind: Kind;
  /** device DEK versions held (enrolment key, then those delivered) */
  dek: Map<number, Buffer>;
  /** the last key-update message id applied */
  lastUpdate: number;
  encryptor: DeviceEncryptor;
  /** telemetry measured while offline, sent when back */
  backlog: Sent[];
  updateErrors: string[];
}

interface Sent {
  deviceId: string;
  tick: number;
  stamp: number;
  clear: TelemetryMessage;
  wire: TelemetryMessage;
  /** the version of each encrypted field, as the device chose it */
  versions: Record<string, number>;
  ingestedAt?: number;
  outcome?: { ok: true } | { ok: false; error: unknown };
}

interface BatchLog {
  tick: number;
  label: 'first' | 'second' | 'backlog';
  messages: number;
  requests: number;
  /** versions the prefetch did not find fresh in the cache */
  missed: number;
  /** items sent in the fetch requests (exact versions, plus whole-key re-reads of rotated keys) */
  fetchedItems: number;
  /** what the client's contract says they should be: every version not fetched within the TTL, plus one whole-key read per key named in a version new to the client */
  expectedItems: number;
}

let t: TestApp;
let clock: ReturnType<typeof createManualClock>;
let admin: string;
let rotator: string;
let keystrata: KeystrataClient;
let httpCalls: ReturnType<typeof countingFetch>['calls'];
let T0: number;
const devices: SimDevice[] = [];
const sent: Sent[] = [];
const batches: BatchLog[] = [];
const cronLog: Array<{ tick: number; rolloutDevices: number; graceExpiredFields: number; graceExpiredDevices: number; started: number }> = [];
const timings: Record<string, number> = {};
let deviceRolloutId: string;
let fieldRolloutId: string;
const medicalRotated = new Set<string>();

/** the immediate medical_record rotations hit every fifth device */
const medicalRotates = (d: SimDevice) => d.index % 5 === 0;
const tickTime = (tick: number) => T0 + tick * TICK;

beforeAll(async () => {
  const started = Date.now();
  t = await createTestApp({ manualClock: true });
  clock = t.clock as ReturnType<typeof createManualClock>;
  T0 = clock.now().getTime();
  admin = await t.token('keystrata:admin', { sub: 'alice' });
  rotator = await t.token('keystrata:rotate', { sub: 'cron', ttlSeconds: 3600 });
  await ok(call(t.app, admin, 'POST', '/v1/groups', { id: GROUP, deviceType: 'bedside-monitor', region: 'eu-west' }));
  const ids = Array.from({ length: DEVICE_COUNT }, (_, i) => `icu-${String(i).padStart(3, '0')}`);
  await ok(call(t.app, admin, 'POST', `/v1/groups/${GROUP}/devices/bulk`, { ids }));
  for (let i = 0; i < ids.length; i += 25) {
    await Promise.all(ids.slice(i, i + 25).flatMap((id) => FIELDS.map((field) => ok(call(t.app, admin, 'POST', `/v1/devices/${id}/fields`, { field })))));
  }
  const enrolment = await enrolmentKeys();
  for (const [index, id] of ids.entries()) {
    devices.push({
      id,
      index,
      kind: 'online',
      dek: new Map([[1, enrolment.get(id) as Buffer]]),
      lastUpdate: 0,
      encryptor: createDeviceEncryptor({ deviceId: id, keys: [] }),
      backlog: [],
      updateErrors: [],
    });
  }

  // the backend: its delivery key registered for its client id, a keys:read token for the group
  const backend = await newDeliveryKeyPair('X25519');
  await ok(call(t.app, admin, 'PUT', `/v1/clients/${BACKEND}/delivery-key`, { jwk: backend.publicJwk }));
  const reader = await t.token('keystrata:keys:read', { sub: BACKEND, groups: [GROUP], ttlSeconds: 3600 });
  await t.app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = t.app.server.address() as AddressInfo;
  const counter = countingFetch();
  httpCalls = counter.calls;
  keystrata = createKeystrataClient({ baseUrl: `http://127.0.0.1:${port}`, token: reader, deliveryPrivateKey: backend.privateKey, clock, fetch: counter.fetch });
  timings.setupMs = Date.now() - started;

  const simulating = Date.now();
  await simulate();
  timings.simulationMs = Date.now() - simulating;
});

afterAll(async () => {
  console.log(`ingest e2e: ${JSON.stringify({ timings, batches: batches.length, requests: httpCalls?.length, stats: keystrata?.stats() })}`);
  await t?.close();
});

async function ok(response: Promise<{ status: number; raw: string; body: Record<string, unknown> }>): Promise<Record<string, unknown>> {
  const { status, raw, body } = await response;
  if (status >= 300) throw new Error(`call failed: ${status} ${raw}`);
  return body;
}

/** Device DEK v1 of every device, unwrapped from the rows (KEK → group → device), not through the service's code paths. */
async function enrolmentKeys(): Promise<Map<string, Buffer>> {
  const db = t.database.db;
  const group = await db.selectFrom('group_versions').selectAll().where('group_id', '=', GROUP).where('version', '=', 1).executeTakeFirstOrThrow();
  const groupKey = await t.kek.unwrap(group.wrapped_key as string, groupBinding(GROUP, 1, t.kek.keyName));
  const rows = await db.selectFrom('device_versions').select(['device_id', 'version', 'parent_version', 'wrapped_key']).where('version', '=', 1).execute();
  return new Map(rows.map((r) => [r.device_id, unwrapKey(groupKey, r.wrapped_key as Buffer, deviceBinding(r.device_id, 1, GROUP, r.parent_version))]));
}

// ---------- the key channel: outbox rows → sealed key updates → devices ----------

const builder = () => {
  const material = createKeyMaterial({ kek: t.kek, cache: createKeyCache({ ttlSeconds: 3600, maxEntries: 1000 }) });
  return createMessageBuilder({ db: t.database.db, keys: createDistributionKeys({ db: t.database.db, material }) });
};
let messageBuilder: ReturnType<typeof createMessageBuilder> | undefined;

/** Hand each device the key updates queued for it since the last one it applied, in order. */
async function deliverKeyUpdates(receivers: SimDevice[]): Promise<number> {
  if (receivers.length === 0) return 0;
  messageBuilder ??= builder();
  const rows = await distributionDb(t.database.db)
    .selectFrom('key_outbox')
    .select(['id', 'device_id', 'kind', 'field', 'version', 'state', 'not_before', 'wrapped_by', 'with_key', 'attempts', 'created_at'])
    .where(
      'device_id',
      'in',
      receivers.map((d) => d.id),
    )
    .where('id', '>', Math.min(...receivers.map((d) => d.lastUpdate)))
    .orderBy('id')
    .execute();
  const byDevice = new Map<string, typeof rows>();
  for (const row of rows) byDevice.set(row.device_id, [...(byDevice.get(row.device_id) ?? []), row]);
  let delivered = 0;
  const one = async (device: SimDevice) => {
    for (const row of byDevice.get(device.id) ?? []) {
      if (Number(row.id) <= device.lastUpdate) continue;
      const { message } = await (messageBuilder as ReturnType<typeof createMessageBuilder>).build({ ...row, id: Number(row.id) });
      applyKeyUpdate(device, JSON.parse(JSON.stringify(message)) as KeyUpdate);
      delivered++;
    }
  };
  for (let i = 0; i < receivers.length; i += 20) await Promise.all(receivers.slice(i, i + 20).map(one));
  return delivered;
}

/** What firmware does with a key update: open it with the DEK version it names, keep the key. */
function applyKeyUpdate(device: SimDevice, update: KeyUpdate): void {
  if (update.id <= device.lastUpdate) return; // a re-delivery
  let key: Buffer;
  try {
    key = openKeyUpdate(update, device.id, device.dek);
  } catch (error) {
    device.updateErrors.push(`${update.id}: ${(error as Error).message}`);
    return;
  }
  device.lastUpdate = update.id;
  if (key.length === 0) return; // a state change of a version already held
  if (update.kind === 'device') device.dek.set(update.version, key);
  else device.encryptor.setKey({ field: update.field as string, version: update.version, key, state: update.state });
}

// ---------- telemetry ----------

function measure(device: SimDevice, tick: number, second: boolean): Sent {
  const stamp = tickTime(tick) + (second ? 30 * 60_000 : 0) + device.index * 1000;
  const seq = tick * 2 + (second ? 1 : 0);
  const clear: TelemetryMessage = {
    timestamp: stamp,
    device_type: 'bedside-monitor',
    heart_rate: 60 + ((device.index + seq) % 40),
    patient_id: `P-${device.index}-${seq}`,
    medical_record: { ward: `W${device.index % 7}`, dx: ['I10', `R${seq}`], seq },
  };
  const wire = device.encryptor.encryptMessage(clear, [...FIELDS]);
  return { deviceId: device.id, tick, stamp, clear, wire, versions: device.encryptor.versions() };
}

/** The versions a message names (docs/ingest.md's keyRefs): envelopes that parse and belong to this device and field. */
function keyRefs(deviceId: string, message: TelemetryMessage): KeyRef[] {
  const refs: KeyRef[] = [];
  for (const [field, value] of Object.entries(message)) {
    if (!isEnvelope(value)) continue;
    try {
      const envelope = parseEnvelope(value);
      if (envelope.deviceId === deviceId && envelope.field === field) refs.push({ deviceId, field, version: envelope.version });
    } catch {
      // malformed: decryptFields reports it for this message alone
    }
  }
  return refs;
}

const refsOf = (message: Sent): KeyRef[] => keyRefs(message.deviceId, message.wire);

/** when the backend last fetched each version, and the versions it has seen of each key */
const fetchedAt = new Map<string, number>();
const seenVersions = new Map<string, Set<number>>();

function expectedFetchItems(refs: KeyRef[]): number {
  const now = clock.now().getTime();
  const stale = new Map<string, KeyRef>();
  for (const ref of refs) {
    const kid = `${ref.deviceId}/${ref.field}:v${ref.version}`;
    if (!(now - (fetchedAt.get(kid) ?? -Infinity) < HOUR)) stale.set(kid, ref);
  }
  const rotatedKeys = new Set<string>();
  for (const [kid, ref] of stale) {
    const key = `${ref.deviceId}/${ref.field}`;
    const seen = seenVersions.get(key) ?? new Set<number>();
    if (seen.size > 0 && !seen.has(ref.version)) rotatedKeys.add(key);
    fetchedAt.set(kid, now);
  }
  for (const ref of stale.values()) seenVersions.set(`${ref.deviceId}/${ref.field}`, (seenVersions.get(`${ref.deviceId}/${ref.field}`) ?? new Set()).add(ref.version));
  return stale.size + rotatedKeys.size;
}

/** The backend's ingest loop for one batch (docs/ingest.md): one prefetch, then decryptFields per message. */
async function ingest(batch: Sent[], tick: number, label: BatchLog['label']): Promise<void> {
  const before = httpCalls.length;
  const expectedItems = expectedFetchItems(batch.flatMap(refsOf));
  const prefetched = await keystrata.prefetch(batch.flatMap(refsOf));
  expect(prefetched.missing).toEqual([]);
  for (const message of batch) {
    message.ingestedAt = clock.now().getTime();
    try {
      const clear = await keystrata.decryptFields(message.deviceId, message.wire);
      expect(isDeepStrictEqual(clear, message.clear), `${message.deviceId} tick ${message.tick}: decrypted to something else`).toBe(true);
      message.outcome = { ok: true };
    } catch (error) {
      message.outcome = { ok: false, error };
    }
  }
  const calls = httpCalls.slice(before);
  batches.push({ tick, label, messages: batch.length, requests: calls.length, missed: prefetched.fetched, expectedItems, fetchedItems: calls.reduce((n, c) => n + (c.body?.items?.length ?? 0), 0) });
}

async function cron(tick: number): Promise<void> {
  const summary = (await ok(call(t.app, rotator, 'POST', '/v1/rotation/run', {}))) as {
    errors: unknown[];
    devices: { rollouts: { devices: number; failed: number; started: unknown[]; halted: unknown[] } };
    sweeps: { graceExpired: { devices: number; fields: number } };
  };
  expect(summary.errors, `cron at tick ${tick}`).toEqual([]);
  expect(summary.devices.rollouts.failed).toBe(0);
  expect(summary.devices.rollouts.halted).toEqual([]);
  cronLog.push({
    tick,
    rolloutDevices: summary.devices.rollouts.devices,
    graceExpiredFields: summary.sweeps.graceExpired.fields,
    graceExpiredDevices: summary.sweeps.graceExpired.devices,
    started: summary.devices.rollouts.started.length,
  });
}

/** patient_id's wave of each device (0 at tick 1, 1 at tick 2), from the rollout's plan as computed in Node. */
function plannedPatientWave(deviceId: string): number {
  return waveOfDevice(deviceId, bucketOffset(fieldRolloutId), planWaves({ percentPerDay: 50 }));
}

/** The first devices (by index) of each patient_id wave lose their key channel or go offline; device 000 is one of them. */
function chooseAwayDevices(): void {
  for (const wave of [0, 1]) {
    const inWave = devices.filter((d) => plannedPatientWave(d.id) === wave);
    for (const d of inWave.slice(0, 5)) d.kind = 'stuck';
    for (const d of inWave.slice(5, 10)) d.kind = 'offline';
    if (wave === 0) for (const d of inWave.filter((x) => x.kind === 'online' && medicalRotates(x)).slice(0, 5)) d.kind = 'stuckLater';
  }
  expect(devices.filter((d) => d.kind === 'stuck')).toHaveLength(10);
  expect(devices.filter((d) => d.kind === 'offline')).toHaveLength(10);
  expect(devices.filter((d) => d.kind === 'stuckLater')).toHaveLength(5);
  expect(devices[0]?.kind).toBe('stuck');
}

async function simulate(): Promise<void> {
  for (let tick = 0; tick <= LAST_TICK; tick++) {
    clock.set(new Date(tickTime(tick)));
    if (tick === 0) {
      deviceRolloutId = (await ok(call(t.app, admin, 'POST', '/v1/rollouts', { groupId: GROUP, level: 'device', percentPerDay: 25, waveIntervalSeconds: TICK / 1000 }))).id as string;
    }
    if (tick === 1) {
      fieldRolloutId = (await ok(call(t.app, admin, 'POST', '/v1/rollouts', { groupId: GROUP, level: 'field', field: 'patient_id', percentPerDay: 50, waveIntervalSeconds: TICK / 1000 }))).id as string;
      chooseAwayDevices();
    }
    if (tick !== MISSED_CRON_AT) await cron(tick);
    if (tick === MEDICAL_ROTATION_AT) {
      const chosen = devices.filter(medicalRotates);
      for (let i = 0; i < chosen.length; i += 10) {
        await Promise.all(chosen.slice(i, i + 10).map((d) => ok(call(t.app, admin, 'POST', `/v1/devices/${d.id}/fields/medical_record/rotate`, {}))));
      }
      for (const d of chosen) medicalRotated.add(d.id);
    }

    const away = (d: SimDevice) => tick < BACK_AT && ((d.kind === 'stuckLater' && tick >= MEDICAL_ROTATION_AT) || ((d.kind === 'stuck' || d.kind === 'offline') && tick >= 1));
    if (tick === BACK_AT) {
      // back online: the backlog first (measured and encrypted while away), then key updates
      const backlog = devices.flatMap((d) => d.backlog.splice(0));
      await ingest(backlog, tick, 'backlog');
    }
    await deliverKeyUpdates(devices.filter((d) => !away(d)));

    for (const second of [false, true]) {
      if (second) clock.set(new Date(tickTime(tick) + 30 * 60_000));
      const batch: Sent[] = [];
      for (const device of devices) {
        const message = measure(device, tick, second);
        sent.push(message);
        if (device.kind === 'offline' && away(device)) device.backlog.push(message);
        else batch.push(message);
      }
      await ingest(batch, tick, second ? 'second' : 'first');
    }
  }
}

// ---------- what every message must get ----------

interface VersionRow {
  device_id: string;
  field: string;
  version: number;
  state: string;
  state_changed_at: Date;
  state_until: Date | null;
  created_at: Date;
}

/** DESIGN §2, from the stored rows: which field (if any) makes the message unacceptable. */
function expectedRefusal(message: Sent, rows: Map<string, VersionRow>): string | undefined {
  for (const field of FIELDS) {
    const row = rows.get(`${message.deviceId}/${field}:v${message.versions[field]}`);
    if (!row) throw new Error(`no stored version for ${message.deviceId}/${field}:v${message.versions[field]}`);
    const accepted =
      row.state === 'primary' ||
      (row.state === 'grace' && (row.state_until === null || message.stamp <= row.state_until.getTime())) ||
      (row.state === 'decrypt_only' && message.stamp <= row.state_changed_at.getTime());
    if (!accepted) return field;
  }
  return undefined;
}

async function storedVersions(): Promise<Map<string, VersionRow>> {
  const rows = await t.database.db.selectFrom('field_versions').select(['device_id', 'field', 'version', 'state', 'state_changed_at', 'state_until', 'created_at']).execute();
  return new Map(rows.map((r) => [`${r.device_id}/${r.field}:v${r.version}`, r as VersionRow]));
}

/** The tick at which each device's patient_id was rotated by the field rollout (its wave). */
async function patientRotationTick(): Promise<Map<string, number>> {
  const rows = await t.database.db
    .withTables<{ rollout_items: { rollout_id: string; device_id: string; wave: number; status: string } }>()
    .selectFrom('rollout_items')
    .select(['device_id', 'wave', 'status'])
    .where('rollout_id', '=', fieldRolloutId)
    .execute();
  expect(rows.every((r) => r.status === 'done')).toBe(true);
  // the rollout put each device in the wave its plan says (no device is left for the sweep)
  for (const r of rows) expect(r.wave, r.device_id).toBe(plannedPatientWave(r.device_id));
  return new Map(rows.map((r) => [r.device_id, 1 + r.wave]));
}

describe('ingest while device keys roll out and field keys rotate', () => {
  it('when the run is over, then both rollouts completed on every device, the grace versions went decrypt_only at their grace end, and cron started nothing by itself', async () => {
    for (const id of [deviceRolloutId, fieldRolloutId]) {
      const view = await ok(call(t.app, admin, 'GET', `/v1/rollouts/${id}`));
      expect(view).toMatchObject({ state: 'completed', totals: { devices: DEVICE_COUNT, done: DEVICE_COUNT, failed: 0, skipped: 0, pending: 0 } });
    }
    expect(cronLog.every((c) => c.started === 0)).toBe(true);
    // device DEKs: 25 % a wave at ticks 0-3; patient_id: 50 % at ticks 1-2 (each tick's devices counted once per rollout)
    expect(cronLog.slice(0, 4).reduce((n, c) => n + c.rolloutDevices, 0)).toBe(DEVICE_COUNT * 2);
    expect(cronLog.slice(4).every((c) => c.rolloutDevices === 0)).toBe(true);

    const rows = [...(await storedVersions()).values()];
    const pid = rows.filter((r) => r.field === 'patient_id');
    const med = rows.filter((r) => r.field === 'medical_record');
    expect(pid.filter((r) => r.version === 2 && r.state === 'primary')).toHaveLength(DEVICE_COUNT);
    expect(med.filter((r) => r.version === 2 && r.state === 'primary')).toHaveLength(medicalRotated.size);
    expect(med.filter((r) => r.version === 1 && r.state === 'primary')).toHaveLength(DEVICE_COUNT - medicalRotated.size);
    const retired = rows.filter((r) => r.version === 1 && r.state !== 'primary');
    expect(retired).toHaveLength(DEVICE_COUNT + medicalRotated.size);
    for (const r of retired) {
      expect(r.state, `${r.device_id}/${r.field}`).toBe('decrypt_only');
      expect(r.state_until).toBeNull();
    }
    // the state change dates from the end of grace (rotation + 2 days), not from the cron run that saw it
    const rotatedAt = await patientRotationTick();
    for (const r of retired) {
      const rotationTick = r.field === 'patient_id' ? (rotatedAt.get(r.device_id) as number) : MEDICAL_ROTATION_AT;
      expect(r.state_changed_at.getTime(), `${r.device_id}/${r.field}`).toBe(tickTime(rotationTick + FIELD_GRACE_TICKS));
    }
    // and each cron run found those whose grace had ended since the previous run (tick 5's run was missed)
    expect(cronLog.map((c) => c.tick)).toEqual([0, 1, 2, 3, 4, 6, 7]);
    expect(cronLog.map((c) => c.graceExpiredFields)).toEqual(
      cronLog.map((c, i) => retired.filter((r) => r.state_changed_at.getTime() <= tickTime(c.tick) && (i === 0 || r.state_changed_at.getTime() > tickTime((cronLog[i - 1] as { tick: number }).tick))).length),
    );
    expect(cronLog.find((c) => c.tick === 6)?.graceExpiredFields).toBe(retired.length);
    expect(cronLog.reduce((n, c) => n + c.graceExpiredDevices, 0)).toBe(0); // device DEK grace is 7 days
  });

  it('when devices take key updates from their outbox, then every one opens, and each device ends on the new primaries of its DEK and fields', async () => {
    const dekPrimary = new Map(
      (await t.database.db.selectFrom('device_versions').select(['device_id', 'version']).where('state', '=', 'primary').execute()).map((r) => [r.device_id, r.version]),
    );
    for (const d of devices) {
      expect(d.updateErrors, d.id).toEqual([]);
      expect(dekPrimary.get(d.id), d.id).toBe(2);
      expect([...d.dek.keys()].sort(), d.id).toEqual([1, 2]);
      expect(d.encryptor.versions(), d.id).toEqual({ patient_id: 2, medical_record: medicalRotated.has(d.id) ? 2 : 1 });
    }
    // the last tick's messages are all under the new primaries
    for (const m of sent.filter((s) => s.tick === LAST_TICK)) {
      expect(m.versions).toEqual({ patient_id: 2, medical_record: medicalRotated.has(m.deviceId) ? 2 : 1 });
    }
    // while away, the others kept the version they held (the very messages the refusals are about)
    for (const m of sent.filter((s) => s.tick >= 3 && s.tick < BACK_AT)) {
      const d = devices[Number(m.deviceId.slice(4))] as SimDevice;
      const expected = {
        online: { patient_id: 2, medical_record: medicalRotated.has(d.id) ? 2 : 1 },
        stuck: { patient_id: 1, medical_record: 1 },
        offline: { patient_id: 1, medical_record: 1 },
        stuckLater: { patient_id: 2, medical_record: 1 },
      }[d.kind];
      expect(m.versions, m.deviceId).toEqual(expected);
    }
  });

  it('when every message is ingested, then each one is either decrypted to its plaintext or refused with key_decrypt_only, exactly as the version states say', async () => {
    const rows = await storedVersions();
    const total = DEVICE_COUNT * (LAST_TICK + 1) * 2;
    expect(sent).toHaveLength(total);
    expect(sent.every((m) => m.outcome !== undefined)).toBe(true);

    // when each version stopped being primary: its successor's creation
    const successorAt = (deviceId: string, field: string, version: number) => rows.get(`${deviceId}/${field}:v${version + 1}`)?.created_at.getTime() ?? Infinity;
    const counts = { decrypted: 0, refused: 0, refusedWhileGrace: 0, refusedOnMedicalRecord: 0, decryptedUnderGrace: 0, decryptedAfterStateChange: 0 };
    for (const m of sent) {
      const expectedField = expectedRefusal(m, rows);
      const outcome = m.outcome as NonNullable<Sent['outcome']>;
      if (expectedField === undefined) {
        expect(outcome.ok, `${m.deviceId} tick ${m.tick}: ${outcome.ok ? '' : (outcome.error as Error).message}`).toBe(true);
        counts.decrypted++;
        // encrypted with a version that had already been replaced when the message was stamped
        if (FIELDS.some((f) => successorAt(m.deviceId, f, m.versions[f] as number) <= m.stamp)) counts.decryptedUnderGrace++;
        // ingested after its version had gone decrypt_only (stamped before that)
        const used = FIELDS.map((f) => rows.get(`${m.deviceId}/${f}:v${m.versions[f]}`) as VersionRow);
        if (used.some((r) => r.state === 'decrypt_only' && (m.ingestedAt as number) > r.state_changed_at.getTime())) counts.decryptedAfterStateChange++;
      } else {
        expect(outcome.ok, `${m.deviceId} tick ${m.tick} should be refused (${expectedField})`).toBe(false);
        const error = (outcome as { error: unknown }).error;
        // the documented error: FieldDecryptionError naming the field and kid, code key_decrypt_only, cause KeyStateError
        expect(error).toBeInstanceOf(FieldDecryptionError);
        expect(error).toMatchObject({ code: 'key_decrypt_only', field: expectedField, kid: `${m.deviceId}/${expectedField}:v1` });
        expect((error as Error).message).toMatch(/^Field "(patient_id|medical_record)" \(icu-\d{3}\/\w+:v1\): Key icu-\d{3}\/\w+:v1( is decrypt_only since|: its grace period ended at) .*; the message is stamped /);
        const cause = (error as FieldDecryptionError).cause;
        expect(cause).toBeInstanceOf(KeyStateError);
        // cron moves it to decrypt_only at its first run after the grace end; until then (the missed
        // run) the client refuses it while still `grace`, on the grace end it was delivered with
        const graceEnd = (rows.get(`${m.deviceId}/${expectedField}:v1`) as VersionRow).state_changed_at.getTime();
        const sweep = cronLog.find((c) => tickTime(c.tick) >= graceEnd) as { tick: number };
        const state = tickTime(sweep.tick) <= (m.ingestedAt as number) ? 'decrypt_only' : 'grace';
        expect(cause).toMatchObject({ code: 'key_decrypt_only', state, kid: `${m.deviceId}/${expectedField}:v1` });
        counts.refused++;
        if (state === 'grace') counts.refusedWhileGrace++;
        if (expectedField === 'medical_record') counts.refusedOnMedicalRecord++;
      }
    }
    expect(counts.decrypted + counts.refused).toBe(total);

    // The same counts by hand. Only the 25 away devices ever use a replaced version. Per device:
    // R, the tick the version it kept was replaced, and G, the tick its grace ends (R + 4):
    //   stuck, offline: patient_id v1, replaced at its wave's tick W (1 or 2), G = W + 4 (5 or 6);
    //     medical_record's grace (if rotated) ends at tick 6, never before G;
    //   stuckLater: medical_record v1, replaced at tick 2, G = 6.
    // Two messages a tick, stamped tick + index seconds and 30 minutes later: device 000's first
    // message of tick G is stamped exactly at the grace end.
    const rotatedAt = await patientRotationTick();
    const away = devices.filter((d) => d.kind !== 'online');
    const R = (d: SimDevice) => (d.kind === 'stuckLater' ? MEDICAL_ROTATION_AT : (rotatedAt.get(d.id) as number));
    const G = (d: SimDevice) => R(d) + FIELD_GRACE_TICKS;
    const boundary = (d: SimDevice) => (d.index === 0 ? 1 : 0);
    const sum = (list: SimDevice[], f: (d: SimDevice) => number) => list.reduce((n, d) => n + f(d), 0);
    // refused: ticks G .. 6, but for the boundary message
    const refused = sum(away, (d) => (BACK_AT - G(d)) * 2 - boundary(d));
    const byHand = {
      decrypted: total - refused,
      refused,
      // refused while still `grace`: tick 5 (cron missed), ingested then (not the offline backlog)
      refusedWhileGrace: sum(away, (d) => (d.kind !== 'offline' && G(d) === MISSED_CRON_AT ? 2 - boundary(d) : 0)),
      // the stuckLater devices' tick-6 messages, refused on medical_record
      refusedOnMedicalRecord: sum(away, (d) => (d.kind === 'stuckLater' ? (BACK_AT - G(d)) * 2 : 0)),
      // decrypted under a replaced version: ticks R .. G - 1, and the boundary message
      decryptedUnderGrace: sum(away, (d) => (G(d) - R(d)) * 2 + boundary(d)),
      // the offline backlog stamped before the change (ticks 1 .. G - 1), ingested at tick 7, after it
      decryptedAfterStateChange: sum(away, (d) => (d.kind === 'offline' ? (G(d) - 1) * 2 : 0)),
    };
    expect(counts).toEqual(byHand);
    // with 5 devices of each kind in each wave, each case happened
    for (const [name, n] of Object.entries(counts)) expect(n, name).toBeGreaterThan(0);
    console.log(`ingest e2e outcomes: ${JSON.stringify({ total, ...counts })}`);
  });

  it('when a message is stamped exactly at the grace end, then it still decrypts, and one stamped 30 minutes later is refused', async () => {
    const graceEnd = ((await patientRotationTick()).get('icu-000') as number) + FIELD_GRACE_TICKS;
    const of = (stamp: number) => sent.find((m) => m.deviceId === 'icu-000' && m.stamp === stamp) as Sent;
    expect(of(tickTime(graceEnd))).toMatchObject({ versions: { patient_id: 1 }, outcome: { ok: true } });
    expect(of(tickTime(graceEnd) + 30 * 60_000)).toMatchObject({ versions: { patient_id: 1 }, outcome: { ok: false, error: { code: 'key_decrypt_only' } } });
  });

  it('when the backend ingests, then it fetches keys in one bulk request per batch at most, and none while its cache is fresh', () => {
    // one request per tick's first batch (the 1 h TTL has expired since the last tick), none for
    // the second batch 30 minutes later, one for the backlog of the returning devices
    expect(batches.map((b) => [b.tick, b.label, b.requests])).toEqual(
      Array.from({ length: LAST_TICK + 1 }, (_, tick) => [
        ...(tick === BACK_AT ? [[tick, 'backlog', 1]] : []),
        [tick, 'first', 1],
        [tick, 'second', 0],
      ]).flat(),
    );
    for (const call of httpCalls) expect(call).toMatchObject({ method: 'POST', url: expect.stringMatching(/\/v1\/keys\/fetch$/) });
    const stats = keystrata.stats();
    expect(stats.fetchCalls).toBe(httpCalls.length);
    // every decryptFields after its batch's prefetch was served from the cache: the only misses are the prefetches'
    expect(stats.cacheMisses).toBe(batches.reduce((n, b) => n + b.missed, 0));
    expect(stats.cacheHits).toBeGreaterThanOrEqual(sent.length * FIELDS.length);
    expect(batches.filter((b) => b.label === 'second').every((b) => b.missed === 0)).toBe(true);
    // exactly the versions not fetched within the TTL, and one whole-key read per rotation seen
    expect(batches.map((b) => b.fetchedItems)).toEqual(batches.map((b) => b.expectedItems));
    expect(batches.every((b) => b.fetchedItems <= 1000)).toBe(true);
    console.log(`ingest e2e requests: ${JSON.stringify(batches.map((b) => `${b.tick}/${b.label}: ${b.messages} msgs, ${b.requests} req, ${b.fetchedItems} items`))}`);
  });
});
