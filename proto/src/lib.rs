//! The Guardrail policy-push protocol, `guardrail.v1` (see `guardrail/v1/guardrail.proto`).
//!
//! Messages only, generated with prost: the filter (wasm32-wasip1) encodes and decodes them over
//! the gRPC stream Envoy opens for it, and the companion (`guardrail serve`) shares them with its
//! tonic service code. One bidirectional stream per Envoy process:
//!
//! 1. the filter opens [`STREAM_METHOD`] of [`SERVICE`] and sends [`v1::Hello`] first;
//! 2. the companion answers with the current [`v1::PolicySnapshot`] and [`v1::FleetState`], and
//!    sends each again whenever it changes;
//! 3. the filter acknowledges every snapshot ([`v1::Ack`]) or rejects it ([`v1::Nack`]), naming the
//!    snapshot's `revision`, and sends a [`v1::UsageReport`] periodically.
//!
//! ```
//! use guardrail_proto::v1::{client_message::Msg, ClientMessage, Hello};
//! use prost::Message;
//!
//! let hello = ClientMessage {
//!     msg: Some(Msg::Hello(Hello { node_id: "envoy-1".into(), ..Default::default() })),
//! };
//! let bytes = hello.encode_to_vec();
//! assert_eq!(ClientMessage::decode(bytes.as_slice()).unwrap(), hello);
//! ```

/// Generated from `guardrail/v1/guardrail.proto` by prost-build (checked in, so that no build
/// compiles a .proto; `control/tests/generated.rs` fails when it is not what the .proto gives).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!("guardrail.v1.rs");
}

pub mod delta;

/// The gRPC service name, as Envoy's `dispatch_grpc_stream` takes it.
pub const SERVICE: &str = "guardrail.v1.PolicyService";
/// The bidirectional policy stream: `/guardrail.v1.PolicyService/Stream`.
pub const STREAM_METHOD: &str = "Stream";
/// The unary fleet status call: `/guardrail.v1.PolicyService/Status`.
pub const STATUS_METHOD: &str = "Status";

/// The type of `bytes` fields shared rather than copied (`PolicySnapshot.policy_json`, `policy_zlib`).
pub use prost::bytes::Bytes;

/// The largest `policy_json` (as sent, or inflated from `policy_zlib`): 4 MiB, the gRPC message
/// limit of both ends, less room for the rest of the message.
pub const MAX_POLICY_JSON_BYTES: usize = 4 * 1024 * 1024 - 4096;
