//! The Kubernetes CSI driver (Identity, Controller and Node services over a
//! unix socket): topology-aware provisioning, attach through NBD, snapshots.
//!
//! Nothing is implemented yet.
