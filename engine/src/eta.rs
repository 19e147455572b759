//! Travel estimates. A trait, so a road router can replace the straight-line model.

use crate::geo::Point;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaEstimate {
    pub distance_m: f64,
    pub duration_s: f64,
}

/// Estimates how far and how long a drive between two points is.
pub trait EtaModel: Send + Sync + std::fmt::Debug {
    fn estimate(&self, from: Point, to: Point) -> EtaEstimate;
}

/// Great-circle distance × a detour factor, driven at a constant speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StraightLineEta {
    /// Road distance over straight-line distance (≥ 1).
    pub detour_factor: f64,
    /// Average driving speed, metres per second (> 0).
    pub speed_mps: f64,
}

impl Default for StraightLineEta {
    fn default() -> Self {
        // 1.3 is a common urban detour ratio; 8.33 m/s is 30 km/h, city traffic.
        Self {
            detour_factor: 1.3,
            speed_mps: 8.33,
        }
    }
}

impl EtaModel for StraightLineEta {
    fn estimate(&self, from: Point, to: Point) -> EtaEstimate {
        let distance_m = from.distance_m(to) * self.detour_factor;
        EtaEstimate {
            distance_m,
            duration_s: distance_m / self.speed_mps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_grows_with_distance() {
        let m = StraightLineEta::default();
        let a = Point::new(45.5, -73.6).unwrap();
        let near = m.estimate(a, Point::new(45.51, -73.6).unwrap());
        let far = m.estimate(a, Point::new(45.55, -73.6).unwrap());
        assert!(near.duration_s < far.duration_s && near.distance_m < far.distance_m);
        assert_eq!(m.estimate(a, a).duration_s, 0.0);
    }
}
