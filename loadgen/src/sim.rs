//! One process's share of the city: registers and connects its drivers and riders, then
//! runs them with Poisson ride requests for the duration and returns what it measured.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use dispatch_transport::wire::{
    DriverMessage, DriverRegistered, DriverStatus, LatLng, Product, RegisterDriver, RegisterRider,
    RiderRegistered, ServerMessage, Vehicle,
};
use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::acklog::{AckLog, Who};
use crate::cli::Args;
use crate::demand::{Demand, Zone};
use crate::driver::{self, DriverConn};
use crate::geo::Mover;
use crate::net::{self, ConnError, Incoming, Target, Ws};
use crate::replay::TripRow;
use crate::rider::{self, RiderConn};
use crate::stats::{self, CountersSnap, Stats, WorkerResult};

/// Unix microseconds (CLOCK_REALTIME): comparable across the processes of one machine.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds, for location pings' `ts`.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A well-mixed seed for (kind, index): the same person gets the same randomness whatever
/// the number of workers.
pub fn seed_for(seed: u64, kind: u64, index: u64) -> u64 {
    let mut z =
        seed ^ kind.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const KIND_DRIVER: u64 = 1;
const KIND_RIDER: u64 = 2;
const KIND_ARRIVALS: u64 = 3;

/// The demand map the flags describe, and with --demand-trips the slice's trips in order.
pub fn demand(args: &Args) -> Result<(Demand, Option<Vec<TripRow>>)> {
    if let Some(path) = &args.demand_trips {
        let (from_s, to_s) = args.demand_slice_s();
        // The replay's reader: the same trips, spread over their minute the same way.
        let trips = crate::replay::load_trips(path, args.seed, from_s, to_s)?;
        let first_hour_ms = (from_s + 3600) * 1000;
        let zones: Vec<Zone> = trips
            .iter()
            .take_while(|t| t.at_ms < first_hour_ms)
            .map(|t| Zone {
                at: latlng(t.pickup),
                weight: 1.0,
            })
            .collect();
        let source = format!(
            "{} trips of {} from {:02}:{:02} for {:.2} h at ×{} (drivers start near the first hour's pickups)",
            trips.len(),
            path.display(),
            from_s / 3600,
            from_s % 3600 / 60,
            (to_s - from_s) as f64 / 3600.0,
            args.time_scale,
        );
        return Ok((Demand::from_zones(zones, source)?, Some(trips)));
    }
    let d = match &args.demand_csv {
        Some(p) => Demand::from_csv(p)?,
        None => Demand::disc(
            LatLng {
                lat: args.center.0,
                lng: args.center.1,
            },
            args.radius_km * 1000.0,
        ),
    };
    Ok((d, None))
}

fn latlng(p: dispatch_engine::Point) -> LatLng {
    LatLng {
        lat: p.lat(),
        lng: p.lng(),
    }
}

/// A driver's start: drawn from the demand with that driver's own seed.
pub fn driver_start(args: &Args, demand: &Demand, gi: usize) -> (LatLng, SmallRng) {
    let mut rng = SmallRng::seed_from_u64(seed_for(args.seed, KIND_DRIVER, gi as u64));
    let p = demand.sample_point(&mut rng);
    (p, rng)
}

#[derive(Debug, Default)]
struct OfferTrack {
    sent_at: Option<Instant>,
    offered_at: Option<Instant>,
    done: bool,
}

/// What the client tasks of one process share.
pub struct Shared {
    pub cfg: Arc<Args>,
    pub target: Target,
    pub http: reqwest::Client,
    pub stats: Arc<Stats>,
    pub demand: Demand,
    pub stop: watch::Receiver<bool>,
    /// `--ack-log`, open for appending.
    pub ack: Option<AckLog>,
    /// One of several worker processes: request → offer is joined by the parent.
    multi: bool,
    offers: Mutex<HashMap<String, OfferTrack>>,
    idle: Mutex<Vec<usize>>,
    /// With --demand-trips: the next trip (pickup, drop-off) of each rider, by its index.
    planned: Mutex<Vec<Option<(LatLng, LatLng)>>>,
    accepting: AtomicBool,
    active_trips: AtomicI64,
}

impl Shared {
    /// The rider's request was answered with `trip_id`: request → offer is measured now
    /// if a driver of this process already saw the offer, or when it does.
    pub fn track_request(&self, trip_id: &str, sent_at: Instant, sent_unix_us: u64) {
        if self.multi {
            self.stats.request_sent(trip_id, sent_unix_us);
            return;
        }
        let mut g = self.offers.lock().unwrap();
        let e = g.entry(trip_id.to_owned()).or_default();
        e.sent_at = Some(sent_at);
        if let Some(o) = e.offered_at
            && !e.done
        {
            e.done = true;
            self.stats
                .offer_measured(o.saturating_duration_since(sent_at).as_micros() as u64);
        }
    }

    /// A driver of this process got an offer for `trip_id`; only the first offer counts.
    pub fn track_offer(&self, trip_id: &str) {
        if self.multi {
            self.stats.offer_seen(trip_id, unix_us());
            return;
        }
        let now = Instant::now();
        let mut g = self.offers.lock().unwrap();
        let e = g.entry(trip_id.to_owned()).or_default();
        if e.done || e.offered_at.is_some() {
            return;
        }
        e.offered_at = Some(now);
        if let Some(s) = e.sent_at {
            e.done = true;
            self.stats
                .offer_measured(now.saturating_duration_since(s).as_micros() as u64);
        }
    }

    pub fn forget(&self, trip_id: &str) {
        self.offers.lock().unwrap().remove(trip_id);
    }

    /// The rider `li` is busy without having been picked (it learnt of a trip from a
    /// `welcome`): out of the idle pool.
    pub fn take_idle(&self, li: usize) {
        let mut idle = self.idle.lock().unwrap();
        if let Some(i) = idle.iter().position(|&x| x == li) {
            idle.swap_remove(i);
        }
    }

    /// An idle rider for the next request, drawn with `rng`, out of the idle pool.
    fn pick_idle(&self, rng: &mut SmallRng) -> Option<usize> {
        let mut idle = self.idle.lock().unwrap();
        if idle.is_empty() {
            None
        } else {
            let i = rng.random_range(0..idle.len());
            Some(idle.swap_remove(i))
        }
    }

    /// The trip planned for rider `li` (--demand-trips), if any.
    pub fn take_planned(&self, li: usize) -> Option<(LatLng, LatLng)> {
        self.planned.lock().unwrap().get_mut(li)?.take()
    }

    /// The rider `li` may be picked for a request again.
    pub fn return_idle(&self, li: usize) {
        if self.accepting.load(Ordering::Relaxed) {
            self.idle.lock().unwrap().push(li);
        }
    }

    pub fn trip_started(&self) {
        self.active_trips.fetch_add(1, Ordering::Relaxed);
    }

    pub fn trip_done(&self) {
        self.active_trips.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn open_files_limit(&self) {
        let n = self.stats.connected.load(Ordering::Relaxed);
        // (Counting /proc/self/fd would need a file descriptor too.)
        let files = net::nofile_limit().map_or("?".into(), |l| l.to_string());
        self.stats.limit(
            "open file limit",
            n,
            format!(
                "open file limit reached at {n} connections (this process may open {files} files); use --workers"
            ),
        );
    }

    pub fn source_ports_limit(&self) {
        let n = self.stats.connected.load(Ordering::Relaxed);
        self.stats.limit(
            "out of source ports",
            n,
            format!("out of source ports at {n} connections; use --source-ips"),
        );
    }

    /// A client could not be set up.
    fn conn_failed(&self, what: &str, who: String, e: ConnError) {
        Stats::inc(&self.stats.c.connect_failures);
        match e {
            ConnError::OpenFiles => self.open_files_limit(),
            ConnError::SourcePorts => self.source_ports_limit(),
            ConnError::Refused(code, detail) => {
                self.stats
                    .error(&code, what, false, format!("{who}: {detail}"))
            }
            ConnError::Other(d) => {
                self.stats
                    .error("transport", what, false, format!("{who}: {d}"))
            }
        }
    }

    pub fn source_ip(&self, n: usize) -> Option<IpAddr> {
        self.cfg.source_ips.as_ref().map(|l| l.0[n % l.0.len()])
    }
}

/// Progress of one process, as the progress bar (or a worker's parent) sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    /// `registering`, `connecting`, `ready`, `running`, `draining`, `done`.
    pub phase: String,
    pub counters: CountersSnap,
    pub connected: i64,
    /// Clients this process simulates.
    pub clients: usize,
    /// Seconds since the run (after set-up) began.
    pub run_s: f64,
}

pub type TickFn = Arc<dyn Fn(&Tick) + Send + Sync>;

const WAIT: Duration = Duration::from_secs(30);

/// Reads frames until one decodes; `None` on close or timeout.
async fn next_msg(ws: &mut Ws, stats: &Stats) -> Result<ServerMessage, String> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| format!("no message within {WAIT:?}"))?;
        match net::decode(m) {
            Incoming::Msg(m) => {
                Stats::inc(&stats.c.messages_received);
                return Ok(*m);
            }
            Incoming::Undecodable(t) => return Err(format!("undecodable: {t}")),
            Incoming::Skip => continue,
            Incoming::Closed(code, reason) => return Err(format!("closed ({code:?}): {reason}")),
        }
    }
}

