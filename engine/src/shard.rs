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

use std::collections::BTreeMap;

use crate::geo::CellId;

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
