//! Table-driven tests of `decide()` over one policy: every row of the SPEC decision table that an
//! API key can reach, with a fake clock and the in-memory counter store.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use guardrail_core::compile::{compile_json_str, compile_with, parse_json_str, CompiledPolicy};
use guardrail_core::decide::{decide, decide_traced, Code, Decision, Event, Request};
use guardrail_core::jwt::{TokenCache, VerifiedToken};
use guardrail_core::quota::{ensure_keys, MemoryStore};
use guardrail_core::rules::ExpressionCache;
use std::sync::Arc;

const T0: u64 = 1_795_924_800 * 1_000_000_000; // 2026-11-29T04:00:00Z

fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(guardrail_core::api_key_digest(key)))
}

fn app(id: &str, env: &str, lifecycle: &str, region: &str, classes: &str, tier: &str) -> String {
    format!(
        r#"{{"id": "{id}", "environment": "{env}", "tier": "{tier}", "lifecycle": "{lifecycle}", "region": "{region}",
            "data_classes": [{classes}], "connectors": ["crm", "inventory"], "api_keys": ["{}"]}}"#,
        digest(&format!("key-{id}"))
    )
}

fn policy() -> CompiledPolicy {
    match compile_json_str(&policy_text()) {
        Ok(p) => p,
        Err(e) => panic!("fixture policy is invalid: {e}"),
    }
}

