//! REST calls forwarded to the node that serves them (`--cluster-mode sharded`; issue 16,
//! `docs/sharding.md` §4): a client behind a Kubernetes Service cannot choose its node, so
//! a request that only another node can answer is carried there through `ractor_cluster`
//! and answered as that node answers it.
//!
//! - **Which requests** ([`route`]): an account's routes (a bearer token naming an entity
//!   shard: quotes, trips, nearby, earnings) to the owner of that shard; the operator's
//!   settings (`/admin/pricing`, `/admin/surge`, `/admin/surge/cells/{cell}`, read or
//!   written) to the owner of `WHOLE_CITY` (shard 0); one driver's or rider's admin views
//!   and suspensions to the owner of its entity shard; one trip's admin views, cancel
//!   and refund to the owner of its pickup's cell shard; a registration under a JWT
//!   (`POST /v1/riders`, `POST /v1/drivers`: its id is the JWT's subject) to the owner of
//!   that id's entity shard. The rest is answered by the node asked (`docs/api.md`,
//!   sharded section, says why per route): an own-token registration draws its id in a
//!   shard the node asked serves.
//! - **Registration limit**: keyed by the client's address, which only the node asked
//!   knows. It counts a forwarded registration there, once, before forwarding it (429
//!   there, never forwarded, when over); the owner's limit skips a request carrying the
//!   [`Forwarded`] extension (`ratelimit::limit_registration`), so the registration is
//!   neither counted twice nor counted under the peer node.
//! - **How**: the request (method, path and query, the headers the routes read, the body)
//!   is a [`ForwardRequest`] cast to the owner's relay host (`relay::host_group(owner)`,
//!   the actor that hosts relayed sessions), which runs it through its own router
//!   (`http::router`, or `http::admin_router` for the admin listener) and casts the
//!   [`ForwardResponse`] (status, headers, body) back to the sender's relay endpoint. No
//!   protocol or proxy of our own: the nodes' authenticated `ractor_cluster` links.
//! - **Trust**: the owner's router checks the request as it checks its own clients'
//!   (the bearer token, the admin token): a peer's word is taken for nothing but the
//!   request itself. The front only verifies a token far enough to know its shard
//!   (`jwt::verify`), and an admin token before forwarding an admin route.
//! - **No loops**: the owner checks it serves the shard now ([`Serving::serve`]); if
//!   ownership moved meanwhile it answers 503 `unavailable` itself. It runs the request
//!   through its router, never its front, so a forwarded request is never forwarded
//!   again (and carries the [`Forwarded`] extension).
//! - **Bounds** (each counted in `dispatch_cluster_forwarded_total{route_group,outcome}`):
//!   a request body of at most [`MAX_REQUEST_BYTES`] (more: 413 `too_large`), an answer
//!   body of at most [`MAX_RESPONSE_BYTES`] (more: 502 `internal`), so a message stays well
//!   under membership's `MAX_FRAME_BYTES`; at most [`IN_FLIGHT`] forwarded requests
//!   waiting on a node (more: 503 at once) and [`HOST_IN_FLIGHT`] running on an owner for
//!   other nodes (more: 503 at once); the wait is bounded by the actors' call timeout plus
//!   the peer timeout, and ends at once when the owner's host leaves its group (a killed
//!   node's link closes): 503 `unavailable`, never a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use dispatch_actors::{ApiError, ErrorCode, Metrics};
use dispatch_engine::shard::{ShardId, WHOLE_CITY, entity_shard, shard_of};
use dispatch_engine::{DriverId, RiderId, TripId};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::http::{self, HttpError};
use super::relay::{self, Standby};
use super::{App, admin, auth, jwt};

/// The largest request body forwarded (more: 413 `too_large`, counted `too_large`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest answer body forwarded back (more: 502, counted `response_too_large`).
/// With the request's, base64 and the envelope, a message stays under 192 KiB, below
/// membership's 256 KiB `MAX_FRAME_BYTES`.
pub const MAX_RESPONSE_BYTES: usize = 96 * 1024;
/// The longest path and query forwarded (more: 413 `too_large`).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Forwarded requests waiting for their answer on one node at most (more: 503 at once,
/// counted `in_flight`).
pub const IN_FLIGHT: usize = 256;
/// Forwarded requests an owner runs for other nodes at once at most (more: 503 at once,
/// counted `owner_busy` on the sender).
pub const HOST_IN_FLIGHT: usize = 256;
/// The request headers carried (the ones the routes read); the others are dropped.
const REQUEST_HEADERS: [&str; 7] = [
    "authorization",
    "content-type",
    "accept",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "x-request-id",
];
/// The answer headers carried back.
const RESPONSE_HEADERS: [&str; 4] = [
    "content-type",
    "retry-after",
    "cache-control",
    "www-authenticate",
];

