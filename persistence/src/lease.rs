//! Shard leases and fencing (issue 16), PostgreSQL only.
//!
//! A lease says which node owns a shard until when. It lives in the shared database
//! (`dispatch_leases`), and its expiry is by the database's clock, the only clock every
//! node shares. Each new claim raises the shard's `epoch`, the fencing token: a node
//! that claimed (shard, epoch) calls [`Store::fence`](crate::Store::fence), and from
//! then on every group commit it makes checks, inside its own transaction, that it
//! still holds that epoch unexpired, taking the lease row `FOR SHARE`. A claim has to
//! lock that row to raise the epoch, so it waits for a commit in flight: a write lands
//! before the next owner's claim (whose recovery then reads it) or is refused whole
//! with [`StoreError::Fenced`](crate::StoreError::Fenced). A paused or cut-off node can
//! therefore never write over its successor, whatever its own clock says.
//!
//! The node still has to stop serving on its own before its lease ends (a deadline from
//! the instant it sent its last successful renewal): fencing makes its late writes
//! harmless; the deadline keeps it from answering clients after it lost the shard.
//!
//! **Several shards per node** (issue 16, stage 1 of `docs/sharding.md`): a store holds
//! one fence per shard it owns ([`Store::fence`](crate::Store::fence) per shard,
//! [`Store::unfence`](crate::Store::unfence) on handoff), and every write names its shard
//! ([`Batch::in_shard`](crate::Batch::in_shard)). A group commit checks, in its one
//! transaction and one query ([`CHECK`]), every shard its writes name; a batch naming a
//! shard whose lease this node no longer holds at that epoch, or whose fence it never
//! had, is refused whole, and the group's other batches still commit. Once fenced, a
//! store never writes unchecked again, even with no fence left.

use std::time::Duration;

pub use dispatch_engine::shard::ShardId;

/// The shard of the whole city: the one shard of a single leader (today's cluster mode)
/// and of every write that names none ([`Batch::new`](crate::Batch::new)). No H3 cell
/// index is 0, so it never collides with a shard of [`dispatch_engine::shard::shard_of`].
pub const WHOLE_CITY: ShardId = 0;

/// One shard's lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: ShardId,
    /// The fencing token: raised by every new claim.
    pub epoch: u64,
    pub holder: String,
    /// Time left by the database's clock when it was read (zero when expired).
    pub remaining: Duration,
}

/// What a fenced store's commits check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub shard: ShardId,
    pub epoch: u64,
    pub holder: String,
}

/// The prefix of a commit's failure that means "refused by the fence".
pub(crate) const FENCED: &str = "fenced: ";

/// Longest holder name accepted (it is a node name).
pub const MAX_HOLDER: usize = 253;

/// A claim: a new epoch when the lease is free or expired, nothing when another's
/// lease is live. `ON CONFLICT DO UPDATE` locks the row and re-checks the `WHERE` on
/// its newest version, so of concurrent claimers exactly one wins.
pub(crate) const CLAIM: &str = "\
INSERT INTO dispatch_leases (shard, epoch, holder, expires_at, claimed_at) \
VALUES ($1, 1, $2, clock_timestamp() + $3::int8 * interval '1 millisecond', clock_timestamp()) \
ON CONFLICT (shard) DO UPDATE SET epoch = dispatch_leases.epoch + 1, holder = excluded.holder, \
expires_at = excluded.expires_at, claimed_at = excluded.claimed_at \
WHERE dispatch_leases.expires_at <= clock_timestamp() \
RETURNING epoch, holder, greatest(0, (extract(epoch from expires_at - clock_timestamp()) * 1000))::int8";

/// One shard's lease now.
pub(crate) const READ: &str = "\
SELECT shard, epoch, holder, greatest(0, (extract(epoch from expires_at - clock_timestamp()) * 1000))::int8 \
FROM dispatch_leases WHERE shard = $1";

/// Every lease.
pub(crate) const ALL: &str = "\
SELECT shard, epoch, holder, greatest(0, (extract(epoch from expires_at - clock_timestamp()) * 1000))::int8 \
FROM dispatch_leases ORDER BY shard";

/// A renewal: only the holder of that epoch, only while it is live.
pub(crate) const RENEW: &str = "\
UPDATE dispatch_leases SET expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond' \
WHERE shard = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()";

/// A release: the lease ends now (a clean handoff), only by its holder.
pub(crate) const RELEASE: &str = "\
UPDATE dispatch_leases SET expires_at = clock_timestamp() \
WHERE shard = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()";

