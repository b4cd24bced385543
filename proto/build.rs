//! Compiles `guardrail/v1/guardrail.proto` into prost messages with `protox` (pure Rust: no
//! `protoc` on the build machine). Services are left to the companion, which generates its tonic
//! code from the same file with these messages as extern types.

use std::io::{Error, ErrorKind};

const PROTO: &str = "guardrail/v1/guardrail.proto";

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["."]).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    prost_build::Config::new().compile_fds(fds)
}
