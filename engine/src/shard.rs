//! The shard map of a cluster (issue 16): which member owns which shard, computed the same
//! way on every node from nothing but the set of live member names.
//!
//! A shard is a coarse H3 cell ([`SHARD_RESOLUTION`]): every cell actor, and the trips
//! picked up in it, belong to the shard of their cell's parent ([`shard_of`]). Its owner is
//! chosen by rendezvous (highest-random-weight) hashing ([`owner`]): each member gets a
//! weight `hash(shard, member)` and the highest wins. So
//! - every node that sees the same members, in any order, computes the same owner;
//! - when a member leaves, only the shards it owned move (each to its runner-up);
//! - when a member joins, only the shards it now wins move, all to it.
//!
//! The hash is [`weight`]: FNV-1a over the shard id and the name, finished by the
//! SplitMix64 mixer. It is fixed by this file, never seeded per process (std's `SipHash`
//! with `RandomState` would give every node a different map), and never changes between
//! versions without a coordinated restart of the whole cluster.

use std::collections::{BTreeMap, BTreeSet};

use crate::geo::{CellId, Grid, Point};

/// The H3 resolution of a shard: 6, cells of ~36 km² (edge ~3.2 km).
///
/// - City size: a large metro area (1,500–3,000 km² of served land) is 40–80 shards, so 3
///   nodes own 13–27 each, and rendezvous hashing's imbalance (it grows like √n per node)
///   stays within about ±30 % of the mean; resolution 5 (~253 km², 6–12 shards a city)
///   would leave one of 3 nodes with twice another's share, or with none.
/// - Border traffic: the default search radius is 5 km, more than one edge, so a search
///   near a border asks the cells of one or two neighbouring shards; resolution 7
///   (~5 km², edge 1.2 km) would make nearly every search cross a border, and a driver
///   moving at city speed change shard every couple of minutes instead of every ~6.
/// - Shards per node: a few tens per node keeps a node's loss spread over all survivors
///   (each takes a few shards), and a lease per shard cheap to renew.
pub const SHARD_RESOLUTION: h3o::Resolution = h3o::Resolution::Six;

/// A shard's id: the index of its H3 cell at [`SHARD_RESOLUTION`].
pub type ShardId = u64;

/// The shard `cell` belongs to: its parent at [`SHARD_RESOLUTION`] (itself if it is that
/// coarse; a cell coarser than a shard belongs to the shard of its centre child).
pub fn shard_of(cell: CellId) -> ShardId {
    let shard = match cell.parent(SHARD_RESOLUTION) {
        Some(parent) => parent,
        // Coarser than a shard: the centre child at shard resolution is always defined.
        None => cell.center_child(SHARD_RESOLUTION).unwrap_or(cell),
    };
    u64::from(shard)
}

/// The cell shard of a point on the index `grid` (`--h3-resolution`): the shard of the
/// grid cell the point is in ([`shard_of`]), where a driver there is indexed and a trip
/// picked up there is stored and served. The one definition: H3 children are not
/// contained in their parent exactly, so near a shard border the resolution-6 cell of the
/// point itself may be another shard (the neighbour of this one).
pub fn shard_of_point(grid: Grid, p: Point) -> ShardId {
    shard_of(grid.cell_of(p))
}

/// Samples inside a box are this far apart (km); along its edges, a quarter.
const SAMPLE_KM: f64 = 1.0;

