// Everything on the device list. The view reads the store and calls back into
// the app for actions (commands, opening a device, the token form).
//
// It is built for a fleet of 10,000 devices: only one page of cards exists in
// the DOM at a time (PAGE_SIZE, in natural id order within each protocol), the
// rest is summed up in the summary bar and the pager. A value arriving updates
// its card in place, and only if the card is on screen; updates are batched
// into one animation frame, so a busy gateway does not make the page redraw
// hundreds of times a second, and a value arriving never steals the keyboard
// focus from a field the operator is typing into.

import { LineChart } from './chart.js';
import { h, uid } from './dom.js';
import { clockTime, fieldInfo, formatValue, isoTime, relativeTime } from './format.js';
import { Sparkline } from './sparkline.js';
import { FINAL_STATUSES, channelName, displayName, hasErrors } from './store.js';
import { SERIAL_STATES, nackWords, offlineReason } from './words.js';

const STATE_LABELS = Object.freeze({
  connecting: 'Connecting',
  connected: 'Connected',
  reconnecting: 'Reconnecting',
  unauthorized: 'Unauthorized',
  stopped: 'Disconnected',
});

const PENDING_STATUSES = new Set(['sent', 'queued']);
const RELAY_CHANNELS = 4; // relay-4 (docs/protocols.md)
const MAX_LOG_ITEMS = 200;
export const PAGE_SIZE = 60; // device cards in the DOM at once

function byTestId(id) {
  const el = document.querySelector(`[data-testid="${id}"]`);
  if (!el) throw new Error(`index.html lacks [data-testid="${id}"]`);
  return el;
}

/** "acked", "nacked: bad argument", "rejected: unknown command" ... */
export function describeStatus(msg, protocol) {
  if (msg.status === 'nacked') return `nacked: ${nackWords(msg, protocol)}`;
  if (msg.error) return `${msg.status}: ${msg.error}`;
  return msg.status;
}

function statusTone(status) {
  if (status === 'acked') return 'ok';
  if (PENDING_STATUSES.has(status) || status === 'sending') return 'pending';
  return 'bad';
}

/** What decides whether a device passes the filter, and what the summary counts. */
function stateKey(d) {
  return `${d.protocol}\n${d.online}\n${hasErrors(d)}\n${d.searchText}`;
}

