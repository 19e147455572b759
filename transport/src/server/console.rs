//! The operator's console (issue 18): the page at `/admin/console` with its assets
//! embedded in the binary (`transport/console/`), and the live feed `/admin/v1/ws/live`.
//!
//! The page and its assets are the one exception to "every admin route needs the admin
//! token": a browser cannot send a bearer header when it navigates. They hold no data.
//! Every byte of data comes through the token-protected admin routes and the feed, whose
//! first message must carry the admin token (never the URL, where proxies log it).
//! Shapes and bounds: `docs/api.md`, "The operator's console".

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dispatch_actors::admin::{Counters, Window};
use dispatch_actors::{ApiError, ErrorCode};
use dispatch_engine::{CellId, DriverStatus, Point, TripState};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::HttpError;
use super::{App, admin, auth};

/// The page and its assets: path, content type, bytes.
const ASSETS: [(&str, &str, &[u8]); 6] = [
    (
        "/admin/console",
        "text/html; charset=utf-8",
        include_bytes!("../../console/index.html"),
    ),
    (
        "/admin/console/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/app.js"),
    ),
    (
        "/admin/console/logic.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/logic.js"),
    ),
    (
        "/admin/console/console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/console.css"),
    ),
    (
        "/admin/console/vendor/leaflet.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/leaflet/leaflet.js"),
    ),
    (
        "/admin/console/vendor/leaflet.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/vendor/leaflet/leaflet.css"),
    ),
];

/// Console feeds open at once; one more upgrade is answered 503 (`console_feeds`).
pub const MAX_FEEDS: usize = 8;
/// Items (drivers, cells, waiting riders, trips, surge cells) in one update at most; the
/// rest are left out, the update says `truncated`, and `console_feed_items` counts it.
pub const MAX_ITEMS: usize = 2_000;
/// From this map zoom on, the feed sends each driver; below it, counts per H3 cell.
pub const EXACT_ZOOM: u8 = 14;
/// How often the feed sends an update.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long a new feed has to send its first message (the token).
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one update may take to send before the feed is closed (`console_feed_send`).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message a console sends (the token, a viewport).
const MAX_IN_BYTES: usize = 4 * 1024;

/// The console's state in the server: open feeds and the last minute's counters.
#[derive(Debug)]
pub struct Console {
    feeds: AtomicUsize,
    /// `(when, counters)`, oldest first, sampled every [`SAMPLE_EVERY`] for [`SAMPLES`].
    samples: Mutex<VecDeque<(Instant, Counters)>>,
    /// `--console-tiles-url`.
    tiles_url: Option<String>,
    /// The Content-Security-Policy of the page (allows the tile server's origin, if any).
    csp: HeaderValue,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Enough samples to reach back one minute.
const SAMPLES: usize = 13;

impl Console {
    pub fn new(tiles_url: Option<String>) -> Self {
        let tiles = tiles_url.as_deref().map(tile_origin).unwrap_or_default();
        let csp = format!(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:{tiles}; \
             connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        );
        Self {
            feeds: AtomicUsize::new(0),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES + 1)),
            tiles_url,
            csp: HeaderValue::from_str(&csp).expect("checked by Config"),
        }
    }

    /// Records the counters now; called every [`SAMPLE_EVERY`] by [`spawn_sampler`].
    fn sample(&self, c: Counters) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((Instant::now(), c));
        while s.len() > SAMPLES {
            s.pop_front();
        }
    }

    /// The last minute (or since the oldest sample, when the server is younger): from
    /// the newest sample at least 60 s old, else the oldest, to `now`.
    pub fn last_minute(&self, now: &Counters) -> (Window, u64) {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let minute = Duration::from_secs(60);
        let from = s
            .iter()
            .rev()
            .find(|(at, _)| at.elapsed() >= minute)
            .or_else(|| s.front());
        match from {
            Some((at, c)) => (now.since(c), at.elapsed().as_secs()),
            None => (now.since(now), 0),
        }
    }
}

/// `" https://tiles.example.com"` for a tile URL template (checked by `Config`).
fn tile_origin(url: &str) -> String {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("");
    let scheme = url.split_once("://").map_or("https", |(s, _)| s);
    format!(" {scheme}://{host}")
}

