// The dashboard's entry point: takes the token, opens the connection, turns
// gateway messages into store updates and view redraws, and sends commands.
//
// Replay, in short (docs/dashboard.md has the long version): the page
// subscribes to everything; after every (re)connect it subscribes again with
// `since` = the newest offset it holds, so the gateway first replays what was
// stored while the page was away, then goes live. A `lagged` notice is handled
// the same way from the notice's `resume_from - 1`. Duplicates are dropped by
// offset in the store.
//
// The device listing comes a page at a time (docs/api.md §3.2): the page asks
// for the next one with `after` until `next` is null, one listing at a time.

import {
  ApiError,
  getCommand,
  getSerialPorts,
  loadHistory,
  probeToken,
  socketProtocols,
  socketUrl,
  whenUnauthorized,
} from './api.js';
import { Connection } from './connection.js';
import { DevicePage } from './devicepage.js';
import { FINAL_STATUSES, MAX_POINTS, Store, displayName } from './store.js';
import { clearToken, storeToken, takeToken } from './token.js';
import { View } from './view.js';
import { errorCode, nackWords } from './words.js';

const SERIAL_REFRESH_MS = 5000;
const RECOVER_MS = 5000; // how often to ask for commands whose result the socket lost
const RECOVER_TRIES = 720; // an hour of asking; a queued command lives 1 h by default

const store = new Store();
let token = takeToken();
let connection = null;
let nextCommand = 0;
let nextListing = 0;
let syncId = null; // the id of the devices request that marks the end of the last replay
let listingId = null; // the listing whose pages are being followed (null: none)
let relist = false; // new devices appeared while a listing was under way: list again after it
let devicesRefresh = 0;
let shownState = null;
let serialTimer = 0;
// Commands whose socket closed before their final status: command_id -> {cmd, device, tries}.
// GET /api/commands/{command_id} tells how they ended (docs/api.md §4).
const lostCommands = new Map();
let recoverTimer = 0;

const view = new View(store, {
  command: sendCommand,
  openDevice,
  retryNow: () => connection?.retryNow(),
  changeToken() {
    connection?.stop();
    clearToken();
    view.showTokenForm('Enter an access token for this gateway.', false);
  },
  submitToken(newToken) {
    storeToken(newToken);
    // A fresh page load is the simplest way to forget everything tied to the old token.
    window.location.reload();
  },
  roleChanged() {
    if (devicePage.isOpen) route(true); // labels and Delete depend on the role
  },
});

const devicePage = new DevicePage(store, document.querySelector('[data-testid="device-page"]'), {
  token: () => token,
  role: () => view.role,
  log: (kind, text) => event(kind, text),
  changed: (id) => view.deviceChanged(id),
  removed(id, reason) {
    forget(id, reason);
    if (window.location.hash.includes('device=')) window.location.hash = '';
  },
});

/** The token stopped working for an HTTP call: treat it as the socket's 401. */
whenUnauthorized(() => connection?.refused());

/** A device as the event log names it: "Greenhouse (demo-2)", or its id alone. */
function named(id) {
  const d = store.devices.get(id);
  const name = d ? displayName(d) : id;
  return name === id ? id : `${name} (${id})`;
}

/** A device deleted or forgotten: it leaves the page. */
function forget(id, reason) {
  if (!store.devices.has(id)) return;
  const name = named(id);
  store.remove(id);
  view.deviceRemoved(id);
  const why = reason === 'unseen' ? 'forgotten (unseen for too long)' : 'deleted';
  event('presence', `${name} ${why}`);
  if (devicePage.id === id) devicePage.deviceChanged(id);
}

/** #device=ID shows that device's page; anything else, the list. */
function route(force = false) {
  const params = new URLSearchParams(window.location.hash.slice(1));
  const id = params.get('device');
  const list = document.querySelector('[data-testid="list-view"]');
  if (id && view.role !== null) {
    list.hidden = true;
    view.showList(false);
    if (force || devicePage.id !== id) devicePage.open(id);
  } else {
    if (devicePage.isOpen) devicePage.close();
    document.title = 'IoT gateway dashboard';
    list.hidden = false;
    view.showList(true);
  }
}

/** The serial ports and their state, while connected; an older gateway has none. */
async function refreshSerial() {
  clearTimeout(serialTimer);
  serialTimer = 0;
  if (connection?.state !== 'connected') return;
  try {
    view.setSerialPorts(await getSerialPorts(token));
  } catch {
    // unreachable for now: the next refresh tries again
  }
  if (connection?.state === 'connected') serialTimer = setTimeout(refreshSerial, SERIAL_REFRESH_MS);
}

function event(kind, text, ts) {
  view.addEvent(store.log(kind, text, ts));
}

function connect() {
  connection = new Connection({
    url: () => socketUrl(),
    protocols: () => socketProtocols(token),
    probe: () => probeToken(token),
    onMessage: handle,
    onState(info) {
      const previous = shownState;
      shownState = info.state;
      view.setConnection(info);
      if (previous === 'connected' && info.state !== 'connected') forgetPendingCommands();
      if (info.state === 'reconnecting' && info.retryAt && info.wasConnected) {
        event('connection', `connection lost (code ${info.code}); reconnecting`);
      } else if (info.state === 'unauthorized' && previous !== 'unauthorized') {
        event('connection', 'the gateway refused the token');
      }
    },
  });
  connection.start();
}

