//! A simulated app: a WebSocket session that records everything it is told in the
//! [`Ledger`], and plans what to send next (a driver's or a rider's behaviour, seeded).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_tests::diagram::state_after;
use dispatch_tests::{Endpoint, WAIT, point};
use dispatch_transport::wire::{Offer, ServerMessage, Trip, TripState};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ledger::{Acked, Ledger};
use crate::{CENTER, location};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One app's session. Unlike the harness `Client`, it never panics when the server
/// dies: a closed socket simply ends it.
pub(crate) struct Session {
    pub(crate) who: String,
    pub(crate) id: String,
    pub(crate) ws: Ws,
    pub(crate) next_req: u64,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    /// The last version of each trip this session saw.
    pub(crate) last: HashMap<String, (u64, TripState)>,
    /// Commands sent with a `req` and not yet answered: (command, trip).
    pub(crate) pending: HashMap<u64, (&'static str, Option<String>)>,
    /// Messages read (and recorded) while waiting for a reply, not yet reacted to.
    pub(crate) backlog: VecDeque<ServerMessage>,
}

impl Session {
    /// Connects as `role` with `token` and reads the first message, which must be
    /// `welcome` (returned).
    pub(crate) async fn open(
        server: &Endpoint,
        role: &str,
        id: &str,
        token: &str,
        ledger: &Arc<Mutex<Ledger>>,
    ) -> Result<(Session, ServerMessage), String> {
        let url = server.ws_url(&format!("/v1/ws/{role}"));
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| format!("{role} {id}: no WebSocket upgrade within {WAIT:?}"))?
            .map_err(|e| format!("{role} {id}: upgrade refused: {e}"))?;
        let mut s = Session {
            who: format!("{role} {id}"),
            id: id.to_owned(),
            ws,
            next_req: 1,
            ledger: ledger.clone(),
            last: HashMap::new(),
            pending: HashMap::new(),
            backlog: VecDeque::new(),
        };
        let first = tokio::time::timeout(WAIT, s.recv())
            .await
            .map_err(|_| format!("{}: no welcome within {WAIT:?}", s.who))?
            .ok_or_else(|| format!("{}: closed before its welcome", s.who))?;
        match &first {
            ServerMessage::Welcome {
                driver_id,
                rider_id,
                trip,
                ..
            } => {
                let named = driver_id.as_ref().or(rider_id.as_ref());
                if named != Some(&s.id) {
                    return Err(format!("{}: welcome names {named:?}", s.who));
                }
                if let Some(t) = trip {
                    let who = format!("{} (welcome)", s.who);
                    s.ledger.lock().unwrap().observe(&who, t, false);
                    s.last.insert(t.trip_id.clone(), (t.version, t.state));
                }
            }
            m => return Err(format!("{}: first message is not welcome: {m:?}", s.who)),
        }
        Ok((s, first))
    }

