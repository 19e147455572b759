//! The OpenAPI 3.1 document of the REST routes (`docs/openapi.json`), generated from the
//! handlers' `#[utoipa::path]` annotations in [`super::http`] and [`super::admin`] and
//! the wire types' schemas ([`crate::wire`]). Served at `GET /admin/openapi.json`;
//! `dispatchd openapi` prints it, and a test fails when the committed file differs.
//!
//! The admin console's replies are built with `json!` in `admin.rs`; their schemas are
//! the documentation-only types below, checked against live replies by schemathesis
//! (`.ci/api.sh`). Every operation gets the error replies of its kind of route
//! ([`ErrorReplies`]), all with the one error body.

use std::collections::BTreeMap;

use serde_json::Value;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Components, ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{admin, cluster, http};
use crate::wire;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dispatchd",
        description = "REST routes of dispatchd, the ride-hailing dispatch engine: the apps' (`/v1/`), the admin console's (`/admin/`), health and metrics. The WebSocket sessions (`/v1/ws/driver`, `/v1/ws/rider`) are described in asyncapi.yaml; the contract in prose is docs/protocol.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        http::register_rider, http::register_driver, http::quote, http::get_trip,
        http::nearby, http::earnings, http::healthz, http::readyz, http::metrics,
        admin::stats, admin::drivers, admin::driver, admin::suspend, admin::unsuspend,
        admin::rider, admin::trips, admin::trip, admin::cancel, admin::refund, admin::cells,
        admin::pricing, admin::set_pricing, admin::actors, admin::ledger, admin::surge,
        admin::set_surge_cap, admin::pin_surge, admin::provider_mode,
        admin::set_provider_mode, admin::openapi, cluster::status,
    ),
    components(schemas(wire::ErrorBody, wire::ErrorDetail)),
    modifiers(&SecuritySchemes, &ErrorReplies),
    tags(
        (name = "riders", description = "The rider app"),
        (name = "drivers", description = "The driver app"),
        (name = "trips", description = "Trips, for their rider and driver"),
        (name = "admin", description = "The admin console: the admin token"),
        (name = "health", description = "Liveness and readiness"),
        (name = "operator", description = "Metrics"),
    ),
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document_json() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    refine(&mut doc);
    doc
}

/// A name: printable characters, not starting or ending with a space (the server trims
/// them: the document asks for what it keeps).
const PRINTABLE: &str = r"^[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$";
/// 5 to 20 digits, with spaces and `+ - ( ) .` between them.
const PHONE: &str = r"^[ +\-().]*([0-9][ +\-().]*){5,20}$";
/// A reason: 1 to 500 characters once trimmed.
const REASON: &str = r"\S";
/// An H3 cell index as the server writes it.
const H3: &str = "^[0-9a-f]{15}$";

