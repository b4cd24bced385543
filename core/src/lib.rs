//! Guardrail's pure core: the policy model, its validation and compilation, and `decide()`.
//!
//! It knows nothing of proxy-wasm or of an async runtime and builds for the host and for
//! wasm32-wasip1, so the filter (in Envoy) and the companion (`guardrail explain`, `guardrail test`)
//! judge every request with the same code. The outside world comes in through small traits:
//! [`quota::CounterStore`] (shared counters with compare-and-swap) and plain values for the clock
//! and the request.

pub mod catalog;
pub mod compile;
pub mod decide;
pub mod duration;
pub mod error;
pub mod exempt;
pub mod fasthash;
pub mod fleet;
pub mod jwt;
pub mod lint;
pub mod path;
pub mod problem;
pub mod quota;
pub mod raw;
pub mod replay;
pub mod rules;
pub mod shadow;
#[cfg(feature = "yaml")]
pub mod source;
pub mod time;

pub use error::{PolicyError, PolicyErrors};

/// SHA-256 digest of an API key: the only form in which keys are stored (`sha256:<hex>` in policy).
pub fn api_key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}
