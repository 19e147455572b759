//! Property tests of pricing: the upfront fare (`RateCards::quote`) and surge per cell
//! (`SurgeBook`), checked against the rules their docs state rather than a copy of their
//! arithmetic (STYLE.md, "Tests, innermost first").
//!
//! Fares are compared with an exact reference where one is cheap: trips are whole metres
//! and seconds and surges whole tenths, so `raw × surge` is an integer ratio computed in
//! `i128`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use dispatch_engine::{
    CellId, EtaEstimate, Grid, Point, Product, RateCard, RateCards, SurgeBook, SurgeConfig,
};
use proptest::prelude::*;

mod common;

use common::config;

fn cap() -> f64 {
    SurgeConfig::default().cap
}

fn eta(distance_m: u64, duration_s: u64) -> EtaEstimate {
    EtaEstimate {
        distance_m: distance_m as f64,
        duration_s: duration_s as f64,
    }
}

fn fare(cards: &RateCards, product: Product, distance_m: u64, duration_s: u64, s: f64) -> i64 {
    cards
        .quote(product, eta(distance_m, duration_s), s)
        .fare_cents
}

fn product() -> impl Strategy<Value = Product> {
    prop::sample::select(Product::ALL.to_vec())
}

/// A valid rate card: every price 0..=100 000, the minimum 0..=1 000 000.
fn card() -> impl Strategy<Value = RateCard> {
    let price = || 0..=100_000i64;
    (
        price(),
        price(),
        price(),
        0..=1_000_000i64,
        price(),
        price(),
    )
        .prop_map(|(base, km, min, minimum, booking, cancel)| RateCard {
            base_cents: base,
            per_km_cents: km,
            per_minute_cents: min,
            minimum_cents: minimum,
            booking_fee_cents: booking,
            cancellation_fee_cents: cancel,
        })
}

/// The default cards half the time (the prices riders see), random valid ones otherwise.
fn cards() -> impl Strategy<Value = RateCards> {
    prop_oneof![
        1 => Just(RateCards::default()),
        1 => (card(), card(), card()).prop_map(|(economy, xl, premium)| RateCards {
            currency: "USD".into(),
            economy,
            xl,
            premium,
        }),
    ]
}

/// Whole metres: a city trip mostly, sometimes across a continent or the planet.
fn distance() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=60_000u64,
        1 => 0..=2_000_000u64,
        1 => 0..=40_000_000u64,
    ]
}

/// Whole seconds: up to two hours mostly, sometimes up to four months.
fn duration() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=7_200u64,
        1 => 0..=10_000_000u64,
    ]
}

/// A surge in whole tenths, 1.0..=cap, as the surge book hands them out (tenths).
fn tenths() -> impl Strategy<Value = i64> {
    10..=(cap() * 10.0).round() as i64
}

/// Any surge a caller could pass: whole steps, arbitrary values in [1, cap], and values
/// below one, including the non-finite ones `max(1.0)` swallows.
fn any_surge() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => tenths().prop_map(|t| t as f64 / 10.0),
        3 => 1.0..=cap(),
        1 => -5.0..1.0f64,
        1 => prop::sample::select(vec![0.0, -0.0, f64::NAN, f64::NEG_INFINITY, 0.999_999]),
    ]
}

