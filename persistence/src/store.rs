//! The sled store and its group commit.
//!
//! One writer thread owns every write. It takes all the batches that arrived while the
//! previous flush ran, applies them in arrival order, flushes once, and only then
//! answers each waiter: one fsync covers many acknowledgements, and nobody is told a
//! write succeeded before it is on disk. sled recovers a prefix of the writes after a
//! crash, so a journal entry written before its snapshot is never lost while the
//! snapshot survives.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use dispatch_engine::{DriverId, Entry, EntryKey, QuoteId, TripId};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use crate::codec::{self, CodecError};
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
}

/// Writes that must land together, in this order.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
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
    pub fn new() -> Self {
        Self::default()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn driver(mut self, d: StoredDriver) -> Self {
        self.ops.push(Op::Driver(d));
        self
    }
    pub fn rider(mut self, r: StoredRider) -> Self {
        self.ops.push(Op::Rider(r));
        self
    }
    /// The trip's latest state; with `transition`, its journal entry goes first.
    pub fn trip(mut self, t: StoredTrip, transition: Option<Transition>) -> Self {
        if let Some(transition) = transition {
            self.ops.push(Op::Journal(JournalEntry {
                transition,
                trip: t.clone(),
            }));
        }
        self.ops.push(Op::Trip(t));
        self
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
    pub fn quote(mut self, q: StoredQuote) -> Self {
        self.ops.push(Op::Quote(q));
        self
    }
    pub fn delete_quote(mut self, id: QuoteId) -> Self {
        self.ops.push(Op::DeleteQuote(id));
        self
    }
    pub fn pricing(mut self, p: StoredPricing) -> Self {
        self.ops.push(Op::Pricing(p));
        self
    }
    pub fn surge(mut self, s: StoredSurge) -> Self {
        self.ops.push(Op::Surge(s));
        self
    }
    /// A ledger entry; written with the trip transition that caused it.
    pub fn ledger(mut self, e: Entry) -> Self {
        self.ops.push(Op::Ledger(e));
        self
    }
    pub fn provider(mut self, r: ProviderRecord) -> Self {
        self.ops.push(Op::Provider(r));
        self
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

/// What one group commit did, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct FlushStats {
    pub batches: usize,
    pub ops: usize,
    pub flush_seconds: f64,
}

type Waiter = Option<oneshot::Sender<Result<(), String>>>;

struct Request {
    batch: Batch,
    done: Waiter,
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

/// The open store. Cheap to share behind an `Arc`.
pub struct Store {
    dir: PathBuf,
    shared: Shared,
    faults: Arc<Faults>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

/// Injected storage faults, for tests of what the server does when its disk fails
/// (`Store::faults`). Off unless a test turns them on; nothing on the network can.
#[derive(Debug, Default)]
pub struct Faults {
    fail_writes: AtomicBool,
}

impl Faults {
    /// While on, every group commit fails as a full disk would, before anything is
    /// applied.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
}

/// How often a store whose database could not be reopened tries again.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// sled's page cache, in bytes.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long `open` waits for another holder of the directory's lock to let go.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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

impl Store {
    /// Opens (or creates) the store in `dir`. `on_flush` is told about every group commit.
    pub fn open(
        dir: &Path,
        on_flush: impl Fn(FlushStats) + Send + 'static,
    ) -> Result<Store, StoreError> {
        let handles = open_db(dir)?;
        let shared: Shared = Arc::new(RwLock::new(Some(Arc::new(handles))));
        let faults = Arc::new(Faults::default());
        let (tx, rx) = mpsc::channel::<Request>();
        let writer = {
            let shared = shared.clone();
            let faults = faults.clone();
            let dir = dir.to_owned();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || write_loop(shared, faults, dir, rx, on_flush))
                .expect("spawn the store writer")
        };
        Ok(Store {
            dir: dir.to_owned(),
            shared,
            faults,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// The fault switches of this store (tests only).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Whether the database is open (false between a failed write and its reopening).
    pub fn is_healthy(&self) -> bool {
        self.shared.read().expect("store lock").is_some()
    }

    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        self.shared
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| StoreError::Unavailable {
                dir: self.dir.clone(),
            })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `batch` and waits until it is on disk.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.send(Request {
            batch,
            done: Some(done),
        })?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Io {
                dir: self.dir.clone(),
                source: sled::Error::Unsupported(e),
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
        self.send(Request { batch, done: None })
    }

    fn send(&self, r: Request) -> Result<(), StoreError> {
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(r)
            .map_err(|_| StoreError::Closed)
    }

    /// Reads and checks every record. Any record that does not decode stops here with
    /// an error that names it; nothing is written.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let h = self.handles()?;
        let mut out = Loaded {
            drivers: self.load_tree("drivers", &h.trees.drivers)?,
            riders: self.load_tree("riders", &h.trees.riders)?,
            quotes: self.load_tree("quotes", &h.trees.quotes)?,
            ledger: self.load_tree("ledger", &h.trees.ledger)?,
            ..Loaded::default()
        };
        let mut trips: HashMap<TripId, StoredTrip> = HashMap::new();
        for t in self.load_tree::<StoredTrip>("trips", &h.trees.trips)? {
            self.check_trip("trips", &t)?;
            trips.insert(t.trip.id.clone(), t);
        }
        // Replay: a journal entry newer than the snapshot wins (the snapshot write was
        // lost in a crash between the two).
        let mut newest: BTreeMap<TripId, StoredTrip> = BTreeMap::new();
        for e in self.load_tree::<JournalEntry>("journal", &h.trees.journal)? {
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

    fn load_tree<T: DeserializeOwned>(
        &self,
        name: &'static str,
        tree: &sled::Tree,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::with_capacity(tree.len());
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| StoreError::Io {
                dir: self.dir.clone(),
                source: e,
            })?;
            let value = self.decode(name, &k, &v)?;
            out.push(value);
        }
        Ok(out)
    }

    /// One trip's latest state (blocking: call from a blocking context).
    /// The newer of its snapshot and its last journal entry, as recovery would see it
    /// (a crash can leave the entry without the snapshot that follows it).
    pub fn trip(&self, id: &TripId) -> Result<Option<StoredTrip>, StoreError> {
        let h = self.handles()?;
        let snapshot: Option<StoredTrip> =
            self.get("trips", &h.trees.trips, id.as_str().as_bytes())?;
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        let last = match h.trees.journal.scan_prefix(&prefix).next_back() {
            None => None,
            Some(kv) => {
                let (k, v) = kv.map_err(|e| StoreError::Io {
                    dir: self.dir.clone(),
                    source: e,
                })?;
                let e: JournalEntry = self.decode("journal", &k, &v)?;
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
        let h = self.handles()?;
        self.get("meta", &h.trees.meta, PRICING_KEY)
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
        let h = self.handles()?;
        use std::ops::Bound;
        let start = match after {
            Some(id) => Bound::Excluded(id.as_str().as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut last = None;
        let mut iter = h.trees.trips.range::<Vec<u8>, _>((start, Bound::Unbounded));
        for _ in 0..max_scan {
            let Some(kv) = iter.next() else {
                return Ok((last, true));
            };
            let (k, v) = kv.map_err(|e| StoreError::Io {
                dir: self.dir.clone(),
                source: e,
            })?;
            let t: StoredTrip = self.decode("trips", &k, &v)?;
            last = Some(t.trip.id.clone());
            if !visit(t) {
                return Ok((last, false));
            }
        }
        let ended = iter.next().is_none();
        Ok((last, ended))
    }

    /// The operator's surge pins and cap, if ever set (blocking).
    pub fn surge(&self) -> Result<Option<StoredSurge>, StoreError> {
        let h = self.handles()?;
        self.get("meta", &h.trees.meta, SURGE_KEY)
    }

    /// One trip's ledger entries (blocking).
    pub fn ledger_of(&self, id: &TripId) -> Result<Vec<Entry>, StoreError> {
        let h = self.handles()?;
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in h.trees.ledger.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| StoreError::Io {
                dir: self.dir.clone(),
                source: e,
            })?;
            out.push(self.decode("ledger", &k, &v)?);
        }
        Ok(out)
    }

    /// What the in-process payment provider recorded under `key` (blocking).
    pub fn provider_record(&self, key: &str) -> Result<Option<ProviderRecord>, StoreError> {
        let h = self.handles()?;
        self.get("provider", &h.trees.provider, key.as_bytes())
    }

    /// One driver (blocking).
    pub fn driver(&self, id: &DriverId) -> Result<Option<StoredDriver>, StoreError> {
        let h = self.handles()?;
        self.get("drivers", &h.trees.drivers, id.as_str().as_bytes())
    }

    /// A trip's transitions in order (blocking).
    pub fn history(&self, id: &TripId) -> Result<Vec<Transition>, StoreError> {
        let h = self.handles()?;
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in h.trees.journal.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| StoreError::Io {
                dir: self.dir.clone(),
                source: e,
            })?;
            let e: JournalEntry = self.decode("journal", &k, &v)?;
            out.push(e.transition);
        }
        Ok(out)
    }

    fn get<T: DeserializeOwned>(
        &self,
        name: &'static str,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match tree.get(key).map_err(|e| StoreError::Io {
            dir: self.dir.clone(),
            source: e,
        })? {
            None => Ok(None),
            Some(v) => self.decode(name, key, &v).map(Some),
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
        })?;
        wait.await
            .map_err(|_| StoreError::Closed)?
            .map_err(|e| StoreError::Io {
                dir: self.dir.clone(),
                source: sled::Error::Unsupported(e),
            })
    }

    /// Size of the data directory's files, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.handles()
            .ok()
            .and_then(|h| h.db.size_on_disk().ok())
            .unwrap_or(0)
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
        let h = self.handles()?;
        h.db.flush().map(|_| ()).map_err(|e| StoreError::Io {
            dir: self.dir.clone(),
            source: e,
        })
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

fn write_loop(
    shared: Shared,
    faults: Arc<Faults>,
    dir: PathBuf,
    rx: mpsc::Receiver<Request>,
    on_flush: impl Fn(FlushStats),
) {
    loop {
        let healthy = shared.read().expect("store lock").is_some();
        let first = if healthy {
            match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(REOPEN_EVERY) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    reopen(&shared, &dir);
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
            reopen(&shared, &dir);
        }
        let started = Instant::now();
        let ops: usize = group.iter().map(|r| r.batch.len()).sum();
        let handles = shared.read().expect("store lock").clone();
        let result = match &handles {
            None => Err("the database could not be reopened after a failed write".to_owned()),
            Some(_) if faults.fail_writes.load(Ordering::SeqCst) => {
                Err("injected fault: no space left on device".to_owned())
            }
            Some(h) => apply(&h.trees, &group)
                .and_then(|()| h.db.flush().map(|_| ()))
                .and_then(|()| h.data_file.sync_data().map_err(sled::Error::Io))
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = &result {
            tracing::error!(dir = %dir.display(), error = %e, "store write failed");
            if let Some(h) = handles {
                // What failed may be applied in memory though not on disk, and sled
                // would answer every later call with this error: start again from disk.
                *shared.write().expect("store lock") = None;
                drop(h);
                reopen(&shared, &dir);
            }
        }
        on_flush(FlushStats {
            batches: group.len(),
            ops,
            flush_seconds: started.elapsed().as_secs_f64(),
        });
        for r in group {
            if let Some(done) = r.done {
                let _ = done.send(result.clone());
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
        for op in &r.batch.ops {
            match op {
                Op::Driver(d) => {
                    t.drivers
                        .insert(d.id.as_str().as_bytes(), codec::encode(d))?;
                }
                Op::Rider(x) => {
                    t.riders
                        .insert(x.id.as_str().as_bytes(), codec::encode(x))?;
                }
                Op::Trip(x) => {
                    t.trips
                        .insert(x.trip.id.as_str().as_bytes(), codec::encode(x))?;
                }
                Op::Journal(e) => {
                    t.journal.insert(
                        journal_key(&e.trip.trip.id, e.transition.version),
                        codec::encode(e),
                    )?;
                }
                Op::Quote(q) => {
                    t.quotes
                        .insert(q.quote_id.as_str().as_bytes(), codec::encode(q))?;
                }
                Op::DeleteQuote(id) => {
                    t.quotes.remove(id.as_str().as_bytes())?;
                }
                Op::Pricing(p) => {
                    t.meta.insert(PRICING_KEY, codec::encode(p))?;
                }
                Op::Surge(x) => {
                    t.meta.insert(SURGE_KEY, codec::encode(x))?;
                }
                Op::Ledger(e) => {
                    t.ledger.insert(ledger_key(&e.key), codec::encode(e))?;
                }
                Op::Provider(r) => {
                    t.provider.insert(r.key.as_bytes(), codec::encode(r))?;
                }
            }
        }
    }
    Ok(())
}