export class View {
  /**
   * @param {import('./store.js').Store} store
   * @param {object} actions command(spec) -> command|null, openDevice(id),
   *   retryNow(), changeToken(), submitToken(token)
   */
  constructor(store, actions) {
    this.store = store;
    this.actions = actions;
    this.role = null;
    this.groups = new Map(); // protocol -> Group on the current page
    this.cards = new Map(); // device id -> DeviceCard on the current page
    this.outputs = new Map(); // command origin -> <output> where its status shows
    this.dirty = new Set();
    this.keys = new Map(); // device id -> stateKey at the last flush
    this.frame = 0;
    this.connection = { state: 'connecting' };
    this.knownProtocols = '';
    this.order = []; // ids passing the filter, in display order
    this.reorder = true; // this.order must be computed again
    this.summaryDirty = true;
    this.pageIndex = 0;
    this.lastUpdate = null; // when the last message from the gateway came
    this.hiddenList = false; // the device page is shown instead of the list

    this.connLabel = byTestId('connection-state');
    this.countdown = byTestId('reconnect-countdown');
    this.retryButton = byTestId('retry-now');
    this.roleBadge = byTestId('role');
    this.changeTokenButton = byTestId('change-token');
    this.authPanel = byTestId('auth-panel');
    this.authMessage = byTestId('auth-message');
    this.tokenForm = byTestId('token-form');
    this.tokenInput = byTestId('token-input');
    this.protocolFilter = byTestId('filter-protocol');
    this.statusFilter = byTestId('filter-status');
    this.search = byTestId('search');
    this.deviceCount = byTestId('device-count');
    this.staleNote = byTestId('stale-note');
    this.empty = byTestId('no-devices');
    this.devicesEl = byTestId('devices');
    this.pager = byTestId('pager');
    this.pagerText = byTestId('pager-text');
    this.prevButton = byTestId('page-prev');
    this.nextButton = byTestId('page-next');
    this.summaryEl = byTestId('summary');
    this.summaryParts = {
      total: byTestId('summary-total'),
      online: byTestId('summary-online'),
      offline: byTestId('summary-offline'),
      errors: byTestId('summary-errors'),
    };
    this.serialPanel = byTestId('serial-ports');
    this.serialList = byTestId('serial-list');
    this.log = byTestId('event-log');

    this.retryButton.addEventListener('click', () => this.actions.retryNow());
    this.changeTokenButton.addEventListener('click', () => this.actions.changeToken());
    this.tokenForm.addEventListener('submit', (event) => {
      event.preventDefault();
      const token = this.tokenInput.value.trim();
      if (token) this.actions.submitToken(token);
    });
    this.protocolFilter.addEventListener('change', () => this.filterChanged());
    this.statusFilter.addEventListener('change', () => this.filterChanged());
    this.search.addEventListener('input', () => this.filterChanged());
    this.search.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && this.search.value) {
        this.search.value = '';
        this.filterChanged();
      }
    });
    for (const status of ['online', 'offline', 'errors']) {
      this.summaryParts[status].addEventListener('click', () => {
        this.statusFilter.value = this.statusFilter.value === status ? '' : status;
        this.filterChanged();
      });
    }
    this.summaryParts.total.addEventListener('click', () => {
      this.statusFilter.value = '';
      this.filterChanged();
    });
    this.prevButton.addEventListener('click', () => this.goToPage(this.pageIndex - 1));
    this.nextButton.addEventListener('click', () => this.goToPage(this.pageIndex + 1));
    // "/" jumps to the search box, as on many sites, unless the key is typed into a field.
    document.addEventListener('keydown', (event) => {
      const target = event.target;
      const typing =
        target instanceof HTMLInputElement ||
        target instanceof HTMLTextAreaElement ||
        target instanceof HTMLSelectElement;
      if (event.key === '/' && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
        if (this.hiddenList) return;
        event.preventDefault();
        this.search.focus();
      }
    });
    // Relative times and the reconnect countdown move on by themselves.
    setInterval(() => this.tick(), 1000);
    this.renderEmpty();
  }

  // ---- connection and token -------------------------------------------------------------

  setConnection(info) {
    this.connection = info;
    document.body.dataset.connection = info.state;
    this.connLabel.dataset.state = info.state;
    this.connLabel.textContent = STATE_LABELS[info.state] ?? info.state;
    this.retryButton.hidden = !(info.state === 'reconnecting' && info.retryAt);
    // The token form is on screen in these states: no need for a second way to it.
    this.changeTokenButton.hidden = info.state === 'unauthorized' || info.state === 'stopped';
    this.renderCountdown();
    if (info.state === 'unauthorized') {
      const had = this.store.devices.size > 0;
      this.showTokenForm(
        'Signed out: the gateway refused this token (HTTP 401 Unauthorized). ' +
          (had
            ? 'If the gateway restarted with a new token, open the new link it printed, '
            : 'Check the link you were given, ') +
          'or enter another token below.',
        true,
      );
      // The token no longer works: whatever role it had is gone, and so are the controls.
      this.setRole('signed-out');
    } else if (info.state === 'connected') {
      this.authPanel.hidden = true;
    }
    this.renderStale();
  }

  /** Mark the values out of date while the page is not connected. */
  renderStale() {
    const state = this.connection.state;
    const stale = state === 'reconnecting' || (state === 'unauthorized' && this.store.devices.size);
    this.staleNote.hidden = !stale;
    if (!stale) return;
    const since = this.lastUpdate ? ` (last update ${clockTime(this.lastUpdate)})` : '';
    this.staleNote.textContent =
      state === 'unauthorized'
        ? `Signed out: the values below are out of date${since}. Open a new link to see current values.`
        : `Not connected to the gateway: the values below may be out of date${since}.`;
  }

  /** Something arrived from the gateway: the values are current as of now. */
  heard() {
    this.lastUpdate = Date.now();
  }

  renderCountdown() {
    const { state, retryAt } = this.connection;
    let text = '';
    if (state === 'reconnecting') {
      const seconds = retryAt ? Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)) : null;
      text = seconds === null ? 'trying now…' : `retrying in ${seconds} s`;
    }
    this.countdown.textContent = text;
  }

  /** The token form, with a message; `isError` makes the message an alert. */
  showTokenForm(message, isError) {
    this.authPanel.hidden = false;
    // The role goes first: a live region must exist before its text changes to be announced.
    this.authMessage.setAttribute('role', isError ? 'alert' : 'status');
    this.authMessage.dataset.error = String(Boolean(isError));
    this.authMessage.textContent = message;
    this.tokenInput.value = '';
    this.tokenInput.focus();
  }

  /** `operator`, `viewer`, or `signed-out` (the token was refused). */
  setRole(role) {
    if (role === this.role) return;
    const rebuild = this.role !== null;
    this.role = role;
    const badges = {
      operator: 'Operator',
      viewer: 'Viewer (read only)',
      'signed-out': 'Signed out',
    };
    this.roleBadge.textContent = badges[role] ?? role;
    this.roleBadge.dataset.role = role;
    if (rebuild) {
      // Command controls exist only for operators: build every card again.
      for (const card of [...this.cards.values()]) card.remove();
      for (const group of [...this.groups.values()]) group.remove();
      this.outputs.clear();
      this.reorder = true;
    }
    this.actions.roleChanged?.(role);
    this.schedule();
  }

  get operator() {
    return this.role === 'operator';
  }

  // ---- devices ----------------------------------------------------------------------------

  deviceChanged(id) {
    this.dirty.add(id);
    this.schedule();
  }

  deviceRemoved(id) {
    this.cards.get(id)?.remove();
    this.keys.delete(id);
    this.dirty.delete(id);
    this.reorder = true;
    this.summaryDirty = true;
    this.schedule();
  }

  filterChanged() {
    this.reorder = true;
    this.pageIndex = 0;
    this.schedule();
  }

  goToPage(index) {
    this.pageIndex = index;
    this.reorder = true;
    this.schedule();
    this.devicesEl.focus({ preventScroll: true });
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.flush();
    });
  }

  /** Draw what changed since the last frame. */
  flush() {
    if (this.role === null) return; // cards are built once the role is known
    const filtering = Boolean(this.statusFilter.value || this.search.value.trim());
    for (const id of this.dirty) {
      const d = this.store.devices.get(id);
      if (!d) continue;
      const key = stateKey(d);
      const before = this.keys.get(id);
      if (key !== before) {
        this.keys.set(id, key);
        this.summaryDirty = true;
        // A new device, or one that changed protocol, moves; others only when a filter cares.
        const protocol = (k) => k.slice(0, k.indexOf('\n'));
        if (before === undefined || filtering || protocol(before) !== d.protocol) {
          this.reorder = true;
        }
      }
      const card = this.cards.get(id);
      if (card && card.protocol !== d.protocol) {
        card.remove();
        this.reorder = true;
      } else if (card) {
        card.update(d);
      }
    }
    this.dirty.clear();
    if (this.reorder) this.layout();
    if (this.summaryDirty) this.renderSummary();
  }

  /** The devices passing the filter, in order; then the current page's cards. */
  layout() {
    this.reorder = false;
    this.updateProtocolOptions();
    const protocol = this.protocolFilter.value;
    const status = this.statusFilter.value;
    const query = this.search.value.trim().toLowerCase();
    const list = [];
    for (const d of this.store.devices.values()) {
      if (protocol && d.protocol !== protocol) continue;
      if (status === 'online' && !d.online) continue;
      if (status === 'offline' && d.online) continue;
      if (status === 'errors' && !hasErrors(d)) continue;
      if (query && !d.searchText.includes(query)) continue;
      list.push(d);
    }
    // Grouped by protocol, then in natural id order (sim-2 before sim-10).
    list.sort((a, b) => {
      if (a.protocol !== b.protocol) return a.protocol < b.protocol ? -1 : 1;
      if (a.sortKey !== b.sortKey) return a.sortKey < b.sortKey ? -1 : 1;
      return a.id < b.id ? -1 : 1;
    });
    this.order = list;
    const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
    this.pageIndex = Math.min(Math.max(0, this.pageIndex), pages - 1);
    const start = this.pageIndex * PAGE_SIZE;
    const slice = list.slice(start, start + PAGE_SIZE);

    // Cards that left the page go; the others stay as they are (focus, open details).
    const wanted = new Set(slice.map((d) => d.id));
    for (const card of [...this.cards.values()]) if (!wanted.has(card.id)) card.remove();
    const byGroup = new Map();
    for (const d of slice) {
      let card = this.cards.get(d.id);
      if (!card) {
        card = new DeviceCard(this, d);
        this.cards.set(d.id, card);
        card.update(d);
      }
      if (!byGroup.has(d.protocol)) byGroup.set(d.protocol, []);
      byGroup.get(d.protocol).push(card);
    }
    for (const [p, group] of [...this.groups]) {
      if (!byGroup.has(p)) {
        group.remove();
        this.groups.delete(p);
      }
    }
    let i = 0;
    for (const [p, cards] of byGroup) {
      let group = this.groups.get(p);
      if (!group) {
        group = new Group(this, p);
        this.groups.set(p, group);
      }
      placeAt(this.devicesEl, group.element, i);
      group.show(cards);
      i += 1;
    }

    const total = this.store.devices.size;
    const plural = total === 1 ? '' : 's';
    this.deviceCount.textContent = total
      ? `${list.length.toLocaleString('en')} of ${total.toLocaleString('en')} device${plural} shown`
      : '';
    this.pager.hidden = list.length <= PAGE_SIZE;
    this.pagerText.textContent = list.length
      ? `${(start + 1).toLocaleString('en')}–${(start + slice.length).toLocaleString('en')} ` +
        `of ${list.length.toLocaleString('en')} (page ${this.pageIndex + 1} of ${pages})`
      : '';
    this.prevButton.disabled = this.pageIndex === 0;
    this.nextButton.disabled = this.pageIndex >= pages - 1;
    this.devicesEl.dataset.page = String(this.pageIndex + 1);
    this.devicesEl.dataset.matching = String(list.length);
    this.summaryDirty = true;
    this.renderEmpty();
  }

  renderEmpty() {
    const total = this.store.devices.size;
    this.empty.hidden = this.order.length > 0;
    this.empty.textContent = total
      ? 'No device matches the filter.'
      : this.role === null
        ? 'Waiting for the gateway…'
        : 'No device has connected to this gateway yet.';
  }

  renderSummary() {
    this.summaryDirty = false;
    const sum = this.store.summary();
    const counts = new Map();
    for (const d of this.store.devices.values()) {
      const c = counts.get(d.protocol) ?? { total: 0, online: 0 };
      c.total += 1;
      if (d.online) c.online += 1;
      counts.set(d.protocol, c);
    }
    const words = {
      total: `${sum.total.toLocaleString('en')} device${sum.total === 1 ? '' : 's'}`,
      online: `${sum.online.toLocaleString('en')} online`,
      offline: `${sum.offline.toLocaleString('en')} offline`,
      errors: `${sum.errors.toLocaleString('en')} with errors`,
    };
    for (const [part, el] of Object.entries(this.summaryParts)) {
      el.textContent = words[part];
      el.dataset.count = String(sum[part]);
      if (part !== 'total') el.setAttribute('aria-pressed', String(this.statusFilter.value === part));
    }
    this.summaryEl.hidden = sum.total === 0;
    for (const group of this.groups.values()) group.renderCount(counts.get(group.protocol));
  }

  updateProtocolOptions() {
    const protocols = this.store.protocols();
    const key = protocols.join('\n');
    if (key === this.knownProtocols) return;
    this.knownProtocols = key;
    const selected = this.protocolFilter.value;
    this.protocolFilter.replaceChildren(
      h('option', { value: '' }, 'All protocols'),
      ...protocols.map((p) => h('option', { value: p }, p)),
    );
    this.protocolFilter.value = protocols.includes(selected) ? selected : '';
  }

  /** The device page is shown instead of the list (or the list again). */
  showList(shown) {
    this.hiddenList = !shown;
  }

  tick() {
    this.renderCountdown();
    const now = Date.now();
    for (const card of this.cards.values()) card.tick(now);
    for (const item of this.serialList.querySelectorAll('time[data-ms]')) {
      item.textContent = relativeTime(Number(item.dataset.ms), now);
    }
  }

  // ---- serial ports -----------------------------------------------------------------------

  /** GET /api/serial's ports, or null when this gateway has no such endpoint. */
  setSerialPorts(ports) {
    if (!ports || ports.length === 0) {
      this.serialPanel.hidden = true;
      this.serialList.replaceChildren();
      return;
    }
    this.serialPanel.hidden = false;
    const now = Date.now();
    const items = ports.map((port) => {
      const state = String(port.state);
      const since = Number.isFinite(port.since)
        ? h(
            'time',
            { datetime: isoTime(port.since), 'data-ms': port.since, title: new Date(port.since).toLocaleString() },
            relativeTime(port.since, now),
          )
        : null;
      return h(
        'li',
        { class: 'serial-port', 'data-testid': 'serial-port', 'data-state': state, 'data-url': port.url },
        h('span', { class: 'serial-state', 'data-state': state }, SERIAL_STATES[state] ?? state),
        ' ',
        h('code', { class: 'serial-url' }, port.url),
        ' ',
        h('span', { class: 'meta' }, [port.client_id, port.protocol].filter(Boolean).join(' · ')),
        since ? h('span', { class: 'meta' }, ' · since ', since) : null,
        port.error ? h('span', { class: 'serial-error', 'data-testid': 'serial-error' }, ` · ${port.error}`) : null,
      );
    });
    this.serialList.replaceChildren(...items);
  }

  // ---- commands ---------------------------------------------------------------------------

  /** An <output> for the status of commands given from `origin`. */
  output(origin) {
    const out = h('output', {
      class: 'cmd-status',
      'data-testid': 'command-status',
      'data-origin': origin.split(':').pop(),
    });
    this.outputs.set(origin, out);
    return out;
  }

  /** Forget the outputs of a card that left the page. */
  dropOutputs(prefix) {
    for (const origin of [...this.outputs.keys()]) {
      if (origin.startsWith(prefix)) this.outputs.delete(origin);
    }
  }

  /** Send a command; the app answers null when it could not be sent. */
  command(spec) {
    const cmd = this.actions.command(spec);
    if (cmd) this.commandChanged(cmd);
    return cmd;
  }

  commandChanged(cmd) {
    const out = this.outputs.get(cmd.origin);
    const protocolOf = (id) => this.store.devices.get(id)?.protocol ?? cmd.protocol;
    if (out) {
      let tone;
      let text;
      if (cmd.error) {
        tone = 'bad';
        text = `error: ${cmd.error}`;
        out.dataset.status = 'error';
      } else if (cmd.statuses.size === 0) {
        tone = 'pending';
        text = 'sending…';
        out.dataset.status = 'sending';
      } else if (cmd.device) {
        const msg = cmd.statuses.get(cmd.device);
        tone = statusTone(msg.status);
        text = describeStatus(msg, protocolOf(cmd.device));
        out.dataset.status = msg.status;
      } else {
        // A protocol-wide command: one status per device, in id order.
        const parts = [...cmd.statuses.values()].sort((a, b) => (a.device < b.device ? -1 : 1));
        const tones = new Set(parts.map((m) => statusTone(m.status)));
        tone = tones.has('bad') ? 'bad' : tones.has('pending') ? 'pending' : 'ok';
        text = parts.map((m) => `${m.device} ${describeStatus(m, protocolOf(m.device))}`).join(', ');
        const same = parts.every((m) => m.status === parts[0].status);
        out.dataset.status = same ? parts[0].status : 'mixed';
      }
      out.dataset.tone = tone;
      out.textContent = `${cmd.label}: ${text}`;
    }
    if (cmd.channel !== undefined && cmd.device) {
      const card = this.cards.get(cmd.device);
      const msg = cmd.statuses.get(cmd.device);
      if (card && (cmd.error || (msg && FINAL_STATUSES.has(msg.status)))) {
        card.pending.delete(cmd.channel);
      }
    }
    if (cmd.device) this.deviceChanged(cmd.device);
  }

  intervalForm(target, origin, scope) {
    const inputId = uid('interval');
    const input = h('input', {
      id: inputId,
      type: 'number',
      min: 1, // 1 to 65535 s: a u16, but the gateway refuses 0 (docs/protocols.md)
      max: 65535,
      step: 1,
      value: 10,
      required: true,
      inputmode: 'numeric',
      'data-testid': 'interval-input',
    });
    const out = this.output(`${origin}:interval`);
    return h(
      'form',
      {
        class: 'cmd-form',
        'data-testid': 'interval-form',
        onsubmit: (event) => {
          event.preventDefault();
          const seconds = Number(input.value);
          this.command({
            ...target,
            command: { name: 'set_interval', args: { seconds } },
            origin: `${origin}:interval`,
            label: `Interval ${seconds} s`,
          });
        },
      },
      h('label', { for: inputId }, `Report interval${scope}, seconds`),
      h('div', { class: 'row' }, input, h('button', { type: 'submit' }, 'Set interval')),
      out,
    );
  }

  rebootControl(target, origin, scope) {
    const out = this.output(`${origin}:reboot`);
    return h(
      'div',
      { class: 'cmd-form' },
      h(
        'button',
        {
          type: 'button',
          class: 'warn',
          'data-testid': 'reboot',
          onclick: () =>
            this.command({
              ...target,
              command: { name: 'reboot' },
              origin: `${origin}:reboot`,
              label: 'Reboot',
            }),
        },
        `Reboot${scope}`,
      ),
      out,
    );
  }

  hexForm(target, origin) {
    const inputId = uid('hex');
    const input = h('input', {
      id: inputId,
      type: 'text',
      required: true,
      autocomplete: 'off',
      spellcheck: 'false',
      pattern: '([0-9A-Fa-f]{2} ?)+',
      maxlength: 760,
      placeholder: 'e.g. 01 00 0a',
      title: 'Bytes in hex, two digits each; spaces are allowed',
      'data-testid': 'hex-input',
    });
    const out = this.output(`${origin}:hex`);
    return h(
      'form',
      {
        class: 'cmd-form',
        'data-testid': 'hex-form',
        onsubmit: (event) => {
          event.preventDefault();
          const hex = input.value.replace(/\s+/g, '').toLowerCase();
          const label = `Raw ${hex}`;
          this.command({ ...target, command: { hex }, origin: `${origin}:hex`, label });
        },
      },
      h('label', { for: inputId }, 'Raw command body (hex)'),
      h('div', { class: 'row' }, input, h('button', { type: 'submit' }, 'Send')),
      out,
    );
  }

  // ---- event log --------------------------------------------------------------------------

  addEvent(event) {
    const item = h(
      'li',
      { 'data-testid': 'event', 'data-kind': event.kind, class: `event event-${event.kind}` },
      h('time', { datetime: isoTime(event.ts) }, clockTime(event.ts)),
      ' ',
      h('span', { class: 'event-kind' }, event.kind),
      ' ',
      h('span', { class: 'event-text' }, event.text),
    );
    this.log.prepend(item); // newest first
    while (this.log.childElementCount > MAX_LOG_ITEMS) this.log.lastElementChild.remove();
  }
}

