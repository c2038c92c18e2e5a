// Time-series charts of an agent's collected statistics (uPlot). A missing collection
// (agent offline, network outage, Postgres down) is drawn as a gap: a point is inserted with
// no value wherever two samples are further apart than three collection intervals.

import { bytes, el } from './common.js';

/** The charts: title, which metric type, and how to turn one sample into named values. */
export const CHARTS = [
  {
    title: 'Connections by state',
    type: 'activity',
    values: (data) => data,
  },
  {
    title: 'Transactions per second',
    type: 'pg_stat_database',
    rate: true,
    values: (data) => {
      let commit = 0;
      let rollback = 0;
      for (const db of data) { commit += db.xact_commit ?? 0; rollback += db.xact_rollback ?? 0; }
      return { commit, rollback };
    },
  },
  {
    title: 'Database size',
    type: 'database_size',
    unit: bytes,
    values: (data) => data,
  },
  {
    title: 'Locks by mode',
    type: 'locks',
    values: (data) => data,
  },
  {
    title: 'Replication lag (s, replay)',
    type: 'replication',
    empty: 'No standby streams from this server.',
    values: (data) => Object.fromEntries(data.map((r) => [r.application_name || r.client_addr || 'standby', r.replay_lag_s ?? 0])),
  },
  {
    title: 'Transaction ID age',
    type: 'xid_age',
    values: (data) => data,
    // Postgres stops accepting writes before an age of 2^31 (wraparound protection).
    note: (latest) => {
      const [db, age] = Object.entries(latest).sort((a, b) => b[1] - a[1])[0] ?? [];
      if (db === undefined) return '';
      const left = XID_LIMIT - age;
      return `oldest: ${db} at ${age.toLocaleString('en')}, ${left.toLocaleString('en')} (${((left / XID_LIMIT) * 100).toFixed(1)}%) from the wraparound limit`;
    },
  },
  {
    title: 'Dead tuples (most in the latest sample)',
    type: 'dead_tuples',
    empty: 'No user tables with dead tuples yet.',
    values: (data) => Object.fromEntries(data.map((t) => [`${t.schemaname}.${t.relname}`, t.n_dead_tup ?? 0])),
  },
  {
    title: 'Checkpoints per minute',
    // pg_stat_checkpointer from PostgreSQL 17, pg_stat_bgwriter before.
    types: ['checkpointer', 'bgwriter'],
    rate: true,
    scale: 60,
    values: (data) => ('num_timed' in data
      ? { timed: data.num_timed, requested: data.num_requested }
      : { timed: data.checkpoints_timed, requested: data.checkpoints_req }),
  },
  {
    title: 'Buffers written per second',
    type: 'bgwriter',
    rate: true,
    values: (data) => {
      const out = { 'by bgwriter': data.buffers_clean, allocated: data.buffers_alloc };
      if ('buffers_backend' in data) out['by backends'] = data.buffers_backend;
      if ('buffers_checkpoint' in data) out['by checkpoints'] = data.buffers_checkpoint;
      return out;
    },
  },
];

/** The transaction ID age at which wraparound protection stops writes. */
export const XID_LIMIT = 2 ** 31;

const COLORS = ['#6cf', '#fb4', '#6d6', '#f77', '#c8f', '#4dd', '#ddd', '#f9c'];

/** Median spacing of the timestamps (seconds), a robust guess at the collection interval. */
function interval(ts) {
  const gaps = [];
  for (let i = 1; i < ts.length; i += 1) gaps.push(ts[i] - ts[i - 1]);
  gaps.sort((a, b) => a - b);
  return gaps.length ? gaps[Math.floor(gaps.length / 2)] : 15;
}

/** uPlot data: [[ts...], [series...]...] with `null` rows marking gaps. */
export function series(samples, chart) {
  const points = samples
    .map((s) => ({ t: Date.parse(s.ts) / 1000, v: chart.values(s.data) ?? {} }))
    .sort((a, b) => a.t - b.t);
  const names = [...new Set(points.flatMap((p) => Object.keys(p.v)))].sort();
  let rows = points.map((p) => ({ t: p.t, v: names.map((n) => (typeof p.v[n] === 'number' ? p.v[n] : null)) }));
  if (chart.rate) {
    const out = [];
    for (let i = 1; i < rows.length; i += 1) {
      const dt = rows[i].t - rows[i - 1].t;
      out.push({
        t: rows[i].t,
        v: rows[i].v.map((x, j) => {
          const prev = rows[i - 1].v[j];
          // A counter that went down was reset (server restart): no rate for that step.
          return x === null || prev === null || dt <= 0 || x < prev ? null : ((x - prev) / dt) * (chart.scale ?? 1);
        }),
      });
    }
    rows = out;
  }
  const step = interval(rows.map((r) => r.t));
  const withGaps = [];
  rows.forEach((r, i) => {
    if (i > 0 && r.t - rows[i - 1].t > 3 * step) {
      withGaps.push({ t: rows[i - 1].t + step, v: names.map(() => null) });
    }
    withGaps.push(r);
  });
  return { names, data: [withGaps.map((r) => r.t), ...names.map((_, j) => withGaps.map((r) => r.v[j]))], gaps: withGaps.length - rows.length };
}

let plots = [];

/** Fetch and draw every chart of `agentId` over the last `rangeMs`. */
export async function drawCharts(container, agentId, rangeMs, api) {
  for (const p of plots) p.destroy();
  plots = [];
  container.replaceChildren();
  const from = Date.now() - rangeMs;
  let drawn = 0;
  for (const chart of CHARTS) {
    // The first of the chart's types that has samples (a statistic moved between versions).
    let samples = [];
    let type = chart.type;
    for (const candidate of chart.types ?? [chart.type]) {
      const r = await api('GET', `/api/v1/agents/${encodeURIComponent(agentId)}/metrics?type=${candidate}&from=${from}`);
      if (r.status !== 200) throw new Error(r.json?.error ?? `metrics: ${r.status}`);
      type = candidate;
      samples = r.json;
      if (samples.length > 0) break;
    }
    const box = el('figure', null, { class: 'chart', 'data-type': chart.types ? chart.types.join(' ') : type, 'data-title': chart.title });
    const caption = el('h3', chart.title);
    box.append(caption);
    container.append(box);
    const { names, data, gaps } = series(samples, chart);
    if (data[0].length === 0 || names.length === 0) {
      box.append(el('p', samples.length > 0 && chart.empty ? chart.empty : 'No samples in this range yet.'));
      continue;
    }
    if (chart.note) box.append(el('p', chart.note(samples[samples.length - 1].data), { class: 'note' }));
    if (gaps > 0) box.dataset.gaps = String(gaps);
    const width = Math.max(300, box.clientWidth - 10);
    const plot = new window.uPlot({
      width,
      height: 220,
      series: [{}, ...names.map((name, i) => ({ label: name, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
      axes: [
        { stroke: '#aaa', grid: { stroke: '#2a2a2a' } },
        { stroke: '#aaa', grid: { stroke: '#2a2a2a' }, size: 80, values: chart.unit ? (_, ticks) => ticks.map(chart.unit) : undefined },
      ],
      // The whole chosen window, so missing time at either end shows as empty space too.
      scales: { x: { time: true, range: () => [from / 1000, Date.now() / 1000] } },
    }, data, box);
    plots.push(plot);
    drawn += 1;
  }
  return drawn;
}