    /// The next message, or `None` once the connection is gone.
    pub(crate) async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(&t).unwrap_or_else(|e| {
                        ServerMessage::Error {
                            req: None,
                            code: "undecodable".into(),
                            message: format!("{e}: {t}"),
                        }
                    }));
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    pub(crate) async fn send(&mut self, v: &Value) -> bool {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    /// Sends `v` with a fresh `req`, remembering what it was for.
    pub(crate) async fn send_req(
        &mut self,
        mut v: Value,
        cmd: &'static str,
        trip: Option<String>,
    ) -> bool {
        let req = self.next_req;
        self.next_req += 1;
        v["req"] = json!(req);
        self.pending.insert(req, (cmd, trip));
        self.send(&v).await
    }

    /// Records what `m` tells: trip updates, acks (checked against the update that must
    /// precede them), errors (only `conflict`, which races allow, is expected).
    pub(crate) fn note(&mut self, m: &ServerMessage) {
        let mut l = self.ledger.lock().unwrap();
        match m {
            ServerMessage::TripUpdate { req, trip } => {
                if let Some(r) = req {
                    self.pending.remove(r);
                }
                l.observe(&self.who, trip, true);
                if let Some((v, s)) = self.last.get(&trip.trip_id)
                    && *v > trip.version
                {
                    l.anomalies.push(format!(
                        "{}: trip {} went back from v{v} {s:?} to v{} {:?}",
                        self.who, trip.trip_id, trip.version, trip.state
                    ));
                }
                self.last
                    .insert(trip.trip_id.clone(), (trip.version, trip.state));
            }
            ServerMessage::Ack { req } => {
                let Some((cmd, trip)) = self.pending.remove(req) else {
                    l.anomalies
                        .push(format!("{}: ack for unknown req {req}", self.who));
                    return;
                };
                if cmd == "go_online" {
                    l.online.insert(self.id.clone());
                }
                if let (Some(want), Some(t)) = (state_after(cmd), trip) {
                    let seen = self.last.get(&t).copied();
                    if seen.map(|s| s.1) != Some(want) {
                        l.anomalies.push(format!(
                            "{}: {cmd} of trip {t} acknowledged, but the last update seen is {seen:?}, not {want:?}",
                            self.who
                        ));
                    }
                    l.acks.push(Acked {
                        who: self.who.clone(),
                        cmd,
                        trip_id: t,
                        version: seen.map_or(0, |s| s.0),
                    });
                }
            }
            ServerMessage::Error { req, code, message } => {
                let cmd = req.and_then(|r| self.pending.remove(&r));
                if code == "unavailable" && l.store_outage {
                    l.refused += 1;
                    return;
                }
                let expected = match &cmd {
                    // Races: the offer expired or moved on, the rider cancelled, ...
                    Some((c, _)) if code == "conflict" => *c != "request_ride",
                    Some(_) => false,
                    // A location ping over the rate.
                    None => code == "rate_limited",
                };
                if !expected {
                    l.anomalies
                        .push(format!("{}: {cmd:?} answered {code}: {message}", self.who));
                }
            }
            _ => {}
        }
    }

    /// A command answered `unavailable` while the store is away on purpose, planned
    /// again a moment later: what an app does with an answer that says "retry".
    pub(crate) fn retry_of(&self, m: &ServerMessage, mode: &mut Mode) -> Option<Planned> {
        let ServerMessage::Error {
            req: Some(r), code, ..
        } = m
        else {
            return None;
        };
        if code != "unavailable" || !self.ledger.lock().unwrap().store_outage {
            return None;
        }
        let after = Duration::from_millis(200);
        match self.pending.get(r)? {
            (cmd, Some(trip)) => Some(Planned::cmd(after, cmd, trip)),
            // A request answered `unavailable` may have landed (a COMMIT whose reply was
            // lost): its retry may then be refused `conflict`, naming that trip.
            ("request_ride" | RETRIED_REQUEST, None) => Some(Planned {
                cmd: RETRIED_REQUEST,
                ..ride_request(mode, after)
            }),
            _ => None,
        }
    }

    /// Sends `v` with a `req` and waits (recording everything) for its reply.
    pub(crate) async fn call(
        &mut self,
        v: Value,
        cmd: &'static str,
        trip: Option<String>,
    ) -> Result<ServerMessage, String> {
        let req = self.next_req;
        if !self.send_req(v.clone(), cmd, trip).await {
            return Err(format!("{}: {v} could not be sent", self.who));
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.recv())
                .await
                .map_err(|_| format!("{}: no reply to {v} within {WAIT:?}", self.who))?
                .ok_or_else(|| {
                    format!("{}: closed while waiting for the reply to {v}", self.who)
                })?;
            self.note(&m);
            let reply = match &m {
                ServerMessage::Ack { req: r }
                | ServerMessage::TripUpdate { req: Some(r), .. }
                | ServerMessage::Error { req: Some(r), .. } => *r == req,
                _ => false,
            };
            if reply {
                return Ok(m);
            }
            self.backlog.push_back(m);
        }
    }

    /// Like `call`, and the reply must be an ack.
    pub(crate) async fn ok(&mut self, v: Value, cmd: &'static str) -> Result<(), String> {
        match self.call(v.clone(), cmd, None).await? {
            ServerMessage::Ack { .. } => Ok(()),
            m => Err(format!("{}: {v} answered {m:?}", self.who)),
        }
    }
}

