/**
 * Maintenance windows of a group: cron starts that group's rotations (and, later, its rollout
 * waves) only inside one of them. A window opens on the given ISO weekdays at `start` local time
 * in `tz` and closes at `end`; an `end` earlier than `start` runs past midnight into the next
 * day. No windows at all means "any time".
 */
import { BadRequestError } from '../http/errors.js';
import type { MaintenanceWindow } from './policy.schemas.js';

const WEEKDAYS: Record<string, number> = { Mon: 1, Tue: 2, Wed: 3, Thu: 4, Fri: 5, Sat: 6, Sun: 7 };
const formatters = new Map<string, Intl.DateTimeFormat>();

function formatter(tz: string): Intl.DateTimeFormat {
  let format = formatters.get(tz);
  if (!format) {
    // throws RangeError for an unknown zone
    format = new Intl.DateTimeFormat('en-US', { timeZone: tz, weekday: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' });
    formatters.set(tz, format);
  }
  return format;
}

/** Weekday (1 = Monday … 7 = Sunday) and minute of the day of `at` in `tz`. */
export function localTime(at: Date, tz: string): { weekday: number; minute: number } {
  const parts = formatter(tz).formatToParts(at);
  const part = (type: string) => parts.find((p) => p.type === type)?.value ?? '';
  const weekday = WEEKDAYS[part('weekday')];
  if (weekday === undefined) throw new Error(`Unexpected weekday from Intl for ${tz}`);
  return { weekday, minute: Number(part('hour')) * 60 + Number(part('minute')) };
}

const minutes = (hhmm: string): number => Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3, 5));

export function isInWindow(window: MaintenanceWindow, at: Date): boolean {
  const { weekday, minute } = localTime(at, window.tz);
  const start = minutes(window.start);
  const end = minutes(window.end);
  if (start < end) return window.days.includes(weekday) && minute >= start && minute < end;
  // past midnight: the evening part belongs to today's window, the morning part to yesterday's
  const yesterday = weekday === 1 ? 7 : weekday - 1;
  return (window.days.includes(weekday) && minute >= start) || (window.days.includes(yesterday) && minute < end);
}

/** True when there are no windows, or `at` falls inside one of them. */
export function inMaintenanceWindow(windows: readonly MaintenanceWindow[], at: Date): boolean {
  return windows.length === 0 || windows.some((w) => isInWindow(w, at));
}

/** Rules the schema cannot state: a known time zone, start ≠ end. */
export function validateWindows(windows: readonly MaintenanceWindow[], field: string): void {
  windows.forEach((w, i) => {
    try {
      formatter(w.tz);
    } catch {
      throw new BadRequestError(`${field}.${i}.tz: unknown time zone "${w.tz}"`, { field: `${field}.${i}.tz` });
    }
    if (w.start === w.end) throw new BadRequestError(`${field}.${i}: start and end must differ`, { field: `${field}.${i}.end` });
  });
}
