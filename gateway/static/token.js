// Where the access token lives. It arrives once as ?token= (the URL the
// gateway prints), is kept in sessionStorage (this tab only, gone when the tab
// closes) and is taken out of the address bar at once, so it does not end up
// in bookmarks, in the history list or in a screenshot of the page.

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

/** This page load's token: ?token= if given (then removed from the URL), else the stored one. */
export function takeToken() {
  const url = new URL(window.location.href);
  if (url.searchParams.has('token')) {
    const fromUrl = url.searchParams.get('token') ?? '';
    url.searchParams.delete('token');
    // replaceState, not pushState: the URL with the secret must not stay reachable with Back.
    window.history.replaceState(window.history.state, '', url.pathname + url.search + url.hash);
    if (fromUrl) storeToken(fromUrl);
  }
  return readToken();
}
