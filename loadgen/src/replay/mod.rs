//! `loadgen replay` (also the `replay` binary): a real city day pushed through the engine
//! in-process on a simulated clock, greedy against batched matching (issue 17).
//!
//! ```sh
//! cargo run --release -p dispatch-loadgen --bin replay -- \
//!     --trips loadgen/data/nyc_taxi_2011-02-01_manhattan.csv --drivers 2000 \
//!     --matching greedy,batch --match-window-ms 1000,2000,5000 --json day.json --html day.html
//! ```

pub mod html;
pub mod report;
pub mod sim;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use dispatch_engine::{BatchParams, DispatchConfig, Point, SearchParams, StraightLineEta};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use report::Outcome;
pub use sim::SimConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Matching {
    /// Each request takes the nearest available driver at once (the server's default).
    Greedy,
    /// Requests of a window are assigned together (min total pickup time).
    Batch,
}

/// A real city day pushed through the engine on a simulated clock.
#[derive(Debug, Clone, Parser)]
#[command(name = "replay", version, about)]
pub struct ReplayArgs {
    /// The trips: `pickup_datetime,…,pickup_latitude,pickup_longitude,dropoff_latitude,
    /// dropoff_longitude` (the NYC taxi layout of loadgen/data).
    #[arg(long, default_value = "loadgen/data/nyc_taxi_2011-02-01_manhattan.csv")]
    pub trips: PathBuf,
    /// Drivers in the fleet (each works one shift of --shift-hours during the day).
    #[arg(long, default_value_t = 2000)]
    pub drivers: usize,
    /// Modes to run, one after the other, on the same trips and seed.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "greedy,batch"
    )]
    pub matching: Vec<Matching>,
    /// Batch windows to run (each a run of its own), ms.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub match_window_ms: Vec<u64>,
    /// Same seed, same day: shifts, start positions, cruising, answers, boarding.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Probability that a driver accepts an offer.
    #[arg(long, default_value_t = 0.9)]
    pub accept_prob: f64,
    /// Of the offers not accepted, the share declined; the rest time out.
    #[arg(long, default_value_t = 0.5)]
    pub decline_share: f64,
    /// Length of a driver's shift, hours.
    #[arg(long, default_value_t = 10.0)]
    pub shift_hours: f64,
    /// First hour of the day replayed (0–23).
    #[arg(long, default_value_t = 0)]
    pub from_hour: u64,
    /// Hours replayed from --from-hour.
    #[arg(long, default_value_t = 24)]
    pub hours: u64,
    /// H3 resolution of the driver index (as the server's --h3-resolution).
    #[arg(long, default_value_t = 7)]
    pub h3_resolution: u8,
    /// Most requests in one assignment problem.
    #[arg(long, default_value_t = BatchParams::default().max_group)]
    pub max_batch: usize,
    /// Check the world's invariants as the replay runs (slower; tests use it).
    #[arg(long)]
    pub check_invariants: bool,
    /// Write the outcomes as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an HTML page (inline SVG charts) here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Print one Markdown table row per mode (the README's study) instead of the text.
    #[arg(long)]
    pub markdown: bool,
    /// With --markdown: print the table's header first.
    #[arg(long)]
    pub markdown_header: bool,
}

