//! Batched matching: the requests of one window against the drivers near them, assigned
//! to minimise the total pickup time (issue 17).
//!
//! Each request comes with its options: the drivers a search found for it and the
//! integer pickup ETA of each, in seconds. A pair dearer than [`BatchParams::max_cost_s`]
//! is not allowed. Requests that share no driver cannot affect each other, so the
//! requests are split into connected groups (two requests are connected when some driver
//! is an option of both) and each group is one min-cost assignment, solved with
//! Kuhn–Munkres (`pathfinding`): rectangular, so a group may have more drivers than
//! requests or fewer. The objective is lexicographic: as many requests matched as
//! possible, then the least total pickup time among those matchings.
//!
//! Bounded: a group of more than [`BatchParams::max_group`] requests is solved in slices
//! of that many, in the order the requests were given (their arrival order), each slice
//! seeing only the drivers the earlier ones left; and once the window's solver work
//! (rows² × columns summed over the slices, the Hungarian method's order) would pass
//! [`BatchParams::max_work`], the remaining requests are matched greedily (each its
//! cheapest driver still free, in order). Both are counted in [`BatchStats`]. Everything
//! is deterministic: no clock, no randomness, no hash order.

use std::collections::BTreeMap;

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

/// The bounds of one window's assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchParams {
    /// A pair with a longer pickup ETA than this (seconds) is never assigned.
    pub max_cost_s: u64,
    /// The most requests in one Kuhn–Munkres problem; a larger group is sliced.
    pub max_group: usize,
    /// The solver work allowed per window (sum of rows² × columns); past it, greedy.
    pub max_work: u64,
}

impl Default for BatchParams {
    fn default() -> Self {
        Self {
            // 15 minutes: a pickup further than that is not worth offering.
            max_cost_s: 900,
            // 64 × 640 candidates is ~2.6 M steps, well under a millisecond or so.
            max_group: 64,
            max_work: 20_000_000,
        }
    }
}

/// What solving one window took: the evidence that it stayed bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Connected groups of requests (with at least one allowed option).
    pub groups: u32,
    /// Requests in the largest group.
    pub largest_group: u32,
    /// Groups sliced because they had more than `max_group` requests.
    pub groups_sliced: u32,
    /// Requests matched greedily because the window's work budget ran out.
    pub greedy_fallback: u32,
    /// Solver work done (sum of rows² × columns).
    pub work: u64,
}

/// The outcome: for each request, in the order given, its driver and pickup ETA, or
/// `None` (no allowed option, or all its options went to others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome<D> {
    pub assigned: Vec<Option<(D, u64)>>,
    pub stats: BatchStats,
}

impl<D> BatchOutcome<D> {
    /// Total pickup ETA of the matched pairs and how many there are.
    pub fn totals(&self) -> (usize, u64) {
        self.assigned
            .iter()
            .flatten()
            .fold((0, 0), |(n, c), (_, s)| (n + 1, c + s))
    }
}

