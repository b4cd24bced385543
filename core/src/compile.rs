//! Parse, then compile: a [`RawPolicy`] becomes a [`CompiledPolicy`] with its indexes built
//! (API-key digest → app, app id → app, tier names resolved, durations and times parsed), or a
//! list of errors that each name the offending field. Nothing bad is dropped silently.

use crate::duration::parse_duration;
use crate::error::{Errors, PolicyError, PolicyErrors};
use crate::exempt::{compile_exemptions, Exemption};
use crate::fasthash::FastMap;
use crate::jwt::{compile_issuer, Issuer};
use crate::path::{normalize_host, path_prefix_problem, route_host_problem, DatasetIndex};
use crate::raw::{
    Classification, Effect, Environment, FailureMode, Lifecycle, RawApp, RawDataset, RawPolicy, RawRate, RawRule,
    RuleMode,
};
use crate::rules::{Cel, Expression, ExpressionCache};
use crate::time::{parse_date, parse_rfc3339, NANOS_PER_SEC};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The longest app id: it ends up in shared-data keys, headers and log lines.
pub const MAX_APP_ID_LEN: usize = 128;

// === Compiled model ===

/// A validated policy with its lookup indexes. Built once per policy revision (per worker in the
/// filter), then read on every request.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub revision: String,
    pub settings: Settings,
    pub issuers: Vec<Issuer>,
    pub tiers: Vec<Tier>,
    /// `connectors.approved`, each with its index in that list.
    pub approved_connectors: FastMap<String, usize>,
    /// `connectors.pricing`: the price of 1,000 admitted requests per connector, in
    /// `settings.currency`.
    pub pricing: std::collections::BTreeMap<String, f64>,
    pub apps: Vec<App>,
    pub datasets: Vec<Dataset>,
    pub rules: Vec<Rule>,
    pub exemptions: Vec<Exemption>,
    pub cel: Cel,
    dataset_index: DatasetIndex,
    app_by_id: FastMap<String, usize>,
    app_by_key_digest: FastMap<[u8; 32], usize>,
    /// For each dataset index, then for requests that reach no dataset (the last entry): the
    /// indexes of the rules in scope ([`Rule::applies_to`]), in policy order.
    rules_in_scope: Vec<Vec<u32>>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway_region: Option<String>,
    pub failure_mode: FailureMode,
    pub soft_limit_ratio: f64,
    pub jit_max_ttl_secs: i64,
    /// Lower-case header name the API key comes in.
    pub api_key_header: String,
    /// Lower-case header name Guardrail's bearer token comes in: `authorization` (as `Bearer
    /// <jwt>`, the default) or another header holding the bare JWT.
    pub token_header: String,
    /// Whether the verified Guardrail token goes on to the upstream (default false).
    pub forward_token: bool,
    /// The currency of `connectors.pricing` (ISO 4217 code, default `USD`).
    pub currency: String,
    /// `settings.approvers`: who may approve self-service requests.
    pub approvers: Vec<Approver>,
    /// `settings.max_request_duration` in seconds (default 90 days).
    pub max_request_secs: i64,
}

/// Someone who may approve self-service requests, recognised by a credential's SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub id: String,
    pub credential: Credential,
}

/// How an approver proves who they are: the SHA-256 of a bearer token (as `guardrail hash-key`
/// prints it), or of a client certificate (DER) presented under mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Token([u8; 32]),
    Certificate([u8; 32]),
}

/// `settings.max_request_duration` when not written.
pub const DEFAULT_MAX_REQUEST_SECS: i64 = 90 * 86_400;

#[derive(Debug, Clone)]
pub struct Tier {
    pub name: String,
    pub rate: Rate,
    pub daily_budget: Option<u64>,
}

/// A token bucket: `requests` per `per_ns`, holding at most `burst` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub per_ns: u64,
    pub burst: u64,
}

impl Rate {
    /// Time for one token to come back, rounded up so that rounding never admits more.
    pub fn interval_ns(&self) -> u64 {
        self.per_ns.div_ceil(self.requests.max(1)).max(1)
    }

    /// Seconds to refill the whole bucket from empty: `burst × per / requests`, rounded up, at
    /// least 1. `burst` requests per this window is the rate the bucket sustains, so it is the
    /// `w` of `RateLimit-Policy` (whose `q` is `burst`), not `per`.
    pub fn window_secs(&self) -> u64 {
        // burst × per / requests ns, rounded up, without a 128-bit division in the filter: with
        // per = q × requests + r and burst = bq × requests + br it is
        // burst × q + bq × r + ⌈br × r / requests⌉, exact for fewer than 2³² requests per `per` and
        // windows of under 584 years (then it saturates).
        let requests = self.requests.max(1);
        let (q, r) = (self.per_ns / requests, self.per_ns % requests);
        let (bq, br) = (self.burst / requests, self.burst % requests);
        let refill_ns = self
            .burst
            .saturating_mul(q)
            .saturating_add(bq.saturating_mul(r))
            .saturating_add(br.saturating_mul(r).div_ceil(requests));
        refill_ns.div_ceil(NANOS_PER_SEC).max(1)
    }
}

#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub department: Option<String>,
    pub environment: Environment,
    pub tier: usize,
    pub lifecycle: Lifecycle,
    pub region: String,
    pub data_classes: Vec<Classification>,
    pub connectors: Vec<String>,
    pub overrides: Vec<QuotaOverride>,
    /// Shared-data key of this app's quota state.
    pub quota_key: String,
    /// `review_by` as written (`YYYY-MM-DD`), for the denial's detail.
    pub review_by: Option<String>,
    /// The first second at which the app is overdue for review (the day after `review_by`, 00:00
    /// UTC); `i64::MAX` without `review_by`, so the request path compares two integers.
    pub review_overdue_at_secs: i64,
    /// The catalog checks of every request as bits, set by [`compile`] (`None`: compare the strings).
    pub masks: Option<AppMasks>,
    /// Connectors it may reach until a time although the catalog does not let it (approved
    /// connector requests); looked at only when the catalog refuses.
    pub connector_exceptions: Vec<Exception>,
    /// Datasets marked `approval: required` the token service may give it JIT tokens for, until a
    /// time (approved access requests).
    pub access_grants: Vec<Exception>,
}

