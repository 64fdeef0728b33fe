//! The block client library (librbd's job): volume -> fixed-size objects ->
//! placement group -> primary OSD, with a map cache, retries across map changes
//! and pipelined requests. Used by the NBD gateway, the CSI driver and fio-bench.
//!
//! Nothing is implemented yet: see the replicated-write-path issue.
