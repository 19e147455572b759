//! The command line: every knob of the simulated city, parsed once into [`Args`].

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;

/// A simulated city of drivers and riders over real WebSockets, with a latency report.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, about)]
pub struct Args {
    /// The server's WebSocket base; the REST base (`http://…`) is derived from it. Several
    /// nodes of a cluster: separated by commas. The clients use one at a time and move on to
    /// the next when it refuses (`unavailable`: a standby) or cannot be reached (with
    /// `--reconnect`, a dropped session comes back on the node that serves).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// With several `--url`s: each client opens (and reopens) its WebSocket on a node of
    /// its own, chosen by a hash of its token, so the sessions spread over the nodes (a
    /// standby relays its sessions to the leader); REST still goes to the node in use. A
    /// client whose node refuses or cannot be reached falls back to the node in use.
    #[arg(long)]
    pub spread: bool,
    /// Start an in-process dispatchd on a free port with a temporary data directory
    /// (needs a build with `--features embedded`).
    #[arg(long)]
    pub embedded: bool,
    /// Simulated drivers (one WebSocket each).
    #[arg(long, default_value_t = 100)]
    pub drivers: usize,
    /// Simulated riders (one WebSocket each).
    #[arg(long, default_value_t = 20)]
    pub riders: usize,
    /// How long requests arrive (`60s`, `2m`, `500ms`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the request window, how long trips in flight may still finish.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Mean interval of a driver's location pings (each one jittered ±20%).
    #[arg(long, default_value_t = 4000)]
    pub ping_interval_ms: u64,
    /// Ride requests per second across all riders (Poisson arrivals).
    #[arg(long, default_value_t = 1.0)]
    pub request_rate: f64,
    /// Centre of the city disc, `LAT,LNG` (ignored with --demand-csv).
    #[arg(long, default_value = "45.5017,-73.5673", value_parser = parse_latlng, allow_hyphen_values = true)]
    pub center: (f64, f64),
    /// Radius of the city disc in km (ignored with --demand-csv).
    #[arg(long, default_value_t = 10.0)]
    pub radius_km: f64,
    /// Demand map: a CSV with `lat,lng,weight` or the montreal_carshare_zones.csv layout
    /// (`centroid_lat,centroid_lon,car_hours,…`). Pickups are drawn by weight.
    #[arg(long)]
    pub demand_csv: Option<PathBuf>,
    /// Real demand: the trips of a file in the NYC taxi layout of loadgen/data
    /// (`pickup_datetime,…,pickup_latitude,pickup_longitude,dropoff_latitude,
    /// dropoff_longitude`), each requested in order at its pickup time ÷ --time-scale from
    /// the start of the run, from its own pickup to its own drop-off. Replaces
    /// --request-rate, --demand-csv and --duration (the window is the slice ÷ K); drivers
    /// start near the slice's first hour of pickups.
    #[arg(long, conflicts_with_all = ["request_rate", "demand_csv", "duration", "center", "radius_km"])]
    pub demand_trips: Option<PathBuf>,
    /// With --demand-trips: the slice's first minute of the day, `HH:MM` (default 00:00).
    #[arg(long, requires = "demand_trips", value_parser = parse_hhmm)]
    pub demand_from: Option<u64>,
    /// With --demand-trips: hours of the day from --demand-from (default: to midnight).
    #[arg(long, requires = "demand_trips")]
    pub demand_hours: Option<f64>,
    /// Same seed, same city (positions, waypoints, trips, decisions).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Street speed of a driver, m/s (simulated).
    #[arg(long, default_value_t = 11.0)]
    pub speed_mps: f64,
    /// Simulated seconds per real second for driving and boarding (1 = real time; 10 makes
    /// a 3 km trip take about 27 s, so a one-minute run sees whole trips).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Probability that a driver accepts an offer.
    #[arg(long, default_value_t = 0.9)]
    pub accept_prob: f64,
    /// Of the offers not accepted, the share declined; the rest are left to expire.
    #[arg(long, default_value_t = 0.5)]
    pub decline_share: f64,
    /// A driver's human delay before answering an offer, `MIN-MAX` ms (real time).
    #[arg(long, default_value = "500-3000", value_parser = parse_range_ms)]
    pub decision_delay_ms: (u64, u64),
    /// Probability that a rider cancels a trip it requested (before pickup).
    #[arg(long, default_value_t = 0.05)]
    pub cancel_prob: f64,
    /// When a cancelling rider cancels, `MIN-MAX` ms after the request (real time).
    #[arg(long, default_value = "1000-20000", value_parser = parse_range_ms)]
    pub cancel_delay_ms: (u64, u64),
    /// Time the driver waits at the pickup for the rider, `MIN-MAX` ms (simulated).
    #[arg(long, default_value = "20000-60000", value_parser = parse_range_ms)]
    pub boarding_ms: (u64, u64),
    /// Worker processes to split the population over (each re-executes this binary).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Loopback source addresses for the client sockets, round-robin:
    /// `127.0.0.2-127.0.0.9` or `127.0.0.2,127.0.0.3`.
    #[arg(long, value_parser = parse_ip_list)]
    pub source_ips: Option<IpList>,
    /// Connections (and registrations) in flight at once while setting up.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as a standalone HTML page (inline SVG charts) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Fail (exit 1) when p99 of request → offer exceeds this many milliseconds.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Fail (exit 1) when unexpected protocol errors / messages sent exceeds this.
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    /// Also report the CPU time and peak RSS (VmHWM) of this process, e.g. dispatchd's.
    /// With it, the capacity report (server CPU per ping and per request, RSS per client,
    /// and the projection to 1,000,000 drivers) is measured over a steady window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Where the capacity report's steady window opens, into the run (it closes at the
    /// end of --duration, before the drain); at most half the duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub steady_after: Duration,
    /// Survive the server going away: a driver or rider whose session drops (closed,
    /// failed, refused) reconnects with backoff (50 ms doubling to 1 s) using the same
    /// token, resumes from the `welcome`, and carries on. Requests in flight at the drop
    /// count as unknown, never as acknowledged.
    #[arg(long)]
    pub reconnect: bool,
    /// With --reconnect: how long one client keeps trying after a drop before it gives up
    /// (a failed check).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub reconnect_for: Duration,
    /// Append one JSON line per transition the server acknowledged to a client (every
    /// `trip_update`, every `ack` of a command that moves a trip) and per `welcome`, to
    /// this file (emptied at the start of the run; each line is written whole, at once).
    #[arg(long)]
    pub ack_log: Option<PathBuf>,
    /// Internal: run as worker N of --workers (set by the parent process).
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
}

