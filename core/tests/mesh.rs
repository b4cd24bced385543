//! Fitting a real mesh (SPEC "Fitting a real mesh"): exemptions by route and peer, CORS
//! preflights, the token header, repeated headers, and the `RateLimit` fields of a 429.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use guardrail_core::compile::{compile_json_str, CompiledPolicy};
use guardrail_core::decide::{decide, Code, Decision, Pass, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::quota::{ensure_keys, MemoryStore};
use proptest::prelude::*;

const T0: u64 = 1_795_924_800 * 1_000_000_000; // 2026-11-29T04:00:00Z

fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(guardrail_core::api_key_digest(key)))
}

/// A catalog of one app (`pos`, key `key-pos`), a public, an internal and a regulated dataset,
/// and `extra` spliced in at the top level (exemptions, rules, settings).
fn policy_with(extra: &str) -> Result<CompiledPolicy, String> {
    let text = format!(
        r#"{{"apiVersion": "guardrail/v1", "kind": "Policy", "revision": "m1",
        "settings": {{"gateway_region": "eu-west-1"}},
        "tiers": {{"standard": {{"rate": {{"requests": 2, "per": "1h"}}, "daily_budget": 100}}}},
        "connectors": {{"approved": ["crm"]}},
        "apps": [{{"id": "pos", "environment": "prod", "tier": "standard", "lifecycle": "published",
                   "region": "eu-west-1", "data_classes": ["public", "internal", "regulated"],
                   "connectors": ["crm"], "api_keys": ["{}"]}}],
        "datasets": [
          {{"id": "catalog", "classification": "public", "allowed_regions": ["eu-west-1"],
            "routes": [{{"path_prefix": "/catalog"}}]}},
          {{"id": "stock", "classification": "internal", "allowed_regions": ["eu-west-1"],
            "routes": [{{"path_prefix": "/stock"}}]}},
          {{"id": "payments", "classification": "regulated", "allowed_regions": ["eu-west-1"],
            "routes": [{{"path_prefix": "/payments"}}], "requires_jit": false}}
        ]{extra}}}"#,
        digest("key-pos")
    );
    compile_json_str(&text).map_err(|e| e.to_string())
}

fn policy(extra: &str) -> CompiledPolicy {
    policy_with(extra).unwrap_or_else(|e| panic!("fixture policy is invalid: {e}"))
}

fn store(policy: &CompiledPolicy) -> MemoryStore {
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str())).unwrap();
    store
}

fn h(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

struct Probe<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(String, String)>,
    peer: Option<&'a str>,
}

fn probe<'a>(method: &'a str, path: &'a str, headers: Vec<(String, String)>) -> Probe<'a> {
    Probe { method, path, headers, peer: None }
}

fn judge<'p>(policy: &'p CompiledPolicy, p: &Probe<'_>, store: &mut MemoryStore) -> Decision<'p> {
    let req = Request {
        method: p.method,
        host: "api.retailco.example",
        path: p.path,
        connector: Some("crm"),
        request_id: "req-1",
        headers: &p.headers,
        gateway_region: None,
        fleet: None,
        peer: p.peer,
    };
    decide(policy, &req, T0, store, &mut TokenCache::new(4))
}

fn outcome(d: &Decision<'_>) -> String {
    match (&d.denial, &d.pass) {
        (Some(denial), _) => denial.code.as_str().to_string(),
        (None, Some(pass)) => pass.code().to_string(),
        (None, None) => "allow".to_string(),
    }
}

const EXEMPTIONS: &str = r#", "exemptions": [
    {"id": "health", "routes": [{"path_prefix": "/healthz", "methods": ["GET"]}], "reason": "kubelet probes"},
    {"id": "scraper", "routes": [{"path_prefix": "/metrics"}], "peers": ["spiffe://cluster.local/ns/monitoring/sa/prometheus"]},
    {"id": "mesh", "routes": [{"path_prefix": "/catalog"}], "peers": ["spiffe://cluster.local/ns/shop/*"]}
]"#;