/// Every `route_group` of the forward series.
pub const ROUTE_GROUPS: [&str; 5] = [
    "account",
    "registration",
    "settings",
    "entity_admin",
    "trip_admin",
];
/// Every `outcome` of `dispatch_cluster_forwarded_total`.
pub const OUTCOMES: [&str; 9] = [
    "answered",
    "too_large",
    "response_too_large",
    "in_flight",
    "timeout",
    "unreachable",
    "owner_busy",
    "not_owner",
    "malformed",
];

/// A REST request on its way to the node that serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// The sender's node and its number for this request (set by the relay).
    pub node: String,
    pub id: u64,
    /// The shard the sender found the request needs: the owner serves it only if it
    /// serves this shard now.
    pub shard: ShardId,
    /// Received on the admin listener (`--admin-listen`): run through the admin router.
    pub admin: bool,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    pub body: String,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    pub body: String,
    /// Set when the owner refused to run the request: `owner_busy`, `not_owner`,
    /// `response_too_large` or `malformed` (the sender counts it so).
    #[serde(default)]
    pub refused: Option<String>,
}

/// Why a forward got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No host of the owner in its group, the send failed, or the host left its group
    /// (its node died or membership dropped it) before answering.
    Unreachable,
    Timeout,
}

/// A request an owner runs for another node (a request extension its handlers may read).
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub from: String,
}

/// The forward series: `dispatch_cluster_forwarded_total{route_group,outcome}` and
/// `dispatch_cluster_forward_seconds{route_group}`, registered in both cluster modes (only sharded mode forwards).
#[derive(Clone)]
pub struct ForwardMetrics {
    total: IntCounterVec,
    seconds: HistogramVec,
}

impl ForwardMetrics {
    pub fn new(m: &Metrics) -> anyhow::Result<Self> {
        let total = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_forwarded_total",
                "REST requests this node forwarded to the node serving them, by route group and outcome",
            ),
            &["route_group", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "dispatch_cluster_forward_seconds",
                "A forwarded REST request, from its forwarding to the owner's answer (or failure)",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route_group"],
        )?;
        for g in ROUTE_GROUPS {
            seconds.with_label_values(&[g]);
            for o in OUTCOMES {
                total.with_label_values(&[g, o]);
            }
        }
        m.registry.register(Box::new(total.clone()))?;
        m.registry.register(Box::new(seconds.clone()))?;
        Ok(Self { total, seconds })
    }

    fn count(&self, group: &str, outcome: &str) {
        debug_assert!(OUTCOMES.contains(&outcome), "add {outcome} to OUTCOMES");
        self.total.with_label_values(&[group, outcome]).inc();
    }
}

/// Where a request must be served: a shard and the route group it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub shard: ShardId,
    pub group: &'static str,
}

/// The shard a request needs, if it names one (`None`: the node asked answers it).
/// `operator_routes`: whether the operator routes are served on this listener.
pub async fn route(
    app: &App,
    (method, path, headers): (&Method, &str, &axum::http::HeaderMap),
    operator_routes: bool,
) -> Option<Target> {
    let token = auth::bearer(headers, None)?;
    if let Some(rest) = path.strip_prefix("/admin/") {
        if !operator_routes {
            return None;
        }
        // Only the admin token's requests go further (before any read of the store); the
        // others are answered here (401/403) as they would be there.
        admin::admin_token(app, &auth::hash(token)).ok()?;
        return admin_target(app, method, rest).await;
    }
    if *method == Method::POST && matches!(path, "/v1/riders" | "/v1/drivers") {
        // A registration under a JWT: its id is the JWT's subject, so its entity shard is
        // fixed and only that shard's owner can store it. Without a JWT (an own token is
        // minted, its id drawn in a shard the node asked serves), or with a bearer that is
        // no JWT or does not verify: answered here, as there.
        let proof = jwt::verify(&app.auth, token).await.ok()?;
        if !matches!(proof, jwt::Proof::Jwt(_)) {
            return None;
        }
        return Some(Target {
            shard: proof.shard()?,
            group: "registration",
        });
    }
    let account = matches!(
        path,
        "/v1/quotes" | "/v1/drivers/nearby" | "/v1/drivers/me/earnings"
    ) || path.starts_with("/v1/trips/");
    if !account {
        return None;
    }
    // A token that does not verify is answered here (401), as there.
    let shard = jwt::verify(&app.auth, token).await.ok()?.shard()?;
    Some(Target {
        shard,
        group: "account",
    })
}

