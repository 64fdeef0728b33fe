//! Errors of the placement crate.

use crate::ids::{HostId, OsdId, PgId, PoolId, VolumeId, ZoneId};
use crate::map::FailureDomain;

/// A map edit or lookup that cannot be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("{0} not found")]
    ZoneNotFound(ZoneId),
    #[error("{0} not found")]
    HostNotFound(HostId),
    #[error("{0} not found")]
    PoolNotFound(PoolId),
    #[error("{0} not found")]
    VolumeNotFound(VolumeId),
    #[error("{0} already exists")]
    OsdExists(OsdId),
    #[error("pool {0:?} already exists")]
    PoolExists(String),
    #[error("host {host:?} already belongs to {zone}")]
    HostInOtherZone { host: String, zone: ZoneId },
    #[error("unknown failure domain {0:?} (expected host or zone)")]
    UnknownFailureDomain(String),
    #[error("invalid pool: {reason}")]
    InvalidPool { reason: String },
    #[error("invalid volume: {reason}")]
    InvalidVolume { reason: String },
    #[error("map format version {0} is not supported")]
    UnsupportedFormat(u32),
    #[error("inconsistent map: {0}")]
    Dangling(String),
}

/// A placement that cannot be computed as the pool's rule asks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("{0} not found")]
    PoolNotFound(PoolId),
    #[error(
        "{pool} needs {size} copies in distinct {failure_domain}s but only {available} \
         {failure_domain}s have an up and in OSD"
    )]
    InsufficientFailureDomains {
        pool: PoolId,
        size: u32,
        failure_domain: FailureDomain,
        available: usize,
    },
    #[error("{pg} has no up and in OSD to map to")]
    NoEligibleOsd { pg: PgId },
}