/// What the server checks beyond the types, written into the schemas
/// (`engine/src/profile.rs`, `engine/src/fare.rs`, the handlers' own checks): schemathesis
/// sends data the document allows and fails when the server refuses it.
fn constraints() -> Vec<(&'static str, &'static str, Value)> {
    use serde_json::json;
    let name = |max: u32| json!({"minLength": 1, "maxLength": max, "pattern": PRINTABLE});
    let rate = |max: u32| json!({"minimum": 0, "maximum": max});
    let reason = json!({"type": "string", "minLength": 1, "maxLength": 500, "pattern": REASON});
    let multiplier = json!({"minimum": 1.0, "maximum": 3.0,
        "description": "From 1.0 to --surge-cap (3.0 by default); null removes it"});
    vec![
        ("RegisterRider", "name", name(100)),
        (
            "RegisterRider",
            "phone",
            json!({"maxLength": 32, "pattern": PHONE}),
        ),
        ("RegisterDriver", "name", name(100)),
        ("Vehicle", "make", name(64)),
        ("Vehicle", "model", name(64)),
        ("Vehicle", "plate", name(16)),
        ("Vehicle", "color", name(32)),
        ("Vehicle", "seats", json!({"minimum": 1, "maximum": 20})),
        ("LatLng", "lat", json!({"minimum": -90, "maximum": 90})),
        ("LatLng", "lng", json!({"minimum": -180, "maximum": 180})),
        ("CancelBody", "reason", reason.clone()),
        ("RefundBody", "reason", reason),
        ("RefundBody", "amount_cents", json!({"minimum": 1})),
        ("SuspendBody", "reason", json!({"maxLength": 500})),
        (
            "ModeBody",
            "mode",
            json!({"enum": ["approve", "decline", "fail"]}),
        ),
        (
            "ProviderMode",
            "mode",
            json!({"enum": ["approve", "decline", "fail"]}),
        ),
        ("CapBody", "city_cap", multiplier.clone()),
        ("PinBody", "multiplier", multiplier),
        ("Rate", "base_cents", rate(100_000)),
        ("Rate", "per_km_cents", rate(100_000)),
        ("Rate", "per_minute_cents", rate(100_000)),
        ("Rate", "minimum_cents", rate(1_000_000)),
        ("Rate", "booking_fee_cents", rate(100_000)),
        ("Rate", "cancellation_fee_cents", rate(100_000)),
    ]
}

/// Query and path parameters' checks, by operation path and parameter name.
fn parameter_constraints() -> Vec<(&'static str, &'static str, Value)> {
    use serde_json::json;
    let page = json!({"minimum": 1, "maximum": 1000});
    let cursor = json!({"minLength": 1});
    let mut out = vec![
        (
            "/v1/drivers/nearby",
            "limit",
            json!({"minimum": 1, "maximum": 50}),
        ),
        (
            "/v1/drivers/nearby",
            "radius_m",
            json!({"exclusiveMinimum": 0, "maximum": 5000}),
        ),
        ("/admin/drivers", "cell", json!({"pattern": H3})),
        ("/admin/surge/cells/{cell}", "cell", json!({"pattern": H3})),
        (
            "/admin/ledger",
            "account",
            json!({"pattern":
            "^(platform|clearing|authorizations|rider:rdr_[0-9a-f]{32}|rider_hold:rdr_[0-9a-f]{32}|driver:drv_[0-9a-f]{32})$"}),
        ),
        (
            "/admin/drivers",
            "status",
            json!({"enum": ["offline", "available", "offered", "on_trip", "suspended"]}),
        ),
    ];
    for list in ["/admin/drivers", "/admin/trips", "/admin/cells"] {
        out.push((list, "limit", page.clone()));
        out.push((list, "cursor", cursor.clone()));
    }
    out
}

