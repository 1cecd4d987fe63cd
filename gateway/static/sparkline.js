// A sparkline: the recent trend of one value, drawn small inside a card. Inline
// SVG with one polyline, redrawn only when the card is on screen and its data
// changed, so a thousand devices updating each second cost little.

import { s } from './dom.js';

const W = 100; // viewBox units; the SVG stretches to its box
const H = 24;
export const SPARK_POINTS = 60; // the last minute or so at 1 Hz

export class Sparkline {
  /** `steps`: draw as steps (relay states), not as a line. */
  constructor(label, { steps = false } = {}) {
    this.steps = steps;
    this.lastKey = null;
    this.line = s('polyline', {
      class: 'spark-line',
      points: '',
      'vector-effect': 'non-scaling-stroke',
    });
    this.element = s(
      'svg',
      {
        class: steps ? 'spark spark-steps' : 'spark',
        viewBox: `0 0 ${W} ${H}`,
        preserveAspectRatio: 'none',
        'aria-hidden': 'true',
        focusable: 'false',
        'data-testid': 'sparkline',
        'data-label': label,
        'data-points': '0',
      },
      this.line,
    );
  }

  /** Draw the tail of `points` ([{offset, ts, v}], sorted). */
  draw(points) {
    const n = Math.min(points?.length ?? 0, SPARK_POINTS);
    const key = n ? `${n}:${points[points.length - 1].offset}:${points[points.length - n].offset}` : '';
    if (key === this.lastKey) return; // nothing new: skip the string building
    this.lastKey = key;
    this.element.dataset.points = String(n);
    if (n < 2) {
      this.line.setAttribute('points', '');
      return;
    }
    const tail = points.slice(points.length - n);
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of tail) {
      if (p.v < lo) lo = p.v;
      if (p.v > hi) hi = p.v;
    }
    if (this.steps) {
      lo = 0;
      hi = 1;
    }
    const span = hi - lo || 1;
    const pad = 2;
    const y = (v) => (H - pad - ((v - lo) / span) * (H - 2 * pad)).toFixed(1);
    const x = (i) => ((i / (n - 1)) * W).toFixed(1);
    const coords = [];
    for (let i = 0; i < n; i += 1) {
      if (this.steps && i > 0) coords.push(`${x(i)},${y(tail[i - 1].v)}`);
      coords.push(`${x(i)},${y(tail[i].v)}`);
    }
    this.line.setAttribute('points', coords.join(' '));
  }
}