impl ReplayArgs {
    pub fn validate(&self) -> Result<()> {
        if self.drivers == 0 {
            bail!("--drivers must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.accept_prob) || !(0.0..=1.0).contains(&self.decline_share) {
            bail!("--accept-prob and --decline-share must be within 0..=1");
        }
        if !(self.shift_hours > 0.0 && self.shift_hours <= 24.0) {
            bail!("--shift-hours must be within (0, 24]");
        }
        if self.from_hour > 23 || self.hours == 0 || self.from_hour + self.hours > 24 {
            bail!("--from-hour and --hours must pick hours within one day (0–24)");
        }
        if self.match_window_ms.iter().any(|w| *w == 0 || *w > 60_000) {
            bail!("--match-window-ms must be within 1..=60000");
        }
        if self.max_batch == 0 {
            bail!("--max-batch must be at least 1");
        }
        Ok(())
    }

    /// One configuration per run: greedy once, batch once per window.
    pub fn configs(&self) -> Vec<(String, SimConfig)> {
        let base = SimConfig {
            matching: Matching::Greedy,
            window_ms: 0,
            drivers: self.drivers,
            seed: self.seed,
            accept_prob: self.accept_prob,
            decline_share: self.decline_share,
            shift_hours: self.shift_hours,
            from_s: self.from_hour * 3600,
            to_s: (self.from_hour + self.hours) * 3600,
            batch: BatchParams {
                max_group: self.max_batch,
                ..BatchParams::default()
            },
            search: SearchParams::default(),
            dispatch: DispatchConfig::default(),
            eta: StraightLineEta::default(),
            h3_resolution: self.h3_resolution,
            check_invariants: self.check_invariants,
        };
        let mut out = Vec::new();
        for m in &self.matching {
            match m {
                Matching::Greedy => out.push(("greedy".to_string(), base.clone())),
                Matching::Batch => {
                    for w in &self.match_window_ms {
                        out.push((
                            format!("batch {:.0} s", *w as f64 / 1000.0),
                            SimConfig {
                                matching: Matching::Batch,
                                window_ms: *w,
                                ..base.clone()
                            },
                        ));
                    }
                }
            }
        }
        out
    }
}

/// One trip of the file, on the replay's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct TripRow {
    /// Milliseconds after the day's midnight.
    pub at_ms: u64,
    pub pickup: Point,
    pub dropoff: Point,
}

