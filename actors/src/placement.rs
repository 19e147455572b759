//! Where each shard's actors live (issue 16, stage 5 of `docs/sharding.md`): a shard map
//! answering, for a shard, [`Place::Local`], [`Place::Remote`]`(node)` or [`Place::Nobody`],
//! replaced whole as the shard map changes (the shard controller feeds it; tests set it by
//! hand with `System::set_placement`), and the [`Link`] that carries a message to another
//! node's router (the router's `Remote`, set by `System::start_router`).
//!
//! Only sharded mode with a placement set and a router started routes anything: single
//! node, and sharded without a placement, resolve every entity locally, as before.
//!
//! Reads are the hot path (every search's cells, every offer): one `RwLock` read to clone
//! an `Arc` of the current map (an `ArcSwap`-like pattern with std types); a swap takes
//! the write lock only to replace the `Arc`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use dispatch_engine::shard::{ShardId, is_entity_shard};
use dispatch_engine::{CellId, DriverId, RiderId, TripId};

use ractor::RpcReplyPort;

use crate::error::ApiError;
use crate::messages::{CellMsg, DriverMsg, NewTrip, RiderMsg, TripMsg};

/// Where a shard's actors live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this node.
    Local,
    /// On this node of the cluster (its router takes the messages).
    Remote(Arc<str>),
    /// No node holds it now (between owners): asked locally, where nothing runs for it.
    Nobody,
}

/// One shard map: the place of each shard it names; a shard it does not name is
/// [`Place::Nobody`]'s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap(HashMap<ShardId, Place>);

impl ShardMap {
    pub fn new(places: impl IntoIterator<Item = (ShardId, Place)>) -> Self {
        Self(places.into_iter().collect())
    }

    pub fn place(&self, shard: ShardId) -> Place {
        self.0.get(&shard).cloned().unwrap_or(Place::Nobody)
    }

    /// The entity shards this map places on another node and `next` does not place
    /// there any more (`None`: every entity local): their drivers left that node, killed
    /// or handed off.
    pub fn left_their_node(&self, next: Option<&ShardMap>) -> HashSet<ShardId> {
        (self.0.iter())
            .filter(|(s, p)| {
                matches!(p, Place::Remote(_))
                    && is_entity_shard(**s)
                    && next.is_none_or(|n| n.place(**s) != **p)
            })
            .map(|(s, _)| *s)
            .collect()
    }
}

/// Carries a local message to its entity on another node, through that node's router.
/// `false`: not sent (no route, too large, the link refused it; counted by the link). A
/// call's reply reaches the message's own reply port, or the port is dropped (no answer).
pub trait Link: Send + Sync {
    fn cell(&self, node: &str, cell: CellId, m: CellMsg, timeout: Option<Duration>) -> bool;
    fn driver(&self, node: &str, id: DriverId, m: DriverMsg) -> bool;
    fn rider(&self, node: &str, id: RiderId, m: RiderMsg) -> bool;
    fn trip(&self, node: &str, id: TripId, m: TripMsg) -> bool;
    /// Asks `node`'s router to start a new trip there (a call bounded by
    /// `actor_call_timeout_ms`); `reply` gets whether it started, or is dropped (no answer).
    fn spawn_trip(
        &self,
        node: &str,
        new: NewTrip,
        reply: RpcReplyPort<Result<(), ApiError>>,
    ) -> bool;
}

/// The current shard map (none until set) and the link to other nodes (none until the
/// router starts).
#[derive(Default)]
pub struct Placement {
    map: RwLock<Option<Arc<ShardMap>>>,
    link: OnceLock<Arc<dyn Link>>,
}

impl Placement {
    /// Replaces the shard map whole (`None`: every entity local again).
    pub fn set(&self, map: Option<ShardMap>) {
        let map = map.map(Arc::new);
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// The current map (a cheap read: one `Arc` clone).
    pub fn current(&self) -> Option<Arc<ShardMap>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the link once (the router's); later calls are ignored.
    pub fn set_link(&self, link: Arc<dyn Link>) {
        let _ = self.link.set(link);
    }

    /// The node `shard` lives on when that is another node reachable by the link: a
    /// shard map is set, it places the shard remotely, and a router runs here.
    pub fn remote(&self, shard: ShardId) -> Option<(Arc<str>, &Arc<dyn Link>)> {
        match self.place(shard)? {
            (Place::Remote(node), link) => Some((node, link)),
            (Place::Local | Place::Nobody, _) => None,
        }
    }

    /// Where `shard` lives and the link to it, when a shard map is set and a router runs
    /// here; `None`: nothing is routed (every entity local, as before stage 5).
    pub fn place(&self, shard: ShardId) -> Option<(Place, &Arc<dyn Link>)> {
        let link = self.link.get()?;
        Some((self.current()?.place(shard), link))
    }
}
