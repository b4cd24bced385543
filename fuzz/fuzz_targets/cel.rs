//! CEL rules: any expression either fails to compile with a message, or compiles and evaluates
//! to a boolean or an error against fixed variables, with the same outcome on the fast path as
//! on the interpreter. Never a panic; a hang is reported by libFuzzer's `-timeout` (see
//! tools/fuzz.sh). Oversized or too deeply nested input is refused by `Cel::compile` itself
//! (MAX_EXPRESSION_LEN, MAX_NESTING).
#![no_main]

use guardrail_core::compile::{compile_json_str, CompiledPolicy};
use guardrail_core::jwt::VerifiedToken;
use guardrail_core::rules::{Input, MAX_EXPRESSION_LEN, USES_ALL};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const POLICY: &str = r#"{"apiVersion": "guardrail/v1", "kind": "Policy", "revision": "fuzz",
  "settings": {"gateway_region": "eu-west-1"},
  "tiers": {"standard": {"rate": {"requests": 100, "per": "1m"}}},
  "connectors": {"approved": ["crm"]},
  "apps": [{"id": "pos", "owner": "o@example.com", "team": "t", "department": "retail", "environment": "prod",
            "tier": "standard", "lifecycle": "published", "region": "eu-west-1",
            "data_classes": ["public", "internal"], "connectors": ["crm"]}],
  "datasets": [{"id": "customers", "classification": "internal", "owner_department": "crm",
                "allowed_regions": ["eu-west-1"], "routes": [{"path_prefix": "/customers"}]}]}"#;

fn policy() -> Option<&'static CompiledPolicy> {
    static POLICY_CELL: OnceLock<Option<CompiledPolicy>> = OnceLock::new();
    POLICY_CELL.get_or_init(|| compile_json_str(POLICY).ok()).as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Some(policy) = policy() else {
        return;
    };
    let expr = match policy.cel.compile(source) {
        Ok(expr) => expr,
        Err(message) => {
            assert!(!message.is_empty(), "an error needs a message");
            return;
        }
    };
    assert!(source.len() <= MAX_EXPRESSION_LEN, "an oversized expression compiled");
    let headers = vec![
        ("x-team".to_string(), "crm".to_string()),
        ("x-team".to_string(), "ops".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let claims = serde_json::json!({
        "iss": "https://idp.example.com", "azp": "pos", "scope": "dataset:customers read",
        "exp": 1_795_925_100_i64, "iat": 1_795_924_800_i64, "n": 1.5, "list": [1, "a", null],
        "nested": {"a": {"b": [true]}}
    });
    let token = VerifiedToken {
        issuer: 0,
        app: "pos".into(),
        claims: claims.as_object().cloned().unwrap_or_default(),
        exp: 1_795_925_100,
        iat: Some(1_795_924_800),
        nbf: None,
        scopes: vec!["dataset:customers".into(), "read".into()],
        clock_skew_seconds: 30,
    };
    let Some(app) = policy.apps.first() else {
        return;
    };
    for (dataset, token) in [(policy.datasets.first(), Some(&token)), (None, None)] {
        let input = Input {
            app,
            tier: policy.tier_of(app).map_or("", |t| t.name.as_str()),
            dataset,
            method: "GET",
            host: "api.example",
            path: "/customers/7",
            headers: &headers,
            token,
        };
        let interpreted = policy.cel.eval(&expr, &policy.cel.scope(input.vars(USES_ALL)));
        if let Some(fast) = policy.cel.eval_fast(&expr, &input) {
            assert_eq!(fast.is_ok(), interpreted.is_ok(), "{source}: fast {fast:?}, interpreter {interpreted:?}");
            if let (Ok(a), Ok(b)) = (&fast, &interpreted) {
                assert_eq!(a, b, "{source}");
            }
        }
        let _ = policy.cel.evaluation(input).eval(&expr);
    }
});
