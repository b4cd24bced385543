//! What a [`Decision`] looks like on the wire and in the log: RFC 9457 problem+json bodies,
//! `Retry-After`/`WWW-Authenticate`, the IETF `RateLimit-Policy`/`RateLimit` fields, and one JSON
//! decision-log line per denial or warning. Pure functions, shared by the filter and the CLI.

use crate::compile::Limits;
use crate::decide::{Code, Denial, Event};
use crate::quota::Usage;
use crate::time::SECS_PER_DAY;
use serde_json::{Map, Value};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The problem+json body of a denial. `instance` is the request id; `app` the authenticated app
/// (else the app the denial names, [`Denial::named_app`]).
pub fn problem_body(denial: &Denial, request_id: &str, app: Option<&str>) -> String {
    let app = denial.named_app(app);
    let mut body = Map::new();
    body.insert("type".into(), Value::String(format!("urn:guardrail:problem:{}", denial.code.as_str())));
    body.insert("title".into(), Value::String(denial.code.title().into()));
    body.insert("status".into(), Value::from(denial.code.status()));
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
    if let Some(quota) = &denial.quota {
        let (limits, usage) = quota.as_ref();
        headers.extend(ratelimit_headers(limits, usage));
    }
    headers
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers, structured fields):
/// the bucket as policy `"rate"` and, where set, the daily budget as policy `"daily"`.
/// Built on every admitted request, so without `format!`.
///
/// The bucket is described as it behaves: `q` is its size (`burst`) and `w` the seconds it takes
/// to refill from empty ([`crate::compile::Rate::window_secs`]), so `q/w` is the rate it
/// sustains. (`q=<requests>;w=<per>` would be wrong whenever `burst` differs from `requests`:
/// `3600` per `1h` with `burst: 5` refills one a second, not five an hour.)
///
/// `t`: the draft defines the `t` parameter of `RateLimit` as the number of seconds until the
/// available quota units of the policy reset. For a token bucket the quota has reset when all `q`
/// units are back, so `t` is the seconds until the bucket is full again (`Usage::rate_reset_secs`):
/// `r` units now, `q` after `t`, and `t` at most `w`. (Not the seconds until the next unit comes
/// back: that is `Retry-After` on a 429.) The bucket's interval is rounded up to whole
/// nanoseconds, which can put a refill a few nanoseconds past `w`; `t` is capped at `w` so the two
/// fields never disagree. For `"daily"`, `w` is the day and `t` the seconds to the next UTC midnight.
pub fn ratelimit_headers(limits: &Limits, usage: &Usage) -> [(&'static str, String); 2] {
    let window = limits.rate.window_secs();
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
    item(&mut state, "\"rate\"", ("r", usage.rate_remaining), ("t", usage.rate_reset_secs.min(window)));
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

/// What every decision-log line says of the request besides the verdict. `path` is the request's
/// path as sent: lines carry it normalised (as datasets are matched), or as sent when it cannot be.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineContext<'a> {
    pub request_id: &'a str,
    pub revision: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub dataset: Option<&'a str>,
    /// The Envoy cluster the request is routed to.
    pub connector: Option<&'a str>,
}

/// A value in a decision-log line.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Text(&'a str),
    Null,
    Number(u32),
}

impl<'a> From<Option<&'a str>> for Field<'a> {
    fn from(value: Option<&'a str>) -> Field<'a> {
        value.map_or(Field::Null, Field::Text)
    }
}

