//! The checked-in protobuf code is what `proto/guardrail/v1/guardrail.proto` generates.
//!
//! Builds do not compile the .proto (that took protox, prost-build and their 20-odd dependencies,
//! about two CPU-minutes per build); this test does, and compares. After changing the .proto:
//!
//! ```sh
//! GUARDRAIL_REGENERATE=1 cargo test -p guardrail-control --test generated
//! ```

// A failing test is a panic; the workspace denies these lints for the code under test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

const PROTO: &str = "guardrail/v1/guardrail.proto";
/// `bytes` fields generated as `prost::bytes::Bytes` (cheap to clone) rather than `Vec<u8>`: a
/// snapshot's JSON, sent to every node.
const SHARED_BYTES: [&str; 2] =
    [".guardrail.v1.PolicySnapshot.policy_json", ".guardrail.v1.PolicySnapshot.policy_zlib"];

fn repo() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// A fresh, empty directory for one generator's output.
fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("guardrail-generated-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The file `name` a generator wrote into `dir`; the directory is removed.
fn take(dir: PathBuf, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(name)).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    text
}

/// Compares `new` with the checked-in `checked_in`, or replaces it when `GUARDRAIL_REGENERATE`
/// is set.
fn compare(new: &str, checked_in: &Path) {
    if std::env::var_os("GUARDRAIL_REGENERATE").is_some() {
        std::fs::write(checked_in, new).unwrap();
        eprintln!("wrote {}", checked_in.display());
        return;
    }
    let old = std::fs::read_to_string(checked_in).unwrap_or_default();
    assert!(
        old == new,
        "{} is not what {PROTO} generates; run: GUARDRAIL_REGENERATE=1 cargo test -p guardrail-control --test generated",
        checked_in.display()
    );
}

#[test]
fn messages_are_what_the_proto_generates() {
    let fds = protox::compile([PROTO], [repo().join("proto")]).unwrap();
    let out = out_dir("messages");
    prost_build::Config::new().bytes(SHARED_BYTES).out_dir(&out).compile_fds(fds).unwrap();
    compare(&take(out, "guardrail.v1.rs"), &repo().join("proto/src/guardrail.v1.rs"));
}

#[test]
fn service_code_is_what_the_proto_generates() {
    let fds = protox::compile([PROTO], [repo().join("proto")]).unwrap();
    let out = out_dir("service");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".guardrail.v1", "::guardrail_proto::v1")
        .out_dir(&out)
        .compile_fds(fds)
        .unwrap();
    compare(&take(out, "guardrail.v1.rs"), &repo().join("control/src/pb/guardrail.v1.rs"));
}
