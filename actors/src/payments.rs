//! Payments: the card processor behind a trait, the in-process stand-in for it, and the
//! ledger's live balances and drivers' earnings.
//!
//! The rules (which entry a step makes, what a cancel costs) are the engine's
//! (`dispatch_engine::ledger`). A trip actor asks the provider first and only then
//! commits the transition together with its ledger entry, so an entry is durable before
//! anyone is told of the transition; every provider request carries an idempotency key
//! (`<trip id>:<step>`), so a retry after a crash never charges twice.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use dispatch_engine::{Account, DriverId, Entry, Step};
use dispatch_persistence::{Batch, ProviderRecord, Store};

/// Why the processor said no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// A definite no (the card was declined): retrying will not help.
    #[error("declined: {0}")]
    Declined(String),
    /// The processor could not be reached or failed: retry later.
    #[error("the payment provider is unavailable: {0}")]
    Unavailable(String),
    /// The processor did not answer within `--payment-timeout-ms`: retry later (the
    /// request's idempotency key makes the retry safe whatever happened to this one).
    #[error("the payment provider did not answer a {request} within {after_ms} ms")]
    TimedOut {
        request: &'static str,
        after_ms: u64,
    },
}

impl PaymentError {
    /// The `outcome` label of `dispatch_payment_failures_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            PaymentError::Declined(_) => "declined",
            PaymentError::Unavailable(_) => "unavailable",
            PaymentError::TimedOut { .. } => "timeout",
        }
    }
}

pub type PayFuture<'a> = Pin<Box<dyn Future<Output = Result<(), PaymentError>> + Send + 'a>>;

/// A card processor. Every call is idempotent by `key`: the same key gets the same
/// answer, and money moves at most once per key.
pub trait PaymentProvider: Send + Sync {
    /// Holds `amount` on the rider's card.
    fn authorize(&self, key: String, amount_cents: i64) -> PayFuture<'_>;
    /// Takes `amount` (at most what was authorized) from the hold.
    fn capture(&self, key: String, amount_cents: i64) -> PayFuture<'_>;
    /// Lets the hold go.
    fn release(&self, key: String) -> PayFuture<'_>;
    /// Returns `amount` of a capture to the card.
    fn refund(&self, key: String, amount_cents: i64) -> PayFuture<'_>;
}

/// What the in-process provider does with new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderMode {
    Approve,
    /// Authorizations are declined (captures of earlier holds still go through).
    Decline,
    /// Every request fails as if the processor were down.
    Fail,
}

impl ProviderMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderMode::Approve => "approve",
            ProviderMode::Decline => "decline",
            ProviderMode::Fail => "fail",
        }
    }
}

impl std::str::FromStr for ProviderMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        [
            ProviderMode::Approve,
            ProviderMode::Decline,
            ProviderMode::Fail,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or(())
    }
}

/// The default provider: approves (or declines, or fails, as told) and records every
/// answer durably in the store's `provider` tree before giving it, as a real processor's
/// records outlive our process.
pub struct LocalProvider {
    store: Arc<Store>,
    mode: Mutex<ProviderMode>,
    clock: crate::clock::Clock,
    /// Sharded mode: the shard of a request's key (its trip's), set by the context; the
    /// records are `WHOLE_CITY`'s while it is unset. Blocking (it may read the trip).
    shard_of_key: std::sync::OnceLock<ShardOfKey>,
}

/// The shard a provider record belongs to, by its key (`<trip id>:<step>`).
pub(crate) type ShardOfKey = Arc<dyn Fn(&str) -> dispatch_persistence::ShardId + Send + Sync>;

impl LocalProvider {
    pub fn new(store: Arc<Store>, mode: ProviderMode) -> Self {
        Self {
            store,
            mode: Mutex::new(mode),
            clock: crate::clock::Clock::new(),
            shard_of_key: std::sync::OnceLock::new(),
        }
    }

    /// Sharded mode: records go in the shard `f` gives their key.
    pub(crate) fn shard_records_by(&self, f: ShardOfKey) {
        let _ = self.shard_of_key.set(f);
    }

