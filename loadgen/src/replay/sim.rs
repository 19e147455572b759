//! The replayed day: every trip of the file through the engine's own trip state machine
//! (`Trip::start` / `Trip::apply`), its driver index (`CellDrivers` per H3 cell), its
//! ring search and, in batch mode, its batched assignment, on a simulated clock.
//!
//! One event queue ordered by (time, sequence number), one seeded RNG, no hash-order
//! iteration that reaches an outcome: the same trips, flags and seed give the same report
//! (all but the solver's wall time, which is measured).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::Instant;

use dispatch_engine::search::search_map;
use dispatch_engine::{
    BatchParams, Candidate, CellDrivers, CellId, DispatchConfig, DriverFilter, DriverId, EtaModel,
    Grid, IndexedDriver, Point, Product, QuoteTerms, RiderId, SearchParams, StraightLineEta, Trip,
    TripCommand, TripEffect, TripId, TripState, assign,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::report::{Outcome, Recorder};
use super::{Matching, TripRow};

/// Everything one replay run needs besides the trips.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub matching: Matching,
    /// Batch mode: requests are assigned once per window.
    pub window_ms: u64,
    pub drivers: usize,
    pub seed: u64,
    pub accept_prob: f64,
    /// Of the offers not accepted, the share declined; the rest time out.
    pub decline_share: f64,
    pub shift_hours: f64,
    /// Requests of `[from_s, to_s)` (seconds after midnight) are replayed.
    pub from_s: u64,
    pub to_s: u64,
    pub batch: BatchParams,
    pub search: SearchParams,
    pub dispatch: DispatchConfig,
    pub eta: StraightLineEta,
    pub h3_resolution: u8,
    /// Check the world after every batch window and cruise tick (tests): no driver holds
    /// two trips (offered or assigned), no trip two drivers, each driver's state agrees
    /// with the trips, and each trip's own invariants. Panics with the first violation.
    pub check_invariants: bool,
}

/// How often idle drivers move (simulated).
const CRUISE_TICK_MS: u64 = 60_000;
/// Idle drivers cruise at this share of the ETA model's speed.
const CRUISE_SPEED_SHARE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    ShiftStart(usize),
    ShiftEnd(usize),
    Request(usize),
    Window,
    Cruise,
    Answer { trip: usize, seq: u64, accept: bool },
    OfferTimeout { trip: usize, seq: u64 },
    Deadline(usize),
    Arrived(usize),
    Start(usize),
    Complete(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DState {
    Off,
    Idle,
    Offered(usize),
    Busy(usize),
}

#[derive(Debug)]
struct Driver {
    id: DriverId,
    pos: Point,
    state: DState,
    on_shift: bool,
    cruise_to: Option<Point>,
    cell: Option<CellId>,
}

/// The search's filter: available drivers of the trip's product, minus the excluded.
struct Available<'a> {
    exclude: &'a BTreeSet<DriverId>,
}

impl DriverFilter for Available<'_> {
    fn quick(&self, product: Product, available: bool) -> bool {
        available && product == Product::Economy
    }
    fn keep(&mut self, d: &IndexedDriver) -> bool {
        !self.exclude.contains(&d.driver_id)
    }
}

pub struct Sim<'a> {
    cfg: &'a SimConfig,
    trips_in: &'a [TripRow],
    grid: Grid,
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    cells: HashMap<CellId, CellDrivers>,
    drivers: Vec<Driver>,
    by_id: HashMap<DriverId, usize>,
    trips: Vec<Option<Trip>>,
    /// Batch mode: trips waiting for the next window, in arrival order.
    pool: BTreeSet<usize>,
    rec: Recorder,
    end_ms: u64,
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}

