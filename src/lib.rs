//! Guardrail's proxy-wasm HTTP filter: judges every request inline with `guardrail_core::decide`.
//!
//! Per worker, the root context holds the compiled policy and a cache of verified tokens; each
//! request's HTTP context reads the headers once, asks `decide()`, and turns the [`Decision`] into a
//! local reply or upstream headers in one place ([`GuardrailHttp::enforce`]). Host calls live in
//! [`host`]; the link to the companion in [`control`].
//!
//! While the companion has a shadow candidate in force ([`Shadow`]), each request is decided with
//! it too, before the enforced policy (so that both read the quota buckets as they stand), through
//! a [`ReadOnlyStore`]; only the difference of outcomes is counted. Nothing of the candidate's
//! reaches the request, the logs or the filter state.

mod config;
mod control;
mod host;

use control::ControlClient;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::decide::{
    check_connector, decide, decided_alike, policy_unavailable, Code, Decision, Denial, Event, Pass, Request,
};
use guardrail_core::fleet::{Callers, Fleet, UsageCounters};
use guardrail_core::jwt::{TokenCache, VerifiedToken};
use guardrail_core::problem::{
    access_log_line, denial_headers, denial_log_line, event_log_line, problem_body, ratelimit_headers, LineContext,
};
use guardrail_core::quota::{ensure_keys, StoreError};
use guardrail_core::raw::{Classification, FailureMode};
use guardrail_core::shadow::{outcome, Differ, ReadOnlyStore, ShadowCounts};
use guardrail_core::time::{NANOS_PER_SEC, SECS_PER_DAY};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Verified tokens kept per worker; a signature check costs far more than a whole request.
const TOKEN_CACHE_CAPACITY: usize = 4096;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GuardrailRoot::new()) });
}}

/// Creates the shared-data keys of every app of `policy` (quota state and usage counts) that do
/// not exist yet. Done when a policy is applied, never on a request: the host does not CAS-guard
/// creation, and the initial values are the same whoever writes them.
pub(crate) fn create_keys(policy: &CompiledPolicy) -> Result<(), StoreError> {
    ensure_keys(&mut host::SharedData, policy.apps.iter().map(|a| a.quota_key.as_str()))?;
    let usage = policy.apps.iter().map(|a| control::usage_key(&a.id));
    create_usage_keys(usage.chain(policy.exemptions.iter().map(|e| control::exempt_key(&e.id))))?;
    let mut store = host::SharedData;
    if guardrail_core::quota::CounterStore::get(&mut store, control::CALLERS_KEY)?.is_none() {
        guardrail_core::quota::CounterStore::set(&mut store, control::CALLERS_KEY, &Callers::default().encode(), 0)?;
    }
    Ok(())
}

/// Creates the usage-count keys among `keys` that do not exist yet (zero counts).
pub(crate) fn create_usage_keys(keys: impl Iterator<Item = String>) -> Result<(), StoreError> {
    let mut store = host::SharedData;
    for key in keys {
        if guardrail_core::quota::CounterStore::get(&mut store, &key)?.is_none() {
            guardrail_core::quota::CounterStore::set(&mut store, &key, &UsageCounters::default().encode(), 0)?;
        }
    }
    Ok(())
}

/// `x-guardrail-*` in any spelling a server may fold into it: CGI-style upstreams (WSGI, PHP,
/// Rack) read `x_guardrail_app` as `X-Guardrail-App`, so underscores count as dashes.
fn is_guardrail_header(name: &str) -> bool {
    const PREFIX: &[u8] = b"x-guardrail-";
    let n = name.as_bytes();
    n.len() >= PREFIX.len()
        && n.iter().zip(PREFIX).all(|(a, b)| a.to_ascii_lowercase() == *b || (*a == b'_' && *b == b'-'))
}

