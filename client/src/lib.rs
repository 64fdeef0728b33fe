//! The block client library (librbd's job): volume -> fixed-size objects ->
//! placement group -> primary OSD, with a cached map refreshed on stale-epoch
//! replies, retries across map changes and lost connections, and pipelined
//! requests on shared connections. Used by the NBD gateway, the CSI driver,
//! fio-bench and the OSDs themselves (replication uses [`connection`]).

pub mod block_client;
pub mod connection;
pub mod error;

pub use block_client::{BlockClient, ClientConfig, Durability, Volume};
pub use connection::{Connection, ConnectionPool, LocalOsd};
pub use error::ClientError;
