//! Self-service requests: what a builder asks for (a quota increase, a connector exception, JIT
//! access to a dataset marked `approval: required`, a later review date), checked against the
//! policy served when filed and again when approved, and what an approved one becomes: an overlay
//! on the policy file ([`apply`]), pushed to the fleet like any revision and gone at its `until`.
//!
//! Everything here is pure (no store, no HTTP): [`file`] turns a filing into a [`Request`] or a
//! clear refusal, [`apply`] turns the policy file's JSON and the approved requests in force into
//! the document served. The HTTP side is [`super::approvals`].

use super::token::shown;
use guardrail_core::compile::{CompiledPolicy, Rate as CoreRate};
use guardrail_core::decide::{admit_to_dataset, check_connector};
use guardrail_core::time::{parse_date, parse_rfc3339, rfc3339_secs, SECS_PER_DAY};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A reason longer than this is refused.
pub const MAX_REASON_CHARS: usize = 1_000;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Quota,
    Connector,
    Access,
    Review,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quota => "quota",
            Kind::Connector => "connector",
            Kind::Access => "access",
            Kind::Review => "review",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        [Kind::Quota, Kind::Connector, Kind::Access, Kind::Review].into_iter().find(|k| k.as_str() == text)
    }
}

/// What a builder sends to file a request (`POST /api/v1/requests`, JSON). Unknown fields are
/// errors, like in the policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filing {
    pub kind: String,
    pub app: String,
    #[serde(default)]
    pub rate: Option<String>,
    #[serde(default)]
    pub daily_budget: Option<u64>,
    #[serde(default)]
    pub connector: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    /// `YYYY-MM-DD` (through that day, UTC) or an RFC 3339 time.
    pub until: String,
    pub reason: String,
}

/// A request as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub kind: Kind,
    pub app: String,
    /// `pending`, `approved`, `rejected`, `expired`.
    pub status: String,
    pub filed_at: String,
    /// When it ends (RFC 3339); `until_secs` the same in Unix seconds.
    pub until: String,
    pub until_secs: i64,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The app's risk tier when it was filed (green, amber, red) and why.
    pub risk_tier: String,
    #[serde(default)]
    pub risk_reasons: Vec<String>,
    /// What approving it changes, in words (`rate 600/1m → 3000/1m until …`).
    pub change: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
    /// The revision the fleet was pushed when it was approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

impl Request {
    /// Whether it is approved and in force at `now`.
    pub fn in_force(&self, now: i64) -> bool {
        self.status == "approved" && now < self.until_secs
    }
}

/// `REQUESTS/DURATION` parsed to what the policy writes (`{requests, per}`), for a quota request.
fn parse_rate(text: &str) -> Result<(u64, String, u64), String> {
    let rate = super::parse_rate(text, "rate")?;
    let per = text.split_once('/').map(|(_, p)| p.trim().to_string()).unwrap_or_default();
    Ok((rate.requests, per, u64::try_from(rate.per.as_nanos()).unwrap_or(u64::MAX)))
}

/// `until` as Unix seconds: a date means through that day (its end, 00:00 UTC of the next).
pub fn parse_until(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if text.len() == 10 {
        return parse_date(text)
            .map(|start| start.saturating_add(SECS_PER_DAY as i64))
            .map_err(|_| format!("until `{text}`: expected a date (YYYY-MM-DD) or an RFC 3339 time"));
    }
    parse_rfc3339(text).map_err(|_| format!("until `{text}`: expected a date (YYYY-MM-DD) or an RFC 3339 time"))
}

fn per_second(requests: u64, per_ns: u64) -> f64 {
    requests as f64 * 1e9 / per_ns.max(1) as f64
}

fn rate_words(rate: &CoreRate) -> String {
    const UNITS: [(u64, &str); 5] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
    ];
    let per = UNITS
        .iter()
        .find(|(ns, _)| rate.per_ns.is_multiple_of(*ns))
        .map_or_else(|| format!("{}ns", rate.per_ns), |(ns, unit)| format!("{}{unit}", rate.per_ns / ns));
    format!("{}/{per}", rate.requests)
}

