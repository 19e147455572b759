//! The end-of-run report: built from the merged measurements, printed as text, written
//! as JSON, and checked against the limits the command line asked for.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Args;
use crate::stats::{self, ErrorStat, Latency, Merged};

#[derive(Debug, Clone, Serialize)]
pub struct ConfigEcho {
    pub url: String,
    pub drivers: usize,
    pub riders: usize,
    pub duration_s: f64,
    pub drain_s: f64,
    /// Poisson requests per second (not used with `demand_trips`).
    pub request_rate: f64,
    /// The requests were a trips file's (`--demand-trips`), at its own times.
    pub demand_trips: bool,
    pub ping_interval_ms: u64,
    pub seed: u64,
    pub speed_mps: f64,
    pub time_scale: f64,
    pub accept_prob: f64,
    pub decline_share: f64,
    pub cancel_prob: f64,
    pub workers: usize,
    pub source_ips: usize,
    pub demand: String,
}

impl ConfigEcho {
    /// How requests arrived: a rate, or the trips file's own times.
    pub fn requests(&self) -> String {
        if self.demand_trips {
            "the trips file's requests".to_owned()
        } else {
            format!("{} requests/s", self.request_rate)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Clients {
    pub target: usize,
    pub peak_connected: i64,
    pub connect_failures: u64,
    pub registered: u64,
    pub sessions_opened: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub messages_sent: u64,
    pub messages_received: u64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    pub pings_per_s: f64,
    /// Quotes and requests per second of the request window (--duration, not the drain);
    /// every other rate is per second of the whole run.
    pub quotes_per_s: f64,
    pub requests_per_s: f64,
    pub trips_completed_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trips {
    /// `request_ride` messages sent.
    pub requested: u64,
    /// Answered with a trip in `dispatching`.
    pub created: u64,
    /// Reached `driver_assigned`.
    pub matched: u64,
    /// matched / (matched + no_driver_found): of the dispatches that ended, the share that
    /// found a driver (trips cancelled while dispatching or still dispatching at the end
    /// are left out).
    pub match_rate: Option<f64>,
    pub completed: u64,
    pub by_final_state: BTreeMap<String, u64>,
    /// Poisson arrivals dropped because every rider already had a trip.
    pub arrivals_skipped_all_riders_busy: u64,
    pub offers_received: u64,
    pub accepts_sent: u64,
    pub declines_sent: u64,
    pub offers_left_to_expire: u64,
    pub offers_expired: u64,
    pub cancels_sent: u64,
}

/// `--reconnect`: sessions that dropped and came back.
#[derive(Debug, Clone, Serialize)]
pub struct Reconnects {
    pub enabled: bool,
    /// Sessions that dropped during the run (closed by the server, failed, refused).
    pub sessions_dropped: u64,
    /// Sessions opened again (a `welcome` read) after a drop.
    pub reconnected: u64,
    /// Connection attempts after drops, refused ones included.
    pub attempts: u64,
    /// Clients that gave up after `--reconnect-for`.
    pub gave_up: u64,
    /// Requests in flight at a drop: unknown outcome, never counted as acknowledged.
    pub requests_unknown: u64,
    /// Trips a rider learnt of from a `welcome` (the reply to its request was lost).
    pub trips_adopted: u64,
}

/// `--ack-log`: where, and how many lines.
#[derive(Debug, Clone, Serialize)]
pub struct AckLogSummary {
    pub path: String,
    pub lines: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    pub fn of(l: &Latency) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: l.hist.len(),
            p50_ms: ms(l.quantile_us(0.5)),
            p90_ms: ms(l.quantile_us(0.9)),
            p99_ms: ms(l.quantile_us(0.99)),
            p999_ms: ms(l.quantile_us(0.999)),
            max_ms: ms(if l.hist.is_empty() { 0 } else { l.hist.max() }),
            mean_ms: if l.hist.is_empty() {
                0.0
            } else {
                l.hist.mean() / 1000.0
            },
        }
    }
}

/// One second of a latency metric, for the over-time chart.
#[derive(Debug, Clone, Serialize)]
pub struct SecondPoint {
    pub t_s: i64,
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    /// Every error that is not the documented outcome of a race.
    pub unexpected: u64,
    /// Errors that are the documented outcome of a race (kept apart, not failures).
    pub expected: u64,
    /// unexpected / messages sent.
    pub error_rate: f64,
    /// By `code on <message>`.
    pub by_code: BTreeMap<String, ErrorStat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    pub cpu_s: Option<f64>,
    pub vm_hwm_kib: Option<u64>,
    pub vm_rss_kib: Option<u64>,
    /// Costs in the steady window and the projection to 1M drivers.
    pub capacity: Option<crate::capacity::Capacity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// loadgen's CPU seconds during the run (user + system, summed over its processes).
    pub loadgen_run_cpu_s: f64,
    /// The same over the processes' whole lives (set-up included).
    pub loadgen_total_cpu_s: f64,
    /// Run CPU seconds per wall second (1.0 = one core busy).
    pub loadgen_cores: f64,
    pub processes: usize,
    pub server: Option<ServerUsage>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub limit: String,
    pub value: String,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigEcho,
    pub setup_s: f64,
    pub run_s: f64,
    pub clients: Clients,
    /// Client-side limits hit (open files, source ports), with what to do about them.
    pub limits_hit: Vec<String>,
    pub throughput: Throughput,
    pub trips: Trips,
    pub reconnect: Reconnects,
    pub ack_log: Option<AckLogSummary>,
    /// `request_to_dispatching`, `request_to_offer`, `request_to_assigned`, `quote_rest`,
    /// `ws_connect`.
    pub latency: BTreeMap<String, LatencySummary>,
    pub latency_notes: Vec<String>,
    pub latency_over_time: BTreeMap<String, Vec<SecondPoint>>,
    pub errors: Errors,
    pub anomalies: BTreeMap<String, ErrorStat>,
    pub cpu: Cpu,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// For the HTML page: percentile curves (quantile, ms) per metric. Not in the JSON.
    #[serde(skip)]
    pub distribution: BTreeMap<String, Vec<(f64, f64)>>,
}

fn per_second(l: &Latency) -> Vec<SecondPoint> {
    let mut by: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for &(at, us) in &l.samples {
        if at >= 0 {
            by.entry(at / 1000).or_default().push(us);
        }
    }
    by.into_iter()
        .map(|(t, mut v)| {
            v.sort_unstable();
            let q = |q: f64| {
                let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
                v[rank - 1] as f64 / 1000.0
            };
            SecondPoint {
                t_s: t,
                count: v.len(),
                p50_ms: q(0.5),
                p99_ms: q(0.99),
                max_ms: *v.last().unwrap() as f64 / 1000.0,
            }
        })
        .collect()
}

fn distribution(l: &Latency) -> Vec<(f64, f64)> {
    let n = l.hist.len();
    if n == 0 {
        return Vec::new();
    }
    // Quantiles 0, 0.9, 0.99, … evenly on the "nines" axis, up to what n supports.
    let max_nines = ((n as f64).log10() + 0.5).min(5.0);
    let mut out = Vec::new();
    let mut x = 0.0;
    while x <= max_nines + 1e-9 {
        let q = 1.0 - 10f64.powf(-x);
        out.push((x, l.quantile_us(q) as f64 / 1000.0));
        x += 0.05;
    }
    out.push((max_nines, l.hist.max() as f64 / 1000.0));
    out
}

impl Report {
    pub fn build(
        args: &Args,
        url: &str,
        demand: &str,
        m: &Merged,
        server: Option<ServerUsage>,
    ) -> Report {
        let c = &m.counters;
        let run = m.run_s.max(1e-9);
        let per_s = |n: u64| n as f64 / run;
        // Requests arrive only during --duration, not during the drain.
        let window = args.duration.as_secs_f64().min(run).max(1e-9);
        let per_window_s = |n: u64| n as f64 / window;
        let no_driver = m.trips.get("no_driver_found").copied().unwrap_or(0);
        let mut latency = BTreeMap::new();
        let mut over_time = BTreeMap::new();
        let mut dist = BTreeMap::new();
        for name in stats::METRICS {
            let empty = Latency::default();
            let l = m.latencies.get(name).unwrap_or(&empty);
            latency.insert(name.to_owned(), LatencySummary::of(l));
            if name != stats::CONNECT {
                over_time.insert(name.to_owned(), per_second(l));
                dist.insert(name.to_owned(), distribution(l));
            }
        }
        let mut notes = vec![
            "request_to_dispatching: request_ride sent → its trip_update (dispatching) at the rider".to_owned(),
            format!(
                "request_to_offer: request_ride sent → the trip's first offer at a driver, correlated by trip_id{} ({} of {} trips created were offered)",
                if m.processes > 1 {
                    " across the worker processes by the wall clock (CLOCK_REALTIME of this one machine: the rider's send time and the earliest offer any worker saw)"
                } else {
                    " inside the process"
                },
                m.offers_measured,
                c.trips_created,
            ),
            "request_to_assigned: request_ride sent → driver_assigned at the rider; includes the drivers' simulated decision delay (--decision-delay-ms) and any declined or expired offers".to_owned(),
            "quote_rest: POST /v1/quotes round trip; ws_connect: WebSocket connect → welcome (set-up)".to_owned(),
        ];
        if m.latencies
            .get(stats::REQ_TO_OFFER)
            .is_none_or(|l| l.hist.is_empty())
        {
            notes.push("request_to_offer: no samples".into());
        }
        let error_rate = if c.messages_sent == 0 {
            0.0
        } else {
            c.unexpected_errors as f64 / c.messages_sent as f64
        };

        let mut checks = Vec::new();
        let target = args.drivers + args.riders;
        checks.push(Check {
            name: "every client connected".into(),
            limit: format!("{target} clients"),
            value: format!(
                "{} connected, {} failed{}",
                c.sessions_opened,
                c.connect_failures,
                if m.limits.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", m.limits.join("; "))
                }
            ),
            passed: c.connect_failures == 0 && c.sessions_opened as usize == target,
        });
        if let Some(lim) = args.max_p99_ms {
            let l = &latency[stats::REQ_TO_OFFER];
            checks.push(Check {
                name: "p99 request → offer".into(),
                limit: format!("≤ {lim} ms"),
                value: if l.count == 0 {
                    "no samples".into()
                } else {
                    format!("{:.2} ms over {} trips", l.p99_ms, l.count)
                },
                passed: l.count > 0 && l.p99_ms <= lim,
            });
        }
        if let Some(lim) = args.max_error_rate {
            checks.push(Check {
                name: "protocol error rate".into(),
                limit: format!("≤ {lim}"),
                value: format!(
                    "{error_rate:.6} ({} unexpected errors / {} messages sent)",
                    c.unexpected_errors, c.messages_sent
                ),
                passed: error_rate <= lim,
            });
        }
        if args.reconnect {
            checks.push(Check {
                name: "every dropped session came back".into(),
                limit: format!("within --reconnect-for {:?}", args.reconnect_for),
                value: format!(
                    "{} dropped, {} reconnected, {} gave up",
                    c.sessions_dropped, c.reconnects, c.reconnect_failures
                ),
                passed: c.reconnect_failures == 0,
            });
        }
        let passed = checks.iter().all(|c| c.passed);
        Report {
            config: ConfigEcho {
                url: url.to_owned(),
                drivers: args.drivers,
                riders: args.riders,
                duration_s: args.duration.as_secs_f64(),
                drain_s: args.drain.as_secs_f64(),
                request_rate: args.request_rate,
                demand_trips: args.demand_trips.is_some(),
                ping_interval_ms: args.ping_interval_ms,
                seed: args.seed,
                speed_mps: args.speed_mps,
                time_scale: args.time_scale,
                accept_prob: args.accept_prob,
                decline_share: args.decline_share,
                cancel_prob: args.cancel_prob,
                workers: args.workers,
                source_ips: args.source_ips.as_ref().map_or(0, |l| l.0.len()),
                demand: demand.to_owned(),
            },
            setup_s: m.setup_s,
            run_s: m.run_s,
            clients: Clients {
                target,
                peak_connected: m.peak_connected,
                connect_failures: c.connect_failures,
                registered: c.registered,
                sessions_opened: c.sessions_opened,
            },
            limits_hit: m.limits.clone(),
            throughput: Throughput {
                messages_sent: c.messages_sent,
                messages_received: c.messages_received,
                sent_per_s: per_s(c.messages_sent),
                received_per_s: per_s(c.messages_received),
                pings_per_s: per_s(c.pings_sent),
                quotes_per_s: per_window_s(c.quotes_sent),
                requests_per_s: per_window_s(c.requests_sent),
                trips_completed_per_s: per_s(c.trips_completed),
            },
            trips: Trips {
                requested: c.requests_sent,
                created: c.trips_created,
                matched: c.trips_matched,
                match_rate: (c.trips_matched + no_driver > 0)
                    .then(|| c.trips_matched as f64 / (c.trips_matched + no_driver) as f64),
                completed: c.trips_completed,
                by_final_state: m.trips.clone(),
                arrivals_skipped_all_riders_busy: c.requests_skipped_busy,
                offers_received: c.offers_received,
                accepts_sent: c.accepts_sent,
                declines_sent: c.declines_sent,
                offers_left_to_expire: c.offers_ignored,
                offers_expired: c.offers_expired,
                cancels_sent: c.cancels_sent,
            },
            reconnect: Reconnects {
                enabled: args.reconnect,
                sessions_dropped: c.sessions_dropped,
                reconnected: c.reconnects,
                attempts: c.reconnect_attempts,
                gave_up: c.reconnect_failures,
                requests_unknown: c.requests_unknown,
                trips_adopted: c.trips_adopted,
            },
            ack_log: args.ack_log.as_ref().map(|p| AckLogSummary {
                path: p.display().to_string(),
                lines: c.ack_log_lines,
            }),
            latency,
            latency_notes: notes,
            latency_over_time: over_time,
            errors: Errors {
                unexpected: c.unexpected_errors,
                expected: c.expected_errors,
                error_rate,
                by_code: m.errors.clone(),
            },
            anomalies: m.anomalies.clone(),
            cpu: Cpu {
                loadgen_run_cpu_s: m.cpu_s,
                loadgen_total_cpu_s: m.cpu_total_s,
                loadgen_cores: m.cpu_s / run,
                processes: m.processes,
                server,
                note: args.embedded.then(|| {
                    "--embedded: the server runs in loadgen's process, so its CPU is included"
                        .to_owned()
                }),
            },
            checks,
            passed,
            distribution: dist,
        }
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(s, "== loadgen report");
        let _ = writeln!(
            s,
            "city: {} drivers, {} riders, {} for {:.0} s (+{:.0} s drain), pings every {} ms, seed {}, time scale {}, {} worker(s), {} source address(es)",
            c.drivers,
            c.riders,
            c.requests(),
            c.duration_s,
            c.drain_s,
            c.ping_interval_ms,
            c.seed,
            c.time_scale,
            c.workers,
            c.source_ips.max(1)
        );
        let _ = writeln!(s, "demand: {}; server: {}", c.demand, c.url);
        let _ = writeln!(
            s,
            "set-up {:.1} s, run {:.1} s; clients: {} of {} connected (peak {}), {} failed",
            self.setup_s,
            self.run_s,
            self.clients.sessions_opened,
            self.clients.target,
            self.clients.peak_connected,
            self.clients.connect_failures
        );
        for l in &self.limits_hit {
            let _ = writeln!(s, "LIMIT: {l}");
        }
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "throughput: sent {} ({:.0}/s), received {} ({:.0}/s); pings {:.0}/s, quotes {:.2}/s, requests {:.2}/s, completed trips {:.2}/s",
            t.messages_sent,
            t.sent_per_s,
            t.messages_received,
            t.received_per_s,
            t.pings_per_s,
            t.quotes_per_s,
            t.requests_per_s,
            t.trips_completed_per_s
        );
        let tr = &self.trips;
        let _ = writeln!(
            s,
            "trips: {} requested, {} created, {} matched (match rate {}), {} completed; {} arrivals skipped (all riders busy)",
            tr.requested,
            tr.created,
            tr.matched,
            tr.match_rate
                .map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            tr.completed,
            tr.arrivals_skipped_all_riders_busy
        );
        let states: Vec<String> = tr
            .by_final_state
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "  by final state: {}", states.join(", "));
        let _ = writeln!(
            s,
            "  offers: {} received, {} accepted, {} declined, {} left to expire, {} expired; {} rider cancels sent",
            tr.offers_received,
            tr.accepts_sent,
            tr.declines_sent,
            tr.offers_left_to_expire,
            tr.offers_expired,
            tr.cancels_sent
        );
        let rc = &self.reconnect;
        if rc.enabled || rc.sessions_dropped > 0 {
            let _ = writeln!(
                s,
                "reconnect: {} sessions dropped, {} reconnected ({} attempts), {} gave up; {} requests in flight at a drop (unknown), {} trips learnt from a welcome",
                rc.sessions_dropped,
                rc.reconnected,
                rc.attempts,
                rc.gave_up,
                rc.requests_unknown,
                rc.trips_adopted
            );
        }
        if let Some(a) = &self.ack_log {
            let _ = writeln!(s, "ack log: {} lines in {}", a.lines, a.path);
        }
        let _ = writeln!(
            s,
            "latency (ms)               count      p50      p90      p99     p999      max"
        );
        for (k, l) in &self.latency {
            let _ = writeln!(
                s,
                "  {k:<24}{:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
        }
        for n in &self.latency_notes {
            let _ = writeln!(s, "  note: {n}");
        }
        let e = &self.errors;
        let _ = writeln!(
            s,
            "errors: {} unexpected (rate {:.6}), {} expected races",
            e.unexpected, e.error_rate, e.expected
        );
        for (k, v) in &e.by_code {
            let _ = writeln!(
                s,
                "  {k}: {}{}",
                v.count,
                if v.expected { " (expected race)" } else { "" }
            );
            if !v.expected {
                for x in v.examples.iter().take(3) {
                    let _ = writeln!(s, "      e.g. {x}");
                }
            }
        }
        for (k, v) in &self.anomalies {
            let _ = writeln!(s, "anomaly: {k}: {}", v.count);
            for x in v.examples.iter().take(3) {
                let _ = writeln!(s, "      e.g. {x}");
            }
        }
        let cpu = &self.cpu;
        let _ = writeln!(
            s,
            "cpu: loadgen {:.1} s during the run ({:.2} cores), {:.1} s in all, over {} process(es)",
            cpu.loadgen_run_cpu_s, cpu.loadgen_cores, cpu.loadgen_total_cpu_s, cpu.processes
        );
        if let Some(n) = &cpu.note {
            let _ = writeln!(s, "  note: {n}");
        }
        if let Some(sv) = &cpu.server {
            let _ = writeln!(
                s,
                "server pid {}: cpu {} s in all, VmHWM {} MiB, VmRSS {} MiB",
                sv.pid,
                sv.cpu_s.map_or("?".into(), |v| format!("{v:.1}")),
                sv.vm_hwm_kib
                    .map_or("?".into(), |v| format!("{:.0}", v as f64 / 1024.0)),
                sv.vm_rss_kib
                    .map_or("?".into(), |v| format!("{:.0}", v as f64 / 1024.0)),
            );
            match &sv.capacity {
                Some(c) => s.push_str(&c.text()),
                None => s.push_str("capacity: no steady window (the run was too short?)\n"),
            }
        }
        for ch in &self.checks {
            let _ = writeln!(
                s,
                "check {}: {} {} (limit {})",
                if ch.passed { "PASS" } else { "FAIL" },
                ch.name,
                ch.value,
                ch.limit
            );
        }
        let _ = writeln!(s, "result: {}", if self.passed { "PASS" } else { "FAIL" });
        s
    }
}
