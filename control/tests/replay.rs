//! `guardrail replay` as users run it, on access-log lines written as the filter writes them: each
//! request decided by core's `decide()` with its real credential (an API key, a JWT minted by
//! `guardrail mint`), its outcome recorded in the access-log fields the filter sets.
//!
//! Self-consistency: the log replayed against the policy that decided it changes nothing; against
//! a candidate with a dataset's regions narrowed and a tier's rate tightened, exactly those
//! differences.

// A failing test is a panic; the workspace denies these lints for the code under test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use guardrail_core::compile::CompiledPolicy;
use guardrail_core::decide::{decide, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::quota::{ensure_keys, MemoryStore};
use guardrail_core::replay::Outcome;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

// === Helpers ===

fn guardrail(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_guardrail")).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run guardrail {args:?}: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("guardrail-replay-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const ISSUER: &str = "https://id.replay.example";
const AUDIENCE: &str = "replay-api";
const HOST: &str = "api.replay.example";

/// The policy in force; `candidate()` changes it.
fn current(jwk: &str) -> String {
    format!(
        r#"apiVersion: guardrail/v1
kind: Policy
revision: current
settings:
  gateway_region: eu-west-1
  identity:
    jwt:
      - issuer: {ISSUER}
        audiences: [{AUDIENCE}]
        jwks: {{keys: [{jwk}]}}
tiers:
  standard:
    rate: {{requests: 600, per: 1m, burst: 100}}
  tight:
    rate: {{requests: 5, per: 1m, burst: 5}}
connectors:
  approved: [upstream]
apps:
  - {{id: eu-app, tier: standard, lifecycle: published, environment: prod, region: eu-west-1,
     data_classes: [public, internal, regulated], connectors: [upstream], api_keys: [{eu}]}}
  - {{id: us-app, tier: standard, lifecycle: published, environment: prod, region: us-east-1,
     data_classes: [public, internal], connectors: [upstream], api_keys: [{us}]}}
  - {{id: burst-app, tier: tight, lifecycle: published, environment: prod, region: eu-west-1,
     data_classes: [public, internal], connectors: [upstream], api_keys: [{burst}]}}
  - {{id: draft-app, tier: standard, lifecycle: draft, environment: prod, region: eu-west-1,
     data_classes: [public], connectors: [upstream], api_keys: [{draft}]}}
datasets:
  - id: profiles
    classification: regulated
    allowed_regions: [eu-west-1]
    routes: [{{path_prefix: /profiles}}]
  - id: prices
    classification: internal
    allowed_regions: [eu-west-1, us-east-1]
    routes: [{{path_prefix: /prices}}]
rules:
  - id: no-profile-deletes
    effect: deny
    datasets: [profiles]
    when: request.method == 'DELETE'
exemptions:
  - id: probes
    routes: [{{path_prefix: /healthz, methods: [GET]}}]
"#,
        eu = digest("key-eu-app"),
        us = digest("key-us-app"),
        burst = digest("key-burst-app"),
        draft = digest("key-draft-app"),
    )
}

/// `prices` narrowed to the EU, the `tight` tier from 5 to 3 requests.
fn candidate(jwk: &str) -> String {
    let text = current(jwk)
        .replace("revision: current", "revision: candidate")
        .replace("allowed_regions: [eu-west-1, us-east-1]", "allowed_regions: [eu-west-1]")
        .replace("rate: {requests: 5, per: 1m, burst: 5}", "rate: {requests: 3, per: 1m, burst: 3}");
    assert!(text.contains("requests: 3,") && !text.contains("us-east-1]"), "the candidate changes");
    text
}

fn digest(key: &str) -> String {
    let out = guardrail(&["hash-key", key]);
    text(&out.stdout).trim().to_string()
}

/// RFC 3339 with milliseconds, as Envoy's `%START_TIME%` writes it (core's date, plus the `.mmm`).
fn rfc3339_ms(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let seconds = guardrail_core::time::rfc3339_secs(secs);
    format!("{}.{:03}Z", seconds.trim_end_matches('Z'), (ns / 1_000_000) % 1000)
}

/// One request a client sends.
struct Send<'a> {
    method: &'a str,
    path: &'a str,
    api_key: Option<&'a str>,
    token: Option<&'a str>,
    extra: &'a [(&'a str, &'a str)],
}

fn send<'a>(method: &'a str, path: &'a str, api_key: Option<&'a str>, token: Option<&'a str>) -> Send<'a> {
    Send { method, path, api_key, token, extra: &[] }
}

/// The filter's access-log line for `send`, decided by core's `decide()` at `now_ns` as the filter
/// decides it (same fields and values as `src/lib.rs` sets in filter state).
fn record(
    policy: &CompiledPolicy,
    store: &mut MemoryStore,
    tokens: &mut TokenCache,
    id: &str,
    now_ns: u64,
    req: &Send<'_>,
) -> Value {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(key) = req.api_key {
        headers.push(("x-api-key".into(), key.into()));
    }
    if let Some(token) = req.token {
        headers.push(("authorization".into(), format!("Bearer {token}")));
    }
    for (k, v) in req.extra {
        headers.push(((*k).into(), (*v).into()));
    }
    let request = Request {
        method: req.method,
        host: HOST,
        path: req.path,
        connector: Some("upstream"),
        request_id: id,
        headers: &headers,
        gateway_region: None,
        fleet: None,
        peer: None,
    };
    let d = decide(policy, &request, now_ns, store, tokens);
    let outcome = Outcome::of(&d);
    let token = d.token.as_ref().map(|t| {
        let mut summary = t.scopes.join(" ");
        if let Some(iat) = t.iat {
            summary.push_str(&format!(";ttl={}", t.exp - iat));
        }
        summary
    });
    let app = if d.pass.is_some() { None } else { d.app_id() };
    json!({
        "time": rfc3339_ms(now_ns),
        "request_id": id,
        "method": req.method,
        "authority": HOST,
        "path": req.path,
        "protocol": "HTTP/1.1",
        "status": outcome.status(),
        "response_flags": "-",
        "upstream_cluster": "upstream",
        "duration_ms": 2,
        "peer": "-",
        "guardrail_app": app.unwrap_or("-"),
        "guardrail_code": outcome.code(),
        "guardrail_dataset": d.dataset.map_or("-", |ds| ds.id.as_str()),
        "guardrail_token": token.unwrap_or_else(|| "-".to_string()),
    })
}

struct Fixture {
    dir: TempDir,
    current: PathBuf,
    candidate: PathBuf,
    log: PathBuf,
    /// The log's lines.
    lines: Vec<String>,
}

/// Mixed traffic through the current policy, written as the access log.
fn fixture() -> Fixture {
    let dir = TempDir::new();
    let key = dir.0.join("issuer.jwk.json");
    let out = guardrail(&["keygen", "--out", s(&key), "--kid", "replay-test"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let jwk = text(&out.stdout).trim().to_string();
    let current_path = dir.write("current.yaml", current(&jwk).as_bytes());
    let candidate_path = dir.write("candidate.yaml", candidate(&jwk).as_bytes());
    let mint = |app: &str, scope: &str, ttl: &str| {
        let mut args = vec!["mint", "--key", s(&key), "--app", app, "--ttl", ttl, "--issuer", ISSUER];
        args.extend(["--audience", AUDIENCE]);
        if !scope.is_empty() {
            args.extend(["--scope", scope]);
        }
        let out = guardrail(&args);
        assert_eq!(out.status.code(), Some(0), "mint: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let jit = mint("eu-app", "dataset:profiles", "10m");
    let unscoped = mint("eu-app", "dataset:prices", "10m");
    let ghost = mint("ghost-app", "", "10m");

    let policy = match guardrail_core::source::load_str(&current(&jwk)) {
        Ok(policy) => policy,
        Err(e) => panic!("current policy: {e:?}"),
    };
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str())).unwrap();
    let mut tokens = TokenCache::new(16);

    let preflight = [("origin", "https://app.example"), ("access-control-request-method", "POST")];
    let mut traffic: Vec<Send<'_>> = Vec::new();
    for i in 0..4 {
        traffic.push(send("GET", ["/prices/1", "/prices/2", "/prices/3", "/prices/4"][i], Some("key-eu-app"), None));
        traffic.push(send("GET", ["/prices/1", "/prices/2", "/prices/3", "/prices/4"][i], Some("key-us-app"), None));
    }
    traffic.push(send("GET", "/profiles/7", Some("key-eu-app"), Some(&jit)));
    traffic.push(send("GET", "/profiles/7", None, Some(&jit)));
    traffic.push(send("GET", "/profiles/7", Some("key-eu-app"), None));
    traffic.push(send("GET", "/profiles/7", Some("key-eu-app"), Some(&unscoped)));
    traffic.push(send("DELETE", "/profiles/7", Some("key-eu-app"), Some(&jit)));
    traffic.push(send("GET", "/profiles/7", Some("key-us-app"), None));
    traffic.push(send("GET", "/prices/1", Some("key-draft-app"), None));
    traffic.push(send("GET", "/prices/1", None, Some(&ghost)));
    traffic.push(send("GET", "/prices/1", None, None));
    traffic.push(send("GET", "/prices/1", Some("not-a-key"), None));
    traffic.push(send("GET", "/healthz", None, None));
    traffic.push(send("GET", "/a/%2e%2e/%2e%2e/etc", Some("key-eu-app"), None));
    traffic.push(Send { extra: &preflight, ..send("OPTIONS", "/prices/1", None, None) });
    // The tight tier's bucket (5): 8 requests within a second, then one a minute later.
    for _ in 0..8 {
        traffic.push(send("GET", "/prices/9", Some("key-burst-app"), None));
    }
    let start = guardrail_core::time::NANOS_PER_SEC * (now_secs() as u64);
    let mut lines = Vec::new();
    for (i, req) in traffic.iter().enumerate() {
        let at = start + (i as u64) * 20_000_000;
        lines.push(record(&policy, &mut store, &mut tokens, &format!("req-{i:02}"), at, req).to_string());
    }
    let later = start + 80 * guardrail_core::time::NANOS_PER_SEC;
    let last = send("GET", "/prices/9", Some("key-burst-app"), None);
    lines.push(record(&policy, &mut store, &mut tokens, "req-late", later, &last).to_string());
    let log = dir.write("access.log", (lines.join("\n") + "\n").as_bytes());
    Fixture { dir, current: current_path, candidate: candidate_path, log, lines }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn replay_json(args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["replay", "--json"];
    all.extend_from_slice(args);
    let out = guardrail(&all);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), report, text(&out.stderr))
}

/// `app: from → to: count` of every change in a `--json` report, sorted.
fn changes(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for app in report["apps"].as_array().unwrap() {
        for c in app["changes"].as_array().unwrap() {
            out.push(format!(
                "{}: {} → {}: {}",
                app["app"].as_str().unwrap_or("-"),
                c["from"]["label"].as_str().unwrap(),
                c["to"]["label"].as_str().unwrap(),
                c["count"]
            ));
        }
    }
    out.sort();
    out
}

fn undetermined(report: &Value) -> Vec<String> {
    let mut out: Vec<String> = report["undetermined"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}: {}", r["reason"].as_str().unwrap(), r["count"]))
        .collect();
    out.sort();
    out
}

// === Self-consistency ===

#[test]
fn the_log_shows_every_kind_of_decision() {
    let f = fixture();
    let codes: Vec<String> = f
        .lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["guardrail_code"].as_str().unwrap().to_string())
        .collect();
    for code in [
        "allow",
        "jit-required",
        "access-denied",
        "residency-violation",
        "app-not-active",
        "app-not-registered",
        "unauthenticated",
        "exempt",
        "invalid-path",
        "preflight",
        "quota-exceeded",
    ] {
        assert!(codes.iter().any(|c| c == code), "the traffic records a `{code}`: {codes:?}");
    }
}

#[test]
fn replaying_the_policy_in_force_reproduces_every_decision_it_can_determine() {
    let f = fixture();
    let (code, report, err) = replay_json(&["--policy", s(&f.current), s(&f.log)]);
    assert_eq!(code, Some(0), "no change, exit 0: {report:#} {err}");
    assert_eq!(report["records"], json!(f.lines.len()));
    assert_eq!(report["changed"], json!(0), "{report:#}");
    assert!(changes(&report).is_empty());
    // The two 401s (no credential; an unknown key): the credential is not logged.
    assert_eq!(undetermined(&report), vec!["credential-not-recorded: 2"], "{report:#}");
    assert_eq!(report["unchanged"], json!(f.lines.len() - 2));
    assert_eq!(report["malformed"]["count"], json!(0));
}

#[test]
fn replaying_a_changed_policy_shows_exactly_its_differences() {
    let f = fixture();
    let (code, report, err) = replay_json(&["--policy", s(&f.candidate), s(&f.log)]);
    assert_eq!(code, Some(3), "changes, exit 3: {err}");
    assert_eq!(
        changes(&report),
        vec![
            // The tight tier at 3: the 4th and 5th of the burst are now refused (the 6th-8th were).
            "burst-app: 200 → 429 quota-exceeded: 2".to_string(),
            // prices narrowed to the EU: the US app's four reads.
            "us-app: 200 → 403 residency-violation: 4".to_string(),
        ],
        "{report:#}"
    );
    let us = report["apps"].as_array().unwrap().iter().find(|a| a["app"] == "us-app").unwrap();
    let samples = &us["changes"][0]["samples"];
    assert_eq!(samples, &json!(["req-01", "req-03", "req-05"]), "the first three, in log order");
    assert_eq!(undetermined(&report), vec!["credential-not-recorded: 2"]);

    // The same with the current policy as the baseline instead of the recording.
    let (code, baseline, _) = replay_json(&["--policy", s(&f.candidate), "--baseline", s(&f.current), s(&f.log)]);
    assert_eq!(code, Some(3));
    assert_eq!(changes(&baseline), changes(&report));
    assert_eq!(baseline["baseline"]["revision"], json!("current"));

    // Text: per app, `from → to: count` with samples.
    let out = guardrail(&["replay", "--policy", s(&f.candidate), s(&f.log)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout.contains("us-app: 4 of 5 records changed"), "{stdout}");
    assert!(stdout.contains("200 → 403 residency-violation: 4  e.g. req-01, req-03, req-05"), "{stdout}");
    assert!(stdout.contains("200 → 429 quota-exceeded: 2"), "{stdout}");
}

#[test]
fn gzip_logs_and_several_logs_merged_by_time() {
    let f = fixture();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(std::fs::read(&f.log).unwrap().as_slice()).unwrap();
    let gz_path = f.dir.write("access.log.gz", &gz.finish().unwrap());
    let (code, report, err) = replay_json(&["--policy", s(&f.candidate), s(&gz_path)]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(report["records"], json!(f.lines.len()));
    assert_eq!(changes(&report).len(), 2);

    // The log in two files, each with every other line: merged by time, the quota sees one stream.
    let (even, odd): (Vec<_>, Vec<_>) = f.lines.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let join = |v: Vec<(usize, &String)>| v.into_iter().map(|(_, l)| format!("{l}\n")).collect::<String>();
    let a = f.dir.write("a.log", join(even).as_bytes());
    let b = f.dir.write("b.log", join(odd).as_bytes());
    let (code, merged, err) = replay_json(&["--policy", s(&f.candidate), s(&a), s(&b)]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(changes(&merged), changes(&report));
    let (code, same, _) = replay_json(&["--policy", s(&f.current), s(&a), s(&b)]);
    assert_eq!((code, &same["changed"]), (Some(0), &json!(0)), "{same:#}");
}

// === Bad input ===

#[test]
fn malformed_lines_are_counted_and_skipped_with_their_numbers() {
    let f = fixture();
    let mut text_log = std::fs::read_to_string(&f.log).unwrap();
    let first = f.lines.first().unwrap();
    text_log.push_str(&first[..first.len() / 2]); // truncated
    text_log.push('\n');
    text_log.push_str("\u{1}garbage\n\n");
    text_log.push_str(r#"{"time":"2026-12-06T13:58:23.019Z"}"#); // JSON lacking fields
    text_log.push('\n');
    let log = f.dir.write("broken.log", text_log.as_bytes());
    let (code, report, _) = replay_json(&["--policy", s(&f.current), s(&log)]);
    assert_eq!(code, Some(0));
    let n = f.lines.len() as u64;
    assert_eq!(report["malformed"]["count"], json!(3));
    let lines: Vec<u64> =
        report["malformed"]["lines"].as_array().unwrap().iter().map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![n + 1, n + 2, n + 4], "line numbers count the empty line too");
    assert_eq!(report["records"], json!(n));
}

#[test]
fn a_log_of_another_format_is_an_error_naming_the_expected_fields() {
    let dir = TempDir::new();
    let policy = dir.write(
        "p.yaml",
        current(r#"{"kty":"OKP","crv":"Ed25519","x":"zHSH5Ge9NgQ7ZAc2kp7w-y6Tuexn-Cs00K1kNaE0XrU"}"#).as_bytes(),
    );
    let envoy_text = dir.write(
        "text.log",
        b"[2026-12-06T13:58:23.019Z] \"GET /prices/1 HTTP/1.1\" 200 - 0 12 3 - \"-\" \"curl/8\" \"id\" \"api\" \"127.0.0.1:8080\"\n",
    );
    let out = guardrail(&["replay", "--policy", s(&policy), s(&envoy_text)]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("not a JSON access log") && err.contains("time, request_id, method, authority"), "{err}");

    let other_json = dir.write("other.log", b"{\"start\":\"2026-12-06T13:58:23Z\",\"code\":200}\n");
    let out = guardrail(&["replay", "--policy", s(&policy), s(&other_json)]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("lack time, request_id") && err.contains("guardrail_code"), "{err}");

    let out = guardrail(&["replay", "--policy", s(&policy), s(&dir.0.join("absent.log"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"), "{}", text(&out.stderr));
}

#[test]
fn an_invalid_candidate_is_refused_with_checks_errors() {
    let dir = TempDir::new();
    let bad = dir
        .write("bad.yaml", b"apiVersion: guardrail/v1\nkind: Policy\ntiers:\n  t:\n    rate: {requests: 0, per: 1m}\n");
    let log = dir.write("a.log", b"");
    let check = guardrail(&["check", s(&bad)]);
    let out = guardrail(&["replay", "--policy", s(&bad), s(&log)]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let check_err = text(&check.stderr);
    assert!(!check_err.is_empty() && err.starts_with(&check_err), "the same errors as check:\n{err}\nvs\n{check_err}");
    assert!(err.contains("bad.yaml:5"), "file:line: {err}");
    assert!(out.stdout.is_empty());
}
