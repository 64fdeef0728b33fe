//! Peering and recovery of placement groups.
//!
//! - [`plan`]: pure planning: from what each member holds, what to copy
//!   where ([`RecoveryPlan`]), and the version rule for the primary's next
//!   writes ([`next_version_after`]).
//! - The daemon's `recovery` module carries plans out over the data plane.
//!
//! Shape, and what was rejected: every object carries the version of its
//! last change and every write is acknowledged only when all members have it,
//! so the newest version on any reachable member is authoritative and a PG
//! can be settled by comparing per-object versions, without a persisted PG
//! log. That costs a listing of the PG per member on each interval change
//! (cheap at our object counts: one RocksDB prefix scan) and cannot tell a
//! deleted object from a missing one; volumes only ever discard (which keeps a
//! versioned entry), so nothing deleted can be resurrected today. Ceph's PG
//! log (replay the last N operations instead of comparing listings) is the
//! optimisation for large PGs and is left for later.

pub mod plan;

pub use plan::{Copy, Inventory, RecoveryPlan};

/// Returns the primary's version counter after peering: above its own
/// counter, above every version any member holds, and in the current
/// epoch's range (`epoch << 32`), so a primary whose counter was lost in a
/// restart can never number a new write below an older one. The next write
/// uses the returned value plus one.
pub fn next_version_after(counter: u64, max_seen: u64, epoch: u64) -> u64 {
    counter.max(max_seen).max(epoch << 32)
}

/// Returns whether a replica applies a replicated change of `incoming`
/// version to an object it holds at `held`: only a newer one. An older one
/// is a late delivery the primary already gave up on (and the client
/// retried); applying it would roll the object back behind acknowledged
/// writes.
pub fn replica_should_apply(held: Option<u64>, incoming: u64) -> bool {
    held.is_none_or(|held| incoming > held)
}
