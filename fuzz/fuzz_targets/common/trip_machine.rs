//! The checks of the `trip_machine` fuzz target: the engine's whole transitions
//! ([`Trip::start`], [`Trip::decide`]: the trip, its effects, its journal record and its
//! payment plan), carried out as the trip actor carries them out, against a payment
//! provider, driven by an arbitrary sequence of commands decoded from the fuzz input.
//!
//! This file is shared: `fuzz/fuzz_targets/trip_machine.rs` runs it under libFuzzer, and
//! `engine/tests/fuzz_regressions.rs` includes it with `#[path]` and replays every input
//! of `fuzz/corpus/trip_machine/` and `fuzz/regressions/trip_machine/` through it, so a
//! saved input is checked by exactly the same code. It uses nothing but the engine and
//! std, and decodes the bytes by hand (no `arbitrary`), so the test needs no dependency.
//!
//! # Input
//! Every byte string is a valid input: a byte past the end reads as 0.
//! - Header, 9 bytes: offer timeout (0: 15 s, 255: `u64::MAX`, else ×500 ms), dispatch
//!   deadline (0: 120 s, 255: `u64::MAX`, else ×2 s), fare (u16 LE; 0: 1850, 0xFFFF: 0),
//!   cancellation fee (u16 LE; 0: 500, 0xFFFF: 0), commission (0: 2500 bps, else ×40 bps,
//!   at most 10 000), cancel grace / no-show wait (0: 2 min / 5 min, else low nibble ×30 s,
//!   high nibble ×60 s), flags (product = flags % 3; bit 7: fare ×100 000).
//! - Then up to [`MAX_OPS`] operations, each an opcode byte (mod 17), a clock byte (the
//!   time that passes first: low 6 bits × 1 ms, 250 ms, 2 s or 30 s by the top 2 bits)
//!   and the operation's own bytes; see [`Op`].
//!
//! # What is checked after every operation
//! - The machine: `check_invariants`; an error changes nothing; each command is accepted
//!   exactly when PROTOCOL.md's rules allow it; at most one transition per command, an
//!   arrow of the diagram, by the right mover, with `version` +1 and `updated_at` = now;
//!   final states are absorbing (no change, no effect); effects match the change
//!   (`Finished`, `DriverAssigned`, `DriverReleased`, `ArmDeadline`); at most one offer at
//!   a time, each to a fresh eligible candidate with a rising `seq`, every open offer
//!   ended with `OfferEnded` unless accepted or refused; searches exclude exactly the
//!   drivers offered so far; a dispatching trip is always either searching or offering.
//! - The journal: a decision has a record exactly when it has a `Transitioned` effect, and
//!   the record is that effect with the new trip's version; the committed records are a
//!   path from the request's (`dispatching`, version 1), versions 1, 2, 3, ... with no gap,
//!   the last one the trip's version.
//! - The payment plan: its provider request names its ledger entry (key `<trip>:<step>`,
//!   the entry's amount, a step the request may make); no money moves without a
//!   transition; the provider's answer is taken as [`PaymentPlan::after`] says (commit,
//!   change nothing, or cancel the trip instead), and whatever the provider approved is in
//!   the ledger exactly once, for the amount it approved.
//! - The money, as the engine plans it, against a payment provider that approves,
//!   declines authorizations, or fails (as `--payments-provider-mode`): every entry and
//!   the ledger balance, clearing is zero, holds match authorizations; the fare is held
//!   exactly from the first assignment to the end, and settled exactly once at the end
//!   (capture at `completed`, the fee for a late rider cancel, a release otherwise); what
//!   the rider, the driver and the platform hold follows from that and the refunds; a
//!   settled trip cannot be captured, charged or released again; a retry, a stale
//!   authorization, or a rebuild of the ledger after a crash moves no money.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use dispatch_engine::transition::provider_key;
use dispatch_engine::trip::{Mover, OfferEnd};
use dispatch_engine::{
    Account, AfterPayment, CancelledBy, Candidate, Decision, DispatchConfig, DriverId, Entry,
    IndexedDriver, Ledger, Offer, PaymentPlan, PaymentTerms, Point, Product, ProviderAnswer,
    QuoteTerms, RiderId, Step, StraightLineEta, Transition, Trip, TripCommand, TripEffect, TripId,
    TripMoney, TripRules, TripState,
};

/// At most this many operations are decoded from one input.
pub const MAX_OPS: usize = 400;

const T0: u64 = 1_700_000_000_000;
const PICKUP: (f64, f64) = (45.53, -73.62);
/// Drivers `drv_0..drv_7` can be candidates; `drv_8` never is.
const POOL: u8 = 8;
const STRANGER: u8 = 8;
const USD: &str = "USD";
const METRES_PER_DEGREE: f64 = 111_195.0;

/// Runs one input. Panics, with the operations so far, when a rule is broken.
pub fn run(data: &[u8]) {
    let mut r = Reader { data, pos: 0 };
    let mut h = Harness::new(Setup::decode(&mut r));
    h.check_money();
    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        let (op, dt) = Op::decode(&mut r);
        h.step(op, dt);
        ops += 1;
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// `usual` for three bytes in four (below 192), else `rare` of the byte less 192.
    fn mostly<T>(&mut self, usual: T, rare: impl FnOnce(u8) -> T) -> T {
        match self.u8() {
            b if b < 192 => usual,
            b => rare(b - 192),
        }
    }
}

fn d(i: u8) -> DriverId {
    DriverId::new(format!("drv_{i}"))
}

fn pickup() -> Point {
    Point::new(PICKUP.0, PICKUP.1).expect("valid pickup")
}

/// A point `metres` from the pickup in one of four directions.
fn near_pickup(metres: f64, direction: u8) -> Point {
    let dlat = metres / METRES_PER_DEGREE;
    let dlng = dlat / PICKUP.0.to_radians().cos();
    let (lat, lng) = match direction % 4 {
        0 => (PICKUP.0 + dlat, PICKUP.1),
        1 => (PICKUP.0, PICKUP.1 + dlng),
        2 => (PICKUP.0 - dlat, PICKUP.1),
        _ => (PICKUP.0, PICKUP.1 - dlng),
    };
    Point::new(lat, lng).expect("near the pickup")
}

/// The configuration of one run (the input's header).
#[derive(Debug, Clone)]
struct Setup {
    cfg: DispatchConfig,
    terms: PaymentTerms,
    fare: i64,
    fee: i64,
    product: Product,
}

