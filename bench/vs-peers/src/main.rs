//! `vs-peers`: dispatchd against Redis GEO and PostGIS on the same machine, in the same
//! run, with the same drivers at the same positions, the same number of client connections
//! and the same query points (issues 4 and 15). See README.md beside Cargo.toml for what is
//! measured and how.

mod dispatch;
mod geo;
mod http;
mod postgis;
mod resp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use clap::Parser;
use dispatch_transport::wire::NearbyResponse;
use hdrhistogram::Histogram;
use tokio::sync::Barrier;

use crate::dispatch::{Counters, Session};
use crate::geo::{Area, Rng};
use crate::http::Http;
use crate::resp::{Redis, Reply};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "vs-peers",
    about = "dispatchd vs Redis GEO and PostGIS: same data, same concurrency, same machine"
)]
struct Args {
    /// dispatchd's address (REST and WebSocket).
    #[arg(long)]
    dispatch: SocketAddr,
    /// Redis's address.
    #[arg(long)]
    redis: String,
    /// PostGIS's database, as a libpq connection string ("host=… port=… user=… dbname=…");
    /// its table `drivers` is dropped and recreated.
    #[arg(long)]
    postgres: String,
    /// Drivers put into both.
    #[arg(long, default_value_t = 15_000)]
    drivers: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Centre of the area (lat,lng) and its size.
    #[arg(long, default_value_t = 45.53)]
    center_lat: f64,
    #[arg(long, default_value_t = -73.62)]
    center_lng: f64,
    #[arg(long, default_value_t = 19.0)]
    area_ns_km: f64,
    #[arg(long, default_value_t = 20.0)]
    area_ew_km: f64,
    /// Client connections doing position updates, on each side.
    #[arg(long, default_value_t = 256)]
    update_conns: usize,
    #[arg(long, default_value_t = 10.0)]
    update_secs: f64,
    /// Client connections doing nearest-10 queries, on each side.
    #[arg(long, default_value_t = 32)]
    query_conc: usize,
    #[arg(long, default_value_t = 10.0)]
    query_secs: f64,
    /// Warm-up of each side before its first measured window.
    #[arg(long, default_value_t = 5.0)]
    warm_secs: f64,
    /// Distinct query points (the same list, in the same order, for both).
    #[arg(long, default_value_t = 2_000)]
    query_points: usize,
    /// Repetitions of every measured window (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The server's --location-max-per-s: each session's pings are paced under it.
    #[arg(long, default_value_t = 1_000)]
    location_max_per_s: u32,
    /// Fire-and-forget pings: at most this many written and not yet applied, over all
    /// connections (keeps the kernel's socket buffers from hiding a backlog).
    #[arg(long, default_value_t = 10_240)]
    ping_window: u64,
    /// Sessions opened at once while loading.
    #[arg(long, default_value_t = 64)]
    load_concurrency: usize,
    /// Loopback source addresses (127.0.0.1..) the sessions are spread over.
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Query points whose answers are checked against a brute-force nearest 10.
    #[arg(long, default_value_t = 25)]
    sanity_points: usize,
    /// Close each session once its driver is online (it stays available for the server's
    /// --session-grace-ms): for more drivers than one process can hold sessions for.
    /// Only the query comparison runs then.
    #[arg(long)]
    close_sessions: bool,
    #[arg(long)]
    skip_updates: bool,
    #[arg(long, default_value = "drivers")]
    redis_key: String,
    /// The servers' process ids, to report the CPU each used in each window.
    #[arg(long)]
    dispatch_pid: Option<u32>,
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The postmaster's process id: its CPU and its backends' (children) are counted.
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// Load the drivers into all three, check their answers, then write a shell-sourceable
    /// file here (the rider token and the query box, for wrk and pgbench) and hold the
    /// drivers' sessions open, without measuring, until `--hold-until` exists.
    #[arg(long, requires = "hold_until")]
    ready_file: Option<PathBuf>,
    #[arg(long, requires = "ready_file")]
    hold_until: Option<PathBuf>,
    /// Query points of the Kronecker set the `--ready-file` describes (knn.sql, nearby.lua).
    #[arg(long, default_value_t = 2_000)]
    hold_points: usize,
}

const RADIUS_M: f64 = 5_000.0;
const K: usize = 10;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_n(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn list(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

// -------------------------------------------------------------------------------------
// CPU

/// The fields of /proc/<pid>/stat after the command name (stat(5)'s field 3 is index 0).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Clock ticks (USER_HZ, 100 on Linux) in stat fields `i` and `i + 1`.
fn ticks(f: &[String], i: usize) -> Option<f64> {
    Some(f.get(i)?.parse::<f64>().ok()? + f.get(i + 1)?.parse::<f64>().ok()?)
}

/// CPU seconds (user + system) a process has used so far (`None`: this process), from
/// /proc on Linux; `None` where it cannot be read. A server's count includes its child
/// processes, live and exited (Postgres serves each connection in a child process).
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let Some(pid) = pid else {
        // Fields 14 and 15 of stat(5): utime, stime.
        return Some(ticks(&stat_fields("self")?, 11)? / 100.0);
    };
    let me = pid.to_string();
    // utime, stime, and cutime, cstime (children that have exited and been waited for).
    let f = stat_fields(&me)?;
    let mut total = ticks(&f, 11)? + ticks(&f, 13)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(cf) = stat_fields(child)
            && cf.get(1) == Some(&me)
        {
            total += ticks(&cf, 11).unwrap_or(0.0);
        }
    }
    Some(total / 100.0)
}

/// Cores used by the measured server and by this client over a window.
struct CpuMeter {
    server: Option<u32>,
    s0: Option<f64>,
    c0: Option<f64>,
    t0: Instant,
}

#[derive(Clone, Copy, Default)]
struct Cores {
    server: Option<f64>,
    client: Option<f64>,
}

impl CpuMeter {
    fn start(server: Option<u32>) -> CpuMeter {
        CpuMeter {
            server,
            s0: server.and_then(|p| cpu_secs(Some(p))),
            c0: cpu_secs(None),
            t0: Instant::now(),
        }
    }

    fn cores(&self) -> Cores {
        let wall = self.t0.elapsed().as_secs_f64();
        let d = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall);
        Cores {
            server: d(self.s0, self.server.and_then(|p| cpu_secs(Some(p)))),
            client: d(self.c0, cpu_secs(None)),
        }
    }
}

