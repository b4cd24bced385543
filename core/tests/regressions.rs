//! Regressions: inputs that broke an invariant of `guardrail-core`, found by the cargo-fuzz
//! targets in `fuzz/` (`tools/fuzz.sh`) or by the attack review of docs/security.md, each kept
//! with the clean outcome it must have. Never delete a case; add the next one below its kin.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use guardrail_core::compile::compile_json_str;
use guardrail_core::path::{normalize_path, PathError};
use guardrail_core::rules::{Cel, MAX_EXPRESSION_LEN, MAX_NESTING};

// === path: fuzz target `path` ===

/// Normalising a normalised path gives it back unchanged: a path the filter classifies is the
/// path a second decoder sees. Otherwise `/public%25%32%46..%25%32%46vault` passes as the one
/// segment `public%252F..%252Fvault` (no dataset) while an upstream that decodes twice serves
/// `/public/../vault`, i.e. `/vault`. The fuzzer found this within seconds (crash inputs kept
/// verbatim below); the first case is the attack shape. Clean outcome: `Err(DoubleEncoding)`
/// (what `%252F` itself gets), or a result that normalises to itself.
#[test]
fn an_escaped_percent_followed_by_escaped_hex_digits_is_double_encoding() {
    let cases = [
        "/public%25%32%46..%25%32%46vault%25%32%461",
        "/%25%32F",
        "/a%25%34%31",
        "/a%25%32%46b/%25XXXwXXXXXXXXXz",
        "/ak/a/a%25%332",
        "/a/b22%256%44~zz",
        "/i5t5444%251t%251%651z;",
        "/a6%3739//a6%252%3739///",
        "/25//%252%44%252z//%252%21%252z2z",
    ];
    let mut failures = Vec::new();
    for raw in cases {
        match normalize_path(raw) {
            Err(_) => {}
            Ok(once) => {
                let twice = normalize_path(&once);
                if twice.as_deref() != Ok(once.as_str()) {
                    failures.push(format!("{raw:?} -> {once:?} -> {twice:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "not idempotent (a second decoding changes the path):\n{}", failures.join("\n"));
}

#[test]
fn double_encoding_spelled_directly_stays_refused() {
    // The kin of the case above that was always refused, so a fix does not trade one for the other.
    assert_eq!(normalize_path("/public%252F..%252Fvault"), Err(PathError::DoubleEncoding));
    assert_eq!(normalize_path("/a%2541"), Err(PathError::DoubleEncoding));
    assert_eq!(normalize_path("/a%25"), Ok("/a%25".to_string()), "a lone escaped percent is fine");
    assert_eq!(normalize_path("/a%25zz"), Ok("/a%25zz".to_string()), "an escaped percent before non-hex is fine");
}

// === CEL: rule cost (review; confirmed in Envoy by tests/e2e/test_attacks.py) ===

/// Nested comprehensions multiply: 8 levels over 10 elements are 10^8 evaluations per request
/// (minutes of a worker's time in Envoy), in 287 bytes and 8 brackets, within
/// MAX_EXPRESSION_LEN and MAX_NESTING. A policy (or a companion pushing one) may not be able to
/// stall every request: such a rule must be refused when the policy is compiled, naming it.
/// CEL's lexer skips whitespace and `//` comments between tokens, so `. exists(` and
/// `.\nexists(` are the same macro call as `.exists(` and must count the same.
#[test]
fn a_rule_whose_evaluation_cost_explodes_is_refused_at_compile_time() {
    let cel = Cel::default();
    let mut failures = Vec::new();
    for call in [".exists(", ".exists (", ". exists(", ".\nexists(", ".\t all(", ".// comment\nexists(", " .map("] {
        let mut when = "false".to_string();
        for i in 0..8 {
            when = format!("[0,1,2,3,4,5,6,7,8,9]{call}v{i}, {when})");
        }
        let when = if call.contains("map") { format!("size({when}) == 0") } else { when };
        assert!(when.len() <= MAX_EXPRESSION_LEN && 9 <= MAX_NESTING, "within the documented bounds");
        if cel.compile(&when).is_ok() {
            failures.push(format!("{call:?}: {when}"));
        }
    }
    assert!(failures.is_empty(), "rules of 10^8 evaluations compiled:\n{}", failures.join("\n"));

    let mut when = "false".to_string();
    for i in 0..8 {
        when = format!("[0,1,2,3,4,5,6,7,8,9].exists(v{i}, {when})");
    }
    let policy = format!(
        r#"{{"apiVersion": "guardrail/v1", "kind": "Policy",
            "tiers": {{"t": {{"rate": {{"requests": 1, "per": "1s"}}}}}},
            "rules": [{{"id": "cost-bomb", "effect": "deny", "when": "{when}"}}]}}"#
    );
    let errors = compile_json_str(&policy).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(errors.contains("rules[0].when"), "the policy error names the rule's field: {errors:?}");
}

#[test]
fn a_few_nested_comprehensions_still_compile() {
    // What the fix must keep: ordinary rules use one or two comprehensions.
    let cel = Cel::default();
    for when in [
        // (Was `token.claims.scope.split(' ')…`: `split` is of CEL's strings extension, which the
        // interpreter does not have, so that rule failed on every request; it is refused now.)
        "token.claims.scopes.exists(s, s == 'dataset:' + dataset.id)",
        "app.data_classes.all(c, c in ['public', 'internal'])",
        "app.connectors.exists(c, dataset.allowed_regions.exists(r, r == c))",
    ] {
        assert!(cel.compile(when).is_ok(), "{when}");
    }
}
