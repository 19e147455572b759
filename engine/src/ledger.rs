//! Payments as a double-entry ledger: every entry's postings sum to zero, so the sum over
//! all accounts is zero at every moment.
//!
//! One trip's money moves in steps, each an entry keyed by (trip, step) so that a retry
//! or a replay after a crash never posts twice:
//! - `authorize` at `driver_assigned`: the quoted fare is held on the rider's card
//!   (`rider_hold` −, `authorizations` +);
//! - `capture` at `completed`: the hold is released and the fare charged, then split into
//!   the driver's earnings and the platform's commission (through `clearing`, the card
//!   processor's account);
//! - `cancel_fee` when a rider cancels late: the hold is released and the fee charged and
//!   paid to the driver;
//! - `release` for every other end of an authorized trip;
//! - `refund:<n>` by an operator, at most what was charged less earlier refunds, borne by
//!   the platform.

use std::collections::HashMap;
use std::fmt;

use crate::ids::{DriverId, RiderId, TripId};

/// Whose money.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Account {
    /// What the rider has paid (negative) or been refunded.
    Rider(RiderId),
    /// Amounts held on the rider's card and not yet captured (negative).
    RiderHold(RiderId),
    /// What the driver has earned.
    Driver(DriverId),
    /// Commission earned, less refunds.
    Platform,
    /// The card processor's clearing account: zero once every charge is split.
    Clearing,
    /// The processor's open authorizations (the other side of every rider hold).
    Authorizations,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Rider(r) => write!(f, "rider:{r}"),
            Account::RiderHold(r) => write!(f, "rider_hold:{r}"),
            Account::Driver(d) => write!(f, "driver:{d}"),
            Account::Platform => f.write_str("platform"),
            Account::Clearing => f.write_str("clearing"),
            Account::Authorizations => f.write_str("authorizations"),
        }
    }
}

/// Which step of a trip's payment an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Step {
    Authorize,
    Capture,
    CancelFee,
    Release,
    Refund(u32),
}