/** Subscribe to everything, replaying from `since` when the page already holds data. */
function resync(since) {
  const request = { op: 'subscribe', all: true };
  if (since !== null) request.since = since;
  connection.send(request);
  // The gateway answers requests in order and finishes a replay before it reads
  // the next request, so the reply to this one means the replay is complete.
  syncId = listDevices();
}

/**
 * Ask for the device listing from its first page; the later pages are asked
 * for as each reply names the `next` one. A listing already under way is left:
 * this one covers it. Returns the listing's request id.
 */
function listDevices() {
  nextListing += 1;
  listingId = `devices-${nextListing}`;
  relist = false;
  connection?.send({ op: 'devices', id: listingId });
  return listingId;
}

/** A page of the listing arrived: ask for the next one, or end the listing. */
function followListing(msg) {
  if (msg.id === undefined || msg.id !== listingId) return; // an abandoned listing's page
  if (typeof msg.next === 'string') {
    connection?.send({ op: 'devices', id: listingId, after: msg.next });
    return;
  }
  listingId = null;
  if (relist) listDevices();
}

function handle(msg) {
  switch (msg.op) {
    case 'welcome': {
      store.role = msg.role;
      view.setRole(msg.role);
      view.heard();
      route();
      refreshSerial();
      recoverCommands();
      const since = store.resumeOffset();
      const replay = since === null ? '' : `; replaying after offset ${since}`;
      event('connection', `connected as ${msg.role}${replay}`);
      resync(since);
      break;
    }
    case 'telemetry': {
      const d = store.applyTelemetry(msg);
      if (d) {
        view.deviceChanged(d.id);
        if (devicePage.id === d.id) devicePage.deviceChanged(d.id, msg);
      }
      view.heard();
      break;
    }
    case 'devices': {
      for (const d of store.applyDevices(msg.devices)) {
        view.deviceChanged(d.id);
        if (devicePage.id === d.id) devicePage.deviceChanged(d.id);
      }
      view.heard();
      if (msg.id !== undefined && msg.id === syncId) {
        store.synced(); // the first page: the replay before it is complete
        syncId = null;
      }
      followListing(msg);
      break;
    }
    case 'presence': {
      const known = store.devices.get(msg.device)?.transport;
      const d = store.applyPresence(msg);
      view.deviceChanged(d.id);
      if (devicePage.id === d.id) devicePage.deviceChanged(d.id);
      const reason = msg.reason ? ` (${msg.reason})` : '';
      event('presence', `${named(msg.device)} ${msg.online ? 'online' : 'offline'}${reason}`, msg.ts);
      if (msg.online && !known) refreshDevicesSoon(); // a new device: learn its link
      break;
    }
    case 'command_status': {
      const cmd = store.applyCommandStatus(msg);
      if (cmd) view.commandChanged(cmd);
      if (msg.status !== 'sent') {
        const label = cmd ? cmd.label : 'command';
        let detail = msg.error ? `: ${msg.error}` : '';
        if (msg.status === 'nacked') {
          const protocol = store.devices.get(msg.device)?.protocol;
          detail = `: ${nackWords(msg, protocol)}`;
        }
        event('command', `${named(msg.device)} ${label}: ${msg.status}${detail}`);
      }
      break;
    }
    case 'lagged': {
      const since = store.noteLag(msg);
      event(
        'lagged',
        `the gateway dropped ${msg.dropped} readings for this page; ` +
          `replaying after offset ${since}`,
      );
      resync(since);
      break;
    }
    case 'error': {
      const cmd = msg.id !== null && msg.id !== undefined ? store.applyCommandStatus(msg) : null;
      if (cmd) view.commandChanged(cmd);
      event('error', `${errorCode(msg.code)}: ${msg.message}`);
      break;
    }
    case 'labels': {
      const d = store.applyLabels(msg);
      if (d) {
        view.deviceChanged(d.id);
        if (devicePage.id === d.id) devicePage.deviceChanged(d.id);
      }
      break;
    }
    case 'removed': {
      if (typeof msg.device === 'string') forget(msg.device, msg.reason);
      if (devicePage.id === msg.device) window.location.hash = '';
      break;
    }
    default:
      break; // subscribed, unsubscribed, welcome's friends: nothing to draw
  }
}

/**
 * The gateway sends a command's statuses to the socket that gave it, so once
 * that socket is gone the page will never learn how unfinished commands ended.
 * Say so where they were given, rather than leave them "sent" forever.
 */
