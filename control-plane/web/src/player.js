// Recordings: search them, and replay one in an xterm.js terminal from its asciicast v2 file
// (play, pause, seek, speed). Long idle stretches are shortened to IDLE_MAX_S while playing;
// the times shown and searched are the recording's own.

import { $, api, el, show } from './common.js';
import { TERMINAL_OPTIONS } from './terminal.js';
import { clock, dueAt, parseCast, playTimeOf, playTimes } from './cast.js';

const TICK_MS = 40;

const player = { term: null, cast: null, times: [], shown: 0, at: 0, speed: 1, playing: false, timer: null, startedAt: 0, from: 0, session: null };

function size(cols, rows) {
  if (cols > 0 && rows > 0) player.term.resize(Math.min(cols, 500), Math.min(rows, 200));
}

/** Apply events `player.shown .. n` to the terminal. */
function applyUpTo(n) {
  const { events } = player.cast;
  let text = '';
  for (let i = player.shown; i < n; i += 1) {
    const [, code, data] = events[i];
    if (code === 'o') text += data;
    else if (code === 'r') {
      if (text) { player.term.write(text); text = ''; }
      const [cols, rows] = String(data).split('x').map(Number);
      size(cols, rows);
    } else if (code === 'm') text += `\r\n\x1b[33m[${data}]\x1b[0m\r\n`;
  }
  if (text) player.term.write(text);
  player.shown = n;
}

function render() {
  const total = player.times.length ? player.times[player.times.length - 1] : 0;
  $('replay-seek').max = String(total);
  $('replay-seek').value = String(player.at);
  $('replay-time').textContent = `${clock(player.at)} / ${clock(total)}`;
  $('replay-play').textContent = player.playing ? 'Pause' : 'Play';
}

/** Jump to playing time `p`: the screen is rebuilt from the start up to it. */
export function seek(p) {
  const n = dueAt(player.times, p);
  if (n < player.shown) {
    player.term.reset();
    size(player.cast.header.width, player.cast.header.height);
    player.shown = 0;
  }
  applyUpTo(n);
  player.at = p;
  player.from = p;
  player.startedAt = performance.now();
  render();
}

function tick() {
  const total = player.times[player.times.length - 1] ?? 0;
  const p = player.from + ((performance.now() - player.startedAt) / 1000) * player.speed;
  applyUpTo(dueAt(player.times, p));
  player.at = Math.min(p, total);
  if (p >= total) pause();
  render();
}

export function play() {
  if (!player.cast) return;
  const total = player.times[player.times.length - 1] ?? 0;
  if (player.at >= total) seek(0);
  player.playing = true;
  player.from = player.at;
  player.startedAt = performance.now();
  clearInterval(player.timer);
  player.timer = setInterval(tick, TICK_MS);
  render();
}

export function pause() {
  player.playing = false;
  clearInterval(player.timer);
  render();
}

function setSpeed(speed) {
  player.from = player.at;
  player.startedAt = performance.now();
  player.speed = speed;
}

function describe(rec) {
  const parts = [`${rec.user} on ${rec.agent}`, `started ${rec.started}`];
  if (rec.ended_ms) parts.push(`lasted ${clock((rec.ended_ms - rec.started_ms) / 1000)}`);
  else parts.push('still running or ended without a close');
  parts.push(`${rec.bytes} bytes of output in ${rec.chunks} chunks`);
  parts.push(rec.input ? 'keystrokes recorded' : 'keystrokes not recorded');
  return parts.join(' · ');
}