/// The shard of an operator route that only one node can answer (module docs).
async fn admin_target(app: &App, method: &Method, rest: &str) -> Option<Target> {
    let parts: Vec<&str> = rest.split('/').collect();
    let settings = Target {
        shard: WHOLE_CITY,
        group: "settings",
    };
    let entity = |shard| Target {
        shard,
        group: "entity_admin",
    };
    match (method.as_str(), parts.as_slice()) {
        ("GET" | "PUT", ["pricing"] | ["surge"]) | ("PUT", ["surge", "cells", _]) => Some(settings),
        ("GET", ["drivers", id]) | ("POST", ["drivers", id, "suspend" | "unsuspend"]) => {
            Some(entity(entity_shard(DriverId::new(*id).as_str())))
        }
        ("GET", ["riders", id]) => Some(entity(entity_shard(RiderId::new(*id).as_str()))),
        ("GET", ["trips", id]) | ("POST", ["trips", id, "cancel" | "refund"]) => {
            // The trip's shard is its pickup's cell shard: from memory if it runs here,
            // else from the store. Unknown: answered here (404).
            let view = app.system.trip_view(&TripId::new(*id)).await.ok()??;
            let cell = app.system.config().grid.cell_of(view.pickup);
            Some(Target {
                shard: shard_of(cell),
                group: "trip_admin",
            })
        }
        _ => None,
    }
}

/// The sending side: one per node in sharded mode with membership.
pub struct Forwarder {
    standby: Arc<Standby>,
    metrics: ForwardMetrics,
    in_flight: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(standby: Arc<Standby>, metrics: ForwardMetrics) -> Self {
        // The owner's own bound on an actor's answer, and a peer timeout for the trip.
        let timeout = standby.attach_timeout();
        Self::with_bounds(standby, metrics, IN_FLIGHT, timeout)
    }

    fn with_bounds(
        standby: Arc<Standby>,
        metrics: ForwardMetrics,
        in_flight: usize,
        timeout: Duration,
    ) -> Self {
        Forwarder {
            standby,
            metrics,
            in_flight: Arc::new(tokio::sync::Semaphore::new(in_flight)),
            timeout,
        }
    }

    /// Tells every other node that the operator's settings changed in the store.
    pub fn settings_changed(&self) {
        self.standby.settings_changed();
    }

    /// Sends `req` to `owner`'s host and answers what it answers (module docs).
    pub async fn forward(
        &self,
        owner: &str,
        target: Target,
        admin: bool,
        req: Request,
    ) -> Response {
        let group = target.group;
        let started = Instant::now();
        let (outcome, response) = self.run(owner, target, admin, req).await;
        self.metrics.count(group, outcome);
        self.metrics
            .seconds
            .with_label_values(&[group])
            .observe(started.elapsed().as_secs_f64());
        if outcome != "answered" {
            tracing::info!(
                owner,
                group,
                outcome,
                "a forwarded request was not answered by its owner"
            );
        }
        response
    }

    async fn run(
        &self,
        owner: &str,
        target: Target,
        admin: bool,
        req: Request,
    ) -> (&'static str, Response) {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return (
                "in_flight",
                refusal(ApiError::unavailable(
                    "this node is forwarding too many requests: retry",
                )),
            );
        };
        let (parts, body) = req.into_parts();
        let uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let too_large = |what: &str| {
            (
                "too_large",
                refusal(ApiError::new(
                    ErrorCode::TooLarge,
                    format!("{what} is too large to forward to the node serving it"),
                )),
            )
        };
        if uri.len() > MAX_URI_BYTES {
            return too_large("the path and query");
        }
        let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BYTES).await else {
            return too_large(&format!("the body (at most {MAX_REQUEST_BYTES} bytes)"));
        };
        let request = ForwardRequest {
            node: String::new(),
            id: 0,
            shard: target.shard,
            admin,
            method: parts.method.as_str().to_owned(),
            uri,
            headers: carried(&parts.headers, &REQUEST_HEADERS),
            body: B64.encode(&body),
        };
        let group = relay::host_group(owner);
        let answer = match self.standby.forward_to(&group, request, self.timeout).await {
            Ok(a) => a,
            Err(Failure::Timeout) => {
                return (
                    "timeout",
                    refusal(ApiError::unavailable(format!(
                        "node {owner}, which serves this request, did not answer in time: retry"
                    ))),
                );
            }
            Err(Failure::Unreachable) => {
                return (
                    "unreachable",
                    refusal(ApiError::unavailable(format!(
                        "node {owner}, which serves this request, cannot be reached now: retry"
                    ))),
                );
            }
        };
        let outcome = match answer.refused.as_deref() {
            None => "answered",
            Some("owner_busy") => "owner_busy",
            Some("not_owner") => "not_owner",
            Some("response_too_large") => "response_too_large",
            Some(_) => "malformed",
        };
        match rebuild(answer) {
            Some(r) => (outcome, r),
            None => ("malformed", gateway(ApiError::internal())),
        }
    }
}

