//! REST routes of PROTOCOL.md, the error mapping (the one place an [`ErrorCode`] becomes
//! an HTTP status), and the JSON body and auth extractors.

use std::sync::atomic::Ordering;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dispatch_actors::records::Identity;
use dispatch_actors::{ApiError, ErrorCode};
use dispatch_engine::{DriverForm, DriverId, DriverProfile, Point, RiderId, RiderProfile, TripId};
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::decode::point;
use super::render::{self, product_in};
use super::{App, admin, auth, console, jwt, ratelimit, ws};
use crate::wire;

/// HTTP status of each protocol error code: the only such mapping.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::UnknownType | ErrorCode::InvalidLocation => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict | ErrorCode::QuoteExpired => StatusCode::CONFLICT,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An [`ApiError`] as a REST reply. 5xx replies never carry internal detail.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl HttpError {
    /// Its status and JSON body.
    pub fn parts(self) -> (StatusCode, wire::ErrorBody) {
        let e = self.0;
        let message = if e.code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            e.message
        };
        let body = wire::ErrorBody {
            error: wire::ErrorDetail {
                code: e.code.as_str().to_owned(),
                message,
            },
        };
        (status(e.code), body)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        (status, Json(body)).into_response()
    }
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(ErrorCode::BadRequest, msg))
}

/// A JSON body, at most `--max-frame-bytes` long, with protocol errors for every failure.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<App> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, app: &App) -> Result<Self, HttpError> {
        let limit = app.config.max_frame_bytes;
        let too_large = || {
            HttpError(ApiError::new(
                ErrorCode::TooLarge,
                format!("the body is over {limit} bytes"),
            ))
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let body = req.into_body();
        if declared.is_some_and(|len| len > limit) {
            app.metrics.bound_hit("http_body_bytes");
            if declared.is_some_and(|len| len <= DRAIN_MAX_BYTES) {
                drain(body.into_data_stream(), 0).await;
            }
            return Err(too_large());
        }
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            // A body that breaks off counts as one over the limit, as it always did.
            let Ok(chunk) = chunk else {
                app.metrics.bound_hit("http_body_bytes");
                return Err(too_large());
            };
            if bytes.len() + chunk.len() > limit {
                app.metrics.bound_hit("http_body_bytes");
                drain(stream, bytes.len() + chunk.len()).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        json_body(&bytes).map(JsonBody)
    }
}

/// How much of a refused body is read and thrown away, and for how long at most, before
/// the 413 goes out. A server that closes a connection with unread bytes makes the kernel
/// reset it, and a client still sending its body then sees a broken pipe instead of the
/// reply; reading the rest first lets it read the 413. A larger body is cut off as before.
const DRAIN_MAX_BYTES: usize = 4 << 20;
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops the rest of a refused body (`seen` bytes already read), bounded by
/// [`DRAIN_MAX_BYTES`] and [`DRAIN_WAIT`].
async fn drain(mut stream: axum::body::BodyDataStream, mut seen: usize) {
    let _ = tokio::time::timeout(DRAIN_WAIT, async {
        while seen <= DRAIN_MAX_BYTES
            && let Some(Ok(chunk)) = stream.next().await
        {
            seen += chunk.len();
        }
    })
    .await;
}

/// Decodes a JSON body; a field of the wrong type is named by its path
/// (`products.xl.base_cents: invalid type …`).
pub fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    // Every body is an object: serde would read an array into a struct field by field.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad("the body must be a JSON object"));
    }
    // Nor is anything inside one an array: serde would read `"pickup": [lng, lat]` into
    // a coordinate, swapped, or a vehicle from a list. No request body has a list field.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Some(path) = first_array(&v, "")
    {
        return Err(bad(format!(
            "invalid JSON body: `{path}` must not be an array"
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            bad(format!("invalid JSON body: {inner}"))
        } else {
            bad(format!("invalid JSON body: `{path}`: {inner}"))
        }
    })?;
    Ok(value)
}

