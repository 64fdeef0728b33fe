//! The monitor: an openraft group (1, 3 or 5 `basalt mon` processes) whose
//! replicated state machine is the cluster map of `basalt-placement`, with
//! the raft log, vote and snapshots in RocksDB and a gRPC API (tonic).
//!
//! - [`command`]: every map change as a raft entry, applied by a pure
//!   function (so every monitor reaches the same map).
//! - [`raft_store`]: raft's storage (RocksDB) and the state machine.
//! - [`network`]: raft messages between monitors over gRPC.
//! - [`service`]: the `Monitor` gRPC API; followers redirect writes.
//! - [`failure_detector`]: heartbeats -> down/up/out verdicts, on the leader.
//! - [`daemon`]: assembles a monitor process.
//! - [`client`]: `MonClient`, the leader-following client library.
//!
//! Rejected: sending heartbeats through raft (ten thousand OSDs would flood
//! the log; the leader keeps them in memory and commits only verdicts), and
//! persisting the whole map on every change (a snapshot every few thousand
//! entries plus log replay costs far less).

pub mod client;
pub mod command;
pub mod daemon;
pub mod failure_detector;
pub mod network;
pub mod raft_store;
pub mod service;

pub use client::{MonClient, MonClientError};
pub use daemon::{MonitorConfig, MonitorError, run};
