// The Outpost web UI: log in, see the fleet, open an agent's charts and tasks, run psql on it,
// run a command across hosts, read the audit log. Every figure comes from the authenticated
// API; the role the API reports decides which controls are shown (the API enforces it anyway).

import { $, ago, api, archiverCell, backupCell, bufferHealth, drillCell, el, rankFleet, shellQuote, show } from './common.js';
import { drawCharts } from './charts.js';
import { attachTerminal, leaveTerminal, openTerminal } from './terminal.js';
import { leaveReplay, recordingsPage, replayPage, replayState, wireReplay } from './player.js';
import { alertsPage, createChannel, createSilence, createWindow } from './alerts.js';
import { rolloutPage, rolloutsPage } from './rollouts.js';

const ROLES = ['viewer', 'operator', 'admin'];
const FLEET_REFRESH_MS = 5000;
const AGENT_REFRESH_MS = 15000;

const app = { me: null, agents: [], timer: null, agent: null, auditBefore: null };

function allows(role) {
  return app.me && ROLES.indexOf(app.me.role) >= ROLES.indexOf(role);
}

function applyRole() {
  for (const node of document.querySelectorAll('[data-role]')) node.hidden = !allows(node.dataset.role);
  $('nav').hidden = !app.me;
  $('me').textContent = app.me ? `${app.me.name} (${app.me.role})` : '';
  $('logout').hidden = !app.me;
}

async function whoami() {
  const r = await api('GET', '/api/v1/me');
  app.me = r.status === 200 ? r.json : null;
  applyRole();
  return app.me;
}

async function login(event) {
  event.preventDefault();
  const r = await api('POST', '/api/v1/sessions', { username: $('username').value, password: $('password').value });
  if (r.status !== 200) {
    $('login-error').textContent = r.json?.error ?? `login failed (${r.status})`;
    return;
  }
  $('login-error').textContent = '';
  await whoami();
  if (!location.hash || location.hash === '#/login') location.hash = '#/fleet';
  else route();
}

// The token stops working on every replica; the page goes back to the login form.
async function logout() {
  clearInterval(app.timer);
  leaveTerminal();
  await api('DELETE', '/api/v1/sessions');
  app.me = null;
  applyRole();
  location.hash = '#/login';
  show('login');
}

function every(ms, fn) {
  clearInterval(app.timer);
  app.timer = setInterval(fn, ms);
}

async function fleet() {
  show('fleet');
  $('where').textContent = '';
  const r = await api('GET', '/api/v1/agents');
  if (r.status === 401) { route(); return; }
  if (r.status !== 200) { $('agents-error').textContent = r.json?.error ?? `error ${r.status}`; return; }
  $('agents-error').textContent = '';
  app.agents = r.json;
  $('fleet-empty').hidden = r.json.length > 0;
  const rows = $('agent-rows');
  rows.replaceChildren();
  const ranked = rankFleet(r.json);
  $('fleet-attention').textContent = ranked.some((x) => x.score > 0)
    ? `${ranked.filter((x) => x.score > 0).length} of ${ranked.length} agents need attention; they are listed first.`
    : `Nothing needs attention (${ranked.length} agent${ranked.length === 1 ? '' : 's'}).`;
  for (const { agent, reasons } of ranked) {
    const tr = el('tr', null, { 'data-agent': agent.name });
    const name = el('td');
    name.append(el('a', agent.name, { href: `#/agent/${agent.id}` }));
    tr.append(name, el('td', agent.status, { class: agent.status }), el('td', ago(agent.last_seen), { title: agent.last_seen ?? '' }));
    const health = bufferHealth(agent.buffer);
    const buffer = el('td', health.text);
    if (health.warn) {
      buffer.classList.add('warn');
      buffer.append(el('span', ` ⚠ ${health.why}`, { role: 'img', 'aria-label': `warning: ${health.why}` }));
    }
    tr.append(buffer, el('td', health.lag), el('td', health.dropped ?? ''));
    tr.append(el('td', reasons.join('; '), reasons.length ? { class: 'warn', 'data-attention': '' } : {}));
    const td = el('td');
    if (allows('operator')) {
      const button = el('button', 'Open terminal', { type: 'button', 'aria-label': `Open terminal on ${agent.name}` });
      button.disabled = agent.status !== 'online';
      button.addEventListener('click', () => openTerminal(agent, (m) => { $('agents-error').textContent = m; }));
      td.append(button);
    }
    tr.append(td);
    rows.append(tr);
  }
  every(FLEET_REFRESH_MS, () => { if (location.hash.startsWith('#/fleet')) fleet(); });
}

