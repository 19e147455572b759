//! What a run measures: counters, latency histograms (hdrhistogram), errors by code, and
//! trips by final state. One process's measurements form a [`WorkerResult`], which is
//! what a worker sends its parent (JSON) and what the parent merges.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, updated from every client task.
        #[derive(Debug, Default)]
        pub struct Counters { $($(#[$m])* pub $name: AtomicU64,)* }

        /// A snapshot of [`Counters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
        pub struct CountersSnap { $($(#[$m])* #[serde(default)] pub $name: u64,)* }

        impl Counters {
            pub fn snapshot(&self) -> CountersSnap {
                CountersSnap { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl CountersSnap {
            pub fn add(&mut self, o: &CountersSnap) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

counters! {
    /// WebSocket messages and REST calls sent (pings included).
    messages_sent,
    /// WebSocket messages received.
    messages_received,
    /// Drivers' location pings.
    pings_sent,
    /// Quotes asked for (POST /v1/quotes).
    quotes_sent,
    /// `request_ride` messages sent.
    requests_sent,
    /// Trips created (`request_ride` answered with a `dispatching` trip).
    trips_created,
    /// Poisson arrivals that found every rider of the process busy with a trip.
    requests_skipped_busy,
    offers_received,
    accepts_sent,
    declines_sent,
    /// Offers left to expire on purpose.
    offers_ignored,
    offers_expired,
    /// Trips that reached `driver_assigned` (counted at the rider).
    trips_matched,
    /// Trips that reached `completed` and whose receipt arrived.
    trips_completed,
    cancels_sent,
    driver_locations_received,
    receipts_received,
    /// Registrations (REST) done.
    registered,
    /// Sessions that reached `welcome` (and, for drivers, `go_online`).
    sessions_opened,
    /// Clients that could not be registered or connected.
    connect_failures,
    /// Protocol errors that are the documented outcome of a race (e.g. `conflict` on an
    /// `accept` after its `offer_expired` arrived).
    expected_errors,
    /// Every other error: answers with `type: error`, failed REST calls, undecodable
    /// frames and sessions closed by the server.
    unexpected_errors,
    /// With `--reconnect`: sessions that dropped during the run (closed, failed).
    sessions_dropped,
    /// With `--reconnect`: sessions opened again (a `welcome` read) after a drop.
    reconnects,
    /// With `--reconnect`: connection attempts after a drop (refused ones included).
    reconnect_attempts,
    /// With `--reconnect`: clients that gave up after `--reconnect-for`.
    reconnect_failures,
    /// With `--reconnect`: requests in flight when their session dropped; their outcome
    /// is unknown (never counted as acknowledged).
    requests_unknown,
    /// With `--reconnect`: trips a rider learnt of from a `welcome` (its request's reply
    /// was lost with the session).
    trips_adopted,
    /// Lines written to `--ack-log`.
    ack_log_lines,
}

/// Latency metrics, by name.
pub const REQ_TO_DISPATCHING: &str = "request_to_dispatching";
pub const REQ_TO_OFFER: &str = "request_to_offer";
pub const REQ_TO_ASSIGNED: &str = "request_to_assigned";
pub const QUOTE: &str = "quote_rest";
pub const CONNECT: &str = "ws_connect";
pub const METRICS: [&str; 5] = [
    REQ_TO_DISPATCHING,
    REQ_TO_OFFER,
    REQ_TO_ASSIGNED,
    QUOTE,
    CONNECT,
];

/// Samples kept per metric for the latency-over-time chart.
const MAX_SAMPLES: usize = 200_000;

/// A latency metric: an HDR histogram of microseconds plus (time, value) samples.
#[derive(Debug, Clone)]
pub struct Latency {
    pub hist: Histogram<u64>,
    /// (milliseconds since the run began, microseconds); negative times are set-up.
    pub samples: Vec<(i64, u64)>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            // 1 µs to 1 hour at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            samples: Vec::new(),
        }
    }
}

impl Latency {
    pub fn record(&mut self, at_ms: i64, us: u64) {
        self.hist.saturating_record(us.max(1));
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push((at_ms, us));
        }
    }

    /// Value at quantile `q` (0–1), microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    pub fn dump(&self) -> LatencyDump {
        LatencyDump {
            counts: self
                .hist
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            samples: self.samples.clone(),
        }
    }

    pub fn merge_dump(&mut self, d: &LatencyDump) {
        for &(v, n) in &d.counts {
            self.hist.saturating_record_n(v, n);
        }
        let room = MAX_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(d.samples.iter().take(room));
    }
}

/// A histogram on the wire: (value, count) pairs, and the samples.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyDump {
    pub counts: Vec<(u64, u64)>,
    pub samples: Vec<(i64, u64)>,
}

/// Errors of one kind: how many, and the first few in full.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorStat {
    pub count: u64,
    pub expected: bool,
    pub examples: Vec<String>,
}

/// Everything one process measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub counters: CountersSnap,
    pub peak_connected: i64,
    /// By `code on <message type>` (e.g. `conflict on accept`).
    pub errors: BTreeMap<String, ErrorStat>,
    /// Things the protocol says should not happen but are not error messages.
    pub anomalies: BTreeMap<String, ErrorStat>,
    /// Trips by final state, and `unfinished: <state>` for those still open at the end.
    pub trips: BTreeMap<String, u64>,
    pub latencies: BTreeMap<String, LatencyDump>,
    /// Trips whose first offer was seen by a driver of the same process (request → offer
    /// measured) and all trips offered to this process's drivers.
    pub offers_measured: u64,
    /// With several processes: (trip_id, unix µs, ms since the run began) of each request
    /// answered, and (trip_id, unix µs) of the first offer of a trip each process saw;
    /// the parent joins them into request → offer.
    #[serde(default)]
    pub requests: Vec<(String, u64, i64)>,
    #[serde(default)]
    pub first_offers: Vec<(String, u64)>,
    pub limits: Vec<String>,
    /// CPU seconds during the run (after set-up), and over the whole process life.
    pub cpu_s: f64,
    pub cpu_total_s: f64,
    pub run_s: f64,
    pub setup_s: f64,
}

#[derive(Debug, Default)]
struct Inner {
    latencies: BTreeMap<&'static str, Latency>,
    errors: BTreeMap<String, ErrorStat>,
    anomalies: BTreeMap<String, ErrorStat>,
    trips: BTreeMap<String, u64>,
    limits: Vec<String>,
    offers_measured: u64,
    requests: Vec<(String, u64, i64)>,
    first_offers: HashMap<String, u64>,
}

/// The measurements of one process, shared by its client tasks.
#[derive(Debug)]
pub struct Stats {
    pub c: Counters,
    pub connected: AtomicI64,
    pub peak_connected: AtomicI64,
    /// When the run (after set-up) began; sample times count from it.
    pub t0: Mutex<Instant>,
    inner: Mutex<Inner>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            c: Counters::default(),
            connected: AtomicI64::new(0),
            peak_connected: AtomicI64::new(0),
            t0: Mutex::new(Instant::now()),
            inner: Mutex::default(),
        }
    }
}

const MAX_EXAMPLES: usize = 5;

fn bump(map: &mut BTreeMap<String, ErrorStat>, key: String, expected: bool, detail: String) {
    let e = map.entry(key).or_default();
    e.count += 1;
    e.expected = expected;
    if e.examples.len() < MAX_EXAMPLES {
        e.examples.push(detail);
    }
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connected(&self, delta: i64) {
        let now = self.connected.fetch_add(delta, Ordering::Relaxed) + delta;
        self.peak_connected.fetch_max(now, Ordering::Relaxed);
    }

    pub fn now_ms(&self) -> i64 {
        let t0 = *self.t0.lock().unwrap();
        let now = Instant::now();
        if now >= t0 {
            (now - t0).as_millis() as i64
        } else {
            -((t0 - now).as_millis() as i64)
        }
    }

    pub fn latency(&self, metric: &'static str, us: u64) {
        let at = self.now_ms();
        self.inner
            .lock()
            .unwrap()
            .latencies
            .entry(metric)
            .or_default()
            .record(at, us);
    }

    pub fn offer_measured(&self, us: u64) {
        self.latency(REQ_TO_OFFER, us);
        self.inner.lock().unwrap().offers_measured += 1;
    }

    /// A request answered with `trip_id`, sent at `unix_us` (several processes).
    pub fn request_sent(&self, trip_id: &str, unix_us: u64) {
        let at = self.now_ms();
        self.inner
            .lock()
            .unwrap()
            .requests
            .push((trip_id.to_owned(), unix_us, at));
    }

    /// An offer seen by a driver of this process at `unix_us` (several processes).
    pub fn offer_seen(&self, trip_id: &str, unix_us: u64) {
        self.inner
            .lock()
            .unwrap()
            .first_offers
            .entry(trip_id.to_owned())
            .or_insert(unix_us);
    }

    /// A protocol error: `code` answered to `context` (the message type or REST call).
    pub fn error(&self, code: &str, context: &str, expected: bool, detail: String) {
        Stats::inc(if expected {
            &self.c.expected_errors
        } else {
            &self.c.unexpected_errors
        });
        let key = format!("{code} on {context}");
        bump(
            &mut self.inner.lock().unwrap().errors,
            key,
            expected,
            detail,
        );
    }

    pub fn anomaly(&self, what: &str, detail: String) {
        bump(
            &mut self.inner.lock().unwrap().anomalies,
            what.to_owned(),
            false,
            detail,
        );
    }

    pub fn trip_ended(&self, state: &str) {
        *self
            .inner
            .lock()
            .unwrap()
            .trips
            .entry(state.to_owned())
            .or_default() += 1;
    }

    /// A client limit was hit: one message per kind (its first words), the one with the
    /// most connections kept.
    pub fn limit(&self, kind: &str, connections: i64, msg: String) {
        let mut g = self.inner.lock().unwrap();
        let pos = g.limits.iter().position(|m| m.starts_with(kind));
        let old = pos.map(|i| {
            g.limits[i]
                .split(" at ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<i64>().ok())
                .unwrap_or(0)
        });
        match (pos, old) {
            (Some(i), Some(n)) if connections > n => g.limits[i] = msg,
            (Some(_), _) => {}
            (None, _) => g.limits.push(msg),
        }
    }

    pub fn has_limit(&self) -> bool {
        !self.inner.lock().unwrap().limits.is_empty()
    }

    pub fn result(&self, cpu_s: f64, run_s: f64, setup_s: f64) -> WorkerResult {
        let cpu_total_s = process_cpu_s(None).unwrap_or(0.0);
        let g = self.inner.lock().unwrap();
        WorkerResult {
            counters: self.c.snapshot(),
            peak_connected: self.peak_connected.load(Ordering::Relaxed),
            errors: g.errors.clone(),
            anomalies: g.anomalies.clone(),
            trips: g.trips.clone(),
            latencies: g
                .latencies
                .iter()
                .map(|(k, v)| (k.to_string(), v.dump()))
                .collect(),
            offers_measured: g.offers_measured,
            requests: g.requests.clone(),
            first_offers: g
                .first_offers
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            limits: g.limits.clone(),
            cpu_s,
            cpu_total_s,
            run_s,
            setup_s,
        }
    }
}

/// A `conflict` not explained yet by what the client has seen: replies travel apart from
/// updates inside the server, so the update that explains it (a cancellation, an
/// `offer_expired`) may come just after. Kept for [`LATE_WINDOW`], then unexpected.
#[derive(Debug, Clone)]
pub struct Unexplained {
    pub trip_id: String,
    pub kind: &'static str,
    pub code: String,
    pub detail: String,
    pub deadline: tokio::time::Instant,
}

pub const LATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(3);

impl Stats {
    /// An unexplained error was explained by a later update: expected, but kept apart.
    pub fn explained_late(&self, u: Unexplained) {
        self.error(
            &u.code,
            &format!("{} (reply came before the update that explains it)", u.kind),
            true,
            u.detail,
        );
    }

    /// Nothing explained it in time (or the run ended first).
    pub fn unexplained(&self, u: Unexplained, why: &str) {
        self.error(&u.code, u.kind, false, format!("{} [{why}]", u.detail));
    }
}

/// The merge of several processes' results.
#[derive(Debug, Default)]
pub struct Merged {
    pub counters: CountersSnap,
    pub peak_connected: i64,
    pub errors: BTreeMap<String, ErrorStat>,
    pub anomalies: BTreeMap<String, ErrorStat>,
    pub trips: BTreeMap<String, u64>,
    pub latencies: BTreeMap<String, Latency>,
    pub offers_measured: u64,
    requests: Vec<(String, u64, i64)>,
    first_offers: HashMap<String, u64>,
    pub limits: Vec<String>,
    pub cpu_s: f64,
    pub cpu_total_s: f64,
    pub run_s: f64,
    pub setup_s: f64,
    pub processes: usize,
}

fn merge_errors(into: &mut BTreeMap<String, ErrorStat>, from: &BTreeMap<String, ErrorStat>) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        e.count += v.count;
        e.expected = v.expected;
        for x in &v.examples {
            if e.examples.len() < MAX_EXAMPLES {
                e.examples.push(x.clone());
            }
        }
    }
}

