//! `guardrail explain`: one request through the same core `decide()` the filter runs, with a
//! readable trace of every check and rule, the verdict, and the response Envoy would send.
//!
//! ```text
//! guardrail explain examples/retailco/policy.yaml --api-key demo-crm-console-… \
//!     --method GET --url https://api.retailco.example/customers/42 --connector upstream
//! ```
//!
//! The request is judged on a fresh quota store (every bucket full) at `--at` (default: now). The
//! credential is sent the way a client sends it (`--api-key` in the policy's `api_key_header`,
//! `--token` as `Authorization: Bearer`), or, with `--app ID`, assumed without one
//! ([`decide_as`]: for explaining and testing only; the filter has no such path). Whatever the
//! verdict, the exit code is 0; it is 1 for an invalid policy and 2 for a wrong command line.
//!
//! The pieces `guardrail test` shares live here too: [`Probe`] (a request as owned data), [`judge`],
//! [`split_url`] and the rendering of a verdict.

use crate::log::{now_secs, rfc3339_secs};
use crate::UsageError;
use anyhow::Context;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::decide::{decide_as, decide_traced, Decision, Event, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::problem::{
    access_log_line, denial_headers, denial_log_line, event_log_line, problem_body, ratelimit_headers, LineContext,
};
use guardrail_core::quota::{ensure_keys, MemoryStore};
use guardrail_core::raw::Classification;
use guardrail_core::time::{parse_rfc3339, NANOS_PER_SEC};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The request id `explain` uses (Envoy's would be a UUID); it is the problem's `instance`.
const REQUEST_ID: &str = "explain";

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("identity")
        .required(true)
        .multiple(true)
        .args(["app", "api_key", "token", "anonymous"])
))]
pub struct Args {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
    /// Judge the request as this app without a credential (the credential step is skipped and
    /// reported as assumed; a --token still counts for JIT and rules).
    #[arg(long, conflicts_with_all = ["api_key", "anonymous"])]
    app: Option<String>,
    /// Send this API key, in the policy's `api_key_header`.
    #[arg(long, conflicts_with = "anonymous", allow_hyphen_values = true)]
    api_key: Option<String>,
    /// Send this JWT as `Authorization: Bearer` (with --api-key or --app: the JIT credential).
    #[arg(long, conflicts_with = "anonymous")]
    token: Option<String>,
    /// Send no credential (shows how an anonymous request is refused).
    #[arg(long)]
    anonymous: bool,
    /// HTTP method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// The request URL (`https://host/path?query`), or an origin-form path (`/path`, host from a
    /// `host` header). The path is taken exactly as written: no normalisation before Guardrail's.
    #[arg(long)]
    url: String,
    /// A request header `name: value`; repeat for several.
    #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// The Envoy cluster the request is routed to (its upstream connector).
    #[arg(long, value_name = "CLUSTER")]
    connector: Option<String>,
    /// This gateway's region (default: the policy's `settings.gateway_region`).
    #[arg(long, value_name = "REGION")]
    gateway_region: Option<String>,
    /// The time of the request, RFC 3339 (default: now).
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let now_secs = match &args.at {
        Some(at) => parse_at(at).map_err(|e| UsageError(format!("--at: {e}")))?,
        None => now_secs(),
    };
    let mut headers = Vec::with_capacity(args.headers.len());
    for h in &args.headers {
        headers.push(parse_header(h).map_err(|e| UsageError(format!("--header {h:?}: {e}")))?);
    }
    let Some((_, doc)) = crate::policy::load_or_report(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let policy = doc.policy;
    split_url(&args.url).map_err(|e| UsageError(format!("--url {:?}: {e}", args.url)))?;
    check_method(&args.method).map_err(|e| UsageError(format!("--method: {e}")))?;
    let credential = match (&args.app, &args.api_key) {
        (Some(app), _) => Credential::App(app.clone()),
        (None, Some(key)) => Credential::ApiKey(key.clone()),
        (None, None) => Credential::None,
    };
    let probe = Probe::new(
        &policy,
        credential,
        args.token.clone(),
        &args.method,
        &args.url,
        headers,
        args.connector.clone(),
        args.gateway_region.clone(),
    )
    .map_err(UsageError)?;
    let mut store = fresh_store(&policy)?;
    let mut tokens = TokenCache::new(16);
    let now_ns = secs_to_ns(now_secs);
    let decision = judge(&policy, &probe, now_ns, &mut store, &mut tokens);

    let mut out = std::io::stdout().lock();
    let report = report(&policy, &probe, &decision, now_secs);
    out.write_all(report.as_bytes()).context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

// === Probe: a request as owned data ===

/// Who the request claims to be, besides an optional bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Assumed app (no credential is sent; `decide_as`).
    App(String),
    /// An API key, sent in the policy's `api_key_header`.
    ApiKey(String),
    /// Nothing besides what the headers (and the bearer token) carry.
    None,
}

/// One request to judge, owning what [`Request`] borrows.
#[derive(Debug, Clone)]
pub struct Probe {
    pub credential: Credential,
    /// The method, exactly as sent (Envoy passes it on as the client wrote it).
    pub method: String,
    /// The `:authority` (host and optional port), as sent.
    pub host: String,
    /// The `:path` (path and query), exactly as sent.
    pub path: String,
    /// Lower-case names, including the credential headers.
    pub headers: Vec<(String, String)>,
    pub connector: Option<String>,
    pub gateway_region: Option<String>,
    /// `x-guardrail-*` headers the request carried, which the filter removes before judging.
    pub dropped: Vec<String>,
}

impl Probe {
    /// Builds the request: host and path from `url` (a `host` header overrides the URL's host,
    /// as with curl), the credential headers added, client-sent `x-guardrail-*` headers dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: &CompiledPolicy,
        credential: Credential,
        token: Option<String>,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        connector: Option<String>,
        gateway_region: Option<String>,
    ) -> Result<Probe, String> {
        let (mut host, path) = split_url(url)?;
        let mut kept = Vec::with_capacity(headers.len() + 2);
        let mut dropped = Vec::new();
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            if name == "host" {
                host = value;
            } else if name.starts_with("x-guardrail-") && name != policy.settings.token_header {
                dropped.push(name);
            } else {
                kept.push((name, value));
            }
        }
        if let Credential::ApiKey(key) = &credential {
            kept.push((policy.settings.api_key_header.clone(), key.clone()));
        }
        if let Some(token) = token {
            let value = if policy.settings.token_header == "authorization" { format!("Bearer {token}") } else { token };
            kept.push((policy.settings.token_header.clone(), value));
        }
        check_method(method)?;
        Ok(Probe {
            credential,
            method: method.to_string(),
            host,
            path,
            headers: kept,
            connector,
            gateway_region,
            dropped,
        })
    }

    /// The gateway region in force and where it comes from.
    fn gateway_region<'a>(&'a self, policy: &'a CompiledPolicy) -> (Option<&'a str>, &'static str) {
        match (&self.gateway_region, &policy.settings.gateway_region) {
            (Some(r), _) => (Some(r), "given"),
            (None, Some(r)) => (Some(r), "settings.gateway_region"),
            (None, None) => (None, "unset"),
        }
    }
}