/// Checks a filing against `policy` at `now` and makes it a pending request with `id`. The app
/// must be the one the caller authenticated as (`authenticated`). Errors name the field.
pub fn file(
    policy: &CompiledPolicy,
    filing: &Filing,
    authenticated: &str,
    id: String,
    now: i64,
) -> Result<Request, String> {
    let kind = Kind::parse(filing.kind.trim())
        .ok_or_else(|| format!("kind `{}`: expected quota, connector, access or review", shown(&filing.kind)))?;
    if filing.app != authenticated {
        return Err(format!(
            "app `{}`: the API key given is app `{authenticated}`'s; an app files its own requests",
            shown(&filing.app)
        ));
    }
    let app = policy.app(&filing.app).ok_or_else(|| format!("app `{}`: not in the policy", shown(&filing.app)))?;
    if app.lifecycle == guardrail_core::raw::Lifecycle::Quarantined {
        return Err(format!("app `{}` is quarantined: it files no requests until it is released", app.id));
    }
    let reason = filing.reason.trim();
    if reason.is_empty() {
        return Err("reason: say why (an approver reads it)".into());
    }
    if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(format!("reason: at most {MAX_REASON_CHARS} characters of text"));
    }
    let until_secs = parse_until(&filing.until)?;
    if until_secs <= now {
        return Err(format!("until {}: in the past", rfc3339_secs(until_secs)));
    }
    let max = policy.settings.max_request_secs;
    if until_secs - now > max {
        return Err(format!(
            "until {}: beyond the policy's maximum of {} days ahead (settings.max_request_duration), i.e. {}",
            rfc3339_secs(until_secs),
            max / SECS_PER_DAY as i64,
            rfc3339_secs(now + max)
        ));
    }
    let until = rfc3339_secs(until_secs);
    let unexpected = |field: &str, given: bool| -> Result<(), String> {
        if given {
            return Err(format!("{field}: not part of a {} request", kind.as_str()));
        }
        Ok(())
    };
    let mut request = Request {
        id,
        kind,
        app: app.id.clone(),
        status: "pending".into(),
        filed_at: rfc3339_secs(now),
        until: until.clone(),
        until_secs,
        reason: reason.to_string(),
        rate: None,
        daily_budget: None,
        connector: None,
        dataset: None,
        risk_tier: String::new(),
        risk_reasons: Vec::new(),
        change: String::new(),
        decided_by: None,
        decided_at: None,
        decision_reason: None,
        revision: None,
    };
    match kind {
        Kind::Quota => {
            unexpected("connector", filing.connector.is_some())?;
            unexpected("dataset", filing.dataset.is_some())?;
            if filing.rate.is_none() && filing.daily_budget.is_none() {
                return Err("a quota request needs rate (e.g. 3000/1m) and/or daily_budget".into());
            }
            let limits = policy.limits(app, now).ok_or_else(|| format!("app `{}` has no tier", app.id))?;
            let mut changes = Vec::new();
            if let Some(text) = &filing.rate {
                let (requests, per, per_ns) = parse_rate(text)?;
                let now_rate = &limits.rate;
                if per_second(requests, per_ns) <= per_second(now_rate.requests, now_rate.per_ns) {
                    return Err(format!(
                        "rate {requests}/{per}: app `{}` already has {} — ask for more than it has",
                        app.id,
                        rate_words(now_rate)
                    ));
                }
                changes.push(format!("rate {} → {requests}/{per}", rate_words(now_rate)));
                request.rate = Some(format!("{requests}/{per}"));
            }
            if let Some(budget) = filing.daily_budget {
                if budget == 0 {
                    return Err("daily_budget: a whole number above 0".into());
                }
                if limits.daily_budget.is_some_and(|b| budget <= b) || limits.daily_budget.is_none() {
                    let has = limits.daily_budget.map_or("no daily budget (unlimited)".to_string(), |b| b.to_string());
                    return Err(format!("daily_budget {budget}: app `{}` already has {has} — ask for more", app.id));
                }
                changes.push(format!(
                    "daily budget {} → {budget}",
                    limits.daily_budget.map_or("unlimited".to_string(), |b| b.to_string())
                ));
                request.daily_budget = Some(budget);
            }
            request.change = format!("{} until {until}", changes.join(", "));
        }
        Kind::Connector => {
            unexpected("rate", filing.rate.is_some())?;
            unexpected("daily_budget", filing.daily_budget.is_some())?;
            unexpected("dataset", filing.dataset.is_some())?;
            let connector = filing.connector.as_deref().map(str::trim).filter(|c| !c.is_empty());
            let connector = connector.ok_or("a connector request needs connector (an Envoy cluster name)")?;
            if connector.len() > 255 || connector.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(format!("connector `{}`: not a cluster name", shown(connector)));
            }
            if check_connector(policy, app, connector, now).is_ok() {
                return Err(format!("connector `{connector}`: app `{}` may reach it already", app.id));
            }
            request.change = format!("app `{}` may reach connector `{connector}` until {until}", app.id);
            request.connector = Some(connector.to_string());
        }
        Kind::Access => {
            unexpected("rate", filing.rate.is_some())?;
            unexpected("daily_budget", filing.daily_budget.is_some())?;
            unexpected("connector", filing.connector.is_some())?;
            let id = filing.dataset.as_deref().map(str::trim).filter(|d| !d.is_empty());
            let id = id.ok_or("an access request needs dataset (its id)")?;
            let ds = policy
                .datasets
                .iter()
                .find(|d| d.id == id)
                .ok_or_else(|| format!("dataset `{}`: not in the policy", shown(id)))?;
            if !ds.approval_required {
                return Err(format!(
                    "dataset `{id}` is not marked approval: required: ask the token service (POST /api/v1/token) directly"
                ));
            }
            admit_to_dataset(policy, app, ds, now).map_err(|d| {
                format!(
                    "dataset `{id}`: the filter would refuse app `{}` whatever an approver says: {} ({})",
                    app.id,
                    d.detail,
                    d.code.as_str()
                )
            })?;
            if app.access_grant(id, now).is_some_and(|g| g.expires_at_secs >= until_secs) {
                return Err(format!("dataset `{id}`: app `{}` has access until then already", app.id));
            }
            request.change = format!("app `{}` may get JIT tokens for dataset `{id}` until {until}", app.id);
            request.dataset = Some(id.to_string());
        }
        Kind::Review => {
            unexpected("rate", filing.rate.is_some())?;
            unexpected("daily_budget", filing.daily_budget.is_some())?;
            unexpected("connector", filing.connector.is_some())?;
            unexpected("dataset", filing.dataset.is_some())?;
            if app.review_overdue_at_secs != i64::MAX && app.review_overdue_at_secs >= until_secs {
                return Err(format!(
                    "until {until}: app `{}` is to be reviewed by {} already, no earlier",
                    app.id,
                    app.review_by.as_deref().unwrap_or_default()
                ));
            }
            let date = review_date(until_secs);
            request.change =
                format!("app `{}`'s review_by {} → {date}", app.id, app.review_by.as_deref().unwrap_or("(none)"));
        }
    }
    let risk = guardrail_core::catalog::risk(policy, app);
    request.risk_tier = risk.tier.as_str().to_string();
    request.risk_reasons = risk.reasons;
    Ok(request)
}