/// A connector exception or an access grant: what (a connector, a dataset), until when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub what: String,
    pub expires_at_secs: i64,
    pub reason: Option<String>,
}

/// An app's connectors, data classes and region as the bits and ids a request is checked against,
/// so that a decision reads them from the app itself rather than from strings behind pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppMasks {
    /// Bit `i`: the app lists `connectors.approved[i]` (for `i` < 64; above, the strings decide).
    pub connectors: u64,
    /// Bit [`Classification::bit`] of each of its data classes.
    pub classes: u8,
    /// The id of its region among the datasets' regions ([`Dataset::region_mask`]); `None` if no
    /// dataset allows it.
    pub region: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct QuotaOverride {
    pub rate: Option<Rate>,
    pub daily_budget: Option<u64>,
    pub expires_at_secs: i64,
    pub reason: Option<String>,
}

/// The limits that apply to an app at one instant (tier defaults, unless an unexpired override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rate: Rate,
    pub daily_budget: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub id: String,
    pub classification: Classification,
    pub owner_department: Option<String>,
    pub allowed_regions: Vec<String>,
    pub routes: Vec<Route>,
    pub requires_jit: bool,
    /// JIT tokens from the companion's token service only within an approved access request.
    pub approval_required: bool,
    /// Bit `id` for each allowed region whose id ([`AppMasks::region`]) is below 64, set by
    /// [`compile`] when all of them are (`None`: compare the strings).
    pub region_mask: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Lower-case host without port or trailing dot; `None` matches any host.
    pub host: Option<String>,
    /// Normalised prefix without trailing slash (`/` for everything).
    pub path_prefix: String,
    /// Upper-case methods; empty means every method.
    pub methods: Vec<String>,
}

#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub effect: Effect,
    pub when: String,
    pub expr: Arc<Expression>,
    pub datasets: Vec<String>,
    pub classifications: Vec<Classification>,
    pub message: Option<String>,
    pub mode: RuleMode,
}

impl Rule {
    /// Whether the rule is in scope for a request reaching `dataset`: its `datasets` and
    /// `classifications` lists, where given, must each name the dataset.
    pub fn applies_to(&self, dataset: Option<&Dataset>) -> bool {
        let by_dataset = self.datasets.is_empty() || dataset.is_some_and(|ds| self.datasets.contains(&ds.id));
        let by_class = self.classifications.is_empty()
            || dataset.is_some_and(|ds| self.classifications.contains(&ds.classification));
        by_dataset && by_class
    }
}

// === impl App, Dataset ===

impl App {
    /// Whether the app lists `connector`, which is `connectors.approved[index]`.
    pub fn lists_connector(&self, index: usize, connector: &str) -> bool {
        let bit = u32::try_from(index).ok().and_then(|i| 1u64.checked_shl(i));
        match (self.masks, bit) {
            (Some(masks), Some(bit)) => masks.connectors & bit != 0,
            _ => self.connectors.iter().any(|c| c == connector),
        }
    }

    /// Whether an exception lets the app reach `connector` at `now_secs`.
    pub fn excepted_connector(&self, connector: &str, now_secs: i64) -> bool {
        self.connector_exceptions.iter().any(|e| e.what == connector && now_secs < e.expires_at_secs)
    }

    /// The grant in force at `now_secs` for `dataset` that lasts longest, if any.
    pub fn access_grant(&self, dataset: &str, now_secs: i64) -> Option<&Exception> {
        self.access_grants
            .iter()
            .filter(|g| g.what == dataset && now_secs < g.expires_at_secs)
            .max_by_key(|g| g.expires_at_secs)
    }

    /// Whether the app may access data of `class` (its `data_classes`).
    pub fn may_access(&self, class: Classification) -> bool {
        match self.masks {
            Some(masks) => masks.classes & class.bit() != 0,
            None => self.data_classes.contains(&class),
        }
    }
}

impl Dataset {
    /// Whether the dataset's `allowed_regions` hold the app's region.
    pub fn allows_region_of(&self, app: &App) -> bool {
        match (app.masks, self.region_mask) {
            (Some(masks), Some(mask)) => {
                masks.region.and_then(|id| 1u64.checked_shl(id)).is_some_and(|bit| mask & bit != 0)
            }
            _ => self.allowed_regions.contains(&app.region),
        }
    }
}

// === impl CompiledPolicy ===

impl CompiledPolicy {
    pub fn app(&self, id: &str) -> Option<&App> {
        self.app_by_id.get(id).and_then(|&i| self.apps.get(i))
    }

    /// The app holding an API key, looked up by the key's SHA-256 digest.
    pub fn app_by_api_key(&self, key: &str) -> Option<&App> {
        let digest = crate::api_key_digest(key);
        self.app_by_key_digest.get(&digest).and_then(|&i| self.apps.get(i))
    }

    /// Index of the dataset a request reaches (`normalized_path` from [`crate::path::normalize_path`]).
    pub fn dataset_for(&self, host: &str, method: &str, normalized_path: &str) -> Option<usize> {
        self.dataset_index.lookup(host, method, normalized_path)
    }

    /// The app a verified token names: at the token's cached index if the app there still has
    /// that id (one comparison instead of a lookup), else by id.
    pub fn app_of_token(&self, token: &crate::jwt::VerifiedToken) -> Option<&App> {
        let hinted = token.app_index.and_then(|i| self.apps.get(i)).filter(|a| a.id == token.app);
        hinted.or_else(|| self.app(&token.app))
    }

