//! The drivers of one H3 cell in flat arrays: O(1) insert, move and remove, and a
//! nearest search that is one linear scan over contiguous 32-byte slots.
//!
//! Points are stored as unit vectors on the sphere, so Euclidean (chord) order is exactly
//! the great-circle order (see [`Point::unit_vector`]). A cell holds at most a few
//! thousand drivers (an H3 resolution-7 cell is ~5 km²; even 1,000 drivers per km² is
//! 5,000), and scanning 32 bytes per driver in order costs a few nanoseconds each, less
//! than an R-tree walk's pointer chasing and heap at these sizes; a move is an overwrite in
//! place instead of a remove and an insert (issue 14's profile). The search reads a
//! driver's record only for the few that make the cut.

use std::collections::HashMap;

use crate::fare::Product;
use crate::geo::{Point, m_to_chord};
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

/// What the scan reads for each driver: 32 bytes, contiguous.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    xyz: [f64; 3],
    product: Product,
    available: bool,
}

impl Slot {
    fn of(d: &IndexedDriver) -> Self {
        Self {
            xyz: d.position.unit_vector(),
            product: d.product,
            available: d.available,
        }
    }
}

/// The drivers currently inside one cell. `slots[i]` is what the scan needs of
/// `drivers[i]`; `slot` maps an id to its index. Removal swaps the last one in.
#[derive(Debug, Default)]
pub struct CellDrivers {
    slots: Vec<Slot>,
    drivers: Vec<IndexedDriver>,
    slot: HashMap<DriverId, u32>,
}

impl CellDrivers {
    pub fn new() -> Self {
        Self::default()
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

    /// Inserts a driver or replaces its entry in place (a move or a status change).
    pub fn upsert(&mut self, driver: IndexedDriver) {
        let slot = Slot::of(&driver);
        match self.slot.get(&driver.driver_id) {
            Some(&i) => {
                self.slots[i as usize] = slot;
                self.drivers[i as usize] = driver;
            }
            None => {
                let i =
                    u32::try_from(self.drivers.len()).expect("fewer than 2^32 drivers in a cell");
                self.slot.insert(driver.driver_id.clone(), i);
                self.slots.push(slot);
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
        self.slots.swap_remove(i);
        self.drivers.swap_remove(i);
        if let Some(moved) = self.drivers.get(i) {
            self.slot.insert(moved.driver_id.clone(), i as u32);
        }
        true
    }

    /// Up to `k` drivers nearest to `p` within `max_m` metres that match `filter`, nearest
    /// first (ties by driver id), with their distances. Returns the matches and how many
    /// entries it scanned (every driver of the cell: the scan is linear).
    pub fn nearest(
        &self,
        p: Point,
        k: usize,
        max_m: f64,
        filter: &mut impl DriverFilter,
    ) -> (Vec<(IndexedDriver, f64)>, usize) {
        if k == 0 || self.drivers.is_empty() {
            return (Vec::new(), 0);
        }
        let q = p.unit_vector();
        // Entries exactly as far as the k-th are still taken, so that a tie at the k-th
        // place is broken by driver id, as everywhere else.
        let mut bound = m_to_chord(max_m).powi(2);
        // The k smallest squared chords among the matches so far, ascending.
        let cap = k.min(self.drivers.len());
        let mut top: Vec<f64> = Vec::with_capacity(cap + 1);
        let mut taken: Vec<(f64, u32)> = Vec::with_capacity(cap);
        for (i, s) in self.slots.iter().enumerate() {
            let v = s.xyz;
            let d = [v[0] - q[0], v[1] - q[1], v[2] - q[2]];
            let d2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
            if d2 > bound || !filter.quick(s.product, s.available) || !filter.keep(&self.drivers[i])
            {
                continue;
            }
            taken.push((d2, i as u32));
            let at = top.partition_point(|&t| t <= d2);
            if at < k {
                top.insert(at, d2);
                top.truncate(k);
                if top.len() == k {
                    bound = top[k - 1];
                }
            }
        }
        // Only the records that made the cut are read, and only the final k are cloned.
        let mut best: Vec<(f64, u32)> = taken
            .into_iter()
            .filter(|&(d2, _)| d2 <= bound)
            // The haversine distance, so that every caller compares the same number.
            .map(|(_, i)| (p.distance_m(self.drivers[i as usize].position), i))
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
        (out, self.slots.len())
    }

    /// Every driver in the cell, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &IndexedDriver> {
        self.drivers.iter()
    }

    /// Checks that the arrays and the id map agree (for tests and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.slots.len() != self.drivers.len() || self.slot.len() != self.drivers.len() {
            return Err(format!(
                "{} slots, {} drivers, {} ids",
                self.slots.len(),
                self.drivers.len(),
                self.slot.len()
            ));
        }
        for (i, d) in self.drivers.iter().enumerate() {
            if self.slot.get(&d.driver_id) != Some(&(i as u32)) {
                return Err(format!(
                    "{} is in slot {i} but the map says otherwise",
                    d.driver_id
                ));
            }
            if self.slots[i] != Slot::of(d) {
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
