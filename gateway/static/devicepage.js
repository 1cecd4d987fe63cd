// The device page (#device=ID): one device with a chart over a chosen time
// range from the stored history (last hour, day or week; drag to zoom), a CSV
// download of that range, its labels (editable by an operator), its counters,
// and, for an offline device, Delete (operator only). Live readings extend the
// chart while it shows the latest range, not zoomed.

import { ApiError, deleteDevice, getDevice, loadCsv, loadRange, putLabels } from './api.js';
import { h, uid } from './dom.js';
import { clockTime, isoTime, relativeTime } from './format.js';
import { RangeChart, seriesInfo } from './rangechart.js';
import { channelName, displayName, hasErrors } from './store.js';
import { offlineReason } from './words.js';

export const RANGES = Object.freeze({
  hour: { label: 'Last hour', ms: 3_600_000 },
  day: { label: 'Last day', ms: 86_400_000 },
  week: { label: 'Last week', ms: 7 * 86_400_000 },
});
const COUNTERS = [
  ['telemetry', 'Readings'],
  ['out_of_range', 'Out of range'],
  ['commands', 'Commands'],
  ['nacks', 'NACKs'],
];
const MIN_ZOOM_MS = 2_000;
const COUNTER_REFRESH_MS = 5_000;

/**
 * A device entry from HTTP, without its `last` reading: the store counts a
 * `last` as received on the socket, and the replay after a reconnect starts
 * from the newest offset received, so a reading fetched over HTTP must not
 * move that point past readings the socket has yet to bring.
 */
function withoutLast(entry) {
  const { last: _last, ...rest } = entry;
  return rest;
}

function field(labelText, input) {
  const id = uid('label');
  input.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, labelText), input);
}

export class DevicePage {
  /**
   * @param {import('./store.js').Store} store
   * @param {HTMLElement} element the page's (empty) section in index.html
   * @param {object} env token(), role(), log(kind, text), removed(id)
   */
  constructor(store, element, env) {
    this.store = store;
    this.element = element;
    this.env = env;
    this.id = null;
    this.range = 'hour';
    this.window = null; // {from, to} shown; zoomed when not the latest range
    this.zoomed = false;
    this.rows = [];
    this.charts = new Map();
    this.loadSeq = 0;
    this.frame = 0;
    this.timer = 0;
  }

  get isOpen() {
    return this.id !== null;
  }

  /** Show device `id` (the list is hidden by the app). */
  open(id) {
    this.close();
    this.id = id;
    this.range = 'hour';
    this.zoomed = false;
    this.element.hidden = false;
    this.build();
    this.render();
    this.refreshEntry();
    this.timer = setInterval(() => this.refreshEntry(), COUNTER_REFRESH_MS);
    this.load();
    this.heading.focus();
  }

  close() {
    clearInterval(this.timer);
    this.timer = 0;
    this.id = null;
    this.loadSeq += 1; // a load under way draws nothing
    this.element.hidden = true;
    this.element.replaceChildren();
    this.charts.clear();
  }