impl Merged {
    pub fn add(&mut self, r: &WorkerResult) {
        self.counters.add(&r.counters);
        self.peak_connected += r.peak_connected;
        merge_errors(&mut self.errors, &r.errors);
        merge_errors(&mut self.anomalies, &r.anomalies);
        for (k, v) in &r.trips {
            *self.trips.entry(k.clone()).or_default() += v;
        }
        for (k, d) in &r.latencies {
            self.latencies.entry(k.clone()).or_default().merge_dump(d);
        }
        self.offers_measured += r.offers_measured;
        self.requests.extend(r.requests.iter().cloned());
        for (t, us) in &r.first_offers {
            let e = self.first_offers.entry(t.clone()).or_insert(*us);
            *e = (*e).min(*us);
        }
        for l in &r.limits {
            if !self.limits.contains(l) {
                self.limits.push(l.clone());
            }
        }
        self.cpu_s += r.cpu_s;
        self.cpu_total_s += r.cpu_total_s;
        self.run_s = self.run_s.max(r.run_s);
        self.setup_s = self.setup_s.max(r.setup_s);
        self.processes += 1;
    }
}

impl Merged {
    /// Joins the processes' requests and first offers by trip id into request → offer
    /// (the earliest offer of a trip across all processes). Call once, after every `add`.
    pub fn join_offers(&mut self) {
        let requests = std::mem::take(&mut self.requests);
        let offers = std::mem::take(&mut self.first_offers);
        let l = self.latencies.entry(REQ_TO_OFFER.to_owned()).or_default();
        for (trip, sent, at) in requests {
            if let Some(&o) = offers.get(&trip) {
                l.record(at, o.saturating_sub(sent));
                self.offers_measured += 1;
            }
        }
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
pub fn process_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) / tck)
}

