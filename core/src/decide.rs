//! `decide()`: one request in, one [`Decision`] out, the same in Envoy and in the CLI.
//! The checks run in the SPEC's order and the first failure wins.

use crate::compile::{App, CompiledPolicy, Dataset, Limits, Rule};
use crate::fleet::Fleet;
use crate::jwt::{verify, TokenCache, VerifiedToken};
use crate::path::normalize_path;
use crate::quota::{take, CounterStore, QuotaOutcome, Usage};
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
}

impl Denial {
    pub fn new(code: Code, detail: impl Into<Cow<'static, str>>) -> Self {
        Denial { code, detail: detail.into(), rule: None, app: None, retry_after_secs: None, www_authenticate: None }
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

/// The verdict on one request.
#[derive(Debug, Clone)]
pub struct Decision<'p> {
    pub denial: Option<Denial>,
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
/// listed in `connectors.approved` and among the app's `connectors`. The filter also calls it
/// when Envoy routed the request to another cluster than the one `decide()` judged.
pub fn check_connector(policy: &CompiledPolicy, app: &App, connector: &str) -> Result<(), Denial> {
    let Some(&index) = policy.approved_connectors.get(connector) else {
        return Err(Denial::new(
            Code::ConnectorNotApproved,
            format!("connector `{connector}` is not in connectors.approved"),
        )
        .rule("connector"));
    };
    if !app.lists_connector(index, connector) {
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

    // --- credential and catalog ---
    let (app, bearer) = match assume_app {
        None => authenticate(policy, req, now_secs, tokens, t)?,
        Some(id) => {
            let app = policy.app(id).ok_or_else(|| not_registered(id))?;
            t.note("credential", || format!("assumed app `{id}` (explain/test only)"));
            let bearer = req.header_values("authorization").next().and_then(bearer_token);
            let bearer = bearer.and_then(|b| match verified_token(policy, b, now_secs, tokens) {
                Ok(verified) => Some(verified),
                Err(e) => {
                    t.note("token", || format!("ignored: {}", e.detail));
                    None
                }
            });
            (app, bearer)
        }
    };
    d.app = Some(app);
    d.tier = policy.tier_of(app).map(|tier| tier.name.as_str());

    // --- lifecycle ---
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
    t.note("lifecycle", || format!("{:?} in {:?}: active", app.lifecycle, app.environment).to_lowercase());

    // --- connector: the Envoy cluster the request is routed to ---
    if let Some(connector) = req.connector {
        check_connector(policy, app, connector)?;
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
        return Err(Denial::new(
            Code::AccessDenied,
            format!("app `{}` may not access {} data (data_classes)", app.id, ds.classification.as_str()),
        )
        .rule("data-class"));
    }

    // --- quota: rate, then daily budget ---
    let Some(limits) = policy.limits(app, now_secs) else {
        return Err(Denial::new(Code::QuotaExceeded, "the app's tier has no limits").rule("rate"));
    };
    let today = now_ns / NANOS_PER_SEC / crate::time::SECS_PER_DAY;
    if req.fleet.is_some_and(|f| f.is_exhausted(&app.id, today)) {
        return Err(Denial {
            retry_after_secs: Some(crate::time::SECS_PER_DAY - (now_ns / NANOS_PER_SEC) % crate::time::SECS_PER_DAY),
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
        QuotaOutcome::RateLimited { retry_after_secs } => Err(Denial {
            retry_after_secs: Some(retry_after_secs),
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
        QuotaOutcome::BudgetExhausted { retry_after_secs } => Err(Denial {
            retry_after_secs: Some(retry_after_secs),
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

fn check_residency(policy: &CompiledPolicy, req: &Request<'_>, app: &App, ds: &Dataset) -> Result<(), Denial> {
    let residency = |detail: String| Err(Denial::new(Code::ResidencyViolation, detail).rule("residency"));
    if !ds.allows_region_of(app) {
        return residency(format!("app region `{}` is not allowed for dataset `{}`", app.region, ds.id));
    }
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
    let mut evaluation = policy.cel.evaluation(Input {
        app: abac.app,
        tier: policy.tier_of(abac.app).map_or("", |tier| tier.name.as_str()),
        dataset,
        method: abac.method,
        host: req.host,
        path: abac.path,
        headers: req.headers,
        token: abac.token,
    });
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
        let result = evaluation.eval(&rule.expr);
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

/// Finds the app from the request's credentials: an API key (by digest) and/or a bearer token.
/// When both are sent they must name the same app.
fn authenticate<'p>(
    policy: &'p CompiledPolicy,
    req: &Request<'_>,
    now_secs: i64,
    tokens: &mut TokenCache,
    t: &mut Tracer,
) -> Result<(&'p App, Option<Arc<VerifiedToken>>), Denial> {
    let mut keys = req.header_values(&policy.settings.api_key_header);
    let key = keys.next();
    if keys.next().is_some() {
        return Err(unauthenticated(format!("more than one `{}` header", policy.settings.api_key_header)));
    }
    let mut auths = req.header_values("authorization");
    let auth = auths.next();
    if auths.next().is_some() {
        return Err(unauthenticated("more than one Authorization header"));
    }

    let key_app = match key {
        Some(k) => match policy.app_by_api_key(k.trim()) {
            Some(app) => {
                t.note("credential", || format!("API key of app `{}`", app.id));
                Some(app)
            }
            None => return Err(unauthenticated("unknown API key")),
        },
        None => None,
    };
    let mut bearer = None;
    let token_app = match auth {
        Some(value) => {
            // A refused token sent with a valid API key: the key's app is known, and named.
            let named = |denial: Denial| match key_app {
                Some(app) => denial.app(app.id.as_str()),
                None => denial,
            };
            let token = bearer_token(value)
                .ok_or_else(|| named(unauthenticated("Authorization must use the Bearer scheme")))?;
            let verified = verified_token(policy, token, now_secs, tokens).map_err(named)?;
            t.note("credential", || {
                format!("bearer token of issuer `{}` for app `{}`", issuer_name(policy, &verified), verified.app)
            });
            let app = policy.app_of_token(&verified).ok_or_else(|| not_registered(&verified.app))?;
            bearer = Some(verified);
            Some(app)
        }
        None => None,
    };
    match (key_app, token_app) {
        (Some(a), Some(b)) if a.id != b.id => {
            Err(unauthenticated("the API key and the bearer token name different apps"))
        }
        (Some(app), _) | (None, Some(app)) => Ok((app, bearer)),
        (None, None) => Err(unauthenticated(format!(
            "no credential: send an API key in `{}` or `Authorization: Bearer <token>`",
            policy.settings.api_key_header
        ))),
    }
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
