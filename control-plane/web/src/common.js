// Helpers shared by the pages.

export const $ = (id) => document.getElementById(id);

const PAGES = ['login', 'fleet', 'agent', 'exec', 'audit', 'sessions', 'recordings', 'replay', 'users', 'tokens', 'terminal-view'];

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
