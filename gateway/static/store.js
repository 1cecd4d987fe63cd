// What the page knows: devices, their latest values, the telemetry offsets
// received, chart series, commands given and the event log. No DOM here.
//
// Offsets are gateway-wide and strictly increasing but not consecutive
// (docs/api.md §3), so the page never counts with them: it keeps the
// offsets it has seen, sorted, and drops a message whose offset it already
// has. That is what makes replays safe: after a reconnect or a "lagged"
// notice the page asks for everything after an offset it knows it has, and
// whatever arrives twice is ignored.

export const MAX_POINTS = 300; // per chart: the last few hundred readings
const MAX_OFFSETS = 5000; // per device, for de-duplication
const MAX_EVENTS = 200;
const MAX_COMMANDS = 500;
// A command status after which nothing more will come (docs/api.md §3).
export const FINAL_STATUSES = new Set([
  'acked',
  'nacked',
  'timeout',
  'expired',
  'rejected',
  'error',
]);

/**
 * Insert `item` into `list`, kept sorted by `key`, unless an item with the same
 * key is there. When the list is full, the oldest item goes, and an item older
 * than everything kept is taken as already seen. Returns true if inserted.
 */
export function insertSorted(list, item, key, limit) {
  const k = key(item);
  const n = list.length;
  if (n === 0 || key(list[n - 1]) < k) {
    list.push(item); // the common case: live data arrives in order
  } else {
    if (n >= limit && k < key(list[0])) return false;
    let lo = 0;
    let hi = n;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (key(list[mid]) < k) lo = mid + 1;
      else hi = mid;
    }
    if (lo < n && key(list[lo]) === k) return false;
    list.splice(lo, 0, item);
  }
  if (list.length > limit) list.splice(0, list.length - limit);
  return true;
}

const identity = (x) => x;
const byOffset = (p) => p.offset;

function newDevice(id, protocol) {
  return {
    id,
    protocol,
    online: false,
    transport: null,
    peer: null,
    session: null,
    connectedAt: null,
    lastSeen: null,
    last: null, // the newest telemetry message
    offsets: [], // offsets received over the WebSocket, sorted
    series: new Map(), // numeric field -> [{offset, ts, v}], sorted by offset
    history: 'none', // 'none' | 'loading' | 'loaded' | 'error' (chart seeding)
    historyError: null,
    // Issue 13's device entry fields; an older gateway sends none of them.
    labels: { name: null, location: null, channels: null },
    offlineSince: null,
    offlineReason: null,
    counters: null, // {telemetry, out_of_range, commands, nacks} since the gateway started
    nacks: 0, // nacked commands this page saw, beside the gateway's own count
    searchText: id.toLowerCase(), // id, name and location, for the search box
    sortKey: naturalKey(id),
  };
}

/**
 * Natural order: "sim-2" before "sim-10". The key pads every run of digits to
 * the same width, once per device, so sorting 10,000 devices compares plain
 * strings (a collator's compare is some ten times slower).
 */
export function naturalKey(id) {
  return id.toLowerCase().replace(/\d+/g, (run) => run.padStart(20, '0'));
}