/// Registers a `role` client (`POST /v1/{role}s` with `body`) and opens its session from
/// `--source-ips` slot `slot`, counting both as the set-up does. Returns the registration,
/// the session and when connecting began; `None` (the failure recorded) if either failed.
async fn register_and_connect<R: DeserializeOwned>(
    sh: &Shared,
    role: &str,
    who: &str,
    body: &impl Serialize,
    token: impl FnOnce(&R) -> String,
    slot: usize,
) -> Option<(R, Ws, Instant)> {
    let st = &sh.stats;
    Stats::inc(&st.c.messages_sent);
    let url = format!("{}/v1/{role}s", sh.target.http_base());
    let reg: R = match net::post_json(&sh.http, &url, None, body).await {
        Ok(r) => r,
        Err(e) => {
            sh.conn_failed(&format!("POST /v1/{role}s"), who.to_owned(), e);
            return None;
        }
    };
    Stats::inc(&st.c.registered);
    let t = Instant::now();
    let path = format!("/v1/ws/{role}");
    match net::connect_ws(&sh.target, &path, &token(&reg), sh.source_ip(slot)).await {
        Ok(ws) => {
            st.connected(1);
            Some((reg, ws, t))
        }
        Err(e) => {
            sh.conn_failed(&format!("{role} connect"), who.to_owned(), e);
            None
        }
    }
}