const RISK_WORDS = {
  no_backup: 'no valid backup', rpo_breached: 'objective breached', archive_failing: 'archiving failing',
  last_failed: 'a backup, check, verify or drill failed', unknown: 'unknown', healthy: 'healthy',
};

/** Every host's backups, worst first (`GET /api/v1/backups`); one row per stanza. */
async function backupsPage() {
  show('backups');
  $('where').textContent = '';
  const rpo = $('backups-rpo').value;
  const r = await api('GET', rpo ? `/api/v1/backups?rpo=${encodeURIComponent(rpo)}` : '/api/v1/backups');
  if (r.status === 401) { route(); return; }
  if (r.status !== 200) { $('backups-error').textContent = r.json?.error ?? `backups: ${r.status}`; return; }
  $('backups-error').textContent = '';
  const hosts = r.json;
  const attention = hosts.filter((h) => h.risk !== 'healthy').length;
  $('backups-summary').textContent = `${attention} of ${hosts.length} hosts need attention.`;
  const rows = $('backup-rows');
  rows.replaceChildren();
  for (const host of hosts) {
    const stanzas = host.backups?.stanzas?.length ? host.backups.stanzas : [null];
    for (const stanza of stanzas) {
      const tr = el('tr', null, { 'data-agent': host.name, 'data-risk': host.risk });
      const name = el('td');
      name.append(el('a', host.name, { href: `#/agent/${host.agent_id}` }));
      const risk = el('td', RISK_WORDS[host.risk] ?? host.risk, host.risk === 'healthy' ? {} : { class: 'warn' });
      tr.append(
        name, risk, el('td', stanza ? `${stanza.name}${stanza.running ? ' (backup running)' : ''}` : ''),
        el('td', backupCell(stanza?.full), { 'data-type': 'full' }),
        el('td', backupCell(stanza?.diff), { 'data-type': 'diff' }),
        el('td', backupCell(stanza?.incr), { 'data-type': 'incr' }),
        el('td', archiverCell(host.archiver)),
        el('td', drillCell(stanza?.drill), { 'data-type': 'drill' }),
        el('td', host.reasons.join('; ')),
      );
      rows.append(tr);
    }
  }
  await policies();
  every(AGENT_REFRESH_MS, () => { if (location.hash.startsWith('#/backups')) backupsPage(); });
}

const SCHEDULES = ['full', 'diff', 'incr', 'check', 'verify', 'drill'];

/** The backup policies, with what this replica's reconciler did on each agent. */
async function policies() {
  const r = await api('GET', '/api/v1/backup-policies');
  const rows = $('policy-rows');
  rows.replaceChildren();
  if (r.status !== 200) { $('policy-error').textContent = r.json?.error ?? `policies: ${r.status}`; return; }
  for (const p of r.json) {
    const tr = el('tr', null, { 'data-policy': p.name });
    const schedules = SCHEDULES.filter((s) => p[s]).map((s) => `${s} ${p[s]}`).join('; ');
    const done = p.agents_reconciled.map((a) => (a.error ? `${a.agent}: ${a.error}` : `${a.agent}: in place`)).join('; ');
    tr.append(el('td', p.name), el('td', p.agents.join(', ')), el('td', p.stanza),
      el('td', `${schedules} (${p.tz ?? 'UTC'})`), el('td', done || 'not yet'));
    const td = el('td');
    if (allows('operator')) {
      td.append(confirmButton('Delete', `Delete policy ${p.name}`, `Delete backup policy ${p.name}? Its tasks are canceled on the agents.`,
        'policy-error', async () => {
          const d = await api('DELETE', `/api/v1/backup-policies/${encodeURIComponent(p.id)}`);
          if (d.status === 204) await policies();
          return d;
        }));
    }
    tr.append(td);
    rows.append(tr);
  }
}