    /// The rules in scope for a request that reaches dataset `dataset` (an index), in policy order.
    pub fn rules_for(&self, dataset: Option<usize>) -> impl Iterator<Item = &Rule> + '_ {
        let list = self.rules_in_scope.get(dataset.unwrap_or(self.datasets.len()));
        list.into_iter().flatten().filter_map(|&i| self.rules.get(i as usize))
    }

    /// The API-key digests of every app, by app index, each list sorted (for the catalog: built
    /// once, O(keys), rather than one scan of the key index per app).
    pub fn api_key_digests_by_app(&self) -> Vec<Vec<[u8; 32]>> {
        let mut out = vec![Vec::new(); self.apps.len()];
        for (digest, &i) in &self.app_by_key_digest {
            if let Some(list) = out.get_mut(i) {
                list.push(*digest);
            }
        }
        for list in &mut out {
            list.sort_unstable();
        }
        out
    }

    pub fn app_index(&self, id: &str) -> Option<usize> {
        self.app_by_id.get(id).copied()
    }

    pub fn tier_of(&self, app: &App) -> Option<&Tier> {
        self.tiers.get(app.tier)
    }

    /// The limits in force for `app` at `now_secs`: the first unexpired override for each of rate and
    /// budget, else the tier's.
    pub fn limits(&self, app: &App, now_secs: i64) -> Option<Limits> {
        let tier = self.tier_of(app)?;
        let live = || app.overrides.iter().filter(|o| now_secs < o.expires_at_secs);
        Some(Limits {
            rate: live().find_map(|o| o.rate).unwrap_or(tier.rate),
            daily_budget: live().find_map(|o| o.daily_budget).or(tier.daily_budget),
        })
    }
}

// === Parsing ===

/// Why JSON text is not a policy document: the field path reached (empty for the document) and
/// serde_json's error, whose position ([`serde_json::Error::line`]) is in that text.
#[derive(Debug)]
pub struct JsonError {
    pub path: String,
    pub error: serde_json::Error,
}

impl JsonError {
    /// The error as a [`PolicyError`]: its path and [`bare_message`].
    pub fn to_policy_error(&self) -> PolicyError {
        PolicyError::new(self.path.clone(), bare_message(&self.error))
    }
}

/// serde_json's message without its ` at line L column C` suffix (a position in one line of compact
/// JSON says nothing to a policy author; files report their own line).
pub fn bare_message(e: &serde_json::Error) -> String {
    let mut text = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    if let Some(i) = text.rfind(&at) {
        text.replace_range(i..i + at.len(), "");
    }
    text
}

/// Reads a policy document from JSON text (the whole text: trailing characters are an error).
///
/// One pass, tracking the field path as it goes, so an error names the field (`apps[2].tier`).
/// The policy types are deserialized from this one reader only: every other reader would be
/// another copy of all their code in the `.wasm` (a path-free fast pass plus a tracked pass over a
/// JSON tree were 69 KB more; the tracking costs about 0.7 ms of a 1,000-app policy's 5 ms
/// compile, natively).
pub fn parse_json_str(text: &str) -> Result<RawPolicy, JsonError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = serde_path_to_error::deserialize::<_, RawPolicy>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        JsonError { path, error: e.into_inner() }
    })?;
    de.end().map_err(|error| JsonError { path: String::new(), error })?;
    Ok(raw)
}

/// Reads and compiles a policy from JSON text.
pub fn compile_json_str(text: &str) -> Result<CompiledPolicy, PolicyErrors> {
    let raw = parse_json_str(text).map_err(|e| PolicyErrors::from(e.to_policy_error()))?;
    compile(raw)
}

// === Compilation ===

/// Validates a raw policy and builds its indexes. Returns every problem found, not only the first.
pub fn compile(raw: RawPolicy) -> Result<CompiledPolicy, PolicyErrors> {
    compile_with(raw, &mut ExpressionCache::default())
}

