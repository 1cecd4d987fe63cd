// Where the access token lives. It arrives once in the fragment of the address
// the gateway prints (#token=...: browsers never send a fragment, so the token
// is in no request line, proxy log or Referer), is kept in sessionStorage (this
// tab only, gone when the tab closes) and is taken out of the address bar at
// once, so it does not end up in bookmarks, in the history list or in a
// screenshot of the page. The page itself never puts the token in a URL: its
// WebSocket carries it as a subprotocol and its HTTP calls in a header (api.js).

const KEY = 'iot-gateway.token';
let memory = null; // used when storage is unavailable (some privacy modes throw)

export function readToken() {
  try {
    return sessionStorage.getItem(KEY) ?? memory;
  } catch {
    return memory;
  }
}

export function storeToken(token) {
  memory = token;
  try {
    sessionStorage.setItem(KEY, token);
  } catch {
    // keep the in-memory copy only
  }
}

export function clearToken() {
  memory = null;
  try {
    sessionStorage.removeItem(KEY);
  } catch {
    // nothing stored
  }
}

/**
 * This page load's token: #token= if given, else ?token= (an old link; the
 * request has carried it already), else the stored one. Either is removed from
 * the address bar at once.
 */
export function takeToken() {
  const url = new URL(window.location.href);
  const fragment = new URLSearchParams(url.hash.slice(1));
  let given = null;
  if (fragment.has('token')) {
    given = fragment.get('token') ?? '';
    fragment.delete('token');
    const rest = fragment.toString();
    url.hash = rest ? `#${rest}` : '';
  }
  if (url.searchParams.has('token')) {
    const fromQuery = url.searchParams.get('token') ?? '';
    if (given === null) given = fromQuery;
    url.searchParams.delete('token');
  }
  if (given !== null) {
    // replaceState, not pushState: the URL with the secret must not stay reachable with Back.
    window.history.replaceState(window.history.state, '', url.pathname + url.search + url.hash);
    if (given) storeToken(given);
  }
  return readToken();
}