/// The server's checks beyond the types ([`constraints`], [`parameter_constraints`]), and
/// what request bodies may hold besides their fields: unknown fields are ignored, but no
/// request body has an array anywhere (docs/api.md, "REST"), so every object a request
/// body holds allows other properties that are not arrays. (An array nested deeper in an
/// unknown field is refused too; a recursive schema saying so broke openapi-python-client,
/// which then left out every operation that used it.) The suspension routes take no body or
/// an object, never `null`.
fn refine(doc: &mut Value) {
    use serde_json::json;
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("the document has schemas");
    for (schema, property, extra) in constraints() {
        let p = &mut schemas[schema]["properties"][property];
        assert!(p.is_object(), "{schema}.{property} is in the document");
        for (k, v) in extra.as_object().expect("constraints are objects") {
            p[k] = v.clone();
        }
    }
    // The cancel reason is an Option only to name its absence in the error.
    schemas["CancelBody"]["required"] = json!(["reason"]);
    // Registered under a JWT of the operator's identity provider, no token is minted and
    // the reply has none (docs/api.md, "Who gets in").
    for (schema, id) in [
        ("RiderRegistered", "rider_id"),
        ("DriverRegistered", "driver_id"),
    ] {
        schemas[schema]["required"] = json!([id]);
        schemas[schema]["properties"]["token"]["description"] = json!(
            "The new rider's or driver's own token, shown once. Absent when the registration was made with a JWT of the operator's identity provider as bearer: the JWT is the token."
        );
    }
    schemas["Rate"]["not"] = json!({
        "description": "base, per-km and per-minute rates cannot all be 0",
        "properties": {"base_cents": {"const": 0}, "per_km_cents": {"const": 0}, "per_minute_cents": {"const": 0}},
    });
    let mut in_requests = std::collections::BTreeSet::new();
    let mut todo: Vec<String> = Vec::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("a path item").values() {
            refs(&op["requestBody"], &mut todo);
        }
    }
    while let Some(name) = todo.pop() {
        if in_requests.insert(name.clone()) {
            refs(&doc["components"]["schemas"][&name], &mut todo);
        }
    }
    for name in in_requests {
        let s = &mut doc["components"]["schemas"][&name];
        if s["type"] == "object" {
            s["additionalProperties"] = json!({
                "description": "Unknown fields are ignored, but may not be (or hold) an array",
                "not": {"type": "array"},
            });
        }
    }
    for path in [
        "/admin/drivers/{id}/suspend",
        "/admin/drivers/{id}/unsuspend",
    ] {
        doc["paths"][path]["post"]["requestBody"] = json!({
            "description": "Optional: no body, or an object",
            "required": false,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SuspendBody"}}},
        });
    }
    for (path, name, extra) in parameter_constraints() {
        let ops = doc["paths"][path]
            .as_object_mut()
            .expect("the path is in the document");
        let mut found = false;
        for op in ops.values_mut() {
            for p in op["parameters"].as_array_mut().into_iter().flatten() {
                if p["name"] == name {
                    found = true;
                    for (k, v) in extra.as_object().expect("constraints are objects") {
                        p["schema"][k] = v.clone();
                    }
                }
            }
        }
        assert!(found, "{path} has the parameter {name}");
    }
}

/// The schema names `v` refers to.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(name) = m
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                out.push(name.to_owned());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// The document as `docs/openapi.json` holds it: pretty JSON and a final newline.
pub fn document() -> String {
    let mut s = serde_json::to_string_pretty(&document_json()).expect("the document serializes");
    s.push('\n');
    s
}

/// Bearer tokens: a rider's and a driver's from their registration, the operator's admin
/// token.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Components::default);
        for (name, what) in [
            (
                "rider",
                "A rider's token, from POST /v1/riders; or, with --auth-jwt-jwks-url, a JWT of the operator's identity provider naming a rider (docs/api.md, \"Who gets in\"; 503 while its keys cannot be had)",
            ),
            (
                "driver",
                "A driver's token, from POST /v1/drivers; or, with --auth-jwt-jwks-url, a JWT of the operator's identity provider naming a driver (503 while its keys cannot be had)",
            ),
            (
                "admin",
                "The admin token (--admin-token, or <data-dir>/admin.token)",
            ),
        ] {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_owned());
            c.add_security_scheme(name, SecurityScheme::Http(http));
        }
    }
}

/// The error statuses of each kind of route (docs/protocol.md, "Errors"), each with the
/// error body.
struct ErrorReplies;