/// The exact fare of a whole-metre, whole-second trip at `tenths`/10 surge: the raw fare
/// rounded half up, times the surge rounded down, at least the minimum, plus the booking
/// fee; with the fraction of the raw fare before rounding: `(fare, frac)`.
fn exact_fare(card: &RateCard, distance_m: u64, duration_s: u64, tenths: i64) -> (i128, f64) {
    // raw × 60 000 = base × 60 000 + m × per_km × 60 + s × per_minute × 1 000.
    let raw_60k = i128::from(card.base_cents) * 60_000
        + i128::from(distance_m) * i128::from(card.per_km_cents) * 60
        + i128::from(duration_s) * i128::from(card.per_minute_cents) * 1_000;
    let whole = raw_60k / 60_000;
    let frac = (raw_60k % 60_000) as f64 / 60_000.0;
    let rounded = if frac >= 0.5 { whole + 1 } else { whole };
    let surged = rounded * i128::from(tenths) / 10;
    (
        surged.max(i128::from(card.minimum_cents)) + i128::from(card.booking_fee_cents),
        frac,
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// A longer or slower trip never costs less, for every product and surge.
    #[test]
    fn the_fare_is_monotone_in_distance_and_duration(
        cards in cards(),
        product in product(),
        distance in distance(),
        duration in duration(),
        more_m in prop_oneof![0..=10u64, 0..=100_000u64],
        more_s in prop_oneof![0..=10u64, 0..=10_000u64],
        s in any_surge(),
    ) {
        let base = fare(&cards, product, distance, duration, s);
        let further = fare(&cards, product, distance + more_m, duration, s);
        let longer = fare(&cards, product, distance, duration + more_s, s);
        prop_assert!(further >= base, "{distance} m → {base}, {} m → {further}", distance + more_m);
        prop_assert!(longer >= base, "{duration} s → {base}, {} s → {longer}", duration + more_s);
        // The same in fractional metres and seconds, the way an ETA model hands them in.
        let f = |d: f64, t: f64| cards.quote(product, EtaEstimate { distance_m: d, duration_s: t }, s).fare_cents;
        let (d, t) = (distance as f64 / 7.0, duration as f64 / 3.0);
        prop_assert!(f(d + 0.001, t) >= f(d, t));
        prop_assert!(f(d, t + 0.001) >= f(d, t));
    }

    /// Never below minimum + booking fee, and exactly that when `raw × surge` is below
    /// the minimum (a tiny trip).
    #[test]
    fn the_fare_is_never_below_the_minimum_plus_the_booking_fee(
        cards in cards(),
        product in product(),
        distance in prop_oneof![0..=500u64, distance()],
        duration in prop_oneof![0..=60u64, duration()],
        s in any_surge(),
    ) {
        let card = *cards.card(product);
        let floor = card.minimum_cents + card.booking_fee_cents;
        let q = cards.quote(product, eta(distance, duration), s);
        prop_assert!(q.fare_cents >= floor, "{} < {floor}", q.fare_cents);
        // Where the surged raw fare is clearly under the minimum, the fare is the floor.
        let t = if s >= 1.0 { (s * 10.0).round() as i64 } else { 10 };
        if (s * 10.0 - t as f64).abs() < 1e-9 || s < 1.0 || s.is_nan() {
            let (exact, _) = exact_fare(&card, distance, duration, t);
            let (unfloored, _) = exact_fare(&RateCard { minimum_cents: 0, booking_fee_cents: 0, ..card }, distance, duration, t);
            if unfloored + 1 < i128::from(card.minimum_cents) {
                prop_assert_eq!(i128::from(q.fare_cents), exact);
                prop_assert_eq!(q.fare_cents, floor);
            }
        }
    }

    /// The fare matches the exact reference (to the cent, but for a float tie), so no
    /// overflow, wrap or saturation anywhere in the range of valid cards.
    #[test]
    fn random_valid_cards_never_overflow_and_match_the_exact_fare(
        cards in cards(),
        product in product(),
        distance in distance(),
        duration in duration(),
        t in tenths(),
    ) {
        let card = *cards.card(product);
        let q = cards.quote(product, eta(distance, duration), t as f64 / 10.0);
        let (exact, frac) = exact_fare(&card, distance, duration, t);
        prop_assert!(q.fare_cents > 0 || card.minimum_cents + card.booking_fee_cents == 0);
        if (frac - 0.5).abs() > 1e-3 {
            prop_assert_eq!(i128::from(q.fare_cents), exact, "frac {}", frac);
        } else {
            prop_assert!((i128::from(q.fare_cents) - exact).abs() <= 1);
        }
        prop_assert_eq!(q.product, product);
        prop_assert_eq!(q.surge, t as f64 / 10.0);
        prop_assert_eq!((q.distance_m, q.duration_s), (distance, duration));
        prop_assert_eq!(q.currency, cards.currency.clone());
    }

    /// More surge never makes a trip cheaper; a surge below one (or NaN) is one.
    #[test]
    fn the_fare_is_non_decreasing_in_surge_and_surge_below_one_is_one(
        cards in cards(),
        product in product(),
        distance in distance(),
        duration in duration(),
        a in any_surge(),
        b in any_surge(),
    ) {
        let (lo, hi) = if a.max(1.0) <= b.max(1.0) { (a, b) } else { (b, a) };
        let (f_lo, f_hi) = (fare(&cards, product, distance, duration, lo), fare(&cards, product, distance, duration, hi));
        prop_assert!(f_lo <= f_hi, "surge {lo} → {f_lo}, surge {hi} → {f_hi}");
        for s in [a, b] {
            if s < 1.0 || s.is_nan() {
                let q = cards.quote(product, eta(distance, duration), s);
                let one = cards.quote(product, eta(distance, duration), 1.0);
                prop_assert_eq!(q.fare_cents, one.fare_cents, "surge {}", s);
                prop_assert_eq!(q.surge, 1.0, "surge {}", s);
            }
        }
    }

    /// A surged fare is never more than cap × the fare without surge (the fare.rs doc:
    /// "never more than `surge` × the fare without surge").
    #[test]
    fn the_fare_is_never_more_than_cap_times_the_unsurged_fare(
        cards in cards(),
        product in product(),
        distance in distance(),
        duration in duration(),
        s in any_surge(),
    ) {
        // What the fare is charged at: below one (or NaN) is one; above the cap is not
        // a surge the book hands out.
        let s = if s.is_nan() { 1.0 } else { s.clamp(1.0, cap()) };
        let unsurged = fare(&cards, product, distance, duration, 1.0);
        let surged = fare(&cards, product, distance, duration, s);
        let at_cap = fare(&cards, product, distance, duration, cap());
        prop_assert!(surged as f64 <= cap() * unsurged as f64,
            "surge {s}: {surged} > {} × {unsurged}", cap());
        prop_assert!(at_cap as f64 <= cap() * unsurged as f64,
            "surge {}: {at_cap} > {} × {unsurged}", cap(), cap());
        // The stronger claim of the doc, per surge.
        prop_assert!(surged as f64 <= s * unsurged as f64 + 1e-6,
            "surge {s}: {surged} > {s} × {unsurged}");
    }
}

/// Tiny trips on the default cards cost exactly the minimum (the booking fee is 0).
#[test]
fn tiny_trips_on_the_default_cards_cost_the_minimum() {
    let cards = RateCards::default();
    for product in Product::ALL {
        let card = cards.card(product);
        for (m, s) in [(0, 0), (1, 1), (100, 30), (200, 60)] {
            assert_eq!(
                fare(&cards, product, m, s, 1.0),
                card.minimum_cents + card.booking_fee_cents,
                "{product} {m} m {s} s"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Surge

/// Montréal and three places ~20–30 km away: four distinct resolution-6 surge cells.
const CENTRES: [(f64, f64); 4] = [
    (45.53, -73.62),
    (45.72, -73.62),
    (45.53, -73.30),
    (45.34, -73.90),
];
const T0: u64 = 1_700_000_000_000;

fn pt(lat: f64, lng: f64) -> Point {
    Point::new(lat, lng).expect("generated points are valid")
}

/// `m` is `1 + k × step` for a whole `k`.
fn is_whole_steps(cfg: &SurgeConfig, m: f64) -> bool {
    let k = ((m - 1.0) / cfg.step).round();
    k >= 0.0 && (m - (1.0 + k * cfg.step)).abs() < 1e-9
}

/// A multiplier an operator types: in range or not, a step or not.
#[derive(Debug, Clone, Copy)]
enum Typed {
    Step(u8),
    Any(f64),
    Wild(f64),
}

fn typed() -> impl Strategy<Value = Typed> {
    prop_oneof![
        2 => (0u8..=20).prop_map(Typed::Step),
        2 => (1.0..=cap()).prop_map(Typed::Any),
        1 => prop_oneof![
            -2.0..1.0f64,
            cap()..cap() + 5.0,
            prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.999_999_9, cap() + 1e-9]),
        ]
        .prop_map(Typed::Wild),
    ]
}

impl Typed {
    fn value(self) -> f64 {
        match self {
            Typed::Step(k) => 1.0 + f64::from(k) * 0.1,
            Typed::Any(v) | Typed::Wild(v) => v,
        }
    }
}

#[derive(Debug, Clone)]
enum SurgeOp {
    /// `count` requests at a point up to ~3 km from centre `at`, so a burst sometimes
    /// lands in a neighbouring cell.
    Requests {
        at: u8,
        dlat: f64,
        dlng: f64,
        count: u8,
    },
    /// The available drivers in centre `at`'s cell, for the next update.
    Supply {
        at: u8,
        drivers: u32,
    },
    Update,
    Pin {
        at: u8,
        m: Typed,
    },
    Unpin {
        at: u8,
    },
    CityCap(Option<Typed>),
}

fn surge_op(centres: u8) -> impl Strategy<Value = SurgeOp> {
    let at = move || 0..centres;
    prop_oneof![
        4 => (at(), -0.027..0.027f64, -0.038..0.038f64, 1u8..=25)
            .prop_map(|(at, dlat, dlng, count)| SurgeOp::Requests { at, dlat, dlng, count }),
        2 => (at(), prop_oneof![0..=3u32, 0..=60u32]).prop_map(|(at, drivers)| SurgeOp::Supply { at, drivers }),
        6 => Just(SurgeOp::Update),
        1 => (at(), typed()).prop_map(|(at, m)| SurgeOp::Pin { at, m }),
        1 => at().prop_map(|at| SurgeOp::Unpin { at }),
        1 => prop::option::weighted(0.7, typed()).prop_map(SurgeOp::CityCap),
    ]
}

/// Time between two operations: sometimes round, so that a request leaves the window
/// exactly at an update.
fn gap_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..=30_000u64,
        2 => 0..=200_000u64,
        1 => 250_000..=700_000u64,
        2 => prop::sample::select(vec![0u64, 1, 100_000, 150_000, 299_999, 300_000, 300_001]),
    ]
}

/// What one cell shows: its computed multiplier (1.0 when the book forgot it).
fn computed(book: &SurgeBook, cell: CellId) -> f64 {
    book.cells()
        .into_iter()
        .find(|c| c.cell == cell)
        .map_or(1.0, |c| c.computed)
}

struct SurgeHarness {
    book: SurgeBook,
    cfg: SurgeConfig,
    now: u64,
    centres: Vec<CellId>,
    /// Every cell a request ever landed in (a burst can spill over a border).
    touched: BTreeSet<CellId>,
    /// A point in each touched cell, for `multiplier_at`.
    points: BTreeMap<CellId, Point>,
    supply: HashMap<CellId, u32>,
    /// The supply the last update was given.
    applied: HashMap<CellId, u32>,
    /// Each cell's computed multiplier after the last update.
    last: BTreeMap<CellId, f64>,
    /// Every request's time, per cell.
    requests: BTreeMap<CellId, Vec<u64>>,
    /// Requests before this had left the window at the last update.
    cutoff: u64,
}

impl SurgeHarness {
    fn new() -> Self {
        let cfg = SurgeConfig::default();
        cfg.validate().unwrap();
        let book = SurgeBook::new(cfg);
        let centres: Vec<CellId> = CENTRES
            .iter()
            .map(|&(a, b)| book.cell_of(pt(a, b)))
            .collect();
        let distinct: BTreeSet<_> = centres.iter().collect();
        assert_eq!(
            distinct.len(),
            centres.len(),
            "the centres share a surge cell"
        );
        Self {
            book,
            cfg,
            now: T0,
            points: centres.iter().map(|&c| (c, Grid::centre(c))).collect(),
            touched: centres.iter().copied().collect(),
            centres,
            supply: HashMap::new(),
            applied: HashMap::new(),
            last: BTreeMap::new(),
            requests: BTreeMap::new(),
            cutoff: 0,
        }
    }

    fn step(&mut self, op: &SurgeOp, gap: u64) -> Result<(), TestCaseError> {
        self.now += gap;
        let before: BTreeMap<CellId, f64> = self
            .touched
            .iter()
            .map(|&c| (c, computed(&self.book, c)))
            .collect();
        let (pins, city_cap) = (self.book.pins().clone(), self.book.city_cap());
        match *op {
            SurgeOp::Requests {
                at,
                dlat,
                dlng,
                count,
            } => {
                let (lat, lng) = CENTRES[at as usize];
                let p = pt(lat + dlat, lng + dlng);
                let cell = self.book.cell_of(p);
                self.touched.insert(cell);
                self.points.entry(cell).or_insert(p);
                for _ in 0..count {
                    self.book.record_request(p, self.now);
                }
                self.requests
                    .entry(cell)
                    .or_default()
                    .extend(std::iter::repeat_n(self.now, usize::from(count)));
            }
            SurgeOp::Supply { at, drivers } => {
                self.supply.insert(self.centres[at as usize], drivers);
            }
            SurgeOp::Update => {
                self.book.update(self.now, self.supply.clone());
                self.cutoff = self.now.saturating_sub(self.cfg.window_ms);
                for &cell in &self.touched {
                    let was = self.last.get(&cell).copied().unwrap_or(1.0);
                    let now = computed(&self.book, cell);
                    prop_assert!(
                        (now - was).abs() <= self.cfg.max_change + self.cfg.step + 1e-9,
                        "cell {cell}: computed {was} → {now} in one update"
                    );
                    // It moves toward the stepped target, and stays when it shows it.
                    let target = self.cfg.stepped(self.target(cell));
                    let toward = match target.total_cmp(&was) {
                        Ordering::Greater => now >= was,
                        Ordering::Less => now <= was,
                        Ordering::Equal => now == was,
                    };
                    prop_assert!(
                        toward,
                        "cell {cell}: computed {was} → {now}, target {target}"
                    );
                    self.last.insert(cell, now);
                }
                self.applied = self.supply.clone();
            }
            SurgeOp::Pin { at, m } => {
                let cell = self.centres[at as usize];
                let v = m.value();
                let r = self.book.pin(cell, Some(v));
                if v.is_finite() && (1.0..=self.cfg.cap).contains(&v) {
                    prop_assert!(r.is_ok(), "pin {v} refused: {r:?}");
                    let pinned = self.book.pins().get(&cell).copied();
                    prop_assert_eq!(pinned, Some(self.cfg.stepped(v)), "pin {}", v);
                    // Rounded to the nearest step: within half a step, and a whole step.
                    let p = pinned.unwrap();
                    prop_assert!(
                        (p - v).abs() <= self.cfg.step / 2.0 + 1e-9 && is_whole_steps(&self.cfg, p),
                        "pin {v} stepped to {p}"
                    );
                } else {
                    prop_assert!(r.is_err(), "pin {v} accepted");
                    prop_assert_eq!(self.book.pins(), &pins, "a refused pin changed the pins");
                }
            }
            SurgeOp::Unpin { at } => {
                let cell = self.centres[at as usize];
                self.book.pin(cell, None).unwrap();
                prop_assert!(!self.book.pins().contains_key(&cell));
            }
            SurgeOp::CityCap(cap) => {
                let v = cap.map(Typed::value);
                let r = self.book.set_city_cap(v);
                match v {
                    Some(v) if !(v.is_finite() && (1.0..=self.cfg.cap).contains(&v)) => {
                        prop_assert!(r.is_err(), "city cap {v} accepted");
                        prop_assert_eq!(
                            self.book.city_cap(),
                            city_cap,
                            "a refused cap changed the cap"
                        );
                    }
                    _ => {
                        prop_assert!(r.is_ok(), "city cap {v:?} refused: {r:?}");
                        prop_assert!(self.book.city_cap().is_some() == v.is_some());
                    }
                }
            }
        }
        if !matches!(op, SurgeOp::Update) {
            // Only an update recomputes a cell.
            for (&cell, &was) in &before {
                prop_assert_eq!(
                    computed(&self.book, cell),
                    was,
                    "cell {} changed without an update",
                    cell
                );
            }
        }
        self.check()
    }

    /// The target of `cell` by the doc's formula, from the model's demand and supply (no
    /// drivers counts as one).
    fn target(&self, cell: CellId) -> f64 {
        let demand = self
            .requests
            .get(&cell)
            .map_or(0, |ts| ts.iter().filter(|t| **t >= self.cutoff).count());
        let supply = self.supply.get(&cell).copied().unwrap_or(0).max(1);
        let ratio = demand as f64 / f64::from(supply);
        (1.0 + self.cfg.sensitivity * (ratio - 1.0)).clamp(1.0, self.cfg.cap)
    }

    /// Every multiplier is in [1, cap] and a whole number of steps; each cell shows its
    /// pin or computed value under the city cap.
    fn check(&self) -> Result<(), TestCaseError> {
        let cfg = &self.cfg;
        let in_range = |m: f64| m.is_finite() && (1.0..=cfg.cap).contains(&m);
        let ids: BTreeSet<CellId> = self
            .touched
            .iter()
            .chain(self.book.pins().keys())
            .copied()
            .collect();
        for cell in ids {
            let m = self.book.multiplier(cell);
            prop_assert!(
                in_range(m) && is_whole_steps(cfg, m),
                "cell {cell}: multiplier {m} (pin {:?}, city cap {:?}, computed {})",
                self.book.pins().get(&cell),
                self.book.city_cap(),
                computed(&self.book, cell)
            );
            if let Some(p) = self.points.get(&cell) {
                prop_assert_eq!(self.book.multiplier_at(*p), m);
            }
        }
        // Demand: the requests since the last update's window began; supply: as of the
        // last update.
        let shown: BTreeMap<CellId, (u32, u32)> = self
            .book
            .cells()
            .iter()
            .map(|c| (c.cell, (c.demand, c.supply)))
            .collect();
        for (cell, times) in &self.requests {
            let want = times.iter().filter(|t| **t >= self.cutoff).count() as u32;
            prop_assert_eq!(
                shown.get(cell).map_or(0, |c| c.0),
                want,
                "demand of {}",
                cell
            );
        }
        for (cell, (_, supply)) in &shown {
            prop_assert_eq!(
                *supply,
                self.applied.get(cell).copied().unwrap_or(0),
                "supply of {}",
                cell
            );
        }
        for c in self.book.cells() {
            prop_assert!(
                in_range(c.computed) && is_whole_steps(cfg, c.computed),
                "{:?}",
                c
            );
            if let Some(p) = c.pinned {
                prop_assert!(in_range(p) && is_whole_steps(cfg, p), "{:?}", c);
            }
            let want = c
                .pinned
                .unwrap_or(c.computed)
                .min(self.book.city_cap().unwrap_or(f64::INFINITY));
            prop_assert_eq!(c.multiplier, want, "{:?}", c);
        }
        Ok(())
    }
}

/// Runs `steps` on the first `centres` cells; `whole_step_caps` rounds every city cap
/// in range to a whole step first.
fn run_surge_ops(
    centres: u8,
    steps: &[(SurgeOp, u64)],
    whole_step_caps: bool,
) -> Result<(), TestCaseError> {
    let mut h = SurgeHarness::new();
    for (op, gap) in steps {
        let op = match op.clone() {
            SurgeOp::Requests {
                at,
                dlat,
                dlng,
                count,
            } => SurgeOp::Requests {
                at: at % centres,
                dlat,
                dlng,
                count,
            },
            SurgeOp::Supply { at, drivers } => SurgeOp::Supply {
                at: at % centres,
                drivers,
            },
            SurgeOp::Pin { at, m } => SurgeOp::Pin {
                at: at % centres,
                m,
            },
            SurgeOp::Unpin { at } => SurgeOp::Unpin { at: at % centres },
            SurgeOp::CityCap(Some(Typed::Any(v))) if whole_step_caps => {
                SurgeOp::CityCap(Some(Typed::Any(h.cfg.stepped(v))))
            }
            other => other,
        };
        h.step(&op, *gap)?;
    }
    Ok(())
}

/// Requests at `p`, all at `at`.
fn burst(book: &mut SurgeBook, p: Point, n: u32, at: u64) {
    for _ in 0..n {
        book.record_request(p, at);
    }
}

/// A cell brought to some level by `first` = (demand, supply, updates) long ago, then
/// `demand` requests at once and updates `interval` apart with `supply` drivers.
#[derive(Debug, Clone, Copy)]
struct Constant {
    first: (u32, u32, usize),
    demand: u32,
    supply: u32,
    interval: u64,
}

impl Constant {
    fn target(self) -> f64 {
        let cfg = SurgeConfig::default();
        cfg.stepped(cfg.target(self.demand, self.supply))
    }
}

fn constant() -> impl Strategy<Value = Constant> {
    (
        (0u32..=120, 0u32..=40, 0usize..=12),
        0u32..=120,
        0u32..=40,
        1_000u64..=2_000,
    )
        .prop_map(|(first, demand, supply, interval)| Constant {
            first,
            demand,
            supply,
            interval,
        })
}

/// Runs `c` for 150 updates from `T0 + 2 × window`, all with the new demand in the
/// window: the book, the cell and what each update computed.
fn constant_run(c: Constant) -> (SurgeBook, CellId, Vec<f64>) {
    let cfg = SurgeConfig::default();
    let mut b = SurgeBook::new(cfg);
    let p = pt(CENTRES[0].0, CENTRES[0].1);
    let cell = b.cell_of(p);
    let (d0, s0, n0) = c.first;
    burst(&mut b, p, d0, T0);
    for i in 0..n0 {
        b.update(T0 + i as u64 * 10_000, HashMap::from([(cell, s0)]));
    }
    // 150 updates × ≤ 2 s < 5 min: the demand stays in the window throughout.
    let t1 = T0 + 2 * cfg.window_ms;
    burst(&mut b, p, c.demand, t1);
    let mut seen = vec![];
    for i in 1..=150u64 {
        b.update(t1 + i * c.interval, HashMap::from([(cell, c.supply)]));
        seen.push(computed(&b, cell));
    }
    (b, cell, seen)
}

proptest! {
    #![proptest_config(config(256))]

    /// Random bursts, supplies, updates, pins and caps over one to four cells: every
    /// multiplier is in [1, cap] and a whole number of steps, an update moves a cell's
    /// computed multiplier by at most `max_change` + one step, nothing else moves it, and
    /// pins and caps outside [1, cap] are refused.
    #[test]
    fn surge_multipliers_stay_stepped_capped_and_smooth(
        centres in 1u8..=4,
        steps in proptest::collection::vec((surge_op(4), gap_ms()), 1..80),
    ) {
        run_surge_ops(centres, &steps, false)?;
    }

    /// The same with city caps that are whole steps only, so the rest of the rules are
    /// checked even while a cap between two steps shows through (see the test above).
    #[test]
    fn surge_multipliers_stay_stepped_capped_and_smooth_under_whole_step_caps(
        centres in 1u8..=4,
        steps in proptest::collection::vec((surge_op(4), gap_ms()), 1..80),
    ) {
        run_surge_ops(centres, &steps, true)?;
    }

    /// With demand and supply held constant, a cell's computed multiplier converges to
    /// `stepped(target)`, from any earlier level, up or down.
    #[test]
    fn constant_inputs_converge_to_the_stepped_target(c in constant()) {
        let (_, _, seen) = constant_run(c);
        prop_assert_eq!(*seen.last().unwrap(), c.target(), "{:?}: {:?}", c, seen);
    }

    /// With demand and supply held constant it moves one way only, ends on a value it
    /// keeps, and once it shows `stepped(target)` three updates running it never leaves
    /// it (no flapping). When the demand leaves the window it comes back to 1.0 and the
    /// cell is forgotten.
    #[test]
    fn constant_inputs_never_flap_and_old_demand_fades_to_one(c in constant()) {
        let cfg = SurgeConfig::default();
        let target = c.target();
        let (mut b, cell, seen) = constant_run(c);
        prop_assert!(
            seen.windows(2).all(|w| w[1] >= w[0]) || seen.windows(2).all(|w| w[1] <= w[0]),
            "not monotone toward the target: {:?}", seen
        );
        if let Some(i) = seen.windows(3).position(|w| w.iter().all(|m| *m == target)) {
            prop_assert!(seen[i..].iter().all(|m| *m == target), "left {} after settling: {:?}", target, seen);
        }
        let last = *seen.last().unwrap();
        prop_assert!((last - target).abs() <= cfg.step + 1e-9, "target {}: {:?}", target, seen);
        prop_assert!(seen[seen.len() - 40..].iter().all(|m| *m == last), "{:?}", seen);
        // The window passes: the level falls back to 1.0 and the cell is forgotten.
        let t2 = T0 + 3 * cfg.window_ms + 1;
        let mut down = vec![];
        for i in 0..40u64 {
            b.update(t2 + i * c.interval, HashMap::from([(cell, c.supply)]));
            down.push(b.multiplier(cell));
        }
        prop_assert!(down.windows(2).all(|w| w[1] <= w[0]), "{:?}", down);
        prop_assert_eq!(*down.last().unwrap(), 1.0, "{:?}", down);
        prop_assert!(b.cells().is_empty(), "{:?}", b.cells());
    }

    /// A pin is stepped and refused outside [1, cap]; the city cap bounds it; the
    /// multiplier of a pinned cell under any accepted city cap is a whole number of steps.
    #[test]
    fn pins_are_stepped_and_capped_by_the_city_cap(pin in typed(), city in typed()) {
        let cfg = SurgeConfig::default();
        let mut b = SurgeBook::new(cfg);
        let cell = b.cell_of(pt(CENTRES[0].0, CENTRES[0].1));
        let ok = |v: f64| v.is_finite() && (1.0..=cfg.cap).contains(&v);
        let (pv, cv) = (pin.value(), city.value());
        prop_assert_eq!(b.pin(cell, Some(pv)).is_ok(), ok(pv), "pin {}", pv);
        prop_assert_eq!(b.set_city_cap(Some(cv)).is_ok(), ok(cv), "city cap {}", cv);
        let pinned = if ok(pv) { cfg.stepped(pv) } else { 1.0 };
        let m = b.multiplier(cell);
        prop_assert!(m <= pinned, "{m} above the pin {pinned}");
        if ok(cv) {
            prop_assert!(m <= cv, "{m} above the city cap {cv}");
        }
        prop_assert!(ok(m) && is_whole_steps(&cfg, m),
            "pin {pv} (stepped {pinned}), city cap {cv}: multiplier {m} is not a whole number of {} steps", cfg.step);
    }
}

/// The surge property must reach high surge, cells forgotten after surging, pins and
/// city caps, or it proves little. This runs the same generator by hand and counts.
#[test]
fn the_surge_test_reaches_high_surge_pins_caps_and_forgetting() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    let strategy = proptest::collection::vec((surge_op(4), gap_ms()), 1..80);
    for _ in 0..256 {
        let steps = strategy.new_tree(&mut runner).unwrap().current();
        let mut h = SurgeHarness::new();
        let mut surged: BTreeSet<CellId> = BTreeSet::new();
        for (op, gap) in &steps {
            let op = match op.clone() {
                SurgeOp::CityCap(Some(Typed::Any(v))) => {
                    SurgeOp::CityCap(Some(Typed::Any(h.cfg.stepped(v))))
                }
                other => other,
            };
            h.step(&op, *gap).unwrap();
            let cells = h.book.cells();
            for c in &cells {
                if c.computed >= 2.0 {
                    *seen.entry("computed ≥ 2").or_default() += 1;
                }
                if c.computed > 1.0 {
                    surged.insert(c.cell);
                }
            }
            for cell in surged.clone() {
                if !cells.iter().any(|c| c.cell == cell) {
                    *seen.entry("forgotten after surging").or_default() += 1;
                    surged.remove(&cell);
                }
            }
            if !h.book.pins().is_empty() {
                *seen.entry("pinned").or_default() += 1;
            }
            if h.book.city_cap().is_some_and(|c| c < h.cfg.cap) {
                *seen.entry("city cap").or_default() += 1;
            }
        }
    }
    common::assert_reached(
        &seen,
        &[
            "computed ≥ 2",
            "forgotten after surging",
            "pinned",
            "city cap",
        ],
        20,
    );
}