/// One JSON object on one line, written directly: the members sorted by name, compact, strings
/// escaped, exactly as `serde_json` prints a `Map` (the tests compare the two byte for byte).
/// A decision line is written on every denial and every admitted request to sensitive data, in the
/// request path: building a `serde_json::Map` of owned strings cost 15 allocations a line.
fn write_line(fields: &mut [(&str, Field<'_>)]) -> String {
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let size: usize =
        fields.iter().map(|(k, v)| k.len() + 4 + if let Field::Text(t) = v { t.len() + 2 } else { 10 }).sum();
    let mut out = String::with_capacity(size + 2);
    out.push('{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, key);
        out.push(':');
        match value {
            Field::Text(text) => push_json_str(&mut out, text),
            Field::Null => out.push_str("null"),
            Field::Number(n) => push_u64(&mut out, u64::from(*n)),
        }
    }
    out.push('}');
    out
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let plain = |c: char| c >= ' ' && c != '"' && c != '\\';
    if s.chars().all(plain) {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    let b = c as u8;
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(b >> 4)]));
                    out.push(char::from(HEX[usize::from(b & 0xf)]));
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// Whether `c` ends a line for someone reading a log: the C0 and C1 control characters (`\n`,
/// `\r`, NEL among them), DEL, and the Unicode line and paragraph separators.
fn breaks_lines(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// `message` as one log line: every character that could end a line ([`breaks_lines`]) written as
/// `\u` and four hex digits, as in a JSON string, so that a decision line stays valid JSON and
/// nothing read from a policy, a request or the other end of the control stream (a revision, a
/// node id, an error quoting a field name) can start a line of its own — a forged decision line
/// in an audit trail. Borrowed, with no copy, when there is nothing to escape.
pub fn one_line(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.chars().any(breaks_lines) {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len() + 16);
    for c in message.chars() {
        if breaks_lines(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The members of every decision-log line: what kind of line, its code, the app and rule where
/// known, the request and the policy revision; `extra` are the line's own members.
fn log_line<'a>(
    kind: &'a str,
    code: &'a str,
    app: Option<&'a str>,
    rule: Option<&'a str>,
    cx: &LineContext<'a>,
    extra: impl IntoIterator<Item = (&'a str, Field<'a>)>,
) -> String {
    let path = crate::path::normalize_path(cx.path);
    let host = crate::path::normalize_host(cx.host);
    let mut fields: Vec<(&str, Field<'_>)> = Vec::with_capacity(16);
    fields.extend([
        ("guardrail", Field::Text(kind)),
        ("code", Field::Text(code)),
        ("app", app.into()),
        ("rule", rule.into()),
        ("request_id", Field::Text(cx.request_id)),
        ("revision", Field::Text(cx.revision)),
        ("method", Field::Text(cx.method)),
        ("host", Field::Text(&host)),
        ("path", Field::Text(path.as_deref().unwrap_or(cx.path))),
        ("dataset", cx.dataset.into()),
        ("connector", cx.connector.into()),
    ]);
    // (Each member re-borrowed for the local strings' shorter lifetime.)
    fields.extend(extra.into_iter().map(|(k, v): (&str, Field<'_>)| -> (&str, Field<'_>) { (k, v) }));
    write_line(&mut fields)
}

/// The members of a decision line that says what a decision does: its verdict, the status it
/// gives (or would give) and why.
fn verdict<'a>(verdict: &'a str, status: u32, detail: &'a str) -> [(&'static str, Field<'a>); 3] {
    [("verdict", Field::Text(verdict)), ("status", Field::Number(status)), ("detail", Field::Text(detail))]
}

/// One decision-log line for a denial (`app` as for [`problem_body`]); an unknown API key is
/// named by its fingerprint (`key_fingerprint`), never the key.
pub fn denial_log_line(denial: &Denial, app: Option<&str>, cx: &LineContext<'_>) -> String {
    let code = denial.code.as_str();
    let fingerprint = denial.key_fingerprint.as_deref().map(|f| ("key_fingerprint", Field::Text(f)));
    let extra = verdict("deny", denial.code.status(), &denial.detail).into_iter().chain(fingerprint);
    log_line("decision", code, denial.named_app(app), denial.rule.as_deref(), cx, extra)
}

/// One decision-log line for an admitted request to a `confidential` or `regulated` dataset: the
/// audit trail of sensitive access, with the bearer token's `jti` where it has one.
pub fn access_log_line(app: &str, classification: &str, jti: Option<&str>, cx: &LineContext<'_>) -> String {
    let extra =
        [("classification", Field::Text(classification)), ("jti", jti.into()), ("verdict", Field::Text("allow"))];
    log_line("decision", "allow", Some(app), None, cx, extra)
}

/// One decision-log line for an event of an admitted (or denied) request.
pub fn event_log_line(event: &Event, app: Option<&str>, cx: &LineContext<'_>) -> String {
    match event {
        Event::SoftLimit { quota } => {
            log_line("soft-limit", "soft-limit", app, Some(quota), cx, [("quota", Field::Text(quota))])
        }
        // The members of a decision line, for what the rule would have done if enforced (verdict
        // `shadow-deny`, never `deny`: nothing was refused), and the line's own `code` and `error`.
        Event::Shadow { rule, detail, error } => {
            let extra = verdict("shadow-deny", Code::AccessDenied.status(), detail);
            log_line(
                "shadow",
                "shadow-deny",
                app,
                Some(rule),
                cx,
                extra.into_iter().chain([("error", error.as_deref().into())]),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Rate;
    use crate::quota::{step, QuotaState};
    use crate::time::NANOS_PER_SEC;
    use serde_json::json;

    #[test]
    fn one_line_escapes_whatever_could_end_a_line() {
        let cases: &[(&str, &str, &str)] = &[
            ("ACK revision `r-1`", "ACK revision `r-1`", "nothing to escape"),
            ("r\n{\"verdict\":\"allow\"}", "r\\u000a{\"verdict\":\"allow\"}", "a forged line after a newline"),
            ("a\r\nb", "a\\u000d\\u000ab", "CR LF"),
            ("a\u{85}b\u{2028}c\u{2029}d", "a\\u0085b\\u2028c\\u2029d", "NEL and the Unicode separators"),
            ("tab\there\u{7f}\u{0}", "tab\\u0009here\\u007f\\u0000", "other controls"),
            ("é ü 中 \\n", "é ü 中 \\n", "printable text and a literal backslash-n stay"),
        ];
        for (given, want, why) in cases {
            assert_eq!(one_line(given), *want, "{why}");
        }
        assert!(matches!(one_line("plain"), std::borrow::Cow::Borrowed(_)), "no copy without a reason");
    }

    #[test]
    fn one_line_keeps_a_decision_line_valid_json_with_the_same_values() {
        let odd = LineContext { path: "/a\u{2028}b\u{85}", ..cx() };
        let line = denial_log_line(&Denial::new(Code::AccessDenied, "x\u{2029}y"), Some("pos"), &odd);
        let escaped = one_line(&line);
        assert!(!escaped.chars().any(breaks_lines), "{escaped}");
        let before: Value = serde_json::from_str(&line).unwrap_or_default();
        let after: Value = serde_json::from_str(&escaped).unwrap_or_default();
        assert!(before.is_object() && before == after, "{line}\n{escaped}");
    }

    proptest::proptest! {
        #[test]
        fn one_line_never_leaves_a_line_break(text in "\\PC*|[\\x00-\\x{9f}\\x{2028}\\x{2029}a-z]{0,40}") {
            let out = one_line(&text);
            proptest::prop_assert!(!out.chars().any(breaks_lines), "{out:?}");
            proptest::prop_assert!(!out.contains('\n') && !out.contains('\r'));
        }
    }

    fn cx() -> LineContext<'static> {
        LineContext {
            request_id: "req-1",
            revision: "r1",
            method: "GET",
            host: "API.example:443",
            path: "/customers/./7",
            dataset: Some("customers"),
            connector: Some("crm"),
        }
    }

    /// Every line says what was asked (method, host and path as datasets are matched), where it
    /// went (dataset, connector); an unknown key by its fingerprint; sensitive access by `jti`.
    #[test]
    fn lines_carry_the_request() {
        let unknown = Denial {
            key_fingerprint: Some("8a3f01c2".into()),
            ..Denial::new(Code::Unauthenticated, "unknown API key")
        };
        let line: Value = serde_json::from_str(&denial_log_line(&unknown, None, &cx())).unwrap_or_default();
        for (field, want) in [
            ("method", "GET"),
            ("host", "api.example"),
            ("path", "/customers/7"),
            ("dataset", "customers"),
            ("connector", "crm"),
            ("key_fingerprint", "8a3f01c2"),
            ("verdict", "deny"),
        ] {
            assert_eq!(line[field], want, "denial line: {field}");
        }
        let odd = LineContext { path: "/a/%2e%2e/%2e%2e/x", dataset: None, connector: None, ..cx() };
        let line: Value = serde_json::from_str(&denial_log_line(&unknown, None, &odd)).unwrap_or_default();
        assert_eq!(line["path"], "/a/%2e%2e/%2e%2e/x", "a path that cannot be normalised is logged as sent");
        assert_eq!((line["dataset"].clone(), line["connector"].clone()), (Value::Null, Value::Null), "none known");
        let access: Value =
            serde_json::from_str(&access_log_line("pos", "regulated", Some("j-1"), &cx())).unwrap_or_default();
        let want = json!({
            "guardrail": "decision", "verdict": "allow", "code": "allow", "app": "pos", "rule": null,
            "request_id": "req-1", "revision": "r1", "method": "GET", "host": "api.example", "path": "/customers/7",
            "dataset": "customers", "connector": "crm", "classification": "regulated", "jti": "j-1",
        });
        assert_eq!(access, want, "the audit line of sensitive access");
    }

    /// The lines are written by hand; they are what `serde_json` prints for the same members, byte
    /// for byte, whatever the strings hold (every control character, quotes, backslashes, DEL,
    /// non-ASCII), so a log pipeline sees no difference.
    #[test]
    fn lines_are_what_serde_json_prints() {
        let mut odd: String = (0u8..0x20).map(char::from).collect();
        odd.push_str("\"\\/\u{7f}é✓𝄞 plain");
        let texts = ["", "plain", "with \"quotes\"", "back\\slash", "line\nbreak", odd.as_str()];
        for text in texts {
            let mut fields = [
                ("zeta", Field::Text(text)),
                ("alpha", Field::Null),
                ("status", Field::Number(429)),
                ("mid", Field::Text("x")),
                ("a", Field::Number(0)),
            ];
            let mut want = Map::new();
            for (k, v) in &fields {
                let v = match v {
                    Field::Text(t) => Value::String((*t).into()),
                    Field::Null => Value::Null,
                    Field::Number(n) => Value::from(*n),
                };
                want.insert((*k).into(), v);
            }
            assert_eq!(write_line(&mut fields), Value::Object(want).to_string(), "{text:?}");
        }
        // A whole line, against serde_json's reading of it and the members it must have.
        let cx = LineContext { request_id: odd.as_str(), host: "Host\u{1}", ..cx() };
        let denial = Denial {
            key_fingerprint: Some("8a3f01c2".into()),
            rule: Some("r\"1".into()),
            ..Denial::new(Code::Unauthenticated, "unknown \\ key\n")
        };
        let line = denial_log_line(&denial, Some("pos"), &cx);
        let parsed: Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(line, parsed.to_string(), "sorted, compact, escaped as serde_json does");
        assert_eq!(parsed["request_id"], odd.as_str(), "round trip");
        assert_eq!(parsed["status"], 401, "a number");
        assert!(!line.contains('\n'), "one line");
    }

    #[test]
    fn throttled_responses_carry_ratelimit() {
        let limits =
            Limits { rate: Rate { requests: 600, per_ns: 60 * NANOS_PER_SEC, burst: 100 }, daily_budget: None };
        let usage = Usage {
            rate_remaining: 0,
            rate_reset_secs: 10,
            budget_remaining: None,
            budget_reset_secs: 3600,
            rate_soft_crossed: false,
            budget_soft_crossed: false,
        };
        let d = Denial { quota: Some(Box::new((limits, usage))), ..Denial::new(Code::QuotaExceeded, "too many") };
        let headers = denial_headers(&d);
        assert!(headers.contains(&("ratelimit-policy", "\"rate\";q=100;w=10".to_string())), "{headers:?}");
        assert!(headers.contains(&("ratelimit", "\"rate\";r=0;t=10".to_string())), "{headers:?}");
    }

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

    /// The problem body and the decision line name the authenticated app, else the app the denial
    /// names (a verified token's app that is not in the catalog), else none.
    #[test]
    fn denials_name_the_app_where_known() {
        let ghost = Denial { app: Some("ghost".into()), ..Denial::new(Code::AppNotRegistered, "not in the catalog") };
        let anonymous = Denial::new(Code::Unauthenticated, "no credential");
        let cases: &[(&str, &Denial, Option<&str>, Option<&str>)] = &[
            ("a claimed app that is not catalogued", &ghost, None, Some("ghost")),
            ("the authenticated app first", &ghost, Some("pos"), Some("pos")),
            ("no app known", &anonymous, None, None),
            ("the authenticated app alone", &anonymous, Some("pos"), Some("pos")),
        ];
        for (why, denial, authenticated, want) in cases {
            let body: Value = serde_json::from_str(&problem_body(denial, "req-1", *authenticated)).unwrap_or_default();
            assert_eq!(body.get("app").and_then(Value::as_str), *want, "{why}: problem body");
            assert_eq!(body.get("app").is_some(), want.is_some(), "{why}: no `app` member when none is known");
            let line: Value = serde_json::from_str(&denial_log_line(denial, *authenticated, &cx())).unwrap_or_default();
            assert_eq!(line["app"].as_str(), *want, "{why}: decision line");
        }
    }

    /// A shadow line has the fields of a decision line (for what the rule would have done), and
    /// keeps its own.
    #[test]
    fn shadow_lines_have_the_shape_of_decision_lines() {
        let cases: &[(&str, Event, &str, &str, Value)] = &[
            (
                "a deny rule that holds",
                Event::Shadow { rule: "watch".into(), detail: "exports are watched".into(), error: None },
                "watch",
                "exports are watched",
                Value::Null,
            ),
            (
                "a rule that fails to evaluate",
                Event::Shadow {
                    rule: "broken".into(),
                    detail: "rule `broken` failed".into(),
                    error: Some("no such key".into()),
                },
                "broken",
                "rule `broken` failed",
                json!("no such key"),
            ),
        ];
        let decision: Value =
            serde_json::from_str(&denial_log_line(&Denial::new(Code::AccessDenied, "x"), Some("pos"), &cx()))
                .unwrap_or_default();
        for (why, event, rule, detail, error) in cases {
            let line: Value = serde_json::from_str(&event_log_line(event, Some("pos"), &cx())).unwrap_or_default();
            let want = json!({
                "guardrail": "shadow", "verdict": "shadow-deny", "code": "shadow-deny", "status": 403, "app": "pos",
                "rule": rule, "error": error, "request_id": "req-1", "revision": "r1", "detail": detail,
                "method": "GET", "host": "api.example", "path": "/customers/7", "dataset": "customers",
                "connector": "crm",
            });
            assert_eq!(line, want, "{why}");
            let missing: Vec<&String> = decision
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .filter(|k| line.get(k.as_str()).is_none())
                .collect();
            assert!(missing.is_empty(), "{why}: decision-line fields missing: {missing:?}");
        }
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
        assert_eq!(policy, "\"rate\";q=100;w=10, \"daily\";q=5000;w=86400", "policy field");
        assert_eq!(state, "\"rate\";r=99;t=1, \"daily\";r=4999;t=3600", "state field");
        let spent = Usage { rate_remaining: 0, budget_remaining: Some(u64::MAX), ..usage };
        let [_, (_, state)] = ratelimit_headers(&Limits { daily_budget: Some(1), ..limits }, &spent);
        assert_eq!(state, "\"rate\";r=0;t=1, \"daily\";r=18446744073709551615;t=3600", "0 and the largest count");
        let late = Usage { rate_reset_secs: 11, ..usage };
        let [_, (_, state)] = ratelimit_headers(&limits, &late);
        assert!(state.starts_with("\"rate\";r=99;t=10,"), "t never past w: {state}");
    }

    #[test]
    fn window_is_the_time_to_refill_the_bucket() {
        let day = 86_400 * NANOS_PER_SEC;
        // (what, requests, per in ns, burst, w)
        let cases: &[(&str, u64, u64, u64, u64)] = &[
            ("burst × per / requests", 3600, 3600 * NANOS_PER_SEC, 5, 5),
            ("rounded up", 7, 10 * NANOS_PER_SEC, 3, 5),
            ("at least 1", 1000, NANOS_PER_SEC, 1, 1),
            ("sub-second per", 1, 500_000_000, 3, 2),
            ("a remainder that needs its own rounding", 3, 1_000_000_001, 3, 2),
            ("large but exact", 1, day, 100_000, 8_640_000_000),
            ("a burst of many periods' requests", 3_000_000_000, NANOS_PER_SEC, 30_000_000_000, 10),
            ("a burst and a per that are no multiples of requests", 7, 10 * NANOS_PER_SEC + 3, 23, 33),
            ("burst × per past 64 bits: saturates, never panics", 1, day, u64::MAX, u64::MAX.div_ceil(NANOS_PER_SEC)),
            ("everything at its largest", u64::MAX, u64::MAX, u64::MAX, u64::MAX.div_ceil(NANOS_PER_SEC)),
        ];
        for (what, requests, per_ns, burst, want) in cases {
            assert_eq!(Rate { requests: *requests, per_ns: *per_ns, burst: *burst }.window_secs(), *want, "{what}");
        }
    }

    /// `q` and `w` are the bucket's: a client that sends `q` requests at once every `w` seconds is
    /// never refused, after the `q` the fields read `r=0` and `t=w`, and `t` never exceeds `w`.
    #[test]
    fn ratelimit_fields_describe_the_bucket() {
        const T0: u64 = 1_795_924_800 * NANOS_PER_SEC;
        // (what, requests, per in seconds, burst, the "rate" item of RateLimit-Policy)
        let cases: &[(&str, u64, u64, u64, &str)] = &[
            ("3600 per 1h, burst 5: one a second, full in 5 s", 3600, 3600, 5, "\"rate\";q=5;w=5"),
            ("burst defaults to requests: the window is per", 5, 3600, 5, "\"rate\";q=5;w=3600"),
            ("600 per 1m, burst 100: full in 10 s", 600, 60, 100, "\"rate\";q=100;w=10"),
            ("a bucket larger than the rate", 1, 60, 10, "\"rate\";q=10;w=600"),
            ("7 per 10s, burst 3: 4.29 s rounds up", 7, 10, 3, "\"rate\";q=3;w=5"),
            ("1000 per 1s, burst 10: 10 ms is at least 1 s", 1000, 1, 10, "\"rate\";q=10;w=1"),
            ("3 per 1s: an interval of a third of a second", 3, 1, 3, "\"rate\";q=3;w=1"),
        ];
        for (what, requests, per, burst, want) in cases {
            let limits = Limits {
                rate: Rate { requests: *requests, per_ns: per * NANOS_PER_SEC, burst: *burst },
                daily_budget: None,
            };
            let w = limits.rate.window_secs();
            let field = |usage: &Usage, name: &str| -> u64 {
                let [(_, policy), (_, state)] = ratelimit_headers(&limits, usage);
                assert_eq!(policy, *want, "{what}");
                let value = state.split(';').find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')));
                value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{what}: no {name} in {state}"))
            };
            let mut state = QuotaState::default();
            for round in 0..3 {
                // The bucket rounds its interval up to whole nanoseconds: at most `burst` ns a window.
                let now = T0 + round * (w * NANOS_PER_SEC + burst);
                for i in 1..=*burst {
                    let Ok((next, usage)) = step(state, &limits, now, 0.7) else {
                        panic!("{what}: request {i} of round {round} refused");
                    };
                    state = next;
                    assert_eq!(field(&usage, "r"), burst - i, "{what}: r after {i}");
                    assert!(field(&usage, "t") <= w, "{what}: t after {i} is past w");
                    if i == *burst {
                        assert_eq!(field(&usage, "t"), w, "{what}: an empty bucket is full again in w");
                    }
                }
                assert!(step(state, &limits, now, 0.7).is_err(), "{what}: q+1 at once is refused");
            }
        }
    }
}
