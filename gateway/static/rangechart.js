// The device page's chart: one field over a chosen time range, drawn in SVG.
// The x axis is time from `from` to `to`, so gaps in the data show as gaps in
// time; many readings are reduced to a minimum and a maximum per column, so a
// week of readings draws as fast as an hour. Drag across the plot to zoom in.

import { h, s } from './dom.js';
import { clockTime, fieldInfo, formatNumber, formatValue } from './format.js';

const W = 600; // viewBox units
const H = 160;
const COLUMNS = 300; // min/max buckets across the width

function timeLabel(ms, span) {
  const date = new Date(ms);
  if (span <= 86_400_000) return clockTime(ms);
  return `${date.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${clockTime(ms).slice(0, 5)}`;
}

/** A relay channel's series is "channels.N": its label and whether it is on/off steps. */
export function seriesInfo(field, channelLabel) {
  const m = /^channels\.(\d+)$/.exec(field);
  if (m) return { label: channelLabel(Number(m[1])), unit: '', steps: true };
  const info = fieldInfo(field);
  return { label: info.label, unit: info.unit, steps: false };
}

export class RangeChart {
  /** `onZoom(from, to)` is called with the time span the operator dragged across. */
  constructor(field, info, onZoom) {
    this.field = field;
    this.info = info;
    this.onZoom = onZoom;
    this.title = info.unit ? `${info.label} (${info.unit})` : info.label;
    const thin = { 'vector-effect': 'non-scaling-stroke' };
    this.line = s('polyline', { class: 'chart-line', points: '', ...thin });
    this.band = s('polygon', { class: 'chart-band', points: '' });
    // The newest reading as a dot: a lone reading at the edge would otherwise not show.
    this.dot = s('line', { class: 'chart-dot', x1: 0, y1: 0, x2: 0, y2: 0, ...thin, visibility: 'hidden' });
    this.selection = s('rect', { class: 'chart-selection', x: 0, y: 0, width: 0, height: H });
    const grid = [0, 0.5, 1].map((f) =>
      s('line', { class: 'chart-grid', x1: 0, x2: W, y1: f * H, y2: f * H, ...thin }),
    );
    this.svg = s(
      'svg',
      {
        viewBox: `0 0 ${W} ${H}`,
        preserveAspectRatio: 'none',
        'aria-hidden': 'true',
        focusable: 'false',
        'data-testid': 'range-plot',
      },
      grid,
      this.band,
      this.line,
      this.dot,
      this.selection,
    );
    this.maxLabel = h('span', { class: 'chart-max' });
    this.minLabel = h('span', { class: 'chart-min' });
    this.latest = h('span', { class: 'chart-latest' });
    this.fromLabel = h('span');
    this.countLabel = h('span', { class: 'chart-count' });
    this.toLabel = h('span');
    this.plot = h(
      'div',
      { class: 'chart-plot range-plot', role: 'img' },
      h('div', { class: 'chart-y' }, this.maxLabel, this.minLabel),
      this.svg,
    );
    this.element = h(
      'figure',
      {
        class: 'chart range-chart',
        'data-testid': 'range-chart',
        'data-field': field,
        'data-points': '0',
      },
      h('figcaption', {}, h('span', { class: 'chart-title', text: this.title }), this.latest),
      this.plot,
      h('div', { class: 'chart-x' }, this.fromLabel, this.countLabel, this.toLabel),
    );
    this.dragSelect();
  }

  /** Drag across the plot to choose a time span to zoom into. */
  dragSelect() {
    let startX = null;
    const toX = (event) => {
      const box = this.svg.getBoundingClientRect();
      return Math.min(1, Math.max(0, (event.clientX - box.left) / (box.width || 1)));
    };
    this.svg.addEventListener('pointerdown', (event) => {
      if (event.button !== 0) return;
      startX = toX(event);
      this.svg.setPointerCapture(event.pointerId);
      event.preventDefault();
    });
    this.svg.addEventListener('pointermove', (event) => {
      if (startX === null) return;
      const x = toX(event);
      this.selection.setAttribute('x', String(Math.min(startX, x) * W));
      this.selection.setAttribute('width', String(Math.abs(x - startX) * W));
    });
    const end = (event) => {
      if (startX === null) return;
      const x = toX(event);
      const [a, b] = [Math.min(startX, x), Math.max(startX, x)];
      startX = null;
      this.selection.setAttribute('width', '0');
      if (b - a < 0.01 || !this.window) return; // a click, not a drag
      const { from, to } = this.window;
      this.onZoom(Math.round(from + a * (to - from)), Math.round(from + b * (to - from)));
    };
    this.svg.addEventListener('pointerup', end);
    this.svg.addEventListener('pointercancel', () => {
      startX = null;
      this.selection.setAttribute('width', '0');
    });
  }

