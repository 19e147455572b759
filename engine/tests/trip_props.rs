//! The trip machine against a plain model of PROTOCOL.md's trip section, plus unit tests
//! of the offer cascade (STYLE.md, "Tests, innermost first").
//!
//! The property test drives a `Trip` with random command sequences and a monotone fake
//! clock, and after every step checks both the model (exact effects and visible fields)
//! and model-free rules: invariants hold, an error changes nothing, every transition is
//! an arrow of the diagram and bumps `version` by one, a final state is final, an accept
//! comes from the driver holding the offer, and no driver is offered the trip twice.

use std::collections::{BTreeSet, VecDeque};

use dispatch_engine::trip::{Mover, OfferEnd};
use dispatch_engine::{
    CancelledBy, Candidate, DispatchConfig, DriverId, EtaModel, IndexedDriver, Offer, Point,
    Product, QuoteTerms, RiderId, StraightLineEta, Trip, TripCommand, TripEffect, TripError,
    TripId, TripState,
};
use proptest::prelude::*;

mod common;

const PICKUP: (f64, f64) = (45.53, -73.62);
const T0: u64 = 1_700_000_000_000;
/// Drivers `drv_0..drv_5` can be candidates; `drv_6` never is.
const POOL: u8 = 6;
const STRANGER: u8 = 6;

fn d(i: u8) -> DriverId {
    DriverId::new(format!("drv_{i}"))
}

fn pickup() -> Point {
    Point::new(PICKUP.0, PICKUP.1).unwrap()
}

/// A candidate `metres` north of the pickup.
fn cand(i: u8, metres: f64, product: Product) -> Candidate {
    let position = Point::new(PICKUP.0 + metres / 111_195.0, PICKUP.1).unwrap();
    Candidate {
        driver: IndexedDriver {
            driver_id: d(i),
            position,
            heading: None,
            product,
            available: true,
        },
        distance_m: pickup().distance_m(position),
    }
}

fn quote() -> QuoteTerms {
    QuoteTerms {
        fare_cents: 1850,
        currency: "USD".into(),
        surge: 1.0,
        distance_m: 6000,
        duration_s: 900,
    }
}

fn new_trip(now: u64, cfg: &DispatchConfig) -> (Trip, Vec<TripEffect>) {
    let start = Trip::start(
        TripId::new("trp_1"),
        RiderId::new("rdr_1"),
        Product::Economy,
        pickup(),
        Point::new(45.50, -73.57).unwrap(),
        quote(),
        now,
        cfg,
    );
    (start.trip, start.effects)
}

