//! The one file that talks to the host (`hostcalls::*`): shared data as a [`CounterStore`],
//! headers, the clock, logging and metrics. Every host error is handled here, never unwrapped.

use guardrail_core::decide::Code;
use guardrail_core::problem::one_line;
use guardrail_core::quota::{CounterStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::time::UNIX_EPOCH;

/// proxy-wasm shared data (one namespace per `vm_id`, shared by every worker of this Envoy).
pub struct SharedData;

impl CounterStore for SharedData {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Ok(Some((bytes, cas))),
            Ok((Some(bytes), None)) => Ok(Some((bytes, 0))),
            Ok((None, _)) => Ok(None),
            Err(status) => Err(StoreError::Unavailable(format!("{status:?}"))),
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), if cas == 0 { None } else { Some(cas) }) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(status) => Err(StoreError::Unavailable(format!("{status:?}"))),
        }
    }
}

/// Unix time in nanoseconds, or 0 if the host cannot tell (which only makes limits stricter).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// Every line Guardrail writes to Envoy's log goes through here, as one line: a revision, a node's
/// error or a field name from a policy can never start a line of its own (a forged decision line;
/// see [`one_line`]).
fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, &one_line(message));
}

pub fn info(message: &str) {
    log(LogLevel::Info, message);
}

pub fn warn(message: &str) {
    log(LogLevel::Warn, message);
}

pub fn error(message: &str) {
    log(LogLevel::Error, message);
}

/// The Envoy cluster this request is routed to (the app's upstream connector), if routed to one.
pub fn upstream_cluster() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["xds", "cluster_name"]).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// The downstream mTLS peer's first URI SAN (its SPIFFE id in a mesh), as Envoy reports it for
/// the TLS connection; `None` over plain text or without a client certificate.
pub fn peer_uri_san() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["connection", "uri_san_peer_certificate"]).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// Sets `wasm.<name>` in Envoy's filter state (`%FILTER_STATE(wasm.<name>:PLAIN)%` in an access log).
pub fn set_filter_state(name: &str, value: &str) {
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten()
}

/// The request headers. Values that are not UTF-8 never panic: a pseudo-header (`:path`,
/// `:authority`, `:method`) becomes a NUL, which decide() refuses as `invalid-path`; any other
/// value is read lossily, so it can never match a key or a token.
pub fn request_headers() -> Vec<(String, String)> {
    let raw = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
    raw.into_iter()
        .map(|(name, value)| {
            let value = match String::from_utf8(value) {
                Ok(v) => v,
                Err(_) if name.starts_with(':') => "\0".to_string(),
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            (name, value)
        })
        .collect()
}

pub fn remove_request_header(name: &str) {
    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
}

pub fn set_request_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
}

pub fn set_response_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
}

/// Sends a local reply; the request goes no further.
pub fn send_response(status: u32, headers: &[(&str, String)], body: &str) {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
}

/// Envoy counters (`wasmcustom.guardrail.*` in `/stats`), defined once per VM. Counts are kept
/// per worker and added to Envoy's counters by [`Metrics::flush`] on every tick (100 ms): one host
/// call per counter per tick instead of one per request.
pub struct Metrics {
    ids: [Option<u32>; SLOTS],
    pending: [u64; SLOTS],
}

const ALLOWED: usize = 0;
const THROTTLED: usize = 1;
const SOFT_LIMIT: usize = 2;
const SHADOW: usize = 3;
const EXEMPT: usize = 4;
const PREFLIGHT: usize = 5;
/// `denied.<code>` for `Code::ALL[i]` is slot `DENIED + i`.
const DENIED: usize = 6;
const SLOTS: usize = DENIED + Code::ALL.len();

impl Metrics {
    pub fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut ids = [None; SLOTS];
        for (slot, name) in [
            (ALLOWED, "allowed"),
            (THROTTLED, "throttled"),
            (SOFT_LIMIT, "soft_limit"),
            (SHADOW, "shadow"),
            (EXEMPT, "exempt"),
            (PREFLIGHT, "preflight"),
        ] {
            if let Some(id) = ids.get_mut(slot) {
                *id = counter(&format!("guardrail.{name}"));
            }
        }
        for (id, code) in ids.iter_mut().skip(DENIED).zip(Code::ALL) {
            *id = counter(&format!("guardrail.denied.{}", code.as_str()));
        }
        Metrics { ids, pending: [0; SLOTS] }
    }

    fn bump(&mut self, slot: usize) {
        if let Some(n) = self.pending.get_mut(slot) {
            *n = n.saturating_add(1);
        }
    }

    /// Adds the counts kept since the last flush to Envoy's counters.
    pub fn flush(&mut self) {
        for (n, id) in self.pending.iter_mut().zip(self.ids) {
            if let (Some(id), true) = (id, *n > 0) {
                let _ = hostcalls::increment_metric(id, i64::try_from(*n).unwrap_or(i64::MAX));
            }
            *n = 0;
        }
    }

    pub fn allowed(&mut self) {
        self.bump(ALLOWED);
    }

    pub fn soft_limit(&mut self) {
        self.bump(SOFT_LIMIT);
    }

    pub fn shadow(&mut self) {
        self.bump(SHADOW);
    }

    /// A request passed by an exemption (`exempt`) or as a credential-less CORS preflight.
    pub fn passed(&mut self, pass: &guardrail_core::decide::Pass) {
        self.bump(match pass {
            guardrail_core::decide::Pass::Exempt(_) => EXEMPT,
            guardrail_core::decide::Pass::Preflight => PREFLIGHT,
        });
    }

    pub fn denied(&mut self, code: Code) {
        if let Some(i) = Code::ALL.iter().position(|c| *c == code) {
            self.bump(DENIED + i);
        }
        if code.status() == 429 {
            self.bump(THROTTLED);
        }
    }
}