/// As [`compile`], taking the rules' expressions that `cache` holds from the previous compile
/// instead of parsing them again: what the filter and the companion do with every revision.
pub fn compile_with(mut raw: RawPolicy, cache: &mut ExpressionCache) -> Result<CompiledPolicy, PolicyErrors> {
    let mut errs = Errors::default();
    if raw.api_version != "guardrail/v1" {
        errs.push("apiVersion", format!("unsupported apiVersion `{}`; expected `guardrail/v1`", raw.api_version));
    }
    if raw.kind != "Policy" {
        errs.push("kind", format!("unsupported kind `{}`; expected `Policy`", raw.kind));
    }

    let settings = compile_settings(&raw, &mut errs);
    let mut issuers = Vec::new();
    let mut seen_issuers = HashSet::new();
    for (i, raw_issuer) in raw.settings.identity.jwt.iter().enumerate() {
        let path = format!("settings.identity.jwt[{i}]");
        if !seen_issuers.insert(raw_issuer.issuer.clone()) {
            errs.push(format!("{path}.issuer"), format!("duplicate issuer `{}`", raw_issuer.issuer));
        }
        match compile_issuer(raw_issuer, &path) {
            Ok(issuer) => issuers.push(issuer),
            Err(mut e) => errs.0.append(&mut e),
        }
    }

    let mut tiers = Vec::new();
    let mut tier_by_name = HashMap::new();
    for (name, raw_tier) in &raw.tiers {
        let path = format!("tiers.{name}");
        if name.is_empty() {
            errs.push("tiers", "a tier needs a name");
        }
        let rate = compile_rate(&raw_tier.rate, &format!("{path}.rate"), &mut errs);
        let daily_budget = raw_tier.daily_budget.and_then(|b| positive(b, &format!("{path}.daily_budget"), &mut errs));
        // A tier with a bad rate is still registered (the policy fails on its own error), so its
        // apps are not also reported as naming an unknown tier.
        let rate = rate.unwrap_or(Rate { requests: 1, per_ns: NANOS_PER_SEC, burst: 1 });
        tier_by_name.insert(name.clone(), tiers.len());
        tiers.push(Tier { name: name.clone(), rate, daily_budget });
    }

    let mut approved_connectors = FastMap::default();
    for (i, c) in raw.connectors.approved.iter().enumerate() {
        if c.trim().is_empty() {
            errs.push(format!("connectors.approved[{i}]"), "empty connector name");
        } else if approved_connectors.insert(c.clone(), i).is_some() {
            errs.push(format!("connectors.approved[{i}]"), format!("duplicate connector `{c}`"));
        }
    }
    let mut pricing = std::collections::BTreeMap::new();
    for (name, price) in &raw.connectors.pricing {
        let path = format!("connectors.pricing.{name}");
        if !approved_connectors.contains_key(name) {
            errs.push(path, format!("connector `{name}` is not in connectors.approved"));
        } else if !(price.per_1k_requests.is_finite() && price.per_1k_requests >= 0.0) {
            errs.push(format!("{path}.per_1k_requests"), format!("must be a price ≥ 0, got {}", price.per_1k_requests));
        } else {
            pricing.insert(name.clone(), price.per_1k_requests);
        }
    }

    // Apps are the bulk of a policy: their fields are moved out of the raw document, not copied,
    // and a field path is only written out for an error.
    let raw_apps = std::mem::take(&mut raw.apps);
    let mut apps = Vec::with_capacity(raw_apps.len());
    let mut app_by_id = FastMap::with_capacity_and_hasher(raw_apps.len(), Default::default());
    let mut app_by_key_digest: FastMap<[u8; 32], usize> =
        FastMap::with_capacity_and_hasher(raw_apps.len(), Default::default());
    for (i, mut raw_app) in raw_apps.into_iter().enumerate() {
        let api_keys = std::mem::take(&mut raw_app.api_keys);
        let Some(app) = compile_app(raw_app, i, &tier_by_name, &raw, &mut errs) else {
            continue;
        };
        if app_by_id.contains_key(&app.id) {
            errs.push(format!("apps[{i}].id"), format!("duplicate app id `{}`", app.id));
            continue;
        }
        let index = apps.len();
        for (k, digest_text) in api_keys.iter().enumerate() {
            let Some(digest) = parse_key_digest(digest_text) else {
                errs.push(
                    format!("apps[{i}].api_keys[{k}]"),
                    "expected `sha256:<64 lower-case hex>` as printed by `guardrail hash-key` (plain keys are never stored)",
                );
                continue;
            };
            if let Some(&o) = app_by_key_digest.get(&digest) {
                // The owner is an app before this one, or this one (a key listed twice).
                let owner = apps.get(o).map_or(app.id.as_str(), |a: &App| a.id.as_str());
                errs.push(
                    format!("apps[{i}].api_keys[{k}]"),
                    format!("API-key digest already used by app `{owner}`; every key must belong to one app"),
                );
                continue;
            }
            app_by_key_digest.insert(digest, index);
        }
        app_by_id.insert(app.id.clone(), index);
        apps.push(app);
    }

    let (mut datasets, dataset_index) =
        compile_datasets(&raw.datasets, !raw.settings.identity.jwt.is_empty(), &mut errs);
    set_masks(&mut apps, &mut datasets, &approved_connectors);
    let dataset_ids: HashSet<&str> = datasets.iter().map(|d| d.id.as_str()).collect();
    let rules = compile_rules(&raw.rules, &dataset_ids, cache, &mut errs);
    let exemptions = compile_exemptions(&raw.exemptions, &datasets, &mut errs);
    let cel = cache.cel().clone();

    if !errs.0.is_empty() {
        return Err(PolicyErrors(errs.0));
    }
    let rules_in_scope = datasets
        .iter()
        .map(Some)
        .chain([None])
        .map(|d| {
            let in_scope = rules.iter().enumerate().filter(|(_, r)| r.applies_to(d));
            in_scope.filter_map(|(i, _)| u32::try_from(i).ok()).collect()
        })
        .collect();
    Ok(CompiledPolicy {
        revision: raw.revision.map(|r| r.to_text()).unwrap_or_default(),
        settings,
        issuers,
        tiers,
        approved_connectors,
        pricing,
        apps,
        datasets,
        rules,
        exemptions,
        cel,
        dataset_index,
        app_by_id,
        app_by_key_digest,
        rules_in_scope,
    })
}

fn compile_settings(raw: &RawPolicy, errs: &mut Errors) -> Settings {
    let s = &raw.settings;
    let soft_limit_ratio = s.soft_limit_ratio.unwrap_or(0.7);
    if !(soft_limit_ratio > 0.0 && soft_limit_ratio <= 1.0) {
        errs.push("settings.soft_limit_ratio", format!("must be in (0, 1], got {soft_limit_ratio}"));
    }
    let jit_max_ttl_secs = match s.jit_max_ttl.as_deref().map(parse_duration).unwrap_or(Ok(15 * 60 * NANOS_PER_SEC)) {
        Ok(ns) => i64::try_from(ns / NANOS_PER_SEC).unwrap_or(i64::MAX),
        Err(e) => {
            errs.push("settings.jit_max_ttl", e);
            0
        }
    };
    let api_key_header = s.identity.api_key_header.clone().unwrap_or_else(|| "x-api-key".into()).to_ascii_lowercase();
    if api_key_header.is_empty() || !api_key_header.bytes().all(is_header_name_byte) {
        errs.push("settings.identity.api_key_header", format!("`{api_key_header}` is not a valid header name"));
    } else if api_key_header == "authorization"
        || api_key_header.starts_with("x-guardrail-")
        || api_key_header.starts_with(':')
    {
        errs.push(
            "settings.identity.api_key_header",
            format!("`{api_key_header}` is reserved and cannot carry API keys"),
        );
    }
    if let Some(region) = &s.gateway_region {
        if region.trim().is_empty() {
            errs.push("settings.gateway_region", "empty region");
        }
    }
    let token_header = s.identity.token_header.clone().unwrap_or_else(|| "authorization".into()).to_ascii_lowercase();
    if token_header.is_empty() || !token_header.bytes().all(is_header_name_byte) {
        errs.push("settings.identity.token_header", format!("`{token_header}` is not a valid header name"));
    } else if token_header == api_key_header {
        errs.push("settings.identity.token_header", "must differ from settings.identity.api_key_header");
    } else if matches!(token_header.as_str(), "x-guardrail-app" | "x-guardrail-tier") {
        errs.push(
            "settings.identity.token_header",
            format!("`{token_header}` is set by Guardrail for the upstream and cannot carry tokens"),
        );
    }
    let currency = s.currency.clone().unwrap_or_else(|| "USD".to_string());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        errs.push("settings.currency", format!("`{currency}` is no ISO 4217 code: three capital letters, e.g. EUR"));
    }
    let approvers = compile_approvers(&s.approvers, errs);
    let max_request_secs = match s.max_request_duration.as_deref().map(parse_duration) {
        None => DEFAULT_MAX_REQUEST_SECS,
        Some(Ok(ns)) => i64::try_from(ns / NANOS_PER_SEC).unwrap_or(i64::MAX).max(1),
        Some(Err(e)) => {
            errs.push("settings.max_request_duration", e);
            DEFAULT_MAX_REQUEST_SECS
        }
    };
    Settings {
        gateway_region: s.gateway_region.clone(),
        currency,
        approvers,
        max_request_secs,
        failure_mode: s.failure_mode.unwrap_or_default(),
        soft_limit_ratio,
        jit_max_ttl_secs,
        api_key_header,
        token_header,
        forward_token: s.identity.forward_token.unwrap_or(false),
    }
}

