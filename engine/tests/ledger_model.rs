//! The ledger against a plain model of a few trips' money, under random sequences of
//! payment steps, provider declines and failures, and crashes (STYLE.md, "Tests,
//! innermost first").
//!
//! Each step's entry is made the way the server makes it: `TripMoney::of` over the
//! trip's entries in the ledger, then `authorize`, `capture`, `cancel_fee`, `release` or
//! `refund`. A crash throws the in-memory `Ledger` away and rebuilds it from every entry
//! ever durably written, in a random order, then replays the last one again. After every
//! step the balances are checked against the model, which knows nothing of postings:
//! only which trips were authorized, completed, cancelled and refunded, for how much.

use std::collections::{BTreeMap, HashMap};

use dispatch_engine::{
    Account, DriverId, Entry, Ledger, LedgerError, PaymentTerms, RiderId, Step, TripId, TripMoney,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

mod common;

const TRIPS: u8 = 6;
/// Riders and drivers are shared between trips, so per-account sums are tested too.
const RIDERS: u8 = 3;
const DRIVERS: u8 = 3;
const T0: u64 = 1_700_000_000_000;
const USD: &str = "USD";

fn trip_id(i: u8) -> TripId {
    TripId::new(format!("trp_{i}"))
}

fn rider(i: u8) -> RiderId {
    RiderId::new(format!("rdr_{i}"))
}

fn driver(i: u8) -> DriverId {
    DriverId::new(format!("drv_{i}"))
}

/// One trip as booked: who, and the amounts its steps use.
#[derive(Debug, Clone)]
struct TripSpec {
    rider: u8,
    driver: u8,
    /// The upfront fare, held at assignment.
    fare: i64,
    /// What completion captures: the fare, or another final amount.
    final_fare: i64,
    /// The late-cancel fee (may be 0).
    fee: i64,
}

fn trip_spec() -> impl Strategy<Value = TripSpec> {
    (
        0..RIDERS,
        0..DRIVERS,
        prop_oneof![1..=5_000i64, 1..=1_000_000i64],
        proptest::option::weighted(0.25, 1..=1_000_000i64),
        prop_oneof![0..=2_000i64, Just(0)],
    )
        .prop_map(|(rider, driver, fare, other_final, fee)| TripSpec {
            rider,
            driver,
            fare,
            final_fare: other_final.unwrap_or(fare),
            fee,
        })
}

/// A refund an operator types.
#[derive(Debug, Clone, Copy)]
enum RefundAmount {
    /// This share of what is left to refund (at least 1).
    Share(f64),
    /// All that is left.
    All,
    /// More than is left.
    TooMuch(i64),
    /// Zero or negative.
    NonPositive(i64),
}

/// What a step asks the ledger for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Authorize,
    Complete,
    RiderCancel,
    OtherCancel,
}

