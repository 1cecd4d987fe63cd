// The dashboard's WebSocket to the gateway (docs/api.md §3):
// one socket at a time, reconnected with capped exponential backoff and
// jitter, frames split on newlines (the gateway batches objects), and a bad
// token told apart from a gateway that is down.

export const State = Object.freeze({
  CONNECTING: 'connecting', // first attempt of this page load
  CONNECTED: 'connected', // welcome received
  RECONNECTING: 'reconnecting', // waiting out a backoff delay, or retrying
  UNAUTHORIZED: 'unauthorized', // the gateway refused the token: retrying would not help
  STOPPED: 'stopped', // stop() was called (token being changed)
});

/**
 * Capped exponential backoff with "equal jitter": half of each delay is fixed,
 * half random. The fixed half keeps a flapping gateway from being hammered;
 * the random half spreads the dashboards of a whole plant floor out, so they
 * do not all reconnect in the same millisecond after a gateway restart.
 */
export class Backoff {
  constructor({ initial = 500, max = 10000, factor = 2, random = Math.random } = {}) {
    this.initial = initial;
    this.max = max;
    this.factor = factor;
    this.random = random;
    this.attempt = 0;
  }

  next() {
    const cap = Math.min(this.max, this.initial * this.factor ** this.attempt);
    this.attempt += 1;
    return cap / 2 + this.random() * (cap / 2);
  }

  reset() {
    this.attempt = 0;
  }
}

export class Connection {
  /**
   * @param {object} options
   * @param {() => string} options.url the ws:// URL (never with the token in it)
   * @param {() => string[]} options.protocols the subprotocols to offer (they carry the token)
   * @param {() => Promise<string>} options.probe resolves 'unauthorized', 'ok' or 'unreachable'
   * @param {(msg: object) => void} options.onMessage every object received, in order
   * @param {(state: object) => void} options.onState {state, retryAt, attempt, role}
   */
  constructor({ url, protocols = () => [], probe, onMessage, onState, backoff = new Backoff() }) {
    this.url = url;
    this.protocols = protocols;
    this.probe = probe;
    this.onMessage = onMessage;
    this.onState = onState;
    this.backoff = backoff;
    this.ws = null;
    this.timer = null;
    this.state = null;
    this.connects = 0; // sockets that reached "welcome", for the page's test hook
    this.everConnected = false;
  }

  start() {
    this.setState(State.CONNECTING);
    this.open();
  }

  /** Close for good (the token is being replaced). */
  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, 'page closing');
    this.setState(State.STOPPED);
  }

  /**
   * The token was refused elsewhere (an HTTP call got 401): the gateway no
   * longer takes it, so stop for good rather than retry with it.
   */
  refused() {
    if (this.state === State.UNAUTHORIZED || this.state === State.STOPPED) return;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, 'token refused');
    this.setState(State.UNAUTHORIZED);
  }

  /** Skip the rest of the backoff delay (the "Retry now" button, the browser going online). */
  retryNow() {
    if (this.state !== State.RECONNECTING || this.ws) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.setState(State.RECONNECTING, { retryAt: null });
    this.open();
  }

  /** Send one object as one frame; false when there is no open socket. */
  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  setState(state, extra = {}) {
    this.state = state;
    this.onState({ state, attempt: this.backoff.attempt, retryAt: null, ...extra });
  }

  open() {
    const ws = new WebSocket(this.url(), this.protocols());
    this.ws = ws;
    let welcomed = false;
    ws.addEventListener('message', (event) => {
      if (this.ws !== ws || typeof event.data !== 'string') return;
      // One frame may carry several JSON objects separated by newlines.
      for (const line of event.data.split('\n')) {
        if (!line.trim()) continue;
        let msg;
        try {
          msg = JSON.parse(line);
        } catch {
          console.warn('gateway sent a line that is not JSON:', line.slice(0, 200));
          continue;
        }
        if (msg && msg.op === 'welcome') {
          welcomed = true;
          this.everConnected = true;
          this.connects += 1;
          // Reset only once the gateway has really taken us: a socket that opens
          // and is dropped at once must keep backing off.
          this.backoff.reset();
          this.setState(State.CONNECTED, { role: msg.role });
        }
        this.onMessage(msg);
      }
    });
    // 'error' is always followed by 'close', which handles both.
    ws.addEventListener('close', (event) => {
      if (this.ws !== ws) return; // an old socket, already replaced or stopped
      this.ws = null;
      this.closed(event, welcomed);
    });
  }

  async closed(event, welcomed) {
    if (!welcomed) {
      // A refused upgrade (HTTP 401) looks like any network failure to a page:
      // close code 1006 and no status. Ask the HTTP API with the same token.
      const verdict = await this.probe();
      if (this.state === State.STOPPED) return;
      if (verdict === 'unauthorized') {
        this.setState(State.UNAUTHORIZED);
        return;
      }
    }
    if (this.state === State.STOPPED) return;
    const delay = this.backoff.next();
    const retryAt = Date.now() + delay;
    this.setState(State.RECONNECTING, { retryAt, code: event.code, wasConnected: welcomed });
    this.timer = setTimeout(() => {
      this.timer = null;
      this.setState(State.RECONNECTING, { retryAt: null });
      this.open();
    }, delay);
  }
}