/// What the HTTP contexts of one worker share with its root context.
struct Worker {
    policy: Option<Rc<CompiledPolicy>>,
    failure_mode: FailureMode,
    gateway_region: Option<Rc<str>>,
    tokens: TokenCache,
    metrics: host::Metrics,
    /// Set when a companion is configured: then snapshots and fleet state come through shared data.
    controlled: bool,
    /// What this worker has taken from shared data.
    follower: control::Follower,
    fleet: Option<Rc<Fleet>>,
    /// The shadow candidate in force, if the companion sent one.
    shadow: Option<Shadow>,
    /// Usage counted since the last flush to shared data (only when `controlled`).
    usage: HashMap<String, UsageCounters>,
    /// Unregistered callers counted since the last flush (only when `controlled`).
    callers: Callers,
}

/// A shadow candidate on one worker: decided beside the enforced policy, never enforced.
struct Shadow {
    policy: Rc<CompiledPolicy>,
    /// Which putting in force of it the counts belong to (see [`control::flush_shadow`]).
    epoch: u64,
    /// Its own verified tokens: a cache holds only what one policy's issuers verified.
    tokens: TokenCache,
    /// Differences counted since the last flush to shared data.
    counts: ShadowCounts,
    /// Where it can decide differently from the policy in force; other requests are decided once
    /// (`None`: every request twice).
    differ: Option<Differ>,
}

impl Worker {
    /// Makes `policy` the one in force on this worker.
    fn install(&mut self, policy: CompiledPolicy) {
        host::info(&format!(
            "guardrail: policy revision `{}` in force ({} apps, {} datasets, {} rules)",
            policy.revision,
            policy.apps.len(),
            policy.datasets.len(),
            policy.rules.len()
        ));
        self.tokens.clear();
        self.policy = Some(Rc::new(policy));
    }

    /// Takes what the companion published if the shared generation moved: one small shared-data
    /// read when nothing changed (see [`control::Follower::sync`]).
    fn sync(&mut self) {
        self.follow(false);
    }

    /// [`Worker::sync`]; on a tick (`tick`), also compiles a candidate ahead.
    fn follow(&mut self, tick: bool) {
        if !self.controlled {
            return;
        }
        let synced = self.follower.sync(tick);
        self.apply(synced);
    }

    /// Puts in force what the companion published (or this root context received).
    fn apply(&mut self, synced: control::Synced) {
        let changed = synced.policy.is_some() || synced.shadow.is_some();
        if let Some(policy) = synced.policy {
            let replaced = self.policy.take();
            self.install(policy);
            self.follower.retire(replaced);
        }
        if let Some(fleet) = synced.fleet {
            self.fleet = fleet.map(Rc::new);
        }
        if let Some(shadow) = synced.shadow {
            // The counts of a replaced candidate are dropped: the shared ones start over too.
            let replaced = self.shadow.take().map(|s| s.policy);
            if shadow.is_none() && replaced.is_some() {
                host::info("guardrail: no candidate decided in shadow on this worker any more");
            }
            self.follower.retire(replaced);
            self.shadow = shadow.map(|s| {
                host::info(&format!("guardrail: candidate `{}` decided in shadow on this worker", s.revision));
                Shadow {
                    policy: Rc::new(s.policy),
                    epoch: s.epoch,
                    tokens: TokenCache::new(TOKEN_CACHE_CAPACITY),
                    counts: ShadowCounts::default(),
                    differ: None,
                }
            });
        }
        // Either policy changed: where the two can decide differently (two JSON parses, once).
        if changed {
            if let Some(shadow) = &mut self.shadow {
                shadow.differ = self.follower.differ();
            }
        }
    }

    fn count(&mut self, app: Option<&str>, now_ns: u64, f: impl FnOnce(&mut UsageCounters)) {
        if !self.controlled {
            return;
        }
        let Some(app) = app else { return };
        let day = u32::try_from(now_ns / NANOS_PER_SEC / SECS_PER_DAY).unwrap_or(0);
        if !self.usage.contains_key(app) {
            self.usage.insert(app.to_string(), UsageCounters::default());
        }
        let Some(entry) = self.usage.get_mut(app) else { return };
        // Only a later day starts over: a clock stepped back keeps counting towards the later one.
        if day > entry.day {
            *entry = UsageCounters { day, ..UsageCounters::default() };
        }
        f(entry);
    }

