//! The data both servers get: seeded positions in a box, the query points, the jitter of
//! the position updates, and a brute-force nearest-k to check both answers against.

/// splitmix64: small, seeded, the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const M_PER_DEG_LAT: f64 = 111_195.0;

/// A lat/lng box `ns_km` tall and `ew_km` wide around a centre.
#[derive(Debug, Clone, Copy)]
pub struct Area {
    pub lat0: f64,
    pub lat1: f64,
    pub lng0: f64,
    pub lng1: f64,
}

impl Area {
    pub fn around((lat, lng): (f64, f64), ns_km: f64, ew_km: f64) -> Area {
        let dlat = ns_km * 1000.0 / M_PER_DEG_LAT / 2.0;
        let dlng = ew_km * 1000.0 / (M_PER_DEG_LAT * lat.to_radians().cos()) / 2.0;
        Area {
            lat0: lat - dlat,
            lat1: lat + dlat,
            lng0: lng - dlng,
            lng1: lng + dlng,
        }
    }

    pub fn point(&self, rng: &mut Rng) -> (f64, f64) {
        (
            self.lat0 + rng.unit() * (self.lat1 - self.lat0),
            self.lng0 + rng.unit() * (self.lng1 - self.lng0),
        )
    }

    /// `n` points, the same for the same seed.
    pub fn points(&self, seed: u64, n: usize) -> Vec<(f64, f64)> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| self.point(&mut rng)).collect()
    }
}

/// The position of update number `k` of a driver based at `base`: within ~60 m of it
/// (a driver creeping around its spot; now and then across an H3 cell edge).
pub fn jitter(base: (f64, f64), rng: &mut Rng) -> (f64, f64) {
    let d = 60.0 / M_PER_DEG_LAT;
    (
        base.0 + (rng.unit() - 0.5) * 2.0 * d,
        base.1 + (rng.unit() - 0.5) * 2.0 * d / base.0.to_radians().cos(),
    )
}

/// Great-circle distance in metres.
pub fn haversine_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6_371_008.8;
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

/// The `k` nearest of `all` within `radius_m` of `at`, nearest first, by brute force.
pub fn nearest(all: &[(f64, f64)], at: (f64, f64), radius_m: f64, k: usize) -> Vec<(f64, f64)> {
    let mut d: Vec<(f64, usize)> = all
        .iter()
        .enumerate()
        .map(|(i, p)| (haversine_m(at, *p), i))
        .filter(|(m, _)| *m <= radius_m)
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    d.into_iter().take(k).map(|(_, i)| all[i]).collect()
}

/// The misses of `got` against `want` (entries of `want` not in `got`), and how many of
/// them are near-ties: an entry of `got` not in `want` lies within `tie_m` of the same
/// distance from `at` (the two answers only ordered two almost equidistant drivers
/// differently at the last rank, or at the edge of the radius).
pub fn misses(
    want: &[(f64, f64)],
    got: &[(f64, f64)],
    at: (f64, f64),
    tie_m: f64,
) -> (usize, usize) {
    const TOL: f64 = 1e-5;
    let same = |a: &(f64, f64), b: &(f64, f64)| (a.0 - b.0).abs() < TOL && (a.1 - b.1).abs() < TOL;
    let missing: Vec<_> = want
        .iter()
        .filter(|w| !got.iter().any(|g| same(g, w)))
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|g| !want.iter().any(|w| same(g, w)))
        .collect();
    let ties = missing
        .iter()
        .filter(|m| {
            let dm = haversine_m(at, ***m);
            extra
                .iter()
                .any(|e| (haversine_m(at, **e) - dm).abs() < tie_m)
                || (got.len() < want.len() && (dm - 5_000.0).abs() < tie_m)
        })
        .count();
    (missing.len(), ties)
}

/// How many of `want` appear in `got`, positions equal within ~1 m (Redis keeps a
/// 52-bit geohash, so its coordinates come back rounded to well under a metre).
pub fn matches(want: &[(f64, f64)], got: &[(f64, f64)]) -> usize {
    const TOL: f64 = 1e-5;
    want.iter()
        .filter(|w| {
            got.iter()
                .any(|g| (g.0 - w.0).abs() < TOL && (g.1 - w.1).abs() < TOL)
        })
        .count()
}
