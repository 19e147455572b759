//! WebSocket sessions for drivers and riders: auth at the upgrade, `welcome` first, one
//! JSON object per text frame, `req` correlation, limits (frame size, location rate, bad
//! messages, connections), and a writer that drains the session's bounded queue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use dispatch_actors::messages::DriverCommand;
use dispatch_actors::metrics::Handling;
use dispatch_actors::records::Identity;
use dispatch_actors::session::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, Outbound, Responder, SessionHandle, SessionInbox,
};
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
    token: Option<String>,
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

/// Holds one slot of `--max-connections` for as long as a session lives.
struct ConnectionSlot(App);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
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
    if app.connections.fetch_add(1, Ordering::AcqRel) >= app.config.max_connections {
        app.connections.fetch_sub(1, Ordering::AcqRel);
        app.metrics.bound_hit("max_connections");
        return HttpError(ApiError::unavailable("too many connections")).into_response();
    }
    let slot = ConnectionSlot(app.clone());
    let hard = app.config.ws_hard_max_bytes;
    // Small socket buffers: tungstenite's default is 128 KiB each way per session, which
    // made 17,000 sessions cost over 3 GB. The read buffer is allocated up front for
    // every session, and an app's frames are a few hundred bytes (a ping ~150): 1 KiB
    // holds several; a larger frame grows the buffer for itself and still arrives. The
    // write buffer only grows while a frame is written.
    up.read_buffer_size(1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            let span = match &role {
                Identity::Driver(id) => {
                    tracing::info_span!("session", role = "driver", driver_id = %id)
                }
                Identity::Rider(id) => {
                    tracing::info_span!("session", role = "rider", rider_id = %id)
                }
            };
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
struct Limits {
    messages: Bucket,
    pings: Bucket,
    /// Messages refused (`rate_limited`) since `window` began, a second at most ago.
    refused: f64,
    window: Instant,
}

impl Limits {
    fn new(app: &App) -> Limits {
        let rate = app.config.ws_messages_max_per_s;
        Limits {
            messages: Bucket::new(rate, rate.saturating_mul(2)),
            pings: Bucket::new(app.config.location_max_per_s, app.config.location_max_per_s),
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
        app: &App,
        handle: &SessionHandle,
        req: Option<u64>,
        location: bool,
    ) -> bool {
        let (bound, message) = if !self.messages.take() {
            (
                "ws_message_rate",
                format!(
                    "at most {} messages a second",
                    app.config.ws_messages_max_per_s
                ),
            )
        } else if location && !self.pings.take() {
            (
                "location_rate",
                format!(
                    "at most {} location updates a second",
                    app.config.location_max_per_s
                ),
            )
        } else if handle.in_flight() >= app.config.ws_in_flight_max {
            (
                "ws_in_flight",
                format!(
                    "at most {} messages awaiting an answer; wait for answers first",
                    app.config.ws_in_flight_max
                ),
            )
        } else {
            return true;
        };
        app.metrics.bound_hit(bound);
        self.refused += 1.0;
        reply_error(handle, req, ApiError::new(ErrorCode::RateLimited, message));
        false
    }
}

fn reply_error(handle: &SessionHandle, req: Option<u64>, error: ApiError) {
    Responder::new(req, handle.clone()).fail(error);
}

async fn session(app: App, socket: WebSocket, role: Identity) {
    let label = role.role();
    let (handle, inbox) = app.system.new_session();
    // Boxed: attaching awaits an actor's start, a ~1 KiB future that the session's task
    // would otherwise keep for the whole life of the connection (issue 14).
    let attached = Box::pin(app.system.attach(&role, handle.clone())).await;
    let (mut sink, mut stream) = socket.split();
    if !attached {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: 1011,
                reason: "could not start the session".into(),
            })))
            .await;
        return;
    }
    app.transport.sessions.with_label_values(&[label]).inc();
    app.metrics.started("session");
    let heard = Arc::new(AtomicU64::new(app.system.now_ms()));
    let offers = OfferTrace::new();
    let writer = tokio::spawn(write_loop(
        app.clone(),
        sink,
        inbox,
        label,
        (handle.clone(), heard.clone(), offers.clone()),
    ));

    let mut bad = BadWindow {
        limit: app.config.bad_message_limit,
        window: Duration::from_millis(app.config.bad_message_window_ms),
        hits: VecDeque::new(),
    };
    let mut limits = Limits::new(&app);
    let received = app.transport.ws_messages.with_label_values(&[label, "in"]);
    loop {
        if let Some(wait) = limits.pause().filter(|w| !w.is_zero()) {
            app.metrics.bound_hit("ws_read_paused");
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
                        app.metrics.bound_hit("ws_hard_max_bytes");
                        handle.close(CLOSE_TOO_BIG);
                    }
                    // A text frame (or a close reason) that is not UTF-8: a bad message,
                    // counted as every other one is, that gets the close RFC 6455
                    // requires (8.1: fail the connection; 7.4.1: 1007) rather than a
                    // JSON error. Nothing in the frame is acted on.
                    Some(tungstenite_axum::Error::Utf8(_)) => {
                        received.inc();
                        drop(app.metrics.handling("session", "invalid"));
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
        heard.store(app.system.now_ms(), Ordering::Relaxed);
        let is_bad = match frame {
            Message::Text(text) => {
                received.inc();
                // Timed and counted as a message of its kind once decoded.
                let mut handling = app.metrics.handling("session", "invalid");
                if text.len() > app.config.max_frame_bytes {
                    app.metrics.bound_hit("ws_frame_bytes");
                    reply_error(
                        &handle,
                        None,
                        ApiError::new(
                            ErrorCode::TooLarge,
                            format!("frames are limited to {} bytes", app.config.max_frame_bytes),
                        ),
                    );
                    true
                } else {
                    match &role {
                        Identity::Driver(id) => client_frame(
                            &app,
                            &handle,
                            decode::driver(&text),
                            &mut limits,
                            &mut handling,
                            |c| (c.kind(), matches!(c, DriverCommand::Location { .. })),
                            |c, r| {
                                let (span, trace) = offers.answer(&c);
                                span.in_scope(|| app.system.driver_command(id, c, r, trace))
                            },
                        ),
                        Identity::Rider(id) => client_frame(
                            &app,
                            &handle,
                            decode::rider(&text),
                            &mut limits,
                            &mut handling,
                            |c| (c.kind(), false),
                            |c, r| {
                                let (span, trace) = telemetry::rider_frame(&c);
                                span.in_scope(|| app.system.rider_command(id, c, r, trace))
                            },
                        ),
                    }
                }
            }
            Message::Binary(_) => {
                received.inc();
                let _handling = app.metrics.handling("session", "invalid");
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
            app.metrics.bound_hit("bad_messages");
            tracing::info!(
                role = label,
                "closing a session that keeps sending bad messages"
            );
            handle.close(CLOSE_POLICY);
            break;
        }
    }

    app.system.detach(&role, handle.id);
    handle.close(1000);
    let _ = writer.await;
    app.transport.sessions.with_label_values(&[label]).dec();
    app.metrics.stopped("session");
}

/// One client message, decoded (or refused) by its role's decoder: admitted by the
/// session's limits and handed to `send` with its responder. Returns whether it was a bad
/// message (counts toward the 1008 close).
fn client_frame<C>(
    app: &App,
    handle: &SessionHandle,
    decoded: Result<(Option<u64>, C), (Option<u64>, ApiError)>,
    limits: &mut Limits,
    handling: &mut Handling<'_>,
    kind: impl FnOnce(&C) -> (&'static str, bool),
    send: impl FnOnce(C, Responder),
) -> bool {
    match decoded {
        Err((req, e)) => {
            reply_error(handle, req, e);
            true
        }
        Ok((req, cmd)) => {
            let (name, location) = kind(&cmd);
            handling.kind(name);
            if limits.admit(app, handle, req, location) {
                // A lost command's responder answers `internal` itself.
                send(cmd, Responder::new(req, handle.clone()));
            }
            false
        }
    }
}

async fn write_loop(
    app: App,
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    inbox: SessionInbox,
    label: &'static str,
    (handle, heard, offers): (SessionHandle, Arc<AtomicU64>, OfferTrace),
) {
    let (mut rx, closed) = inbox.into_parts();
    // Pings keep a quiet session alive through proxies; a client silent for three
    // intervals is gone (a phone that lost its network sends no close).
    let every = app.config.ws_ping_interval_ms;
    let mut pings = tokio::time::interval(Duration::from_millis(every.max(1)));
    pings.tick().await;
    let sent = app.transport.ws_messages.with_label_values(&[label, "out"]);
    let mut shutdown = app.shutdown.clone();
    // The close code to send as the loop ends, if there is one, and its reason.
    let code = loop {
        tokio::select! {
            biased;
            code = closed.closed() => break Some((code, close_reason(code))),
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                break Some((CLOSE_GOING_AWAY, app.stop_reason.get().copied().unwrap_or("server shutting down")))
            }
            _ = pings.tick(), if every > 0 => {
                let silent = app.system.now_ms().saturating_sub(heard.load(Ordering::Relaxed));
                if silent > 3 * every {
                    app.metrics.bound_hit("ws_idle_timeout");
                    tracing::info!(role = label, silent_ms = silent, "closing a session that stopped answering");
                    handle.close(CLOSE_GOING_AWAY);
                } else if let Err(code) = send_unless_closed(&mut sink, Message::Ping(Default::default()), &closed).await {
                    break code.map(|c| (c, close_reason(c)));
                }
            }
            m = rx.recv() => {
                let Some(m) = m else { break None };
                // A leader past its lease's deadline tells nobody anything more.
                if app.term.as_ref().is_some_and(|t| !t.live()) {
                    break Some((CLOSE_GOING_AWAY, super::failover::LEASE_LOST));
                }
                // A traced offer's write is a step of its ride's trace.
                let span = offers.writing(&m);
                let text = render_text(&app, *m);
                let frame = Message::Text(text.into());
                if let Err(code) = send_unless_closed(&mut sink, frame, &closed).instrument(span).await {
                    break code.map(|c| (c, close_reason(c)));
                }
                sent.inc();
            }
        }
    };
    goodbye(&mut sink, code).await;
}

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

fn render_text(app: &App, m: Outbound) -> String {
    let wire = render::outbound(m, app.system.now_ms());
    serde_json::to_string(&wire).expect("wire types always serialize")
}
