//! What the admin console reads and does: fleet counts, paged lists, suspensions,
//! operator cancels, the cell table, run-time pricing, surge pins, the ledger and refunds,
//! and per-group actor statistics.
//! Lists read the registry's sharded maps (and the store for finished trips) without
//! stopping any actor; they are consistent per entity, not across the fleet.

use std::collections::BTreeMap;
use std::sync::Arc;

use dispatch_engine::{
    Account, CancelledBy, CellId, DriverId, Entry, Grid, Point, Product, RateCard, RateCards,
    RiderId, Sender, TripCommand, TripId, TripMoney, TripState, refuse_without_trip,
};
use dispatch_persistence::{Batch, StoredPricing, StoredTrip, Transition};
use prometheus::core::Collector;

use crate::error::ApiError;
use crate::messages::{CellMsg, DriverMsg, TripMsg};
use crate::metrics::{DRIVER_STATUSES, GROUPS};
use crate::records::{DriverRecord, RiderRecord};
use crate::system::System;
use crate::views::TripView;

/// One page of a list, in id order, and where the next page starts (`None`: the end).
#[derive(Debug, Clone)]
pub struct Page<T, K> {
    pub items: Vec<T>,
    pub next: Option<K>,
}

/// Counts over the whole fleet, read from the registry.
#[derive(Debug, Clone, Default)]
pub struct FleetCounts {
    /// Every registered driver by status (all five statuses present).
    pub drivers: BTreeMap<&'static str, u64>,
    /// Live trips by state (the four live states present).
    pub trips: BTreeMap<&'static str, u64>,
    pub open_offers: u64,
    /// Messages queued for connected apps and not yet written.
    pub session_backlog: u64,
}

#[derive(Debug, Clone, Default)]
pub struct DriverFilter {
    pub status: Option<&'static str>,
    pub product: Option<Product>,
    /// A cell at the matching resolution or coarser.
    pub cell: Option<CellId>,
}

#[derive(Debug, Clone, Default)]
pub struct TripFilter {
    pub state: Option<TripState>,
    pub rider_id: Option<RiderId>,
    pub driver_id: Option<DriverId>,
}

impl TripFilter {
    fn matches(&self, t: &TripView) -> bool {
        self.state.is_none_or(|s| t.state == s)
            && self.rider_id.as_ref().is_none_or(|r| &t.rider_id == r)
            && self
                .driver_id
                .as_ref()
                .is_none_or(|d| t.driver_id.as_ref() == Some(d))
    }
}

/// One row of the cell table.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRow {
    pub cell: CellId,
    pub centre: Point,
    pub available_drivers: u64,
    pub busy_drivers: u64,
    pub open_requests: u64,
    pub surge: f64,
}

/// One actor group's counters, as `/admin/actors` shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    pub group: &'static str,
    pub alive: i64,
    pub started: u64,
    pub stopped: u64,
    pub restarts: u64,
    pub panics: u64,
    pub messages: u64,
    pub handling_mean_ms: f64,
    pub handling_p99_ms: f64,
}

/// The most trips one list request decodes from the store; a page with a selective
/// filter may come back short, with a cursor to go on from.
pub const MAX_TRIP_SCAN: usize = 10_000;

/// Rate cards from the stored pricing and the server's currency.
pub fn cards(currency: &str, p: &StoredPricing) -> RateCards {
    RateCards {
        currency: currency.to_owned(),
        economy: p.economy,
        xl: p.xl,
        premium: p.premium,
    }
}

/// The value below which a fraction `q` of a histogram's observations fall, interpolated
/// linearly inside the bucket as Prometheus's `histogram_quantile` does. Observations in
/// the +Inf bucket answer the largest finite bound. `buckets` are (upper bound,
/// cumulative count), ascending; the +Inf bucket may be left out (the client library
/// does).
pub fn histogram_quantile(q: f64, buckets: &[(f64, u64)], count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = q * count as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank {
            if upper.is_infinite() {
                return lower;
            }
            let inside = (cumulative - below) as f64;
            if inside == 0.0 {
                return upper;
            }
            return lower + (upper - lower) * (rank - below as f64) / inside;
        }
        lower = upper;
        below = cumulative;
    }
    lower
}

