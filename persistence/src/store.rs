//! The sled store and its group commit.
//!
//! One writer thread owns every write. It takes all the batches that arrived while the
//! previous flush ran, applies them in arrival order, flushes once, and only then
//! answers each waiter: one fsync covers many acknowledgements, and nobody is told a
//! write succeeded before it is on disk. sled recovers a prefix of the writes after a
//! crash, so a journal entry written before its snapshot is never lost while the
//! snapshot survives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dispatch_engine::{DriverId, Entry, EntryKey, QuoteId, RiderId, TripId};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use crate::codec::{self, CodecError};
use crate::lease::{Fence, ShardId, WHOLE_CITY};
use crate::records::{
    JournalEntry, ProviderRecord, StoredDriver, StoredPricing, StoredQuote, StoredRider,
    StoredSurge, StoredTrip, Transition,
};

/// `meta` key of the operator's pricing.
const PRICING_KEY: &[u8] = b"pricing";
/// `meta` key of the operator's surge pins and cap.
const SURGE_KEY: &[u8] = b"surge";

/// `ledger` keys: trip id, a zero byte, the step (`capture`, `refund:2`, ...): a trip's
/// entries are contiguous.
pub fn ledger_key(e: &EntryKey) -> Vec<u8> {
    let mut k = e.trip_id.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(e.step.to_string().as_bytes());
    k
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {dir} is locked by another running process (sled holds its lock); stop that process or choose another --data-dir"
    )]
    Locked { dir: PathBuf },
    #[error("cannot open the data directory {dir}: {source}")]
    Open { dir: PathBuf, source: sled::Error },
    #[error(
        "record {tree}/{key} in {dir} cannot be read: {source}. Startup stopped; the data was not changed"
    )]
    Corrupt {
        tree: &'static str,
        key: String,
        dir: PathBuf,
        source: CodecError,
    },
    #[error(
        "the data directory {dir} was written by a newer dispatchd (store format {found}, this build reads {ours})"
    )]
    FutureFormat { dir: PathBuf, found: u16, ours: u16 },
    #[error("storage error in {dir}: {source}")]
    Io { dir: PathBuf, source: sled::Error },
    #[error("the store is closed")]
    Closed,
    #[error("the database in {dir} is being reopened after a failed write")]
    Unavailable { dir: PathBuf },
    #[error("storage write failed in {at}: {reason}")]
    Write { at: String, reason: String },
    /// PostgreSQL could not be reached or answered an error (`at` never holds a password).
    #[error("PostgreSQL at {at}: {reason}")]
    Postgres { at: String, reason: String },
    #[error(
        "the PostgreSQL database at {at} has schema version {found}, newer than this build's {ours}: it was migrated by a newer dispatchd; run that version (nothing was changed)"
    )]
    FutureSchema { at: String, found: i32, ours: i32 },
    #[error("invalid --database-url: {0}")]
    BadUrl(String),
    /// A commit under a fence whose lease this node no longer holds (cluster mode):
    /// nothing of it was written, and nothing this node writes will be.
    #[error("refused by the shard lease: {0}")]
    Fenced(String),
    #[error("{0} needs the PostgreSQL store (--store postgres)")]
    Unsupported(&'static str),
    /// A read by shard found more than its bound (`Store::load_shard`,
    /// `Store::live_trips_of`, `Store::live_trips_of_riders`): nothing of it is returned.
    #[error("{what} has more than {limit} records (the bound of one read); nothing was returned")]
    TooLarge { what: String, limit: usize },
}

/// Writes that must land together, in this order, each naming the shard it belongs to.
///
/// Under fencing (cluster mode, PostgreSQL) a batch lands only if this node holds the
/// lease of every shard its writes name, at the epoch it fenced, checked in the commit's
/// own transaction; otherwise none of it does ([`StoreError::Fenced`]). On sled, and on
/// a PostgreSQL store never fenced, shards are not checked.
///
/// [`Batch::requires`] adds a *foreign* fence (another node's lease, the driver's accept
/// of docs/sharding.md §3): on PostgreSQL the batch lands only if that lease is held by
/// that holder at that epoch, checked and locked `FOR SHARE` in the same query, fenced
/// store or not; sled ignores it, as it ignores shards.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Each write and the shard it belongs to.
    ops: Vec<(ShardId, Op)>,
    /// The shard of the writes added next.
    shard: ShardId,
    /// Foreign leases that must be held as given for this batch to land.
    requires: Vec<Fence>,
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Driver(StoredDriver),
    Rider(StoredRider),
    Trip(StoredTrip),
    Journal(JournalEntry),
    Quote(StoredQuote),
    DeleteQuote(QuoteId),
    Pricing(StoredPricing),
    Surge(StoredSurge),
    Ledger(Entry),
    Provider(ProviderRecord),
}

impl Batch {
    /// A batch of the whole city's shard ([`WHOLE_CITY`]): a single node's writes, and a
    /// single leader's.
    pub fn new() -> Self {
        Self::in_shard(WHOLE_CITY)
    }
    /// A batch whose writes belong to `shard` (until [`Batch::then_in`] says otherwise).
    pub fn in_shard(shard: ShardId) -> Self {
        Self {
            ops: Vec::new(),
            shard,
            requires: Vec::new(),
        }
    }
    /// This batch lands only if `fence.holder` holds `fence.shard` at `fence.epoch`,
    /// unexpired, checked in the commit's transaction, which keeps that lease row locked
    /// `FOR SHARE` until it commits: a claim of that shard waits for this batch, and its
    /// claimer then reads it. Otherwise the batch is refused whole
    /// ([`StoreError::Fenced`]). For a write on one shard that a foreign shard's owner
    /// vouches for (a driver's accept on the trip's shard, docs/sharding.md §3).
    ///
    /// The batch may also write in `fence.shard` itself though this node holds no fence
    /// of it: the required lease stands for this node's own (a rider's quote deleted by a
    /// trip started on another node, docs/sharding.md §5).
    pub fn requires(mut self, fence: Fence) -> Self {
        self.requires.push(fence);
        self
    }
    /// The foreign fences this batch requires.
    pub fn required(&self) -> &[Fence] {
        &self.requires
    }
    /// The writes added after this belong to `shard`: the batch lands only if every shard
    /// it names is held.
    pub fn then_in(mut self, shard: ShardId) -> Self {
        self.shard = shard;
        self
    }
    /// This batch's writes, then `other`'s, each keeping its shard.
    pub fn append(mut self, other: Batch) -> Self {
        self.ops.extend(other.ops);
        self.requires.extend(other.requires);
        self.shard = other.shard;
        self
    }
    /// The shards this batch's writes name.
    pub fn shards(&self) -> BTreeSet<ShardId> {
        self.ops.iter().map(|(s, _)| *s).collect()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    fn push(mut self, op: Op) -> Self {
        self.ops.push((self.shard, op));
        self
    }
    pub fn driver(self, d: StoredDriver) -> Self {
        self.push(Op::Driver(d))
    }
    pub fn rider(self, r: StoredRider) -> Self {
        self.push(Op::Rider(r))
    }
    /// The trip's latest state; with `transition`, its journal entry goes first.
    pub fn trip(self, t: StoredTrip, transition: Option<Transition>) -> Self {
        let b = match transition {
            Some(transition) => self.push(Op::Journal(JournalEntry {
                transition,
                trip: t.clone(),
            })),
            None => self,
        };
        b.push(Op::Trip(t))
    }
    /// One decided transition (the engine's `Decision`): its journal record and the
    /// trip's new state, then the ledger entry its payment plan wrote, in one batch.
    pub fn decided(self, t: StoredTrip, journal: Option<Transition>, entry: Option<Entry>) -> Self {
        let b = self.trip(t, journal);
        match entry {
            Some(e) => b.ledger(e),
            None => b,
        }
    }
    pub fn quote(self, q: StoredQuote) -> Self {
        self.push(Op::Quote(q))
    }
    pub fn delete_quote(self, id: QuoteId) -> Self {
        self.push(Op::DeleteQuote(id))
    }
    pub fn pricing(self, p: StoredPricing) -> Self {
        self.push(Op::Pricing(p))
    }
    pub fn surge(self, s: StoredSurge) -> Self {
        self.push(Op::Surge(s))
    }
    /// A ledger entry; written with the trip transition that caused it.
    pub fn ledger(self, e: Entry) -> Self {
        self.push(Op::Ledger(e))
    }
    pub fn provider(self, r: ProviderRecord) -> Self {
        self.push(Op::Provider(r))
    }
}

/// Everything recovery needs, decoded and checked.
#[derive(Debug, Default)]
pub struct Loaded {
    pub drivers: Vec<StoredDriver>,
    pub riders: Vec<StoredRider>,
    /// Each trip at its newest state: the later of its snapshot and its last journal entry.
    pub trips: Vec<StoredTrip>,
    pub quotes: Vec<StoredQuote>,
    pub journal_entries: usize,
    /// Every ledger entry, trip by trip.
    pub ledger: Vec<Entry>,
}

/// One tree's records as copied by [`Store::copy_into`]: how many, and a CRC-32 over
/// every key and value in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeCopy {
    pub tree: &'static str,
    pub records: usize,
    pub crc32: u32,
}

