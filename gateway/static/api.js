// The gateway's HTTP API, as the page uses it (docs/api.md §4). URLs are
// relative to the page, so the dashboard also works behind a reverse proxy
// that serves the gateway under a path prefix.

export const PAGE_LIMIT = 1000; // the most GET .../telemetry returns at once

function headers(token) {
  return { Authorization: `Bearer ${token}`, Accept: 'application/json' };
}

/** The ws:// or wss:// URL of the dashboard socket for this page (no token in it). */
export function socketUrl() {
  const url = new URL('ws', window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

/** The token as URL-safe base64 of its UTF-8 bytes, without padding. */
function base64url(text) {
  let binary = '';
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/**
 * The WebSocket subprotocols that carry the token (docs/api.md §1). A browser
 * WebSocket cannot send an Authorization header, and a token in the URL would
 * land in proxy logs: the Sec-WebSocket-Protocol header is the one header it
 * can set. The gateway picks and echoes "iot-gateway", never the token's.
 */
export function socketProtocols(token) {
  return ['iot-gateway', `token.${base64url(token)}`];
}

/** Is the token good? 'unauthorized' (HTTP 401), 'ok', or 'unreachable'. */
export async function probeToken(token) {
  try {
    // One device at most: the answer is only read for its status.
    const response = await fetch('api/devices?limit=1', {
      headers: headers(token),
      cache: 'no-store',
    });
    return response.status === 401 ? 'unauthorized' : 'ok';
  } catch {
    return 'unreachable';
  }
}

async function telemetryPage(device, since, token) {
  const id = encodeURIComponent(device);
  const path = `api/devices/${id}/telemetry?since=${since}&limit=${PAGE_LIMIT}`;
  const response = await fetch(path, { headers: headers(token), cache: 'no-store' });
  if (!response.ok) throw new Error(`history: HTTP ${response.status}`);
  const body = await response.json();
  return Array.isArray(body.telemetry) ? body.telemetry : [];
}

/**
 * The last `wanted` stored readings of `device` with offsets up to `newest`, oldest
 * first, to seed its charts.
 *
 * The API pages forward from an offset, and offsets are shared by every device,
 * so there is no "last N readings of this device" query. First step back in
 * windows of offsets, sized from the number of devices and then from the
 * density of this device's readings seen so far: one request in the common
 * case. Offsets jump by about a million across a gateway restart, which no
 * density guess crosses, so if a window comes back empty, walk forward from
 * the start of the stored history instead (retention keeps that short).
 */
export async function loadHistory(device, token, options) {
  const { newest, deviceCount, wanted, maxRequests = 16 } = options;
  if (newest === null || newest === undefined) return [];
  let requests = 0;
  const page = (since) => {
    requests += 1;
    return telemetryPage(device, since, token);
  };
  let rows = []; // every stored reading with floor < offset <= newest, oldest first
  let floor = newest;
  let span = Math.ceil(wanted * Math.max(1, deviceCount) * 1.5);
  while (rows.length < wanted && floor > -1 && requests < maxRequests) {
    const since = Math.max(-1, floor - span);
    const batch = await page(since);
    const lastOffset = batch.length ? batch[batch.length - 1].offset : null;
    if (batch.length === PAGE_LIMIT && lastOffset < floor) {
      // More than a page in the window: the page stops short of the readings we
      // need. Narrow the window to what this density suggests and ask again.
      const density = PAGE_LIMIT / Math.max(1, lastOffset - since);
      span = Math.max(1, Math.ceil(((wanted - rows.length) / density) * 1.5));
      continue;
    }
    const inWindow = batch.filter((row) => row.offset <= floor);
    if (!inWindow.length) break; // a jump in offsets (or a long silence): walk instead
    rows = inWindow.concat(rows);
    const density = inWindow.length / Math.max(1, floor - since);
    floor = since;
    span = Math.max(1, Math.ceil(((wanted - rows.length) / density) * 1.5));
  }
  if (rows.length < wanted && floor > -1) {
    const room = wanted - rows.length;
    let older = [];
    let after = -1;
    while (requests < maxRequests) {
      const batch = await page(after);
      const below = batch.filter((row) => row.offset <= floor);
      older = older.concat(below).slice(-room);
      if (batch.length < PAGE_LIMIT || below.length < batch.length) {
        rows = older.concat(rows); // reached the floor: no hole between the two parts
        break;
      }
      after = batch[batch.length - 1].offset;
    }
  }
  return rows.slice(-wanted);
}

// ---- issue 13: device pages, labels, delete, serial ports -----------------------------------

/** An HTTP answer that is not 2xx, with the gateway's error code (docs/api.md §2). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};

/** Who to tell when an HTTP call gets 401: the token stopped working (a restarted gateway). */
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

async function call(path, token, { method = 'GET', body, accept = 'application/json' } = {}) {
  const init = { method, cache: 'no-store', headers: { ...headers(token), Accept: accept } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) onUnauthorized();
  if (!response.ok) {
    let code = null;
    let message = `HTTP ${response.status}`;
    try {
      const error = await response.json(); // errors are always JSON (docs/api.md §2)
      code = error.code ?? null;
      message = error.message ?? message;
    } catch {
      // not JSON: an older gateway or a proxy; the status says enough
    }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

const devicePath = (device) => `api/devices/${encodeURIComponent(device)}`;

/** GET /api/devices/{id}: the device entry (labels, counters, offline reason). */
export async function getDevice(device, token) {
  return (await call(devicePath(device), token)).json();
}

/** PUT /api/devices/{id}/labels (operator): the device entry as it now is. */
export async function putLabels(device, token, labels) {
  return (await call(`${devicePath(device)}/labels`, token, { method: 'PUT', body: labels })).json();
}

/** DELETE /api/devices/{id} (operator; offline devices only, else 409 conflict). */
export async function deleteDevice(device, token) {
  return (await call(devicePath(device), token, { method: 'DELETE' })).json();
}

/** GET /api/serial's ports, or null when the gateway has no such endpoint (an older one). */
export async function getSerialPorts(token) {
  try {
    const body = await (await call('api/serial', token)).json();
    return Array.isArray(body.ports) ? body.ports : [];
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

/**
 * One time range's stored telemetry of a device, oldest first:
 * GET .../telemetry?from=&to= a page at a time, each next page from the
 * answer's `next` (the `since` of the following page). Stops after `maxRows`
 * (a chart has a few hundred pixels; `truncated` says so).
 */
export async function loadRange(device, token, { from, to, maxRows = 20000 }) {
  let rows = [];
  let since = null;
  let truncated = false;
  for (;;) {
    const after = since === null ? '' : `&since=${since}`;
    const path = `${devicePath(device)}/telemetry?from=${from}&to=${to}&limit=${PAGE_LIMIT}${after}`;
    const body = await (await call(path, token)).json();
    const batch = Array.isArray(body.telemetry) ? body.telemetry : [];
    rows = rows.concat(batch);
    if (!Number.isInteger(body.next) || !batch.length) break;
    if (rows.length >= maxRows) {
      truncated = true;
      break;
    }
    since = body.next;
  }
  return { rows, truncated };
}

/** Split one CSV line into cells (RFC 4180 quoting). */
export function csvCells(line) {
  const cells = [];
  let cell = '';
  let quoted = false;
  for (let i = 0; i < line.length; i += 1) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') {
        cell += '"';
        i += 1;
      } else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      cells.push(cell);
      cell = '';
    } else cell += c;
  }
  cells.push(cell);
  return cells;
}

const csvQuote = (cell) => (/[",\r\n]/.test(cell) ? `"${cell.replace(/"/g, '""')}"` : cell);

/**
 * A time range as CSV (format=csv), every page of it (the `X-Next` header)
 * joined under one header row. A page's columns are the data fields it met,
 * so a later page with other columns is mapped onto the first page's, and a
 * column new in it is added at the end. Fetched with the token in a header,
 * then handed to the browser as a file.
 */
export async function loadCsv(device, token, { from, to, maxPages = 1000 }) {
  let header = null;
  const rows = [];
  let since = null;
  for (let pages = 0; pages < maxPages; pages += 1) {
    const after = since === null ? '' : `&since=${since}`;
    const path = `${devicePath(device)}/telemetry?from=${from}&to=${to}&limit=${PAGE_LIMIT}&format=csv${after}`;
    const response = await call(path, token, { accept: 'text/csv' });
    const lines = (await response.text()).split(/\r?\n/).filter((line) => line !== '');
    const columns = csvCells(lines[0] ?? 'offset,ts,seq');
    if (header === null) header = columns;
    for (const column of columns) if (!header.includes(column)) header.push(column);
    const where = columns.map((column) => header.indexOf(column));
    for (const line of lines.slice(1)) {
      const cells = csvCells(line);
      const row = [];
      cells.forEach((cell, i) => {
        row[where[i]] = cell;
      });
      rows.push(row);
    }
    const next = response.headers.get('X-Next');
    if (!next || !lines.length) break;
    since = next;
  }
  const width = header.length;
  const out = [header.map(csvQuote).join(',')];
  for (const row of rows) {
    out.push(Array.from({ length: width }, (_, i) => csvQuote(row[i] ?? '')).join(','));
  }
  return `${out.join('\r\n')}\r\n`;
}

/** GET /api/commands/{command_id}: a command's statuses, readable by any token for 24 h. */
export async function getCommand(commandId, token) {
  return (await call(`api/commands/${encodeURIComponent(commandId)}`, token)).json();
}