/// A fresh in-memory quota store with every app's bucket full, as a newly configured Envoy has.
pub fn fresh_store(policy: &CompiledPolicy) -> anyhow::Result<MemoryStore> {
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str()))
        .map_err(|e| anyhow::anyhow!("preparing the quota store: {e}"))?;
    Ok(store)
}

/// Runs the request through core's traced `decide` (or `decide_as` for an assumed app).
pub fn judge<'p>(
    policy: &'p CompiledPolicy,
    probe: &Probe,
    now_ns: u64,
    store: &mut MemoryStore,
    tokens: &mut TokenCache,
) -> Decision<'p> {
    let request = Request {
        method: &probe.method,
        host: &probe.host,
        path: &probe.path,
        connector: probe.connector.as_deref(),
        request_id: REQUEST_ID,
        headers: &probe.headers,
        gateway_region: probe.gateway_region.as_deref(),
        fleet: None,
        peer: None,
    };
    match &probe.credential {
        Credential::App(id) => decide_as(policy, id, &request, now_ns, store, tokens),
        Credential::ApiKey(_) | Credential::None => decide_traced(policy, &request, now_ns, store, tokens),
    }
}

// === Parsing the command line's pieces ===

/// `https://host:port/path?query` → (`host:port`, `/path?query`); `/path` → (``, `/path`).
/// The path is kept byte for byte (dot segments, escapes): judging its spellings is the point.
/// The fragment, which clients never send, is dropped.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let url = url.trim();
    if url.starts_with('/') {
        return Ok((String::new(), without_fragment(url).to_string()));
    }
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            url.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).and_then(|_| url.get(scheme.len()..))
        })
        .ok_or("expected an http(s) URL like https://api.example/path, or a path like /path")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // userinfo@host: never sent as the authority.
    let host = authority.rsplit('@').next().unwrap_or(authority);
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    let path = without_fragment(path);
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Ok((host.to_string(), path))
}

fn without_fragment(path: &str) -> &str {
    path.split('#').next().unwrap_or(path)
}