impl TreeCopy {
    fn of(tree: Tree, rows: &[(Vec<u8>, Vec<u8>)]) -> Self {
        let mut h = crc32fast::Hasher::new();
        for (k, v) in rows {
            h.update(&(k.len() as u64).to_be_bytes());
            h.update(k);
            h.update(&(v.len() as u64).to_be_bytes());
            h.update(v);
        }
        TreeCopy {
            tree: tree.name(),
            records: rows.len(),
            crc32: h.finalize(),
        }
    }
}

/// What one group commit did, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct FlushStats {
    pub batches: usize,
    pub ops: usize,
    /// The whole group: write and fsync.
    pub flush_seconds: f64,
    /// How long the group's oldest batch waited in the queue before the group began
    /// (behind the previous group's flush, and for the writer thread to run).
    pub queue_wait_seconds: f64,
    /// Applying the group (on PostgreSQL: the whole transaction, commit included).
    pub write_seconds: f64,
    /// sled's flush and the fsync of its data file (0 on PostgreSQL).
    pub fsync_seconds: f64,
}

/// Where one awaited commit's time went, up to the writer's answer (its waiter adds the
/// wake: from `answered` until it runs again).
#[derive(Debug, Clone, Copy)]
pub struct CommitTiming {
    /// From the commit's queuing to its group's start.
    pub queued: Duration,
    /// Its group's write.
    pub write: Duration,
    /// Its group's fsync.
    pub fsync: Duration,
    /// When the writer answered.
    pub answered: Instant,
}

type Waiter = Option<oneshot::Sender<(Result<(), String>, CommitTiming)>>;

pub(crate) struct Request {
    pub(crate) batch: Batch,
    done: Waiter,
    /// When it was queued (for the group commit's queue wait).
    queued: Instant,
}

#[derive(Clone)]
struct Trees {
    drivers: sled::Tree,
    riders: sled::Tree,
    trips: sled::Tree,
    journal: sled::Tree,
    quotes: sled::Tree,
    meta: sled::Tree,
    ledger: sled::Tree,
    provider: sled::Tree,
}

/// One open sled database.
struct Handles {
    db: sled::Db,
    trees: Trees,
    /// sled's data file, for the fsync sled 0.34 does not do itself.
    data_file: std::fs::File,
}

/// The database in use, or none while a failed write's database is being reopened.
/// sled 0.34 keeps the first I/O error for good (every later operation returns it), so
/// after a write fails (a full disk, say) the writer drops the database and opens it
/// again from disk: writes answer errors until that works, and resume once it does.
type Shared = Arc<RwLock<Option<Arc<Handles>>>>;

/// Where the records live: sled in a directory, or a PostgreSQL database.
///
/// An enum, not a trait object: two backends known at compile time, no generic
/// parameter leaking into every actor, and the group commit, the codec and every
/// point read written once above the raw key-value calls the two backends answer.
enum Backend {
    Sled(Shared),
    Postgres(Arc<crate::pg::Pg>),
}

/// The open store. Cheap to share behind an `Arc`.
pub struct Store {
    dir: PathBuf,
    backend: Backend,
    faults: Arc<Faults>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

/// Injected storage faults, for tests of what the server does when its disk fails
/// (`Store::faults`). Off unless a test turns them on; nothing on the network can.
#[derive(Debug, Default)]
pub struct Faults {
    fail_writes: AtomicBool,
    fail_reads: AtomicBool,
    lose_commit_replies: std::sync::atomic::AtomicU32,
    hold_after_fence_ms: std::sync::atomic::AtomicU64,
    fail_leases: AtomicBool,
    stall_leases_ms: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// While on, every group commit fails as a full disk would, before anything is
    /// applied.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// While on, every read answers as a database out of reach would
    /// ([`StoreError::Unavailable`]), before it touches the backend.
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }

    /// The next `n` group commits commit, then answer as if the connection had been
    /// lost before the reply: the outcome is unknown to the writer (on sled: written and
    /// synced, then answered as failed).
    pub fn lose_commit_replies(&self, n: u32) {
        self.lose_commit_replies.store(n, Ordering::SeqCst);
    }