impl Setup {
    fn decode(r: &mut Reader<'_>) -> Setup {
        let offer_timeout_ms = match r.u8() {
            0 => 15_000,
            255 => u64::MAX,
            b => u64::from(b) * 500,
        };
        let dispatch_deadline_ms = match r.u8() {
            0 => 120_000,
            255 => u64::MAX,
            b => u64::from(b) * 2_000,
        };
        let fare = match r.u16() {
            0 => 1850,
            0xFFFF => 0,
            v => i64::from(v),
        };
        let fee = match r.u16() {
            0 => 500,
            0xFFFF => 0,
            v => i64::from(v),
        };
        let commission_bps = match r.u8() {
            0 => 2500,
            b => (u32::from(b) * 40).min(10_000),
        };
        let (cancel_grace_ms, no_show_wait_ms) = match r.u8() {
            0 => (120_000, 300_000),
            b => (u64::from(b & 15) * 30_000, u64::from(b >> 4) * 60_000),
        };
        let flags = r.u8();
        let product = [Product::Economy, Product::Xl, Product::Premium][usize::from(flags % 3)];
        let fare = if flags & 0x80 != 0 {
            fare * 100_000
        } else {
            fare
        };
        Setup {
            cfg: DispatchConfig {
                offer_timeout_ms,
                dispatch_deadline_ms,
            },
            terms: PaymentTerms {
                commission_bps,
                cancel_grace_ms,
                no_show_wait_ms,
            },
            fare,
            fee,
            product,
        }
    }

    /// Another product than the trip's.
    fn other_product(&self) -> Product {
        match self.product {
            Product::Economy => Product::Xl,
            Product::Xl => Product::Premium,
            Product::Premium => Product::Economy,
        }
    }
}

/// A driver named by an operation.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// The one the command is about: the holder of the offer (or the last one offered) for
    /// accept and decline, the trip's driver (or its last one) for the others.
    Role,
    /// `drv_<n>`, `drv_8` being a driver never offered anything.
    Driver(u8),
}

impl Who {
    fn decode(r: &mut Reader<'_>) -> Who {
        r.mostly(Who::Role, |b| Who::Driver(b % (STRANGER + 1)))
    }
}

/// Which offer a timer or a refusal names.
#[derive(Debug, Clone, Copy)]
enum Seq {
    /// The open offer's (its timer also moves the clock to its expiry).
    Current,
    Stale(u8),
}

impl Seq {
    fn decode(r: &mut Reader<'_>) -> Seq {
        r.mostly(Seq::Current, Seq::Stale)
    }
}

/// When a deadline timer fires.
#[derive(Debug, Clone, Copy)]
enum When {
    Now,
    AtDeadline,
    JustBefore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Approve,
    /// Declines authorizations (as `--payments-provider-mode decline`).
    Decline,
    /// Fails every request (as `--payments-provider-mode fail`).
    Fail,
}

/// The payment provider, as `LocalProvider` (actors/src/payments.rs) answers: by its mode,
/// and a request it answered before (same idempotency key) the same way again.
struct Provider {
    mode: Mode,
    /// Every answer given, by key: (request, amount, approved).
    answered: BTreeMap<String, (&'static str, i64, bool)>,
}

impl Provider {
    /// Answers a request, or says why it cannot be the same request as an earlier one.
    fn answer(
        &mut self,
        request: &'static str,
        key: &str,
        amount: i64,
    ) -> Result<ProviderAnswer, String> {
        let declined = || ProviderAnswer::Declined("card declined".into());
        if let Some(&(was, was_amount, approved)) = self.answered.get(key) {
            if (was, was_amount) != (request, amount) {
                return Err(format!(
                    "{key}: {request} of {amount} after {was} of {was_amount}"
                ));
            }
            return Ok(if approved {
                ProviderAnswer::Approved
            } else {
                declined()
            });
        }
        let approved = match self.mode {
            Mode::Fail => {
                return Ok(ProviderAnswer::Unavailable(
                    "the processor did not answer".into(),
                ));
            }
            Mode::Decline => request != "authorize",
            Mode::Approve => true,
        };
        self.answered
            .insert(key.to_owned(), (request, amount, approved));
        Ok(if approved {
            ProviderAnswer::Approved
        } else {
            declined()
        })
    }
}

/// One operation of the input.
#[derive(Debug, Clone)]
enum Op {
    /// 0: a search answer, up to 6 of (driver, hundreds of metres, flags: bit 0 the wrong
    /// product, bits 1-2 the direction from the pickup).
    Candidates(Vec<(u8, u8, u8)>),
    /// 1, 2
    Accept(Who),
    Decline(Who),
    /// 3, 4
    Timeout(Seq),
    Refused(Seq),
    /// 5
    Deadline(When),
    /// 6, 7, 8, 9
    Arrived(Who),
    Start(Who),
    Complete(Who),
    DriverCancel(Who),
    /// 10: (who: rider, admin, system, driver; reason length)
    Cancel(u8, u8),
    /// 11: the trip actor restarts from its record, and the ledger is rebuilt from the
    /// durable entries (rotated by this much) after a crash.
    Restart(u8),
    /// 12: a driver's location ping (hundreds of metres from the pickup).
    DriverMoved(Who, u8),
    /// 13: the last entry is posted again, and a stale writer authorizes again.
    Retry,
    /// 14: an operator's refund (amount selector).
    Refund(u8),
    /// 15: the payment provider's mode from now on.
    Provider(u8),
    /// 16: the clock moves to the open offer's expiry (or 1 ms before it).
    OfferExpiry(bool),
}

impl Op {
    fn decode(r: &mut Reader<'_>) -> (Op, u64) {
        let code = r.u8() % 17;
        let t = r.u8();
        let dt = u64::from(t & 63)
            * match t >> 6 {
                0 => 1,
                1 => 250,
                2 => 2_000,
                _ => 30_000,
            };
        let op = match code {
            0 => {
                let n = r.u8() % 7;
                Op::Candidates((0..n).map(|_| (r.u8(), r.u8(), r.u8())).collect())
            }
            1 => Op::Accept(Who::decode(r)),
            2 => Op::Decline(Who::decode(r)),
            3 => Op::Timeout(Seq::decode(r)),
            4 => Op::Refused(Seq::decode(r)),
            5 => Op::Deadline(match r.u8() % 3 {
                0 => When::Now,
                1 => When::AtDeadline,
                _ => When::JustBefore,
            }),
            6 => Op::Arrived(Who::decode(r)),
            7 => Op::Start(Who::decode(r)),
            8 => Op::Complete(Who::decode(r)),
            9 => Op::DriverCancel(Who::decode(r)),
            10 => Op::Cancel(r.u8(), r.u8()),
            11 => Op::Restart(r.u8()),
            12 => Op::DriverMoved(Who::decode(r), r.u8()),
            13 => Op::Retry,
            14 => Op::Refund(r.u8()),
            15 => Op::Provider(r.u8()),
            _ => Op::OfferExpiry(r.u8() & 1 == 1),
        };
        (op, dt)
    }
}

/// The fields of a trip other than its open offer and pickup ETA.
fn record(t: &Trip) -> impl PartialEq + std::fmt::Debug {
    (
        (t.id.clone(), t.rider_id.clone(), t.created_at_ms, t.state()),
        (t.version(), t.driver_id().cloned(), t.fare_cents()),
        (t.cancelled_by(), t.cancel_reason().map(str::to_owned)),
        (t.updated_at_ms(), t.started_at_ms(), t.completed_at_ms()),
        (
            t.deadline_ms(),
            t.excluded().cloned().collect::<Vec<_>>(),
            t.is_searching(),
        ),
    )
}

/// The `Transitioned` effects: (from, to, by, at).
fn transitions(fx: &[TripEffect]) -> Vec<(TripState, TripState, &Mover, u64)> {
    fx.iter()
        .filter_map(|e| match e {
            TripEffect::Transitioned {
                from,
                to,
                by,
                at_ms,
            } => Some((*from, *to, by, *at_ms)),
            _ => None,
        })
        .collect()
}

/// The provider request that moves an entry's money: (key, request, amount).
fn asked_for(e: &Entry, rider: &RiderId) -> (String, &'static str, i64) {
    let paid = e.amount_for(&Account::Rider(rider.clone()));
    let (request, amount) = match e.key.step {
        Step::Authorize => ("authorize", e.amount_for(&Account::Authorizations)),
        Step::Capture | Step::CancelFee => ("capture", -paid),
        Step::Release => ("release", 0),
        Step::Refund(_) => ("refund", paid),
    };
    (provider_key(&e.key.trip_id, e.key.step), request, amount)
}

/// Balances without the accounts at zero (a rebuilt ledger has no entry for those).
fn nonzero(b: &HashMap<Account, i64>) -> BTreeMap<Account, i64> {
    b.iter()
        .filter(|(_, v)| **v != 0)
        .map(|(a, v)| (a.clone(), *v))
        .collect()
}

struct Harness {
    setup: Setup,
    eta: StraightLineEta,
    now: u64,
    trip: Trip,
    ledger: Ledger,
    /// The trip record's entries, in the order written: what survives a crash.
    durable: Vec<Entry>,
    provider: Provider,
    /// Every driver a `SendOffer` named.
    offered: BTreeSet<DriverId>,
    /// Every driver a search answer named with the trip's product.
    eligible: BTreeSet<DriverId>,
    last_seq: u64,
    last_offered: Option<DriverId>,
    last_driver: Option<DriverId>,
    /// The journal records committed, the request's first.
    journal: Vec<Transition>,
    ever_assigned: bool,
    /// The operations so far (at what time), for the failure message.
    log: Vec<(u64, Op)>,
}

macro_rules! ensure {
    ($h:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $h.fail(format!($($msg)+));
        }
    };
}

