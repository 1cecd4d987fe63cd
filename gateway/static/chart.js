// A small line chart in SVG, one per numeric field. No library: the page must
// work on a plant network with no internet, and a polyline is all it needs.
//
// The SVG stretches to its box (preserveAspectRatio="none") with strokes kept
// one pixel wide (vector-effect), so it fits any width from a phone to a wall
// screen without measuring; the text around it is ordinary HTML, which keeps
// it sharp and readable by screen readers.

import { h, s } from './dom.js';
import { clockTime, fieldInfo, formatNumber, formatValue } from './format.js';

const W = 300; // viewBox units; the drawing is scaled to the element's box
const H = 100;

export class LineChart {
  constructor(field) {
    this.field = field;
    const info = fieldInfo(field);
    const title = info.unit ? `${info.label} (${info.unit})` : info.label;
    this.title = title;
    const thin = { 'vector-effect': 'non-scaling-stroke' };
    this.line = s('polyline', { class: 'chart-line', points: '', ...thin });
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
      },
      grid,
      this.line,
    );
    this.maxLabel = h('span', { class: 'chart-max' });
    this.minLabel = h('span', { class: 'chart-min' });
    this.latest = h('span', { class: 'chart-latest', 'data-testid': 'chart-latest' });
    this.fromLabel = h('span');
    this.countLabel = h('span', { class: 'chart-count' });
    this.toLabel = h('span');
    this.plot = h(
      'div',
      { class: 'chart-plot', role: 'img' },
      h('div', { class: 'chart-y' }, this.maxLabel, this.minLabel),
      this.svg,
    );
    this.element = h(
      'figure',
      { class: 'chart', 'data-testid': 'chart', 'data-field': field, 'data-points': '0' },
      h('figcaption', {}, h('span', { class: 'chart-title', text: title }), this.latest),
      this.plot,
      h('div', { class: 'chart-x' }, this.fromLabel, this.countLabel, this.toLabel),
    );
  }

  /** Redraw from `points` ([{offset, ts, v}], sorted by offset). */
  draw(points) {
    const el = this.element;
    const n = points.length;
    el.dataset.points = String(n);
    el.dataset.firstOffset = n ? String(points[0].offset) : '';
    el.dataset.lastOffset = n ? String(points[n - 1].offset) : '';
    if (!n) {
      this.line.setAttribute('points', '');
      this.latest.textContent = 'no data yet';
      this.plot.setAttribute('aria-label', `${this.title}: no data yet`);
      const labels = [this.maxLabel, this.minLabel, this.fromLabel, this.countLabel, this.toLabel];
      for (const label of labels) label.textContent = '';
      return;
    }
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of points) {
      if (p.v < lo) lo = p.v;
      if (p.v > hi) hi = p.v;
    }
    // Do not blow sensor noise up to full height: show at least ten steps of
    // the field's display precision.
    const [minValue, maxValue] = [lo, hi];
    const minRange = 10 * 10 ** -fieldInfo(this.field).digits;
    if (hi - lo < minRange) {
      const mid = (hi + lo) / 2;
      lo = mid - minRange / 2;
      hi = mid + minRange / 2;
    }
    const t0 = points[0].ts;
    const t1 = points[n - 1].ts;
    const dt = t1 - t0 || 1;
    const coords = points.map((p) => {
      const x = n === 1 ? 0 : ((p.ts - t0) / dt) * W;
      const y = H - ((p.v - lo) / (hi - lo)) * H;
      return `${x.toFixed(1)},${y.toFixed(2)}`;
    });
    if (n === 1) coords.push(`${W},${coords[0].split(',')[1]}`); // one reading: a flat line
    this.line.setAttribute('points', coords.join(' '));
    const last = points[n - 1].v;
    this.latest.textContent = formatValue(this.field, last);
    this.maxLabel.textContent = formatNumber(this.field, hi);
    this.minLabel.textContent = formatNumber(this.field, lo);
    this.fromLabel.textContent = clockTime(t0);
    this.toLabel.textContent = clockTime(t1);
    this.countLabel.textContent = `${n} reading${n === 1 ? '' : 's'}`;
    const range = `${formatNumber(this.field, minValue)} and ${formatNumber(this.field, maxValue)}`;
    this.plot.setAttribute(
      'aria-label',
      `${this.title}: ${n} readings from ${clockTime(t0)} to ${clockTime(t1)}, ` +
        `between ${range}, latest ${formatValue(this.field, last)}`,
    );
  }
}