    /// Counts a request of a caller the catalog does not know (`kind:id`, see [`Callers`]).
    fn count_caller(&mut self, kind: &str, id: &str, now_ns: u64) {
        if !self.controlled {
            return;
        }
        let day = u32::try_from(now_ns / NANOS_PER_SEC / SECS_PER_DAY).unwrap_or(0);
        if day > self.callers.day {
            self.callers = Callers { day, seen: Vec::new() };
        }
        self.callers.count(&format!("{kind}:{id}"), 1);
    }
}

// === impl GuardrailRoot ===

struct GuardrailRoot {
    worker: Rc<RefCell<Worker>>,
    control: Option<ControlClient>,
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
                controlled: false,
                follower: control::Follower::default(),
                fleet: None,
                shadow: None,
                usage: HashMap::new(),
                callers: Callers::default(),
            })),
            control: None,
        }
    }
}

impl Context for GuardrailRoot {
    /// The VM is going away: what the counters hold since the last tick still counts.
    fn on_done(&mut self) -> bool {
        self.worker.borrow_mut().metrics.flush();
        true
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        if message_size > control::MAX_MESSAGE_BYTES {
            host::error(&format!(
                "guardrail: {message_size}-byte message from the companion refused (limit {})",
                control::MAX_MESSAGE_BYTES
            ));
            let _ = proxy_wasm::hostcalls::cancel_grpc_stream(token_id);
            control.on_close(token_id, 8, host::now_ns());
            return;
        }
        let bytes =
            proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::GrpcReceiveBuffer, 0, message_size)
                .ok()
                .flatten()
                .unwrap_or_default();
        let mut worker = self.worker.borrow_mut();
        let Worker { follower, policy, .. } = &mut *worker;
        // Published to shared data for the other workers; this one has it compiled already.
        let synced = control.on_message(token_id, &bytes, follower, policy.as_deref());
        worker.apply(synced);
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        if let Some(control) = self.control.as_mut() {
            control.on_close(token_id, status_code, host::now_ns());
        }
    }
}

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
        let mut worker = self.worker.borrow_mut();
        worker.failure_mode = config.failure_mode;
        worker.gateway_region = config.gateway_region.map(Rc::from);
        worker.controlled = config.control_cluster.is_some();
        if let Some(policy) = config.policy {
            if let Err(e) = create_keys(&policy) {
                host::error(&format!("guardrail: cannot create quota state in shared data: {e}"));
                return false;
            }
            worker.install(policy);
        } else {
            host::warn("guardrail: no policy in the plugin configuration; waiting for one (requests get 503 policy-unavailable unless failure_mode is open)");
        }
        // A snapshot the companion already sent (to another worker) takes precedence over the inline one.
        worker.sync();
        if let Some(cluster) = config.control_cluster {
            let mut client = ControlClient::new(cluster);
            client.revision = worker.policy.as_ref().map(|p| p.revision.clone()).unwrap_or_default();
            self.control = Some(client);
        }
        // The tick flushes the counters (and, with a companion, drives the link to it).
        let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(control::TICK_MS));
        true
    }

    fn on_tick(&mut self) {
        let now = host::now_ns();
        self.worker.borrow_mut().metrics.flush();
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let mut worker = self.worker.borrow_mut();
        worker.follow(true);
        // Shadow counts before usage: see `control::usage_report`.
        if let Some(shadow) = worker.shadow.as_mut() {
            control::flush_shadow(shadow.epoch, &mut shadow.counts);
        }
        control::flush_usage(&mut worker.usage);
        control::flush_callers(&mut worker.callers);
        let Some(policy) = worker.policy.clone() else {
            control.tick(now, None);
            return;
        };
        drop(worker);
        control.revision.clone_from(&policy.revision);
        control.tick(now, Some(&policy));
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GuardrailHttp { worker: Rc::clone(&self.worker), ratelimit: None, routed: None }))
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
    /// What an admitted request was judged against, to see where Envoy really sent it.
    routed: Option<Routed>,
}

