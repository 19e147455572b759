//! A simulated driver: cruises between waypoints while available, answers offers like a
//! person (after a delay, sometimes declining or letting them expire), drives to the
//! pickup and then the drop-off, and sends PROTOCOL.md's messages at each step. With
//! `--reconnect`, a dropped session is opened again and the driver resumes from the
//! `welcome` (its trip, or its open offer, or cruising).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dispatch_transport::wire::{
    DriverMessage, DriverStatus, LatLng, Offer, ServerMessage, Trip, TripState,
};
use futures_util::StreamExt;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use crate::acklog::{self, Who};
use crate::geo::Mover;
use crate::net::{self, Ws};
use crate::session::{self, Client, End};
use crate::sim::{Shared, unix_ms};
use crate::stats::{LATE_WINDOW, Stats, Unexplained};

/// A driver that is registered, connected, located and online.
pub struct DriverConn {
    pub gi: usize,
    /// The driver's id, for `--ack-log`.
    pub who: Who,
    /// The driver's token, to reconnect with.
    pub token: String,
    pub ws: Ws,
    pub rng: SmallRng,
    pub mover: Mover,
    pub next_req: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Accept,
    Decline,
    Ignore,
}

#[derive(Debug, Clone)]
enum Phase {
    Cruising,
    /// Thinking about an offer.
    Offered {
        offer: Offer,
        decide_at: Instant,
        decision: Decision,
    },
    /// `accept` or `decline` sent; waiting for the reply.
    Answering {
        offer: Offer,
        accept: bool,
    },
    ToPickup {
        trip_id: String,
        dropoff: LatLng,
    },
    /// `arrived` sent.
    Arriving {
        trip_id: String,
        dropoff: LatLng,
    },
    Boarding {
        trip_id: String,
        dropoff: LatLng,
        until: Instant,
    },
    /// `start_trip` sent.
    Starting {
        trip_id: String,
        dropoff: LatLng,
    },
    ToDropoff {
        trip_id: String,
    },
    /// `complete_trip` sent.
    Completing {
        trip_id: String,
    },
}

impl Phase {
    fn trip_id(&self) -> Option<&str> {
        match self {
            Phase::Cruising => None,
            Phase::Offered { offer, .. } | Phase::Answering { offer, .. } => Some(&offer.trip_id),
            Phase::ToPickup { trip_id, .. }
            | Phase::Arriving { trip_id, .. }
            | Phase::Boarding { trip_id, .. }
            | Phase::Starting { trip_id, .. }
            | Phase::ToDropoff { trip_id }
            | Phase::Completing { trip_id } => Some(trip_id),
        }
    }

    /// Whether the car is moving in this phase.
    fn moving(&self) -> bool {
        matches!(
            self,
            Phase::Cruising
                | Phase::Offered { .. }
                | Phase::Answering { .. }
                | Phase::ToPickup { .. }
                | Phase::ToDropoff { .. }
        )
    }
}

struct Driver {
    sh: Arc<Shared>,
    gi: usize,
    who: Who,
    rng: SmallRng,
    mover: Mover,
    phase: Phase,
    next_req: u64,
    /// Sent messages awaiting their reply: req → (type, trip_id).
    pending: HashMap<u64, (&'static str, Option<String>)>,
    /// Trips whose offer to this driver expired or was withdrawn.
    expired: HashSet<String>,
    /// Trips this driver saw end (or was taken off).
    ended: HashSet<String>,
    unexplained: Vec<Unexplained>,
    last_move: Instant,
    next_ping: Instant,
}

pub async fn run(sh: Arc<Shared>, conn: DriverConn) {
    let DriverConn {
        gi,
        who,
        token,
        ws,
        rng,
        mover,
        next_req,
    } = conn;
    let now = Instant::now();
    let mut d = Driver {
        sh: sh.clone(),
        gi,
        who,
        rng,
        mover,
        phase: Phase::Cruising,
        next_req,
        pending: HashMap::new(),
        expired: HashSet::new(),
        ended: HashSet::new(),
        unexplained: Vec::new(),
        last_move: now,
        next_ping: now,
    };
    // Spread the first pings over one interval.
    let first = d.rng.random_range(0..sh.cfg.ping_interval_ms.max(1));
    d.next_ping = now + Duration::from_millis(first);
    d.new_waypoint();
    let src = sh.source_ip(gi);
    session::run(&mut d, ws, sh, gi, &token, src).await;
}

impl Client for Driver {
    const ROLE: &'static str = "driver";
    const SETTLE_ON_CLOSE: bool = false;

