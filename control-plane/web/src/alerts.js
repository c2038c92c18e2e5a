// The Alerts page: alerts (firing, pending, recently resolved), silences, channels, the rules
// with their thresholds and overrides, and the history of transitions.

import { $, ago, api, el, show } from './common.js';

const PHASE_ORDER = { firing: 0, pending: 1, resolved: 2 };

function fmt(v) {
  if (v === null || v === undefined) return '—';
  return Math.abs(v) >= 1e6 ? `${(v / 1e9).toFixed(2)} billion` : String(v);
}

function until(ms) {
  return new Date(ms).toISOString().replace('.000Z', 'Z');
}

function alertRow(a, at) {
  const tr = el('tr', null, { 'data-alert': a.key, 'data-phase': a.phase });
  const agent = el('td');
  agent.append(el('a', a.agent, { href: `#/agent/${a.agent_id}` }));
  const phase = a.muted_by ? `${a.phase} (muted: ${a.muted_by})` : a.phase;
  const first = at ? el('td', at) : el('td', phase, a.phase === 'firing' && !a.muted_by ? { class: 'warn' } : {});
  const cells = at
    ? [first, el('td', a.phase), el('td', a.severity), el('td', a.rule), agent, el('td', a.summary)]
    : [first, el('td', a.severity), el('td', a.rule), agent, el('td', a.summary), el('td', ago(a.fired ?? a.since))];
  tr.append(...cells);
  return tr;
}

/** The page; `ctx` brings what the app owns: roles, the confirm button, the refresh timer. */
export async function alertsPage(ctx) {
  show('alerts');
  $('where').textContent = '';
  const r = await api('GET', '/api/v1/alerts?history=50');
  if (r.status === 401) { ctx.route(); return; }
  if (r.status !== 200) { $('alerts-error').textContent = r.json?.error ?? `alerts: ${r.status}`; return; }
  $('alerts-error').textContent = '';
  const { alerts, history, evaluator } = r.json;
  alerts.sort((a, b) => PHASE_ORDER[a.phase] - PHASE_ORDER[b.phase]);
  const firing = alerts.filter((a) => a.phase === 'firing').length;
  const pending = alerts.filter((a) => a.phase === 'pending').length;
  const who = evaluator
    ? (evaluator.live ? `evaluated by ${evaluator.replica}` : `no replica evaluates now (the last was ${evaluator.replica})`)
    : 'not evaluated yet';
  $('alerts-summary').textContent = `${firing} firing, ${pending} pending; ${who}.`;
  $('alert-rows').replaceChildren(...alerts.map((a) => alertRow(a)));
  $('history-rows').replaceChildren(...history.map((h) => alertRow(h, h.at)));
  await Promise.all([silences(ctx), windows(ctx), channels(ctx), rules()]);
  ctx.every(() => { if (location.hash.startsWith('#/alerts')) alertsPage(ctx); });
}

async function silences(ctx) {
  const r = await api('GET', '/api/v1/silences');
  if (r.status !== 200) { $('silence-error').textContent = r.json?.error ?? `silences: ${r.status}`; return; }
  const now = Date.now();
  const rows = r.json.map((s) => {
    const tr = el('tr', null, { 'data-silence': s.id });
    const agents = s.agent_id ? `${s.created_by.replace(/^agent:/, '')} (itself)` : s.agents.join(', ');
    const ended = s.ends_ms <= now;
    tr.append(el('td', s.rule ?? 'every rule'), el('td', agents),
      el('td', ended ? `ended ${until(s.ends_ms)}` : until(s.ends_ms)), el('td', s.comment), el('td', s.created_by));
    const td = el('td');
    if (!ended && ctx.allows('operator')) {
      td.append(ctx.confirmButton('End', `End silence ${s.id}`, 'End this silence now?', 'silence-error', async () => {
        const d = await api('DELETE', `/api/v1/silences/${encodeURIComponent(s.id)}`);
        if (d.status === 204) await silences(ctx);
        return d;
      }));
    }
    tr.append(td);
    return tr;
  });
  $('silence-rows').replaceChildren(...rows);
}

async function windows(ctx) {
  const r = await api('GET', '/api/v1/windows');
  if (r.status !== 200) { $('window-error').textContent = r.json?.error ?? `windows: ${r.status}`; return; }
  const rows = r.json.map((w) => {
    const tr = el('tr', null, { 'data-window': w.name, 'data-open': String(w.open) });
    const next = w.next.map(([a, b]) => `${a.replace('.000Z', 'Z')} to ${b.slice(11).replace('.000Z', 'Z')}`).join('; ');
    const gates = [w.cutoff && `cutoff ${w.cutoff}`, w.grace && `grace ${w.grace}`].filter(Boolean).join(', ');
    tr.append(el('td', w.open ? `${w.name} (open now)` : w.name),
      el('td', gates ? `${w.effect} (${gates})` : w.effect), el('td', w.agents.join(', ')),
      el('td', w.rules?.join(', ') ?? 'every rule'), el('td', `${w.cron} (${w.tz ?? 'UTC'}) for ${w.duration}`),
      el('td', next));
    const td = el('td');
    if (ctx.allows('operator')) {
      td.append(ctx.confirmButton('Delete', `Delete window ${w.name}`, `Delete maintenance window ${w.name}?`,
        'window-error', async () => {
          const d = await api('DELETE', `/api/v1/windows/${encodeURIComponent(w.name)}`);
          if (d.status === 204) await windows(ctx);
          return d;
        }));
    }
    tr.append(td);
    return tr;
  });
  $('window-rows').replaceChildren(...rows);
}

