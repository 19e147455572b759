//! The capacity report (`--server-pid`): what the server spends per connected client and
//! per location ping in the steady window, and what that projects to for 1,000,000
//! drivers pinging every 4 s.
//!
//! The window opens `--steady-after` into the run (set-up, with its registrations and
//! connection storm, is over before the run starts; the first seconds of the run still
//! settle) and closes at the end of `--duration`, before the drain. The server's CPU
//! (user + system, `/proc/<pid>/stat`) and RSS (`VmRSS`, `/proc/<pid>/status`) are read at
//! both ends, and the pings and requests sent in between are counted from loadgen's own
//! counters, so every number is the server's cost of exactly that traffic.
//!
//! Per ping and per request are both the whole server CPU divided by the count (neither
//! is netted out of the other): at the default mix, where pings are ~75 times as many as
//! requests, per ping is the honest upper bound for a ping, and per request is not a
//! request's own cost.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::sim::Tick;
use crate::stats;

/// The fleet the projection is for.
pub const PROJECTED_DRIVERS: f64 = 1_000_000.0;
/// Its ping interval, in seconds.
pub const PROJECTED_PING_S: f64 = 4.0;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu_s: f64,
    rss_kib: u64,
    pings: u64,
    requests: u64,
    connected: i64,
}

/// Watches the run's progress ticks and samples the server at the window's two ends.
#[derive(Debug)]
pub struct Sampler {
    pid: u32,
    opens_s: f64,
    closes_s: f64,
    /// The server's RSS before loadgen connected anything.
    baseline_rss_kib: Option<u64>,
    ends: Mutex<(Option<Sample>, Option<Sample>)>,
}

impl Sampler {
    /// Reads the baseline now: call it before any client connects.
    pub fn new(pid: u32, steady_after_s: f64, duration_s: f64) -> Self {
        Self {
            pid,
            opens_s: steady_after_s.min(duration_s / 2.0),
            closes_s: duration_s,
            baseline_rss_kib: stats::proc_status_kib(pid, "VmRSS"),
            ends: Mutex::new((None, None)),
        }
    }

    fn sample(&self, t: &Tick) -> Option<Sample> {
        Some(Sample {
            at: Instant::now(),
            cpu_s: stats::process_cpu_s(Some(self.pid))?,
            rss_kib: stats::proc_status_kib(self.pid, "VmRSS")?,
            pings: t.counters.pings_sent,
            requests: t.counters.requests_sent,
            connected: t.connected,
        })
    }

    /// Called with every progress tick (every 250 ms): the first tick inside the window
    /// opens it, each later one inside it moves its end.
    pub fn observe(&self, t: &Tick) {
        if t.phase != "running" || t.run_s < self.opens_s || t.run_s > self.closes_s {
            return;
        }
        let Some(s) = self.sample(t) else {
            return;
        };
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        if ends.0.is_none() {
            ends.0 = Some(s);
        } else {
            ends.1 = Some(s);
        }
    }

    /// The report, if the window was long enough to measure anything.
    pub fn report(&self) -> Option<Capacity> {
        let (Some(a), Some(b)) = *self.ends.lock().unwrap_or_else(|e| e.into_inner()) else {
            return None;
        };
        Capacity::between(a, b, self.baseline_rss_kib)
    }
}

/// What the server spent in the steady window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Capacity {
    pub window_s: f64,
    /// Sessions connected at the window's end.
    pub clients: i64,
    pub pings: u64,
    pub pings_per_s: f64,
    pub requests: u64,
    pub server_cpu_s: f64,
    /// Server CPU seconds per wall second (1.0 = one core busy).
    pub server_cores: f64,
    /// All server CPU in the window / the pings sent in it.
    pub cpu_us_per_ping: Option<f64>,
    /// All server CPU in the window / the requests sent in it.
    pub cpu_ms_per_request: Option<f64>,
    pub rss_mib: f64,
    pub rss_baseline_mib: Option<f64>,
    /// RSS at the window's end / clients.
    pub rss_kib_per_client: Option<f64>,
    /// (RSS at the window's end − RSS before any client) / clients.
    pub rss_kib_per_client_marginal: Option<f64>,
    pub projection: Option<Projection>,
}

/// 1,000,000 drivers pinging every 4 s at the measured costs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Projection {
    pub drivers: f64,
    pub ping_interval_s: f64,
    pub pings_per_s: f64,
    pub cores: f64,
    pub memory_gib: f64,
    /// The arithmetic, spelled out.
    pub arithmetic: String,
}