/// A histogram's count, sum and cumulative buckets `(upper bound, count)`, ascending.
fn histogram_read(h: &prometheus::Histogram) -> (u64, f64, Vec<(f64, u64)>) {
    h.collect()
        .first()
        .and_then(|f| f.get_metric().first())
        .map(|mm| {
            let h = mm.get_histogram();
            let b: Vec<(f64, u64)> = h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect();
            (h.get_sample_count(), h.get_sample_sum(), b)
        })
        .unwrap_or_default()
}

impl System {
    /// Counts drivers by status, live trips by state, open offers and queued messages,
    /// and sets the matching gauges (called for every `/metrics` scrape).
    pub fn fleet_counts(&self) -> FleetCounts {
        let mut c = FleetCounts::default();
        for s in DRIVER_STATUSES {
            c.drivers.insert(s, 0);
        }
        for s in [
            TripState::Dispatching,
            TripState::DriverAssigned,
            TripState::DriverArrived,
            TripState::InProgress,
        ] {
            c.trips.insert(s.as_str(), 0);
        }
        let backlog =
            |h: &Option<crate::session::SessionHandle>| h.as_ref().map_or(0, |h| h.queued());
        for d in self.ctx.registry.driver_records.iter() {
            *c.drivers.entry(d.status.as_str()).or_default() += 1;
            c.session_backlog += backlog(&d.session) as u64;
        }
        for r in self.ctx.registry.rider_records.iter() {
            c.session_backlog += backlog(&r.session) as u64;
        }
        c.open_offers = c.drivers.get("offered").copied().unwrap_or(0);
        for t in self.ctx.registry.trip_views.iter() {
            if !t.state.is_final() {
                *c.trips.entry(t.state.as_str()).or_default() += 1;
            }
        }
        let m = &self.ctx.metrics;
        for (s, n) in &c.drivers {
            m.drivers.with_label_values(&[s]).set(*n as i64);
        }
        for (s, n) in &c.trips {
            m.trips_active.with_label_values(&[s]).set(*n as i64);
        }
        m.mailbox_backlog
            .with_label_values(&["session"])
            .set(c.session_backlog as i64);
        c
    }

