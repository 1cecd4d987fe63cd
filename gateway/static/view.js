// Everything on screen. The view reads the store and calls back into the app
// for actions (commands, opening a device, the token form); it keeps one DOM
// node per device and updates it in place, so a value arriving never steals
// the keyboard focus from a field the operator is typing into. Updates are
// batched into one animation frame, which keeps a busy gateway from making the
// page redraw hundreds of times a second.

import { LineChart } from './chart.js';
import { h, uid } from './dom.js';
import { clockTime, fieldInfo, formatValue, isoTime, relativeTime } from './format.js';
import { FINAL_STATUSES } from './store.js';

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

function byTestId(id) {
  const el = document.querySelector(`[data-testid="${id}"]`);
  if (!el) throw new Error(`index.html lacks [data-testid="${id}"]`);
  return el;
}

/** "acked", "nacked (code 2)", "rejected: unknown command" ... */
function describeStatus(msg) {
  if (msg.status === 'nacked' && msg.code !== undefined) return `nacked (code ${msg.code})`;
  if (msg.error) return `${msg.status}: ${msg.error}`;
  return msg.status;
}

function statusTone(status) {
  if (status === 'acked') return 'ok';
  if (PENDING_STATUSES.has(status) || status === 'sending') return 'pending';
  return 'bad';
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
    this.groups = new Map(); // protocol -> Group
    this.cards = new Map(); // device id -> DeviceCard
    this.outputs = new Map(); // command origin -> <output> where its status shows
    this.dirty = new Set();
    this.frame = 0;
    this.connection = { state: 'connecting' };
    this.knownProtocols = '';

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
    this.search = byTestId('search');
    this.deviceCount = byTestId('device-count');
    this.empty = byTestId('no-devices');
    this.devicesEl = byTestId('devices');
    this.log = byTestId('event-log');

    this.retryButton.addEventListener('click', () => this.actions.retryNow());
    this.changeTokenButton.addEventListener('click', () => this.actions.changeToken());
    this.tokenForm.addEventListener('submit', (event) => {
      event.preventDefault();
      const token = this.tokenInput.value.trim();
      if (token) this.actions.submitToken(token);
    });
    this.protocolFilter.addEventListener('change', () => this.applyFilter());
    this.search.addEventListener('input', () => this.applyFilter());
    this.search.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && this.search.value) {
        this.search.value = '';
        this.applyFilter();
      }
    });
    // "/" jumps to the search box, as on many sites, unless the key is typed into a field.
    document.addEventListener('keydown', (event) => {
      const target = event.target;
      const typing =
        target instanceof HTMLInputElement ||
        target instanceof HTMLTextAreaElement ||
        target instanceof HTMLSelectElement;
      if (event.key === '/' && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
        event.preventDefault();
        this.search.focus();
      }
    });
    // Relative times and the reconnect countdown move on by themselves.
    setInterval(() => this.tick(), 1000);
    this.applyFilter();
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
      this.showTokenForm(
        'The gateway refused this token (HTTP 401 Unauthorized). ' +
          'Check the link you were given, or enter another token below.',
        true,
      );
    } else if (info.state === 'connected') {
      this.authPanel.hidden = true;
    }
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

  setRole(role) {
    if (role === this.role) return;
    const rebuild = this.role !== null;
    this.role = role;
    this.roleBadge.textContent = role === 'operator' ? 'Operator' : 'Viewer (read only)';
    this.roleBadge.dataset.role = role;
    if (rebuild) {
      // Command controls exist only for operators: build every card again.
      this.groups.clear();
      this.cards.clear();
      this.outputs.clear();
      this.devicesEl.replaceChildren();
      this.knownProtocols = '';
    }
    for (const id of this.store.devices.keys()) this.dirty.add(id);
    this.schedule();
    this.applyFilter(); // "waiting for the gateway" becomes "no device yet" if none comes
  }

  // ---- devices ----------------------------------------------------------------------------

  deviceChanged(id) {
    this.dirty.add(id);
    this.schedule();
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.flush();
    });
  }

  flush() {
    if (this.role === null) return; // cards are built once the role is known
    let added = false;
    const touched = new Set();
    for (const id of this.dirty) {
      const d = this.store.devices.get(id);
      if (!d) continue;
      let card = this.cards.get(id);
      if (card && card.protocol !== d.protocol) {
        card.remove();
        touched.add(card.group);
        card = null;
      }
      if (!card) {
        card = new DeviceCard(this, d, this.group(d.protocol));
        this.cards.set(id, card);
        added = true;
      }
      card.update(d);
      touched.add(card.group);
    }
    this.dirty.clear();
    for (const group of touched) group.update();
    if (added) {
      this.updateProtocolOptions();
      this.applyFilter();
    }
  }

  group(protocol) {
    let group = this.groups.get(protocol);
    if (!group) {
      group = new Group(this, protocol);
      this.groups.set(protocol, group);
      const next = [...this.groups.values()]
        .filter((g) => g !== group && g.protocol > protocol)
        .sort((a, b) => (a.protocol < b.protocol ? -1 : 1))[0];
      this.devicesEl.insertBefore(group.element, next ? next.element : null);
    }
    return group;
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

  applyFilter() {
    const protocol = this.protocolFilter.value;
    const query = this.search.value.trim().toLowerCase();
    let shown = 0;
    for (const group of this.groups.values()) {
      let any = false;
      for (const card of group.cards()) {
        const show =
          (!protocol || card.protocol === protocol) &&
          (!query || card.id.toLowerCase().includes(query));
        card.item.hidden = !show;
        if (show) {
          any = true;
          shown += 1;
        }
      }
      group.element.hidden = !any;
    }
    const total = this.cards.size;
    const plural = total === 1 ? '' : 's';
    this.deviceCount.textContent = total ? `${shown} of ${total} device${plural} shown` : '';
    this.empty.hidden = shown > 0;
    this.empty.textContent = total
      ? 'No device matches the filter.'
      : this.role === null
        ? 'Waiting for the gateway…'
        : 'No device has connected to this gateway yet.';
  }

  tick() {
    this.renderCountdown();
    const now = Date.now();
    for (const card of this.cards.values()) card.tick(now);
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

  /** Send a command; the app answers null when it could not be sent. */
  command(spec) {
    const cmd = this.actions.command(spec);
    if (cmd) this.commandChanged(cmd);
    return cmd;
  }

  commandChanged(cmd) {
    const out = this.outputs.get(cmd.origin);
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
        text = describeStatus(msg);
        out.dataset.status = msg.status;
      } else {
        // A protocol-wide command: one status per device, in id order.
        const parts = [...cmd.statuses.values()].sort((a, b) => (a.device < b.device ? -1 : 1));
        const tones = new Set(parts.map((m) => statusTone(m.status)));
        tone = tones.has('bad') ? 'bad' : tones.has('pending') ? 'pending' : 'ok';
        text = parts.map((m) => `${m.device} ${describeStatus(m)}`).join(', ');
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
        this.deviceChanged(cmd.device);
      }
    }
  }

  intervalForm(target, origin, scope) {
    const inputId = uid('interval');
    const input = h('input', {
      id: inputId,
      type: 'number',
      min: 1,
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

// ---- a protocol's group ---------------------------------------------------------------------

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
      view.role === 'operator' ? this.commands() : null,
      this.list,
    );
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
    return h(
      'details',
      { class: 'group-commands', 'data-testid': 'group-commands' },
      h('summary', {}, `Command every online ${this.protocol} device`),
      h('div', { class: 'cmd-grid' }, parts),
    );
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
        h(
          'button',
          { type: 'button', 'data-testid': 'group-on', onclick: () => send(true) },
          'On',
        ),
        h(
          'button',
          { type: 'button', 'data-testid': 'group-off', onclick: () => send(false) },
          'Off',
        ),
      ),
      out,
    );
  }

  *cards() {
    for (const card of this.view.cards.values()) if (card.group === this) yield card;
  }

  /** Put a card's list item in id order. */
  insert(card) {
    let next = null;
    for (const other of this.cards()) {
      if (other !== card && other.id > card.id && (!next || other.id < next.id)) next = other;
    }
    this.list.insertBefore(card.item, next ? next.item : null);
  }

  update() {
    let total = 0;
    let online = 0;
    for (const card of this.cards()) {
      total += 1;
      if (this.view.store.devices.get(card.id)?.online) online += 1;
    }
    this.count.textContent = `${total} device${total === 1 ? '' : 's'}, ${online} online`;
    if (!total) {
      this.element.remove();
      this.view.groups.delete(this.protocol);
    }
  }
}