    /// Each fenced group commit waits this long between its lease check and the rest
    /// of its transaction (PostgreSQL only): a commit in flight while the lease ends.
    pub fn hold_after_fence_check(&self, d: std::time::Duration) {
        self.hold_after_fence_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// While on, every lease call (claim, renewal, release, reading the leases) answers
    /// as a database out of reach would ([`StoreError::Unavailable`]) before it is sent:
    /// a node cut off from the database while its leases run out there.
    pub fn fail_leases(&self, on: bool) {
        self.fail_leases.store(on, Ordering::SeqCst);
    }

    /// While not zero, every lease call waits this long before it is sent: a database
    /// that does not answer in time (the call then goes on as usual).
    pub fn stall_leases(&self, d: std::time::Duration) {
        self.stall_leases_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub(crate) fn held_after_fence(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.hold_after_fence_ms.load(Ordering::SeqCst))
    }

    /// Whether this group commit's reply is to be lost (and counts it down).
    pub(crate) fn take_lost_reply(&self) -> bool {
        self.lose_commit_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn failing(&self) -> bool {
        self.fail_writes.load(Ordering::SeqCst)
    }
}

/// How often a store whose database could not be reopened tries again.
pub(crate) const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// sled's page cache, in bytes.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long `open` waits for another holder of the directory's lock to let go.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Rows per query of [`Store::load_shard`].
pub const SHARD_PAGE: usize = 1_000;

/// The store format this build writes (independent of the record schema version).
pub const FORMAT: u16 = 1;

/// `journal` keys: trip id, a zero byte, version big-endian: a trip's entries are
/// contiguous and in order.
pub fn journal_key(trip: &TripId, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(trip.as_str().len() + 9);
    k.extend_from_slice(trip.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// The trees (sled) or tables (PostgreSQL) the records live in; keys are the same bytes
/// in both, and both order them bytewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Tree {
    Drivers,
    Riders,
    Trips,
    Journal,
    Quotes,
    Meta,
    Ledger,
    Provider,
}

impl Tree {
    pub(crate) const ALL: [Tree; 8] = [
        Tree::Drivers,
        Tree::Riders,
        Tree::Trips,
        Tree::Journal,
        Tree::Quotes,
        Tree::Meta,
        Tree::Ledger,
        Tree::Provider,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Tree::Drivers => "drivers",
            Tree::Riders => "riders",
            Tree::Trips => "trips",
            Tree::Journal => "journal",
            Tree::Quotes => "quotes",
            Tree::Meta => "meta",
            Tree::Ledger => "ledger",
            Tree::Provider => "provider",
        }
    }

    fn of(self, t: &Trees) -> &sled::Tree {
        match self {
            Tree::Drivers => &t.drivers,
            Tree::Riders => &t.riders,
            Tree::Trips => &t.trips,
            Tree::Journal => &t.journal,
            Tree::Quotes => &t.quotes,
            Tree::Meta => &t.meta,
            Tree::Ledger => &t.ledger,
            Tree::Provider => &t.provider,
        }
    }
}

/// A range of keys to read: from `lo` (inclusive or not) to before `hi`, at most
/// `limit` of them, newest first when `reverse`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Range {
    pub lo: Option<(Vec<u8>, bool)>,
    pub hi: Option<Vec<u8>>,
    pub limit: Option<usize>,
    pub reverse: bool,
}

impl Range {
    fn prefix(p: Vec<u8>) -> Range {
        Range {
            hi: prefix_end(&p),
            lo: Some((p, true)),
            ..Range::default()
        }
    }
}

/// The first key after every key that starts with `p` (none: no upper bound).
fn prefix_end(p: &[u8]) -> Option<Vec<u8>> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One key's write: its new value (none: delete it), the shard it belongs to and, for
/// trips, the version it holds (the PostgreSQL store never lets an older version
/// overwrite a newer one) and what a driver shard's recovery looks it up by.
pub(crate) struct KeyWrite {
    pub tree: Tree,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub version: i64,
    pub shard: ShardId,
    /// Trips only: see [`TripColumns`].
    pub trip: Option<TripColumns>,
}

/// The `trips` columns an entity shard's recovery finds a trip by: the driver it names
/// (assigned, else offered) and whether it is not final yet (migration 4), its rider
/// (migration 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TripColumns {
    pub driver: Option<String>,
    pub live: bool,
    pub rider: String,
}

/// Which column a live-trips query ([`Store::live_trips_of`],
/// [`Store::live_trips_of_riders`]) looks the trips up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NamedBy {
    /// `trips.driver`: the assigned driver, else the open offer's.
    Driver,
    /// `trips.rider`.
    Rider,
}

impl TripColumns {
    pub(crate) fn of(t: &StoredTrip) -> TripColumns {
        TripColumns {
            driver: t
                .trip
                .driver_id()
                .or(t.trip.offer().map(|o| &o.driver_id))
                .map(|d| d.as_str().to_owned()),
            live: !t.trip.state().is_final(),
            rider: t.trip.rider_id.as_str().to_owned(),
        }
    }
}

impl Op {
    pub(crate) fn key_write(&self, shard: ShardId) -> KeyWrite {
        let (tree, key, value, version) = match self {
            Op::Driver(d) => (
                Tree::Drivers,
                d.id.as_str().as_bytes().to_vec(),
                Some(codec::encode(d)),
                0,
            ),
            Op::Rider(x) => (
                Tree::Riders,
                x.id.as_str().as_bytes().to_vec(),
                Some(codec::encode(x)),
                0,
            ),
            Op::Trip(x) => (
                Tree::Trips,
                x.trip.id.as_str().as_bytes().to_vec(),
                Some(codec::encode(x)),
                i64::try_from(x.trip.version()).unwrap_or(i64::MAX),
            ),
            Op::Journal(e) => (
                Tree::Journal,
                journal_key(&e.trip.trip.id, e.transition.version),
                Some(codec::encode(e)),
                0,
            ),
            Op::Quote(q) => (
                Tree::Quotes,
                q.quote_id.as_str().as_bytes().to_vec(),
                Some(codec::encode(q)),
                0,
            ),
            Op::DeleteQuote(id) => (Tree::Quotes, id.as_str().as_bytes().to_vec(), None, 0),
            Op::Pricing(p) => (Tree::Meta, PRICING_KEY.to_vec(), Some(codec::encode(p)), 0),
            Op::Surge(x) => (Tree::Meta, SURGE_KEY.to_vec(), Some(codec::encode(x)), 0),
            Op::Ledger(e) => (Tree::Ledger, ledger_key(&e.key), Some(codec::encode(e)), 0),
            Op::Provider(r) => (
                Tree::Provider,
                r.key.as_bytes().to_vec(),
                Some(codec::encode(r)),
                0,
            ),
        };
        let trip = match self {
            Op::Trip(t) => Some(TripColumns::of(t)),
            _ => None,
        };
        KeyWrite {
            tree,
            key,
            value,
            version,
            shard,
            trip,
        }
    }
}

impl Batch {
    /// Each write as it lands, with its shard.
    pub(crate) fn key_writes(&self) -> impl Iterator<Item = KeyWrite> + '_ {
        self.ops.iter().map(|(shard, op)| op.key_write(*shard))
    }
}

pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

impl Store {
    /// Opens (or creates) the sled store in `dir`. `on_flush` is told about every group
    /// commit.
    pub fn open(
        dir: &Path,
        on_flush: impl Fn(FlushStats) + Send + 'static,
    ) -> Result<Store, StoreError> {
        let handles = open_db(dir)?;
        let shared: Shared = Arc::new(RwLock::new(Some(Arc::new(handles))));
        let faults = Arc::new(Faults::default());
        let sink = SledSink {
            shared: shared.clone(),
            faults: faults.clone(),
            dir: dir.to_owned(),
            synced: Default::default(),
        };
        Ok(Self::start(
            dir.to_owned(),
            Backend::Sled(shared),
            faults,
            sink,
            on_flush,
        ))
    }