/// The command label of a `request_ride` sent again after `unavailable`.
const RETRIED_REQUEST: &str = "request_ride (retried)";

/// Something an app will send at `at`.
pub(crate) struct Planned {
    pub(crate) at: Instant,
    pub(crate) msg: Value,
    pub(crate) cmd: &'static str,
    pub(crate) trip: Option<String>,
    pub(crate) with_req: bool,
}

impl Planned {
    pub(crate) fn cmd(after: Duration, cmd: &'static str, trip: &str) -> Planned {
        Planned {
            at: Instant::now() + after,
            msg: json!({"type": cmd, "trip_id": trip}),
            cmd,
            trip: Some(trip.to_owned()),
            with_req: true,
        }
    }
}

/// How an app behaves: seeded random choices (declines, ignored offers, cancels, think
/// time), or just finishing what is there (accept every offer, drive every trip to
/// `completed`, request nothing new).
pub(crate) enum Mode {
    Chaos(Box<StdRng>),
    Finish,
}

impl Mode {
    pub(crate) fn think(&mut self, max_ms: u64) -> Duration {
        match self {
            Mode::Chaos(r) => Duration::from_millis(r.random_range(0..=max_ms)),
            Mode::Finish => Duration::ZERO,
        }
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        match self {
            Mode::Chaos(r) => r.random_bool(p),
            Mode::Finish => false,
        }
    }
}

/// Runs an app until its connection is gone: each message is recorded, then `react`
/// plans what to send (and when).
pub(crate) async fn run_app(
    s: Session,
    mode: Mode,
    plan: Vec<Planned>,
    react: fn(&str, &mut Mode, &ServerMessage, &mut Vec<Planned>),
) {
    run_app_until(s, mode, plan, react, std::future::pending()).await;
}

/// [`run_app`] until `stop` resolves: then it sends nothing more and reads (recording
/// them, up to [`WAIT`]) the replies to what it had sent. The session, still open, once
/// stopped; `None` if its connection went away first.
pub(crate) async fn run_app_until(
    mut s: Session,
    mut mode: Mode,
    mut plan: Vec<Planned>,
    react: fn(&str, &mut Mode, &ServerMessage, &mut Vec<Planned>),
    stop: impl std::future::Future<Output = ()>,
) -> Option<Session> {
    tokio::pin!(stop);
    let me = s.id.clone();
    for m in std::mem::take(&mut s.backlog) {
        react(&me, &mut mode, &m, &mut plan);
    }
    loop {
        plan.sort_by_key(|p| p.at);
        let next = plan.first().map(|p| p.at);
        tokio::select! {
            () = &mut stop => break,
            m = s.recv() => {
                let m = m?;
                let retry = s.retry_of(&m, &mut mode);
                // A trip_update of a version this app already has is not news (a trip
                // actor that restarted sends its state again): an app that acted on it
                // twice would send a second, contradictory command.
                let known = matches!(&m, ServerMessage::TripUpdate { trip, .. }
                    if s.last.get(&trip.trip_id).is_some_and(|(v, _)| *v >= trip.version));
                s.note(&m);
                if !known {
                    react(&me, &mut mode, &m, &mut plan);
                }
                plan.extend(retry);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let p = plan.remove(0);
                let sent = if p.with_req {
                    s.send_req(p.msg, p.cmd, p.trip).await
                } else {
                    s.send(&p.msg).await
                };
                if !sent {
                    return None;
                }
            }
        }
    }
    let deadline = Instant::now() + WAIT;
    while !s.pending.is_empty() {
        match tokio::time::timeout_at(deadline, s.recv()).await {
            Ok(Some(m)) => s.note(&m),
            Ok(None) => return None,
            Err(_) => break,
        }
    }
    Some(s)
}