/** A <details> whose content `build()` makes when it is first opened. */
function lazyDetails(attrs, title, build) {
  const details = h('details', attrs, h('summary', {}, title));
  details.addEventListener('toggle', () => {
    if (details.open && details.childElementCount === 1) details.append(build());
  });
  return details;
}

/** Put `el` at position `index` among `parent`'s children, moving nothing already there. */
function placeAt(parent, el, index) {
  const current = parent.children[index] ?? null;
  if (current !== el) parent.insertBefore(el, current);
}

// ---- a protocol's group (of the current page) -----------------------------------------------

class Group {
  constructor(view, protocol) {
    this.view = view;
    this.protocol = protocol;
    const titleId = uid('group');
    this.count = h('span', { class: 'group-count', 'data-testid': 'group-count' });
    this.list = h('ul', { class: 'cards', role: 'list' });
    this.element = h(
      'section',
      {
        class: 'group',
        'data-testid': 'group',
        'data-protocol': protocol,
        'aria-labelledby': titleId,
      },
      h('header', { class: 'group-head' }, h('h2', { id: titleId }, protocol), this.count),
      view.operator
        ? lazyDetails(
            { class: 'group-commands', 'data-testid': 'group-commands' },
            `Command every online ${protocol} device`,
            () => this.commands(),
          )
        : null,
      this.list,
    );
  }

