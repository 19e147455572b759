//! The PostgreSQL store: the same trees as tables, the same codec records as `bytea`.
//!
//! A small Tokio runtime of its own (one worker) runs the driver (`tokio-postgres`) and
//! its pool (`deadpool-postgres`), so the store keeps sled's blocking read calls and
//! its writer thread, whatever runtime (or none) the caller is on. Every call is bounded
//! twice: by the server's `statement_timeout` and by a client-side timeout that also
//! covers connecting and waiting for a pooled connection; a call that hits it fails and
//! is counted ([`Pg::timeouts`]).
//!
//! Group commit: the writer thread's group (every batch that arrived during the last
//! commit) becomes one transaction: per table, one `INSERT ... SELECT FROM unnest(...)
//! ON CONFLICT DO UPDATE` of the group's last value per key and one `DELETE`. A lost
//! connection during `COMMIT` leaves the outcome unknown; the waiters are told it
//! failed, and the retry writes the same keys (trip, journal version, ledger step)
//! again: it neither applies a transition twice nor loses it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::lease::{self, FENCED, Fence, Lease, ShardId};
use crate::store::{
    Faults, KeyWrite, NamedBy, Range, Request, Rows, SHARD_PAGE, Sink, StoreError, Tree,
    TripColumns,
};

/// The versioned migrations, applied in order under an advisory lock.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "trees", include_str!("../migrations/0001_trees.sql")),
    (2, "leases", include_str!("../migrations/0002_leases.sql")),
    (
        3,
        "lease shard bigint",
        include_str!("../migrations/0003_lease_shard_bigint.sql"),
    ),
    (
        4,
        "shard columns",
        include_str!("../migrations/0004_shard_columns.sql"),
    ),
    (
        5,
        "trip rider",
        include_str!("../migrations/0005_trip_rider.sql"),
    ),
];

/// The schema version this build writes and reads.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// `pg_advisory_lock` key of the migrations ("dispatchd" in ASCII, truncated).
pub const MIGRATION_LOCK: i64 = 0x6469_7370_6174_6368;

/// How to reach the database, and the bounds on every call.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/db` or `key=value` form. Never logged.
    pub url: String,
    /// Client-side bound on any one call (connecting, waiting for a pooled connection,
    /// a query, a commit).
    pub call_timeout: Duration,
    /// The server-side `statement_timeout` set on every connection.
    pub statement_timeout: Duration,
    /// Pooled connections at most.
    pub pool_size: usize,
    /// How long recovery waits for the server at start, retrying with backoff.
    pub start_timeout: Duration,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact(&self.url))
            .field("call_timeout", &self.call_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("pool_size", &self.pool_size)
            .field("start_timeout", &self.start_timeout)
            .finish()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            call_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(5),
            pool_size: 16,
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether `url` is a PostgreSQL connection string the driver accepts.
pub fn url_is_valid(url: &str) -> bool {
    url.parse::<tokio_postgres::Config>().is_ok()
}

/// The address of a database URL without its password: `postgres://user@host:port/db`.
/// An unparsable URL is shown as `<invalid database URL>`, never as given.
pub fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => location(&c),
        Err(_) => "<invalid database URL>".to_owned(),
    }
}

fn location(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{}:{}/{}",
        c.get_user().unwrap_or(""),
        host,
        port,
        c.get_dbname().unwrap_or("")
    )
}

pub(crate) struct Pg {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    location: String,
    options: PgOptions,
    /// The schema was checked and migrated by this process.
    prepared: AtomicBool,
    /// The last failure to reach the server, cleared by the next success.
    problem: Mutex<Option<String>>,
    timeouts: AtomicU64,
    /// Reads by shard refused for passing their bound ([`StoreError::TooLarge`]).
    too_large: AtomicU64,
    /// What every group commit checks first (cluster mode), if anything.
    fences: Mutex<Fences>,
    /// Batches refused by a fence.
    fenced: AtomicU64,
    /// Batches refused, by the shard whose fence refused them.
    fenced_by_shard: Mutex<BTreeMap<ShardId, u64>>,
    /// Group commits tried again after PostgreSQL ended them in a deadlock or a
    /// serialization failure ([`MAX_WRITE_RETRIES`]).
    retried: Arc<AtomicU64>,
}

/// How many times a group commit PostgreSQL ended as a deadlock (40P01) or a
/// serialization failure (40001) is tried again before its batches fail: the
/// transaction was rolled back whole, so trying it again writes it once.
pub(crate) const MAX_WRITE_RETRIES: u32 = 3;