    /// Finished trips since this process started, by final state (from the counters).
    pub fn finished_since_start(&self) -> BTreeMap<&'static str, u64> {
        [
            TripState::Completed,
            TripState::Cancelled,
            TripState::NoDriverFound,
        ]
        .into_iter()
        .map(|s| {
            (
                s.as_str(),
                self.ctx
                    .metrics
                    .trips_final
                    .with_label_values(&[s.as_str()])
                    .get(),
            )
        })
        .collect()
    }

    /// The driver as the registry has it, with the status its actor last committed.
    pub fn driver_record(&self, id: &DriverId) -> Option<DriverRecord> {
        self.ctx.registry.driver_records.get(id).map(|r| r.clone())
    }

    pub fn rider_record(&self, id: &RiderId) -> Option<RiderRecord> {
        self.ctx.registry.rider_records.get(id).map(|r| r.clone())
    }

    /// Drivers matching `f`, in id order, after `after`.
    pub fn drivers_page(
        &self,
        f: &DriverFilter,
        after: Option<&DriverId>,
        limit: usize,
    ) -> Page<DriverRecord, DriverId> {
        let grid = self.ctx.config.grid;
        let in_cell = |p: Option<Point>, cell: CellId| {
            p.is_some_and(|p| grid.cell_of(p).parent(cell.resolution()) == Some(cell))
        };
        let mut ids: Vec<DriverId> = self
            .ctx
            .registry
            .driver_records
            .iter()
            .filter(|d| after.is_none_or(|a| d.id.as_str() > a.as_str()))
            .filter(|d| f.status.is_none_or(|s| d.status.as_str() == s))
            .filter(|d| f.product.is_none_or(|p| d.profile.vehicle.product == p))
            .filter(|d| f.cell.is_none_or(|c| in_cell(d.position, c)))
            .map(|d| d.id.clone())
            .collect();
        ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        let more = ids.len() > limit;
        ids.truncate(limit);
        let items: Vec<DriverRecord> = ids.iter().filter_map(|id| self.driver_record(id)).collect();
        let next = if more { ids.last().cloned() } else { None };
        Page { items, next }
    }

    /// Suspends or reinstates a driver through its actor (started if the driver has
    /// none); durable before it returns.
    pub async fn set_suspended(
        &self,
        id: &DriverId,
        suspend: bool,
    ) -> Result<DriverRecord, ApiError> {
        if !self.ctx.registry.driver_records.contains_key(id) {
            return Err(ApiError::not_found("driver"));
        }
        let actor =
            self.ctx.driver_actor(id).await.ok_or_else(|| {
                ApiError::unavailable("the driver's actor could not start; retry")
            })?;
        match actor
            .call(
                |r| DriverMsg::Suspend(suspend, r),
                Some(self.ctx.call_timeout()),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(ApiError::unavailable(
                "the driver did not answer in time; retry",
            )),
        }
    }

    /// Trips (live and finished) matching `f`, in id order, after `after`. Looks at no
    /// more than [`MAX_TRIP_SCAN`] stored trips; the page may then be short.
    pub async fn trips_page(
        &self,
        f: TripFilter,
        after: Option<TripId>,
        limit: usize,
    ) -> Result<Page<TripView, TripId>, ApiError> {
        let store = self.ctx.store.clone();
        let views = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            let mut items = Vec::new();
            let mut full = false;
            let (last, ended) = store
                .scan_trips(after.as_ref(), MAX_TRIP_SCAN, |t: StoredTrip| {
                    let view = views
                        .registry
                        .trip_views
                        .get(&t.trip.id)
                        .map(|v| v.clone())
                        .unwrap_or_else(|| TripView::of(&t.trip, t.driver));
                    if f.matches(&view) {
                        items.push(view);
                        if items.len() == limit {
                            full = true;
                            return false;
                        }
                    }
                    true
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "trip scan failed");
                    ApiError::internal()
                })?;
            let next = if ended && !full {
                None
            } else if full {
                items.last().map(|v: &TripView| v.trip_id.clone())
            } else {
                last
            };
            Ok(Page { items, next })
        })
        .await
        .map_err(|_| ApiError::internal())?
    }

    /// A trip and every transition it went through.
    pub async fn trip_history(
        &self,
        id: &TripId,
    ) -> Result<Option<(TripView, Vec<Transition>)>, ApiError> {
        let Some(view) = self.trip_view(id).await? else {
            return Ok(None);
        };
        let key = id.clone();
        let history = self.ctx.read("history", move |s| s.history(&key)).await?;
        Ok(Some((view, history)))
    }

    /// An operator's cancel: any non-final state. Returns the trip once the cancel is
    /// durable and the rider and driver have been sent it.
    pub async fn admin_cancel(&self, id: &TripId, reason: String) -> Result<TripView, ApiError> {
        let cmd = TripCommand::Cancel {
            by: CancelledBy::Admin,
            reason: Some(reason),
        };
        let cmd = match self.ctx.registry.trip(id) {
            None => cmd,
            Some(actor) => {
                let timeout = Some(self.ctx.call_timeout());
                match actor
                    .call(|reply| TripMsg::Admin { cmd, reply }, timeout)
                    .await
                {
                    Ok(ractor::rpc::CallResult::Success(Ok(()))) => {
                        return self
                            .trip_view(id)
                            .await?
                            .ok_or_else(|| ApiError::not_found("trip"));
                    }
                    Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err(e),
                    // It finished between the lookup and the call.
                    Err(ractor::MessagingErr::SendErr(TripMsg::Admin { cmd, .. })) => cmd,
                    _ => {
                        return Err(ApiError::unavailable(
                            "the trip did not answer in time; check its state and retry",
                        ));
                    }
                }
            }
        };
        let stored = self.ctx.stored_trip(id).await?.map(|t| t.trip);
        Err(refuse_without_trip(stored.as_ref(), &Sender::Admin, None, &cmd).into())
    }

    /// The cell table: cells with a cell actor and cells with an open request, in H3
    /// index order, after `after`; with `active_only`, only those with a driver or an
    /// open request.
    pub async fn cells_page(
        &self,
        active_only: bool,
        after: Option<CellId>,
        limit: usize,
    ) -> Page<CellRow, CellId> {
        let grid = self.ctx.config.grid;
        let mut requests: BTreeMap<CellId, u64> = BTreeMap::new();
        for t in self.ctx.registry.trip_views.iter() {
            if t.state == TripState::Dispatching {
                *requests.entry(grid.cell_of(t.pickup)).or_default() += 1;
            }
        }
        let mut cells: Vec<CellId> = self
            .ctx
            .registry
            .cells
            .iter()
            .map(|c| *c.key())
            .chain(requests.keys().copied())
            .filter(|c| after.is_none_or(|a| u64::from(*c) > u64::from(a)))
            .collect();
        cells.sort_unstable_by_key(|c| u64::from(*c));
        cells.dedup();
        let mut items = Vec::new();
        let mut next = None;
        for cell in cells {
            if items.len() == limit {
                next = items.last().map(|r: &CellRow| r.cell);
                break;
            }
            let (available, total) = match self.ctx.registry.cell(&cell) {
                Some(a) => match a.call(CellMsg::Count, Some(self.ctx.call_timeout())).await {
                    Ok(ractor::rpc::CallResult::Success(n)) => n,
                    _ => (0, 0),
                },
                None => (0, 0),
            };
            let open = requests.get(&cell).copied().unwrap_or(0);
            if active_only && total == 0 && open == 0 {
                continue;
            }
            items.push(CellRow {
                cell,
                centre: Grid::centre(cell),
                available_drivers: available as u64,
                busy_drivers: (total - available) as u64,
                open_requests: open,
                surge: self
                    .lock_surge()
                    .multiplier(self.ctx.config.surge.surge_cell(cell)),
            });
        }
        Page { items, next }
    }

    /// Replaces the rate cards for new quotes; durable before it returns. The currency
    /// stays the server's.
    pub async fn set_pricing(
        &self,
        economy: RateCard,
        xl: RateCard,
        premium: RateCard,
    ) -> Result<Arc<RateCards>, ApiError> {
        for (p, r) in [
            (Product::Economy, &economy),
            (Product::Xl, &xl),
            (Product::Premium, &premium),
        ] {
            r.check(p)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let stored = StoredPricing {
            economy,
            xl,
            premium,
        };
        self.ctx
            .commit(Batch::new().pricing(stored.clone()), "pricing")
            .await?;
        self.ctx
            .replace_rates(cards(&self.ctx.config.rates.currency, &stored));
        tracing::info!("pricing changed by an operator");
        Ok(self.rates())
    }

    /// Per-group actor statistics from the metrics registry.
    /// Calls `f` with every driver's record, shard by shard, holding each shard's read
    /// lock only while `f` runs (the console's live feed: `f` must be quick).
    pub fn for_each_driver(&self, mut f: impl FnMut(&DriverRecord)) {
        for d in self.ctx.registry.driver_records.iter() {
            f(&d);
        }
    }

    /// Calls `f` with every trip that is not final (as [`Self::for_each_driver`]).
    pub fn for_each_live_trip(&self, mut f: impl FnMut(&TripView)) {
        for t in self.ctx.registry.trip_views.iter() {
            if !t.state.is_final() {
                f(&t);
            }
        }
    }

    /// The counters a window over the last minute is computed from: see [`Counters`].
    pub fn counters(&self) -> Counters {
        let m = &self.ctx.metrics;
        let (count, _, buckets) = histogram_read(&m.request_to_offer);
        Counters {
            assigned: m
                .trip_transitions
                .with_label_values(&[TripState::DriverAssigned.as_str()])
                .get(),
            no_driver_found: m
                .trips_final
                .with_label_values(&[TripState::NoDriverFound.as_str()])
                .get(),
            request_to_offer_count: count,
            request_to_offer_buckets: buckets,
            restarts: GROUPS
                .iter()
                .map(|g| m.actor_restarts.with_label_values(&[g]).get())
                .sum(),
        }
    }

    pub fn actor_stats(&self) -> Vec<GroupStats> {
        let m = &self.ctx.metrics;
        GROUPS
            .iter()
            .map(|&g| {
                let (count, sum, buckets) =
                    histogram_read(&m.actor_handling.with_label_values(&[g]));
                GroupStats {
                    group: g,
                    alive: m.actors_alive.with_label_values(&[g]).get(),
                    started: m.actors_started.with_label_values(&[g]).get(),
                    stopped: m.actors_stopped.with_label_values(&[g]).get(),
                    restarts: m.actor_restarts.with_label_values(&[g]).get(),
                    panics: m.actor_panics.with_label_values(&[g]).get(),
                    messages: count,
                    handling_mean_ms: if count == 0 {
                        0.0
                    } else {
                        sum / count as f64 * 1000.0
                    },
                    handling_p99_ms: histogram_quantile(0.99, &buckets, count) * 1000.0,
                }
            })
            .collect()
    }
}