// ---------------------------------------------------------------------------------------
// The smallest cases of what the properties above found, spelled out.

/// XL, 1.14 km, 535 s: 1006.45 rounds to 1006 without surge, but 3 × 1006.45 = 3019.35
/// rounds to 3019, one cent more than 3 × 1006: the surge multiplies the unrounded fare.
#[test]
fn a_surged_fare_is_at_most_surge_times_the_rounded_unsurged_fare() {
    let cards = RateCards::default();
    let unsurged = fare(&cards, Product::Xl, 1140, 535, 1.0);
    let surged = fare(&cards, Product::Xl, 1140, 535, 3.0);
    assert_eq!(unsurged, 1006);
    assert!(surged <= 3 * unsurged, "{surged} > 3 × {unsurged}");
}

/// A city cap of 1.25 is accepted as it is, and a cell pinned at 2.0 is then priced at
/// 1.25, between two steps.
#[test]
fn a_city_cap_between_two_steps_still_prices_in_whole_steps() {
    let cfg = SurgeConfig::default();
    let mut b = SurgeBook::new(cfg);
    let cell = b.cell_of(pt(CENTRES[0].0, CENTRES[0].1));
    b.pin(cell, Some(2.0)).unwrap();
    b.set_city_cap(Some(1.25)).unwrap();
    let m = b.multiplier(cell);
    assert!(is_whole_steps(&cfg, m), "multiplier {m}");
}

/// 11 requests over 10 drivers: target 1.05, `stepped` 1.1. The level creeps up toward
/// 1.05 by halves and sticks one ulp below it, so the cell shows 1.0 for good.
#[test]
fn a_target_half_way_between_two_steps_is_reached() {
    let c = Constant {
        first: (0, 0, 0),
        demand: 11,
        supply: 10,
        interval: 1_000,
    };
    assert_eq!(c.target(), 1.1);
    let (_, _, seen) = constant_run(c);
    assert_eq!(*seen.last().unwrap(), c.target(), "{seen:?}");
}
