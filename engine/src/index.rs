//! The drivers of one H3 cell, bucketed on a small grid laid over the cell: O(1) insert,
//! move and remove, and a nearest search that reads only the buckets near the pickup.
//!
//! Points are stored as unit vectors on the sphere, so Euclidean (chord) order is exactly
//! the great-circle order (see [`Point::unit_vector`]). The cell's drivers are kept in
//! [`SIDE`] × [`SIDE`] buckets of a square grid on the plane tangent to the cell's centre
//! (a resolution-7 cell, ~5 km², gets buckets ~165 m wide). Projecting onto a plane never
//! lengthens a distance, so the distance from the pickup's projection to a bucket's
//! rectangle is a lower bound on the chord to any driver in it: the search scans the
//! pickup's bucket, then square rings of buckets around it, skips any bucket no nearer
//! than the k-th found so far, and stops at the first ring that cannot be. The edge
//! buckets reach to infinity, so a point outside the grid (or a pickup outside the cell)
//! is still found and bounded exactly. Each bucket is a flat array of 32-byte slots (unit
//! vector, product and availability in one byte, the driver's index); a move within a
//! bucket is an overwrite in place, a move across buckets a swap-remove and a push. The
//! search reads a driver's record only for the few that make the cut.

use std::collections::HashMap;

use crate::fare::Product;
use crate::geo::{Haversine, Point, m_to_chord};
use crate::ids::DriverId;

/// One driver as the cell index sees it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IndexedDriver {
    pub driver_id: DriverId,
    pub position: Point,
    pub heading: Option<f64>,
    pub product: Product,
    /// Only available drivers are candidates; busy ones stay indexed for the map.
    pub available: bool,
}

/// What a search keeps. [`quick`](DriverFilter::quick) sees only what the index stores
/// beside each vector (product and availability), so most drivers are ruled out without
/// touching their records; [`keep`](DriverFilter::keep) is asked only about the drivers
/// that pass it, and has the last word. Any `FnMut(&IndexedDriver) -> bool` is a filter.
pub trait DriverFilter {
    fn quick(&self, _product: Product, _available: bool) -> bool {
        true
    }
    fn keep(&mut self, d: &IndexedDriver) -> bool;
}

impl<F: FnMut(&IndexedDriver) -> bool> DriverFilter for F {
    fn keep(&mut self, d: &IndexedDriver) -> bool {
        self(d)
    }
}

/// The usual filter: drivers of one product (or any), available ones only or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub product: Option<Product>,
    pub available_only: bool,
}

impl DriverFilter for Wanted {
    fn quick(&self, product: Product, available: bool) -> bool {
        (!self.available_only || available) && self.product.is_none_or(|p| p == product)
    }
    /// `quick` said everything: the record need not be read (a cache miss per driver).
    fn keep(&mut self, _d: &IndexedDriver) -> bool {
        true
    }
}

/// Buckets along each side of a cell's grid (so `SIDE * SIDE` buckets per cell).
pub const SIDE: usize = 16;

/// The half-width of the grid of a cell made with [`CellDrivers::new`], which does not know
/// its cell: centred on the first driver it holds, wide enough that a resolution-7 cell
/// (centre-to-vertex ~1.4 km) fits whichever of its points that driver is at.
const DEFAULT_HALF_M: f64 = 3_000.0;

/// Rounding allowances, so that bounds computed in floating point stay bounds: a bucket's
/// rectangle is moved this much closer (in unit-sphere units, ~6 µm), and a squared chord
/// limit is widened by this relative and absolute amount before it rules anything out.
const PLANE_EPS: f64 = 1e-12;
const D2_REL: f64 = 1e-9;
const D2_ABS: f64 = 1e-24;

fn widen(d2: f64) -> f64 {
    d2 + d2 * D2_REL + D2_ABS
}

/// Product and availability in one byte: `2 * product's place in Product::ALL + available`.
fn class_of(product: Product, available: bool) -> u8 {
    let p = Product::ALL.iter().position(|&x| x == product).unwrap_or(0) as u8;
    2 * p + u8::from(available)
}

