// The gateway's HTTP API, as the page uses it (PROTOCOL section 5). URLs are
// relative to the page, so the dashboard also works behind a reverse proxy
// that serves the gateway under a path prefix.

export const PAGE_LIMIT = 1000; // the most GET .../telemetry returns at once

function headers(token) {
  return { Authorization: `Bearer ${token}`, Accept: 'application/json' };
}

/** The ws:// or wss:// URL of the dashboard socket for this page. */
export function socketUrl(token) {
  const url = new URL('ws', window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  // A browser WebSocket cannot send an Authorization header: ?token= is the only way.
  url.searchParams.set('token', token);
  return url.href;
}

/** Is the token good? 'unauthorized' (HTTP 401), 'ok', or 'unreachable'. */
export async function probeToken(token) {
  try {
    const response = await fetch('api/devices', { headers: headers(token), cache: 'no-store' });
    return response.status === 401 ? 'unauthorized' : 'ok';
  } catch {
    return 'unreachable';
  }
}

async function telemetryPage(device, since, token) {
  const path = `api/devices/${encodeURIComponent(device)}/telemetry?since=${since}&limit=${PAGE_LIMIT}`;
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
 * so there is no exact "last N of this device" query. Start with a window of
 * offsets guessed from the number of devices, then step further back (or
 * narrow a window that holds more than a page) using the density of this
 * device's readings seen so far. A handful of requests at most.
 */
export async function loadHistory(device, token, { newest, deviceCount, wanted, maxRequests = 8 }) {
  if (newest === null || newest === undefined) return [];
  let span = Math.ceil(wanted * Math.max(1, deviceCount) * 1.5);
  let rows = [];
  let floor = newest; // `rows` holds every stored reading with floor < offset <= newest
  for (let request = 0; request < maxRequests && rows.length < wanted && floor > -1; request += 1) {
    const since = Math.max(-1, floor - span);
    const batch = await telemetryPage(device, since, token);
    const lastOffset = batch.length ? batch[batch.length - 1].offset : null;
    if (batch.length === PAGE_LIMIT && lastOffset < floor) {
      // More than a page in the window: the page stops short of the readings we
      // need. Narrow the window to what this density suggests and ask again.
      const density = PAGE_LIMIT / Math.max(1, lastOffset - since);
      span = Math.max(1, Math.ceil(((wanted - rows.length) / density) * 1.5));
      continue;
    }
    const inWindow = batch.filter((row) => row.offset <= floor);
    const density = inWindow.length / Math.max(1, floor - since);
    rows = inWindow.concat(rows);
    floor = since;
    const needed = wanted - rows.length;
    span = density > 0 ? Math.max(1, Math.ceil((needed / density) * 1.5)) : span * 4;
  }
  return rows.slice(-wanted);
}
