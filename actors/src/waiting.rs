//! Batched matching (issue 17): the trips that wait for a driver to free up. A trip its
//! window left with nobody free, whose own search then found nobody free either, waits
//! here; when a cell actor sees a driver become available (an upsert of an available
//! driver it did not hold as available: freed from an offer or a trip, online, or driven
//! into the cell), the nearest waiting trip (by pickup ETA, ties by trip id) that may be
//! offered it is taken out and handed that driver, and the others keep waiting. So a
//! freed driver reaches a trip that already waited at once, and at most one waiting trip
//! is handed it: they do not poll in step and race one another for it.
//!
//! Bounded: at most [`WAITING_MAX`] trips wait here (a trip that finds it full is counted,
//! `batch_waiting`, and finds drivers by its slow safety poll only), and a driver handed
//! to a trip is not handed again for [`HANDED_HOLD`] or until that trip's offer was sent
//! or refused, whichever is first (at most [`WAITING_MAX`] such drivers at once).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatch_engine::{Candidate, DriverId, EtaModel, IndexedDriver, Point, Product, TripId};

/// The most trips that wait for a freed driver at once.
pub const WAITING_MAX: usize = 4_096;
/// How long a driver handed to a waiting trip is held back from other waiting trips at
/// most (the trip's offer then reached it or was refused long since: one actor call).
pub const HANDED_HOLD: Duration = Duration::from_secs(10);

/// What a waiting trip can be offered.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub pickup: Point,
    pub product: Product,
    /// The drivers it must not be offered (it tried them; not those that only could not
    /// hold its offer).
    pub exclude: Arc<HashSet<DriverId>>,
}

/// A driver handed to a waiting trip: its candidate, its pickup ETA and when the cell saw
/// it free (to time the offer).
#[derive(Debug, Clone)]
pub struct Handed {
    pub trip_id: TripId,
    pub candidate: Candidate,
    pub eta_s: u64,
    pub freed_at: Instant,
}

#[derive(Default)]
struct Book {
    trips: HashMap<TripId, Waiter>,
    /// Drivers handed to a trip whose offer is not settled yet, and since when.
    handed: HashMap<DriverId, Instant>,
}

/// The waiting trips (one per system).
#[derive(Default)]
pub struct WaitingTrips {
    book: Mutex<Book>,
    /// How many trips wait: a cell's upsert checks it without taking the lock.
    len: AtomicUsize,
}

impl WaitingTrips {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The trip waits for a freed driver (again, with what it now excludes). `false`:
    /// too many wait already (the caller counts it).
    pub fn wait(&self, trip_id: &TripId, waiter: Waiter) -> bool {
        let mut b = self.lock();
        if b.trips.len() >= WAITING_MAX && !b.trips.contains_key(trip_id) {
            return false;
        }
        b.trips.insert(trip_id.clone(), waiter);
        self.len.store(b.trips.len(), Ordering::Release);
        true
    }

    /// The trip no longer waits (its offer was sent, it ended, it stopped).
    pub fn leave(&self, trip_id: &TripId) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut b = self.lock();
        b.trips.remove(trip_id);
        self.len.store(b.trips.len(), Ordering::Release);
    }

    /// The driver's offer from the trip it was handed to is settled (sent or refused).
    pub fn settled(&self, driver_id: &DriverId) {
        self.lock().handed.remove(driver_id);
    }

    /// How many trips wait.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A driver became available: the nearest waiting trip it may be offered to, within
    /// `max_radius_m` of its pickup, taken out of the waiting trips (and the driver held
    /// back from the others), or `None`. `usable` says whether that trip is still there
    /// to take it (its actor runs); a trip that is not is dropped and the next is tried.
    pub fn hand(
        &self,
        driver: &IndexedDriver,
        max_radius_m: f64,
        eta: &dyn EtaModel,
        usable: impl Fn(&TripId) -> bool,
    ) -> Option<Handed> {
        if self.is_empty() || !driver.available {
            return None;
        }
        let freed_at = Instant::now();
        let mut b = self.lock();
        b.handed.retain(|_, at| at.elapsed() < HANDED_HOLD);
        if b.handed.contains_key(&driver.driver_id) || b.handed.len() >= WAITING_MAX {
            return None;
        }
        let mut near: Vec<(u64, &TripId, f64)> = b
            .trips
            .iter()
            .filter(|(_, w)| w.product == driver.product && !w.exclude.contains(&driver.driver_id))
            .filter_map(|(id, w)| {
                let d = driver.position.distance_m(w.pickup);
                (d <= max_radius_m).then(|| {
                    let e = eta.estimate(driver.position, w.pickup).duration_s.round() as u64;
                    (e, id, d)
                })
            })
            .collect();
        near.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let mut chosen = None;
        let mut gone = Vec::new();
        for (eta_s, id, distance_m) in near {
            if usable(id) {
                chosen = Some((id.clone(), eta_s, distance_m));
                break;
            }
            gone.push(id.clone());
        }
        for id in &gone {
            b.trips.remove(id);
        }
        let handed = chosen.map(|(trip_id, eta_s, distance_m)| {
            b.trips.remove(&trip_id);
            b.handed.insert(driver.driver_id.clone(), freed_at);
            Handed {
                trip_id,
                candidate: Candidate {
                    driver: driver.clone(),
                    distance_m,
                },
                eta_s,
                freed_at,
            }
        });
        self.len.store(b.trips.len(), Ordering::Release);
        handed
    }
}