    /// Opens the PostgreSQL store at `options.url`. Nothing is connected yet: the
    /// schema is checked and migrated by [`Store::load`] (recovery), which retries with
    /// backoff while the server is down, so the caller can answer `/readyz` meanwhile.
    pub fn open_postgres(
        options: crate::pg::PgOptions,
        on_flush: impl Fn(FlushStats) + Send + 'static,
    ) -> Result<Store, StoreError> {
        let pg = Arc::new(crate::pg::Pg::new(options)?);
        let faults = Arc::new(Faults::default());
        let sink = crate::pg::PgSink {
            pg: pg.clone(),
            faults: faults.clone(),
        };
        Ok(Self::start(
            PathBuf::from(pg.location()),
            Backend::Postgres(pg),
            faults,
            sink,
            on_flush,
        ))
    }

    fn start(
        dir: PathBuf,
        backend: Backend,
        faults: Arc<Faults>,
        sink: impl Sink,
        on_flush: impl Fn(FlushStats) + Send + 'static,
    ) -> Store {
        let (tx, rx) = mpsc::channel::<Request>();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(sink, rx, on_flush))
            .expect("spawn the store writer");
        Store {
            dir,
            backend,
            faults,
            tx: Some(tx),
            writer: Some(writer),
        }
    }

    /// The fault switches of this store (tests only).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Which backend this is: `sled` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Whether the database is open (false between a failed write and its reopening).
    pub fn is_healthy(&self) -> bool {
        match &self.backend {
            Backend::Sled(shared) => shared.read().expect("store lock").is_some(),
            Backend::Postgres(pg) => pg.problem().is_none(),
        }
    }

    /// What keeps the store from answering, if anything (for `/readyz`); never holds a
    /// password.
    pub fn problem(&self) -> Option<String> {
        match &self.backend {
            Backend::Sled(_) if self.is_healthy() => None,
            Backend::Sled(_) => Some(format!(
                "the database in {} is being reopened after a failed write",
                self.dir.display()
            )),
            Backend::Postgres(pg) => pg.problem(),
        }
    }

    /// How many calls to the database hit their time bound (PostgreSQL only).
    pub fn timeouts(&self) -> u64 {
        match &self.backend {
            Backend::Sled(_) => 0,
            Backend::Postgres(pg) => pg.timeouts(),
        }
    }

    fn handles(&self, shared: &Shared) -> Result<Arc<Handles>, StoreError> {
        shared
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| StoreError::Unavailable {
                dir: self.dir.clone(),
            })
    }

    fn postgres(&self, what: &'static str) -> Result<&crate::pg::Pg, StoreError> {
        match &self.backend {
            Backend::Postgres(pg) => Ok(pg),
            Backend::Sled(_) => Err(StoreError::Unsupported(what)),
        }
    }

    /// Claims `shard` for `holder` for `ttl` (by the database's clock) when it is free
    /// or expired, with a new, higher epoch; or returns the live lease `holder` already
    /// has. `Ok(None)`: another holder's lease is live. Of concurrent claimers of an
    /// expired lease exactly one wins. Blocking; bounded by the call timeout.
    pub fn claim_lease(
        &self,
        shard: ShardId,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<crate::Lease>, StoreError> {
        check_holder(holder)?;
        self.lease_fault()?;
        self.postgres("a shard lease")?
            .claim_lease(shard, holder, ttl)
    }

    /// Extends a live lease held by `holder` with `epoch` to `ttl` from now: `Ok(true)`;
    /// `Ok(false)` when it is lost (expired, or claimed again).
    pub fn renew_lease(
        &self,
        shard: ShardId,
        holder: &str,
        epoch: u64,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        check_holder(holder)?;
        self.lease_fault()?;
        self.postgres("a shard lease")?
            .renew_lease(shard, holder, epoch, ttl)
    }

    /// Ends the lease now if `holder` holds it with `epoch` (a clean handoff: the next
    /// claim need not wait for it to expire).
    pub fn release_lease(
        &self,
        shard: ShardId,
        holder: &str,
        epoch: u64,
    ) -> Result<(), StoreError> {
        check_holder(holder)?;
        self.lease_fault()?;
        self.postgres("a shard lease")?
            .release_lease(shard, holder, epoch)
    }

    /// Every shard's lease, as the database holds them now.
    pub fn leases(&self) -> Result<Vec<crate::Lease>, StoreError> {
        self.lease_fault()?;
        self.postgres("a shard lease")?.leases()
    }

    /// Claims each of `shards` for `holder` for `ttl`, in one statement (blocking,
    /// PostgreSQL only), as [`Store::claim_lease`] claims one: a shard free or expired
    /// gets a new, higher epoch; a shard `holder` already holds live comes back as it is;
    /// a shard another holder holds live is left out. Returns the leases `holder` has
    /// among `shards` now, in shard order. Two holders claiming overlapping sets lock
    /// the rows in the same (shard) order.
    pub fn claim_leases(
        &self,
        holder: &str,
        shards: &[ShardId],
        ttl: std::time::Duration,
    ) -> Result<Vec<crate::Lease>, StoreError> {
        check_holder(holder)?;
        self.lease_fault()?;
        self.postgres("a shard lease")?
            .claim_leases(holder, shards, ttl)
    }

    /// The distinct shards above `above` that trips are stored in, in order (blocking,
    /// PostgreSQL only): the cell shards with rows, for a cluster with no service area.
    /// One index probe per shard found; more than `limit` shards is
    /// [`StoreError::TooLarge`] (counted in [`Store::reads_too_large`]).
    pub fn trip_shards(&self, above: ShardId, limit: usize) -> Result<Vec<ShardId>, StoreError> {
        self.read_fault()?;
        self.postgres("finding the shards trips are in")?
            .trip_shards(above, limit)
    }

    /// An injected lease fault ([`Faults::fail_leases`], [`Faults::stall_leases`]), if on.
    fn lease_fault(&self) -> Result<(), StoreError> {
        let stall = self.faults.stall_leases_ms.load(Ordering::SeqCst);
        if stall > 0 {
            std::thread::sleep(std::time::Duration::from_millis(stall));
        }
        if self.faults.fail_leases.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// From now on, every batch naming `shard` lands only if its group commit finds,
    /// in its own transaction, that `holder` still holds `shard` with `epoch`, unexpired
    /// by the database's clock; otherwise that batch is refused whole
    /// ([`StoreError::Fenced`], nothing of it written). Replaces `shard`'s older fence;
    /// other shards' fences stay. The first fence turns fencing on for good: a batch
    /// naming a shard with no fence here is refused too. See [`crate::lease`].
    pub fn fence(&self, shard: ShardId, epoch: u64, holder: &str) -> Result<(), StoreError> {
        check_holder(holder)?;
        self.postgres("fencing")?.set_fence(crate::Fence {
            shard,
            epoch,
            holder: holder.to_owned(),
        });
        Ok(())
    }

    /// Drops `shard`'s fence (after a handoff or a lost lease): from now on every batch
    /// naming it is refused without asking the database. Returns the fence it had.
    pub fn unfence(&self, shard: ShardId) -> Option<crate::Fence> {
        match &self.backend {
            Backend::Postgres(pg) => pg.unset_fence(shard),
            Backend::Sled(_) => None,
        }
    }

    /// The fences commits check, one per shard held, in shard order.
    pub fn fences(&self) -> Vec<crate::Fence> {
        match &self.backend {
            Backend::Postgres(pg) => pg.fences(),
            Backend::Sled(_) => Vec::new(),
        }
    }

    /// How many batches a fence refused (each refused whole).
    pub fn fenced(&self) -> u64 {
        match &self.backend {
            Backend::Postgres(pg) => pg.fenced(),
            Backend::Sled(_) => 0,
        }
    }

    /// How many group commits were tried again after PostgreSQL ended them in a deadlock
    /// or a serialization failure (each at most a few times; then its batches fail).
    pub fn write_retries(&self) -> u64 {
        match &self.backend {
            Backend::Postgres(pg) => pg.write_retries(),
            Backend::Sled(_) => 0,
        }
    }

    /// How many batches were refused for naming `shard` (counted under the first shard
    /// a batch names that is not held).
    pub fn fenced_in(&self, shard: ShardId) -> u64 {
        match &self.backend {
            Backend::Postgres(pg) => pg.fenced_in(shard),
            Backend::Sled(_) => 0,
        }
    }

    /// The data directory (sled), or the database's address without its password.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An injected read fault ([`Faults::fail_reads`]), if on.
    fn read_fault(&self) -> Result<(), StoreError> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// One key's stored bytes.
    fn get_raw(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_fault()?;
        match &self.backend {
            Backend::Sled(shared) => {
                let h = self.handles(shared)?;
                Ok(tree
                    .of(&h.trees)
                    .get(key)
                    .map_err(|e| self.io(e))?
                    .map(|v| v.to_vec()))
            }
            Backend::Postgres(pg) => pg.get(tree, key),
        }
    }

    /// The keys and values of a range, in key order (or reversed).
    pub(crate) fn range_raw(&self, tree: Tree, r: &Range) -> Result<Rows, StoreError> {
        self.read_fault()?;
        match &self.backend {
            Backend::Sled(shared) => {
                use std::ops::Bound;
                let h = self.handles(shared)?;
                let lo = match &r.lo {
                    None => Bound::Unbounded,
                    Some((k, true)) => Bound::Included(k.clone()),
                    Some((k, false)) => Bound::Excluded(k.clone()),
                };
                let hi = match &r.hi {
                    None => Bound::Unbounded,
                    Some(k) => Bound::Excluded(k.clone()),
                };
                let iter = tree.of(&h.trees).range::<Vec<u8>, _>((lo, hi));
                let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
                    if r.reverse {
                        Box::new(iter.rev())
                    } else {
                        Box::new(iter)
                    };
                iter.take(r.limit.unwrap_or(usize::MAX))
                    .map(|kv| {
                        kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                            .map_err(|e| self.io(e))
                    })
                    .collect()
            }
            Backend::Postgres(pg) => pg.range(tree, r),
        }
    }

    fn io(&self, e: sled::Error) -> StoreError {
        StoreError::Io {
            dir: self.dir.clone(),
            source: e,
        }
    }

    /// Writes `batch` and waits until it is on disk (committed, on PostgreSQL).
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_timed(batch).await.0
    }

    /// [`Store::commit`], and where its time went (none when nothing was written).
    pub async fn commit_timed(
        &self,
        batch: Batch,
    ) -> (Result<(), StoreError>, Option<CommitTiming>) {
        if batch.is_empty() {
            return (Ok(()), None);
        }
        let (done, wait) = oneshot::channel();
        if let Err(e) = self.send(Request {
            batch,
            done: Some(done),
            queued: Instant::now(),
        }) {
            return (Err(e), None);
        }
        match wait.await {
            Ok((r, timing)) => (self.outcome(Ok(r)), Some(timing)),
            Err(e) => (self.outcome(Err(e)), None),
        }
    }

    fn outcome(
        &self,
        r: Result<Result<(), String>, oneshot::error::RecvError>,
    ) -> Result<(), StoreError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match &self.backend {
                Backend::Postgres(_) if e.starts_with(crate::lease::FENCED) => {
                    StoreError::Fenced(e[crate::lease::FENCED.len()..].to_owned())
                }
                Backend::Sled(_) => StoreError::Io {
                    dir: self.dir.clone(),
                    source: sled::Error::Unsupported(e),
                },
                Backend::Postgres(_) => StoreError::Write {
                    at: self.dir.display().to_string(),
                    reason: e,
                },
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Writes `batch` with the next group commit, without waiting for it (position
    /// snapshots, bookkeeping that a later durable write or recovery makes good).
    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.send(Request {
            batch,
            done: None,
            queued: Instant::now(),
        })
    }

    fn send(&self, r: Request) -> Result<(), StoreError> {
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(r)
            .map_err(|_| StoreError::Closed)
    }

    /// Reads and checks every record (blocking). Any record that does not decode stops
    /// here with an error that names it; nothing is written. On PostgreSQL, first waits
    /// (with backoff, bounded) for the server and applies the schema migrations.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            pg.prepare()?;
        }
        self.assemble(|tree| self.range_raw(tree, &Range::default()))
    }

    /// Everything stored under `shard` (blocking, PostgreSQL only): its drivers, riders,
    /// trips (each at its newest state, as [`Store::load`] gives them), quotes and
    /// ledger entries, decoded and checked, for the node that just claimed it
    /// (docs/sharding.md §4). Read in pages of [`SHARD_PAGE`] rows by key, each one
    /// query under the call timeout; more than `limit` records in all (journal entries
    /// included) is [`StoreError::TooLarge`], and nothing is returned.
    pub fn load_shard(&self, shard: ShardId, limit: usize) -> Result<Loaded, StoreError> {
        let pg = self.postgres("reading one shard")?;
        pg.prepare()?;
        let mut left = limit;
        self.assemble(|tree| {
            self.read_fault()?;
            let rows = pg.shard_rows(tree, shard, left).map_err(|e| match e {
                StoreError::TooLarge { what, .. } => StoreError::TooLarge { what, limit },
                e => e,
            })?;
            left -= rows.len();
            Ok(rows)
        })
    }

    /// The live (not final) trips that name one of `drivers`, as assigned driver or as
    /// the driver of their open offer (blocking, PostgreSQL only): what a driver shard's
    /// recovery reconciles its drivers against, wherever those trips' shards are. Found
    /// by `trips.driver`/`trips.live` (migration 4); rows written before it are decoded
    /// and filtered here. More than `limit` rows, or more than `limit` drivers asked, is
    /// [`StoreError::TooLarge`].
    pub fn live_trips_of(
        &self,
        drivers: &[DriverId],
        limit: usize,
    ) -> Result<Vec<StoredTrip>, StoreError> {
        let ids = drivers.iter().map(|d| d.as_str().to_owned()).collect();
        let wanted: BTreeSet<&DriverId> = drivers.iter().collect();
        self.live_trips_naming(NamedBy::Driver, ids, limit, |t| {
            let mut names = t
                .trip
                .driver_id()
                .into_iter()
                .chain(t.trip.offer().map(|o| &o.driver_id));
            names.any(|d| wanted.contains(d))
        })
    }

    /// The live (not final) trips of `riders` (blocking, PostgreSQL only): what a rider
    /// shard's recovery gives each rider as its active trip, wherever that trip's shard
    /// (and node) is. Found by `trips.rider`/`trips.live` (migration 5); rows whose rider
    /// or liveness predates it are decoded and filtered here. More than `limit` rows, or
    /// more than `limit` riders asked, is [`StoreError::TooLarge`].
    pub fn live_trips_of_riders(
        &self,
        riders: &[RiderId],
        limit: usize,
    ) -> Result<Vec<StoredTrip>, StoreError> {
        let ids = riders.iter().map(|r| r.as_str().to_owned()).collect();
        let wanted: BTreeSet<&RiderId> = riders.iter().collect();
        self.live_trips_naming(NamedBy::Rider, ids, limit, |t| {
            wanted.contains(&t.trip.rider_id)
        })
    }

    /// The rows a live-trips query by `by` returns for `ids` (bounded by `limit`),
    /// decoded, checked and kept when live and `names(trip)`: the rows whose columns are
    /// not known yet come back too and are decided here.
    fn live_trips_naming(
        &self,
        by: NamedBy,
        ids: Vec<String>,
        limit: usize,
        names: impl Fn(&StoredTrip) -> bool,
    ) -> Result<Vec<StoredTrip>, StoreError> {
        let pg = self.postgres(match by {
            NamedBy::Driver => "finding trips by driver",
            NamedBy::Rider => "finding trips by rider",
        })?;
        pg.prepare()?;
        self.read_fault()?;
        let rows = pg.live_trips(by, ids, limit)?;
        let mut out = Vec::new();
        for (k, v) in rows {
            let t: StoredTrip = self.decode(Tree::Trips.name(), &k, &v)?;
            self.check_trip("trips", &t)?;
            if !t.trip.state().is_final() && names(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Reads by shard ([`Store::load_shard`], [`Store::live_trips_of`],
    /// [`Store::live_trips_of_riders`]) refused for passing their bound, each counted once.
    pub fn reads_too_large(&self) -> u64 {
        match &self.backend {
            Backend::Postgres(pg) => pg.too_large(),
            Backend::Sled(_) => 0,
        }
    }

    /// Extends every lease `holder` holds in `held` (shard, epoch) to `ttl` from now, in
    /// one statement (blocking, PostgreSQL only); returns the shards renewed, in order.
    /// A shard missing from the answer is lost (expired, or claimed again).
    pub fn renew_leases(
        &self,
        holder: &str,
        held: &[(ShardId, u64)],
        ttl: std::time::Duration,
    ) -> Result<Vec<ShardId>, StoreError> {
        check_holder(holder)?;
        self.lease_fault()?;
        self.postgres("a shard lease")?
            .renew_leases(holder, held, ttl)
    }

    /// Decodes and checks the rows `rows` gives for each tree into what recovery needs.
    fn assemble(
        &self,
        mut rows: impl FnMut(Tree) -> Result<Rows, StoreError>,
    ) -> Result<Loaded, StoreError> {
        let mut out = Loaded {
            drivers: self.decode_rows(Tree::Drivers, rows(Tree::Drivers)?)?,
            riders: self.decode_rows(Tree::Riders, rows(Tree::Riders)?)?,
            quotes: self.decode_rows(Tree::Quotes, rows(Tree::Quotes)?)?,
            ledger: self.decode_rows(Tree::Ledger, rows(Tree::Ledger)?)?,
            ..Loaded::default()
        };
        let mut trips: HashMap<TripId, StoredTrip> = HashMap::new();
        for t in self.decode_rows::<StoredTrip>(Tree::Trips, rows(Tree::Trips)?)? {
            self.check_trip("trips", &t)?;
            trips.insert(t.trip.id.clone(), t);
        }
        // Replay: a journal entry newer than the snapshot wins (the snapshot write was
        // lost in a crash between the two).
        let mut newest: BTreeMap<TripId, StoredTrip> = BTreeMap::new();
        for e in self.decode_rows::<JournalEntry>(Tree::Journal, rows(Tree::Journal)?)? {
            out.journal_entries += 1;
            self.check_trip("journal", &e.trip)?;
            let id = e.trip.trip.id.clone();
            match newest.get(&id) {
                Some(have) if have.trip.version() >= e.trip.trip.version() => {}
                _ => {
                    newest.insert(id, e.trip);
                }
            }
        }
        for (id, j) in newest {
            match trips.get(&id) {
                Some(s) if s.trip.version() >= j.trip.version() => {}
                _ => {
                    trips.insert(id, j);
                }
            }
        }
        out.trips = trips.into_values().collect();
        Ok(out)
    }

    fn check_trip(&self, tree: &'static str, t: &StoredTrip) -> Result<(), StoreError> {
        t.trip.check_invariants().map_err(|e| StoreError::Corrupt {
            tree,
            key: t.trip.id.to_string(),
            dir: self.dir.clone(),
            source: CodecError::Malformed(format!("inconsistent trip: {e}")),
        })
    }

    fn decode_rows<T: DeserializeOwned>(
        &self,
        tree: Tree,
        rows: Rows,
    ) -> Result<Vec<T>, StoreError> {
        rows.iter()
            .map(|(k, v)| self.decode(tree.name(), k, v))
            .collect()
    }

    /// Every key and stored value of `tree` (for `migrate`), undecoded.
    pub(crate) fn dump(&self, tree: Tree) -> Result<Rows, StoreError> {
        self.range_raw(tree, &Range::default())
    }

    /// Copies every record of this (stopped) store into `to`, tree by tree, as stored
    /// bytes, then reads both back and compares counts and checksums (blocking). Each
    /// record is also decoded on the way, so a damaged one stops the copy naming it.
    pub fn copy_into(&self, to: &Store) -> Result<Vec<TreeCopy>, StoreError> {
        for s in [self, to] {
            if let Backend::Postgres(pg) = &s.backend {
                pg.prepare()?;
            }
        }
        let mut report = Vec::new();
        for tree in Tree::ALL {
            let rows = self.dump(tree)?;
            for (k, v) in &rows {
                // `meta/format` is sled's own bookkeeping, not a codec record.
                if !(tree == Tree::Meta && k.as_slice() == b"format") {
                    codec::check(v).map_err(|source| StoreError::Corrupt {
                        tree: tree.name(),
                        key: printable(k),
                        dir: self.dir.clone(),
                        source,
                    })?;
                }
            }
            let rows: Rows = rows
                .into_iter()
                .filter(|(k, _)| !(tree == Tree::Meta && k.as_slice() == b"format"))
                .collect();
            let from = TreeCopy::of(tree, &rows);
            for chunk in rows.chunks(5_000) {
                to.put_raw(tree, chunk.to_vec())?;
            }
            let landed: Rows = to
                .dump(tree)?
                .into_iter()
                .filter(|(k, _)| !(tree == Tree::Meta && k.as_slice() == b"format"))
                .collect();
            let there = TreeCopy::of(tree, &landed);
            if there != from {
                return Err(StoreError::Write {
                    at: to.dir.display().to_string(),
                    reason: format!(
                        "the copy of {} does not match: {} records (crc32 {:#010x}) read, {} (crc32 {:#010x}) found there; was the target empty?",
                        tree.name(),
                        from.records,
                        from.crc32,
                        there.records,
                        there.crc32
                    ),
                });
            }
            report.push(from);
        }
        match &to.backend {
            Backend::Sled(shared) => {
                let h = to.handles(shared)?;
                h.db.flush().map_err(|e| to.io(e))?;
                h.data_file
                    .sync_data()
                    .map_err(|e| to.io(sled::Error::Io(e)))?;
            }
            Backend::Postgres(_) => {}
        }
        Ok(report)
    }

    fn put_raw(&self, tree: Tree, rows: Rows) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(shared) => {
                let h = self.handles(shared)?;
                let t = tree.of(&h.trees);
                for (k, v) in rows {
                    t.insert(k, v).map_err(|e| self.io(e))?;
                }
                Ok(())
            }
            Backend::Postgres(pg) => pg.put_raw(tree, rows),
        }
    }

    /// One trip's latest state (blocking: call from a blocking context).
    /// The newer of its snapshot and its last journal entry, as recovery would see it
    /// (a crash can leave the entry without the snapshot that follows it).
    pub fn trip(&self, id: &TripId) -> Result<Option<StoredTrip>, StoreError> {
        let snapshot: Option<StoredTrip> = self.get(Tree::Trips, id.as_str().as_bytes())?;
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        let newest_first = Range {
            limit: Some(1),
            reverse: true,
            ..Range::prefix(prefix)
        };
        let last = match self.range_raw(Tree::Journal, &newest_first)?.first() {
            None => None,
            Some((k, v)) => {
                let e: JournalEntry = self.decode("journal", k, v)?;
                Some(e.trip)
            }
        };
        Ok(match (snapshot, last) {
            (Some(s), Some(j)) if j.trip.version() > s.trip.version() => Some(j),
            (Some(s), _) => Some(s),
            (None, j) => j,
        })
    }

    /// The pricing an operator set, if any (blocking).
    pub fn pricing(&self) -> Result<Option<StoredPricing>, StoreError> {
        self.get(Tree::Meta, PRICING_KEY)
    }

    /// Trips' snapshots in id order, starting after `after`, looking at no more than
    /// `max_scan` of them; `visit` returns false to stop early. Returns the id of the
    /// last trip looked at, and whether the tree ended (blocking).
    pub fn scan_trips(
        &self,
        after: Option<&TripId>,
        max_scan: usize,
        mut visit: impl FnMut(StoredTrip) -> bool,
    ) -> Result<(Option<TripId>, bool), StoreError> {
        let r = Range {
            lo: after.map(|id| (id.as_str().as_bytes().to_vec(), false)),
            limit: Some(max_scan.saturating_add(1)),
            ..Range::default()
        };
        let rows = self.range_raw(Tree::Trips, &r)?;
        let ended = rows.len() <= max_scan;
        let mut last = None;
        for (k, v) in rows.iter().take(max_scan) {
            let t: StoredTrip = self.decode("trips", k, v)?;
            last = Some(t.trip.id.clone());
            if !visit(t) {
                return Ok((last, false));
            }
        }
        Ok((last, ended))
    }

    /// The operator's surge pins and cap, if ever set (blocking).
    pub fn surge(&self) -> Result<Option<StoredSurge>, StoreError> {
        self.get(Tree::Meta, SURGE_KEY)
    }

    /// The decoded records of one trip's contiguous keys (`<trip>\0...`).
    fn of_trip<T: DeserializeOwned>(&self, tree: Tree, id: &TripId) -> Result<Vec<T>, StoreError> {
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        self.range_raw(tree, &Range::prefix(prefix))?
            .iter()
            .map(|(k, v)| self.decode(tree.name(), k, v))
            .collect()
    }

    /// One trip's ledger entries (blocking).
    pub fn ledger_of(&self, id: &TripId) -> Result<Vec<Entry>, StoreError> {
        self.of_trip(Tree::Ledger, id)
    }

    /// What the in-process payment provider recorded under `key` (blocking).
    pub fn provider_record(&self, key: &str) -> Result<Option<ProviderRecord>, StoreError> {
        self.get(Tree::Provider, key.as_bytes())
    }

    /// One driver (blocking).
    pub fn driver(&self, id: &DriverId) -> Result<Option<StoredDriver>, StoreError> {
        self.get(Tree::Drivers, id.as_str().as_bytes())
    }

    /// A trip's transitions in order (blocking).
    pub fn history(&self, id: &TripId) -> Result<Vec<Transition>, StoreError> {
        Ok(self
            .of_trip::<JournalEntry>(Tree::Journal, id)?
            .into_iter()
            .map(|e| e.transition)
            .collect())
    }

    fn get<T: DeserializeOwned>(&self, tree: Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get_raw(tree, key)? {
            None => Ok(None),
            Some(v) => self.decode(tree.name(), key, &v).map(Some),
        }
    }

    /// Decodes one stored value, naming the record if it cannot be read.
    fn decode<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<T, StoreError> {
        codec::decode(value).map_err(|source| StoreError::Corrupt {
            tree,
            key: printable(key),
            dir: self.dir.clone(),
            source,
        })
    }

    /// Waits for every write queued so far to be on disk.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.send(Request {
            batch: Batch::new(),
            done: Some(done),
            queued: Instant::now(),
        })?;
        self.outcome(wait.await.map(|(r, _)| r))
    }

    /// Size of the data directory's files, in bytes (0 on PostgreSQL).
    pub fn size_on_disk(&self) -> u64 {
        match &self.backend {
            Backend::Sled(shared) => self
                .handles(shared)
                .ok()
                .and_then(|h| h.db.size_on_disk().ok())
                .unwrap_or(0),
            Backend::Postgres(_) => 0,
        }
    }

    /// Stops the writer after it has written and flushed everything queued.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), StoreError> {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        match &self.backend {
            Backend::Sled(shared) => {
                let h = self.handles(shared)?;
                h.db.flush().map(|_| ()).map_err(|e| self.io(e))
            }
            Backend::Postgres(_) => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Opens sled in `dir`, waiting out a lock that a closing holder is letting go, and