/// A list of source addresses (a newtype so clap treats it as one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpList(pub Vec<IpAddr>);

impl Args {
    /// Checks values that clap cannot.
    pub fn validate(&self) -> Result<()> {
        let p = |v: f64, name: &str| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be within [0, 1], got {v}");
            }
            Ok(())
        };
        p(self.accept_prob, "--accept-prob")?;
        p(self.decline_share, "--decline-share")?;
        p(self.cancel_prob, "--cancel-prob")?;
        if !(self.request_rate.is_finite() && self.request_rate >= 0.0) {
            bail!("--request-rate must be a finite number ≥ 0");
        }
        if !(self.speed_mps > 0.0 && self.speed_mps.is_finite()) {
            bail!("--speed-mps must be > 0");
        }
        if !(self.time_scale > 0.0 && self.time_scale.is_finite()) {
            bail!("--time-scale must be > 0");
        }
        if !(self.radius_km > 0.0 && self.radius_km.is_finite()) {
            bail!("--radius-km must be > 0");
        }
        if self.ping_interval_ms == 0 {
            bail!("--ping-interval-ms must be > 0");
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        if let Some(i) = self.worker_index
            && i >= self.workers
        {
            bail!("--worker-index {i} is not below --workers {}", self.workers);
        }
        if self.reconnect && self.reconnect_for.is_zero() {
            bail!("--reconnect-for must be > 0");
        }
        if self.demand_trips.is_some() {
            let (from_s, to_s) = self.demand_slice_s();
            if !(to_s > from_s && to_s <= 24 * 3600) {
                bail!(
                    "--demand-from and --demand-hours must pick a slice of one day (00:00–24:00), got {} h from {:02}:{:02}",
                    self.demand_hours.unwrap_or(f64::NAN),
                    from_s / 3600,
                    from_s % 3600 / 60
                );
            }
            if self.workers > 1 || self.worker_index.is_some() {
                bail!(
                    "--demand-trips runs in one process: --workers must be 1 (the trips are one ordered stream)"
                );
            }
        }
        if self.embedded && self.worker_index.is_some() {
            bail!("a worker does not start its own server");
        }
        Ok(())
    }

    /// With --demand-trips: the slice of the day, seconds after midnight, `[from, to)`.
    pub fn demand_slice_s(&self) -> (u64, u64) {
        let from = self.demand_from.unwrap_or(0);
        let to = match self.demand_hours {
            Some(h) if h.is_finite() && h > 0.0 => from + (h * 3600.0).round() as u64,
            Some(_) => from,
            None => 24 * 3600,
        };
        (from, to)
    }

    /// The flags with what --demand-trips implies resolved: the request window is the
    /// slice's length ÷ --time-scale.
    pub fn resolved(&self) -> Args {
        let mut a = self.clone();
        if a.demand_trips.is_some() {
            let (from, to) = a.demand_slice_s();
            a.duration = Duration::from_secs_f64(to.saturating_sub(from) as f64 / a.time_scale);
        }
        a
    }

    /// The argv a worker process is started with: the same city, `url` resolved, and
    /// `--worker-index`; outputs and checks stay with the parent.
    pub fn worker_argv(&self, index: usize, url: &str) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--url".into(),
            url.into(),
            "--drivers".into(),
            self.drivers.to_string(),
            "--riders".into(),
            self.riders.to_string(),
            "--duration".into(),
            format!("{}ms", self.duration.as_millis()),
            "--drain".into(),
            format!("{}ms", self.drain.as_millis()),
            "--ping-interval-ms".into(),
            self.ping_interval_ms.to_string(),
            "--request-rate".into(),
            self.request_rate.to_string(),
            format!("--center={},{}", self.center.0, self.center.1),
            "--radius-km".into(),
            self.radius_km.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--speed-mps".into(),
            self.speed_mps.to_string(),
            "--time-scale".into(),
            self.time_scale.to_string(),
            "--accept-prob".into(),
            self.accept_prob.to_string(),
            "--decline-share".into(),
            self.decline_share.to_string(),
            "--decision-delay-ms".into(),
            format!("{}-{}", self.decision_delay_ms.0, self.decision_delay_ms.1),
            "--cancel-prob".into(),
            self.cancel_prob.to_string(),
            "--cancel-delay-ms".into(),
            format!("{}-{}", self.cancel_delay_ms.0, self.cancel_delay_ms.1),
            "--boarding-ms".into(),
            format!("{}-{}", self.boarding_ms.0, self.boarding_ms.1),
            "--workers".into(),
            self.workers.to_string(),
            "--connect-concurrency".into(),
            self.connect_concurrency
                .max(self.workers)
                .div_ceil(self.workers)
                .to_string(),
            "--worker-index".into(),
            index.to_string(),
            "--quiet".into(),
        ];
        if let Some(ips) = &self.source_ips {
            let list: Vec<String> = ips.0.iter().map(|ip| ip.to_string()).collect();
            v.push("--source-ips".into());
            v.push(list.join(","));
        }
        if let Some(csv) = &self.demand_csv {
            v.push("--demand-csv".into());
            v.push(csv.display().to_string());
        }
        if self.reconnect {
            v.push("--reconnect".into());
        }
        if self.spread {
            v.push("--spread".into());
        }
        v.push("--reconnect-for".into());
        v.push(format!("{}ms", self.reconnect_for.as_millis()));
        if let Some(p) = &self.ack_log {
            v.push("--ack-log".into());
            v.push(p.display().to_string());
        }
        v
    }
}

