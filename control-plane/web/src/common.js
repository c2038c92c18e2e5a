// Helpers shared by the pages.

export const $ = (id) => document.getElementById(id);

const PAGES = ['login', 'fleet', 'backups', 'alerts', 'agent', 'rollouts', 'exec', 'audit', 'sessions', 'recordings', 'replay', 'users', 'tokens', 'terminal-view'];

export function show(section) {
  for (const id of PAGES) $(id).hidden = id !== section;
}

/** JSON API call with the session cookie; returns `{status, json}`. */
export async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: 'same-origin',
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  return { status: response.status, json };
}

/** A table cell (or any element) with text content. */
/** `s` as one word for a POSIX shell: single-quoted, with any `'` closed, escaped and reopened. */
export function shellQuote(s) {
  return `'${String(s).replaceAll("'", "'\\''")}'`;
}

export function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export function ago(iso) {
  if (!iso) return 'never';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

export function bytes(n) {
  if (n === undefined || n === null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i === 0 ? 0 : v < 10 ? 2 : 1)} ${units[i]}`;
}

/** Seconds as the largest whole unit that fits: `42 s`, `7 min`, `5 h`, `3 d`. */
export function span(s) {
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

/** A backup (`/api/v1/backups`) in words: its age, how long it took and its size. */
export function backupCell(backup, nowMs = Date.now()) {
  if (!backup) return 'none';
  return `${span((nowMs - backup.stop_ms) / 1000)} ago, took ${span(backup.duration_s)}, ${bytes(backup.size)}`;
}

/** A stanza's last restore drill in words: its recovery time, or how it failed. */
export function drillCell(drill, nowMs = Date.now()) {
  if (!drill) return 'never';
  const when = `${span((nowMs - drill.at_ms) / 1000)} ago`;
  if (drill.status === 'done' && drill.rto_s != null) return `restored in ${span(drill.rto_s)} (${drill.set}), ${when}`;
  return `${drill.status} ${when}`;
}

/** WAL archiving (`/api/v1/backups` `archiver`) in words. */
export function archiverCell(archiver, nowMs = Date.now()) {
  if (!archiver) return 'not reported';
  if (archiver.archive_mode === 'off') return 'off';
  const last = archiver.last_archived_ms ? `last ${span((nowMs - archiver.last_archived_ms) / 1000)} ago` : 'nothing archived yet';
  const failing = archiver.last_failed_ms && (!archiver.last_archived_ms || archiver.last_failed_ms > archiver.last_archived_ms);
  const waiting = archiver.ready_count > 0 ? `, ${archiver.ready_count} waiting` : '';
  return `${failing ? `failing (${archiver.last_failed_wal}); ` : ''}${last}${waiting}`;
}

/** Delivery lag that earns a warning on the fleet page. */
export const LAG_WARN_S = 120;

/** Buffer health in words, and whether it deserves a warning. */
export function bufferHealth(buffer) {
  if (!buffer) return { text: 'not reported yet', warn: false, lag: '' };
  const dropped = Object.values(buffer.dropped_total ?? {}).reduce((a, b) => a + b, 0);
  // Every reason that applies, most urgent first; the first one is shown.
  const reasons = [
    buffer.delivery_failures > 0 && `${buffer.delivery_failures} failed deliveries`,
    buffer.oldest_record_age_s > LAG_WARN_S && 'delivery lags',
    buffer.utilization > 0.8 && 'buffer nearly full',
  ].filter(Boolean);
  return {
    text: `${buffer.rows} rows, ${bytes(buffer.size_bytes)} (${(buffer.utilization * 100).toFixed(1)}%)`,
    lag: buffer.rows > 0 ? `${buffer.oldest_record_age_s} s` : 'none',
    dropped,
    warn: reasons.length > 0,
    why: reasons[0] ?? '',
  };
}

/** Transaction-ID age that earns attention, and the age past which it is urgent (Postgres
 * refuses writes near 2^31; autovacuum should keep ages far below either). */
export const XID_WARN = 1_000_000_000;
export const XID_URGENT = 1_500_000_000;
/** Replication lag that earns attention, and the lag past which it is urgent. */
export const REPLICATION_WARN_S = 60;
export const REPLICATION_URGENT_S = 600;
/** A server summary older than this is not trusted (the agent stopped sending metrics). */
export const HEALTH_STALE_MS = 15 * 60 * 1000;

/** How much each backup risk weighs in the fleet ranking (healthy and unknown: nothing). */
export const BACKUP_SCORES = { no_backup: 450, rpo_breached: 350, archive_failing: 250, last_failed: 120 };

/**
 * What about an agent needs attention, most urgent first, and a score to rank the fleet by
 * (0: nothing). Offline beats everything; then undelivered metrics, wraparound age and
 * replication lag, each urgent past its second threshold.
 */
export function attention(agent, nowMs = Date.now()) {
  const found = [];
  if (agent.status !== 'online') found.push({ score: 1000, why: 'offline' });
  const buffer = agent.buffer;
  if (buffer) {
    if (buffer.delivery_failures > 0) found.push({ score: 300, why: `${buffer.delivery_failures} failed metric deliveries` });
    if (buffer.oldest_record_age_s > LAG_WARN_S) {
      found.push({ score: 200 + Math.min(99, Math.floor(buffer.oldest_record_age_s / 60)), why: `metrics ${Math.round(buffer.oldest_record_age_s / 60)} min behind` });
    }
    if (buffer.utilization > 0.8) found.push({ score: 150, why: 'metrics buffer nearly full' });
  }
  const fresh = (part) => part && nowMs - part.ts_ms < HEALTH_STALE_MS;
  const xid = agent.health?.xid_age;
  if (fresh(xid) && xid.age >= XID_WARN) {
    const pct = ((xid.age / 2 ** 31) * 100).toFixed(0);
    found.push({ score: (xid.age >= XID_URGENT ? 500 : 100) + Number(pct), why: `${xid.database}: transaction ID age ${xid.age.toLocaleString('en')} (${pct}% of the wraparound limit)` });
  }
  const rep = agent.health?.replication;
  if (fresh(rep) && rep.max_lag_s >= REPLICATION_WARN_S) {
    found.push({ score: (rep.max_lag_s >= REPLICATION_URGENT_S ? 400 : 100) + Math.min(99, Math.floor(rep.max_lag_s / 60)), why: `replication ${Math.round(rep.max_lag_s)} s behind` });
  }
  // Backups, as the control plane judged them (GET /api/v1/backups, default objectives).
  const backup = agent.backup;
  if (backup && BACKUP_SCORES[backup.risk]) {
    found.push({ score: BACKUP_SCORES[backup.risk], why: `backups: ${backup.reasons[0]}` });
  }
  found.sort((a, b) => b.score - a.score);
  return { score: found.reduce((sum, f) => sum + f.score, 0), reasons: found.map((f) => f.why) };
}

/** The fleet in the order it needs attention: highest score first, then by name. */
export function rankFleet(agents, nowMs = Date.now()) {
  return agents
    .map((agent) => ({ agent, ...attention(agent, nowMs) }))
    .sort((a, b) => b.score - a.score || a.agent.name.localeCompare(b.agent.name));
}
