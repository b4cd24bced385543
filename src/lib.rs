//! Guardrail's proxy-wasm HTTP filter: judges every request inline with `guardrail_core::decide`.
//!
//! Per worker, the root context holds the compiled policy and a cache of verified tokens; each
//! request's HTTP context reads the headers once, asks `decide()`, and turns the [`Decision`] into a
//! local reply or upstream headers in one place ([`GuardrailHttp::enforce`]). Host calls live in
//! [`host`].

mod config;
mod host;

use guardrail_core::compile::CompiledPolicy;
use guardrail_core::decide::{decide, policy_unavailable, Decision, Denial, Event, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::problem::{
    denial_headers, denial_log_line, event_log_line, problem_body, ratelimit_headers,
};
use guardrail_core::quota::ensure_keys;
use guardrail_core::raw::FailureMode;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

/// Verified tokens kept per worker; a signature check costs far more than a whole request.
const TOKEN_CACHE_CAPACITY: usize = 4096;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GuardrailRoot::new()) });
}}

/// What the HTTP contexts of one worker share with its root context.
struct Worker {
    policy: Option<Rc<CompiledPolicy>>,
    failure_mode: FailureMode,
    gateway_region: Option<String>,
    tokens: TokenCache,
    metrics: host::Metrics,
}

// === impl GuardrailRoot ===

struct GuardrailRoot {
    worker: Rc<RefCell<Worker>>,
}

impl GuardrailRoot {
    fn new() -> Self {
        GuardrailRoot {
            worker: Rc::new(RefCell::new(Worker {
                policy: None,
                failure_mode: FailureMode::Closed,
                gateway_region: None,
                tokens: TokenCache::new(TOKEN_CACHE_CAPACITY),
                metrics: host::Metrics::define(),
            })),
        }
    }

    /// Makes `policy` the one in force on this worker, creating its apps' quota keys first.
    fn apply(&self, policy: CompiledPolicy) -> bool {
        if let Err(e) = ensure_keys(
            &mut host::SharedData,
            policy.apps.iter().map(|a| a.quota_key.as_str()),
        ) {
            host::error(&format!(
                "guardrail: cannot create quota state in shared data: {e}"
            ));
            return false;
        }
        host::info(&format!(
            "guardrail: policy revision `{}` applied ({} apps, {} datasets, {} rules)",
            policy.revision,
            policy.apps.len(),
            policy.datasets.len(),
            policy.rules.len()
        ));
        let mut worker = self.worker.borrow_mut();
        worker.tokens.clear();
        worker.policy = Some(Rc::new(policy));
        true
    }
}

impl Context for GuardrailRoot {}

impl RootContext for GuardrailRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = host::plugin_configuration().unwrap_or_default();
        let config = match config::parse(&bytes) {
            Ok(config) => config,
            Err(errors) => {
                for e in &errors {
                    host::error(&format!("guardrail: invalid plugin configuration: {e}"));
                }
                return false;
            }
        };
        {
            let mut worker = self.worker.borrow_mut();
            worker.failure_mode = config.failure_mode;
            worker.gateway_region = config.gateway_region;
        }
        match config.policy {
            Some(policy) => self.apply(policy),
            None => {
                host::warn("guardrail: no policy in the plugin configuration; waiting for one (requests get 503 policy-unavailable unless failure_mode is open)");
                true
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GuardrailHttp {
            worker: Rc::clone(&self.worker),
            ratelimit: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// === impl GuardrailHttp ===

struct GuardrailHttp {
    worker: Rc<RefCell<Worker>>,
    /// `RateLimit-Policy` and `RateLimit` for the response of an admitted request.
    ratelimit: Option<[(&'static str, String); 2]>,
}

impl Context for GuardrailHttp {}

impl HttpContext for GuardrailHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = host::request_headers();
        // Identity never comes from a header a client can set: drop every x-guardrail-* first.
        for (name, _) in headers
            .iter()
            .filter(|(n, _)| n.starts_with("x-guardrail-"))
        {
            host::remove_request_header(name);
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let connector = host::upstream_cluster();
        let worker = Rc::clone(&self.worker);
        let mut worker = worker.borrow_mut();
        let gateway_region = worker.gateway_region.clone();
        let request = Request {
            method: header(":method"),
            host: header(":authority"),
            path: header(":path"),
            connector: connector.as_deref(),
            request_id: header("x-request-id"),
            headers: &headers,
            gateway_region: gateway_region.as_deref(),
        };

        let Some(policy) = worker.policy.clone() else {
            if worker.failure_mode == FailureMode::Open {
                return Action::Continue;
            }
            let denial = policy_unavailable();
            return self.deny(&worker, &denial, None, &request, "");
        };
        let Worker { tokens, .. } = &mut *worker;
        let decision = decide(
            &policy,
            &request,
            host::now_ns(),
            &mut host::SharedData,
            tokens,
        );
        self.enforce(&worker, &policy, decision, &request)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(fields) = self.ratelimit.take() {
            for (name, value) in &fields {
                host::set_response_header(name, value);
            }
        }
        Action::Continue
    }
}

impl GuardrailHttp {
    /// Turns a decision into what Envoy does: the only place that does so.
    fn enforce(
        &mut self,
        worker: &Worker,
        policy: &CompiledPolicy,
        decision: Decision<'_>,
        request: &Request<'_>,
    ) -> Action {
        let app_id = decision.app.map(|a| a.id.as_str());
        for event in &decision.events {
            host::warn(&event_log_line(
                event,
                app_id,
                request.request_id,
                &policy.revision,
            ));
            match event {
                Event::SoftLimit { .. } => worker.metrics.soft_limit(),
                Event::Shadow { .. } => worker.metrics.shadow(),
            }
        }
        if let Some(denial) = &decision.denial {
            return self.deny(worker, denial, app_id, request, &policy.revision);
        }
        if let Some(app) = decision.app {
            host::set_request_header("x-guardrail-app", &app.id);
        }
        if let Some(tier) = decision.tier {
            host::set_request_header("x-guardrail-tier", tier);
        }
        self.ratelimit = decision
            .quota
            .map(|(limits, usage)| ratelimit_headers(&limits, &usage));
        worker.metrics.allowed();
        Action::Continue
    }

    fn deny(
        &mut self,
        worker: &Worker,
        denial: &Denial,
        app: Option<&str>,
        request: &Request<'_>,
        revision: &str,
    ) -> Action {
        host::info(&denial_log_line(denial, app, request.request_id, revision));
        worker.metrics.denied(denial.code);
        let body = problem_body(denial, request.request_id, app);
        host::send_response(denial.code.status(), &denial_headers(denial), &body);
        Action::Pause
    }
}