impl Step {
    /// The step's kind without a refund's number (a metrics label).
    pub fn kind(self) -> &'static str {
        match self {
            Step::Authorize => "authorize",
            Step::Capture => "capture",
            Step::CancelFee => "cancel_fee",
            Step::Release => "release",
            Step::Refund(_) => "refund",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Refund(n) => write!(f, "refund:{n}"),
            other => f.write_str(other.kind()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EntryKey {
    pub trip_id: TripId,
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Posting {
    pub account: Account,
    pub amount_cents: i64,
}

/// One balanced movement of money.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Entry {
    pub key: EntryKey,
    pub at_ms: u64,
    pub currency: String,
    pub postings: Vec<Posting>,
}

impl Entry {
    pub fn sum(&self) -> i64 {
        self.postings.iter().map(|p| p.amount_cents).sum()
    }

    /// What this entry moved into `account` (negative: out of it).
    pub fn amount_for(&self, account: &Account) -> i64 {
        self.postings
            .iter()
            .filter(|p| &p.account == account)
            .map(|p| p.amount_cents)
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("entry {0} does not balance (sum {1})")]
    Unbalanced(String, i64),
    #[error("entry {0} was already posted with other amounts")]
    Conflict(String),
    #[error("{0}")]
    NotAllowed(String),
}

/// The payment terms of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentTerms {
    /// The platform's share of a fare, in basis points (2500 = 25%).
    pub commission_bps: u32,
    /// A rider's cancel this long after assignment costs the cancellation fee...
    pub cancel_grace_ms: u64,
    /// ...as does one this long after the driver arrived.
    pub no_show_wait_ms: u64,
}

impl Default for PaymentTerms {
    fn default() -> Self {
        Self {
            commission_bps: 2500,
            cancel_grace_ms: 120_000,
            no_show_wait_ms: 300_000,
        }
    }
}

impl PaymentTerms {
    /// The platform's commission on `amount` (rounded half up); the driver gets the rest.
    pub fn commission(&self, amount: i64) -> i64 {
        (amount * i64::from(self.commission_bps) + 5_000) / 10_000
    }

    /// Whether a rider's cancel at `now_ms` costs the fee: `assigned_at_ms` is when the
    /// hold was taken (assignment), `arrived_at_ms` when the driver arrived, if it did.
    pub fn rider_cancel_costs_fee(
        &self,
        assigned_at_ms: u64,
        arrived_at_ms: Option<u64>,
        now_ms: u64,
    ) -> bool {
        now_ms.saturating_sub(assigned_at_ms) >= self.cancel_grace_ms
            || arrived_at_ms.is_some_and(|a| now_ms.saturating_sub(a) >= self.no_show_wait_ms)
    }
}

/// Where one trip's payment stands, derived from its entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TripMoney {
    /// Held on the rider's card now.
    pub held: i64,
    /// When the hold was taken.
    pub authorized_at_ms: Option<u64>,
    /// Charged to the rider (a fare or a cancellation fee).
    pub charged: i64,
    pub refunded: i64,
    pub refunds: u32,
    /// Captured, charged a fee or released: the trip's payment is settled.
    pub settled: bool,
}

fn p(account: Account, amount_cents: i64) -> Posting {
    Posting {
        account,
        amount_cents,
    }
}

/// One trip's entry for `step`.
fn entry(
    trip_id: &TripId,
    step: Step,
    now_ms: u64,
    currency: &str,
    postings: Vec<Posting>,
) -> Entry {
    Entry {
        key: EntryKey {
            trip_id: trip_id.clone(),
            step,
        },
        at_ms: now_ms,
        currency: currency.to_owned(),
        postings,
    }
}

/// The rules that make each step's entry from where the trip's payment stands.
impl TripMoney {
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a Entry>, rider: &RiderId) -> TripMoney {
        let mut m = TripMoney::default();
        for e in entries {
            m.held -= e.amount_for(&Account::RiderHold(rider.clone()));
            m.charged -= e.amount_for(&Account::Rider(rider.clone())).min(0);
            match e.key.step {
                Step::Authorize => m.authorized_at_ms = Some(e.at_ms),
                Step::Capture | Step::CancelFee | Step::Release => m.settled = true,
                Step::Refund(_) => {
                    m.refunds += 1;
                    m.refunded += e.amount_for(&Account::Rider(rider.clone()));
                }
            }
        }
        m
    }

    fn release_hold(&self, rider: &RiderId) -> Vec<Posting> {
        if self.held == 0 {
            return vec![];
        }
        vec![
            p(Account::RiderHold(rider.clone()), self.held),
            p(Account::Authorizations, -self.held),
        ]
    }

    pub fn authorize(
        &self,
        trip_id: &TripId,
        rider: &RiderId,
        amount: i64,
        currency: &str,
        now_ms: u64,
    ) -> Result<Entry, LedgerError> {
        if self.authorized_at_ms.is_some() || self.settled {
            return Err(LedgerError::NotAllowed(
                "the trip is already authorized".into(),
            ));
        }
        if amount <= 0 {
            return Err(LedgerError::NotAllowed("nothing to authorize".into()));
        }
        Ok(entry(
            trip_id,
            Step::Authorize,
            now_ms,
            currency,
            vec![
                p(Account::RiderHold(rider.clone()), -amount),
                p(Account::Authorizations, amount),
            ],
        ))
    }

