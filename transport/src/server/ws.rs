//! WebSocket sessions for drivers and riders: auth at the upgrade, `welcome` first, one
//! JSON object per text frame, `req` correlation, limits (frame size, location rate, bad
//! messages, connections), and a writer that drains the session's bounded queue.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use dispatch_actors::messages::{DriverCommand, RiderCommand};
use dispatch_actors::metrics::Handling;
use dispatch_actors::records::Identity;
use dispatch_actors::session::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, Outbound, Responder, SessionHandle, SessionInbox,
};
use dispatch_actors::stages::Stage;
use dispatch_actors::{ApiError, ErrorCode};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::Instrument;

use super::decode;
use super::http::{HttpError, QueryParams};
use super::{App, auth, render};
use crate::telemetry::{self, OfferTrace};

#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    pub(super) token: Option<String>,
}

async fn identity(app: &App, headers: &HeaderMap, q: &TokenQuery) -> Result<Identity, HttpError> {
    let token = auth::bearer(headers, q.token.as_deref())
        .ok_or_else(|| HttpError(ApiError::new(ErrorCode::Unauthorized, "missing token")))?;
    super::jwt::identify(app, token).await
}

pub async fn driver_upgrade(
    State(app): State<App>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<TokenQuery>,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    upgrade_as(app, &headers, &q, up, "driver").await
}

pub async fn rider_upgrade(
    State(app): State<App>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<TokenQuery>,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    upgrade_as(app, &headers, &q, up, "rider").await
}

