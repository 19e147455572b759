//! What a replay measured: per hour of request and for the whole slice.

use std::time::Duration;

use dispatch_engine::BatchStats;
use serde::Serialize;

/// Pickup-time histogram: 30 s bins up to 20 minutes (the last bin holds the rest).
pub const BIN_S: u64 = 30;
pub const BINS: usize = 40;

#[derive(Debug, Clone, Default)]
struct TripRec {
    requested_ms: u64,
    first_offer_ms: Option<u64>,
    assigned_ms: Option<u64>,
    arrived_ms: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct HourAcc {
    online_samples: u64,
    busy_samples: u64,
    empty_m: f64,
    loaded_m: f64,
}

/// Collects the raw material while the simulation runs.
#[derive(Debug)]
pub struct Recorder {
    from_s: u64,
    hours: usize,
    trips: Vec<TripRec>,
    acc: Vec<HourAcc>,
    solve: SolveAcc,
}

#[derive(Debug, Default)]
struct SolveAcc {
    windows: u64,
    requests: u64,
    largest_batch: u64,
    largest_group: u64,
    groups_sliced: u64,
    greedy_fallback: u64,
    work: u64,
    wall_us: Vec<u64>,
}

/// Summary statistics of a list of seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Self {
            n: v.len(),
            mean: round1(mean),
            p50: round1(q(0.5)),
            p90: round1(q(0.9)),
            max: round1(v[v.len() - 1]),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// One hour of requests (or the whole slice).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    /// Hour of the day (local time); `None` for the whole slice.
    pub hour: Option<u64>,
    pub requests: usize,
    /// Requests that had a driver accept within the dispatch deadline.
    pub served: usize,
    pub served_pct: f64,
    /// Seconds from the driver's acceptance to its arrival at the pickup.
    pub pickup_s: Dist,
    /// Seconds from the request to the driver's arrival.
    pub wait_s: Dist,
    /// Seconds from the request to its first offer.
    pub to_first_offer_s: Dist,
    /// Share of on-shift driver time spent on a trip (to pickup, boarding, riding).
    pub utilisation_pct: f64,
    /// Kilometres driven without a rider: cruising and to the pickup.
    pub empty_km: f64,
    pub loaded_km: f64,
}

/// The solver, over every window (batch mode only).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Solve {
    pub windows: u64,
    pub mean_batch: f64,
    pub largest_batch: u64,
    pub largest_group: u64,
    pub groups_sliced: u64,
    pub greedy_fallback: u64,
    pub work: u64,
    /// Wall time of one window's assignment, microseconds (measured: not reproducible).
    pub wall_p50_us: u64,
    pub wall_p99_us: u64,
    pub wall_max_us: u64,
}

/// A finished replay of one mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub mode: String,
    pub drivers: usize,
    pub seed: u64,
    pub day: Row,
    pub hours: Vec<Row>,
    pub solve: Solve,
    /// Pickup times in `BIN_S`-second bins.
    pub pickup_hist: Vec<u64>,
}

impl Outcome {
    /// The outcome without what is measured rather than simulated (the solver's wall
    /// time): two runs with the same seed must agree on this exactly.
    pub fn reproducible(&self) -> Outcome {
        let mut o = self.clone();
        o.solve.wall_p50_us = 0;
        o.solve.wall_p99_us = 0;
        o.solve.wall_max_us = 0;
        o
    }
}

impl Recorder {
    pub fn new(from_s: u64, to_s: u64, trips: usize) -> Self {
        let hours = (to_s.saturating_sub(from_s)).div_ceil(3600).max(1) as usize;
        Self {
            from_s,
            hours,
            trips: vec![TripRec::default(); trips],
            acc: vec![HourAcc::default(); hours],
            solve: SolveAcc::default(),
        }
    }

    fn hour_idx(&self, now_ms: u64) -> usize {
        ((now_ms / 1000).saturating_sub(self.from_s) / 3600).min(self.hours as u64 - 1) as usize
    }