    /// Releases the hold and charges `amount` to the rider, paid to `payee` (the driver
    /// minus the platform's commission for a fare; the driver in full for a fee).
    #[allow(clippy::too_many_arguments)]
    fn charge(
        &self,
        step: Step,
        trip_id: &TripId,
        rider: &RiderId,
        driver: &DriverId,
        amount: i64,
        commission: i64,
        currency: &str,
        now_ms: u64,
    ) -> Result<Entry, LedgerError> {
        if self.settled {
            return Err(LedgerError::NotAllowed(
                "the trip's payment is settled".into(),
            ));
        }
        if self.authorized_at_ms.is_none() {
            return Err(LedgerError::NotAllowed(
                "the trip was never authorized".into(),
            ));
        }
        let mut postings = self.release_hold(rider);
        postings.extend([
            p(Account::Rider(rider.clone()), -amount),
            p(Account::Clearing, amount),
            p(Account::Clearing, -amount),
            p(Account::Driver(driver.clone()), amount - commission),
        ]);
        if commission != 0 {
            postings.push(p(Account::Platform, commission));
        }
        Ok(entry(trip_id, step, now_ms, currency, postings))
    }

    /// `completed`: capture the fare and split it.
    #[allow(clippy::too_many_arguments)]
    pub fn capture(
        &self,
        terms: &PaymentTerms,
        trip_id: &TripId,
        rider: &RiderId,
        driver: &DriverId,
        fare: i64,
        currency: &str,
        now_ms: u64,
    ) -> Result<Entry, LedgerError> {
        let commission = terms.commission(fare);
        self.charge(
            Step::Capture,
            trip_id,
            rider,
            driver,
            fare,
            commission,
            currency,
            now_ms,
        )
    }

    /// A late rider cancel: the fee, all of it to the driver.
    pub fn cancel_fee(
        &self,
        trip_id: &TripId,
        rider: &RiderId,
        driver: &DriverId,
        fee: i64,
        currency: &str,
        now_ms: u64,
    ) -> Result<Entry, LedgerError> {
        self.charge(
            Step::CancelFee,
            trip_id,
            rider,
            driver,
            fee,
            0,
            currency,
            now_ms,
        )
    }

    /// Any other end: the hold goes back. `None` when there is nothing to release.
    pub fn release(
        &self,
        trip_id: &TripId,
        rider: &RiderId,
        currency: &str,
        now_ms: u64,
    ) -> Option<Entry> {
        if self.settled || self.held == 0 {
            return None;
        }
        Some(entry(
            trip_id,
            Step::Release,
            now_ms,
            currency,
            self.release_hold(rider),
        ))
    }

    /// An operator's refund of up to what was charged less earlier refunds.
    pub fn refund(
        &self,
        trip_id: &TripId,
        rider: &RiderId,
        amount: i64,
        currency: &str,
        now_ms: u64,
    ) -> Result<Entry, LedgerError> {
        let left = self.charged - self.refunded;
        if amount <= 0 || amount > left {
            return Err(LedgerError::NotAllowed(format!(
                "a refund must be from 1 to {left} (charged {}, refunded {})",
                self.charged, self.refunded
            )));
        }
        Ok(entry(
            trip_id,
            Step::Refund(self.refunds + 1),
            now_ms,
            currency,
            vec![
                p(Account::Platform, -amount),
                p(Account::Clearing, amount),
                p(Account::Clearing, -amount),
                p(Account::Rider(rider.clone()), amount),
            ],
        ))
    }
}

