//! Where people want rides: a uniform disc, or weighted zones from a CSV file.

use std::path::Path;

use anyhow::{Context, Result, bail};
use dispatch_transport::wire::LatLng;
use rand::Rng;

use crate::geo::{destination, haversine_m};

#[derive(Debug, Clone, Copy)]
pub struct Zone {
    pub at: LatLng,
    pub weight: f64,
}

/// A demand map: pickups are drawn from it, drivers start on it.
#[derive(Debug, Clone)]
pub struct Demand {
    zones: Vec<Zone>,
    /// Running sum of the weights, for drawing a zone by weight.
    cumulative: Vec<f64>,
    /// Standard deviation of the jitter around a zone's centre, metres (0: a disc).
    jitter_m: f64,
    /// The area the city covers: trips end inside it.
    pub center: LatLng,
    pub radius_m: f64,
    /// Uniform over the disc instead of zones.
    disc: bool,
    pub source: String,
}

impl Demand {
    /// Uniform demand over a disc.
    pub fn disc(center: LatLng, radius_m: f64) -> Demand {
        Demand {
            zones: Vec::new(),
            cumulative: Vec::new(),
            jitter_m: 0.0,
            center,
            radius_m,
            disc: true,
            source: format!(
                "uniform disc of radius {:.1} km around {:.4},{:.4}",
                radius_m / 1000.0,
                center.lat,
                center.lng
            ),
        }
    }

    /// Zones from a CSV: columns `lat,lng,weight` (also `latitude`/`lon`/`longitude`), or
    /// the layout of montreal_carshare_zones.csv (`centroid_lat,centroid_lon,car_hours`).
    pub fn from_csv(path: &Path) -> Result<Demand> {
        let mut rd = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
            .with_context(|| format!("cannot read demand file {}", path.display()))?;
        let headers: Vec<String> = rd
            .headers()
            .with_context(|| format!("{}: no header row", path.display()))?
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
        let lat = find(&["lat", "latitude", "centroid_lat"]);
        let lng = find(&[
            "lng",
            "lon",
            "long",
            "longitude",
            "centroid_lon",
            "centroid_lng",
        ]);
        let weight = find(&["weight", "car_hours"]);
        let (Some(lat), Some(lng)) = (lat, lng) else {
            bail!(
                "{}: needs columns lat,lng[,weight] or centroid_lat,centroid_lon,car_hours; found {headers:?}",
                path.display()
            );
        };
        let mut zones = Vec::new();
        for (i, rec) in rd.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
            let num = |c: usize| -> Result<f64> {
                let s = rec.get(c).unwrap_or("");
                s.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .with_context(|| format!("{}: row {}: bad number {s:?}", path.display(), i + 2))
            };
            let at = LatLng {
                lat: num(lat)?,
                lng: num(lng)?,
            };
            if !((-90.0..=90.0).contains(&at.lat) && (-180.0..=180.0).contains(&at.lng)) {
                bail!("{}: row {}: coordinate out of range", path.display(), i + 2);
            }
            let w = match weight {
                Some(c) => num(c)?,
                None => 1.0,
            };
            if w > 0.0 {
                zones.push(Zone { at, weight: w });
            }
        }
        Demand::from_zones(zones, path.display().to_string())
    }

    pub fn from_zones(zones: Vec<Zone>, source: String) -> Result<Demand> {
        if zones.is_empty() {
            bail!("{source}: no zone with a positive weight");
        }
        let total: f64 = zones.iter().map(|z| z.weight).sum();
        let center = LatLng {
            lat: zones.iter().map(|z| z.at.lat * z.weight).sum::<f64>() / total,
            lng: zones.iter().map(|z| z.at.lng * z.weight).sum::<f64>() / total,
        };
        let far = zones
            .iter()
            .map(|z| haversine_m(center, z.at))
            .fold(0.0, f64::max);
        let mut acc = 0.0;
        let cumulative = zones
            .iter()
            .map(|z| {
                acc += z.weight;
                acc
            })
            .collect();
        // Zones about 1 km across: a jitter of a few hundred metres around each centre.
        let n = zones.len();
        Ok(Demand {
            zones,
            cumulative,
            jitter_m: 250.0,
            center,
            radius_m: far + 1_000.0,
            disc: false,
            source: format!("{source} ({n} zones)"),
        })
    }

    pub fn zones(&self) -> &[Zone] {
        &self.zones
    }

    /// A pickup (or a driver's start, or a cruising waypoint), drawn by weight.
    pub fn sample_point(&self, rng: &mut impl Rng) -> LatLng {
        if self.disc {
            let r = self.radius_m * rng.random::<f64>().sqrt();
            return destination(self.center, rng.random_range(0.0..360.0), r);
        }
        let total = *self.cumulative.last().unwrap();
        let x = rng.random::<f64>() * total;
        let i = self
            .cumulative
            .partition_point(|&c| c <= x)
            .min(self.zones.len() - 1);
        let (g1, _) = gaussian_pair(rng);
        destination(
            self.zones[i].at,
            rng.random_range(0.0..360.0),
            (g1 * self.jitter_m).abs(),
        )
    }

    /// A drop-off for a trip from `pickup`: a log-normal trip length (median 3 km,
    /// clamped to 1–10 km) in a random direction, kept inside the city.
    pub fn sample_dropoff(&self, pickup: LatLng, rng: &mut impl Rng) -> LatLng {
        let mut best = pickup;
        let mut best_out = f64::INFINITY;
        for _ in 0..12 {
            let len = trip_length_m(rng);
            let p = destination(pickup, rng.random_range(0.0..360.0), len);
            let out = haversine_m(self.center, p) - self.radius_m;
            if out <= 0.0 {
                return p;
            }
            if out < best_out {
                best_out = out;
                best = p;
            }
        }
        best
    }
}