async fn setup_driver(sh: Arc<Shared>, gi: usize) -> Option<DriverConn> {
    let st = &sh.stats;
    let who = format!("driver #{gi}");
    let body = RegisterDriver {
        name: format!("Driver {gi}"),
        vehicle: Vehicle {
            make: "Toyota".into(),
            model: "Prius".into(),
            plate: format!("LG {gi}"),
            color: "blue".into(),
            product: Product::Economy,
            seats: 4,
        },
    };
    let token = |r: &DriverRegistered| r.token.clone();
    let (reg, mut ws, t) = register_and_connect(&sh, "driver", &who, &body, token, gi).await?;
    let fail = |what: &str, detail: String| {
        Stats::inc(&st.c.connect_failures);
        st.error(
            what,
            "driver session start",
            false,
            format!("{who}: {detail}"),
        );
        st.connected(-1);
        None
    };
    let ident = Who {
        role: "driver",
        id: reg.driver_id.clone(),
        client: gi,
    };
    match next_msg(&mut ws, st).await {
        Ok(ServerMessage::Welcome {
            status: Some(DriverStatus::Offline),
            trip: None,
            ..
        }) => {
            if let Some(a) = &sh.ack {
                a.welcome(st, &ident, false, Some(DriverStatus::Offline), None, None);
            }
        }
        Ok(m) => return fail("unexpected_welcome", format!("{m:?}")),
        Err(e) => return fail("no_welcome", e),
    }
    st.latency(stats::CONNECT, t.elapsed().as_micros() as u64);
    let (pos, rng) = driver_start(&sh.cfg, &sh.demand, gi);
    let loc = DriverMessage::Location {
        lat: pos.lat,
        lng: pos.lng,
        heading: None,
        speed_mps: Some(0.0),
        ts: unix_ms(),
    };
    for (req, msg) in [(1u64, loc), (2, DriverMessage::GoOnline)] {
        Stats::inc(&st.c.messages_sent);
        if let Err(e) = net::send(&mut ws, &msg, Some(req)).await {
            return fail("send_failed", e.to_string());
        }
    }
    let mut acked = 0;
    while acked < 2 {
        match next_msg(&mut ws, st).await {
            Ok(ServerMessage::Ack { .. }) => acked += 1,
            Ok(ServerMessage::Error { req, code, message }) => {
                let kind = if req == Some(1) {
                    "location"
                } else {
                    "go_online"
                };
                st.error(&code, kind, false, format!("{who}: {message}"));
                Stats::inc(&st.c.connect_failures);
                st.connected(-1);
                return None;
            }
            Ok(m) => st.anomaly(
                "unexpected message while going online",
                format!("{who}: {m:?}"),
            ),
            Err(e) => return fail("go_online_failed", e),
        }
    }
    Stats::inc(&st.c.sessions_opened);
    Some(DriverConn {
        gi,
        who: ident,
        token: reg.token,
        ws,
        rng,
        mover: Mover::new(pos, sh.cfg.speed_mps),
        next_req: 3,
    })
}