/// Which classes a filter's `quick` admits, one bit each: asked once per search, not per
/// driver.
fn admitted(filter: &impl DriverFilter) -> u8 {
    let mut mask = 0u8;
    for product in Product::ALL {
        for available in [false, true] {
            if filter.quick(product, available) {
                mask |= 1 << class_of(product, available);
            }
        }
    }
    mask
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// A square grid of `SIDE` × `SIDE` buckets on a plane through the sphere's centre.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Frame {
    /// Orthonormal axes of the plane (east and north at its centre).
    east: [f64; 3],
    north: [f64; 3],
    /// Plane coordinates of the grid's lower corner, and a bucket's width.
    x0: f64,
    y0: f64,
    w: f64,
    /// `1 / w`: a ping multiplies rather than divides.
    per_w: f64,
}

impl Frame {
    /// A grid centred on the unit vector `c`, reaching `half` (unit-sphere units) each way.
    fn around(c: [f64; 3], half: f64) -> Self {
        let r = (c[0] * c[0] + c[1] * c[1]).sqrt();
        // At a pole any pair of axes perpendicular to it will do.
        let (east, north) = if r < 1e-12 {
            ([0.0, 1.0, 0.0], [-1.0, 0.0, 0.0])
        } else {
            let (cos_l, sin_l) = (c[0] / r, c[1] / r);
            ([-sin_l, cos_l, 0.0], [-c[2] * cos_l, -c[2] * sin_l, r])
        };
        let w = 2.0 * half / SIDE as f64;
        Self {
            east,
            north,
            x0: dot(c, east) - half,
            y0: dot(c, north) - half,
            w,
            per_w: 1.0 / w,
        }
    }

    fn plane(&self, v: [f64; 3]) -> (f64, f64) {
        (dot(v, self.east), dot(v, self.north))
    }

    /// The bucket column or row of a plane coordinate (the edge ones take everything
    /// beyond them).
    fn index(&self, t: f64, t0: f64) -> usize {
        let i = (t - t0) * self.per_w;
        // For i >= 0 the cast's truncation is the floor (without a call to libm's
        // `floor`, which the baseline x86-64 target needs); NaN and below 0 are column 0.
        if i >= 0.0 {
            (i as usize).min(SIDE - 1)
        } else {
            0
        }
    }

    fn bucket_of(&self, v: [f64; 3]) -> u32 {
        let (x, y) = self.plane(v);
        (self.index(y, self.y0) * SIDE + self.index(x, self.x0)) as u32
    }

    /// How far a plane coordinate `t` is outside band `i` (the edge bands are unbounded).
    fn gap(&self, t: f64, t0: f64, i: usize) -> f64 {
        let lo = if i == 0 {
            f64::NEG_INFINITY
        } else {
            t0 + i as f64 * self.w
        };
        let hi = if i == SIDE - 1 {
            f64::INFINITY
        } else {
            t0 + (i + 1) as f64 * self.w
        };
        ((lo - t).max(t - hi) - PLANE_EPS).max(0.0)
    }

    /// A lower bound on the squared chord from `(x, y)`'s point to any point in a bucket.
    fn bucket_d2(&self, x: f64, y: f64, ix: usize, iy: usize) -> f64 {
        let (dx, dy) = (self.gap(x, self.x0, ix), self.gap(y, self.y0, iy));
        dx * dx + dy * dy
    }
}

/// What the scan reads for each driver: 32 bytes, contiguous within a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    xyz: [f64; 3],
    /// The driver's index in `CellDrivers::drivers`.
    driver: u32,
    class: u8,
}

impl Slot {
    fn of(d: &IndexedDriver, driver: u32) -> Self {
        Self::at(d, d.position.unit_vector(), driver)
    }

    /// [`Slot::of`] with the unit vector already computed.
    fn at(d: &IndexedDriver, xyz: [f64; 3], driver: u32) -> Self {
        Self {
            xyz,
            driver,
            class: class_of(d.product, d.available),
        }
    }
}

/// The nearest `k` so far, as (squared chord, driver index), ascending; entries tied with
/// the k-th (within rounding) are kept too, so the final order can break ties by id.
struct Nearest {
    k: usize,
    bound: f64,
    best: Vec<(f64, u32)>,
}

