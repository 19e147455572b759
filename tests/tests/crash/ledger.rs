//! What clients were told, shared by every simulated app: each trip version by version,
//! every acknowledged command, and anything that broke the trip diagram.

use std::collections::{BTreeMap, HashSet};

use dispatch_tests::diagram::can_move;
use dispatch_transport::wire::{Trip, TripState};

/// One trip as clients saw it: each version's state and driver, and who saw it first.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) rider_id: String,
    pub(crate) at: BTreeMap<u64, (TripState, Option<String>, String)>,
}

impl Seen {
    pub(crate) fn latest(&self) -> (u64, TripState) {
        let (v, (s, _, _)) = self.at.last_key_value().expect("at least one version");
        (*v, *s)
    }
}

/// An acknowledged command about a trip, and the version its sender had seen by then.
#[derive(Debug)]
pub(crate) struct Acked {
    pub(crate) who: String,
    pub(crate) cmd: &'static str,
    pub(crate) trip_id: String,
    pub(crate) version: u64,
}

/// Everything clients were told, shared by every simulated app.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) trips: BTreeMap<String, Seen>,
    /// `trip_update`s received (the crash is timed on this).
    pub(crate) updates: usize,
    pub(crate) acks: Vec<Acked>,
    /// Drivers whose `go_online` was acknowledged.
    pub(crate) online: HashSet<String>,
    pub(crate) anomalies: Vec<String>,
    /// Set while the store or a node is taken away on purpose: an `unavailable` answer is
    /// then expected (counted in `refused`, retried by the apps), not an anomaly.
    pub(crate) store_outage: bool,
    pub(crate) refused: usize,
}

impl Ledger {
    /// Records that `who` saw `t`; flags a version seen in two states, an impossible step
    /// between consecutive versions, or anything after a final state.
    pub(crate) fn observe(&mut self, who: &str, t: &Trip, counted: bool) {
        if counted {
            self.updates += 1;
        }
        let mut bad = Vec::new();
        let seen = self.trips.entry(t.trip_id.clone()).or_default();
        if seen.rider_id.is_empty() {
            seen.rider_id = t.rider_id.clone();
        } else if seen.rider_id != t.rider_id {
            bad.push(format!(
                "trip {} has rider {} for {who} but {} before",
                t.trip_id, t.rider_id, seen.rider_id
            ));
        }
        let fact = (t.state, t.driver_id.clone());
        match seen.at.get(&t.version) {
            Some((s, d, first)) => {
                if (*s, d.clone()) != fact {
                    bad.push(format!(
                        "trip {} v{} is {:?} (driver {:?}) for {who} but {s:?} (driver {d:?}) for {first}",
                        t.trip_id, t.version, t.state, t.driver_id
                    ));
                }
            }
            None => {
                if let Some((pv, (ps, _, pwho))) = seen.at.range(..t.version).next_back() {
                    if ps.is_final() {
                        bad.push(format!(
                            "trip {} was final ({ps:?} v{pv}, seen by {pwho}) yet {who} sees v{} {:?}",
                            t.trip_id, t.version, t.state
                        ));
                    } else if *pv + 1 == t.version && !can_move(*ps, t.state) {
                        bad.push(format!(
                            "trip {}: v{pv} {ps:?} (seen by {pwho}) then v{} {:?} (seen by {who}) is no transition",
                            t.trip_id, t.version, t.state
                        ));
                    }
                }
                if let Some((nv, (ns, _, nwho))) = seen.at.range(t.version + 1..).next() {
                    if t.state.is_final() {
                        bad.push(format!(
                            "trip {} is final ({:?} v{}, seen by {who}) yet {nwho} saw v{nv} {ns:?}",
                            t.trip_id, t.state, t.version
                        ));
                    } else if t.version + 1 == *nv && !can_move(t.state, *ns) {
                        bad.push(format!(
                            "trip {}: v{} {:?} (seen by {who}) then v{nv} {ns:?} (seen by {nwho}) is no transition",
                            t.trip_id, t.version, t.state
                        ));
                    }
                }
                seen.at
                    .insert(t.version, (t.state, t.driver_id.clone(), who.to_owned()));
            }
        }
        self.anomalies.extend(bad);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.trips
            .values()
            .filter(|s| !s.latest().1.is_final())
            .count()
    }

    pub(crate) fn by_state(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for s in self.trips.values() {
            *out.entry(format!("{:?}", s.latest().1)).or_default() += 1;
        }
        out
    }
}