    async fn session(&mut self, ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> End {
        let sh = self.sh.clone();
        loop {
            if *stop.borrow() {
                return End::Stop;
            }
            let wake = self.next_wake();
            tokio::select! {
                _ = stop.changed() => return End::Stop,
                m = ws.next() => {
                    let end = session::on_frame(&sh, Self::ROLE, m, |m| self.on_message(m));
                    if let Some(end) = end {
                        return end;
                    }
                }
                _ = sleep_until(wake) => {
                    if let Err(e) = self.on_timer(ws).await {
                        return End::SendFailed(e);
                    }
                }
            }
        }
    }

    /// The run ended: conflicts still waiting for an explanation are unexpected.
    fn settle(&mut self) {
        for u in self.unexplained.drain(..) {
            self.sh
                .stats
                .unexplained(u, "the run ended before an update explained it");
        }
    }

    /// The session dropped: the replies still due will never come, so those requests
    /// are unknown (they may or may not have taken effect).
    fn drop_in_flight(&mut self) {
        let n = self.pending.len() as u64;
        self.sh
            .stats
            .c
            .requests_unknown
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.pending.clear();
    }

    /// A new session after a drop: the `welcome` says where the driver is (on a trip,
    /// holding an offer, or free); carry on from there, back on the map and online.
    async fn resume(&mut self, ws: &mut Ws, welcome: ServerMessage) -> anyhow::Result<()> {
        let ServerMessage::Welcome {
            status,
            offer,
            trip,
            ..
        } = welcome
        else {
            unreachable!("reconnect returns a welcome");
        };
        let offer = offer.flatten();
        if let Some(a) = &self.sh.ack {
            a.welcome(
                &self.sh.stats,
                &self.who,
                true,
                status,
                trip.as_ref(),
                offer.as_ref().map(|o| o.trip_id.as_str()),
            );
        }
        let now = Instant::now();
        self.last_move = now;
        let old = std::mem::replace(&mut self.phase, Phase::Cruising);
        let trip = trip.filter(|t| {
            matches!(
                t.state,
                TripState::DriverAssigned | TripState::DriverArrived | TripState::InProgress
            )
        });
        if let Some(t) = trip {
            let trip_id = t.trip_id;
            match t.state {
                TripState::DriverAssigned => {
                    self.mover.set_target(t.pickup);
                    self.phase = Phase::ToPickup {
                        trip_id,
                        dropoff: t.dropoff,
                    };
                }
                TripState::DriverArrived => {
                    let until = match &old {
                        Phase::Boarding {
                            trip_id: o, until, ..
                        } if *o == trip_id => *until,
                        // `start_trip` was in flight: send it again at once.
                        Phase::Starting { trip_id: o, .. } if *o == trip_id => now,
                        _ => now + self.boarding_time(),
                    };
                    self.phase = Phase::Boarding {
                        trip_id,
                        dropoff: t.dropoff,
                        until,
                    };
                }
                _ => {
                    self.mover.set_target(t.dropoff);
                    self.phase = Phase::ToDropoff { trip_id };
                }
            }
        } else if let Some(o) = offer {
            let kept = match &old {
                Phase::Offered {
                    offer: p,
                    decide_at,
                    decision,
                } if p.trip_id == o.trip_id => Some((*decision, *decide_at)),
                // `accept` was in flight and did not take: accept again at once.
                Phase::Answering { offer: p, accept } if p.trip_id == o.trip_id => Some((
                    if *accept {
                        Decision::Accept
                    } else {
                        Decision::Decline
                    },
                    now,
                )),
                _ => None,
            };
            match kept {
                Some((decision, decide_at)) => {
                    self.phase = Phase::Offered {
                        offer: o,
                        decide_at,
                        decision,
                    };
                }
                None => self.consider(o),
            }
        } else {
            self.new_waypoint();
        }
        if let Some(t) = old.trip_id()
            && self.phase.trip_id() != Some(t)
        {
            // The trip went on without this driver while it was away.
            self.note_end(t);
        }
        self.ping(ws).await?;
        if status != Some(DriverStatus::Suspended) {
            // Idempotent: an offered or busy driver stays as it is.
            self.send(ws, DriverMessage::GoOnline, "go_online", None)
                .await?;
        }
        Ok(())
    }
}

impl Driver {
    /// How long the rider takes to board, in real time.
    fn boarding_time(&mut self) -> Duration {
        let (lo, hi) = self.sh.cfg.boarding_ms;
        let ms = self.rng.random_range(lo..=hi) as f64 / self.scale();
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// An offer to think about: decide now what to answer, and when.
    fn consider(&mut self, offer: Offer) {
        let cfg = &self.sh.cfg;
        let decision = if self.rng.random::<f64>() < cfg.accept_prob {
            Decision::Accept
        } else if self.rng.random::<f64>() < cfg.decline_share {
            Decision::Decline
        } else {
            Stats::inc(&self.sh.stats.c.offers_ignored);
            Decision::Ignore
        };
        let (lo, hi) = cfg.decision_delay_ms;
        let delay = self.rng.random_range(lo..=hi);
        self.phase = Phase::Offered {
            offer,
            decide_at: Instant::now() + Duration::from_millis(delay),
            decision,
        };
    }

    fn new_waypoint(&mut self) {
        let p = self.sh.demand.sample_point(&mut self.rng);
        self.mover.set_target(p);
    }

    fn scale(&self) -> f64 {
        self.sh.cfg.time_scale
    }

    fn next_wake(&self) -> Instant {
        let mut w = self.next_ping;
        match &self.phase {
            Phase::Offered { decide_at, .. } => w = w.min(*decide_at),
            Phase::Boarding { until, .. } => w = w.min(*until),
            _ => {}
        }
        for u in &self.unexplained {
            w = w.min(u.deadline);
        }
        if self.phase.moving() {
            let eta = self.mover.eta_s() / self.scale();
            w = w.min(self.last_move + Duration::from_secs_f64(eta.min(3600.0)));
        }
        w.max(Instant::now() + Duration::from_millis(1))
    }

    /// Moves the car up to now; true when it reached its target.
    fn advance(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last_move).as_secs_f64() * self.scale();
        self.last_move = now;
        if self.phase.moving() {
            self.mover.advance(dt)
        } else {
            false
        }
    }

