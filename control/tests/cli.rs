//! The `guardrail` binary as users run it: arguments in, stdout/stderr and exit code out.

// A failing test is a panic; the workspace denies these lints for the code under test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

// === Helpers ===

fn guardrail(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_guardrail")).args(args).output();
    match out {
        Ok(out) => out,
        Err(e) => panic!("cannot run guardrail {args:?}: {e}"),
    }
}

fn guardrail_stdin(args: &[&str], input: &[u8]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_guardrail"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!("cannot run guardrail {args:?}: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        assert!(stdin.write_all(input).is_ok(), "writing stdin");
    }
    match child.wait_with_output() {
        Ok(out) => out,
        Err(e) => panic!("guardrail {args:?}: {e}"),
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A file under the system temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(ext: &str, contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("guardrail-cli-{}-{n}.{ext}", std::process::id()));
        if let Err(e) = std::fs::write(&path, contents) {
            panic!("writing {}: {e}", path.display());
        }
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A key of 24 characters and its digest (`printf %s guardrail-test-key-00001 | sha256sum`).
const KEY: &str = "guardrail-test-key-00001";

const VALID: &str = r#"apiVersion: guardrail/v1
kind: Policy
revision: 42
settings:
  gateway_region: eu-west-1
  failure_mode: closed
tiers:
  sandbox:
    rate: {requests: 60, per: 1m, burst: 10}
    daily_budget: 1000
  standard:
    rate:
      requests: 600
      per: 1m
connectors:
  approved: [hr-api, crm]
apps:
  - id: expense-bot
    owner: alice@example.com
    team: finance-tools
    department: finance
    environment: prod
    tier: standard
    lifecycle: published
    region: eu-west-1
    data_classes: [internal, confidential]
    connectors: [hr-api]
    api_keys:
      - DIGEST
    quota_overrides:
      - daily_budget: 5000
        expires_at: "2030-01-01T00:00:00Z"
        reason: quarter close
  - id: intern-demo
    environment: dev
    tier: sandbox
    lifecycle: draft
    region: eu-west-1
datasets:
  - id: hr-records
    classification: confidential
    owner_department: hr
    allowed_regions: [eu-west-1]
    routes:
      - host: hr.internal
        path_prefix: /employees
        methods: [GET]
rules:
  - id: no-deletes
    effect: deny
    when: request.method == "DELETE"
    message: deletes are not allowed
"#;

fn digest_of(key: &str) -> String {
    let out = guardrail(&["hash-key", key]);
    assert_eq!(out.status.code(), Some(0), "hash-key {key}: {}", stderr(&out));
    stdout(&out).trim_end().to_string()
}

fn valid_policy() -> String {
    VALID.replace("DIGEST", &digest_of(KEY))
}

// === hash-key ===

#[test]
fn hash_key_prints_the_sha256_digest() {
    // FIPS 180-2 test vector, long enough to be a key.
    let key = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    let out = guardrail(&["hash-key", key]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "sha256:248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1\n");
}

#[test]
fn hash_key_matches_sha256_of_the_key_bytes() {
    use sha2::Digest;
    let want = format!("sha256:{}\n", hex::encode(sha2::Sha256::digest(KEY.as_bytes())));
    let out = guardrail(&["hash-key", KEY]);
    assert_eq!(stdout(&out), want);
}

#[test]
fn hash_key_hashes_a_short_key_with_a_warning() {
    // FIPS 180-2 test vector: a key already handed out can be catalogued, however weak.
    let out = guardrail(&["hash-key", "abc"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n");
    assert!(stderr(&out).starts_with("warning: the key is 3 characters long"), "{}", stderr(&out));
    let out = guardrail(&["hash-key", KEY]);
    assert!(stderr(&out).is_empty(), "no warning for a 24-character key: {}", stderr(&out));
}

#[test]
fn hash_key_refuses_bad_keys_with_exit_2() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["hash-key", ""], "the key is empty", "empty key"),
        (&["hash-key", " 0123456789abcdef"], "whitespace", "leading space"),
        (&["hash-key"], "KEY", "no key and no --stdin"),
        (&["hash-key", "--stdin", KEY], "cannot be used with", "both a key and --stdin"),
    ];
    for (args, want, why) in cases {
        let out = guardrail(args);
        assert_eq!(out.status.code(), Some(2), "{why}: exit code; stderr {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{why}: nothing on stdout");
        assert!(stderr(&out).contains(want), "{why}: stderr should mention {want:?}: {}", stderr(&out));
    }
}

