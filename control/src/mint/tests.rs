//! Minting against a policy: what the filter accepts is minted, what it would refuse is refused.

use super::*;
use base64ct::Encoding;
use guardrail_core::decide::{decide, Code};
use guardrail_core::jwt::{verify, TokenCache, TokenError};
use guardrail_core::quota::{ensure_keys, MemoryStore};
use guardrail_core::source::{load_document, Document};

/// 2026-03-21T12:00:00Z.
const NOW: i64 = 1_774_094_400;

fn key() -> SigningKey {
    SigningKey::from_seed([7; 32], Some("test-1".into()))
}

fn app(id: &str, environment: &str, lifecycle: &str, region: &str, classes: &str) -> String {
    format!(
        "  - {{id: {id}, environment: {environment}, tier: std, lifecycle: {lifecycle}, region: {region}, data_classes: [{classes}], connectors: [upstream]}}\n"
    )
}

fn policy_text(jwks: &str, audiences: &str) -> String {
    let mut text = format!(
        "\
apiVersion: guardrail/v1
kind: Policy
revision: 1
settings:
  gateway_region: eu-west-1
  jit_max_ttl: 10m
  identity:
    jwt:
      - issuer: https://id.example
        audiences: [{audiences}]
        jwks: {{keys: [{jwks}]}}
tiers:
  std: {{rate: {{requests: 100, per: 1s}}, daily_budget: 1000}}
connectors: {{approved: [upstream]}}
datasets:
  - {{id: patients, classification: regulated, allowed_regions: [eu-west-1], routes: [{{path_prefix: /patients}}]}}
  - {{id: catalog, classification: public, allowed_regions: [eu-west-1, us-east-1], routes: [{{path_prefix: /catalog}}]}}
apps:
"
    );
    for line in [
        app("analyst", "prod", "published", "eu-west-1", "public, regulated"),
        app("draft-dev", "dev", "draft", "eu-west-1", "public"),
        app("draft-prod", "prod", "draft", "eu-west-1", "public"),
        app("old", "prod", "deprecated", "eu-west-1", "public"),
        app("bad", "prod", "quarantined", "eu-west-1", "public"),
        app("overdue", "prod", "published", "eu-west-1", "public").replacen(
            "id: overdue,",
            "id: overdue, review_by: 2024-01-31,",
            1,
        ),
        app("us-app", "prod", "approved", "us-east-1", "public, regulated"),
        app("public-only", "prod", "approved", "eu-west-1", "public"),
    ] {
        text.push_str(&line);
    }
    text
}

fn policy() -> Document {
    load_document(&policy_text(&key().public_jwk().to_string(), "api")).unwrap()
}

fn request(app: &str, scopes: &[&str]) -> Request {
    Request {
        app: app.into(),
        scopes: scopes.iter().map(|s| (*s).to_string()).collect(),
        ttl_secs: None,
        issuer: None,
        audience: None,
    }
}

fn plan(doc: &Document, req: &Request) -> Result<Plan, Vec<String>> {
    plan_with_policy(&doc.json, &doc.policy, &key(), req, NOW)
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64ct::Base64UrlUnpadded::decode_vec(payload).unwrap()).unwrap()
}

fn header_of(token: &str) -> Value {
    let header = token.split('.').next().unwrap();
    serde_json::from_slice(&base64ct::Base64UrlUnpadded::decode_vec(header).unwrap()).unwrap()
}

/// The filter's verdict on `GET /{path}` with the token as bearer credential.
fn verdict(doc: &Document, token: &str, path: &str, now: i64) -> Option<Code> {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    let req = guardrail_core::decide::Request {
        method: "GET",
        host: "api.example",
        path,
        connector: Some("upstream"),
        request_id: "req-1",
        headers: &headers,
        gateway_region: None,
        fleet: None,
        peer: None,
    };
    let now_ns = u64::try_from(now).unwrap() * 1_000_000_000;
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, doc.policy.apps.iter().map(|a| a.quota_key.as_str())).unwrap();
    let decision = decide(&doc.policy, &req, now_ns, &mut store, &mut TokenCache::new(8));
    decision.denial.map(|d| d.code)
}