/// Every shard a point of the box `south..=north`, `west..=east` (degrees; `west < east`,
/// no antimeridian) maps to on `grid` ([`shard_of_point`]), with few extra:
/// - the shard of every sample, every ~1 km inside and every ~250 m along the edges (this
///   alone is exact for resolution 6 and coarser, up to a shard the box grazes by less
///   than a sample step);
/// - at resolution 7, the parents of every resolution-7 cell that touches the box: those
///   of the samples, and their neighbours that touch it (a cell the box touches between
///   samples ~0.7 km apart is a neighbour of a sample's, for a resolution-7 cell is more
///   than 1.6 km across);
/// - finer, also the parents of those cells' neighbours: a finer cell's resolution-7
///   ancestor is the point's own resolution-7 cell or one of its neighbours.
///
/// The caller bounds the box's size (samples grow with its area).
pub fn shards_in_box(
    grid: Grid,
    (south, west): (f64, f64),
    (north, east): (f64, f64),
) -> BTreeSet<ShardId> {
    let km_lat = (north - south) * 111.2;
    let mid = ((south + north) / 2.0).to_radians().cos().max(0.01);
    let km_lng = (east - west) * 111.2 * mid;
    let mut samples = Vec::new();
    let mut add = |lat: f64, lng: f64| {
        if let Ok(p) = Point::new(lat.clamp(south, north), lng.clamp(west, east)) {
            samples.push(p);
        }
    };
    let steps = |km: f64, per: f64| ((km / per).ceil() as usize).max(1);
    let (ny, nx) = (steps(km_lat, SAMPLE_KM), steps(km_lng, SAMPLE_KM));
    for i in 0..=ny {
        let lat = south + (north - south) * i as f64 / ny as f64;
        for j in 0..=nx {
            add(lat, west + (east - west) * j as f64 / nx as f64);
        }
    }
    let (ey, ex) = (
        steps(km_lat, SAMPLE_KM / 4.0),
        steps(km_lng, SAMPLE_KM / 4.0),
    );
    for i in 0..=ey {
        let lat = south + (north - south) * i as f64 / ey as f64;
        add(lat, west);
        add(lat, east);
    }
    for j in 0..=ex {
        let lng = west + (east - west) * j as f64 / ex as f64;
        add(south, lng);
        add(north, lng);
    }
    let mut found: BTreeSet<ShardId> = samples.iter().map(|p| shard_of_point(grid, *p)).collect();
    if grid.resolution() <= 6 {
        return found;
    }
    let r7 = Grid::new(7).expect("7 is a valid resolution");
    let sampled: BTreeSet<CellId> = samples.iter().map(|p| r7.cell_of(*p)).collect();
    let mut touching = sampled.clone();
    for c in &sampled {
        for n in r7.ring(*c, 1) {
            if !touching.contains(&n) && touches_box(n, (south, west), (north, east)) {
                touching.insert(n);
            }
        }
    }
    found.extend(touching.iter().map(|c| shard_of(*c)));
    if grid.resolution() > 7 {
        for c in &touching {
            found.extend(r7.ring(*c, 1).into_iter().map(shard_of));
        }
    }
    found
}

/// Whether `cell`'s boundary polygon meets the box, in the plane of latitude and longitude
/// (a cell is small: its edges are taken as straight there), the box widened by ~10 m so
/// that the error of that is on the side of taking a cell in.
fn touches_box(cell: CellId, (south, west): (f64, f64), (north, east): (f64, f64)) -> bool {
    const PAD: f64 = 1e-4;
    let (s, w, n, e) = (south - PAD, west - PAD, north + PAD, east + PAD);
    let poly: Vec<(f64, f64)> = cell.boundary().iter().map(|v| (v.lat(), v.lng())).collect();
    let inside_box = |(y, x): (f64, f64)| (s..=n).contains(&y) && (w..=e).contains(&x);
    if poly.iter().any(|v| inside_box(*v)) {
        return true;
    }
    // A corner of the box inside the polygon (even-odd rule).
    let inside_poly = |(y, x): (f64, f64)| {
        let mut inside = false;
        for i in 0..poly.len() {
            let (a, b) = (poly[i], poly[(i + 1) % poly.len()]);
            if (a.0 > y) != (b.0 > y) && x < a.1 + (y - a.0) / (b.0 - a.0) * (b.1 - a.1) {
                inside = !inside;
            }
        }
        inside
    };
    let corners = [(s, w), (s, e), (n, e), (n, w)];
    if corners.iter().any(|c| inside_poly(*c)) {
        return true;
    }
    // An edge of the polygon crossing an edge of the box.
    let cross = |p: (f64, f64), q: (f64, f64), r: (f64, f64)| {
        (q.1 - p.1) * (r.0 - p.0) - (q.0 - p.0) * (r.1 - p.1)
    };
    let meets = |a: (f64, f64), b: (f64, f64), c: (f64, f64), d: (f64, f64)| {
        let (d1, d2) = (cross(c, d, a), cross(c, d, b));
        let (d3, d4) = (cross(a, b, c), cross(a, b, d));
        (d1 > 0.0) != (d2 > 0.0) && (d3 > 0.0) != (d4 > 0.0)
    };
    (0..poly.len()).any(|i| {
        let (a, b) = (poly[i], poly[(i + 1) % poly.len()]);
        (0..4).any(|k| meets(a, b, corners[k], corners[(k + 1) % 4]))
    })
}