/// The owner's side: its routers and its bound.
pub struct Serving {
    client: axum::Router,
    admin: Option<axum::Router>,
    running: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

impl Serving {
    pub fn new(app: &App) -> Self {
        let peer = app
            .config
            .membership
            .as_ref()
            .map_or(Duration::from_secs(2), |m| m.peer_timeout);
        Serving {
            client: http::router(app.clone()),
            admin: app
                .config
                .admin_listen
                .map(|_| http::admin_router(app.clone())),
            running: Arc::new(tokio::sync::Semaphore::new(HOST_IN_FLIGHT)),
            timeout: Duration::from_millis(app.config.system.actor_call_timeout_ms) + peer,
        }
    }

    /// A place for one more forwarded request, or the answer refusing it at once.
    pub fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ForwardResponse> {
        self.running.clone().try_acquire_owned().map_err(|_| {
            let mut r = answer_of(ApiError::unavailable(
                "the node serving this request is busy: retry",
            ));
            r.refused = Some("owner_busy".into());
            r
        })
    }

    /// Runs a forwarded request through this node's router, if this node serves its
    /// shard now (else 503 `unavailable`, naming the owner as `check_here` does).
    pub async fn serve(&self, app: &App, f: ForwardRequest) -> ForwardResponse {
        if let Some(here) = &app.sharded
            && let Err(e) = here.check_shard(app, f.shard)
        {
            let mut r = answer_of(e.0);
            r.refused = Some("not_owner".into());
            return r;
        }
        let Some(req) = request_of(&f) else {
            let mut r = answer_of(ApiError::bad_request(
                "a forwarded request that does not decode",
            ));
            r.refused = Some("malformed".into());
            return r;
        };
        let router = match (&self.admin, f.admin) {
            (Some(a), true) => a.clone(),
            _ => self.client.clone(),
        };
        let run = async {
            match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        };
        let Ok(response) = tokio::time::timeout(self.timeout, run).await else {
            return answer_of(ApiError::unavailable(
                "the request did not finish in time: retry",
            ));
        };
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, MAX_RESPONSE_BYTES).await else {
            let mut r = answer_of(ApiError::new(
                ErrorCode::TooLarge,
                format!("the answer is larger than the {MAX_RESPONSE_BYTES} bytes a node forwards"),
            ));
            r.status = StatusCode::BAD_GATEWAY.as_u16();
            r.refused = Some("response_too_large".into());
            return r;
        };
        ForwardResponse {
            status: parts.status.as_u16(),
            headers: carried(&parts.headers, &RESPONSE_HEADERS),
            body: B64.encode(&body),
            refused: None,
        }
    }
}

/// The headers named in `keep`, as text (a value that is not text is dropped).
fn carried(headers: &axum::http::HeaderMap, keep: &[&str]) -> Vec<(String, String)> {
    keep.iter()
        .flat_map(|name| {
            headers
                .get_all(*name)
                .iter()
                .filter_map(move |v| v.to_str().ok().map(|v| ((*name).to_owned(), v.to_owned())))
        })
        .collect()
}

/// The request a [`ForwardRequest`] carries (`None`: it does not decode).
fn request_of(f: &ForwardRequest) -> Option<Request> {
    let method = Method::from_bytes(f.method.as_bytes()).ok()?;
    let uri: Uri = f.uri.parse().ok()?;
    let body = B64.decode(&f.body).ok()?;
    if body.len() > MAX_REQUEST_BYTES || f.headers.len() > 2 * REQUEST_HEADERS.len() {
        return None;
    }
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in &f.headers {
        if !REQUEST_HEADERS.contains(&name.as_str()) {
            continue;
        }
        req = req.header(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        );
    }
    let mut req = req.body(Body::from(body)).ok()?;
    req.extensions_mut().insert(Forwarded {
        from: f.node.clone(),
    });
    Some(req)
}