#[cfg(test)]
mod tests {
    use dispatch_engine::StraightLineEta;

    use super::*;

    fn at(lat: f64) -> Point {
        Point::new(lat, -73.57).unwrap()
    }

    fn driver(id: &str, lat: f64, product: Product) -> IndexedDriver {
        IndexedDriver {
            driver_id: DriverId::new(id),
            position: at(lat),
            heading: None,
            product,
            available: true,
        }
    }

    fn waiter(lat: f64, exclude: &[&str]) -> Waiter {
        Waiter {
            pickup: at(lat),
            product: Product::Economy,
            exclude: Arc::new(exclude.iter().map(|d| DriverId::new(*d)).collect()),
        }
    }

    fn trip(id: &str) -> TripId {
        TripId::new(id)
    }

    /// The nearest waiting trip that may take the driver gets it, once; the others wait.
    #[test]
    fn a_freed_driver_goes_to_the_nearest_waiting_trip_once() {
        let w = WaitingTrips::default();
        let eta = StraightLineEta::default();
        assert!(w.wait(&trip("trp_far"), waiter(45.51, &[])));
        assert!(w.wait(&trip("trp_near"), waiter(45.501, &["drv_x"])));
        assert!(w.wait(&trip("trp_mid"), waiter(45.505, &[])));
        // Another product, or a driver the nearest trip tried: not to it.
        let xl = driver("drv_c", 45.5, Product::Xl);
        assert!(w.hand(&xl, 5_000.0, &eta, |_| true).is_none());
        let tried = driver("drv_x", 45.5, Product::Economy);
        let h = w.hand(&tried, 5_000.0, &eta, |_| true).unwrap();
        assert_eq!(h.trip_id, trip("trp_mid"));
        // The same driver freed again (it crossed a cell) is not handed twice.
        assert!(w.hand(&tried, 5_000.0, &eta, |_| true).is_none());
        w.settled(&tried.driver_id);
        let d = driver("drv_a", 45.5, Product::Economy);
        // A trip whose actor is gone is dropped, and the next nearest gets the driver.
        let h = w
            .hand(&d, 5_000.0, &eta, |t| *t != trip("trp_near"))
            .unwrap();
        assert_eq!(h.trip_id, trip("trp_far"));
        assert_eq!(w.len(), 0, "the gone trip was dropped, the far one handed");
        // Out of reach: nobody.
        assert!(w.wait(&trip("trp_far"), waiter(45.6, &[])));
        let d = driver("drv_b", 45.5, Product::Economy);
        assert!(w.hand(&d, 5_000.0, &eta, |_| true).is_none());
        assert_eq!(w.len(), 1);
        w.leave(&trip("trp_far"));
        assert!(w.is_empty());
    }

    /// Equal ETAs: the smaller trip id first.
    #[test]
    fn ties_go_by_trip_id() {
        let w = WaitingTrips::default();
        let eta = StraightLineEta::default();
        w.wait(&trip("trp_b"), waiter(45.505, &[]));
        w.wait(&trip("trp_a"), waiter(45.505, &[]));
        let d = driver("drv_a", 45.5, Product::Economy);
        assert_eq!(
            w.hand(&d, 5_000.0, &eta, |_| true).unwrap().trip_id,
            trip("trp_a")
        );
    }

    /// The bound: past [`WAITING_MAX`] a new trip is refused (the caller counts it).
    #[test]
    fn at_most_waiting_max_trips_wait() {
        let w = WaitingTrips::default();
        for i in 0..WAITING_MAX {
            assert!(w.wait(&trip(&format!("trp_{i}")), waiter(45.5, &[])));
        }
        assert!(!w.wait(&trip("trp_more"), waiter(45.5, &[])));
        // One already waiting may update its entry.
        assert!(w.wait(&trip("trp_0"), waiter(45.5, &["drv_a"])));
    }
}