/// How many entity shards drivers and riders are spread over (`docs/sharding.md` §1).
pub const ENTITY_SHARDS: u64 = 256;

/// The shard of the whole city's settings (pricing, surge): one writer for them.
pub const WHOLE_CITY: ShardId = 0;

/// The shard of a driver or rider: `1 + weight(0, id) % 256`, ids 1–256.
///
/// Never [`WHOLE_CITY`] (0) and never a cell shard (an H3 index has its mode bits set, so
/// it is at least 2^59). Fixed like [`weight`]: every node computes the same shard for an
/// id, in every version.
pub fn entity_shard(id: &str) -> ShardId {
    1 + weight(WHOLE_CITY, id) % ENTITY_SHARDS
}

/// Whether `shard` is one of the entity shards (1–256).
pub fn is_entity_shard(shard: ShardId) -> bool {
    (1..=ENTITY_SHARDS).contains(&shard)
}

/// The rendezvous weight of `member` for `shard`: a fixed, seedless 64-bit hash.
pub fn weight(shard: ShardId, member: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // The shard's bytes, a separator no name can forge (names are hashed with their
    // length), then the name.
    for b in shard
        .to_le_bytes()
        .iter()
        .chain((member.len() as u64).to_le_bytes().iter())
        .chain(member.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    // SplitMix64's finaliser: FNV alone leaves the high bits poorly mixed for short input.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `shard` among `members` (any order; duplicates are harmless): the member
/// of highest [`weight`], ties (never seen in practice) to the smaller name. `None` when
/// there are no members.
pub fn owner<S: AsRef<str>>(shard: ShardId, members: &[S]) -> Option<&str> {
    members.iter().map(|m| m.as_ref()).max_by(|a, b| {
        weight(shard, a)
            .cmp(&weight(shard, b))
            .then_with(|| b.cmp(a))
    })
}

/// The owner of each of `shards` among `members`: shard → member.
pub fn shard_map<S: AsRef<str>>(
    shards: impl IntoIterator<Item = ShardId>,
    members: &[S],
) -> BTreeMap<ShardId, String> {
    shards
        .into_iter()
        .filter_map(|s| owner(s, members).map(|m| (s, m.to_owned())))
        .collect()
}

/// How many of `shards` each member owns (every member listed, with 0 if it owns none).
pub fn shards_per_member<S: AsRef<str>>(
    shards: impl IntoIterator<Item = ShardId>,
    members: &[S],
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> =
        members.iter().map(|m| (m.as_ref().to_owned(), 0)).collect();
    for s in shards {
        if let Some(m) = owner(s, members) {
            *counts.entry(m.to_owned()).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every shard of a ~60 × 60 km square around Berlin: a big city's worth.
    fn city_shards() -> Vec<ShardId> {
        let grid = crate::Grid::new(8).unwrap();
        let mut shards = std::collections::BTreeSet::new();
        let mut lat = 52.25;
        while lat < 52.80 {
            let mut lng = 13.0;
            while lng < 13.9 {
                let cell = grid.cell_of(crate::Point::new(lat, lng).unwrap());
                shards.insert(shard_of(cell));
                lng += 0.01;
            }
            lat += 0.01;
        }
        shards.into_iter().collect()
    }

    fn names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z]{1,8}-[0-9]{1,2}", 1..8)
            .prop_map(|s| s.into_iter().collect())
    }

    #[test]
    fn the_shard_is_the_resolution_6_parent() {
        let grid = crate::Grid::new(9).unwrap();
        let cell = grid.cell_of(crate::Point::new(52.52, 13.405).unwrap());
        let shard = h3o::CellIndex::try_from(shard_of(cell)).unwrap();
        assert_eq!(shard.resolution(), SHARD_RESOLUTION);
        assert_eq!(cell.parent(SHARD_RESOLUTION), Some(shard));
        // A coarser cell still lands on a shard-resolution cell.
        let coarse = cell.parent(h3o::Resolution::Three).unwrap();
        let s = h3o::CellIndex::try_from(shard_of(coarse)).unwrap();
        assert_eq!(s.resolution(), SHARD_RESOLUTION);
    }

    /// A point whose resolution-6 cell is not the shard of its resolution-7 cell (found
    /// walking east from Montréal in ~20 m steps).
    fn a_point_where_the_two_differ() -> crate::Point {
        let (g6, g7) = (crate::Grid::new(6).unwrap(), crate::Grid::new(7).unwrap());
        (0..5_000)
            .map(|i| crate::Point::new(45.50, -73.60 + f64::from(i) * 0.00026).unwrap())
            .find(|p| shard_of(g6.cell_of(*p)) != shard_of_point(g7, *p))
            .expect("a point near a border within 100 km")
    }

    #[test]
    fn a_point_s_shard_is_its_index_cell_s_parent_not_its_own_resolution_6_cell() {
        let p = a_point_where_the_two_differ();
        let g7 = crate::Grid::new(7).unwrap();
        let own = shard_of(crate::Grid::new(6).unwrap().cell_of(p));
        let shard = shard_of_point(g7, p);
        assert_ne!(own, shard);
        assert_eq!(
            shard,
            u64::from(g7.cell_of(p).parent(SHARD_RESOLUTION).unwrap())
        );
        // The two are neighbours: the parent reaches just across the border.
        let own = h3o::CellIndex::try_from(own).unwrap();
        let shard = h3o::CellIndex::try_from(shard).unwrap();
        assert_eq!(own.grid_distance(shard), Ok(1));
    }

    /// Every point of a lattice ~100 m apart over the box `(s, w)`–`(n, e)` maps on `grid`
    /// to a shard of `shards_in_box`: the points it misses.
    fn uncovered(grid: crate::Grid, (s, w): (f64, f64), (n, e): (f64, f64)) -> Vec<crate::Point> {
        let set = shards_in_box(grid, (s, w), (n, e));
        let ny = (((n - s) / 0.0009) as usize).max(4);
        let nx = (((e - w) / 0.0013) as usize).max(4);
        let mut missed = Vec::new();
        for i in 0..=ny {
            for j in 0..=nx {
                let lat = s + (n - s) * i as f64 / ny as f64;
                let lng = w + (e - w) * j as f64 / nx as f64;
                let p = crate::Point::new(lat, lng).unwrap();
                if !set.contains(&shard_of_point(grid, p)) {
                    missed.push(p);
                }
            }
        }
        missed
    }

    #[test]
    fn a_box_s_shards_cover_every_point_of_it_at_every_index_resolution() {
        let (sw, ne) = ((45.45, -73.70), (45.60, -73.50));
        // And a box of ~100 m around a point whose own resolution-6 cell is not its shard.
        let p = a_point_where_the_two_differ();
        let (lat, lng) = (p.lat(), p.lng());
        let small = ((lat - 0.0005, lng - 0.0005), (lat + 0.0005, lng + 0.0005));
        for (sw, ne) in [small, (sw, ne)] {
            for res in [7, 8, 9, 11, 6, 5] {
                let grid = crate::Grid::new(res).unwrap();
                let missed = uncovered(grid, sw, ne);
                assert!(
                    missed.is_empty(),
                    "res {res}, box {sw:?}-{ne:?}: {} points, e.g. {:?}",
                    missed.len(),
                    missed.first()
                );
            }
        }
        // At resolution 7 the cover takes the parents of cells touching the box, not a
        // whole ring more: the resolution-6 cells of the samples and a few rim neighbours.
        let g6 = shards_in_box(crate::Grid::new(6).unwrap(), sw, ne);
        let g7 = shards_in_box(crate::Grid::new(7).unwrap(), sw, ne);
        assert!(
            g7.len() <= g6.len() + g6.len() / 2 + 4,
            "{} vs {}",
            g7.len(),
            g6.len()
        );
    }

    #[test]
    fn the_weight_is_fixed_across_builds() {
        // Pinned values: a change here changes every cluster's map (see the module doc).
        assert_eq!(weight(0, ""), weight(0, ""));
        assert_ne!(weight(1, "a"), weight(1, "b"));
        assert_ne!(weight(1, "a"), weight(2, "a"));
        assert_eq!(weight(42, "dispatchd-0"), 0xba80_cdac_a9a0_63b4);
    }

    #[test]
    fn entity_shards_are_1_to_256_and_never_a_cell_or_the_city() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20_000 {
            let s = entity_shard(&format!("d-{i}"));
            assert!(is_entity_shard(s), "{s}");
            seen.insert(s);
        }
        // 20,000 ids fill all 256 buckets (a miss has odds of about 256 · e^-78).
        assert_eq!(seen.len(), ENTITY_SHARDS as usize);
        assert!(!is_entity_shard(WHOLE_CITY));
        let grid = crate::Grid::new(9).unwrap();
        let cell = grid.cell_of(crate::Point::new(52.52, 13.405).unwrap());
        assert!(!is_entity_shard(shard_of(cell)));
        // Pinned: a change here moves every driver of every cluster.
        assert_eq!(entity_shard("d-1"), 163);
        assert_eq!(entity_shard("dispatchd-driver-1"), 92);
    }

    #[test]
    fn no_members_no_owner() {
        assert_eq!(owner::<&str>(7, &[]), None);
        assert!(shard_map::<&str>([1, 2], &[]).is_empty());
    }

    #[test]
    fn a_city_is_shared_evenly_by_three_nodes() {
        let shards = city_shards();
        let members = ["dispatchd-0", "dispatchd-1", "dispatchd-2"];
        let per = shards_per_member(shards.iter().copied(), &members);
        let mean = shards.len() as f64 / 3.0;
        eprintln!("{} shards: {per:?}", shards.len());
        assert!(shards.len() >= 60, "{} shards", shards.len());
        for (m, n) in &per {
            assert!(
                (*n as f64) > mean * 0.6 && (*n as f64) < mean * 1.4,
                "{m} owns {n} of {} shards",
                shards.len()
            );
        }
    }

    proptest! {
        #[test]
        fn every_order_gives_the_same_map(members in names(), seed in any::<u64>()) {
            let mut shuffled = members.clone();
            // A deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (weight(seed, &i.to_string()) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            shuffled.push(members[0].clone()); // a duplicate changes nothing
            let shards: Vec<ShardId> = (0..200).map(|i| weight(seed, &format!("s{i}"))).collect();
            prop_assert_eq!(
                shard_map(shards.iter().copied(), &members),
                shard_map(shards.iter().copied(), &shuffled)
            );
        }

        #[test]
        fn many_shards_are_balanced(members in names(), seed in any::<u64>()) {
            let shards: Vec<ShardId> = (0..4000u64).map(|i| weight(seed, &i.to_string())).collect();
            let per = shards_per_member(shards.iter().copied(), &members);
            let mean = shards.len() as f64 / members.len() as f64;
            for (m, n) in &per {
                // ±25 % of the mean: several standard deviations at ≥500 shards a member.
                prop_assert!((*n as f64) > mean * 0.75 && (*n as f64) < mean * 1.25,
                    "{} owns {} (mean {})", m, n, mean);
            }
        }

        #[test]
        fn a_leaving_member_moves_only_its_shards(members in names(), gone in any::<prop::sample::Index>()) {
            prop_assume!(members.len() >= 2);
            let gone = members[gone.index(members.len())].clone();
            let rest: Vec<String> = members.iter().filter(|m| **m != gone).cloned().collect();
            for shard in 0..500u64 {
                let before = owner(shard, &members).unwrap();
                let after = owner(shard, &rest).unwrap();
                if before != gone {
                    prop_assert_eq!(before, after, "shard {} moved off a member that stayed", shard);
                }
            }
        }

        #[test]
        fn a_joining_member_takes_only_what_moves_to_it(members in names(), new in "[A-Z]{1,8}") {
            let mut grown = members.clone();
            grown.push(new.clone());
            let mut taken = 0;
            for shard in 0..500u64 {
                let before = owner(shard, &members).unwrap();
                let after = owner(shard, &grown).unwrap();
                if before != after {
                    prop_assert_eq!(after, new.as_str(), "shard {} moved between old members", shard);
                    taken += 1;
                }
            }
            // It does take a share.
            prop_assert!(taken > 0);
        }
    }
}
