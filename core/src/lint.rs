//! Lints: what a reviewer would point out in a policy that is valid, but does not do what its
//! author meant. `guardrail check` prints them as warnings (errors with `--strict`); they are pure
//! functions of the compiled policy and the time, so the console can show the same list.
//!
//! - an app connector that is not in `connectors.approved` (the filter refuses the app there);
//! - a region used once that is one edit away from a region used elsewhere (a typo: residency
//!   then fails, or passes, where the author did not mean it to);
//! - a rule comparing `request.method` with a lower-case string (methods reach rules upper case,
//!   so `request.method == 'delete'` never holds);
//! - a quota override, connector exception or access grant that has expired (it is ignored);
//! - an app whose `review_by` is less than [`REVIEW_WARNING_DAYS`] days ahead, or past (the filter
//!   then refuses it);
//! - an exemption route wider than a dataset's routes (`/` over `/catalog`: everything under it
//!   passes without an app credential).
//!
//! ```
//! use guardrail_core::{compile::compile_json_str, lint::lint};
//!
//! let policy = compile_json_str(r#"{"apiVersion": "guardrail/v1", "kind": "Policy",
//!   "rules": [{"id": "r", "effect": "deny", "when": "request.method == 'delete'"}]}"#).unwrap();
//! let warnings = lint(&policy, 0);
//! assert_eq!(warnings[0].path, "rules[0].when");
//! ```

use crate::compile::CompiledPolicy;
use crate::time::rfc3339_secs;
use cel::common::ast::{operators, EntryExpr, Expr, IdedExpr, LiteralValue};
use std::collections::HashMap;

/// One finding: the field it is about (`apps[3].region`), what is wrong, and its line in the
/// policy file when known (filled in by [`crate::source`] for files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub kind: Kind,
    pub path: String,
    pub message: String,
    pub line: Option<usize>,
}

/// What a warning is about (for a console to group or filter them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    UnapprovedConnector,
    RegionTypo,
    LowerCaseMethod,
    ExpiredOverride,
    WideExemption,
    ReviewDue,
}

/// `check` warns this many days before an app's `review_by`.
pub const REVIEW_WARNING_DAYS: i64 = 14;

impl Warning {
    fn new(kind: Kind, path: String, message: String) -> Self {
        Warning { kind, path, message, line: None }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "warning: {}: {}", self.path, self.message)
    }
}

/// What `check` (and the console) say of `app`'s `review_by` at `now_secs`: overdue, or due in
/// less than [`REVIEW_WARNING_DAYS`] days; `None` otherwise or without `review_by`.
pub fn review_warning(app: &crate::compile::App, now_secs: i64) -> Option<String> {
    let date = app.review_by.as_deref()?;
    let days_left = (app.review_overdue_at_secs - now_secs).div_euclid(crate::time::SECS_PER_DAY as i64);
    if now_secs >= app.review_overdue_at_secs {
        return Some(format!(
            "app `{}`: review overdue since {date}: the filter refuses it (403 app-not-active) until a \
             review moves review_by",
            app.id
        ));
    }
    if days_left >= REVIEW_WARNING_DAYS {
        return None;
    }
    Some(format!(
        "app `{}` is due for review by {date} ({}): after that day the filter refuses it \
         (403 app-not-active); file `guardrail request review`",
        app.id,
        match days_left {
            0 => "today".to_string(),
            1 => "tomorrow".to_string(),
            n => format!("in {n} days"),
        }
    ))
}