/// checks the store format.
fn open_db(dir: &Path) -> Result<Handles, StoreError> {
    // No background flusher: the writer thread flushes after every group, and a
    // flusher thread would hold the directory's lock for a moment after close.
    // sled's page cache defaults to 1 GiB; the live state is served from memory by
    // the actors, so the store needs little cache of its own.
    let config = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(CACHE_BYTES);
    // A lock held by a process (or handle) that is just exiting is let go within
    // moments; one held by a running server is not, and is reported as locked.
    let deadline = Instant::now() + LOCK_WAIT;
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(StoreError::Locked {
                        dir: dir.to_owned(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => {
                return Err(StoreError::Open {
                    dir: dir.to_owned(),
                    source: e,
                });
            }
        }
    };
    let io = |e| StoreError::Io {
        dir: dir.to_owned(),
        source: e,
    };
    let trees = Trees {
        drivers: db.open_tree("drivers").map_err(io)?,
        riders: db.open_tree("riders").map_err(io)?,
        trips: db.open_tree("trips").map_err(io)?,
        journal: db.open_tree("journal").map_err(io)?,
        quotes: db.open_tree("quotes").map_err(io)?,
        meta: db.open_tree("meta").map_err(io)?,
        ledger: db.open_tree("ledger").map_err(io)?,
        provider: db.open_tree("provider").map_err(io)?,
    };
    match trees.meta.get("format").map_err(io)? {
        Some(v) => {
            let found = if v.len() == 2 {
                u16::from_be_bytes([v[0], v[1]])
            } else {
                u16::MAX
            };
            if found > FORMAT {
                return Err(StoreError::FutureFormat {
                    dir: dir.to_owned(),
                    found,
                    ours: FORMAT,
                });
            }
        }
        None => {
            trees
                .meta
                .insert("format", &FORMAT.to_be_bytes())
                .map_err(io)?;
            db.flush().map_err(io)?;
        }
    }
    // sled 0.34's flush() uses sync_file_range on Linux, which survives a process
    // crash but not a power loss; the writer also fsyncs sled's data file.
    let data_file = std::fs::File::open(dir.join("db")).map_err(|e| StoreError::Open {
        dir: dir.to_owned(),
        source: sled::Error::Io(e),
    })?;
    Ok(Handles {
        db,
        trees,
        data_file,
    })
}

fn check_holder(holder: &str) -> Result<(), StoreError> {
    if holder.is_empty() || holder.len() > crate::lease::MAX_HOLDER {
        return Err(StoreError::Write {
            at: "dispatch_leases".to_owned(),
            reason: format!(
                "a lease holder is a node name of 1 to {} bytes",
                crate::lease::MAX_HOLDER
            ),
        });
    }
    Ok(())
}

fn printable(k: &[u8]) -> String {
    k.iter()
        .flat_map(|b| {
            if b.is_ascii_graphic() {
                vec![*b as char]
            } else {
                format!("\\x{b:02x}").chars().collect()
            }
        })
        .collect()
}

/// What the writer thread writes to: sled or PostgreSQL.
pub(crate) trait Sink: Send + 'static {
    /// Whether writes can go through now.
    fn healthy(&self) -> bool;
    /// Called while unhealthy, between groups and at least every [`REOPEN_EVERY`].
    fn recover(&self);
    /// Applies the batches of the group, in order, durably and all together; one outcome
    /// per batch (a fenced store may refuse some and write the others).
    fn apply(&self, group: &[Request]) -> Vec<Result<(), String>>;
    /// The time the last `apply` spent making the group durable after writing it (an
    /// fsync; 0 where the write and the sync are one call).
    fn last_sync(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

struct SledSink {
    shared: Shared,
    faults: Arc<Faults>,
    dir: PathBuf,
    /// The last group's flush and fsync.
    synced: std::cell::Cell<std::time::Duration>,
}

impl Sink for SledSink {
    fn healthy(&self) -> bool {
        self.shared.read().expect("store lock").is_some()
    }

    fn recover(&self) {
        reopen(&self.shared, &self.dir);
    }

    fn last_sync(&self) -> std::time::Duration {
        self.synced.get()
    }

    fn apply(&self, group: &[Request]) -> Vec<Result<(), String>> {
        let handles = self.shared.read().expect("store lock").clone();
        let result = match &handles {
            None => Err("the database could not be reopened after a failed write".to_owned()),
            Some(_) if self.faults.failing() => {
                Err("injected fault: no space left on device".to_owned())
            }
            Some(h) => apply(&h.trees, group)
                .and_then(|()| {
                    let syncing = Instant::now();
                    let synced =
                        h.db.flush()
                            .and_then(|_| h.data_file.sync_data().map_err(sled::Error::Io));
                    self.synced.set(syncing.elapsed());
                    synced
                })
                .map_err(|e| e.to_string())
                .and_then(|()| match self.faults.take_lost_reply() {
                    // Durable on disk, but the writer is told otherwise.
                    true => Err("injected fault: the commit's outcome was lost".to_owned()),
                    false => Ok(()),
                }),
        };
        if result.is_err()
            && let Some(h) = handles
        {
            // What failed may be applied in memory though not on disk, and sled
            // would answer every later call with this error: start again from disk.
            *self.shared.write().expect("store lock") = None;
            drop(h);
            reopen(&self.shared, &self.dir);
        }
        vec![result; group.len()]
    }
}

fn write_loop(sink: impl Sink, rx: mpsc::Receiver<Request>, on_flush: impl Fn(FlushStats)) {
    loop {
        let healthy = sink.healthy();
        let first = if healthy {
            match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(REOPEN_EVERY) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    sink.recover();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        // Everything that arrived while the last flush ran joins this one.
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        if !healthy {
            sink.recover();
        }
        let started = Instant::now();
        let oldest = group.iter().map(|r| r.queued).min().unwrap_or(started);
        let ops: usize = group.iter().map(|r| r.batch.len()).sum();
        let results = sink.apply(&group);
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            tracing::error!(error = %e, "store write failed");
        }
        let flush = started.elapsed();
        let fsync = sink.last_sync().min(flush);
        on_flush(FlushStats {
            batches: group.len(),
            ops,
            flush_seconds: flush.as_secs_f64(),
            queue_wait_seconds: started.saturating_duration_since(oldest).as_secs_f64(),
            write_seconds: (flush - fsync).as_secs_f64(),
            fsync_seconds: fsync.as_secs_f64(),
        });
        for (r, result) in group.into_iter().zip(results) {
            if let Some(done) = r.done {
                let timing = CommitTiming {
                    queued: started.saturating_duration_since(r.queued),
                    write: flush - fsync,
                    fsync,
                    answered: Instant::now(),
                };
                let _ = done.send((result, timing));
            }
        }
    }
}

/// Opens the database again after a failed write; on failure it stays closed and the
/// writer tries again later.
fn reopen(shared: &Shared, dir: &Path) {
    match open_db(dir) {
        Ok(h) => {
            *shared.write().expect("store lock") = Some(Arc::new(h));
            tracing::warn!(dir = %dir.display(), "store reopened; writes resume");
        }
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "store still cannot be reopened");
        }
    }
}

fn apply(t: &Trees, group: &[Request]) -> sled::Result<()> {
    for r in group {
        for w in r.batch.key_writes() {
            let tree = w.tree.of(t);
            match w.value {
                Some(v) => tree.insert(w.key, v)?,
                None => tree.remove(w.key)?,
            };
        }
    }
    Ok(())
}
