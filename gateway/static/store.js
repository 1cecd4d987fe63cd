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
  };
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
    if (!msg.online) d.session = null;
    return d;
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
      cmd.statuses.set(msg.device, msg);
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
      };
    }
    return { role: this.role, maxOffset: this.maxOffset, gapFrom: this.gapFrom, devices };
  }
}