/// `60s`, `1500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 60s, 500ms, 2m)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult_ms / 1000.0))
}

/// `HH:MM` → seconds after midnight (`24:00` is the end of the day).
pub fn parse_hhmm(s: &str) -> Result<u64, String> {
    let err = || format!("expected HH:MM within 00:00–24:00, got {s:?}");
    let (h, m) = s.trim().split_once(':').ok_or_else(err)?;
    let h: u64 = h.parse().map_err(|_| err())?;
    let m: u64 = m.parse().map_err(|_| err())?;
    if m >= 60 || h * 60 + m > 24 * 60 {
        return Err(err());
    }
    Ok(h * 3600 + m * 60)
}

/// `LAT,LNG` in decimal degrees.
pub fn parse_latlng(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected LAT,LNG, got {s:?}"))?;
    let lat: f64 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad latitude {a:?}"))?;
    let lng: f64 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad longitude {b:?}"))?;
    if !((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lng)) {
        return Err(format!("coordinate out of range: {s:?}"));
    }
    Ok((lat, lng))
}

/// `MIN-MAX` (or a single value) in milliseconds.
pub fn parse_range_ms(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u64 = a.trim().parse().map_err(|_| format!("bad range {s:?}"))?;
    let b: u64 = b.trim().parse().map_err(|_| format!("bad range {s:?}"))?;
    if a > b {
        return Err(format!("range {s:?}: MIN is above MAX"));
    }
    Ok((a, b))
}