fn kind(e: &TripError) -> Kind {
    match e {
        TripError::Forbidden(_) => Kind::Forbidden,
        TripError::Conflict(_) => Kind::Conflict,
        // The answers for a trip no actor holds (`refuse_without_trip`): never the
        // machine's own.
        TripError::NotFound(_) | TripError::Unavailable(_) => {
            panic!("Trip::apply answered {e:?}")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Forbidden,
    Conflict,
}

type Outcome = Result<Vec<TripEffect>, Kind>;

// ---------------------------------------------------------------------------------------
// The model: PROTOCOL.md's trip section written out as plainly as possible.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Model {
    state: TripState,
    version: u64,
    driver: Option<DriverId>,
    offer: Option<Offer>,
    seq: u64,
    /// Everyone offered this trip (or taken off it): never offered it again.
    tried: BTreeSet<DriverId>,
    /// The rest of the current candidate list, best pickup ETA first.
    queue: VecDeque<(DriverId, f64, u64)>,
    searching: bool,
    deadline: u64,
    cancelled_by: Option<CancelledBy>,
    cancel_reason: Option<String>,
    fare: Option<i64>,
    pickup_eta: Option<u64>,
    started_at: Option<u64>,
    completed_at: Option<u64>,
    updated_at: u64,
}

struct Env {
    cfg: DispatchConfig,
    eta: StraightLineEta,
    product: Product,
    fare: i64,
}

impl Model {
    fn new(now: u64, env: &Env) -> Self {
        Model {
            state: TripState::Dispatching,
            version: 1,
            driver: None,
            offer: None,
            seq: 0,
            tried: BTreeSet::new(),
            queue: VecDeque::new(),
            searching: true,
            deadline: now + env.cfg.dispatch_deadline_ms,
            cancelled_by: None,
            cancel_reason: None,
            fare: None,
            pickup_eta: None,
            started_at: None,
            completed_at: None,
            updated_at: now,
        }
    }

    fn move_to(&mut self, to: TripState, by: Mover, now: u64, fx: &mut Vec<TripEffect>) {
        fx.push(TripEffect::Transitioned {
            from: self.state,
            to,
            by,
            at_ms: now,
        });
        self.state = to;
        self.version += 1;
        self.updated_at = now;
    }

    fn withdraw_offer(&mut self, fx: &mut Vec<TripEffect>) {
        if let Some(o) = self.offer.take() {
            fx.push(TripEffect::OfferEnded {
                driver_id: o.driver_id,
                seq: o.seq,
                why: OfferEnd::Withdrawn,
            });
        }
    }

    fn no_driver_found(&mut self, now: u64, fx: &mut Vec<TripEffect>) {
        self.withdraw_offer(fx);
        self.queue.clear();
        self.searching = false;
        self.move_to(TripState::NoDriverFound, Mover::System, now, fx);
        fx.push(TripEffect::Finished);
    }

    /// Offer to the next untried candidate, or search again, or give up.
    fn advance(mut self, now: u64, env: &Env, mut fx: Vec<TripEffect>) -> (Model, Outcome) {
        if self.state != TripState::Dispatching || self.offer.is_some() || self.searching {
            return (self, Ok(fx));
        }
        if now >= self.deadline {
            self.no_driver_found(now, &mut fx);
            return (self, Ok(fx));
        }
        while let Some((id, dist, eta_s)) = self.queue.pop_front() {
            if !self.tried.insert(id.clone()) {
                continue;
            }
            self.seq += 1;
            let offer = Offer {
                driver_id: id,
                seq: self.seq,
                expires_at_ms: now + env.cfg.offer_timeout_ms,
                pickup_distance_m: dist.round() as u64,
                pickup_eta_s: eta_s,
            };
            self.offer = Some(offer.clone());
            fx.push(TripEffect::SendOffer(offer));
            return (self, Ok(fx));
        }
        // Everyone on the list was tried: look again without them.
        self.searching = true;
        fx.push(TripEffect::Search {
            exclude: self.tried.iter().cloned().collect(),
        });
        (self, Ok(fx))
    }

    /// The offer check shared by accept and decline.
    fn offer_for(&self, driver: &DriverId) -> Result<u64, Kind> {
        match &self.offer {
            Some(o) if &o.driver_id == driver => Ok(o.seq),
            // It was this driver's once (or still is, as the assigned driver): too late.
            _ if self.tried.contains(driver) || self.driver.as_ref() == Some(driver) => {
                Err(Kind::Conflict)
            }
            _ => Err(Kind::Forbidden),
        }
    }

    fn driver_step(&self, driver: &DriverId, want: TripState) -> Result<(), Kind> {
        if self.driver.as_ref() != Some(driver) {
            Err(Kind::Forbidden)
        } else if self.state != want {
            Err(Kind::Conflict)
        } else {
            Ok(())
        }
    }

    fn apply(&self, cmd: &TripCommand, now: u64, env: &Env) -> (Model, Outcome) {
        let mut m = self.clone();
        let mut fx = Vec::new();
        let err = |k| (self.clone(), Err(k));
        match cmd {
            // Not generated: `Freed` has tests of its own.
            TripCommand::Freed(_) => unreachable!("the model does not generate Freed"),
            TripCommand::Candidates(_) | TripCommand::Ranked(_) => {
                if m.state != TripState::Dispatching || !m.searching {
                    return (m, Ok(fx));
                }
                m.searching = false;
                // `Ranked` brings the ETAs `Candidates` would estimate.
                let given: Vec<(&Candidate, u64)> = match cmd {
                    TripCommand::Candidates(list) => list
                        .iter()
                        .map(|c| {
                            let eta_s = env.eta.estimate(c.driver.position, pickup()).duration_s;
                            (c, eta_s.round() as u64)
                        })
                        .collect(),
                    TripCommand::Ranked(list) => list.iter().map(|(c, e)| (c, *e)).collect(),
                    _ => unreachable!("matched above"),
                };
                let mut ranked: Vec<(DriverId, f64, u64)> = given
                    .into_iter()
                    .filter(|(c, _)| {
                        c.driver.product == env.product && !m.tried.contains(&c.driver.driver_id)
                    })
                    .map(|(c, eta_s)| (c.driver.driver_id.clone(), c.distance_m, eta_s))
                    .collect();
                ranked.sort_by(|a, b| a.2.cmp(&b.2).then(a.1.total_cmp(&b.1)));
                if ranked.is_empty() {
                    // PROTOCOL.md: with no candidates the trip ends no_driver_found.
                    m.no_driver_found(now, &mut fx);
                    return (m, Ok(fx));
                }
                m.queue = ranked.into();
                m.advance(now, env, fx)
            }
            TripCommand::OfferRefused { seq } | TripCommand::OfferTimeout { seq } => {
                let open = m.state == TripState::Dispatching
                    && m.offer.as_ref().is_some_and(|o| o.seq == *seq);
                if !open {
                    return (m, Ok(fx));
                }
                let o = m.offer.take().unwrap();
                if matches!(cmd, TripCommand::OfferTimeout { .. }) {
                    fx.push(TripEffect::OfferEnded {
                        driver_id: o.driver_id,
                        seq: o.seq,
                        why: OfferEnd::Expired,
                    });
                }
                m.advance(now, env, fx)
            }
            TripCommand::Decline { driver_id } => match m.offer_for(driver_id) {
                Err(k) => err(k),
                Ok(seq) => {
                    m.offer = None;
                    fx.push(TripEffect::OfferEnded {
                        driver_id: driver_id.clone(),
                        seq,
                        why: OfferEnd::Declined,
                    });
                    m.advance(now, env, fx)
                }
            },
            TripCommand::Accept { driver_id } => match m.offer_for(driver_id) {
                Err(k) => err(k),
                // PROTOCOL.md: `conflict` if it expired, even before its timer is handled.
                Ok(_) if now >= m.offer.as_ref().unwrap().expires_at_ms => err(Kind::Conflict),
                // Likewise once the dispatch deadline has passed (the trip is ending).
                Ok(_) if now >= m.deadline => err(Kind::Conflict),
                Ok(_) => {
                    let o = m.offer.take().unwrap();
                    m.queue.clear();
                    m.driver = Some(driver_id.clone());
                    m.pickup_eta = Some(o.pickup_eta_s);
                    m.move_to(
                        TripState::DriverAssigned,
                        Mover::Driver(driver_id.clone()),
                        now,
                        &mut fx,
                    );
                    fx.push(TripEffect::DriverAssigned {
                        driver_id: driver_id.clone(),
                    });
                    (m, Ok(fx))
                }
            },
            TripCommand::DeadlineReached => {
                if m.state == TripState::Dispatching && now >= m.deadline {
                    m.no_driver_found(now, &mut fx);
                }
                (m, Ok(fx))
            }
            TripCommand::Arrived { driver_id } => {
                match m.driver_step(driver_id, TripState::DriverAssigned) {
                    Err(k) => err(k),
                    Ok(()) => {
                        m.pickup_eta = Some(0);
                        let by = Mover::Driver(driver_id.clone());
                        m.move_to(TripState::DriverArrived, by, now, &mut fx);
                        (m, Ok(fx))
                    }
                }
            }
            TripCommand::Start { driver_id } => {
                match m.driver_step(driver_id, TripState::DriverArrived) {
                    Err(k) => err(k),
                    Ok(()) => {
                        m.pickup_eta = None;
                        m.started_at = Some(now);
                        let by = Mover::Driver(driver_id.clone());
                        m.move_to(TripState::InProgress, by, now, &mut fx);
                        (m, Ok(fx))
                    }
                }
            }
            TripCommand::Complete { driver_id } => {
                match m.driver_step(driver_id, TripState::InProgress) {
                    Err(k) => err(k),
                    Ok(()) => {
                        m.fare = Some(env.fare);
                        m.completed_at = Some(now);
                        let by = Mover::Driver(driver_id.clone());
                        m.move_to(TripState::Completed, by, now, &mut fx);
                        fx.push(TripEffect::DriverReleased {
                            driver_id: driver_id.clone(),
                        });
                        fx.push(TripEffect::Finished);
                        (m, Ok(fx))
                    }
                }
            }
            TripCommand::DriverCancel { driver_id, .. } => {
                if m.driver.as_ref() != Some(driver_id) {
                    return err(Kind::Forbidden);
                }
                if m.state.is_final() {
                    // The trip's own driver, after someone else ended it.
                    return err(Kind::Conflict);
                }
                if !matches!(
                    m.state,
                    TripState::DriverAssigned | TripState::DriverArrived
                ) {
                    return err(Kind::Conflict);
                }
                m.driver = None;
                m.pickup_eta = None;
                m.tried.insert(driver_id.clone());
                m.deadline = now + env.cfg.dispatch_deadline_ms;
                let by = Mover::Driver(driver_id.clone());
                m.move_to(TripState::Dispatching, by, now, &mut fx);
                fx.push(TripEffect::DriverReleased {
                    driver_id: driver_id.clone(),
                });
                fx.push(TripEffect::ArmDeadline { at_ms: m.deadline });
                m.searching = true;
                fx.push(TripEffect::Search {
                    exclude: m.tried.iter().cloned().collect(),
                });
                (m, Ok(fx))
            }
            TripCommand::Cancel { by, reason } => {
                let before_pickup = matches!(
                    m.state,
                    TripState::Dispatching | TripState::DriverAssigned | TripState::DriverArrived
                );
                let (allowed, mover) = match by {
                    CancelledBy::Driver => return err(Kind::Forbidden),
                    CancelledBy::Admin => (!m.state.is_final(), Mover::Admin),
                    CancelledBy::Rider => (before_pickup, Mover::Rider),
                    CancelledBy::System => (before_pickup, Mover::System),
                };
                if !allowed {
                    return err(Kind::Conflict);
                }
                m.withdraw_offer(&mut fx);
                m.queue.clear();
                m.searching = false;
                m.cancelled_by = Some(*by);
                m.cancel_reason = reason.clone();
                m.pickup_eta = None;
                m.move_to(TripState::Cancelled, mover, now, &mut fx);
                if let Some(driver_id) = m.driver.clone() {
                    fx.push(TripEffect::DriverReleased { driver_id });
                }
                fx.push(TripEffect::Finished);
                (m, Ok(fx))
            }
        }
    }

    /// Differences between what the trip shows and what the model expects.
    fn diff(&self, t: &Trip) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! same {
            ($name:literal, $got:expr, $want:expr) => {
                if $got != $want {
                    out.push(format!("{}: trip {:?}, model {:?}", $name, $got, $want));
                }
            };
        }
        same!("state", t.state(), self.state);
        same!("version", t.version(), self.version);
        same!("driver_id", t.driver_id(), self.driver.as_ref());
        same!("offer", t.offer(), self.offer.as_ref());
        same!("deadline_ms", t.deadline_ms(), self.deadline);
        same!(
            "excluded",
            t.excluded().cloned().collect::<BTreeSet<_>>(),
            self.tried
        );
        same!("is_searching", t.is_searching(), self.searching);
        same!("cancelled_by", t.cancelled_by(), self.cancelled_by);
        same!(
            "cancel_reason",
            t.cancel_reason(),
            self.cancel_reason.as_deref()
        );
        same!("fare_cents", t.fare_cents(), self.fare);
        same!("pickup_eta_s", t.pickup_eta_s(), self.pickup_eta);
        same!("started_at_ms", t.started_at_ms(), self.started_at);
        same!("completed_at_ms", t.completed_at_ms(), self.completed_at);
        same!("updated_at_ms", t.updated_at_ms(), self.updated_at);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Random command sequences.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Who {
    /// The trip's driver (or the last one it had, or `drv_0`).
    OnTrip,
    Driver(u8),
}

#[derive(Debug, Clone, Copy)]
enum Seq {
    Current,
    Stale(u8),
}

#[derive(Debug, Clone)]
enum Act {
    /// A search answer: (driver, hundreds of metres away, wrong product).
    Candidates(Vec<(u8, u8, bool)>),
    /// The same with the ETAs estimated by the caller (batched matching).
    Ranked(Vec<(u8, u8, bool)>),
    Accept(Option<u8>),
    Decline(Option<u8>),
    Timeout(Seq),
    Refused(Seq),
    Deadline {
        after: bool,
    },
    Arrived(Who),
    Start(Who),
    Complete(Who),
    DriverCancel(Who),
    Cancel(u8),
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![4 => Just(Who::OnTrip), 1 => (0..=STRANGER).prop_map(Who::Driver)]
}

fn seq() -> impl Strategy<Value = Seq> {
    prop_oneof![3 => Just(Seq::Current), 1 => (0u8..6).prop_map(Seq::Stale)]
}

/// `None` is the driver holding the offer; `Some(i)` any driver (often someone else).
fn offered_or_other() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![4 => Just(None), 1 => (0..=STRANGER).prop_map(Some)]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        5 => proptest::collection::vec((0..POOL, 1u8..40, proptest::bool::weighted(0.15)), 0..5)
            .prop_map(Act::Candidates),
        3 => proptest::collection::vec((0..POOL, 1u8..40, proptest::bool::weighted(0.15)), 0..5)
            .prop_map(Act::Ranked),
        5 => offered_or_other().prop_map(Act::Accept),
        4 => offered_or_other().prop_map(Act::Decline),
        3 => seq().prop_map(Act::Timeout),
        2 => seq().prop_map(Act::Refused),
        2 => any::<bool>().prop_map(|after| Act::Deadline { after }),
        3 => who().prop_map(Act::Arrived),
        3 => who().prop_map(Act::Start),
        3 => who().prop_map(Act::Complete),
        2 => who().prop_map(Act::DriverCancel),
        1 => (0u8..4).prop_map(Act::Cancel),
    ]
}