/// What a failure of [`write_group`] starts with when trying it again may succeed.
const RETRYABLE: &str = "retryable: ";

/// A failure of one call in a group commit's transaction: [`reason`], marked
/// [`RETRYABLE`] when the server ended the transaction in a deadlock or a serialization
/// failure.
fn tx_failure(e: tokio_postgres::Error) -> String {
    use tokio_postgres::error::SqlState;
    let again = e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    });
    let r = reason(&e);
    if again { format!("{RETRYABLE}{r}") } else { r }
}

/// The fences of the shards this node holds. Unfenced (every write lands unchecked) until
/// the first [`Pg::set_fence`]; from then on fenced for good: a write naming a shard with
/// no fence here is refused, even once the last fence is gone.
#[derive(Debug, Default, Clone)]
pub(crate) struct Fences {
    on: bool,
    by_shard: BTreeMap<ShardId, Fence>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Never blocks, so it may run on any thread, async or not.
        if let Some(rt) = self.rt.lock().expect("pg runtime").take() {
            rt.shutdown_background();
        }
    }
}

/// A failure of one call, with every cause under it (the driver's own message is
/// often just "db error"; the server's words are in its source).
fn reason(e: impl std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !out.contains(&more) {
            out.push_str(": ");
            out.push_str(&more);
        }
        cause = c.source();
    }
    out
}