/// The path of the first array in `v`, if any (`vehicle`, `products.economy`).
fn first_array(v: &serde_json::Value, at: &str) -> Option<String> {
    match v {
        serde_json::Value::Array(_) => Some(at.to_owned()),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, x)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            first_array(x, &path)
        }),
        _ => None,
    }
}

/// A query string, with protocol errors (`bad_request`, JSON) instead of axum's text.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| bad(format!("invalid query string: {}", e.body_text())))
    }
}

/// The hash of the request's bearer token; 401 without one.
pub fn bearer_hash(parts: &Parts) -> Result<[u8; 32], HttpError> {
    auth::bearer(&parts.headers, None)
        .map(auth::hash)
        .ok_or_else(|| {
            HttpError(ApiError::new(
                ErrorCode::Unauthorized,
                "missing bearer token",
            ))
        })
}

/// The caller, from a bearer token that must be known (401 otherwise).
pub struct Caller(pub Identity);

impl FromRequestParts<App> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, HttpError> {
        let token = auth::bearer(&parts.headers, None).ok_or_else(|| {
            HttpError(ApiError::new(
                ErrorCode::Unauthorized,
                "missing bearer token",
            ))
        })?;
        jwt::identify(app, token).await.map(Caller)
    }
}

/// 503 `unavailable` while the node is not ready (recovering, standing by, stopping).
pub(super) fn ready(app: &App) -> Result<(), HttpError> {
    if app.ready.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(HttpError(ApiError::unavailable(
            "the server is starting or shutting down",
        )))
    }
}

/// The client routes, and with them the operator routes (`/admin/`, `/metrics`) unless
/// `--admin-listen` serves those on an address of their own.
pub fn router(app: App) -> Router {
    // The routes that need no token: limited per client address.
    let limited = |app: &App| {
        axum::middleware::from_fn_with_state(app.clone(), ratelimit::limit_registration)
    };
    let clients = Router::new()
        .route("/v1/riders", post(register_rider).layer(limited(&app)))
        .route("/v1/drivers", post(register_driver).layer(limited(&app)))
        .route("/v1/quotes", post(quote))
        .route("/v1/trips/{id}", get(get_trip))
        .route("/v1/drivers/nearby", get(nearby))
        .route("/v1/drivers/me/earnings", get(earnings))
        .route("/v1/ws/driver", get(ws::driver_upgrade))
        .route("/v1/ws/rider", get(ws::rider_upgrade));
    let routes = if app.config.admin_listen.is_some() {
        clients
    } else {
        clients.merge(operator_routes())
    };
    finish(routes, app)
}

/// The operator routes alone, for `--admin-listen`.
pub fn admin_router(app: App) -> Router {
    finish(operator_routes(), app)
}

fn operator_routes() -> Router<App> {
    Router::new()
        .route("/metrics", get(metrics))
        .merge(admin::routes())
        .merge(console::routes())
        .merge(super::cluster::routes())
}

/// `--cors-origin`: the listed origins may call every route of this listener from a
/// browser, with a bearer token (no cookies, so no credentials mode). None listed: no
/// CORS headers, and browsers keep to same-origin.
fn cors(app: &App) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if app.config.cors_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = app
        .config
        .cors_origins
        .iter()
        .map(|o| HeaderValue::from_str(o).expect("checked by Config"))
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Health, the JSON fallbacks, CORS and request counting, on either listener.
fn finish(routes: Router<App>, app: App) -> Router {
    let cors = cors(&app);
    let routes = routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { HttpError(ApiError::new(ErrorCode::NotFound, "no such route")) })
        .method_not_allowed_fallback(|| async {
            let mut r = HttpError(ApiError::new(
                ErrorCode::BadRequest,
                "method not allowed on this route",
            ))
            .into_response();
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        });
    // Preflights are answered by the CORS layer itself, and counted like any request.
    let routes = match cors {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_request,
        ))
        .with_state(app)
}