#[test]
fn a_minted_token_verifies_and_passes_the_jit_check() {
    let doc = policy();
    let req = request("analyst", &["dataset:patients", "dataset:catalog"]);
    let plan = plan(&doc, &req).unwrap();
    assert_eq!(
        plan,
        Plan {
            issuer: "https://id.example".into(),
            audience: Some("api".into()),
            kid: Some("test-1".into()),
            app_claim: None,
            ttl_secs: 600,
        },
        "issuer, audience and TTL come from the policy"
    );
    let token = mint(&key(), &req, &plan, NOW).unwrap();

    assert_eq!(header_of(&token), json!({"alg": "EdDSA", "typ": "JWT", "kid": "test-1"}));
    let claims = claims_of(&token);
    for (claim, want) in [
        ("iss", json!("https://id.example")),
        ("aud", json!("api")),
        ("azp", json!("analyst")),
        ("sub", json!("analyst")),
        ("scope", json!("dataset:patients dataset:catalog")),
        ("iat", json!(NOW)),
        ("exp", json!(NOW + 600)),
    ] {
        assert_eq!(claims[claim], want, "{claim}");
    }
    let jti = claims["jti"].as_str().unwrap();
    assert_eq!(jti.len(), 22, "128 random bits");
    let again = mint(&key(), &req, &plan, NOW).unwrap();
    assert_ne!(claims_of(&again)["jti"], claims["jti"], "jti is unique");

    let verified = verify(&doc.policy.issuers, &token, NOW + 1).unwrap();
    assert_eq!(verified.app, "analyst");
    assert_eq!(verified.scopes, ["dataset:patients", "dataset:catalog"]);

    assert_eq!(verdict(&doc, &token, "/patients/42", NOW + 1), None, "JIT passes");
    assert_eq!(
        verify(&doc.policy.issuers, &token, NOW + 601 + 30),
        Err(TokenError::Expired),
        "expired (past exp and the clock skew)"
    );
    assert_eq!(
        verdict(&doc, &token, "/patients/42", NOW + 700),
        Some(Code::Unauthenticated),
        "an expired token is no credential"
    );

    let catalog_only = request("analyst", &["dataset:catalog"]);
    let token = mint(&key(), &catalog_only, &plan, NOW).unwrap();
    assert_eq!(
        verdict(&doc, &token, "/patients/42", NOW + 1),
        Some(Code::JitRequired),
        "a token without the dataset's scope"
    );
}

#[test]
fn requests_the_filter_would_refuse_are_refused() {
    let doc = policy();
    let with = |f: &dyn Fn(&mut Request)| {
        let mut r = request("analyst", &["dataset:patients"]);
        f(&mut r);
        r
    };
    let cases: Vec<(&str, Request, &str)> = vec![
        ("unknown app", request("ghost", &[]), "app `ghost` is not in the catalog"),
        (
            "draft in prod",
            request("draft-prod", &[]),
            "app `draft-prod` is a draft and may only run in dev (environment: prod)",
        ),
        ("deprecated", request("old", &[]), "the filter refuses the app (app-not-active): app `old` is deprecated"),
        ("quarantined", request("bad", &[]), "the filter refuses the app (app-not-active): app `bad` is quarantined"),
        ("review overdue", request("overdue", &[]), "app `overdue`: review overdue since 2024-01-31"),
        (
            "unknown dataset",
            request("analyst", &["dataset:nope"]),
            "no dataset `nope` in the policy (datasets: patients, catalog)",
        ),
        (
            "data class",
            request("public-only", &["dataset:patients"]),
            "holds regulated data, which is not among app `public-only`'s data_classes (public)",
        ),
        (
            "residency",
            request("us-app", &["dataset:patients"]),
            "app `us-app` is in region us-east-1, and dataset `patients` may be reached from eu-west-1 only",
        ),
        ("TTL", with(&|r| r.ttl_secs = Some(601)), "601 s is above the policy's settings.jit_max_ttl of 600 s"),
        (
            "issuer not in the policy",
            with(&|r| r.issuer = Some("https://other".into())),
            "issuer https://other is not in the policy (issuers: https://id.example)",
        ),
        (
            "audience not accepted",
            with(&|r| r.audience = Some("web".into())),
            "audience `web` is not one issuer https://id.example accepts (api)",
        ),
    ];
    for (why, req, want) in cases {
        match plan(&doc, &req) {
            Ok(plan) => panic!("{why}: minted {plan:?}"),
            Err(reasons) => assert!(reasons.iter().any(|r| r.contains(want)), "{why}: {reasons:?}"),
        }
    }
    for ok in [
        request("draft-dev", &["dataset:catalog"]),
        request("us-app", &["dataset:catalog", "profile:read"]),
        with(&|r| r.ttl_secs = Some(600)),
        with(&|r| r.issuer = Some("https://id.example".into())),
        with(&|r| r.audience = Some("api".into())),
    ] {
        assert!(plan(&doc, &ok).is_ok(), "{ok:?}");
    }
}