    pub fn mode(&self) -> ProviderMode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mode(&self, mode: ProviderMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    async fn answer(
        &self,
        key: String,
        amount_cents: i64,
        may_decline: bool,
    ) -> Result<(), PaymentError> {
        let store = self.store.clone();
        let k = key.clone();
        let shard_of = self.shard_of_key.get().cloned();
        let (earlier, shard) = tokio::task::spawn_blocking(move || {
            let shard = shard_of.map_or(dispatch_persistence::WHOLE_CITY, |f| f(&k));
            store.provider_record(&k).map(|r| (r, shard))
        })
        .await
        .map_err(|e| PaymentError::Unavailable(e.to_string()))?
        .map_err(|e| PaymentError::Unavailable(e.to_string()))?;
        if let Some(r) = earlier {
            // The same request again (a retry, a replay after a crash): the same answer.
            return if r.approved {
                Ok(())
            } else {
                Err(PaymentError::Declined("card declined".into()))
            };
        }
        let approved = match self.mode() {
            ProviderMode::Fail => {
                return Err(PaymentError::Unavailable(
                    "the processor did not answer".into(),
                ));
            }
            ProviderMode::Decline => !may_decline,
            ProviderMode::Approve => true,
        };
        let record = ProviderRecord {
            key,
            amount_cents,
            approved,
            at_ms: self.clock.now_ms(),
        };
        self.store
            .commit(Batch::in_shard(shard).provider(record))
            .await
            .map_err(|e| PaymentError::Unavailable(e.to_string()))?;
        if approved {
            Ok(())
        } else {
            Err(PaymentError::Declined("card declined".into()))
        }
    }
}

impl PaymentProvider for LocalProvider {
    fn authorize(&self, key: String, amount_cents: i64) -> PayFuture<'_> {
        Box::pin(self.answer(key, amount_cents, true))
    }
    fn capture(&self, key: String, amount_cents: i64) -> PayFuture<'_> {
        Box::pin(self.answer(key, amount_cents, false))
    }
    fn release(&self, key: String) -> PayFuture<'_> {
        Box::pin(self.answer(key, 0, false))
    }
    fn refund(&self, key: String, amount_cents: i64) -> PayFuture<'_> {
        Box::pin(self.answer(key, amount_cents, false))
    }
}

/// A driver's earnings: total, and per UTC day (days since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earnings {
    pub trips: u64,
    pub cents: i64,
    pub by_day: BTreeMap<u64, (u64, i64)>,
}

/// The ledger as the live system keeps it: balances by account, and each driver's
/// earnings. Entries themselves live in the store.
#[derive(Debug, Default)]
pub struct Books {
    balances: HashMap<Account, i64>,
    earnings: HashMap<DriverId, Earnings>,
    entries: u64,
}

/// A UTC day, in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

impl Books {
    /// Adds a committed entry.
    pub fn add(&mut self, e: &Entry) {
        self.entries += 1;
        for p in &e.postings {
            *self.balances.entry(p.account.clone()).or_default() += p.amount_cents;
            if let Account::Driver(d) = &p.account {
                let earned = self.earnings.entry(d.clone()).or_default();
                let completed = u64::from(e.key.step == Step::Capture);
                earned.trips += completed;
                earned.cents += p.amount_cents;
                let day = earned.by_day.entry(day_of(e.at_ms)).or_default();
                day.0 += completed;
                day.1 += p.amount_cents;
            }
        }
    }

    pub fn balance(&self, a: &Account) -> i64 {
        self.balances.get(a).copied().unwrap_or(0)
    }

    /// The sum over all accounts: zero when the books balance.
    pub fn total(&self) -> i64 {
        self.balances.values().sum()
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Sums of the per-person accounts by kind: (riders, rider holds, drivers).
    pub fn people_totals(&self) -> (i64, i64, i64) {
        let mut t = (0, 0, 0);
        for (a, v) in &self.balances {
            match a {
                Account::Rider(_) => t.0 += v,
                Account::RiderHold(_) => t.1 += v,
                Account::Driver(_) => t.2 += v,
                _ => {}
            }
        }
        t
    }

    pub fn earnings(&self, d: &DriverId) -> Earnings {
        self.earnings.get(d).cloned().unwrap_or_default()
    }
}

/// The day (since the Unix epoch, UTC) of `ms`.
pub fn day_of(ms: u64) -> u64 {
    ms / DAY_MS
}