/// The policy, app and cluster an admitted request was judged with. Envoy picks the route before
/// the filter runs, and picks it again once the filter changed the request headers (it removes
/// client `x-guardrail-*` and the API key, adds `x-guardrail-app`/`-tier`, normalises `:path`), so a
/// route that matches on those can send the request elsewhere; no proxy-wasm call shows the new
/// route before the router uses it. The response shows it: see [`reroute_denial`].
struct Routed {
    policy: Rc<CompiledPolicy>,
    app: usize,
    connector: Option<String>,
    /// `x-request-id`, `:method`, `:authority` and `:path`, one per line (no header value holds a
    /// line break), for the decision line: the request headers are gone by the response phase.
    /// One allocation per admitted request rather than four.
    request: String,
    /// Index of the dataset in `policy.datasets`.
    dataset: Option<usize>,
}

impl Context for GuardrailHttp {}

impl HttpContext for GuardrailHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut headers = host::request_headers();
        let now = host::now_ns();
        let worker = Rc::clone(&self.worker);
        let mut worker = worker.borrow_mut();
        worker.sync();
        // Identity never comes from a header a client can set: drop every x-guardrail-* first,
        // from the request and from what decide() and its rules see; but for the header the
        // policy names for Guardrail's own token (`x-guardrail-token`, say).
        let in_force = worker.policy.clone();
        let token_header = in_force.as_deref().map(|p| p.settings.token_header.as_str());
        let strip = |n: &str| is_guardrail_header(n) && token_header != Some(n);
        if headers.iter().any(|(n, _)| strip(n)) {
            for (name, _) in headers.iter().filter(|(n, _)| strip(n)) {
                host::remove_request_header(name);
            }
            headers.retain(|(n, _)| !strip(n));
        }
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str());
        let mut connector = host::upstream_cluster();
        // The mTLS peer, read only when an exemption (of the candidate's too) names peers.
        let names_peers = |p: &CompiledPolicy| p.exemptions.iter().any(|e| !e.peers.is_empty());
        let peer = if worker.policy.as_deref().is_some_and(names_peers)
            || worker.shadow.as_ref().is_some_and(|s| names_peers(&s.policy))
        {
            host::peer_uri_san()
        } else {
            None
        };
        let gateway_region = worker.gateway_region.clone();
        let fleet = worker.fleet.clone();
        let request = Request {
            method: header(":method"),
            host: header(":authority"),
            path: header(":path"),
            connector: connector.as_deref(),
            request_id: header("x-request-id"),
            headers: &headers,
            gateway_region: gateway_region.as_deref(),
            fleet: fleet.as_deref(),
            peer: peer.as_deref(),
        };

        let Some(policy) = worker.policy.clone() else {
            if worker.failure_mode == FailureMode::Open {
                return Action::Continue;
            }
            let denial = policy_unavailable();
            let cx = line_context(&request, "", None);
            return self.deny(&mut worker, &denial, None, &cx, now);
        };
        let Worker { tokens, shadow, .. } = &mut *worker;
        // The candidate first, so that it finds the quota buckets as the enforced policy is about
        // to; it writes none. No candidate: one branch, nothing else.
        // A request of an app and a dataset the candidate leaves as they are (and nothing else
        // differs) is decided alike by both: decided once, its outcome counted for both.
        let candidate = match shadow {
            None => None,
            Some(s) => {
                let alike =
                    s.differ.as_ref().is_some_and(|d| decided_alike(&s.policy, d, &request, now, &mut s.tokens));
                if alike {
                    Some((None, None, &mut s.counts))
                } else {
                    let store = &mut ReadOnlyStore(&mut host::SharedData);
                    let d = decide(&s.policy, &request, now, store, &mut s.tokens);
                    Some((Some(outcome(&d)), d.app.map(|a| a.id.as_str()), &mut s.counts))
                }
            }
        };
        let decision = decide(&policy, &request, now, &mut host::SharedData, tokens);
        if let Some((code, candidate_app, counts)) = candidate {
            let app = decision.app.map(|a| a.id.as_str()).or(candidate_app).unwrap_or_default();
            let enforced = outcome(&decision);
            counts.record(app, enforced, code.unwrap_or(enforced));
        }
        let app = decision.app.and_then(|a| policy.app_index(&a.id));
        let judged_dataset = decision.dataset;
        let action = self.enforce(&mut worker, &policy, decision, &request, now);
        if let (Action::Continue, Some(app)) = (&action, app) {
            let dataset = judged_dataset.and_then(|d| policy.datasets.iter().position(|x| std::ptr::eq(x, d)));
            let parts = [request.request_id, request.method, request.host, request.path];
            let mut line = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
            for part in parts {
                line.push_str(part);
                line.push('\n');
            }
            self.routed = Some(Routed { policy, app, connector: connector.take(), request: line, dataset });
        }
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(routed) = self.routed.take() {
            if let Some(denial) = reroute_denial(&routed) {
                self.ratelimit = None;
                let app = routed.policy.apps.get(routed.app).map(|a| a.id.as_str());
                let worker = Rc::clone(&self.worker);
                let mut worker = worker.borrow_mut();
                let mut parts = routed.request.split('\n');
                let mut part = || parts.next().unwrap_or_default();
                let cx = LineContext {
                    request_id: part(),
                    method: part(),
                    host: part(),
                    path: part(),
                    revision: &routed.policy.revision,
                    dataset: routed.dataset.and_then(|i| routed.policy.datasets.get(i)).map(|d| d.id.as_str()),
                    connector: routed.connector.as_deref(),
                };
                return self.deny(&mut worker, &denial, app, &cx, host::now_ns());
            }
        }
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
        worker: &mut Worker,
        policy: &CompiledPolicy,
        decision: Decision<'_>,
        request: &Request<'_>,
        now: u64,
    ) -> Action {
        let app_id = decision.app.map(|a| a.id.as_str());
        let dataset = decision.dataset;
        let cx = line_context(request, &policy.revision, dataset.map(|d| d.id.as_str()));
        for event in &decision.events {
            host::warn(&event_log_line(event, app_id, &cx));
            match event {
                Event::SoftLimit { .. } => {
                    worker.metrics.soft_limit();
                    worker.count(app_id, now, |u| u.soft_limit = u.soft_limit.saturating_add(1));
                }
                Event::Shadow { .. } => worker.metrics.shadow(),
            }
        }
        if let Some(dataset) = dataset {
            host::set_filter_state("guardrail_dataset", &dataset.id);
        }
        if let Some(token) = &decision.token {
            // For `guardrail replay`: what a JIT check reads of the token, never the token.
            host::set_filter_state("guardrail_token", &token_summary(token));
        }
        if let Some(denial) = &decision.denial {
            return self.deny(worker, denial, app_id, &cx, now);
        }
        if let Some(pass) = &decision.pass {
            // Exempt or a preflight: no app, no quota, nothing added for the upstream.
            worker.metrics.passed(pass);
            if let Pass::Exempt(id) = pass {
                let name = format!("{}{id}", control::EXEMPT_PREFIX);
                worker.count(Some(&name), now, |u| u.allowed = u.allowed.saturating_add(1));
            }
            host::set_filter_state("guardrail_code", pass.code());
            return Action::Continue;
        }
        if let Some(app) = decision.app {
            host::set_request_header("x-guardrail-app", &app.id);
            host::set_filter_state("guardrail_app", &app.id);
            // The API key was for Guardrail: the upstream gets the verified app, never the secret.
            // (A host call only when there is one to remove.)
            if request.header_values(&policy.settings.api_key_header).next().is_some() {
                host::remove_request_header(&policy.settings.api_key_header);
            }
            if let Some(dataset) = dataset.filter(|d| is_sensitive(d.classification)) {
                let jti = decision.token.as_ref().and_then(|t| t.claims.get("jti")).and_then(|j| j.as_str());
                host::info(&access_log_line(&app.id, dataset.classification.as_str(), jti, &cx));
            }
        }
        // Guardrail's own token stays with Guardrail unless the policy forwards it (a value that
        // is not Guardrail's is never touched).
        if decision.token.is_some() && !policy.settings.forward_token {
            host::remove_request_header(&policy.settings.token_header);
        }
        host::set_filter_state("guardrail_code", "allow");
        if let Some(tier) = decision.tier {
            host::set_request_header("x-guardrail-tier", tier);
        }
        // The upstream gets the path Guardrail judged, not another spelling of it.
        if let Some(target) = guardrail_core::path::rewritten_target(request.path) {
            host::set_request_header(":path", &target);
        }
        self.ratelimit = decision.quota.map(|(limits, usage)| ratelimit_headers(&limits, &usage));
        worker.metrics.allowed();
        worker.count(app_id, now, |u| u.count_allowed(request.connector));
        Action::Continue
    }

    fn deny(
        &mut self,
        worker: &mut Worker,
        denial: &Denial,
        app: Option<&str>,
        cx: &LineContext<'_>,
        now: u64,
    ) -> Action {
        host::info(&denial_log_line(denial, app, cx));
        worker.metrics.denied(denial.code);
        let fleet_budget = denial.rule.as_deref() == Some("fleet-budget");
        worker.count(app, now, |u| {
            u.count_denied(denial.code);
            u.fleet_budget = u.fleet_budget.saturating_add(u32::from(fleet_budget));
        });
        if let Some(fingerprint) = &denial.key_fingerprint {
            worker.count_caller(Callers::API_KEY, fingerprint, now);
        } else if let (Code::AppNotRegistered, Some(named)) = (denial.code, &denial.app) {
            // As the companion takes them (an app id's length, no control characters); another
            // is in the denial log only.
            let reportable =
                named.len() <= guardrail_core::compile::MAX_APP_ID_LEN && !named.chars().any(char::is_control);
            if reportable && !named.is_empty() {
                worker.count_caller(Callers::APP, named, now);
            }
        }
        if let Some(app) = denial.named_app(app) {
            host::set_filter_state("guardrail_app", app);
        }
        host::set_filter_state("guardrail_code", denial.code.as_str());
        let body = problem_body(denial, cx.request_id, app);
        host::send_response(denial.code.status(), &denial_headers(denial), &body);
        Action::Pause
    }
}