/// A `Vm…` line of /proc/<pid>/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// Nearest-rank percentile of a sorted vector: the smallest value with at least
    /// `q · n` values at or below it.
    fn reference(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_match_a_sorted_vector() {
        let mut rng = SmallRng::seed_from_u64(42);
        for &n in &[1usize, 7, 100, 1_000, 54_321] {
            let mut lat = Latency::default();
            let mut v: Vec<u64> = (0..n)
                .map(|_| {
                    // Log-uniform from 50 µs to 5 s: the spread of real latencies.
                    (50.0 * (rng.random::<f64>() * (100_000f64).ln()).exp()) as u64
                })
                .collect();
            for &x in &v {
                lat.record(0, x);
            }
            v.sort_unstable();
            for &q in &[0.5, 0.9, 0.99, 0.999, 1.0] {
                let want = reference(&v, q);
                let got = lat.quantile_us(q);
                // Three significant digits: within 0.1% (one bucket) of the exact value.
                let tol = (want as f64 * 0.001).max(1.0);
                assert!(
                    (got as f64 - want as f64).abs() <= tol,
                    "n={n} q={q}: hdr {got} vs exact {want}"
                );
            }
            assert!(
                (lat.hist.max() as f64 - *v.last().unwrap() as f64).abs()
                    <= (*v.last().unwrap() as f64 * 0.001).max(1.0)
            );
        }
    }

    #[test]
    fn merged_histograms_keep_their_percentiles() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        let mut all = Vec::new();
        for i in 1..=10_000u64 {
            let x = i * 37 % 9_973 + 100;
            if i % 3 == 0 {
                a.record(0, x)
            } else {
                b.record(0, x)
            }
            all.push(x);
        }
        all.sort_unstable();
        let mut m = Latency::default();
        m.merge_dump(&a.dump());
        m.merge_dump(&b.dump());
        assert_eq!(m.hist.len(), 10_000);
        for &q in &[0.5, 0.99, 0.999] {
            let want = reference(&all, q) as f64;
            assert!((m.quantile_us(q) as f64 - want).abs() <= want * 0.001 + 1.0);
        }
    }

    #[test]
    fn workers_requests_and_offers_join_by_trip_on_the_earliest_offer() {
        let a = WorkerResult {
            requests: vec![("t1".into(), 1_000_000, 5), ("t2".into(), 2_000_000, 6)],
            first_offers: vec![("t1".into(), 1_004_000)],
            ..WorkerResult::default()
        };
        let b = WorkerResult {
            // t1's offer seen later by the other worker (a second offer) does not count.
            first_offers: vec![("t1".into(), 1_900_000), ("t2".into(), 2_002_500)],
            ..WorkerResult::default()
        };
        let mut m = Merged::default();
        m.add(&a);
        m.add(&b);
        m.join_offers();
        let l = &m.latencies[REQ_TO_OFFER];
        assert_eq!((l.hist.len(), m.offers_measured), (2, 2));
        assert!(
            (l.hist.max() as f64 - 4_000.0).abs() <= 4.0,
            "{}",
            l.hist.max()
        );
        assert!(
            (l.hist.min() as f64 - 2_500.0).abs() <= 3.0,
            "{}",
            l.hist.min()
        );
    }

    #[test]
    fn reads_own_cpu() {
        assert!(process_cpu_s(None).unwrap() >= 0.0);
        assert!(proc_status_kib(std::process::id(), "VmHWM").unwrap() > 0);
    }
}
