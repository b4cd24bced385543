//! `decide()`: one request in, one [`Decision`] out, the same in Envoy and in the CLI.
//! The checks run in the SPEC's order and the first failure wins.

use crate::compile::{App, CompiledPolicy, Dataset, Limits, Rule};
use crate::exempt::Exemption;
use crate::fleet::Fleet;
use crate::jwt::{verify, TokenCache, VerifiedToken};
use crate::path::normalize_path;
use crate::quota::{peek, take, CounterStore, QuotaOutcome, Usage};
use crate::raw::Classification;
use crate::raw::{Effect, RuleMode};
use crate::raw::{Environment, Lifecycle};
use crate::rules::Input;
use crate::time::NANOS_PER_SEC;
use std::borrow::Cow;
use std::sync::Arc;

/// The request attributes `decide()` reads. Header names are lower-case, as Envoy gives them.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The Envoy cluster the request is routed to, when known.
    pub connector: Option<&'a str>,
    pub request_id: &'a str,
    pub headers: &'a [(String, String)],
    /// This gateway's region when the Envoy configuration sets it (else `settings.gateway_region`).
    pub gateway_region: Option<&'a str>,
    /// Apps the companion reports as out of budget across the whole fleet today.
    pub fleet: Option<&'a Fleet>,
    /// The downstream mTLS peer's identity as Envoy reports it (the first URI SAN of the client
    /// certificate), never from a header. Only read by exemptions that list `peers`.
    pub peer: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// Every value of header `name` (lower-case).
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.headers.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why a request is refused: the `<code>` of `urn:guardrail:problem:<code>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    PolicyUnavailable,
    InvalidPath,
    Unauthenticated,
    AppNotRegistered,
    AppNotActive,
    ConnectorNotApproved,
    ResidencyViolation,
    JitRequired,
    AccessDenied,
    QuotaExceeded,
    BudgetExhausted,
}

impl Code {
    pub const ALL: [Code; 11] = [
        Code::PolicyUnavailable,
        Code::InvalidPath,
        Code::Unauthenticated,
        Code::AppNotRegistered,
        Code::AppNotActive,
        Code::ConnectorNotApproved,
        Code::ResidencyViolation,
        Code::JitRequired,
        Code::AccessDenied,
        Code::QuotaExceeded,
        Code::BudgetExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::PolicyUnavailable => "policy-unavailable",
            Code::InvalidPath => "invalid-path",
            Code::Unauthenticated => "unauthenticated",
            Code::AppNotRegistered => "app-not-registered",
            Code::AppNotActive => "app-not-active",
            Code::ConnectorNotApproved => "connector-not-approved",
            Code::ResidencyViolation => "residency-violation",
            Code::JitRequired => "jit-required",
            Code::AccessDenied => "access-denied",
            Code::QuotaExceeded => "quota-exceeded",
            Code::BudgetExhausted => "budget-exhausted",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Code::PolicyUnavailable => 503,
            Code::InvalidPath => 400,
            Code::Unauthenticated => 401,
            Code::QuotaExceeded | Code::BudgetExhausted => 429,
            _ => 403,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Code::PolicyUnavailable => "No governance policy is loaded",
            Code::InvalidPath => "The request path cannot be normalised safely",
            Code::Unauthenticated => "The app could not be authenticated",
            Code::AppNotRegistered => "The app is not registered in the catalog",
            Code::AppNotActive => "The app is not active",
            Code::ConnectorNotApproved => "The upstream connector is not approved for this app",
            Code::ResidencyViolation => "The data may not be accessed from this region",
            Code::JitRequired => "A just-in-time credential scoped to this dataset is required",
            Code::AccessDenied => "Access denied by policy",
            Code::QuotaExceeded => "The app's rate limit is exceeded",
            Code::BudgetExhausted => "The app's daily budget is spent",
        }
    }
}

/// A refusal with everything the response and the decision log need.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub code: Code,
    pub detail: Cow<'static, str>,
    pub rule: Option<String>,
    /// The app a verified credential names when the decision has no authenticated app: a token's
    /// app that is not in the catalog (`app-not-registered`), or the API key's app when the bearer
    /// token sent with it is refused. See [`Denial::named_app`].
    pub app: Option<String>,
    pub retry_after_secs: Option<u64>,
    pub www_authenticate: Option<String>,
    /// For an unknown API key: the first 8 hex digits of its SHA-256, to tell callers apart in
    /// the log without the key.
    pub key_fingerprint: Option<String>,
    /// Limits and usage of a throttled app, for the `RateLimit` fields of its 429.
    pub quota: Option<Box<(Limits, Usage)>>,
}

impl Denial {
    pub fn new(code: Code, detail: impl Into<Cow<'static, str>>) -> Self {
        Denial {
            code,
            detail: detail.into(),
            rule: None,
            app: None,
            retry_after_secs: None,
            www_authenticate: None,
            key_fingerprint: None,
            quota: None,
        }
    }

    fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    fn app(mut self, app: impl Into<String>) -> Self {
        self.app = Some(app.into());
        self
    }

    /// The app to name in the problem body and the decision log: the authenticated app, else the
    /// one a verified credential names ([`Denial::app`]).
    pub fn named_app<'a>(&'a self, authenticated: Option<&'a str>) -> Option<&'a str> {
        authenticated.or(self.app.as_deref())
    }
}

/// Something worth a log line and a counter that does not change the verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Usage passed `soft_limit_ratio` of the bucket (`rate`) or of the daily budget (`daily`).
    SoftLimit { quota: &'static str },
    /// A `mode: shadow` rule would have denied (`error` when its expression failed); `detail` is
    /// what the denial would have said (the rule's message).
    Shadow { rule: String, detail: String, error: Option<String> },
}

/// Why a request passes without an app: nothing is checked beyond the path, no quota is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// It matched the exemption with this id.
    Exempt(String),
    /// A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) without any
    /// credential: browsers never send credentials on one.
    Preflight,
}

impl Pass {
    /// What the access log's `guardrail_code` says.
    pub fn code(&self) -> &'static str {
        match self {
            Pass::Exempt(_) => "exempt",
            Pass::Preflight => "preflight",
        }
    }
}

/// The verdict on one request.
#[derive(Debug, Clone)]
pub struct Decision<'p> {
    pub denial: Option<Denial>,
    /// Admitted without an app (exemption, preflight); `app` is then `None`.
    pub pass: Option<Pass>,
    /// Guardrail's verified bearer token, when the request carried one (the filter removes its
    /// header unless `forward_token`; its `jti` goes in the audit line of sensitive access).
    pub token: Option<Arc<VerifiedToken>>,
    /// The authenticated app, when known (also on most denials).
    pub app: Option<&'p App>,
    pub tier: Option<&'p str>,
    pub dataset: Option<&'p Dataset>,
    /// Limits and usage of an admitted request, for the `RateLimit` headers.
    pub quota: Option<(Limits, Usage)>,
    pub events: Vec<Event>,
    /// One line per check, filled only by [`decide_traced`].
    pub trace: Vec<String>,
}

impl<'p> Decision<'p> {
    pub fn allowed(&self) -> bool {
        self.denial.is_none()
    }

    /// The app to name in the response and the decision log ([`Denial::named_app`]).
    pub fn app_id(&self) -> Option<&str> {
        let authenticated = self.app.map(|a| a.id.as_str());
        match &self.denial {
            Some(denial) => denial.named_app(authenticated),
            None => authenticated,
        }
    }

    /// Ids of the shadow rules that would have denied this request.
    pub fn shadow_rules(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Shadow { rule, .. } => Some(rule.as_str()),
                Event::SoftLimit { .. } => None,
            })
            .collect()
    }

    fn new() -> Self {
        Decision {
            denial: None,
            pass: None,
            token: None,
            app: None,
            tier: None,
            dataset: None,
            quota: None,
            events: Vec::new(),
            trace: Vec::new(),
        }
    }
}

/// The decision to take when no valid policy is loaded.
pub fn policy_unavailable() -> Denial {
    Denial::new(
        Code::PolicyUnavailable,
        "no valid governance policy is loaded; requests are refused (failure_mode: closed)",
    )
}

/// The connector step on its own: whether `app` may reach `connector` (an Envoy cluster name):
/// listed in `connectors.approved` and among the app's `connectors`, or excepted for the app until
/// after `now_secs` (`connector_exceptions`: looked at only when the catalog refuses). The filter also calls it
/// when Envoy routed the request to another cluster than the one `decide()` judged.
pub fn check_connector(policy: &CompiledPolicy, app: &App, connector: &str, now_secs: i64) -> Result<(), Denial> {
    let Some(&index) = policy.approved_connectors.get(connector) else {
        if app.excepted_connector(connector, now_secs) {
            return Ok(());
        }
        return Err(Denial::new(
            Code::ConnectorNotApproved,
            format!("connector `{connector}` is not in connectors.approved"),
        )
        .rule("connector"));
    };
    if !app.lists_connector(index, connector) && !app.excepted_connector(connector, now_secs) {
        return Err(Denial::new(
            Code::ConnectorNotApproved,
            format!("connector `{connector}` is not among app `{}`'s connectors", app.id),
        )
        .rule("connector"));
    }
    Ok(())
}

/// Judges one request. `now_ns` is Unix time in nanoseconds; `store` holds the shared quota state;
/// `tokens` is the per-worker cache of verified tokens.
pub fn decide<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
) -> Decision<'p> {
    run(policy, req, now_ns, store, tokens, false, None)
}

/// As [`decide`], also recording a readable line for every check (for `explain` and `test`).
pub fn decide_traced<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
) -> Decision<'p> {
    run(policy, req, now_ns, store, tokens, true, None)
}

/// As [`decide_traced`], but for an app named by id instead of by the request's credential: the
/// credential step is skipped and reported as assumed. For `guardrail explain --app` and policy
/// tests only; the filter never calls it (identity there comes only from a verified credential).
/// A bearer token in the request still counts for JIT and `token` in rules, if it verifies.
pub fn decide_as<'p>(
    policy: &'p CompiledPolicy,
    app_id: &str,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
) -> Decision<'p> {
    run(policy, req, now_ns, store, tokens, true, Some(app_id))
}

/// As [`decide_as`] without the trace: for `guardrail replay`, which judges every request of an
/// access log as the app it recorded (credentials are never logged). Never called by the filter.
pub fn decide_as_untraced<'p>(
    policy: &'p CompiledPolicy,
    app_id: &str,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
) -> Decision<'p> {
    run(policy, req, now_ns, store, tokens, false, Some(app_id))
}

struct Tracer {
    on: bool,
    lines: Vec<String>,
}

impl Tracer {
    fn note(&mut self, check: &str, what: impl FnOnce() -> String) {
        if self.on {
            self.lines.push(format!("{check:<10} {}", what()));
        }
    }
}

fn run<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
    trace: bool,
    assume_app: Option<&str>,
) -> Decision<'p> {
    let mut t = Tracer { on: trace, lines: Vec::new() };
    let mut d = Decision::new();
    let result = checks(policy, req, now_ns, store, tokens, assume_app, &mut d, &mut t);
    if let Err(denial) = result {
        t.note("verdict", || format!("DENY {} ({}): {}", denial.code.status(), denial.code.as_str(), denial.detail));
        d.denial = Some(denial);
    } else {
        t.note("verdict", || "ALLOW".to_string());
    }
    d.trace = t.lines;
    d
}

#[allow(clippy::too_many_arguments)]
fn checks<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_ns: u64,
    store: &mut dyn CounterStore,
    tokens: &mut TokenCache,
    assume_app: Option<&str>,
    d: &mut Decision<'p>,
    t: &mut Tracer,
) -> Result<(), Denial> {
    let now_secs = i64::try_from(now_ns / NANOS_PER_SEC).unwrap_or(i64::MAX);
    t.note("policy", || format!("revision {}", if policy.revision.is_empty() { "(none)" } else { &policy.revision }));

    // --- request: the path must normalise safely before anything is matched against it ---
    let path = normalize_path(req.path).map_err(|e| {
        Denial::new(Code::InvalidPath, format!("{e}: refused rather than matched unsafely")).rule("path")
    })?;
    t.note("path", || format!("{} normalised to {path}", req.path));
    // A Host that is really two (Envoy joins repeated Host headers with a comma) or carries
    // whitespace, userinfo or control characters cannot be matched to a dataset safely.
    if req.host.bytes().any(|b| b.is_ascii_control() || matches!(b, b',' | b' ' | b'@' | b'/' | b'\\')) {
        return Err(Denial::new(
            Code::InvalidPath,
            "the Host header cannot be matched safely (several hosts, whitespace or control characters)",
        )
        .rule("host"));
    }

    // Methods are matched and given to rules in upper case: HTTP/2 lets a client send `delete`,
    // and an upstream that reads methods case-insensitively must not see it slip past a rule.
    let method: Cow<'_, str> = if req.method.bytes().any(|b| b.is_ascii_lowercase()) {
        Cow::Owned(req.method.to_ascii_uppercase())
    } else {
        Cow::Borrowed(req.method)
    };

    // --- exemptions: known callers by route and/or mTLS peer, never for sensitive data ---
    if !policy.exemptions.is_empty() {
        if let Some((exemption, dataset)) = exemption_for(policy, req, &method, &path) {
            d.dataset = dataset.and_then(|i| policy.datasets.get(i));
            d.pass = Some(Pass::Exempt(exemption.id.clone()));
            t.note("exemption", || format!("`{}`: passes without an app credential, takes no quota", exemption.id));
            return Ok(());
        }
    }

    // --- credential and catalog ---
    let (app, bearer) = match assume_app {
        None => match authenticate(policy, req, now_secs, tokens, t)? {
            Some(found) => found,
            None if is_preflight(req, &method) => {
                d.pass = Some(Pass::Preflight);
                t.note("preflight", || "a CORS preflight without credentials: passes".to_string());
                return Ok(());
            }
            None => return Err(no_credential(policy)),
        },
        Some(id) => {
            let app = policy.app(id).ok_or_else(|| not_registered(id))?;
            t.note("credential", || format!("assumed app `{id}` (explain/test only)"));
            let mut values = req.header_values(&policy.settings.token_header);
            let bearer = match values.next().map(|v| guardrail_token(policy, v, now_secs, tokens)) {
                Some(Ok(Some(verified))) => Some(verified),
                Some(Ok(None)) => {
                    t.note("token", || "not Guardrail's: left to the upstream".to_string());
                    None
                }
                Some(Err(e)) => {
                    t.note("token", || format!("ignored: {}", e.detail));
                    None
                }
                None => None,
            };
            (app, bearer)
        }
    };
    d.token.clone_from(&bearer);
    d.app = Some(app);
    d.tier = policy.tier_of(app).map(|tier| tier.name.as_str());

    // --- lifecycle (and attestation) ---
    check_lifecycle(app, now_secs)?;
    t.note("lifecycle", || format!("{:?} in {:?}: active", app.lifecycle, app.environment).to_lowercase());

    // --- connector: the Envoy cluster the request is routed to ---
    if let Some(connector) = req.connector {
        check_connector(policy, app, connector, now_secs)?;
        t.note("connector", || format!("`{connector}` approved for the app"));
    } else {
        t.note("connector", || "no upstream cluster (local reply): nothing to check".to_string());
    }

    // --- dataset, residency, JIT, least privilege ---
    let dataset_index = policy.dataset_for(req.host, &method, &path);
    let dataset = dataset_index.and_then(|i| policy.datasets.get(i));
    d.dataset = dataset;
    let token = bearer.as_deref();
    // The data-class check is the first of the ABAC step: its denial wins, but the shadow rules
    // in scope are still evaluated (see `check_rules`).
    let class_denied = match dataset {
        None => {
            t.note("dataset", || "none matched: dataset checks do not apply".to_string());
            false
        }
        Some(ds) => {
            t.note("dataset", || format!("`{}` ({})", ds.id, ds.classification.as_str()));
            check_residency(policy, req, app, ds)?;
            t.note("residency", || format!("app region `{}` allowed for `{}`", app.region, ds.id));
            if ds.requires_jit {
                check_jit(policy, app, ds, token)?;
                t.note("jit", || format!("token scoped `dataset:{}`", ds.id));
            }
            let allowed = app.may_access(ds.classification);
            t.note("data-class", || {
                let among = if allowed { "among" } else { "not among" };
                format!("{} is {among} the app's data classes", ds.classification.as_str())
            });
            !allowed
        }
    };

    // --- ABAC rules in CEL ---
    let abac = Abac { method: &method, path: &path, app, dataset: dataset_index, token };
    check_rules(policy, req, &abac, class_denied, d, t)?;
    if let Some(ds) = dataset.filter(|_| class_denied) {
        check_data_class(app, ds)?;
    }

    // --- quota: rate, then daily budget ---
    let Some(limits) = policy.limits(app, now_secs) else {
        return Err(Denial::new(Code::QuotaExceeded, "the app's tier has no limits").rule("rate"));
    };
    let today = now_ns / NANOS_PER_SEC / crate::time::SECS_PER_DAY;
    if req.fleet.is_some_and(|f| f.is_exhausted(&app.id, today)) {
        let to_midnight = crate::time::SECS_PER_DAY - (now_ns / NANOS_PER_SEC) % crate::time::SECS_PER_DAY;
        let quota = peek(store, &app.quota_key, &limits, now_ns).map(|mut usage| {
            usage.budget_remaining = limits.daily_budget.map(|_| 0);
            Box::new((limits, usage))
        });
        return Err(Denial {
            retry_after_secs: Some(to_midnight),
            quota,
            ..Denial::new(Code::BudgetExhausted, format!("app `{}` spent its daily budget across the fleet", app.id))
                .rule("fleet-budget")
        });
    }
    match take(store, &app.quota_key, &limits, now_ns, policy.settings.soft_limit_ratio) {
        QuotaOutcome::Allowed(usage) => {
            t.note("quota", || {
                format!(
                    "rate {}/{} left; budget {}",
                    usage.rate_remaining,
                    limits.rate.burst,
                    usage.budget_remaining.map_or("unlimited".to_string(), |b| format!("{b} left today"))
                )
            });
            if usage.rate_soft_crossed {
                d.events.push(Event::SoftLimit { quota: "rate" });
            }
            if usage.budget_soft_crossed {
                d.events.push(Event::SoftLimit { quota: "daily" });
            }
            d.quota = Some((limits, usage));
            Ok(())
        }
        QuotaOutcome::RateLimited { retry_after_secs, usage } => Err(Denial {
            retry_after_secs: Some(retry_after_secs),
            quota: Some(Box::new((limits, usage))),
            ..Denial::new(
                Code::QuotaExceeded,
                format!(
                    "app `{}` exceeded {} requests per {}s",
                    app.id,
                    limits.rate.requests,
                    limits.rate.per_ns / NANOS_PER_SEC
                ),
            )
            .rule("rate")
        }),
        QuotaOutcome::BudgetExhausted { retry_after_secs, usage } => Err(Denial {
            retry_after_secs: Some(retry_after_secs),
            quota: Some(Box::new((limits, usage))),
            ..Denial::new(
                Code::BudgetExhausted,
                format!("app `{}` spent its daily budget of {} requests", app.id, limits.daily_budget.unwrap_or(0)),
            )
            .rule("daily-budget")
        }),
        QuotaOutcome::Unavailable => Err(Denial {
            retry_after_secs: Some(1),
            ..Denial::new(
                Code::QuotaExceeded,
                "the quota state could not be updated (contention); refused to stay within quota",
            )
            .rule("quota-store")
        }),
    }
}

/// The lifecycle step on its own: whether `app` may run at `now_secs` — its lifecycle (a draft in
/// dev only; deprecated and quarantined apps never) and its attestation (`review_by` not passed:
/// one comparison of integers).
pub fn check_lifecycle(app: &App, now_secs: i64) -> Result<(), Denial> {
    let active = match app.lifecycle {
        Lifecycle::Approved | Lifecycle::Published => true,
        Lifecycle::Draft => app.environment == Environment::Dev,
        Lifecycle::Deprecated | Lifecycle::Quarantined => false,
    };
    if !active {
        let why = match app.lifecycle {
            Lifecycle::Draft => {
                format!("app `{}` is a draft and may only run in dev (environment: {:?})", app.id, app.environment)
            }
            other => format!("app `{}` is {:?}", app.id, other),
        };
        return Err(Denial::new(Code::AppNotActive, why.to_lowercase()).rule("lifecycle"));
    }
    if now_secs >= app.review_overdue_at_secs {
        let since = app.review_by.as_deref().unwrap_or_default();
        return Err(Denial::new(Code::AppNotActive, format!("app `{}`: review overdue since {since}", app.id))
            .rule("review_by"));
    }
    Ok(())
}

/// Whether the filter would let `app` reach dataset `ds` at `now_secs` on what does not hang on
/// one request: the lifecycle step ([`check_lifecycle`]), the connector step for at least one of
/// the app's connectors ([`check_connector`]; none approved and every upstream request of the app
/// is refused), the app's region among the dataset's `allowed_regions`, and the dataset's class
/// among the app's `data_classes`. The companion's token service asks it before issuing a JIT
/// token; the same functions run in [`decide`], in the same order.
pub fn admit_to_dataset(policy: &CompiledPolicy, app: &App, ds: &Dataset, now_secs: i64) -> Result<(), Denial> {
    check_lifecycle(app, now_secs)?;
    // Ok when one connector passes, else the refusal of the last.
    let reachable = app
        .connectors
        .iter()
        .chain(app.connector_exceptions.iter().map(|e| &e.what))
        .map(|c| check_connector(policy, app, c, now_secs))
        .reduce(Result::or);
    match reachable {
        Some(result) => result?,
        None => {
            return Err(Denial::new(
                Code::ConnectorNotApproved,
                format!("app `{}` lists no connectors, so it reaches no upstream", app.id),
            )
            .rule("connector"))
        }
    }
    check_app_region(app, ds)?;
    check_data_class(app, ds)
}

/// The data-class part of the ABAC step: the dataset's classification among the app's classes.
fn check_data_class(app: &App, ds: &Dataset) -> Result<(), Denial> {
    if app.may_access(ds.classification) {
        return Ok(());
    }
    Err(Denial::new(
        Code::AccessDenied,
        format!("app `{}` may not access {} data (data_classes)", app.id, ds.classification.as_str()),
    )
    .rule("data-class"))
}

/// The residency step's half that concerns the app: its region among the dataset's.
fn check_app_region(app: &App, ds: &Dataset) -> Result<(), Denial> {
    if ds.allows_region_of(app) {
        return Ok(());
    }
    Err(Denial::new(
        Code::ResidencyViolation,
        format!("app region `{}` is not allowed for dataset `{}`", app.region, ds.id),
    )
    .rule("residency"))
}

fn check_residency(policy: &CompiledPolicy, req: &Request<'_>, app: &App, ds: &Dataset) -> Result<(), Denial> {
    check_app_region(app, ds)?;
    let residency = |detail: String| Err(Denial::new(Code::ResidencyViolation, detail).rule("residency"));
    match req.gateway_region.or(policy.settings.gateway_region.as_deref()) {
        None => residency(format!("this gateway's region is unknown, so dataset `{}` cannot be served here", ds.id)),
        Some(region) if !ds.allowed_regions.iter().any(|r| r == region) => {
            residency(format!("gateway region `{region}` is not allowed for dataset `{}`", ds.id))
        }
        Some(_) => Ok(()),
    }
}

fn check_jit(policy: &CompiledPolicy, app: &App, ds: &Dataset, token: Option<&VerifiedToken>) -> Result<(), Denial> {
    let scope = format!("dataset:{}", ds.id);
    let refuse = |detail: String| {
        Err(Denial {
            www_authenticate: Some(format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\"")),
            ..Denial::new(Code::JitRequired, detail).rule("jit")
        })
    };
    let Some(token) = token else {
        return refuse(format!("dataset `{}` needs a just-in-time bearer token scoped `{scope}`", ds.id));
    };
    if token.app != app.id {
        return refuse(format!("the token is for app `{}`, not `{}`", token.app, app.id));
    }
    if !token.scopes.contains(&scope) {
        return refuse(format!("the token's scope lacks `{scope}`"));
    }
    match token.iat {
        Some(iat) if token.exp - iat <= policy.settings.jit_max_ttl_secs => Ok(()),
        Some(iat) => refuse(format!(
            "the token lives {}s; JIT tokens may live at most {}s (settings.jit_max_ttl)",
            token.exp - iat,
            policy.settings.jit_max_ttl_secs
        )),
        None => refuse("a JIT token must carry `iat`".to_string()),
    }
}

/// What the ABAC rules of one request read besides the request itself.
struct Abac<'r> {
    /// Upper case.
    method: &'r str,
    /// Normalised.
    path: &'r str,
    app: &'r App,
    dataset: Option<usize>,
    token: Option<&'r VerifiedToken>,
}

/// Evaluates the in-scope rules: an enforced deny that holds wins; where enforced allow rules are
/// in scope, one must hold; an evaluation error denies, naming the rule. The first enforced rule
/// that denies (in list order) settles the verdict and the later enforced rules are skipped, but
/// every shadow rule in scope is evaluated and reported whatever its place in the list and
/// whatever the verdict. `settled`: the request is denied already (by its data class, which the
/// caller reports): only the shadow rules are evaluated.
fn check_rules<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    abac: &Abac<'_>,
    settled: bool,
    d: &mut Decision<'p>,
    t: &mut Tracer,
) -> Result<(), Denial> {
    let dataset = abac.dataset.and_then(|i| policy.datasets.get(i));
    let mut rules = policy.rules_for(abac.dataset).peekable();
    if rules.peek().is_none() {
        t.note("rules", || "none in scope".to_string());
        return Ok(());
    }
    // The rules read the request in place; only one that needs the interpreter has its
    // variables converted (once per request, see `rules::Evaluation`).
    let input = Input {
        app: abac.app,
        tier: policy.tier_of(abac.app).map_or("", |tier| tier.name.as_str()),
        dataset,
        method: abac.method,
        host: req.host,
        path: abac.path,
        headers: req.headers,
        token: abac.token,
    };
    let mut evaluation = policy.cel.evaluation(input);
    // A header sent more than once: rules that read the request are judged on every view of it
    // in which each header has one of its values (see `HeaderViews`).
    let views = HeaderViews::of(req.headers);
    let mut view_evaluations: Option<Vec<crate::rules::Evaluation<'_>>> = None;
    // Whether enforced allow rules are in scope, and whether one holds.
    let (mut allow_in_scope, mut allowed) = (false, false);
    let mut denied: Option<Denial> = None;
    for rule in rules {
        let shadow = rule.mode == RuleMode::Shadow;
        if (settled || denied.is_some()) && !shadow {
            t.note("rule", || {
                format!("`{}` ({:?}, {:?}): not evaluated (denied already)", rule.id, rule.effect, rule.mode)
                    .to_lowercase()
            });
            continue;
        }
        let result = match &views {
            HeaderViews::Single => evaluation.eval(&rule.expr),
            _ if rule.expr.uses() & crate::rules::USES_REQUEST == 0 => evaluation.eval(&rule.expr),
            HeaderViews::TooMany(n) => Err(format!(
                "the request repeats headers in {n} combinations of values, more than the {MAX_HEADER_VIEWS} \
                 a rule is judged on"
            )),
            HeaderViews::Views(list) => {
                let evaluations = view_evaluations.get_or_insert_with(|| {
                    list.iter().map(|headers| policy.cel.evaluation(Input { headers, ..input })).collect()
                });
                // A deny rule holds if it holds for any one view; an allow rule if it holds for all.
                let any = rule.effect == Effect::Deny;
                let mut verdict = !any;
                let mut failed = None;
                for e in evaluations.iter_mut() {
                    match e.eval(&rule.expr) {
                        Ok(holds) if holds == any => verdict = any,
                        Ok(_) => {}
                        Err(error) => failed = failed.or(Some(error)),
                    }
                }
                failed.map_or(Ok(verdict), Err)
            }
        };
        t.note("rule", || {
            let outcome = match &result {
                Ok(true) => "holds".to_string(),
                Ok(false) => "does not hold".to_string(),
                Err(e) => format!("error: {e}"),
            };
            format!("`{}` ({:?}, {:?}): {outcome}", rule.id, rule.effect, rule.mode).to_lowercase()
        });
        // `Some(error)`: the rule denies (`error` when its expression failed to evaluate).
        let denies: Option<Option<String>> = match (result, rule.effect) {
            (Err(e), _) => Some(Some(e)),
            (Ok(true), Effect::Deny) => Some(None),
            (Ok(false), Effect::Deny) => None,
            (Ok(holds), Effect::Allow) if shadow => (!holds).then_some(None),
            (Ok(holds), Effect::Allow) => {
                allow_in_scope = true;
                allowed |= holds;
                None
            }
        };
        let Some(error) = denies else { continue };
        let detail = rule_denial_detail(rule, error.as_deref());
        if shadow {
            d.events.push(Event::Shadow { rule: rule.id.clone(), detail, error });
        } else {
            denied = Some(Denial::new(Code::AccessDenied, detail).rule(rule.id.clone()));
        }
    }
    if let Some(denial) = denied {
        return Err(denial);
    }
    if allow_in_scope && !allowed && !settled {
        // Every enforced allow rule in scope was evaluated (an error would have denied already).
        let allow_ids: Vec<&str> = policy
            .rules_for(abac.dataset)
            .filter(|r| r.effect == Effect::Allow && r.mode != RuleMode::Shadow)
            .map(|r| r.id.as_str())
            .collect();
        return Err(Denial::new(
            Code::AccessDenied,
            format!("no allow rule holds (in scope: {})", allow_ids.join(", ")),
        )
        .rule(allow_ids.join(",")));
    }
    Ok(())
}

/// The most views of a request's repeated headers a rule is judged on; beyond it, the rules that
/// read the request fail (and so deny) rather than be judged on part of it.
pub const MAX_HEADER_VIEWS: usize = 64;

/// A request's headers as the rules see them. `Single`: no header name is repeated (nearly always).
/// `Views`: one list of headers per combination of the repeated headers' values, each name once;
/// Envoy forwards every value, so a deny rule must not be sidestepped by adding a value next to
/// the one it looks for, nor an allow rule satisfied by one good value among bad ones.
enum HeaderViews {
    Single,
    Views(Vec<Vec<(String, String)>>),
    TooMany(usize),
}

impl HeaderViews {
    fn of(headers: &[(String, String)]) -> HeaderViews {
        let named = |i: usize| headers.get(i).map(|(k, _)| k.as_str()).filter(|k| !k.starts_with(':'));
        let repeated = (0..headers.len()).any(|i| {
            named(i)
                .is_some_and(|k| (i + 1..headers.len()).any(|j| named(j).is_some_and(|o| o.eq_ignore_ascii_case(k))))
        });
        if !repeated {
            return HeaderViews::Single;
        }
        // Names in order of first appearance, each with its values.
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
            let name = k.to_ascii_lowercase();
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, values)) => values.push(v),
                None => groups.push((name, vec![v])),
            }
        }
        let combinations = groups.iter().try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()));
        let n = match combinations {
            Some(n) if n <= MAX_HEADER_VIEWS => n,
            other => return HeaderViews::TooMany(other.unwrap_or(usize::MAX)),
        };
        let pseudo: Vec<(String, String)> = headers.iter().filter(|(k, _)| k.starts_with(':')).cloned().collect();
        let views = (0..n)
            .map(|mut index| {
                let mut view = pseudo.clone();
                for (name, values) in &groups {
                    let len = values.len().max(1);
                    if let Some(value) = values.get(index % len) {
                        view.push((name.clone(), (*value).to_string()));
                    }
                    index /= len;
                }
                view
            })
            .collect();
        HeaderViews::Views(views)
    }
}

/// What a rule that denies says, enforced or in shadow: its `message` (or a default naming it),
/// or the evaluation error.
fn rule_denial_detail(rule: &Rule, error: Option<&str>) -> String {
    match (error, &rule.message) {
        (Some(e), _) => format!("rule `{}` failed to evaluate ({e}); denied", rule.id),
        (None, Some(message)) => message.clone(),
        (None, None) if rule.effect == Effect::Allow => format!("allow rule `{}` does not hold", rule.id),
        (None, None) => format!("denied by rule `{}`", rule.id),
    }
}

/// `app-not-registered`: a verified credential names an app the catalog does not have. The app is
/// named in the response (it is verified, only not catalogued).
fn not_registered(id: &str) -> Denial {
    Denial::new(Code::AppNotRegistered, format!("app `{id}` is not in the catalog")).rule("catalog").app(id)
}

fn unauthenticated(detail: impl Into<Cow<'static, str>>) -> Denial {
    Denial {
        www_authenticate: Some("Bearer".to_string()),
        ..Denial::new(Code::Unauthenticated, detail).rule("credential")
    }
}

/// The app a request's credentials name, with Guardrail's verified token if it carried one.
type Authenticated<'p> = (&'p App, Option<Arc<VerifiedToken>>);

/// The app `req`'s credentials name in `policy`: the identity step of [`decide`] alone (API key
/// and/or Guardrail's token, verified through `tokens`). `None` without a credential Guardrail
/// verifies, or with one it refuses.
pub fn identify<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_ns: u64,
    tokens: &mut TokenCache,
) -> Option<&'p App> {
    let now_secs = i64::try_from(now_ns / NANOS_PER_SEC).unwrap_or(i64::MAX);
    let t = &mut Tracer { on: false, lines: Vec::new() };
    authenticate(policy, req, now_secs, tokens, t).ok().flatten().map(|(app, _)| app)
}

/// Whether `policy` and a candidate that differs from it only where `differ` says
/// ([`crate::shadow::differ`]) decide `req` alike: its app, as the candidate identifies it, and
/// its dataset, as the candidate's routes match it, are in neither of `differ`'s sets. False
/// (decide with both) without an app, or for a path that does not normalise.
pub fn decided_alike(
    candidate: &CompiledPolicy,
    differ: &crate::shadow::Differ,
    req: &Request<'_>,
    now_ns: u64,
    tokens: &mut TokenCache,
) -> bool {
    let Some(app) = identify(candidate, req, now_ns, tokens) else { return false };
    if differ.apps.contains(&app.id) {
        return false;
    }
    if differ.datasets.is_empty() {
        return true;
    }
    let Ok(path) = normalize_path(req.path) else { return false };
    let method: Cow<'_, str> = if req.method.bytes().any(|b| b.is_ascii_lowercase()) {
        Cow::Owned(req.method.to_ascii_uppercase())
    } else {
        Cow::Borrowed(req.method)
    };
    candidate
        .dataset_for(req.host, &method, &path)
        .and_then(|i| candidate.datasets.get(i))
        .is_none_or(|d| !differ.datasets.contains(&d.id))
}

/// Finds the app from the request's credentials: an API key (by digest) and/or Guardrail's bearer
/// token in `settings.identity.token_header`. When both are sent they must name the same app.
/// `Ok(None)`: no credential Guardrail can verify (none at all, or only a token-header value that
/// is not Guardrail's: another scheme, an opaque bearer, a JWT of no configured issuer).
fn authenticate<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_secs: i64,
    tokens: &mut TokenCache,
    t: &mut Tracer,
) -> Result<Option<Authenticated<'p>>, Denial> {
    let settings = &policy.settings;
    let mut keys = req.header_values(&settings.api_key_header);
    let key = keys.next();
    if keys.next().is_some() {
        return Err(unauthenticated(format!("more than one `{}` header", settings.api_key_header)));
    }
    let key_app = match key {
        Some(k) => match policy.app_by_api_key(k.trim()) {
            Some(app) => {
                t.note("credential", || format!("API key of app `{}`", app.id));
                Some(app)
            }
            None => {
                let digest = crate::api_key_digest(k.trim());
                let fingerprint = hex::encode(digest.get(..4).unwrap_or_default());
                return Err(Denial {
                    key_fingerprint: Some(fingerprint.clone()),
                    ..unauthenticated(format!("unknown API key (fingerprint {fingerprint})"))
                });
            }
        },
        None => None,
    };
    // A refused token sent with a valid API key: the key's app is known, and named.
    let named = |denial: Denial| match key_app {
        Some(app) => denial.app(app.id.as_str()),
        None => denial,
    };
    let mut bearer: Option<Arc<VerifiedToken>> = None;
    let mut values = 0;
    for value in req.header_values(&settings.token_header) {
        values += 1;
        let Some(verified) = guardrail_token(policy, value, now_secs, tokens).map_err(named)? else {
            t.note("token", || {
                format!("`{}` holds no token of a configured issuer: left to the upstream", settings.token_header)
            });
            continue;
        };
        if bearer.is_some() || values > 1 {
            return Err(named(unauthenticated(format!("more than one `{}` header", settings.token_header))));
        }
        bearer = Some(verified);
    }
    if bearer.is_some() && values > 1 {
        return Err(named(unauthenticated(format!("more than one `{}` header", settings.token_header))));
    }
    let token_app = match &bearer {
        Some(verified) => {
            t.note("credential", || {
                format!("bearer token of issuer `{}` for app `{}`", issuer_name(policy, verified), verified.app)
            });
            Some(policy.app_of_token(verified).ok_or_else(|| not_registered(&verified.app))?)
        }
        None => None,
    };
    match (key_app, token_app) {
        (Some(a), Some(b)) if a.id != b.id => {
            Err(unauthenticated("the API key and the bearer token name different apps"))
        }
        (Some(app), _) | (None, Some(app)) => Ok(Some((app, bearer))),
        (None, None) => Ok(None),
    }
}

/// 401 for a request without a credential Guardrail can verify.
fn no_credential(policy: &CompiledPolicy) -> Denial {
    let settings = &policy.settings;
    let token = if settings.token_header == "authorization" {
        "`Authorization: Bearer <token>`".to_string()
    } else {
        format!("a token in `{}`", settings.token_header)
    };
    unauthenticated(format!(
        "no credential Guardrail can verify: send an API key in `{}` or {token} of a configured issuer",
        settings.api_key_header
    ))
}

/// Whether the request is a CORS preflight (RFC 9110 `OPTIONS` with the Fetch standard's `Origin`
/// and `Access-Control-Request-Method`).
fn is_preflight(req: &Request<'_>, method: &str) -> bool {
    method == "OPTIONS"
        && req.header_values("origin").next().is_some()
        && req.header_values("access-control-request-method").next().is_some()
}

/// The exemption a request matches, with the dataset it reaches: none when that dataset is
/// `confidential` or `regulated` (`check` refuses such an exemption; this keeps it so whatever
/// the routes).
fn exemption_for<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    method: &str,
    path: &str,
) -> Option<(&'p Exemption, Option<usize>)> {
    let exemption = policy.exemptions.iter().find(|e| e.covers(req.host, method, path, req.peer))?;
    let dataset = policy.dataset_for(req.host, method, path);
    let sensitive = dataset
        .and_then(|i| policy.datasets.get(i))
        .is_some_and(|ds| matches!(ds.classification, Classification::Confidential | Classification::Regulated));
    (!sensitive).then_some((exemption, dataset))
}

/// Guardrail's verified token in a token-header value: `Ok(None)` when the value is not
/// Guardrail's (another scheme, an opaque bearer, a JWT whose `iss` is no configured issuer),
/// which is then left to the upstream; an error when it is a token of a configured issuer that
/// does not verify.
fn guardrail_token(
    policy: &CompiledPolicy,
    value: &str,
    now_secs: i64,
    tokens: &mut TokenCache,
) -> Result<Option<Arc<VerifiedToken>>, Denial> {
    let token = if policy.settings.token_header == "authorization" {
        bearer_token(value)
    } else {
        // The bare JWT; a `Bearer ` prefix is tolerated.
        bearer_token(value).or_else(|| Some(value.trim()).filter(|v| !v.is_empty()))
    };
    let Some(token) = token else { return Ok(None) };
    if let Some(cached) = tokens.get(token, now_secs) {
        return Ok(Some(cached));
    }
    if crate::jwt::claimed_issuer(&policy.issuers, token).is_none() {
        return Ok(None);
    }
    verified_token(policy, token, now_secs, tokens).map(Some)
}

fn issuer_name<'a>(policy: &'a CompiledPolicy, v: &VerifiedToken) -> &'a str {
    policy.issuers.get(v.issuer).map_or("?", |i| i.issuer.as_str())
}

/// `Bearer <token>`, scheme case-insensitive (RFC 9110).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// A verified token from the per-worker cache, verifying (and caching) it on a miss.
fn verified_token(
    policy: &CompiledPolicy,
    token: &str,
    now_secs: i64,
    tokens: &mut TokenCache,
) -> Result<Arc<VerifiedToken>, Denial> {
    if let Some(cached) = tokens.get(token, now_secs) {
        return Ok(cached);
    }
    let mut verified =
        verify(&policy.issuers, token, now_secs).map_err(|e| unauthenticated(format!("invalid token: {e}")))?;
    verified.app_index = policy.app_index(&verified.app);
    Ok(tokens.insert(token, verified))
}