    async fn send(
        &mut self,
        ws: &mut Ws,
        msg: DriverMessage,
        kind: &'static str,
        trip_id: Option<String>,
    ) -> anyhow::Result<()> {
        let req = self.next_req;
        self.next_req += 1;
        self.pending.insert(req, (kind, trip_id));
        Stats::inc(&self.sh.stats.c.messages_sent);
        net::send(ws, &msg, Some(req)).await
    }

    async fn ping(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let speed = if self.phase.moving() && !self.mover.arrived() {
            self.mover.speed_mps
        } else {
            0.0
        };
        let msg = DriverMessage::Location {
            lat: self.mover.pos.lat,
            lng: self.mover.pos.lng,
            heading: Some(self.mover.heading),
            speed_mps: Some(speed),
            ts: unix_ms(),
        };
        Stats::inc(&self.sh.stats.c.messages_sent);
        Stats::inc(&self.sh.stats.c.pings_sent);
        // Pings carry no `req`: as an app would send them; only a failure is answered.
        net::send(ws, &msg, None).await?;
        let ms = self.sh.cfg.ping_interval_ms as f64 * self.rng.random_range(0.8..1.2);
        self.next_ping = Instant::now() + Duration::from_secs_f64(ms / 1000.0);
        Ok(())
    }