async fn setup_rider(sh: Arc<Shared>, gi: usize, li: usize) -> Option<RiderConn> {
    let st = &sh.stats;
    let who = format!("rider #{gi}");
    let body = RegisterRider {
        name: format!("Rider {gi}"),
        phone: format!("+1 555 {:04}", gi % 10_000),
    };
    let token = |r: &RiderRegistered| r.token.clone();
    let slot = sh.cfg.drivers + gi;
    let (reg, mut ws, t) = register_and_connect(&sh, "rider", &who, &body, token, slot).await?;
    let ident = Who {
        role: "rider",
        id: reg.rider_id.clone(),
        client: gi,
    };
    match next_msg(&mut ws, st).await {
        Ok(ServerMessage::Welcome { trip: None, .. }) => {
            if let Some(a) = &sh.ack {
                a.welcome(st, &ident, false, None, None, None);
            }
        }
        other => {
            Stats::inc(&st.c.connect_failures);
            st.error(
                "no_welcome",
                "rider session start",
                false,
                format!("{who}: {other:?}"),
            );
            st.connected(-1);
            return None;
        }
    }
    st.latency(stats::CONNECT, t.elapsed().as_micros() as u64);
    Stats::inc(&st.c.sessions_opened);
    let rng = SmallRng::seed_from_u64(seed_for(sh.cfg.seed, KIND_RIDER, gi as u64));
    Some(RiderConn {
        gi,
        li,
        who: ident,
        ws,
        rng,
        token: reg.token,
        next_req: 1,
    })
}

/// Poisson arrivals at `rate` per second until `until`, each handed to an idle rider.
async fn arrivals(
    sh: Arc<Shared>,
    notifies: Arc<Vec<Arc<Notify>>>,
    rate: f64,
    until: Instant,
    mut rng: SmallRng,
) {
    if rate <= 0.0 || notifies.is_empty() {
        return;
    }
    let mut stop = sh.stop.clone();
    let mut t = Instant::now();
    loop {
        let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
        t += Duration::from_secs_f64(gap.min(3600.0));
        if t >= until {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(t) => {}
            _ = stop.changed() => return,
        }
        match sh.pick_idle(&mut rng) {
            Some(li) => notifies[li].notify_one(),
            None => Stats::inc(&sh.stats.c.requests_skipped_busy),
        }
    }
}

/// --demand-trips: each trip at its pickup time ÷ --time-scale after `start` (the slice
/// opening at `from_ms` of the day), handed with its own points to an idle rider; a trip
/// that finds every rider busy is counted as skipped.
async fn trip_arrivals(
    sh: Arc<Shared>,
    notifies: Arc<Vec<Arc<Notify>>>,
    trips: Vec<TripRow>,
    from_ms: u64,
    start: Instant,
    mut rng: SmallRng,
) {
    let mut stop = sh.stop.clone();
    let k = sh.cfg.time_scale;
    for t in trips {
        let after_s = t.at_ms.saturating_sub(from_ms) as f64 / 1000.0 / k;
        tokio::select! {
            _ = tokio::time::sleep_until(start + Duration::from_secs_f64(after_s)) => {}
            _ = stop.changed() => return,
        }
        match sh.pick_idle(&mut rng) {
            Some(li) => {
                sh.planned.lock().unwrap()[li] = Some((latlng(t.pickup), latlng(t.dropoff)));
                notifies[li].notify_one();
            }
            None => Stats::inc(&sh.stats.c.requests_skipped_busy),
        }
    }
}

