//! A simulated rider: when the Poisson arrivals pick it, asks for a quote, requests the
//! ride with it, sometimes cancels, and follows the trip to its receipt. It asks again
//! only once its trip has ended. With `--reconnect`, a dropped session is opened again
//! and the rider resumes from the `welcome` (its active trip, if any).

use std::sync::Arc;
use std::time::Duration;

use dispatch_transport::wire::{
    QuoteRequest, QuoteResponse, RiderMessage, ServerMessage, Trip, TripState,
};
use futures_util::StreamExt;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

use crate::acklog::Who;
use crate::net::{self, ConnError, Ws};
use crate::session::{self, Client, End};
use crate::sim::Shared;
use crate::stats::{self, LATE_WINDOW, Stats, Unexplained};

/// A rider that is registered and connected.
pub struct RiderConn {
    pub gi: usize,
    /// Index among this process's riders (its slot in the idle pool).
    pub li: usize,
    /// The rider's id, for `--ack-log`.
    pub who: Who,
    pub ws: Ws,
    pub rng: SmallRng,
    pub token: String,
    pub next_req: u64,
}

enum Phase {
    Idle,
    /// `request_ride` sent; waiting for its reply.
    Requesting {
        req: u64,
        sent_at: Instant,
        sent_unix_us: u64,
    },
    Active {
        trip_id: String,
        sent_at: Instant,
        state: TripState,
        version: u64,
        assigned_seen: bool,
        cancel_at: Option<Instant>,
    },
    AwaitReceipt {
        trip_id: String,
        deadline: Instant,
    },
}

struct Rider {
    sh: Arc<Shared>,
    gi: usize,
    li: usize,
    who: Who,
    rng: SmallRng,
    token: String,
    /// Wakes the rider, when idle, for its next request.
    notify: Arc<Notify>,
    next_req: u64,
    phase: Phase,
    /// A `cancel_ride` awaiting its reply: (req, trip_id).
    cancel_req: Option<(u64, String)>,
    /// This trip's end has been seen (for classifying a late cancel's `conflict`).
    last_ended: Option<String>,
    /// A cancel's `conflict` not explained yet by a trip_update.
    unexplained: Option<Unexplained>,
}