impl Harness {
    fn new(setup: Setup) -> Harness {
        let quote = QuoteTerms {
            fare_cents: setup.fare,
            currency: USD.into(),
            surge: 1.0,
            distance_m: 6_000,
            duration_s: 900,
        };
        let Decision {
            trip,
            effects: fx,
            journal,
            payment,
        } = Trip::start(
            TripId::new("trp_fuzz"),
            RiderId::new("rdr_fuzz"),
            setup.product,
            pickup(),
            Point::new(45.50, -73.57).expect("valid dropoff"),
            quote,
            T0,
            &setup.cfg,
        );
        let deadline = T0.saturating_add(setup.cfg.dispatch_deadline_ms);
        let h = Harness {
            setup,
            eta: StraightLineEta::default(),
            now: T0,
            trip,
            ledger: Ledger::new(),
            durable: Vec::new(),
            provider: Provider {
                mode: Mode::Approve,
                answered: BTreeMap::new(),
            },
            offered: BTreeSet::new(),
            eligible: BTreeSet::new(),
            last_seq: 0,
            last_offered: None,
            last_driver: None,
            journal: journal.iter().cloned().collect(),
            ever_assigned: false,
            log: Vec::new(),
        };
        let first = Transition {
            from: TripState::Dispatching,
            to: TripState::Dispatching,
            by: Mover::Rider,
            at_ms: T0,
            version: 1,
        };
        ensure!(
            h,
            journal == Some(first) && payment == PaymentPlan::None,
            "request recorded {journal:?} and planned {payment:?}"
        );
        ensure!(
            h,
            fx == vec![
                TripEffect::ArmDeadline { at_ms: deadline },
                TripEffect::Search { exclude: vec![] },
            ],
            "request gave {fx:?}"
        );
        ensure!(
            h,
            h.trip.state() == TripState::Dispatching
                && h.trip.version() == 1
                && h.trip.is_searching()
                && h.trip.check_invariants() == Ok(()),
            "a new trip: {:?}",
            h.trip
        );
        h
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let mut ops = String::new();
        let skip = self.log.len().saturating_sub(80);
        if skip > 0 {
            let _ = writeln!(ops, "  ... {skip} earlier operations");
        }
        for (at, op) in &self.log[skip..] {
            let _ = writeln!(ops, "  t0+{}ms {op:?}", at.saturating_sub(T0));
        }
        panic!(
            "trip_machine: {msg}\nsetup: {:?}\noperations:\n{ops}trip: {:#?}\nentries: {:#?}",
            self.setup, self.trip, self.durable
        );
    }

    fn offer_holder(&self, w: Who) -> DriverId {
        match w {
            Who::Role => self
                .trip
                .offer()
                .map(|o| o.driver_id.clone())
                .or_else(|| self.last_offered.clone())
                .unwrap_or_else(|| d(0)),
            Who::Driver(i) => d(i),
        }
    }

    fn on_trip(&self, w: Who) -> DriverId {
        match w {
            Who::Role => self
                .trip
                .driver_id()
                .or(self.last_driver.as_ref())
                .cloned()
                .unwrap_or_else(|| d(0)),
            Who::Driver(i) => d(i),
        }
    }

    fn seq(&self, s: Seq) -> u64 {
        match s {
            Seq::Current => self.trip.offer().map_or(self.last_seq, |o| o.seq),
            Seq::Stale(n) => u64::from(n),
        }
    }

