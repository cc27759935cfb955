/**
 * Which wave a device is in, and when a wave is due (DESIGN §3). Pure functions: the same
 * answer on every run and every replica.
 *
 *   bucket(device)   = first 4 bytes of SHA-256(UTF-8 device id), unsigned big-endian, mod 10000
 *                      (the SQL function keystrata_rollout_bucket computes the same, so waves
 *                      can be listed by an index range; a test checks they agree)
 *   offset(rollout)  = the same over "keystrata:rollout:<rollout id>"
 *   turned(device)   = (bucket + offset) mod 10000
 *
 * The turn by the rollout's offset makes successive rollouts begin with different devices
 * (a canary is not always the same 1 %), while a device's place within one rollout never
 * changes. Waves cut the turned range [0, 10000) by cumulative percentages, in basis points:
 * the canary first (when there is one), then `percentPerDay` per wave, the last wave taking
 * the remainder; a final sweep (all buckets) follows the last wave and picks up the devices
 * enrolled after their own wave had been listed.
 *
 * Wave k is due at `startedAt + pausedMs + k × interval`; the sweep with the last wave.
 */
import crypto from 'node:crypto';
import type { WaveKind } from './rollout.tables.js';

export const BUCKETS = 10_000;

function hashBucket(text: string): number {
  return crypto.createHash('sha256').update(text, 'utf8').digest().readUInt32BE(0) % BUCKETS;
}

/** The device's bucket, 0..9999 (SQL: keystrata_rollout_bucket(id)). */
export function deviceBucket(deviceId: string): number {
  return hashBucket(deviceId);
}

/** How far a rollout turns the buckets, 0..9999. */
export function bucketOffset(rolloutId: string): number {
  return hashBucket(`keystrata:rollout:${rolloutId}`);
}

export function turnedBucket(bucket: number, offset: number): number {
  return (bucket + offset) % BUCKETS;
}

export interface WavePlan {
  wave: number;
  kind: WaveKind;
  /** [from, to) of the turned buckets */
  from: number;
  to: number;
}

/** Basis points of a percentage, at least 1 so a wave is never empty by rounding. */
const basisPoints = (percent: number) => Math.min(BUCKETS, Math.max(1, Math.round(percent * 100)));

/** The waves of a rollout, canary first, then the regular waves, then the final sweep. */
export function planWaves(options: { percentPerDay: number; canaryPercent?: number | null | undefined }): WavePlan[] {
  const step = basisPoints(options.percentPerDay);
  const waves: WavePlan[] = [];
  let from = 0;
  if (options.canaryPercent !== undefined && options.canaryPercent !== null) {
    const to = Math.min(BUCKETS - 1, basisPoints(options.canaryPercent));
    waves.push({ wave: 0, kind: 'canary', from: 0, to });
    from = to;
  }
  while (from < BUCKETS) {
    const to = Math.min(BUCKETS, from + step);
    waves.push({ wave: waves.length, kind: 'wave', from, to });
    from = to;
  }
  waves.push({ wave: waves.length, kind: 'sweep', from: 0, to: BUCKETS });
  return waves;
}

/** The wave (not the sweep) a turned bucket falls in. */
export function waveOfTurned(turned: number, waves: readonly WavePlan[]): number {
  const wave = waves.find((w) => w.kind !== 'sweep' && turned >= w.from && turned < w.to);
  if (!wave) throw new Error(`bucket ${turned} is in no wave`);
  return wave.wave;
}

/** The wave of a device in a rollout. */
export function waveOfDevice(deviceId: string, offset: number, waves: readonly WavePlan[]): number {
  return waveOfTurned(turnedBucket(deviceBucket(deviceId), offset), waves);
}

/**
 * The ranges of raw buckets (what the SQL index holds) a range of turned buckets covers:
 * one range, or two when it wraps past 9999.
 */
export function rawRanges(from: number, to: number, offset: number): Array<[number, number]> {
  if (from >= to) return [];
  if (to - from >= BUCKETS) return [[0, BUCKETS]];
  const a = (from - offset + BUCKETS) % BUCKETS;
  const b = a + (to - from);
  return b <= BUCKETS ? [[a, b]] : [[a, BUCKETS], [0, b - BUCKETS]];
}

/** When wave `index` (of `waveCount` regular waves; the sweep is index waveCount) is due. */
export function waveDueAt(r: { startedAt: Date; pausedMs: number; intervalSeconds: number; waveCount: number }, index: number): Date {
  const k = Math.min(index, r.waveCount - 1);
  return new Date(r.startedAt.getTime() + r.pausedMs + k * r.intervalSeconds * 1000);
}