  remove() {
    this.element.remove();
    this.view.dropOutputs(`group:${this.protocol}:`);
    this.view.groups.delete(this.protocol);
  }

  /** These cards, in this order, and no others. */
  show(cards) {
    cards.forEach((card, i) => placeAt(this.list, card.item, i));
    while (this.list.children.length > cards.length) this.list.lastElementChild.remove();
  }

  renderCount(c) {
    const total = c?.total ?? 0;
    const online = c?.online ?? 0;
    this.count.textContent = `${total.toLocaleString('en')} device${total === 1 ? '' : 's'}, ${online.toLocaleString('en')} online`;
  }

  commands() {
    const view = this.view;
    const target = { protocol: this.protocol };
    const origin = `group:${this.protocol}`;
    const scope = ` of every online ${this.protocol}`;
    const parts = [];
    if (this.protocol === 'env-sensor') {
      parts.push(
        view.intervalForm(target, origin, scope),
        view.rebootControl(target, origin, ' all online'),
      );
    } else if (this.protocol === 'relay-4') {
      parts.push(this.relayControl(target, origin));
    }
    parts.push(view.hexForm(target, origin));
    return h('div', { class: 'cmd-grid' }, parts);
  }

  relayControl(target, origin) {
    const view = this.view;
    const selectId = uid('channel');
    const select = h(
      'select',
      { id: selectId, 'data-testid': 'group-channel' },
      Array.from({ length: RELAY_CHANNELS }, (_, ch) =>
        h('option', { value: ch }, `Channel ${ch}`),
      ),
    );
    const send = (on) => {
      const channel = Number(select.value);
      view.command({
        ...target,
        command: { name: 'set', args: { channel, on } },
        origin: `${origin}:relay`,
        label: `Channel ${channel} ${on ? 'on' : 'off'}`,
      });
    };
    const out = view.output(`${origin}:relay`);
    return h(
      'div',
      { class: 'cmd-form' },
      h('label', { for: selectId }, 'Switch a channel on every online relay-4'),
      h(
        'div',
        { class: 'row' },
        select,
        h('button', { type: 'button', 'data-testid': 'group-on', onclick: () => send(true) }, 'On'),
        h(
          'button',
          { type: 'button', 'data-testid': 'group-off', onclick: () => send(false) },
          'Off',
        ),
      ),
      out,
    );
  }
}