fn policy_text() -> String {
    let apps = [
        app("pos", "prod", "published", "eu-west-1", r#""public", "internal", "regulated""#, "standard"),
        app("promo", "dev", "draft", "eu-west-1", r#""public""#, "standard"),
        app("drafty", "prod", "draft", "eu-west-1", r#""public""#, "standard"),
        app("old", "prod", "deprecated", "eu-west-1", r#""public""#, "standard"),
        app("bad", "prod", "quarantined", "eu-west-1", r#""public""#, "standard"),
        app("approved", "test", "approved", "eu-west-1", r#""public", "internal""#, "standard"),
        app("us-app", "prod", "published", "us-east-1", r#""public", "internal", "regulated""#, "standard"),
        app("tiny", "prod", "published", "eu-west-1", r#""public""#, "tiny"),
    ]
    .join(",");
    format!(
        r#"{{"apiVersion": "guardrail/v1", "kind": "Policy", "revision": "r1",
        "settings": {{"gateway_region": "eu-west-1"}},
        "tiers": {{"standard": {{"rate": {{"requests": 100, "per": "1m"}}, "daily_budget": 1000}},
                   "tiny": {{"rate": {{"requests": 2, "per": "1h"}}, "daily_budget": 3}}}},
        "connectors": {{"approved": ["crm", "inventory"]}},
        "apps": [{apps}],
        "datasets": [
          {{"id": "customers-eu", "classification": "internal", "allowed_regions": ["eu-west-1"],
            "routes": [{{"path_prefix": "/customers", "methods": ["GET", "POST"]}}]}},
          {{"id": "catalog", "classification": "public", "allowed_regions": ["eu-west-1", "us-east-1"],
            "routes": [{{"path_prefix": "/catalog"}}]}},
          {{"id": "payments", "classification": "regulated", "allowed_regions": ["eu-west-1", "us-east-1"],
            "routes": [{{"path_prefix": "/payments"}}], "requires_jit": false}}
        ],
        "rules": [
          {{"id": "no-deletes", "effect": "deny", "when": "request.method == 'DELETE'", "message": "deletes are not allowed"}},
          {{"id": "catalog-readers", "effect": "allow", "when": "app.tier == 'standard'", "datasets": ["catalog"]}},
          {{"id": "watch-post", "effect": "deny", "when": "request.method == 'POST'", "mode": "shadow"}},
          {{"id": "broken", "effect": "deny", "when": "request.headers['x-missing'] == 'x'", "classifications": ["regulated"]}}
        ]}}"#
    )
}

fn store_for(policy: &CompiledPolicy) -> MemoryStore {
    let mut store = MemoryStore::default();
    let keys: Vec<&str> = policy.apps.iter().map(|a| a.quota_key.as_str()).collect();
    if let Err(e) = ensure_keys(&mut store, keys) {
        panic!("ensure_keys: {e}");
    }
    store
}

fn request<'a>(
    method: &'a str,
    path: &'a str,
    connector: Option<&'a str>,
    headers: &'a [(String, String)],
) -> Request<'a> {
    Request {
        method,
        host: "api.retailco.example",
        path,
        connector,
        request_id: "req-1",
        headers,
        gateway_region: None,
        fleet: None,
        peer: None,
    }
}

fn key(id: &str) -> Vec<(String, String)> {
    vec![("x-api-key".to_string(), format!("key-{id}"))]
}

/// A verified token for `app` (as the token cache holds it), valid until 2033.
fn verified_token(app: &str, app_index: Option<usize>) -> VerifiedToken {
    VerifiedToken {
        issuer: 0,
        app: app.to_string(),
        claims: serde_json::Map::new(),
        exp: 2_000_000_000,
        iat: None,
        nbf: None,
        scopes: Vec::new(),
        clock_skew_seconds: 0,
        app_index,
    }
}

/// One decision on a fresh quota store and token cache.
fn decide_fresh<'p>(
    policy: &'p CompiledPolicy,
    method: &str,
    path: &str,
    headers: &[(String, String)],
) -> Decision<'p> {
    decide(policy, &request(method, path, None, headers), T0, &mut store_for(policy), &mut TokenCache::new(4))
}

#[test]
fn decision_table() {
    let policy = policy();
    // (why, headers, method, path, connector, expected code or None for allow)
    let cases: Vec<(&str, Vec<(String, String)>, &str, &str, Option<&str>, Option<Code>)> = vec![
        ("no credential", vec![], "GET", "/", None, Some(Code::Unauthenticated)),
        ("unknown key", vec![("x-api-key".into(), "nope".into())], "GET", "/", None, Some(Code::Unauthenticated)),
        ("two api keys", [key("pos"), key("promo")].concat(), "GET", "/", None, Some(Code::Unauthenticated)),
        (
            "basic auth is not a credential",
            vec![("authorization".into(), "Basic Zm9vOmJhcg==".into())],
            "GET",
            "/",
            None,
            Some(Code::Unauthenticated),
        ),
        (
            "garbage bearer",
            vec![("authorization".into(), "Bearer abc".into())],
            "GET",
            "/",
            None,
            Some(Code::Unauthenticated),
        ),
        ("published", key("pos"), "GET", "/", None, None),
        ("approved", key("approved"), "GET", "/", None, None),
        ("draft in dev", key("promo"), "GET", "/", None, None),
        ("draft in prod", key("drafty"), "GET", "/", None, Some(Code::AppNotActive)),
        ("deprecated", key("old"), "GET", "/", None, Some(Code::AppNotActive)),
        ("quarantined", key("bad"), "GET", "/", None, Some(Code::AppNotActive)),
        ("invalid path before identity", vec![], "GET", "/customers%2F7", None, Some(Code::InvalidPath)),
        ("dot segments above root", key("pos"), "GET", "/../etc", None, Some(Code::InvalidPath)),
        ("approved connector", key("pos"), "GET", "/", Some("crm"), None),
        ("connector not approved", key("pos"), "GET", "/", Some("partner-x"), Some(Code::ConnectorNotApproved)),
        ("residency ok", key("pos"), "GET", "/customers/7", Some("crm"), None),
        (
            "residency: US app on EU data",
            key("us-app"),
            "GET",
            "/customers/7",
            Some("crm"),
            Some(Code::ResidencyViolation),
        ),
        (
            "residency via spelling",
            key("us-app"),
            "GET",
            "//Customers/./7",
            Some("crm"),
            Some(Code::ResidencyViolation),
        ),
        ("method outside route: no dataset", key("us-app"), "PUT", "/customers/7", Some("crm"), None),
        ("data class missing", key("promo"), "GET", "/customers", None, Some(Code::AccessDenied)),
        ("deny rule wins", key("pos"), "DELETE", "/", None, Some(Code::AccessDenied)),
        ("lower-case method is the same method", key("pos"), "delete", "/", None, Some(Code::AccessDenied)),
        (
            "lower-case method matches a route",
            key("us-app"),
            "get",
            "/customers/7",
            Some("crm"),
            Some(Code::ResidencyViolation),
        ),
        ("allow rule holds", key("pos"), "GET", "/catalog/1", None, None),
        ("allow rule in scope does not hold", key("tiny"), "GET", "/catalog/1", None, Some(Code::AccessDenied)),
        ("evaluation error denies", key("pos"), "GET", "/payments/1", None, Some(Code::AccessDenied)),
        ("shadow rule never enforced", key("pos"), "POST", "/customers", None, None),
    ];
    for (why, headers, method, path, connector, want) in &cases {
        let mut store = store_for(&policy);
        let mut tokens = TokenCache::new(16);
        let d = decide(&policy, &request(method, path, *connector, headers), T0, &mut store, &mut tokens);
        assert_eq!(d.denial.as_ref().map(|x| x.code), *want, "{why}: {:?}", d.denial);
    }
}

#[test]
fn denials_name_rule_and_app() {
    let policy = policy();
    let mut store = store_for(&policy);
    let mut tokens = TokenCache::new(16);
    let d = decide(&policy, &request("GET", "/payments/1", None, &key("pos")), T0, &mut store, &mut tokens);
    let denial = d.denial.unwrap_or_else(|| panic!("expected a denial"));
    assert_eq!(denial.rule.as_deref(), Some("broken"), "evaluation error names the rule");
    assert_eq!(d.app.map(|a| a.id.as_str()), Some("pos"), "app known on denial");
    let d = decide(&policy, &request("POST", "/customers", None, &key("pos")), T0, &mut store, &mut tokens);
    assert!(
        d.events.iter().any(|e| matches!(e, Event::Shadow { rule, .. } if rule == "watch-post")),
        "shadow hit reported"
    );
}

/// The filter and the companion compile each revision with the expressions of the one before: an
/// edited rule is compiled anew and decides, an unchanged one is shared.
#[test]
fn a_revision_compiled_with_the_last_ones_expressions_decides_by_its_own_rules() {
    let mut cache = ExpressionCache::default();
    let text = policy_text();
    let compile = |text: &str, cache: &mut ExpressionCache| match parse_json_str(text) {
        Ok(raw) => compile_with(raw, cache).unwrap_or_else(|e| panic!("{e}")),
        Err(e) => panic!("{}", e.error),
    };
    let first = compile(&text, &mut cache);
    let second = compile(&text.replace("request.method == 'DELETE'", "request.method == 'GET'"), &mut cache);
    assert!(Arc::ptr_eq(&first.rules[1].expr, &second.rules[1].expr), "an unchanged rule's expression is shared");
    assert!(!Arc::ptr_eq(&first.rules[0].expr, &second.rules[0].expr), "an edited rule is compiled anew");
    let mut tokens = TokenCache::new(16);
    let pos = key("pos");
    let get = request("GET", "/", None, &pos);
    let d = decide(&first, &get, T0, &mut store_for(&first), &mut tokens);
    assert!(d.allowed(), "{:?}", d.denial);
    let d = decide(&second, &get, T0, &mut store_for(&second), &mut tokens);
    assert_eq!(d.denial.and_then(|d| d.rule).as_deref(), Some("no-deletes"), "the edited rule decides");
    // And back: the first revision's expression was dropped with it, and is compiled again.
    let third = compile(&text, &mut cache);
    assert!(!Arc::ptr_eq(&first.rules[0].expr, &third.rules[0].expr));
    assert!(decide(&third, &get, T0, &mut store_for(&third), &mut tokens).allowed());
    let delete = request("DELETE", "/", None, &pos);
    let d = decide(&third, &delete, T0, &mut store_for(&third), &mut tokens);
    assert_eq!(d.denial.and_then(|d| d.rule).as_deref(), Some("no-deletes"));
}

#[test]
fn rate_then_budget_with_fake_clock() {
    let policy = policy();
    let mut store = store_for(&policy);
    let mut tokens = TokenCache::new(16);
    let headers = key("tiny");
    let mut codes = Vec::new();
    // tiny: 2 per hour (burst 2), 3 per day. Two now, one refused by rate, one after 30 min,
    // then the budget is spent even though the bucket refills.
    for offset_secs in [0u64, 0, 0, 1800, 3600 * 3] {
        let d = decide(
            &policy,
            &request("GET", "/", None, &headers),
            T0 + offset_secs * 1_000_000_000,
            &mut store,
            &mut tokens,
        );
        codes.push(d.denial.map(|x| x.code));
    }
    assert_eq!(
        codes,
        vec![None, None, Some(Code::QuotaExceeded), None, Some(Code::BudgetExhausted)],
        "rate then budget"
    );
}

#[test]
fn trace_names_every_check() {
    let policy = policy();
    let mut store = store_for(&policy);
    let mut tokens = TokenCache::new(16);
    let d =
        decide_traced(&policy, &request("GET", "/customers/7", Some("crm"), &key("pos")), T0, &mut store, &mut tokens);
    let text = d.trace.join("\n");
    for check in [
        "path",
        "credential",
        "lifecycle",
        "connector",
        "dataset",
        "residency",
        "data-class",
        "rule",
        "quota",
        "verdict",
    ] {
        assert!(text.contains(check), "trace mentions {check}:\n{text}");
    }
}

#[test]
fn fleet_exhaustion_applies_for_its_day_only() {
    let policy = policy();
    let mut store = store_for(&policy);
    let mut tokens = TokenCache::new(16);
    let headers = key("pos");
    let today = T0 / 1_000_000_000 / 86_400;
    let fleet = guardrail_core::fleet::Fleet { day: today, exhausted: ["pos".to_string()].into() };
    let mut req = request("GET", "/", None, &headers);
    req.fleet = Some(&fleet);
    let d = decide(&policy, &req, T0, &mut store, &mut tokens);
    let denial = d.denial.expect("fleet-exhausted app is refused");
    assert_eq!((denial.code, denial.rule.as_deref()), (Code::BudgetExhausted, Some("fleet-budget")), "code and rule");
    assert_eq!(denial.retry_after_secs, Some(72_000), "retry at the next UTC midnight");
    let tomorrow = T0 + 86_400 * 1_000_000_000;
    let d = decide(&policy, &req, tomorrow, &mut store, &mut tokens);
    assert!(d.allowed(), "yesterday's fleet state does not apply: {:?}", d.denial);
}

#[test]
fn hosts_that_cannot_be_matched_safely_are_refused() {
    let policy = policy();
    let headers = key("pos");
    for host in ["api.retailco.example,other.example", "api .example", "evil@api.example", "a\u{0}b"] {
        let mut store = store_for(&policy);
        let mut tokens = TokenCache::new(16);
        let mut req = request("GET", "/", None, &headers);
        req.host = host;
        let d = decide(&policy, &req, T0, &mut store, &mut tokens);
        assert_eq!(d.denial.map(|x| x.code), Some(Code::InvalidPath), "host {host:?}");
    }
}

#[test]
fn a_cached_tokens_app_index_is_only_a_hint() {
    let policy = policy();
    let found = |t: &VerifiedToken| policy.app_of_token(t).map(|a| a.id.as_str());
    let approved = policy.app_index("approved");
    assert!(approved.is_some_and(|i| i > 0));
    assert_eq!(found(&verified_token("approved", approved)), Some("approved"), "the hint, when right");
    // A token cached under another policy, where the indexes differ: never the app at the index.
    assert_eq!(found(&verified_token("approved", Some(0))), Some("approved"), "a stale hint falls back to the id");
    assert_eq!(found(&verified_token("approved", Some(10_000))), Some("approved"), "an index past the end too");
    assert_eq!(found(&verified_token("approved", None)), Some("approved"));
    assert_eq!(found(&verified_token("gone", Some(0))), None, "an app not in the catalog is not found at any index");
}

/// The bits `compile` derives for connectors, data classes and regions decide exactly as the
/// strings they come from, including past 64 connectors or regions, where the strings decide.
#[test]
fn masks_decide_as_the_strings() {
    let region = |i: usize| format!("\"r{i}\"");
    let regions = |r: std::ops::Range<usize>| r.map(region).collect::<Vec<_>>().join(", ");
    let dataset_regions = [regions(0..2), regions(2..66), format!("{}, {}", region(66), region(0)), region(1)];
    let datasets: Vec<String> = dataset_regions
        .iter()
        .enumerate()
        .map(|(i, allowed)| {
            let class = ["public", "internal", "confidential", "public"][i];
            format!(
                r#"{{"id": "ds{i}", "classification": "{class}", "allowed_regions": [{allowed}],
                    "routes": [{{"path_prefix": "/ds{i}"}}]}}"#
            )
        })
        .collect();
    let connectors = |picks: &[&str]| picks.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    let apps: Vec<String> = [
        ("a0", "r0", r#""public""#, connectors(&["c0", "c63"])),
        ("a1", "r1", r#""public", "internal""#, connectors(&["c64", "c69"])),
        ("a2", "r65", r#""internal", "confidential""#, connectors(&["c0", "c64"])),
        ("a3", "r66", r#""public", "confidential""#, connectors(&["c63", "c69", "unlisted"])),
        ("a4", "r69", r#""public""#, connectors(&[])),
        ("a5", "nowhere", r#""public", "internal", "confidential""#, connectors(&["c0", "c63", "c64", "c69"])),
    ]
    .iter()
    .map(|(id, region, classes, connectors)| {
        format!(
            r#"{{"id": "{id}", "environment": "prod", "tier": "t", "lifecycle": "published", "region": "{region}",
                "data_classes": [{classes}], "connectors": [{connectors}], "api_keys": ["{}"]}}"#,
            digest(&format!("key-{id}"))
        )
    })
    .collect();
    let approved = (0..70).map(|i| format!("\"c{i}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        r#"{{"apiVersion": "guardrail/v1", "kind": "Policy", "revision": "masks",
        "settings": {{"gateway_region": "r0"}},
        "tiers": {{"t": {{"rate": {{"requests": 1000000, "per": "1s"}}}}}},
        "connectors": {{"approved": [{approved}]}},
        "apps": [{}], "datasets": [{}]}}"#,
        apps.join(","),
        datasets.join(",")
    );
    let masked = compile_json_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(masked.apps.iter().all(|a| a.masks.is_some()), "compile sets every app's masks");
    let region_masks: Vec<bool> = masked.datasets.iter().map(|d| d.region_mask.is_some()).collect();
    assert_eq!(region_masks, [true, false, false, true], "a dataset with a region id past 63 keeps its strings");
    let mut strings = compile_json_str(&text).unwrap_or_else(|e| panic!("{e}"));
    strings.apps.iter_mut().for_each(|a| a.masks = None);
    strings.datasets.iter_mut().for_each(|d| d.region_mask = None);

    let mut outcomes = std::collections::BTreeSet::new();
    for app in ["a0", "a1", "a2", "a3", "a4", "a5"] {
        for connector in [Some("c0"), Some("c63"), Some("c64"), Some("c69"), Some("unlisted"), None] {
            for path in ["/ds0/x", "/ds1/x", "/ds2/x", "/ds3/x", "/other"] {
                let headers = key(app);
                let verdict = |policy: &CompiledPolicy| {
                    let mut store = store_for(policy);
                    let mut tokens = TokenCache::new(4);
                    let d = decide(policy, &request("GET", path, connector, &headers), T0, &mut store, &mut tokens);
                    d.denial.map(|d| (d.code, d.detail.to_string()))
                };
                let want = verdict(&strings);
                assert_eq!(verdict(&masked), want, "{app} via {connector:?} to {path}");
                outcomes.insert(want.map(|(code, _)| code.as_str()));
            }
        }
    }
    // The table reaches every outcome the masks take part in.
    for outcome in [None, Some("connector-not-approved"), Some("residency-violation"), Some("access-denied")] {
        assert!(outcomes.contains(&outcome), "no case ends in {outcome:?}: {outcomes:?}");
    }
}

#[test]
fn the_rules_in_scope_are_listed_per_dataset_at_compile_time() {
    let policy = policy();
    let ids = |rules: Vec<&guardrail_core::compile::Rule>| rules.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    for (i, ds) in policy.datasets.iter().enumerate() {
        let listed = ids(policy.rules_for(Some(i)).collect());
        assert_eq!(listed, ids(policy.rules.iter().filter(|r| r.applies_to(Some(ds))).collect()), "{}", ds.id);
    }
    assert_eq!(ids(policy.rules_for(None).collect()), ["no-deletes", "watch-post"], "no dataset: the global rules");
    assert_eq!(
        ids(policy.rules_for(policy.datasets.iter().position(|d| d.id == "catalog")).collect()),
        ["no-deletes", "catalog-readers", "watch-post"]
    );
}

// === The audit's findings: shadow rules and rule order, request.path, the app of a denial ===

/// A policy whose rules are `rules` (JSON objects), with dataset `p` (internal, at `/p`) and the
/// apps of [`policy_text`].
fn policy_with_rules(rules: &[&str]) -> CompiledPolicy {
    let text = policy_text();
    let start = text.find(r#""rules": ["#).unwrap_or_else(|| panic!("fixture has rules"));
    let datasets = r#"{"id": "p", "classification": "internal", "allowed_regions": ["eu-west-1"],
        "routes": [{"path_prefix": "/p"}]}, "#;
    let text = format!("{}\"rules\": [{}]}}", &text[..start], rules.join(", ")).replacen(
        r#""datasets": ["#,
        &format!(r#""datasets": [{datasets}"#),
        1,
    );
    compile_json_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Every in-scope shadow rule is evaluated and reported whatever its place in the list and
/// whatever the enforced verdict, which stays what it was.
#[test]
fn shadow_rules_report_whatever_the_order_and_the_verdict() {
    let rule = |name: &str| match name {
        "deny" => r#"{"id": "no-deletes", "effect": "deny", "when": "request.method == 'DELETE'"}"#,
        "shadow" => r#"{"id": "watch", "effect": "deny", "when": "request.method == 'DELETE'", "mode": "shadow"}"#,
        "shadow-allow" => {
            r#"{"id": "gets-only", "effect": "allow", "when": "request.method == 'GET'", "mode": "shadow"}"#
        }
        "shadow-broken" => {
            r#"{"id": "shadow-broken", "effect": "deny", "when": "request.headers['x-none'] == 'x'", "mode": "shadow"}"#
        }
        "broken" => r#"{"id": "broken", "effect": "deny", "when": "request.headers['x-none'] == 'x'"}"#,
        "allow" => r#"{"id": "reads", "effect": "allow", "when": "request.method == 'GET'"}"#,
        other => panic!("no rule {other}"),
    };
    // (why, the rules in order, app, method, path, the rule that denies, the shadow hits)
    let cases: &[(&str, &str, &str, &str, &str, Option<&str>, &str)] = &[
        ("deny listed first", "deny shadow", "pos", "DELETE", "/", Some("no-deletes"), "watch"),
        ("shadow listed first", "shadow deny", "pos", "DELETE", "/", Some("no-deletes"), "watch"),
        ("no enforced denial", "deny shadow", "pos", "GET", "/", None, ""),
        ("a failing enforced rule first", "broken deny shadow", "pos", "DELETE", "/", Some("broken"), "watch"),
        ("the first denial wins", "deny broken shadow", "pos", "DELETE", "/", Some("no-deletes"), "watch"),
        (
            "shadows around a denial",
            "shadow-allow deny shadow shadow-broken",
            "pos",
            "DELETE",
            "/",
            Some("no-deletes"),
            "gets-only watch shadow-broken",
        ),
        ("no allow rule holds", "allow shadow", "pos", "DELETE", "/", Some("reads"), "watch"),
        ("the data class denies first", "deny shadow", "promo", "DELETE", "/p/1", Some("data-class"), "watch"),
        ("the data class, no rule denies", "shadow", "promo", "DELETE", "/p/1", Some("data-class"), "watch"),
        ("data class, allow rule", "allow shadow", "promo", "DELETE", "/p/1", Some("data-class"), "watch"),
        ("the data class without rules", "", "promo", "GET", "/p/1", Some("data-class"), ""),
        ("allowed with a shadow hit", "shadow", "pos", "DELETE", "/p/1", None, "watch"),
        ("denied before the ABAC step: no rule runs", "deny shadow", "bad", "DELETE", "/", Some("lifecycle"), ""),
    ];
    for (why, rules, app, method, path, want, shadows) in cases {
        let policy = policy_with_rules(&rules.split_whitespace().map(rule).collect::<Vec<_>>());
        let headers = key(app);
        let want = want.map(|r| (if r == "lifecycle" { Code::AppNotActive } else { Code::AccessDenied }, r));
        let shadows: Vec<&str> = shadows.split_whitespace().collect();
        for traced in [false, true] {
            let run = if traced { decide_traced } else { decide };
            let req = request(method, path, None, &headers);
            let d = run(&policy, &req, T0, &mut store_for(&policy), &mut TokenCache::new(4));
            let got = d.denial.as_ref().map(|x| (x.code, x.rule.as_deref().unwrap_or("")));
            assert_eq!(got, want, "{why} (traced: {traced}): the verdict");
            assert_eq!(d.shadow_rules(), shadows, "{why} (traced: {traced}): the shadow hits");
        }
    }
}

/// A shadow hit carries what its denial would have said: the rule's message, a default naming
/// it, or the evaluation error.
#[test]
fn shadow_hits_carry_the_detail_of_the_denial_they_would_be() {
    let policy = policy_with_rules(&[
        r#"{"id": "quiet", "effect": "deny", "when": "true", "mode": "shadow"}"#,
        r#"{"id": "told", "effect": "deny", "when": "true", "mode": "shadow", "message": "watched"}"#,
        r#"{"id": "gets", "effect": "allow", "when": "request.method == 'GET'", "mode": "shadow"}"#,
        r#"{"id": "fails", "effect": "deny", "when": "request.headers['x-none'] == 'x'", "mode": "shadow"}"#,
    ]);
    let headers = key("pos");
    let d = decide_fresh(&policy, "POST", "/", &headers);
    assert!(d.allowed(), "shadow rules never enforce: {:?}", d.denial);
    let details: Vec<(&str, &str, bool)> = d
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Shadow { rule, detail, error } => Some((rule.as_str(), detail.as_str(), error.is_some())),
            Event::SoftLimit { .. } => None,
        })
        .collect();
    assert_eq!(details.len(), 4, "{details:?}");
    let cases = [
        ("quiet", "denied by rule `quiet`", false, "no message: the default an enforced rule gives"),
        ("told", "watched", false, "the rule's message"),
        ("gets", "allow rule `gets` does not hold", false, "an allow rule that does not hold"),
        ("fails", "rule `fails` failed to evaluate", true, "an evaluation error"),
    ];
    for ((rule, detail, error, why), got) in cases.iter().zip(&details) {
        assert_eq!(got.0, *rule, "{why}");
        assert!(got.1.starts_with(detail), "{why}: detail {:?}", got.1);
        assert_eq!(got.2, *error, "{why}: error");
    }
}

/// `request.path` is the form dataset matching uses, so no spelling that reaches dataset `p`
/// escapes a rule about its paths, on the fast path and on the interpreter.
#[test]
fn request_path_in_rules_is_the_form_datasets_match() {
    let policy = policy_with_rules(&[
        r#"{"id": "no-admin", "effect": "deny", "when": "request.path.startsWith('/p/admin')", "datasets": ["p"]}"#,
        // A map literal keeps this one on the interpreter.
        r#"{"id": "no-secret", "effect": "deny", "when": "{'path': request.path}.path.startsWith('/p/secret')", "datasets": ["p"]}"#,
    ]);
    assert_eq!(policy.rules[1].expr.path(), guardrail_core::rules::Path::Interpreter, "fixture: one rule per path");
    let headers = key("pos");
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("/p/admin", Some("no-admin"), "as written"),
        ("/p;x=1/admin", Some("no-admin"), "params on the dataset's segment"),
        ("/p/admin;x=1/users", Some("no-admin"), "params on the rule's segment"),
        ("/p/%41dmin", Some("no-admin"), "an escaped capital"),
        ("/p/Admin", Some("no-admin"), "upper case"),
        ("/P/ADMIN", Some("no-admin"), "all upper case"),
        ("/p%3Bx/admin", Some("no-admin"), "an encoded semicolon"),
        ("//p/./x/../admin/", Some("no-admin"), "dot segments and slashes"),
        ("/p/public", None, "another path of the dataset"),
        ("/p/administrator", Some("no-admin"), "startsWith is a string prefix"),
        ("/p/secret", Some("no-secret"), "interpreter: as written"),
        ("/p;v=2/Secret", Some("no-secret"), "interpreter: params and case"),
        ("/p/%53ecret", Some("no-secret"), "interpreter: an escaped capital"),
    ];
    for (path, want, why) in cases {
        let d = decide_fresh(&policy, "GET", path, &headers);
        assert_eq!(d.dataset.map(|ds| ds.id.as_str()), Some("p"), "{why}: {path} reaches dataset p");
        assert_eq!(d.denial.as_ref().and_then(|x| x.rule.as_deref()), *want, "{why}: {path}");
    }
}

/// Where a verified credential names the app, the denial names it: a token's app that is not in
/// the catalog, and the API key's app when the token sent with it is refused.
#[test]
fn denials_name_the_app_a_verified_credential_names() {
    let policy = policy();
    let bearer = |t: &str| ("authorization".to_string(), format!("Bearer {t}"));
    // (why, headers, expected code, expected app to name)
    let cases: Vec<(&str, Vec<(String, String)>, Code, Option<&str>)> = vec![
        (
            "a verified token of an app not in the catalog",
            vec![bearer("tok-ghost")],
            Code::AppNotRegistered,
            Some("ghost"),
        ),
        (
            "with an API key too",
            [key("pos"), vec![bearer("tok-ghost")]].concat(),
            Code::AppNotRegistered,
            Some("ghost"),
        ),
        ("a refused token alone", vec![bearer("garbage")], Code::Unauthenticated, None),
        ("an unknown API key", vec![("x-api-key".into(), "nope".into())], Code::Unauthenticated, None),
        ("no credential", vec![], Code::Unauthenticated, None),
        ("an app that is not active: the catalog's", key("bad"), Code::AppNotActive, Some("bad")),
    ];
    for (why, headers, code, app) in &cases {
        let mut tokens = TokenCache::new(4);
        tokens.insert("tok-ghost", verified_token("ghost", None));
        let d = decide(&policy, &request("GET", "/", None, headers), T0, &mut store_for(&policy), &mut tokens);
        let denial = d.denial.as_ref().unwrap_or_else(|| panic!("{why}: admitted"));
        assert_eq!(denial.code, *code, "{why}: {denial:?}");
        assert_eq!(d.app_id(), *app, "{why}: the app named");
        if denial.app.is_some() {
            assert!(d.app.is_none(), "{why}: a named app is not an authenticated one");
        }
        let body: serde_json::Value =
            serde_json::from_str(&guardrail_core::problem::problem_body(denial, "req-1", d.app.map(|a| a.id.as_str())))
                .unwrap_or_default();
        assert_eq!(body.get("app").and_then(|v| v.as_str()), *app, "{why}: problem body");
    }
    // `explain --app` and policy tests name an app by id; one not in the catalog is named too.
    let d = guardrail_core::decide::decide_as(
        &policy,
        "ghost",
        &request("GET", "/", None, &[]),
        T0,
        &mut store_for(&policy),
        &mut TokenCache::new(4),
    );
    assert_eq!(d.denial.as_ref().map(|x| x.code), Some(Code::AppNotRegistered));
    assert_eq!(d.app_id(), Some("ghost"), "decide_as names the app it was asked about");
}

/// `Authorization` values that are not Guardrail's (another scheme, an opaque bearer) are left to
/// the upstream beside an API key, and are no credential without one. (Tokens of an unknown or a
/// configured issuer: control/src/mint/mesh_tests.rs, which can sign them.)
#[test]
fn authorization_that_is_not_guardrails_is_left_alone() {
    let policy = policy();
    let auth = |v: &str| vec![("authorization".to_string(), v.to_string())];
    let cases: &[(&str, Vec<(String, String)>, Option<Code>)] = &[
        ("Basic beside an API key", [key("pos"), auth("Basic eDp5")].concat(), None),
        ("an opaque bearer beside an API key", [key("pos"), auth("Bearer 2YotnFZFEjr1zCsicMWpAA")].concat(), None),
        ("a malformed JWT beside an API key", [key("pos"), auth("Bearer a.b.c")].concat(), None),
        ("two foreign values beside an API key", [key("pos"), auth("Basic eDp5"), auth("Bearer x")].concat(), None),
        ("Basic alone", auth("Basic eDp5"), Some(Code::Unauthenticated)),
        ("an opaque bearer alone", auth("Bearer 2YotnFZFEjr1zCsicMWpAA"), Some(Code::Unauthenticated)),
        ("no credential", vec![], Some(Code::Unauthenticated)),
    ];
    for (why, headers, want) in cases {
        let d =
            decide(&policy, &request("GET", "/", None, headers), T0, &mut store_for(&policy), &mut TokenCache::new(4));
        assert_eq!(d.denial.as_ref().map(|x| x.code), *want, "{why}: {:?}", d.denial);
        assert!(d.token.is_none(), "{why}: no Guardrail token");
        if let Some(denial) = &d.denial {
            assert!(denial.detail.contains("no credential Guardrail can verify"), "{why}: {}", denial.detail);
        }
    }
}

/// An unknown API key is logged by its fingerprint (the first 8 hex of its SHA-256), never itself.
#[test]
fn an_unknown_key_has_a_fingerprint() {
    let policy = policy();
    let headers = vec![("x-api-key".to_string(), "sk-live-not-a-key".to_string())];
    let d = decide(&policy, &request("GET", "/", None, &headers), T0, &mut store_for(&policy), &mut TokenCache::new(4));
    let denial = d.denial.expect("refused");
    let want = hex::encode(&guardrail_core::api_key_digest("sk-live-not-a-key")[..4]);
    assert_eq!(denial.key_fingerprint.as_deref(), Some(want.as_str()));
    assert!(!denial.detail.contains("sk-live"), "the key never appears: {}", denial.detail);
}

#[test]
fn review_by_refuses_from_the_day_after_with_the_date() {
    // T0 is 2026-11-29T04:00:00Z.
    let with_review = |date: &str| {
        let text = policy_text().replacen(r#""id": "pos","#, &format!(r#""id": "pos", "review_by": "{date}","#), 1);
        compile_json_str(&text).unwrap_or_else(|e| panic!("review_by {date}: {e}"))
    };
    // (why, review_by, nanoseconds after T0, expected code, part of the detail)
    let cases: Vec<(&str, &str, u64, Option<Code>, &str)> = vec![
        ("due later", "2026-12-31", 0, None, ""),
        ("due today: the whole day still counts", "2026-11-29", 0, None, ""),
        ("the last second of the day", "2026-11-29", (20 * 3600 - 1) * 1_000_000_000, None, ""),
        (
            "the next day starts overdue",
            "2026-11-29",
            20 * 3600 * 1_000_000_000,
            Some(Code::AppNotActive),
            "review overdue since 2026-11-29",
        ),
        ("long overdue", "2025-01-31", 0, Some(Code::AppNotActive), "app `pos`: review overdue since 2025-01-31"),
    ];
    for (why, date, after, want, detail) in cases {
        let policy = with_review(date);
        let headers = key("pos");
        let d = decide(
            &policy,
            &request("GET", "/catalog", None, &headers),
            T0 + after,
            &mut store_for(&policy),
            &mut TokenCache::new(4),
        );
        let denial = d.denial.as_ref();
        assert_eq!(denial.map(|x| x.code), want, "{why}: {denial:?}");
        if let Some(x) = denial {
            assert!(x.detail.contains(detail), "{why}: {:?} should contain {detail:?}", x.detail);
            assert_eq!(x.rule.as_deref(), Some("review_by"), "{why}");
        }
    }
}

#[test]
fn review_by_that_is_not_a_date_is_an_error_naming_the_field() {
    for bad in ["2026-13-01", "tomorrow", "2026-12-01T00:00:00Z", ""] {
        let text = policy_text().replacen(r#""id": "pos","#, &format!(r#""id": "pos", "review_by": "{bad}","#), 1);
        match compile_json_str(&text) {
            Ok(_) => panic!("review_by {bad:?} compiled"),
            Err(e) => assert!(e.to_string().contains("apps[0].review_by"), "review_by {bad:?}: {e}"),
        }
    }
}

#[test]
fn admit_to_dataset_is_the_filters_verdict_on_app_and_dataset() {
    use guardrail_core::decide::admit_to_dataset;
    let policy = policy();
    let now = i64::try_from(T0 / 1_000_000_000).unwrap_or_default();
    // (why, app, dataset, expected code)
    let cases: Vec<(&str, &str, &str, Option<Code>)> = vec![
        ("an active app with the class and the region", "pos", "payments", None),
        ("a draft in dev is active", "promo", "catalog", None),
        ("a draft in prod", "drafty", "catalog", Some(Code::AppNotActive)),
        ("quarantined", "bad", "catalog", Some(Code::AppNotActive)),
        ("deprecated", "old", "catalog", Some(Code::AppNotActive)),
        ("the app's region is not the dataset's", "us-app", "customers-eu", Some(Code::ResidencyViolation)),
        ("the class is not among the app's", "approved", "payments", Some(Code::AccessDenied)),
    ];
    for (why, app, ds, want) in cases {
        let a = policy.app(app).unwrap_or_else(|| panic!("{why}: no app {app}"));
        let d = policy.datasets.iter().find(|d| d.id == ds).unwrap_or_else(|| panic!("{why}: no dataset {ds}"));
        let got = admit_to_dataset(&policy, a, d, now).err().map(|x| x.code);
        assert_eq!(got, want, "{why}");
    }
    // No approved connector: the filter refuses every upstream request of the app.
    let text = policy_text().replacen(
        r#""connectors": ["crm", "inventory"], "api_keys""#,
        r#""connectors": ["ftp"], "api_keys""#,
        1,
    );
    let p = compile_json_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let (a, d) = (p.app("pos").unwrap(), &p.datasets[1]);
    assert_eq!(admit_to_dataset(&p, a, d, now).err().map(|x| x.code), Some(Code::ConnectorNotApproved));
}

/// The fixture with `pos` given `exceptions` (its `connector_exceptions`).
fn policy_with_exceptions(exceptions: serde_json::Value) -> CompiledPolicy {
    let mut doc: serde_json::Value = serde_json::from_str(&policy_text()).unwrap();
    doc["apps"][0]["connector_exceptions"] = exceptions;
    compile_json_str(&doc.to_string()).unwrap()
}

#[test]
fn a_connector_exception_admits_until_it_expires_and_only_for_its_app_and_connector() {
    let t0_secs = (T0 / 1_000_000_000) as i64;
    let until = guardrail_core::time::rfc3339_secs(t0_secs + 3600);
    // `legacy-erp` is in no list; `crm` is approved but not among `approved`'s (app) connectors.
    let policy = policy_with_exceptions(serde_json::json!([
        {"connector": "legacy-erp", "expires_at": until, "reason": "request req-1"}
    ]));
    let code = |policy: &CompiledPolicy, app: &str, connector: &str, at_ns: u64| {
        let headers = key(app);
        let d = decide(
            policy,
            &request("GET", "/catalog/items", Some(connector), &headers),
            at_ns,
            &mut store_for(policy),
            &mut TokenCache::new(4),
        );
        d.denial.map(|d| d.code.as_str().to_string())
    };
    assert_eq!(code(&policy, "pos", "legacy-erp", T0), None, "excepted connector, before expiry");
    assert_eq!(code(&policy, "pos", "legacy-erp", T0 + 3599 * 1_000_000_000), None, "one second before");
    assert_eq!(
        code(&policy, "pos", "legacy-erp", T0 + 3600 * 1_000_000_000).as_deref(),
        Some("connector-not-approved"),
        "at expires_at the exception is gone"
    );
    assert_eq!(code(&policy, "approved", "legacy-erp", T0).as_deref(), Some("connector-not-approved"), "another app");
    assert_eq!(code(&policy, "pos", "billing", T0).as_deref(), Some("connector-not-approved"), "another connector");
    // Without the exception the same request is refused: the test above can fail.
    let plain = policy_with_exceptions(serde_json::json!([]));
    assert_eq!(code(&plain, "pos", "legacy-erp", T0).as_deref(), Some("connector-not-approved"));
}

#[test]
fn exceptions_grants_and_approvers_are_validated_naming_the_field() {
    let mut doc: serde_json::Value = serde_json::from_str(&policy_text()).unwrap();
    doc["apps"][0]["connector_exceptions"] = serde_json::json!([{"connector": "x", "expires_at": "tomorrow"}]);
    doc["apps"][0]["access_grants"] = serde_json::json!([{"dataset": "nope", "expires_at": "2027-01-01T00:00:00Z"}]);
    doc["settings"]["approvers"] = serde_json::json!([
        {"id": "ana@retailco.example", "token": "sha256:00"},
        {"id": "bo", "token": digest("t"), "certificate": digest("c")},
        {"id": "cy", "token": digest("t2")},
        {"id": "di", "token": digest("t2")}
    ]);
    doc["settings"]["max_request_duration"] = serde_json::json!("forever");
    let errors = compile_json_str(&doc.to_string()).err().unwrap();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "apps[0].connector_exceptions[0].expires_at",
        "apps[0].access_grants[0].dataset",
        "settings.approvers[0].token",
        "settings.approvers[1]",
        "settings.approvers[3].token",
        "settings.max_request_duration",
    ] {
        assert!(paths.contains(&expected), "no error at {expected}: {paths:?}");
    }
    assert!(!paths.contains(&"settings.approvers[2].token"), "{paths:?}");
}

#[test]
fn apps_the_candidate_leaves_alone_are_decided_alike_by_both() {
    // The claim the filter's shadow relies on to decide such requests once.
    let base: serde_json::Value = serde_json::from_str(&policy_text()).unwrap();
    let mut changed = base.clone();
    changed["revision"] = serde_json::json!("r2");
    changed["apps"][0]["lifecycle"] = serde_json::json!("quarantined"); // pos
    changed["apps"][5]["tier"] = serde_json::json!("tiny"); // approved
    let (a, b) = (base.to_string(), changed.to_string());
    let differ = guardrail_core::shadow::differ(a.as_bytes(), b.as_bytes()).unwrap();
    assert!(differ.datasets.is_empty());
    let differ = differ.apps;
    let mut ids: Vec<&str> = differ.iter().map(String::as_str).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["approved", "pos"]);
    let (p, c) = (compile_json_str(&a).unwrap(), compile_json_str(&b).unwrap());
    let mut seen_difference = false;
    for app in ["pos", "promo", "drafty", "old", "bad", "approved", "us-app", "tiny"] {
        for (method, path) in
            [("GET", "/customers/1"), ("DELETE", "/catalog/x"), ("GET", "/payments/7"), ("POST", "/other")]
        {
            let headers = key(app);
            let req = request(method, path, Some("crm"), &headers);
            let code = |policy: &CompiledPolicy| {
                let d = decide(policy, &req, T0, &mut store_for(policy), &mut TokenCache::new(4));
                guardrail_core::shadow::outcome(&d)
            };
            let (enforced, candidate) = (code(&p), code(&c));
            if !differ.contains(app) {
                assert_eq!(enforced, candidate, "{app} {method} {path}");
            }
            seen_difference |= enforced != candidate;
        }
    }
    assert!(seen_difference, "the changed apps are decided differently: the comparison can fail");
    // Anything outside `apps` changed: no app is known to be decided alike.
    let mut rules = base.clone();
    rules["rules"][0]["when"] = serde_json::json!("request.method == 'PUT'");
    assert!(guardrail_core::shadow::differ(a.as_bytes(), rules.to_string().as_bytes()).is_none());
}

#[test]
fn requests_decided_alike_by_a_residency_change_are_those_of_other_datasets() {
    use guardrail_core::decide::decided_alike;
    let base: serde_json::Value = serde_json::from_str(&policy_text()).unwrap();
    let mut changed = base.clone();
    changed["datasets"][0]["allowed_regions"] = serde_json::json!(["us-east-1"]); // customers-eu
    let (a, b) = (base.to_string(), changed.to_string());
    let differ = guardrail_core::shadow::differ(a.as_bytes(), b.as_bytes()).unwrap();
    assert!(differ.apps.is_empty());
    assert_eq!(differ.datasets.iter().collect::<Vec<_>>(), ["customers-eu"]);
    let (p, c) = (compile_json_str(&a).unwrap(), compile_json_str(&b).unwrap());
    let (mut alike_seen, mut differences) = (0, 0);
    for app in ["pos", "approved", "us-app", "tiny", "bad"] {
        for path in ["/customers/1", "/catalog/x", "/payments/7", "/other", "/%2e%2e/x"] {
            let headers = key(app);
            let req = request("GET", path, Some("crm"), &headers);
            let code = |policy: &CompiledPolicy| {
                let d = decide(policy, &req, T0, &mut store_for(policy), &mut TokenCache::new(4));
                guardrail_core::shadow::outcome(&d)
            };
            let alike = decided_alike(&c, &differ, &req, T0, &mut TokenCache::new(4));
            assert_eq!(alike, !path.starts_with("/customers") && !path.contains('%'), "{app} {path}");
            if alike {
                alike_seen += 1;
                assert_eq!(code(&p), code(&c), "{app} {path}");
            }
            differences += usize::from(code(&p) != code(&c));
        }
    }
    assert!(alike_seen > 0 && differences > 0, "{alike_seen} alike, {differences} differences");
    // A route changed: requests may reach another dataset, so nothing is known to be alike.
    let mut rerouted = base.clone();
    rerouted["datasets"][1]["routes"] = serde_json::json!([{"path_prefix": "/cat"}]);
    assert!(guardrail_core::shadow::differ(a.as_bytes(), rerouted.to_string().as_bytes()).is_none());
}