/// Every warning for `policy` at `now_secs` (Unix seconds), in the order of the document's
/// sections: settings, apps, datasets, rules. An app's connector and override warnings come in
/// the app's order.
pub fn lint(policy: &CompiledPolicy, now_secs: i64) -> Vec<Warning> {
    let mut out = Vec::new();
    let regions = region_warnings(policy);
    out.extend(regions.iter().filter(|w| w.path.starts_with("settings.")).cloned());
    for (i, app) in policy.apps.iter().enumerate() {
        for (j, connector) in app.connectors.iter().enumerate() {
            if !policy.approved_connectors.contains_key(connector) {
                out.push(Warning::new(
                    Kind::UnapprovedConnector,
                    format!("apps[{i}].connectors[{j}]"),
                    format!(
                        "connector `{connector}` is not in connectors.approved: the filter refuses the app's requests \
                         through it (403 connector-not-approved)"
                    ),
                ));
            }
        }
        let region_path = format!("apps[{i}].region");
        out.extend(regions.iter().filter(|w| w.path == region_path).cloned());
        if let Some(message) = review_warning(app, now_secs) {
            out.push(Warning::new(Kind::ReviewDue, format!("apps[{i}].review_by"), message));
        }
        for (j, o) in app.overrides.iter().enumerate() {
            if o.expires_at_secs <= now_secs {
                out.push(Warning::new(
                    Kind::ExpiredOverride,
                    format!("apps[{i}].quota_overrides[{j}].expires_at"),
                    format!(
                        "the override expired at {}: it is ignored; remove it, or move expires_at",
                        rfc3339_secs(o.expires_at_secs)
                    ),
                ));
            }
        }
        for (field, list) in
            [("connector_exceptions", &app.connector_exceptions), ("access_grants", &app.access_grants)]
        {
            for (j, e) in list.iter().enumerate() {
                if e.expires_at_secs <= now_secs {
                    out.push(Warning::new(
                        Kind::ExpiredOverride,
                        format!("apps[{i}].{field}[{j}].expires_at"),
                        format!(
                            "`{}` expired at {}: it is ignored; remove it, or move expires_at",
                            e.what,
                            rfc3339_secs(e.expires_at_secs)
                        ),
                    ));
                }
            }
        }
    }
    out.extend(regions.iter().filter(|w| w.path.starts_with("datasets[")).cloned());
    for (i, rule) in policy.rules.iter().enumerate() {
        let mut found = Vec::new();
        lower_case_methods(rule.expr.ast(), &mut found);
        for (literal, op) in found {
            let (holds, meaning) = match op {
                Op::NotEquals => ("always holds", "is true for every request"),
                Op::Equals | Op::In => ("never holds", "matches no request"),
            };
            out.push(Warning::new(
                Kind::LowerCaseMethod,
                format!("rules[{i}].when"),
                format!(
                    "rule `{}`: request.method is compared with '{literal}', which {meaning}: methods reach rules in \
                     upper case, so the comparison {holds}; write '{}'",
                    rule.id,
                    literal.to_ascii_uppercase()
                ),
            ));
        }
    }
    out.extend(wide_exemptions(policy));
    out
}

/// An exemption route that covers more than a dataset's route it starts above (`/` over
/// `/catalog`): every request to that dataset passes without an app, and so does everything else
/// under the exemption's prefix. (One that reaches confidential or regulated data is an error.)
fn wide_exemptions(policy: &CompiledPolicy) -> Vec<Warning> {
    let mut out = Vec::new();
    for (i, exemption) in policy.exemptions.iter().enumerate() {
        for (r, route) in exemption.routes.iter().enumerate() {
            let covered: Vec<&str> = policy
                .datasets
                .iter()
                .filter(|ds| ds.routes.iter().any(|dr| crate::exempt::strictly_wider(route, dr)))
                .map(|ds| ds.id.as_str())
                .collect();
            if covered.is_empty() {
                continue;
            }
            out.push(Warning::new(
                Kind::WideExemption,
                format!("exemptions[{i}].routes[{r}].path_prefix"),
                format!(
                    "exemption `{}` covers `{}`, wider than the routes of dataset{} `{}`: every request under it passes \
                     without an app credential; narrow it to what the exempt callers need",
                    exemption.id,
                    route.path_prefix,
                    if covered.len() == 1 { "" } else { "s" },
                    covered.join("`, `")
                ),
            ));
        }
    }
    out
}

// === Regions ===

