// Asciicast v2 for the replay page, pure (the unit tests import it): parsing, playing times
// with idle gaps cut short, and finding what is due at a time.

export const IDLE_MAX_S = 2;

/** Parse an asciicast v2 file: its header and its events `[t, code, data]`. */
export function parseCast(text) {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  if (lines.length === 0) throw new Error('empty recording');
  const header = JSON.parse(lines[0]);
  if (header.version !== 2) throw new Error(`asciicast version ${header.version}, expected 2`);
  const events = lines.slice(1).map((l) => JSON.parse(l));
  return { header, events };
}

/** Playing times: the recording's times with idle gaps cut to `idleMax`. */
export function playTimes(events, idleMax = IDLE_MAX_S) {
  const out = [];
  let last = 0;
  let play = 0;
  for (const [t] of events) {
    play += Math.min(Math.max(0, t - last), idleMax);
    last = t;
    out.push(play);
  }
  return out;
}

/** How many events are due at playing time `p` (times sorted). */
export function dueAt(times, p) {
  let lo = 0;
  let hi = times.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] <= p) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/** The playing time of the recording's own time `t` (a search's moment). */
export function playTimeOf(events, times, t) {
  const i = events.findIndex(([et]) => et >= t);
  if (i < 0) return times.length ? times[times.length - 1] : 0;
  return times[i];
}

export function clock(s) {
  const total = Math.max(0, Math.floor(s));
  const m = Math.floor(total / 60);
  return `${m}:${String(total % 60).padStart(2, '0')}`;
}
