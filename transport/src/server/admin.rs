//! The admin console (`/admin/`): fleet statistics, drivers, riders, trips, cells,
//! pricing and actor groups. Every route needs the admin token ([`Admin`]); a rider's or
//! driver's token is 403, no token or an unknown one 401. Shapes: `docs/api.md`.

use std::sync::atomic::Ordering;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dispatch_actors::admin::{CellRow, DriverFilter, TripFilter};
use dispatch_actors::metrics::DRIVER_STATUSES;
use dispatch_actors::payments::ProviderMode;
use dispatch_actors::records::{DriverRecord, RiderRecord};
use dispatch_actors::views::TripView;
use dispatch_actors::{ApiError, ErrorCode};
use dispatch_engine::trip::Mover;
use dispatch_engine::{
    Account, CellId, DriverId, DriverStatus, Entry, Point, Product, RateCard, RateCardError,
    RateCards, RiderId, TripId, TripState,
};
use dispatch_persistence::Transition;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{HttpError, JsonBody, QueryParams, bearer_hash, json_body};
use super::openapi as doc;
use super::render;
use super::{App, auth};

/// The caller holds the admin token.
pub struct Admin;

impl FromRequestParts<App> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, HttpError> {
        let hash = bearer_hash(parts)?;
        admin_token(app, &hash).map(|()| Admin)
    }
}

/// Whether a token's hash is the admin token's: 503 while not ready, 403 for a rider's or
/// driver's token, 401 for any other (the routes and the console's feed alike).
pub fn admin_token(app: &App, hash: &[u8; 32]) -> Result<(), HttpError> {
    if !app.ready.load(Ordering::Acquire) {
        return Err(HttpError(ApiError::unavailable(
            "the server is starting or shutting down",
        )));
    }
    if auth::same_hash(hash, &app.admin_token_hash) {
        return Ok(());
    }
    if app.system.authenticate(hash).is_some() {
        return Err(HttpError(ApiError::forbidden(
            "admin routes need the admin token",
        )));
    }
    Err(HttpError(ApiError::new(
        ErrorCode::Unauthorized,
        "unknown token",
    )))
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/stats", get(stats))
        .route("/admin/drivers", get(drivers))
        .route("/admin/drivers/{id}", get(driver))
        .route("/admin/drivers/{id}/suspend", post(suspend))
        .route("/admin/drivers/{id}/unsuspend", post(unsuspend))
        .route("/admin/riders/{id}", get(rider))
        .route("/admin/trips", get(trips))
        .route("/admin/trips/{id}", get(trip))
        .route("/admin/trips/{id}/cancel", post(cancel))
        .route("/admin/cells", get(cells))
        .route("/admin/pricing", get(pricing).put(set_pricing))
        .route("/admin/actors", get(actors))
        .route("/admin/ledger", get(ledger))
        .route("/admin/trips/{id}/refund", post(refund))
        .route("/admin/surge", get(surge).put(set_surge_cap))
        .route("/admin/surge/cells/{cell}", axum::routing::put(pin_surge))
        .route(
            "/admin/payments/provider",
            get(provider_mode).put(set_provider_mode),
        )
        .route("/admin/openapi.json", get(openapi))
}

/// This API's OpenAPI document (`docs/openapi.json`), for the admin token like every
/// admin route: it lists the admin console's routes.
#[utoipa::path(get, path = "/admin/openapi.json", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi(_: Admin) -> Json<Value> {
    Json(doc::document_json())
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(ErrorCode::BadRequest, msg))
}

/// Page size from `limit`: 1 to 1000, default 100.
fn limit(v: &Option<String>) -> Result<usize, HttpError> {
    match v.as_deref() {
        None => Ok(100),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| bad("`limit` must be an integer from 1 to 1000")),
    }
}

