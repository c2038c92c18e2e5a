// The Outpost browser terminal: log in, pick an agent, run psql on it through the control
// plane. Output arrives as binary frames counted by byte offset; after a dropped socket the
// page reconnects from the last offset it holds, so nothing is shown twice or lost silently.

const $ = (id) => document.getElementById(id);
const RESIZE_DEBOUNCE_MS = 100;
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
};

function setState(state) {
  view.state = state;
  const badge = $('state');
  badge.dataset.state = state;
  badge.textContent = state === 'none' ? '' : `session: ${state}`;
}

function show(section) {
  for (const id of ['login', 'agents', 'terminal-view']) $(id).hidden = id !== section;
}

async function api(method, path, body) {
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

async function login(event) {
  event.preventDefault();
  const r = await api('POST', '/api/v1/sessions', {
    username: $('username').value,
    password: $('password').value,
  });
  if (r.status !== 200) {
    $('login-error').textContent = r.json?.error ?? `login failed (${r.status})`;
    return;
  }
  $('login-error').textContent = '';
  await listAgents();
}

async function listAgents() {
  const r = await api('GET', '/api/v1/agents');
  if (r.status === 401) { show('login'); return; }
  if (r.status !== 200) { $('agents-error').textContent = r.json?.error ?? `error ${r.status}`; show('agents'); return; }
  const rows = $('agent-rows');
  rows.replaceChildren();
  for (const agent of r.json) {
    const tr = document.createElement('tr');
    for (const text of [agent.name, agent.status, agent.last_seen ?? 'never']) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement('td');
    const button = document.createElement('button');
    button.textContent = 'Open terminal';
    button.setAttribute('aria-label', `Open terminal on ${agent.name}`);
    button.disabled = agent.status !== 'online';
    button.addEventListener('click', () => openTerminal(agent));
    td.append(button);
    tr.append(td);
    rows.append(tr);
  }
  show('agents');
}

async function openTerminal(agent) {
  const r = await api('POST', '/api/v1/terminal/sessions', { agent_id: agent.id });
  if (r.status !== 201) {
    $('agents-error').textContent = r.json?.error ?? `could not open a terminal (${r.status})`;
    return;
  }
  view.sessionId = r.json.session_id;
  view.offset = 0;
  view.closed = false;
  $('where').textContent = `psql on ${agent.name}`;
  history.replaceState(null, '', `#session=${view.sessionId}`);
  show('terminal-view');
  startTerminal();
  connect();
}

function startTerminal() {
  if (view.term) { view.term.reset(); return; }
  const term = new window.Terminal({ cursorBlink: true, scrollback: 10000, fontSize: 14 });
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
};

$('login').addEventListener('submit', login);
listAgents();