    /// Settles the unexplained errors of `trip_id` that `explains` accepts.
    fn explain(&mut self, trip_id: &str, explains: impl Fn(&str) -> bool) {
        let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unexplained)
            .into_iter()
            .partition(|u| u.trip_id == trip_id && explains(u.kind));
        self.unexplained = keep;
        for u in hit {
            self.sh.stats.explained_late(u);
        }
    }

    async fn on_timer(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.unexplained.iter().any(|u| now >= u.deadline) {
            let (late, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unexplained)
                .into_iter()
                .partition(|u| now >= u.deadline);
            self.unexplained = keep;
            for u in late {
                self.sh
                    .stats
                    .unexplained(u, "no update explained it within 3 s");
            }
        }
        let arrived = self.advance(now);
        if arrived {
            match std::mem::replace(&mut self.phase, Phase::Cruising) {
                Phase::ToPickup { trip_id, dropoff } => {
                    // Report the position at the pickup, then arrive.
                    self.ping(ws).await?;
                    self.phase = Phase::Arriving {
                        trip_id: trip_id.clone(),
                        dropoff,
                    };
                    self.send(
                        ws,
                        DriverMessage::Arrived {
                            trip_id: trip_id.clone(),
                        },
                        "arrived",
                        Some(trip_id),
                    )
                    .await?;
                }
                Phase::ToDropoff { trip_id } => {
                    self.ping(ws).await?;
                    self.phase = Phase::Completing {
                        trip_id: trip_id.clone(),
                    };
                    self.send(
                        ws,
                        DriverMessage::CompleteTrip {
                            trip_id: trip_id.clone(),
                        },
                        "complete_trip",
                        Some(trip_id),
                    )
                    .await?;
                }
                other => {
                    // Cruising (or thinking about an offer): on to the next waypoint.
                    self.phase = other;
                    self.new_waypoint();
                }
            }
        }
        if now >= self.next_ping {
            self.ping(ws).await?;
        }
        if let Phase::Offered {
            decide_at,
            decision,
            offer,
        } = &self.phase
            && now >= *decide_at
        {
            let (decision, offer) = (*decision, offer.clone());
            let trip_id = offer.trip_id.clone();
            match decision {
                Decision::Accept => {
                    self.phase = Phase::Answering {
                        offer,
                        accept: true,
                    };
                    Stats::inc(&self.sh.stats.c.accepts_sent);
                    self.send(
                        ws,
                        DriverMessage::Accept {
                            trip_id: trip_id.clone(),
                        },
                        "accept",
                        Some(trip_id),
                    )
                    .await?;
                }
                Decision::Decline => {
                    // Available again at once: the next offer may come before the ack.
                    self.phase = Phase::Cruising;
                    drop(offer);
                    Stats::inc(&self.sh.stats.c.declines_sent);
                    self.send(
                        ws,
                        DriverMessage::Decline {
                            trip_id: trip_id.clone(),
                        },
                        "decline",
                        Some(trip_id),
                    )
                    .await?;
                }
                Decision::Ignore => {
                    // Let it expire: stay `Offered` until `offer_expired`, far in the future.
                    if let Phase::Offered { decide_at, .. } = &mut self.phase {
                        *decide_at = now + Duration::from_secs(24 * 3600);
                    }
                }
            }
        }
        if let Phase::Boarding {
            until,
            trip_id,
            dropoff,
        } = &self.phase
            && now >= *until
        {
            let (trip_id, dropoff) = (trip_id.clone(), *dropoff);
            self.phase = Phase::Starting {
                trip_id: trip_id.clone(),
                dropoff,
            };
            self.send(
                ws,
                DriverMessage::StartTrip {
                    trip_id: trip_id.clone(),
                },
                "start_trip",
                Some(trip_id),
            )
            .await?;
        }
        Ok(())
    }