/// Checks `--console-tiles-url`: an `http(s)://host[:port]/…` template with `{z}`, `{x}`
/// and `{y}`, and no character that could end a CSP source or a header.
pub fn check_tiles_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "--console-tiles-url {url:?}: {why} (e.g. https://tiles.example.com/{{z}}/{{x}}/{{y}}.png)"
        )
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(bad("the host must be a plain host[:port]"));
    }
    if !["{z}", "{x}", "{y}"].iter().all(|p| url.contains(p)) {
        return Err(bad("must contain {z}, {x} and {y}"));
    }
    if url
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b";,'\"".contains(&b))
    {
        return Err(bad("must not contain spaces, quotes, ';' or ','"));
    }
    Ok(())
}

/// Samples the counters every 5 s for the last minute's numbers (`GET /admin/stats`).
pub fn spawn_sampler(app: App) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            app.console.sample(app.system.counters());
        }
    })
}

/// The page, its assets and the feed, for the operator routes.
pub fn routes() -> Router<App> {
    let mut r = Router::new().route("/admin/v1/ws/live", get(live));
    for (path, kind, bytes) in ASSETS {
        r = r.route(
            path,
            get(move |State(app): State<App>| async move { asset(&app, kind, bytes) }),
        );
    }
    r
}

fn asset(app: &App, kind: &'static str, bytes: &'static [u8]) -> Response {
    let mut r = bytes.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CONTENT_SECURITY_POLICY, app.console.csp.clone());
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// Frees a feed's slot when the feed ends, however it ends.
struct Slot(App);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.console.feeds.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /admin/v1/ws/live`: the upgrade needs no header (browsers cannot set one); the
/// first message must be `{"type":"auth","token":"<admin token>"}`.
async fn live(
    State(app): State<App>,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let up = match up {
        Ok(up) => up,
        Err(e) => return super::ws::not_an_upgrade(e),
    };
    if app.console.feeds.fetch_add(1, Ordering::AcqRel) >= MAX_FEEDS {
        app.console.feeds.fetch_sub(1, Ordering::AcqRel);
        app.metrics.bound_hit("console_feeds");
        return HttpError(ApiError::unavailable(format!(
            "{MAX_FEEDS} console feeds are open already; close one"
        )))
        .into_response();
    }
    let slot = Slot(app.clone());
    up.max_message_size(MAX_IN_BYTES)
        .max_frame_size(MAX_IN_BYTES)
        .on_upgrade(move |socket| async move {
            feed(app, socket).await;
            drop(slot);
        })
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMsg {
    Auth { token: String },
    View(View),
}

/// The part of the map the console shows: its bounds and its Leaflet zoom.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct View {
    pub south: f64,
    pub west: f64,
    pub north: f64,
    pub east: f64,
    pub zoom: u8,
}

impl View {
    fn check(self) -> Result<Self, String> {
        let lat = |v: f64| v.is_finite() && (-90.0..=90.0).contains(&v);
        let lng = |v: f64| v.is_finite() && (-180.0..=180.0).contains(&v);
        if !(lat(self.south) && lat(self.north) && lng(self.west) && lng(self.east)) {
            return Err("the view's bounds must be finite coordinates".into());
        }
        if self.south > self.north || self.west > self.east {
            return Err("the view needs south <= north and west <= east".into());
        }
        if self.zoom > 22 {
            return Err("`zoom` must be from 0 to 22".into());
        }
        Ok(self)
    }

    fn contains(&self, p: Point) -> bool {
        (self.south..=self.north).contains(&p.lat()) && (self.west..=self.east).contains(&p.lng())
    }
}

async fn send_error(socket: &mut WebSocket, code: ErrorCode, message: &str) {
    let text = json!({"type": "error", "code": code.as_str(), "message": message}).to_string();
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await;
}

/// Refuses the feed: an `error` message, then a close 1008 whose reason says why.
async fn refuse(socket: &mut WebSocket, code: ErrorCode, message: &str) {
    send_error(socket, code, message).await;
    let reason = format!("{}: {message}", code.as_str());
    let _ = tokio::time::timeout(
        SEND_TIMEOUT,
        socket.send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: reason.chars().take(120).collect::<String>().into(),
        }))),
    )
    .await;
}

/// The first message, which must carry the admin token.
async fn authenticate(app: &App, socket: &mut WebSocket) -> Result<(), (ErrorCode, String)> {
    let first = match tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await {
        Err(_) => {
            return Err((ErrorCode::Unauthorized, "no auth message within 5 s".into()));
        }
        Ok(None | Some(Err(_))) => return Err((ErrorCode::Unauthorized, "closed".into())),
        Ok(Some(Ok(m))) => m,
    };
    let Message::Text(text) = first else {
        return Err((
            ErrorCode::Unauthorized,
            "the first message must be {\"type\":\"auth\",\"token\":…}".into(),
        ));
    };
    match serde_json::from_str::<ClientMsg>(&text) {
        Ok(ClientMsg::Auth { token }) => admin::admin_token(app, &auth::hash(token.trim()))
            .map_err(|HttpError(e)| (e.code, e.message)),
        _ => Err((
            ErrorCode::Unauthorized,
            "the first message must be {\"type\":\"auth\",\"token\":…}".into(),
        )),
    }
}

async fn feed(app: App, mut socket: WebSocket) {
    if let Err((code, message)) = authenticate(&app, &mut socket).await {
        refuse(&mut socket, code, &message).await;
        return;
    }
    let welcome = json!({
        "type": "welcome",
        "interval_ms": INTERVAL.as_millis() as u64,
        "max_items": MAX_ITEMS,
        "exact_zoom": EXACT_ZOOM,
        "tiles_url": app.console.tiles_url,
    });
    if socket
        .send(Message::Text(welcome.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut view: Option<View> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = app.shutdown.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(v) = view else { continue };
                // A scan of the whole fleet: off the async workers.
                let a = app.clone();
                let Ok(text) = tokio::task::spawn_blocking(move || update(&a, &v).to_string()).await else {
                    return;
                };
                match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        app.metrics.bound_hit("console_feed_send");
                        return;
                    }
                }
            }
            m = socket.recv() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMsg>(&text) {
                    Ok(ClientMsg::View(v)) => match v.check() {
                        Ok(v) => {
                            let first = view.is_none();
                            view = Some(v);
                            if first {
                                tick.reset_immediately();
                            }
                        }
                        Err(e) => send_error(&mut socket, ErrorCode::BadRequest, &e).await,
                    },
                    Ok(ClientMsg::Auth { .. }) => {
                        send_error(&mut socket, ErrorCode::BadRequest, "already authenticated").await
                    }
                    Err(e) => send_error(&mut socket, ErrorCode::BadRequest, &format!("not a console message: {e}")).await,
                },
                Some(Ok(_)) => {}
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = socket.send(Message::Close(Some(CloseFrame { code: 1001, reason: "shutting down".into() }))).await;
                return;
            }
        }
    }
}

/// The H3 resolution cells are counted at for a Leaflet zoom (about 20 to 60 px a cell).
pub fn cell_resolution(zoom: u8) -> u8 {
    match zoom {
        0..=4 => 2,
        5..=6 => 3,
        7..=8 => 4,
        9..=10 => 5,
        11 => 6,
        12 => 7,
        _ => 8,
    }
}

fn cell_at(p: Point, res: u8) -> Option<CellId> {
    let ll = h3o::LatLng::new(p.lat(), p.lng()).ok()?;
    Some(ll.to_cell(h3o::Resolution::try_from(res).ok()?))
}

fn boundary(c: CellId) -> Vec<[f64; 2]> {
    c.boundary()
        .iter()
        .map(|v| [round6(v.lat()), round6(v.lng())])
        .collect()
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// Counts per cell at one resolution.
#[derive(Default)]
struct CellCount {
    available: u32,
    offered: u32,
    on_trip: u32,
    open_requests: u32,
}

/// Items kept for one update, up to [`MAX_ITEMS`] in all.
struct Budget {
    left: usize,
    truncated: bool,
}

impl Budget {
    fn take(&mut self) -> bool {
        if self.left == 0 {
            self.truncated = true;
            false
        } else {
            self.left -= 1;
            true
        }
    }
}

/// One update for a view: counts per cell, and from [`EXACT_ZOOM`] on each driver too;
/// riders waiting, trips in flight and surging cells in the view; at most [`MAX_ITEMS`].
pub fn update(app: &App, v: &View) -> Value {
    let exact = v.zoom >= EXACT_ZOOM;
    let res = cell_resolution(v.zoom);
    let mut budget = Budget {
        left: MAX_ITEMS,
        truncated: false,
    };
    let mut drivers = Vec::new();
    let mut cells: HashMap<CellId, CellCount> = HashMap::new();
    // Where each driver on a trip is, for the trips' lines.
    let mut on_trip: HashMap<String, Point> = HashMap::new();
    app.system.for_each_driver(|d| {
        let Some(p) = d.position else { return };
        let status = d.status.as_str();
        if let DriverStatus::OnTrip(t) | DriverStatus::Offered(t) = &d.status {
            on_trip.insert(t.as_str().to_owned(), p);
        }
        if !v.contains(p) || !matches!(status, "available" | "offered" | "on_trip") {
            return;
        }
        if exact && budget.take() {
            drivers.push(json!({
                "id": d.id.as_str(),
                "lat": p.lat(),
                "lng": p.lng(),
                "heading": d.heading,
                "status": status,
            }));
        }
        if let Some(c) = cell_at(p, res) {
            let e = cells.entry(c).or_default();
            match status {
                "available" => e.available += 1,
                "offered" => e.offered += 1,
                _ => e.on_trip += 1,
            }
        }
    });
    let mut waiting = Vec::new();
    let mut trips = Vec::new();
    app.system.for_each_live_trip(|t| {
        if t.state == TripState::Dispatching {
            if !v.contains(t.pickup) {
                return;
            }
            if let Some(c) = cell_at(t.pickup, res) {
                cells.entry(c).or_default().open_requests += 1;
            }
            if budget.take() {
                waiting.push(json!({
                    "trip_id": t.trip_id.as_str(),
                    "rider_id": t.rider_id.as_str(),
                    "lat": t.pickup.lat(),
                    "lng": t.pickup.lng(),
                }));
            }
        } else {
            let driver = on_trip.get(t.trip_id.as_str()).copied();
            let seen = v.contains(t.pickup) || driver.is_some_and(|p| v.contains(p));
            if seen && budget.take() {
                trips.push(json!({
                    "trip_id": t.trip_id.as_str(),
                    "state": t.state.as_str(),
                    "pickup": {"lat": t.pickup.lat(), "lng": t.pickup.lng()},
                    "driver": driver.map(|p| json!({"lat": p.lat(), "lng": p.lng()})),
                }));
            }
        }
    });
    let mut cell_rows = Vec::new();
    for (c, n) in &cells {
        if !budget.take() {
            break;
        }
        cell_rows.push(json!({
            "cell": c.to_string(),
            "boundary": boundary(*c),
            "available": n.available,
            "offered": n.offered,
            "on_trip": n.on_trip,
            "open_requests": n.open_requests,
        }));
    }
    let surge_cells: Vec<(CellId, f64, bool)> = {
        let book = app.system.lock_surge();
        book.cells()
            .iter()
            .filter(|c| c.multiplier > 1.0 || c.pinned.is_some())
            .map(|c| (c.cell, c.multiplier, c.pinned.is_some()))
            .collect()
    };
    let mut surge = Vec::new();
    for (c, multiplier, pinned) in surge_cells {
        if !v.contains(dispatch_engine::Grid::centre(c)) {
            continue;
        }
        if !budget.take() {
            break;
        }
        surge.push(json!({
            "cell": c.to_string(),
            "boundary": boundary(c),
            "multiplier": multiplier,
            "pinned": pinned,
        }));
    }
    if budget.truncated {
        app.metrics.bound_hit("console_feed_items");
    }
    json!({
        "type": "update",
        "mode": if exact { "drivers" } else { "cells" },
        "resolution": res,
        "drivers": drivers,
        "cells": cell_rows,
        "riders": waiting,
        "trips": trips,
        "surge": surge,
        "truncated": budget.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_urls_are_checked() {
        assert!(check_tiles_url("https://tiles.example.com/{z}/{x}/{y}.png").is_ok());
        assert!(check_tiles_url("http://127.0.0.1:8080/t/{z}/{x}/{y}.png").is_ok());
        for bad in [
            "ftp://x/{z}/{x}/{y}",
            "https://x/{z}/{x}.png",
            "https://x y/{z}/{x}/{y}",
            "https:///{z}/{x}/{y}",
            "https://x/{z}/{x}/{y};script-src *",
        ] {
            assert!(check_tiles_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            tile_origin("https://tiles.example.com:8443/{z}/{x}/{y}.png"),
            " https://tiles.example.com:8443"
        );
    }

    #[test]
    fn views_are_checked() {
        let v = View {
            south: 45.0,
            west: -74.0,
            north: 46.0,
            east: -73.0,
            zoom: 12,
        };
        assert!(v.check().is_ok());
        assert!(View { south: 47.0, ..v }.check().is_err());
        assert!(
            View {
                east: f64::NAN,
                ..v
            }
            .check()
            .is_err()
        );
        assert!(View { zoom: 23, ..v }.check().is_err());
        assert!(v.contains(Point::new(45.5, -73.5).unwrap()));
        assert!(!v.contains(Point::new(44.5, -73.5).unwrap()));
    }

    #[test]
    fn coarser_cells_when_zoomed_out() {
        let mut last = cell_resolution(0);
        for z in 1..=22 {
            assert!(cell_resolution(z) >= last);
            last = cell_resolution(z);
        }
        assert_eq!(cell_resolution(EXACT_ZOOM - 1), 8);
    }
}
