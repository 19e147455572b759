//! The drivers of one H3 cell in an R-tree, with O(log n) insert, move and remove.
//!
//! Points are stored as unit vectors on the sphere, so the R-tree's Euclidean nearest
//! neighbour order is exactly the great-circle order (see [`Point::unit_vector`]).

use std::collections::HashMap;

use rstar::{AABB, PointDistance, RTree, RTreeObject};

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

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    xyz: [f64; 3],
    driver: IndexedDriver,
}

impl RTreeObject for Entry {
    type Envelope = AABB<[f64; 3]>;
    fn envelope(&self) -> Self::Envelope {
        AABB::from_point(self.xyz)
    }
}

impl PointDistance for Entry {
    fn distance_2(&self, point: &[f64; 3]) -> f64 {
        let d = [
            self.xyz[0] - point[0],
            self.xyz[1] - point[1],
            self.xyz[2] - point[2],
        ];
        d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    }
}

/// The drivers currently inside one cell.
#[derive(Debug, Default)]
pub struct CellDrivers {
    tree: RTree<Entry>,
    by_id: HashMap<DriverId, Entry>,
}

impl CellDrivers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn contains(&self, id: &DriverId) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn get(&self, id: &DriverId) -> Option<&IndexedDriver> {
        self.by_id.get(id).map(|e| &e.driver)
    }

    /// Inserts a driver or replaces its entry (a move or a status change).
    pub fn upsert(&mut self, driver: IndexedDriver) {
        let entry = Entry {
            xyz: driver.position.unit_vector(),
            driver,
        };
        if let Some(old) = self
            .by_id
            .insert(entry.driver.driver_id.clone(), entry.clone())
        {
            let removed = self.tree.remove(&old);
            debug_assert!(
                removed.is_some(),
                "index out of sync for {}",
                old.driver.driver_id
            );
        }
        self.tree.insert(entry);
    }

    /// Removes a driver; returns whether it was there.
    pub fn remove(&mut self, id: &DriverId) -> bool {
        match self.by_id.remove(id) {
            Some(old) => {
                let removed = self.tree.remove(&old);
                debug_assert!(removed.is_some(), "index out of sync for {id}");
                true
            }
            None => false,
        }
    }

    /// Up to `k` drivers nearest to `p` within `max_m` metres that match `filter`, nearest
    /// first, with their distances. Returns the matches and how many entries it examined.
    pub fn nearest(
        &self,
        p: Point,
        k: usize,
        max_m: f64,
        mut filter: impl FnMut(&IndexedDriver) -> bool,
    ) -> (Vec<(IndexedDriver, f64)>, usize) {
        let q = p.unit_vector();
        let max_chord2 = m_to_chord(max_m).powi(2);
        let mut out = Vec::with_capacity(k.min(self.len()));
        let mut examined = 0;
        if k == 0 {
            return (out, 0);
        }
        // The chord of the k-th match: entries exactly as far are still taken, so that a
        // tie at the k-th place is broken by driver id, as everywhere else.
        let mut kth_d2 = f64::INFINITY;
        for (entry, d2) in self.tree.nearest_neighbor_iter_with_distance_2(q) {
            examined += 1;
            if d2 > max_chord2 || d2 > kth_d2 {
                break;
            }
            if filter(&entry.driver) {
                // Report the haversine distance so that every caller compares the same number.
                out.push((entry.driver.clone(), p.distance_m(entry.driver.position)));
                if out.len() == k {
                    kth_d2 = d2;
                }
            }
        }
        if out.len() > k {
            out.sort_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then_with(|| a.0.driver_id.cmp(&b.0.driver_id))
            });
            out.truncate(k);
        }
        (out, examined)
    }

    /// Every driver in the cell, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &IndexedDriver> {
        self.by_id.values().map(|e| &e.driver)
    }

    /// Checks that the tree and the id map agree (for tests and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.tree.size() != self.by_id.len() {
            return Err(format!(
                "tree has {} entries, map {}",
                self.tree.size(),
                self.by_id.len()
            ));
        }
        for e in self.by_id.values() {
            if !self.tree.contains(e) {
                return Err(format!(
                    "{} is in the map but not the tree",
                    e.driver.driver_id
                ));
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
        let (got, _) = c.nearest(p, 10, 5_000.0, |d| d.available);
        let ids: Vec<_> = got
            .iter()
            .map(|(d, _)| d.driver_id.as_str().to_owned())
            .collect();
        assert_eq!(ids, ["drv_1", "drv_3"]);
        assert!(got[0].1 <= got[1].1);
        let (one, _) = c.nearest(p, 1, 5_000.0, |d| d.available);
        assert_eq!(one.len(), 1);
    }
}