/// A trip length, metres: log-normal with a median of 3 km, within 1–10 km.
pub fn trip_length_m(rng: &mut impl Rng) -> f64 {
    let (g, _) = gaussian_pair(rng);
    (3_000.0 * (0.6 * g).exp()).clamp(1_000.0, 10_000.0)
}

/// Two independent standard normal values (Box–Muller).
pub fn gaussian_pair(rng: &mut impl Rng) -> (f64, f64) {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random();
    let r = (-2.0 * u1.ln()).sqrt();
    let t = std::f64::consts::TAU * u2;
    (r * t.cos(), r * t.sin())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn zones_are_drawn_by_weight_and_trips_stay_in_range() {
        let a = LatLng {
            lat: 45.5,
            lng: -73.6,
        };
        let b = destination(a, 90.0, 8_000.0);
        let d = Demand::from_zones(
            vec![Zone { at: a, weight: 3.0 }, Zone { at: b, weight: 1.0 }],
            "test".into(),
        )
        .unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let n = 20_000;
        let near_a = (0..n)
            .filter(|_| haversine_m(d.sample_point(&mut rng), a) < 2_000.0)
            .count();
        let share = near_a as f64 / n as f64;
        assert!(
            (share - 0.75).abs() < 0.02,
            "share near the heavy zone {share}"
        );
        for _ in 0..2_000 {
            let p = d.sample_point(&mut rng);
            let q = d.sample_dropoff(p, &mut rng);
            let len = haversine_m(p, q);
            assert!((999.0..=10_001.0).contains(&len), "{len}");
        }
    }

    #[test]
    fn reads_the_carshare_layout() {
        let dir = tempfile_dir();
        let path = dir.join("zones.csv");
        std::fs::write(
            &path,
            "centroid_lat,centroid_lon,car_hours,peak_hour\n45.47,-73.58,1772.7,2\n45.54,-73.56,986.3,23\n",
        )
        .unwrap();
        let d = Demand::from_csv(&path).unwrap();
        assert_eq!(d.zones().len(), 2);
        assert_eq!(d.zones()[1].weight, 986.3);
        std::fs::write(&path, "lat,lng,weight\n45.5,-73.6,1\n").unwrap();
        assert_eq!(Demand::from_csv(&path).unwrap().zones().len(), 1);
        std::fs::write(&path, "x,y\n1,2\n").unwrap();
        assert!(Demand::from_csv(&path).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loadgen-demand-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