impl Pg {
    pub(crate) fn new(options: PgOptions) -> Result<Pg, StoreError> {
        let mut config: tokio_postgres::Config = options.url.parse().map_err(|e| {
            StoreError::BadUrl(format!(
                "{e} (the URL is not shown: it may hold a password)"
            ))
        })?;
        let location = location(&config);
        config
            .connect_timeout(options.call_timeout)
            .application_name("dispatchd")
            .options(format!(
                "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
                options.statement_timeout.as_millis(),
                options.call_timeout.as_millis().max(1000)
            ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres {
                at: location.clone(),
                reason: format!("cannot start its runtime: {e}"),
            })?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _in = rt.enter();
            Pool::builder(manager)
                .max_size(options.pool_size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(options.call_timeout))
                .create_timeout(Some(options.call_timeout))
                .recycle_timeout(Some(options.call_timeout))
                .build()
                .map_err(|e| StoreError::Postgres {
                    at: location.clone(),
                    reason: e.to_string(),
                })?
        };
        Ok(Pg {
            handle: rt.handle().clone(),
            rt: Mutex::new(Some(rt)),
            pool,
            location,
            options,
            prepared: AtomicBool::new(false),
            problem: Mutex::new(Some("not connected yet".to_owned())),
            timeouts: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            fences: Mutex::new(Fences::default()),
            fenced: AtomicU64::new(0),
            fenced_by_shard: Mutex::new(BTreeMap::new()),
            retried: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn problem(&self) -> Option<String> {
        self.problem.lock().expect("pg problem").clone()
    }

    pub(crate) fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    pub(crate) fn too_large(&self) -> u64 {
        self.too_large.load(Ordering::Relaxed)
    }

    /// A read past its bound: counted, and refused.
    fn refuse_too_large(&self, what: String, limit: usize) -> StoreError {
        self.too_large.fetch_add(1, Ordering::Relaxed);
        StoreError::TooLarge { what, limit }
    }

    fn fail(&self, reason: String) -> StoreError {
        *self.problem.lock().expect("pg problem") = Some(reason.clone());
        StoreError::Postgres {
            at: self.location.clone(),
            reason,
        }
    }

    /// Runs `fut` on the store's runtime and waits for it, bounded by the call timeout.
    /// Callable from any thread (it blocks this one).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let bound = self.options.call_timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(tokio::time::timeout(bound, fut).await);
        });
        match rx.recv() {
            Ok(Ok(Ok(v))) => {
                if self.prepared.load(Ordering::Acquire) {
                    *self.problem.lock().expect("pg problem") = None;
                }
                Ok(v)
            }
            // The pool's own bounds (waiting for a slot, connecting) are the same bound.
            Ok(Ok(Err(e))) if e.starts_with("Timeout occurred") => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(self.fail(format!("no answer within {} ms ({e})", bound.as_millis())))
            }
            Ok(Ok(Err(e))) => Err(self.fail(e)),
            Ok(Err(_)) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(self.fail(format!(
                    "no answer within {} ms (the call was abandoned)",
                    bound.as_millis()
                )))
            }
            Err(_) => Err(self.fail("the store's runtime stopped".to_owned())),
        }
    }

    /// One attempt to check and migrate the schema, unless this process already did.
    fn ready(&self) -> Result<(), StoreError> {
        if self.prepared.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.run(migrate(self.pool.clone())) {
            Ok(()) => {
                self.prepared.store(true, Ordering::Release);
                *self.problem.lock().expect("pg problem") = None;
                Ok(())
            }
            Err(StoreError::Postgres { reason, .. }) if reason.starts_with(FUTURE_SCHEMA) => {
                let found = reason[FUTURE_SCHEMA.len()..]
                    .trim()
                    .parse()
                    .unwrap_or(i32::MAX);
                let e = StoreError::FutureSchema {
                    at: self.location.clone(),
                    found,
                    ours: schema_version(),
                };
                *self.problem.lock().expect("pg problem") = Some(e.to_string());
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for the server (retrying with backoff, up to the start timeout), then
    /// checks and migrates the schema under an advisory lock. Idempotent.
    pub(crate) fn prepare(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.options.start_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.ready() {
                Ok(()) => return Ok(()),
                Err(e @ StoreError::FutureSchema { .. }) => return Err(e),
                Err(e) => {
                    if Instant::now() + backoff > deadline {
                        return Err(e);
                    }
                    tracing::warn!(at = %self.location, error = %e, retry_in_ms = backoff.as_millis() as u64, "PostgreSQL not reachable yet; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub(crate) fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let key = key.to_vec();
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let sql = format!("SELECT v FROM {} WHERE k = $1", tree.name());
            let st = c.prepare_cached(&sql).await.map_err(reason)?;
            let row = c.query_opt(&st, &[&key]).await.map_err(reason)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    pub(crate) fn range(&self, tree: Tree, r: &Range) -> Result<Rows, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let mut conds = Vec::new();
        let mut params: Vec<Vec<u8>> = Vec::new();
        if let Some((lo, inclusive)) = &r.lo {
            params.push(lo.clone());
            conds.push(format!(
                "k {} ${}",
                if *inclusive { ">=" } else { ">" },
                params.len()
            ));
        }
        if let Some(hi) = &r.hi {
            params.push(hi.clone());
            conds.push(format!("k < ${}", params.len()));
        }
        let mut sql = format!("SELECT k, v FROM {}", tree.name());
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(if r.reverse {
            " ORDER BY k DESC"
        } else {
            " ORDER BY k"
        });
        if let Some(n) = r.limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(&sql).await.map_err(reason)?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p as _).collect();
            let rows = c.query(&st, &refs).await.map_err(reason)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    /// See [`Store::claim_lease`](crate::Store::claim_lease).
    pub(crate) fn claim_lease(
        &self,
        shard: ShardId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let (shard, holder, ttl) = (lease::column(shard), holder.to_owned(), lease::ms(ttl));
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::CLAIM).await.map_err(reason)?;
            if let Some(r) = c
                .query_opt(&st, &[&shard, &holder, &ttl])
                .await
                .map_err(reason)?
            {
                return Ok(Some(lease::lease(shard, r.get(0), r.get(1), r.get(2))));
            }
            // Another claim is live: ours, or someone else's.
            let st = c.prepare_cached(lease::READ).await.map_err(reason)?;
            Ok(c.query_opt(&st, &[&shard])
                .await
                .map_err(reason)?
                .map(|r| lease::lease(r.get(0), r.get(1), r.get(2), r.get(3)))
                .filter(|l| l.holder == holder && !l.remaining.is_zero()))
        })
    }

    /// See [`Store::renew_lease`](crate::Store::renew_lease).
    pub(crate) fn renew_lease(
        &self,
        shard: ShardId,
        holder: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let (shard, holder, epoch, ttl) = (
            lease::column(shard),
            holder.to_owned(),
            epoch as i64,
            lease::ms(ttl),
        );
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::RENEW).await.map_err(reason)?;
            let n = c
                .execute(&st, &[&shard, &holder, &epoch, &ttl])
                .await
                .map_err(reason)?;
            Ok(n == 1)
        })
    }

    /// See [`Store::renew_leases`](crate::Store::renew_leases).
    pub(crate) fn renew_leases(
        &self,
        holder: &str,
        held: &[(ShardId, u64)],
        ttl: Duration,
    ) -> Result<Vec<ShardId>, StoreError> {
        self.ready()?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.pool.clone();
        let shards: Vec<i64> = held.iter().map(|(s, _)| lease::column(*s)).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, e)| *e as i64).collect();
        let (holder, ttl) = (holder.to_owned(), lease::ms(ttl));
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::RENEW_ALL).await.map_err(reason)?;
            let mut renewed: Vec<ShardId> = c
                .query(&st, &[&holder, &shards, &epochs, &ttl])
                .await
                .map_err(reason)?
                .into_iter()
                .map(|r| r.get::<_, i64>(0) as ShardId)
                .collect();
            renewed.sort_unstable();
            Ok(renewed)
        })
    }

    /// The rows of `tree` written under `shard`, in key order, read in pages of
    /// [`SHARD_PAGE`]; more than `limit` is [`StoreError::TooLarge`].
    pub(crate) fn shard_rows(
        &self,
        tree: Tree,
        shard: ShardId,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        self.ready()?;
        let mut out: Rows = Vec::new();
        loop {
            // One more than the bound, so a shard exactly at it is not refused.
            let page = SHARD_PAGE.min((limit - out.len()).saturating_add(1));
            let after = out.last().map(|(k, _)| k.clone());
            let pool = self.pool.clone();
            let sql = format!(
                "SELECT k, v FROM {} WHERE shard = $1 AND k {} $2 ORDER BY k LIMIT $3",
                tree.name(),
                if after.is_some() { ">" } else { ">=" }
            );
            let args = (lease::column(shard), after.unwrap_or_default(), page as i64);
            let rows: Rows = self.run(async move {
                let c = pool.get().await.map_err(reason)?;
                let st = c.prepare_cached(&sql).await.map_err(reason)?;
                let rows = c
                    .query(&st, &[&args.0, &args.1, &args.2])
                    .await
                    .map_err(reason)?;
                Ok(rows
                    .into_iter()
                    .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                    .collect())
            })?;
            let last = rows.len() < page;
            out.extend(rows);
            if out.len() > limit {
                return Err(self.refuse_too_large(format!("shard {shard}"), limit));
            }
            if last {
                return Ok(out);
            }
        }
    }

    /// The `trips` rows that are live and name one of `ids` (drivers or riders, `by`),
    /// and those whose columns predate the migration that added them (not known yet), in
    /// key order; more than `limit` is [`StoreError::TooLarge`].
    pub(crate) fn live_trips(
        &self,
        by: NamedBy,
        ids: Vec<String>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        self.ready()?;
        let (sql, whose) = match by {
            NamedBy::Driver => (LIVE_TRIPS, "drivers"),
            NamedBy::Rider => (LIVE_TRIPS_BY_RIDER, "riders"),
        };
        let what = || format!("the live trips of {} {whose}", ids.len());
        if ids.len() > limit {
            return Err(self.refuse_too_large(what(), limit));
        }
        let what = what();
        let pool = self.pool.clone();
        let n = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let rows: Rows = self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(sql).await.map_err(reason)?;
            Ok(c.query(&st, &[&ids, &n])
                .await
                .map_err(reason)?
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect())
        })?;
        if rows.len() > limit {
            return Err(self.refuse_too_large(what, limit));
        }
        Ok(rows)
    }

    /// See [`Store::claim_leases`](crate::Store::claim_leases).
    pub(crate) fn claim_leases(
        &self,
        holder: &str,
        shards: &[ShardId],
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        self.ready()?;
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.pool.clone();
        let shards: Vec<i64> = shards.iter().map(|s| lease::column(*s)).collect();
        let (holder, ttl) = (holder.to_owned(), lease::ms(ttl));
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::CLAIM_ALL).await.map_err(reason)?;
            let mut got: Vec<Lease> = c
                .query(&st, &[&holder, &shards, &ttl])
                .await
                .map_err(reason)?
                .into_iter()
                .map(|r| lease::lease(r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            got.sort_unstable_by_key(|l| l.shard);
            Ok(got)
        })
    }

    /// See [`Store::trip_shards`](crate::Store::trip_shards).
    pub(crate) fn trip_shards(
        &self,
        above: ShardId,
        limit: usize,
    ) -> Result<Vec<ShardId>, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let (above, n) = (
            lease::column(above),
            i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1),
        );
        let found: Vec<ShardId> = self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::TRIP_SHARDS).await.map_err(reason)?;
            Ok(c.query(&st, &[&above, &n])
                .await
                .map_err(reason)?
                .into_iter()
                .map(|r| r.get::<_, i64>(0) as ShardId)
                .collect())
        })?;
        if found.len() > limit {
            return Err(self.refuse_too_large("the shards trips are in".to_owned(), limit));
        }
        Ok(found)
    }

    /// See [`Store::release_lease`](crate::Store::release_lease).
    pub(crate) fn release_lease(
        &self,
        shard: ShardId,
        holder: &str,
        epoch: u64,
    ) -> Result<(), StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        let (shard, holder, epoch) = (lease::column(shard), holder.to_owned(), epoch as i64);
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::RELEASE).await.map_err(reason)?;
            c.execute(&st, &[&shard, &holder, &epoch])
                .await
                .map_err(reason)?;
            Ok(())
        })
    }

    /// Every shard's lease, as the database holds them now.
    pub(crate) fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.ready()?;
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await.map_err(reason)?;
            let st = c.prepare_cached(lease::ALL).await.map_err(reason)?;
            Ok(c.query(&st, &[])
                .await
                .map_err(reason)?
                .into_iter()
                .map(|r| lease::lease(r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect())
        })
    }

    /// Holds `fence` for its shard (replacing that shard's older one); fenced from now on.
    pub(crate) fn set_fence(&self, fence: Fence) {
        let mut f = self.fences.lock().expect("pg fence");
        f.on = true;
        f.by_shard.insert(fence.shard, fence);
    }

    /// Drops `shard`'s fence: writes naming it are refused from now on.
    pub(crate) fn unset_fence(&self, shard: ShardId) -> Option<Fence> {
        self.fences
            .lock()
            .expect("pg fence")
            .by_shard
            .remove(&shard)
    }

    pub(crate) fn fences(&self) -> Vec<Fence> {
        let f = self.fences.lock().expect("pg fence");
        f.by_shard.values().cloned().collect()
    }

    /// Group commits tried again after a deadlock or a serialization failure.
    pub(crate) fn write_retries(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub(crate) fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    pub(crate) fn fenced_in(&self, shard: ShardId) -> u64 {
        self.fenced_by_shard
            .lock()
            .expect("pg fenced")
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// Writes `rows` of raw keys and values into `tree` (for `migrate`), in one
    /// transaction.
    pub(crate) fn put_raw(&self, tree: Tree, rows: Rows) -> Result<(), StoreError> {
        self.ready()?;
        let writes = rows
            .into_iter()
            .map(|(key, v)| KeyWrite {
                tree,
                key,
                value: Some(v),
                version: 0,
                shard: crate::WHOLE_CITY,
                trip: None,
            })
            .collect();
        let pool = self.pool.clone();
        let group = vec![Planned {
            shards: Vec::new(),
            requires: Vec::new(),
            writes,
        }];
        let fences = Fences::default();
        self.run(async move {
            match write_group(&pool, &group, &fences, Duration::ZERO, false).await {
                Ok(mut outcomes) => outcomes.pop().map(|o| o.1).unwrap_or(Ok(())),
                Err(e) => Err(e),
            }
        })
    }
}

/// The live trips naming one of the drivers `$1`, and the trips whose `live` is not
/// known (written before migration 4): each branch uses its partial index.
const LIVE_TRIPS: &str = "\
SELECT k, v FROM (\
SELECT k, v FROM trips WHERE live AND driver = ANY($1::text[]) \
UNION ALL SELECT k, v FROM trips WHERE live IS NULL) t ORDER BY k LIMIT $2";

/// The live trips of one of the riders `$1`, the live trips whose rider is not known
/// (written before migration 5; the same partial index holds them, a btree keeps NULLs)
/// and the trips whose `live` is not known (written before migration 4).
const LIVE_TRIPS_BY_RIDER: &str = "\
SELECT k, v FROM (\
SELECT k, v FROM trips WHERE live AND rider = ANY($1::text[]) \
UNION ALL SELECT k, v FROM trips WHERE live AND rider IS NULL \
UNION ALL SELECT k, v FROM trips WHERE live IS NULL) t ORDER BY k LIMIT $2";

/// The prefix of a migration failure that means "the database is newer than us".
const FUTURE_SCHEMA: &str = "future schema version ";

async fn migrate(pool: Pool) -> Result<(), String> {
    // Taken out of the pool: if this call is abandoned (its timeout) while waiting for
    // the lock, the connection closes with it, and the server drops the pending lock,
    // instead of a pooled session acquiring it later and holding it for good.
    let mut c = deadpool_postgres::Object::take(pool.get().await.map_err(reason)?);
    // Session-level lock: two nodes starting at once apply each migration once; a
    // dropped connection lets go of it.
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(reason)?;
    let result = async {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS dispatch_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(reason)?;
        let current: i32 = c
            .query_one(
                "SELECT coalesce(max(version), 0) FROM dispatch_schema_migrations",
                &[],
            )
            .await
            .map_err(reason)?
            .get(0);
        if current > schema_version() {
            return Err(format!("{FUTURE_SCHEMA}{current}"));
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let tx = c.transaction().await.map_err(reason)?;
            tx.batch_execute(sql)
                .await
                .map_err(|e| format!("migration {version} ({name}) failed: {e}"))?;
            tx.execute(
                "INSERT INTO dispatch_schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(reason)?;
            tx.commit().await.map_err(reason)?;
            tracing::info!(version, name, "PostgreSQL schema migrated");
        }
        Ok(())
    }
    .await;
    let _ = c
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

/// The group's last write per key.
type Writes<'a> = BTreeMap<(Tree, &'a [u8]), &'a KeyWrite>;

/// One batch of a group as the transaction sees it: the shards it names, the foreign
/// fences it requires, and its key writes in order.
pub(crate) struct Planned {
    shards: Vec<ShardId>,
    requires: Vec<Fence>,
    writes: Vec<KeyWrite>,
}

impl Planned {
    fn of(r: &Request) -> Planned {
        Planned {
            shards: r.batch.shards().into_iter().collect(),
            requires: r.batch.required().to_vec(),
            writes: r.batch.key_writes().collect(),
        }
    }
}

/// A lease as a commit checks it: (shard, holder, epoch).
type Held = (ShardId, String, u64);

fn held_as(f: &Fence) -> Held {
    (f.shard, f.holder.clone(), f.epoch)
}

/// Why `holder`'s writes to `shard` are refused (the text after [`FENCED`]).
fn refusal(shard: ShardId, fence: Option<&Fence>) -> String {
    match fence {
        Some(f) => format!(
            "{} no longer holds shard {} with epoch {} (the lease expired or a newer epoch claimed it); nothing of this write was written",
            f.holder, shard, f.epoch
        ),
        None => format!(
            "this node holds no lease on shard {shard} (never claimed here, or handed off); nothing of this write was written"
        ),
    }
}

/// What one batch of a group came to: the shard whose fence refused it, if any, and
/// its outcome.
type Outcome = (Option<ShardId>, Result<(), String>);

/// One transaction for a group; one outcome per batch, in order.
///
/// Fenced (`fences.on`): first one query locks `FOR SHARE` the lease row of every shard
/// the group names and this node has a fence for, and keeps those still held by the
/// fence's holder at its epoch, unexpired. A batch naming any other shard is refused
/// (its outcome starts with [`FENCED`]) and none of its writes is applied; the others
/// are. Then per table, an upsert of the last value per key of the batches kept, and a
/// delete. `lose_reply`: commit, then answer as a lost connection would (tests).
/// `Err`: the transaction failed, nothing of the group was written ([`RETRYABLE`] when
/// the server ended it in a deadlock or a serialization failure: the writer tries it
/// again, at most [`MAX_WRITE_RETRIES`] times, counted).
///
/// Lock order: the lease rows in shard order (the check's `ORDER BY`, as a renewal and a
/// claim take them), then per table in [`Tree::ALL`]'s order the upserted rows in key
/// order, then the deleted ones.
async fn write_group(
    pool: &Pool,
    group: &[Planned],
    fences: &Fences,
    hold: Duration,
    lose_reply: bool,
) -> Result<Vec<Outcome>, String> {
    let mut c = pool.get().await.map_err(reason)?;
    let tx = c.transaction().await.map_err(tx_failure)?;
    // The refusal of each batch, if any.
    let mut refused: Vec<Option<(ShardId, String)>> = vec![None; group.len()];
    // Every lease the group depends on: this node's fence of each shard it names (when
    // fenced) and every foreign fence a batch requires (always).
    let mut checked: std::collections::BTreeSet<Held> = group
        .iter()
        .flat_map(|p| p.requires.iter().map(held_as))
        .collect();
    if fences.on {
        checked.extend(
            group
                .iter()
                .flat_map(|p| p.shards.iter())
                .filter_map(|s| fences.by_shard.get(s))
                .map(held_as),
        );
    }
    if fences.on || !checked.is_empty() {
        let mut held = std::collections::BTreeSet::new();
        if !checked.is_empty() {
            let shards: Vec<i64> = checked.iter().map(|f| lease::column(f.0)).collect();
            let holders: Vec<&str> = checked.iter().map(|f| f.1.as_str()).collect();
            let epochs: Vec<i64> = checked.iter().map(|f| f.2 as i64).collect();
            let st = tx.prepare_cached(lease::CHECK).await.map_err(tx_failure)?;
            for row in tx
                .query(&st, &[&shards, &holders, &epochs])
                .await
                .map_err(tx_failure)?
            {
                held.insert((
                    row.get::<_, i64>(0) as ShardId,
                    row.get::<_, String>(1),
                    row.get::<_, i64>(2) as u64,
                ));
            }
        }
        for (i, p) in group.iter().enumerate() {
            // A shard the batch requires a foreign fence of is vouched for by that
            // fence (checked below), not by one of this node's.
            let vouched = |s: &ShardId| p.requires.iter().any(|f| f.shard == *s);
            let own = p.shards.iter().find(|s| {
                fences.on
                    && !vouched(s)
                    && !fences
                        .by_shard
                        .get(s)
                        .is_some_and(|f| held.contains(&held_as(f)))
            });
            if let Some(s) = own {
                refused[i] = Some((
                    *s,
                    format!("{FENCED}{}", refusal(*s, fences.by_shard.get(s))),
                ));
            } else if let Some(f) = p.requires.iter().find(|f| !held.contains(&held_as(f))) {
                refused[i] = Some((
                    f.shard,
                    format!(
                        "{FENCED}{} (a lease this write requires)",
                        refusal(f.shard, Some(f))
                    ),
                ));
            }
        }
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
    }
    // The kept batches' last value per key, in arrival order: one transaction makes the
    // final state the same as applying each write in turn.
    let mut writes = Writes::new();
    for (p, _) in group.iter().zip(&refused).filter(|(_, r)| r.is_none()) {
        for w in &p.writes {
            writes.insert((w.tree, w.key.as_slice()), w);
        }
    }
    if writes.is_empty() {
        // Dropping `tx` rolls it back: nothing to write (a sync, or every batch refused).
        return Ok(outcomes(refused, Ok(())));
    }
    for tree in Tree::ALL {
        let mut keys: Vec<&[u8]> = Vec::new();
        let mut values: Vec<&[u8]> = Vec::new();
        let mut versions = Vec::new();
        let mut shards = Vec::new();
        let mut drivers: Vec<Option<&str>> = Vec::new();
        let mut live: Vec<Option<bool>> = Vec::new();
        let mut riders: Vec<Option<&str>> = Vec::new();
        let mut gone: Vec<&[u8]> = Vec::new();
        for w in writes
            .range((tree, &[][..])..)
            .take_while(|((t, _), _)| *t == tree)
            .map(|(_, w)| *w)
        {
            match &w.value {
                Some(v) => {
                    keys.push(&w.key);
                    values.push(v);
                    versions.push(w.version);
                    shards.push(lease::column(w.shard));
                    let c: Option<&TripColumns> = w.trip.as_ref();
                    drivers.push(c.and_then(|c| c.driver.as_deref()));
                    live.push(c.map(|c| c.live));
                    riders.push(c.map(|c| c.rider.as_str()));
                }
                None => gone.push(&w.key),
            }
        }
        if !keys.is_empty() {
            let t = tree.name();
            if tree == Tree::Trips {
                // `driver`, `live` (migration 4) and `rider` (migration 5): NULL when not
                // known (a raw copy).
                let sql = format!(
                    "INSERT INTO {t} (k, v, ver, shard, driver, live, rider) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[], $5::text[], $6::bool[], $7::text[]) \
                     ON CONFLICT (k) DO UPDATE SET v = excluded.v, ver = excluded.ver, shard = excluded.shard, driver = excluded.driver, live = excluded.live, rider = excluded.rider WHERE {t}.ver <= excluded.ver"
                );
                let st = tx.prepare_cached(&sql).await.map_err(tx_failure)?;
                tx.execute(
                    &st,
                    &[&keys, &values, &versions, &shards, &drivers, &live, &riders],
                )
                .await
                .map_err(tx_failure)?;
            } else {
                let sql = format!(
                    "INSERT INTO {t} (k, v, ver, shard) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[]) \
                     ON CONFLICT (k) DO UPDATE SET v = excluded.v, ver = excluded.ver, shard = excluded.shard WHERE {t}.ver <= excluded.ver"
                );
                let st = tx.prepare_cached(&sql).await.map_err(tx_failure)?;
                tx.execute(&st, &[&keys, &values, &versions, &shards])
                    .await
                    .map_err(tx_failure)?;
            }
        }
        if !gone.is_empty() {
            let sql = format!("DELETE FROM {} WHERE k = ANY($1::bytea[])", tree.name());
            let st = tx.prepare_cached(&sql).await.map_err(tx_failure)?;
            tx.execute(&st, &[&gone]).await.map_err(tx_failure)?;
        }
    }
    tx.commit().await.map_err(|e| {
        format!("the commit's outcome is unknown (the connection failed during COMMIT: {e})")
    })?;
    if lose_reply {
        return Ok(outcomes(
            refused,
            Err(
                "injected fault: the connection was lost during COMMIT; the outcome is unknown"
                    .to_owned(),
            ),
        ));
    }
    Ok(outcomes(refused, Ok(())))
}

/// Each batch's outcome: its refusal, or what the transaction answered.
fn outcomes(refused: Vec<Option<(ShardId, String)>>, kept: Result<(), String>) -> Vec<Outcome> {
    refused
        .into_iter()
        .map(|r| match r {
            Some((shard, why)) => (Some(shard), Err(why)),
            None => (None, kept.clone()),
        })
        .collect()
}

/// The writer thread's side of the PostgreSQL store.
pub(crate) struct PgSink {
    pub(crate) pg: Arc<Pg>,
    pub(crate) faults: Arc<Faults>,
}

impl Sink for PgSink {
    fn healthy(&self) -> bool {
        // The pool reconnects by itself; every group simply tries.
        true
    }

    fn recover(&self) {}

    fn apply(&self, group: &[Request]) -> Vec<Result<(), String>> {
        let all = |e: String| vec![Err(e); group.len()];
        if self.faults.failing() {
            return all("injected fault: the database refused the write".to_owned());
        }
        if group.iter().all(|r| r.batch.is_empty()) {
            // A sync: nothing queued is unwritten once the previous group returned.
            return vec![Ok(()); group.len()];
        }
        if let Err(e) = self.pg.ready() {
            return all(match e {
                StoreError::Postgres { reason, .. } => reason,
                other => other.to_string(),
            });
        }
        let planned: Vec<Planned> = group.iter().map(Planned::of).collect();
        let fences = self.pg.fences.lock().expect("pg fence").clone();
        let lose = self.faults.take_lost_reply();
        let hold = self.faults.held_after_fence();
        let pool = self.pg.pool.clone();
        let retried = self.pg.retried.clone();
        let commit = async move {
            let mut tries = 0;
            loop {
                match write_group(&pool, &planned, &fences, hold, lose).await {
                    Err(e) if e.starts_with(RETRYABLE) && tries < MAX_WRITE_RETRIES => {
                        tries += 1;
                        retried.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(tries, error = %e, "group commit tried again");
                    }
                    Err(e) => {
                        return Err(e.strip_prefix(RETRYABLE).map_or(e.clone(), str::to_owned));
                    }
                    Ok(o) => return Ok(o),
                }
            }
        };
        let outcomes = match self.pg.run(commit) {
            Ok(o) => o,
            Err(StoreError::Postgres { reason, .. }) => return all(reason),
            Err(other) => return all(other.to_string()),
        };
        let mut by_shard = self.pg.fenced_by_shard.lock().expect("pg fenced");
        outcomes
            .into_iter()
            .map(|(refused_by, outcome)| {
                if let Some(shard) = refused_by {
                    self.pg.fenced.fetch_add(1, Ordering::Relaxed);
                    *by_shard.entry(shard).or_default() += 1;
                }
                outcome
            })
            .collect()
    }
}

/// A fresh, empty database for one test, on the server `DISPATCH_TEST_DATABASE_URL`
/// names; its URL. Without that variable: `None` after saying so on stderr, or, when
/// `CI` is set, a panic (PostgreSQL tests never skip silently in CI).
pub fn test_database(test: &str) -> Option<String> {
    let Ok(admin) = std::env::var("DISPATCH_TEST_DATABASE_URL") else {
        no_postgres(
            test,
            "DISPATCH_TEST_DATABASE_URL is not set (`source .ci/postgres.sh start` sets it)",
        );
        return None;
    };
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "dispatch_t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let sql = format!("CREATE DATABASE {name}");
    let admin2 = admin.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&admin2, NoTls).await?;
            tokio::spawn(conn);
            c.batch_execute(&sql).await
        })
    })
    .join()
    .expect("create the test database")
    .unwrap_or_else(|e| {
        panic!(
            "{test}: cannot create a test database on {}: {e}",
            redact(&admin)
        )
    });
    Some(url_of(&admin, &name))
}

/// A PostgreSQL test that cannot run because `why`: a panic when `CI` is set
/// (PostgreSQL tests never skip silently in CI), else `SKIPPED (PostgreSQL): …` on stderr.
pub fn no_postgres(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: CI is set but {why}");
    }
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED (PostgreSQL): {test}: {why}");
}

/// `admin` with its database name replaced by `db`.
fn url_of(admin: &str, db: &str) -> String {
    match admin.rfind('/') {
        Some(i) if admin.starts_with("postgres") => {
            let (base, rest) = admin.split_at(i + 1);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}{db}{query}")
        }
        _ => format!("{admin} dbname={db}"),
    }
}
