//! The monitor daemon: an openraft group (1, 3 or 5 members) whose replicated
//! state machine is the cluster map of `basalt-placement`, persisted in RocksDB,
//! served over gRPC (tonic).
//!
//! Nothing is implemented yet: see the monitor issue in the tracker. The crate
//! exists so the workspace has its final shape and its dependencies are built
//! (and cached) from the start.
