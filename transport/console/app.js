// The operator's console: login, the live map (feed /admin/v1/ws/live), the headline
// numbers, trip search and the operator's actions. Every byte of data comes from the
// admin routes with the admin token as a bearer header, or from the feed, whose first
// message carries it. The token lives in sessionStorage (this tab) only.
import {
  statusColour, RIDER_COLOUR, cellStyle, cellLabel, surgeStyle, headingEnd, graticuleLines,
  viewOf, parseSearch, errorText, ms, percent,
} from './logic.js';

const KEY = 'dispatchd.admin_token';
const $ = (id) => document.getElementById(id);

// ---- REST -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(errorText(status, body));
    this.status = status;
  }
}

async function api(method, path, body, token = sessionStorage.getItem(KEY)) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10000);
  let r;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit',
      cache: 'no-store',
      signal: controller.signal,
    });
  } catch (e) {
    throw new Error(`the server did not answer: ${e.message}`);
  } finally {
    clearTimeout(timer);
  }
  let json = null;
  try {
    json = await r.json();
  } catch {
    json = null;
  }
  if (!r.ok) throw new ApiError(r.status, json);
  return json;
}

// ---- Login ------------------------------------------------------------------------------

async function login(token) {
  $('login-error').textContent = '';
  try {
    await api('GET', '/admin/stats', undefined, token);
  } catch (e) {
    $('login-error').textContent = `Refused: ${e.message}`;
    return;
  }
  sessionStorage.setItem(KEY, token);
  start();
}

$('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  login($('token').value.trim());
});

$('logout').addEventListener('click', () => {
  sessionStorage.removeItem(KEY);
  location.reload();
});

// ---- Map --------------------------------------------------------------------------------

const state = {
  map: null,
  drivers: new Map(), // id → {marker, arrow, status}
  layers: null,
  feed: null,
  lastUpdate: null,
  updates: 0,
  welcome: null,
  renders: [],
};
window.dispatchConsole = state; // read by the browser test

function graticule(map, layer) {
  layer.clearLayers();
  const b = map.getBounds();
  const { lines } = graticuleLines({
    south: b.getSouth(), west: b.getWest(), north: b.getNorth(), east: b.getEast(),
  });
  for (const l of lines) L.polyline(l, { color: '#b0bec5', weight: 1, interactive: false }).addTo(layer);
}

function setupMap(welcome) {
  const map = L.map('map', { zoomControl: true, worldCopyJump: false }).setView([20, 0], 2);
  L.control.scale({ metric: true, imperial: false }).addTo(map);
  const grid = L.layerGroup().addTo(map);
  if (welcome.tiles_url) {
    L.tileLayer(welcome.tiles_url, { maxZoom: 19, referrerPolicy: 'no-referrer' }).addTo(map);
  }
  const layers = {
    grid,
    cells: L.layerGroup().addTo(map),
    surge: L.layerGroup().addTo(map),
    trips: L.layerGroup().addTo(map),
    riders: L.layerGroup().addTo(map),
    drivers: L.layerGroup().addTo(map),
  };
  state.map = map;
  state.layers = layers;
  const moved = () => {
    if (!welcome.tiles_url) graticule(map, grid);
    sendView();
  };
  map.on('moveend', moved);
  moved();
  fitToCity(map);
}

/** Starts over the active cells (GET /admin/cells), so the map opens on the city. */
async function fitToCity(map) {
  try {
    const page = await api('GET', '/admin/cells?active=true&limit=1000');
    const pts = page.cells.map((c) => [c.center.lat, c.center.lng]);
    if (pts.length > 0) map.fitBounds(L.latLngBounds(pts).pad(0.3), { maxZoom: 15 });
  } catch (e) {
    showError(e);
  }
}

function sendView() {
  const { map, feed } = state;
  if (!map || !feed || feed.readyState !== WebSocket.OPEN) return;
  const b = map.getBounds();
  feed.send(JSON.stringify(viewOf(b.getSouth(), b.getWest(), b.getNorth(), b.getEast(), map.getZoom())));
}

function drawDriver(d) {
  const colour = statusColour(d.status);
  let entry = state.drivers.get(d.id);
  if (!entry) {
    const marker = L.circleMarker([d.lat, d.lng], {
      radius: 6, color: '#fff', weight: 1.5, fillColor: colour, fillOpacity: 1,
      className: `driver driver-${d.id}`,
    }).bindTooltip(d.id);
    marker.on('click', () => { $('driver-id').value = d.id; });
    const arrow = L.polyline([[d.lat, d.lng], [d.lat, d.lng]], { color: colour, weight: 2, interactive: false });
    entry = { marker, arrow, status: d.status };
    state.drivers.set(d.id, entry);
    arrow.addTo(state.layers.drivers);
    marker.addTo(state.layers.drivers);
  }
  entry.marker.setLatLng([d.lat, d.lng]);
  if (entry.status !== d.status || !entry.marker.options.fillColor) {
    entry.marker.setStyle({ fillColor: colour });
    entry.arrow.setStyle({ color: colour });
    entry.status = d.status;
  }
  const end = d.heading == null ? [d.lat, d.lng] : headingEnd(d.lat, d.lng, d.heading, 60);
  entry.arrow.setLatLngs([[d.lat, d.lng], end]);
}

