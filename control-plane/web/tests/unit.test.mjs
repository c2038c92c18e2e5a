// Unit tests of the UI's pure parts (node --test): outages become gaps in the charts, and
// buffer health earns a warning exactly when delivery lags, fails or the buffer fills.
import assert from 'node:assert/strict';
import test from 'node:test';
import { bufferHealth, LAG_WARN_S, shellQuote } from '../src/common.js';
import { CHARTS, series, XID_LIMIT } from '../src/charts.js';

const at = (s) => new Date(Date.UTC(2026, 0, 1, 0, 0, s)).toISOString();
const activity = { type: 'activity', values: (d) => d };

test('an agent name is one shell word whatever it holds', () => {
  assert.equal(shellQuote('db1'), "'db1'");
  assert.equal(shellQuote("x'; rm -rf / #"), "'x'\\''; rm -rf / #'");
  assert.equal(shellQuote('$(id)`id`'), "'$(id)`id`'");
});

test('an outage longer than three collection intervals is a gap, not a line', () => {
  const samples = [0, 10, 20, 30, 300, 310, 320].map((s) => ({ ts: at(s), data: { active: s } }));
  const { names, data, gaps } = series(samples, activity);
  assert.deepEqual(names, ['active']);
  assert.equal(gaps, 1);
  const nullAt = data[1].indexOf(null);
  assert.equal(data[0][nullAt], data[0][nullAt - 1] + 10, 'the gap starts one interval after the last sample');
  assert.equal(data[0][nullAt + 1], Date.parse(at(300)) / 1000);
});

test('a steady series has no gaps and keys become series in name order', () => {
  const samples = [0, 10, 20].map((s) => ({ ts: at(s), data: { idle: 1, active: 2 } }));
  const { names, data, gaps } = series(samples, activity);
  assert.deepEqual(names, ['active', 'idle']);
  assert.equal(gaps, 0);
  assert.deepEqual(data[1], [2, 2, 2]);
});

test('counter rates skip resets', () => {
  const chart = { type: 'pg_stat_database', rate: true, values: (d) => ({ commit: d.c }) };
  const samples = [[0, 100], [10, 200], [20, 50], [30, 150]].map(([s, c]) => ({ ts: at(s), data: { c } }));
  const { data } = series(samples, chart);
  assert.deepEqual(data[1], [10, null, 10]);
});

test('buffer health warns on lag, failures and a nearly full buffer only', () => {
  const base = { rows: 5, size_bytes: 4096, utilization: 0.1, oldest_record_age_s: 5, delivery_failures: 0, dropped_total: { age: 0 } };
  assert.equal(bufferHealth(base).warn, false);
  assert.equal(bufferHealth({ ...base, oldest_record_age_s: LAG_WARN_S + 1 }).why, 'delivery lags');
  assert.equal(bufferHealth({ ...base, delivery_failures: 3 }).why, '3 failed deliveries');
  assert.equal(bufferHealth({ ...base, utilization: 0.9 }).why, 'buffer nearly full');
  assert.equal(bufferHealth(null).text, 'not reported yet');
});

const chart = (title) => CHARTS.find((c) => c.title.startsWith(title));

test('checkpoints per minute read either statistic, before and after PostgreSQL 17', () => {
  const checkpoints = chart('Checkpoints per minute');
  const old = [[0, 1], [60, 3]].map(([s, n]) => ({ ts: at(s), data: { checkpoints_timed: n, checkpoints_req: 0 } }));
  assert.deepEqual(series(old, checkpoints).data.slice(1), [[0], [2]]);
  const v17 = [[0, 5], [30, 6]].map(([s, n]) => ({ ts: at(s), data: { num_timed: n, num_requested: 1 } }));
  const { names, data } = series(v17, checkpoints);
  assert.deepEqual(names, ['requested', 'timed']);
  assert.deepEqual(data.slice(1), [[0], [2]]);
});

test('the transaction ID age chart names the database closest to wraparound', () => {
  const note = chart('Transaction ID age').note({ app: 1_000_000, postgres: 2_000 });
  assert.match(note, /^oldest: app at 1,000,000, /);
  assert.match(note, new RegExp(`${(XID_LIMIT - 1_000_000).toLocaleString('en')}`));
});

test('replication lag and dead tuples become one series per standby and per table', () => {
  const lag = series([{ ts: at(0), data: [{ application_name: 'replica1', replay_lag_s: 0.5 }] }], chart('Replication lag'));
  assert.deepEqual(lag.names, ['replica1']);
  const dead = series([{ ts: at(0), data: [{ schemaname: 'public', relname: 'orders', n_dead_tup: 42 }] }], chart('Dead tuples'));
  assert.deepEqual(dead.names, ['public.orders']);
  assert.deepEqual(dead.data[1], [42]);
});