fn step() -> impl Strategy<Value = (Act, u64)> {
    (act(), prop_oneof![4 => 0u64..4_000, 1 => 0u64..90_000])
}

struct Harness {
    trip: Trip,
    model: Model,
    env: Env,
    now: u64,
    /// Every driver a `SendOffer` named, in this trip.
    offered: BTreeSet<DriverId>,
    last_driver: Option<DriverId>,
    log: Vec<String>,
}

impl Harness {
    fn new() -> Self {
        let env = Env {
            cfg: DispatchConfig::default(),
            eta: StraightLineEta::default(),
            product: Product::Economy,
            fare: quote().fare_cents,
        };
        let (trip, fx) = new_trip(T0, &env.cfg);
        assert_eq!(
            fx,
            vec![
                TripEffect::ArmDeadline {
                    at_ms: T0 + env.cfg.dispatch_deadline_ms
                },
                TripEffect::Search { exclude: vec![] },
            ]
        );
        let model = Model::new(T0, &env);
        Harness {
            trip,
            model,
            env,
            now: T0,
            offered: BTreeSet::new(),
            last_driver: None,
            log: Vec::new(),
        }
    }

    fn on_trip(&self, w: Who) -> DriverId {
        match w {
            Who::OnTrip => self
                .trip
                .driver_id()
                .or(self.last_driver.as_ref())
                .cloned()
                .unwrap_or_else(|| d(0)),
            Who::Driver(i) => d(i),
        }
    }

    fn offered_or(&self, who: Option<u8>) -> DriverId {
        match who {
            Some(i) => d(i),
            None => self
                .trip
                .offer()
                .map(|o| o.driver_id.clone())
                .unwrap_or_else(|| d(0)),
        }
    }

    fn seq(&self, s: Seq) -> u64 {
        match s {
            Seq::Current => self.trip.offer().map_or(1, |o| o.seq),
            Seq::Stale(n) => u64::from(n),
        }
    }