/// Work per second of the server's own CPU (median over the repetitions): less sensitive
/// than throughput to whatever else the shared machine runs.
fn per_core_text(per_s: &[f64], cores: &[Cores]) -> String {
    let xs: Vec<f64> = per_s
        .iter()
        .zip(cores)
        .filter_map(|(t, c)| c.server.filter(|s| *s > 0.0).map(|s| t / s))
        .collect();
    if xs.is_empty() {
        "?".to_owned()
    } else {
        fmt_n(median(&xs))
    }
}

fn cores_text(v: &[Cores]) -> String {
    let med = |f: &dyn Fn(&Cores) -> Option<f64>| {
        let xs: Vec<f64> = v.iter().filter_map(f).collect();
        if xs.is_empty() {
            "?".to_owned()
        } else {
            format!("{:.2}", median(&xs))
        }
    };
    format!("{} / {}", med(&|c| c.server), med(&|c| c.client))
}

// -------------------------------------------------------------------------------------
// Queries

#[derive(Clone)]
enum QuerySide {
    Redis {
        addr: String,
        key: String,
        pid: Option<u32>,
    },
    Dispatch {
        addr: String,
        token: String,
        pid: Option<u32>,
    },
    Postgis {
        conn: String,
        pid: Option<u32>,
    },
}

const REDIS_Q: &str = "Redis GEOSEARCH";
const DISPATCH_Q: &str = "dispatchd nearby";
const POSTGIS_Q: &str = "PostGIS index KNN";

impl QuerySide {
    fn pid(&self) -> Option<u32> {
        match self {
            QuerySide::Redis { pid, .. }
            | QuerySide::Dispatch { pid, .. }
            | QuerySide::Postgis { pid, .. } => *pid,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            QuerySide::Redis { .. } => REDIS_Q,
            QuerySide::Dispatch { .. } => DISPATCH_Q,
            QuerySide::Postgis { .. } => POSTGIS_Q,
        }
    }
}

/// GEOSEARCH `key` for the nearest 10 within 5 km of (`lat`, `lng`), ascending, with their
/// positions if `with_coord`.
async fn geosearch(
    r: &mut Redis,
    key: &str,
    (lat, lng): (f64, f64),
    with_coord: bool,
) -> Result<Reply> {
    let (lng, lat) = (lng.to_string(), lat.to_string());
    let args = [
        "GEOSEARCH",
        key,
        "FROMLONLAT",
        &lng,
        &lat,
        "BYRADIUS",
        "5",
        "km",
        "ASC",
        "COUNT",
        "10",
        "WITHCOORD",
    ];
    let n = if with_coord {
        args.len()
    } else {
        args.len() - 1
    };
    r.cmd(&args[..n]).await
}

enum QueryConn {
    Redis(Redis, String),
    Dispatch(Http, String),
    Postgis(postgis::Conn),
}

impl QueryConn {
    async fn open(side: &QuerySide) -> Result<QueryConn> {
        Ok(match side {
            QuerySide::Redis { addr, key, .. } => {
                QueryConn::Redis(Redis::connect(addr).await?, key.clone())
            }
            QuerySide::Dispatch { addr, token, .. } => {
                QueryConn::Dispatch(Http::connect(addr).await?, token.clone())
            }
            QuerySide::Postgis { conn, .. } => QueryConn::Postgis(postgis::Conn::open(conn).await?),
        })
    }

    /// One nearest-10-within-5-km query; returns how many drivers came back.
    async fn query(&mut self, (lat, lng): (f64, f64)) -> Result<usize> {
        match self {
            QueryConn::Redis(r, key) => match geosearch(r, key, (lat, lng), false).await? {
                Reply::Array(Some(items)) => Ok(items.len()),
                r => bail!("GEOSEARCH answered {r:?}"),
            },
            QueryConn::Dispatch(h, token) => {
                let path = format!("/v1/drivers/nearby?lat={lat}&lng={lng}&radius_m=5000&limit=10");
                let (st, body) = h.get(&path, Some(token)).await?;
                if st != 200 || !body.starts_with(b"{\"drivers\":[") {
                    bail!(
                        "GET /v1/drivers/nearby answered {st}: {}",
                        String::from_utf8_lossy(body)
                    );
                }
                // Counted without a full decode, as the Redis side counts its array.
                Ok(body.windows(6).filter(|w| w == b"\"lat\":").count())
            }
            QueryConn::Postgis(c) => c.nearest((lat, lng)).await,
        }
    }
}

struct QueryRun {
    per_s: f64,
    n: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
    empty: u64,
    cores: Cores,
}

/// One side's query runs, summed up for the report: medians over the runs, and each run's
/// throughput and p99 (ms).
struct QueryStats {
    tp: f64,
    tps: Vec<f64>,
    p50: f64,
    p99: f64,
    p99s: Vec<f64>,
    p999: f64,
    errors: u64,
    cores: Vec<Cores>,
}

impl QueryStats {
    fn of(runs: &[QueryRun]) -> QueryStats {
        let ms = |q: f64| -> Vec<f64> {
            let v = runs
                .iter()
                .map(|r| r.hist.value_at_quantile(q) as f64 / 1000.0);
            v.collect()
        };
        let tps: Vec<f64> = runs.iter().map(|r| r.per_s).collect();
        let p99s = ms(0.99);
        QueryStats {
            tp: median(&tps),
            p50: median(&ms(0.5)),
            p99: median(&p99s),
            p999: median(&ms(0.999)),
            errors: runs.iter().map(|r| r.errors).sum(),
            cores: runs.iter().map(|r| r.cores).collect(),
            tps,
            p99s,
        }
    }

    /// The side's row of the query table.
    fn print_row(&self, name: &str) {
        println!(
            "  {:<20} {:>12} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>15} {:>14}   {}; {}",
            name,
            fmt_n(self.tp),
            self.p50,
            self.p99,
            self.p999,
            self.errors,
            cores_text(&self.cores),
            per_core_text(&self.tps, &self.cores),
            list(&self.tps, fmt_n),
            list(&self.p99s, |x| format!("{x:.2}"))
        );
    }
}

