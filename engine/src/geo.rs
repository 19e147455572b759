//! Coordinates, great-circle distances and the H3 grid the drivers are indexed on.

pub use h3o::CellIndex as CellId;
use h3o::{LatLng, Resolution};

/// Mean Earth radius used for every distance in the engine, in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeoError {
    #[error("lat must be a finite number in [-90, 90] and lng a finite number in [-180, 180]")]
    InvalidLocation,
    #[error("h3 resolution must be in 0..=15, got {0}")]
    InvalidResolution(u8),
}

/// A validated WGS84 position in decimal degrees. Deserializing validates too.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "RawPoint", into = "RawPoint"))]
pub struct Point {
    lat: f64,
    lng: f64,
}

#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct RawPoint {
    lat: f64,
    lng: f64,
}

#[cfg(feature = "serde")]
impl TryFrom<RawPoint> for Point {
    type Error = GeoError;
    fn try_from(r: RawPoint) -> Result<Self, GeoError> {
        Point::new(r.lat, r.lng)
    }
}

#[cfg(feature = "serde")]
impl From<Point> for RawPoint {
    fn from(p: Point) -> Self {
        RawPoint {
            lat: p.lat,
            lng: p.lng,
        }
    }
}

impl Point {
    /// Validates a coordinate: finite, `lat` in [-90, 90], `lng` in [-180, 180].
    pub fn new(lat: f64, lng: f64) -> Result<Self, GeoError> {
        if lat.is_finite()
            && lng.is_finite()
            && (-90.0..=90.0).contains(&lat)
            && (-180.0..=180.0).contains(&lng)
        {
            Ok(Self { lat, lng })
        } else {
            Err(GeoError::InvalidLocation)
        }
    }

    pub fn lat(self) -> f64 {
        self.lat
    }

    pub fn lng(self) -> f64 {
        self.lng
    }

    /// Great-circle (haversine) distance in metres.
    pub fn distance_m(self, other: Point) -> f64 {
        Haversine::new(self).distance_m(other)
    }

    /// The point on the unit sphere. Euclidean (chord) distance between these vectors is
    /// a strictly increasing function of great-circle distance, so an index over them
    /// orders neighbours exactly as the sphere does, with no projection error.
    pub fn unit_vector(self) -> [f64; 3] {
        let (la, ln) = (self.lat.to_radians(), self.lng.to_radians());
        [la.cos() * ln.cos(), la.cos() * ln.sin(), la.sin()]
    }

    /// Initial bearing from `self` to `other`, degrees clockwise from north in [0, 360).
    pub fn bearing_deg(self, other: Point) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dl = (other.lng - self.lng).to_radians();
        let y = dl.sin() * p2.cos();
        let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
        (y.atan2(x).to_degrees() + 360.0) % 360.0
    }

    fn to_latlng(self) -> LatLng {
        // `Point` is validated, and h3o accepts every finite coordinate.
        LatLng::new(self.lat, self.lng).expect("validated point is a valid LatLng")
    }
}

/// Great-circle (haversine) distances from one point, with what depends on that point
/// alone computed once; the same numbers as [`Point::distance_m`], bit for bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Haversine {
    lng: f64,
    lat_rad: f64,
    cos_lat: f64,
}

impl Haversine {
    pub(crate) fn new(from: Point) -> Self {
        let lat_rad = from.lat.to_radians();
        Self {
            lng: from.lng,
            lat_rad,
            cos_lat: lat_rad.cos(),
        }
    }

    pub(crate) fn distance_m(&self, other: Point) -> f64 {
        let p2 = other.lat.to_radians();
        let dp = p2 - self.lat_rad;
        let dl = (other.lng - self.lng).to_radians();
        let a = (dp / 2.0).sin().powi(2) + self.cos_lat * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
    }
}

/// Converts a chord length on the unit sphere to a great-circle distance in metres.
pub fn chord_to_m(chord: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * (chord / 2.0).min(1.0).asin()
}

/// Converts a great-circle distance in metres to a chord length on the unit sphere.
pub fn m_to_chord(m: f64) -> f64 {
    2.0 * (m / (2.0 * EARTH_RADIUS_M))
        .min(std::f64::consts::FRAC_PI_2)
        .sin()
}