    /// Turns a generated action into a command, moving the clock as the action needs.
    fn command(&mut self, act: &Act) -> TripCommand {
        match act {
            Act::Candidates(list) => TripCommand::Candidates(cands(list)),
            Act::Ranked(list) => TripCommand::Ranked(
                cands(list)
                    .into_iter()
                    .map(|c| {
                        let e = self.env.eta.estimate(c.driver.position, pickup());
                        (c, e.duration_s.round() as u64)
                    })
                    .collect(),
            ),
            Act::Accept(w) => TripCommand::Accept {
                driver_id: self.offered_or(*w),
            },
            Act::Decline(w) => TripCommand::Decline {
                driver_id: self.offered_or(*w),
            },
            Act::Timeout(s) => {
                if let (Seq::Current, Some(o)) = (s, self.trip.offer()) {
                    self.now = self.now.max(o.expires_at_ms);
                }
                TripCommand::OfferTimeout { seq: self.seq(*s) }
            }
            Act::Refused(s) => TripCommand::OfferRefused { seq: self.seq(*s) },
            Act::Deadline { after } => {
                if *after {
                    self.now = self.now.max(self.trip.deadline_ms());
                }
                TripCommand::DeadlineReached
            }
            Act::Arrived(w) => TripCommand::Arrived {
                driver_id: self.on_trip(*w),
            },
            Act::Start(w) => TripCommand::Start {
                driver_id: self.on_trip(*w),
            },
            Act::Complete(w) => TripCommand::Complete {
                driver_id: self.on_trip(*w),
            },
            Act::DriverCancel(w) => TripCommand::DriverCancel {
                driver_id: self.on_trip(*w),
                reason: Some("flat tyre".into()),
            },
            Act::Cancel(by) => TripCommand::Cancel {
                by: [
                    CancelledBy::Rider,
                    CancelledBy::Admin,
                    CancelledBy::System,
                    CancelledBy::Driver,
                ][usize::from(*by)],
                reason: Some(format!("reason {by}")),
            },
        }
    }

    fn step(&mut self, act: &Act, dt: u64) -> Result<(), TestCaseError> {
        self.now += dt;
        let cmd = self.command(act);
        let now = self.now;
        self.log.push(format!("t+{}ms {:?}", now - T0, short(&cmd)));
        let before = self.trip.clone();
        let result = self
            .trip
            .apply(cmd.clone(), now, &self.env.cfg, &self.env.eta);
        let ctx = || format!("after {:#?}", self.log);

        // Model-free rules.
        prop_assert_eq!(self.trip.check_invariants(), Ok(()), "{}", ctx());
        match &result {
            Err(_) => prop_assert_eq!(&self.trip, &before, "an error changed the trip; {}", ctx()),
            Ok(fx) => {
                let moves: Vec<(TripState, TripState)> = fx
                    .iter()
                    .filter_map(|e| match e {
                        TripEffect::Transitioned {
                            from, to, at_ms, ..
                        } => Some((*from, *to, *at_ms)),
                        _ => None,
                    })
                    .map(|(from, to, at)| {
                        assert_eq!(at, now);
                        (from, to)
                    })
                    .collect();
                prop_assert!(moves.len() <= 1, "two transitions in one step: {:?}", moves);
                for (from, to) in &moves {
                    prop_assert!(from.can_move_to(*to), "illegal {:?} -> {:?}", from, to);
                    prop_assert_eq!(*from, before.state());
                    prop_assert_eq!(*to, self.trip.state());
                }
                prop_assert_eq!(
                    self.trip.version(),
                    before.version() + moves.len() as u64,
                    "version must rise by one per transition; {}",
                    ctx()
                );
                if moves.is_empty() {
                    prop_assert_eq!(self.trip.state(), before.state());
                }
                if before.state().is_final() {
                    prop_assert_eq!(self.trip.state(), before.state(), "left a final state");
                    prop_assert!(fx.is_empty(), "effects after the end: {:?}", fx);
                }
                let sends: Vec<&Offer> = fx
                    .iter()
                    .filter_map(|e| match e {
                        TripEffect::SendOffer(o) => Some(o),
                        _ => None,
                    })
                    .collect();
                prop_assert!(sends.len() <= 1, "two offers at once: {:?}", sends);
                for o in &sends {
                    prop_assert!(
                        self.offered.insert(o.driver_id.clone()),
                        "{} offered this trip a second time; {}",
                        o.driver_id,
                        ctx()
                    );
                    prop_assert_eq!(self.trip.offer(), Some(*o));
                    prop_assert_eq!(o.expires_at_ms, now + self.env.cfg.offer_timeout_ms);
                    prop_assert!(o.driver_id != d(STRANGER), "offered a non-candidate");
                }
                for e in fx {
                    if let TripEffect::Search { exclude } = e {
                        // A new search leaves out everyone already tried.
                        let exclude: BTreeSet<DriverId> = exclude.iter().cloned().collect();
                        prop_assert_eq!(&exclude, &self.offered, "search exclusions; {}", ctx());
                    }
                }
                if let TripCommand::Accept { driver_id } = &cmd {
                    let holder = before.offer().map(|o| &o.driver_id);
                    prop_assert_eq!(holder, Some(driver_id), "accepted by a non-holder");
                    let expires = before.offer().unwrap().expires_at_ms;
                    prop_assert!(now < expires, "accepted an expired offer");
                    self.last_driver = Some(driver_id.clone());
                }
            }
        }

        // The model.
        let (model, want) = self.model.apply(&cmd, now, &self.env);
        let got: Outcome = result.clone().map_err(|e| kind(&e));
        if got != want {
            return Err(TestCaseError::fail(format!(
                "{:?} at t+{}ms\n  trip gave  {:?}\n  model wants {:?}\n{}",
                short(&cmd),
                now - T0,
                got,
                want,
                ctx()
            )));
        }
        self.model = model;
        let diff = self.model.diff(&self.trip);
        prop_assert!(
            diff.is_empty(),
            "trip and model disagree: {:?}; {}",
            diff,
            ctx()
        );
        Ok(())
    }
}

/// A generated search answer's candidates.
fn cands(list: &[(u8, u8, bool)]) -> Vec<Candidate> {
    list.iter()
        .map(|&(i, hm, wrong)| {
            let product = if wrong { Product::Xl } else { Product::Economy };
            cand(i, f64::from(hm) * 100.0, product)
        })
        .collect()
}

