//! Candidate search: the pickup cell first, then growing rings of cells, until enough
//! matching drivers are found *and* no unsearched cell could hold a closer one, or the
//! radius or ring cap is reached.
//!
//! [`RingSearch`] is a planner: it says which cells to look at next and takes back what
//! each cell held, so the cells can live anywhere (a map in a test, an actor per cell in
//! the server). Every ring fully encloses the rings inside it, so the straight line from
//! the pickup to any point beyond ring `r` crosses ring `r`: the smallest lower-bound
//! distance over ring `r`'s cells bounds everything further out, which makes the result
//! exactly the `k` nearest matching drivers within the radius.

use std::collections::HashMap;

use crate::geo::{CellId, Grid, Point, min_distance_outside_m, outside_disk_m, ring_disks};
use crate::index::{CellDrivers, DriverFilter, IndexedDriver};

/// Bounds on one search. Each is a named limit so a request can never scan the city.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchParams {
    /// How many candidates to return.
    pub k: usize,
    /// Drivers further than this from the pickup are never candidates.
    pub max_radius_m: f64,
    /// The most rings around the pickup cell that are searched.
    pub max_rings: u32,
}

impl Default for SearchParams {
    fn default() -> Self {
        Self {
            k: 10,
            max_radius_m: 5_000.0,
            max_rings: 8,
        }
    }
}

/// A driver that may be offered a trip, with its straight-line distance to the pickup.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Candidate {
    pub driver: IndexedDriver,
    pub distance_m: f64,
}

/// What a search touched: the evidence that it stays local.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SearchStats {
    pub rings: u32,
    pub cells_searched: u32,
    pub drivers_examined: u64,
    /// The search stopped at `max_rings` before it could prove it had the nearest.
    pub hit_ring_cap: bool,
}

/// A ring-by-ring search in progress.
#[derive(Debug)]
pub struct RingSearch {
    grid: Grid,
    pickup: Point,
    pickup_xyz: [f64; 3],
    origin: CellId,
    params: SearchParams,
    next_ring: u32,
    /// The current ring's cells with the lower bound on their distance, computed once.
    ring: Vec<(CellId, f64)>,
    found: Vec<Candidate>,
    done: bool,
    stats: SearchStats,
}

impl RingSearch {
    pub fn new(grid: Grid, pickup: Point, params: SearchParams) -> Self {
        Self {
            grid,
            pickup,
            pickup_xyz: pickup.unit_vector(),
            origin: grid.cell_of(pickup),
            params,
            next_ring: 0,
            ring: Vec::new(),
            found: Vec::new(),
            done: params.k == 0,
            stats: SearchStats::default(),
        }
    }

    pub fn pickup(&self) -> Point {
        self.pickup
    }

    pub fn params(&self) -> SearchParams {
        self.params
    }

    /// The cells of the next ring to query, or `None` when the search is over.
    pub fn next_cells(&mut self) -> Option<Vec<CellId>> {
        if self.done {
            return None;
        }
        if self.next_ring > self.params.max_rings {
            self.stats.hit_ring_cap = self.found.len() < self.params.k;
            self.done = true;
            return None;
        }
        let ring = self.next_ring;
        self.ring.clear();
        self.ring
            .extend(ring_disks(self.grid, self.origin, ring).iter().map(
                |&(c, centre, radius_m)| {
                    let bound = if c == self.origin {
                        0.0
                    } else {
                        outside_disk_m(self.pickup_xyz, centre, radius_m)
                    };
                    (c, bound)
                },
            ));
        let cells = self.ring.iter().map(|c| c.0).collect();
        // Everything in this ring and beyond is at least this far away.
        let bound = self.ring.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
        if bound > self.params.max_radius_m || bound > self.kth_m() {
            self.done = true;
            return None;
        }
        self.next_ring += 1;
        self.stats.rings = self.next_ring;
        Some(cells)
    }

    /// The distance of the k-th candidate found so far, or infinity before there are k.
    fn kth_m(&self) -> f64 {
        if self.found.len() >= self.params.k {
            self.found[self.params.k - 1].distance_m
        } else {
            f64::INFINITY
        }
    }

    /// Whether a cell of the current ring could hold a candidate: no point of it is
    /// further than the radius or the k-th candidate found so far. A cell that could not
    /// need not be asked (the ring's stopping rule is unaffected: it uses every cell).
    pub fn worth_querying(&self, cell: CellId) -> bool {
        let bound = match self.ring.iter().find(|c| c.0 == cell) {
            Some(c) => c.1,
            None if cell == self.origin => 0.0,
            None => min_distance_outside_m(self.pickup_xyz, cell),
        };
        bound <= self.params.max_radius_m && bound <= self.kth_m()
    }

    /// How far a cell asked now need look: the radius, or the k-th candidate found so
    /// far if nearer (a driver exactly that far is still wanted, for the tie by id).
    pub fn query_radius_m(&self) -> f64 {
        self.params.max_radius_m.min(self.kth_m())
    }

    /// Takes back what one cell of the current ring held: its `k` nearest matches.
    pub fn add(&mut self, candidates: Vec<Candidate>, examined: usize) {
        self.stats.cells_searched += 1;
        self.stats.drivers_examined += examined as u64;
        self.found.extend(candidates);
        self.found.sort_by(|a, b| {
            a.distance_m
                .total_cmp(&b.distance_m)
                .then_with(|| a.driver.driver_id.cmp(&b.driver.driver_id))
        });
        self.found.truncate(self.params.k);
    }

    /// Queries one cell's drivers the way every cell should be queried.
    pub fn query_cell(
        &self,
        cell: &CellDrivers,
        filter: &mut impl DriverFilter,
    ) -> (Vec<Candidate>, usize) {
        let (got, examined) = cell.nearest_to(
            self.pickup,
            self.pickup_xyz,
            self.params.k,
            self.query_radius_m(),
            filter,
        );
        (
            got.into_iter()
                .map(|(driver, distance_m)| Candidate { driver, distance_m })
                .collect(),
            examined,
        )
    }

    pub fn stats(&self) -> SearchStats {
        self.stats
    }

    /// The nearest first, at most `k`.
    pub fn finish(self) -> (Vec<Candidate>, SearchStats) {
        (self.found, self.stats)
    }
}

/// Runs a whole search over cells held in a map (tests, benchmarks, the simulation).
pub fn search_map(
    grid: Grid,
    cells: &HashMap<CellId, CellDrivers>,
    pickup: Point,
    params: SearchParams,
    mut filter: impl DriverFilter,
) -> (Vec<Candidate>, SearchStats) {
    let mut s = RingSearch::new(grid, pickup, params);
    while let Some(ring) = s.next_cells() {
        for cell in ring {
            if let Some(drivers) = cells.get(&cell)
                && s.worth_querying(cell)
            {
                let (c, examined) = s.query_cell(drivers, &mut filter);
                s.add(c, examined);
            }
        }
    }
    s.finish()
}
