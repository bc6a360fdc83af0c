// Small SVG charts (no library): a line chart for training curves and a bar chart for the layer sweep.
import { h, s } from './dom.js';

const W = 480;
const H = 220;
const PAD = { l: 48, r: 12, t: 12, b: 34 };

function ticks(lo, hi, n = 4) {
  const out = [];
  for (let i = 0; i <= n; i++) out.push(lo + ((hi - lo) * i) / n);
  return out;
}

/**
 * series: [{name, cls, points: [[x, y], ...]}]. Returns a <figure> whose <svg> carries
 * data-points (how many points were drawn), so tests and people can tell an empty chart from a drawn one.
 */
export function lineChart({ title, series, xLabel, yLabel, yMin = null, yMax = null, testid }) {
  const pts = series.flatMap((se) => se.points);
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const x0 = Math.min(0, ...xs);
  const x1 = Math.max(1, ...xs);
  const y0 = yMin ?? Math.min(0, ...ys);
  let y1 = yMax ?? Math.max(...ys, y0 + 1e-6);
  if (y1 <= y0) y1 = y0 + 1;
  const X = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const Y = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  const svg = s('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': `${title}: ${series.map((se) => `${se.name} ${se.points.length} points`).join(', ')}`,
    'data-testid': testid, 'data-points': pts.length,
  });
  for (const t of ticks(y0, y1)) {
    svg.append(s('line', { x1: PAD.l, x2: W - PAD.r, y1: Y(t), y2: Y(t), class: 'grid' }));
    svg.append(s('text', { x: PAD.l - 6, y: Y(t) + 4, class: 'tick', 'text-anchor': 'end' }, t.toFixed(y1 - y0 < 3 ? 2 : 1)));
  }
  for (const t of ticks(x0, x1, Math.min(8, Math.max(1, Math.round(x1 - x0))))) {
    svg.append(s('text', { x: X(t), y: H - PAD.b + 16, class: 'tick', 'text-anchor': 'middle' }, Number.isInteger(t) ? t : t.toFixed(1)));
  }
  svg.append(s('line', { x1: PAD.l, x2: W - PAD.r, y1: H - PAD.b, y2: H - PAD.b, class: 'axis' }));
  svg.append(s('line', { x1: PAD.l, x2: PAD.l, y1: PAD.t, y2: H - PAD.b, class: 'axis' }));
  svg.append(s('text', { x: (PAD.l + W - PAD.r) / 2, y: H - 4, class: 'label', 'text-anchor': 'middle' }, xLabel));
  svg.append(s('text', { x: 12, y: (PAD.t + H - PAD.b) / 2, class: 'label', 'text-anchor': 'middle', transform: `rotate(-90 12 ${(PAD.t + H - PAD.b) / 2})` }, yLabel));
  for (const se of series) {
    if (!se.points.length) continue;
    const d = se.points.map((p, i) => `${i ? 'L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(' ');
    svg.append(s('path', { d, class: `line ${se.cls}` }));
    if (se.dots) for (const p of se.points) svg.append(s('circle', { cx: X(p[0]), cy: Y(p[1]), r: 3, class: `dot ${se.cls}` }, s('title', {}, `${se.name}: ${p[1].toFixed(4)} at ${p[0]}`)));
  }
  const legend = h('ul', { class: 'legend' }, series.map((se) => h('li', {}, h('span', { class: `swatch ${se.cls}`, 'aria-hidden': 'true' }), se.name)));
  const empty = pts.length ? null : h('p', { class: 'muted chart-empty' }, 'No points yet: the curve appears as the job trains.');
  return h('figure', { class: 'chart-box' }, h('figcaption', {}, title), svg, legend, empty);
}

/** rows: [{label, value, highlight}] with value in [0, 1] (an accuracy). */
export function barChart({ title, rows, testid }) {
  const BH = 22;
  const LW = 150;
  const height = rows.length * (BH + 6) + 8;
  const svg = s('svg', { viewBox: `0 0 ${W} ${height}`, class: 'chart bars', role: 'img', 'aria-label': title, 'data-testid': testid, 'data-bars': rows.length });
  rows.forEach((r, i) => {
    const y = 4 + i * (BH + 6);
    const w = Math.max(1, (W - LW - 60) * Math.max(0, Math.min(1, r.value)));
    svg.append(s('text', { x: LW - 8, y: y + BH / 2 + 4, class: 'tick', 'text-anchor': 'end' }, r.label));
    svg.append(s('rect', { x: LW, y, width: w, height: BH, rx: 3, class: r.highlight ? 'bar best' : 'bar' }, s('title', {}, `${r.label}: ${(100 * r.value).toFixed(1)} %`)));
    svg.append(s('text', { x: LW + w + 6, y: y + BH / 2 + 4, class: 'tick' }, `${(100 * r.value).toFixed(1)} %${r.highlight ? '  ★ chosen' : ''}`));
  });
  return h('figure', { class: 'chart-box' }, h('figcaption', {}, title), svg);
}