/// A command without the candidate details, for readable failure logs.
fn short(cmd: &TripCommand) -> String {
    match cmd {
        TripCommand::Candidates(list) => format!(
            "Candidates({:?})",
            list.iter()
                .map(|c| format!(
                    "{}@{:.0}m{}",
                    c.driver.driver_id,
                    c.distance_m,
                    if c.driver.product == Product::Economy {
                        ""
                    } else {
                        "(xl)"
                    }
                ))
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(common::config(256))]

    #[test]
    fn trip_machine_matches_the_model(steps in proptest::collection::vec(step(), 1..60)) {
        let mut h = Harness::new();
        for (act, dt) in &steps {
            h.step(act, *dt)?;
        }
    }
}

/// The property above must be able to reach every state, or it proves little. This
/// runs the same generator by hand and counts what it reached.
#[test]
fn the_model_test_reaches_every_state() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = proptest::collection::vec(step(), 1..60);
    let mut reached = BTreeSet::new();
    let mut accepted_by_cancelled_driver_conflict = false;
    for _ in 0..256 {
        let steps = strategy.new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new();
        for (act, dt) in &steps {
            let was_excluded_accept = match act {
                Act::Accept(Some(i)) => h.trip.excluded().any(|x| *x == d(*i)),
                _ => false,
            };
            let version = h.trip.version();
            h.step(act, *dt).unwrap();
            reached.insert(h.trip.state().as_str());
            if was_excluded_accept && h.trip.version() == version {
                accepted_by_cancelled_driver_conflict = true;
            }
        }
    }
    for s in TripState::ALL {
        assert!(reached.contains(s.as_str()), "never reached {}", s.as_str());
    }
    assert!(accepted_by_cancelled_driver_conflict);
}

// ---------------------------------------------------------------------------------------
// The cascade, case by case.
// ---------------------------------------------------------------------------------------

struct T {
    trip: Trip,
    now: u64,
    cfg: DispatchConfig,
    eta: StraightLineEta,
}

impl T {
    fn new() -> Self {
        Self::with_cfg(DispatchConfig::default())
    }

    fn with_cfg(cfg: DispatchConfig) -> Self {
        let (trip, _) = new_trip(T0, &cfg);
        T {
            trip,
            now: T0,
            cfg,
            eta: StraightLineEta::default(),
        }
    }

    fn at(&mut self, dt_ms: u64) -> &mut Self {
        self.now += dt_ms;
        self
    }

    fn apply(&mut self, cmd: TripCommand) -> Result<Vec<TripEffect>, TripError> {
        let r = self.trip.apply(cmd, self.now, &self.cfg, &self.eta);
        assert_eq!(self.trip.check_invariants(), Ok(()));
        r
    }

    fn ok(&mut self, cmd: TripCommand) -> Vec<TripEffect> {
        let c = format!("{cmd:?}");
        self.apply(cmd)
            .unwrap_or_else(|e| panic!("{c} failed: {e:?}"))
    }

    fn offered(&self) -> Option<String> {
        self.trip.offer().map(|o| o.driver_id.to_string())
    }

    fn seq(&self) -> u64 {
        self.trip.offer().expect("an open offer").seq
    }

    /// Candidates 1, 2, 3 at 300, 600 and 900 m, handed in out of order.
    fn three_candidates(&mut self) -> Vec<TripEffect> {
        self.ok(TripCommand::Candidates(vec![
            cand(3, 900.0, Product::Economy),
            cand(1, 300.0, Product::Economy),
            cand(2, 600.0, Product::Economy),
        ]))
    }

    /// Dispatches to driver 1 and has it accept.
    fn assigned_to_1(&mut self) {
        self.three_candidates();
        self.at(2_000).ok(TripCommand::Accept { driver_id: d(1) });
        assert_eq!(self.trip.state(), TripState::DriverAssigned);
    }
}

fn sends(fx: &[TripEffect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            TripEffect::SendOffer(o) => Some(o.driver_id.to_string()),
            _ => None,
        })
        .collect()
}