/// Reads the trips of `[from_s, to_s)`. About half the timestamps are whole minutes: those
/// are spread uniformly over their minute (seeded), then all are sorted by time.
pub fn load_trips(
    path: &std::path::Path,
    seed: u64,
    from_s: u64,
    to_s: u64,
) -> Result<Vec<TripRow>> {
    let mut rdr = csv::Reader::from_path(path)
        .with_context(|| format!("cannot read the trips file {}", path.display()))?;
    let headers = rdr.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no column {name}", path.display()))
    };
    let (t, plat, plng, dlat, dlng) = (
        col("pickup_datetime")?,
        col("pickup_latitude")?,
        col("pickup_longitude")?,
        col("dropoff_latitude")?,
        col("dropoff_longitude")?,
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0074_7269_7073);
    let mut out = Vec::new();
    for (n, rec) in rdr.records().enumerate() {
        let rec = rec?;
        let line = n + 2;
        let field = |i: usize| rec.get(i).unwrap_or("");
        let num = |i: usize| -> Result<f64> {
            field(i)
                .parse::<f64>()
                .with_context(|| format!("{}:{line}: not a number: {:?}", path.display(), field(i)))
        };
        let secs = parse_time(field(t))
            .with_context(|| format!("{}:{line}: bad pickup_datetime", path.display()))?;
        // Drawn for every row, so the spread of one trip does not depend on the slice.
        let spread: f64 = rng.random_range(0.0..60.0);
        if secs < from_s || secs >= to_s {
            continue;
        }
        let at = if secs % 60 == 0 {
            secs as f64 + spread
        } else {
            secs as f64
        };
        let pickup = Point::new(num(plat)?, num(plng)?)
            .map_err(|e| anyhow::anyhow!("{}:{line}: pickup: {e}", path.display()))?;
        let dropoff = Point::new(num(dlat)?, num(dlng)?)
            .map_err(|e| anyhow::anyhow!("{}:{line}: dropoff: {e}", path.display()))?;
        out.push(TripRow {
            at_ms: (at * 1000.0).round() as u64,
            pickup,
            dropoff,
        });
    }
    out.sort_by_key(|t| t.at_ms);
    if out.is_empty() {
        bail!("{}: no trips in the replayed hours", path.display());
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS` → seconds after that day's midnight.
fn parse_time(s: &str) -> Option<u64> {
    let time = s.split(' ').nth(1)?;
    let mut it = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (it.next()??, it.next()??, it.next()??);
    (h < 24 && m < 60 && sec < 60).then_some(h * 3600 + m * 60 + sec)
}

/// Runs every configured mode on the same trips; returns the outcomes in order.
pub fn run(args: &ReplayArgs) -> Result<Vec<Outcome>> {
    args.validate()?;
    let from_s = args.from_hour * 3600;
    let to_s = (args.from_hour + args.hours) * 3600;
    let trips = load_trips(&args.trips, args.seed, from_s, to_s)?;
    let mut outs = Vec::new();
    for (name, cfg) in args.configs() {
        let mut o = sim::Sim::new(&cfg, &trips)?.run();
        o.mode = name;
        o.drivers = cfg.drivers;
        o.seed = cfg.seed;
        outs.push(o);
    }
    Ok(outs)
}

/// The text report of one outcome.
pub fn text(o: &Outcome) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "== {} · {} drivers · seed {}", o.mode, o.drivers, o.seed);
    let _ = writeln!(
        s,
        "hour  requests  served%  pickup mean/p50/p90 s   wait mean/p90 s  1st offer mean s  util%  empty km"
    );
    for r in o.hours.iter().chain(std::iter::once(&o.day)) {
        let hour = r.hour.map_or("day ".to_string(), |h| format!("{h:02}h "));
        let _ = writeln!(
            s,
            "{hour} {:>9} {:>8.1} {:>8.0}/{:>4.0}/{:>4.0}      {:>6.0}/{:>5.0}     {:>10.1}   {:>6.1} {:>9.0}",
            r.requests,
            r.served_pct,
            r.pickup_s.mean,
            r.pickup_s.p50,
            r.pickup_s.p90,
            r.wait_s.mean,
            r.wait_s.p90,
            r.to_first_offer_s.mean,
            r.utilisation_pct,
            r.empty_km,
        );
    }
    if o.solve.windows > 0 {
        let v = &o.solve;
        let _ = writeln!(
            s,
            "solver: {} windows, mean batch {}, largest batch {} (group {}), sliced {}, greedy fallback {}, wall p50 {} µs p99 {} µs max {} µs",
            v.windows,
            v.mean_batch,
            v.largest_batch,
            v.largest_group,
            v.groups_sliced,
            v.greedy_fallback,
            v.wall_p50_us,
            v.wall_p99_us,
            v.wall_max_us
        );
    }
    s
}

/// The header of [`markdown_row`]'s table.
pub const MARKDOWN_HEADER: &str = "| drivers | matching | served % | pickup mean s | pickup p90 s | rider wait mean s | request → 1st offer mean s | utilisation % |\n|---:|---|---:|---:|---:|---:|---:|---:|";

/// The README study's row of one outcome.
pub fn markdown_row(o: &Outcome) -> String {
    format!(
        "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
        o.drivers,
        o.mode,
        o.day.served_pct,
        o.day.pickup_s.mean,
        o.day.pickup_s.p90,
        o.day.wait_s.mean,
        o.day.to_first_offer_s.mean,
        o.day.utilisation_pct
    )
}

/// `loadgen replay …` / `replay …`: returns the process exit code.
pub fn main_entry<I: IntoIterator<Item = String>>(argv: I) -> i32 {
    let args = match ReplayArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run_and_write(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("replay: {e:#}");
            2
        }
    }
}

fn run_and_write(args: &ReplayArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let outs = run(args)?;
    if args.markdown && args.markdown_header {
        println!("{MARKDOWN_HEADER}");
    }
    for o in &outs {
        if args.markdown {
            println!("{}", markdown_row(o));
        } else {
            print!("{}", text(o));
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&outs)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &args.html {
        std::fs::write(p, html::page(&outs))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    eprintln!(
        "replay: {} run(s) in {:.1} s",
        outs.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