  /** Draw `points` ([{ts, v}], oldest first) over the window [from, to). */
  draw(points, from, to) {
    this.window = { from, to };
    const n = points.length;
    this.element.dataset.points = String(n);
    this.element.dataset.from = String(from);
    this.element.dataset.to = String(to);
    const span = Math.max(1, to - from);
    this.fromLabel.textContent = timeLabel(from, span);
    this.toLabel.textContent = timeLabel(to, span);
    this.countLabel.textContent = `${n.toLocaleString('en')} reading${n === 1 ? '' : 's'}`;
    if (!n) {
      this.line.setAttribute('points', '');
      this.band.setAttribute('points', '');
      this.dot.setAttribute('visibility', 'hidden');
      this.latest.textContent = 'no data in this range';
      this.maxLabel.textContent = '';
      this.minLabel.textContent = '';
      this.plot.setAttribute('aria-label', `${this.title}: no readings in this range`);
      return;
    }
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of points) {
      if (p.v < lo) lo = p.v;
      if (p.v > hi) hi = p.v;
    }
    const [minValue, maxValue] = [lo, hi];
    if (this.info.steps) {
      lo = 0;
      hi = 1;
    } else {
      const minRange = 10 * 10 ** -fieldInfo(this.field).digits;
      if (hi - lo < minRange) {
        const mid = (hi + lo) / 2;
        lo = mid - minRange / 2;
        hi = mid + minRange / 2;
      }
    }
    const x = (ts) => ((ts - from) / span) * W;
    const y = (v) => H - 4 - ((v - lo) / (hi - lo)) * (H - 8);
    // Min and max per column: a week of readings costs no more to draw than an hour.
    const buckets = new Map();
    for (const p of points) {
      const col = Math.min(COLUMNS - 1, Math.max(0, Math.floor(((p.ts - from) / span) * COLUMNS)));
      const b = buckets.get(col);
      if (!b) buckets.set(col, { lo: p.v, hi: p.v, last: p.v, ts: p.ts });
      else {
        b.lo = Math.min(b.lo, p.v);
        b.hi = Math.max(b.hi, p.v);
        b.last = p.v;
        b.ts = p.ts;
      }
    }
    const cols = [...buckets.entries()].sort((a, b) => a[0] - b[0]);
    const line = [];
    let previous = null;
    for (const [col, b] of cols) {
      const cx = n <= COLUMNS ? x(b.ts) : ((col + 0.5) / COLUMNS) * W;
      if (this.info.steps && previous !== null) line.push(`${cx.toFixed(1)},${y(previous).toFixed(1)}`);
      line.push(`${cx.toFixed(1)},${y(b.last).toFixed(1)}`);
      previous = b.last;
    }
    if (cols.length === 1) line.push(`${W},${y(cols[0][1].last).toFixed(1)}`);
    this.line.setAttribute('points', line.join(' '));
    if (!this.info.steps && n > COLUMNS) {
      const top = cols.map(([col, b]) => `${(((col + 0.5) / COLUMNS) * W).toFixed(1)},${y(b.hi).toFixed(1)}`);
      const bottom = cols
        .map(([col, b]) => `${(((col + 0.5) / COLUMNS) * W).toFixed(1)},${y(b.lo).toFixed(1)}`)
        .reverse();
      this.band.setAttribute('points', top.concat(bottom).join(' '));
    } else {
      this.band.setAttribute('points', '');
    }
    const last = points[n - 1].v;
    const dotX = x(points[n - 1].ts).toFixed(1);
    const dotY = y(last).toFixed(1);
    for (const [k, v] of [['x1', dotX], ['x2', dotX], ['y1', dotY], ['y2', dotY]]) {
      this.dot.setAttribute(k, v);
    }
    this.dot.setAttribute('visibility', 'visible');
    const show = (v) => (this.info.steps ? (v ? 'On' : 'Off') : formatValue(this.field, v));
    this.latest.textContent = show(last);
    this.maxLabel.textContent = this.info.steps ? 'On' : formatNumber(this.field, hi);
    this.minLabel.textContent = this.info.steps ? 'Off' : formatNumber(this.field, lo);
    this.plot.setAttribute(
      'aria-label',
      `${this.title}: ${n} readings from ${timeLabel(from, span)} to ${timeLabel(to, span)}, ` +
        `between ${show(minValue)} and ${show(maxValue)}, latest ${show(last)}`,
    );
  }
}
