// How values and times read on the page. Labels and units of the built-in
// protocols' fields (docs/protocols.md); any other numeric field is shown by
// its JSON name, so a new protocol still gets values and charts.

export const FIELDS = Object.freeze({
  temperature_c: { label: 'Temperature', unit: '°C', digits: 2 },
  humidity_pct: { label: 'Humidity', unit: '%', digits: 1 },
  battery_pct: { label: 'Battery', unit: '%', digits: 0 },
});

export function fieldInfo(name) {
  return FIELDS[name] ?? { label: name, unit: '', digits: 2 };
}

export function formatNumber(name, value) {
  if (typeof value !== 'number' || !Number.isFinite(value)) return '–';
  const { digits } = fieldInfo(name);
  const text = Number.isInteger(value) && digits === 0 ? String(value) : value.toFixed(digits);
  return text;
}

export function formatValue(name, value) {
  const { unit } = fieldInfo(name);
  const text = formatNumber(name, value);
  return unit && text !== '–' ? `${text} ${unit}` : text;
}

/** "just now", "12 s ago", "3 min ago", "2 h ago", or a date for older times. */
export function relativeTime(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return 'never';
  const seconds = Math.round((now - ms) / 1000);
  if (seconds < 2) return 'just now'; // also covers a gateway clock slightly ahead of ours
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

export function clockTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

export function isoTime(ms) {
  return ms === null || ms === undefined ? '' : new Date(ms).toISOString();
}