/// `127.0.0.2-127.0.0.9`, `127.0.0.2,127.0.0.5`, or one address.
pub fn parse_ip_list(s: &str) -> Result<IpList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a > 65_535 {
                return Err(format!("bad address range {part:?}"));
            }
            out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(part.parse().map_err(|_| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address given".into());
    }
    Ok(IpList(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_range_ms("500-3000").unwrap(), (500, 3000));
        assert!(parse_range_ms("3-1").is_err());
        let ips = parse_ip_list("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(ips.0.len(), 3);
        assert_eq!(ips.0[2].to_string(), "127.0.0.4");
        assert_eq!(parse_latlng("45.5,-73.6").unwrap(), (45.5, -73.6));
        let a = Args::parse_from(["loadgen", "--center", "45.5,-73.6", "--drivers", "7"]);
        assert_eq!((a.center, a.drivers), ((45.5, -73.6), 7));
        // A worker's argv parses back into the same city.
        let w = Args::parse_from(
            std::iter::once("loadgen".to_string()).chain(a.worker_argv(0, "ws://127.0.0.1:1")),
        );
        assert_eq!(
            (w.center, w.drivers, w.worker_index),
            (a.center, 7, Some(0))
        );
        assert!(!w.reconnect && w.ack_log.is_none());
        let a = Args::parse_from([
            "loadgen",
            "--reconnect",
            "--reconnect-for",
            "5s",
            "--ack-log",
            "/tmp/acks.jsonl",
        ]);
        let w = Args::parse_from(
            std::iter::once("loadgen".to_string()).chain(a.worker_argv(1, "ws://127.0.0.1:1")),
        );
        assert_eq!(
            (w.reconnect, w.reconnect_for, w.ack_log),
            (
                true,
                Duration::from_secs(5),
                Some(PathBuf::from("/tmp/acks.jsonl"))
            )
        );
    }

    #[test]
    fn demand_trips_flags_conflict_and_resolve() {
        let t = ["loadgen", "--demand-trips", "trips.csv"];
        for extra in [
            &["--request-rate", "5"][..],
            &["--demand-csv", "z.csv"],
            &["--duration", "10s"],
            &["--center", "45.5,-73.6"],
        ] {
            let argv = t.iter().chain(extra).copied();
            let e = Args::try_parse_from(argv).expect_err("conflicting flags");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{extra:?}"
            );
        }
        let e = Args::try_parse_from(["loadgen", "--demand-from", "08:00"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(Args::try_parse_from(t.iter().chain(&["--demand-from", "8h"])).is_err());
        assert!(Args::try_parse_from(t.iter().chain(&["--demand-from", "24:01"])).is_err());
        let a = Args::parse_from(t.iter().chain(&[
            "--demand-from",
            "08:30",
            "--demand-hours",
            "1.5",
            "--time-scale",
            "60",
        ]));
        assert_eq!(a.demand_slice_s(), (8 * 3600 + 1800, 10 * 3600));
        assert_eq!(a.resolved().duration, Duration::from_secs(90));
        a.validate().unwrap();
        let past_midnight =
            Args::parse_from(
                t.iter()
                    .chain(&["--demand-from", "23:00", "--demand-hours", "2"]),
            );
        assert!(past_midnight.validate().is_err());
        let workers = Args::parse_from(t.iter().chain(&["--workers", "2"]));
        assert!(workers.validate().is_err());
    }
}