function render(u) {
  const { layers } = state;
  // Drivers, updated in place; those no longer sent are removed.
  const seen = new Set();
  for (const d of u.drivers) {
    drawDriver(d);
    seen.add(d.id);
  }
  for (const [id, e] of state.drivers) {
    if (!seen.has(id)) {
      layers.drivers.removeLayer(e.marker);
      layers.drivers.removeLayer(e.arrow);
      state.drivers.delete(id);
    }
  }
  layers.cells.clearLayers();
  for (const c of u.cells) {
    L.polygon(c.boundary, cellStyle(c)).bindTooltip(cellLabel(c))
      .on('click', () => { $('surge-cell').value = c.cell; })
      .addTo(layers.cells);
  }
  layers.surge.clearLayers();
  for (const s of u.surge) {
    L.polygon(s.boundary, surgeStyle(s.multiplier, s.pinned))
      .bindTooltip(`${s.cell}: surge ×${s.multiplier}${s.pinned ? ' (pinned)' : ''}`)
      .on('click', () => { $('surge-cell').value = s.cell; })
      .addTo(layers.surge);
  }
  layers.riders.clearLayers();
  for (const r of u.riders) {
    L.circleMarker([r.lat, r.lng], {
      radius: 5, color: RIDER_COLOUR, weight: 2, fillColor: '#fff', fillOpacity: 1, className: 'rider',
    }).bindTooltip(`${r.rider_id} waiting (${r.trip_id})`)
      .on('click', () => showTrip(r.trip_id))
      .addTo(layers.riders);
  }
  layers.trips.clearLayers();
  for (const t of u.trips) {
    const pickup = [t.pickup.lat, t.pickup.lng];
    L.circleMarker(pickup, { radius: 3, color: RIDER_COLOUR, weight: 1 }).addTo(layers.trips);
    if (t.driver) {
      L.polyline([[t.driver.lat, t.driver.lng], pickup], { color: '#1565c0', weight: 2, dashArray: '4 4' })
        .bindTooltip(`${t.trip_id} ${t.state}`)
        .on('click', () => showTrip(t.trip_id))
        .addTo(layers.trips);
    }
  }
  state.lastUpdate = u;
  state.updates += 1;
  $('feed-note').textContent = `${u.mode === 'drivers' ? 'each driver' : `per H3 cell (resolution ${u.resolution})`}${u.truncated ? ' — truncated at the feed bound; zoom in' : ''}`;
}

// ---- Feed -------------------------------------------------------------------------------