// ---- one device -----------------------------------------------------------------------------

class DeviceCard {
  constructor(view, d) {
    this.view = view;
    this.id = d.id;
    this.protocol = d.protocol;
    this.operator = view.operator;
    this.isOpen = false;
    this.shape = null;
    this.charts = new Map();
    this.sparks = new Map();
    this.pending = new Map(); // relay channel -> id of the command switching it
    this.lastSeenMs = null;
    this.offlineMs = null;
    this.online = d.online;

    const titleId = uid('device');
    const panelId = uid('details');
    this.title = h('h3', { id: titleId, 'data-testid': 'device-name' });
    this.idLine = h('span', { class: 'device-id', 'data-testid': 'device-id' });
    this.badge = h('span', { class: 'badge', 'data-testid': 'device-online' });
    this.errorMark = h('span', {
      class: 'error-mark',
      'data-testid': 'device-errors',
      role: 'img',
      hidden: true,
    });
    this.location = h('span', { class: 'location', 'data-testid': 'device-location' });
    this.transport = h('span', { 'data-testid': 'device-transport' });
    this.lastSeen = h('time', { 'data-testid': 'device-last-seen' });
    this.offline = h('p', { class: 'offline-info', 'data-testid': 'offline-info', hidden: true });
    this.offlineSince = h('time', { 'data-testid': 'offline-since' });
    this.offlineReason = h('span', { 'data-testid': 'offline-reason' });
    this.offline.append('Offline since ', this.offlineSince, ': ', this.offlineReason);
    this.values = h('div', { class: 'values', 'data-testid': 'device-values' });
    this.toggle = h(
      'button',
      {
        type: 'button',
        class: 'toggle',
        'aria-expanded': 'false',
        'aria-controls': panelId,
        'data-testid': 'toggle-details',
        onclick: () => this.setOpen(!this.isOpen),
      },
      'Charts and details',
    );
    this.link = h(
      'a',
      { class: 'device-link', href: `#device=${encodeURIComponent(d.id)}`, 'data-testid': 'device-link' },
      'Device page',
    );
    this.info = h('dl', { class: 'info' });
    this.historyNote = h('p', { class: 'note', 'data-testid': 'history-state' });
    this.chartsEl = h('div', { class: 'charts' });
    this.panel = h(
      'div',
      { id: panelId, class: 'details', hidden: true, 'data-testid': 'device-details' },
      this.historyNote,
      this.chartsEl,
      this.info,
    );
    this.element = h(
      'article',
      {
        class: 'card',
        'data-testid': 'device-card',
        'data-device': d.id,
        'data-protocol': d.protocol,
        'aria-labelledby': titleId,
      },
      h(
        'header',
        { class: 'card-head' },
        h('div', { class: 'card-title' }, this.title, this.idLine),
        this.errorMark,
        this.badge,
      ),
      h('p', { class: 'meta' }, this.location, this.transport, ' · last seen ', this.lastSeen),
      this.offline,
      this.values,
      this.operator ? this.commands() : null,
      h('div', { class: 'card-actions' }, this.toggle, this.link),
      this.panel,
    );
    this.item = h('li', { class: 'card-item' }, this.element);
  }