fn is_header_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
}

fn positive(value: i64, path: &str, errs: &mut Errors) -> Option<u64> {
    if value <= 0 {
        errs.push(path, format!("must be a positive number, got {value} (a zero limit is an error, not \"no limit\")"));
        return None;
    }
    u64::try_from(value).ok()
}

fn compile_rate(raw: &RawRate, path: &str, errs: &mut Errors) -> Option<Rate> {
    let requests = positive(raw.requests, &format!("{path}.requests"), errs);
    let per_ns = match parse_duration(&raw.per) {
        Ok(ns) => Some(ns),
        Err(e) => {
            errs.push(format!("{path}.per"), e);
            None
        }
    };
    let burst = match raw.burst {
        Some(b) => positive(b, &format!("{path}.burst"), errs),
        None => requests,
    };
    Some(Rate { requests: requests?, per_ns: per_ns?, burst: burst? })
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_APP_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn compile_app(
    raw: RawApp,
    i: usize,
    tier_by_name: &HashMap<String, usize>,
    policy: &RawPolicy,
    errs: &mut Errors,
) -> Option<App> {
    let before = errs.0.len();
    let at = |field: &str| format!("apps[{i}].{field}");
    if !valid_id(&raw.id) {
        errs.push(at("id"), format!("invalid app id `{}`: use 1-{MAX_APP_ID_LEN} of A-Z a-z 0-9 - _ . :", raw.id));
    }
    let tier = match tier_by_name.get(&raw.tier) {
        Some(&t) => t,
        None => {
            let known: Vec<&str> = policy.tiers.keys().map(String::as_str).collect();
            errs.push(at("tier"), format!("unknown tier `{}` (known: {})", raw.tier, known.join(", ")));
            0
        }
    };
    let region = match raw.region {
        Some(r) if r.trim().len() == r.len() && !r.is_empty() => r,
        Some(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => {
            errs.push(at("region"), "every app needs a region (residency is checked against it)");
            String::new()
        }
    };
    let mut overrides = Vec::new();
    for (k, o) in raw.quota_overrides.iter().enumerate() {
        let opath = at(&format!("quota_overrides[{k}]"));
        let rate = o.rate.as_ref().and_then(|r| compile_rate(r, &format!("{opath}.rate"), errs));
        let daily_budget = o.daily_budget.and_then(|b| positive(b, &format!("{opath}.daily_budget"), errs));
        if o.rate.is_none() && o.daily_budget.is_none() {
            errs.push(opath.clone(), "an override needs `rate` and/or `daily_budget`");
        }
        match parse_rfc3339(&o.expires_at) {
            Ok(expires_at_secs) => {
                overrides.push(QuotaOverride { rate, daily_budget, expires_at_secs, reason: o.reason.clone() })
            }
            Err(e) => errs.push(format!("{opath}.expires_at"), e),
        }
    }
    let review_overdue_at_secs = match raw.review_by.as_deref() {
        None => i64::MAX,
        Some(date) => match parse_date(date) {
            Ok(start) => start.saturating_add(crate::time::SECS_PER_DAY as i64),
            Err(e) => {
                errs.push(at("review_by"), e);
                i64::MAX
            }
        },
    };
    let connector_exceptions = compile_exceptions(
        raw.connector_exceptions.iter().map(|e| (&e.connector, &e.expires_at, &e.reason)),
        &at("connector_exceptions"),
        "connector",
        errs,
    );
    let access_grants = compile_exceptions(
        raw.access_grants.iter().map(|g| (&g.dataset, &g.expires_at, &g.reason)),
        &at("access_grants"),
        "dataset",
        errs,
    );
    for (k, g) in raw.access_grants.iter().enumerate() {
        if !g.dataset.trim().is_empty() && !policy.datasets.iter().any(|d| d.id == g.dataset) {
            errs.push(at(&format!("access_grants[{k}].dataset")), format!("unknown dataset `{}`", g.dataset));
        }
    }
    let mut data_classes = raw.data_classes;
    data_classes.sort();
    data_classes.dedup();
    if errs.0.len() != before {
        return None;
    }
    let quota_key = format!("guardrail.quota.{}", raw.id);
    Some(App {
        id: raw.id,
        owner: raw.owner,
        team: raw.team,
        department: raw.department,
        environment: raw.environment,
        tier,
        lifecycle: raw.lifecycle,
        region,
        data_classes,
        connectors: raw.connectors,
        overrides,
        quota_key,
        review_by: raw.review_by,
        review_overdue_at_secs,
        masks: None,
        connector_exceptions,
        access_grants,
    })
}

/// Compiles `connector_exceptions` or `access_grants` (`path`), whose entries name a `field`.
fn compile_exceptions<'a>(
    raw: impl Iterator<Item = (&'a String, &'a String, &'a Option<String>)>,
    path: &str,
    field: &str,
    errs: &mut Errors,
) -> Vec<Exception> {
    let mut out = Vec::new();
    for (k, (what, expires_at, reason)) in raw.enumerate() {
        if what.trim().is_empty() {
            errs.push(format!("{path}[{k}].{field}"), format!("empty {field}"));
            continue;
        }
        match parse_rfc3339(expires_at) {
            Ok(expires_at_secs) => out.push(Exception { what: what.clone(), expires_at_secs, reason: reason.clone() }),
            Err(e) => errs.push(format!("{path}[{k}].expires_at"), e),
        }
    }
    out
}

/// Gives every dataset region an id (in order of first appearance) and sets [`AppMasks`] and
/// [`Dataset::region_mask`] from the strings.
fn set_masks(apps: &mut [App], datasets: &mut [Dataset], approved_connectors: &FastMap<String, usize>) {
    let mut region_ids: FastMap<&str, u32> = FastMap::default();
    for d in datasets.iter_mut() {
        let mut mask = Some(0u64);
        for r in &d.allowed_regions {
            let next = u32::try_from(region_ids.len()).unwrap_or(u32::MAX);
            let id = *region_ids.entry(r.as_str()).or_insert(next);
            mask = mask.and_then(|m| Some(m | 1u64.checked_shl(id)?));
        }
        d.region_mask = mask;
    }
    for app in apps.iter_mut() {
        let connectors = app
            .connectors
            .iter()
            .filter_map(|c| approved_connectors.get(c))
            .filter(|&&i| i < 64)
            .fold(0u64, |m, &i| m | 1 << i);
        let classes = app.data_classes.iter().fold(0u8, |m, c| m | c.bit());
        let region = region_ids.get(app.region.as_str()).copied();
        app.masks = Some(AppMasks { connectors, classes, region });
    }
}

/// `settings.approvers`: ids unique, each with exactly one credential, no credential twice.
fn compile_approvers(raw: &[crate::raw::RawApprover], errs: &mut Errors) -> Vec<Approver> {
    let mut out: Vec<Approver> = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let at = |field: &str| format!("settings.approvers[{i}].{field}");
        if a.id.trim().is_empty() || a.id.len() > 254 || a.id.chars().any(char::is_control) {
            errs.push(at("id"), format!("invalid approver id `{}`: a name or an e-mail address", a.id));
            continue;
        }
        let credential = match (&a.token, &a.certificate) {
            (Some(t), None) => parse_key_digest(t).map(Credential::Token).ok_or("token"),
            (None, Some(c)) => parse_key_digest(c).map(Credential::Certificate).ok_or("certificate"),
            _ => {
                errs.push(
                    format!("settings.approvers[{i}]"),
                    format!("approver `{}` needs exactly one of `token` or `certificate`", a.id),
                );
                continue;
            }
        };
        let credential = match credential {
            Ok(c) => c,
            Err(field) => {
                errs.push(
                    at(field),
                    "expected `sha256:<64 lower-case hex>` (a token's digest as `guardrail hash-key` prints it; a \
                     certificate's as `openssl x509 -outform der | sha256sum` does)",
                );
                continue;
            }
        };
        if out.iter().any(|o| o.credential == credential) {
            errs.push(at("token"), format!("approver `{}` has the credential of another approver", a.id));
            continue;
        }
        out.push(Approver { id: a.id.clone(), credential });
    }
    out
}

/// Parses `sha256:<64 lower-case hex>` as printed by `guardrail hash-key`.
fn parse_key_digest(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// The datasets, and the index of their routes. A route that another dataset already has (same
/// host and path prefix as the index compares them, a method in common) is an error on the later
/// one: the index would give its requests to the first listed only, so the later dataset's checks
/// would never run on them. (The index holds dataset `i` of `raw` as `i`: it is only used when no
/// dataset has an error, and then `raw` and the datasets returned are the same list.)
fn compile_datasets(raw: &[RawDataset], issuers_configured: bool, errs: &mut Errors) -> (Vec<Dataset>, DatasetIndex) {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut index = DatasetIndex::default();
    for (i, d) in raw.iter().enumerate() {
        let path = format!("datasets[{i}]");
        let before = errs.0.len();
        if !valid_id(&d.id) {
            errs.push(format!("{path}.id"), format!("invalid dataset id `{}`", d.id));
        } else if !seen.insert(d.id.clone()) {
            errs.push(format!("{path}.id"), format!("duplicate dataset id `{}`", d.id));
        }
        let allowed_regions = match &d.allowed_regions {
            Some(r) if !r.is_empty() && r.iter().all(|x| !x.trim().is_empty()) => r.clone(),
            _ => {
                errs.push(format!("{path}.allowed_regions"), "every dataset needs a non-empty list of allowed regions");
                Vec::new()
            }
        };
        if d.routes.is_empty() {
            errs.push(format!("{path}.routes"), "a dataset needs at least one route");
        }
        let mut routes = Vec::new();
        for (r, route) in d.routes.iter().enumerate() {
            let rpath = format!("{path}.routes[{r}]");
            let prefix = route.path_prefix.trim_end_matches('/');
            let mut valid = true;
            if let Some(problem) = path_prefix_problem(&route.path_prefix) {
                errs.push(format!("{rpath}.path_prefix"), problem);
                valid = false;
            }
            let mut methods = Vec::new();
            for (m, method) in route.methods.iter().enumerate() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    errs.push(format!("{rpath}.methods[{m}]"), format!("`{method}` is not an HTTP method"));
                }
                methods.push(method.to_ascii_uppercase());
            }
            if let Some(problem) = route.host.as_deref().and_then(route_host_problem) {
                errs.push(format!("{rpath}.host"), problem);
                valid = false;
            }
            let host = route.host.as_ref().map(|h| h.trim_end_matches('.').to_ascii_lowercase());
            let path_prefix = if prefix.is_empty() { "/".to_string() } else { prefix.to_string() };
            let clash = if valid { index.insert(host.as_deref(), &path_prefix, &methods, i, r) } else { None };
            if let Some((j, k)) = clash {
                let host = host.as_deref().map_or("any host".into(), |h| format!("host `{}`", normalize_host(h)));
                errs.push(
                    rpath,
                    format!(
                        "same route as datasets[{j}].routes[{k}] of dataset `{}` ({host}, path_prefix `{path_prefix}`) \
                         with methods in common: its requests would all go to the first listed, never to `{}`",
                        raw.get(j).map_or("", |f| f.id.as_str()),
                        d.id
                    ),
                );
            }
            routes.push(Route { host, path_prefix, methods });
        }
        let requires_jit = d.requires_jit.unwrap_or(d.classification == Classification::Regulated);
        // Issuers that are configured but failed validation have errors of their own to fix.
        if requires_jit && !issuers_configured {
            errs.push(
                format!("{path}.requires_jit"),
                "the dataset requires JIT credentials but no JWT issuer is configured in settings.identity.jwt",
            );
        }
        if errs.0.len() == before {
            out.push(Dataset {
                id: d.id.clone(),
                classification: d.classification,
                owner_department: d.owner_department.clone(),
                allowed_regions,
                routes,
                requires_jit,
                approval_required: d.approval == Some(crate::raw::Approval::Required),
                region_mask: None,
            });
        }
    }
    (out, index)
}