#[test]
fn the_key_must_be_trusted_by_an_issuer() {
    let other = SigningKey::from_seed([8; 32], Some("other".into())).public_jwk();
    let doc = load_document(&policy_text(&other.to_string(), "api")).unwrap();
    let reasons = plan(&doc, &request("analyst", &[])).unwrap_err();
    assert!(
        reasons[0].starts_with("no issuer of the policy trusts this key (kid test-1): add its public JWK {"),
        "{reasons:?}"
    );
    let reasons = plan(&doc, &{
        let mut r = request("analyst", &[]);
        r.issuer = Some("https://id.example".into());
        r
    })
    .unwrap_err();
    assert!(reasons[0].contains("issuer https://id.example does not trust this key"), "{reasons:?}");
}

#[test]
fn the_kid_is_the_one_the_policy_lists_and_the_audience_must_be_chosen_among_several() {
    let mut listed = key().public_jwk();
    listed["kid"] = json!("renamed");
    let doc = load_document(&policy_text(&listed.to_string(), "api, web")).unwrap();
    let reasons = plan(&doc, &request("analyst", &[])).unwrap_err();
    assert!(reasons[0].contains("accepts several audiences (api, web): choose one with --audience"));
    let mut req = request("analyst", &["dataset:patients"]);
    req.audience = Some("web".into());
    let plan = plan(&doc, &req).unwrap();
    assert_eq!((plan.kid.as_deref(), plan.audience.as_deref()), (Some("renamed"), Some("web")));
    let token = mint(&key(), &req, &plan, NOW).unwrap();
    assert_eq!(verdict(&doc, &token, "/patients/1", NOW), None);
}

#[test]
fn without_a_policy_issuer_and_audience_default_to_guardrail() {
    let req = request("anything", &["dataset:x"]);
    let plan = plan_without_policy(&req, &key()).unwrap();
    assert_eq!((plan.issuer.as_str(), plan.audience.as_deref()), ("guardrail", Some("guardrail")));
    let mut req = req;
    req.issuer = Some("https://id.example".into());
    req.audience = Some("api".into());
    let plan = plan_without_policy(&req, &key()).unwrap();
    assert_eq!((plan.ttl_secs, plan.kid.as_deref()), (900, Some("test-1")));
    assert_eq!((plan.issuer.as_str(), plan.audience.as_deref()), ("https://id.example", Some("api")));
    req.ttl_secs = Some(86_401);
    assert!(plan_without_policy(&req, &key()).is_err(), "a day at most");
}

#[test]
fn request_checks() {
    let cases: &[(&str, &[&str], bool)] = &[
        ("app", &["dataset:a", "dataset:b"], true),
        ("app", &["dataset:a", "read"], false),
        ("app", &["payments"], false),
        ("", &[], false),
        ("app", &["two words"], false),
        ("app", &[""], false),
        ("app", &["dataset:"], false),
        ("app", &["dataset:a", "dataset:a"], false),
    ];
    for (app, scopes, ok) in cases {
        assert_eq!(check_request(&request(app, scopes)).is_ok(), *ok, "{app:?} {scopes:?}");
    }
    assert_eq!(ttl_secs("15m").unwrap(), 900);
    assert!(ttl_secs("1500ms").is_err(), "whole seconds");
    assert!(ttl_secs("0s").is_err());
}