/// A lower bound on the distance from the point with unit vector `q` to any point inside
/// `cell`, in metres, for a point known to be outside it (see [`Grid::min_distance_m`]).
pub(crate) fn min_distance_outside_m(q: [f64; 3], cell: CellId) -> f64 {
    let (centre, radius_m) = disks::get(cell);
    outside_disk_m(q, centre, radius_m)
}

/// [`min_distance_outside_m`] for a cell whose disk is already known.
pub(crate) fn outside_disk_m(q: [f64; 3], centre: [f64; 3], radius_m: f64) -> f64 {
    let d = [centre[0] - q[0], centre[1] - q[1], centre[2] - q[2]];
    let to_centre = chord_to_m((d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt());
    (to_centre - radius_m * 1.01 - 1.0).max(0.0)
}

/// A cell's centre (as a unit vector) and its largest centre-to-vertex distance in metres:
/// every point of the cell is within that distance of the centre.
pub(crate) fn cell_disk(cell: CellId) -> ([f64; 3], f64) {
    disks::get(cell)
}

/// One cell of a ring with its disk (centre as a unit vector, radius in metres).
pub(crate) type RingCell = (CellId, [f64; 3], f64);

/// The cells at grid distance `k` from `origin` with their disks, computed once per
/// origin and ring: walking H3's ring and looking up each cell's disk was a third of a
/// search. Bounded like the disks: emptied when it reaches [`disks::MAX_RINGS`] rings, and
/// only rings up to [`disks::MEMO_UP_TO`] are kept.
pub(crate) fn ring_disks(grid: Grid, origin: CellId, k: u32) -> std::sync::Arc<[RingCell]> {
    disks::ring(grid, origin, k)
}

/// Each cell's centre (as a unit vector) and largest centre-to-vertex distance, computed
/// once per cell: they are a pure function of the cell id, and computing a cell's boundary
/// was a third of a search's time. Bounded: the memo is emptied when it reaches
/// [`disks::MAX`] cells (a city touches a few thousand).
mod disks {
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};
    use std::sync::{Arc, OnceLock, RwLock};

    use h3o::{CellIndex, LatLng};

    pub const MAX: usize = 1 << 16;

    type Memo = RwLock<HashMap<CellIndex, ([f64; 3], f64), BuildHasherDefault<CellHasher>>>;

    /// A cell id is already a well-mixed 64-bit number: one multiply spreads it over the
    /// table (SipHash was ~8% of a search; nothing here is keyed by untrusted input that
    /// could not be any cell id anyway, and the memo is bounded).
    #[derive(Default)]
    pub struct CellHasher(u64);

    impl Hasher for CellHasher {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.write_u64(u64::from(b));
            }
        }
        fn write_u32(&mut self, x: u32) {
            self.write_u64(u64::from(x));
        }
        fn write_u64(&mut self, x: u64) {
            self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn memo() -> &'static Memo {
        static MEMO: OnceLock<Memo> = OnceLock::new();
        MEMO.get_or_init(|| RwLock::new(HashMap::default()))
    }

    pub const MAX_RINGS: usize = 1 << 14;
    /// Only rings this close are kept (at most 12 cells, ~0.5 KiB each, so the memo stays
    /// under ~10 MiB): a search rarely goes further, and a far ring is walked afresh.
    pub const MEMO_UP_TO: u32 = 2;

    type Rings =
        RwLock<HashMap<(CellIndex, u32), Arc<[super::RingCell]>, BuildHasherDefault<CellHasher>>>;

    pub fn ring(grid: super::Grid, origin: CellIndex, k: u32) -> Arc<[super::RingCell]> {
        static RINGS: OnceLock<Rings> = OnceLock::new();
        let rings = RINGS.get_or_init(|| RwLock::new(HashMap::default()));
        if let Some(r) = rings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(origin, k))
        {
            return r.clone();
        }
        let ring: Arc<[super::RingCell]> = grid
            .ring(origin, k)
            .into_iter()
            .map(|c| {
                let (centre, radius) = get(c);
                (c, centre, radius)
            })
            .collect();
        if k > MEMO_UP_TO {
            return ring;
        }
        let mut m = rings.write().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_RINGS {
            m.clear();
        }
        m.insert((origin, k), ring.clone());
        ring
    }

    pub fn get(cell: CellIndex) -> ([f64; 3], f64) {
        if let Some(d) = memo().read().unwrap_or_else(|e| e.into_inner()).get(&cell) {
            return *d;
        }
        let centre = LatLng::from(cell);
        let radius = cell
            .boundary()
            .iter()
            .map(|v| centre.distance_m(*v))
            .fold(0.0, f64::max);
        let unit = super::Point {
            lat: centre.lat(),
            lng: centre.lng(),
        }
        .unit_vector();
        let mut m = memo().write().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX {
            m.clear();
        }
        m.insert(cell, (unit, radius));
        (unit, radius)
    }
}