export async function createWindow(event, ctx) {
  event.preventDefault();
  const body = {
    name: $('window-name').value.trim(),
    cron: $('window-cron').value.trim(),
    tz: $('window-tz').value.trim() || 'UTC',
    duration: $('window-duration').value.trim(),
    agents: $('window-agents').value.split(',').map((s) => s.trim()).filter(Boolean),
    effect: $('window-effect').value,
  };
  const cutoff = $('window-cutoff').value.trim();
  const grace = $('window-grace').value.trim();
  if (cutoff) body.cutoff = cutoff;
  if (grace) body.grace = grace;
  const r = await api('POST', '/api/v1/windows', body);
  if (r.status !== 201) { $('window-error').textContent = r.json?.error ?? `window: ${r.status}`; return; }
  $('window-error').textContent = '';
  await windows(ctx);
}

async function channels(ctx) {
  const r = await api('GET', '/api/v1/alert-channels');
  if (r.status !== 200) { $('channel-error').textContent = r.json?.error ?? `channels: ${r.status}`; return; }
  const rows = r.json.map((c) => {
    const tr = el('tr', null, { 'data-channel': c.name });
    const where = c.kind === 'email' ? `${c.url} to ${c.email?.to?.join(', ') ?? ''}` : (c.url ?? '(secret)');
    tr.append(el('td', c.name), el('td', c.kind), el('td', where), el('td', c.min_severity));
    const td = el('td');
    if (ctx.allows('admin')) {
      const test = el('button', 'Test', { type: 'button', 'aria-label': `Test channel ${c.name}` });
      test.addEventListener('click', async () => {
        const t = await api('POST', `/api/v1/alert-channels/${encodeURIComponent(c.name)}/test`);
        $('channel-error').textContent = t.json?.delivered ? '' : (t.json?.error ?? `test: ${t.status}`);
        $('channel-secret').textContent = t.json?.delivered ? `A test notification reached ${c.name}.` : '';
      });
      td.append(test, ctx.confirmButton('Delete', `Delete channel ${c.name}`,
        `Delete channel ${c.name}? What it still has to send is dropped.`, 'channel-error', async () => {
          const d = await api('DELETE', `/api/v1/alert-channels/${encodeURIComponent(c.name)}`);
          if (d.status === 204) await channels(ctx);
          return d;
        }));
    }
    tr.append(td);
    return tr;
  });
  $('channel-rows').replaceChildren(...rows);
}

async function rules() {
  const r = await api('GET', '/api/v1/alert-rules');
  if (r.status !== 200) return;
  const select = $('silence-rule');
  if (select.options.length === 1) {
    for (const rule of r.json.rules) select.append(el('option', rule.name, { value: rule.name }));
  }
  const rows = r.json.rules.map((rule) => {
    const overrides = r.json.overrides.filter((o) => o.rule === rule.name)
      .map((o) => `${o.name} on ${o.agents.join(', ')}: ${[
        o.enabled === false ? 'off' : null,
        o.warning != null ? `warning ${fmt(o.warning)}` : null,
        o.critical != null ? `critical ${fmt(o.critical)}` : null,
        o.for ? `for ${o.for}` : null,
      ].filter(Boolean).join(', ')}`);
    const tr = el('tr', null, { 'data-rule': rule.name });
    tr.append(el('td', rule.name), el('td', rule.measures), el('td', fmt(rule.warning)),
      el('td', fmt(rule.critical)), el('td', rule.for_s ? `${rule.for_s} s` : 'at once'),
      el('td', overrides.join('; ') || 'none'));
    return tr;
  });
  $('rule-rows').replaceChildren(...rows);
}

export async function createSilence(event, ctx) {
  event.preventDefault();
  const body = {
    for: $('silence-for').value.trim(),
    comment: $('silence-comment').value.trim(),
    agents: $('silence-agents').value.split(',').map((s) => s.trim()).filter(Boolean),
  };
  if ($('silence-rule').value) body.rule = $('silence-rule').value;
  const r = await api('POST', '/api/v1/silences', body);
  if (r.status !== 201) { $('silence-error').textContent = r.json?.error ?? `silence: ${r.status}`; return; }
  $('silence-error').textContent = '';
  await silences(ctx);
}

export async function createChannel(event, ctx) {
  event.preventDefault();
  const body = {
    name: $('channel-name').value.trim(),
    kind: $('channel-kind').value,
    url: $('channel-url').value.trim(),
    min_severity: $('channel-severity').value,
  };
  if (body.kind === 'email') {
    body.email = {
      from: $('channel-from').value.trim(),
      to: $('channel-to').value.split(',').map((s) => s.trim()).filter(Boolean),
    };
    if ($('channel-user').value.trim()) body.email.user = $('channel-user').value.trim();
    if ($('channel-password').value) body.secret = $('channel-password').value;
  }
  const r = await api('POST', '/api/v1/alert-channels', body);
  if (r.status !== 201) { $('channel-error').textContent = r.json?.error ?? `channel: ${r.status}`; return; }
  $('channel-error').textContent = '';
  $('channel-secret').textContent = r.json.secret
    ? `Signing key of ${r.json.name} (shown once; receivers check X-Outpost-Signature with it): ${r.json.secret}`
    : '';
  await channels(ctx);
}