/// Cumulative counters since the start, read together, so that two readings a minute
/// apart give the last minute's numbers ([`Counters::since`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Transitions into `driver_assigned`.
    pub assigned: u64,
    /// Trips that ended `no_driver_found`.
    pub no_driver_found: u64,
    /// Observations of request → first offer, and its cumulative buckets (seconds).
    pub request_to_offer_count: u64,
    pub request_to_offer_buckets: Vec<(f64, u64)>,
    /// Actor restarts over every group.
    pub restarts: u64,
}

/// What happened between two [`Counters`] readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub assigned: u64,
    pub no_driver_found: u64,
    /// Of the dispatches that ended in the window, the share that found a driver:
    /// `assigned / (assigned + no_driver_found)`, or `None` when none ended.
    pub match_rate: Option<f64>,
    pub request_to_offer_count: u64,
    /// Quantiles of request → first offer in milliseconds, `None` without observations.
    pub request_to_offer_p50_ms: Option<f64>,
    pub request_to_offer_p99_ms: Option<f64>,
    pub restarts: u64,
}

impl Counters {
    /// The window from `earlier` to `self` (counters only rise; a smaller reading counts 0).
    pub fn since(&self, earlier: &Counters) -> Window {
        let count = self
            .request_to_offer_count
            .saturating_sub(earlier.request_to_offer_count);
        let buckets: Vec<(f64, u64)> = self
            .request_to_offer_buckets
            .iter()
            .map(|&(upper, n)| {
                let before = earlier
                    .request_to_offer_buckets
                    .iter()
                    .find(|(u, _)| *u == upper)
                    .map_or(0, |(_, b)| *b);
                (upper, n.saturating_sub(before))
            })
            .collect();
        let q = |q: f64| (count > 0).then(|| histogram_quantile(q, &buckets, count) * 1000.0);
        let assigned = self.assigned.saturating_sub(earlier.assigned);
        let no_driver_found = self.no_driver_found.saturating_sub(earlier.no_driver_found);
        let ended = assigned + no_driver_found;
        Window {
            assigned,
            no_driver_found,
            match_rate: (ended > 0).then(|| assigned as f64 / ended as f64),
            request_to_offer_count: count,
            request_to_offer_p50_ms: q(0.5),
            request_to_offer_p99_ms: q(0.99),
            restarts: self.restarts.saturating_sub(earlier.restarts),
        }
    }
}