fn searches(fx: &[TripEffect]) -> Vec<Vec<String>> {
    fx.iter()
        .filter_map(|e| match e {
            TripEffect::Search { exclude } => {
                Some(exclude.iter().map(ToString::to_string).collect())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn offers_go_best_eta_first_and_a_decline_moves_to_the_next() {
    let mut t = T::new();
    let fx = t.three_candidates();
    assert_eq!(sends(&fx), ["drv_1"]);
    let TripEffect::SendOffer(o) = &fx[0] else {
        panic!("{fx:?}")
    };
    assert_eq!(o.seq, 1);
    assert_eq!(o.expires_at_ms, T0 + 15_000);
    assert_eq!(o.pickup_distance_m, 300);
    // 300 m × 1.3 at 8.33 m/s.
    assert_eq!(o.pickup_eta_s, 47);

    let fx = t.at(3_000).ok(TripCommand::Decline { driver_id: d(1) });
    assert_eq!(
        fx[0],
        TripEffect::OfferEnded {
            driver_id: d(1),
            seq: 1,
            why: OfferEnd::Declined
        }
    );
    assert_eq!(sends(&fx), ["drv_2"]);
    assert_eq!(t.seq(), 2);
    let fx = t.at(3_000).ok(TripCommand::Decline { driver_id: d(2) });
    assert_eq!(sends(&fx), ["drv_3"]);
    assert_eq!(t.trip.state(), TripState::Dispatching);
    assert_eq!(t.trip.version(), 1, "offers are not transitions");
}

#[test]
fn a_timeout_moves_on_and_a_stale_timer_does_nothing() {
    let mut t = T::new();
    t.three_candidates();
    let fx = t.at(15_000).ok(TripCommand::OfferTimeout { seq: 1 });
    assert_eq!(
        fx[0],
        TripEffect::OfferEnded {
            driver_id: d(1),
            seq: 1,
            why: OfferEnd::Expired
        }
    );
    assert_eq!(sends(&fx), ["drv_2"]);
    // drv_2 declines at once; the timer armed for drv_1 fires again late: nothing.
    t.at(1_000).ok(TripCommand::Decline { driver_id: d(2) });
    let before = t.trip.clone();
    assert_eq!(t.at(500).ok(TripCommand::OfferTimeout { seq: 1 }), vec![]);
    assert_eq!(t.ok(TripCommand::OfferTimeout { seq: 2 }), vec![]);
    assert_eq!(t.ok(TripCommand::OfferRefused { seq: 2 }), vec![]);
    assert_eq!(t.trip, before);
    assert_eq!(t.offered().as_deref(), Some("drv_3"));
}

#[test]
fn a_refused_offer_moves_on_without_telling_the_driver() {
    let mut t = T::new();
    t.three_candidates();
    let fx = t.ok(TripCommand::OfferRefused { seq: 1 });
    assert!(
        !fx.iter()
            .any(|e| matches!(e, TripEffect::OfferEnded { .. })),
        "{fx:?}"
    );
    assert_eq!(sends(&fx), ["drv_2"]);
    // drv_1 could not hold the offer and is not offered this trip again.
    assert_eq!(
        t.apply(TripCommand::Accept { driver_id: d(1) })
            .map_err(|e| kind(&e)),
        Err(Kind::Conflict)
    );
}

/// Batched matching hands a waiting trip a driver as it frees up (`Freed`): a driver
/// that only could not hold the trip's offer (it never saw it) may be offered it again
/// then; one that declined may not, and a `Freed` with nobody it may offer changes
/// nothing (the trip goes on waiting rather than end).
#[test]
fn a_freed_driver_that_only_refused_may_be_offered_the_trip_again() {
    let mut t = T::new();
    t.three_candidates();
    t.ok(TripCommand::OfferRefused { seq: 1 }); // drv_1 was taken: it never saw it
    t.ok(TripCommand::Decline { driver_id: d(2) });
    let fx = t.ok(TripCommand::OfferTimeout { seq: 3 });
    // The trip's own search still leaves drv_1 out (it is not free yet).
    assert_eq!(searches(&fx), [["drv_1", "drv_2", "drv_3"]]);
    let eta = |c: Candidate| (c, 60);
    // A stale search answer does not bring drv_1 back; `Freed` of a decliner changes
    // nothing: the trip is still searching, still dispatching.
    let before = t.trip.clone();
    assert_eq!(
        t.ok(TripCommand::Freed(vec![eta(cand(
            2,
            100.0,
            Product::Economy
        ))])),
        vec![]
    );
    assert_eq!(t.trip, before);
    assert!(t.trip.is_searching());
    // drv_1 freed up: offered the trip, once more.
    let fx = t.at(500).ok(TripCommand::Freed(vec![
        eta(cand(2, 100.0, Product::Economy)),
        eta(cand(1, 300.0, Product::Economy)),
    ]));
    assert_eq!(sends(&fx), ["drv_1"]);
    assert_eq!(t.seq(), 4);
    assert_eq!(t.trip.refused().count(), 0);
    // Declined this time: it is left out for good.
    let fx = t.ok(TripCommand::Decline { driver_id: d(1) });
    assert_eq!(searches(&fx), [["drv_1", "drv_2", "drv_3"]]);
    assert_eq!(
        t.ok(TripCommand::Freed(vec![eta(cand(
            1,
            300.0,
            Product::Economy
        ))])),
        vec![]
    );
}

#[test]
fn an_exhausted_list_searches_again_without_the_tried_drivers() {
    let mut t = T::new();
    t.three_candidates();
    t.ok(TripCommand::Decline { driver_id: d(1) });
    t.ok(TripCommand::OfferTimeout { seq: 2 });
    let fx = t.ok(TripCommand::OfferRefused { seq: 3 });
    assert_eq!(searches(&fx), [["drv_1", "drv_2", "drv_3"]]);
    assert!(t.trip.is_searching());
    assert_eq!(t.trip.offer(), None);
    // The new answer still holds drv_2 (the index was stale): it is skipped.
    let fx = t.at(500).ok(TripCommand::Candidates(vec![
        cand(2, 100.0, Product::Economy),
        cand(4, 2_000.0, Product::Economy),
    ]));
    assert_eq!(sends(&fx), ["drv_4"]);
    assert_eq!(t.seq(), 4);
}

#[test]
fn candidates_of_another_product_are_never_offered() {
    let mut t = T::new();
    let fx = t.ok(TripCommand::Candidates(vec![
        cand(1, 100.0, Product::Premium),
        cand(2, 800.0, Product::Economy),
    ]));
    assert_eq!(sends(&fx), ["drv_2"]);
}

#[test]
fn an_empty_search_ends_the_trip_no_driver_found() {
    // PROTOCOL.md: "after the dispatch deadline or with no candidates the trip ends
    // no_driver_found" (it used to search again, at once, until the deadline).
    let mut t = T::new();
    let fx = t.at(300).ok(TripCommand::Candidates(vec![]));
    assert_eq!(
        t.trip.state(),
        TripState::NoDriverFound,
        "effects were {fx:?}"
    );
    assert!(fx.contains(&TripEffect::Finished), "{fx:?}");

    // And the answer to the search that follows an exhausted list.
    let mut t = T::new();
    t.ok(TripCommand::Candidates(vec![cand(
        1,
        300.0,
        Product::Economy,
    )]));
    let fx = t.ok(TripCommand::Decline { driver_id: d(1) });
    assert_eq!(searches(&fx), [["drv_1"]]);
    // Only drv_1 comes back, and it is excluded: no candidate left.
    let fx = t.ok(TripCommand::Candidates(vec![cand(
        1,
        300.0,
        Product::Economy,
    )]));
    assert_eq!(
        t.trip.state(),
        TripState::NoDriverFound,
        "effects were {fx:?}"
    );
}

#[test]
fn the_deadline_ends_dispatching_and_withdraws_the_open_offer() {
    let mut t = T::new();
    t.three_candidates();
    // Early (a stale timer): nothing.
    assert_eq!(t.at(60_000).ok(TripCommand::DeadlineReached), vec![]);
    let fx = t.at(60_000).ok(TripCommand::DeadlineReached);
    assert_eq!(
        fx,
        vec![
            TripEffect::OfferEnded {
                driver_id: d(1),
                seq: 1,
                why: OfferEnd::Withdrawn
            },
            TripEffect::Transitioned {
                from: TripState::Dispatching,
                to: TripState::NoDriverFound,
                by: Mover::System,
                at_ms: T0 + 120_000
            },
            TripEffect::Finished,
        ]
    );
    assert_eq!(t.trip.version(), 2);
    // A decline that raced the deadline is too late.
    assert_eq!(
        t.apply(TripCommand::Decline { driver_id: d(1) })
            .map_err(|e| kind(&e)),
        Err(Kind::Conflict)
    );
}

#[test]
fn a_decline_after_the_deadline_ends_the_trip_instead_of_offering_on() {
    let mut t = T::new();
    t.three_candidates();
    let fx = t.at(121_000).ok(TripCommand::Decline { driver_id: d(1) });
    assert_eq!(sends(&fx), Vec::<String>::new());
    assert_eq!(t.trip.state(), TripState::NoDriverFound);
}

#[test]
fn accept_assigns_the_offered_driver_once() {
    let mut t = T::new();
    t.three_candidates();
    let fx = t.at(4_000).ok(TripCommand::Accept { driver_id: d(1) });
    assert_eq!(
        fx,
        vec![
            TripEffect::Transitioned {
                from: TripState::Dispatching,
                to: TripState::DriverAssigned,
                by: Mover::Driver(d(1)),
                at_ms: T0 + 4_000
            },
            TripEffect::DriverAssigned { driver_id: d(1) },
        ]
    );
    assert_eq!(t.trip.driver_id(), Some(&d(1)));
    assert_eq!(t.trip.pickup_eta_s(), Some(47));
    assert_eq!(t.trip.version(), 2);
    // A second accept (a retry) is a conflict and changes nothing.
    let before = t.trip.clone();
    assert_eq!(
        t.apply(TripCommand::Accept { driver_id: d(1) })
            .map_err(|e| kind(&e)),
        Err(Kind::Conflict)
    );
    assert_eq!(t.trip, before);
    // The stale offer timer does nothing either.
    assert_eq!(
        t.at(11_000).ok(TripCommand::OfferTimeout { seq: 1 }),
        vec![]
    );
    assert_eq!(t.trip, before);
}

#[test]
fn accept_after_the_offer_moved_on_is_a_conflict() {
    let mut t = T::new();
    t.three_candidates();
    t.at(15_000).ok(TripCommand::OfferTimeout { seq: 1 });
    let before = t.trip.clone();
    let e = t
        .apply(TripCommand::Accept { driver_id: d(1) })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict, "{e}");
    assert_eq!(t.trip, before);
    assert_eq!(t.offered().as_deref(), Some("drv_2"));
    // drv_2 can still take it.
    t.ok(TripCommand::Accept { driver_id: d(2) });
    assert_eq!(t.trip.driver_id(), Some(&d(2)));
}

#[test]
fn accept_or_decline_by_a_driver_never_offered_is_forbidden() {
    let mut t = T::new();
    t.three_candidates();
    let before = t.trip.clone();
    // drv_2 is a candidate, but the offer is drv_1's: it was never offered to drv_2.
    for who in [d(2), d(STRANGER)] {
        let e = t
            .apply(TripCommand::Accept {
                driver_id: who.clone(),
            })
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Forbidden, "{who}: {e}");
        let e = t
            .apply(TripCommand::Decline {
                driver_id: who.clone(),
            })
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Forbidden, "{who}: {e}");
    }
    assert_eq!(t.trip, before);
    // And while the trip is still searching, before any offer.
    let mut t = T::new();
    let e = t
        .apply(TripCommand::Accept { driver_id: d(1) })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Forbidden);
}