async function createPolicy(event) {
  event.preventDefault();
  const body = {
    name: $('policy-name').value.trim(),
    agents: $('policy-agents').value.split(',').map((s) => s.trim()).filter(Boolean),
    stanza: $('policy-stanza').value.trim(),
    tz: $('policy-tz').value.trim() || 'UTC',
  };
  for (const s of SCHEDULES) {
    const v = $(`policy-${s}`).value.trim();
    if (v) body[s] = v;
  }
  const r = await api('POST', '/api/v1/backup-policies', body);
  if (r.status !== 201) { $('policy-error').textContent = r.json?.error ?? `create: ${r.status}`; return; }
  $('policy-error').textContent = '';
  await policies();
}

async function agentPage(id) {
  show('agent');
  const r = await api('GET', '/api/v1/agents');
  if (r.status === 401) { route(); return; }
  const agent = (r.json ?? []).find((a) => a.id === id);
  if (!agent) { $('agent-error').textContent = `no agent ${id}`; return; }
  if (app.agent?.id !== agent.id) $('agent-rekey-out').hidden = true;
  app.agent = agent;
  $('agent-title').textContent = `Agent ${agent.name}`;
  $('where').textContent = agent.name;
  const health = bufferHealth(agent.buffer);
  $('agent-summary').textContent = `${agent.status}, last seen ${ago(agent.last_seen)}; buffer ${health.text}${health.warn ? ` (${health.why})` : ''}`;
  $('agent-terminal').disabled = agent.status !== 'online';
  try {
    $('agent-error').textContent = '';
    await drawCharts($('charts'), agent.id, Number($('range').value), api);
  } catch (error) {
    $('agent-error').textContent = String(error.message ?? error);
  }
  await tasks(agent.id);
  every(AGENT_REFRESH_MS, () => { if (location.hash === `#/agent/${id}`) agentPage(id); });
}

async function tasks(agentId) {
  const r = await api('GET', `/api/v1/agents/${encodeURIComponent(agentId)}/tasks`);
  const rows = $('task-rows');
  rows.replaceChildren();
  if (r.status !== 200) { $('task-error').textContent = r.json?.error ?? `tasks: ${r.status}`; return; }
  for (const task of r.json) {
    const last = task.runs?.[task.runs.length - 1];
    const tr = el('tr', null, { 'data-task': task.id });
    tr.append(
      el('td', task.id), el('td', task.kind), el('td', task.status), el('td', task.schedule),
      el('td', last ? `${last.status}${last.exit_code != null ? ` (exit ${last.exit_code})` : ''}${last.error ? `: ${last.error}` : ''}` : ''),
      el('td', task.next_run_at ?? ''),
    );
    const td = el('td');
    if (allows('operator') && ['scheduled', 'queued', 'doing'].includes(task.status)) {
      const cancel = el('button', 'Cancel', { type: 'button', 'aria-label': `Cancel task ${task.id}` });
      cancel.addEventListener('click', async () => {
        const c = await api('POST', `/api/v1/agents/${encodeURIComponent(agentId)}/tasks/${encodeURIComponent(task.id)}/cancel`);
        $('task-error').textContent = c.status === 200 ? '' : c.json?.error ?? `cancel: ${c.status}`;
        await tasks(agentId);
      });
      td.append(cancel);
    }
    tr.append(td);
    rows.append(tr);
  }
}