impl Nearest {
    fn push(&mut self, d2: f64, i: u32) {
        let at = self.best.partition_point(|&(t, _)| t <= d2);
        self.best.insert(at, (d2, i));
        if self.best.len() >= self.k {
            let limit = widen(self.best[self.k - 1].0);
            while self.best.last().is_some_and(|&(t, _)| t > limit) {
                self.best.pop();
            }
            self.bound = self.bound.min(limit);
        }
    }
}

/// The drivers currently inside one cell. `drivers` is dense (removal swaps the last one
/// in); `at[i]` is where `drivers[i]`'s slot is (bucket, place in it); `slot` maps an id
/// to its index.
#[derive(Debug, Default)]
pub struct CellDrivers {
    drivers: Vec<IndexedDriver>,
    at: Vec<(u32, u32)>,
    slot: HashMap<DriverId, u32>,
    /// `SIDE * SIDE` buckets once the frame is set, row by row.
    buckets: Vec<Vec<Slot>>,
    frame: Option<Frame>,
    /// The frame was given by the cell ([`CellDrivers::for_cell`]) rather than taken from
    /// the first driver (which is redone whenever the cell empties).
    fixed: bool,
}

impl CellDrivers {
    /// An index whose grid is centred on the first driver it holds and sized for a
    /// resolution-7 cell. Any points are answered exactly; [`CellDrivers::for_cell`]
    /// fits the grid to the cell, so the buckets share its drivers evenly.
    pub fn new() -> Self {
        Self::default()
    }