#[derive(Debug, Clone)]
enum Op {
    /// Assignment: hold the fare; the provider may decline (no entry).
    Authorize {
        trip: u8,
        declined: bool,
    },
    /// `completed`: capture the final fare.
    Complete {
        trip: u8,
    },
    /// The rider cancels: early releases the hold, late charges the fee. With `edge`,
    /// the clock first moves (if it can) to the grace period's end plus `edge` ms.
    RiderCancel {
        trip: u8,
        edge: Option<i8>,
    },
    /// Any other end (driver, operator, no driver found): release.
    OtherCancel {
        trip: u8,
    },
    Refund {
        trip: u8,
        amount: RefundAmount,
    },
    /// The provider fails: the step's entry is made but never written.
    ProviderFailure {
        trip: u8,
        kind: Kind,
    },
    /// A retry: the last durable entry is posted again.
    Retry,
    /// A stale writer posts a trip's authorization from an empty view of the trip: the
    /// same amount is a no-op, another one is refused.
    StaleAuthorize {
        trip: u8,
        same: bool,
    },
    /// Throw the ledger away and rebuild it from the durable entries, shuffled by `seed`.
    Crash {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let trip = || 0..TRIPS;
    prop_oneof![
        4 => (trip(), proptest::bool::weighted(0.15))
            .prop_map(|(trip, declined)| Op::Authorize { trip, declined }),
        3 => trip().prop_map(|trip| Op::Complete { trip }),
        2 => (trip(), proptest::option::weighted(0.3, -1i8..=1))
            .prop_map(|(trip, edge)| Op::RiderCancel { trip, edge }),
        1 => trip().prop_map(|trip| Op::OtherCancel { trip }),
        3 => (trip(), prop_oneof![
            3 => (0.0..=1.0f64).prop_map(RefundAmount::Share),
            1 => Just(RefundAmount::All),
            1 => (1..=10_000i64).prop_map(RefundAmount::TooMuch),
            1 => (-100..=0i64).prop_map(RefundAmount::NonPositive),
        ]).prop_map(|(trip, amount)| Op::Refund { trip, amount }),
        1 => (trip(), prop::sample::select(vec![Kind::Authorize, Kind::Complete, Kind::RiderCancel, Kind::OtherCancel]))
            .prop_map(|(trip, kind)| Op::ProviderFailure { trip, kind }),
        1 => Just(Op::Retry),
        1 => (trip(), any::<bool>()).prop_map(|(trip, same)| Op::StaleAuthorize { trip, same }),
        2 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

/// Time before a step: often within the cancel grace period, sometimes well past it,
/// and in round amounts so that a cancel lands exactly on the grace period's edge.
fn gap_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..=30_000u64,
        2 => 0..=150_000u64,
        2 => prop::sample::select(vec![0u64, 1, 30_000, 60_000, 119_999, 120_000]),
    ]
}

/// How a trip's payment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Captured,
    Fee,
    Released,
}

/// One trip's money as the model sees it.
#[derive(Debug, Clone, Default)]
struct ModelTrip {
    authorized_at: Option<u64>,
    end: Option<End>,
    refunded: i64,
    refunds: u32,
}

impl ModelTrip {
    fn held(&self, spec: &TripSpec) -> i64 {
        match (self.authorized_at, self.end) {
            (Some(_), None) => spec.fare,
            _ => 0,
        }
    }

    fn charged(&self, spec: &TripSpec) -> i64 {
        match self.end {
            Some(End::Captured) => spec.final_fare,
            Some(End::Fee) => spec.fee,
            _ => 0,
        }
    }
}

struct Harness {
    specs: Vec<TripSpec>,
    terms: PaymentTerms,
    now: u64,
    ledger: Ledger,
    /// Every entry the ledger accepted, in order: what survives a crash.
    durable: Vec<Entry>,
    model: Vec<ModelTrip>,
}

impl Harness {
    fn new(specs: Vec<TripSpec>) -> Self {
        let model = vec![ModelTrip::default(); specs.len()];
        Self {
            specs,
            terms: PaymentTerms::default(),
            now: T0,
            ledger: Ledger::new(),
            durable: vec![],
            model,
        }
    }

    fn ids(&self, i: u8) -> (TripId, RiderId, DriverId) {
        let s = &self.specs[i as usize];
        (trip_id(i), rider(s.rider), driver(s.driver))
    }

    /// Where the trip's payment stands, as the server derives it.
    fn money(&self, i: u8) -> TripMoney {
        let (t, r, _) = self.ids(i);
        TripMoney::of(self.ledger.entries_of(&t), &r)
    }

    /// Posts a new entry: it must be accepted, and is then durable.
    fn write(&mut self, e: Entry) -> Result<(), TestCaseError> {
        prop_assert_eq!(e.sum(), 0, "unbalanced {:?}", e);
        let r = self.ledger.post(e.clone());
        prop_assert_eq!(r, Ok(true), "{:?}", e);
        self.durable.push(e);
        Ok(())
    }

