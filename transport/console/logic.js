// The console's own logic, without the DOM or Leaflet: colours, cell shading, the
// graticule, headings, search parsing and how a server error is shown. Unit-tested by
// logic.test.js (`npm test` in transport/console).

/** The colour of a driver's status on the map. */
export const STATUS_COLOURS = Object.freeze({
  available: '#2e7d32',
  offered: '#ef6c00',
  on_trip: '#1565c0',
});

export const RIDER_COLOUR = '#c2185b';

export function statusColour(status) {
  return STATUS_COLOURS[status] ?? '#757575';
}

/**
 * How a cell of the zoomed-out view is drawn: its fill follows open requests (red, more
 * requests darker) where there are any, else the drivers in it (green, more darker);
 * opacity from 0.1 to 0.6 on a log scale so one cell of 500 does not wash out the rest.
 */
export function cellStyle(cell) {
  const drivers = (cell.available ?? 0) + (cell.offered ?? 0) + (cell.on_trip ?? 0);
  const requests = cell.open_requests ?? 0;
  const n = requests > 0 ? requests : drivers;
  const fillOpacity = n === 0 ? 0.05 : Math.min(0.6, 0.1 + 0.1 * Math.log2(1 + n));
  return {
    color: '#607d8b',
    weight: 1,
    fillColor: requests > 0 ? '#d32f2f' : '#2e7d32',
    fillOpacity: Math.round(fillOpacity * 1000) / 1000,
  };
}

/** A surging cell: amber to deep red as the multiplier goes from 1 to 3 and above. */
export function surgeStyle(multiplier, pinned) {
  const t = Math.max(0, Math.min(1, (multiplier - 1) / 2));
  const r = 255;
  const g = Math.round(193 - 150 * t);
  const b = Math.round(7 + 20 * t);
  return {
    color: pinned ? '#4a148c' : `rgb(${r},${g},${b})`,
    weight: pinned ? 3 : 2,
    dashArray: pinned ? '6 4' : null,
    fill: false,
  };
}

/** A cell's label in the zoomed-out view. */
export function cellLabel(cell) {
  const drivers = (cell.available ?? 0) + (cell.offered ?? 0) + (cell.on_trip ?? 0);
  return `${cell.cell}: ${drivers} drivers (${cell.available ?? 0} available, ${cell.offered ?? 0} offered, ${cell.on_trip ?? 0} on trip), ${cell.open_requests ?? 0} open requests`;
}

/** The point `metres` from (lat, lng) towards `heading` (degrees from north). */
export function headingEnd(lat, lng, heading, metres) {
  const r = 6371008.8;
  const d = metres / r;
  const h = (heading * Math.PI) / 180;
  const p1 = (lat * Math.PI) / 180;
  const l1 = (lng * Math.PI) / 180;
  const p2 = Math.asin(Math.sin(p1) * Math.cos(d) + Math.cos(p1) * Math.sin(d) * Math.cos(h));
  const l2 =
    l1 + Math.atan2(Math.sin(h) * Math.sin(d) * Math.cos(p1), Math.cos(d) - Math.sin(p1) * Math.sin(p2));
  return [(p2 * 180) / Math.PI, (((l2 * 180) / Math.PI + 540) % 360) - 180];
}

const STEPS = [30, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001];

/** The graticule's spacing in degrees: the finest step that gives at most `maxLines` lines across. */
export function graticuleStep(span, maxLines = 12) {
  let best = STEPS[0];
  for (const s of STEPS) {
    if (span / s <= maxLines) best = s;
  }
  return best;
}

/** The graticule's lines inside bounds {south, west, north, east}: [[lat, lng], [lat, lng]] pairs. */
export function graticuleLines(b, maxLines = 12) {
  const step = graticuleStep(Math.max(b.north - b.south, b.east - b.west), maxLines);
  const lines = [];
  const south = Math.max(-90, b.south);
  const north = Math.min(90, b.north);
  for (let lat = Math.ceil(south / step) * step; lat <= north; lat += step) {
    lines.push([[lat, b.west], [lat, b.east]]);
  }
  for (let lng = Math.ceil(b.west / step) * step; lng <= b.east; lng += step) {
    lines.push([[south, lng], [north, lng]]);
  }
  return { step, lines };
}

/** The view the feed is asked for, from Leaflet bounds and zoom, clamped to the globe. */
export function viewOf(south, west, north, east, zoom) {
  const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
  return {
    type: 'view',
    south: clamp(south, -90, 90),
    west: clamp(west, -180, 180),
    north: clamp(north, -90, 90),
    east: clamp(east, -180, 180),
    zoom: clamp(Math.round(zoom), 0, 22),
  };
}

export const TRIP_STATES = Object.freeze([
  'dispatching',
  'driver_assigned',
  'driver_arrived',
  'in_progress',
  'completed',
  'cancelled',
  'no_driver_found',
]);

/**
 * What a search box entry asks for: a trip by id, trips of a rider or driver, or trips
 * in a state. Returns {kind: 'trip', id} or {kind: 'list', query} (a URL query string),
 * or {kind: 'invalid', message}.
 */
export function parseSearch(q) {
  const s = (q ?? '').trim();
  if (s.startsWith('trp_')) return { kind: 'trip', id: s };
  if (s.startsWith('rdr_')) return { kind: 'list', query: `rider_id=${encodeURIComponent(s)}` };
  if (s.startsWith('drv_')) return { kind: 'list', query: `driver_id=${encodeURIComponent(s)}` };
  if (TRIP_STATES.includes(s)) return { kind: 'list', query: `state=${s}` };
  if (s === '') return { kind: 'list', query: '' };
  return { kind: 'invalid', message: `not a trip, rider or driver id, nor one of: ${TRIP_STATES.join(', ')}` };
}

/** A server's error as the operator sees it: the status, the code and the message, as said. */
export function errorText(status, body) {
  const e = body && typeof body === 'object' ? body.error : null;
  if (e && typeof e.code === 'string') return `${status} ${e.code}: ${e.message ?? ''}`;
  return `${status}: the server answered without an error body`;
}

/** Formats a number of milliseconds, or a dash when there is none. */
export function ms(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
}

export function percent(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return `${Math.round(v * 100)} %`;
}
