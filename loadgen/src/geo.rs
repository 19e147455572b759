//! The movement model: great-circle geometry and a [`Mover`] that drives at a constant
//! speed toward a waypoint, arriving exactly and never overshooting.

use dispatch_transport::wire::LatLng;

/// Mean Earth radius, metres (the same sphere as the server's haversine).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

pub fn haversine_m(a: LatLng, b: LatLng) -> f64 {
    let (p1, p2) = (a.lat.to_radians(), b.lat.to_radians());
    let dp = p2 - p1;
    let dl = (b.lng - a.lng).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Initial bearing from `a` to `b`, degrees in [0, 360).
pub fn bearing_deg(a: LatLng, b: LatLng) -> f64 {
    let (p1, p2) = (a.lat.to_radians(), b.lat.to_radians());
    let dl = (b.lng - a.lng).to_radians();
    let y = dl.sin() * p2.cos();
    let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
    y.atan2(x).to_degrees().rem_euclid(360.0)
}

/// The point `dist_m` from `a` along the great circle leaving at `bearing`.
pub fn destination(a: LatLng, bearing: f64, dist_m: f64) -> LatLng {
    let d = dist_m / EARTH_RADIUS_M;
    let th = bearing.to_radians();
    let p1 = a.lat.to_radians();
    let l1 = a.lng.to_radians();
    let p2 = (p1.sin() * d.cos() + p1.cos() * d.sin() * th.cos()).asin();
    let l2 = l1 + (th.sin() * d.sin() * p1.cos()).atan2(d.cos() - p1.sin() * p2.sin());
    LatLng {
        lat: p2.to_degrees(),
        lng: (l2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0,
    }
}

/// Moves `dist_m` from `pos` toward `target`: the target itself (arrived) when it is
/// that close or closer, else the point `dist_m` along the great circle toward it.
pub fn step_toward(pos: LatLng, target: LatLng, dist_m: f64) -> (LatLng, bool) {
    let d = haversine_m(pos, target);
    if d <= dist_m.max(0.0) || d < 0.01 {
        return (target, true);
    }
    if dist_m <= 0.0 {
        return (pos, false);
    }
    (destination(pos, bearing_deg(pos, target), dist_m), false)
}

/// A vehicle at `pos` heading for `target` at `speed_mps`.
#[derive(Debug, Clone, Copy)]
pub struct Mover {
    pub pos: LatLng,
    pub target: LatLng,
    pub speed_mps: f64,
    /// Degrees; the direction of the last move.
    pub heading: f64,
}

impl Mover {
    pub fn new(pos: LatLng, speed_mps: f64) -> Mover {
        Mover {
            pos,
            target: pos,
            speed_mps,
            heading: 0.0,
        }
    }

    pub fn set_target(&mut self, target: LatLng) {
        self.target = target;
        if haversine_m(self.pos, target) > 0.01 {
            self.heading = bearing_deg(self.pos, target);
        }
    }

    pub fn remaining_m(&self) -> f64 {
        haversine_m(self.pos, self.target)
    }

    pub fn arrived(&self) -> bool {
        self.remaining_m() < 0.01
    }

    /// Seconds until arrival at the current speed.
    pub fn eta_s(&self) -> f64 {
        self.remaining_m() / self.speed_mps
    }

    /// Drives for `dt_s` seconds; true when at the target afterwards.
    pub fn advance(&mut self, dt_s: f64) -> bool {
        let (p, arrived) = step_toward(self.pos, self.target, self.speed_mps * dt_s.max(0.0));
        if haversine_m(self.pos, p) > 0.01 {
            self.heading = bearing_deg(self.pos, p);
        }
        self.pos = p;
        arrived
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTL: LatLng = LatLng {
        lat: 45.5017,
        lng: -73.5673,
    };

    #[test]
    fn covers_v_times_t_toward_the_waypoint() {
        for &(bearing, dist) in &[(0.0, 5_000.0), (90.0, 8_000.0), (225.0, 3_000.0)] {
            let target = destination(MTL, bearing, dist);
            assert!((haversine_m(MTL, target) - dist).abs() < 1e-3);
            let mut m = Mover::new(MTL, 11.0);
            m.set_target(target);
            let arrived = m.advance(60.0); // 660 m
            assert!(!arrived);
            let moved = haversine_m(MTL, m.pos);
            assert!((moved - 660.0).abs() < 1e-3, "moved {moved} m");
            // Toward the waypoint: the rest of the way is exactly what is left.
            assert!((m.remaining_m() - (dist - 660.0)).abs() < 1e-3);
            assert!((m.heading - bearing).abs() < 0.1 || bearing == 0.0 && m.heading > 359.9);
        }
    }

    #[test]
    fn arrives_and_never_overshoots() {
        let target = destination(MTL, 37.0, 1_234.5);
        let mut m = Mover::new(MTL, 9.0);
        m.set_target(target);
        let mut t = 0.0;
        let mut last = m.remaining_m();
        loop {
            let arrived = m.advance(7.3);
            t += 7.3;
            let rem = m.remaining_m();
            assert!(rem <= last, "moved away from the waypoint");
            // Never past it: the distance from the start never exceeds the leg.
            assert!(haversine_m(MTL, m.pos) <= 1_234.5 + 1e-6);
            last = rem;
            if arrived {
                break;
            }
            assert!(t < 1_000.0, "never arrived");
        }
        assert_eq!(m.pos, target, "arrival is exactly at the waypoint");
        // It takes ceil(1234.5 / (9 · 7.3)) steps, no more.
        assert!((t / 7.3 - (1_234.5f64 / (9.0 * 7.3)).ceil()).abs() < 1e-9);
        // Staying put once there.
        assert!(m.advance(100.0));
        assert_eq!(m.pos, target);
    }

    #[test]
    fn a_long_step_lands_exactly_on_the_waypoint() {
        let target = destination(MTL, 180.0, 500.0);
        let (p, arrived) = step_toward(MTL, target, 10_000.0);
        assert!(arrived);
        assert_eq!(p, target);
        let (p, arrived) = step_toward(MTL, target, 0.0);
        assert!(!arrived);
        assert_eq!(p, MTL);
    }
}