/** The replay page of one recording, positioned at the recording's own time `at` if given. */
export async function replayPage(sessionId, at) {
  pause();
  show('replay');
  $('where').textContent = '';
  $('replay-error').textContent = '';
  $('replay-verify-out').textContent = '';
  const path = `/api/v1/terminal/recordings/${encodeURIComponent(sessionId)}`;
  const r = await api('GET', path);
  if (r.status !== 200) { $('replay-error').textContent = r.json?.error ?? `recording: ${r.status}`; return; }
  const rec = r.json;
  $('replay-title').textContent = `Recording ${sessionId.slice(0, 12)}`;
  $('replay-meta').textContent = describe(rec);
  $('replay-incomplete').hidden = !rec.incomplete;
  $('replay-incomplete').textContent = rec.incomplete ? `Incomplete: ${rec.incomplete}` : '';
  $('replay-hash').textContent = rec.hash;
  $('replay-download').href = `${path}/cast?download=true`;
  const cast = await fetch(`${path}/cast`, { credentials: 'same-origin' });
  if (!cast.ok) { $('replay-error').textContent = `recording: ${cast.status}`; return; }
  try {
    player.cast = parseCast(await cast.text());
  } catch (error) {
    $('replay-error').textContent = `the recording does not parse: ${error.message}`;
    return;
  }
  player.session = sessionId;
  player.times = playTimes(player.cast.events);
  if (!player.term) {
    player.term = new window.Terminal({ ...TERMINAL_OPTIONS, disableStdin: true, cursorBlink: false });
    player.term.open($('replay-term'));
  }
  player.term.reset();
  size(player.cast.header.width, player.cast.header.height);
  player.shown = 0;
  const start = at === undefined ? 0 : playTimeOf(player.cast.events, player.times, at);
  seek(start);
}

async function verify() {
  if (!player.session) return;
  const r = await api('GET', `/api/v1/terminal/recordings/${encodeURIComponent(player.session)}/verify`);
  if (r.status !== 200) { $('replay-verify-out').textContent = r.json?.error ?? `verify: ${r.status}`; return; }
  $('replay-verify-out').textContent = r.json.valid
    ? `Valid: ${r.json.chunks} chunks, ${r.json.events} events; the chain holds to ${r.json.hash.slice(0, 16)}…`
    : `INVALID: ${r.json.problem}`;
}

export function leaveReplay() {
  pause();
}

/** The recordings page: the search form's values as a query, results with their moments. */
export async function recordingsPage() {
  show('recordings');
  $('where').textContent = '';
  const params = new URLSearchParams();
  for (const [id, name] of [['rec-q', 'q'], ['rec-user', 'user'], ['rec-agent', 'agent']]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  for (const [id, name] of [['rec-from', 'from'], ['rec-to', 'to']]) {
    const v = $(id).value;
    if (v) params.set(name, String(Date.parse(v)));
  }
  const r = await api('GET', `/api/v1/terminal/recordings?${params}`);
  const rows = $('recording-rows');
  rows.replaceChildren();
  if (r.status !== 200) { $('recordings-error').textContent = r.json?.error ?? `recordings: ${r.status}`; return; }
  $('recordings-error').textContent = '';
  $('recordings-empty').hidden = r.json.length > 0;
  for (const rec of r.json) {
    const tr = el('tr', null, { 'data-recording': rec.session_id });
    const replay = el('td');
    replay.append(el('a', 'Replay', { href: `#/recordings/${encodeURIComponent(rec.session_id)}`, 'aria-label': `Replay ${rec.session_id}` }));
    const found = el('td');
    for (const m of rec.matches) {
      const link = el('a', `${clock(m.at)}`, { href: `#/recordings/${encodeURIComponent(rec.session_id)}/${m.at}`, 'aria-label': `Replay ${rec.session_id} at ${m.at} s` });
      found.append(link, ` ${m.excerpt}`, el('br'));
    }
    const duration = rec.ended_ms ? clock((rec.ended_ms - rec.started_ms) / 1000) : 'open';
    const status = rec.incomplete ? el('td', `incomplete: ${rec.incomplete}`, { class: 'warn' }) : el('td', 'complete');
    tr.append(el('td', rec.started), el('td', rec.user), el('td', rec.agent), el('td', duration), el('td', rec.bytes), status, found, replay);
    rows.append(tr);
  }
}

export function wireReplay() {
  $('replay-play').addEventListener('click', () => (player.playing ? pause() : play()));
  $('replay-seek').addEventListener('input', () => seek(Number($('replay-seek').value)));
  $('replay-speed').addEventListener('change', () => setSpeed(Number($('replay-speed').value)));
  $('replay-verify').addEventListener('click', verify);
  $('recordings-form').addEventListener('submit', (event) => {
    event.preventDefault();
    recordingsPage();
  });
}

/** For the browser test and operators' scripts: what the replay shows now. */
export function replayState() {
  const buffer = player.term?.buffer.active;
  const lines = [];
  if (buffer) for (let i = 0; i < buffer.length; i += 1) lines.push(buffer.getLine(i)?.translateToString(true) ?? '');
  return { at: player.at, playing: player.playing, shown: player.shown, events: player.cast?.events.length ?? 0, text: lines.join('\n') };
}