/// Counts every REST request by route template (never the raw path: ids would make one
/// series per trip) and status.
async fn count_request(
    State(app): State<App>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    app.transport
        .http_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// The process runs: 200 `ok`, also while recovering or shutting down.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process runs", body = String, content_type = "text/plain", example = "ok")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready: recovery is done and sessions are accepted; 503 while starting or shutting down.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready", body = String, content_type = "text/plain", example = "ready")))]
async fn readyz(State(app): State<App>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        "ready".into_response()
    } else {
        let why = match app.system.store_problem() {
            // While recovery waits for PostgreSQL, say why (never with a password).
            Some(p) => format!("not ready: the store is unavailable: {p}"),
            None => "not ready".to_owned(),
        };
        HttpError(ApiError::unavailable(why)).into_response()
    }
}

/// Prometheus text exposition of every metric.
#[utoipa::path(get, path = "/metrics", tag = "operator",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String,
        content_type = "text/plain; version=0.0.4; charset=utf-8")))]
async fn metrics(State(app): State<App>) -> Response {
    // Fleet gauges are counted at scrape time, from the registry.
    app.system.fleet_counts();
    app.system.count_store_timeouts();
    exposition(&app.metrics.registry)
}

/// Every metric of `registry` in Prometheus' text format.
pub(crate) fn exposition(registry: &prometheus::Registry) -> Response {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let enc = prometheus::TextEncoder::new();
    if enc.encode(&registry.gather(), &mut buf).is_err() {
        return HttpError(ApiError::internal()).into_response();
    }
    let mut r = buf.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Registers a rider; the token is shown only in this reply.
#[utoipa::path(post, path = "/v1/riders", tag = "riders", request_body = wire::RegisterRider,
    responses((status = 201, description = "Registered", body = wire::RiderRegistered)))]
async fn register_rider(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<wire::RegisterRider>,
) -> Result<Response, HttpError> {
    ready(&app)?;
    let registrant = jwt::registrant(&app, &headers, "rider").await?;
    let profile = RiderProfile::new(&b.name, &b.phone).map_err(|e| bad(e.to_string()))?;
    if let jwt::Registrant::Jwt(Identity::Rider(id), _held) = registrant {
        let id = app
            .system
            .register_rider_as(id, profile, auth::new_token().1);
        return Ok(jwt::registered("rider_id", id.await?.as_str()));
    }
    let (id, (token, hash)) = own_account(&app, (RiderId::with_suffix, RiderId::as_str))?;
    let id = app.system.register_rider_as(id, profile, hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(wire::RiderRegistered {
            rider_id: id.to_string(),
            token,
        }),
    )
        .into_response())
}

/// Registers a driver and its vehicle; the token is shown only in this reply.
#[utoipa::path(post, path = "/v1/drivers", tag = "drivers", request_body = wire::RegisterDriver,
    responses((status = 201, description = "Registered", body = wire::DriverRegistered)))]
async fn register_driver(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<wire::RegisterDriver>,
) -> Result<Response, HttpError> {
    ready(&app)?;
    let registrant = jwt::registrant(&app, &headers, "driver").await?;
    let v = &b.vehicle;
    let profile = DriverProfile::new(DriverForm {
        name: &b.name,
        make: &v.make,
        model: &v.model,
        plate: &v.plate,
        color: &v.color,
        product: product_in(v.product),
        seats: v.seats,
    })
    .map_err(|e| bad(e.to_string()))?;
    if let jwt::Registrant::Jwt(Identity::Driver(id), _held) = registrant {
        let id = app
            .system
            .register_driver_as(id, profile, auth::new_token().1);
        return Ok(jwt::registered("driver_id", id.await?.as_str()));
    }
    let (id, (token, hash)) = own_account(&app, (DriverId::with_suffix, DriverId::as_str))?;
    let id = app.system.register_driver_as(id, profile, hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(wire::DriverRegistered {
            driver_id: id.to_string(),
            token,
        }),
    )
        .into_response())
}