  build() {
    const id = this.id;
    const operator = this.env.role() === 'operator';
    this.heading = h('h2', { id: 'device-page-title', tabindex: '-1', 'data-testid': 'dp-name' });
    this.idLine = h('p', { class: 'device-id', 'data-testid': 'dp-id' });
    this.badge = h('span', { class: 'badge', 'data-testid': 'dp-online' });
    this.meta = h('p', { class: 'meta', 'data-testid': 'dp-meta' });
    this.offline = h('p', { class: 'offline-info', 'data-testid': 'dp-offline', hidden: true });
    this.missing = h('p', { class: 'note', 'data-testid': 'dp-missing', hidden: true });
    this.counters = h('dl', { class: 'info counters', 'data-testid': 'dp-counters' });
    this.labelsBox = h('div', { 'data-testid': 'dp-labels' });
    this.labelStatus = h('output', { class: 'cmd-status', 'data-testid': 'labels-status' });

    this.rangeButtons = new Map();
    for (const [key, { label }] of Object.entries(RANGES)) {
      this.rangeButtons.set(
        key,
        h(
          'button',
          {
            type: 'button',
            class: 'quiet small',
            'aria-pressed': 'false',
            'data-testid': `range-${key}`,
            onclick: () => this.choose(key),
          },
          label,
        ),
      );
    }
    this.zoomInButton = h(
      'button',
      { type: 'button', class: 'quiet small', 'data-testid': 'zoom-in', onclick: () => this.zoomBy(0.5) },
      'Zoom in',
    );
    this.zoomOutButton = h(
      'button',
      { type: 'button', class: 'quiet small', 'data-testid': 'zoom-out', onclick: () => this.zoomBy(2) },
      'Zoom out',
    );
    this.csvButton = h(
      'button',
      { type: 'button', class: 'small', 'data-testid': 'csv-download', onclick: () => this.downloadCsv() },
      'Download CSV',
    );
    this.chartState = h('p', { class: 'note', 'data-testid': 'range-state', 'aria-live': 'polite' });
    this.chartsEl = h('div', { class: 'charts range-charts', 'data-testid': 'range-charts' });
    this.csvStatus = h('output', { class: 'cmd-status', 'data-testid': 'csv-status' });

    let danger = null;
    if (operator) {
      this.deleteButton = h(
        'button',
        { type: 'button', class: 'warn', 'data-testid': 'delete-device', onclick: () => this.remove() },
        'Delete device',
      );
      this.deleteNote = h('p', { class: 'note', 'data-testid': 'delete-note' });
      this.deleteStatus = h('output', { class: 'cmd-status', 'data-testid': 'delete-status' });
      danger = h(
        'section',
        { class: 'panel danger', 'aria-labelledby': 'dp-delete-title' },
        h('h3', { id: 'dp-delete-title' }, 'Delete or forget'),
        this.deleteNote,
        this.deleteButton,
        this.deleteStatus,
      );
    }

    this.element.replaceChildren(
      h('p', {}, h('a', { href: '#', 'data-testid': 'back-to-list' }, '← All devices')),
      h(
        'header',
        { class: 'dp-head' },
        h('div', { class: 'card-title' }, this.heading, this.idLine),
        this.badge,
      ),
      this.meta,
      this.offline,
      this.missing,
      h(
        'section',
        { class: 'panel', 'aria-labelledby': 'dp-chart-title' },
        h('h3', { id: 'dp-chart-title' }, 'History'),
        h(
          'div',
          { class: 'range-toolbar', role: 'toolbar', 'aria-label': 'Time range' },
          [...this.rangeButtons.values()],
          this.zoomInButton,
          this.zoomOutButton,
          this.csvButton,
        ),
        this.chartState,
        this.csvStatus,
        this.chartsEl,
        h('p', { class: 'note' }, 'Drag across a chart to zoom into that span.'),
      ),
      h(
        'div',
        { class: 'dp-grid' },
        h(
          'section',
          { class: 'panel', 'aria-labelledby': 'dp-labels-title' },
          h('h3', { id: 'dp-labels-title' }, 'Labels'),
          this.labelsBox,
          this.labelStatus,
        ),
        h(
          'section',
          { class: 'panel', 'aria-labelledby': 'dp-counters-title' },
          h('h3', { id: 'dp-counters-title' }, 'Counters since the gateway started'),
          this.counters,
        ),
        danger,
      ),
    );
    this.labelsBuiltFor = null;
  }

  /** The device's entry from the gateway: current counters, labels, offline reason. */
  async refreshEntry() {
    const id = this.id;
    try {
      const entry = await getDevice(id, this.env.token());
      if (id !== this.id) return;
      this.missing.hidden = true;
      this.store.applyDevices([withoutLast(entry)]);
      this.env.changed(id);
      this.render();
    } catch (error) {
      if (id !== this.id) return;
      if (error instanceof ApiError && error.status === 404) {
        this.missing.hidden = false;
        this.missing.textContent = `The gateway does not know a device "${id}" (deleted or forgotten?).`;
        clearInterval(this.timer);
      }
    }
  }

  /** The store changed for this device: redraw what depends on it. */
  deviceChanged(id, msg) {
    if (id !== this.id) return;
    if (msg && msg.op === 'telemetry' && !this.zoomed && this.window) {
      this.rows.push(msg);
      this.scheduleCharts();
    }
    this.render();
  }