/// Assigns drivers to requests. `options[r]` lists request `r`'s drivers with their
/// pickup ETA in seconds (a driver listed twice for one request counts at its cheaper
/// ETA).
pub fn assign<D: Ord + Clone>(options: &[Vec<(D, u64)>], params: &BatchParams) -> BatchOutcome<D> {
    let n = options.len();
    // The allowed options of each request, cheapest per driver, as driver indices.
    let mut drivers: BTreeMap<&D, usize> = BTreeMap::new();
    let mut allowed: Vec<BTreeMap<usize, u64>> = Vec::with_capacity(n);
    for opts in options {
        let mut mine: BTreeMap<usize, u64> = BTreeMap::new();
        for (d, cost) in opts {
            if *cost > params.max_cost_s {
                continue;
            }
            let next = drivers.len();
            let di = *drivers.entry(d).or_insert(next);
            let c = mine.entry(di).or_insert(*cost);
            *c = (*c).min(*cost);
        }
        allowed.push(mine);
    }
    let names: Vec<D> = {
        let mut v: Vec<Option<D>> = vec![None; drivers.len()];
        for (d, i) in &drivers {
            v[*i] = Some((*d).clone());
        }
        v.into_iter().flatten().collect()
    };

    // Connected groups: union-find over requests, joined through shared drivers.
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut first_of_driver: Vec<Option<usize>> = vec![None; names.len()];
    for (r, mine) in allowed.iter().enumerate() {
        for &di in mine.keys() {
            match first_of_driver[di] {
                None => first_of_driver[di] = Some(r),
                Some(other) => {
                    let (a, b) = (find(&mut parent, r), find(&mut parent, other));
                    if a != b {
                        parent[a.max(b)] = a.min(b);
                    }
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (r, mine) in allowed.iter().enumerate() {
        if !mine.is_empty() {
            let root = find(&mut parent, r);
            groups.entry(root).or_default().push(r);
        }
    }

    let mut stats = BatchStats::default();
    let mut taken = vec![false; names.len()];
    let mut result: Vec<Option<(usize, u64)>> = vec![None; n];
    for members in groups.values() {
        stats.groups += 1;
        stats.largest_group = stats.largest_group.max(members.len() as u32);
        let max_group = params.max_group.max(1);
        if members.len() > max_group {
            stats.groups_sliced += 1;
        }
        for slice in members.chunks(max_group) {
            let cols: Vec<usize> = {
                let mut c: Vec<usize> = slice
                    .iter()
                    .flat_map(|r| allowed[*r].keys().copied())
                    .filter(|d| !taken[*d])
                    .collect();
                c.sort_unstable();
                c.dedup();
                c
            };
            if cols.is_empty() {
                continue;
            }
            let (rows, ncols) = (slice.len() as u64, cols.len() as u64);
            let work = rows.min(ncols).pow(2) * rows.max(ncols);
            if stats.work.saturating_add(work) > params.max_work {
                for &r in slice {
                    let best = allowed[r]
                        .iter()
                        .filter(|(d, _)| !taken[**d])
                        .min_by_key(|(d, c)| (**c, **d));
                    if let Some((&d, &c)) = best {
                        taken[d] = true;
                        result[r] = Some((d, c));
                        stats.greedy_fallback += 1;
                    }
                }
                continue;
            }
            stats.work += work;
            for (r, d, c) in solve(slice, &cols, &allowed, params.max_cost_s) {
                taken[d] = true;
                result[r] = Some((d, c));
            }
        }
    }
    BatchOutcome {
        assigned: result
            .into_iter()
            .map(|a| a.map(|(d, c)| (names[d].clone(), c)))
            .collect(),
        stats,
    }
}

/// One Kuhn–Munkres problem: `rows` requests against `cols` drivers. Weights are
/// `big - cost` for an allowed pair and 0 for a forbidden one, with `big` larger than any
/// sum of allowed costs, so the maximum-weight matching first matches as many requests as
/// can be, then takes the least total cost; forbidden pairs in it are dropped.
fn solve(
    rows: &[usize],
    cols: &[usize],
    allowed: &[BTreeMap<usize, u64>],
    max_cost_s: u64,
) -> Vec<(usize, usize, u64)> {
    let n = rows.len().min(cols.len()) as i64;
    let big: i64 = (max_cost_s as i64 + 1).saturating_mul(n + 1);
    let transpose = rows.len() > cols.len();
    let weight = |r: usize, d: usize| -> i64 { allowed[r].get(&d).map_or(0, |c| big - *c as i64) };
    let (nr, nc) = if transpose {
        (cols.len(), rows.len())
    } else {
        (rows.len(), cols.len())
    };
    let m = Matrix::from_fn(nr, nc, |(i, j)| {
        if transpose {
            weight(rows[j], cols[i])
        } else {
            weight(rows[i], cols[j])
        }
    });
    let (_, picks) = kuhn_munkres(&m);
    let mut out = Vec::new();
    for (i, j) in picks.into_iter().enumerate() {
        let (r, d) = if transpose {
            (rows[j], cols[i])
        } else {
            (rows[i], cols[j])
        };
        if let Some(c) = allowed[r].get(&d) {
            out.push((r, d, *c));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> BatchParams {
        BatchParams::default()
    }

    #[test]
    fn greedy_order_loses_to_the_assignment() {
        // Request 0 asked first and its nearest is A; request 1 has only A near and B far.
        // Greedy: 0→A (60), 1→B (600) = 660. Assigned: 0→B (120), 1→A (90) = 210.
        let opts = vec![vec![("A", 60), ("B", 120)], vec![("A", 90), ("B", 600)]];
        let out = assign(&opts, &p());
        assert_eq!(out.assigned, vec![Some(("B", 120)), Some(("A", 90))]);
        assert_eq!(out.stats.groups, 1);
    }

    #[test]
    fn more_requests_than_drivers_and_the_cap() {
        let opts = vec![
            vec![("A", 100)],
            vec![("A", 50), ("B", 2_000)],
            vec![("A", 10)],
        ];
        let out = assign(&opts, &p());
        // B is beyond the cap: one driver for three requests, the cheapest pair wins.
        assert_eq!(out.totals(), (1, 10));
        assert_eq!(out.assigned[2], Some(("A", 10)));
    }

    #[test]
    fn matching_more_beats_a_lower_total() {
        // 0→A alone costs 1, but then 1 has nobody: 0→B and 1→A match both.
        let opts = vec![vec![("A", 1), ("B", 800)], vec![("A", 800)]];
        let out = assign(&opts, &p());
        assert_eq!(out.totals(), (2, 1_600));
    }

    #[test]
    fn separate_groups_and_slices_are_counted() {
        let opts = vec![vec![("A", 1)], vec![("B", 1)], vec![("B", 2)], vec![]];
        let out = assign(
            &opts,
            &BatchParams {
                max_group: 1,
                ..p()
            },
        );
        assert_eq!(out.stats.groups, 2);
        assert_eq!(out.stats.largest_group, 2);
        assert_eq!(out.stats.groups_sliced, 1);
        assert_eq!(out.assigned[3], None);
        // The slice that came first took B.
        assert_eq!(out.assigned[1], Some(("B", 1)));
        assert_eq!(out.assigned[2], None);
    }

    #[test]
    fn past_the_work_budget_it_is_greedy_and_counted() {
        let opts = vec![vec![("A", 60), ("B", 120)], vec![("A", 90), ("B", 600)]];
        let out = assign(&opts, &BatchParams { max_work: 0, ..p() });
        assert_eq!(out.assigned, vec![Some(("A", 60)), Some(("B", 600))]);
        assert_eq!(out.stats.greedy_fallback, 2);
        assert_eq!(out.stats.work, 0);
    }
}