  remove() {
    this.item.remove();
    this.view.cards.delete(this.id);
    this.view.dropOutputs(`device:${this.id}:`);
  }

  /** The Commands panel; its forms are built when it is first opened (a page of cards stays light). */
  commands() {
    return lazyDetails({ class: 'commands', 'data-testid': 'command-panel' }, 'Commands', () =>
      this.commandForms(),
    );
  }

  commandForms() {
    const view = this.view;
    const target = { device: this.id };
    const origin = `device:${this.id}`;
    const parts = [];
    if (this.protocol === 'env-sensor') {
      parts.push(view.intervalForm(target, origin, ''), view.rebootControl(target, origin, ''));
    }
    parts.push(view.hexForm(target, origin));
    return h('div', { class: 'cmd-grid' }, parts);
  }

  setOpen(open) {
    this.isOpen = open;
    this.toggle.setAttribute('aria-expanded', String(open));
    this.panel.hidden = !open;
    // An opened card takes the whole row: it grows without stretching its neighbours.
    this.item.classList.toggle('open', open);
    if (open) this.view.actions.openDevice(this.id);
    this.view.deviceChanged(this.id);
  }

  update(d) {
    const el = this.element;
    this.online = d.online;
    el.dataset.online = String(d.online);
    el.dataset.offset = d.last ? String(d.last.offset) : '';
    const errors = hasErrors(d);
    el.dataset.errors = String(errors);
    const name = displayName(d);
    this.title.textContent = name;
    this.idLine.textContent = name === d.id ? '' : d.id;
    this.idLine.hidden = name === d.id;
    this.location.textContent = d.labels.location ? `${d.labels.location} · ` : '';
    this.badge.textContent = d.online ? 'Online' : 'Offline';
    this.badge.dataset.online = String(d.online);
    this.errorMark.hidden = !errors;
    if (errors) {
      const why = [];
      const out = d.last?.out_of_range;
      if (Array.isArray(out) && out.length) {
        why.push(`out of range: ${out.map((f) => fieldInfo(f).label).join(', ')}`);
      }
      const nacks = Math.max(d.counters?.nacks ?? 0, d.nacks);
      if (nacks) why.push(`${nacks} command${nacks === 1 ? '' : 's'} refused (nacked)`);
      const text = `Errors: ${why.join('; ')}`;
      this.errorMark.setAttribute('aria-label', text);
      this.errorMark.title = text;
      this.errorMark.textContent = '⚠';
    }
    this.transport.textContent = d.transport ?? 'link unknown';
    this.transport.title = d.peer ? `peer ${d.peer}` : '';
    this.lastSeenMs = d.lastSeen;
    this.lastSeen.dateTime = isoTime(d.lastSeen);
    this.lastSeen.title = d.lastSeen ? new Date(d.lastSeen).toLocaleString() : '';
    this.offline.hidden = d.online;
    this.offlineMs = d.online ? null : (d.offlineSince ?? d.lastSeen);
    if (!d.online) {
      this.offlineSince.dateTime = isoTime(this.offlineMs);
      this.offlineSince.title = this.offlineMs ? new Date(this.offlineMs).toLocaleString() : '';
      this.offlineReason.textContent = offlineReason(d.offlineReason);
    }
    this.tick(Date.now());
    this.renderValues(d);
    if (this.isOpen) this.renderDetails(d);
  }