/// The ledger at a glance: the check that it balances, and the totals per kind of account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSummary {
    pub entries: u64,
    pub total: i64,
    pub platform: i64,
    pub clearing: i64,
    pub authorizations: i64,
    pub riders: i64,
    pub rider_holds: i64,
    pub drivers: i64,
}

impl System {
    pub fn ledger_summary(&self) -> LedgerSummary {
        let books = self.ctx.lock_books();
        let (riders, rider_holds, drivers) = books.people_totals();
        LedgerSummary {
            entries: books.entries(),
            total: books.total(),
            platform: books.balance(&Account::Platform),
            clearing: books.balance(&Account::Clearing),
            authorizations: books.balance(&Account::Authorizations),
            riders,
            rider_holds,
            drivers,
        }
    }

    pub fn account_balance(&self, a: &Account) -> i64 {
        self.ctx.lock_books().balance(a)
    }

    /// A trip's ledger entries (live trips from memory, finished ones from the store).
    pub async fn trip_entries(&self, id: &TripId) -> Result<Vec<Entry>, ApiError> {
        if let Some(r) = self.ctx.registry.trip_records.get(id) {
            return Ok(r.entries.clone());
        }
        let key = id.clone();
        self.ctx.read("ledger", move |s| s.ledger_of(&key)).await
    }