    /// An index for the drivers of `cell`, its grid laid over the cell.
    pub fn for_cell(cell: crate::geo::CellId) -> Self {
        let (centre, radius_m) = crate::geo::cell_disk(cell);
        let half = m_to_chord(radius_m * 1.02 + 1.0);
        Self {
            frame: Some(Frame::around(centre, half)),
            fixed: true,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.drivers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.drivers.is_empty()
    }

    pub fn contains(&self, id: &DriverId) -> bool {
        self.slot.contains_key(id)
    }

    pub fn get(&self, id: &DriverId) -> Option<&IndexedDriver> {
        self.slot.get(id).map(|&i| &self.drivers[i as usize])
    }

    /// The frame, set up (with its buckets) on first use.
    fn frame_for(&mut self, first: [f64; 3]) -> Frame {
        let frame = match self.frame {
            Some(f) => f,
            None => Frame::around(first, m_to_chord(DEFAULT_HALF_M)),
        };
        self.frame = Some(frame);
        if self.buckets.is_empty() {
            self.buckets.resize_with(SIDE * SIDE, Vec::new);
        }
        frame
    }

    /// Takes the slot at `(bucket, place)` out, swapping its bucket's last slot in.
    fn take_slot(&mut self, (bucket, place): (u32, u32)) {
        let b = &mut self.buckets[bucket as usize];
        b.swap_remove(place as usize);
        if let Some(moved) = b.get(place as usize) {
            self.at[moved.driver as usize].1 = place;
        }
    }

    fn put_slot(&mut self, bucket: u32, slot: Slot) -> (u32, u32) {
        let b = &mut self.buckets[bucket as usize];
        let place = u32::try_from(b.len()).expect("fewer than 2^32 drivers in a cell");
        b.push(slot);
        (bucket, place)
    }

    /// Inserts a driver or replaces its entry in place (a move or a status change).
    pub fn upsert(&mut self, driver: IndexedDriver) {
        let xyz = driver.position.unit_vector();
        let frame = self.frame_for(xyz);
        let bucket = frame.bucket_of(xyz);
        match self.slot.get(&driver.driver_id) {
            Some(&i) => {
                let slot = Slot::at(&driver, xyz, i);
                let was = self.at[i as usize];
                if was.0 == bucket {
                    self.buckets[bucket as usize][was.1 as usize] = slot;
                } else {
                    self.take_slot(was);
                    self.at[i as usize] = self.put_slot(bucket, slot);
                }
                self.drivers[i as usize] = driver;
            }
            None => {
                let i =
                    u32::try_from(self.drivers.len()).expect("fewer than 2^32 drivers in a cell");
                let at = self.put_slot(bucket, Slot::at(&driver, xyz, i));
                self.slot.insert(driver.driver_id.clone(), i);
                self.at.push(at);
                self.drivers.push(driver);
            }
        }
    }

    /// Removes a driver; returns whether it was there.
    pub fn remove(&mut self, id: &DriverId) -> bool {
        let Some(i) = self.slot.remove(id) else {
            return false;
        };
        let i = i as usize;
        self.take_slot(self.at[i]);
        self.drivers.swap_remove(i);
        self.at.swap_remove(i);
        if let Some(moved) = self.drivers.get(i) {
            if let Some(s) = self.slot.get_mut(&moved.driver_id) {
                *s = i as u32;
            }
            let (b, p) = self.at[i];
            self.buckets[b as usize][p as usize].driver = i as u32;
        }
        if self.drivers.is_empty() && !self.fixed {
            // The next driver may be anywhere: centre the grid on it.
            self.frame = None;
        }
        true
    }

    /// Up to `k` drivers nearest to `p` within `max_m` metres that match `filter`, nearest
    /// first (ties by driver id), with their distances. Returns the matches and how many
    /// entries it scanned (those in the buckets it read).
    pub fn nearest(
        &self,
        p: Point,
        k: usize,
        max_m: f64,
        filter: &mut impl DriverFilter,
    ) -> (Vec<(IndexedDriver, f64)>, usize) {
        self.nearest_to(p, p.unit_vector(), k, max_m, filter)
    }

    /// [`CellDrivers::nearest`] with `p`'s unit vector `q` already computed.
    pub(crate) fn nearest_to(
        &self,
        p: Point,
        q: [f64; 3],
        k: usize,
        max_m: f64,
        filter: &mut impl DriverFilter,
    ) -> (Vec<(IndexedDriver, f64)>, usize) {
        let Some(frame) = self.frame.filter(|_| k > 0 && !self.drivers.is_empty()) else {
            return (Vec::new(), 0);
        };
        let mask = admitted(filter);
        if mask == 0 || max_m.is_nan() || max_m < 0.0 {
            return (Vec::new(), 0);
        }
        let (x, y) = frame.plane(q);
        let (cx, cy) = (frame.index(x, frame.x0), frame.index(y, frame.y0));
        // Entries exactly as far as the k-th are still taken, so that a tie at the k-th
        // place is broken by driver id, as everywhere else.
        let mut near = Nearest {
            k,
            bound: widen(m_to_chord(max_m).powi(2)),
            best: Vec::with_capacity(k.min(self.drivers.len()) + 1),
        };
        let mut examined = 0;
        // Square rings of buckets around the pickup's: ring `r` is at least `r - 1`
        // buckets' widths away, and the last one holds the grid's far corner.
        let last = (cx.max(SIDE - 1 - cx)).max(cy.max(SIDE - 1 - cy));
        for r in 0..=last {
            let ring_gap = ((r as f64 - 1.0) * frame.w - PLANE_EPS).max(0.0);
            if ring_gap * ring_gap > near.bound {
                break;
            }
            let (x_lo, x_hi) = (cx as isize - r as isize, cx + r);
            let (y_lo, y_hi) = (cy as isize - r as isize, cy + r);
            for iy in y_lo.max(0) as usize..=y_hi.min(SIDE - 1) {
                let edge_row = iy as isize == y_lo || iy == y_hi;
                for ix in x_lo.max(0) as usize..=x_hi.min(SIDE - 1) {
                    if !edge_row && ix as isize != x_lo && ix != x_hi {
                        continue;
                    }
                    let slots = &self.buckets[iy * SIDE + ix];
                    if slots.is_empty() || frame.bucket_d2(x, y, ix, iy) > near.bound {
                        continue;
                    }
                    examined += slots.len();
                    for s in slots {
                        if mask & (1 << s.class) == 0 {
                            continue;
                        }
                        let v = s.xyz;
                        let d = [v[0] - q[0], v[1] - q[1], v[2] - q[2]];
                        let d2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
                        if d2 > near.bound || !filter.keep(&self.drivers[s.driver as usize]) {
                            continue;
                        }
                        near.push(d2, s.driver);
                    }
                }
            }
        }
        // Only the records that made the cut are read, and only the final k are cloned.
        let from = Haversine::new(p);
        let mut best: Vec<(f64, u32)> = near
            .best
            .into_iter()
            // The haversine distance, so that every caller compares the same number.
            .map(|(_, i)| (from.distance_m(self.drivers[i as usize].position), i))
            .filter(|&(m, _)| m <= max_m)
            .collect();
        best.sort_by(|a, b| {
            a.0.total_cmp(&b.0).then_with(|| {
                self.drivers[a.1 as usize]
                    .driver_id
                    .cmp(&self.drivers[b.1 as usize].driver_id)
            })
        });
        best.truncate(k);
        let out = best
            .into_iter()
            .map(|(m, i)| (self.drivers[i as usize].clone(), m))
            .collect();
        (out, examined)
    }

    /// Every driver in the cell, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &IndexedDriver> {
        self.drivers.iter()
    }

