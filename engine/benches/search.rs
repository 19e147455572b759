//! What a ride request costs in the engine, over a city of drivers indexed per H3
//! resolution-7 cell in a `HashMap<CellId, CellDrivers>`:
//!
//! - `search/nearest10/<n>`: `search::search_map` for the 10 nearest available Economy
//!   drivers within 5 km (`SearchParams::default()`: k = 10, 5 km, at most 8 rings).
//! - `search/request_ranked/<n>`: a whole request: `Trip::start`, the same search, and
//!   `Trip::apply(TripCommand::Candidates(..))`, which ranks by ETA and makes the first offer.
//!
//! Cities (drivers uniform over a square around 45.53, -73.62; 70 % Economy, 20 % XL,
//! 10 % Premium; 60 % available, the rest busy but indexed):
//! - 10k drivers on 20 × 20 km (25 drivers/km², ~115 per occupied cell: 88 cells, some
//!   of them cut by the square's edge);
//! - 100k drivers on 20 × 20 km (250/km², ~1,140 per occupied cell);
//! - 1M drivers on 63.2 × 63.2 km (4,000 km², the same 250/km² as 100k: a search only
//!   touches the cells near its pickup, so this isolates the effect of the index's total
//!   size, i.e. cache misses, from that of density; 773 cells, ~1,290 drivers each).
//!
//! Pickups are uniform over the square less 2 km at each edge. Throughput is requests
//! (searches) per second. Run with `cargo bench -p dispatch-engine --bench search`;
//! `SEARCH_SIZES=10000,100000` picks the city sizes, and `BENCH_CLOCK=cpu` measures the
//! thread's CPU time instead of wall-clock time (see `common`).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use dispatch_engine::search::search_map;
use dispatch_engine::{
    CellDrivers, CellId, DispatchConfig, DriverId, Grid, IndexedDriver, Point, Product, RiderId,
    SearchParams, SearchStats, StraightLineEta, Trip, TripCommand, TripEffect, TripId, Wanted,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CENTRE: (f64, f64) = (45.53, -73.62);
const M_PER_DEG_LAT: f64 = 111_195.0;
const PICKUPS: usize = 1024;

struct City {
    grid: Grid,
    cells: HashMap<CellId, CellDrivers>,
    pickups: Vec<Point>,
}

fn half_extent_deg(side_m: f64) -> (f64, f64) {
    let half_lat = side_m / 2.0 / M_PER_DEG_LAT;
    let half_lng = half_lat / CENTRE.0.to_radians().cos();
    (half_lat, half_lng)
}

fn city(n: usize, side_m: f64) -> City {
    let grid = Grid::new(7).unwrap();
    let mut rng = StdRng::seed_from_u64(n as u64);
    let (hl, hg) = half_extent_deg(side_m);
    let mut cells: HashMap<CellId, CellDrivers> = HashMap::new();
    for i in 0..n {
        let p = Point::new(
            CENTRE.0 + rng.random_range(-hl..hl),
            CENTRE.1 + rng.random_range(-hg..hg),
        )
        .unwrap();
        let product = match rng.random_range(0..10) {
            0..7 => Product::Economy,
            7..9 => Product::Xl,
            _ => Product::Premium,
        };
        let d = IndexedDriver {
            driver_id: DriverId::new(format!("drv_{i:08}")),
            position: p,
            heading: Some(rng.random_range(0.0..360.0)),
            product,
            available: rng.random_bool(0.6),
        };
        let cell = grid.cell_of(p);
        cells
            .entry(cell)
            .or_insert_with(|| CellDrivers::for_cell(cell))
            .upsert(d);
    }
    let (il, ig) = half_extent_deg(side_m - 4_000.0);
    let pickups = (0..PICKUPS)
        .map(|_| {
            Point::new(
                CENTRE.0 + rng.random_range(-il..il),
                CENTRE.1 + rng.random_range(-ig..ig),
            )
            .unwrap()
        })
        .collect();
    City {
        grid,
        cells,
        pickups,
    }
}

/// What the server's searches ask for (its `SearchFilter` rules out drivers the same way).
const WANTED: Wanted = Wanted {
    product: Some(Product::Economy),
    available_only: true,
};

fn sizes() -> Vec<usize> {
    std::env::var("SEARCH_SIZES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000])
}

fn label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Averages of what the searches touched, printed once per city for the record.
fn describe(n: usize, city: &City) {
    let mut total = SearchStats::default();
    let mut found = 0;
    let mut kth_m = 0.0;
    for &p in &city.pickups {
        let (c, s) = search_map(city.grid, &city.cells, p, SearchParams::default(), WANTED);
        assert_eq!(c.len(), 10, "a search at {p:?} found {}", c.len());
        found += c.len();
        kth_m += c.last().map_or(0.0, |c| c.distance_m);
        total.rings += s.rings;
        total.cells_searched += s.cells_searched;
        total.drivers_examined += s.drivers_examined;
    }
    let q = city.pickups.len() as f64;
    let per_cell = n as f64 / city.cells.len() as f64;
    eprintln!(
        "city {}: {} occupied cells, {per_cell:.0} drivers/cell; per search: {:.2} rings, \
         {:.2} cells, {:.1} drivers examined, {:.1} found, 10th nearest at {:.0} m",
        label(n),
        city.cells.len(),
        total.rings as f64 / q,
        total.cells_searched as f64 / q,
        total.drivers_examined as f64 / q,
        found as f64 / q,
        kth_m / q,
    );
}

fn bench_search<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group(common::group_name("search"));
    group.throughput(Throughput::Elements(1));
    let params = SearchParams::default();
    let cfg = DispatchConfig::default();
    let eta = StraightLineEta::default();
    let quote = common::fixtures::quote();
    let (trip_id, rider_id) = (TripId::new("trp_bench"), RiderId::new("rdr_bench"));
    for n in sizes() {
        let side_m = if n > 100_000 { 63_246.0 } else { 20_000.0 };
        let city = city(n, side_m);
        describe(n, &city);

        let mut j = 0;
        group.bench_function(BenchmarkId::new("nearest10", label(n)), |b| {
            b.iter(|| {
                let p = city.pickups[j % PICKUPS];
                j += 1;
                black_box(search_map(city.grid, &city.cells, p, params, WANTED))
            })
        });

        let mut j = 0;
        group.bench_function(BenchmarkId::new("request_ranked", label(n)), |b| {
            b.iter(|| {
                let p = city.pickups[j % PICKUPS];
                j += 1;
                let dropoff = Point::new(p.lat() + 0.02, p.lng()).unwrap();
                let start = Trip::start(
                    trip_id.clone(),
                    rider_id.clone(),
                    Product::Economy,
                    p,
                    dropoff,
                    quote.clone(),
                    1_000,
                    &cfg,
                );
                let (mut trip, fx) = (start.trip, start.effects);
                debug_assert!(fx.iter().any(|e| matches!(e, TripEffect::Search { .. })));
                let (found, _) = search_map(city.grid, &city.cells, p, params, WANTED);
                let fx = trip
                    .apply(TripCommand::Candidates(found), 1_000, &cfg, &eta)
                    .unwrap();
                debug_assert!(matches!(fx[0], TripEffect::SendOffer(_)));
                black_box((trip, fx))
            })
        });
    }
    group.finish();
}

common::bench_main! {
    measurement = Duration::from_secs(3);
    targets = bench_search
}