// ---- one device -----------------------------------------------------------------------------

class DeviceCard {
  constructor(view, d, group) {
    this.view = view;
    this.id = d.id;
    this.protocol = d.protocol;
    this.group = group;
    this.operator = view.role === 'operator';
    this.isOpen = false;
    this.shape = null;
    this.charts = new Map();
    this.pending = new Map(); // relay channel -> id of the command switching it
    this.lastSeenMs = null;

    const titleId = uid('device');
    const panelId = uid('details');
    this.badge = h('span', { class: 'badge', 'data-testid': 'device-online' });
    this.transport = h('span', { 'data-testid': 'device-transport' });
    this.lastSeen = h('time', { 'data-testid': 'device-last-seen' });
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
      h('header', { class: 'card-head' }, h('h3', { id: titleId }, d.id), this.badge),
      h('p', { class: 'meta' }, this.transport, ' · last seen ', this.lastSeen),
      this.values,
      this.operator ? this.commands() : null,
      this.toggle,
      this.panel,
    );
    this.item = h('li', {}, this.element);
    group.insert(this);
  }

  remove() {
    this.item.remove();
    this.view.cards.delete(this.id);
  }

  commands() {
    const view = this.view;
    const target = { device: this.id };
    const origin = `device:${this.id}`;
    const parts = [];
    if (this.protocol === 'env-sensor') {
      parts.push(view.intervalForm(target, origin, ''), view.rebootControl(target, origin, ''));
    }
    parts.push(view.hexForm(target, origin));
    return h(
      'details',
      { class: 'commands', 'data-testid': 'command-panel' },
      h('summary', {}, 'Commands'),
      h('div', { class: 'cmd-grid' }, parts),
    );
  }

  setOpen(open) {
    this.isOpen = open;
    this.toggle.setAttribute('aria-expanded', String(open));
    this.panel.hidden = !open;
    if (open) this.view.actions.openDevice(this.id);
    this.view.deviceChanged(this.id);
  }

  update(d) {
    const el = this.element;
    el.dataset.online = String(d.online);
    el.dataset.offset = d.last ? String(d.last.offset) : '';
    this.badge.textContent = d.online ? 'Online' : 'Offline';
    this.badge.dataset.online = String(d.online);
    this.transport.textContent = d.transport ?? 'link unknown';
    this.transport.title = d.peer ? `peer ${d.peer}` : '';
    this.lastSeenMs = d.lastSeen;
    this.lastSeen.dateTime = isoTime(d.lastSeen);
    this.lastSeen.title = d.lastSeen ? new Date(d.lastSeen).toLocaleString() : '';
    this.tick(Date.now());
    this.renderValues(d);
    if (this.isOpen) this.renderDetails(d);
  }

  tick(now) {
    this.lastSeen.textContent = relativeTime(this.lastSeenMs, now);
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
    if (shape.startsWith('relay:')) this.renderRelay(data.channels);
    else if (shape === 'hex') this.hexValue.textContent = data.hex || '(empty)';
    else if (shape.startsWith('fields:')) {
      for (const [field, dd] of this.fieldValues) {
        const v = data[field];
        dd.textContent = typeof v === 'number' ? formatValue(field, v) : JSON.stringify(v);
        const low = field === 'battery_pct' && typeof v === 'number' && v < 20;
        dd.dataset.low = String(low);
        if (low) dd.append(' (low)');
      }
    }
  }

  buildValues(shape, data) {
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
        return h('div', { class: 'value' }, h('dt', {}, fieldInfo(field).label), dd);
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
      const name = h('span', { class: 'switch-name' }, `Ch ${ch}`);
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
          )
        : h(
            'span',
            { class: 'switch readonly', 'data-testid': 'relay-channel', 'data-channel': ch },
            name,
            ' ',
            state,
          );
      this.switches.push({ el, state });
      box.append(el);
    }
    const parts = [box];
    if (this.operator) parts.push(this.view.output(`device:${this.id}:relay`));
    return h('div', { class: 'relay-block' }, parts);
  }

  renderRelay(channels) {
    channels.forEach((on, ch) => {
      const sw = this.switches[ch];
      if (!sw) return;
      const busy = this.pending.has(ch);
      sw.el.dataset.on = String(Boolean(on));
      if (this.operator) {
        sw.el.setAttribute('aria-checked', String(Boolean(on)));
        if (busy) sw.el.setAttribute('aria-busy', 'true');
        else sw.el.removeAttribute('aria-busy');
      }
      sw.state.textContent = (on ? 'On' : 'Off') + (busy ? '…' : '');
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
    if (!d.series.size) {
      if (!this.noCharts) {
        const text = 'This device reports no numeric values to chart.';
        this.noCharts = h('p', { class: 'note' }, text);
        this.chartsEl.replaceChildren(this.noCharts);
      }
      return;
    }
    if (this.noCharts) {
      this.noCharts.remove();
      this.noCharts = null;
    }
    for (const [field, points] of d.series) {
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
