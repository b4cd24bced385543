//! Who owns which header (SPEC "Fitting a real mesh"), with real signed tokens: a JWT of no
//! configured issuer is not Guardrail's and is left to the upstream beside an API key; a token
//! of a configured issuer that fails is always 401; another token header leaves `Authorization`
//! alone.

use super::*;
use guardrail_core::decide::{decide, Code, Decision};
use guardrail_core::jwt::TokenCache;
use guardrail_core::quota::{ensure_keys, MemoryStore};
use guardrail_core::source::{load_document, Document};

/// 2026-03-21T12:00:00Z.
const NOW: i64 = 1_774_094_400;

fn key() -> SigningKey {
    SigningKey::from_seed([9; 32], Some("mesh-1".into()))
}

fn other_key() -> SigningKey {
    SigningKey::from_seed([3; 32], Some("mesh-1".into()))
}

fn policy(identity_extra: &str) -> Document {
    let digest = format!("sha256:{}", hex::encode(guardrail_core::api_key_digest("key-analyst-0123456789")));
    let text = format!(
        "\
apiVersion: guardrail/v1
kind: Policy
settings:
  gateway_region: eu-west-1
  identity:
{identity_extra}    jwt:
      - issuer: https://id.example
        jwks: {{keys: [{}]}}
tiers:
  std: {{rate: {{requests: 100, per: 1s}}}}
connectors: {{approved: [upstream]}}
apps:
  - {{id: analyst, environment: prod, tier: std, lifecycle: published, region: eu-west-1, data_classes: [public], connectors: [upstream], api_keys: [\"{digest}\"]}}
  - {{id: other, environment: prod, tier: std, lifecycle: published, region: eu-west-1, data_classes: [public], connectors: [upstream]}}
",
        key().public_jwk()
    );
    load_document(&text).unwrap_or_else(|e| panic!("fixture: {e:?}"))
}

fn token(signer: &SigningKey, issuer: &str, app: &str) -> String {
    let req = Request { app: app.into(), scopes: vec![], ttl_secs: None, issuer: None, audience: None };
    let plan =
        Plan { issuer: issuer.into(), audience: None, kid: Some("mesh-1".into()), app_claim: None, ttl_secs: 600 };
    mint(signer, &req, &plan, NOW).unwrap_or_else(|e| panic!("mint: {e}"))
}

fn judge<'p>(doc: &'p Document, headers: &[(&str, String)]) -> Decision<'p> {
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect();
    let req = guardrail_core::decide::Request {
        method: "GET",
        host: "api.example",
        path: "/",
        connector: Some("upstream"),
        request_id: "req-1",
        headers: &headers,
        gateway_region: None,
        fleet: None,
        peer: None,
    };
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, doc.policy.apps.iter().map(|a| a.quota_key.as_str())).unwrap_or_else(|e| panic!("{e}"));
    let now_ns = u64::try_from(NOW).unwrap_or_default() * 1_000_000_000;
    decide(&doc.policy, &req, now_ns, &mut store, &mut TokenCache::new(8))
}

/// (why, request headers, the app admitted and whether with Guardrail's token, or the refusal).
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Result<(String, bool), Code>);

fn outcome(d: &Decision<'_>) -> Result<(String, bool), Code> {
    match &d.denial {
        Some(denial) => Err(denial.code),
        None => Ok((d.app.map(|a| a.id.clone()).unwrap_or_default(), d.token.is_some())),
    }
}

#[test]
fn tokens_are_guardrails_only_when_a_configured_issuer_signs_them() {
    let doc = policy("");
    let api_key = ("x-api-key", "key-analyst-0123456789".to_string());
    let bearer = |t: &str| ("authorization", format!("Bearer {t}"));
    let ours = token(&key(), "https://id.example", "analyst");
    let foreign = token(&other_key(), "https://idp.mesh.example", "someone");
    let forged = token(&other_key(), "https://id.example", "analyst");
    let ok = |app: &str, token: bool| Ok((app.to_string(), token));
    let cases: Vec<Case> = vec![
        ("Guardrail's token alone", vec![bearer(&ours)], ok("analyst", true)),
        (
            "Guardrail's token, scheme in lower case",
            vec![("authorization", format!("bearer {ours}"))],
            ok("analyst", true),
        ),
        ("another issuer's JWT beside an API key", vec![api_key.clone(), bearer(&foreign)], ok("analyst", false)),
        ("another issuer's JWT alone", vec![bearer(&foreign)], Err(Code::Unauthenticated)),
        (
            "a configured issuer's forged token beside an API key",
            vec![api_key.clone(), bearer(&forged)],
            Err(Code::Unauthenticated),
        ),
        ("a configured issuer's forged token alone", vec![bearer(&forged)], Err(Code::Unauthenticated)),
        ("Guardrail's token beside Guardrail's key", vec![api_key.clone(), bearer(&ours)], ok("analyst", true)),
        (
            "Guardrail's token for another app beside the key",
            vec![api_key.clone(), bearer(&token(&key(), "https://id.example", "other"))],
            Err(Code::Unauthenticated),
        ),
        (
            "two Authorization headers, one Guardrail's",
            vec![api_key.clone(), bearer(&ours), bearer(&foreign)],
            Err(Code::Unauthenticated),
        ),
    ];
    for (why, headers, want) in cases {
        let d = judge(&doc, &headers);
        assert_eq!(outcome(&d), want, "{why}: {:?}", d.denial);
    }
}

#[test]
fn another_token_header_never_reads_authorization() {
    let doc = policy("    token_header: x-guardrail-token\n    forward_token: true\n");
    assert!(doc.policy.settings.forward_token);
    let ours = token(&key(), "https://id.example", "analyst");
    let forged = token(&other_key(), "https://id.example", "analyst");
    let ok = |app: &str| Ok((app.to_string(), true));
    let cases: Vec<Case> = vec![
        ("the bare JWT in the token header", vec![("x-guardrail-token", ours.clone())], ok("analyst")),
        ("with a Bearer prefix", vec![("x-guardrail-token", format!("Bearer {ours}"))], ok("analyst")),
        (
            "Guardrail's token in Authorization is not read",
            vec![("authorization", format!("Bearer {ours}"))],
            Err(Code::Unauthenticated),
        ),
        (
            "a forged token in Authorization is not read either",
            vec![("x-guardrail-token", ours.clone()), ("authorization", format!("Bearer {forged}"))],
            ok("analyst"),
        ),
        ("a forged token in the token header", vec![("x-guardrail-token", forged)], Err(Code::Unauthenticated)),
    ];
    for (why, headers, want) in cases {
        let d = judge(&doc, &headers);
        assert_eq!(outcome(&d), want, "{why}: {:?}", d.denial);
    }
}
