// Tiny DOM helpers: every node is built with createElement + textContent (never innerHTML), so text
// that comes from the API (names, labels, messages) can never inject markup.
const SVG_NS = 'http://www.w3.org/2000/svg';

function apply(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else if (k === 'value' && 'value' in el) el.value = v;
    else if (k === 'checked' || k === 'selected' || k === 'disabled' || k === 'hidden') el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** h('button', {class: 'x', onclick: fn}, 'text', child, ...) */
export function h(tag, attrs, ...children) {
  return append(apply(document.createElement(tag), attrs), children);
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  return append(apply(document.createElementNS(SVG_NS, tag), attrs), children);
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const fmt = {
  pct: (x) => (typeof x === 'number' ? `${(100 * x).toFixed(1)} %` : '—'),
  bytes: (n) => {
    if (typeof n !== 'number') return '—';
    if (n < 1024) return `${n} B`;
    if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  },
  int: (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : '—'),
  time: (iso) => (iso ? new Date(iso).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' }) : '—'),
  shape: (shape) => (Array.isArray(shape) ? shape.join('×') : '—'),
  layer: (job) => {
    const l = job.resolved_layers && job.resolved_layers.length ? job.resolved_layers : job.prompt_layer;
    if (l === null || l === undefined) return 'recommended';
    const text = Array.isArray(l) ? l.join(', ') : String(l);
    return job.prompt_layer === 'auto' && text !== 'auto' ? `${text} (auto)` : text;
  },
};

// The state lists come from the API's own enum (served by the console router), never copied here.
export { TERMINAL } from './states.js';

export function statusBadge(status, testid = 'job-status') {
  return h('span', { class: `status status-${status}`, 'data-testid': testid, 'data-status': status }, status);
}