/// A session for `role`, whose token must be a `role`'s (403 for the other role's).
async fn upgrade_as(
    app: App,
    headers: &HeaderMap,
    q: &TokenQuery,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    role: &'static str,
) -> Response {
    match identity(&app, headers, q).await {
        Ok(who) if who.role() == role => upgrade(app, up, who),
        Ok(who) => HttpError(ApiError::forbidden(format!(
            "a {} token cannot open a {role} session",
            who.role()
        )))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// What a session's loops need from the node that serves it.
#[derive(Clone)]
pub(super) enum Env {
    /// This node's own term (or the single node): commands go to its actors. In sharded
    /// mode, the lease clock of the session's account's shard ([`Here::clock_of`]).
    ///
    /// [`Here::clock_of`]: super::sharded::Here::clock_of
    Local(App, Option<Arc<super::shards::ShardSlot>>),
    /// A standby's session, relayed to the leader's actors (see `relay`).
    Relayed(Arc<super::relay::Standby>),
}

impl Env {
    pub(super) fn config(&self) -> &super::Config {
        match self {
            Env::Local(app, _) => &app.config,
            Env::Relayed(s) => &s.config,
        }
    }

    pub(super) fn metrics(&self) -> &dispatch_actors::Metrics {
        match self {
            Env::Local(app, _) => &app.metrics,
            Env::Relayed(s) => &s.metrics,
        }
    }

    fn transport(&self) -> &super::TransportMetrics {
        match self {
            Env::Local(app, _) => &app.transport,
            Env::Relayed(s) => &s.transport,
        }
    }

    fn connections(&self) -> &std::sync::atomic::AtomicUsize {
        match self {
            Env::Local(app, _) => &app.connections,
            Env::Relayed(s) => &s.connections,
        }
    }

    /// Unix milliseconds: the system's clock, or the wall clock on a standby (which
    /// renders the leader's deadlines, as an app compares them with its own clock).
    fn now_ms(&self) -> u64 {
        match self {
            Env::Local(app, _) => app.system.now_ms(),
            Env::Relayed(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    fn shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        match self {
            Env::Local(app, _) => app.shutdown.clone(),
            Env::Relayed(s) => s.shutdown.clone(),
        }
    }

    fn stop_reason(&self) -> &'static str {
        match self {
            Env::Local(app, _) => app.stop_reason.get().copied(),
            Env::Relayed(_) => None,
        }
        .unwrap_or("server shutting down")
    }

    /// A leader past its lease's deadline tells nobody anything more (a relayed session's
    /// leader checks its own before it sends).
    fn term_lost(&self) -> bool {
        match self {
            Env::Local(app, shard) => {
                app.term.as_ref().is_some_and(|t| !t.live())
                    || shard.as_ref().is_some_and(|s| !s.clock().live())
            }
            Env::Relayed(_) => false,
        }
    }

    /// Whether this session's node runs a lease term at all (cluster mode): a single node
    /// has none, and its writer reads no clock for it.
    fn in_term(&self) -> bool {
        match self {
            Env::Local(app, shard) => app.term.is_some() || shard.is_some(),
            Env::Relayed(_) => false,
        }
    }
}

/// Holds one slot of `--max-connections` for as long as a session lives.
pub(super) struct ConnectionSlot(Env);

impl ConnectionSlot {
    /// A slot, or the 503 for a node at `--max-connections` (counted).
    pub(super) fn take(env: &Env) -> Result<ConnectionSlot, HttpError> {
        let max = env.config().max_connections;
        if env.connections().fetch_add(1, Ordering::AcqRel) >= max {
            env.connections().fetch_sub(1, Ordering::AcqRel);
            env.metrics().bound_hit("max_connections");
            return Err(HttpError(ApiError::unavailable("too many connections")));
        }
        Ok(ConnectionSlot(env.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections().fetch_sub(1, Ordering::AcqRel);
    }
}

/// The session's span.
pub(super) fn session_span(role: &Identity) -> tracing::Span {
    match role {
        Identity::Driver(id) => tracing::info_span!("session", role = "driver", driver_id = %id),
        Identity::Rider(id) => tracing::info_span!("session", role = "rider", rider_id = %id),
    }
}

/// The socket's limits, then `run` on the upgraded socket.
pub(super) fn upgrade_socket<F>(
    hard: usize,
    up: WebSocketUpgrade,
    run: impl FnOnce(WebSocket) -> F + Send + 'static,
) -> Response
where
    F: Future<Output = ()> + Send + 'static,
{
    // Small socket buffers: tungstenite's default is 128 KiB each way per session, which
    // made 17,000 sessions cost over 3 GB. The read buffer is allocated up front for
    // every session, and an app's frames are a few hundred bytes (a ping ~150): 1 KiB
    // holds several; a larger frame grows the buffer for itself and still arrives. The
    // write buffer only grows while a frame is written.
    up.read_buffer_size(1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(run)
}

/// A request to a WebSocket route that is not an upgrade: 400 `bad_request`, in the
/// protocol's JSON form (not axum's text).
pub fn not_an_upgrade(e: WebSocketUpgradeRejection) -> Response {
    HttpError(ApiError::new(
        ErrorCode::BadRequest,
        format!("not a WebSocket upgrade: {}", e.body_text()),
    ))
    .into_response()
}

/// Authentication comes first (401/403), then the request must really be a WebSocket
/// upgrade (400 `bad_request` otherwise, in the protocol's JSON form).
fn upgrade(
    app: App,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    role: Identity,
) -> Response {
    let up = match up {
        Ok(up) => up,
        Err(e) => return not_an_upgrade(e),
    };
    if !app.ready.load(Ordering::Acquire) {
        return HttpError(ApiError::unavailable(
            "the server is starting or shutting down",
        ))
        .into_response();
    }
    let slot = match ConnectionSlot::take(&Env::Local(app.clone(), None)) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    upgrade_socket(app.config.ws_hard_max_bytes, up, move |socket| async move {
        let _slot = slot;
        let span = session_span(&role);
        session(app, socket, role).instrument(span).await;
    })
}

/// "More than `limit` bad messages within `window`."
struct BadWindow {
    limit: usize,
    window: Duration,
    hits: VecDeque<Instant>,
}

impl BadWindow {
    fn hit(&mut self) -> bool {
        let now = Instant::now();
        self.hits.push_back(now);
        while self
            .hits
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.hits.pop_front();
        }
        self.hits.len() > self.limit
    }
}

/// A token bucket: `rate` a second, bursts of up to `burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Tokens now (refilled up to the burst).
    fn tokens(&mut self) -> f64 {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens
    }

    fn take(&mut self) -> bool {
        if self.tokens() >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A session's rate limits: every message, and location pings on their own.
pub(super) struct Limits {
    messages: Bucket,
    pings: Bucket,
    /// Messages refused (`rate_limited`) since `window` began, a second at most ago.
    refused: f64,
    window: Instant,
}

impl Limits {
    fn new(config: &super::Config) -> Limits {
        let rate = config.ws_messages_max_per_s;
        Limits {
            messages: Bucket::new(rate, rate.saturating_mul(2)),
            pings: Bucket::new(config.location_max_per_s, config.location_max_per_s),
            refused: 0.0,
            window: Instant::now(),
        }
    }

    /// How long to wait before reading the next frame. A client that goes on sending
    /// after a burst's worth of refusals within a second is read no faster than its rate
    /// allows until the second is over: what it sends waits in its own socket (and then
    /// in its app), not in the server, and costs the server nothing meanwhile. Its
    /// session stays open and every message is still answered.
    fn pause(&mut self) -> Option<Duration> {
        if self.window.elapsed() > Duration::from_secs(1) {
            self.window = Instant::now();
            self.refused = 0.0;
        }
        if self.refused < self.messages.burst {
            return None;
        }
        let missing = (1.0 - self.messages.tokens()).max(0.0);
        Some(Duration::from_secs_f64(missing / self.messages.rate))
    }

    /// Whether a well-formed message may be acted on; if not, it is answered
    /// `rate_limited` and counted. Being over a rate is not a bad message: the session
    /// lives on, and what it sends later within the rate is served.
    fn admit(
        &mut self,
        env: &Env,
        handle: &SessionHandle,
        req: Option<u64>,
        location: bool,
    ) -> bool {
        let config = env.config();
        let (bound, message) = if !self.messages.take() {
            (
                "ws_message_rate",
                format!("at most {} messages a second", config.ws_messages_max_per_s),
            )
        } else if location && !self.pings.take() {
            (
                "location_rate",
                format!(
                    "at most {} location updates a second",
                    config.location_max_per_s
                ),
            )
        } else if let Some(e) = in_flight_refusal(config, handle) {
            ("ws_in_flight", e)
        } else {
            return true;
        };
        env.metrics().bound_hit(bound);
        self.refused += 1.0;
        reply_error(handle, req, ApiError::new(ErrorCode::RateLimited, message));
        false
    }
}

/// The refusal of one more message from a session that has `ws_in_flight_max` messages
/// awaiting an answer already (checked where its messages are handed to actors: by the
/// leader for a relayed session).
pub(super) fn in_flight_refusal(config: &super::Config, handle: &SessionHandle) -> Option<String> {
    (handle.in_flight() >= config.ws_in_flight_max).then(|| {
        format!(
            "at most {} messages awaiting an answer; wait for answers first",
            config.ws_in_flight_max
        )
    })
}

pub(super) fn reply_error(handle: &SessionHandle, req: Option<u64>, error: ApiError) {
    Responder::new(req, handle.clone()).fail(error);
}

async fn session(app: App, socket: WebSocket, role: Identity) {
    let (handle, inbox) = app.system.new_session();
    // Boxed: attaching awaits an actor's start, a ~1 KiB future that the session's task
    // would otherwise keep for the whole life of the connection (issue 14).
    let attached = Box::pin(app.system.attach(&role, handle.clone())).await;
    if !attached {
        refuse_session(socket).await;
        return;
    }
    let shard = app.sharded.as_ref().and_then(|h| h.clock_of(&role));
    let env = Env::Local(app.clone(), shard);
    let offers = OfferTrace::new();
    let detach = {
        let (app, role, id) = (app.clone(), role.clone(), handle.id);
        move || app.system.detach(&role, id)
    };
    let on_text = {
        let (role, handle, offers, env) =
            (role.clone(), handle.clone(), offers.clone(), env.clone());
        move |text: &str, limits: &mut Limits, handling: &mut Handling<'_>| {
            let driver = matches!(role, Identity::Driver(_));
            client_frame(
                &env,
                &handle,
                (text, driver),
                limits,
                handling,
                |cmd, req| {
                    let r = Responder::new(req, handle.clone());
                    match (cmd, &role) {
                        (Command::Driver(c), Identity::Driver(id)) => {
                            let (span, trace) = offers.answer(&c);
                            span.in_scope(|| app.system.driver_command(id, c, r, trace))
                        }
                        (Command::Rider(c), Identity::Rider(id)) => {
                            let (span, trace) = telemetry::rider_frame(&c);
                            span.in_scope(|| app.system.rider_command(id, c, r, trace))
                        }
                        // Decoded by the session's own role's decoder.
                        _ => {}
                    }
                },
            )
        }
    };
    serve(
        env,
        socket,
        (handle, inbox),
        role.role(),
        offers,
        on_text,
        detach,
    )
    .await;
}

/// Closes a socket whose session could not be attached (1011).
pub(super) async fn refuse_session(socket: WebSocket) {
    let (mut sink, _) = socket.split();
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: 1011,
            reason: "could not start the session".into(),
        })))
        .await;
}

/// A session on an upgraded socket, attached: its writer drains `inbox`; its reader
/// checks every frame (size, UTF-8, text) and hands each text frame to `on_text`, which
/// returns whether it was a bad message; `detach` runs as the reader stops.
pub(super) async fn serve(
    env: Env,
    socket: WebSocket,
    (handle, inbox): (SessionHandle, SessionInbox),
    label: &'static str,
    offers: OfferTrace,
    mut on_text: impl FnMut(&str, &mut Limits, &mut Handling<'_>) -> bool,
    detach: impl FnOnce(),
) {
    let (sink, mut stream) = socket.split();
    let transport = env.transport().clone();
    transport.sessions.with_label_values(&[label]).inc();
    env.metrics().started("session");
    let heard = Arc::new(AtomicU64::new(env.now_ms()));
    // In the session's span, so that what the writer logs names the session.
    let writer = tokio::spawn(
        write_loop(
            env.clone(),
            sink,
            inbox,
            label,
            (handle.clone(), heard.clone(), offers),
        )
        .in_current_span(),
    );
    let config = env.config();
    let metrics = env.metrics();
    let mut bad = BadWindow {
        limit: config.bad_message_limit,
        window: Duration::from_millis(config.bad_message_window_ms),
        hits: VecDeque::new(),
    };
    let mut limits = Limits::new(config);
    let received = transport.ws_messages.with_label_values(&[label, "in"]);
    loop {
        if let Some(wait) = limits.pause().filter(|w| !w.is_zero()) {
            metrics.bound_hit("ws_read_paused");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = handle.closed() => break,
            }
        }
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = handle.closed() => None,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                // The first close asked for wins over the 1000 below.
                match e.into_inner().downcast_ref::<tungstenite_axum::Error>() {
                    // A message over --ws-hard-max-bytes is not read at all: 1009, as
                    // documented.
                    Some(tungstenite_axum::Error::Capacity(_)) => {
                        metrics.bound_hit("ws_hard_max_bytes");
                        handle.close(CLOSE_TOO_BIG);
                    }
                    // A text frame (or a close reason) that is not UTF-8: a bad message,
                    // counted as every other one is, that gets the close RFC 6455
                    // requires (8.1: fail the connection; 7.4.1: 1007) rather than a
                    // JSON error. Nothing in the frame is acted on.
                    Some(tungstenite_axum::Error::Utf8(_)) => {
                        received.inc();
                        drop(metrics.handling("session", "invalid"));
                        tracing::info!(
                            role = label,
                            "closing a session that sent text that is not UTF-8"
                        );
                        handle.close(CLOSE_INVALID_UTF8);
                    }
                    _ => {}
                }
                break;
            }
            None => break,
        };
        heard.store(env.now_ms(), Ordering::Relaxed);
        let is_bad = match frame {
            Message::Text(text) => {
                received.inc();
                // Timed and counted as a message of its kind once decoded.
                let mut handling = metrics.handling("session", "invalid");
                if text.len() > config.max_frame_bytes {
                    metrics.bound_hit("ws_frame_bytes");
                    reply_error(
                        &handle,
                        None,
                        ApiError::new(
                            ErrorCode::TooLarge,
                            format!("frames are limited to {} bytes", config.max_frame_bytes),
                        ),
                    );
                    true
                } else {
                    on_text(&text, &mut limits, &mut handling)
                }
            }
            Message::Binary(_) => {
                received.inc();
                let _handling = metrics.handling("session", "invalid");
                reply_error(
                    &handle,
                    None,
                    ApiError::new(
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text frames",
                    ),
                );
                true
            }
            // Control frames: heard from (above), not client messages.
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => break,
        };
        if is_bad && bad.hit() {
            metrics.bound_hit("bad_messages");
            tracing::info!(
                role = label,
                "closing a session that keeps sending bad messages"
            );
            handle.close(CLOSE_POLICY);
            break;
        }
    }

    detach();
    handle.close(1000);
    let _ = writer.await;
    transport.sessions.with_label_values(&[label]).dec();
    metrics.stopped("session");
}