/// A worker's connection, opened before it waits at `barrier` with the others so that
/// connecting is not measured; whether it opened is seen after the wait (every worker
/// must reach the barrier).
async fn open_then_wait<C>(barrier: &Barrier, open: impl Future<Output = Result<C>>) -> Result<C> {
    let conn = open.await;
    barrier.wait().await;
    conn
}

/// `conc` connections, each one query at a time, for `secs`, over the shared list of
/// points (a shared cursor: both sides ask the same points in the same order).
async fn run_queries(
    side: &QuerySide,
    conc: usize,
    secs: f64,
    points: Arc<Vec<(f64, f64)>>,
) -> Result<QueryRun> {
    let cursor = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(conc + 1));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (side, points, cursor, barrier) = (
            side.clone(),
            points.clone(),
            cursor.clone(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = open_then_wait(&barrier, QueryConn::open(&side)).await?;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut n, mut errors, mut empty, mut first_error) = (0u64, 0u64, 0u64, None);
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < deadline {
                let i = cursor.fetch_add(1, Ordering::Relaxed) % points.len();
                let t = Instant::now();
                match conn.query(points[i]).await {
                    Ok(found) => {
                        hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
                        n += 1;
                        if found == 0 {
                            empty += 1;
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        if let QueryConn::Redis(..) | QueryConn::Postgis(..) = conn {
                            conn = QueryConn::open(&side).await?;
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((n, errors, empty, first_error, hist))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let meter = CpuMeter::start(side.pid());
    let mut run = QueryRun {
        per_s: 0.0,
        n: 0,
        errors: 0,
        first_error: None,
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        empty: 0,
        cores: Cores::default(),
    };
    for t in tasks {
        let (n, errors, empty, first_error, hist) = t.await??;
        run.n += n;
        run.errors += errors;
        run.empty += empty;
        if run.first_error.is_none() {
            run.first_error = first_error;
        }
        run.hist.add(&hist)?;
    }
    run.per_s = run.n as f64 / start.elapsed().as_secs_f64();
    run.cores = meter.cores();
    Ok(run)
}

// -------------------------------------------------------------------------------------
// Position updates

#[derive(Clone, Copy, PartialEq, Debug)]
enum UpdateMode {
    /// GEOADD, then wait for its reply.
    RedisGeoadd,
    /// One prepared `UPDATE drivers SET geom = … WHERE id = …`, committed on its own, then
    /// wait for its reply.
    PostgisUpdate,
    /// `location` without `req`, as driver apps send it: no reply; done when applied.
    PingNoReq,
    /// `location` with `req`, then wait for its `ack`: one outstanding per connection.
    PingAcked,
}

impl UpdateMode {
    fn name(self) -> &'static str {
        match self {
            UpdateMode::RedisGeoadd => "Redis GEOADD, wait for reply (1 in flight per conn)",
            UpdateMode::PostgisUpdate => "PostGIS UPDATE, wait for reply (1 in flight per conn)",
            UpdateMode::PingNoReq => "dispatchd ping, no req, done when applied",
            UpdateMode::PingAcked => "dispatchd ping + req, wait for ack (1 in flight per conn)",
        }
    }
}

struct UpdateRun {
    /// Updates applied per second (Redis: replies; dispatchd: its applied counter, from
    /// the first read before the window to the moment it had applied everything sent).
    per_s: f64,
    /// Client-side: updates written (Redis: answered) per second of the sending window.
    written_per_s: f64,
    /// dispatchd: how long after the senders stopped the last ping was applied.
    drain_s: f64,
    /// Sent but never applied (rate-limited or lost).
    unapplied: f64,
    cores: Cores,
}

/// A client-side pacer under the server's per-session ping limit: `rate` a second,
/// bursts of at most `burst`.
struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            rate,
            burst: (rate / 10.0).max(1.0),
            tokens: (rate / 10.0).max(1.0),
            at: Instant::now(),
        }
    }

    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
                .min(self.burst);
            self.at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = ((1.0 - self.tokens) / self.rate).max(0.002);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

struct Bench {
    args: Args,
    positions: Arc<Vec<(f64, f64)>>,
    counters: Arc<Counters>,
    sessions: Vec<Session>,
    metrics_http: Http,
}

impl Bench {
    fn rate_limited(&self) -> u64 {
        self.counters.errors_total.load(Ordering::Relaxed)
    }

    /// Waits until dispatchd has applied `target` pings in all (or nothing moves for
    /// 1 s, at most 60 s); returns (the applied count, when it was first seen).
    async fn settle(&mut self, target: f64, errors0: u64) -> Result<(f64, Instant)> {
        let mut last = dispatch::applied(&mut self.metrics_http).await?;
        let mut last_at = Instant::now();
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let errors = (self.rate_limited() - errors0) as f64;
            if last + errors >= target
                || last_at.elapsed() > Duration::from_secs(1)
                || Instant::now() > give_up
            {
                return Ok((last, last_at));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = dispatch::applied(&mut self.metrics_http).await?;
            if now != last {
                last = now;
                last_at = Instant::now();
            }
        }
    }

    async fn run_updates(
        &mut self,
        mode: UpdateMode,
        secs: f64,
        rep_seed: u64,
    ) -> Result<UpdateRun> {
        let c = self.args.update_conns;
        let base: Arc<Vec<(f64, f64)>> = Arc::new(self.positions[..c].to_vec());
        let deadline_in = Duration::from_secs_f64(secs);
        let barrier = Arc::new(Barrier::new(c + 1));
        let sent = Arc::new(AtomicU64::new(0));
        match mode {
            UpdateMode::RedisGeoadd | UpdateMode::PostgisUpdate => {
                let mut tasks = Vec::new();
                for w in 0..c {
                    let (args, base, barrier) = (self.args.clone(), base.clone(), barrier.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut conn =
                            open_then_wait(&barrier, UpdateConn::open(mode, &args)).await?;
                        let mut rng =
                            Rng::new(rep_seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
                        let member = format!("d{w}");
                        let mut n = 0u64;
                        let deadline = Instant::now() + deadline_in;
                        while Instant::now() < deadline {
                            conn.update(&member, geo::jitter(base[w], &mut rng)).await?;
                            n += 1;
                        }
                        Ok::<u64, anyhow::Error>(n)
                    }));
                }
                barrier.wait().await;
                let start = Instant::now();
                let meter = CpuMeter::start(if mode == UpdateMode::RedisGeoadd {
                    self.args.redis_pid
                } else {
                    self.args.postgres_pid
                });
                let mut n = 0;
                for t in tasks {
                    n += t.await??;
                }
                let per_s = n as f64 / start.elapsed().as_secs_f64();
                Ok(UpdateRun {
                    per_s,
                    written_per_s: per_s,
                    drain_s: 0.0,
                    unapplied: 0.0,
                    cores: meter.cores(),
                })
            }
            UpdateMode::PingNoReq | UpdateMode::PingAcked => {
                let sessions: Vec<Session> = self.sessions.drain(..c).collect();
                let rate = f64::from(self.args.location_max_per_s) * 0.95;
                // Fire-and-forget pings: a monitor reads the applied counter and holds the
                // senders once `ping_window` are written but not yet applied.
                let applied_base = dispatch::applied(&mut self.metrics_http).await?;
                let errors0 = self.rate_limited();
                let applied_now = Arc::new(AtomicU64::new(applied_base as u64));
                let stop = Arc::new(AtomicBool::new(false));
                let monitor = if mode == UpdateMode::PingNoReq {
                    let (addr, applied_now, stop) = (
                        self.args.dispatch.to_string(),
                        applied_now.clone(),
                        stop.clone(),
                    );
                    Some(tokio::spawn(async move {
                        let mut h = Http::connect(&addr).await?;
                        while !stop.load(Ordering::Relaxed) {
                            let a = dispatch::applied(&mut h).await?;
                            applied_now.store(a as u64, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok::<_, anyhow::Error>(())
                    }))
                } else {
                    None
                };
                let window = self.args.ping_window;
                let mut tasks = Vec::new();
                for (w, mut s) in sessions.into_iter().enumerate() {
                    let (base, barrier, sent, applied_now, counters) = (
                        base.clone(),
                        barrier.clone(),
                        sent.clone(),
                        applied_now.clone(),
                        self.counters.clone(),
                    );
                    let applied_base = applied_base as u64;
                    tasks.push(tokio::spawn(async move {
                        barrier.wait().await;
                        let mut rng =
                            Rng::new(rep_seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
                        let mut pacer = Pacer::new(rate);
                        let deadline = Instant::now() + deadline_in;
                        let mut result = Ok(());
                        while Instant::now() < deadline {
                            pacer.take().await;
                            let msg = dispatch::location(geo::jitter(base[w], &mut rng));
                            if mode == UpdateMode::PingNoReq {
                                loop {
                                    let errs =
                                        counters.errors_total.load(Ordering::Relaxed) - errors0;
                                    let done =
                                        applied_now.load(Ordering::Relaxed) - applied_base + errs;
                                    if sent.load(Ordering::Relaxed) < done + window
                                        || Instant::now() >= deadline
                                    {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                                if Instant::now() >= deadline {
                                    break;
                                }
                                if let Err(e) = s.send(&msg).await {
                                    result = Err(e);
                                    break;
                                }
                            } else if let Err(e) = s.request(&msg).await {
                                result = Err(e);
                                break;
                            }
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        (s, result)
                    }));
                }
                barrier.wait().await;
                let start_applied = applied_base;
                let start = Instant::now();
                let meter = CpuMeter::start(self.args.dispatch_pid);
                let mut back = Vec::new();
                let mut first_err = None;
                for t in tasks {
                    let (s, r) = t.await?;
                    back.push(s);
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                let send_secs = start.elapsed().as_secs_f64();
                stop.store(true, Ordering::Relaxed);
                if let Some(m) = monitor {
                    m.await??;
                }
                // Put the sessions back in front, in driver order.
                back.append(&mut self.sessions);
                self.sessions = back;
                if let Some(e) = first_err {
                    return Err(e.context(format!("{} failed", mode.name())));
                }
                let n_sent = sent.load(Ordering::Relaxed) as f64;
                let stopped = Instant::now();
                let (applied_end, at) = self.settle(start_applied + n_sent, errors0).await?;
                let applied = applied_end - start_applied;
                let span = at.max(stopped).duration_since(start).as_secs_f64();
                Ok(UpdateRun {
                    per_s: applied / span,
                    written_per_s: n_sent / send_secs,
                    drain_s: at.saturating_duration_since(stopped).as_secs_f64(),
                    unapplied: n_sent - applied,
                    cores: meter.cores(),
                })
            }
        }
    }
}

/// A connection that moves drivers one request at a time, waiting for each reply.
enum UpdateConn {
    Redis(Redis, String),
    Postgis(postgis::Conn),
}

impl UpdateConn {
    async fn open(mode: UpdateMode, args: &Args) -> Result<UpdateConn> {
        Ok(match mode {
            UpdateMode::RedisGeoadd => {
                UpdateConn::Redis(Redis::connect(&args.redis).await?, args.redis_key.clone())
            }
            UpdateMode::PostgisUpdate => {
                UpdateConn::Postgis(postgis::Conn::open(&args.postgres).await?)
            }
            m => bail!("{} is not a request-reply store", m.name()),
        })
    }

    async fn update(&mut self, member: &str, (lat, lng): (f64, f64)) -> Result<()> {
        match self {
            UpdateConn::Redis(r, key) => {
                let (lng, lat) = (lng.to_string(), lat.to_string());
                match r.cmd(&["GEOADD", key, &lng, &lat, member]).await? {
                    Reply::Int(_) => Ok(()),
                    other => bail!("GEOADD answered {other:?}"),
                }
            }
            UpdateConn::Postgis(c) => c.update(member, (lat, lng)).await,
        }
    }
}

// -------------------------------------------------------------------------------------

/// Redis's own microseconds per call of `cmds` (INFO commandstats), over the whole run.
async fn redis_usec_per_call(addr: &str, cmds: &[&str]) -> Result<Vec<(String, f64)>> {
    let mut r = Redis::connect(addr).await?;
    let info = r.cmd(&["INFO", "commandstats"]).await?;
    let text = info.as_str().unwrap_or("").to_owned();
    Ok(cmds
        .iter()
        .filter_map(|c| {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("cmdstat_{c}:")))?;
            let v = line
                .split(',')
                .find_map(|kv| kv.strip_prefix("usec_per_call="))?
                .trim()
                .parse()
                .ok()?;
            Some((c.to_uppercase(), v))
        })
        .collect())
}

async fn load_redis(args: &Args, positions: &[(f64, f64)]) -> Result<(String, f64)> {
    let mut r = Redis::connect(&args.redis).await?;
    let info = r.cmd(&["INFO", "server"]).await?;
    let version = info
        .as_str()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("redis_version:")))
        .unwrap_or("?")
        .trim()
        .to_owned();
    r.cmd(&["DEL", &args.redis_key]).await?;
    let start = Instant::now();
    for (c, chunk) in positions.chunks(1000).enumerate() {
        let mut cmd: Vec<String> = vec!["GEOADD".into(), args.redis_key.clone()];
        for (j, (lat, lng)) in chunk.iter().enumerate() {
            cmd.push(lng.to_string());
            cmd.push(lat.to_string());
            cmd.push(format!("d{}", c * 1000 + j));
        }
        r.cmd(&cmd).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    r.cmd(&["CONFIG", "RESETSTAT"]).await?;
    match r.cmd(&["ZCARD", &args.redis_key]).await? {
        Reply::Int(n) if n as usize == positions.len() => {}
        other => bail!("Redis holds {other:?} members, not {}", positions.len()),
    }
    Ok((version, secs))
}

/// Writes `ready` (shell-sourceable: the rider token and the Kronecker query set of
/// knn.sql and nearby.lua), then waits until `until` exists (at most an hour).
async fn hold(
    ready: &std::path::Path,
    until: &std::path::Path,
    area: &Area,
    points: usize,
    token: &str,
) -> Result<()> {
    let text = format!(
        "TOKEN={token}\nNPOINTS={points}\nLAT0={}\nDLAT={}\nLNG0={}\nDLNG={}\n",
        area.lat0,
        area.lat1 - area.lat0,
        area.lng0,
        area.lng1 - area.lng0
    );
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, ready)?;
    eprintln!(
        "== holding the drivers until {} exists (at most an hour)",
        until.display()
    );
    let give_up = Instant::now() + Duration::from_secs(3600);
    while !until.exists() {
        if Instant::now() > give_up {
            bail!("{} did not appear within an hour", until.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn wait_ready(addr: &str) -> Result<()> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut h) = Http::connect(addr).await
            && let Ok((200, _)) = h.get("/readyz", None).await
        {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("dispatchd at {addr} not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Sanity {
    points: usize,
    truth: usize,
    redis: usize,
    dispatch: usize,
    postgis: usize,
    redis_vs_dispatch: usize,
    postgis_vs_dispatch: usize,
    /// Misses against brute force that are near-ties (within 2 m), per side.
    redis_ties: usize,
    dispatch_ties: usize,
    postgis_ties: usize,
}

impl Sanity {
    /// The check's lines for the report.
    fn report(&self) -> String {
        let t = self.truth;
        let mut out = format!(
            "sanity (nearest 10 within 5 km at {} points vs brute force over the positions): Redis {}/{t}, dispatchd {}/{t}, PostGIS {}/{t}; Redis = dispatchd {}/{t}, PostGIS = dispatchd {}/{t}",
            self.points,
            self.redis,
            self.dispatch,
            self.postgis,
            self.redis_vs_dispatch,
            self.postgis_vs_dispatch,
        );
        if self.redis < t || self.dispatch < t || self.postgis < t {
            out += &format!(
                "\n        misses that are near-ties (another driver within 2 m of the same distance returned instead): Redis {}/{}, dispatchd {}/{}, PostGIS {}/{}",
                self.redis_ties,
                t - self.redis,
                self.dispatch_ties,
                t - self.dispatch,
                self.postgis_ties,
                t - self.postgis
            );
        }
        out
    }
}

async fn sanity(
    args: &Args,
    positions: &[(f64, f64)],
    points: &[(f64, f64)],
    token: &str,
) -> Result<Sanity> {
    let mut r = Redis::connect(&args.redis).await?;
    let mut h = Http::connect(&args.dispatch.to_string()).await?;
    let pg = postgis::Conn::open(&args.postgres).await?;
    let mut s = Sanity {
        points: 0,
        truth: 0,
        redis: 0,
        dispatch: 0,
        postgis: 0,
        redis_vs_dispatch: 0,
        postgis_vs_dispatch: 0,
        redis_ties: 0,
        dispatch_ties: 0,
        postgis_ties: 0,
    };
    for &(lat, lng) in points.iter().take(args.sanity_points) {
        let truth = geo::nearest(positions, (lat, lng), RADIUS_M, K);
        let reply = geosearch(&mut r, &args.redis_key, (lat, lng), true).await?;
        let Reply::Array(Some(items)) = reply else {
            bail!("GEOSEARCH WITHCOORD answered {reply:?}");
        };
        let redis: Vec<(f64, f64)> = items
            .iter()
            .map(|it| {
                let coord = match it {
                    Reply::Array(Some(v)) if v.len() == 2 => &v[1],
                    _ => return Err(anyhow!("unexpected GEOSEARCH item {it:?}")),
                };
                let Reply::Array(Some(ll)) = coord else {
                    return Err(anyhow!("unexpected coordinate {coord:?}"));
                };
                let num = |r: &Reply| -> Result<f64> {
                    r.as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| anyhow!("bad number {r:?}"))
                };
                Ok((num(&ll[1])?, num(&ll[0])?))
            })
            .collect::<Result<_>>()?;
        let path = format!("/v1/drivers/nearby?lat={lat}&lng={lng}&radius_m=5000&limit=10");
        let (st, body) = h.get(&path, Some(token)).await?;
        if st != 200 {
            bail!("{path} answered {st}: {}", String::from_utf8_lossy(body));
        }
        let near: NearbyResponse = serde_json::from_slice(body)?;
        let disp: Vec<(f64, f64)> = near.drivers.iter().map(|d| (d.lat, d.lng)).collect();
        let post = pg.nearest_with_coord((lat, lng)).await?;
        s.points += 1;
        s.truth += truth.len();
        s.redis += geo::matches(&truth, &redis);
        s.dispatch += geo::matches(&truth, &disp);
        s.postgis += geo::matches(&truth, &post);
        s.redis_vs_dispatch += geo::matches(&redis, &disp);
        s.postgis_vs_dispatch += geo::matches(&post, &disp);
        s.redis_ties += geo::misses(&truth, &redis, (lat, lng), 2.0).1;
        s.dispatch_ties += geo::misses(&truth, &disp, (lat, lng), 2.0).1;
        s.postgis_ties += geo::misses(&truth, &post, (lat, lng), 2.0).1;
    }
    Ok(s)
}

fn deltas(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    prefix: &str,
) -> Vec<String> {
    let mut out: Vec<String> = after
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| format!("{k} +{d}"))
        })
        .collect();
    out.sort();
    out
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(ok) => std::process::exit(if ok { 0 } else { 3 }),
        Err(e) => {
            eprintln!("vs-peers: FAILED: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Ok(false): the run completed but its answers disagree (the comparison is void).
async fn run(args: Args) -> Result<bool> {
    if args.update_conns > args.drivers && !args.skip_updates && !args.close_sessions {
        bail!(
            "--update-conns ({}) exceeds --drivers ({})",
            args.update_conns,
            args.drivers
        );
    }
    let area = Area::around(
        (args.center_lat, args.center_lng),
        args.area_ns_km,
        args.area_ew_km,
    );
    let positions = Arc::new(area.points(args.seed, args.drivers));
    let points = Arc::new(area.points(args.seed.wrapping_add(1), args.query_points));
    let dispatch_addr = args.dispatch.to_string();
    let sessions_note = if args.close_sessions {
        "each went online over its own session, which was then closed (kept available by --session-grace-ms)"
    } else {
        "each online over its own open session"
    };

    eprintln!("== loading {} drivers into Redis", args.drivers);
    let (redis_version, redis_load_s) = load_redis(&args, &positions).await?;
    eprintln!(
        "  Redis {redis_version}: {} members in {redis_load_s:.1} s",
        args.drivers
    );

    eprintln!("== loading {} drivers into PostGIS", args.drivers);
    let (pg_version, pg_load_s) = postgis::load(&args.postgres, &positions).await?;
    let plan = postgis::knn_plan(&args.postgres, points[0]).await?;
    if !(plan.contains("Index Scan using drivers_geom") && plan.contains("Order By: (geom <-> ")) {
        bail!("PostGIS's generic plan for the KNN query is not an index KNN scan:\n{plan}");
    }
    eprintln!(
        "  PostgreSQL {pg_version}: {} rows, GiST index and ANALYZE in {pg_load_s:.1} s; generic plan: {}",
        args.drivers,
        plan.lines().next().unwrap_or("")
    );

    eprintln!(
        "== loading {} drivers into dispatchd ({sessions_note})",
        args.drivers
    );
    wait_ready(&dispatch_addr).await?;
    let mut metrics_http = Http::connect(&dispatch_addr).await?;
    let rider_token = dispatch::register_rider(&mut metrics_http).await?;
    let counters = Arc::new(Counters::default());
    let t = Instant::now();
    let sessions = dispatch::load_drivers(
        args.dispatch,
        positions.clone(),
        args.load_concurrency,
        !args.close_sessions,
        args.source_addrs.max(1),
        counters.clone(),
    )
    .await?;
    let dispatch_load_s = t.elapsed().as_secs_f64();
    eprintln!(
        "  dispatchd: {} drivers online in {dispatch_load_s:.1} s",
        args.drivers
    );
    let m_loaded = dispatch::metrics(&mut metrics_http).await?;
    let open = m_loaded
        .get("dispatch_ws_sessions{role=\"driver\"}")
        .copied()
        .unwrap_or(0.0);

    eprintln!(
        "== sanity: nearest 10 within 5 km at {} points, against brute force",
        args.sanity_points
    );
    let san = sanity(&args, &positions, &points, &rider_token).await?;
    let agree = |x: usize| san.truth == 0 || x as f64 >= 0.95 * san.truth as f64;
    let answers_agree = agree(san.redis) && agree(san.dispatch) && agree(san.postgis);
    if let (Some(ready), Some(until)) = (&args.ready_file, &args.hold_until) {
        eprintln!("{}", san.report());
        if !answers_agree {
            println!("THE COMPARISON IS VOID: the answers disagree with brute force");
            return Ok(false);
        }
        hold(ready, until, &area, args.hold_points, &rider_token).await?;
        drop(sessions);
        return Ok(true);
    }

    // ---- queries
    let redis_q = QuerySide::Redis {
        addr: args.redis.clone(),
        key: args.redis_key.clone(),
        pid: args.redis_pid,
    };
    let disp_q = QuerySide::Dispatch {
        addr: dispatch_addr.clone(),
        token: rider_token.clone(),
        pid: args.dispatch_pid,
    };
    let pg_q = QuerySide::Postgis {
        conn: args.postgres.clone(),
        pid: args.postgres_pid,
    };
    eprintln!(
        "== queries: warm-up {} s each, then {} x {} s per side, concurrency {}",
        args.warm_secs, args.reps, args.query_secs, args.query_conc
    );
    for side in [&redis_q, &disp_q, &pg_q] {
        let w = run_queries(side, args.query_conc, args.warm_secs, points.clone()).await?;
        eprintln!(
            "  warm-up {}: {:.0}/s, {} errors",
            side.name(),
            w.per_s,
            w.errors
        );
    }
    let mut qruns: HashMap<&'static str, Vec<QueryRun>> = HashMap::new();
    for rep in 0..args.reps {
        let mut order = [&redis_q, &disp_q, &pg_q];
        order.rotate_left(rep % 3);
        for side in order {
            let r = run_queries(side, args.query_conc, args.query_secs, points.clone()).await?;
            eprintln!(
                "  rep {} {}: {:.0}/s p50 {:.2} ms p99 {:.2} ms, {} errors{}",
                rep + 1,
                side.name(),
                r.per_s,
                r.hist.value_at_quantile(0.5) as f64 / 1000.0,
                r.hist.value_at_quantile(0.99) as f64 / 1000.0,
                r.errors,
                r.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
            qruns.entry(side.name()).or_default().push(r);
        }
    }

    // ---- updates
    let mut bench = Bench {
        args: args.clone(),
        positions: positions.clone(),
        counters: counters.clone(),
        sessions,
        metrics_http,
    };
    let modes = [
        UpdateMode::RedisGeoadd,
        UpdateMode::PostgisUpdate,
        UpdateMode::PingNoReq,
        UpdateMode::PingAcked,
    ];
    let mut uruns: HashMap<&'static str, Vec<UpdateRun>> = HashMap::new();
    let run_updates = !(args.skip_updates || args.close_sessions);
    if run_updates {
        eprintln!(
            "== position updates: warm-up {} s each, then {} x {} s per mode, {} connections",
            args.warm_secs, args.reps, args.update_secs, args.update_conns
        );
        for (i, m) in modes.iter().enumerate() {
            let w = bench
                .run_updates(*m, args.warm_secs, 1_000 + i as u64)
                .await?;
            eprintln!("  warm-up {}: {:.0}/s", m.name(), w.per_s);
        }
        for rep in 0..args.reps {
            let mut order = modes;
            order.rotate_left(rep % modes.len());
            for m in order {
                let r = bench.run_updates(m, args.update_secs, rep as u64).await?;
                eprintln!(
                    "  rep {} {}: {:.0}/s applied, {:.0}/s written, drain {:.2} s, unapplied {}",
                    rep + 1,
                    m.name(),
                    r.per_s,
                    r.written_per_s,
                    r.drain_s,
                    r.unapplied
                );
                uruns.entry(m.name()).or_default().push(r);
            }
        }
    }
    let m_end = dispatch::metrics(&mut bench.metrics_http).await?;
    let open_end = m_end
        .get("dispatch_ws_sessions{role=\"driver\"}")
        .copied()
        .unwrap_or(0.0);

    // ---- report
    let (rq, dq, pq) = (&qruns[REDIS_Q], &qruns[DISPATCH_Q], &qruns[POSTGIS_Q]);
    let (rs, ds, ps) = (QueryStats::of(rq), QueryStats::of(dq), QueryStats::of(pq));
    let (r_tp, r_p99) = (rs.tp, rs.p99);
    let (d_tp, d_p99) = (ds.tp, ds.p99);
    let (p_tp, p_p99) = (ps.tp, ps.p99);
    let q_errors = rs.errors + ds.errors + ps.errors;
    let q_ratio = d_tp / r_tp;
    let pg_ratio = d_tp / p_tp;
    let met = |b: bool| if b { "MET" } else { "NOT MET" };

    println!();
    println!(
        "========== dispatchd vs Redis {redis_version} vs PostgreSQL {pg_version}: {} drivers ==========",
        args.drivers
    );
    println!(
        "data: the same {} seeded positions (seed {}) in a {:.0} x {:.0} km box around {},{}; Redis key '{}',",
        args.drivers,
        args.seed,
        args.area_ns_km,
        args.area_ew_km,
        args.center_lat,
        args.center_lng,
        args.redis_key
    );
    println!(
        "      PostGIS: table drivers(id text primary key, geom geometry(Point, {}) not null), GiST index, ANALYZEd; the KNN query's generic plan: {}",
        postgis::SRID,
        plan.lines().next().unwrap_or("").trim()
    );
    println!(
        "      dispatchd: {sessions_note}; {open} driver sessions open after loading, {open_end} at the end"
    );
    println!(
        "load: Redis {redis_load_s:.1} s (GEOADD, 1000 a command); PostGIS {pg_load_s:.1} s (INSERT 1000 a statement, then the index and ANALYZE); dispatchd {dispatch_load_s:.1} s (REST register + session + location + go_online, {} at a time)",
        args.load_concurrency
    );
    println!("{}", san.report());
    println!();
    println!(
        "nearest 10 within 5 km: {} connections per side, one request at a time each, {} query points in the same order; medians of {} x {} s",
        args.query_conc, args.query_points, args.reps, args.query_secs
    );
    println!(
        "  Redis:     GEOSEARCH key FROMLONLAT lng lat BYRADIUS 5 km ASC COUNT 10 (member names only), RESP"
    );
    println!(
        "  dispatchd: GET /v1/drivers/nearby?lat&lng&radius_m=5000&limit=10 (rider token; JSON with positions), HTTP/1.1 keep-alive"
    );
    println!(
        "  PostGIS:   knn.sql's SELECT id … WHERE ST_DWithin(geom, pt, 5000) ORDER BY geom <-> pt LIMIT 10, prepared, tokio-postgres (ids only)"
    );
    println!(
        "  {:<20} {:>12} {:>9} {:>9} {:>9} {:>7} {:>15} {:>14}   per rep (queries/s; p99 ms)",
        "",
        "queries/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "cores srv/cli",
        "per srv core-s"
    );
    rs.print_row(REDIS_Q);
    ds.print_row(DISPATCH_Q);
    ps.print_row(POSTGIS_Q);
    println!(
        "  ratio dispatchd/Redis:   throughput {:.2}x, p99 {:.2}x  -> target (>= 10x throughput and a lower p99): {}",
        q_ratio,
        d_p99 / r_p99,
        met(q_ratio >= 10.0 && d_p99 < r_p99)
    );
    println!(
        "  ratio dispatchd/PostGIS: throughput {:.2}x, p99 {:.2}x  -> issue 14's target (>= 4x throughput): {}",
        pg_ratio,
        d_p99 / p_p99,
        met(pg_ratio >= 4.0)
    );
    println!(
        "  ratio PostGIS/Redis:     throughput {:.2}x, p99 {:.2}x",
        p_tp / r_tp,
        p_p99 / r_p99
    );
    if let Some(e) = rq
        .iter()
        .chain(dq.iter())
        .chain(pq.iter())
        .find_map(|r| r.first_error.clone())
    {
        println!("  first query error: {e}");
    }

    let mut updates_met = None;
    if run_updates {
        println!();
        println!(
            "position updates: {} client connections per side (drivers 0..{} of the same data), each moving its driver within ~60 m; medians of {} x {} s",
            args.update_conns, args.update_conns, args.reps, args.update_secs
        );
        println!(
            "  {:<60} {:>12} {:>12} {:>8} {:>10} {:>15} {:>14}   per rep (applied/s)",
            "", "applied/s", "written/s", "drain s", "unapplied", "cores srv/cli", "per srv core-s"
        );
        let mut med = HashMap::new();
        for m in modes {
            let v = &uruns[m.name()];
            let tp: Vec<f64> = v.iter().map(|r| r.per_s).collect();
            let wr: Vec<f64> = v.iter().map(|r| r.written_per_s).collect();
            let dr: Vec<f64> = v.iter().map(|r| r.drain_s).collect();
            let un: f64 = v.iter().map(|r| r.unapplied).sum();
            let cores: Vec<Cores> = v.iter().map(|r| r.cores).collect();
            med.insert(m.name(), median(&tp));
            println!(
                "  {:<60} {:>12} {:>12} {:>8.2} {:>10} {:>15} {:>14}   {}",
                m.name(),
                fmt_n(median(&tp)),
                fmt_n(median(&wr)),
                median(&dr),
                fmt_n(un),
                cores_text(&cores),
                per_core_text(&tp, &cores),
                list(&tp, fmt_n)
            );
        }
        let redis = med[UpdateMode::RedisGeoadd.name()];
        let noreq = med[UpdateMode::PingNoReq.name()] / redis;
        let acked = med[UpdateMode::PingAcked.name()] / redis;
        println!(
            "  ratio dispatchd/Redis: pings as apps send them (no reply; counted by dispatch_locations_applied_total) {noreq:.2}x -> target (>= 1x): {}",
            met(noreq >= 1.0)
        );
        println!(
            "                         pings with req, one in flight per connection like GEOADD (the strict un-pipelined match) {acked:.2}x -> target: {}",
            met(acked >= 1.0)
        );
        let pg = med[UpdateMode::PostgisUpdate.name()];
        println!(
            "  ratio dispatchd/PostGIS UPDATE: pings as apps send them {:.2}x; pings with req + ack {:.2}x;  PostGIS/Redis: {:.2}x",
            med[UpdateMode::PingNoReq.name()] / pg,
            med[UpdateMode::PingAcked.name()] / pg,
            pg / redis
        );
        println!(
            "  note: a ping without req has no reply, so its sender does not wait for one; the no-req row is held to at most {} written-but-unapplied",
            args.ping_window
        );
        println!(
            "        pings in all (read from /metrics every 10 ms) and paced under --location-max-per-s {} per session; 'applied/s' spans from the",
            args.location_max_per_s
        );
        println!(
            "        counter read before the window to the moment everything sent was applied (the drain is inside the denominator)."
        );
        let cap = args.update_conns as f64 * f64::from(args.location_max_per_s) * 0.95;
        if med[UpdateMode::PingNoReq.name()] >= 0.9 * cap {
            println!(
                "  WARNING: the no-req row is at the client's pacing cap ({} connections x {:.0}/s = {}/s): it measures the rate limit, not the server; use more --update-conns",
                args.update_conns,
                f64::from(args.location_max_per_s) * 0.95,
                fmt_n(cap)
            );
        }
        updates_met = Some((noreq >= 1.0, acked >= 1.0));
    }

    println!();
    let stats = redis_usec_per_call(&args.redis, &["geosearch", "geoadd"]).await?;
    println!(
        "Redis's own time per call over the whole round (INFO commandstats; excludes its network I/O): {}",
        stats
            .iter()
            .map(|(c, us)| format!("{c} {us:.1} us"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "'cores srv/cli': CPU the measured server / this client process used during the window, in cores (of 2, shared with everything else);"
    );
    println!(
        "'per srv core-s': the row's work per second of the server's own CPU (supplementary: less sensitive to the rest of the machine; the targets use throughput)"
    );
    let unsolicited = counters.unsolicited();
    let closed = counters.closed.load(Ordering::Relaxed);
    let other = counters.other.load(Ordering::Relaxed);
    let mut problems: Vec<String> = Vec::new();
    problems.extend(deltas(&m_loaded, &m_end, "dispatch_bound_hits_total"));
    problems.extend(deltas(&m_loaded, &m_end, "dispatch_actor_restarts_total"));
    problems.extend(deltas(
        &m_loaded,
        &m_end,
        "dispatch_invariant_violations_total",
    ));
    if !unsolicited.is_empty() {
        problems.push(format!("error frames without req: {unsolicited:?}"));
    }
    if closed > 0 {
        problems.push(format!(
            "{closed} driver sessions closed by the server during the run"
        ));
    }
    if other > 0 {
        problems.push(format!("{other} unexpected frames"));
    }
    if !args.close_sessions && open_end != args.drivers as f64 {
        problems.push(format!(
            "{open_end} driver sessions open at the end, not {}",
            args.drivers
        ));
    }
    println!(
        "server health during the run: {}",
        if problems.is_empty() {
            "nothing unusual (no bound hits, restarts, invariant violations, unexpected closes or errors)".to_owned()
        } else {
            problems.join("; ")
        }
    );
    let median_per_s = |m: UpdateMode| {
        let v: Vec<f64> = uruns[m.name()].iter().map(|r| r.per_s).collect();
        median(&v)
    };
    println!(
        "SUMMARY drivers={} queries: redis={:.0}/s p99={:.2}ms dispatchd={:.0}/s p99={:.2}ms postgis={:.0}/s p99={:.2}ms ratio/redis={:.2}x target={} ratio/postgis={:.2}x target={}{}",
        args.drivers,
        r_tp,
        r_p99,
        d_tp,
        d_p99,
        p_tp,
        p_p99,
        q_ratio,
        met(q_ratio >= 10.0 && d_p99 < r_p99),
        pg_ratio,
        met(pg_ratio >= 4.0),
        match (run_updates, updates_met) {
            (true, Some((a, b))) => format!(
                " | updates: redis={:.0}/s postgis={:.0}/s pings(no req)={:.0}/s {} pings(req+ack)={:.0}/s {}",
                median_per_s(UpdateMode::RedisGeoadd),
                median_per_s(UpdateMode::PostgisUpdate),
                median_per_s(UpdateMode::PingNoReq),
                met(a),
                median_per_s(UpdateMode::PingAcked),
                met(b)
            ),
            _ => String::new(),
        }
    );

    // The sessions close when the process exits.
    drop(bench);
    let answered: u64 = rq
        .iter()
        .chain(dq.iter())
        .chain(pq.iter())
        .map(|r| r.n)
        .sum();
    if !answers_agree || q_errors > answered / 100 {
        println!(
            "THE COMPARISON IS VOID: the answers disagree with brute force, or over 1% of queries failed"
        );
        return Ok(false);
    }
    Ok(true)
}
