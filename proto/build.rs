//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/isthmus/v1/catalog.proto",
        "proto/isthmus/v1/watch.proto",
        "proto/isthmus/v1/ca.proto",
        "proto/isthmus/v1/registration.proto",
        // The standard health protocol, for the agent's gRPC readiness probe (and its tests'
        // servers).
        "proto/grpc/health/v1/health.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps encode deterministically, so equal views hash equal (see views.rs).
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
