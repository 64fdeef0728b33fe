//! Errors of the block client.

use std::net::SocketAddr;

use basalt_monitor::MonClientError;

/// Why a block operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to OSD {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connection to OSD {addr} lost")]
    ConnectionLost { addr: SocketAddr },
    #[error("OSD {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    #[error("monitors: {0}")]
    Monitor(#[from] MonClientError),
    #[error("cluster map: {0}")]
    Map(String),
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    /// The volume was open but the map no longer has it.
    #[error("{0} was deleted")]
    VolumeDeleted(basalt_placement::VolumeId),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space left in the cluster")]
    NoSpace,
    #[error("checksum error reading {0}; no good copy answered")]
    Checksum(String),
    /// Retries across map changes and reconnects ran out.
    #[error("gave up after {attempts} attempts over {seconds:.1} s: {last}")]
    GaveUp {
        attempts: u32,
        seconds: f64,
        last: String,
    },
}