/// The `review_by` date a review request until `until_secs` sets: the last day it covers.
fn review_date(until_secs: i64) -> String {
    rfc3339_secs(until_secs - 1)[..10].to_string()
}

/// Puts approved requests in the order they are applied: the one approved last last, so that of
/// two quota requests in force the later approval's limits hold (an override applied later comes
/// first in `quota_overrides`).
pub fn in_order(requests: &mut [Request]) {
    requests.sort_by(|a, b| (&a.decided_at, &a.filed_at, &a.id).cmp(&(&b.decided_at, &b.filed_at, &b.id)));
}

/// The document served for `base` (the policy file's JSON) with the approved requests `active`
/// applied, and its revision label: `base` unchanged when `active` is empty. Requests for apps the
/// file no longer has are left out (and named in the second value). The label is the file's
/// revision, `+req.`, and 8 hex digits of the requests' ids and ends.
pub fn apply(base: &Value, active: &[Request]) -> (Value, Vec<String>) {
    let mut doc = base.clone();
    let mut skipped = Vec::new();
    if active.is_empty() {
        return (doc, skipped);
    }
    let mut applied = Vec::new();
    for r in active {
        let Some(app) = doc
            .get_mut("apps")
            .and_then(Value::as_array_mut)
            .and_then(|apps| apps.iter_mut().find(|a| a.get("id").and_then(Value::as_str) == Some(&r.app)))
            .and_then(Value::as_object_mut)
        else {
            skipped.push(r.id.clone());
            continue;
        };
        let reason = format!("request {}: {}", r.id, r.reason);
        let push_front = |app: &mut serde_json::Map<String, Value>, field: &str, entry: Value| {
            let list = app.entry(field.to_string()).or_insert_with(|| Value::Array(Vec::new()));
            if let Some(list) = list.as_array_mut() {
                list.insert(0, entry);
            }
        };
        match r.kind {
            Kind::Quota => {
                let mut entry = json!({"expires_at": r.until, "reason": reason});
                if let Some((requests, per)) = r.rate.as_deref().and_then(|t| t.split_once('/')) {
                    let requests: u64 = requests.parse().unwrap_or(0);
                    entry["rate"] = json!({"requests": requests, "per": per});
                }
                if let Some(budget) = r.daily_budget {
                    entry["daily_budget"] = json!(budget);
                }
                // First: the first unexpired override is the one in force.
                push_front(app, "quota_overrides", entry);
            }
            Kind::Connector => push_front(
                app,
                "connector_exceptions",
                json!({"connector": r.connector, "expires_at": r.until, "reason": reason}),
            ),
            Kind::Access => {
                push_front(app, "access_grants", json!({"dataset": r.dataset, "expires_at": r.until, "reason": reason}))
            }
            Kind::Review => {
                let date = review_date(r.until_secs);
                let later = app.get("review_by").and_then(Value::as_str).is_none_or(|d| d < date.as_str());
                if later {
                    app.insert("review_by".into(), Value::String(date));
                }
            }
        }
        applied.push(format!("{}@{}", r.id, r.until_secs));
    }
    if !applied.is_empty() {
        applied.sort();
        let digest = guardrail_core::api_key_digest(&applied.join(","));
        let base_label = match doc.get("revision") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let label = format!("{base_label}+req.{}", hex::encode(&digest[..4]));
        if let Some(object) = doc.as_object_mut() {
            object.insert("revision".into(), Value::String(label));
        }
    }
    (doc, skipped)
}

#[cfg(test)]
mod tests;