/// A verified token as the access log shows it: its scopes, space-separated, and its lifetime
/// (`exp - iat`, when it has `iat`): `dataset:payments;ttl=600`.
fn token_summary(token: &VerifiedToken) -> String {
    let mut out = token.scopes.join(" ");
    if let Some(iat) = token.iat {
        out.push_str(";ttl=");
        out.push_str(&(token.exp - iat).to_string());
    }
    out
}

fn is_sensitive(class: Classification) -> bool {
    matches!(class, Classification::Confidential | Classification::Regulated)
}

/// What the decision-log lines of a request say of it.
fn line_context<'a>(request: &Request<'a>, revision: &'a str, dataset: Option<&'a str>) -> LineContext<'a> {
    LineContext {
        request_id: request.request_id,
        revision,
        method: request.method,
        host: request.host,
        path: request.path,
        dataset,
        connector: request.connector,
    }
}

/// The denial for an admitted request that Envoy routed, after Guardrail changed its headers, to a
/// cluster the app may not reach (see [`Routed`]); `None` when it went where it was judged to go,
/// or somewhere the app may go as well. Then the upstream has seen the request, but its response
/// is withheld: the client gets 403 `connector-not-approved` instead.
fn reroute_denial(routed: &Routed) -> Option<Denial> {
    let cluster = host::upstream_cluster();
    if cluster == routed.connector {
        return None;
    }
    let cluster = cluster?;
    let app = routed.policy.apps.get(routed.app)?;
    let now_secs = i64::try_from(host::now_ns() / 1_000_000_000).unwrap_or(i64::MAX);
    let mut denial = check_connector(&routed.policy, app, &cluster, now_secs).err()?;
    denial.detail = format!(
        "{}: Envoy routed the request to `{cluster}` after Guardrail changed its headers (it was judged for `{}`); \
         the upstream's response is withheld. Routes must not match on x-guardrail-*, the API key header or \
         a path spelling Guardrail normalises",
        denial.detail,
        routed.connector.as_deref().unwrap_or("no cluster"),
    )
    .into();
    Some(denial)
}
