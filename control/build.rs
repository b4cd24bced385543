//! Generates the tonic client and server of `guardrail.v1.PolicyService` from
//! `proto/guardrail/v1/guardrail.proto`, compiled by `protox` (pure Rust: no `protoc`). The messages
//! are not generated again: they are `guardrail_proto::v1`'s, shared with the filter.

use std::io::{Error, ErrorKind};

const PROTO: &str = "../proto/guardrail/v1/guardrail.proto";

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["../proto"]).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".guardrail.v1", "::guardrail_proto::v1")
        .compile_fds(fds)
}
