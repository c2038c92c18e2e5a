// The psql terminal: a session on one agent, through the control plane. Output arrives as
// binary frames counted by byte offset; after a dropped socket the page reconnects from the
// last offset it holds, so nothing is shown twice or lost silently.

import { $, api, show } from './common.js';

const RESIZE_DEBOUNCE_MS = 100;

/** The terminal's look, shared by live sessions and replays. The line height leaves room
 * below the baseline: at 1.0 and a device pixel ratio of 1, underscores fall outside the
 * row and vanish (`pg_stat_activity` would read `pg stat activity`). */
export const TERMINAL_OPTIONS = {
  fontSize: 14,
  lineHeight: 1.2,
  fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
};
const RECONNECT_MAX_MS = 5000;

const view = {
  state: 'none',
  offset: 0,
  sessionId: null,
  socket: null,
  closed: false,
  attempts: 0,
  term: null,
  fit: null,
  // Every byte shown, in offset order, once asked for (`window.outpost.keepTranscript()`).
  transcript: null,
};

/** The session is recorded; `detail` says what the recording misses, when it does. */
function setRecording(detail) {
  const badge = $('recording');
  if (detail === null) {
    badge.hidden = true;
    return;
  }
  badge.hidden = false;
  badge.dataset.state = detail ? 'degraded' : 'live';
  badge.textContent = detail ? `⚠ ${detail}` : '● recorded';
  badge.title = detail || 'This session is recorded (output and window sizes) and can be replayed from the Recordings page.';
}

function setState(state) {
  view.state = state;
  const badge = $('state');
  badge.dataset.state = state;
  badge.textContent = state === 'none' ? '' : `session: ${state}`;
}

export async function openTerminal(agent, onError) {
  const r = await api('POST', '/api/v1/terminal/sessions', { agent_id: agent.id });
  if (r.status !== 201) {
    onError(r.json?.error ?? `could not open a terminal (${r.status})`);
    return;
  }
  history.pushState(null, '', `#/terminal/${r.json.session_id}`);
  begin(r.json.session_id, `psql on ${agent.name}`);
}

/// Attach to an existing session (a reloaded page): the scrollback replays from offset 0.
export async function attachTerminal(sessionId, onError) {
  const r = await api('GET', `/api/v1/terminal/sessions/${encodeURIComponent(sessionId)}`);
  if (r.status !== 200) { onError(r.json?.error ?? `no session ${sessionId}`); return false; }
  if (r.json.state === 'closed') { onError(`that terminal session is closed: ${r.json.reason}`); return false; }
  begin(sessionId, `psql (session ${sessionId.slice(0, 8)})`);
  return true;
}

function begin(sessionId, where) {
  view.sessionId = sessionId;
  view.offset = 0;
  view.closed = false;
  view.attempts = 0;
  $('where').textContent = where;
  show('terminal-view');
  startTerminal();
  connect();
}

function startTerminal() {
  if (view.term) { view.term.reset(); return; }
  const term = new window.Terminal({ ...TERMINAL_OPTIONS, cursorBlink: true, scrollback: 10000 });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($('terminal'));
  fit.fit();
  const encoder = new TextEncoder();
  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  let pending = null;
  term.onResize(() => {
    clearTimeout(pending);
    pending = setTimeout(sendResize, RESIZE_DEBOUNCE_MS);
  });
  window.addEventListener('resize', () => fit.fit());
  view.term = term;
  view.fit = fit;
  term.focus();
}

function send(bytes) {
  if (view.socket?.readyState === WebSocket.OPEN) view.socket.send(bytes);
}

function sendResize() {
  if (view.socket?.readyState !== WebSocket.OPEN) return;
  view.socket.send(JSON.stringify({ type: 'resize', cols: view.term.cols, rows: view.term.rows }));
}

function connect() {
  if (view.closed) return;
  setState(view.attempts === 0 ? 'connecting' : 'reconnecting');
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${location.host}/api/v1/terminal/sessions/${view.sessionId}/ws?offset=${view.offset}`;
  const socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  view.socket = socket;
  socket.onopen = () => { view.attempts = 0; sendResize(); };
  socket.onmessage = (event) => {
    if (typeof event.data !== 'string') {
      const bytes = new Uint8Array(event.data);
      view.offset += bytes.length;
      view.transcript?.push(bytes);
      view.term.write(bytes);
      if (view.state !== 'live') setState('live');
      return;
    }
    const msg = JSON.parse(event.data);
    switch (msg.type) {
      case 'offset':
        view.offset = msg.offset;
        break;
      case 'skipped':
        view.term.write(`\r\n\x1b[33m[${msg.to - msg.from} bytes of output skipped: this view fell behind]\x1b[0m\r\n`);
        view.offset = msg.to;
        break;
      case 'state':
        setState(msg.state);
        break;
      case 'recording':
        setRecording(msg.detail);
        break;
      case 'closed':
        view.closed = true;
        setState('closed');
        view.term.write(`\r\n\x1b[2m[session closed: ${msg.reason}]\x1b[0m\r\n`);
        break;
      default:
        break;
    }
  };
  socket.onclose = () => {
    if (view.closed || view.socket !== socket) return;
    const delay = Math.min(RECONNECT_MAX_MS, 250 * 2 ** view.attempts);
    view.attempts += 1;
    setState('reconnecting');
    setTimeout(connect, delay);
  };
}

// For operators' own scripts and the browser test: read-only views and a way to drop the
// socket as a network failure would.
window.outpost = {
  state: () => view.state,
  recording: () => $('recording').textContent,
  offset: () => view.offset,
  size: () => ({ cols: view.term?.cols, rows: view.term?.rows }),
  screenText: () => {
    const buffer = view.term?.buffer.active;
    if (!buffer) return '';
    const lines = [];
    for (let i = 0; i < buffer.length; i += 1) lines.push(buffer.getLine(i)?.translateToString(true) ?? '');
    return lines.join('\n');
  },
  dropConnection: () => view.socket?.close(),
  session: () => view.sessionId,
  keepTranscript: () => { view.transcript = []; },
  transcript: () => {
    const decoder = new TextDecoder();
    return (view.transcript ?? []).map((b) => decoder.decode(b, { stream: true })).join('') + decoder.decode();
  },
  terminalOptions: () => ({ ...TERMINAL_OPTIONS }),
};

/// Leave the terminal page deliberately (navigation inside the UI): the session is closed,
/// so psql ends and the audit log records the end. A reloaded page keeps it instead.
export function leaveTerminal() {
  if (!view.sessionId) return;
  if (view.closed) {
    setState('none');
    setRecording(null);
    return;
  }
  view.closed = true;
  view.socket?.close();
  view.socket = null;
  api('DELETE', `/api/v1/terminal/sessions/${encodeURIComponent(view.sessionId)}`);
  view.sessionId = null;
  setState('none');
  setRecording(null);
}