    /// An operator's refund of `amount` on a finished trip: the provider returns it to
    /// the card, then the entry is written (durable before this returns).
    pub async fn refund(&self, id: &TripId, amount: i64) -> Result<Entry, ApiError> {
        let _one_at_a_time = self.ctx.refunds.lock().await;
        let Some(view) = self.trip_view(id).await? else {
            return Err(ApiError::not_found("trip"));
        };
        if !view.state.is_final() {
            return Err(ApiError::conflict(
                "the trip has not ended; refunds are for finished trips",
            ));
        }
        let entries = self.trip_entries(id).await?;
        let money = TripMoney::of(&entries, &view.rider_id);
        let entry = money
            .refund(
                id,
                &view.rider_id,
                amount,
                &view.currency,
                self.ctx.clock.now_ms(),
            )
            .map_err(|e| ApiError::conflict(e.to_string()))?;
        self.ctx
            .provider
            .refund(format!("{id}:{}", entry.key.step), amount)
            .await
            .map_err(|e| {
                self.ctx
                    .metrics
                    .payment_failures
                    .with_label_values(&["refund", "unavailable"])
                    .inc();
                ApiError::unavailable(format!("the refund did not go through: {e}"))
            })?;
        self.ctx
            .commit(
                Batch::in_shard(self.ctx.shard_of_pickup(view.pickup)).ledger(entry.clone()),
                "refund",
            )
            .await?;
        self.ctx.entry_written(&entry);
        tracing::info!(trip_id = %id, amount, "refund");
        Ok(entry)
    }

    /// Pins or unpins a surge cell (`cell` at the surge resolution or finer), or sets the
    /// city-wide cap; durable before it returns.
    pub async fn set_surge(
        &self,
        pin: Option<(CellId, Option<f64>)>,
        cap: Option<Option<f64>>,
    ) -> Result<(), ApiError> {
        let stored = {
            let mut book = self.ctx.lock_surge();
            let mut trial = book.clone();
            if let Some((cell, m)) = pin {
                let cell = trial.surge_cell(cell);
                trial
                    .pin(cell, m)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
            if let Some(c) = cap {
                trial
                    .set_city_cap(c)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
            let stored = dispatch_persistence::StoredSurge {
                pins: trial
                    .pins()
                    .iter()
                    .map(|(c, m)| (u64::from(*c), *m))
                    .collect(),
                city_cap: trial.city_cap(),
            };
            *book = trial;
            stored
        };
        self.ctx.commit(Batch::new().surge(stored), "change").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        // 100 observations: 50 in (0, 1], 40 in (1, 2], 10 in (2, 4].
        let b = [(1.0, 50), (2.0, 90), (4.0, 100), (f64::INFINITY, 100)];
        assert_eq!(histogram_quantile(0.5, &b, 100), 1.0);
        assert!((histogram_quantile(0.7, &b, 100) - 1.5).abs() < 1e-9);
        assert!((histogram_quantile(0.99, &b, 100) - 3.8).abs() < 1e-9);
        assert_eq!(histogram_quantile(0.99, &b, 0), 0.0);
        // Everything beyond the last finite bound answers that bound.
        let inf = [(1.0, 0), (f64::INFINITY, 5)];
        assert_eq!(histogram_quantile(0.99, &inf, 5), 1.0);
    }

    #[test]
    fn a_window_counts_only_what_happened_inside_it() {
        let before = Counters {
            assigned: 8,
            no_driver_found: 2,
            request_to_offer_count: 100,
            // 100 fast offers, all under 10 ms.
            request_to_offer_buckets: vec![(0.01, 100), (0.1, 100), (1.0, 100)],
            restarts: 2,
        };
        let after = Counters {
            assigned: 13,
            no_driver_found: 7,
            request_to_offer_count: 110,
            // Then 10 slow ones, in (0.1, 1] s: the window's p50 is slow, not fast.
            request_to_offer_buckets: vec![(0.01, 100), (0.1, 100), (1.0, 110)],
            restarts: 3,
        };
        let w = after.since(&before);
        assert_eq!((w.assigned, w.no_driver_found, w.restarts), (5, 5, 1));
        assert_eq!(w.match_rate, Some(0.5));
        assert_eq!(w.request_to_offer_count, 10);
        let p50 = w.request_to_offer_p50_ms.unwrap();
        assert!((p50 - 550.0).abs() < 1e-6, "{p50}");
        assert!(w.request_to_offer_p99_ms.unwrap() > p50);
        // Nothing in the window: no rate and no quantiles, not zeros.
        let empty = after.since(&after);
        assert_eq!(empty.match_rate, None);
        assert_eq!(empty.request_to_offer_p99_ms, None);
    }
}