#[test]
fn exemptions_by_route_and_peer() {
    let policy = policy(EXEMPTIONS);
    let prometheus = Some("spiffe://cluster.local/ns/monitoring/sa/prometheus");
    let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
        ("a listed route", "GET", "/healthz", None, "exempt"),
        ("a listed route, another spelling", "GET", "//HealthZ/./live", None, "exempt"),
        ("a listed route, another method", "POST", "/healthz", None, "unauthenticated"),
        ("a route whose peer is listed", "GET", "/metrics", prometheus, "exempt"),
        (
            "a route whose peer is not listed",
            "GET",
            "/metrics",
            Some("spiffe://cluster.local/ns/shop/sa/web"),
            "unauthenticated",
        ),
        ("a route with peers, plain text", "GET", "/metrics", None, "unauthenticated"),
        ("a peer prefix", "GET", "/catalog/1", Some("spiffe://cluster.local/ns/shop/sa/web"), "exempt"),
        (
            "a peer prefix, another namespace",
            "GET",
            "/catalog/1",
            Some("spiffe://cluster.local/ns/shopx/sa/web"),
            "unauthenticated",
        ),
        (
            "a peer with a dot-dot segment",
            "GET",
            "/catalog/1",
            Some("spiffe://cluster.local/ns/shop/../admin"),
            "unauthenticated",
        ),
        (
            "a peer SAN with an injected header",
            "GET",
            "/metrics",
            Some("spiffe://cluster.local/ns/monitoring/sa/prometheus\r\nx: y"),
            "unauthenticated",
        ),
        ("a listed peer on an unlisted route", "GET", "/stock/1", prometheus, "unauthenticated"),
        ("a route outside every exemption", "GET", "/payments/1", None, "unauthenticated"),
    ];
    for (why, method, path, peer, want) in cases {
        let mut p = probe(method, path, vec![]);
        p.peer = *peer;
        let d = judge(&policy, &p, &mut store(&policy));
        assert_eq!(outcome(&d), *want, "{why}: {:?}", d.denial);
        if *want == "exempt" {
            assert!(d.app.is_none() && d.quota.is_none(), "{why}: no app, no quota");
        }
    }
    // A header never stands in for the peer.
    let forged =
        vec![h("x-forwarded-client-cert", "By=spiffe://x;URI=spiffe://cluster.local/ns/monitoring/sa/prometheus")];
    let d = judge(&policy, &probe("GET", "/metrics", forged), &mut store(&policy));
    assert_eq!(outcome(&d), "unauthenticated", "XFCC is a header a client can set");
}

#[test]
fn exempt_requests_take_no_quota() {
    let policy = policy(EXEMPTIONS);
    let mut store = store(&policy);
    for _ in 0..10 {
        let d = judge(&policy, &probe("GET", "/healthz", vec![]), &mut store);
        assert_eq!(d.pass, Some(Pass::Exempt("health".into())));
    }
    // The app's bucket (2 per hour) is untouched: both of its requests still pass.
    for i in 0..2 {
        let d = judge(&policy, &probe("GET", "/", vec![h("x-api-key", "key-pos")]), &mut store);
        assert!(d.allowed() && d.pass.is_none(), "request {i}: {:?}", d.denial);
    }
}