    fn step(&mut self, op: Op, dt: u64) {
        self.now = self.now.saturating_add(dt);
        self.log.push((self.now, op.clone()));
        match op {
            Op::Restart(rotation) => self.restart(rotation),
            Op::DriverMoved(w, hm) => self.driver_moved(w, hm),
            Op::Retry => self.retry(),
            Op::Refund(sel) => self.refund(sel),
            Op::Provider(m) => {
                self.provider.mode = [Mode::Approve, Mode::Decline, Mode::Fail][usize::from(m % 3)];
            }
            Op::OfferExpiry(just_before) => {
                if let Some(o) = self.trip.offer() {
                    let at = if just_before {
                        o.expires_at_ms.saturating_sub(1)
                    } else {
                        o.expires_at_ms
                    };
                    self.now = self.now.max(at);
                }
            }
            op => {
                let cmd = self.command(&op);
                self.apply(cmd);
            }
        }
        self.check_money();
    }

    /// Turns an operation into a command, moving the clock as the operation says.
    fn command(&mut self, op: &Op) -> TripCommand {
        match op {
            Op::Candidates(list) => {
                let found: Vec<Candidate> = list
                    .iter()
                    .map(|&(i, hm, flags)| {
                        let position = near_pickup(f64::from(hm) * 100.0, flags >> 1);
                        let product = if flags & 1 == 1 {
                            self.setup.other_product()
                        } else {
                            self.setup.product
                        };
                        Candidate {
                            driver: IndexedDriver {
                                driver_id: d(i % POOL),
                                position,
                                heading: None,
                                product,
                                available: true,
                            },
                            distance_m: pickup().distance_m(position),
                        }
                    })
                    .collect();
                for c in &found {
                    if c.driver.product == self.setup.product {
                        self.eligible.insert(c.driver.driver_id.clone());
                    }
                }
                TripCommand::Candidates(found)
            }
            Op::Accept(w) => TripCommand::Accept {
                driver_id: self.offer_holder(*w),
            },
            Op::Decline(w) => TripCommand::Decline {
                driver_id: self.offer_holder(*w),
            },
            Op::Timeout(s) => {
                if let (Seq::Current, Some(o)) = (s, self.trip.offer()) {
                    self.now = self.now.max(o.expires_at_ms);
                }
                TripCommand::OfferTimeout { seq: self.seq(*s) }
            }
            Op::Refused(s) => TripCommand::OfferRefused { seq: self.seq(*s) },
            Op::Deadline(when) => {
                let deadline = self.trip.deadline_ms();
                match when {
                    When::Now => {}
                    When::AtDeadline => self.now = self.now.max(deadline),
                    When::JustBefore => self.now = self.now.max(deadline.saturating_sub(1)),
                }
                TripCommand::DeadlineReached
            }
            Op::Arrived(w) => TripCommand::Arrived {
                driver_id: self.on_trip(*w),
            },
            Op::Start(w) => TripCommand::Start {
                driver_id: self.on_trip(*w),
            },
            Op::Complete(w) => TripCommand::Complete {
                driver_id: self.on_trip(*w),
            },
            Op::DriverCancel(w) => TripCommand::DriverCancel {
                driver_id: self.on_trip(*w),
                reason: Some("flat tyre".into()),
            },
            Op::Cancel(by, len) => TripCommand::Cancel {
                by: [
                    CancelledBy::Rider,
                    CancelledBy::Admin,
                    CancelledBy::System,
                    CancelledBy::Driver,
                ][usize::from(by % 4)],
                reason: match len % 4 {
                    0 => None,
                    n => Some("é".repeat(usize::from(n) * 3)),
                },
            },
            Op::Restart(_)
            | Op::DriverMoved(..)
            | Op::Retry
            | Op::Refund(_)
            | Op::Provider(_)
            | Op::OfferExpiry(_) => unreachable!("not a trip command: {op:?}"),
        }
    }

    /// Whether PROTOCOL.md's rules accept `cmd` on `t` at `now`.
    fn allowed(t: &Trip, cmd: &TripCommand, now: u64) -> bool {
        let s = t.state();
        let on_trip = |d: &DriverId| t.driver_id() == Some(d);
        let holds_offer = |d: &DriverId| {
            s == TripState::Dispatching && t.offer().is_some_and(|o| &o.driver_id == d)
        };
        match cmd {
            TripCommand::Candidates(_)
            | TripCommand::Ranked(_)
            | TripCommand::Freed(_)
            | TripCommand::OfferRefused { .. }
            | TripCommand::OfferTimeout { .. }
            | TripCommand::DeadlineReached => true,
            TripCommand::Decline { driver_id } => holds_offer(driver_id),
            TripCommand::Accept { driver_id } => {
                holds_offer(driver_id)
                    && t.offer().is_some_and(|o| now < o.expires_at_ms)
                    && now < t.deadline_ms()
            }
            TripCommand::Arrived { driver_id } => {
                on_trip(driver_id) && s == TripState::DriverAssigned
            }
            TripCommand::Start { driver_id } => on_trip(driver_id) && s == TripState::DriverArrived,
            TripCommand::Complete { driver_id } => on_trip(driver_id) && s == TripState::InProgress,
            TripCommand::DriverCancel { driver_id, .. } => {
                on_trip(driver_id)
                    && matches!(s, TripState::DriverAssigned | TripState::DriverArrived)
            }
            TripCommand::Cancel { by, .. } => match by {
                CancelledBy::Driver => false,
                CancelledBy::Admin => !s.is_final(),
                CancelledBy::Rider | CancelledBy::System => matches!(
                    s,
                    TripState::Dispatching | TripState::DriverAssigned | TripState::DriverArrived
                ),
            },
        }
    }

    /// Who a transition caused by `cmd` is recorded as made by.
    fn mover(cmd: &TripCommand) -> Mover {
        match cmd {
            TripCommand::Accept { driver_id }
            | TripCommand::Arrived { driver_id }
            | TripCommand::Start { driver_id }
            | TripCommand::Complete { driver_id }
            | TripCommand::DriverCancel { driver_id, .. } => Mover::Driver(driver_id.clone()),
            TripCommand::Cancel {
                by: CancelledBy::Rider,
                ..
            } => Mover::Rider,
            TripCommand::Cancel {
                by: CancelledBy::Admin,
                ..
            } => Mover::Admin,
            _ => Mover::System,
        }
    }