impl Capacity {
    fn between(a: Sample, b: Sample, baseline_rss_kib: Option<u64>) -> Option<Capacity> {
        let window_s = b.at.duration_since(a.at).as_secs_f64();
        if window_s <= 0.0 {
            return None;
        }
        let cpu = (b.cpu_s - a.cpu_s).max(0.0);
        let pings = b.pings.saturating_sub(a.pings);
        let requests = b.requests.saturating_sub(a.requests);
        let clients = b.connected;
        let per = |n: u64, scale: f64| (n > 0).then(|| cpu / n as f64 * scale);
        let per_client = |kib: f64| (clients > 0).then(|| kib / clients as f64);
        let rss_kib_per_client = per_client(b.rss_kib as f64);
        let cpu_us_per_ping = per(pings, 1e6);
        let projection = match (cpu_us_per_ping, rss_kib_per_client) {
            (Some(us), Some(kib)) => Some(Projection::of(us, kib)),
            _ => None,
        };
        Some(Capacity {
            window_s,
            clients,
            pings,
            pings_per_s: pings as f64 / window_s,
            requests,
            server_cpu_s: cpu,
            server_cores: cpu / window_s,
            cpu_us_per_ping,
            cpu_ms_per_request: per(requests, 1e3),
            rss_mib: b.rss_kib as f64 / 1024.0,
            rss_baseline_mib: baseline_rss_kib.map(|k| k as f64 / 1024.0),
            rss_kib_per_client,
            rss_kib_per_client_marginal: baseline_rss_kib
                .and_then(|base| per_client(b.rss_kib.saturating_sub(base) as f64)),
            projection,
        })
    }

    /// The lines of the text report.
    pub fn text(&self) -> String {
        let opt = |v: Option<f64>, digits: usize| v.map_or("?".into(), |v| format!("{v:.digits$}"));
        let mut s = format!(
            "capacity (steady window {:.1} s, {} clients): server {:.2} cores; {} pings ({:.0}/s) -> {} µs CPU per ping; {} requests -> {} ms CPU per request; RSS {:.0} MiB (before any client {} MiB) -> {} KiB per client ({} KiB above the baseline)\n",
            self.window_s,
            self.clients,
            self.server_cores,
            self.pings,
            self.pings_per_s,
            opt(self.cpu_us_per_ping, 1),
            self.requests,
            opt(self.cpu_ms_per_request, 2),
            self.rss_mib,
            opt(self.rss_baseline_mib, 0),
            opt(self.rss_kib_per_client, 1),
            opt(self.rss_kib_per_client_marginal, 1),
        );
        if let Some(p) = &self.projection {
            s.push_str(&format!("projection: {}\n", p.arithmetic));
        }
        s
    }
}

impl Projection {
    pub fn of(us_per_ping: f64, kib_per_client: f64) -> Self {
        let pings_per_s = PROJECTED_DRIVERS / PROJECTED_PING_S;
        let cores = pings_per_s * us_per_ping / 1e6;
        let memory_gib = PROJECTED_DRIVERS * kib_per_client / (1024.0 * 1024.0);
        Self {
            drivers: PROJECTED_DRIVERS,
            ping_interval_s: PROJECTED_PING_S,
            pings_per_s,
            cores,
            memory_gib,
            arithmetic: format!(
                "1,000,000 drivers / {PROJECTED_PING_S} s = {pings_per_s:.0} pings/s x {us_per_ping:.1} µs = {cores:.2} cores; 1,000,000 x {kib_per_client:.1} KiB = {memory_gib:.1} GiB"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample(at: Instant, cpu_s: f64, rss_kib: u64, pings: u64, requests: u64) -> Sample {
        Sample {
            at,
            cpu_s,
            rss_kib,
            pings,
            requests,
            connected: 1000,
        }
    }

    #[test]
    fn costs_are_the_window_differences_and_the_projection_is_their_arithmetic() {
        let t0 = Instant::now();
        let a = sample(t0, 10.0, 100 * 1024, 5_000, 100);
        let b = sample(t0 + Duration::from_secs(10), 12.0, 110 * 1024, 105_000, 600);
        let c = Capacity::between(a, b, Some(30 * 1024)).unwrap();
        assert_eq!(c.pings, 100_000);
        assert_eq!(c.requests, 500);
        assert!((c.server_cores - 0.2).abs() < 1e-9);
        assert!((c.cpu_us_per_ping.unwrap() - 20.0).abs() < 1e-9);
        assert!((c.cpu_ms_per_request.unwrap() - 4.0).abs() < 1e-9);
        assert!((c.rss_kib_per_client.unwrap() - 112.64).abs() < 1e-9);
        assert!((c.rss_kib_per_client_marginal.unwrap() - 81.92).abs() < 1e-9);
        let p = c.projection.unwrap();
        // 250,000 pings/s x 20 µs = 5 cores; 1M x 112.64 KiB = 107.4 GiB.
        assert!((p.cores - 5.0).abs() < 1e-9);
        assert!((p.memory_gib - 107.42).abs() < 0.01);
        assert!(p.arithmetic.contains("250000 pings/s"), "{}", p.arithmetic);
    }

    #[test]
    fn no_traffic_no_per_unit_costs() {
        let t0 = Instant::now();
        let a = sample(t0, 1.0, 1024, 0, 0);
        let b = sample(t0 + Duration::from_secs(1), 1.5, 1024, 0, 0);
        let c = Capacity::between(a, b, None).unwrap();
        assert_eq!(c.cpu_us_per_ping, None);
        assert_eq!(c.cpu_ms_per_request, None);
        assert_eq!(c.rss_kib_per_client_marginal, None);
        assert!(c.projection.is_none());
        assert!(Capacity::between(a, a, None).is_none());
    }
}