/// The response a [`ForwardResponse`] carries (`None`: it does not decode).
fn rebuild(a: ForwardResponse) -> Option<Response> {
    let status = StatusCode::from_u16(a.status).ok()?;
    let body = B64.decode(&a.body).ok()?;
    if body.len() > MAX_RESPONSE_BYTES {
        return None;
    }
    let mut r = Response::builder().status(status);
    for (name, value) in &a.headers {
        if !RESPONSE_HEADERS.contains(&name.as_str()) {
            continue;
        }
        r = r.header(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        );
    }
    r.body(Body::from(body)).ok()
}

/// A typed error as a [`ForwardResponse`].
fn answer_of(e: ApiError) -> ForwardResponse {
    let (status, body) = HttpError(e).parts();
    ForwardResponse {
        status: status.as_u16(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: B64.encode(serde_json::to_vec(&body).unwrap_or_default()),
        refused: None,
    }
}

fn refusal(e: ApiError) -> Response {
    HttpError(e).into_response()
}

/// 502 with a typed error body.
fn gateway(e: ApiError) -> Response {
    let mut r = HttpError(e).into_response();
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::relay::{Relay, ToEndpoint, ToHost};
    use ractor::Message;

    fn request(body: &[u8]) -> ForwardRequest {
        ForwardRequest {
            node: "n1".into(),
            id: 7,
            shard: 17,
            admin: false,
            method: "POST".into(),
            uri: "/v1/quotes?x=1".into(),
            headers: vec![
                ("authorization".into(), "Bearer tok_17.abc".into()),
                ("content-type".into(), "application/json".into()),
                ("x-forwarded-for".into(), "10.0.0.1".into()),
            ],
            body: B64.encode(body),
        }
    }

    #[test]
    fn a_forward_and_its_answer_cross_as_relay_casts() {
        let m = Relay::Msg(ToHost::Forward(Box::new(request(b"{}"))));
        let wire = m.clone().serialize().unwrap();
        assert_eq!(Relay::<ToHost>::deserialize(wire).unwrap(), m);
        let a = Relay::Msg(ToEndpoint::Forwarded {
            id: 7,
            response: Box::new(answer_of(ApiError::unavailable("x"))),
        });
        let wire = a.clone().serialize().unwrap();
        assert_eq!(Relay::<ToEndpoint>::deserialize(wire).unwrap(), a);
    }

    #[tokio::test]
    async fn the_owner_rebuilds_only_the_carried_headers_and_refuses_what_does_not_decode() {
        let req = request_of(&request(b"{\"a\":1}")).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/v1/quotes?x=1");
        assert_eq!(req.headers()["authorization"], "Bearer tok_17.abc");
        assert!(req.headers().get("x-forwarded-for").is_none());
        assert_eq!(req.extensions().get::<Forwarded>().unwrap().from, "n1");
        let body = axum::body::to_bytes(req.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"{\"a\":1}");
        let mut bad = request(b"");
        bad.body = "not base64!".into();
        assert!(request_of(&bad).is_none());
        let mut bad = request(b"");
        bad.method = "GE T".into();
        assert!(request_of(&bad).is_none());
        let too_big = request(&vec![b' '; MAX_REQUEST_BYTES + 1]);
        assert!(request_of(&too_big).is_none());
        // An answer: status and carried headers kept, a bad status refused.
        let r = rebuild(answer_of(ApiError::forbidden("no"))).unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["content-type"], "application/json");
        let mut bad = answer_of(ApiError::forbidden("no"));
        bad.status = 42;
        assert!(rebuild(bad).is_none());
    }

    /// The bytes a relay cast puts on the link.
    fn cast_bytes(m: ractor::message::SerializedMessage) -> usize {
        match m {
            ractor::message::SerializedMessage::Cast { args, .. } => args.len(),
            _ => panic!("a cast"),
        }
    }

    /// The largest request and answer fit a cluster message with room to spare.
    #[test]
    fn the_largest_forward_stays_under_the_cluster_frame_bound() {
        let max = dispatch_actors::remote::MAX_MESSAGE_BYTES;
        let mut r = request(&vec![b'x'; MAX_REQUEST_BYTES]);
        r.uri = "/".repeat(MAX_URI_BYTES);
        let m = Relay::Msg(ToHost::Forward(Box::new(r))).serialize();
        let n = cast_bytes(m.unwrap());
        assert!(n < max, "{n}");
        let mut a = answer_of(ApiError::forbidden("no"));
        a.body = B64.encode(vec![b'x'; MAX_RESPONSE_BYTES]);
        let response = Box::new(a);
        let m = Relay::Msg(ToEndpoint::Forwarded { id: 1, response }).serialize();
        let n = cast_bytes(m.unwrap());
        assert!(n < max, "{n}");
    }
}