/// What each error status means, for the document, with a real reply's code and message.
const ERRORS: [(u16, &str, &str, &str); 9] = [
    (
        400,
        "`bad_request` (malformed or mistyped body or query), `invalid_location`",
        "bad_request",
        "invalid JSON body: missing field `phone` at line 1 column 14",
    ),
    (
        401,
        "`unauthorized`: missing or unknown token",
        "unauthorized",
        "unknown token",
    ),
    (
        403,
        "`forbidden`: a valid token, not for this resource",
        "forbidden",
        "this route is for riders",
    ),
    (
        404,
        "`not_found`: no such trip, driver, rider, quote or cell",
        "not_found",
        "no such trip",
    ),
    (
        409,
        "`conflict` (not allowed in the current state) or `quote_expired`",
        "conflict",
        "the driver is on_trip; cancel its trip first or wait until it ends",
    ),
    (
        413,
        "`too_large`: the body is over the limit (16 KiB)",
        "too_large",
        "the body is over 16384 bytes",
    ),
    (
        429,
        "`rate_limited`: too many registrations from this client address (`--register-rate-per-s`, `--register-burst`); retry after the `Retry-After` seconds",
        "rate_limited",
        "too many registrations from this address; retry after the Retry-After seconds",
    ),
    (
        500,
        "`internal`: a bug; the message says nothing secret",
        "internal",
        "internal error",
    ),
    (
        503,
        "`unavailable`: recovering, shutting down, or a write could not be stored; retry",
        "unavailable",
        "the server is starting or shutting down",
    ),
];

impl ErrorReplies {
    /// The statuses a route can answer with, from its path and whether it takes a token.
    /// Registration is rate limited per address (429) and may be made under a JWT of the
    /// operator's identity provider (401 for a bad one, 403 for the wrong role, 409 when
    /// that id is registered already; docs/api.md, "Who gets in").
    fn statuses(path: &str, authenticated: bool) -> &'static [u16] {
        match path {
            "/healthz" => &[],
            "/readyz" => &[503],
            "/metrics" => &[500],
            "/v1/riders" | "/v1/drivers" => &[400, 401, 403, 409, 413, 429, 500, 503],
            _ if !authenticated => &[400, 500, 503],
            _ => &[400, 401, 403, 404, 409, 413, 500, 503],
        }
    }
}