    /// The rules the harness's trip is decided under.
    fn rules(&self) -> TripRules<'_> {
        TripRules {
            dispatch: &self.setup.cfg,
            eta: &self.eta,
            payments: &self.setup.terms,
            cancellation_fee_cents: self.setup.fee,
        }
    }

    /// One command, decided by the engine and carried out as the trip actor carries a
    /// decision out: the provider is asked for the plan's request, and its answer decides
    /// whether the decision is committed (trip, journal record, ledger entry), dropped,
    /// or replaced by the command the plan names (a system cancel).
    fn apply(&mut self, cmd: TripCommand) {
        let now = self.now;
        let before = self.trip.clone();
        let result = before.decide(cmd.clone(), &self.durable, now, &self.rules());
        let allowed = Self::allowed(&before, &cmd, now);
        ensure!(
            self,
            result.is_ok() == allowed,
            "{} was {:?}, but the rules {} it",
            cmd.kind(),
            result,
            if allowed { "allow" } else { "forbid" }
        );
        let Ok(decision) = result else {
            return;
        };
        ensure!(
            self,
            decision.trip.check_invariants() == Ok(()),
            "{:?} after {}",
            decision.trip.check_invariants(),
            cmd.kind()
        );
        self.check_effects(&before, &decision.trip, &cmd, &decision.effects, now);
        self.check_decision(&before, &cmd, &decision);
        let plan = &decision.payment;
        let answer = match plan.request() {
            None => ProviderAnswer::Approved,
            Some((request, key, amount)) => self
                .provider
                .answer(request, &key, amount)
                .unwrap_or_else(|e| self.fail(format!("the plan {plan:?} asked again: {e}"))),
        };
        match plan.after(&answer) {
            AfterPayment::Commit => {
                if let Some(e) = plan.entry() {
                    self.write(e.clone());
                }
                self.commit(decision);
            }
            AfterPayment::Retry => ensure!(
                self,
                matches!(answer, ProviderAnswer::Unavailable(_))
                    && !matches!(plan, PaymentPlan::None | PaymentPlan::Release { .. }),
                "{plan:?} answered {answer:?}: retried"
            ),
            AfterPayment::Instead(instead) => {
                // Only a declined hold cancels the trip, by the system, before anyone is
                // assigned (the sender is refused after the cancel).
                ensure!(
                    self,
                    matches!(plan, PaymentPlan::Authorize { .. })
                        && matches!(answer, ProviderAnswer::Declined(_))
                        && matches!(
                            instead,
                            TripCommand::Cancel {
                                by: CancelledBy::System,
                                ..
                            }
                        ),
                    "{plan:?} answered {answer:?}: {instead:?} instead"
                );
                self.apply(instead);
                ensure!(
                    self,
                    self.trip.state() == TripState::Cancelled,
                    "a declined hold left the trip {:?}",
                    self.trip.state()
                );
            }
        }
        ensure!(
            self,
            self.trip.check_invariants() == Ok(()),
            "{:?} after the payment step",
            self.trip.check_invariants()
        );
    }

    /// A decision's journal record and payment plan agree with its effects and its trip.
    fn check_decision(&self, before: &Trip, cmd: &TripCommand, d: &Decision) {
        let recorded = d
            .journal
            .as_ref()
            .map(|j| ((j.from, j.to, &j.by, j.at_ms), j.version));
        let moved = transitions(&d.effects).first().copied();
        ensure!(
            self,
            recorded == moved.map(|m| (m, d.trip.version())),
            "{}: journal {:?}, effects {:?} at version {}",
            cmd.kind(),
            d.journal,
            d.effects,
            d.trip.version()
        );
        let plan = &d.payment;
        let (request, entry) = (plan.request(), plan.entry());
        ensure!(
            self,
            request.is_some() == entry.is_some() && (d.journal.is_some() || entry.is_none()),
            "{}: {plan:?} with journal {:?}",
            cmd.kind(),
            d.journal
        );
        let (Some((name, key, amount)), Some(e)) = (request, entry) else {
            return;
        };
        let step = match plan {
            PaymentPlan::Authorize { .. } => Step::Authorize,
            PaymentPlan::Capture { .. } => Step::Capture,
            PaymentPlan::CancelFee { .. } => Step::CancelFee,
            PaymentPlan::Release { .. } | PaymentPlan::None => Step::Release,
        };
        ensure!(
            self,
            e.key.step == step
                && (key.clone(), name, amount) == asked_for(e, &before.rider_id)
                && e.key.trip_id == before.id
                && e.at_ms == self.now
                && e.currency == before.quote.currency,
            "{}: request {name} {key} of {amount} for entry {e:?}",
            cmd.kind()
        );
        if let PaymentPlan::CancelFee { amount_cents, .. } = plan {
            ensure!(
                self,
                d.trip.fare_cents() == Some(*amount_cents)
                    && matches!(
                        cmd,
                        TripCommand::Cancel {
                            by: CancelledBy::Rider,
                            ..
                        }
                    ),
                "{}: a fee of {amount_cents}, fare {:?}",
                cmd.kind(),
                d.trip.fare_cents()
            );
        }
    }

    /// The model-free rules on one accepted command's effects.
    fn check_effects(
        &self,
        before: &Trip,
        next: &Trip,
        cmd: &TripCommand,
        fx: &[TripEffect],
        now: u64,
    ) {
        let kind = cmd.kind();
        if before.state().is_final() {
            ensure!(self, fx.is_empty(), "effects after the end: {fx:?}");
            ensure!(self, next == before, "{kind} changed a finished trip");
            return;
        }
        // Transitions.
        let moves = transitions(fx);
        ensure!(self, moves.len() <= 1, "two transitions at once: {fx:?}");
        let moved = moves.first().map(|m| m.1);
        if let Some(&(from, to, by, at)) = moves.first() {
            ensure!(self, from.can_move_to(to), "illegal {from:?} -> {to:?}");
            ensure!(
                self,
                from == before.state() && to == next.state(),
                "{from:?} -> {to:?} recorded, {:?} -> {:?} happened",
                before.state(),
                next.state()
            );
            ensure!(self, at == now, "transition at {at}, now {now}");
            let want = Self::mover(cmd);
            ensure!(self, *by == want, "{kind}: moved by {by:?}, want {want:?}");
            ensure!(
                self,
                next.updated_at_ms() == now,
                "updated_at {} after a transition at {now}",
                next.updated_at_ms()
            );
        } else {
            ensure!(
                self,
                next.state() == before.state(),
                "state changed without a transition"
            );
            ensure!(
                self,
                next.updated_at_ms() == before.updated_at_ms(),
                "updated_at moved without a transition"
            );
        }
        ensure!(
            self,
            next.version() == before.version() + moves.len() as u64,
            "version {} -> {} with {} transition(s)",
            before.version(),
            next.version(),
            moves.len()
        );
        ensure!(
            self,
            next.created_at_ms == before.created_at_ms && next.id == before.id,
            "identity changed"
        );

        // Effects that follow from the change.
        let count = |f: &dyn Fn(&TripEffect) -> bool| fx.iter().filter(|e| f(e)).count();
        let ended = moved.is_some_and(TripState::is_final);
        ensure!(
            self,
            count(&|e| matches!(e, TripEffect::Finished)) == usize::from(ended),
            "Finished effects {fx:?} for {moved:?}"
        );
        // The drivers of the effects `pick` keeps.
        let drivers_of = |pick: fn(&TripEffect) -> Option<&DriverId>| -> Vec<&DriverId> {
            fx.iter().filter_map(pick).collect()
        };
        let assigned = drivers_of(|e| match e {
            TripEffect::DriverAssigned { driver_id } => Some(driver_id),
            _ => None,
        });
        if moved == Some(TripState::DriverAssigned) {
            let holder = before.offer().map(|o| &o.driver_id);
            ensure!(
                self,
                assigned.len() == 1 && Some(assigned[0]) == holder && next.driver_id() == holder,
                "assigned {assigned:?}, the offer was {holder:?}, driver now {:?}",
                next.driver_id()
            );
            let o = before.offer().expect("an offer was accepted");
            ensure!(
                self,
                now < o.expires_at_ms && now < before.deadline_ms(),
                "accepted at {now}: offer expired at {}, deadline {}",
                o.expires_at_ms,
                before.deadline_ms()
            );
            ensure!(
                self,
                next.pickup_eta_s() == Some(o.pickup_eta_s),
                "pickup ETA {:?} after accepting {o:?}",
                next.pickup_eta_s()
            );
        } else {
            ensure!(
                self,
                assigned.is_empty(),
                "DriverAssigned without assignment"
            );
        }
        let released = drivers_of(|e| match e {
            TripEffect::DriverReleased { driver_id } => Some(driver_id),
            _ => None,
        });
        let want_released: Vec<&DriverId> = before
            .driver_id()
            .filter(|d| next.driver_id() != Some(*d) || ended)
            .into_iter()
            .collect();
        ensure!(
            self,
            released == want_released,
            "released {released:?}, want {want_released:?}"
        );
        if next.driver_id() != before.driver_id() {
            ensure!(
                self,
                matches!(
                    moved,
                    Some(TripState::DriverAssigned | TripState::Dispatching)
                ),
                "the driver changed {:?} -> {:?} on {moved:?}",
                before.driver_id(),
                next.driver_id()
            );
        }

        // Offers.
        let sends: Vec<&Offer> = fx
            .iter()
            .filter_map(|e| match e {
                TripEffect::SendOffer(o) => Some(o),
                _ => None,
            })
            .collect();
        ensure!(self, sends.len() <= 1, "two offers at once: {sends:?}");
        if let Some(o) = sends.first() {
            ensure!(
                self,
                !self.offered.contains(&o.driver_id),
                "{} offered this trip a second time",
                o.driver_id
            );
            ensure!(
                self,
                self.eligible.contains(&o.driver_id) && o.driver_id != d(STRANGER),
                "{} offered, but never a candidate for this product",
                o.driver_id
            );
            ensure!(
                self,
                o.seq > self.last_seq,
                "offer seq {} after {}",
                o.seq,
                self.last_seq
            );
            ensure!(
                self,
                o.expires_at_ms == now.saturating_add(self.setup.cfg.offer_timeout_ms),
                "offer expires at {}, now {now}",
                o.expires_at_ms
            );
            ensure!(
                self,
                next.offer() == Some(*o) && next.state() == TripState::Dispatching,
                "sent {o:?}, the trip holds {:?} in {:?}",
                next.offer(),
                next.state()
            );
        } else if let Some(o) = next.offer() {
            ensure!(
                self,
                before.offer() == Some(o),
                "an offer {o:?} appeared without SendOffer"
            );
        }
        // An open offer ends with `OfferEnded`, unless it was accepted or refused.
        let ends: Vec<(&DriverId, u64, OfferEnd)> = fx
            .iter()
            .filter_map(|e| match e {
                TripEffect::OfferEnded {
                    driver_id,
                    seq,
                    why,
                } => Some((driver_id, *seq, *why)),
                _ => None,
            })
            .collect();
        let gone = before
            .offer()
            .filter(|o| next.offer().is_none_or(|n| n.seq != o.seq));
        match gone {
            Some(o)
                if !matches!(
                    cmd,
                    TripCommand::Accept { .. } | TripCommand::OfferRefused { .. }
                ) =>
            {
                let why = match cmd {
                    TripCommand::Decline { .. } => OfferEnd::Declined,
                    TripCommand::OfferTimeout { .. } => OfferEnd::Expired,
                    _ => OfferEnd::Withdrawn,
                };
                ensure!(
                    self,
                    ends == [(&o.driver_id, o.seq, why)],
                    "{kind} ended {o:?} with {ends:?}"
                );
            }
            _ => ensure!(self, ends.is_empty(), "{kind} ended no offer, but {ends:?}"),
        }

        // Searches, deadlines, progress.
        for e in fx {
            if let TripEffect::Search { exclude } = e {
                let set: BTreeSet<DriverId> = exclude.iter().cloned().collect();
                ensure!(
                    self,
                    set.len() == exclude.len() && set == self.offered,
                    "search excludes {exclude:?}, offered so far {:?}",
                    self.offered
                );
                ensure!(self, next.is_searching(), "a search while not searching");
            }
        }
        let arms: Vec<u64> = fx
            .iter()
            .filter_map(|e| match e {
                TripEffect::ArmDeadline { at_ms } => Some(*at_ms),
                _ => None,
            })
            .collect();
        // Only a driver's cancel goes back to dispatching, and it starts a new deadline.
        if moved == Some(TripState::Dispatching) {
            let want = now.saturating_add(self.setup.cfg.dispatch_deadline_ms);
            ensure!(
                self,
                arms == [want] && next.deadline_ms() == want,
                "back to dispatching: deadline {} -> {}, armed {arms:?}",
                before.deadline_ms(),
                next.deadline_ms()
            );
        } else {
            ensure!(
                self,
                arms.is_empty() && next.deadline_ms() == before.deadline_ms(),
                "deadline {} -> {}, armed {arms:?}",
                before.deadline_ms(),
                next.deadline_ms()
            );
        }
        if next.state() == TripState::Dispatching {
            ensure!(
                self,
                next.is_searching() != next.offer().is_some(),
                "a dispatching trip must wait for exactly one thing: searching {}, offer {:?}",
                next.is_searching(),
                next.offer()
            );
        }
    }

    /// Writes a new entry: the ledger must take it, and it is then durable.
    fn write(&mut self, e: Entry) {
        ensure!(self, e.sum() == 0, "unbalanced {e:?}");
        let r = self.ledger.post(e.clone());
        ensure!(self, r == Ok(true), "posting {e:?} gave {r:?}");
        self.durable.push(e);
    }

    /// The decision is committed (its entry already written): the trip and its journal
    /// record, and the harness's view of what was told follows its effects.
    fn commit(&mut self, d: Decision) {
        for e in &d.effects {
            match e {
                TripEffect::SendOffer(o) => {
                    self.offered.insert(o.driver_id.clone());
                    self.last_seq = o.seq;
                    self.last_offered = Some(o.driver_id.clone());
                }
                TripEffect::Transitioned {
                    to: TripState::DriverAssigned,
                    ..
                } => self.ever_assigned = true,
                TripEffect::DriverAssigned { driver_id } => {
                    self.last_driver = Some(driver_id.clone());
                }
                _ => {}
            }
        }
        if let Some(j) = d.journal {
            let next = self.journal.last().map(|l| (l.to, l.version + 1));
            ensure!(
                self,
                next == Some((j.from, j.version)),
                "the journal ends with {:?}, next record {j:?}",
                self.journal.last()
            );
            self.journal.push(j);
        }
        self.trip = d.trip;
        let versions: Vec<u64> = self.journal.iter().map(|j| j.version).collect();
        ensure!(
            self,
            versions.iter().copied().eq(1..=self.trip.version()),
            "journal versions {versions:?} for a trip at version {}",
            self.trip.version()
        );
    }

    /// The actor restarts from its record (the open offer gets a fresh timeout), and the
    /// ledger is rebuilt from the durable entries in another order, then replayed.
    fn restart(&mut self, rotation: u8) {
        let before = self.trip.clone();
        let mut t = before.clone();
        let refreshed = t.refresh_offer(self.now, &self.setup.cfg).cloned();
        match (before.offer(), &refreshed) {
            (None, None) => ensure!(self, t == before, "refresh_offer changed the trip"),
            (Some(o), Some(n)) => {
                let want = self.now.saturating_add(self.setup.cfg.offer_timeout_ms);
                ensure!(
                    self,
                    n.driver_id == o.driver_id
                        && n.seq == o.seq
                        && n.pickup_eta_s == o.pickup_eta_s
                        && n.expires_at_ms == want
                        && t.offer() == Some(n),
                    "refreshed {o:?} to {n:?}"
                );
                ensure!(
                    self,
                    record(&t) == record(&before) && t.pickup_eta_s() == before.pickup_eta_s(),
                    "refresh_offer changed more than the offer"
                );
            }
            (o, n) => self.fail(format!("refresh_offer: {o:?} -> {n:?}")),
        }
        self.trip = t;

        let mut log = self.durable.clone();
        if !log.is_empty() {
            let k = usize::from(rotation) % log.len();
            log.rotate_left(k);
        }
        let mut rebuilt = Ledger::new();
        for e in log {
            let r = rebuilt.post(e.clone());
            ensure!(self, r == Ok(true), "rebuilding {:?}: {r:?}", e.key);
        }
        if let Some(last) = self.durable.last().cloned() {
            let r = rebuilt.post(last);
            ensure!(self, r == Ok(false), "the replay gave {r:?}");
        }
        ensure!(
            self,
            nonzero(rebuilt.balances()) == nonzero(self.ledger.balances()),
            "the rebuild changed the balances: {:?} vs {:?}",
            rebuilt.balances(),
            self.ledger.balances()
        );
        self.ledger = rebuilt;
    }

    fn driver_moved(&mut self, w: Who, hm: u8) {
        let driver = self.on_trip(w);
        let at = near_pickup(f64::from(hm) * 100.0, hm);
        let before = self.trip.clone();
        let r = self.trip.driver_moved(&driver, at, &self.eta);
        let heading_there =
            before.state() == TripState::DriverAssigned && before.driver_id() == Some(&driver);
        ensure!(
            self,
            r.is_some() == heading_there,
            "driver_moved({driver}) gave {r:?} in {:?}",
            before.state()
        );
        if r.is_some() {
            ensure!(
                self,
                self.trip.pickup_eta_s() == r && record(&self.trip) == record(&before),
                "an ETA refresh changed more than the ETA"
            );
            ensure!(self, self.trip.offer() == before.offer(), "offer changed");
        } else {
            ensure!(self, self.trip == before, "driver_moved changed the trip");
        }
    }

    /// A retry posts the last entry again; a stale writer authorizes from an empty view.
    fn retry(&mut self) {
        let was = self.ledger.balances().clone();
        if let Some(last) = self.durable.last().cloned() {
            let r = self.ledger.post(last);
            ensure!(self, r == Ok(false), "a retry posted: {r:?}");
        }
        let t = &self.trip;
        if self.durable.iter().any(|e| e.key.step == Step::Authorize) {
            let e = TripMoney::default()
                .authorize(&t.id, &t.rider_id, t.quote.fare_cents, USD, self.now)
                .expect("an empty view authorizes a positive fare");
            let r = self.ledger.post(e);
            ensure!(self, r == Ok(false), "a stale authorization gave {r:?}");
        }
        ensure!(self, self.ledger.balances() == &was, "a replay moved money");
    }

    /// An operator's refund (the admin route: finished trips only).
    fn refund(&mut self, sel: u8) {
        if !self.trip.state().is_final() {
            return;
        }
        let t = &self.trip;
        let m = TripMoney::of(&self.durable, &t.rider_id);
        let left = m.charged - m.refunded;
        let amount = match sel % 4 {
            0 => left,
            1 => (left / 2).max(1),
            2 => left + 1 + i64::from(sel),
            _ => -i64::from(sel / 4),
        };
        let r = m.refund(&t.id, &t.rider_id, amount, USD, self.now);
        let valid = (1..=left).contains(&amount);
        ensure!(
            self,
            r.is_ok() == valid,
            "refund of {amount} with {left} left: {r:?}"
        );
        if let Ok(e) = r {
            ensure!(
                self,
                e.key.step == Step::Refund(m.refunds + 1),
                "refund numbered {}",
                e.key.step
            );
            let key = provider_key(&t.id, e.key.step);
            match self.provider.answer("refund", &key, amount) {
                Ok(ProviderAnswer::Approved) => self.write(e),
                Ok(ProviderAnswer::Unavailable(_)) => {}
                other => self.fail(format!("refund {key}: {other:?}")),
            }
        }
    }

    /// The money rules, from the entries and the trip alone.
    fn check_money(&self) {
        let t = &self.trip;
        let rider = &t.rider_id;
        let l = &self.ledger;
        for e in &self.durable {
            ensure!(
                self,
                e.sum() == 0 && e.key.trip_id == t.id,
                "bad entry {e:?}"
            );
        }
        ensure!(
            self,
            l.len() == self.durable.len(),
            "ledger has {} entries, {} written",
            l.len(),
            self.durable.len()
        );
        ensure!(self, l.total() == 0, "the ledger sums to {}", l.total());
        ensure!(
            self,
            l.balance(&Account::Clearing) == 0,
            "clearing {}",
            l.balance(&Account::Clearing)
        );
        let hold = l.balance(&Account::RiderHold(rider.clone()));
        ensure!(
            self,
            l.balance(&Account::Authorizations) == -hold,
            "authorizations {} against holds {hold}",
            l.balance(&Account::Authorizations)
        );

        // What the provider approved is in the ledger once, for that amount; every other
        // entry but a release (written whatever the provider said) was approved.
        let asked: BTreeMap<String, (&str, i64)> = self
            .durable
            .iter()
            .filter(|e| e.key.step != Step::Release)
            .map(|e| {
                let (key, request, amount) = asked_for(e, rider);
                (key, (request, amount))
            })
            .collect();
        let approved: BTreeMap<String, (&str, i64)> = self
            .provider
            .answered
            .iter()
            .filter(|(_, a)| a.2 && a.0 != "release")
            .map(|(k, a)| (k.clone(), (a.0, a.1)))
            .collect();
        ensure!(
            self,
            asked == approved,
            "entries {asked:?}, approved {approved:?}"
        );
        let m = TripMoney::of(&self.durable, rider);
        let from_ledger = TripMoney::of(l.entries_of(&t.id), rider);
        ensure!(
            self,
            m == from_ledger,
            "record {m:?}, ledger {from_ledger:?}"
        );
        let count = |step: Step| self.durable.iter().filter(|e| e.key.step == step).count();
        let (captures, fees, releases) = (
            count(Step::Capture),
            count(Step::CancelFee),
            count(Step::Release),
        );
        ensure!(
            self,
            count(Step::Authorize) <= 1 && captures + fees + releases <= 1,
            "authorize {}, capture {captures}, fee {fees}, release {releases}",
            count(Step::Authorize)
        );

        let fare = t.quote.fare_cents;
        let authorized = m.authorized_at_ms.is_some();
        ensure!(
            self,
            authorized == (self.ever_assigned && fare > 0),
            "authorized {authorized}, ever assigned {}, fare {fare}",
            self.ever_assigned
        );
        let s = t.state();
        ensure!(
            self,
            m.settled == (authorized && s.is_final()),
            "settled {} in {s:?} (authorized {authorized})",
            m.settled
        );
        let held = if authorized && !m.settled { fare } else { 0 };
        ensure!(
            self,
            m.held == held && hold == -held,
            "held {} (hold account {hold}), want {held}",
            m.held
        );
        let captured = captures == 1;
        ensure!(
            self,
            captured == (s == TripState::Completed && authorized),
            "{captures} capture(s) in {s:?} (authorized {authorized})"
        );
        let fee_charged = fees == 1;
        ensure!(
            self,
            fee_charged == (s == TripState::Cancelled && t.fare_cents().is_some()),
            "{fees} fee(s) in {s:?} with fare {:?}",
            t.fare_cents()
        );
        let fee = self.setup.fee;
        if fee_charged {
            ensure!(
                self,
                t.cancelled_by() == Some(CancelledBy::Rider) && t.fare_cents() == Some(fee),
                "a fee for a cancel by {:?}, fare {:?}",
                t.cancelled_by(),
                t.fare_cents()
            );
        }
        if s == TripState::Completed {
            ensure!(
                self,
                t.fare_cents() == Some(fare),
                "completed with fare {:?}, quoted {fare}",
                t.fare_cents()
            );
        }
        let charged = if captured {
            fare
        } else if fee_charged {
            fee
        } else {
            0
        };
        ensure!(
            self,
            m.charged == charged,
            "charged {}, want {charged}",
            m.charged
        );
        ensure!(
            self,
            (0..=m.charged).contains(&m.refunded),
            "refunded {} of {}",
            m.refunded,
            m.charged
        );
        ensure!(
            self,
            l.balance(&Account::Rider(rider.clone())) == m.refunded - m.charged,
            "rider account {}",
            l.balance(&Account::Rider(rider.clone()))
        );
        let commission = if captured {
            self.setup.terms.commission(fare)
        } else {
            0
        };
        let earned = if captured {
            fare - commission
        } else if fee_charged {
            fee
        } else {
            0
        };
        let drivers: i64 = l
            .balances()
            .iter()
            .filter(|(a, _)| matches!(a, Account::Driver(_)))
            .map(|(_, v)| v)
            .sum();
        ensure!(
            self,
            drivers == earned,
            "drivers earned {drivers}, want {earned}"
        );
        if earned != 0 {
            let d = t.driver_id().cloned().expect("a paid trip has a driver");
            ensure!(
                self,
                l.balance(&Account::Driver(d.clone())) == earned,
                "{d} earned {}, want {earned}",
                l.balance(&Account::Driver(d.clone()))
            );
        }
        ensure!(
            self,
            l.balance(&Account::Platform) == commission - m.refunded,
            "platform {}, want {}",
            l.balance(&Account::Platform),
            commission - m.refunded
        );

        // Once settled, nothing can settle it again.
        if m.settled {
            let driver = t.driver_id().cloned().unwrap_or_else(|| d(0));
            let terms = &self.setup.terms;
            ensure!(
                self,
                m.capture(terms, &t.id, rider, &driver, fare, USD, self.now)
                    .is_err()
                    && m.cancel_fee(&t.id, rider, &driver, fee.max(1), USD, self.now)
                        .is_err()
                    && m.release(&t.id, rider, USD, self.now).is_none()
                    && m.authorize(&t.id, rider, fare.max(1), USD, self.now)
                        .is_err(),
                "a settled trip's payment can move again: {m:?}"
            );
        }
    }
}