/// Cursors are opaque to clients: the list they belong to and the last id of the page,
/// `<list>:<last>`, after a MAC of it ([`cursor_mac`]), base64url. Only the server can
/// make one, so a cursor that was altered (another id, another list, cut short) is
/// refused rather than paging from the wrong place.
fn cursor_out(app: &App, list: &str, last: &str) -> String {
    let position = format!("{list}:{last}");
    let mut bytes = cursor_mac(app, &position).finalize().into_bytes()[..CURSOR_TAG].to_vec();
    bytes.extend_from_slice(position.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Bytes of HMAC-SHA256 kept in a cursor: 128 bits, so a guess is right once in 2^128.
const CURSOR_TAG: usize = 16;

/// HMAC-SHA256 of a cursor's position, keyed per deployment: the key is derived, with its
/// own domain, from the admin token's hash, which is stable across restarts (so a cursor
/// still pages after one) and known only to the server and the admin token's holder.
fn cursor_mac(app: &App, position: &str) -> Hmac<Sha256> {
    let key = Sha256::new()
        .chain_update(b"dispatchd admin list cursor key v1\0")
        .chain_update(app.admin_token_hash)
        .finalize();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(position.as_bytes());
    mac
}

/// Whether `s` is an id the server makes: its prefix and 32 lowercase hex digits.
fn is_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// A cursor whose position is an id with `prefix`.
fn cursor_id(
    app: &App,
    list: &str,
    prefix: &str,
    v: &Option<String>,
) -> Result<Option<String>, HttpError> {
    match cursor_in(app, list, v)? {
        Some(c) if !is_id(&c, prefix) => Err(bad("`cursor` is not a cursor this list gave out")),
        c => Ok(c),
    }
}

/// The position a cursor of `list` holds, if the server made it for `list`.
fn cursor_in(app: &App, list: &str, v: &Option<String>) -> Result<Option<String>, HttpError> {
    let Some(c) = v.as_deref() else {
        return Ok(None);
    };
    let invalid = || bad("`cursor` is not a cursor this list gave out");
    let bytes = URL_SAFE_NO_PAD.decode(c).map_err(|_| invalid())?;
    if bytes.len() <= CURSOR_TAG {
        return Err(invalid());
    }
    let (tag, position) = bytes.split_at(CURSOR_TAG);
    let position = std::str::from_utf8(position).map_err(|_| invalid())?;
    // Compared in constant time, so a forger learns nothing from how long a refusal took.
    cursor_mac(app, position)
        .verify_truncated_left(tag)
        .map_err(|_| invalid())?;
    let last = position
        .strip_prefix(list)
        .and_then(|r| r.strip_prefix(':'))
        .filter(|r| !r.is_empty())
        .ok_or_else(invalid)?;
    Ok(Some(last.to_owned()))
}

fn point(p: Point) -> Value {
    json!({"lat": p.lat(), "lng": p.lng()})
}

fn driver_json(app: &App, d: &DriverRecord) -> Value {
    let grid = app.system.config().grid;
    let connected = d.session.as_ref().is_some_and(|s| !s.is_closed());
    json!({
        "driver_id": d.id.as_str(),
        "name": d.profile.name,
        "vehicle": render::vehicle(&d.profile.vehicle),
        "status": d.status.as_str(),
        "connected": connected,
        "location": d.position.map(point),
        "heading": d.heading,
        "cell": d.position.map(|p| grid.cell_of(p).to_string()),
        "trip_id": match &d.status {
            DriverStatus::Offered(t) | DriverStatus::OnTrip(t) => Some(t.as_str()),
            _ => None,
        },
    })
}

fn rider_json(r: &RiderRecord) -> Value {
    let connected = r.session.as_ref().is_some_and(|s| !s.is_closed());
    json!({
        "rider_id": r.id.as_str(),
        "name": r.profile.name,
        "phone": r.profile.phone,
        "connected": connected,
        "location": r.position.map(point),
        "trip": r.trip.as_ref().map(render::trip),
    })
}

fn transition_json(t: &Transition) -> Value {
    let (by, driver_id) = match &t.by {
        Mover::Rider => ("rider", None),
        Mover::Driver(d) => ("driver", Some(d.as_str())),
        Mover::Admin => ("admin", None),
        Mover::System => ("system", None),
    };
    // The request itself is journaled as version 1; it has no state before it.
    let from = (t.version > 1).then(|| t.from.as_str());
    json!({
        "from": from,
        "to": t.to.as_str(),
        "by": by,
        "driver_id": driver_id,
        "at": render::rfc3339(t.at_ms),
        "version": t.version,
    })
}

fn cell_json(c: &CellRow) -> Value {
    json!({
        "cell": c.cell.to_string(),
        "resolution": u8::from(c.cell.resolution()),
        "center": point(c.centre),
        "available_drivers": c.available_drivers,
        "busy_drivers": c.busy_drivers,
        "open_requests": c.open_requests,
        "surge": c.surge,
    })
}

fn rate_json(r: &RateCard) -> Value {
    json!({
        "base_cents": r.base_cents,
        "per_km_cents": r.per_km_cents,
        "per_minute_cents": r.per_minute_cents,
        "minimum_cents": r.minimum_cents,
        "booking_fee_cents": r.booking_fee_cents,
        "cancellation_fee_cents": r.cancellation_fee_cents,
    })
}

fn pricing_json(r: &RateCards) -> Value {
    json!({
        "currency": r.currency,
        "products": {
            "economy": rate_json(&r.economy),
            "xl": rate_json(&r.xl),
            "premium": rate_json(&r.premium),
        },
    })
}

#[utoipa::path(
    get, path = "/admin/stats", tag = "admin",
    security(("admin" = [])),
    responses((status = 200, description = "Fleet statistics", body = doc::Stats)),
)]
async fn stats(_: Admin, State(app): State<App>) -> Json<Value> {
    let counts = app.system.fleet_counts();
    let sessions = |role: &str| app.transport.sessions.with_label_values(&[role]).get();
    let actors: serde_json::Map<String, Value> = app
        .system
        .actor_stats()
        .into_iter()
        .map(|g| (g.group.to_owned(), json!(g.alive)))
        .collect();
    let now = app.system.counters();
    let (w, window_s) = app.console.last_minute(&now);
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs(),
        "ready": app.ready.load(Ordering::Acquire),
        "drivers": counts.drivers,
        "trips": counts.trips,
        "trips_finished_since_start": app.system.finished_since_start(),
        "open_offers": counts.open_offers,
        "sessions": {"driver": sessions("driver"), "rider": sessions("rider")},
        "actors": actors,
        "actor_restarts": now.restarts,
        "last_minute": {
            "window_s": window_s,
            "assigned": w.assigned,
            "no_driver_found": w.no_driver_found,
            "match_rate": w.match_rate,
            "request_to_offer_count": w.request_to_offer_count,
            "request_to_offer_p50_ms": w.request_to_offer_p50_ms,
            "request_to_offer_p99_ms": w.request_to_offer_p99_ms,
            "actor_restarts": w.restarts,
        },
    }))
}