/// An HTTP method is a token (RFC 9110): `GET`, `PATCH`, `PROPFIND`.
pub fn check_method(method: &str) -> Result<(), String> {
    if method.is_empty() || !method.bytes().all(is_token_char) {
        return Err(format!("{method:?} is not an HTTP method"));
    }
    Ok(())
}

/// `name: value` (or `name:value`) → lower-case name and trimmed value.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once(':').ok_or("expected `name: value`")?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(is_token_char) {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_string()))
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An RFC 3339 time as Unix seconds, not before 1970.
pub fn parse_at(text: &str) -> Result<i64, String> {
    let secs = parse_rfc3339(text)?;
    if secs < 0 {
        return Err(format!("{text} is before 1970"));
    }
    Ok(secs)
}

pub fn secs_to_ns(secs: i64) -> u64 {
    u64::try_from(secs).unwrap_or(0).saturating_mul(NANOS_PER_SEC)
}

// === Rendering ===

/// The verdict in one line: `ALLOW` or `DENY <status> <code> (rule R): detail`.
pub fn verdict_line(decision: &Decision<'_>) -> String {
    match &decision.denial {
        None => "ALLOW".to_string(),
        Some(d) => {
            let rule = d.rule.as_deref().map_or(String::new(), |r| format!(" (rule {r})"));
            format!("DENY {} {}{rule}: {}", d.code.status(), d.code.as_str(), d.detail)
        }
    }
}

/// The trace lines of `decide`, without its own closing verdict line (the caller prints a fuller one).
pub fn trace_lines<'d>(decision: &'d Decision<'_>) -> impl Iterator<Item = &'d str> {
    decision.trace.iter().map(String::as_str).filter(|line| line.split_whitespace().next() != Some("verdict"))
}

/// One line per event (shadow rule, soft limit), in the trace's layout.
pub fn event_lines(decision: &Decision<'_>) -> Vec<String> {
    decision
        .events
        .iter()
        .map(|e| match e {
            Event::Shadow { rule, detail, error: None } => format!(
                "{:<10} rule `{rule}` would deny: {detail} (mode: shadow: logged and counted, not enforced)",
                "shadow"
            ),
            Event::Shadow { rule, error: Some(e), .. } => format!(
                "{:<10} rule `{rule}` failed to evaluate ({e}) (mode: shadow: logged and counted, not enforced)",
                "shadow"
            ),
            Event::SoftLimit { quota } => format!(
                "{:<10} usage passed soft_limit_ratio of the {quota} quota (a warning in the decision log)",
                "soft-limit"
            ),
        })
        .collect()
}

/// The connector step of a trace made without `--connector`.
const NO_CONNECTOR: &str =
    "not checked: give --connector CLUSTER (the Envoy cluster the route sends to) to check it against the app's connectors";