    pub fn requested(&mut self, i: usize, now: u64) {
        self.trips[i].requested_ms = now;
    }
    pub fn offered(&mut self, i: usize, now: u64) {
        self.trips[i].first_offer_ms.get_or_insert(now);
    }
    pub fn assigned(&mut self, i: usize, now: u64, _eta_s: f64, distance_m: f64) {
        self.trips[i].assigned_ms = Some(now);
        let h = self.hour_idx(now);
        self.acc[h].empty_m += distance_m;
    }
    pub fn arrived(&mut self, i: usize, now: u64) {
        self.trips[i].arrived_ms = Some(now);
    }
    pub fn loaded(&mut self, now: u64, distance_m: f64) {
        let h = self.hour_idx(now);
        self.acc[h].loaded_m += distance_m;
    }
    pub fn finished(&mut self, _i: usize, _now: u64, _completed: bool) {}
    pub fn cruised(&mut self, now: u64, m: f64) {
        let h = self.hour_idx(now);
        self.acc[h].empty_m += m;
    }
    pub fn sample(&mut self, now: u64, online: u64, busy: u64) {
        let h = self.hour_idx(now);
        self.acc[h].online_samples += online;
        self.acc[h].busy_samples += busy;
    }
    pub fn window(&mut self, _now: u64, batch: usize, stats: &BatchStats, wall: Duration) {
        let s = &mut self.solve;
        s.windows += 1;
        s.requests += batch as u64;
        s.largest_batch = s.largest_batch.max(batch as u64);
        s.largest_group = s.largest_group.max(u64::from(stats.largest_group));
        s.groups_sliced += u64::from(stats.groups_sliced);
        s.greedy_fallback += u64::from(stats.greedy_fallback);
        s.work += stats.work;
        s.wall_us.push(wall.as_micros() as u64);
    }

    fn row(&self, hour: Option<u64>, trips: &[&TripRec], acc: &[&HourAcc]) -> Row {
        let served: Vec<&&TripRec> = trips.iter().filter(|t| t.assigned_ms.is_some()).collect();
        let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
        let pickup = served
            .iter()
            .filter_map(|t| Some(secs(t.assigned_ms?, t.arrived_ms?)))
            .collect();
        let wait = served
            .iter()
            .filter_map(|t| Some(secs(t.requested_ms, t.arrived_ms?)))
            .collect();
        let first = trips
            .iter()
            .filter_map(|t| Some(secs(t.requested_ms, t.first_offer_ms?)))
            .collect();
        let online: u64 = acc.iter().map(|a| a.online_samples).sum();
        let busy: u64 = acc.iter().map(|a| a.busy_samples).sum();
        let pct = |a: f64, b: f64| if b > 0.0 { round1(100.0 * a / b) } else { 0.0 };
        Row {
            hour,
            requests: trips.len(),
            served: served.len(),
            served_pct: pct(served.len() as f64, trips.len() as f64),
            pickup_s: Dist::of(pickup),
            wait_s: Dist::of(wait),
            to_first_offer_s: Dist::of(first),
            utilisation_pct: pct(busy as f64, online as f64),
            empty_km: round1(acc.iter().map(|a| a.empty_m).sum::<f64>() / 1000.0),
            loaded_km: round1(acc.iter().map(|a| a.loaded_m).sum::<f64>() / 1000.0),
        }
    }

    pub fn finish(self) -> Outcome {
        let all: Vec<&TripRec> = self.trips.iter().collect();
        let acc_all: Vec<&HourAcc> = self.acc.iter().collect();
        let day = self.row(None, &all, &acc_all);
        let hours = (0..self.hours)
            .map(|h| {
                let trips: Vec<&TripRec> = self
                    .trips
                    .iter()
                    .filter(|t| self.hour_idx(t.requested_ms) == h)
                    .collect();
                let hour = (self.from_s / 3600 + h as u64) % 24;
                self.row(Some(hour), &trips, &[&self.acc[h]])
            })
            .collect();
        let mut hist = vec![0u64; BINS];
        for t in &self.trips {
            if let (Some(a), Some(b)) = (t.assigned_ms, t.arrived_ms) {
                let bin = (b.saturating_sub(a) / 1000 / BIN_S) as usize;
                hist[bin.min(BINS - 1)] += 1;
            }
        }
        let s = &self.solve;
        let mut wall = s.wall_us.clone();
        wall.sort_unstable();
        let q = |p: f64| {
            wall.get(((wall.len().saturating_sub(1)) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let solve = Solve {
            windows: s.windows,
            mean_batch: if s.windows > 0 {
                round1(s.requests as f64 / s.windows as f64)
            } else {
                0.0
            },
            largest_batch: s.largest_batch,
            largest_group: s.largest_group,
            groups_sliced: s.groups_sliced,
            greedy_fallback: s.greedy_fallback,
            work: s.work,
            wall_p50_us: q(0.5),
            wall_p99_us: q(0.99),
            wall_max_us: wall.last().copied().unwrap_or(0),
        };
        Outcome {
            mode: String::new(),
            drivers: 0,
            seed: 0,
            day,
            hours,
            solve,
            pickup_hist: hist,
        }
    }
}