test('a cast parses, idle gaps are cut while playing, and a seek finds what is due', async () => {
  const { parseCast, playTimes, dueAt, playTimeOf, clock } = await import('../src/cast.js');
  const text = '{"version":2,"width":80,"height":24}\n[0.5,"o","a"]\n[1.0,"r","100x30"]\n[61.0,"o","b"]\n[61.5,"o","c"]\n';
  const { header, events } = parseCast(text);
  assert.equal(header.width, 80);
  assert.equal(events.length, 4);
  const times = playTimes(events, 2);
  assert.deepEqual(times, [0.5, 1.0, 3.0, 3.5], 'a minute of idleness plays as two seconds');
  assert.equal(dueAt(times, 0), 0);
  assert.equal(dueAt(times, 1.0), 2, 'an event at the time is due');
  assert.equal(dueAt(times, 99), 4);
  assert.equal(playTimeOf(events, times, 61.2), 3.5, "a search's moment maps to the next event");
  assert.equal(clock(61.9), '1:01');
  assert.throws(() => parseCast('{"version":1}\n'), /version 1/);
});

test('the fleet is ranked by what needs attention: offline first, then lag, wraparound, replication', async () => {
  const { attention, rankFleet, XID_URGENT } = await import('../src/common.js');
  const now = Date.parse('2026-01-01T00:10:00Z');
  const ts = now - 30_000;
  const fine = { name: 'a-fine', status: 'online', buffer: { rows: 0, oldest_record_age_s: 0, utilization: 0.01, delivery_failures: 0 }, health: { xid_age: { database: 'app', age: 5_000_000, ts_ms: ts }, replication: { standbys: 1, max_lag_s: 0.2, ts_ms: ts } } };
  const offline = { ...fine, name: 'z-offline', status: 'offline' };
  const wrap = { ...fine, name: 'b-wrap', health: { ...fine.health, xid_age: { database: 'orders', age: XID_URGENT + 1, ts_ms: ts } } };
  const lagging = { ...fine, name: 'c-lag', health: { ...fine.health, replication: { standbys: 2, max_lag_s: 120, ts_ms: ts } } };
  const staleWrap = { ...fine, name: 'd-stale', health: { ...fine.health, xid_age: { database: 'old', age: XID_URGENT + 1, ts_ms: now - 3_600_000 } } };
  assert.deepEqual(attention(fine, now), { score: 0, reasons: [] });
  assert.match(attention(wrap, now).reasons[0], /^orders: transaction ID age 1,500,000,001 \(70% of the wraparound limit\)$/);
  assert.match(attention(lagging, now).reasons[0], /replication 120 s behind/);
  assert.equal(attention(staleWrap, now).score, 0, 'a summary from an hour ago is not trusted');
  const order = rankFleet([fine, lagging, staleWrap, wrap, offline], now).map((x) => x.agent.name);
  assert.deepEqual(order, ['z-offline', 'b-wrap', 'c-lag', 'a-fine', 'd-stale']);
});

test('backups and WAL archiving read as age, duration, size and what fails', async () => {
  const { archiverCell, backupCell, span } = await import('../src/common.js');
  const now = 1_000_000_000_000;
  assert.equal(span(42), '42 s');
  assert.equal(span(7 * 60), '7 min');
  assert.equal(span(5 * 3600), '5 h');
  assert.equal(span(3 * 86400), '3 d');
  assert.equal(backupCell(null, now), 'none');
  assert.equal(backupCell({ stop_ms: now - 2 * 3600_000, duration_s: 75, size: 52 * 1024 * 1024 }, now), '2 h ago, took 75 s, 52.0 MiB');
  const ok = { archive_mode: 'on', last_archived_ms: now - 60_000, last_failed_ms: null, ready_count: 0 };
  assert.equal(archiverCell(ok, now), 'last 60 s ago');
  const failing = { ...ok, last_failed_ms: now - 1000, last_failed_wal: '00000001000000000000000A', ready_count: 4 };
  assert.equal(archiverCell(failing, now), 'failing (00000001000000000000000A); last 60 s ago, 4 waiting');
  assert.equal(archiverCell({ archive_mode: 'off' }, now), 'off');
  assert.equal(archiverCell(null, now), 'not reported');
});

test('backup risks join the fleet ranking below offline, above the rest, with the reason', async () => {
  const { attention, rankFleet } = await import('../src/common.js');
  const online = { status: 'online', name: 'a' };
  const none = { ...online, name: 'b', backup: { risk: 'no_backup', reasons: ['main: no valid backup'] } };
  const healthy = { ...online, name: 'c', backup: { risk: 'healthy', reasons: [] } };
  assert.deepEqual(attention(none).reasons, ['backups: main: no valid backup']);
  assert.equal(attention(healthy).score, 0);
  assert.equal(attention({ ...online, backup: { risk: 'unknown', reasons: ['no backup status received'] } }).score, 0);
  const order = rankFleet([healthy, { ...online, name: 'd', status: 'offline' }, none]).map((x) => x.agent.name);
  assert.deepEqual(order, ['d', 'b', 'c']);
});

test('a drill reads as its recovery time, or how it ended', async () => {
  const { drillCell } = await import('../src/common.js');
  const now = 1_000_000_000_000;
  assert.equal(drillCell(null, now), 'never');
  assert.equal(drillCell({ status: 'done', at_ms: now - 3 * 3600_000, rto_s: 42, set: 'F' }, now), 'restored in 42 s (F), 3 h ago');
  assert.equal(drillCell({ status: 'failed', at_ms: now - 120_000, rto_s: null }, now), 'failed 2 min ago');
});