  render() {
    const d = this.store.devices.get(this.id);
    const name = d ? displayName(d) : this.id;
    this.heading.textContent = name;
    this.idLine.textContent = name === this.id ? '' : this.id;
    document.title = `${name} · IoT gateway dashboard`;
    if (!d) {
      this.badge.textContent = '';
      return;
    }
    this.badge.textContent = d.online ? 'Online' : 'Offline';
    this.badge.dataset.online = String(d.online);
    const bits = [d.protocol, d.transport ?? 'link unknown'];
    if (d.labels.location) bits.unshift(d.labels.location);
    bits.push(`last seen ${relativeTime(d.lastSeen)}`);
    this.meta.textContent = bits.join(' · ');
    this.offline.hidden = d.online;
    if (!d.online) {
      const since = d.offlineSince ?? d.lastSeen;
      this.offline.textContent =
        `Offline since ${since ? `${new Date(since).toLocaleString()} (${relativeTime(since)})` : 'unknown'}: ` +
        offlineReason(d.offlineReason);
    }
    this.renderCounters(d);
    this.renderLabels(d);
    if (this.deleteButton) {
      this.deleteButton.disabled = d.online;
      this.deleteNote.textContent = d.online
        ? 'Only an offline device can be deleted. This one is online.'
        : 'Removes the device, its stored history, its labels and its queued commands. ' +
          'If it connects again, it comes back as a new device.';
    }
    this.element.dataset.errors = String(hasErrors(d));
  }

  renderCounters(d) {
    if (!d.counters) {
      this.counters.replaceChildren(
        h('p', { class: 'note' }, 'This gateway does not report per-device counters.'),
      );
      return;
    }
    this.counters.replaceChildren(
      ...COUNTERS.map(([key, label]) =>
        h(
          'div',
          {},
          h('dt', {}, label),
          h('dd', { 'data-testid': `counter-${key}` }, (d.counters[key] ?? 0).toLocaleString('en')),
        ),
      ),
    );
  }

  channelCount(d) {
    const data = d.last?.data;
    if (Array.isArray(data?.channels)) return data.channels.length;
    if (Array.isArray(d.labels.channels)) return d.labels.channels.length;
    return d.protocol === 'relay-4' ? 4 : 0;
  }

