//! `dispatch-persistence`: the sled store of `dispatchd`.
//!
//! Trees: `drivers`, `riders`, `trips` (latest state), `journal` (one entry per trip
//! transition, keyed by trip and version, carrying the whole trip after it), `quotes`,
//! `meta` (the operator's pricing and surge settings), `ledger` (the engine's entries,
//! keyed `<trip>\0<step>`) and `provider` (the in-process payment provider's answers, by
//! idempotency key). Every value goes through
//! [`codec`] (schema version, checksum, bincode). [`Store`] writes through one thread
//! with group commit and loads everything back for recovery, refusing any record it
//! cannot read.
//!
//! [`pg`] is the same store on PostgreSQL (`--store postgres`): one table per tree, the
//! same keys and codec records, group commit as one transaction.
//!
//! It knows the engine's types, sled and PostgreSQL; it must not know actors, sockets or JSON.

pub mod codec;
pub mod lease;
pub mod pg;
pub mod records;
pub mod store;

pub use codec::{CodecError, SCHEMA_VERSION};
pub use lease::{Fence, Lease, ShardId, WHOLE_CITY};
pub use pg::{PgOptions, redact};
pub use records::{
    JournalEntry, ProviderRecord, StoredDriver, StoredPricing, StoredQuote, StoredRider,
    StoredSurge, StoredTrip, Transition,
};
pub use store::{
    Batch, CommitTiming, FlushStats, Loaded, Store, StoreError, TreeCopy, journal_key, ledger_key,
};