pub async fn run(sh: Arc<Shared>, conn: RiderConn, notify: Arc<Notify>) {
    let RiderConn {
        gi,
        li,
        who,
        ws,
        rng,
        token,
        next_req,
    } = conn;
    let mut r = Rider {
        sh: sh.clone(),
        gi,
        li,
        who,
        rng,
        token: token.clone(),
        notify,
        next_req,
        phase: Phase::Idle,
        cancel_req: None,
        last_ended: None,
        unexplained: None,
    };
    sh.return_idle(li);
    let src = sh.source_ip(sh.cfg.drivers + gi);
    session::run(&mut r, ws, sh, gi, &token, src).await;
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

impl Client for Rider {
    const ROLE: &'static str = "rider";
    const SETTLE_ON_CLOSE: bool = true;

    async fn session(&mut self, ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> End {
        let sh = self.sh.clone();
        let notify = self.notify.clone();
        loop {
            if *stop.borrow() {
                return End::Stop;
            }
            let deadline = self.deadline();
            let idle = matches!(self.phase, Phase::Idle);
            tokio::select! {
                _ = stop.changed() => return End::Stop,
                _ = notify.notified(), if idle => {
                    if let Err(e) = self.request(ws).await {
                        return End::SendFailed(e);
                    }
                }
                m = ws.next() => {
                    let end = session::on_frame(&sh, Self::ROLE, m, |m| self.on_message(m));
                    if let Some(end) = end {
                        return end;
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                    if let Err(e) = self.on_timer(ws).await {
                        return End::SendFailed(e);
                    }
                }
            }
        }
    }

    /// The session dropped: the replies still due will never come, so those requests
    /// are unknown (the `welcome` of the next session tells what became of the trip).
    fn drop_in_flight(&mut self) {
        let mut n = 0;
        if self.cancel_req.take().is_some() {
            n += 1;
        }
        if matches!(self.phase, Phase::Requesting { .. }) {
            n += 1;
        }
        self.sh
            .stats
            .c
            .requests_unknown
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new session after a drop: the `welcome` shows the rider's active trip, if any.
    async fn resume(&mut self, _: &mut Ws, welcome: ServerMessage) -> anyhow::Result<()> {
        let ServerMessage::Welcome { trip, .. } = welcome else {
            unreachable!("reconnect returns a welcome");
        };
        if let Some(a) = &self.sh.ack {
            a.welcome(&self.sh.stats, &self.who, true, None, trip.as_ref(), None);
        }
        let trip = trip.filter(|t| !t.state.is_final());
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => {
                if let Some(t) = trip {
                    // Not expected: a trip the rider did not know it had.
                    self.sh.take_idle(self.li);
                    self.sh.trip_started();
                    self.adopt(t, Instant::now());
                }
            }
            Phase::Requesting { sent_at, .. } => match trip {
                // The request was committed; its reply was lost with the session.
                Some(t) => self.adopt(t, sent_at),
                None => {
                    self.sh
                        .stats
                        .trip_ended("unknown: request_ride in flight at a drop");
                    self.finish(None);
                }
            },
            Phase::Active {
                trip_id,
                sent_at,
                state,
                version,
                assigned_seen,
                cancel_at,
            } => match trip {
                Some(t) if t.trip_id == trip_id => {
                    let assigned = t.state != TripState::Dispatching;
                    if assigned && !assigned_seen {
                        Stats::inc(&self.sh.stats.c.trips_matched);
                    }
                    self.phase = Phase::Active {
                        trip_id,
                        sent_at,
                        state: if t.version >= version { t.state } else { state },
                        version: t.version.max(version),
                        assigned_seen: assigned_seen || assigned,
                        cancel_at,
                    };
                }
                other => {
                    // The trip ended while the rider was away.
                    let end = self.final_state_of(&trip_id).await;
                    self.sh
                        .stats
                        .trip_ended(&format!("{end} (learnt after a reconnect)"));
                    self.finish(Some(trip_id));
                    if let Some(t) = other {
                        self.sh.take_idle(self.li);
                        self.sh.trip_started();
                        self.adopt(t, Instant::now());
                    }
                }
            },
            Phase::AwaitReceipt { trip_id, .. } => {
                self.sh
                    .stats
                    .trip_ended("completed (receipt lost with the session)");
                self.finish(Some(trip_id));
                if let Some(t) = trip {
                    self.sh.take_idle(self.li);
                    self.sh.trip_started();
                    self.adopt(t, Instant::now());
                }
            }
        }
        Ok(())
    }

    /// The run ended, or the session is gone for good.
    fn settle(&mut self) {
        self.unfinished();
    }
}

impl Rider {
    /// Follows `t`, learnt of from a `welcome`.
    fn adopt(&mut self, t: Trip, sent_at: Instant) {
        Stats::inc(&self.sh.stats.c.trips_adopted);
        let assigned = t.state != TripState::Dispatching;
        if assigned {
            Stats::inc(&self.sh.stats.c.trips_matched);
        }
        self.phase = Phase::Active {
            trip_id: t.trip_id,
            sent_at,
            state: t.state,
            version: t.version,
            assigned_seen: assigned,
            cancel_at: None,
        };
    }

    /// How a trip ended, read back over REST (`unknown` if that fails).
    async fn final_state_of(&self, trip_id: &str) -> String {
        let url = format!("{}/v1/trips/{trip_id}", self.sh.target.http_base());
        Stats::inc(&self.sh.stats.c.messages_sent);
        match net::get_json::<Trip>(&self.sh.http, &url, Some(&self.token)).await {
            Ok(t) => net::wire_name(t.state),
            Err(_) => "unknown".to_owned(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let d = match &self.phase {
            Phase::Active { cancel_at, .. } => *cancel_at,
            Phase::AwaitReceipt { deadline, .. } => Some(*deadline),
            _ => None,
        };
        match (d, self.unexplained.as_ref().map(|u| u.deadline)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Records the trip still open at the end of the run.
    fn unfinished(&mut self) {
        if let Some(u) = self.unexplained.take() {
            self.sh
                .stats
                .unexplained(u, "the run ended before an update explained it");
        }
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Requesting { .. } => {
                self.sh
                    .stats
                    .trip_ended("unfinished: awaiting the request_ride reply");
                self.sh.trip_done();
            }
            Phase::Active { state, trip_id, .. } => {
                self.sh
                    .stats
                    .trip_ended(&format!("unfinished: {}", net::wire_name(state)));
                self.sh.forget(&trip_id);
                self.sh.trip_done();
            }
            Phase::AwaitReceipt { trip_id, .. } => {
                self.sh.stats.trip_ended("unfinished: awaiting the receipt");
                self.sh.forget(&trip_id);
                self.sh.trip_done();
            }
            Phase::Idle => {}
        }
    }

    /// The trip ended (or never started): ready for the next request.
    fn finish(&mut self, trip_id: Option<String>) {
        if let Some(t) = &trip_id {
            self.sh.forget(t);
        }
        self.last_ended = trip_id;
        self.phase = Phase::Idle;
        self.sh.trip_done();
        self.sh.return_idle(self.li);
    }

    async fn request(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let sh = self.sh.clone();
        let st = &sh.stats;
        sh.trip_started();
        let (pickup, dropoff) = match sh.take_planned(self.li) {
            Some(trip) => trip,
            None => {
                let pickup = sh.demand.sample_point(&mut self.rng);
                (pickup, sh.demand.sample_dropoff(pickup, &mut self.rng))
            }
        };
        let body = QuoteRequest {
            pickup,
            dropoff,
            product: dispatch_transport::wire::Product::Economy,
        };
        Stats::inc(&st.c.messages_sent);
        Stats::inc(&st.c.quotes_sent);
        let t = Instant::now();
        let url = format!("{}/v1/quotes", sh.target.http_base());
        let quote: QuoteResponse =
            match net::post_json(&sh.http, &url, Some(&self.token), &body).await {
                Ok(q) => q,
                Err(e) => {
                    let (code, detail) = match e {
                        ConnError::Refused(code, d) => (code, d),
                        ConnError::OpenFiles => {
                            sh.open_files_limit();
                            ("open_file_limit".into(), "EMFILE".into())
                        }
                        ConnError::SourcePorts => {
                            sh.source_ports_limit();
                            ("out_of_ports".into(), "EADDRNOTAVAIL".into())
                        }
                        ConnError::Other(d) => ("transport".into(), d),
                    };
                    // With --reconnect, a server that is away (refused, down, recovering)
                    // is what the run is about.
                    let away = sh.cfg.reconnect && (code == "transport" || code == "unavailable");
                    st.error(
                        &code,
                        if away {
                            "POST /v1/quotes (server away)"
                        } else {
                            "POST /v1/quotes"
                        },
                        away,
                        format!("rider #{}: {detail}", self.gi),
                    );
                    self.finish(None);
                    return Ok(());
                }
            };
        st.latency(stats::QUOTE, t.elapsed().as_micros() as u64);
        let req = self.next_req;
        self.next_req += 1;
        let msg = RiderMessage::RequestRide {
            quote_id: Some(quote.quote_id),
            pickup: None,
            dropoff: None,
            product: None,
        };
        Stats::inc(&st.c.messages_sent);
        Stats::inc(&st.c.requests_sent);
        self.phase = Phase::Requesting {
            req,
            sent_at: Instant::now(),
            sent_unix_us: crate::sim::unix_us(),
        };
        net::send(ws, &msg, Some(req)).await
    }

    async fn on_timer(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.unexplained.as_ref().is_some_and(|u| now >= u.deadline) {
            let u = self.unexplained.take().unwrap();
            self.sh
                .stats
                .unexplained(u, "no update explained it within 3 s");
        }
        match &mut self.phase {
            Phase::Active {
                cancel_at,
                state,
                trip_id,
                ..
            } if cancel_at.is_some_and(|c| now >= c) => {
                *cancel_at = None;
                if matches!(
                    state,
                    TripState::Dispatching | TripState::DriverAssigned | TripState::DriverArrived
                ) {
                    let trip_id = trip_id.clone();
                    let req = self.next_req;
                    self.next_req += 1;
                    self.cancel_req = Some((req, trip_id.clone()));
                    Stats::inc(&self.sh.stats.c.messages_sent);
                    Stats::inc(&self.sh.stats.c.cancels_sent);
                    let msg = RiderMessage::CancelRide {
                        trip_id,
                        reason: Some("loadgen: changed my mind".into()),
                    };
                    net::send(ws, &msg, Some(req)).await?;
                }
            }
            Phase::AwaitReceipt { deadline, trip_id } if now >= *deadline => {
                let trip_id = trip_id.clone();
                self.sh.stats.anomaly(
                    "no receipt within 10 s of completed",
                    format!("rider #{}: {trip_id}", self.gi),
                );
                self.sh.stats.trip_ended("completed (no receipt)");
                self.finish(Some(trip_id));
            }
            _ => {}
        }
        Ok(())
    }

    fn on_message(&mut self, m: ServerMessage) {
        let sh = self.sh.clone();
        let st = &sh.stats;
        if let ServerMessage::TripUpdate { req, trip } = &m
            && let Some(a) = &sh.ack
        {
            a.trip_update(st, &self.who, trip, *req);
        }
        match m {
            ServerMessage::TripUpdate { req: Some(r), trip } => {
                let Phase::Requesting {
                    req,
                    sent_at,
                    sent_unix_us,
                } = self.phase
                else {
                    st.anomaly(
                        "trip_update with a req the rider is not waiting for",
                        format!("rider #{}: req {r}, trip {}", self.gi, trip.trip_id),
                    );
                    return;
                };
                if r != req {
                    st.anomaly(
                        "trip_update with a req the rider is not waiting for",
                        format!("rider #{}: req {r} (waiting for {req})", self.gi),
                    );
                    return;
                }
                st.latency(
                    stats::REQ_TO_DISPATCHING,
                    sent_at.elapsed().as_micros() as u64,
                );
                Stats::inc(&st.c.trips_created);
                if (trip.state, trip.version) != (TripState::Dispatching, 1) {
                    st.anomaly(
                        "request_ride answered with a trip not in dispatching v1",
                        format!("rider #{}: {trip:?}", self.gi),
                    );
                }
                sh.track_request(&trip.trip_id, sent_at, sent_unix_us);
                let cfg = &sh.cfg;
                let cancel_at = (self.rng.random::<f64>() < cfg.cancel_prob).then(|| {
                    let (lo, hi) = cfg.cancel_delay_ms;
                    sent_at + Duration::from_millis(self.rng.random_range(lo..=hi))
                });
                self.phase = Phase::Active {
                    trip_id: trip.trip_id,
                    sent_at,
                    state: trip.state,
                    version: trip.version,
                    assigned_seen: false,
                    cancel_at,
                };
            }
            ServerMessage::TripUpdate { req: None, trip } => {
                if !matches!(
                    trip.state,
                    TripState::Dispatching | TripState::DriverAssigned | TripState::DriverArrived
                ) && self
                    .unexplained
                    .as_ref()
                    .is_some_and(|u| u.trip_id == trip.trip_id)
                {
                    st.explained_late(self.unexplained.take().unwrap());
                }
                let Phase::Active {
                    trip_id,
                    sent_at,
                    state,
                    version,
                    assigned_seen,
                    ..
                } = &mut self.phase
                else {
                    st.anomaly(
                        "trip_update for a trip the rider is not on",
                        format!("rider #{}: {} {:?}", self.gi, trip.trip_id, trip.state),
                    );
                    return;
                };
                if *trip_id != trip.trip_id {
                    st.anomaly(
                        "trip_update for a trip the rider is not on",
                        format!("rider #{}: {} (on {trip_id})", self.gi, trip.trip_id),
                    );
                    return;
                }
                if trip.version != *version + 1 {
                    st.anomaly(
                        "trip versions not consecutive at the rider",
                        format!(
                            "rider #{}: {} v{} after v{}",
                            self.gi, trip.trip_id, trip.version, version
                        ),
                    );
                }
                *version = trip.version.max(*version);
                *state = trip.state;
                match trip.state {
                    TripState::DriverAssigned if !*assigned_seen => {
                        *assigned_seen = true;
                        st.latency(stats::REQ_TO_ASSIGNED, sent_at.elapsed().as_micros() as u64);
                        Stats::inc(&st.c.trips_matched);
                    }
                    TripState::Completed => {
                        self.phase = Phase::AwaitReceipt {
                            trip_id: trip.trip_id,
                            deadline: Instant::now() + Duration::from_secs(10),
                        };
                    }
                    TripState::Cancelled => {
                        let by = match trip.cancelled_by {
                            Some(b) => net::wire_name(b),
                            None => "unknown".into(),
                        };
                        st.trip_ended(&format!("cancelled by {by}"));
                        self.finish(Some(trip.trip_id));
                    }
                    TripState::NoDriverFound => {
                        st.trip_ended("no_driver_found");
                        self.finish(Some(trip.trip_id));
                    }
                    _ => {}
                }
            }
            ServerMessage::Receipt { trip_id, .. } => {
                Stats::inc(&st.c.receipts_received);
                match &self.phase {
                    Phase::AwaitReceipt { trip_id: t, .. } if *t == trip_id => {
                        Stats::inc(&st.c.trips_completed);
                        st.trip_ended("completed");
                        self.finish(Some(trip_id));
                    }
                    _ => st.anomaly(
                        "receipt before completed, or for another trip",
                        format!("rider #{}: receipt for {trip_id}", self.gi),
                    ),
                }
            }
            ServerMessage::DriverLocation { .. } => {
                Stats::inc(&st.c.driver_locations_received);
            }
            ServerMessage::Ack { req } => {
                if let Some((_, trip_id)) = self.cancel_req.as_ref().filter(|(r, _)| *r == req) {
                    if let Some(a) = &sh.ack {
                        a.ack(st, &self.who, "cancel_ride", trip_id, req);
                    }
                    self.cancel_req = None;
                } else {
                    st.anomaly(
                        "ack for a req never sent (rider)",
                        format!("rider #{}: ack req {req}", self.gi),
                    );
                }
            }
            ServerMessage::Error { req, code, message } => self.on_error(req, code, message),
            ServerMessage::Welcome { .. }
            | ServerMessage::Offer(_)
            | ServerMessage::OfferExpired { .. } => st.anomaly(
                "driver or welcome message in a running rider session",
                format!("rider #{}: {m:?}", self.gi),
            ),
        }
    }

    fn on_error(&mut self, req: Option<u64>, code: String, message: String) {
        let sh = self.sh.clone();
        let st = &sh.stats;
        if let Phase::Requesting { req: r, .. } = self.phase
            && req == Some(r)
        {
            st.error(
                &code,
                "request_ride",
                false,
                format!("rider #{} (req {r}): {message}", self.gi),
            );
            self.finish(None);
            return;
        }
        if let Some((r, trip_id)) = self.cancel_req.clone()
            && req == Some(r)
        {
            self.cancel_req = None;
            // A cancel that lost the race with start_trip (or the trip's end) is expected.
            let too_late = match &self.phase {
                Phase::Active {
                    trip_id: t, state, ..
                } if *t == trip_id => !matches!(
                    state,
                    TripState::Dispatching | TripState::DriverAssigned | TripState::DriverArrived
                ),
                Phase::AwaitReceipt { trip_id: t, .. } => *t == trip_id,
                _ => self.last_ended.as_deref() == Some(trip_id.as_str()),
            };
            let detail = format!(
                "rider #{} cancelled {trip_id} (req {r}): {message}",
                self.gi
            );
            if code == "conflict" && !too_late {
                if let Some(u) = self.unexplained.take() {
                    st.unexplained(u, "a newer cancel replaced it");
                }
                self.unexplained = Some(Unexplained {
                    trip_id,
                    kind: "cancel_ride",
                    code,
                    detail,
                    deadline: Instant::now() + LATE_WINDOW,
                });
            } else {
                st.error(&code, "cancel_ride", code == "conflict", detail);
            }
            return;
        }
        st.error(
            &code,
            if req.is_some() {
                "unknown req (rider)"
            } else {
                "rider message without req"
            },
            false,
            format!("rider #{}: {message}", self.gi),
        );
    }
}