fn reason_phrase(status: u32) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The whole `explain` report.
fn report(policy: &CompiledPolicy, probe: &Probe, decision: &Decision<'_>, now_secs: i64) -> String {
    let mut s = String::new();
    let host = if probe.host.is_empty() { "none".to_string() } else { format!("`{}`", probe.host) };
    s.push_str(&format!("{} {} (host {host})\n", probe.method, probe.path));
    let bearer = probe.headers.iter().any(|(k, _)| *k == policy.settings.token_header);
    let who = match (&probe.credential, bearer) {
        (Credential::App(id), false) => format!("as app `{id}` (assumed, no credential sent)"),
        (Credential::App(id), true) => format!("as app `{id}` (assumed) with a bearer token"),
        (Credential::ApiKey(_), false) => format!("with an API key in `{}`", policy.settings.api_key_header),
        (Credential::ApiKey(_), true) => {
            format!("with an API key in `{}` and a bearer token", policy.settings.api_key_header)
        }
        (Credential::None, false) => "without a credential".to_string(),
        (Credential::None, true) => "with a bearer token (no API key)".to_string(),
    };
    let connector = probe.connector.as_deref().map_or("not given".to_string(), |c| format!("`{c}`"));
    let (region, region_from) = probe.gateway_region(policy);
    let region = region.map_or("unset".to_string(), |r| format!("{r} ({region_from})"));
    s.push_str(&format!("  {who}; connector {connector}; gateway region {region}; at {}\n", rfc3339_secs(now_secs)));
    for name in &probe.dropped {
        s.push_str(&format!("  header `{name}` dropped: the filter removes client-sent x-guardrail-* headers\n"));
    }
    s.push('\n');
    for line in trace_lines(decision) {
        // Without --connector decide() sees what Envoy passes for a local reply: no cluster.
        if probe.connector.is_none() && line.split_whitespace().next() == Some("connector") {
            s.push_str(&format!("{:<10} {NO_CONNECTOR}\n", "connector"));
            continue;
        }
        s.push_str(line);
        s.push('\n');
    }
    for line in event_lines(decision) {
        s.push_str(&line);
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&verdict_line(decision));
    s.push('\n');

    let app = decision.app.map(|a| a.id.as_str());
    match &decision.denial {
        Some(denial) => {
            let status = denial.code.status();
            s.push_str(&format!(
                "\nEnvoy answers (the request never reaches an upstream):\n  HTTP/1.1 {status} {}\n",
                reason_phrase(status)
            ));
            for (name, value) in denial_headers(denial) {
                s.push_str(&format!("  {name}: {value}\n"));
            }
            s.push_str(&format!("\n  {}\n", problem_body(denial, REQUEST_ID, app)));
        }
        None => {
            let upstream = probe
                .connector
                .as_deref()
                .map_or("the cluster its route names (not checked: no --connector)".to_string(), |c| format!("`{c}`"));
            s.push_str(&format!("\nEnvoy forwards the request to {upstream} with:\n"));
            if let Some(app) = app {
                s.push_str(&format!("  x-guardrail-app: {app}\n"));
            }
            if let Some(tier) = decision.tier {
                s.push_str(&format!("  x-guardrail-tier: {tier}\n"));
            }
            if let Some((limits, usage)) = &decision.quota {
                s.push_str("and adds to the response:\n");
                for (name, value) in ratelimit_headers(limits, usage) {
                    s.push_str(&format!("  {name}: {value}\n"));
                }
            }
        }
    }
    let cx = LineContext {
        request_id: REQUEST_ID,
        revision: &policy.revision,
        method: &probe.method,
        host: &probe.host,
        path: &probe.path,
        dataset: decision.dataset.map(|d| d.id.as_str()),
        connector: probe.connector.as_deref(),
    };
    let mut log = Vec::new();
    if let Some(denial) = &decision.denial {
        log.push(denial_log_line(denial, app, &cx));
    }
    for event in &decision.events {
        log.push(event_log_line(event, app, &cx));
    }
    if let (None, Some(app), Some(ds)) = (&decision.denial, app, decision.dataset) {
        if matches!(ds.classification, Classification::Confidential | Classification::Regulated) {
            let jti = decision.token.as_ref().and_then(|t| t.claims.get("jti")).and_then(|j| j.as_str());
            log.push(access_log_line(app, ds.classification.as_str(), jti, &cx));
        }
    }
    if !log.is_empty() {
        s.push_str("\nDecision log:\n");
        for line in log {
            s.push_str(&format!("  {line}\n"));
        }
    }
    s
}

/// A path relative to a file's directory (as paths inside a case file are).
pub fn relative_to(file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    file.parent().map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (host, path) of a URL, or `Err(())`.
    type Split<'a> = Result<(&'a str, &'a str), ()>;

    #[test]
    fn urls_keep_their_spelling() {
        let cases: &[(&str, Split<'_>, &str)] = &[
            ("https://api.x/customers/42", Ok(("api.x", "/customers/42")), "plain"),
            ("HTTP://api.x:8080/a?b=1#frag", Ok(("api.x:8080", "/a?b=1")), "port, query, fragment"),
            ("https://api.x", Ok(("api.x", "/")), "no path"),
            ("https://api.x?q", Ok(("api.x", "/?q")), "query only"),
            ("https://u:p@api.x/a", Ok(("api.x", "/a")), "userinfo is not the host"),
            ("https://api.x/a/../b%2Fc//d", Ok(("api.x", "/a/../b%2Fc//d")), "kept as written"),
            ("/customers/%63", Ok(("", "/customers/%63")), "origin form"),
            ("ftp://api.x/a", Err(()), "other scheme"),
            ("https:///a", Err(()), "no host"),
            ("api.x/a", Err(()), "no scheme"),
        ];
        for (url, want, why) in cases {
            let got = split_url(url);
            let got = got.as_ref().map(|(h, p)| (h.as_str(), p.as_str())).map_err(|_| ());
            assert_eq!(got, *want, "{why}: {url}");
        }
    }

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header("X-Team: crm "), Ok(("x-team".to_string(), "crm".to_string())));
        assert_eq!(
            parse_header("authorization:Bearer a:b"),
            Ok(("authorization".to_string(), "Bearer a:b".to_string()))
        );
        assert!(parse_header("no colon").is_err(), "no colon");
        assert!(parse_header(": v").is_err(), "empty name");
        assert!(parse_header("a b: v").is_err(), "space in name");
    }
}