export function naturalCompare(a, b) {
  const ka = naturalKey(a);
  const kb = naturalKey(b);
  if (ka !== kb) return ka < kb ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The labels a device entry or a labels message carries, made safe to read. */
export function cleanLabels(labels) {
  const text = (v) => (typeof v === 'string' && v.trim() ? v : null);
  const channels = Array.isArray(labels?.channels)
    ? labels.channels.map((c) => (typeof c === 'string' ? c : ''))
    : null;
  return { name: text(labels?.name), location: text(labels?.location), channels };
}

/** The name a device is shown by: its display name, or its id. */
export function displayName(d) {
  return d.labels.name ?? d.id;
}

/** A relay channel's label ("pump"), or "Ch 2" when it has none. */
export function channelName(d, ch) {
  const label = d.labels.channels?.[ch];
  return label ? label : `Ch ${ch}`;
}

/** Does the device have something wrong to show: a value out of range or a NACK? */
export function hasErrors(d) {
  const outOfRange = Array.isArray(d.last?.out_of_range) && d.last.out_of_range.length > 0;
  const nacks = (d.counters?.nacks ?? 0) > 0 || d.nacks > 0;
  return outOfRange || nacks;
}

export class Store {
  constructor() {
    this.devices = new Map();
    this.role = null;
    this.maxOffset = null; // highest offset received over the WebSocket
    // Set when telemetry was dropped (lagged): everything after this offset is
    // asked for again, and until that replay is known complete a reconnect must
    // also start from here, not from maxOffset (which is past the hole).
    this.gapFrom = null;
    this.commands = new Map();
    this.events = [];
  }

  device(id, protocol) {
    let d = this.devices.get(id);
    if (!d) {
      d = newDevice(id, protocol);
      this.devices.set(id, d);
    } else if (protocol && d.protocol !== protocol) {
      d.protocol = protocol; // the device came back speaking another protocol
      d.series.clear();
    }
    return d;
  }

  /** Where a (re)subscription should start: null for "live only". */
  resumeOffset() {
    return this.gapFrom ?? this.maxOffset;
  }

  /** A telemetry message from the WebSocket. Returns the device, or null for a duplicate. */
  applyTelemetry(msg) {
    if (typeof msg.device !== 'string' || !Number.isInteger(msg.offset)) return null;
    const d = this.device(msg.device, msg.protocol);
    if (!insertSorted(d.offsets, msg.offset, identity, MAX_OFFSETS)) return null;
    if (this.maxOffset === null || msg.offset > this.maxOffset) this.maxOffset = msg.offset;
    this.takeReading(d, msg);
    return d;
  }

  /** Telemetry from the HTTP history (chart seeding): values only, not "received". */
  applyHistory(id, messages) {
    const d = this.devices.get(id);
    if (!d) return;
    for (const msg of messages) this.takeReading(d, msg);
  }

  takeReading(d, msg) {
    if (!d.last || msg.offset > d.last.offset) d.last = msg;
    if (d.lastSeen === null || msg.ts > d.lastSeen) d.lastSeen = msg.ts;
    const data = msg.data;
    if (!data || typeof data !== 'object') return;
    for (const [field, v] of Object.entries(data)) {
      if (typeof v !== 'number' || !Number.isFinite(v)) continue;
      let series = d.series.get(field);
      if (!series) {
        series = [];
        d.series.set(field, series);
      }
      insertSorted(series, { offset: msg.offset, ts: msg.ts, v }, byOffset, MAX_POINTS);
    }
    // Relay states chart as steps of 0 and 1, one series per channel.
    if (Array.isArray(data.channels)) {
      data.channels.forEach((on, ch) => {
        if (typeof on !== 'boolean') return;
        const field = `channels.${ch}`;
        let series = d.series.get(field);
        if (!series) {
          series = [];
          d.series.set(field, series);
        }
        const point = { offset: msg.offset, ts: msg.ts, v: on ? 1 : 0 };
        insertSorted(series, point, byOffset, MAX_POINTS);
      });
    }
  }

  /** The reply to {"op":"devices"}: online state, transport, and each device's latest value. */
  applyDevices(list) {
    const changed = [];
    for (const entry of list ?? []) {
      const d = this.device(entry.device, entry.protocol);
      d.online = Boolean(entry.online);
      d.transport = entry.transport ?? d.transport;
      d.peer = entry.peer ?? null;
      d.session = entry.session ?? null;
      d.connectedAt = entry.connected_at ?? null;
      if ('labels' in entry) this.setLabels(d, entry.labels);
      d.offlineSince = d.online ? null : (entry.offline_since ?? d.offlineSince ?? null);
      d.offlineReason = d.online ? null : (entry.offline_reason ?? d.offlineReason ?? null);
      if (entry.counters && typeof entry.counters === 'object') d.counters = entry.counters;
      if (entry.last_seen && (d.lastSeen === null || entry.last_seen > d.lastSeen)) {
        d.lastSeen = entry.last_seen;
      }
      // `last` is a telemetry message like any other: it was sent on this socket
      // after the subscription began, so it counts as received (docs/api.md §3).
      if (entry.last) this.applyTelemetry(entry.last);
      changed.push(d);
    }
    return changed;
  }

  applyPresence(msg) {
    const d = this.device(msg.device, msg.protocol);
    d.online = Boolean(msg.online);
    if (msg.ts && (d.lastSeen === null || msg.ts > d.lastSeen)) d.lastSeen = msg.ts;
    if (!msg.online) {
      d.session = null;
      d.offlineSince = msg.ts ?? Date.now();
      d.offlineReason = msg.reason ?? null;
    } else {
      d.offlineSince = null;
      d.offlineReason = null;
    }
    return d;
  }

  setLabels(d, labels) {
    d.labels = cleanLabels(labels);
    const { name, location } = d.labels;
    // The search matches id, name and location; lower-cased once, not per keystroke.
    d.searchText = [d.id, name ?? '', location ?? ''].join('\n').toLowerCase();
  }

  /** {"op":"labels"}: a device's labels changed. Returns the device, or null if unknown. */
  applyLabels(msg) {
    const d = this.devices.get(msg.device);
    if (!d) return null;
    this.setLabels(d, msg.labels);
    return d;
  }

  /** {"op":"removed"}: the device was deleted or forgotten. Returns true if it was known. */
  remove(id) {
    return this.devices.delete(id);
  }

  /** Counts for the summary bar. */
  summary() {
    let online = 0;
    let errors = 0;
    for (const d of this.devices.values()) {
      if (d.online) online += 1;
      if (hasErrors(d)) errors += 1;
    }
    return { total: this.devices.size, online, offline: this.devices.size - online, errors };
  }

  /** A lagged notice: returns the offset to replay from. */
  noteLag(msg) {
    const from = Number.isInteger(msg.resume_from) ? msg.resume_from - 1 : (this.maxOffset ?? -1);
    this.gapFrom = this.gapFrom === null ? from : Math.min(this.gapFrom, from);
    return this.gapFrom;
  }

  /** The replay asked for after a lag or reconnect is complete: no hole is left. */
  synced() {
    this.gapFrom = null;
  }

  addCommand(cmd) {
    // Keep the last few hundred: a status for an older one has nowhere left to show anyway.
    if (this.commands.size >= MAX_COMMANDS) this.commands.delete(this.commands.keys().next().value);
    this.commands.set(cmd.id, { ...cmd, statuses: new Map(), error: null });
    return this.commands.get(cmd.id);
  }

  /** A command_status or an error about a command; returns the command or null. */
  applyCommandStatus(msg) {
    const cmd = this.commands.get(msg.id);
    if (!cmd) return null;
    if (msg.op === 'error') {
      cmd.error = msg.message || msg.code;
    } else {
      const before = cmd.statuses.get(msg.device)?.status;
      cmd.statuses.set(msg.device, msg);
      const d = this.devices.get(msg.device);
      if (d && msg.status === 'nacked' && before !== 'nacked') d.nacks += 1;
    }
    return cmd;
  }

  log(kind, text, ts = Date.now()) {
    const event = { kind, text, ts };
    this.events.unshift(event);
    if (this.events.length > MAX_EVENTS) this.events.length = MAX_EVENTS;
    return event;
  }

  protocols() {
    return [...new Set([...this.devices.values()].map((d) => d.protocol))].sort();
  }

  /** A JSON-able picture of the state, for the browser tests (window.__dashboard). */
  snapshot() {
    const devices = {};
    for (const [id, d] of this.devices) {
      devices[id] = {
        protocol: d.protocol,
        online: d.online,
        transport: d.transport,
        offsets: [...d.offsets],
        last: d.last ? d.last.offset : null,
        points: Object.fromEntries([...d.series].map(([f, list]) => [f, list.length])),
        history: d.history,
        labels: d.labels,
        offlineSince: d.offlineSince,
      };
    }
    return { role: this.role, maxOffset: this.maxOffset, gapFrom: this.gapFrom, devices };
  }
}