#[derive(Debug, Deserialize)]
struct DriversQuery {
    status: Option<String>,
    product: Option<String>,
    cell: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn product_param(v: &Option<String>) -> Result<Option<Product>, HttpError> {
    v.as_deref()
        .map(|p| {
            p.parse()
                .map_err(|_| bad("`product` must be economy, xl or premium"))
        })
        .transpose()
}

#[utoipa::path(
    get, path = "/admin/drivers", tag = "admin",
    params(
        ("status" = Option<String>, Query, description = "offline, available, offered, on_trip or suspended"),
        ("product" = Option<crate::wire::Product>, Query),
        ("cell" = Option<String>, Query, description = "An H3 index at the matching resolution or coarser"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`"),
    ),
    security(("admin" = [])),
    responses((status = 200, description = "A page of drivers", body = doc::DriverPage)),
)]
async fn drivers(
    _: Admin,
    State(app): State<App>,
    QueryParams(q): QueryParams<DriversQuery>,
) -> Result<Json<Value>, HttpError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(*DRIVER_STATUSES.iter().find(|x| **x == s).ok_or_else(|| {
            bad(format!(
                "`status` must be one of {}",
                DRIVER_STATUSES.join(", ")
            ))
        })?),
    };
    let grid_res = app.system.config().grid.resolution();
    let cell = match q.cell.as_deref() {
        None => None,
        Some(c) => {
            let cell: CellId = c
                .parse()
                .map_err(|_| bad("`cell` is not an H3 cell index"))?;
            if u8::from(cell.resolution()) > grid_res {
                return Err(bad(format!(
                    "`cell` must be of resolution {grid_res} (the matching resolution) or coarser"
                )));
            }
            Some(cell)
        }
    };
    let filter = DriverFilter {
        status,
        product: product_param(&q.product)?,
        cell,
    };
    let after = cursor_id(&app, "drivers", DriverId::PREFIX, &q.cursor)?.map(DriverId::new);
    let page = app
        .system
        .drivers_page(&filter, after.as_ref(), limit(&q.limit)?);
    Ok(Json(json!({
        "drivers": page.items.iter().map(|d| driver_json(&app, d)).collect::<Vec<_>>(),
        "next_cursor": page.next.map(|id| cursor_out(&app, "drivers", id.as_str())),
    })))
}

#[utoipa::path(
    get, path = "/admin/drivers/{id}", tag = "admin",
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The driver", body = doc::AdminDriver)),
)]
async fn driver(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let d = app
        .system
        .driver_record(&DriverId::new(id))
        .ok_or_else(|| HttpError(ApiError::not_found("driver")))?;
    Ok(Json(driver_json(&app, &d)))
}

/// An optional body: `{"reason"}` is accepted (and logged), nothing else is required.
#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
struct SuspendBody {
    reason: Option<String>,
}

async fn set_suspended(
    app: &App,
    id: String,
    body: &[u8],
    suspend: bool,
) -> Result<Json<Value>, HttpError> {
    if body.len() > app.config.max_frame_bytes {
        return Err(HttpError(ApiError::new(
            ErrorCode::TooLarge,
            "the body is too large",
        )));
    }
    let b: SuspendBody = if body.iter().all(u8::is_ascii_whitespace) {
        SuspendBody::default()
    } else {
        json_body(body)?
    };
    if let Some(r) = &b.reason
        && r.chars().count() > 500
    {
        return Err(bad("`reason` is limited to 500 characters"));
    }
    let id = DriverId::new(id);
    tracing::info!(driver_id = %id, suspend, reason = b.reason.as_deref().unwrap_or(""), "admin suspension request");
    let d = app.system.set_suspended(&id, suspend).await?;
    Ok(Json(driver_json(app, &d)))
}

#[utoipa::path(
    post, path = "/admin/drivers/{id}/suspend", tag = "admin",
    request_body = Option<SuspendBody>,
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The driver, suspended", body = doc::AdminDriver)),
)]
async fn suspend(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, HttpError> {
    set_suspended(&app, id, &body, true).await
}

#[utoipa::path(
    post, path = "/admin/drivers/{id}/unsuspend", tag = "admin",
    request_body = Option<SuspendBody>,
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The driver, offline", body = doc::AdminDriver)),
)]
async fn unsuspend(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, HttpError> {
    set_suspended(&app, id, &body, false).await
}

#[utoipa::path(
    get, path = "/admin/riders/{id}", tag = "admin",
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The rider", body = doc::AdminRider)),
)]
async fn rider(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let r = app
        .system
        .rider_record(&RiderId::new(id))
        .ok_or_else(|| HttpError(ApiError::not_found("rider")))?;
    Ok(Json(rider_json(&r)))
}

#[derive(Debug, Deserialize)]
struct TripsQuery {
    state: Option<String>,
    rider_id: Option<String>,
    driver_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/admin/trips", tag = "admin",
    params(
        ("state" = Option<crate::wire::TripState>, Query),
        ("rider_id" = Option<String>, Query),
        ("driver_id" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`"),
    ),
    security(("admin" = [])),
    responses((status = 200, description = "A page of trips", body = doc::TripPage)),
)]
async fn trips(
    _: Admin,
    State(app): State<App>,
    QueryParams(q): QueryParams<TripsQuery>,
) -> Result<Json<Value>, HttpError> {
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            TripState::ALL
                .into_iter()
                .find(|x| x.as_str() == s)
                .ok_or_else(|| {
                    bad(format!(
                        "`state` must be one of {}",
                        TripState::ALL.map(|s| s.as_str()).join(", ")
                    ))
                })?,
        ),
    };
    let filter = TripFilter {
        state,
        rider_id: q.rider_id.map(RiderId::new),
        driver_id: q.driver_id.map(DriverId::new),
    };
    let limit = limit(&q.limit)?;
    let after = cursor_id(&app, "trips", TripId::PREFIX, &q.cursor)?.map(TripId::new);
    let page = app.system.trips_page(filter, after, limit).await?;
    Ok(Json(json!({
        "trips": page.items.iter().map(render::trip).collect::<Vec<_>>(),
        "next_cursor": page.next.map(|id| cursor_out(&app, "trips", id.as_str())),
    })))
}