function openFeed(onWelcome) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/admin/v1/ws/live`);
  state.feed = ws;
  ws.addEventListener('open', () => {
    ws.send(JSON.stringify({ type: 'auth', token: sessionStorage.getItem(KEY) }));
  });
  ws.addEventListener('message', (ev) => {
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (m.type === 'welcome') {
      state.welcome = m;
      $('feed-state').textContent = 'live';
      onWelcome(m);
      sendView();
    } else if (m.type === 'update') {
      const t0 = performance.now();
      render(m);
      // The last 120 renders' durations and sizes, for the performance check.
      state.renders.push({ ms: performance.now() - t0, bytes: ev.data.length });
      if (state.renders.length > 120) state.renders.shift();
    } else if (m.type === 'error') {
      $('feed-state').textContent = `feed: ${m.code}: ${m.message}`;
    }
  });
  ws.addEventListener('close', (ev) => {
    if (state.feed !== ws) return;
    $('feed-state').textContent = `feed closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ''}); retrying`;
    setTimeout(() => openFeed(() => {}), 3000);
  });
}

// ---- Headline numbers -------------------------------------------------------------------

async function headline() {
  try {
    const s = await api('GET', '/admin/stats');
    $('n-available').textContent = s.drivers.available ?? 0;
    $('n-offered').textContent = s.drivers.offered ?? 0;
    $('n-on_trip').textContent = s.drivers.on_trip ?? 0;
    $('n-open').textContent = s.trips.dispatching ?? 0;
    $('n-match').textContent = percent(s.last_minute.match_rate);
    $('n-offer').textContent = `${ms(s.last_minute.request_to_offer_p50_ms)} / ${ms(s.last_minute.request_to_offer_p99_ms)}`;
    $('n-restarts').textContent = `${s.actor_restarts} (${s.last_minute.actor_restarts} in the last minute)`;
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      sessionStorage.removeItem(KEY);
      location.reload();
    }
  }
}

// ---- Trips and actions ------------------------------------------------------------------

function showError(e) {
  $('action-result').textContent = '';
  $('action-error').textContent = e.message;
}

function showDone(text) {
  $('action-error').textContent = '';
  $('action-result').textContent = text;
}

$('search-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const q = parseSearch($('search-q').value);
  const list = $('results');
  list.replaceChildren();
  if (q.kind === 'invalid') return showError(new Error(q.message));
  if (q.kind === 'trip') return showTrip(q.id);
  try {
    const page = await api('GET', `/admin/trips?limit=50${q.query ? `&${q.query}` : ''}`);
    for (const t of page.trips) {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.textContent = `${t.trip_id} ${t.state}`;
      a.dataset.trip = t.trip_id;
      a.addEventListener('click', () => showTrip(t.trip_id));
      li.append(a);
      list.append(li);
    }
    if (page.trips.length === 0) list.textContent = 'No trip found.';
  } catch (e) {
    showError(e);
  }
});

let shown = null;

async function showTrip(id) {
  try {
    const t = await api('GET', `/admin/trips/${encodeURIComponent(id)}`);
    shown = t.trip;
    $('trip').hidden = false;
    $('trip-id').textContent = t.trip.trip_id;
    $('trip-state').textContent = t.trip.state;
    $('trip-rider').textContent = t.trip.rider_id;
    $('trip-driver').textContent = t.trip.driver_id ?? '–';
    if (t.trip.driver_id) $('driver-id').value = t.trip.driver_id;
    const h = $('trip-history');
    h.replaceChildren();
    for (const s of t.history) {
      const li = document.createElement('li');
      li.textContent = `${s.at} ${s.from ?? '∅'} → ${s.to} by ${s.by}${s.driver_id ? ` (${s.driver_id})` : ''}`;
      h.append(li);
    }
  } catch (e) {
    showError(e);
  }
}

/** Asks before an action; resolves true when confirmed. */
function confirmAction(text) {
  const d = $('confirm');
  $('confirm-text').textContent = text;
  return new Promise((resolve) => {
    d.addEventListener('close', () => resolve(d.returnValue === 'yes'), { once: true });
    d.returnValue = '';
    d.showModal();
  });
}

async function act(text, method, path, body, done) {
  if (!(await confirmAction(text))) return;
  try {
    const r = await api(method, path, body);
    showDone(done(r));
  } catch (e) {
    showError(e);
  }
}

$('cancel-trip').addEventListener('click', () => {
  if (!shown) return;
  const id = shown.trip_id;
  act(`Cancel trip ${id}?`, 'POST', `/admin/trips/${encodeURIComponent(id)}/cancel`,
    { reason: $('cancel-reason').value }, (t) => {
      showTrip(id);
      return `Trip ${id} is ${t.state}.`;
    });
});

$('refund-trip').addEventListener('click', () => {
  if (!shown) return;
  const id = shown.trip_id;
  const amount = Number($('refund-amount').value);
  act(`Refund ${amount} cents on trip ${id}?`, 'POST', `/admin/trips/${encodeURIComponent(id)}/refund`,
    { amount_cents: amount, reason: $('cancel-reason').value }, () => `Refunded ${amount} cents on ${id}.`);
});

for (const [button, suspend] of [['suspend', true], ['unsuspend', false]]) {
  $(button).addEventListener('click', () => {
    const id = $('driver-id').value.trim();
    act(`${suspend ? 'Suspend' : 'Unsuspend'} driver ${id}?`, 'POST',
      `/admin/drivers/${encodeURIComponent(id)}/${button}`, {}, (d) => `Driver ${d.driver_id} is ${d.status}.`);
  });
}

for (const [button, pin] of [['pin', true], ['unpin', false]]) {
  $(button).addEventListener('click', () => {
    const cell = $('surge-cell').value.trim();
    const multiplier = pin ? Number($('surge-multiplier').value) : null;
    act(pin ? `Pin cell ${cell}'s surge at ×${multiplier}?` : `Unpin cell ${cell}'s surge?`, 'PUT',
      `/admin/surge/cells/${encodeURIComponent(cell)}`, { multiplier },
      () => (pin ? `Cell ${cell} pinned at ×${multiplier}.` : `Cell ${cell} unpinned.`));
  });
}

// ---- Start ------------------------------------------------------------------------------

function start() {
  $('login').hidden = true;
  $('console').hidden = false;
  openFeed((welcome) => {
    if (!state.map) setupMap(welcome);
  });
  headline();
  setInterval(headline, 2000);
}

if (sessionStorage.getItem(KEY)) start();