  renderLabels(d) {
    const key = JSON.stringify([d.labels, this.env.role(), this.channelCount(d)]);
    if (key === this.labelsBuiltFor) return;
    // Do not rebuild under the operator's hands: a labels message would wipe half-typed text.
    if (this.labelsBox.contains(document.activeElement) && this.labelsBuiltFor !== null) return;
    this.labelsBuiltFor = key;
    const channels = this.channelCount(d);
    if (this.env.role() !== 'operator') {
      const rows = [
        ['Name', d.labels.name ?? '–'],
        ['Location', d.labels.location ?? '–'],
      ];
      for (let ch = 0; ch < channels; ch += 1) rows.push([`Channel ${ch}`, channelName(d, ch)]);
      this.labelsBox.replaceChildren(
        h(
          'dl',
          { class: 'info' },
          rows.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))),
        ),
      );
      return;
    }
    const name = h('input', { type: 'text', maxlength: 64, 'data-testid': 'label-name', value: d.labels.name ?? '' });
    const location = h('input', {
      type: 'text',
      maxlength: 64,
      'data-testid': 'label-location',
      value: d.labels.location ?? '',
    });
    const channelInputs = Array.from({ length: channels }, (_, ch) =>
      h('input', {
        type: 'text',
        maxlength: 32,
        'data-testid': 'label-channel',
        'data-channel': ch,
        value: d.labels.channels?.[ch] ?? '',
        placeholder: `Ch ${ch}`,
      }),
    );
    const form = h(
      'form',
      {
        class: 'labels-form',
        'data-testid': 'labels-form',
        onsubmit: (event) => {
          event.preventDefault();
          const text = (input) => input.value.trim() || null;
          const labels = { name: text(name), location: text(location) };
          if (channels) {
            const values = channelInputs.map((input) => input.value.trim());
            labels.channels = values.some(Boolean) ? values : null;
          }
          this.saveLabels(labels);
        },
      },
      field('Display name', name),
      field('Location', location),
      channelInputs.map((input, ch) => field(`Channel ${ch} label`, input)),
      h('div', {}, h('button', { type: 'submit', 'data-testid': 'save-labels' }, 'Save labels')),
    );
    this.labelsBox.replaceChildren(form);
  }

  async saveLabels(labels) {
    const id = this.id;
    this.labelStatus.dataset.tone = 'pending';
    this.labelStatus.textContent = 'Saving…';
    try {
      const entry = await putLabels(id, this.env.token(), labels);
      if (id !== this.id) return;
      if (entry && entry.device === id) this.store.applyDevices([withoutLast(entry)]);
      else this.store.applyLabels({ device: id, labels });
      this.labelStatus.dataset.tone = 'ok';
      this.labelStatus.textContent = 'Labels saved.';
      this.labelsBuiltFor = null;
      (document.activeElement instanceof HTMLElement) && document.activeElement.blur();
      this.env.changed(id);
      this.render();
    } catch (error) {
      this.labelStatus.dataset.tone = 'bad';
      this.labelStatus.textContent = `Labels not saved: ${error.message}`;
    }
  }

  async remove() {
    const id = this.id;
    const d = this.store.devices.get(id);
    const name = d ? displayName(d) : id;
    const question =
      `Delete ${name}${name === id ? '' : ` (${id})`}? Its stored history, labels and ` +
      'queued commands are removed. This cannot be undone.';
    if (!window.confirm(question)) return;
    this.deleteStatus.dataset.tone = 'pending';
    this.deleteStatus.textContent = 'Deleting…';
    try {
      await deleteDevice(id, this.env.token());
      this.env.removed(id, 'deleted');
    } catch (error) {
      if (id !== this.id) return;
      if (error instanceof ApiError && error.status === 404) {
        this.env.removed(id, 'deleted'); // already gone: the page forgets it too
        return;
      }
      this.deleteStatus.dataset.tone = 'bad';
      this.deleteStatus.textContent =
        error instanceof ApiError && error.status === 409
          ? 'Not deleted: the device is online (only offline devices can be deleted).'
          : `Not deleted: ${error.message}`;
    }
  }

  // ---- the chart ----

  choose(range) {
    this.range = range;
    this.zoomed = false;
    this.load();
  }

  /** Zoom around the middle of what is shown: factor 0.5 halves the span, 2 doubles it. */
  zoomBy(factor) {
    if (!this.window) return;
    const { from, to } = this.window;
    const now = Date.now();
    // Zooming into the latest span keeps its right end at now: the newest readings stay in view.
    const latest = to >= now - 1000;
    const mid = latest ? to - ((to - from) * factor) / 2 : (from + to) / 2;
    const span = Math.max(MIN_ZOOM_MS, (to - from) * factor);
    if (factor > 1 && span >= RANGES[this.range].ms) {
      this.zoomed = false; // back out to the whole range
      this.load();
      return;
    }
    let b = Math.min(now, mid + span / 2);
    const a = b - span;
    b = Math.round(b);
    this.zoomTo(Math.round(a), b);
  }

  zoomTo(from, to) {
    if (to - from < MIN_ZOOM_MS) {
      const mid = (from + to) / 2;
      from = Math.round(mid - MIN_ZOOM_MS / 2);
      to = Math.round(mid + MIN_ZOOM_MS / 2);
    }
    this.zoomed = true;
    this.load({ from, to });
  }

  async load(window = null) {
    const id = this.id;
    const seq = (this.loadSeq += 1);
    let from;
    let to;
    if (window) ({ from, to } = window);
    else {
      to = Date.now() + 1; // to is exclusive: include a reading of this very millisecond
      from = to - RANGES[this.range].ms;
    }
    this.window = { from, to };
    for (const [key, button] of this.rangeButtons) {
      button.setAttribute('aria-pressed', String(key === this.range && !this.zoomed));
    }
    this.zoomOutButton.disabled = !this.zoomed;
    this.element.dataset.zoomed = String(this.zoomed);
    this.chartState.dataset.state = 'loading';
    this.chartState.textContent = 'Loading stored readings…';
    try {
      const { rows, truncated } = await loadRange(id, this.env.token(), { from, to });
      if (seq !== this.loadSeq) return; // another range was chosen meanwhile
      this.rows = rows;
      this.chartState.dataset.state = 'loaded';
      const span = `${new Date(from).toLocaleString()} to ${new Date(to).toLocaleString()}`;
      const count = `${rows.length.toLocaleString('en')} reading${rows.length === 1 ? '' : 's'}`;
      this.chartState.textContent = truncated
        ? `The first ${count} from ${span}: zoom in to see the rest.`
        : `${count} from ${span}.`;
      this.drawCharts();
    } catch (error) {
      if (seq !== this.loadSeq) return;
      this.chartState.dataset.state = 'error';
      this.chartState.textContent = `Stored readings unavailable: ${error.message}`;
    }
  }

  scheduleCharts() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      if (!this.isOpen || this.zoomed) return;
      // The latest range slides along with the clock.
      const to = Date.now() + 1;
      this.window = { from: to - RANGES[this.range].ms, to };
      this.rows = this.rows.filter((row) => row.ts >= this.window.from);
      this.drawCharts();
    });
  }

  drawCharts() {
    const d = this.store.devices.get(this.id);
    const series = new Map();
    const seen = new Set();
    for (const row of this.rows) {
      if (seen.has(row.offset)) continue; // a live reading the history also brought
      seen.add(row.offset);
      const data = row.data;
      if (!data || typeof data !== 'object') continue;
      const add = (key, v) => {
        if (!series.has(key)) series.set(key, []);
        series.get(key).push({ ts: row.ts, v, offset: row.offset });
      };
      for (const [key, v] of Object.entries(data)) {
        if (typeof v === 'number' && Number.isFinite(v)) add(key, v);
      }
      if (Array.isArray(data.channels)) {
        data.channels.forEach((on, ch) => typeof on === 'boolean' && add(`channels.${ch}`, on ? 1 : 0));
      }
    }
    for (const list of series.values()) list.sort((a, b) => a.ts - b.ts || a.offset - b.offset);
    const { from, to } = this.window;
    const label = (ch) => (d ? channelName(d, ch) : `Ch ${ch}`);
    // A field with no reading in this span keeps its chart, empty: zooming into a
    // quiet span must not make the charts jump around.
    for (const [key, chart] of this.charts) if (!series.has(key)) chart.draw([], from, to);
    for (const [key, points] of series) {
      let chart = this.charts.get(key);
      if (!chart) {
        chart = new RangeChart(key, seriesInfo(key, label), (a, b) => this.zoomTo(a, b));
        this.charts.set(key, chart);
        this.chartsEl.append(chart.element);
      }
      chart.draw(points, from, to);
    }
    const note = this.chartsEl.querySelector('[data-testid="no-range-data"]');
    if (!this.charts.size && !note) {
      this.chartsEl.append(h('p', { class: 'note', 'data-testid': 'no-range-data' }, 'No readings in this range.'));
    } else if (this.charts.size && note) {
      note.remove();
    }
  }

  async downloadCsv() {
    const id = this.id;
    const { from, to } = this.window ?? {};
    if (from === undefined) return;
    this.csvStatus.dataset.tone = 'pending';
    this.csvStatus.textContent = 'Preparing CSV…';
    try {
      const text = await loadCsv(id, this.env.token(), { from, to });
      const blob = new Blob([text], { type: 'text/csv' });
      const url = URL.createObjectURL(blob);
      const stamp = (ms) => isoTime(ms).replace(/[:]/g, '').replace(/\.\d+Z$/, 'Z');
      const a = h('a', { href: url, download: `${id}_${stamp(from)}_${stamp(to)}.csv`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      const lines = text.split('\n').filter(Boolean).length - 1;
      this.csvStatus.dataset.tone = 'ok';
      this.csvStatus.textContent = `CSV with ${lines.toLocaleString('en')} readings downloaded (${clockTime(Date.now())}).`;
    } catch (error) {
      this.csvStatus.dataset.tone = 'bad';
      this.csvStatus.textContent = `CSV not downloaded: ${error.message}`;
    }
  }
}