    fn note_end(&mut self, trip_id: &str) {
        if self.ended.len() > 10_000 {
            self.ended.clear();
        }
        self.ended.insert(trip_id.to_owned());
    }

    fn back_to_cruising(&mut self) {
        self.phase = Phase::Cruising;
        self.new_waypoint();
    }

    fn on_message(&mut self, m: ServerMessage) {
        let st = &self.sh.stats;
        match m {
            ServerMessage::Offer(offer) => {
                Stats::inc(&st.c.offers_received);
                self.sh.track_offer(&offer.trip_id);
                if !matches!(self.phase, Phase::Cruising) {
                    st.anomaly(
                        "offer to a driver that is not available",
                        format!(
                            "driver #{} in {:?} got an offer for {}",
                            self.gi,
                            self.phase_name(),
                            offer.trip_id
                        ),
                    );
                    return;
                }
                self.consider(offer);
            }
            ServerMessage::OfferExpired { trip_id } => {
                Stats::inc(&st.c.offers_expired);
                self.explain(&trip_id, |k| k == "accept" || k == "decline");
                if self.expired.len() > 10_000 {
                    self.expired.clear();
                }
                self.expired.insert(trip_id.clone());
                if let Phase::Offered { offer, .. } = &self.phase
                    && offer.trip_id == trip_id
                {
                    self.phase = Phase::Cruising;
                }
                // While `Answering`, the reply to the answer (a `conflict`) is still due.
            }
            ServerMessage::TripUpdate { trip, req } => {
                if let Some(a) = &self.sh.ack {
                    a.trip_update(st, &self.who, &trip, req);
                }
                self.on_trip(trip);
            }
            ServerMessage::Ack { req } => match self.pending.remove(&req) {
                Some((kind, trip_id)) => {
                    if let (Some(a), Some(t)) = (&self.sh.ack, &trip_id)
                        && acklog::moves_a_trip(kind)
                    {
                        a.ack(st, &self.who, kind, t, req);
                    }
                    self.on_ack(kind, trip_id)
                }
                None => st.anomaly(
                    "ack for a req never sent (driver)",
                    format!("driver #{}: ack req {req}", self.gi),
                ),
            },
            ServerMessage::Error { req, code, message } => {
                self.on_error(req, code, message);
            }
            ServerMessage::Welcome { .. }
            | ServerMessage::DriverLocation { .. }
            | ServerMessage::Receipt { .. } => {
                st.anomaly(
                    "rider or welcome message in a running driver session",
                    format!("driver #{}: {m:?}", self.gi),
                );
            }
        }
    }

    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Cruising => "cruising",
            Phase::Offered { .. } => "offered",
            Phase::Answering { .. } => "answering",
            Phase::ToPickup { .. } => "to_pickup",
            Phase::Arriving { .. } => "arriving",
            Phase::Boarding { .. } => "boarding",
            Phase::Starting { .. } => "starting",
            Phase::ToDropoff { .. } => "to_dropoff",
            Phase::Completing { .. } => "completing",
        }
    }

    fn on_trip(&mut self, trip: Trip) {
        if matches!(
            trip.state,
            TripState::Cancelled
                | TripState::Dispatching
                | TripState::NoDriverFound
                | TripState::Completed
        ) {
            self.explain(&trip.trip_id, |_| true);
        }
        let mine = self.phase.trip_id() == Some(trip.trip_id.as_str());
        match trip.state {
            TripState::DriverAssigned => {
                if let Phase::Answering {
                    offer,
                    accept: true,
                } = &self.phase
                    && offer.trip_id == trip.trip_id
                {
                    let (pickup, dropoff) = (offer.pickup, offer.dropoff);
                    self.phase = Phase::ToPickup {
                        trip_id: trip.trip_id,
                        dropoff,
                    };
                    self.mover.set_target(pickup);
                } else if !mine {
                    self.sh.stats.anomaly(
                        "driver_assigned for a trip the driver did not accept",
                        format!(
                            "driver #{} ({}): {}",
                            self.gi,
                            self.phase_name(),
                            trip.trip_id
                        ),
                    );
                }
            }
            TripState::DriverArrived | TripState::InProgress => {}
            TripState::Completed | TripState::NoDriverFound => {
                self.note_end(&trip.trip_id);
                // Available again at once: the next offer may come before the ack.
                if mine && matches!(self.phase, Phase::Completing { .. }) {
                    self.back_to_cruising();
                }
            }
            TripState::Cancelled | TripState::Dispatching => {
                // Cancelled by the rider, or taken off the trip: available again.
                self.note_end(&trip.trip_id);
                if mine {
                    self.back_to_cruising();
                }
            }
        }
    }

    fn on_ack(&mut self, kind: &'static str, trip_id: Option<String>) {
        let same = |p: &Phase| p.trip_id() == trip_id.as_deref();
        match kind {
            "accept" => {
                if let Phase::Answering { offer, .. } = &self.phase
                    && offer.trip_id.as_str() == trip_id.as_deref().unwrap_or("")
                {
                    // docs/api.md: the update comes before the ack.
                    self.sh.stats.anomaly(
                        "accept acknowledged before its driver_assigned update",
                        format!("driver #{}: {}", self.gi, offer.trip_id),
                    );
                    let (pickup, dropoff, id) =
                        (offer.pickup, offer.dropoff, offer.trip_id.clone());
                    self.phase = Phase::ToPickup {
                        trip_id: id,
                        dropoff,
                    };
                    self.mover.set_target(pickup);
                }
            }
            "arrived" => {
                if let Phase::Arriving { trip_id, dropoff } = &self.phase
                    && same(&self.phase)
                {
                    let (trip_id, dropoff) = (trip_id.clone(), *dropoff);
                    let until = Instant::now() + self.boarding_time();
                    self.phase = Phase::Boarding {
                        trip_id,
                        dropoff,
                        until,
                    };
                }
            }
            "start_trip" => {
                if let Phase::Starting { trip_id, dropoff } = &self.phase
                    && same(&self.phase)
                {
                    let dropoff = *dropoff;
                    self.phase = Phase::ToDropoff {
                        trip_id: trip_id.clone(),
                    };
                    self.mover.set_target(dropoff);
                    self.last_move = Instant::now();
                }
            }
            "complete_trip"
                if matches!(self.phase, Phase::Completing { .. }) && same(&self.phase) =>
            {
                self.back_to_cruising();
            }
            _ => {}
        }
    }

    fn on_error(&mut self, req: Option<u64>, code: String, message: String) {
        let st = &self.sh.stats;
        let Some(req) = req else {
            // Only pings go without a `req`.
            st.error(
                &code,
                "location",
                false,
                format!("driver #{}: {message}", self.gi),
            );
            return;
        };
        let Some((kind, trip_id)) = self.pending.remove(&req) else {
            st.error(
                &code,
                "unknown req (driver)",
                false,
                format!("driver #{} req {req}: {message}", self.gi),
            );
            return;
        };
        let tid = trip_id.clone().unwrap_or_default();
        let explained = match kind {
            // The offer expired or was withdrawn (its `offer_expired` came first).
            "accept" | "decline" => self.expired.contains(&tid),
            // The rider cancelled first (its `trip_update` came first).
            "arrived" | "start_trip" | "complete_trip" => self.ended.contains(&tid),
            _ => false,
        };
        let detail = format!(
            "driver #{} sent {kind} for {tid} (req {req}) in phase {}: {message}",
            self.gi,
            self.phase_name()
        );
        let racy = matches!(
            kind,
            "accept" | "decline" | "arrived" | "start_trip" | "complete_trip"
        );
        if code == "conflict" && racy && !explained {
            self.unexplained.push(Unexplained {
                trip_id: tid,
                kind,
                code,
                detail,
                deadline: Instant::now() + LATE_WINDOW,
            });
        } else {
            st.error(&code, kind, code == "conflict" && explained, detail);
        }
        if self.phase.trip_id() == trip_id.as_deref() && self.phase.trip_id().is_some() {
            self.back_to_cruising();
        }
    }
}