#[test]
fn the_happy_path_to_completed() {
    let mut t = T::new();
    t.assigned_to_1();
    let e = t.apply(TripCommand::Start { driver_id: d(1) }).unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict, "start before arrival");
    let e = t
        .apply(TripCommand::Arrived { driver_id: d(2) })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Forbidden, "another driver");
    t.at(120_000).ok(TripCommand::Arrived { driver_id: d(1) });
    assert_eq!(t.trip.pickup_eta_s(), Some(0));
    t.at(30_000).ok(TripCommand::Start { driver_id: d(1) });
    assert_eq!(t.trip.started_at_ms(), Some(t.now));
    let fx = t.at(600_000).ok(TripCommand::Complete { driver_id: d(1) });
    assert_eq!(
        fx[1..],
        [
            TripEffect::DriverReleased { driver_id: d(1) },
            TripEffect::Finished
        ]
    );
    assert_eq!(t.trip.state(), TripState::Completed);
    assert_eq!(t.trip.version(), 5);
    assert_eq!(t.trip.fare_cents(), Some(1850));
    assert_eq!(t.trip.completed_at_ms(), Some(t.now));
    for cmd in [
        TripCommand::Complete { driver_id: d(1) },
        TripCommand::Cancel {
            by: CancelledBy::Admin,
            reason: None,
        },
        TripCommand::DriverCancel {
            driver_id: d(1),
            reason: None,
        },
    ] {
        assert!(t.apply(cmd).is_err());
    }
    assert_eq!(t.trip.state(), TripState::Completed);
}

#[test]
fn a_driver_cancel_goes_back_to_dispatching_without_that_driver() {
    let mut t = T::new();
    t.assigned_to_1();
    t.at(30_000).ok(TripCommand::Arrived { driver_id: d(1) });
    let fx = t.at(10_000).ok(TripCommand::DriverCancel {
        driver_id: d(1),
        reason: Some("rider not there".into()),
    });
    let deadline = t.now + 120_000;
    assert_eq!(
        fx,
        vec![
            TripEffect::Transitioned {
                from: TripState::DriverArrived,
                to: TripState::Dispatching,
                by: Mover::Driver(d(1)),
                at_ms: t.now
            },
            TripEffect::DriverReleased { driver_id: d(1) },
            TripEffect::ArmDeadline { at_ms: deadline },
            TripEffect::Search {
                exclude: vec![d(1)]
            },
        ]
    );
    assert_eq!(t.trip.driver_id(), None);
    assert_eq!(t.trip.pickup_eta_s(), None);
    assert_eq!(t.trip.deadline_ms(), deadline);
    // The old deadline timer fires: the trip has a new one.
    assert_eq!(t.at(80_000).ok(TripCommand::DeadlineReached), vec![]);
    // The search still finds drv_1 nearby: it is not offered the trip again.
    let fx = t.ok(TripCommand::Candidates(vec![
        cand(1, 50.0, Product::Economy),
        cand(5, 700.0, Product::Economy),
    ]));
    assert_eq!(sends(&fx), ["drv_5"]);
    let e = t
        .apply(TripCommand::Accept { driver_id: d(1) })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict);
    t.ok(TripCommand::Accept { driver_id: d(5) });
    assert_eq!(t.trip.version(), 5);
}

#[test]
fn a_driver_cannot_cancel_after_pickup_or_someone_elses_trip() {
    let mut t = T::new();
    t.three_candidates();
    // Holding the offer is not being on the trip.
    let e = t
        .apply(TripCommand::DriverCancel {
            driver_id: d(1),
            reason: None,
        })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Forbidden);
    t.ok(TripCommand::Accept { driver_id: d(1) });
    let e = t
        .apply(TripCommand::DriverCancel {
            driver_id: d(2),
            reason: None,
        })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Forbidden);
    t.ok(TripCommand::Arrived { driver_id: d(1) });
    t.ok(TripCommand::Start { driver_id: d(1) });
    let before = t.trip.clone();
    let e = t
        .apply(TripCommand::DriverCancel {
            driver_id: d(1),
            reason: None,
        })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict);
    assert_eq!(t.trip, before);
    // Once the trip has ended, its driver's cancel is a conflict, not a refusal.
    t.ok(TripCommand::Complete { driver_id: d(1) });
    let e = t
        .apply(TripCommand::DriverCancel {
            driver_id: d(1),
            reason: None,
        })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict);
}