/// A region used once, one edit away from one used elsewhere. Where both are used once, the later
/// one is reported (once per pair), naming both. Two regions differing in one digit (`eu-west-1`, `eu-west-2`)
/// are a family, not a typo.
fn region_warnings(policy: &CompiledPolicy) -> Vec<Warning> {
    let mut uses: Vec<(String, &str)> = Vec::new();
    if let Some(region) = &policy.settings.gateway_region {
        uses.push(("settings.gateway_region".into(), region));
    }
    for (i, app) in policy.apps.iter().enumerate() {
        uses.push((format!("apps[{i}].region"), &app.region));
    }
    for (i, ds) in policy.datasets.iter().enumerate() {
        for (j, region) in ds.allowed_regions.iter().enumerate() {
            uses.push((format!("datasets[{i}].allowed_regions[{j}]"), region));
        }
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, region) in &uses {
        *count.entry(region).or_default() += 1;
    }
    let first_use = |region: &str| uses.iter().position(|(_, r)| *r == region);
    let mut out = Vec::new();
    for (at, (path, region)) in uses.iter().enumerate() {
        if count.get(region) != Some(&1) {
            continue;
        }
        let near = |used_more: bool| {
            let mut near: Vec<&str> = count
                .iter()
                .filter(|&(other, &n)| {
                    (n > 1) == used_more && one_edit_apart(region, other) && !differ_in_one_digit(region, other)
                })
                .map(|(other, _)| *other)
                .collect();
            // The most used first, then by name.
            near.sort_by_key(|other| (std::cmp::Reverse(count.get(other).copied().unwrap_or(0)), *other));
            near
        };
        let meant = near(true);
        let message = if meant.is_empty() {
            // Both used once: which is the typo cannot be told; said once, on the later.
            let Some((other_path, other)) = near(false)
                .into_iter()
                .filter_map(|other| first_use(other).filter(|&o| o < at))
                .min()
                .and_then(|o| uses.get(o))
            else {
                continue;
            };
            format!(
                "region `{region}` is used nowhere else, nor is `{other}` ({other_path}), one edit away: is one of \
                 them a typo?"
            )
        } else {
            let suggestion = meant.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(" or ");
            format!("region `{region}` is used nowhere else; did you mean {suggestion}?")
        };
        out.push(Warning::new(Kind::RegionTypo, path.clone(), message));
    }
    out
}

/// Whether `a` becomes `b` by one edit: a character inserted, removed or replaced, or two
/// neighbouring characters swapped (Damerau-Levenshtein distance 1).
pub fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count();
    let (la, lb) = (a.len(), b.len());
    if a == b {
        return false;
    }
    // What is left between the common prefix and suffix (they may overlap on repeated letters).
    let suffix = suffix.min(la.min(lb) - prefix);
    let (ra, rb) = (&a[prefix..la - suffix], &b[prefix..lb - suffix]);
    match (ra.len(), rb.len()) {
        (0, 1) | (1, 0) | (1, 1) => true,
        (2, 2) => ra[0] == rb[1] && ra[1] == rb[0],
        _ => false,
    }
}

/// `eu-west-1` and `eu-west-2`: the same length, one position differing, a digit in both.
fn differ_in_one_digit(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len() != b.len() {
        return false;
    }
    let diffs: Vec<(char, char)> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(x, y)| (*x, *y)).collect();
    matches!(diffs.as_slice(), [(x, y)] if x.is_ascii_digit() && y.is_ascii_digit())
}

// === Rules ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equals,
    NotEquals,
    In,
}

/// The string literals with a lower-case letter that `request.method` is compared with (`==`,
/// `!=`, either side; `in [..]`), anywhere in `e`.
fn lower_case_methods(e: &IdedExpr, found: &mut Vec<(String, Op)>) {
    match &e.expr {
        Expr::Call(call) => {
            let op = match call.func_name.as_str() {
                operators::EQUALS => Some(Op::Equals),
                operators::NOT_EQUALS => Some(Op::NotEquals),
                operators::IN => Some(Op::In),
                _ => None,
            };
            if let (Some(op), [left, right]) = (op, call.args.as_slice()) {
                let literals: Vec<&IdedExpr> = match op {
                    Op::In if is_method(left) => match &right.expr {
                        Expr::List(list) => list.elements.iter().collect(),
                        _ => Vec::new(),
                    },
                    Op::In => Vec::new(),
                    _ if is_method(left) => vec![right],
                    _ if is_method(right) => vec![left],
                    _ => Vec::new(),
                };
                for literal in literals {
                    if let Expr::Literal(LiteralValue::String(s)) = &literal.expr {
                        let text: &str = s.inner();
                        if text != text.to_ascii_uppercase() {
                            found.push((text.to_string(), op));
                        }
                    }
                }
            }
            if let Some(target) = &call.target {
                lower_case_methods(target, found);
            }
            call.args.iter().for_each(|a| lower_case_methods(a, found));
        }
        Expr::Comprehension(c) => {
            for inner in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                lower_case_methods(inner, found);
            }
        }
        Expr::List(list) => list.elements.iter().for_each(|x| lower_case_methods(x, found)),
        Expr::Map(map) => map.entries.iter().for_each(|x| entry(&x.expr, found)),
        Expr::Struct(st) => st.entries.iter().for_each(|x| entry(&x.expr, found)),
        Expr::Select(sel) => lower_case_methods(&sel.operand, found),
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
    }
}