async function createTask(event) {
  event.preventDefault();
  if (!app.agent) return;
  const body = { kind: $('task-kind').value, params: {} };
  for (const pair of $('task-params').value.split(',').map((s) => s.trim()).filter(Boolean)) {
    const at = pair.indexOf('=');
    if (at < 1) { $('task-error').textContent = `parameter "${pair}" is not key=value`; return; }
    body.params[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
  }
  const schedule = $('task-schedule').value;
  const when = $('task-when').value.trim();
  if (schedule !== 'now') {
    if (!when) { $('task-error').textContent = `give a value for "${schedule}"`; return; }
    body[schedule] = when;
  }
  const r = await api('POST', `/api/v1/agents/${encodeURIComponent(app.agent.id)}/tasks`, body);
  $('task-error').textContent = r.status === 201 ? '' : r.json?.error ?? `create: ${r.status}`;
  await tasks(app.agent.id);
}

let execPoll = null;

async function runExec(event) {
  event.preventDefault();
  const argv = $('exec-command').value.split('\n').map((s) => s.replace(/\r$/, '')).filter((s) => s.length > 0);
  if (argv.length === 0) { $('exec-error').textContent = 'give a command'; return; }
  const r = await api('POST', '/api/v1/exec', { hosts: $('exec-hosts').value, argv, idempotent: $('exec-idempotent').checked });
  if (r.status !== 202) { $('exec-error').textContent = r.json?.error ?? `exec: ${r.status}`; return; }
  $('exec-error').textContent = '';
  clearInterval(execPoll);
  const opId = r.json.op_id;
  const poll = async () => {
    const s = await api('GET', `/api/v1/exec/${encodeURIComponent(opId)}`);
    if (s.status !== 200) { $('exec-error').textContent = s.json?.error ?? `exec: ${s.status}`; clearInterval(execPoll); return; }
    renderExec(s.json);
    if (s.json.finished) clearInterval(execPoll);
  };
  execPoll = setInterval(poll, 500);
  poll();
}

function renderExec(run) {
  const counts = {};
  for (const h of run.hosts) counts[h.outcome ?? 'running'] = (counts[h.outcome ?? 'running'] ?? 0) + 1;
  $('exec-summary').textContent = `${run.op_id}: ${Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(', ')}${run.finished ? ' — finished' : ''}`;
  const out = $('exec-hosts-out');
  out.replaceChildren();
  for (const h of run.hosts) {
    const head = el('h3', `${h.host}: `);
    head.append(el('span', h.outcome ?? 'running', { class: `outcome-${h.outcome ?? 'running'}` }));
    if (h.exit_code != null) head.append(` (exit ${h.exit_code})`);
    if (h.error) head.append(` — ${h.error}`);
    out.append(head, el('pre', h.stdout + (h.stderr ? `\n[stderr]\n${h.stderr}` : ''), { class: 'out', 'aria-label': `output of ${h.host}` }));
  }
}

async function audit(older = false) {
  show('audit');
  $('where').textContent = '';
  if (!older) app.auditBefore = null;
  const params = new URLSearchParams({ limit: '100' });
  if ($('audit-action').value) params.set('action', $('audit-action').value);
  if (app.auditBefore) params.set('before', String(app.auditBefore));
  const r = await api('GET', `/api/v1/audit?${params}`);
  if (r.status !== 200) { $('audit-error').textContent = r.json?.error ?? `audit: ${r.status}`; return; }
  $('audit-error').textContent = '';
  const rows = $('audit-rows');
  if (!older) rows.replaceChildren();
  for (const rec of r.json) {
    const tr = el('tr', null, { 'data-action': rec.action });
    // A terminal session's records link to its recording.
    const target = el('td');
    if (/^(terminal|recording)\./.test(rec.action)) {
      target.append(el('a', rec.target, { href: `#/recordings/${encodeURIComponent(rec.target)}`, 'aria-label': `Recording of ${rec.target}` }));
    } else target.textContent = rec.target;
    tr.append(el('td', rec.ts), el('td', rec.actor), el('td', rec.action), target, el('td', JSON.stringify(rec.detail)));
    rows.append(tr);
  }
  app.auditBefore = r.json.length ? r.json[r.json.length - 1].id : app.auditBefore;
  $('audit-older').hidden = r.json.length < 100;
}

/** A button that runs `action` after the user confirms `question`; errors go to `errorId`. */
function confirmButton(label, aria, question, errorId, action) {
  const button = el('button', label, { type: 'button', 'aria-label': aria });
  button.addEventListener('click', async () => {
    if (!window.confirm(question)) return;
    $(errorId).textContent = '';
    const r = await action();
    if (r.status !== 204) $(errorId).textContent = r.json?.error ?? `${label}: ${r.status}`;
  });
  return button;
}

const SESSIONS_REFRESH_MS = 5000;

async function sessions() {
  show('sessions');
  $('where').textContent = '';
  const [r, agents] = await Promise.all([api('GET', '/api/v1/terminal/sessions'), api('GET', '/api/v1/agents')]);
  if (r.status !== 200) { $('sessions-error').textContent = r.json?.error ?? `sessions: ${r.status}`; return; }
  const names = Object.fromEntries((agents.json ?? []).map((a) => [a.id, a.name]));
  const rows = $('session-rows');
  rows.replaceChildren();
  $('sessions-empty').hidden = r.json.length > 0;
  for (const s of r.json) {
    const tr = el('tr', null, { 'data-session': s.session_id });
    const actions = el('td');
    const attach = el('a', 'Attach', { href: `#/terminal/${encodeURIComponent(s.session_id)}`, 'aria-label': `Attach to ${s.session_id}` });
    actions.append(attach, ' ', confirmButton('End', `End session ${s.session_id}`, `End ${s.user}'s psql session on ${names[s.agent_id] ?? s.agent_id}?`, 'sessions-error', async () => {
      const d = await api('DELETE', `/api/v1/terminal/sessions/${encodeURIComponent(s.session_id)}`);
      await sessions();
      return d.status === 202 ? { status: 204 } : d;
    }));
    tr.append(el('td', s.session_id), el('td', names[s.agent_id] ?? s.agent_id), el('td', s.user), el('td', s.state),
      el('td', ago(new Date(s.created_ms).toISOString()), { title: new Date(s.created_ms).toISOString() }), actions);
    rows.append(tr);
  }
  every(SESSIONS_REFRESH_MS, () => { if (location.hash === '#/sessions') sessions(); });
}

async function users() {
  show('users');
  $('where').textContent = '';
  const r = await api('GET', '/api/v1/users');
  if (r.status !== 200) { $('users-error').textContent = r.json?.error ?? `users: ${r.status}`; return; }
  const rows = $('user-rows');
  rows.replaceChildren();
  // The message is cleared when an action starts, so one finishing later cannot wipe the
  // refusal of another.
  const patch = async (name, body) => {
    $('users-error').textContent = '';
    const p = await api('PATCH', `/api/v1/users/${encodeURIComponent(name)}`, body);
    if (p.status !== 204) $('users-error').textContent = p.json?.error ?? `change: ${p.status}`;
    await users();
  };
  for (const user of r.json) {
    const tr = el('tr', null, { 'data-user': user.name });
    const role = el('select', null, { 'aria-label': `Role of ${user.name}` });
    for (const name of ROLES) {
      const option = el('option', name);
      option.selected = name === user.role;
      role.append(option);
    }
    role.addEventListener('change', () => patch(user.name, { role: role.value }));
    const roleCell = el('td');
    roleCell.append(role);
    const actions = el('td');
    const toggle = el('button', user.disabled ? 'Enable' : 'Disable', { type: 'button', 'aria-label': `${user.disabled ? 'Enable' : 'Disable'} ${user.name}` });
    toggle.addEventListener('click', () => patch(user.name, { disabled: !user.disabled }));
    actions.append(toggle, confirmButton('Delete', `Delete ${user.name}`, `Delete user ${user.name} and its tokens?`, 'users-error', async () => {
      const d = await api('DELETE', `/api/v1/users/${encodeURIComponent(user.name)}`);
      await users();
      return d;
    }));
    tr.append(el('td', user.name), roleCell, el('td', user.disabled ? 'disabled' : 'enabled'), el('td', user.created_at), actions);
    rows.append(tr);
  }
}

async function tokens() {
  show('tokens');
  $('where').textContent = '';
  const r = await api('GET', '/api/v1/tokens');
  if (r.status !== 200) { $('tokens-error').textContent = r.json?.error ?? `tokens: ${r.status}`; return; }
  const rows = $('token-rows');
  rows.replaceChildren();
  for (const token of r.json) {
    const tr = el('tr', null, { 'data-token': token.id });
    const actions = el('td');
    if (token.current) actions.append('this login');
    else {
      actions.append(confirmButton('Revoke', `Revoke token ${token.id} of ${token.user}`, `Revoke ${token.user}'s token ${token.id}?`, 'tokens-error', async () => {
        const d = await api('DELETE', `/api/v1/tokens/${encodeURIComponent(token.id)}`);
        await tokens();
        return d;
      }));
    }
    tr.append(el('td', token.id), el('td', token.user), el('td', token.created_at), el('td', token.expires_at), actions);
    rows.append(tr);
  }
}

async function rekeyAgent() {
  const agent = app.agent;
  if (!agent) return;
  const r = await api('POST', `/api/v1/agents/${encodeURIComponent(agent.id)}/rekey`);
  if (r.status !== 201) { $('agent-error').textContent = r.json?.error ?? `new credential: ${r.status}`; return; }
  $('agent-rekey-command').textContent = `outpost-agent enroll --force --token ${shellQuote(r.json.token)} --control-plane ${shellQuote(location.origin)} --name ${shellQuote(agent.name)}\n# then restart the agent (systemctl restart outpost-agent)`;
  $('agent-rekey-out').hidden = false;
}

async function removeAgent() {
  const agent = app.agent;
  if (!agent || !window.confirm(`Remove agent ${agent.name}? Its credential stops working and its stored tasks and metrics are deleted; the host must be enrolled again.`)) return;
  const r = await api('DELETE', `/api/v1/agents/${encodeURIComponent(agent.id)}`);
  if (r.status !== 204) { $('agent-error').textContent = r.json?.error ?? `remove: ${r.status}`; return; }
  location.hash = '#/fleet';
}

/** What the Alerts page needs of the app. */
const alertsContext = {
  allows, confirmButton, route: () => route(),
  every: (fn) => every(AGENT_REFRESH_MS, fn),
};

async function route() {
  clearInterval(app.timer);
  if (!location.hash.startsWith('#/terminal/')) leaveTerminal();
  leaveReplay();
  if (!app.me && !(await whoami())) { show('login'); return; }
  const hash = location.hash || '#/fleet';
  const [, page, arg, extra] = hash.split('/');
  switch (page) {
    case 'agent': await agentPage(decodeURIComponent(arg ?? '')); break;
    case 'backups': await backupsPage(); break;
    case 'alerts': await alertsPage(alertsContext); break;
    case 'rollouts':
      if (arg) await rolloutPage(alertsContext, decodeURIComponent(arg));
      else await rolloutsPage(alertsContext);
      break;
    case 'exec': show('exec'); $('where').textContent = ''; break;
    case 'audit': await audit(); break;
    case 'sessions': await sessions(); break;
    case 'users': await users(); break;
    case 'tokens': await tokens(); break;
    case 'recordings':
      if (arg) await replayPage(decodeURIComponent(arg), extra === undefined ? undefined : Number(extra));
      else await recordingsPage();
      break;
    case 'terminal': {
      let why = '';
      if (!(await attachTerminal(decodeURIComponent(arg ?? ''), (m) => { why = m; }))) {
        await fleet();
        $('agents-error').textContent = why;
      }
      break;
    }
    default: await fleet();
  }
}

$('login').addEventListener('submit', login);
$('logout').addEventListener('click', logout);
$('task-form').addEventListener('submit', createTask);
$('exec-form').addEventListener('submit', runExec);
$('range').addEventListener('change', () => app.agent && agentPage(app.agent.id));
$('backups-rpo').addEventListener('change', () => backupsPage());
$('policy-form').addEventListener('submit', createPolicy);
$('silence-form').addEventListener('submit', (e) => createSilence(e, alertsContext));
$('channel-form').addEventListener('submit', (e) => createChannel(e, alertsContext));
$('window-form').addEventListener('submit', (e) => createWindow(e, alertsContext));
$('agent-terminal').addEventListener('click', () => app.agent && openTerminal(app.agent, (m) => { $('agent-error').textContent = m; }));
$('agent-remove').addEventListener('click', removeAgent);
$('agent-rekey').addEventListener('click', rekeyAgent);
$('audit-action').addEventListener('change', () => audit());
$('audit-older').addEventListener('click', () => audit(true));
wireReplay();
window.outpost.replay = replayState;
window.addEventListener('hashchange', route);
route();