fn compile_rules(
    raw: &[RawRule],
    dataset_ids: &HashSet<&str>,
    cache: &mut ExpressionCache,
    errs: &mut Errors,
) -> Vec<Rule> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, r) in raw.iter().enumerate() {
        let path = format!("rules[{i}]");
        if !valid_id(&r.id) {
            errs.push(format!("{path}.id"), format!("invalid rule id `{}`", r.id));
        } else if !seen.insert(r.id.clone()) {
            errs.push(format!("{path}.id"), format!("duplicate rule id `{}`", r.id));
        }
        let expr = match cache.compile(&r.when) {
            Ok(expr) => Some(expr),
            Err(e) => {
                errs.push(format!("{path}.when"), format!("rule `{}`: {e}", r.id));
                None
            }
        };
        for (k, d) in r.datasets.iter().enumerate() {
            if !dataset_ids.contains(d.as_str()) {
                errs.push(format!("{path}.datasets[{k}]"), format!("unknown dataset `{d}`"));
            }
        }
        let Some(expr) = expr else { continue };
        out.push(Rule {
            id: r.id.clone(),
            effect: r.effect,
            when: r.when.clone(),
            expr,
            datasets: r.datasets.clone(),
            classifications: r.classifications.clone(),
            message: r.message.clone(),
            mode: r.mode,
        });
    }
    cache.finish();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A policy of `datasets` (and `settings`), compiled: its errors as `(path, message)`.
    fn errors(settings: Value, datasets: Value) -> Vec<(String, String)> {
        let doc = json!({"apiVersion": "guardrail/v1", "kind": "Policy", "settings": settings, "datasets": datasets});
        match compile_json_str(&doc.to_string()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
        }
    }

    fn dataset(id: &str, routes: Value) -> Value {
        json!({"id": id, "classification": "internal", "allowed_regions": ["eu"], "routes": routes})
    }

    #[test]
    fn route_values_that_never_match_are_errors_naming_the_field() {
        // (route, expected (field, part of the message), why); the wording of every case is
        // pinned in `path`'s tests.
        type Case = (Value, Option<(&'static str, &'static str)>, &'static str);
        let cases: &[Case] = &[
            (json!({"host": "API.example.:8443", "path_prefix": "//Payments;v=1/"}), None, "normalised alike"),
            (json!({"path_prefix": "/payments/./"}), Some(("path_prefix", "write `/payments`")), "dot segment"),
            (json!({"path_prefix": "/pay%6dents"}), Some(("path_prefix", "write `/payments`")), "escaped letter"),
            (json!({"path_prefix": "/payments?x"}), Some(("path_prefix", "a query")), "query"),
            (json!({"path_prefix": "payments"}), Some(("path_prefix", "must start with `/`")), "relative"),
            (json!({"host": "https://api.example", "path_prefix": "/"}), Some(("host", "scheme")), "scheme"),
            (json!({"host": "api.example/x", "path_prefix": "/"}), Some(("host", "has a path")), "path in host"),
            (json!({"host": "*.example", "path_prefix": "/"}), Some(("host", "has a wildcard")), "wildcard"),
            (json!({"host": "", "path_prefix": "/"}), Some(("host", "empty host")), "empty host"),
        ];
        for (route, want, why) in cases {
            let got = errors(json!({}), json!([dataset("payments", json!([route]))]));
            match want {
                None => assert!(got.is_empty(), "{why}: {got:?}"),
                Some((field, message)) => {
                    let path = format!("datasets[0].routes[0].{field}");
                    assert!(
                        got.len() == 1 && got[0].0 == path && got[0].1.contains(message),
                        "{why}: expected one error at {path} saying {message:?}, got {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pricing_and_currency_are_checked_naming_the_field() {
        // (settings, connectors, expected (field, part of the message) or none, why)
        type Case = (Value, Value, Option<(&'static str, &'static str)>, &'static str);
        let cases: &[Case] = &[
            (
                json!({"currency": "EUR"}),
                json!({"approved": ["crm"], "pricing": {"crm": {"per_1k_requests": 0.4}}}),
                None,
                "valid",
            ),
            (json!({}), json!({"approved": ["crm"], "pricing": {"crm": {"per_1k_requests": 0}}}), None, "free"),
            (json!({"currency": "eur"}), json!({}), Some(("settings.currency", "ISO 4217")), "lower case"),
            (json!({"currency": "EURO"}), json!({}), Some(("settings.currency", "ISO 4217")), "four letters"),
            (
                json!({}),
                json!({"approved": ["crm"], "pricing": {"mail": {"per_1k_requests": 1}}}),
                Some(("connectors.pricing.mail", "not in connectors.approved")),
                "unapproved connector",
            ),
            (
                json!({}),
                json!({"approved": ["crm"], "pricing": {"crm": {"per_1k_requests": -1}}}),
                Some(("connectors.pricing.crm.per_1k_requests", "≥ 0")),
                "negative",
            ),
        ];
        for (settings, connectors, want, why) in cases {
            let doc =
                json!({"apiVersion": "guardrail/v1", "kind": "Policy", "settings": settings, "connectors": connectors});
            let got: Vec<(String, String)> = match compile_json_str(&doc.to_string()) {
                Ok(p) => {
                    assert_eq!(p.settings.currency.len(), 3, "{why}: a currency in force");
                    Vec::new()
                }
                Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
            };
            match want {
                None => assert!(got.is_empty(), "{why}: {got:?}"),
                Some((path, message)) => assert!(
                    got.len() == 1 && got[0].0 == *path && got[0].1.contains(message),
                    "{why}: expected one error at {path} saying {message:?}, got {got:?}"
                ),
            }
        }
        let doc = json!({"apiVersion": "guardrail/v1", "kind": "Policy",
            "connectors": {"approved": ["crm"], "pricing": {"crm": {"per_1k_requests": 0.4, "per_call": 1}}}});
        assert!(compile_json_str(&doc.to_string()).is_err(), "an unknown pricing field is an error");
    }

    #[test]
    fn a_route_two_datasets_share_is_an_error_on_the_later_one() {
        let route = |host: Option<&str>, prefix: &str, methods: &[&str]| match host {
            Some(h) => json!({"host": h, "path_prefix": prefix, "methods": methods}),
            None => json!({"path_prefix": prefix, "methods": methods}),
        };
        let h = Some("api.example");
        // (routes of the first dataset, of the second, the error expected on the second's, why)
        type Case = (Value, Value, Option<(&'static str, &'static str)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                json!([route(h, "/payments", &[])]),
                json!([route(h, "/payments", &[])]),
                Some(("datasets[1].routes[0]", "same route as datasets[0].routes[0] of dataset `a` (host `api.example`, path_prefix `/payments`) with methods in common: its requests would all go to the first listed, never to `b`")),
                "the same route",
            ),
            (
                json!([route(Some("API.example:443"), "/Payments/", &[])]),
                json!([route(Some("api.example."), "//payments;v=1", &[])]),
                Some(("datasets[1].routes[0]", "(host `api.example`, path_prefix `//payments;v=1`) with methods in common")),
                "the same in the forms routes are compared in",
            ),
            (
                json!([route(h, "/payments", &["GET", "POST"])]),
                json!([route(h, "/payments", &["post", "DELETE"])]),
                Some(("datasets[1].routes[0]", "path_prefix `/payments`) with methods in common")),
                "methods in common",
            ),
            (
                json!([route(h, "/payments", &["GET"])]),
                json!([route(h, "/payments", &[])]),
                Some(("datasets[1].routes[0]", "path_prefix `/payments`) with")),
                "no methods: every method",
            ),
            (
                json!([route(None, "/", &[])]),
                json!([route(h, "/other", &[]), route(None, "/", &["GET"])]),
                Some(("datasets[1].routes[1]", "same route as datasets[0].routes[0] of dataset `a` (any host, path_prefix `/`)")),
                "any host, a later route of the dataset",
            ),
            (json!([route(h, "/payments", &["GET"])]), json!([route(h, "/payments", &["POST"])]), None, "no method in common"),
            (json!([route(None, "/payments", &[])]), json!([route(h, "/payments", &[])]), None, "a host wins over any host"),
            (json!([route(h, "/payments", &[])]), json!([route(h, "/payments/v2", &[])]), None, "the longer prefix wins"),
            (json!([route(h, "/payments", &[])]), json!([route(Some("b.example"), "/payments", &[])]), None, "other hosts"),
            (json!([route(h, "/payments", &[]), route(h, "/payments", &[])]), json!([]), None, "twice in one dataset: harmless"),
        ];
        for (first, second, want, why) in cases {
            let mut datasets = vec![dataset("a", first)];
            if second.as_array().is_some_and(|r| !r.is_empty()) {
                datasets.push(dataset("b", second));
            }
            let got = errors(json!({}), Value::Array(datasets));
            match want {
                None => assert!(got.is_empty(), "{why}: {got:?}"),
                Some((path, message)) => assert!(
                    got.len() == 1 && got[0].0 == path && got[0].1.contains(message),
                    "{why}: expected one error at {path} saying {message:?}, got {got:?}"
                ),
            }
        }
    }

    #[test]
    fn a_rejected_key_is_the_one_error_not_also_a_missing_issuer() {
        const X: &str = "zHSH5Ge9NgQ7ZAc2kp7w-y6Tuexn-Cs00K1kNaE0XrU";
        let ed = |extra: Value| {
            let mut key = json!({"kty": "OKP", "crv": "Ed25519", "x": X});
            if let (Some(key), Value::Object(extra)) = (key.as_object_mut(), extra) {
                key.extend(extra);
            }
            key
        };
        let small_rsa = json!({"kty": "RSA", "e": "AQAB", "n": "wcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcE"});
        // (keys, the path of the key error expected, why)
        let cases: &[(Value, &str, &str)] = &[
            (json!([ed(json!({"d": X}))]), "settings.identity.jwt[0].jwks.keys[0]", "a private key"),
            (
                json!([{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]),
                "settings.identity.jwt[0].jwks.keys[0]",
                "a symmetric key",
            ),
            (json!([small_rsa]), "settings.identity.jwt[0].jwks.keys[0]", "RSA below 2048 bits"),
            (json!([ed(json!({"use": "enc"}))]), "settings.identity.jwt[0].jwks.keys[0]", "an encryption key"),
            (
                json!([ed(json!({"kid": "a"})), ed(json!({"kid": "a"}))]),
                "settings.identity.jwt[0].jwks.keys[1].kid",
                "a duplicate kid",
            ),
        ];
        let regulated = json!([{"id": "r", "classification": "regulated", "allowed_regions": ["eu"], "routes": [{"path_prefix": "/r"}]}]);
        for (keys, want, why) in cases {
            let settings = json!({"identity": {"jwt": [{"issuer": "https://idp.example", "jwks": {"keys": keys}}]}});
            let got = errors(settings, regulated.clone());
            assert!(got.iter().any(|(path, _)| path.starts_with(want)), "{why}: a key error at {want}: {got:?}");
            assert!(!got.iter().any(|(path, _)| path.ends_with("requires_jit")), "{why}: no follow-on: {got:?}");
        }
        // Without any issuer, the dataset's error is the one to fix.
        let got = errors(json!({}), regulated);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "datasets[0].requires_jit");
        assert!(got[0].1.contains("no JWT issuer is configured in settings.identity.jwt"), "{got:?}");
    }
}