fn entry(e: &EntryExpr, found: &mut Vec<(String, Op)>) {
    match e {
        EntryExpr::StructField(f) => lower_case_methods(&f.value, found),
        EntryExpr::MapEntry(m) => {
            lower_case_methods(&m.key, found);
            lower_case_methods(&m.value, found);
        }
    }
}

/// `request.method` or `request['method']`.
fn is_method(e: &IdedExpr) -> bool {
    let is_request = |operand: &IdedExpr| matches!(&operand.expr, Expr::Ident(name) if name == "request");
    match &e.expr {
        Expr::Select(sel) => sel.field == "method" && is_request(&sel.operand),
        Expr::Call(call) if call.func_name == operators::INDEX => match call.args.as_slice() {
            [operand, key] => {
                is_request(operand)
                    && matches!(&key.expr, Expr::Literal(LiteralValue::String(k)) if k.inner() == "method")
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_json_str;
    use crate::time::parse_rfc3339;
    use serde_json::{json, Value};

    /// A valid policy: two apps in eu-west-1, one dataset, the approved connectors `orders` and
    /// `crm`, no rules; `edit` changes it before it is compiled.
    fn policy(edit: impl FnOnce(&mut Value)) -> CompiledPolicy {
        let mut doc = json!({
            "apiVersion": "guardrail/v1", "kind": "Policy",
            "settings": {"gateway_region": "eu-west-1"},
            "tiers": {"s": {"rate": {"requests": 1, "per": "1s"}}},
            "connectors": {"approved": ["orders", "crm"]},
            "apps": [
                {"id": "a", "tier": "s", "environment": "dev", "lifecycle": "draft", "region": "eu-west-1",
                 "connectors": ["orders"]},
                {"id": "b", "tier": "s", "environment": "dev", "lifecycle": "draft", "region": "eu-west-1"},
            ],
            "datasets": [{"id": "d", "classification": "public", "allowed_regions": ["eu-west-1", "eu-central-1"],
                          "routes": [{"path_prefix": "/d"}]}],
        });
        edit(&mut doc);
        match compile_json_str(&doc.to_string()) {
            Ok(p) => p,
            Err(e) => panic!("the test policy does not compile: {e}"),
        }
    }

    fn rule(when: &str) -> impl FnOnce(&mut Value) + '_ {
        move |doc| doc["rules"] = json!([{"id": "r", "effect": "deny", "when": when}])
    }

    const NOW: &str = "2026-12-06T12:00:00Z";

    #[test]
    fn warnings_table() {
        // (why, the policy, expected (path, message part) of every warning)
        type Edit = Box<dyn FnOnce(&mut Value)>;
        type Case = (&'static str, Edit, Vec<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            ("the base policy is clean", Box::new(|_| {}), vec![]),
            (
                "an app connector that is not approved",
                Box::new(|doc| doc["apps"][1]["connectors"] = json!(["crm", "billing"])),
                vec![("apps[1].connectors[1]", "connector `billing` is not in connectors.approved: the filter refuses")],
            ),
            (
                "a region with a letter left out",
                Box::new(|doc| doc["apps"][1]["region"] = json!("eu-wst-1")),
                vec![("apps[1].region", "region `eu-wst-1` is used nowhere else; did you mean `eu-west-1`?")],
            ),
            (
                "two letters swapped, in a dataset",
                Box::new(|doc| doc["datasets"][0]["allowed_regions"] = json!(["eu-wset-1", "eu-central-1"])),
                vec![("datasets[0].allowed_regions[0]", "region `eu-wset-1` is used nowhere else; did you mean `eu-west-1`?")],
            ),
            (
                "a gateway region with a letter replaced",
                Box::new(|doc| doc["settings"]["gateway_region"] = json!("eu-wesT-1")),
                vec![("settings.gateway_region", "region `eu-wesT-1` is used nowhere else; did you mean `eu-west-1`?")],
            ),
            (
                "a typo of a region used once, before it",
                Box::new(|doc| doc["apps"][1]["region"] = json!("eu-cnetral-1")),
                vec![(
                    "datasets[0].allowed_regions[1]",
                    "region `eu-central-1` is used nowhere else, nor is `eu-cnetral-1` (apps[1].region), one edit away: is one of them a typo?",
                )],
            ),
            (
                "another number is another region, not a typo",
                Box::new(|doc| doc["apps"][1]["region"] = json!("eu-west-2")),
                vec![],
            ),
            (
                "a region used twice is meant, however close",
                Box::new(|doc| {
                    doc["apps"][0]["region"] = json!("eu-wst-1");
                    doc["apps"][1]["region"] = json!("eu-wst-1");
                }),
                vec![],
            ),
            (
                "two regions used once each: the later one is reported",
                Box::new(|doc| {
                    doc["settings"]["gateway_region"] = json!("us-east-1");
                    doc["datasets"][0]["allowed_regions"] = json!(["eu-west-1", "us-eats-1"]);
                }),
                vec![("datasets[0].allowed_regions[1]", "region `us-eats-1` is used nowhere else, nor is `us-east-1` (settings.gateway_region)")],
            ),
            ("== with a lower-case method", Box::new(rule("request.method == 'delete'")), vec![("rules[0].when", "rule `r`: request.method is compared with 'delete', which matches no request: methods reach rules in upper case, so the comparison never holds; write 'DELETE'")]),
            ("the literal first", Box::new(rule("'Delete' == request.method")), vec![("rules[0].when", "compared with 'Delete'")]),
            ("!=", Box::new(rule("request.method != 'get' && app.id == 'a'")), vec![("rules[0].when", "'get', which is true for every request: methods reach rules in upper case, so the comparison always holds; write 'GET'")]),
            ("in a list", Box::new(rule("request.method in ['GET', 'post', 'put']")), vec![("rules[0].when", "'post'"), ("rules[0].when", "'put'")]),
            ("by index", Box::new(rule("request['method'] == 'patch'")), vec![("rules[0].when", "'patch'")]),
            ("inside a macro", Box::new(rule("['a'].exists(x, request.method == 'head')")), vec![("rules[0].when", "'head'")]),
            ("upper case is right", Box::new(rule("request.method == 'DELETE' || request.method in ['PUT']")), vec![]),
            ("another field in lower case is fine", Box::new(rule("request.path == '/delete' && app.tier == 'gold'")), vec![]),
            (
                "an expired override",
                Box::new(|doc| {
                    doc["apps"][0]["quota_overrides"] = json!([
                        {"daily_budget": 5, "expires_at": "2030-01-01T00:00:00Z"},
                        {"daily_budget": 9, "expires_at": "2026-12-01T00:00:00Z", "reason": "flash sale"},
                    ])
                }),
                vec![(
                    "apps[0].quota_overrides[1].expires_at",
                    "the override expired at 2026-12-01T00:00:00Z: it is ignored; remove it, or move expires_at",
                )],
            ),
            (
                "an exemption above a dataset's route",
                Box::new(|doc| doc["exemptions"] = json!([{"id": "probes", "routes": [{"path_prefix": "/"}]}])),
                vec![("exemptions[0].routes[0].path_prefix", "exemption `probes` covers `/`, wider than the routes of dataset `d`")],
            ),
            (
                "an exemption beside the datasets",
                Box::new(|doc| doc["exemptions"] = json!([{"id": "probes", "routes": [{"path_prefix": "/healthz"}]}])),
                vec![],
            ),
            (
                "an exemption exactly a dataset's route is not wider",
                Box::new(|doc| doc["exemptions"] = json!([{"id": "public", "routes": [{"path_prefix": "/d"}]}])),
                vec![],
            ),
            (
                "a review 13 days ahead (the 19th, now the 6th at noon): warned",
                Box::new(|doc| doc["apps"][1]["review_by"] = json!("2026-12-19")),
                vec![("apps[1].review_by", "app `b` is due for review by 2026-12-19 (in 13 days): after that day")],
            ),
            (
                "a review 14 days ahead: not yet",
                Box::new(|doc| doc["apps"][1]["review_by"] = json!("2026-12-20")),
                vec![],
            ),
            (
                "a review due today",
                Box::new(|doc| doc["apps"][0]["review_by"] = json!("2026-12-06")),
                vec![("apps[0].review_by", "due for review by 2026-12-06 (today)")],
            ),
            (
                "a review overdue",
                Box::new(|doc| doc["apps"][0]["review_by"] = json!("2026-12-05")),
                vec![("apps[0].review_by", "review overdue since 2026-12-05: the filter refuses it")],
            ),
            (
                "an override expiring now has expired",
                Box::new(|doc| doc["apps"][0]["quota_overrides"] = json!([{"daily_budget": 5, "expires_at": NOW}])),
                vec![("apps[0].quota_overrides[0].expires_at", "expired at 2026-12-06T12:00:00Z")],
            ),
        ];
        let now = parse_rfc3339(NOW).unwrap_or_default();
        for (why, edit, want) in cases {
            let got = lint(&policy(edit), now);
            let got_paths: Vec<&str> = got.iter().map(|w| w.path.as_str()).collect();
            let want_paths: Vec<&str> = want.iter().map(|(p, _)| *p).collect();
            assert_eq!(got_paths, want_paths, "{why}: {got:#?}");
            for (w, (_, part)) in got.iter().zip(&want) {
                assert!(w.message.contains(part), "{why}: {:?} should contain {part:?}", w.message);
                assert_eq!(w.line, None, "{why}: no line without a file");
            }
        }
    }

    #[test]
    fn kinds_and_display() {
        let p = policy(|doc| {
            doc["apps"][1]["connectors"] = json!(["billing"]);
            doc["apps"][1]["region"] = json!("eu-wst-1");
            doc["apps"][1]["quota_overrides"] = json!([{"daily_budget": 5, "expires_at": "2020-01-01T00:00:00Z"}]);
            doc["rules"] = json!([{"id": "r", "effect": "deny", "when": "request.method == 'delete'"}]);
        });
        let kinds: Vec<Kind> = lint(&p, parse_rfc3339(NOW).unwrap_or_default()).iter().map(|w| w.kind).collect();
        assert_eq!(kinds, [Kind::UnapprovedConnector, Kind::RegionTypo, Kind::ExpiredOverride, Kind::LowerCaseMethod]);
        let w = Warning::new(Kind::RegionTypo, "apps[3].region".into(), "m".into());
        assert_eq!(w.to_string(), "warning: apps[3].region: m");
    }

    #[test]
    fn one_edit_table() {
        let cases: &[(&str, &str, bool, &str)] = &[
            ("eu-west-1", "eu-wst-1", true, "a letter removed"),
            ("eu-wst-1", "eu-west-1", true, "a letter added"),
            ("eu-west-1", "eu-wesT-1", true, "a letter replaced"),
            ("eu-west-1", "eu-wset-1", true, "two neighbours swapped"),
            ("eu-west-1", "eu-west-1", false, "the same"),
            ("eu-west-1", "eu-wts-1", false, "two edits"),
            ("eu-west-1", "ue-wset-1", false, "two swaps"),
            ("eu-west-1", "eu-tsew-1", false, "a reversal is not a swap"),
            ("aa", "aaa", true, "a repeated letter added"),
            ("abab", "baba", false, "shifted"),
            ("", "a", true, "from nothing"),
            ("é-1", "e-1", true, "characters, not bytes"),
            ("us-east-1", "eu-west-1", false, "far apart"),
        ];
        for (a, b, want, why) in cases {
            assert_eq!(one_edit_apart(a, b), *want, "{why}: {a:?} {b:?}");
        }
    }

    /// The optimal-string-alignment distance, computed the textbook way.
    fn osa(a: &str, b: &str) -> usize {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i;
        }
        for (j, cell) in d[0].iter_mut().enumerate() {
            *cell = j;
        }
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    best = best.min(d[i - 2][j - 2] + 1);
                }
                d[i][j] = best;
            }
        }
        d[a.len()][b.len()]
    }

    proptest::proptest! {
        #[test]
        fn one_edit_is_distance_one(a in "[ab1-]{0,6}", b in "[ab1-]{0,6}") {
            proptest::prop_assert_eq!(one_edit_apart(&a, &b), osa(&a, &b) == 1, "{:?} {:?}", a, b);
        }

        #[test]
        fn one_edit_made_is_one_edit_found(a in "[ab1-]{0,6}", kind in 0u8..4, at in 0usize..7, c in proptest::char::range('a', 'c')) {
            let mut b: Vec<char> = a.chars().collect();
            let at = at.min(b.len());
            match kind {
                0 => b.insert(at, c),
                1 if at < b.len() => { b.remove(at); }
                2 if at < b.len() => b[at] = c,
                3 if at + 1 < b.len() => b.swap(at, at + 1),
                _ => {}
            }
            let b: String = b.into_iter().collect();
            proptest::prop_assert_eq!(one_edit_apart(&a, &b), osa(&a, &b) == 1, "{:?} {:?}", a, b);
        }
    }
}