/// The H3 grid at one resolution: which cell a point is in, and how far a cell can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    resolution: Resolution,
}

impl Grid {
    pub fn new(resolution: u8) -> Result<Self, GeoError> {
        Resolution::try_from(resolution)
            .map(|resolution| Self { resolution })
            .map_err(|_| GeoError::InvalidResolution(resolution))
    }

    pub fn resolution(self) -> u8 {
        u8::from(self.resolution)
    }

    pub fn cell_of(self, p: Point) -> CellId {
        p.to_latlng().to_cell(self.resolution)
    }

    /// The cells at exactly grid distance `k` from `origin` (the origin itself for 0).
    pub fn ring(self, origin: CellId, k: u32) -> Vec<CellId> {
        // A ring holds 6k cells (fewer near a pentagon, where the fast walk gives up and
        // the general one answers): sized once, not grown as h3o's collect does.
        let mut cells = Vec::with_capacity(if k == 0 { 1 } else { 6 * k as usize });
        for c in origin.grid_ring_fast(k) {
            match c {
                Some(c) => cells.push(c),
                None => return origin.grid_ring::<Vec<_>>(k),
            }
        }
        cells
    }

    /// A lower bound on the distance from `p` to any point inside `cell`, in metres:
    /// zero when `p` is inside, else the distance to the cell's centre less the largest
    /// centre-to-vertex distance (H3 edges are great-circle arcs, so every point of the
    /// cell lies within that radius of the centre), less a small safety margin.
    pub fn min_distance_m(self, p: Point, cell: CellId) -> f64 {
        if self.cell_of(p) == cell {
            return 0.0;
        }
        min_distance_outside_m(p.unit_vector(), cell)
    }

    /// The centre of a cell.
    pub fn centre(cell: CellId) -> Point {
        let c = LatLng::from(cell);
        Point {
            lat: c.lat(),
            lng: c.lng(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range_and_non_finite() {
        for (lat, lng) in [
            (91.0, 0.0),
            (-90.1, 0.0),
            (0.0, 180.5),
            (f64::NAN, 0.0),
            (0.0, f64::INFINITY),
        ] {
            assert_eq!(
                Point::new(lat, lng),
                Err(GeoError::InvalidLocation),
                "{lat},{lng}"
            );
        }
        assert!(Point::new(90.0, -180.0).is_ok());
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // Empire State Building to Times Square, about 1.03 km.
        let a = Point::new(40.7484, -73.9857).unwrap();
        let b = Point::new(40.7580, -73.9855).unwrap();
        let d = a.distance_m(b);
        assert!((1060.0..1080.0).contains(&d), "{d}");
    }

    #[test]
    fn chord_conversion_round_trips() {
        for m in [0.0, 1.0, 1500.0, 20_000.0] {
            assert!((chord_to_m(m_to_chord(m)) - m).abs() < 1e-6, "{m}");
        }
    }

    #[test]
    fn min_distance_is_a_lower_bound() {
        let grid = Grid::new(7).unwrap();
        let p = Point::new(45.5, -73.6).unwrap();
        let origin = grid.cell_of(p);
        for k in 1..4 {
            for cell in grid.ring(origin, k) {
                let bound = grid.min_distance_m(p, cell);
                for v in cell.boundary().iter() {
                    let q = Point::new(v.lat(), v.lng()).unwrap();
                    assert!(bound <= p.distance_m(q) + 1e-6);
                }
                assert!(bound <= p.distance_m(Grid::centre(cell)));
            }
        }
    }

    #[test]
    fn bad_resolution_is_an_error() {
        assert_eq!(Grid::new(16), Err(GeoError::InvalidResolution(16)));
    }
}