#[utoipa::path(
    get, path = "/admin/trips/{id}", tag = "admin",
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The trip, its history and its payments", body = doc::AdminTrip)),
)]
async fn trip(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let (view, history): (TripView, Vec<Transition>) = app
        .system
        .trip_history(&TripId::new(id))
        .await?
        .ok_or_else(|| HttpError(ApiError::not_found("trip")))?;
    let entries = app.system.trip_entries(&view.trip_id).await?;
    Ok(Json(json!({
        "trip": render::trip(&view),
        "history": history.iter().map(transition_json).collect::<Vec<_>>(),
        "payments": entries.iter().map(entry_json).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CancelBody {
    reason: Option<String>,
}

#[utoipa::path(
    post, path = "/admin/trips/{id}/cancel", tag = "admin",
    request_body = CancelBody,
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The trip, cancelled", body = crate::wire::Trip)),
)]
async fn cancel(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CancelBody>,
) -> Result<Json<Value>, HttpError> {
    let reason = b.reason.map(|r| r.trim().to_owned()).unwrap_or_default();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(bad("`reason` is required: 1 to 500 characters"));
    }
    let id = TripId::new(id);
    tracing::info!(trip_id = %id, reason = %reason, "admin cancel");
    let view = app.system.admin_cancel(&id, reason).await?;
    Ok(Json(json!(render::trip(&view))))
}

#[derive(Debug, Deserialize)]
struct CellsQuery {
    active: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/admin/cells", tag = "admin",
    params(
        ("active" = Option<bool>, Query, description = "Only cells with a driver or an open request"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`"),
    ),
    security(("admin" = [])),
    responses((status = 200, description = "A page of cells", body = doc::CellPage)),
)]
async fn cells(
    _: Admin,
    State(app): State<App>,
    QueryParams(q): QueryParams<CellsQuery>,
) -> Result<Json<Value>, HttpError> {
    let active = match q.active.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(bad("`active` must be true or false")),
    };
    let limit = limit(&q.limit)?;
    let after = match cursor_in(&app, "cells", &q.cursor)? {
        None => None,
        Some(c) => Some(
            c.parse::<u64>()
                .ok()
                .and_then(|n| CellId::try_from(n).ok())
                .ok_or_else(|| bad("`cursor` is not a cursor this list gave out"))?,
        ),
    };
    let page = app.system.cells_page(active, after, limit).await;
    Ok(Json(json!({
        "cells": page.items.iter().map(cell_json).collect::<Vec<_>>(),
        "next_cursor": page.next.map(|c| cursor_out(&app, "cells", &u64::from(c).to_string())),
    })))
}

#[utoipa::path(
    get, path = "/admin/pricing", tag = "admin",
    security(("admin" = [])),
    responses((status = 200, description = "The rate cards", body = PricingIn)),
)]
async fn pricing(_: Admin, State(app): State<App>) -> Json<Value> {
    Json(pricing_json(&app.system.rates()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = Rate)]
struct RateIn {
    base_cents: i64,
    per_km_cents: i64,
    per_minute_cents: i64,
    minimum_cents: i64,
    booking_fee_cents: i64,
    cancellation_fee_cents: i64,
}

impl From<RateIn> for RateCard {
    fn from(r: RateIn) -> Self {
        RateCard {
            base_cents: r.base_cents,
            per_km_cents: r.per_km_cents,
            per_minute_cents: r.per_minute_cents,
            minimum_cents: r.minimum_cents,
            booking_fee_cents: r.booking_fee_cents,
            cancellation_fee_cents: r.cancellation_fee_cents,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = Products)]
struct ProductsIn {
    economy: RateIn,
    xl: RateIn,
    premium: RateIn,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = Pricing)]
struct PricingIn {
    currency: String,
    products: ProductsIn,
}

#[utoipa::path(
    put, path = "/admin/pricing", tag = "admin",
    request_body = PricingIn,
    security(("admin" = [])),
    responses((status = 200, description = "The new rate cards", body = PricingIn)),
)]
async fn set_pricing(
    _: Admin,
    State(app): State<App>,
    JsonBody(b): JsonBody<PricingIn>,
) -> Result<Json<Value>, HttpError> {
    let ours = &app.system.config().rates.currency;
    if &b.currency != ours {
        return Err(bad(format!(
            "the currency is set at start (--currency {ours}); got {}",
            b.currency
        )));
    }
    let p = b.products;
    let (economy, xl, premium): (RateCard, RateCard, RateCard) =
        (p.economy.into(), p.xl.into(), p.premium.into());
    for (product, card) in [
        (Product::Economy, &economy),
        (Product::Xl, &xl),
        (Product::Premium, &premium),
    ] {
        card.check(product)
            .map_err(|e| bad(rate_card_message(&e)))?;
    }
    let rates = app.system.set_pricing(economy, xl, premium).await?;
    Ok(Json(pricing_json(&rates)))
}

/// A refused rate card, naming the field by its path in the pricing body
/// (`products.xl.per_km_cents`), as `PUT /admin/pricing` and `--pricing-file` report it.
pub fn rate_card_message(e: &RateCardError) -> String {
    match e {
        RateCardError::OutOfRange {
            product,
            field,
            max,
            got,
        } => format!("`products.{product}.{field}` must be from 0 to {max}, got {got}"),
        RateCardError::Free(product) => {
            format!("`products.{product}`: base, per-km and per-minute rates cannot all be 0")
        }
    }
}

#[utoipa::path(
    get, path = "/admin/actors", tag = "admin",
    security(("admin" = [])),
    responses((status = 200, description = "Actor groups", body = doc::Actors)),
)]
async fn actors(_: Admin, State(app): State<App>) -> Json<Value> {
    let groups: Vec<Value> = app
        .system
        .actor_stats()
        .into_iter()
        .map(|g| {
            json!({
                "group": g.group,
                "alive": g.alive,
                "started": g.started,
                "stopped": g.stopped,
                "restarts": g.restarts,
                "panics": g.panics,
                "messages": g.messages,
                "handling_mean_ms": g.handling_mean_ms,
                "handling_p99_ms": g.handling_p99_ms,
            })
        })
        .collect();
    Json(json!({ "groups": groups }))
}

fn entry_json(e: &Entry) -> Value {
    json!({
        "step": e.key.step.to_string(),
        "at": render::rfc3339(e.at_ms),
        "currency": e.currency,
        "postings": e.postings.iter().map(|p| json!({
            "account": p.account.to_string(),
            "amount_cents": p.amount_cents,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Debug, Deserialize)]
struct LedgerQuery {
    account: Option<String>,
}

/// `rider:<id>`, `rider_hold:<id>`, `driver:<id>`, `platform`, `clearing`, `authorizations`.
fn account_param(s: &str) -> Result<Account, HttpError> {
    let bad_account = || {
        bad(
            "`account` must be platform, clearing, authorizations, rider:<id>, rider_hold:<id> or driver:<id>",
        )
    };
    Ok(match s.split_once(':') {
        None => match s {
            "platform" => Account::Platform,
            "clearing" => Account::Clearing,
            "authorizations" => Account::Authorizations,
            _ => return Err(bad_account()),
        },
        Some(("rider", id)) if is_id(id, RiderId::PREFIX) => Account::Rider(RiderId::new(id)),
        Some(("rider_hold", id)) if is_id(id, RiderId::PREFIX) => {
            Account::RiderHold(RiderId::new(id))
        }
        Some(("driver", id)) if is_id(id, DriverId::PREFIX) => Account::Driver(DriverId::new(id)),
        _ => return Err(bad_account()),
    })
}

#[utoipa::path(
    get, path = "/admin/ledger", tag = "admin",
    params(
        ("account" = Option<String>, Query, description = "platform, clearing, authorizations, rider:<id>, rider_hold:<id> or driver:<id>"),
    ),
    security(("admin" = [])),
    responses((status = 200, description = "The ledger summary, or one account with `account`", body = doc::Ledger)),
)]
async fn ledger(
    _: Admin,
    State(app): State<App>,
    QueryParams(q): QueryParams<LedgerQuery>,
) -> Result<Json<Value>, HttpError> {
    let currency = &app.system.config().rates.currency;
    if let Some(a) = &q.account {
        let account = account_param(a)?;
        return Ok(Json(json!({
            "account": account.to_string(),
            "balance_cents": app.system.account_balance(&account),
            "currency": currency,
        })));
    }
    let l = app.system.ledger_summary();
    Ok(Json(json!({
        "currency": currency,
        "entries": l.entries,
        "balanced": l.total == 0,
        "total_cents": l.total,
        "accounts": {
            "platform": l.platform,
            "clearing": l.clearing,
            "authorizations": l.authorizations,
            "riders": l.riders,
            "rider_holds": l.rider_holds,
            "drivers": l.drivers,
        },
    })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct RefundBody {
    amount_cents: i64,
    reason: String,
}

#[utoipa::path(
    post, path = "/admin/trips/{id}/refund", tag = "admin",
    request_body = RefundBody,
    params(("id" = String, Path, description = "An id")),
    security(("admin" = [])),
    responses((status = 200, description = "The refund and the trip's payments", body = doc::Refund)),
)]
async fn refund(
    _: Admin,
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RefundBody>,
) -> Result<Json<Value>, HttpError> {
    let reason = b.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(bad("`reason` is required: 1 to 500 characters"));
    }
    if b.amount_cents <= 0 {
        return Err(bad("`amount_cents` must be positive"));
    }
    let id = TripId::new(id);
    tracing::info!(trip_id = %id, amount_cents = b.amount_cents, reason, "admin refund");
    let entry = app.system.refund(&id, b.amount_cents).await?;
    let entries = app.system.trip_entries(&id).await?;
    Ok(Json(json!({
        "trip_id": id.as_str(),
        "refund": entry_json(&entry),
        "payments": entries.iter().map(entry_json).collect::<Vec<_>>(),
    })))
}

fn surge_json(app: &App) -> Value {
    let book = app.system.lock_surge();
    let cfg = *book.config();
    json!({
        "resolution": cfg.resolution,
        "window_ms": cfg.window_ms,
        "step": cfg.step,
        "cap": cfg.cap,
        "city_cap": book.city_cap(),
        "pins": book.pins().iter().map(|(c, m)| json!({"cell": c.to_string(), "multiplier": m})).collect::<Vec<_>>(),
        "cells": book.cells().iter().map(|c| json!({
            "cell": c.cell.to_string(),
            "demand": c.demand,
            "supply": c.supply,
            "computed": c.computed,
            "pinned": c.pinned,
            "multiplier": c.multiplier,
        })).collect::<Vec<_>>(),
    })
}

#[utoipa::path(
    get, path = "/admin/surge", tag = "admin",
    security(("admin" = [])),
    responses((status = 200, description = "Surge configuration, pins and cells", body = doc::Surge)),
)]
async fn surge(_: Admin, State(app): State<App>) -> Json<Value> {
    Json(surge_json(&app))
}

/// A field that must be present but may be `null` (a missing one is `bad_request`, so a
/// misspelt name never reads as "unset").
fn nullable<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CapBody {
    #[serde(deserialize_with = "nullable")]
    #[schema(required)]
    city_cap: Option<f64>,
}

#[utoipa::path(
    put, path = "/admin/surge", tag = "admin",
    request_body = CapBody,
    security(("admin" = [])),
    responses((status = 200, description = "The surge after the change", body = doc::Surge)),
)]
async fn set_surge_cap(
    _: Admin,
    State(app): State<App>,
    JsonBody(b): JsonBody<CapBody>,
) -> Result<Json<Value>, HttpError> {
    app.system.set_surge(None, Some(b.city_cap)).await?;
    Ok(Json(surge_json(&app)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct PinBody {
    #[serde(deserialize_with = "nullable")]
    #[schema(required)]
    multiplier: Option<f64>,
}

#[utoipa::path(
    put, path = "/admin/surge/cells/{cell}", tag = "admin",
    request_body = PinBody,
    params(
        ("cell" = String, Path, description = "An H3 index at the surge resolution or finer"),
    ),
    security(("admin" = [])),
    responses((status = 200, description = "The surge after the change", body = doc::Surge)),
)]
async fn pin_surge(
    _: Admin,
    State(app): State<App>,
    Path(cell): Path<String>,
    JsonBody(b): JsonBody<PinBody>,
) -> Result<Json<Value>, HttpError> {
    let cell: CellId = cell.parse().map_err(|_| bad("not an H3 cell index"))?;
    let res = app.system.config().surge.resolution;
    if u8::from(cell.resolution()) < res {
        return Err(bad(format!(
            "the cell must be of the surge resolution ({res}) or finer"
        )));
    }
    app.system
        .set_surge(Some((cell, b.multiplier)), None)
        .await?;
    Ok(Json(surge_json(&app)))
}

#[utoipa::path(
    get, path = "/admin/payments/provider", tag = "admin",
    security(("admin" = [])),
    responses((status = 200, description = "The in-process provider's mode", body = doc::ProviderMode)),
)]
async fn provider_mode(_: Admin, State(app): State<App>) -> Result<Json<Value>, HttpError> {
    let p = app
        .system
        .local_provider()
        .ok_or_else(|| HttpError(ApiError::not_found("in-process payment provider")))?;
    Ok(Json(
        json!({"provider": "in_process", "mode": p.mode().as_str()}),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ModeBody {
    mode: String,
}

#[utoipa::path(
    put, path = "/admin/payments/provider", tag = "admin",
    request_body = ModeBody,
    security(("admin" = [])),
    responses((status = 200, description = "The new mode", body = doc::ProviderMode)),
)]
async fn set_provider_mode(
    _: Admin,
    State(app): State<App>,
    JsonBody(b): JsonBody<ModeBody>,
) -> Result<Json<Value>, HttpError> {
    let p = app
        .system
        .local_provider()
        .ok_or_else(|| HttpError(ApiError::not_found("in-process payment provider")))?;
    let mode: ProviderMode = b
        .mode
        .parse()
        .map_err(|_| bad("`mode` must be approve, decline or fail"))?;
    p.set_mode(mode);
    tracing::warn!(
        mode = mode.as_str(),
        "in-process payment provider mode changed"
    );
    Ok(Json(
        json!({"provider": "in_process", "mode": mode.as_str()}),
    ))
}
