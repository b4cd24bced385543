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
        Box::new(Root { hostcalls: None, metric: None })
    });
}}

struct Root {
    /// Which host calls (e) makes: all of them for `"hostcalls"`, or the comma-separated subset of
    /// `headers,property,time,shared,set,metric,response` after `"hostcalls:"` (the cost of each).
    hostcalls: Option<Calls>,
    metric: Option<u32>,
}

#[derive(Clone, Copy)]
struct Calls {
    /// Each selected call is made this many times (`hostcalls:property*20`), to measure one.
    repeat: u32,
    headers: bool,
    property: bool,
    time: bool,
    shared: bool,
    set: bool,
    metric: bool,
    response: bool,
}

impl Calls {
    fn parse(config: &[u8]) -> Option<Calls> {
        let config = std::str::from_utf8(config).ok()?;
        if config == "hostcalls" {
            return Some(Calls {
                repeat: 1,
                headers: true,
                property: true,
                time: true,
                shared: true,
                set: true,
                metric: true,
                response: true,
            });
        }
        let list = config.strip_prefix("hostcalls:")?;
        let (list, repeat) = match list.split_once('*') {
            Some((list, n)) => (list, n.parse().ok()?),
            None => (list, 1),
        };
        let has = |name: &str| list.split(',').any(|x| x == name);
        Some(Calls {
            repeat,
            headers: has("headers"),
            property: has("property"),
            time: has("time"),
            shared: has("shared"),
            set: has("set"),
            metric: has("metric"),
            response: has("response"),
        })
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.hostcalls = Calls::parse(&config);
        if self.hostcalls.is_some_and(|c| c.metric) {
            self.metric = hostcalls::define_metric(MetricType::Counter, "bench.allowed").ok();
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(calls) = self.hostcalls {
            Some(Box::new(Hostcalls { calls, metric: self.metric, admitted: false }))
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
    calls: Calls,
    metric: Option<u32>,
    admitted: bool,
}

impl Context for Hostcalls {}

impl HttpContext for Hostcalls {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let c = self.calls;
        for _ in 1..c.repeat {
            if c.headers {
                let _ = self.get_http_request_headers();
            }
            if c.property {
                let _ = self.get_property(vec!["xds", "cluster_name"]);
            }
            if c.time {
                let _ = self.get_current_time();
            }
            if c.metric {
                if let Some(id) = self.metric {
                    let _ = hostcalls::increment_metric(id, 1);
                }
            }
            if c.set {
                self.set_http_request_header("x-guardrail-app", Some("app"));
            }
            if c.shared {
                let _ = hostcalls::get_shared_data("bench.quota.0");
            }
        }
        let headers = if c.headers { self.get_http_request_headers() } else { Vec::new() };
        if c.property {
            let _cluster = self.get_property(vec!["xds", "cluster_name"]);
        }
        let now = if c.time { self.get_current_time() } else { std::time::UNIX_EPOCH };
        if c.shared {
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
        }
        if c.set {
            self.set_http_request_header("x-guardrail-app", Some("app"));
            self.set_http_request_header("x-guardrail-tier", Some("standard"));
        } else {
            self.set_http_request_header("x-trivial", Some("1"));
        }
        if let (true, Some(id)) = (c.metric, self.metric) {
            let _ = hostcalls::increment_metric(id, 1);
        }
        self.admitted = c.response;
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
