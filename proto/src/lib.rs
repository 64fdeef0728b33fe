//! Protobuf and gRPC definitions shared by the control-plane services
//! (monitor, OSD control, CSI, CLI). Code is generated at build time by
//! `build.rs` with protox, so no `protoc` has to be installed.

/// The standard gRPC health-checking service, served by every daemon.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// The monitor's API: cluster map, OSD membership, pools, volumes,
/// snapshots, status, and the raft transport between monitors.
pub mod monitor {
    tonic::include_proto!("basalt.monitor.v1");
}