#[test]
fn exemptions_never_reach_sensitive_data() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "a route over a regulated dataset",
            r#"{"id": "wide", "routes": [{"path_prefix": "/"}]}"#,
            Some("exemption `wide` would reach regulated dataset `payments`"),
        ),
        (
            "a route inside a regulated dataset",
            r#"{"id": "inside", "routes": [{"path_prefix": "/payments/status"}]}"#,
            Some("would reach regulated dataset `payments`"),
        ),
        (
            "peers without routes cover every dataset",
            r#"{"id": "all", "peers": ["spiffe://cluster.local/ns/a/sa/b"]}"#,
            Some("it has no routes"),
        ),
        ("an internal dataset", r#"{"id": "stock", "routes": [{"path_prefix": "/stock"}]}"#, None),
        ("no routes and no peers", r#"{"id": "empty"}"#, Some("needs `routes`, `peers` or both")),
        (
            "a peer that is not a SPIFFE id",
            r#"{"id": "p", "routes": [{"path_prefix": "/stock"}], "peers": ["cluster.local/ns/a"]}"#,
            Some("exemptions[0].peers[0]: `cluster.local/ns/a` is not a SPIFFE id"),
        ),
        (
            "an unknown field",
            r#"{"id": "p", "routes": [{"path_prefix": "/stock"}], "peer": ["spiffe://td/a"]}"#,
            Some("unknown field `peer`"),
        ),
        (
            "a route no request can match",
            r#"{"id": "p", "routes": [{"path_prefix": "stock"}]}"#,
            Some("exemptions[0].routes[0].path_prefix"),
        ),
    ];
    for (why, exemption, want) in cases {
        let result = policy_with(&format!(r#", "exemptions": [{exemption}]"#));
        match (result, want) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.contains(want), "{why}: {e}"),
            (Ok(_), Some(want)) => panic!("{why}: accepted, expected `{want}`"),
            (Err(e), None) => panic!("{why}: refused: {e}"),
        }
    }
}

#[test]
fn preflights_pass_without_credentials_only() {
    let policy = policy("");
    let preflight = || vec![h("origin", "https://app.example"), h("access-control-request-method", "POST")];
    let cases: &[(&str, &str, Vec<(String, String)>, &str)] = &[
        ("a browser's preflight", "OPTIONS", preflight(), "preflight"),
        ("lower-case method over HTTP/2", "options", preflight(), "preflight"),
        ("OPTIONS without Origin", "OPTIONS", vec![h("access-control-request-method", "POST")], "unauthenticated"),
        ("OPTIONS without the requested method", "OPTIONS", vec![h("origin", "https://a.example")], "unauthenticated"),
        (
            "a preflight with a forged key",
            "OPTIONS",
            [preflight(), vec![h("x-api-key", "forged")]].concat(),
            "unauthenticated",
        ),
        (
            "a preflight with a valid key is judged",
            "OPTIONS",
            [preflight(), vec![h("x-api-key", "key-pos")]].concat(),
            "allow",
        ),
        ("GET with the CORS headers", "GET", preflight(), "unauthenticated"),
        ("a preflight to a regulated path", "OPTIONS", preflight(), "preflight"),
    ];
    for (why, method, headers, want) in cases {
        let d = judge(&policy, &probe(method, "/payments/1", headers.clone()), &mut store(&policy));
        assert_eq!(outcome(&d), *want, "{why}: {:?}", d.denial);
    }
    let d = judge(&policy, &probe("OPTIONS", "/a/%2e%2e/%2e%2e/b", preflight()), &mut store(&policy));
    assert_eq!(outcome(&d), "invalid-path", "an unsafe path is refused first");
}

