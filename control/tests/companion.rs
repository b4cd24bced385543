//! The companion as users run it: `serve` and `status` over a real socket, `keygen` and `mint`
//! round trips whose tokens the core verifies.

// A failing test is a panic; the workspace denies these lints for the code under test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Long enough for anything that should happen; a broken test fails after it instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

// === Helpers ===

fn guardrail(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guardrail"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run guardrail {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("guardrail-companion-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
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

fn policy(revision: u32, jwks: &str) -> String {
    format!(
        "\
apiVersion: guardrail/v1
kind: Policy
revision: {revision}
settings:
  gateway_region: eu-west-1
  jit_max_ttl: 10m
  identity:
    jwt:
      - issuer: https://id.example
        audiences: [api]
        jwks: {{keys: [{jwks}]}}
tiers:
  std: {{rate: {{requests: 100, per: 1s}}, daily_budget: 1000}}
connectors: {{approved: [upstream]}}
datasets:
  - {{id: patients, classification: regulated, allowed_regions: [eu-west-1], routes: [{{path_prefix: /patients}}]}}
apps:
  - {{id: analyst, environment: prod, tier: std, lifecycle: published, region: eu-west-1, data_classes: [regulated], connectors: [upstream]}}
  - {{id: leaker, environment: prod, tier: std, lifecycle: quarantined, region: eu-west-1, data_classes: [regulated], connectors: [upstream]}}
"
    )
}

/// A public JWK no test signs with (RFC 8037's example key).
const OTHER_JWK: &str =
    r#"{"kty":"OKP","crv":"Ed25519","kid":"other","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;

/// The lines a child writes to its stderr (piped), as they come.
fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    log
}