/// Every renewal of one holder in one statement: of the (shard, epoch) pairs given as
/// two arrays, those it still holds live are extended; returns the shards renewed.
///
/// The rows are locked first, in shard order (`o`), as [`CHECK`] and [`CLAIM_ALL`] lock
/// them: an `UPDATE … FROM unnest` locks them in the order of its plan (the heap's, where
/// a claimed row's new version lands at the end), so a renewal and a commit's check over
/// two of the same leases could each hold one the other waits for (a deadlock).
pub(crate) const RENEW_ALL: &str = "\
WITH o AS (SELECT l.shard FROM dispatch_leases l \
JOIN unnest($2::int8[], $3::int8[]) AS f(shard, epoch) ON l.shard = f.shard AND l.epoch = f.epoch \
WHERE l.holder = $1 AND l.expires_at > clock_timestamp() ORDER BY l.shard FOR UPDATE OF l) \
UPDATE dispatch_leases l SET expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond' \
FROM o WHERE l.shard = o.shard AND l.expires_at > clock_timestamp() \
RETURNING l.shard";

/// Many claims of one holder in one statement (`Store::claim_leases`): each of the shards
/// given (deduplicated, taken in shard order so two claimers lock rows in the same order)
/// gets a new epoch when its lease is free or expired, as [`CLAIM`] does one; a shard
/// whose lease this holder already holds live is returned as it is (its own lease back).
/// Returns (shard, epoch, holder, remaining ms) of both kinds.
pub(crate) const CLAIM_ALL: &str = "\
WITH f AS (SELECT DISTINCT unnest($2::int8[]) AS shard), \
c AS (INSERT INTO dispatch_leases (shard, epoch, holder, expires_at, claimed_at) \
SELECT shard, 1, $1, clock_timestamp() + $3::int8 * interval '1 millisecond', clock_timestamp() FROM f ORDER BY shard \
ON CONFLICT (shard) DO UPDATE SET epoch = dispatch_leases.epoch + 1, holder = excluded.holder, \
expires_at = excluded.expires_at, claimed_at = excluded.claimed_at \
WHERE dispatch_leases.expires_at <= clock_timestamp() \
RETURNING shard, epoch, holder, greatest(0, (extract(epoch from expires_at - clock_timestamp()) * 1000))::int8 AS ms) \
SELECT shard, epoch, holder, ms FROM c \
UNION ALL \
SELECT l.shard, l.epoch, l.holder, greatest(0, (extract(epoch from l.expires_at - clock_timestamp()) * 1000))::int8 \
FROM dispatch_leases l JOIN f ON l.shard = f.shard \
WHERE l.holder = $1 AND l.expires_at > clock_timestamp() AND l.shard NOT IN (SELECT shard FROM c)";

/// The distinct shards above `$1` that `trips` has rows in, in order, at most `$2`: a
/// loose index scan over `trips_shard` (one index probe per shard found, however many
/// trips each has), for a controller that has no `--service-area`.
pub(crate) const TRIP_SHARDS: &str = "\
WITH RECURSIVE s(shard) AS ( \
(SELECT shard FROM trips WHERE shard > $1 ORDER BY shard LIMIT 1) \
UNION ALL \
SELECT (SELECT t.shard FROM trips t WHERE t.shard > s.shard ORDER BY t.shard LIMIT 1) FROM s WHERE s.shard IS NOT NULL) \
SELECT shard FROM s WHERE shard IS NOT NULL LIMIT $2";

/// The check at the start of a fenced commit's transaction: of the (shard, holder,
/// epoch) fences given as three arrays (this node's own, and the foreign ones a batch
/// requires, [`Batch::requires`](crate::Batch::requires)), those whose lease is still
/// that holder's at that epoch, unexpired. Their rows stay locked `FOR SHARE` until the commit, so a claim
/// of any of them waits for it; a row a claim changed meanwhile is re-checked on its new
/// version (and drops out).
pub(crate) const CHECK: &str = "\
SELECT l.shard, l.holder, l.epoch FROM dispatch_leases l \
JOIN unnest($1::int8[], $2::text[], $3::int8[]) AS f(shard, holder, epoch) \
ON l.shard = f.shard AND l.holder = f.holder AND l.epoch = f.epoch \
WHERE l.expires_at > clock_timestamp() ORDER BY l.shard FOR SHARE OF l";

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A shard id as the `bigint` column holds it. H3 indexes leave the top bit clear, so
/// every shard id of [`dispatch_engine::shard::shard_of`] maps one to one.
pub(crate) fn column(shard: ShardId) -> i64 {
    shard as i64
}

pub(crate) fn lease(shard: i64, epoch: i64, holder: String, remaining_ms: i64) -> Lease {
    Lease {
        shard: shard as ShardId,
        epoch: epoch as u64,
        holder,
        remaining: Duration::from_millis(remaining_ms.max(0) as u64),
    }
}