#[test]
fn rider_cancel_is_allowed_before_pickup_only() {
    let rider = |reason: &str| TripCommand::Cancel {
        by: CancelledBy::Rider,
        reason: Some(reason.into()),
    };
    // While dispatching, with an open offer: the offer is withdrawn.
    let mut t = T::new();
    t.three_candidates();
    let fx = t.at(1_000).ok(rider("changed my mind"));
    assert_eq!(
        fx,
        vec![
            TripEffect::OfferEnded {
                driver_id: d(1),
                seq: 1,
                why: OfferEnd::Withdrawn
            },
            TripEffect::Transitioned {
                from: TripState::Dispatching,
                to: TripState::Cancelled,
                by: Mover::Rider,
                at_ms: t.now
            },
            TripEffect::Finished,
        ]
    );
    assert_eq!(t.trip.cancelled_by(), Some(CancelledBy::Rider));
    assert_eq!(t.trip.cancel_reason(), Some("changed my mind"));
    // Twice: the trip has already ended.
    let e = t.apply(rider("again")).unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict);
    assert_eq!(t.trip.cancel_reason(), Some("changed my mind"));

    // With a driver assigned: the driver is released.
    let mut t = T::new();
    t.assigned_to_1();
    let fx = t.ok(rider("late"));
    assert!(fx.contains(&TripEffect::DriverReleased { driver_id: d(1) }));
    let e = t
        .apply(TripCommand::Arrived { driver_id: d(1) })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Conflict);

    // In progress: a conflict for the rider and the system, allowed for an admin.
    let mut t = T::new();
    t.assigned_to_1();
    t.ok(TripCommand::Arrived { driver_id: d(1) });
    t.ok(TripCommand::Start { driver_id: d(1) });
    let before = t.trip.clone();
    for by in [CancelledBy::Rider, CancelledBy::System] {
        let e = t
            .apply(TripCommand::Cancel { by, reason: None })
            .unwrap_err();
        assert_eq!(kind(&e), Kind::Conflict, "{by:?}");
    }
    // A driver's cancel goes through DriverCancel, never Cancel.
    let e = t
        .apply(TripCommand::Cancel {
            by: CancelledBy::Driver,
            reason: None,
        })
        .unwrap_err();
    assert_eq!(kind(&e), Kind::Forbidden);
    assert_eq!(t.trip, before);
    let fx = t.ok(TripCommand::Cancel {
        by: CancelledBy::Admin,
        reason: Some("fraud".into()),
    });
    assert!(fx.contains(&TripEffect::DriverReleased { driver_id: d(1) }));
    assert_eq!(t.trip.state(), TripState::Cancelled);
    assert_eq!(t.trip.cancelled_by(), Some(CancelledBy::Admin));
}

#[test]
fn late_search_answers_and_timers_after_the_end_change_nothing() {
    let mut t = T::new();
    t.ok(TripCommand::Cancel {
        by: CancelledBy::System,
        reason: None,
    });
    let before = t.trip.clone();
    assert_eq!(
        t.ok(TripCommand::Candidates(vec![cand(
            1,
            100.0,
            Product::Economy
        )])),
        vec![]
    );
    assert_eq!(t.at(200_000).ok(TripCommand::DeadlineReached), vec![]);
    assert_eq!(t.ok(TripCommand::OfferTimeout { seq: 1 }), vec![]);
    assert_eq!(t.trip, before);
}

#[test]
fn driver_moved_updates_the_pickup_eta_only_while_heading_there() {
    let mut t = T::new();
    let eta = StraightLineEta::default();
    let near = cand(9, 200.0, Product::Economy).driver.position;
    assert_eq!(t.trip.driver_moved(&d(1), near, &eta), None);
    t.assigned_to_1();
    assert_eq!(t.trip.driver_moved(&d(2), near, &eta), None);
    assert_eq!(t.trip.driver_moved(&d(1), near, &eta), Some(31));
    assert_eq!(t.trip.pickup_eta_s(), Some(31));
    assert_eq!(t.trip.version(), 2, "an ETA refresh is not a transition");
    t.ok(TripCommand::Arrived { driver_id: d(1) });
    assert_eq!(t.trip.driver_moved(&d(1), near, &eta), None);
    assert_eq!(t.trip.pickup_eta_s(), Some(0));
}

/// PROTOCOL.md: `accept` → "`conflict` if it expired or went elsewhere": an accept that
/// beats a late `OfferTimeout` timer is still too late, and changes nothing; the timer
/// then moves on as usual. Just before the expiry it is taken.
#[test]
fn accept_after_the_dispatch_deadline_is_a_conflict_even_before_the_timer() {
    // An offer that outlives the deadline (long offer timeout), as after a restart.
    let cfg = DispatchConfig {
        offer_timeout_ms: 600_000,
        dispatch_deadline_ms: 60_000,
    };
    let mut t = T::with_cfg(cfg);
    t.three_candidates();
    t.now = t.trip.deadline_ms();
    let before = t.trip.clone();
    let r = t.apply(TripCommand::Accept { driver_id: d(1) });
    assert_eq!(
        r.map_err(|e| kind(&e)),
        Err(Kind::Conflict),
        "accepted after the deadline"
    );
    assert_eq!(t.trip, before);
    t.ok(TripCommand::DeadlineReached);
    assert_eq!(t.trip.state(), TripState::NoDriverFound);
}

#[test]
fn accept_after_the_offer_expired_is_a_conflict_even_before_the_timer() {
    let mut t = T::new();
    t.three_candidates();
    let expires = t.trip.offer().unwrap().expires_at_ms;
    t.now = expires;
    let before = t.trip.clone();
    let r = t.apply(TripCommand::Accept { driver_id: d(1) });
    assert_eq!(
        r.map_err(|e| kind(&e)),
        Err(Kind::Conflict),
        "accepted at the instant the offer expired"
    );
    assert_eq!(t.trip, before);
    let fx = t.at(2_000).ok(TripCommand::OfferTimeout { seq: 1 });
    assert_eq!(sends(&fx), ["drv_2"]);

    let mut t = T::new();
    t.three_candidates();
    t.now = t.trip.offer().unwrap().expires_at_ms - 1;
    t.ok(TripCommand::Accept { driver_id: d(1) });
    assert_eq!(t.trip.state(), TripState::DriverAssigned);
}

/// An ETA model that counts its estimates.
#[derive(Debug, Default)]
struct CountingEta(std::sync::atomic::AtomicUsize);

impl EtaModel for CountingEta {
    fn estimate(&self, from: Point, to: Point) -> dispatch_engine::EtaEstimate {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StraightLineEta::default().estimate(from, to)
    }
}

#[test]
fn ranked_candidates_are_taken_as_candidates_without_estimating_again() {
    // drv_1 is the nearest but excluded from nothing; drv_9 is of another product.
    let list = vec![
        cand(2, 900.0, Product::Economy),
        cand(1, 400.0, Product::Economy),
        cand(9, 100.0, Product::Xl),
        cand(3, 1_500.0, Product::Economy),
    ];
    let cfg = DispatchConfig::default();
    let eta = CountingEta::default();
    let (mut by_candidates, _) = new_trip(T0, &cfg);
    let (mut by_ranked, _) = new_trip(T0, &cfg);
    let fx = by_candidates
        .apply(TripCommand::Candidates(list.clone()), T0, &cfg, &eta)
        .unwrap();
    let n = eta.0.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        n, 3,
        "Candidates estimates each candidate of its product once"
    );
    let ranked = list
        .into_iter()
        .map(|c| {
            let e = StraightLineEta::default().estimate(c.driver.position, pickup());
            (c, e.duration_s.round() as u64)
        })
        .collect();
    let fx2 = by_ranked
        .apply(TripCommand::Ranked(ranked), T0, &cfg, &eta)
        .unwrap();
    assert_eq!(
        eta.0.load(std::sync::atomic::Ordering::Relaxed),
        n,
        "Ranked estimated again"
    );
    assert_eq!(fx2, fx, "the same offer, with the same ETA");
    assert_eq!(by_ranked, by_candidates, "and the same trip after it");
    assert_eq!(sends(&fx2), ["drv_1"]);
}
