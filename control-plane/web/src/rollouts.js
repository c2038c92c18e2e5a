// The Rollouts page: every rollout with its state, and one rollout as waves × hosts (each
// host a cell coloured by its state, its detail on hover) with the operator's controls. Both
// refresh on the app's agent refresh period.

import { $, api, el, show } from './common.js';


/** The list, newest first; a rollout's name opens it. */
export async function rolloutsPage(ctx) {
  show('rollouts');
  $('where').textContent = '';
  $('rollout-detail').hidden = true;
  const r = await api('GET', '/api/v1/rollouts');
  if (r.status !== 200) { $('rollouts-error').textContent = r.json?.error ?? `rollouts: ${r.status}`; return; }
  $('rollouts-error').textContent = '';
  const rows = $('rollout-rows');
  rows.replaceChildren();
  for (const ro of r.json) {
    const tr = el('tr');
    const name = el('td');
    name.append(el('a', ro.plan.name, { href: `#/rollouts/${encodeURIComponent(ro.id)}` }));
    const counts = Object.entries(ro.counts).map(([k, v]) => `${v} ${k}`).join(', ');
    tr.append(name, el('td', ro.state, { class: `rollout-${ro.state}` }),
      el('td', `${Math.min(ro.wave, ro.plan.waves.length)} of ${ro.plan.waves.length}`), el('td', counts), el('td', ro.created_by));
    rows.append(tr);
  }
  ctx.every(() => location.hash === '#/rollouts' && rolloutsPage(ctx));
}

/** One rollout: its state, waves × hosts, and the controls its state allows. */
export async function rolloutPage(ctx, id) {
  show('rollouts');
  $('rollout-detail').hidden = false;
  const r = await api('GET', `/api/v1/rollouts/${encodeURIComponent(id)}`);
  if (r.status !== 200) { $('rollouts-error').textContent = r.json?.error ?? `rollout: ${r.status}`; return; }
  $('rollouts-error').textContent = '';
  const ro = r.json;
  $('where').textContent = ro.plan.name;
  $('rollout-state').textContent = `${ro.state}, wave ${Math.min(ro.wave, ro.plan.waves.length)} of ${ro.plan.waves.length}${ro.reason ? ` — ${ro.reason}` : ''}`;
  const grid = $('rollout-waves');
  grid.replaceChildren();
  for (const wave of ro.plan.waves) {
    const tr = el('tr');
    tr.append(el('th', `wave ${wave.wave} (halts at failure ${wave.errors_tolerated + 1})`, { scope: 'row' }));
    const cells = el('td');
    for (const h of ro.hosts.filter((x) => x.wave === wave.wave)) {
      const title = h.detail ? `${h.agent}: ${h.state} — ${h.detail}` : `${h.agent}: ${h.state}`;
      cells.append(el('span', h.agent, { class: `host host-${h.state}`, title, 'aria-label': title }));
    }
    tr.append(cells);
    grid.append(tr);
  }
  const controls = $('rollout-controls');
  controls.replaceChildren();
  const allowed = {
    running: ['pause', 'abort'], paused: ['resume', 'abort'], awaiting_approval: ['approve', 'pause', 'abort'],
    halted: ['retry-failed', 'abort'], aborted: [], done: ['retry-failed'],
  }[ro.state] ?? [];
  if (ctx.allows('operator')) {
    for (const action of allowed) {
      const button = el('button', action, { type: 'button' });
      button.addEventListener('click', async () => {
        if (action === 'abort' && !window.confirm('Abort this rollout? Tasks already running finish.')) return;
        const done = await api('POST', `/api/v1/rollouts/${encodeURIComponent(id)}/${action}`, {});
        $('rollouts-error').textContent = done.status === 200 ? '' : done.json?.error ?? `${action}: ${done.status}`;
        await rolloutPage(ctx, id);
      });
      controls.append(button);
    }
  }
  ctx.every(() => location.hash === `#/rollouts/${encodeURIComponent(id)}` && rolloutPage(ctx, id));
}