/// A driver: accepts most offers (declines some, ignores a few), drives its trips
/// through arrived, started and completed, sometimes cancelling before pickup.
pub(crate) fn driver_react(me: &str, mode: &mut Mode, m: &ServerMessage, plan: &mut Vec<Planned>) {
    match m {
        ServerMessage::Offer(o) => driver_on_offer(mode, o, plan),
        ServerMessage::TripUpdate { trip, .. } if trip.driver_id.as_deref() == Some(me) => {
            driver_on_trip(mode, trip, plan)
        }
        _ => {}
    }
}

pub(crate) fn driver_on_offer(mode: &mut Mode, o: &Offer, plan: &mut Vec<Planned>) {
    let roll = match mode {
        Mode::Chaos(r) => r.random::<f64>(),
        Mode::Finish => 0.0,
    };
    let think = mode.think(30);
    if roll < 0.75 {
        plan.push(Planned::cmd(think, "accept", &o.trip_id));
    } else if roll < 0.9 {
        plan.push(Planned::cmd(think, "decline", &o.trip_id));
    } // else: ignored, to run out the offer timeout
}

pub(crate) fn driver_on_trip(mode: &mut Mode, t: &Trip, plan: &mut Vec<Planned>) {
    let think = mode.think(25);
    let cmd = match t.state {
        TripState::DriverAssigned => {
            if matches!(mode, Mode::Chaos(_)) {
                // On the way: a position ping (not journaled; snapshotted).
                let near = (t.pickup.lat + 0.0005, t.pickup.lng);
                plan.push(Planned {
                    at: Instant::now(),
                    msg: location(near),
                    cmd: "location",
                    trip: None,
                    with_req: false,
                });
            }
            if mode.chance(0.08) {
                "cancel_trip"
            } else {
                "arrived"
            }
        }
        TripState::DriverArrived => {
            if mode.chance(0.05) {
                "cancel_trip"
            } else {
                "start_trip"
            }
        }
        TripState::InProgress => "complete_trip",
        _ => return,
    };
    plan.push(Planned::cmd(think, cmd, &t.trip_id));
}

/// A rider: requests a ride whenever it has none, sometimes cancels before pickup.
pub(crate) fn rider_react(me: &str, mode: &mut Mode, m: &ServerMessage, plan: &mut Vec<Planned>) {
    let Mode::Chaos(_) = mode else { return };
    match m {
        ServerMessage::TripUpdate { trip, .. } if trip.rider_id == me => {
            if trip.state.is_final() {
                let think = mode.think(60);
                plan.push(ride_request(mode, think));
            } else {
                let p = match trip.state {
                    TripState::Dispatching => 0.06,
                    TripState::DriverAssigned => 0.06,
                    TripState::DriverArrived => 0.04,
                    _ => 0.0,
                };
                if mode.chance(p) {
                    let think = mode.think(30);
                    plan.push(Planned::cmd(think, "cancel_ride", &trip.trip_id));
                }
            }
        }
        // A refused request is an anomaly (it fails the round): no retry.
        _ => {}
    }
}

pub(crate) fn ride_request(mode: &mut Mode, after: Duration) -> Planned {
    let (dp, dd) = match mode {
        Mode::Chaos(r) => (
            (r.random_range(-0.002..0.002), r.random_range(-0.002..0.002)),
            (r.random_range(0.01..0.03), r.random_range(0.01..0.03)),
        ),
        Mode::Finish => ((0.0, 0.0), (0.02, 0.02)),
    };
    let pickup = (CENTER.0 + dp.0, CENTER.1 + dp.1);
    let dropoff = (CENTER.0 + dd.0, CENTER.1 + dd.1);
    Planned {
        at: Instant::now() + after,
        msg: json!({"type": "request_ride", "pickup": point(pickup), "dropoff": point(dropoff), "product": "economy"}),
        cmd: "request_ride",
        trip: None,
        with_req: true,
    }
}