/// `guardrail serve` in the background, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(policy: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_guardrail"))
            .args(["serve", "--policy", s(policy), "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = log_lines(&mut child);
        let mut server = Server { child, addr: String::new(), log };
        let line = server.wait_for("serving policy revision");
        let addr = line.split(" on ").nth(1).and_then(|r| r.split(' ').next());
        server.addr = addr.unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        server
    }

    /// The next log line containing `what`.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {what:?} within {WAIT:?}"),
            }
        }
    }

    fn status(&self, json: bool) -> Output {
        let mut args = vec!["status", "--server", &self.addr];
        if json {
            args.push("--json");
        }
        guardrail(&args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `guardrail keygen`: (key file, public JWK printed).
fn keygen(dir: &TempDir, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = guardrail(&["keygen", "--out", s(&path), "--kid", "test-key"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    (path, text(&out.stdout).trim_end().to_string())
}

// === serve and status ===

#[test]
fn serve_refuses_an_invalid_policy_on_start() {
    let dir = TempDir::new();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy(1, OTHER_JWK).replace("tier: std", "tier: gold")).unwrap();
    let out = guardrail(&["serve", "--policy", s(&file), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:18: apps[0].tier: unknown tier `gold`", s(&file))), "{err}");
}

#[test]
fn serve_pushes_edits_and_status_shows_them() {
    let dir = TempDir::new();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy(1, OTHER_JWK)).unwrap();
    let server = Server::start(&file);

    let out = server.status(false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for want in ["serving revision 1", "last policy error: none", "nodes: 0 connected", "(no usage reported yet)"] {
        assert!(table.contains(want), "{want:?} in:\n{table}");
    }

    // An edit is picked up by the watcher thread. Written beside, then renamed over the file: a
    // write in place can be seen half done (truncated) when this thread stalls for longer than the
    // watcher's quiet window, as it did once under a loaded `./build.sh test`, and then the first
    // refusal is of the empty file (the watcher's own tests cover partial writes).
    let edit = |text: String| {
        let tmp = dir.join(".policy.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    edit(policy(2, OTHER_JWK));
    server.wait_for("policy revision 2 from");

    // An invalid edit is refused, named by file, line and field; revision 2 stays.
    edit(policy(3, OTHER_JWK).replace("lifecycle: published", "lifecycle: shipped"));
    let refused = server.wait_for("policy change refused:");
    assert!(refused.contains(&format!("{}:18: apps[0].lifecycle", s(&file))), "{refused}");
    server.wait_for("still serving revision 2");

    let out = server.status(true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["revision"], "2");
    assert!(status["last_policy_error"].as_str().unwrap().contains("apps[0].lifecycle"), "{status}");
    assert_eq!(status["nodes"], serde_json::json!([]));
}

#[test]
fn status_without_a_server_fails_clearly() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = guardrail(&["status", "--server", &format!("127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("cannot get the status from the companion at http://127.0.0.1:{port}")), "{err}");
}

// === keygen and mint ===

#[test]
fn keygen_writes_a_private_key_readable_by_its_owner_only() {
    let dir = TempDir::new();
    let (path, public) = keygen(&dir, "key.jwk.json");
    let private: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let public: serde_json::Value = serde_json::from_str(&public).unwrap();
    for field in ["kty", "crv", "kid", "alg", "x"] {
        assert_eq!(private[field], public[field], "{field}");
    }
    assert_eq!(
        (public["kty"].as_str(), public["crv"].as_str(), public["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    assert!(public.get("d").is_none(), "the public JWK has no private part");
    assert_eq!(private["d"].as_str().map(str::len), Some(43), "a 32-byte seed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let out = guardrail(&["keygen", "--out", s(&path)]);
    assert_eq!(out.status.code(), Some(2), "never over an existing key");
    assert!(text(&out.stderr).contains("add --force"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), serde_json::to_string_pretty(&private).unwrap() + "\n");

    let out = guardrail(&["keygen", "--out", s(&path), "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let replaced: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_ne!(replaced["x"], private["x"], "a new key");
    assert_eq!(replaced["kid"].as_str().map(str::len), Some(43), "kid defaults to the thumbprint");
}

/// `guardrail keygen` as SPEC.md gives it, with no flags: `guardrail keygen > key.jwk`.
#[test]
fn keygen_without_out_prints_the_private_key_and_the_public_one_apart() {
    let dir = TempDir::new();
    let out = guardrail(&["keygen"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let private: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(private["d"].as_str().map(str::len), Some(43), "stdout is the private JWK");
    let err = text(&out.stderr);
    let public: serde_json::Value = serde_json::from_str(err.lines().next().unwrap_or_default()).unwrap();
    assert!(public.get("d").is_none(), "stderr's first line is the public JWK: {err}");
    for field in ["kty", "crv", "kid", "alg", "x"] {
        assert_eq!(private[field], public[field], "{field}");
    }

    // What stdout held is a key `mint` signs with, and the policy trusts the public half.
    let key = dir.join("key.jwk");
    std::fs::write(&key, &out.stdout).unwrap();
    let minted =
        guardrail(&["mint", "--key", s(&key), "--app", "analyst", "--scope", "dataset:patients", "--ttl", "5m"]);
    assert_eq!(minted.status.code(), Some(0), "{}", text(&minted.stderr));
    let policy = guardrail_core::source::load_str(
        &policy(1, &public.to_string())
            .replace("issuer: https://id.example", "issuer: guardrail")
            .replace("[api]", "[guardrail]"),
    )
    .unwrap();
    let now =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap();
    let verified = guardrail_core::jwt::verify(&policy.issuers, text(&minted.stdout).trim_end(), now).unwrap();
    assert_eq!(verified.app, "analyst");
}

#[test]
fn mint_issues_tokens_the_policy_accepts() {
    let dir = TempDir::new();
    let (key, public) = keygen(&dir, "issuer.jwk.json");
    let file = dir.join("policy.yaml");
    let text_of_policy = policy(1, &public);
    std::fs::write(&file, &text_of_policy).unwrap();

    let out = guardrail(&[
        "mint",
        "--key",
        s(&key),
        "--policy",
        s(&file),
        "--app",
        "analyst",
        "--scope",
        "dataset:patients",
        "--ttl",
        "5m",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "only the token: {stdout}");
    let token = stdout.trim_end();

    let policy = guardrail_core::source::load_str(&text_of_policy).unwrap();
    let now =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap();
    let verified = guardrail_core::jwt::verify(&policy.issuers, token, now).unwrap();
    assert_eq!(verified.app, "analyst");
    assert_eq!(verified.scopes, ["dataset:patients"]);
    assert_eq!(verified.exp - verified.iat.unwrap(), 300);
    assert_eq!(verified.claims["aud"], "api");
    assert_eq!(verified.claims["iss"], "https://id.example");

    // Without a policy, issuer and audience are given.
    let out = guardrail(&[
        "mint",
        "--key",
        s(&key),
        "--app",
        "analyst",
        "--scope",
        "dataset:patients",
        "--issuer",
        "https://id.example",
        "--audience",
        "api",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let verified = guardrail_core::jwt::verify(&policy.issuers, text(&out.stdout).trim_end(), now).unwrap();
    assert_eq!(verified.exp - verified.iat.unwrap(), 900, "15m by default");

    // The command as SPEC.md gives it: iss and aud are `guardrail`, and stderr says so.
    let out = guardrail(&["mint", "--key", s(&key), "--app", "analyst", "--scope", "dataset:patients", "--ttl", "15m"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("iss `guardrail`, aud `guardrail`"), "{}", text(&out.stderr));
    let named_guardrail = guardrail_core::source::load_str(
        &text_of_policy.replace("issuer: https://id.example", "issuer: guardrail").replace("[api]", "[guardrail]"),
    )
    .unwrap();
    let verified = guardrail_core::jwt::verify(&named_guardrail.issuers, text(&out.stdout).trim_end(), now).unwrap();
    assert_eq!((verified.app.as_str(), verified.exp - verified.iat.unwrap()), ("analyst", 900));
    assert_eq!(verified.scopes, ["dataset:patients"]);
    assert!(guardrail_core::jwt::verify(&policy.issuers, text(&out.stdout).trim_end(), now).is_err(), "another issuer");
}

#[test]
fn mint_refuses_what_the_filter_would_refuse() {
    let dir = TempDir::new();
    let (key, public) = keygen(&dir, "issuer.jwk.json");
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy(1, &public)).unwrap();
    let base = ["mint", "--key", s(&key), "--policy", s(&file)];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--app", "leaker", "--scope", "dataset:patients"],
            "the filter refuses the app (app-not-active): app `leaker` is quarantined",
        ),
        (&["--app", "nobody"], "app `nobody` is not in the catalog"),
        (&["--app", "analyst", "--scope", "dataset:payroll"], "no dataset `payroll` in the policy"),
        (&["--app", "analyst", "--ttl", "1h"], "above the policy's settings.jit_max_ttl of 600 s"),
    ];
    for (args, want) in cases {
        let all: Vec<&str> = base.iter().chain(args.iter()).copied().collect();
        let out = guardrail(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("refusing to mint a token for app") && err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "no token");
    }

    // A key the policy does not trust.
    std::fs::write(&file, policy(1, OTHER_JWK)).unwrap();
    let out = guardrail(&["mint", "--key", s(&key), "--policy", s(&file), "--app", "analyst"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no issuer of the policy trusts this key (kid test-key)"),
        "{}",
        text(&out.stderr)
    );
}

// === console (serve --http) ===

/// `guardrail serve --http ADDR [extra…]` with its store in `dir`: the server and the console's
/// `host:port` from its log line.
fn start_console(dir: &TempDir, file: &Path, http: &str, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let store = format!("sqlite:{}", s(&dir.join("console.db")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_guardrail"))
        .args(["serve", "--policy", s(file), "--listen", "127.0.0.1:0", "--store", &store, "--http", http])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = log_lines(&mut child);
    (child, log)
}

fn console_port(log: &mpsc::Receiver<String>) -> u16 {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log.recv_timeout(left).unwrap_or_else(|_| panic!("no console line within {WAIT:?}"));
        if let Some(rest) = line.split("console on http://").nth(1) {
            let port = rest.trim_end_matches('/').rsplit(':').next().unwrap();
            return port.parse().unwrap();
        }
    }
}

/// One HTTP/1.1 GET to 127.0.0.1:`port`: (status, content type, body).
fn http_get(port: u16, target: &str, token: Option<&str>) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(conn, "GET {target} HTTP/1.1\r\nHost: console\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {head:?}"));
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn console_serves_the_catalog_api_and_problems_on_loopback() {
    let dir = TempDir::new();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy(7, OTHER_JWK)).unwrap();
    let (child, log) = start_console(&dir, &file, "127.0.0.1:0", &[]);
    let _kill = Kill(child);
    let port = console_port(&log);

    assert_eq!(http_get(port, "/healthz", None).0, 200);
    let (status, _, body) = http_get(port, "/readyz", None);
    assert_eq!((status, body.trim()), (200, "ready: revision 7"));

    let (status, ctype, body) = http_get(port, "/api/v1/apps", None);
    assert_eq!((status, ctype.as_str()), (200, "application/json"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["revision"], "7");
    assert_eq!(v["apps"][0]["id"], "analyst");
    assert_eq!(v["apps"][0]["risk"]["tier"], "red");
    assert_eq!(v["apps"][1]["id"], "leaker");
    assert_eq!(v["apps"][1]["risk"]["reasons"], serde_json::json!(["data class `regulated`", "quarantined"]));

    let (status, _, body) = http_get(port, "/api/v1/apps/leaker", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["app"]["lifecycle"], "quarantined");
    assert_eq!(v["app"]["trust"]["score"], 35);

    let (status, ctype, body) = http_get(port, "/api/v1/apps/nobody", None);
    assert_eq!((status, ctype.as_str()), (404, "application/problem+json"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "urn:guardrail:problem:not-found");
    assert!(v["detail"].as_str().unwrap().contains("nobody"), "{body}");

    // A huge query string is refused or ignored, never a crash: the console still answers.
    let huge = format!("/api/v1/apps?q={}", "x".repeat(200_000));
    let (status, _, _) = http_get(port, &huge, None);
    assert!(status == 200 || (400..500).contains(&status), "{status}");
    assert_eq!(http_get(port, "/healthz", None).0, 200);
}

#[test]
fn console_beyond_loopback_needs_a_token_file_then_the_token() {
    let dir = TempDir::new();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy(1, OTHER_JWK)).unwrap();
    let store = format!("sqlite:{}", s(&dir.join("refused.db")));
    let out = guardrail(&[
        "serve",
        "--policy",
        s(&file),
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store,
        "--http",
        "0.0.0.0:0",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("--http-token-file"), "{}", text(&out.stderr));

    let token = "console-token-0123456789abcdef";
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (child, log) = start_console(&dir, &file, "0.0.0.0:0", &["--http-token-file", s(&token_file)]);
    let _kill = Kill(child);
    let port = console_port(&log);
    assert_eq!(http_get(port, "/healthz", None).0, 200);
    assert_eq!(http_get(port, "/readyz", None).0, 200);
    let (status, ctype, body) = http_get(port, "/api/v1/apps", None);
    assert_eq!((status, ctype.as_str()), (401, "application/problem+json"), "{body}");
    assert_eq!(http_get(port, "/api/v1/apps", Some("wrong-token-0123456789")).0, 401);
    assert_eq!(http_get(port, "/api/v1/apps/nobody", None).0, 401);
    assert_eq!(http_get(port, "/api/v1/apps", Some(token)).0, 200);
}
