//! What a [`Decision`] looks like on the wire and in the log: RFC 9457 problem+json bodies,
//! `Retry-After`/`WWW-Authenticate`, the IETF `RateLimit-Policy`/`RateLimit` fields, and one JSON
//! decision-log line per denial or warning. Pure functions, shared by the filter and the CLI.

use crate::compile::Limits;
use crate::decide::{Denial, Event};
use crate::quota::Usage;
use crate::time::{NANOS_PER_SEC, SECS_PER_DAY};
use serde_json::{json, Map, Value};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The problem+json body of a denial. `instance` is the request id.
pub fn problem_body(denial: &Denial, request_id: &str, app: Option<&str>) -> String {
    let mut body = Map::new();
    body.insert("type".into(), Value::String(format!("urn:guardrail:problem:{}", denial.code.as_str())));
    body.insert("title".into(), Value::String(denial.code.title().into()));
    body.insert("status".into(), json!(denial.code.status()));
    body.insert("detail".into(), Value::String(denial.detail.to_string()));
    body.insert("instance".into(), Value::String(request_id.into()));
    if let Some(app) = app {
        body.insert("app".into(), Value::String(app.into()));
    }
    if let Some(rule) = &denial.rule {
        body.insert("rule".into(), Value::String(rule.clone()));
    }
    Value::Object(body).to_string()
}

/// Headers of a denial response besides the body's content type.
pub fn denial_headers(denial: &Denial) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", PROBLEM_CONTENT_TYPE.to_string())];
    if let Some(secs) = denial.retry_after_secs {
        headers.push(("retry-after", secs.max(1).to_string()));
    }
    if let Some(challenge) = &denial.www_authenticate {
        headers.push(("www-authenticate", challenge.clone()));
    }
    headers
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers, structured fields):
/// the bucket as policy `"rate"` and, where set, the daily budget as policy `"daily"`.
/// Built on every admitted request, so without `format!`.
pub fn ratelimit_headers(limits: &Limits, usage: &Usage) -> [(&'static str, String); 2] {
    let window = limits.rate.per_ns.div_ceil(NANOS_PER_SEC).max(1);
    let (mut policy, mut state) = (String::with_capacity(64), String::with_capacity(64));
    let item = |out: &mut String, name: &str, (k1, v1): (&str, u64), (k2, v2): (&str, u64)| {
        for part in [name, ";", k1, "="] {
            out.push_str(part);
        }
        push_u64(out, v1);
        for part in [";", k2, "="] {
            out.push_str(part);
        }
        push_u64(out, v2);
    };
    item(&mut policy, "\"rate\"", ("q", limits.rate.burst), ("w", window));
    item(&mut state, "\"rate\"", ("r", usage.rate_remaining), ("t", usage.rate_reset_secs));
    if let (Some(budget), Some(left)) = (limits.daily_budget, usage.budget_remaining) {
        item(&mut policy, ", \"daily\"", ("q", budget), ("w", SECS_PER_DAY));
        item(&mut state, ", \"daily\"", ("r", left), ("t", usage.budget_reset_secs));
    }
    [("ratelimit-policy", policy), ("ratelimit", state)]
}

/// Appends `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits.iter().skip(start).map(|&d| char::from(d)));
}

/// One decision-log line for a denial.
pub fn denial_log_line(denial: &Denial, app: Option<&str>, request_id: &str, revision: &str) -> String {
    json!({
        "guardrail": "decision",
        "verdict": "deny",
        "code": denial.code.as_str(),
        "status": denial.code.status(),
        "app": app,
        "rule": denial.rule,
        "request_id": request_id,
        "revision": revision,
        "detail": denial.detail,
    })
    .to_string()
}

/// One decision-log line for an event of an admitted (or denied) request.
pub fn event_log_line(event: &Event, app: Option<&str>, request_id: &str, revision: &str) -> String {
    match event {
        Event::SoftLimit { quota } => json!({
            "guardrail": "soft-limit",
            "code": "soft-limit",
            "quota": quota,
            "app": app,
            "rule": quota,
            "request_id": request_id,
            "revision": revision,
        })
        .to_string(),
        Event::Shadow { rule, error } => json!({
            "guardrail": "shadow",
            "code": "shadow-deny",
            "app": app,
            "rule": rule,
            "error": error,
            "request_id": request_id,
            "revision": revision,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Rate;
    use crate::decide::Code;

    #[test]
    fn problem_has_every_member() {
        let mut d = Denial::new(Code::QuotaExceeded, "too many");
        d.retry_after_secs = Some(12);
        d.rule = Some("rate".into());
        let body: Value = serde_json::from_str(&problem_body(&d, "req-1", Some("pos"))).unwrap_or_default();
        assert_eq!(body["type"], "urn:guardrail:problem:quota-exceeded", "type");
        assert_eq!(body["status"], 429, "status");
        assert_eq!(body["instance"], "req-1", "instance is the request id");
        assert_eq!(body["app"], "pos", "app");
        assert_eq!(body["rule"], "rate", "rule");
        assert!(body["title"].is_string() && body["detail"] == "too many", "title and detail");
        assert!(denial_headers(&d).contains(&("retry-after", "12".to_string())), "Retry-After");
    }

    #[test]
    fn ratelimit_fields() {
        let limits =
            Limits { rate: Rate { requests: 600, per_ns: 60 * NANOS_PER_SEC, burst: 100 }, daily_budget: Some(5000) };
        let usage = Usage {
            rate_remaining: 99,
            rate_reset_secs: 1,
            budget_remaining: Some(4999),
            budget_reset_secs: 3600,
            rate_soft_crossed: false,
            budget_soft_crossed: false,
        };
        let [(_, policy), (_, state)] = ratelimit_headers(&limits, &usage);
        assert_eq!(policy, "\"rate\";q=100;w=60, \"daily\";q=5000;w=86400", "policy field");
        assert_eq!(state, "\"rate\";r=99;t=1, \"daily\";r=4999;t=3600", "state field");
        let spent = Usage { rate_remaining: 0, budget_remaining: Some(u64::MAX), ..usage };
        let [_, (_, state)] = ratelimit_headers(&Limits { daily_budget: Some(1), ..limits }, &spent);
        assert_eq!(state, "\"rate\";r=0;t=1, \"daily\";r=18446744073709551615;t=3600", "0 and the largest count");
    }
}