  tick(now) {
    this.lastSeen.textContent = relativeTime(this.lastSeenMs, now);
    if (this.offlineMs !== null) {
      this.offlineSince.textContent = this.offlineMs
        ? `${clockTime(this.offlineMs)} (${relativeTime(this.offlineMs, now)})`
        : 'unknown';
    }
  }

  // ---- current values ----

  renderValues(d) {
    const data = d.last && d.last.data && typeof d.last.data === 'object' ? d.last.data : null;
    let shape;
    if (!data) shape = 'empty';
    else if (Array.isArray(data.channels)) shape = `relay:${data.channels.length}`;
    else if (typeof data.hex === 'string' && Object.keys(data).length === 1) shape = 'hex';
    else shape = `fields:${Object.keys(data).join(',')}`;
    if (shape !== this.shape) {
      this.shape = shape;
      this.buildValues(shape, data);
    }
    const outOfRange = new Set(Array.isArray(d.last?.out_of_range) ? d.last.out_of_range : []);
    if (shape.startsWith('relay:')) this.renderRelay(d, data.channels);
    else if (shape === 'hex') this.hexValue.textContent = data.hex || '(empty)';
    else if (shape.startsWith('fields:')) {
      for (const [field, dd] of this.fieldValues) {
        const v = data[field];
        dd.textContent = typeof v === 'number' ? formatValue(field, v) : JSON.stringify(v);
        const bad = outOfRange.has(field);
        dd.dataset.outOfRange = String(bad);
        if (bad) {
          // Kept as the device sent it, but flagged: a battery does not hold 255 %.
          const mark = h('span', { class: 'range-mark', 'data-testid': 'out-of-range' }, ' ⚠');
          const why = `${fieldInfo(field).label} ${dd.textContent} is outside the range this protocol allows`;
          mark.title = why;
          mark.setAttribute('aria-label', why);
          mark.setAttribute('role', 'img');
          dd.append(mark);
        }
        const low = !bad && field === 'battery_pct' && typeof v === 'number' && v < 20;
        dd.dataset.low = String(low);
        if (low) dd.append(' (low)');
        this.sparks.get(field)?.draw(d.series.get(field));
      }
    }
  }