    /// The entry the server makes for `kind` on trip `i`, and whether the model says
    /// there should be one.
    fn make(&self, i: u8, kind: Kind) -> (Option<Entry>, bool) {
        let (t, r, d) = self.ids(i);
        let spec = &self.specs[i as usize];
        let model = &self.model[i as usize];
        let open = model.authorized_at.is_some() && model.end.is_none();
        let m = self.money(i);
        match kind {
            Kind::Authorize => (
                m.authorize(&t, &r, spec.fare, USD, self.now).ok(),
                model.authorized_at.is_none() && model.end.is_none(),
            ),
            Kind::Complete => (
                m.capture(&self.terms, &t, &r, &d, spec.final_fare, USD, self.now)
                    .ok(),
                open,
            ),
            Kind::RiderCancel => match m.authorized_at_ms {
                Some(at) if self.terms.rider_cancel_costs_fee(at, None, self.now) => {
                    (m.cancel_fee(&t, &r, &d, spec.fee, USD, self.now).ok(), open)
                }
                _ => (m.release(&t, &r, USD, self.now), open),
            },
            Kind::OtherCancel => (m.release(&t, &r, USD, self.now), open),
        }
    }

    fn step(&mut self, op: &Op, gap: u64) -> Result<(), TestCaseError> {
        self.now += gap;
        let before = self.ledger.balances().clone();
        let entries_before = self.ledger.len();
        match *op {
            Op::Authorize { trip, declined } => {
                let (e, expect) = self.make(trip, Kind::Authorize);
                prop_assert_eq!(e.is_some(), expect, "authorize {}", trip);
                if let Some(e) = e
                    && !declined
                {
                    self.write(e)?;
                    self.model[trip as usize].authorized_at = Some(self.now);
                }
            }
            Op::Complete { trip } => {
                let (e, expect) = self.make(trip, Kind::Complete);
                prop_assert_eq!(e.is_some(), expect, "complete {}", trip);
                if let Some(e) = e {
                    self.write(e)?;
                    self.model[trip as usize].end = Some(End::Captured);
                }
            }
            Op::RiderCancel { trip, .. } | Op::OtherCancel { trip } => {
                let rider_cancel = matches!(op, Op::RiderCancel { .. });
                if let (
                    Op::RiderCancel {
                        edge: Some(edge), ..
                    },
                    Some(at),
                ) = (op, self.model[trip as usize].authorized_at)
                {
                    let edge_at =
                        (at + self.terms.cancel_grace_ms).saturating_add_signed(i64::from(*edge));
                    self.now = self.now.max(edge_at);
                }
                let kind = if rider_cancel {
                    Kind::RiderCancel
                } else {
                    Kind::OtherCancel
                };
                let (e, expect) = self.make(trip, kind);
                prop_assert_eq!(e.is_some(), expect, "{:?} {}", kind, trip);
                if let Some(e) = e {
                    let m = &self.model[trip as usize];
                    let late = rider_cancel
                        && self.now - m.authorized_at.unwrap() >= self.terms.cancel_grace_ms;
                    let want = if late { Step::CancelFee } else { Step::Release };
                    prop_assert_eq!(e.key.step, want);
                    self.write(e)?;
                    self.model[trip as usize].end =
                        Some(if late { End::Fee } else { End::Released });
                }
            }
            Op::Refund { trip, amount } => {
                let (t, r, _) = self.ids(trip);
                let spec = self.specs[trip as usize].clone();
                let left =
                    self.model[trip as usize].charged(&spec) - self.model[trip as usize].refunded;
                let amount = match amount {
                    RefundAmount::Share(f) => ((left as f64 * f).round() as i64).max(1),
                    RefundAmount::All => left,
                    RefundAmount::TooMuch(x) => left + x,
                    RefundAmount::NonPositive(x) => x,
                };
                let r = self.money(trip).refund(&t, &r, amount, USD, self.now);
                let valid = amount >= 1 && amount <= left;
                prop_assert_eq!(
                    r.is_ok(),
                    valid,
                    "refund {} of {} left: {:?}",
                    amount,
                    left,
                    r
                );
                if let Ok(e) = r {
                    let m = &mut self.model[trip as usize];
                    m.refunds += 1;
                    prop_assert_eq!(e.key.step, Step::Refund(m.refunds));
                    m.refunded += amount;
                    self.write(e)?;
                } else {
                    prop_assert!(matches!(r, Err(LedgerError::NotAllowed(_))), "{:?}", r);
                }
            }
            Op::ProviderFailure { trip, kind } => {
                // The entry is made, the provider call fails, nothing is written.
                let _ = self.make(trip, kind);
            }
            Op::Retry => {
                if let Some(last) = self.durable.last().cloned() {
                    prop_assert_eq!(self.ledger.post(last), Ok(false), "a retry posted");
                }
            }
            Op::StaleAuthorize { trip, same } => {
                let (t, r, _) = self.ids(trip);
                let spec = &self.specs[trip as usize];
                let authorized = self
                    .durable
                    .iter()
                    .any(|e| e.key.trip_id == t && e.key.step == Step::Authorize);
                if authorized {
                    let amount = if same { spec.fare } else { spec.fare + 1 };
                    let e = TripMoney::default()
                        .authorize(&t, &r, amount, USD, self.now)
                        .expect("an empty view authorizes");
                    let got = self.ledger.post(e);
                    if same {
                        prop_assert_eq!(got, Ok(false));
                    } else {
                        prop_assert!(matches!(got, Err(LedgerError::Conflict(_))), "{:?}", got);
                    }
                }
            }
            Op::Crash { seed } => {
                let mut log = self.durable.clone();
                log.shuffle(&mut StdRng::seed_from_u64(seed));
                let mut rebuilt = Ledger::new();
                for e in log {
                    let key = e.key.clone();
                    prop_assert_eq!(rebuilt.post(e), Ok(true), "rebuilding {:?}", key);
                }
                if let Some(last) = self.durable.last().cloned() {
                    let was = rebuilt.balances().clone();
                    prop_assert_eq!(rebuilt.post(last), Ok(false), "the replay posted");
                    prop_assert_eq!(rebuilt.balances(), &was, "the replay moved money");
                }
                self.ledger = rebuilt;
                prop_assert_eq!(
                    nonzero(self.ledger.balances()),
                    nonzero(&before),
                    "the rebuild lost money"
                );
            }
        }
        let wrote = self.ledger.len() - entries_before;
        if wrote == 0 {
            prop_assert_eq!(
                nonzero(self.ledger.balances()),
                nonzero(&before),
                "{:?} moved money without an entry",
                op
            );
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let l = &self.ledger;
        prop_assert_eq!(l.total(), 0);
        prop_assert_eq!(l.len(), self.durable.len());
        for e in &self.durable {
            prop_assert_eq!(e.sum(), 0, "{:?}", e);
        }
        let mut drivers: BTreeMap<u8, i64> = BTreeMap::new();
        let mut riders: BTreeMap<u8, i64> = BTreeMap::new();
        let mut holds: BTreeMap<u8, i64> = BTreeMap::new();
        let mut platform = 0;
        for (i, (spec, model)) in self.specs.iter().zip(&self.model).enumerate() {
            let i = i as u8;
            let t = trip_id(i);
            let count = |step: Step| {
                self.durable
                    .iter()
                    .filter(|e| e.key.trip_id == t && e.key.step == step)
                    .count()
            };
            let ends = [Step::Capture, Step::CancelFee, Step::Release].map(count);
            prop_assert!(
                ends.iter().sum::<usize>() <= 1,
                "trip {}: capture/fee/release {:?}",
                i,
                ends
            );
            // No lost capture: a completed trip has exactly one, in the ledger itself.
            let captures = l
                .entries_of(&t)
                .iter()
                .filter(|e| e.key.step == Step::Capture)
                .count();
            prop_assert_eq!(
                captures,
                usize::from(model.end == Some(End::Captured)),
                "trip {}",
                i
            );

            let m = self.money(i);
            let want = TripMoney {
                held: model.held(spec),
                authorized_at_ms: model.authorized_at,
                charged: model.charged(spec),
                refunded: model.refunded,
                refunds: model.refunds,
                settled: model.end.is_some(),
            };
            prop_assert_eq!(m, want, "trip {}", i);
            prop_assert!(m.refunded <= m.charged, "trip {}: {:?}", i, m);
            if m.settled {
                prop_assert_eq!(m.held, 0, "trip {}", i);
            }

            let commission = self.terms.commission(spec.final_fare);
            let earned = match model.end {
                Some(End::Captured) => spec.final_fare - commission,
                Some(End::Fee) => spec.fee,
                _ => 0,
            };
            *drivers.entry(spec.driver).or_default() += earned;
            *riders.entry(spec.rider).or_default() += model.refunded - model.charged(spec);
            *holds.entry(spec.rider).or_default() -= model.held(spec);
            if model.end == Some(End::Captured) {
                platform += commission;
            }
            platform -= model.refunded;
        }
        for d in 0..DRIVERS {
            let want = drivers.get(&d).copied().unwrap_or(0);
            prop_assert_eq!(l.balance(&Account::Driver(driver(d))), want, "driver {}", d);
        }
        let mut all_holds = 0;
        for r in 0..RIDERS {
            let want = riders.get(&r).copied().unwrap_or(0);
            prop_assert_eq!(l.balance(&Account::Rider(rider(r))), want, "rider {}", r);
            let hold = l.balance(&Account::RiderHold(rider(r)));
            prop_assert_eq!(
                hold,
                holds.get(&r).copied().unwrap_or(0),
                "rider hold {}",
                r
            );
            all_holds += hold;
        }
        prop_assert_eq!(l.balance(&Account::Platform), platform, "platform");
        prop_assert_eq!(l.balance(&Account::Clearing), 0, "clearing");
        prop_assert_eq!(
            l.balance(&Account::Authorizations) + all_holds,
            0,
            "authorizations"
        );
        // No account outside those.
        for a in l.balances().keys() {
            let known = match a {
                Account::Rider(r) | Account::RiderHold(r) => (0..RIDERS).any(|i| &rider(i) == r),
                Account::Driver(d) => (0..DRIVERS).any(|i| &driver(i) == d),
                _ => true,
            };
            prop_assert!(known, "unknown account {}", a);
        }
        Ok(())
    }
}

/// Balances without the accounts at zero (a rebuilt ledger has no entry for those).
fn nonzero(b: &HashMap<Account, i64>) -> BTreeMap<Account, i64> {
    b.iter()
        .filter(|(_, v)| **v != 0)
        .map(|(a, v)| (a.clone(), *v))
        .collect()
}

fn scenario() -> impl Strategy<Value = (Vec<TripSpec>, Vec<(Op, u64)>)> {
    (
        proptest::collection::vec(trip_spec(), TRIPS as usize),
        proptest::collection::vec((op(), gap_ms()), 1..80),
    )
}

proptest! {
    #![proptest_config(common::config(256))]

    #[test]
    fn the_ledger_matches_the_model_across_crashes((specs, steps) in scenario()) {
        let mut h = Harness::new(specs);
        for (op, gap) in &steps {
            h.step(op, *gap)?;
        }
    }
}

/// The property above must reach every end of a trip, refunds and crashes with entries
/// to replay, or it proves little. This runs the same generator by hand and counts.
#[test]
fn the_model_test_reaches_every_end() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for _ in 0..256 {
        let (specs, steps) = scenario().new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new(specs);
        for (op, gap) in &steps {
            let crash_with_entries = matches!(op, Op::Crash { .. }) && !h.durable.is_empty();
            h.step(op, *gap).unwrap();
            if crash_with_entries {
                *seen.entry("crash").or_default() += 1;
            }
        }
        for m in &h.model {
            let what = match m.end {
                Some(End::Captured) => "captured",
                Some(End::Fee) => "fee",
                Some(End::Released) => "released",
                None if m.authorized_at.is_some() => "held",
                None => "unauthorized",
            };
            *seen.entry(what).or_default() += 1;
            if m.refunds > 1 {
                *seen.entry("refunded twice").or_default() += 1;
            }
        }
    }
    common::assert_reached(
        &seen,
        &[
            "captured",
            "fee",
            "released",
            "held",
            "unauthorized",
            "refunded twice",
            "crash",
        ],
        5,
    );
}