/// Balances and entries, with idempotent posting.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    entries: HashMap<EntryKey, Entry>,
    balances: HashMap<Account, i64>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Posts `e`. Returns false when the same entry was already posted (a retry or a
    /// replay); an entry with the same key and other postings is refused.
    pub fn post(&mut self, e: Entry) -> Result<bool, LedgerError> {
        let sum = e.sum();
        if sum != 0 {
            return Err(LedgerError::Unbalanced(
                format!("{}/{}", e.key.trip_id, e.key.step),
                sum,
            ));
        }
        if let Some(have) = self.entries.get(&e.key) {
            return if have.postings == e.postings {
                Ok(false)
            } else {
                Err(LedgerError::Conflict(format!(
                    "{}/{}",
                    e.key.trip_id, e.key.step
                )))
            };
        }
        for p in &e.postings {
            *self.balances.entry(p.account.clone()).or_default() += p.amount_cents;
        }
        self.entries.insert(e.key.clone(), e);
        Ok(true)
    }

    pub fn balance(&self, a: &Account) -> i64 {
        self.balances.get(a).copied().unwrap_or(0)
    }

    /// The sum over every account: zero, always.
    pub fn total(&self) -> i64 {
        self.balances.values().sum()
    }

    pub fn balances(&self) -> &HashMap<Account, i64> {
        &self.balances
    }

    pub fn entries_of(&self, trip: &TripId) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| &e.key.trip_id == trip)
            .collect();
        v.sort_by_key(|e| (e.at_ms, e.key.step));
        v
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (TripId, RiderId, DriverId) {
        (
            TripId::new("trp_1"),
            RiderId::new("rdr_1"),
            DriverId::new("drv_1"),
        )
    }

    #[test]
    fn a_ride_holds_then_captures_and_splits_and_a_replay_posts_nothing() {
        let (t, r, d) = ids();
        let terms = PaymentTerms::default();
        let mut l = Ledger::new();
        let auth = TripMoney::default()
            .authorize(&t, &r, 1250, "USD", 1)
            .unwrap();
        assert!(l.post(auth.clone()).unwrap());
        assert!(!l.post(auth).unwrap(), "a replay is a no-op");
        assert_eq!(l.balance(&Account::RiderHold(r.clone())), -1250);
        let m = TripMoney::of(l.entries_of(&t), &r);
        assert_eq!((m.held, m.authorized_at_ms), (1250, Some(1)));
        let cap = m.capture(&terms, &t, &r, &d, 1250, "USD", 2).unwrap();
        assert!(l.post(cap).unwrap());
        assert_eq!(l.balance(&Account::Rider(r.clone())), -1250);
        assert_eq!(l.balance(&Account::Driver(d.clone())), 937);
        assert_eq!(l.balance(&Account::Platform), 313);
        assert_eq!(l.balance(&Account::RiderHold(r.clone())), 0);
        assert_eq!(l.balance(&Account::Clearing), 0);
        assert_eq!(l.total(), 0);
        let m = TripMoney::of(l.entries_of(&t), &r);
        assert!(m.settled && m.charged == 1250);
        assert!(m.capture(&terms, &t, &r, &d, 1250, "USD", 3).is_err());
        assert!(m.release(&t, &r, "USD", 3).is_none());
        let refund = m.refund(&t, &r, 250, "USD", 4).unwrap();
        assert_eq!(refund.key.step, Step::Refund(1));
        l.post(refund).unwrap();
        let m = TripMoney::of(l.entries_of(&t), &r);
        assert!(m.refund(&t, &r, 1001, "USD", 5).is_err());
        assert_eq!(l.balance(&Account::Platform), 63);
        assert_eq!(l.total(), 0);
    }

    #[test]
    fn the_same_key_with_other_amounts_is_refused() {
        let (t, r, _) = ids();
        let mut l = Ledger::new();
        l.post(
            TripMoney::default()
                .authorize(&t, &r, 100, "USD", 1)
                .unwrap(),
        )
        .unwrap();
        let other = TripMoney::default()
            .authorize(&t, &r, 200, "USD", 1)
            .unwrap();
        assert!(matches!(l.post(other), Err(LedgerError::Conflict(_))));
    }

    #[test]
    fn a_cancel_costs_the_fee_only_after_the_grace_period_or_the_wait() {
        let terms = PaymentTerms::default();
        assert!(!terms.rider_cancel_costs_fee(0, None, 119_999));
        assert!(terms.rider_cancel_costs_fee(0, None, 120_000));
        assert!(!terms.rider_cancel_costs_fee(0, Some(10_000), 60_000));
        let quick = PaymentTerms {
            cancel_grace_ms: 600_000,
            ..terms
        };
        assert!(quick.rider_cancel_costs_fee(0, Some(10_000), 310_000));
        assert_eq!(terms.commission(1000), 250);
        assert_eq!(terms.commission(1), 0);
        assert_eq!(terms.commission(2), 1);
    }
}
