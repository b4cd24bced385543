//! Comparison filters for the overhead benchmark, chosen by the plugin configuration:
//!
//! - `""` or anything else: adds `x-trivial: 1` to each request and does nothing more. The cost of
//!   entering the VM once per request, which every wasm filter pays (bench configuration (d)).
//! - `"hostcalls"`: makes the same host calls per request as Guardrail does on an admitted request
//!   (all request headers, the routed cluster, the clock, a compare-and-swap on one shared-data key
//!   per app, two request headers, one counter, two response headers) and decides nothing
//!   (configuration (e)). Guardrail minus (e) is the cost of its own code inside the VM; (e) minus
//!   (d) is the cost of its host calls.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { hostcalls: false, metric: None })
    });
}}

struct Root {
    hostcalls: bool,
    metric: Option<u32>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.hostcalls = config.as_slice() == b"hostcalls";
        if self.hostcalls {
            self.metric = hostcalls::define_metric(MetricType::Counter, "bench.allowed").ok();
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.hostcalls {
            Some(Box::new(Hostcalls { metric: self.metric, admitted: false }))
        } else {
            Some(Box::new(Trivial))
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// === (d) ===

struct Trivial;

impl Context for Trivial {}

impl HttpContext for Trivial {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header("x-trivial", Some("1"));
        Action::Continue
    }
}

// === (e) ===

struct Hostcalls {
    metric: Option<u32>,
    admitted: bool,
}

impl Context for Hostcalls {}

impl HttpContext for Hostcalls {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.get_http_request_headers();
        let _cluster = self.get_property(vec!["xds", "cluster_name"]);
        let now = self.get_current_time();
        // One shared-data key per credential, as Guardrail has one per app.
        let credential = headers
            .iter()
            .find(|(k, _)| k == "x-api-key" || k == "authorization")
            .map_or(0, |(_, v)| v.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into())));
        let key = format!("bench.quota.{}", credential % 1000);
        let stamp = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64).to_le_bytes();
        for _ in 0..8 {
            let result = match hostcalls::get_shared_data(&key) {
                Ok((Some(_), cas)) => hostcalls::set_shared_data(&key, Some(&stamp), cas),
                _ => hostcalls::set_shared_data(&key, Some(&stamp), None),
            };
            if result.is_ok() {
                break;
            }
        }
        self.set_http_request_header("x-guardrail-app", Some("app"));
        self.set_http_request_header("x-guardrail-tier", Some("standard"));
        if let Some(id) = self.metric {
            let _ = hostcalls::increment_metric(id, 1);
        }
        self.admitted = true;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.admitted {
            self.set_http_response_header("ratelimit-policy", Some("\"rate\";q=100;w=60"));
            self.set_http_response_header("ratelimit", Some("\"rate\";r=99;t=1"));
        }
        Action::Continue
    }
}