/// A client message decoded by its role's decoder.
pub(super) enum Command {
    Driver(DriverCommand),
    Rider(RiderCommand),
}

/// A text frame decoded by the driver's decoder (`driver`) or the rider's.
pub(super) fn decode_command(
    text: &str,
    driver: bool,
) -> Result<(Option<u64>, Command), (Option<u64>, ApiError)> {
    if driver {
        decode::driver(text).map(|(req, c)| (req, Command::Driver(c)))
    } else {
        decode::rider(text).map(|(req, c)| (req, Command::Rider(c)))
    }
}

/// One client text frame, decoded (or refused) by the decoder of its role (`driver`,
/// else a rider's): admitted by the session's limits and handed to `send` with its
/// `req`. Returns whether it was a bad message (counts toward the 1008 close).
pub(super) fn client_frame(
    env: &Env,
    handle: &SessionHandle,
    (text, driver): (&str, bool),
    limits: &mut Limits,
    handling: &mut Handling<'_>,
    send: impl FnOnce(Command, Option<u64>),
) -> bool {
    match decode_command(text, driver) {
        Err((req, e)) => {
            reply_error(handle, req, e);
            true
        }
        Ok((req, cmd)) => {
            let (name, location) = match &cmd {
                Command::Driver(c) => (c.kind(), matches!(c, DriverCommand::Location { .. })),
                Command::Rider(c) => (c.kind(), false),
            };
            handling.kind(name);
            if limits.admit(env, handle, req, location) {
                // A lost command's responder answers `internal` itself.
                send(cmd, req);
            }
            false
        }
    }
}