#[test]
fn hash_key_reads_stdin() {
    let want = format!("{}\n", digest_of(KEY));
    let cases: &[(&[u8], &str)] = &[
        (b"guardrail-test-key-00001\n", "trailing newline removed"),
        (b"guardrail-test-key-00001\r\n", "CRLF removed"),
        (b"guardrail-test-key-00001", "no newline"),
    ];
    for (input, why) in cases {
        let out = guardrail_stdin(&["hash-key", "--stdin"], input);
        assert_eq!(out.status.code(), Some(0), "{why}: {}", stderr(&out));
        assert_eq!(stdout(&out), want, "{why}");
    }
    let out = guardrail_stdin(&["hash-key", "--stdin"], b"\n");
    assert_eq!(out.status.code(), Some(2), "empty key on stdin");
    let out = guardrail_stdin(&["hash-key", "--stdin"], b"guardrail-test-key-00001\nsecond-line-of-text\n");
    assert_eq!(out.status.code(), Some(2), "two lines on stdin are not one key");
}

// === check ===

#[test]
fn check_accepts_a_valid_policy() {
    let file = TempFile::new("yaml", &valid_policy());
    let out = guardrail(&["check", file.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("ok: {} (revision 42, 2 apps, 1 dataset, 1 rule)\n", file.arg()));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn check_accepts_json() {
    let out = guardrail(&["export", TempFile::new("yaml", &valid_policy()).arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = TempFile::new("json", &stdout(&out));
    let out = guardrail(&["check", file.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("(revision 42, 2 apps, 1 dataset, 1 rule)"), "{}", stdout(&out));
}

/// Each case: a change to the valid policy (`from` → `to`), and the `path: message` part expected
/// on the line of the first `# <-` marker in the changed text.
#[test]
fn check_reports_file_line_and_path() {
    let dup_key_app = "  - id: intern-demo\n    api_keys:\n      - DIGEST # <-\n";
    let cases: Vec<(&str, String, String, &str, &str)> = vec![
        (
            "unknown tier",
            "    tier: standard\n".into(),
            "    tier: premium # <-\n".into(),
            "apps[0].tier",
            "unknown tier `premium`",
        ),
        (
            "duplicate app id",
            "  - id: intern-demo\n".into(),
            "  - id: expense-bot # <-\n".into(),
            "apps[1].id",
            "duplicate app id `expense-bot`",
        ),
        (
            "same API-key digest in two apps",
            "  - id: intern-demo\n".into(),
            dup_key_app.into(),
            "apps[1].api_keys[0]",
            "expense-bot",
        ),
        (
            "zero rate",
            "      requests: 600\n".into(),
            "      requests: 0 # <-\n".into(),
            "tiers.standard.rate.requests",
            "",
        ),
        (
            "negative burst",
            "    rate: {requests: 60, per: 1m, burst: 10}\n".into(),
            "    rate: {requests: 60, per: 1m, burst: -5} # <-\n".into(),
            "tiers.sandbox.rate.burst",
            "-5",
        ),
        (
            "bad duration",
            "      per: 1m\n".into(),
            "      per: 1 fortnight # <-\n".into(),
            "tiers.standard.rate.per",
            "fortnight",
        ),
        (
            "bad RFC 3339 time",
            "        expires_at: \"2030-01-01T00:00:00Z\"\n".into(),
            "        expires_at: tomorrow # <-\n".into(),
            "apps[0].quota_overrides[0].expires_at",
            "tomorrow",
        ),
        (
            "unknown lifecycle",
            "    lifecycle: published\n".into(),
            "    lifecycle: retired # <-\n".into(),
            "apps[0].lifecycle",
            "unknown variant `retired`",
        ),
        (
            "unknown environment",
            "    environment: prod\n".into(),
            "    environment: staging # <-\n".into(),
            "apps[0].environment",
            "unknown variant `staging`",
        ),
        (
            "unknown top-level key",
            "revision: 42\n".into(),
            "revision: 42\nrevison: 43 # <-\n".into(),
            "",
            "unknown field `revison`",
        ),
        (
            "unknown key in an app",
            "    owner: alice@example.com\n".into(),
            "    owner: alice@example.com\n    ower: bob # <-\n".into(),
            "apps[0]",
            "unknown field `ower`",
        ),
        (
            "JWKS without keys",
            "  failure_mode: closed\n".into(),
            "  failure_mode: closed\n  identity:\n    jwt:\n      - issuer: https://idp.example\n        jwks: {keys: []} # <-\n".into(),
            "settings.identity.jwt[0].jwks",
            "",
        ),
        (
            "JWKS with only a symmetric key",
            "  failure_mode: closed\n".into(),
            "  failure_mode: closed\n  identity:\n    jwt:\n      - issuer: https://idp.example\n        jwks: {keys: [{kty: oct, k: c2VjcmV0LXNlY3JldC1zZWNyZXQ}]} # <-\n".into(),
            "settings.identity.jwt[0].jwks",
            "",
        ),
        (
            "a path prefix with a dot segment",
            "        path_prefix: /employees\n".into(),
            "        path_prefix: /employees/./ # <-\n".into(),
            "datasets[0].routes[0].path_prefix",
            "`/employees/./` never matches: a request's path has dot segments resolved and escapes of letters, digits and `-._~` decoded before it is matched; write `/employees`",
        ),
        (
            "a path prefix with a percent-escape",
            "        path_prefix: /employees\n".into(),
            "        path_prefix: /employ%65es # <-\n".into(),
            "datasets[0].routes[0].path_prefix",
            "write `/employees`",
        ),
        (
            "a path prefix with a query",
            "        path_prefix: /employees\n".into(),
            "        path_prefix: /employees?active=1 # <-\n".into(),
            "datasets[0].routes[0].path_prefix",
            "requests are matched by their path alone",
        ),
        (
            "a host with a scheme",
            "      - host: hr.internal\n".into(),
            "      - host: https://hr.internal # <-\n".into(),
            "datasets[0].routes[0].host",
            "`https://hr.internal` has a scheme; write `hr.internal`",
        ),
        (
            "a host with a path",
            "      - host: hr.internal\n".into(),
            "      - host: hr.internal/employees # <-\n".into(),
            "datasets[0].routes[0].host",
            "has a path",
        ),
        (
            "a wildcard host",
            "      - host: hr.internal\n".into(),
            "      - host: \"*.internal\" # <-\n".into(),
            "datasets[0].routes[0].host",
            "has a wildcard, which routes do not support",
        ),
        (
            "a route another dataset already has: on the later one's line",
            "rules:\n".into(),
            "  - id: hr-public\n    classification: public\n    allowed_regions: [eu-west-1]\n    routes:\n      - path_prefix: /other\n      - host: HR.internal. # <-\n        path_prefix: /Employees/\nrules:\n".into(),
            "datasets[1].routes[1]",
            "same route as datasets[0].routes[0] of dataset `hr-records` (host `hr.internal`, path_prefix `/Employees`) with methods in common: its requests would all go to the first listed, never to `hr-public`",
        ),
        (
            "a fraction for a revision",
            "revision: 42\n".into(),
            "revision: 7.5 # <-\n".into(),
            "revision",
            "revision: must be a whole number or a string, not 7.5",
        ),
        (
            "empty settings",
            "settings:\n  gateway_region: eu-west-1\n  failure_mode: closed\n".into(),
            "settings: # <-\n".into(),
            "settings",
            "settings: invalid type: null, expected a mapping",
        ),
        (
            "a fraction for a count",
            "      requests: 600\n".into(),
            "      requests: 600.5 # <-\n".into(),
            "tiers.standard.rate.requests",
            "invalid type: floating point `600.5`, expected a whole number",
        ),
        (
            "a rule calling a function the interpreter does not have",
            "    when: request.method == \"DELETE\"\n".into(),
            "    when: foo(request.method) # <-\n".into(),
            "rules[0].when",
            "rule `no-deletes`: `foo` is unknown (not a function of Guardrail's CEL); evaluating it fails, and a failing rule denies",
        ),
        (
            "a rule reading a field the app does not have",
            "    when: request.method == \"DELETE\"\n".into(),
            "    when: app.colour == 'red' # <-\n".into(),
            "rules[0].when",
            "`app` has no field `colour` (fields: id, owner, team, department, environment, tier, lifecycle, region, data_classes, connectors)",
        ),
        (
            "a rule that is a constant string",
            "    when: request.method == \"DELETE\"\n".into(),
            "    when: \"'abc'\" # <-\n".into(),
            "rules[0].when",
            "the expression is a constant (`'abc'`), never true or false",
        ),
        (
            "a key indented one space less than its siblings: the YAML error at its line, not a missing field",
            "    environment: prod\n".into(),
            "   environment: prod # <-\n".into(),
            "",
            "indentation: `environment` is indented 3 spaces, and `department` above it (line 21) 4 spaces: the keys of one mapping line up, so `environment` belongs to no mapping here",
        ),
        (
            "a key indented one space more",
            "    environment: prod\n".into(),
            "     environment: prod # <-\n".into(),
            "",
            "indentation: `environment` is indented 5 spaces, and `department` above it (line 21) 4 spaces",
        ),
        (
            "a plain key where a digest belongs",
            "      - DIGEST\n".into(),
            "      - guardrail-test-key-00001 # <-\n".into(),
            "apps[0].api_keys[0]",
            "sha256:",
        ),
    ];
    let digest = digest_of(KEY);
    for (why, from, to, want_path, want_message) in cases {
        assert!(VALID.contains(&from), "{why}: the valid policy should contain {from:?}");
        let text = VALID.replacen(&from, &to, 1).replace("DIGEST", &digest);
        let line = match text.lines().position(|l| l.contains("# <-")) {
            Some(i) => i + 1,
            None => panic!("{why}: no marker"),
        };
        let file = TempFile::new("yaml", &text);
        let out = guardrail(&["check", file.arg()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{why}: exit code; stderr {err}");
        assert!(stdout(&out).is_empty(), "{why}: nothing on stdout: {}", stdout(&out));
        let prefix = if want_path.is_empty() {
            format!("{}:{line}: ", file.arg())
        } else {
            format!("{}:{line}: {want_path}", file.arg())
        };
        let hit = err.lines().find(|l| l.starts_with(&prefix));
        match hit {
            Some(l) => assert!(l.contains(want_message), "{why}: {l:?} should mention {want_message:?}"),
            None => panic!("{why}: expected a line starting with {prefix:?}, got:\n{err}"),
        }
        for l in err.lines() {
            assert!(l.starts_with(&format!("{}:", file.arg())), "{why}: every line names the file: {l:?}");
        }
    }
}

/// A rejected key of the one issuer is the error to fix: a dataset that requires JIT is not also
/// said to lack an issuer.
#[test]
fn check_reports_a_rejected_key_without_a_follow_on_error() {
    let x = "zHSH5Ge9NgQ7ZAc2kp7w-y6Tuexn-Cs00K1kNaE0XrU";
    let cases = [
        (format!("{{kty: OKP, crv: Ed25519, x: {x}, d: {x}}}"), "a private key"),
        ("{kty: oct, k: c2VjcmV0LXNlY3JldC1zZWNyZXQ}".to_string(), "a symmetric key"),
        (format!("{{kty: OKP, crv: Ed25519, x: {x}, use: enc}}"), "an encryption key"),
        (
            format!("{{kty: OKP, crv: Ed25519, x: {x}, kid: a}}, {{kty: OKP, crv: Ed25519, x: {x}, kid: a}}"),
            "a duplicate kid",
        ),
    ];
    for (keys, why) in cases {
        let identity = format!(
            "  failure_mode: closed\n  identity:\n    jwt:\n      - issuer: https://idp.example\n        jwks: {{keys: [{keys}]}}\n"
        );
        let text = valid_policy()
            .replace("  failure_mode: closed\n", &identity)
            .replace("    classification: confidential\n", "    classification: regulated\n");
        let file = TempFile::new("yaml", &text);
        let out = guardrail(&["check", file.arg()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{why}: {err}");
        assert!(err.contains(": settings.identity.jwt[0].jwks.keys["), "{why}: the key is named: {err}");
        assert!(!err.contains("requires_jit"), "{why}: no follow-on error: {err}");
    }
}

#[test]
fn check_reports_every_error() {
    let text = valid_policy()
        .replace("    tier: standard\n", "    tier: premium\n")
        .replace("      per: 1m\n", "      per: 1 fortnight\n");
    let file = TempFile::new("yaml", &text);
    let out = guardrail(&["check", file.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(": tiers.standard.rate.per: "), "{err}");
    assert!(err.contains(": apps[0].tier: "), "{err}");
}

#[test]
fn check_refuses_what_is_not_a_policy_file() {
    let missing = std::env::temp_dir().join(format!("guardrail-cli-missing-{}.yaml", std::process::id()));
    let missing = missing.to_str().unwrap_or_default().to_string();
    let not_utf8 = TempFile::new("yaml", "");
    assert!(std::fs::write(not_utf8.path(), b"kind: Policy\nowner: Jos\xe9\n").is_ok());
    let cases: &[(&str, String, &str)] = &[
        ("missing file", format!("{missing}: cannot read the file"), missing.as_str()),
        ("not UTF-8", format!("{}:2: not UTF-8", not_utf8.arg()), not_utf8.arg()),
    ];
    for (why, want, path) in cases {
        let out = guardrail(&["check", path]);
        assert_eq!(out.status.code(), Some(1), "{why}");
        assert!(stderr(&out).starts_with(want.as_str()), "{why}: {}", stderr(&out));
    }
}

/// Files that an editor began with a byte order mark read as without it: policies (YAML and
/// JSON) and case files.
#[test]
fn a_byte_order_mark_is_not_part_of_a_file() {
    let bom = "\u{feff}";
    let export = guardrail(&["export", TempFile::new("yaml", &valid_policy()).arg()]);
    assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
    for (ext, text, why) in [("yaml", valid_policy(), "YAML"), ("json", stdout(&export), "JSON")] {
        let file = TempFile::new(ext, &format!("{bom}{text}"));
        let out = guardrail(&["check", file.arg()]);
        assert_eq!(out.status.code(), Some(0), "{why}: {}", stderr(&out));
        assert!(stdout(&out).contains("(revision 42, 2 apps, 1 dataset, 1 rule)"), "{why}: {}", stdout(&out));
    }
    let policy = TempFile::new("yaml", &format!("{bom}{}", valid_policy()));
    let cases = TempFile::new(
        "yaml",
        &format!("{bom}cases:\n  - name: no key\n    request: {{method: GET, url: \"http://hr.internal/employees/7\"}}\n    expect: {{status: 401, code: unauthenticated}}\n"),
    );
    let out = guardrail(&["test", policy.arg(), cases.arg()]);
    assert_eq!(out.status.code(), Some(0), "case file: {}{}", stdout(&out), stderr(&out));
}

/// A directory for `guardrail serve`, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("guardrail-cli-dir-{}-{n}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("creating {}: {e}", path.display());
        }
        TempDir(path)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        if let Err(e) = std::fs::write(&path, contents) {
            panic!("writing {}: {e}", path.display());
        }
        path.to_str().unwrap_or_default().to_string()
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every command that reads a policy takes what `serve --policy` takes: a file, or a directory
/// holding exactly one policy file (others are ignored only when hidden, backups or scratch files).
#[test]
fn commands_take_a_policy_directory_as_serve_does() {
    let dir = TempDir::new();
    let out = guardrail(&["check", dir.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with(&format!("{}: holds no policy file", dir.arg())), "{}", stderr(&out));

    let file = dir.write("policy.yaml", &valid_policy());
    dir.write(".policy.yaml.swp", "not a policy");
    dir.write("policy.yaml~", "not a policy");
    dir.write("README.md", "not a policy");
    let out = guardrail(&["check", dir.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("ok: {file} (revision 42, 2 apps, 1 dataset, 1 rule)\n"));

    let out = guardrail(&["export", dir.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"expense-bot\""), "{}", stdout(&out));

    let args = ["explain", dir.arg(), "--api-key", KEY, "--method", "GET", "--url", "http://hr.internal/employees/7"];
    let out = guardrail(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("expense-bot"), "{}", stdout(&out));

    let cases = TempFile::new(
        "yaml",
        "cases:\n  - name: no key\n    request: {method: GET, url: \"http://hr.internal/employees/7\"}\n    expect: {status: 401, code: unauthenticated}\n",
    );
    let out = guardrail(&["test", dir.arg(), cases.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));

    // An invalid policy in the directory is reported with its file and line.
    dir.write("policy.yaml", &valid_policy().replace("    lifecycle: published\n", "    lifecycle: retired\n"));
    let out = guardrail(&["check", dir.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with(&format!("{file}:")), "{}", stderr(&out));
    assert!(stderr(&out).contains("apps[0].lifecycle"), "{}", stderr(&out));

    dir.write("more.json", "{}");
    let out = guardrail(&["check", dir.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("holds 2 policy files (more.json, policy.yaml)"), "{}", stderr(&out));
}

// === catalog ===

/// [`VALID`] with an expired override next to the live one, and a third app that is quarantined
/// and lists a connector that is not approved.
fn catalog_policy() -> String {
    valid_policy()
        .replace(
            "        reason: quarter close\n",
            "        reason: quarter close\n      - daily_budget: 9\n        expires_at: \"2020-01-01T00:00:00Z\"\n        reason: long gone\n",
        )
        .replace(
            "datasets:\n",
            "  - id: rogue\n    environment: test\n    tier: sandbox\n    lifecycle: quarantined\n    region: eu-west-1\n    connectors: [crm, pastebin]\ndatasets:\n",
        )
}

#[test]
fn catalog_json_lists_every_app_with_risk_trust_keys_and_quota() {
    let file = TempFile::new("yaml", &catalog_policy());
    let out = guardrail(&["catalog", file.arg(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(v["revision"], "42");
    let apps = v["apps"].as_array().unwrap();
    let ids: Vec<&str> = apps.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["expense-bot", "intern-demo", "rogue"]);

    let bot = &apps[0];
    assert_eq!(bot["owner"], "alice@example.com");
    assert_eq!(bot["team"], "finance-tools");
    assert_eq!(bot["department"], "finance");
    assert_eq!(bot["environment"], "prod");
    assert_eq!(bot["tier"], "standard");
    assert_eq!(bot["lifecycle"], "published");
    assert_eq!(bot["region"], "eu-west-1");
    assert_eq!(bot["data_classes"], serde_json::json!(["internal", "confidential"]));
    assert_eq!(bot["connectors"], serde_json::json!([{"name": "hr-api", "approved": true}]));
    assert_eq!(bot["risk"]["tier"], "red");
    assert_eq!(bot["risk"]["reasons"], serde_json::json!(["data class `confidential`"]));
    assert_eq!(bot["trust"]["score"], 85);
    let digest = digest_of(KEY);
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(bot["api_keys"]["count"], 1);
    assert_eq!(bot["api_keys"]["fingerprints"], serde_json::json!([&hex[..8]]));
    assert!(!text.contains(hex) && !text.contains(KEY), "only fingerprints: {text}");
    // The live override is in force; the expired one is not shown.
    assert_eq!(bot["quota"]["daily_budget"], 5000);
    assert_eq!(bot["quota"]["rate"]["requests"], 600);
    assert_eq!(
        bot["quota"]["overrides"],
        serde_json::json!([{"rate": null, "daily_budget": 5000, "expires_at": "2030-01-01T00:00:00Z",
                            "reason": "quarter close"}])
    );

    let intern = &apps[1];
    assert_eq!(intern["risk"]["tier"], "green");
    assert_eq!(intern["owner"], serde_json::Value::Null);
    assert_eq!(intern["api_keys"]["count"], 0);
    assert_eq!(intern["quota"]["daily_budget"], 1000);

    let rogue = &apps[2];
    assert_eq!(rogue["risk"]["tier"], "red");
    assert_eq!(rogue["risk"]["reasons"], serde_json::json!(["connector `pastebin` is not approved", "quarantined"]));
    assert_eq!(rogue["trust"]["score"], 45);
    let factors: Vec<(&str, i64)> = rogue["trust"]["factors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap(), f["points"].as_i64().unwrap()))
        .collect();
    assert_eq!(factors, [("lifecycle", -40), ("data-classes", 0), ("unapproved-connectors", -15)]);
}

#[test]
fn catalog_text_shows_reasons_factors_fingerprints_and_overrides() {
    let file = TempFile::new("yaml", &catalog_policy());
    let out = guardrail(&["catalog", file.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let digest = digest_of(KEY);
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(text.starts_with("revision 42: 3 apps\n"), "{text}");
    assert!(text.contains("expense-bot  risk red (data class `confidential`)  trust 85"), "{text}");
    assert!(text.contains(&format!("api keys: 1 ({})", &hex[..8])), "{text}");
    assert!(!text.contains(hex) && !text.contains(KEY), "{text}");
    assert!(
        text.contains("quota: 600/1m burst 600, daily budget 5000; override until 2030-01-01T00:00:00Z (quarter close): daily budget 5000"),
        "{text}"
    );
    assert!(!text.contains("long gone"), "expired overrides are not in force: {text}");
    assert!(text.contains("intern-demo  risk green  trust 90"), "{text}");
    assert!(text.contains("rogue  risk red (connector `pastebin` is not approved; quarantined)  trust 45"), "{text}");
    assert!(text.contains("connectors: crm, pastebin (not approved)"), "{text}");
    assert!(
        text.contains(
            "trust factors: lifecycle -40 (quarantined); data-classes +0 (none); unapproved-connectors -15 (pastebin)"
        ),
        "{text}"
    );
}

#[test]
fn catalog_refuses_an_invalid_policy_like_check() {
    let text = valid_policy().replace("    lifecycle: published\n", "    lifecycle: retired\n");
    let file = TempFile::new("yaml", &text);
    let out = guardrail(&["catalog", file.arg(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    assert!(stderr(&out).contains("apps[0].lifecycle"), "{}", stderr(&out));
}

// === export ===

#[test]
fn export_prints_compact_json_on_one_line() {
    let file = TempFile::new("yaml", &valid_policy());
    let out = guardrail(&["export", file.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(!text.contains(": ") && !text.contains(", "), "compact: {text}");
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("not JSON ({e}): {text}"),
    };
    assert_eq!(value["apiVersion"], "guardrail/v1");
    assert_eq!(value["revision"], 42);
    assert_eq!(value["apps"][0]["id"], "expense-bot");
    assert_eq!(value["apps"][0]["api_keys"][0], digest_of(KEY).as_str());
    assert_eq!(value["tiers"]["sandbox"]["rate"]["per"], "1m");
    assert_eq!(value["rules"][0]["when"], "request.method == \"DELETE\"");
}

#[test]
fn export_refuses_an_invalid_policy() {
    let text = valid_policy().replace("    lifecycle: published\n", "    lifecycle: retired\n");
    let file = TempFile::new("yaml", &text);
    let out = guardrail(&["export", file.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty(), "no JSON for an invalid policy");
    assert!(stderr(&out).starts_with(&format!("{}:", file.arg())), "{}", stderr(&out));
    assert!(stderr(&out).contains("apps[0].lifecycle"), "{}", stderr(&out));
}

#[test]
fn tls_flags_that_cannot_work_are_refused_naming_the_flag() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.yaml");
    let missing = std::env::temp_dir().join(format!("guardrail-cli-no-cert-{}.pem", std::process::id()));
    let missing = missing.to_str().unwrap_or_default();
    let not_pem = TempFile::new("pem", "just text\n");
    let cert_only = TempFile::new("pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let serve = |tls: &[&str]| {
        let mut args = vec!["serve", "--policy", policy, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(tls);
        guardrail(&args)
    };
    let cases: &[(&str, Output, i32, &str)] = &[
        ("missing certificate", serve(&["--tls-cert", missing, "--tls-key", not_pem.arg()]), 1, "--tls-cert "),
        (
            "a key that is no PEM key",
            serve(&["--tls-cert", cert_only.arg(), "--tls-key", not_pem.arg()]),
            1,
            "--tls-key ",
        ),
        (
            "a certificate that is no PEM certificate",
            serve(&["--tls-cert", not_pem.arg(), "--tls-key", not_pem.arg()]),
            1,
            "holds no PEM certificate",
        ),
        ("a certificate without its key", serve(&["--tls-cert", cert_only.arg()]), 2, "--tls-key"),
        ("a client CA without a certificate", serve(&["--tls-client-ca", cert_only.arg()]), 2, "--tls-cert"),
        (
            "a client certificate without a CA",
            guardrail(&["status", "--tls-cert", cert_only.arg(), "--tls-key", not_pem.arg()]),
            2,
            "--tls-ca",
        ),
        ("https without a CA", guardrail(&["status", "--server", "https://127.0.0.1:1"]), 1, "needs --tls-ca"),
        (
            "a CA with plain http",
            guardrail(&["status", "--server", "http://127.0.0.1:1", "--tls-ca", cert_only.arg()]),
            2,
            "plain http://",
        ),
        // The HTTP port's flags (`--http-tls-…`) name themselves.
        (
            "missing HTTP certificate",
            serve(&["--http", "127.0.0.1:0", "--http-tls-cert", missing, "--http-tls-key", not_pem.arg()]),
            1,
            "--http-tls-cert ",
        ),
        (
            "an HTTP key that is no PEM key",
            serve(&["--http", "127.0.0.1:0", "--http-tls-cert", cert_only.arg(), "--http-tls-key", not_pem.arg()]),
            1,
            "--http-tls-key ",
        ),
        (
            "an HTTP certificate without --http",
            serve(&["--http-tls-cert", cert_only.arg(), "--http-tls-key", not_pem.arg()]),
            2,
            "--http",
        ),
        (
            "an HTTP client CA without an HTTP certificate",
            serve(&["--http", "127.0.0.1:0", "--http-client-ca", cert_only.arg()]),
            2,
            "--http-tls-cert",
        ),
        (
            "approve over https without a CA",
            guardrail(&["approve", "req-1", "--server", "https://127.0.0.1:1", "--token-file", not_pem.arg()]),
            2,
            "https:// needs --tls-ca",
        ),
        (
            "approve with a CA over plain http",
            guardrail(&[
                "approve",
                "req-1",
                "--server",
                "http://127.0.0.1:1",
                "--tls-ca",
                cert_only.arg(),
                "--token-file",
                not_pem.arg(),
            ]),
            2,
            "--tls-ca is for https://",
        ),
    ];
    for (why, out, code, want) in cases {
        assert_eq!(out.status.code(), Some(*code), "{why}: {}", stderr(out));
        assert!(stderr(out).contains(want), "{why}: stderr should mention `{want}`: {}", stderr(out));
    }
}

// === check: warnings ===

/// Each case: a change to the valid policy (`from` → `to`) that keeps it valid, and the
/// `path: message` expected as a warning on the line of the `# <-` marker.
#[test]
fn check_warns_about_what_a_reviewer_would() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "an app connector that is not approved",
            "    connectors: [hr-api]\n",
            "    connectors: [hr-api, billing] # <-\n",
            "apps[0].connectors[1]: connector `billing` is not in connectors.approved: the filter refuses the app's requests through it (403 connector-not-approved)",
        ),
        (
            "a region one letter away from the one used elsewhere",
            "    region: eu-west-1\ndatasets:\n",
            "    region: eu-wst-1 # <-\ndatasets:\n",
            "apps[1].region: region `eu-wst-1` is used nowhere else; did you mean `eu-west-1`?",
        ),
        (
            "a lower-case method",
            "    when: request.method == \"DELETE\"\n",
            "    when: request.method in ['GET', 'delete'] # <-\n",
            "rules[0].when: rule `no-deletes`: request.method is compared with 'delete', which matches no request: methods reach rules in upper case, so the comparison never holds; write 'DELETE'",
        ),
        (
            "an expired override",
            "        expires_at: \"2030-01-01T00:00:00Z\"\n",
            "        expires_at: \"2026-01-01T00:00:00Z\" # <-\n",
            "apps[0].quota_overrides[0].expires_at: the override expired at 2026-01-01T00:00:00Z: it is ignored; remove it, or move expires_at",
        ),
    ];
    let digest = digest_of(KEY);
    for (why, from, to, want) in cases {
        assert!(VALID.contains(from), "{why}: the valid policy should contain {from:?}");
        let text = VALID.replacen(from, to, 1).replace("DIGEST", &digest);
        let line = text.lines().position(|l| l.contains("# <-")).map(|i| i + 1).unwrap_or_default();
        let file = TempFile::new("yaml", &text);
        let out = guardrail(&["check", file.arg()]);
        assert_eq!(out.status.code(), Some(0), "{why}: only warnings: {}", stderr(&out));
        assert_eq!(stderr(&out), format!("{}:{line}: warning: {want}\n", file.arg()), "{why}");
        assert_eq!(
            stdout(&out),
            format!("ok: {} (revision 42, 2 apps, 1 dataset, 1 rule; 1 warning)\n", file.arg()),
            "{why}"
        );
        let strict = guardrail(&["check", "--strict", file.arg()]);
        assert_eq!(strict.status.code(), Some(1), "{why}: --strict makes warnings errors");
        assert!(stdout(&strict).is_empty(), "{why}: no `ok` with --strict: {}", stdout(&strict));
        assert_eq!(
            stderr(&strict),
            format!(
                "{file}:{line}: warning: {want}\n{file}: 1 warning, which --strict makes errors\n",
                file = file.arg()
            ),
            "{why}"
        );
    }
    // A clean policy passes --strict.
    let file = TempFile::new("yaml", &valid_policy());
    let out = guardrail(&["check", "--strict", file.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn the_examples_warn_only_where_they_mean_to() {
    let example = |p: &str| format!("{}/../examples/{p}", env!("CARGO_MANIFEST_DIR"));
    let demo = example("policy.yaml");
    let out = guardrail(&["check", "--strict", &demo]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "the demo policy has no warnings: {}", stderr(&out));
    // RetailCo's partner-insights lists an unapproved connector on purpose (its README's row
    // "a third-party connector is not approved").
    let retailco = example("retailco/policy.yaml");
    let out = guardrail(&["check", &retailco]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(": warning: apps[5].connectors[0]: connector `partner-analytics` is not in connectors.approved"),
        "{err}"
    );
}

// === mint ===

#[test]
fn mint_takes_dataset_scopes_only() {
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo/issuer-key.jwk.json");
    let mint = |scopes: &[&str]| {
        let mut args = vec!["mint", "--key", key, "--app", "pos-dashboard", "--ttl", "5m"];
        for s in scopes {
            args.extend(["--scope", s]);
        }
        guardrail(&args)
    };
    let cases: &[(&[&str], &str)] = &[
        (&["payments"], "error: --scope payments: a scope names a dataset as `dataset:<id>`; write --scope dataset:payments"),
        (
            &["dataset:payments", "customers-eu"],
            "error: --scope customers-eu: a scope names a dataset as `dataset:<id>`; write --scope dataset:customers-eu",
        ),
        (&["dataset:"], "error: --scope dataset: needs a dataset id"),
    ];
    for (scopes, want) in cases {
        let out = mint(scopes);
        assert_eq!(out.status.code(), Some(2), "{scopes:?}: a usage error: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{scopes:?}: no token");
        assert!(stderr(&out).lines().any(|l| l.starts_with(want)), "{scopes:?}: {}", stderr(&out));
    }
    let out = mint(&["dataset:payments", "dataset:customers-eu"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).matches('.').count(), 2, "one JWT: {}", stdout(&out));
}

// === test ===

#[test]
fn test_says_how_many_cases_left_the_connector_unchecked() {
    let policy = TempFile::new("yaml", &valid_policy());
    let run = |cases: &str| {
        let file = TempFile::new("yaml", cases);
        let out = guardrail(&["test", policy.arg(), file.arg()]);
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        stdout(&out).lines().last().unwrap_or_default().to_string()
    };
    let cases = "cases:
  - name: with its connector
    request: {app: expense-bot, url: /x, connector: hr-api}
    expect: {allow: true}
  - name: without a connector
    request: {app: intern-demo, url: /x}
    expect: {allow: true}
  - name: nor this one
    request: {app: expense-bot, url: /y}
    expect: {allow: true}
";
    assert_eq!(
        run(cases),
        "3 passed, 0 failed; 2 did not name a connector, so the connector check was not exercised for their requests (give `connector:` in the case or in `defaults`)"
    );
    let one = "cases:\n  - name: one\n    request: {app: expense-bot, url: /x}\n    expect: {allow: true}\n";
    assert_eq!(
        run(one),
        "1 passed, 0 failed; 1 did not name a connector, so the connector check was not exercised for its requests (give `connector:` in the case or in `defaults`)"
    );
    let named = "defaults: {connector: hr-api}\ncases:\n  - name: one\n    request: {app: expense-bot, url: /x}\n    expect: {allow: true}\n";
    assert_eq!(run(named), "1 passed, 0 failed", "a connector from `defaults` counts");
}
