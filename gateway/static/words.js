// Codes in words: the gateway and the devices speak in codes (a NACK's status
// byte, an offline reason, an error code); an operator should not need the
// docs open to read the page. docs/api.md §3 and docs/protocol.md §3 list them.

// Offline reasons of `presence` and of a device entry's `offline_reason`.
const OFFLINE_REASONS = Object.freeze({
  closed: 'the device closed its link',
  lost: 'the link failed',
  silent: 'nothing heard for too long (heartbeat missed)',
  garbage: 'the link sent mostly garbage',
  not_reading: 'the device stopped reading its link',
  shutdown: 'the gateway stopped',
  replaced: 'another connection took over its id',
  auth_failed: 'its HELLO carried a wrong token',
  missing: 'its serial port is missing',
});

/** "the link failed (lost)"; an unknown reason is shown as it came. */
export function offlineReason(reason) {
  if (!reason) return 'reason unknown';
  const words = OFFLINE_REASONS[reason];
  return words ? `${words} (${reason})` : reason;
}

// The ACK status codes of the built-in protocols (docs/protocols.md): a
// gateway that sends a NACK's `message` says it itself; this covers an older one.
const ACK_CODES = Object.freeze({
  'env-sensor': { 1: 'unknown command', 2: 'bad argument' },
  'relay-4': { 1: 'unknown command', 2: 'bad argument' },
});

/** A NACK in words: the gateway's `message`, else the protocol's name for the code. */
export function nackWords(msg, protocol) {
  if (typeof msg.message === 'string' && msg.message) return msg.message;
  const known = ACK_CODES[protocol]?.[msg.code];
  if (known) return known;
  return msg.code === undefined ? 'device error' : `device error code ${msg.code}`;
}

// The gateway's error codes (docs/api.md §2), for the event log and command statuses.
const ERROR_CODES = Object.freeze({
  bad_request: 'bad request',
  unauthorized: 'not signed in (token refused)',
  forbidden: 'not allowed for this token (read only)',
  not_found: 'not found',
  conflict: 'not possible now',
  rate_limited: 'too many commands at once, try again shortly',
  unavailable: 'storage unavailable',
  storage_unavailable: 'storage unavailable',
  too_large: 'too large',
});

/** "rate_limited" -> "too many commands at once, try again shortly (rate_limited)". */
export function errorCode(code) {
  const words = ERROR_CODES[code];
  return words ? `${words} (${code})` : String(code);
}

// Serial port states of GET /api/serial.
export const SERIAL_STATES = Object.freeze({
  open: 'Open',
  retrying: 'Retrying',
  missing: 'Missing',
});