async fn write_loop(
    env: Env,
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    inbox: SessionInbox,
    label: &'static str,
    (handle, heard, offers): (SessionHandle, Arc<AtomicU64>, OfferTrace),
) {
    let (mut rx, closed) = inbox.into_parts();
    // Pings keep a quiet session alive through proxies; a client silent for three
    // intervals is gone (a phone that lost its network sends no close).
    let every = env.config().ws_ping_interval_ms;
    let mut pings = tokio::time::interval(Duration::from_millis(every.max(1)));
    pings.tick().await;
    let sent = env
        .transport()
        .ws_messages
        .with_label_values(&[label, "out"]);
    let mut shutdown = env.shutdown();
    // The close code to send as the loop ends, if there is one, and its reason.
    let code = loop {
        tokio::select! {
            biased;
            code = closed.closed() => break Some((code, closed.reason().unwrap_or(close_reason(code)))),
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                break Some((CLOSE_GOING_AWAY, env.stop_reason()))
            }
            _ = pings.tick(), if every > 0 => {
                let silent = env.now_ms().saturating_sub(heard.load(Ordering::Relaxed));
                if silent > 3 * every {
                    env.metrics().bound_hit("ws_idle_timeout");
                    tracing::info!(role = label, silent_ms = silent, "closing a session that stopped answering");
                    handle.close(CLOSE_GOING_AWAY);
                } else if let Err(code) = send_unless_closed(&mut sink, Message::Ping(Default::default()), &closed).await {
                    break code.map(|c| (c, close_reason(c)));
                }
            }
            m = rx.recv() => {
                let Some(m) = m else { break None };
                // A traced offer's write is a step of its ride's trace.
                let span = offers.writing(&m);
                // A request's first offer: its last two stages (issue 14).
                let queued_at = match &*m {
                    Outbound::Offer(o) => o.queued_at,
                    _ => None,
                };
                let taken = queued_at.map(|q| {
                    let now = std::time::Instant::now();
                    env.metrics().offer_stage(Stage::SessionQueue, now.saturating_duration_since(q));
                    now
                });
                let text = render_text(&env, *m);
                let frame = Message::Text(text.into());
                // A leader past its lease's deadline tells nobody anything more: checked
                // once the frame is rendered, as close to the socket's write as this loop
                // gets. A process frozen (SIGSTOP, a paused VM) between this check and the
                // write sends the frame as it resumes, past the deadline: no check inside
                // the process can close that gap. Such a frame was decided, rendered and
                // checked within the term; it is logged with how long after its check it
                // was written, and the session closes at once.
                if env.term_lost() {
                    break Some((CLOSE_GOING_AWAY, super::failover::LEASE_LOST));
                }
                let checked = env.in_term().then(Instant::now);
                if let Err(code) = send_unless_closed(&mut sink, frame, &closed).instrument(span).await {
                    break code.map(|c| (c, close_reason(c)));
                }
                if let Some(t) = taken {
                    env.metrics().offer_stage(Stage::SocketWrite, t.elapsed());
                }
                sent.inc();
                if env.term_lost() {
                    tracing::warn!(
                        after_check_ms = checked.map_or(0, |c| c.elapsed().as_millis() as u64),
                        "{LATE_FRAME}"
                    );
                    break Some((CLOSE_GOING_AWAY, super::failover::LEASE_LOST));
                }
            }
        }
    };
    goodbye(&mut sink, code).await;
}

