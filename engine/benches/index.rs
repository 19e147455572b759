//! Location updates into the per-cell index (`CellDrivers`), at 100 and 1,000 drivers per
//! H3 resolution-7 cell (~5 km²: a quiet and a busy downtown cell).
//!
//! - `index/upsert_small_move/<n>`: an indexed driver moves ~8 m and stays in its cell:
//!   the common location ping. One `CellDrivers::upsert`.
//! - `index/ping_small_move/<n>`: the same plus `Grid::cell_of` of the new position, which
//!   the driver's actor computes for every ping: the engine's whole share of a ping.
//! - `index/cross_cell_move/<n>`: a driver crosses into the neighbouring cell:
//!   `remove` from one `CellDrivers`, `upsert` into the other.
//!
//! Each iteration also clones the driver's `IndexedDriver` (one `String` for its id), as the
//! caller must to hand the index an owned value. Throughput is location updates per second.
//!
//! Run with `cargo bench -p dispatch-engine --bench index`; with `BENCH_CLOCK=cpu` it
//! measures the thread's CPU time instead of wall-clock time (see `common`).

use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use dispatch_engine::{CellDrivers, CellId, DriverId, Grid, IndexedDriver, Point, Product};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CENTRE: (f64, f64) = (45.53, -73.62);
/// About 7.8 m of latitude.
const STEP_DEG: f64 = 0.000_07;
/// How many precomputed (random) driver picks the benchmark loops over.
const PICKS: usize = 4096;

fn grid() -> Grid {
    Grid::new(7).unwrap()
}

/// A uniformly random point inside `cell` (rejection sampling around its centre).
fn point_in(rng: &mut StdRng, cell: CellId) -> Point {
    let c = Grid::centre(cell);
    loop {
        // A res-7 cell's centre-to-vertex distance is ~1.4 km: ±0.015° covers it.
        let p = Point::new(
            c.lat() + rng.random_range(-0.015..0.015),
            c.lng() + rng.random_range(-0.021..0.021),
        )
        .unwrap();
        // Leave room for the small move to stay inside.
        let q = Point::new(p.lat() + STEP_DEG, p.lng()).unwrap();
        if grid().cell_of(p) == cell && grid().cell_of(q) == cell {
            return p;
        }
    }
}

fn driver(i: usize, position: Point) -> IndexedDriver {
    IndexedDriver {
        driver_id: DriverId::new(format!("drv_{i:08}")),
        position,
        heading: Some(90.0),
        product: Product::Economy,
        available: true,
    }
}

/// Indexed drivers that each toggle between their position and one ~8 m north of it,
/// picked in a precomputed random order.
struct Pings {
    drivers: Vec<IndexedDriver>,
    north: Vec<bool>,
    picks: Vec<usize>,
    next: usize,
}

impl Pings {
    /// The next picked driver, moved.
    fn next(&mut self) -> &IndexedDriver {
        let i = self.picks[self.next % PICKS];
        self.next += 1;
        let d = &mut self.drivers[i];
        let step = if self.north[i] { -STEP_DEG } else { STEP_DEG };
        self.north[i] = !self.north[i];
        d.position = Point::new(d.position.lat() + step, d.position.lng()).unwrap();
        d
    }
}

fn bench_small_move<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group(common::group_name("index"));
    group.throughput(Throughput::Elements(1));
    let cell = grid().cell_of(Point::new(CENTRE.0, CENTRE.1).unwrap());
    for n in [100usize, 1_000] {
        let mut rng = StdRng::seed_from_u64(7);
        let drivers: Vec<IndexedDriver> = (0..n)
            .map(|i| driver(i, point_in(&mut rng, cell)))
            .collect();
        let mut index = CellDrivers::for_cell(cell);
        for d in &drivers {
            index.upsert(d.clone());
        }
        let mut pings = Pings {
            drivers,
            north: vec![false; n],
            picks: (0..PICKS).map(|_| rng.random_range(0..n)).collect(),
            next: 0,
        };
        group.bench_function(BenchmarkId::new("upsert_small_move", n), |b| {
            b.iter(|| {
                index.upsert(black_box(pings.next().clone()));
            })
        });
        // The same, plus finding the ping's H3 cell (which the driver's actor does for
        // every ping to know which cell to send it to): the engine's whole share of a ping.
        let grid = grid();
        group.bench_function(BenchmarkId::new("ping_small_move", n), |b| {
            b.iter(|| {
                let d = pings.next();
                let at = grid.cell_of(black_box(d.position));
                debug_assert_eq!(at, cell);
                black_box(at);
                index.upsert(black_box(d.clone()));
            })
        });
        debug_assert!(index.check_invariants().is_ok());
        assert_eq!(index.len(), n);
    }
    group.finish();
}

fn bench_cross_cell<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group(common::group_name("index"));
    group.throughput(Throughput::Elements(1));
    let a = grid().cell_of(Point::new(CENTRE.0, CENTRE.1).unwrap());
    let b_cell = grid().ring(a, 1)[0];
    for n in [100usize, 1_000] {
        let mut rng = StdRng::seed_from_u64(11);
        let mut cells = [CellDrivers::for_cell(a), CellDrivers::for_cell(b_cell)];
        // Driver i starts in cell i % 2 and has a position ready in each cell.
        let homes: Vec<[IndexedDriver; 2]> = (0..2 * n)
            .map(|i| {
                let pa = point_in(&mut rng, a);
                let pb = point_in(&mut rng, b_cell);
                [driver(i, pa), driver(i, pb)]
            })
            .collect();
        let mut at: Vec<usize> = (0..2 * n).map(|i| i % 2).collect();
        for (i, h) in homes.iter().enumerate() {
            cells[at[i]].upsert(h[at[i]].clone());
        }
        // A fifth of each cell's drivers go back and forth; the populations stay near n.
        let movers = 2 * n / 5;
        let picks: Vec<usize> = (0..PICKS).map(|_| rng.random_range(0..movers)).collect();
        let mut j = 0;
        group.bench_function(BenchmarkId::new("cross_cell_move", n), |b| {
            b.iter(|| {
                let i = picks[j % PICKS];
                j += 1;
                let (from, to) = (at[i], 1 - at[i]);
                let removed = cells[from].remove(&homes[i][from].driver_id);
                debug_assert!(removed);
                cells[to].upsert(black_box(homes[i][to].clone()));
                at[i] = to;
            })
        });
        for (k, cell) in cells.iter().enumerate() {
            debug_assert!(cell.check_invariants().is_ok());
            assert_eq!(cell.len(), at.iter().filter(|&&x| x == k).count());
        }
    }
    group.finish();
}

common::bench_main! {
    measurement = Duration::from_secs(2);
    targets = bench_small_move, bench_cross_cell
}
