//! kill -9 under load: seeded rounds of concurrent rides, a SIGKILL at a seeded moment,
//! a restart, and every acknowledged transition checked. `crash_round` is the steps in
//! order; each step is a method of [`Round`], which carries what the round learnt.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_tests::diagram::{has_driver, reachable};
use dispatch_tests::{
    Dispatchd, DispatchdBuilder, Endpoint, SHORT_TRIP_FLAGS, WAIT, assert_books_settled,
    assert_clean_log, assert_payments_settled, point,
};
use dispatch_transport::wire::{DriverStatus, Offer, ServerMessage, Trip, TripState};
use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::{
    Mode, Session, driver_on_offer, driver_on_trip, driver_react, ride_request, rider_react,
    run_app,
};
use crate::ledger::{Ledger, Seen};
use crate::{CENTER, location};

const DRIVERS: usize = 12;
const RIDERS: usize = 12;
/// The offer timeout of [`SHORT_TRIP_FLAGS`].
const CRASH_OFFER_TIMEOUT_MS: u64 = 3_000;

/// `CRASH_SEED=<n>` (decimal or 0x-hex): that one round. Otherwise `CRASH_ROUNDS` (5)
/// rounds with fresh seeds, each printed.
pub(crate) fn round_seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("CRASH_SEED") {
        let s = s.trim();
        let seed = match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => s.parse(),
        }
        .unwrap_or_else(|e| panic!("CRASH_SEED={s}: {e}"));
        return vec![seed];
    }
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (0..rounds as u64)
        .map(|i| {
            // splitmix64, so neighbouring rounds do not share low bits.
            let mut z = base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_transition() {
    let seeds = round_seeds();
    eprintln!("crash rounds, seeds {seeds:?} (replay one with CRASH_SEED=<seed>)");
    for (round, seed) in seeds.into_iter().enumerate() {
        crash_round(round, seed).await;
    }
}

/// One round, step by step.
async fn crash_round(round: usize, seed: u64) {
    let started = std::time::Instant::now();
    let server = Dispatchd::builder(&format!("crash-round-{round}")).flags(SHORT_TRIP_FLAGS);
    let tag = format!("[crash round {round}, CRASH_SEED={seed}]");
    let mut r = Round::register(server, tag, seed).await;
    let (apps, registrar) = r.load().await;
    let kill_after = r.rng.random_range(40..=400usize);
    let at_kill = r.kill_under_load(apps, registrar, kill_after).await;
    r.restart_and_check(at_kill, started).await;
}

impl Round {
    /// After the kill: a restart on the same store, everyone back, every acknowledged
    /// transition there, every trip finished, the books balanced; a clean SIGTERM.
    pub(crate) async fn restart_and_check(self, at_kill: AtKill, started: std::time::Instant) {
        self.restart().await.check_after(at_kill, started).await
    }

    /// The checks of [`Round::restart_and_check`] on the server now in `self.server`
    /// (restarted, or another node that took over); it ends with a clean SIGTERM.
    pub(crate) async fn check_after(mut self, at_kill: AtKill, started: std::time::Instant) {
        let r = &mut self;
        let (riders, drivers) = r.reconnect_everyone().await;
        r.find_every_trip().await;
        r.check_nothing_acknowledged_was_lost().await;
        r.check_welcomes();
        let quote_trips = r.check_late_registrations_and_quotes().await;
        let apps = r.finish_every_trip(riders, drivers).await;
        let resumed = r.check_every_trip_ended().await;
        check_money(&r.server, r.owner.keys(), &r.tag).await;
        let Round {
            tag,
            server,
            ledger,
            owner,
            registered,
            ..
        } = self;
        let last_log = server.stop().await;
        for a in apps {
            tokio::time::timeout(WAIT, a)
                .await
                .unwrap_or_else(|_| panic!("{tag} an app was not disconnected by SIGTERM"))
                .unwrap_or_else(|e| panic!("{tag} an app failed: {e}"));
        }
        assert_clean_log(&tag, &last_log);
        let l = ledger.lock().unwrap();
        assert!(l.anomalies.is_empty(), "{tag} {:#?}", l.anomalies);
        eprintln!(
            "{tag} killed after {} trip_updates with {} trips in flight (by state: {:?}); \
             {} trips, {resumed} resumed and finished, {} late registrations, {} quotes; {:.1} s",
            at_kill.updates,
            at_kill.in_flight,
            at_kill.by_state,
            owner.len(),
            registered.lock().unwrap().riders.len(),
            quote_trips,
            started.elapsed().as_secs_f64()
        );
    }
}

/// Riders registered (each with a quote) while the load runs: their 201s are
/// acknowledgements too.
#[derive(Debug, Default)]
struct Registered {
    riders: Vec<(String, String)>,
    quotes: Vec<(String, String, i64)>, // (rider token, quote id, fare)
}

/// What the ledger showed when the server was killed.
pub(crate) struct AtKill {
    by_state: BTreeMap<String, usize>,
    in_flight: usize,
    updates: usize,
    /// The moment of the SIGKILL.
    pub(crate) at: Instant,
}

fn at_kill(l: &Ledger, at: Instant) -> AtKill {
    AtKill {
        by_state: l.by_state(),
        in_flight: l.in_flight(),
        updates: l.updates,
        at,
    }
}

/// A driver's welcome after the restart.
struct DriverWelcome {
    status: Option<DriverStatus>,
    offer: Option<Offer>,
    trip: Option<Trip>,
}

pub(crate) type Apps = Vec<JoinHandle<()>>;

/// A round: its server, its people and what they were told.
pub(crate) struct Round {
    pub(crate) tag: String,
    rng: StdRng,
    pub(crate) server: Dispatchd,
    /// Where the apps of [`Round::load`] connect, each to the next in turn (in a sharded
    /// cluster, any node: relayed to its account's owner); empty: `server`.
    pub(crate) via: Vec<Endpoint>,
    pub(crate) drivers: Vec<(String, String)>,
    pub(crate) riders: Vec<(String, String)>,
    /// Rider id → token.
    tokens: HashMap<String, String>,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    registered: Arc<Mutex<Registered>>,
    /// Every trip any client heard of → a token that may read it.
    owner: BTreeMap<String, String>,
    /// Every trip as GET showed it right after the restart.
    after: BTreeMap<String, Trip>,
    /// Rider id → the trip of its welcome after the restart.
    rider_welcome: HashMap<String, Option<Trip>>,
    driver_welcome: HashMap<String, DriverWelcome>,
}

impl Round {
    /// Starts the server and registers everyone (each durable before its 201); `tag`
    /// names the round in every failure.
    pub(crate) async fn register(server: DispatchdBuilder, tag: String, seed: u64) -> Round {
        Round::on(server.start().await, tag, seed).await
    }

    /// As [`Round::register`], on a server that is already ready.
    pub(crate) async fn on(server: Dispatchd, tag: String, seed: u64) -> Round {
        let names: Vec<String> = (0..DRIVERS.max(RIDERS))
            .map(|i| format!("Person {i}"))
            .collect();
        let drivers = join_all(names[..DRIVERS].iter().map(|n| server.driver(n, "economy"))).await;
        let riders = join_all(names[..RIDERS].iter().map(|n| server.rider(n))).await;
        Round {
            tag,
            rng: StdRng::seed_from_u64(seed),
            server,
            via: Vec::new(),
            tokens: riders.iter().cloned().collect(),
            drivers,
            riders,
            ledger: Arc::new(Mutex::new(Ledger::default())),
            registered: Arc::new(Mutex::new(Registered::default())),
            owner: BTreeMap::new(),
            after: BTreeMap::new(),
            rider_welcome: HashMap::new(),
            driver_welcome: HashMap::new(),
        }
    }

    fn or_fail<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| panic!("{} {e}", self.tag))
    }

    /// Drivers online a few hundred metres apart around the centre, riders requesting
    /// rides, seeded apps for both, and late registrations in the background.
    pub(crate) async fn load(&mut self) -> (Apps, JoinHandle<()>) {
        let mut apps = Vec::new();
        let mut driver_sessions = Vec::new();
        let mut nodes = self.via.iter().cycle();
        let mut next = || nodes.next().unwrap_or(&self.server);
        for (id, token) in &self.drivers {
            let home = (
                CENTER.0 + self.rng.random_range(-0.003..0.003),
                CENTER.1 + self.rng.random_range(-0.003..0.003),
            );
            let (mut s, _) =
                self.or_fail(Session::open(next(), "driver", id, token, &self.ledger).await);
            self.or_fail(s.ok(location(home), "location").await);
            self.or_fail(s.ok(json!({"type": "go_online"}), "go_online").await);
            driver_sessions.push(s);
        }
        for s in driver_sessions {
            let mode = Mode::Chaos(Box::new(StdRng::seed_from_u64(self.rng.random())));
            apps.push(tokio::spawn(run_app(s, mode, vec![], driver_react)));
        }
        for (id, token) in &self.riders {
            let (s, _) =
                self.or_fail(Session::open(next(), "rider", id, token, &self.ledger).await);
            let mut mode = Mode::Chaos(Box::new(StdRng::seed_from_u64(self.rng.random())));
            let think = mode.think(50);
            let first = ride_request(&mut mode, think);
            apps.push(tokio::spawn(run_app(s, mode, vec![first], rider_react)));
        }
        let registrar = tokio::spawn(register_while_loaded(
            (*self.server).clone(),
            self.registered.clone(),
        ));
        (apps, registrar)
    }

    /// Waits until clients have been told of `updates` trip_updates in all, with trips
    /// in flight (the load must get there within a minute).
    pub(crate) async fn wait_for_load(&mut self, updates: usize) {
        let tag = &self.tag;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let l = self.ledger.lock().unwrap();
                if l.updates >= updates && l.in_flight() > 0 {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{tag} the load stalled: {} trip_updates (waiting for {updates}), {:?}, anomalies {:?}\n--- log ---\n{}",
                    l.updates,
                    l.by_state(),
                    l.anomalies,
                    self.server.log_text()
                );
            }
            assert!(
                self.server.running(),
                "{tag} dispatchd died under load\n--- log ---\n{}",
                self.server.log_text()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The crash: after `kill_after` trip_updates, with rides in flight. Every app
    /// notices, and nothing the clients were told before it broke the diagram.
    pub(crate) async fn kill_under_load(
        &mut self,
        apps: Apps,
        registrar: JoinHandle<()>,
        kill_after: usize,
    ) -> AtKill {
        self.wait_for_load(kill_after).await;
        let tag = &self.tag;
        let at = Instant::now();
        self.server.kill9();
        assert_clean_log(tag, &self.server.log_text());
        self.apps_ended(apps, registrar, at).await
    }

    /// Waits for every app and the registrar to end (their server went away), and
    /// checks that nothing they were told broke the diagram.
    pub(crate) async fn apps_ended(
        &self,
        apps: Apps,
        registrar: JoinHandle<()>,
        at: Instant,
    ) -> AtKill {
        let tag = &self.tag;
        for a in apps {
            tokio::time::timeout(WAIT, a)
                .await
                .unwrap_or_else(|_| panic!("{tag} an app did not notice its server went away"))
                .unwrap_or_else(|e| panic!("{tag} an app failed: {e}"));
        }
        tokio::time::timeout(WAIT, registrar)
            .await
            .unwrap_or_else(|_| panic!("{tag} the registrar did not notice its server went away"))
            .unwrap_or_else(|e| panic!("{tag} the registrar failed: {e}"));
        let l = self.ledger.lock().unwrap();
        assert!(
            l.anomalies.is_empty(),
            "{tag} before the server went away: {:#?}",
            l.anomalies
        );
        at_kill(&l, at)
    }

    /// Starts again on the same data directory.
    async fn restart(mut self) -> Round {
        self.server = self.server.restart().await;
        self
    }

    /// Everyone reconnects with the old tokens, riders first, then drivers; their
    /// welcomes are kept for [`Round::check_welcomes`].
    async fn reconnect_everyone(&mut self) -> (Vec<Session>, Vec<Session>) {
        let mut rider_sessions = Vec::new();
        for (id, token) in &self.riders {
            let (s, w) = Session::open(&self.server, "rider", id, token, &self.ledger)
                .await
                .unwrap_or_else(|e| panic!("{} after the restart: {e}", self.tag));
            let ServerMessage::Welcome { trip, .. } = w else {
                unreachable!()
            };
            self.rider_welcome.insert(id.clone(), trip);
            rider_sessions.push(s);
        }
        let mut driver_sessions = Vec::new();
        for (id, token) in &self.drivers {
            let (s, w) = Session::open(&self.server, "driver", id, token, &self.ledger)
                .await
                .unwrap_or_else(|e| panic!("{} after the restart: {e}", self.tag));
            let ServerMessage::Welcome {
                status,
                offer,
                trip,
                ..
            } = w
            else {
                unreachable!()
            };
            self.driver_welcome.insert(
                id.clone(),
                DriverWelcome {
                    status,
                    offer: offer.flatten(),
                    trip,
                },
            );
            driver_sessions.push(s);
        }
        (rider_sessions, driver_sessions)
    }

    /// Every trip any client heard of, with a token that may read it; a trip only a
    /// driver's welcome names (committed, but its request's reply was lost with the
    /// process) is found by asking every rider.
    async fn find_every_trip(&mut self) {
        let tag = &self.tag;
        {
            let l = self.ledger.lock().unwrap();
            for (id, seen) in &l.trips {
                let token = self.tokens.get(&seen.rider_id).unwrap_or_else(|| {
                    panic!("{tag} trip {id} of unknown rider {}", seen.rider_id)
                });
                self.owner.insert(id.clone(), token.clone());
            }
        }
        let unknown: Vec<String> = self
            .driver_welcome
            .values()
            .flat_map(|w| {
                w.trip
                    .iter()
                    .map(|t| t.trip_id.clone())
                    .chain(w.offer.iter().map(|o| o.trip_id.clone()))
            })
            .filter(|t| !self.owner.contains_key(t))
            .collect();
        for t in unknown {
            let mut found = None;
            for (_, token) in &self.riders {
                let (st, _) = self
                    .server
                    .get(&format!("/v1/trips/{t}"), Some(token))
                    .await;
                if st == 200 {
                    found = Some(token.clone());
                    break;
                }
            }
            let token = found.unwrap_or_else(|| {
                panic!("{tag} a driver's welcome names trip {t}, which no rider can read")
            });
            self.owner.insert(t, token);
        }
    }

    /// Every acknowledged transition is there, and nothing is in two states.
    async fn check_nothing_acknowledged_was_lost(&mut self) {
        let tag = &self.tag;
        for (id, token) in &self.owner {
            let got = self.server.trip(id, token).await;
            let mut l = self.ledger.lock().unwrap();
            if let Some(seen) = l.trips.get(id) {
                let (v, st) = seen.latest();
                let who = &seen.at[&v].2;
                assert!(
                    got.version >= v,
                    "{tag} trip {id}: {who} saw v{v} {st:?}, after the restart it is v{} {:?}: an acknowledged transition was lost",
                    got.version,
                    got.state
                );
                if got.version == v {
                    assert_eq!(
                        got.state, st,
                        "{tag} trip {id} v{v}: {who} saw {st:?}, after the restart {:?}",
                        got.state
                    );
                }
                if st.is_final() {
                    assert_eq!(
                        (got.version, got.state),
                        (v, st),
                        "{tag} trip {id} was final for {who} and changed after the restart"
                    );
                }
                assert!(
                    reachable(st, got.state),
                    "{tag} trip {id}: {who} saw {st:?} v{v}; after the restart {:?} v{}, unreachable from it",
                    got.state,
                    got.version
                );
            }
            l.observe("GET after the restart", &got, false);
            self.after.insert(id.clone(), got);
        }
        let l = self.ledger.lock().unwrap();
        for a in &l.acks {
            let got = &self.after[&a.trip_id];
            assert!(
                got.version >= a.version,
                "{tag} {} had {} of trip {} acknowledged at v{}; after the restart it is v{} {:?}",
                a.who,
                a.cmd,
                a.trip_id,
                a.version,
                got.version,
                got.state
            );
        }
        assert!(
            l.anomalies.is_empty(),
            "{tag} after the restart: {:#?}",
            l.anomalies
        );
    }

    /// Welcomes: each rider's live trip; each driver's trip or offer; online stays online.
    fn check_welcomes(&self) {
        let tag = &self.tag;
        let mut live_of_rider: HashMap<&str, Vec<&Trip>> = HashMap::new();
        let mut active_of_driver: HashMap<&str, Vec<&Trip>> = HashMap::new();
        for t in self.after.values().filter(|t| !t.state.is_final()) {
            live_of_rider.entry(&t.rider_id).or_default().push(t);
            if has_driver(t.state) {
                let d = t.driver_id.as_deref().expect("an active trip has a driver");
                active_of_driver.entry(d).or_default().push(t);
            }
        }
        for (rider, trips) in &live_of_rider {
            assert_eq!(
                trips.len(),
                1,
                "{tag} rider {rider} has two live trips: {trips:#?}"
            );
            let w = self.rider_welcome[*rider]
                .as_ref()
                .map(|t| (&t.trip_id, t.version));
            assert_eq!(
                w,
                Some((&trips[0].trip_id, trips[0].version)),
                "{tag} rider {rider}'s welcome after the restart does not show its live trip {:?}",
                trips[0]
            );
        }
        for (rider, w) in &self.rider_welcome {
            if let Some(t) = w {
                let now = &self.after[&t.trip_id];
                assert!(
                    now.version >= t.version && reachable(t.state, now.state),
                    "{tag} rider {rider}'s welcome shows {t:?}, then GET shows {now:?}"
                );
            }
        }
        let online = self.ledger.lock().unwrap().online.clone();
        for (driver, w) in &self.driver_welcome {
            if let Some(trips) = active_of_driver.get(driver.as_str()) {
                assert_eq!(
                    trips.len(),
                    1,
                    "{tag} driver {driver} is on two trips: {trips:#?}"
                );
                let t = trips[0];
                assert_eq!(
                    (
                        w.status,
                        w.trip.as_ref().map(|x| (&x.trip_id, x.version, x.state))
                    ),
                    (
                        Some(DriverStatus::OnTrip),
                        Some((&t.trip_id, t.version, t.state))
                    ),
                    "{tag} driver {driver}'s welcome after the restart does not show its trip {t:?}"
                );
            } else {
                assert!(
                    w.trip.is_none(),
                    "{tag} driver {driver}'s welcome shows a trip it is not on: {:?}",
                    w.trip
                );
            }
            if let Some(o) = &w.offer {
                assert!(
                    (1..=CRASH_OFFER_TIMEOUT_MS).contains(&o.expires_in_ms),
                    "{tag} driver {driver}'s welcome offer expires in {} ms (offer timeout {CRASH_OFFER_TIMEOUT_MS})",
                    o.expires_in_ms
                );
                assert_eq!(
                    w.status,
                    Some(DriverStatus::Offered),
                    "{tag} driver {driver} has an offer in its welcome but is not offered"
                );
                let t = &self.after[&o.trip_id];
                assert!(
                    matches!(t.state, TripState::Dispatching | TripState::NoDriverFound),
                    "{tag} driver {driver}'s welcome offers trip {}, which is {:?}",
                    o.trip_id,
                    t.state
                );
            }
            if online.contains(driver) {
                assert!(
                    matches!(
                        w.status,
                        Some(
                            DriverStatus::Available | DriverStatus::Offered | DriverStatus::OnTrip
                        )
                    ),
                    "{tag} driver {driver} went online (acknowledged) but its welcome after the restart says {:?}",
                    w.status
                );
            }
        }
    }

    /// Registrations and quotes acknowledged under load survive: every token works, and
    /// the last quotes can still buy a ride (then cancelled, out of the way). How many
    /// rides the quotes bought.
    async fn check_late_registrations_and_quotes(&mut self) -> usize {
        let tag = self.tag.clone();
        let registered = std::mem::take(&mut *self.registered.lock().unwrap());
        for (id, token) in &registered.riders {
            let (st, v) = self
                .server
                .get(
                    &format!("/v1/drivers/nearby?lat={}&lng={}", CENTER.0, CENTER.1),
                    Some(token),
                )
                .await;
            assert_eq!(
                st, 200,
                "{tag} rider {id} registered (201) before the crash; its token after the restart: {v}"
            );
        }
        let mut bought = 0;
        for (token, quote_id, fare) in registered.quotes.iter().rev().take(3) {
            let id = registered
                .riders
                .iter()
                .find(|r| &r.1 == token)
                .map(|r| r.0.clone())
                .expect("the quote's rider");
            let (mut s, _) =
                self.or_fail(Session::open(&self.server, "rider", &id, token, &self.ledger).await);
            let m = self.or_fail(
                s.call(
                    json!({"type": "request_ride", "quote_id": quote_id}),
                    "request_ride",
                    None,
                )
                .await,
            );
            let ServerMessage::TripUpdate { trip, .. } = m else {
                panic!(
                    "{tag} quote {quote_id} (201 before the crash) cannot be used after it: {m:?}"
                )
            };
            assert_eq!(
                (trip.state, trip.version, trip.quote.fare_cents),
                (TripState::Dispatching, 1, *fare),
                "{tag} ride bought with quote {quote_id}"
            );
            // Out of the way of the rides being finished (unless it already ended
            // no_driver_found: every driver may be busy).
            let m = self.or_fail(
                s.call(
                    json!({"type": "cancel_ride", "trip_id": trip.trip_id}),
                    "cancel_ride",
                    Some(trip.trip_id.clone()),
                )
                .await,
            );
            assert!(
                matches!(&m, ServerMessage::Ack { .. })
                    || matches!(&m, ServerMessage::Error { code, .. } if code == "conflict"),
                "{tag} cancel_ride of {}: {m:?}",
                trip.trip_id
            );
            self.tokens.insert(id, token.clone());
            self.owner.insert(trip.trip_id, token.clone());
            bought += 1;
            s.ws.close(None).await.ok();
        }
        *self.registered.lock().unwrap() = registered;
        bought
    }

    /// Every live trip resumes and ends: drivers come back online and finish what they
    /// have; riders watch. What no open session was told (a trip whose rider left) is
    /// read back now and then.
    async fn finish_every_trip(&mut self, riders: Vec<Session>, drivers: Vec<Session>) -> Apps {
        let tag = &self.tag;
        let mut apps = Vec::new();
        for mut s in drivers {
            let w = &self.driver_welcome[&s.id];
            let mut plan = Vec::new();
            if let Some(t) = &w.trip {
                driver_on_trip(&mut Mode::Finish, t, &mut plan);
            }
            if let Some(o) = &w.offer {
                driver_on_offer(&mut Mode::Finish, o, &mut plan);
            }
            let home = (CENTER.0 + self.rng.random_range(-0.003..0.003), CENTER.1);
            self.or_fail(s.ok(location(home), "location").await);
            self.or_fail(s.ok(json!({"type": "go_online"}), "go_online").await);
            apps.push(tokio::spawn(run_app(s, Mode::Finish, plan, driver_react)));
        }
        for s in riders {
            apps.push(tokio::spawn(run_app(s, Mode::Finish, vec![], rider_react)));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut polls = 0u64;
        loop {
            let open: Vec<(String, Option<(u64, TripState)>)> = {
                let l = self.ledger.lock().unwrap();
                self.owner
                    .keys()
                    .map(|id| (id.clone(), l.trips.get(id).map(Seen::latest)))
                    .filter(|(_, latest)| !latest.is_some_and(|(_, s)| s.is_final()))
                    .collect()
            };
            if open.is_empty() {
                return apps;
            }
            polls += 1;
            if polls.is_multiple_of(25) {
                for (id, _) in &open {
                    let t = self.server.trip(id, &self.owner[id]).await;
                    self.ledger
                        .lock()
                        .unwrap()
                        .observe("GET while finishing", &t, false);
                }
            }
            if Instant::now() >= deadline {
                let l = self.ledger.lock().unwrap();
                panic!(
                    "{tag} trips still not final 60 s after the restart: {open:?}; anomalies {:?}\n--- log ---\n{}",
                    l.anomalies,
                    self.server.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Each trip ended as it could from where the restart found it. How many were live
    /// at the restart (and so resumed).
    async fn check_every_trip_ended(&self) -> usize {
        let mut resumed = 0;
        for (id, token) in &self.owner {
            let end = self.server.trip(id, token).await;
            self.ledger
                .lock()
                .unwrap()
                .observe("GET at the end", &end, false);
            let want: &[TripState] = match self.after.get(id) {
                // Bought with a quote, then cancelled (or no driver was free).
                None => &[TripState::Cancelled, TripState::NoDriverFound],
                Some(t) if t.state.is_final() => &[t.state],
                Some(t) if has_driver(t.state) => &[TripState::Completed],
                Some(_) => &[TripState::Completed, TripState::NoDriverFound],
            };
            assert!(
                want.contains(&end.state),
                "{} trip {id}: {:?} after the restart ended {:?}, expected one of {want:?}",
                self.tag,
                self.after.get(id).map(|t| (t.state, t.version)),
                end.state
            );
            if self.after.get(id).is_some_and(|t| !t.state.is_final()) {
                resumed += 1;
            }
        }
        resumed
    }
}

/// Registers riders, each with a quote, until the server goes away.
async fn register_while_loaded(server: Endpoint, out: Arc<Mutex<Registered>>) {
    for i in 0.. {
        let Ok((201, v)) = server
            .try_request(
                reqwest::Method::POST,
                "/v1/riders",
                None,
                Some(json!({"name": format!("Late {i}"), "phone": "+1 555 0100"})),
            )
            .await
        else {
            return;
        };
        let (id, token) = (str_of(&v, "rider_id"), str_of(&v, "token"));
        out.lock().unwrap().riders.push((id, token.clone()));
        let body = json!({"pickup": point(CENTER), "dropoff": point((CENTER.0 + 0.01, CENTER.1)), "product": "economy"});
        let Ok((201, q)) = server
            .try_request(
                reqwest::Method::POST,
                "/v1/quotes",
                Some(&token),
                Some(body),
            )
            .await
        else {
            return;
        };
        let fare = q["fare_cents"].as_i64().expect("fare_cents");
        out.lock()
            .unwrap()
            .quotes
            .push((token, str_of(&q, "quote_id"), fare));
        // Pacing, so registrations do not crowd out the rides.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("no string {k} in {v}"))
        .to_owned()
}

/// Once every trip has ended: the books balance with nothing left held or in clearing,
/// every completed trip was authorized and captured exactly once (a SIGKILL between the
/// provider's capture and the commit must not lose it or double it), and no other trip
/// was charged a fare.
async fn check_money<'a>(server: &Dispatchd, trips: impl Iterator<Item = &'a String>, tag: &str) {
    let admin = std::fs::read_to_string(server.data_dir().join("admin.token"))
        .unwrap_or_else(|e| panic!("{tag} the generated admin.token: {e}"));
    let admin = admin.trim();
    let (st, books) = server.get("/admin/ledger", Some(admin)).await;
    assert_eq!(st, 200, "{tag} GET /admin/ledger: {books}");
    assert_books_settled(&books, &format!("{tag} after every trip ended"));
    for id in trips {
        let (st, t) = server.get(&format!("/admin/trips/{id}"), Some(admin)).await;
        assert_eq!(st, 200, "{tag} GET /admin/trips/{id}: {t}");
        let steps: Vec<&str> = t["payments"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["step"].as_str()).collect())
            .unwrap_or_default();
        assert_payments_settled(
            &steps,
            t["trip"]["state"] == "completed",
            &format!("{tag} trip {id} ({})", t["trip"]["state"]),
        );
    }
}