/// Runs this process's slice (`index` of `count`) of the city: set-up, then `go`, then
/// the run. `tick` is called about four times a second.
pub async fn run_local(
    args: Arc<Args>,
    target: Target,
    index: usize,
    count: usize,
    tick: TickFn,
    go: impl Future<Output = ()>,
) -> Result<WorkerResult> {
    let nofile = net::raise_nofile_limit();
    let (demand, trips) = demand(&args)?;
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connect_concurrency.min(256))
        .build()?;
    let ack = args.ack_log.as_deref().map(AckLog::open).transpose()?;
    let sh = Arc::new(Shared {
        cfg: args.clone(),
        target,
        http,
        stats: stats.clone(),
        demand,
        stop: stop_rx,
        ack,
        multi: count > 1,
        offers: Mutex::default(),
        idle: Mutex::default(),
        planned: Mutex::new(vec![None; args.riders.div_ceil(count)]),
        accepting: AtomicBool::new(true),
        active_trips: AtomicI64::new(0),
    });
    let drivers: Vec<usize> = (0..args.drivers).filter(|i| i % count == index).collect();
    let riders: Vec<usize> = (0..args.riders).filter(|i| i % count == index).collect();
    let clients = drivers.len() + riders.len();
    if let Some(n) = nofile
        && (clients as u64 + 64) > n
        && count == 1
    {
        eprintln!(
            "loadgen: {clients} connections in one process with an open-file limit of {n}: expect \"open file limit reached\"; use --workers"
        );
    }

    let phase = Arc::new(Mutex::new("registering".to_owned()));
    let run_start: Arc<Mutex<Option<Instant>>> = Arc::default();
    let ticker = {
        let (stats, phase, run_start, tick) = (
            stats.clone(),
            phase.clone(),
            run_start.clone(),
            tick.clone(),
        );
        tokio::spawn(async move {
            loop {
                let t = Tick {
                    phase: phase.lock().unwrap().clone(),
                    counters: stats.c.snapshot(),
                    connected: stats.connected.load(Ordering::Relaxed),
                    clients,
                    run_s: run_start
                        .lock()
                        .unwrap()
                        .map_or(0.0, |s| s.elapsed().as_secs_f64()),
                };
                tick(&t);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let set_phase = |p: &str| *phase.lock().unwrap() = p.to_owned();

    // Set-up: registrations and sessions, a bounded number at a time.
    let setup_start = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut dj: JoinSet<Option<DriverConn>> = JoinSet::new();
    for &gi in &drivers {
        let (sh, sem) = (sh.clone(), sem.clone());
        dj.spawn(async move {
            let _p = sem.acquire_owned().await.ok()?;
            setup_driver(sh, gi).await
        });
    }
    let mut rj: JoinSet<Option<RiderConn>> = JoinSet::new();
    for (li, &gi) in riders.iter().enumerate() {
        let (sh, sem) = (sh.clone(), sem.clone());
        rj.spawn(async move {
            let _p = sem.acquire_owned().await.ok()?;
            setup_rider(sh, gi, li).await
        });
    }
    set_phase("connecting");
    let mut dconns = Vec::with_capacity(drivers.len());
    while let Some(r) = dj.join_next().await {
        if let Ok(Some(c)) = r {
            dconns.push(c);
        }
    }
    let mut rconns = Vec::with_capacity(riders.len());
    while let Some(r) = rj.join_next().await {
        if let Ok(Some(c)) = r {
            rconns.push(c);
        }
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    set_phase("ready");
    go.await;

    // The run.
    let start = Instant::now();
    *stats.t0.lock().unwrap() = start.into_std();
    *run_start.lock().unwrap() = Some(start);
    set_phase("running");
    let cpu0 = stats::process_cpu_s(None).unwrap_or(0.0);
    let notifies: Arc<Vec<Arc<Notify>>> =
        Arc::new((0..riders.len()).map(|_| Arc::new(Notify::new())).collect());
    let mut tasks = JoinSet::new();
    for c in dconns {
        tasks.spawn(driver::run(sh.clone(), c));
    }
    for c in rconns {
        let n = notifies[c.li].clone();
        tasks.spawn(rider::run(sh.clone(), c, n));
    }
    let until = start + args.duration;
    let rng = SmallRng::seed_from_u64(seed_for(args.seed, KIND_ARRIVALS, index as u64));
    match trips {
        Some(trips) => {
            let from_ms = args.demand_slice_s().0 * 1000;
            trip_arrivals(sh.clone(), notifies.clone(), trips, from_ms, start, rng).await;
        }
        None => {
            let rate = args.request_rate / count as f64;
            arrivals(sh.clone(), notifies.clone(), rate, until, rng).await;
        }
    }
    tokio::time::sleep_until(until).await;
    sh.accepting.store(false, Ordering::Relaxed);
    if !args.drain.is_zero() {
        set_phase("draining");
        let drain_end = until + args.drain;
        while Instant::now() < drain_end && sh.active_trips.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let run_s = start.elapsed().as_secs_f64();
    set_phase("done");
    let _ = stop_tx.send(true);
    let wind_down = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if wind_down.is_err() {
        tasks.abort_all();
    }
    let cpu = stats::process_cpu_s(None).unwrap_or(0.0) - cpu0;
    if let Some(a) = &sh.ack {
        a.flush();
    }
    ticker.abort();
    // One last tick, so the final numbers are shown.
    tick(&Tick {
        phase: "done".into(),
        counters: stats.c.snapshot(),
        connected: stats.connected.load(Ordering::Relaxed),
        clients,
        run_s,
    });
    Ok(stats.result(cpu, run_s, setup_s))
}