/// A new account's id and token. Sharded mode (`docs/sharding.md` §4): an id of an entity
/// shard this node serves (drawn again until it is: a new id's shard is uniform, so a
/// node serving a third of them needs ~3 draws; [`OWN_ID_DRAWS`] at most), and a token
/// naming that shard, so any node can route the account's requests to its owner.
fn own_account<I>(
    app: &App,
    (id, text): (impl Fn(&str) -> I, fn(&I) -> &str),
) -> Result<(I, (String, [u8; 32])), HttpError> {
    let draw = || id(&dispatch_actors::context::random_suffix());
    if app.sharded.is_none() {
        return Ok((draw(), auth::new_token()));
    }
    for _ in 0..OWN_ID_DRAWS {
        let candidate = draw();
        let shard = dispatch_engine::shard::entity_shard(text(&candidate));
        if app.system.serves(shard) {
            return Ok((candidate, auth::new_token_in(shard)));
        }
    }
    Err(HttpError(ApiError::unavailable(
        "this node serves no account shard now (starting, or its shards are moving): retry, or register on another node",
    )))
}

/// At most this many ids are drawn for a new account in sharded mode: a node serving even
/// 1 of the 256 entity shards finds one with probability 1 − (255/256)^4096 ≈ 1 − 10⁻⁷.
const OWN_ID_DRAWS: usize = 4096;

fn rider_only(c: &Caller) -> Result<dispatch_engine::RiderId, HttpError> {
    match &c.0 {
        Identity::Rider(r) => Ok(r.clone()),
        Identity::Driver(_) => Err(HttpError(ApiError::forbidden("this route is for riders"))),
    }
}

/// Prices a ride now and holds the price until `expires_at` (riders only).
#[utoipa::path(post, path = "/v1/quotes", tag = "riders", request_body = wire::QuoteRequest,
    security(("rider" = [])),
    responses((status = 201, description = "Quoted", body = wire::QuoteResponse)))]
async fn quote(
    State(app): State<App>,
    caller: Caller,
    JsonBody(b): JsonBody<wire::QuoteRequest>,
) -> Result<(StatusCode, Json<wire::QuoteResponse>), HttpError> {
    ready(&app)?;
    let rider = rider_only(&caller)?;
    let q = app
        .system
        .quote(
            rider,
            point(b.pickup)?,
            point(b.dropoff)?,
            product_in(b.product),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(wire::QuoteResponse {
            quote_id: q.quote_id.to_string(),
            product: render::product(q.product),
            fare_cents: q.fare_cents,
            currency: q.currency,
            surge: q.surge,
            distance_m: q.distance_m,
            duration_s: q.duration_s,
            expires_at: render::rfc3339(q.expires_at_ms),
        }),
    ))
}

/// A trip, for its rider or its current driver.
#[utoipa::path(get, path = "/v1/trips/{id}", tag = "trips",
    params(("id" = String, Path, description = "A trip id (`trp_…`)")),
    security(("rider" = []), ("driver" = [])),
    responses((status = 200, description = "The trip", body = wire::Trip)))]
async fn get_trip(
    State(app): State<App>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<wire::Trip>, HttpError> {
    let view = app
        .system
        .trip_view(&TripId::new(id))
        .await?
        .ok_or_else(|| HttpError(ApiError::not_found("trip")))?;
    let allowed = match &caller.0 {
        Identity::Rider(r) => &view.rider_id == r,
        Identity::Driver(d) => view.driver_id.as_ref() == Some(d),
    };
    if !allowed {
        return Err(HttpError(ApiError::forbidden(
            "the trip belongs to someone else",
        )));
    }
    Ok(Json(render::trip(&view)))
}

#[derive(Debug, Deserialize)]
pub struct NearbyQuery {
    lat: Option<String>,
    lng: Option<String>,
    radius_m: Option<String>,
    limit: Option<String>,
    product: Option<String>,
}

fn num<T: std::str::FromStr>(v: &Option<String>, name: &str) -> Result<Option<T>, HttpError> {
    v.as_deref()
        .map(|s| {
            s.parse::<T>()
                .map_err(|_| bad(format!("`{name}` is not a valid number")))
        })
        .transpose()
}

/// Available drivers near a point, nearest first, without their ids (riders only).
#[utoipa::path(get, path = "/v1/drivers/nearby", tag = "riders",
    params(
        ("lat" = f64, Query, description = "Latitude, -90 to 90", minimum = -90, maximum = 90),
        ("lng" = f64, Query, description = "Longitude, -180 to 180", minimum = -180, maximum = 180),
        ("radius_m" = Option<f64>, Query, description = "Search radius in metres, default 2000, at most 5000"),
        ("limit" = Option<u32>, Query, description = "At most this many drivers, 1 to 50, default 10"),
        ("product" = Option<wire::Product>, Query, description = "Only this product"),
    ),
    security(("rider" = [])),
    responses((status = 200, description = "Nearby drivers", body = wire::NearbyResponse)))]
