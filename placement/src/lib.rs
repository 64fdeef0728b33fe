//! The cluster map and the placement math every Basalt component shares.
//!
//! Given a [`ClusterMap`] (epoch, zones, hosts, OSDs with weights and up/in
//! state, pools, volumes), this crate maps a volume block to an object, an
//! object to a placement group ([`PgId`]), and a PG to its ordered acting set
//! of OSDs ([`Placer::acting_set`]). It is pure and deterministic: no I/O, no
//! clock, no randomness but seeded integer hashing, and no floating point in
//! any decision, so every node holding the same epoch computes the same
//! answer.
//!
//! - [`placer`]: the candidate-stream straw2 placement, locality (home hosts)
//!   and exceptions; the module docs explain what moves on each change.
//! - [`transition`]: exceptions that keep movement minimal when the map's
//!   weights change (adding an OSD, removing one from the map).
//! - [`balancer`]: exceptions that even out PGs per OSD.
//! - [`map`]: the map types, serde-serialisable and versioned.

pub mod balancer;
pub mod error;
pub mod hash;
pub mod ids;
pub mod map;
pub mod placer;
pub mod transition;

pub use balancer::{BalanceReport, Balancer};
pub use error::{MapError, PlacementError};
pub use ids::{Epoch, HostId, ObjectId, OsdId, PgId, PoolId, SnapshotId, VolumeId, Weight, ZoneId};
pub use map::{ClusterMap, FailureDomain, Host, Osd, Pool, Snapshot, Upmap, Volume, Zone};
pub use placer::{ActingCache, ActingSet, Placer};
pub use transition::{TransitionReport, plan_transition};