impl Modify for ErrorReplies {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let authenticated = op.security.as_ref().is_some_and(|s| !s.is_empty());
                for status in Self::statuses(path, authenticated) {
                    let (_, what, code, message) = ERRORS
                        .iter()
                        .find(|(s, ..)| s == status)
                        .expect("every status is in ERRORS");
                    let body = ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .example(Some(serde_json::json!({
                            "error": {"code": code, "message": message}
                        })))
                        .build();
                    op.responses.responses.insert(
                        status.to_string(),
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(*what)
                                .content("application/json", body)
                                .build(),
                        ),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Schemas of replies built with `json!` (documentation only; schemathesis checks them
// against the live server).

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct EarningsToday {
    /// The current UTC day, `YYYY-MM-DD`.
    date: String,
    trips: u64,
    earnings_cents: i64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct EarningsTotal {
    trips: u64,
    earnings_cents: i64,
}

/// A driver's earnings: completed trips, and fares less commission plus cancellation fees.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Earnings {
    driver_id: String,
    currency: String,
    today: EarningsToday,
    total: EarningsTotal,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Sessions {
    driver: i64,
    rider: i64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Stats {
    version: String,
    uptime_s: u64,
    ready: bool,
    /// Registered drivers by status.
    drivers: BTreeMap<String, u64>,
    /// Live trips by state.
    trips: BTreeMap<String, u64>,
    /// Trips finished since the start, by final state.
    trips_finished_since_start: BTreeMap<String, u64>,
    open_offers: u64,
    sessions: Sessions,
    /// Live actors by group.
    actors: BTreeMap<String, i64>,
    /// Actor restarts since the start, every group together.
    actor_restarts: u64,
    last_minute: LastMinute,
}

/// The last minute, from counters sampled every 5 s (`window_s` is shorter while the
/// server is younger than a minute). Null where nothing was observed.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct LastMinute {
    /// Seconds the window covers.
    window_s: u64,
    /// Transitions into `driver_assigned`.
    assigned: u64,
    /// Trips that ended `no_driver_found`.
    no_driver_found: u64,
    /// `assigned / (assigned + no_driver_found)`: of the dispatches that ended, the share
    /// that found a driver.
    match_rate: Option<f64>,
    request_to_offer_count: u64,
    request_to_offer_p50_ms: Option<f64>,
    request_to_offer_p99_ms: Option<f64>,
    actor_restarts: u64,
}

/// A driver as the admin console sees it.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AdminDriver {
    driver_id: String,
    name: String,
    vehicle: wire::Vehicle,
    status: wire::DriverStatus,
    connected: bool,
    location: Option<wire::LatLng>,
    heading: Option<f64>,
    /// The H3 index at the matching resolution, or null without a position.
    cell: Option<String>,
    /// The trip it is offered or on.
    trip_id: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DriverPage {
    drivers: Vec<AdminDriver>,
    /// Null on the last page.
    next_cursor: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AdminRider {
    rider_id: String,
    name: String,
    phone: String,
    connected: bool,
    location: Option<wire::LatLng>,
    trip: Option<wire::Trip>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct TripPage {
    trips: Vec<wire::Trip>,
    next_cursor: Option<String>,
}

/// One transition of a trip.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Transition {
    /// Null for the request itself (version 1).
    from: Option<wire::TripState>,
    to: wire::TripState,
    by: wire::CancelledBy,
    /// The driver, when `by` is `driver`.
    driver_id: Option<String>,
    at: String,
    version: u64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Posting {
    account: String,
    amount_cents: i64,
}

/// A ledger entry: postings that sum to zero.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Entry {
    step: String,
    at: String,
    currency: String,
    postings: Vec<Posting>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AdminTrip {
    trip: wire::Trip,
    history: Vec<Transition>,
    payments: Vec<Entry>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Refund {
    trip_id: String,
    refund: Entry,
    payments: Vec<Entry>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Cell {
    cell: String,
    resolution: u8,
    center: wire::LatLng,
    available_drivers: u64,
    busy_drivers: u64,
    open_requests: u64,
    surge: f64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct CellPage {
    cells: Vec<Cell>,
    next_cursor: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Group {
    group: String,
    alive: i64,
    started: u64,
    stopped: u64,
    restarts: u64,
    panics: u64,
    messages: u64,
    handling_mean_ms: f64,
    handling_p99_ms: f64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Actors {
    groups: Vec<Group>,
}

#[allow(dead_code)]
#[derive(ToSchema, serde::Serialize)]
pub struct Accounts {
    platform: i64,
    clearing: i64,
    authorizations: i64,
    riders: i64,
    rider_holds: i64,
    drivers: i64,
}

#[allow(dead_code)]
#[derive(ToSchema, serde::Serialize)]
pub struct LedgerSummary {
    currency: String,
    entries: u64,
    balanced: bool,
    total_cents: i64,
    accounts: Accounts,
}

#[allow(dead_code)]
#[derive(ToSchema, serde::Serialize)]
pub struct AccountBalance {
    account: String,
    balance_cents: i64,
    currency: String,
}

/// The summary, or with `?account=` that account's balance.
#[allow(dead_code)]
#[derive(ToSchema, serde::Serialize)]
#[serde(untagged)]
pub enum Ledger {
    Summary(LedgerSummary),
    Account(AccountBalance),
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Pin {
    cell: String,
    multiplier: f64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SurgeCell {
    cell: String,
    demand: u32,
    supply: u32,
    computed: f64,
    pinned: Option<f64>,
    multiplier: f64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Surge {
    resolution: u8,
    window_ms: u64,
    step: f64,
    cap: f64,
    city_cap: Option<f64>,
    pins: Vec<Pin>,
    cells: Vec<SurgeCell>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ProviderMode {
    /// `in_process`.
    provider: String,
    /// `approve`, `decline` or `fail`.
    mode: String,
}

/// A live member of the cluster.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ClusterMember {
    name: String,
    /// This node itself.
    #[schema(rename = "self")]
    is_self: bool,
    /// Milliseconds since its last heartbeat arrived; null for this node.
    last_heard_ms: Option<u64>,
}

/// The shards of the cells this node has actors for, owned per member by the rendezvous
/// map over the live members (a summary, not the lease table).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ClusterShards {
    /// The H3 resolution of a shard.
    resolution: u8,
    known: u64,
    per_member: BTreeMap<String, u64>,
}

/// Membership as this node sees it; only `enabled` without `--cluster-listen`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ClusterStatus {
    enabled: bool,
    /// This node's name.
    #[schema(required = false)]
    node: String,
    /// The live members, sorted by name, this node included.
    #[schema(required = false)]
    members: Vec<ClusterMember>,
    #[schema(required = false)]
    shards: ClusterShards,
}

/// Fails when `docs/<file>` differs from `now`, what `dispatchd <command>` prints;
/// with `DISPATCH_BLESS=1` in the environment, rewrites the file instead.
#[cfg(test)]
pub(crate) fn assert_committed(file: &str, command: &str, now: &str) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(file);
    if std::env::var_os("DISPATCH_BLESS").is_some() {
        std::fs::write(&path, now).expect("write the document");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "docs/{file} differs from what the code generates: run \
         `cargo run --bin dispatchd -- {command} > docs/{file}` (or this test with \
         DISPATCH_BLESS=1) and commit it"
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// `docs/openapi.json` is what the code generates. `DISPATCH_BLESS=1` rewrites it.
    #[test]
    fn the_committed_openapi_document_is_what_the_code_generates() {
        super::assert_committed("openapi.json", "openapi", &super::document());
    }

    const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

    /// `src` without its `//` comments (a route commented out is not served).
    fn without_comments(src: &str) -> String {
        src.lines()
            .map(|line| {
                let mut in_string = false;
                let mut prev = ' ';
                for (i, c) in line.char_indices() {
                    match c {
                        '"' if prev != '\\' => in_string = !in_string,
                        '/' if prev == '/' && !in_string => return &line[..i - 1],
                        _ => {}
                    }
                    prev = c;
                }
                line
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The routes a router source declares with a literal path, `.route("<path>", <methods>)`,
    /// with the methods named in that call (`get(..)`, `.put(..)`, `routing::put(..)`).
    fn declared_routes(src: &str) -> Vec<(String, String)> {
        let src = without_comments(src);
        let mut out = Vec::new();
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let Some(literal) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            let path = &literal[..literal.find('"').expect("a closed string literal")];
            // The call's arguments: up to its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(j, _)| j)
                .expect("a closed .route( call");
            let call = &rest[..end];
            for m in METHODS {
                let named = call.match_indices(&format!("{m}(")).any(|(k, _)| {
                    !call[..k].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                });
                if named {
                    out.push((m.to_owned(), path.to_owned()));
                }
            }
        }
        out
    }

    /// The document and the routers agree: every REST route the server declares is
    /// documented with the same methods, and every documented operation is declared. A
    /// route added or removed on one side only fails here. (The WebSocket upgrades are in
    /// asyncapi.yaml, the console's feed in docs/api.md; the console's page and assets are
    /// declared from a table, not with literal paths.)
    #[test]
    fn the_document_lists_exactly_the_routes_the_server_declares() {
        const NOT_REST: [&str; 3] = ["/v1/ws/driver", "/v1/ws/rider", "/admin/v1/ws/live"];
        let sources = [
            include_str!("http.rs"),
            include_str!("admin.rs"),
            include_str!("cluster.rs"),
            include_str!("console.rs"),
        ];
        let served: BTreeSet<(String, String)> = sources
            .into_iter()
            .flat_map(declared_routes)
            .filter(|(_, path)| !NOT_REST.contains(&path.as_str()))
            .collect();
        assert!(
            served.len() >= 20,
            "the parser finds the routes: {served:?}"
        );
        let doc = super::document_json();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                METHODS
                    .into_iter()
                    .filter(|m| item.get(*m).is_some())
                    .map(move |m| (m.to_owned(), path.clone()))
            })
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not in openapi.json: {undocumented:?}; in openapi.json but not served: {unserved:?}"
        );
    }
}