async fn nearby(
    State(app): State<App>,
    caller: Caller,
    QueryParams(q): QueryParams<NearbyQuery>,
) -> Result<Json<wire::NearbyResponse>, HttpError> {
    rider_only(&caller)?;
    let lat: f64 = num(&q.lat, "lat")?.ok_or_else(|| bad("`lat` is required"))?;
    let lng: f64 = num(&q.lng, "lng")?.ok_or_else(|| bad("`lng` is required"))?;
    let at = Point::new(lat, lng)
        .map_err(|e| HttpError(ApiError::new(ErrorCode::InvalidLocation, e.to_string())))?;
    let cfg = app.system.config();
    let radius_m: f64 = num(&q.radius_m, "radius_m")?.unwrap_or(2_000.0);
    if !radius_m.is_finite() || radius_m <= 0.0 || radius_m > cfg.nearby_max_radius_m {
        return Err(bad(format!(
            "`radius_m` must be in (0, {}]",
            cfg.nearby_max_radius_m
        )));
    }
    let limit: usize = num(&q.limit, "limit")?.unwrap_or(10);
    if limit == 0 || limit > cfg.nearby_max_limit {
        return Err(bad(format!(
            "`limit` must be in 1..={}",
            cfg.nearby_max_limit
        )));
    }
    let product = match q.product.as_deref() {
        None => None,
        Some(p) => Some(
            p.parse()
                .map_err(|_| bad("`product` must be economy, xl or premium"))?,
        ),
    };
    let drivers = app.system.nearby(at, radius_m, limit, product).await;
    Ok(Json(wire::NearbyResponse {
        drivers: drivers
            .into_iter()
            .map(|d| wire::NearbyDriver {
                lat: d.position.lat(),
                lng: d.position.lng(),
                heading: d.heading,
                product: render::product(d.product),
                distance_m: d.distance_m,
            })
            .collect(),
    }))
}

/// A driver's own earnings: trips completed and money earned (fares less commission,
/// plus cancellation fees), today (UTC) and in total.
#[utoipa::path(get, path = "/v1/drivers/me/earnings", tag = "drivers",
    security(("driver" = [])),
    responses((status = 200, description = "The driver's earnings", body = super::openapi::Earnings)))]
async fn earnings(
    State(app): State<App>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, HttpError> {
    let Identity::Driver(id) = &caller.0 else {
        return Err(HttpError(ApiError::forbidden("this route is for drivers")));
    };
    let e = app.system.lock_books().earnings(id);
    let now = app.system.now_ms();
    let today = dispatch_actors::payments::day_of(now);
    let (trips_today, cents_today) = e.by_day.get(&today).copied().unwrap_or((0, 0));
    let date = render::rfc3339(today * dispatch_actors::payments::DAY_MS);
    Ok(Json(serde_json::json!({
        "driver_id": id.as_str(),
        "currency": app.system.config().rates.currency,
        "today": {"date": &date[..10], "trips": trips_today, "earnings_cents": cents_today},
        "total": {"trips": e.trips, "earnings_cents": e.cents},
    })))
}
