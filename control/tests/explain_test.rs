//! `guardrail explain` and `guardrail test` as users run them, on the RetailCo example.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

// === Helpers ===

fn guardrail(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guardrail"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run guardrail {args:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn retailco(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/retailco").join(file).display().to_string()
}

fn demo_key(app: &str) -> String {
    let keys = std::fs::read_to_string(retailco("demo-keys.txt")).unwrap();
    keys.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [id, key] if id == app => Some(key.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no demo key for {app}"))
}

/// A case file under the system temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("guardrail-explain-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const AT: &str = "2026-11-29T10:00:00Z";

// === guardrail check / test on the example ===

#[test]
fn retailco_policy_is_valid() {
    let out = guardrail(&["check", &retailco("policy.yaml")]);
    assert!(out.status.success(), "check failed: {}", stderr(&out));
    assert!(stdout(&out).starts_with("ok: "), "{}", stdout(&out));
}

#[test]
fn retailco_cases_pass_and_cover_the_decision_table() {
    let out = guardrail(&["test", &retailco("policy.yaml"), &retailco("tests.yaml")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{stderr}", stderr = stderr(&out));
    assert!(!text.contains("FAIL"), "{text}");
    let summary = text.lines().last().unwrap_or_default();
    let passed: usize = summary
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("summary line: {summary}"));
    assert!(passed >= 15, "only {passed} cases");

    // Every row of the SPEC table but policy-unavailable, and allowed requests.
    let cases = std::fs::read_to_string(retailco("tests.yaml")).unwrap();
    for code in [
        "invalid-path",
        "unauthenticated",
        "app-not-registered",
        "app-not-active",
        "connector-not-approved",
        "residency-violation",
        "jit-required",
        "access-denied",
        "quota-exceeded",
        "budget-exhausted",
    ] {
        assert!(cases.contains(&format!("code: {code}")), "no case expects {code}");
    }
    for needle in ["allow: true", "mint:", "%2F", "/../", "shadow: [watch-exports]"] {
        assert!(cases.contains(needle), "no case with {needle}");
    }
}

#[test]
fn verbose_shows_traces_of_passing_cases() {
    let out = guardrail(&["test", "-v", &retailco("policy.yaml"), &retailco("tests.yaml")]);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("rule       `watch-exports` (deny, shadow)"), "{text}");
    assert!(text.contains("shadow     rule `watch-exports` would deny"), "{text}");
}

#[test]
fn a_failing_case_shows_expected_got_and_trace() {
    let cases = TempFile::new(&format!(
        r#"
at: "{AT}"
defaults: {{connector: upstream}}
cases:
  - name: passes
    request: {{app: promo-builder, url: "https://api.retailco.example/promotions"}}
    expect: {{allow: true}}
  - name: customer data without a JIT token is allowed (wrong)
    request: {{api_key: {key}, url: "https://api.retailco.example/customers/42"}}
    expect: {{allow: true}}
"#,
        key = demo_key("crm-console")
    ));
    let out = guardrail(&["test", &retailco("policy.yaml"), cases.path()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("PASS passes"), "{text}");
    assert!(text.contains("FAIL customer data without a JIT token is allowed (wrong)"), "{text}");
    assert!(text.contains("expected: ALLOW"), "{text}");
    assert!(text.contains("got:      DENY 403 jit-required (rule jit)"), "{text}");
    // The trace, down to the check that refused.
    for line in [
        "credential API key of app `crm-console`",
        "dataset    `customer-profiles` (regulated)",
        "verdict    DENY 403 (jit-required)",
    ] {
        assert!(text.contains(line), "no `{line}` in\n{text}");
    }
    assert!(text.ends_with("1 passed, 1 failed\n"), "{text}");
}

#[test]
fn repeat_applies_the_expectation_to_the_last_request() {
    let cases = TempFile::new(&format!(
        r#"
at: "{AT}"
cases:
  - name: fifth fits
    repeat: 5
    request: {{app: promo-builder, url: /promotions, connector: upstream}}
    expect: {{allow: true}}
  - name: sixth does not
    repeat: 6
    request: {{app: promo-builder, url: /promotions, connector: upstream}}
    expect: {{allow: true}}
"#
    ));
    let out = guardrail(&["test", &retailco("policy.yaml"), cases.path()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("PASS fifth fits"), "{text}");
    assert!(text.contains("FAIL sixth does not"), "{text}");
    assert!(text.contains("(request 6 of 6)"), "{text}");
    assert!(text.contains("DENY 429 quota-exceeded (rule rate)"), "{text}");
}

#[test]
fn an_invalid_case_file_names_the_case_and_line() {
    let cases = TempFile::new(
        "cases:\n  - name: first\n    request: {app: crm-console, url: /catalog}\n    expect: {allow: true}\n  - name: typo\n    request: {app: crm-console, url: /catalog}\n    expect: {stauts: 403}\n",
    );
    let out = guardrail(&["test", &retailco("policy.yaml"), cases.path()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:7: case 2 (\"typo\"): cases[1].expect: unknown field `stauts`", cases.path())),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "no case runs: {}", stdout(&out));

    let cases = TempFile::new(
        "cases:\n  - name: a\n    request: {app: x, url: /a}\n    expect: {status: 403, code: quota-exceeded}\n",
    );
    let out = guardrail(&["test", &retailco("policy.yaml"), cases.path()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("403 does not go with code quota-exceeded"), "{}", stderr(&out));
}

#[test]
fn an_invalid_policy_is_reported_by_test_and_explain() {
    let policy = TempFile::new("apiVersion: guardrail/v1\nkind: Policy\nbogus: 1\n");
    let out = guardrail(&["test", policy.path(), &retailco("tests.yaml")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(":3: "), "{}", stderr(&out));
    let out = guardrail(&["explain", policy.path(), "--app", "a", "--url", "/a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bogus"), "{}", stderr(&out));
}

// === guardrail explain ===

#[test]
fn explain_an_allowed_request() {
    let key = demo_key("promo-builder");
    let out = guardrail(&[
        "explain",
        &retailco("policy.yaml"),
        "--api-key",
        &key,
        "--method",
        "GET",
        "--url",
        "https://api.retailco.example/promotions/black-friday",
        "--connector",
        "upstream",
        "--at",
        AT,
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    for line in [
        "credential API key of app `promo-builder`",
        "lifecycle  draft in dev: active",
        "dataset    `promotions` (internal)",
        "\nALLOW\n",
        "x-guardrail-app: promo-builder",
        "ratelimit-policy: \"rate\";q=5;w=60",
    ] {
        assert!(text.contains(line), "no `{line}` in\n{text}");
    }
}

#[test]
fn explain_a_denied_request_with_its_problem() {
    let out = guardrail(&[
        "explain",
        &retailco("policy.yaml"),
        "--app",
        "us-promo",
        "--url",
        "https://api.retailco.example/loyalty/42",
        "--connector",
        "upstream",
        "--at",
        AT,
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "a denial is not an error: {text}");
    assert!(text.contains("credential assumed app `us-promo` (explain/test only)"), "{text}");
    assert!(text.contains("DENY 403 residency-violation (rule residency): app region `us-east-1`"), "{text}");
    assert!(text.contains("HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains("content-type: application/problem+json"), "{text}");
    let body = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("{\"app\"") && l.contains("\"type\""))
        .unwrap_or_else(|| panic!("no problem body in\n{text}"));
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["type"], "urn:guardrail:problem:residency-violation");
    assert_eq!(body["status"], 403);
    assert_eq!(body["app"], "us-promo");
    assert_eq!(body["rule"], "residency");
}

#[test]
fn explain_with_a_minted_jit_token() {
    let policy = retailco("policy.yaml");
    let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/issuer-key.jwk.json").display().to_string();
    let minted = guardrail(&[
        "mint",
        "--key",
        &key,
        "--app",
        "crm-console",
        "--scope",
        "dataset:customer-profiles",
        "--ttl",
        "10m",
        "--policy",
        &policy,
    ]);
    assert!(minted.status.success(), "mint: {}", stderr(&minted));
    let token = stdout(&minted).trim().to_string();
    let explain = |token: Option<&str>| {
        let api_key = demo_key("crm-console");
        let mut args = vec![
            "explain",
            &policy,
            "--api-key",
            &api_key,
            "--url",
            "https://api.retailco.example/customers/42",
            "--connector",
            "upstream",
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        stdout(&guardrail(&args))
    };
    let without = explain(None);
    assert!(without.contains("DENY 403 jit-required"), "{without}");
    assert!(
        without.contains("www-authenticate: Bearer error=\"insufficient_scope\", scope=\"dataset:customer-profiles\""),
        "{without}"
    );
    let with = explain(Some(&token));
    assert!(with.contains("jit        token scoped `dataset:customer-profiles`"), "{with}");
    assert!(with.contains("\nALLOW\n"), "{with}");
}

#[test]
fn explain_drops_client_sent_guardrail_headers() {
    let out = guardrail(&[
        "explain",
        &retailco("policy.yaml"),
        "--anonymous",
        "--url",
        "/catalog",
        "-H",
        "x-guardrail-app: crm-console",
    ]);
    let text = stdout(&out);
    assert!(text.contains("header `x-guardrail-app` dropped"), "{text}");
    assert!(text.contains("DENY 401 unauthenticated"), "{text}");
}

#[test]
fn explain_usage_errors_exit_2() {
    let policy = retailco("policy.yaml");
    let cases: &[(&[&str], &str)] = &[
        (&["--url", "/a"], "no identity"),
        (&["--app", "a", "--api-key", "k", "--url", "/a"], "app and api key"),
        (&["--app", "a", "--url", "ftp://x/a"], "not an http URL"),
        (&["--app", "a", "--url", "/a", "--at", "yesterday"], "bad --at"),
        (&["--app", "a", "--url", "/a", "-H", "no colon"], "bad header"),
        (&["--app", "a", "--url", "/a", "-X", "G T"], "bad method"),
    ];
    for (args, why) in cases {
        let mut all = vec!["explain", policy.as_str()];
        all.extend_from_slice(args);
        let out = guardrail(&all);
        assert_eq!(out.status.code(), Some(2), "{why}: {}", stderr(&out));
    }
}