  buildValues(shape, data) {
    this.sparks.clear();
    if (shape === 'empty') {
      this.values.replaceChildren(h('p', { class: 'note' }, 'Waiting for the first reading…'));
    } else if (shape.startsWith('relay:')) {
      this.values.replaceChildren(this.buildRelay(data.channels.length));
    } else if (shape === 'hex') {
      this.hexValue = h('code', { class: 'hex', 'data-testid': 'value-hex' });
      const line = h('p', { class: 'hex-line' }, h('span', { class: 'label' }, 'Data (hex) '));
      line.append(this.hexValue);
      this.values.replaceChildren(line);
    } else {
      this.fieldValues = new Map();
      const rows = Object.keys(data).map((field) => {
        const dd = h('dd', { 'data-testid': `value-${field}` });
        this.fieldValues.set(field, dd);
        let spark = null;
        if (typeof data[field] === 'number') {
          spark = new Sparkline(field);
          this.sparks.set(field, spark);
        }
        return h(
          'div',
          { class: 'value' },
          h('dt', {}, fieldInfo(field).label),
          dd,
          spark ? h('dd', { class: 'spark-box' }, spark.element) : null,
        );
      });
      this.values.replaceChildren(h('dl', { class: 'value-list' }, rows));
    }
  }

  buildRelay(count) {
    this.switches = [];
    const label = `Relay channels of ${this.id}`;
    const box = h('div', { class: 'relays', role: 'group', 'aria-label': label });
    for (let ch = 0; ch < count; ch += 1) {
      // For a switch, aria-checked already says on or off: the word is for the eyes only.
      const hidden = this.operator ? 'true' : null;
      const state = h('span', { class: 'switch-state', 'aria-hidden': hidden });
      const name = h('span', { class: 'switch-name', 'data-testid': 'channel-name' }, `Ch ${ch}`);
      const spark = new Sparkline(`channels.${ch}`, { steps: true });
      const el = this.operator
        ? h(
            'button',
            {
              type: 'button',
              role: 'switch',
              class: 'switch',
              'aria-checked': 'false',
              'aria-label': `Channel ${ch}`,
              'data-testid': 'relay-channel',
              'data-channel': ch,
              onclick: () => this.flip(ch),
            },
            name,
            state,
            spark.element,
          )
        : h(
            'span',
            { class: 'switch readonly', 'data-testid': 'relay-channel', 'data-channel': ch },
            name,
            ' ',
            state,
            spark.element,
          );
      this.switches.push({ el, state, name, spark });
      box.append(el);
    }
    const parts = [box];
    if (this.operator) parts.push(this.view.output(`device:${this.id}:relay`));
    return h('div', { class: 'relay-block' }, parts);
  }

  renderRelay(d, channels) {
    channels.forEach((on, ch) => {
      const sw = this.switches[ch];
      if (!sw) return;
      const busy = this.pending.has(ch);
      const label = channelName(d, ch);
      sw.name.textContent = label;
      sw.el.dataset.on = String(Boolean(on));
      if (this.operator) {
        sw.el.setAttribute('aria-checked', String(Boolean(on)));
        const named = label === `Ch ${ch}` ? `Channel ${ch}` : `Channel ${ch} (${label})`;
        sw.el.setAttribute('aria-label', named);
        // Offline: nothing to switch. A click would only queue a command for later.
        sw.el.disabled = !d.online;
        sw.el.title = d.online ? '' : 'The device is offline';
        if (busy) sw.el.setAttribute('aria-busy', 'true');
        else sw.el.removeAttribute('aria-busy');
      }
      sw.state.textContent = (on ? 'On' : 'Off') + (busy ? '…' : '');
      sw.spark.draw(d.series.get(`channels.${ch}`));
    });
  }

  flip(ch) {
    const d = this.view.store.devices.get(this.id);
    const current = Boolean(d?.last?.data?.channels?.[ch]);
    const on = !current;
    const cmd = this.view.command({
      device: this.id,
      command: { name: 'set', args: { channel: ch, on } },
      origin: `device:${this.id}:relay`,
      label: `Channel ${ch} ${on ? 'on' : 'off'}`,
      channel: ch,
    });
    if (cmd) {
      this.pending.set(ch, cmd.id);
      this.view.deviceChanged(this.id);
    }
  }

  // ---- details and charts ----

  renderDetails(d) {
    const rows = [
      ['Protocol', d.protocol],
      ['Link', d.transport ?? 'unknown'],
      ['Peer', d.peer ?? '–'],
      ['Session', d.session ?? '–'],
      ['Connected at', d.connectedAt ? new Date(d.connectedAt).toLocaleString() : '–'],
      ['Latest offset', d.last ? String(d.last.offset) : '–'],
    ];
    const items = rows.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v)));
    this.info.replaceChildren(...items);
    const notes = {
      none: '',
      loading: 'Loading stored history…',
      loaded: '',
      error: `Stored history unavailable (${d.historyError}); showing live readings only.`,
    };
    this.historyNote.dataset.state = d.history;
    this.historyNote.textContent = notes[d.history] ?? '';
    this.historyNote.hidden = !this.historyNote.textContent;
    const numeric = [...d.series].filter(([field]) => !field.startsWith('channels.'));
    if (!numeric.length) {
      if (!this.noCharts) {
        const text = 'This device reports no numeric values to chart: see its device page.';
        this.noCharts = h('p', { class: 'note' }, text);
        this.chartsEl.replaceChildren(this.noCharts);
      }
      return;
    }
    if (this.noCharts) {
      this.noCharts.remove();
      this.noCharts = null;
    }
    for (const [field, points] of numeric) {
      let chart = this.charts.get(field);
      if (!chart) {
        chart = new LineChart(field);
        this.charts.set(field, chart);
        this.chartsEl.append(chart.element);
      }
      chart.draw(points);
    }
  }
}