#[test]
fn token_header_settings() {
    let cases: &[(&str, &str, Result<(&str, bool), &str>)] = &[
        ("the defaults", "{}", Ok(("authorization", false))),
        (
            "another header",
            r#"{"token_header": "X-Guardrail-Token", "forward_token": true}"#,
            Ok(("x-guardrail-token", true)),
        ),
        (
            "the API key's header",
            r#"{"token_header": "x-api-key"}"#,
            Err("must differ from settings.identity.api_key_header"),
        ),
        ("a header Guardrail sets", r#"{"token_header": "x-guardrail-app"}"#, Err("is set by Guardrail")),
        ("not a header name", r#"{"token_header": "x token"}"#, Err("is not a valid header name")),
        ("not a boolean", r#"{"forward_token": "yes"}"#, Err("forward_token")),
    ];
    for (why, identity, want) in cases {
        let result = compile_json_str(&policy_text_with_identity(identity)).map_err(|e| e.to_string());
        match (result, want) {
            (Ok(p), Ok((header, forward))) => {
                assert_eq!((p.settings.token_header.as_str(), p.settings.forward_token), (*header, *forward), "{why}")
            }
            (Err(e), Err(want)) => assert!(e.contains(want), "{why}: {e}"),
            (Ok(_), Err(want)) => panic!("{why}: accepted, expected `{want}`"),
            (Err(e), Ok(_)) => panic!("{why}: refused: {e}"),
        }
    }
}

fn policy_text_with_identity(identity: &str) -> String {
    format!(
        r#"{{"apiVersion": "guardrail/v1", "kind": "Policy",
        "settings": {{"identity": {identity}}},
        "tiers": {{"t": {{"rate": {{"requests": 1, "per": "1s"}}}}}}}}"#
    )
}

/// With another token header, `Authorization` is never read: a Basic or a bearer there is the
/// upstream's business, and no credential to Guardrail.
#[test]
fn another_token_header_leaves_authorization_alone() {
    let text = policy_text_with_identity(r#"{"token_header": "x-guardrail-token"}"#);
    let p = compile_json_str(&text).unwrap();
    let cases: &[(&str, Vec<(String, String)>, &str)] = &[
        ("a garbage bearer in Authorization", vec![h("authorization", "Bearer eyJ.eyJ.x")], "unauthenticated"),
        ("a Basic in Authorization", vec![h("authorization", "Basic eDp5")], "unauthenticated"),
        ("an opaque value in the token header", vec![h("x-guardrail-token", "opaque")], "unauthenticated"),
    ];
    for (why, headers, want) in cases {
        let d = judge(&p, &probe("GET", "/", headers.clone()), &mut store(&p));
        assert_eq!(outcome(&d), *want, "{why}");
        let detail = d.denial.map(|x| x.detail.to_string()).unwrap_or_default();
        assert!(detail.contains("a token in `x-guardrail-token`"), "{why}: {detail}");
    }
}

#[test]
fn throttled_responses_say_what_is_left() {
    let policy = policy("");
    let mut store = store(&policy);
    let key = || vec![h("x-api-key", "key-pos")];
    for _ in 0..2 {
        assert!(judge(&policy, &probe("GET", "/", key()), &mut store).allowed());
    }
    let d = judge(&policy, &probe("GET", "/", key()), &mut store);
    let denial = d.denial.expect("the third in an hour is refused");
    assert_eq!(denial.code, Code::QuotaExceeded);
    let (limits, usage) = *denial.quota.clone().expect("a 429 carries the quota for RateLimit");
    assert_eq!((limits.rate.burst, usage.rate_remaining), (2, 0), "nothing left in the bucket");
    assert_eq!(usage.budget_remaining, Some(98), "the day's budget as it stands");
    let headers = guardrail_core::problem::denial_headers(&denial);
    let field = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
    assert_eq!(field("ratelimit-policy").as_deref(), Some("\"rate\";q=2;w=3600, \"daily\";q=100;w=86400"));
    assert!(field("ratelimit").is_some_and(|v| v.starts_with("\"rate\";r=0;t=")), "{:?}", field("ratelimit"));
}

// === Repeated headers ===

/// Rules over one or two headers, each either effect: (effect, expression).
const RULES: &[(&str, &str)] = &[
    ("deny", "request.headers['x-t'] == 'blocked'"),
    ("deny", "request.headers['x-t'] != 'ok'"),
    ("deny", "request.headers['x-t'].startsWith('b') && request.headers['x-u'] == 'a'"),
    ("deny", "'x-t' in request.headers && request.headers['x-t'].contains('lock')"),
    ("allow", "request.headers['x-t'] == 'ok'"),
    ("allow", "!('x-t' in request.headers) || request.headers['x-t'] in ['ok', 'a']"),
    ("allow", "request.headers['x-t'] == 'ok' || request.headers['x-u'] == 'a'"),
];

fn rule_policy(effect: &str, when: &str) -> CompiledPolicy {
    policy(&format!(r#", "rules": [{{"id": "r", "effect": "{effect}", "when": "{when}"}}]"#))
}

/// Every way to pick one value per repeated name: the single-valued requests the rule must agree with.
fn views(headers: &[(String, String)]) -> Vec<Vec<(String, String)>> {
    let mut names: Vec<String> = Vec::new();
    for (k, _) in headers {
        if !names.contains(k) {
            names.push(k.clone());
        }
    }
    let mut out = vec![Vec::new()];
    for name in names {
        let values: Vec<&String> = headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v).collect();
        let mut next = Vec::new();
        for view in &out {
            for v in &values {
                next.push([view.clone(), vec![(name.clone(), (*v).clone())]].concat());
            }
        }
        out = next;
    }
    out
}

/// `headers` with the app's API key.
fn keyed(headers: &[(String, String)]) -> Vec<(String, String)> {
    [vec![h("x-api-key", "key-pos")], headers.to_vec()].concat()
}

fn header_multiset() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop::sample::select(vec!["x-t", "x-u", "X-T"]);
    let value = prop::sample::select(vec!["ok", "blocked", "a", "b", "ok,blocked", ""]);
    prop::collection::vec((name, value), 0..6)
        .prop_map(|pairs| pairs.into_iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Repeating a header never sidesteps a rule: a request is refused by a rule exactly when
    /// one of its single-valued views is (a deny rule that holds for any value denies; an allow
    /// rule must hold for all of them).
    #[test]
    fn repeated_headers_never_sidestep_a_rule(rule in 0..RULES.len(), headers in header_multiset()) {
        let (effect, when) = RULES[rule];
        let policy = rule_policy(effect, when);
        let lower: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        let denied_by_rule = |d: &Decision<'_>| d.denial.as_ref().is_some_and(|x| x.rule.as_deref() == Some("r"));
        let any_view_denied = views(&lower).iter().any(|view| {
            denied_by_rule(&judge(&policy, &probe("GET", "/stock/1", keyed(view)), &mut store(&policy)))
        });
        let d = judge(&policy, &probe("GET", "/stock/1", keyed(&headers)), &mut store(&policy));
        prop_assert_eq!(denied_by_rule(&d), any_view_denied, "{} rule `{}` on {:?}: {:?}", effect, when, headers, d.denial);
    }
}

#[test]
fn the_issue_case_and_too_many_repeats() {
    let deny = rule_policy("deny", "request.headers['x-t'] == 'blocked'");
    let d = judge(&deny, &probe("GET", "/", keyed(&[h("x-t", "ok"), h("x-t", "blocked")])), &mut store(&deny));
    assert_eq!(d.denial.map(|x| x.code), Some(Code::AccessDenied), "ok + blocked is denied");
    let allow = rule_policy("allow", "request.headers['x-t'] == 'ok'");
    let d = judge(&allow, &probe("GET", "/", keyed(&[h("x-t", "ok"), h("x-t", "blocked")])), &mut store(&allow));
    assert_eq!(d.denial.map(|x| x.code), Some(Code::AccessDenied), "one good value among bad ones is not enough");
    let d = judge(&allow, &probe("GET", "/", keyed(&[h("x-t", "ok"), h("X-T", "ok")])), &mut store(&allow));
    assert!(d.allowed(), "the same value twice: {:?}", d.denial);
    // Thousands of repeats: the rules that read the request fail closed, naming the rule.
    let many: Vec<(String, String)> =
        (0..2000).map(|i| h(if i % 2 == 0 { "x-t" } else { "x-u" }, &i.to_string())).collect();
    let d = judge(&allow, &probe("GET", "/", keyed(&many)), &mut store(&allow));
    let denial = d.denial.expect("refused");
    assert_eq!((denial.code, denial.rule.as_deref()), (Code::AccessDenied, Some("r")));
    assert!(denial.detail.contains("combinations of values"), "{}", denial.detail);
    // A rule that does not read the request is judged once, repeats or not.
    let app_rule = rule_policy("allow", "app.id == 'pos'");
    let many: Vec<(String, String)> = (0..2000).map(|i| h("x-t", &i.to_string())).collect();
    assert!(judge(&app_rule, &probe("GET", "/", keyed(&many)), &mut store(&app_rule)).allowed());
}