function forgetPendingCommands() {
  for (const cmd of store.commands.values()) {
    if (cmd.error) continue;
    const targets = cmd.device ? [cmd.device] : [...cmd.statuses.keys()];
    const unfinished = (d) => !FINAL_STATUSES.has(cmd.statuses.get(d)?.status);
    const open = targets.length === 0 || targets.some(unfinished);
    if (open) {
      // With a command_id the gateway keeps the result: ask for it once connected again.
      const lost = targets.filter(unfinished).map((d) => [d, cmd.statuses.get(d)?.command_id]);
      const traceable = lost.length > 0 && lost.every(([, commandId]) => commandId);
      for (const [device, commandId] of lost) {
        if (commandId) lostCommands.set(commandId, { cmd, device, tries: 0 });
      }
      cmd.error = traceable
        ? 'connection lost; asking the gateway how it ended…'
        : 'connection lost; result unknown';
      view.commandChanged(cmd);
    }
  }
}

/**
 * Ask the gateway how the commands cut off from their socket ended, until each
 * has a final status (or the gateway no longer knows it). Each result goes
 * where the command was given, as if it had come over the socket.
 */
async function recoverCommands() {
  clearTimeout(recoverTimer);
  recoverTimer = 0;
  for (const [commandId, lost] of [...lostCommands]) {
    if (connection?.state !== 'connected') return; // the next welcome starts over
    const { cmd, device } = lost;
    let body;
    try {
      body = await getCommand(commandId, token);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        lostCommands.delete(commandId); // over a day old, or from before command ids
        cmd.error = 'connection lost; the gateway no longer knows this command';
        view.commandChanged(cmd);
      }
      continue;
    }
    lost.tries += 1;
    const history = Array.isArray(body.history) ? body.history : [];
    const latest = history.length ? history[history.length - 1] : {};
    const msg = {
      ...latest,
      op: 'command_status',
      id: cmd.id,
      device,
      command_id: commandId,
      status: body.status,
    };
    cmd.statuses.set(device, msg);
    const final = FINAL_STATUSES.has(body.status);
    if (final || lost.tries >= RECOVER_TRIES) lostCommands.delete(commandId);
    // Once every lost part has an answer, show the statuses (a `queued` one goes on being asked).
    const unanswered = [...lostCommands.values()].some((o) => o.cmd === cmd && o.tries === 0);
    if (!unanswered) cmd.error = null;
    view.commandChanged(cmd);
    if (final) {
      const protocol = store.devices.get(device)?.protocol;
      const detail =
        body.status === 'nacked' ? `: ${nackWords(msg, protocol)}` : msg.error ? `: ${msg.error}` : '';
      event('command', `${named(device)} ${cmd.label}: ${body.status}${detail} (asked after a reconnect)`);
    }
  }
  if (lostCommands.size && connection?.state === 'connected') {
    recoverTimer = setTimeout(recoverCommands, RECOVER_MS);
  }
}

/**
 * Ask for the device listing once, shortly, however many devices just appeared.
 * While a listing is still being followed, another one starts after it ends,
 * rather than restart it: a fleet that keeps changing must still be listed to
 * its last page.
 */
function refreshDevicesSoon() {
  if (devicesRefresh) return;
  devicesRefresh = setTimeout(() => {
    devicesRefresh = 0;
    if (listingId !== null) relist = true;
    else listDevices();
  }, 500);
}

/**
 * Send a command over the socket. `spec` holds device or protocol, command,
 * origin (where its status is shown), label, and channel for relay switches.
 */
function sendCommand(spec) {
  nextCommand += 1;
  const id = `c${nextCommand}`;
  const cmd = store.addCommand({ ...spec, id });
  const request = { op: 'command', id, command: spec.command };
  if (spec.device) request.device = spec.device;
  else request.protocol = spec.protocol;
  if (!connection || !connection.send(request)) {
    cmd.error = 'not connected to the gateway';
  }
  return cmd;
}

/** A device's details were opened: seed its charts from stored history, once. */
async function openDevice(id) {
  const d = store.devices.get(id);
  if (!d || d.history === 'loading' || d.history === 'loaded') return;
  d.history = 'loading';
  view.deviceChanged(id);
  try {
    const rows = await loadHistory(id, token, {
      newest: d.last ? d.last.offset : null,
      deviceCount: store.devices.size,
      wanted: MAX_POINTS,
    });
    store.applyHistory(id, rows);
    d.history = 'loaded';
  } catch (error) {
    d.history = 'error';
    d.historyError = error instanceof Error ? error.message : String(error);
  }
  view.deviceChanged(id);
}

// Opening a link with #token= in a tab that already shows the page changes only
// the fragment: no new page load. Take the token and load afresh, as the form does.
window.addEventListener('hashchange', () => {
  if (!new URLSearchParams(window.location.hash.slice(1)).has('token')) {
    route(); // #device=ID, or back to the list
    return;
  }
  takeToken();
  window.location.reload();
});

// The browser knows before our backoff does that the network is back.
window.addEventListener('online', () => connection?.retryNow());

// Read-only state for the browser tests and for curious operators in the console.
window.__dashboard = Object.freeze({
  snapshot: () => ({
    ...store.snapshot(),
    state: connection?.state ?? null,
    connects: connection?.connects ?? 0,
  }),
});

if (token) {
  connect();
} else {
  view.setConnection({ state: 'stopped' });
  view.showTokenForm(
    'This dashboard needs an access token: open the link the gateway printed, ' +
      'or paste the token here.',
    false,
  );
}