/// The log line of a frame checked within the leader's term and written after its
/// deadline (the crash test's failover case reads it).
pub const LATE_FRAME: &str = "a frame checked within this node's term was written after the term's deadline (the process was paused or the write was slow)";

/// Sends one frame, unless the session is asked to close first. A client that stopped
/// reading blocks a send once the socket's buffers are full; its queue then fills and the
/// session is closed, and the pending send must not keep it open: it is given up for the
/// close. `Err(Some(code))`: close with `code`; `Err(None)`: the send failed (the socket
/// broke, or the client closed first).
async fn send_unless_closed(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    frame: Message,
    closed: &dispatch_actors::session::CloseWatch,
) -> Result<(), Option<u16>> {
    tokio::select! {
        r = sink.send(frame) => r.map_err(|_| None),
        code = closed.closed() => Err(Some(code)),
    }
}

/// Ends the connection with a close frame: ours (`code` and its reason), or, when the client closed
/// first, the answer RFC 6455 (5.5.1) requires, which echoes the client's code. tungstenite
/// queues that answer itself when it reads the client's close and refuses a close of our
/// own after it (`SendAfterClosing`); the answer goes out only when the socket is flushed,
/// which `close` does. Without it a client saw 1006 on every normal sign-off. Bounded by
/// [`STUCK_CLOSE_WAIT`]: a client that stopped reading may leave no room for the frame.
async fn goodbye(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    code: Option<(u16, &'static str)>,
) {
    let bye = async {
        if let Some((code, reason)) = code {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = sink.send(frame).await;
        }
        let _ = sink.close().await;
    };
    let _ = tokio::time::timeout(STUCK_CLOSE_WAIT, bye).await;
}

/// The close code for a message over `--ws-hard-max-bytes`.
const CLOSE_TOO_BIG: u16 = 1009;

/// The close code for a text frame that is not UTF-8 (RFC 6455 7.4.1: "inconsistent data").
const CLOSE_INVALID_UTF8: u16 = 1007;

fn close_reason(code: u16) -> &'static str {
    match code {
        CLOSE_TOO_BIG => "message too big",
        CLOSE_INVALID_UTF8 => "text frames must be UTF-8",
        dispatch_actors::session::CLOSE_REPLACED => "replaced",
        CLOSE_POLICY => "policy violation",
        _ => "",
    }
}

/// How long a close frame may wait for room in the socket (a client that stopped reading
/// leaves none).
const STUCK_CLOSE_WAIT: Duration = Duration::from_secs(1);

fn render_text(env: &Env, m: Outbound) -> String {
    let wire = render::outbound(m, env.now_ms());
    serde_json::to_string(&wire).expect("wire types always serialize")
}