    /// Checks that the drivers, their slots, the buckets and the id map agree (for tests
    /// and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.drivers.len();
        let slots: usize = self.buckets.iter().map(Vec::len).sum();
        if self.at.len() != n || self.slot.len() != n || slots != n {
            return Err(format!(
                "{n} drivers, {} places, {} ids, {slots} slots",
                self.at.len(),
                self.slot.len(),
            ));
        }
        if n > 0 && (self.frame.is_none() || self.buckets.len() != SIDE * SIDE) {
            return Err(format!(
                "{n} drivers but {} buckets and frame {:?}",
                self.buckets.len(),
                self.frame
            ));
        }
        for (i, d) in self.drivers.iter().enumerate() {
            if self.slot.get(&d.driver_id) != Some(&(i as u32)) {
                return Err(format!(
                    "{} is in slot {i} but the map says otherwise",
                    d.driver_id
                ));
            }
            let (b, p) = self.at[i];
            let Some(frame) = self.frame else {
                return Err("no frame".into());
            };
            let want = frame.bucket_of(d.position.unit_vector());
            if b != want {
                return Err(format!(
                    "{} is in bucket {b}, belongs in {want}",
                    d.driver_id
                ));
            }
            if self.buckets[b as usize].get(p as usize) != Some(&Slot::of(d, i as u32)) {
                return Err(format!("{}'s slot is stale", d.driver_id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(i: u32, lat: f64, lng: f64, available: bool) -> IndexedDriver {
        IndexedDriver {
            driver_id: DriverId::new(format!("drv_{i}")),
            position: Point::new(lat, lng).unwrap(),
            heading: None,
            product: Product::Economy,
            available,
        }
    }

    #[test]
    fn upsert_moves_and_remove_keeps_tree_and_map_in_sync() {
        let mut c = CellDrivers::new();
        c.upsert(drv(1, 45.50, -73.60, true));
        c.upsert(drv(2, 45.51, -73.60, true));
        c.upsert(drv(1, 45.52, -73.61, true)); // move
        assert_eq!(c.len(), 2);
        c.check_invariants().unwrap();
        assert!(c.remove(&DriverId::new("drv_1")));
        assert!(!c.remove(&DriverId::new("drv_1")));
        assert_eq!(c.len(), 1);
        c.check_invariants().unwrap();
    }

    #[test]
    fn nearest_orders_by_distance_filters_and_caps_radius() {
        let mut c = CellDrivers::new();
        c.upsert(drv(1, 45.500, -73.600, true));
        c.upsert(drv(2, 45.501, -73.600, false));
        c.upsert(drv(3, 45.502, -73.600, true));
        c.upsert(drv(4, 45.600, -73.600, true)); // ~11 km away
        let p = Point::new(45.5005, -73.600).unwrap();
        let (got, _) = c.nearest(p, 10, 5_000.0, &mut |d: &IndexedDriver| d.available);
        let ids: Vec<_> = got
            .iter()
            .map(|(d, _)| d.driver_id.as_str().to_owned())
            .collect();
        assert_eq!(ids, ["drv_1", "drv_3"]);
        assert!(got[0].1 <= got[1].1);
        let (one, _) = c.nearest(p, 1, 5_000.0, &mut |d: &IndexedDriver| d.available);
        assert_eq!(one.len(), 1);
    }
}
