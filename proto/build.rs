//! Compiles the protobuf definitions with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs no installed `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/grpc/health/v1/health.proto",
        "proto/basalt/monitor/v1/monitor.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