impl<'a> Sim<'a> {
    pub fn new(cfg: &'a SimConfig, trips_in: &'a [TripRow]) -> anyhow::Result<Self> {
        let grid = Grid::new(cfg.h3_resolution).map_err(|e| anyhow::anyhow!("h3: {e}"))?;
        let end_ms = cfg.to_s * 1000;
        let mut s = Sim {
            cfg,
            trips_in,
            grid,
            rng: StdRng::seed_from_u64(cfg.seed),
            now: cfg.from_s * 1000,
            seq: 0,
            queue: BinaryHeap::new(),
            cells: HashMap::new(),
            drivers: Vec::with_capacity(cfg.drivers),
            by_id: HashMap::new(),
            trips: (0..trips_in.len()).map(|_| None).collect(),
            pool: BTreeSet::new(),
            rec: Recorder::new(cfg.from_s, cfg.to_s, trips_in.len()),
            end_ms,
        };
        s.plan_shifts();
        for (i, t) in trips_in.iter().enumerate() {
            s.at(t.at_ms, Ev::Request(i));
        }
        s.at(s.now, Ev::Cruise);
        if cfg.matching == Matching::Batch {
            s.at(s.now + cfg.window_ms, Ev::Window);
        }
        Ok(s)
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, ev)));
    }

    /// Each driver works one shift of `shift_hours`, starting at a uniform time in
    /// `[from - shift, to)`, so about the same share of the fleet is on at any hour.
    /// A driver on shift at the start begins at one of the first pickups; a later one at a
    /// pickup of about its start time. Both jittered by up to ~300 m.
    fn plan_shifts(&mut self) {
        let from = self.cfg.from_s as f64;
        let to = self.cfg.to_s as f64;
        let shift = self.cfg.shift_hours * 3600.0;
        let n = self.trips_in.len().max(1);
        for i in 0..self.cfg.drivers {
            let start = self.rng.random_range((from - shift)..to);
            let at = start.max(from);
            let first = self
                .trips_in
                .partition_point(|t| (t.at_ms as f64) < at * 1000.0)
                .min(n - 1);
            let near = if start <= from { i % n.min(500) } else { first };
            let near = (near + self.rng.random_range(0..20)).min(n - 1);
            let p = self
                .trips_in
                .get(near)
                .map_or(Point::new(40.758, -73.985).expect("a valid point"), |t| {
                    t.pickup
                });
            let pos = jitter(&mut self.rng, p, 300.0);
            let id = DriverId::new(format!("drv_{i:06}"));
            self.by_id.insert(id.clone(), i);
            self.drivers.push(Driver {
                id,
                pos,
                state: DState::Off,
                on_shift: false,
                cruise_to: None,
                cell: None,
            });
            self.at(ms(at), Ev::ShiftStart(i));
            let end = start + shift;
            if end < to {
                self.at(ms(end), Ev::ShiftEnd(i));
            }
        }
    }

    /// Runs until every trip has ended; returns the report's raw material.
    pub fn run(mut self) -> Outcome {
        while let Some(Reverse((t, _, ev))) = self.queue.pop() {
            self.now = t;
            self.handle(ev);
        }
        self.rec.finish()
    }

    fn index(&mut self, d: usize) {
        let available = self.drivers[d].state == DState::Idle;
        let dr = &mut self.drivers[d];
        if dr.state == DState::Off {
            if let Some(c) = dr.cell.take()
                && let Some(cell) = self.cells.get_mut(&c)
            {
                cell.remove(&dr.id);
            }
            return;
        }
        let cell = self.grid.cell_of(dr.pos);
        if let Some(old) = dr.cell
            && old != cell
            && let Some(c) = self.cells.get_mut(&old)
        {
            c.remove(&dr.id);
        }
        dr.cell = Some(cell);
        self.cells.entry(cell).or_default().upsert(IndexedDriver {
            driver_id: dr.id.clone(),
            position: dr.pos,
            heading: None,
            product: Product::Economy,
            available,
        });
    }

    fn set_state(&mut self, d: usize, state: DState) {
        self.drivers[d].state = state;
        self.index(d);
    }

    /// A driver whose trip or offer ended: idle again, or off if its shift is over.
    fn free(&mut self, d: usize) {
        let next = if self.drivers[d].on_shift {
            DState::Idle
        } else {
            DState::Off
        };
        self.set_state(d, next);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::ShiftStart(d) => {
                self.drivers[d].on_shift = true;
                self.set_state(d, DState::Idle);
            }
            Ev::ShiftEnd(d) => {
                self.drivers[d].on_shift = false;
                if self.drivers[d].state == DState::Idle {
                    self.set_state(d, DState::Off);
                }
            }
            Ev::Request(i) => self.request(i),
            Ev::Window => {
                self.window();
                self.check();
                if self.now < self.end_ms || !self.pool.is_empty() {
                    self.at(self.now + self.cfg.window_ms, Ev::Window);
                }
            }
            Ev::Cruise => {
                self.cruise();
                self.check();
                if self.now < self.end_ms {
                    self.at(self.now + CRUISE_TICK_MS, Ev::Cruise);
                }
            }
            Ev::Answer { trip, seq, accept } => {
                let Some(d) = self.offered_driver(trip, seq) else {
                    return;
                };
                let driver_id = self.drivers[d].id.clone();
                let cmd = if accept {
                    TripCommand::Accept { driver_id }
                } else {
                    TripCommand::Decline { driver_id }
                };
                self.apply(trip, cmd);
            }
            Ev::OfferTimeout { trip, seq } => self.apply(trip, TripCommand::OfferTimeout { seq }),
            Ev::Deadline(trip) => self.apply(trip, TripCommand::DeadlineReached),
            Ev::Arrived(trip) => {
                let (d, driver_id) = self.driver_of(trip);
                self.drivers[d].pos = self.trips_in[trip].pickup;
                self.index(d);
                self.rec.arrived(trip, self.now);
                self.apply(trip, TripCommand::Arrived { driver_id });
                // The rider boards in 20–60 s.
                let board = self.rng.random_range(20_000..60_000);
                self.at(self.now + board, Ev::Start(trip));
            }
            Ev::Start(trip) => {
                let (_, driver_id) = self.driver_of(trip);
                self.apply(trip, TripCommand::Start { driver_id });
                let t = &self.trips_in[trip];
                let e = self.cfg.eta.estimate(t.pickup, t.dropoff);
                self.rec.loaded(self.now, e.distance_m);
                self.at(self.now + ms(e.duration_s), Ev::Complete(trip));
            }
            Ev::Complete(trip) => {
                let (d, driver_id) = self.driver_of(trip);
                self.drivers[d].pos = self.trips_in[trip].dropoff;
                self.apply(trip, TripCommand::Complete { driver_id });
            }
        }
    }

    fn check(&self) {
        if !self.cfg.check_invariants {
            return;
        }
        if let Err(e) = self.check_world() {
            panic!("replay invariant broken at {} ms: {e}", self.now);
        }
    }

    /// The world's invariants (see [`SimConfig::check_invariants`]).
    pub fn check_world(&self) -> Result<(), String> {
        let mut holder: HashMap<&DriverId, usize> = HashMap::new();
        for (i, t) in self.trips.iter().enumerate() {
            let Some(t) = t else { continue };
            t.check_invariants()?;
            let offered = t.offer().map(|o| &o.driver_id);
            let assigned = t.driver_id();
            if offered.is_some() && assigned.is_some() {
                return Err(format!("trip {i} has an open offer and a driver"));
            }
            if let Some(d) = offered.or(assigned) {
                if let Some(other) = holder.insert(d, i) {
                    return Err(format!("driver {d} holds trips {other} and {i}"));
                }
                let want = if offered.is_some() {
                    DState::Offered(i)
                } else {
                    DState::Busy(i)
                };
                let have = self.drivers[self.by_id[d]].state;
                if have != want {
                    return Err(format!("driver {d} is {have:?}, trip {i} says {want:?}"));
                }
            }
        }
        for d in &self.drivers {
            if let DState::Offered(i) | DState::Busy(i) = d.state
                && holder.get(&d.id) != Some(&i)
            {
                return Err(format!(
                    "driver {} is {:?} but the trip does not name it",
                    d.id, d.state
                ));
            }
        }
        Ok(())
    }

    fn driver_of(&self, trip: usize) -> (usize, DriverId) {
        let id = self.trips[trip]
            .as_ref()
            .and_then(|t| t.driver_id())
            .expect("a trip on the road has its driver")
            .clone();
        (self.by_id[&id], id)
    }

    fn offered_driver(&self, trip: usize, seq: u64) -> Option<usize> {
        let o = self.trips[trip].as_ref()?.offer()?;
        (o.seq == seq).then(|| self.by_id[&o.driver_id])
    }

    fn request(&mut self, i: usize) {
        let t = &self.trips_in[i];
        let quote = QuoteTerms {
            fare_cents: 0,
            currency: "USD".into(),
            surge: 1.0,
            distance_m: 0,
            duration_s: 0,
        };
        let decision = Trip::start(
            TripId::new(format!("trp_{i:06}")),
            RiderId::new(format!("rdr_{i:06}")),
            Product::Economy,
            t.pickup,
            t.dropoff,
            quote,
            self.now,
            &self.cfg.dispatch,
        );
        self.rec.requested(i, self.now);
        self.trips[i] = Some(decision.trip);
        self.carry_out(i, decision.effects);
    }

    fn apply(&mut self, i: usize, cmd: TripCommand) {
        let Some(trip) = self.trips[i].as_mut() else {
            return;
        };
        // A command the trip refuses (a late timer, an answer to an ended offer) changes
        // nothing, as in the server.
        if let Ok(fx) = trip.apply(cmd, self.now, &self.cfg.dispatch, &self.cfg.eta) {
            self.carry_out(i, fx);
        }
    }

    fn search(&self, i: usize) -> Vec<Candidate> {
        let trip = self.trips[i].as_ref().expect("a live trip");
        let exclude: BTreeSet<DriverId> = trip.excluded().cloned().collect();
        search_map(
            self.grid,
            &self.cells,
            trip.pickup,
            self.cfg.search,
            Available { exclude: &exclude },
        )
        .0
    }

    fn carry_out(&mut self, i: usize, effects: Vec<TripEffect>) {
        for e in effects {
            match e {
                TripEffect::ArmDeadline { at_ms } => self.at(at_ms, Ev::Deadline(i)),
                TripEffect::Search { .. } => match self.cfg.matching {
                    Matching::Greedy => {
                        let found = self.search(i);
                        self.apply(i, TripCommand::Candidates(found));
                    }
                    Matching::Batch => {
                        self.pool.insert(i);
                    }
                },
                TripEffect::SendOffer(offer) => {
                    let d = self.by_id[&offer.driver_id];
                    if self.drivers[d].state != DState::Idle {
                        self.apply(i, TripCommand::OfferRefused { seq: offer.seq });
                        continue;
                    }
                    self.set_state(d, DState::Offered(i));
                    self.rec.offered(i, self.now);
                    self.at(
                        offer.expires_at_ms,
                        Ev::OfferTimeout {
                            trip: i,
                            seq: offer.seq,
                        },
                    );
                    let delay = self.rng.random_range(2_000..8_000);
                    let r: f64 = self.rng.random();
                    if r < self.cfg.accept_prob {
                        self.at(
                            self.now + delay,
                            Ev::Answer {
                                trip: i,
                                seq: offer.seq,
                                accept: true,
                            },
                        );
                    } else if self.rng.random::<f64>() < self.cfg.decline_share {
                        self.at(
                            self.now + delay,
                            Ev::Answer {
                                trip: i,
                                seq: offer.seq,
                                accept: false,
                            },
                        );
                    }
                }
                TripEffect::OfferEnded { driver_id, .. } => {
                    let d = self.by_id[&driver_id];
                    if self.drivers[d].state == DState::Offered(i) {
                        self.free(d);
                    }
                }
                TripEffect::DriverAssigned { driver_id } => {
                    let d = self.by_id[&driver_id];
                    self.set_state(d, DState::Busy(i));
                    let e = self
                        .cfg
                        .eta
                        .estimate(self.drivers[d].pos, self.trips_in[i].pickup);
                    self.rec.assigned(i, self.now, e.duration_s, e.distance_m);
                    self.at(self.now + ms(e.duration_s), Ev::Arrived(i));
                }
                TripEffect::DriverReleased { driver_id } => {
                    let d = self.by_id[&driver_id];
                    if self.drivers[d].state == DState::Busy(i) {
                        self.free(d);
                    }
                }
                TripEffect::Finished => {
                    self.pool.remove(&i);
                    let state = self.trips[i].as_ref().map(|t| t.state());
                    self.rec
                        .finished(i, self.now, state == Some(TripState::Completed));
                    self.trips[i] = None;
                }
                TripEffect::Transitioned { .. } => {}
            }
        }
    }

    /// One batch window: every waiting trip searched, one assignment for them all, offers
    /// sent to the assigned drivers, and the rest matched greedily.
    fn window(&mut self) {
        if self.pool.is_empty() {
            return;
        }
        let waiting: Vec<usize> = self.pool.iter().copied().collect();
        // Each candidate's pickup ETA, estimated once: the engine takes the assigned one
        // as it is (`Ranked`).
        let found: Vec<Vec<(Candidate, u64)>> = waiting
            .iter()
            .map(|&i| {
                let pickup = self.trips_in[i].pickup;
                self.search(i)
                    .into_iter()
                    .map(|c| {
                        let eta = self.cfg.eta.estimate(c.driver.position, pickup);
                        (c, eta.duration_s.round() as u64)
                    })
                    .collect()
            })
            .collect();
        let options: Vec<Vec<(DriverId, u64)>> = found
            .iter()
            .map(|cands| {
                cands
                    .iter()
                    .map(|(c, e)| (c.driver.driver_id.clone(), *e))
                    .collect()
            })
            .collect();
        let started = Instant::now();
        let out = assign(&options, &self.cfg.batch);
        let wall = started.elapsed();
        self.rec.window(self.now, waiting.len(), &out.stats, wall);
        let mut left = Vec::new();
        for ((&i, cands), got) in waiting.iter().zip(found).zip(out.assigned) {
            self.pool.remove(&i);
            match got {
                Some((driver, _)) => {
                    let c: Vec<(Candidate, u64)> = cands
                        .into_iter()
                        .filter(|(c, _)| c.driver.driver_id == driver)
                        .collect();
                    self.apply(i, TripCommand::Ranked(c));
                }
                None => left.push(i),
            }
        }
        // The rest lost their drivers to others in this window (or had none): each searches
        // again now, past the drivers just offered, and takes the nearest, as greedy
        // would, so no first offer waits for a later window. An empty answer ends the
        // trip, as it does in greedy mode.
        for i in left {
            let found = self.search(i);
            self.apply(i, TripCommand::Candidates(found));
        }
    }

    /// Idle drivers drive towards a pickup spot of the day, picked at random when they get
    /// there (they know where the city asks for taxis, not when); everyone on shift is
    /// sampled for utilisation.
    fn cruise(&mut self) {
        let step_m = self.cfg.eta.speed_mps * CRUISE_SPEED_SHARE * (CRUISE_TICK_MS as f64 / 1000.0);
        let mut online = 0u64;
        let mut busy = 0u64;
        for d in 0..self.drivers.len() {
            match self.drivers[d].state {
                DState::Off => continue,
                DState::Busy(_) | DState::Offered(_) => {
                    online += 1;
                    busy += u64::from(matches!(self.drivers[d].state, DState::Busy(_)));
                    continue;
                }
                DState::Idle => online += 1,
            }
            let target = match self.drivers[d].cruise_to {
                Some(p) => p,
                None => {
                    let k = self.rng.random_range(0..self.trips_in.len().max(1));
                    let p = self
                        .trips_in
                        .get(k)
                        .map_or(self.drivers[d].pos, |t| t.pickup);
                    self.drivers[d].cruise_to = Some(p);
                    p
                }
            };
            let from = self.drivers[d].pos;
            let road_m = from.distance_m(target) * self.cfg.eta.detour_factor;
            let (pos, moved) = if road_m <= step_m {
                self.drivers[d].cruise_to = None;
                (target, road_m)
            } else {
                let f = step_m / road_m;
                let p = Point::new(
                    from.lat() + (target.lat() - from.lat()) * f,
                    from.lng() + (target.lng() - from.lng()) * f,
                )
                .unwrap_or(from);
                (p, step_m)
            };
            self.drivers[d].pos = pos;
            self.rec.cruised(self.now, moved);
            self.index(d);
        }
        self.rec.sample(self.now, online, busy);
    }
}

/// A point up to `m` metres from `p` (uniform in a square), clamped to valid coordinates.
fn jitter(rng: &mut StdRng, p: Point, m: f64) -> Point {
    let dlat = rng.random_range(-m..m) / 111_320.0;
    let dlng = rng.random_range(-m..m) / (111_320.0 * p.lat().to_radians().cos().max(0.1));
    Point::new(p.lat() + dlat, p.lng() + dlng).unwrap_or(p)
}
