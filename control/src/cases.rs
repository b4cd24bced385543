//! `guardrail test POLICY CASES.yaml`: policy test cases (request → expected decision), run through
//! the same core `decide()` as the filter, like `opa test`. Exit 0 when every case passes, 1 on any
//! mismatch (with the decision trace) or an invalid case file, 2 for a wrong command line. The
//! summary says how many cases named no `connector`: their requests had no upstream cluster, as
//! a local reply has, so the connector check was not exercised for them.
//!
//! # Case file
//!
//! YAML (or JSON). Every mapping refuses unknown keys; an error names the file, line, case and
//! field. Paths in the file (`key:` of a minted token) are relative to the case file.
//!
//! ```yaml
//! at: "2026-11-29T10:00:00Z"        # optional: the clock for every case (default: now)
//! defaults:                         # optional: request fields every case starts from
//!   connector: upstream             #   the Envoy cluster the request is routed to
//!   gateway_region: eu-west-1       #   default: the policy's settings.gateway_region
//!   method: GET                     #   default GET
//!   headers: {x-team: crm}          #   merged with the case's own (the case's win)
//! cases:
//!   - name: EU customer data stays in the EU        # unique
//!     request:
//!       api_key: demo-us-promo-…    # or app: us-promo (assumed, no credential: explain/test only)
//!       token: eyJ…                 # or a token minted at test time (below); optional
//!       method: GET
//!       url: https://api.retailco.example/loyalty/42     # the path is judged as written
//!       headers: {x-team: crm}
//!       connector: upstream
//!       gateway_region: eu-west-1
//!     expect: {status: 403, code: residency-violation, rule: residency}
//!   - name: a JIT token opens the customer records
//!     request:
//!       api_key: demo-crm-console-…
//!       token:
//!         mint:                     # signed now (at the case's clock) with a private JWK
//!           key: ../demo/issuer-key.jwk.json
//!           app: crm-console
//!           scope: dataset:customer-profiles     # space-separated, optional
//!           ttl: 10m                # default 5m
//!           issued_ago: 0s          # optional: iat = clock - issued_ago (an expired token)
//!           issuer: …               # default: the policy's only issuer
//!           audience: …             # default: that issuer's first audience
//!       url: https://api.retailco.example/customers/42
//!     expect: {allow: true, dataset: customer-profiles}
//!   - name: the sandbox bucket holds 5
//!     repeat: 6                     # send the request 6 times; `expect` is about the last
//!     every: 1s                     # optional: the clock advances this much between them
//!     at: "2026-11-29T10:00:00Z"    # optional: this case's clock
//!     request: {app: promo-builder, url: /promotions}
//!     expect: {status: 429, code: quota-exceeded}
//! ```
//!
//! `expect` holds `allow: true`, or what a denial must match: any of `status`, `code`, `rule`,
//! `detail` (a substring of the detail), or `allow: false` (any denial). With either verdict it may
//! also name the identified `app`, the `dataset` reached and the `shadow` rules that fired (the
//! exact list; `[]` for none). Every case starts with a fresh quota store (every bucket full).

use crate::explain::{
    check_method, event_lines, fresh_store, judge, parse_at, relative_to, secs_to_ns, split_url, verdict_line,
    Credential, Probe,
};
use crate::jwk::SigningKey;
use crate::log::now_secs;
use anyhow::Context;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::decide::{Code, Decision};
use guardrail_core::duration::parse_duration;
use guardrail_core::jwt::TokenCache;
use guardrail_core::source::{in_document_terms, locate, read_file, to_json_value};
use guardrail_core::time::NANOS_PER_SEC;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// At most this many requests per case (`repeat`).
const MAX_REPEAT: u32 = 100_000;
/// A minted token's lifetime when the case gives none.
const DEFAULT_MINT_TTL_SECS: i64 = 300;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    policy: PathBuf,
    /// Case file (YAML or JSON); the format is in examples/retailco/README.md.
    cases: PathBuf,
    /// Print the decision trace of passing cases too.
    #[arg(long, short)]
    verbose: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let policy = match crate::policy::load(&args.policy) {
        Ok((_, doc)) => doc.policy,
        Err(lines) => {
            crate::policy::print_lines(&lines);
            return Ok(ExitCode::FAILURE);
        }
    };
    let now = now_secs();
    let cases = match load_cases(&args.cases, &policy, now) {
        Ok(cases) => cases,
        Err(lines) => {
            crate::policy::print_lines(&lines);
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut out = std::io::stdout().lock();
    let revision = if policy.revision.is_empty() { "unset" } else { policy.revision.as_str() };
    writeln!(
        out,
        "{} case{} from {} against {} (revision {revision})",
        cases.len(),
        if cases.len() == 1 { "" } else { "s" },
        args.cases.display(),
        args.policy.display()
    )
    .context("writing to standard output")?;
    let (mut passed, mut failed) = (0usize, 0usize);
    for case in &cases {
        let outcome = run_case(&policy, case)?;
        let report = render_outcome(case, &outcome, &args.cases, args.verbose);
        out.write_all(report.as_bytes()).context("writing to standard output")?;
        if outcome.problems.is_empty() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    writeln!(out, "\n{}", summary(passed, failed, &cases)).context("writing to standard output")?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `42 passed, 0 failed`, and how many cases named no connector: for those decide() had no
/// upstream cluster to check (as for a local reply), so a pass says nothing of the connector step.
fn summary(passed: usize, failed: usize, cases: &[Case]) -> String {
    let mut s = format!("{passed} passed, {failed} failed");
    let unnamed = cases.iter().filter(|c| c.probe.connector.is_none()).count();
    if unnamed > 0 {
        let so = if unnamed == 1 { "its" } else { "their" };
        s.push_str(&format!(
            "; {unnamed} did not name a connector, so the connector check was not exercised for {so} requests \
             (give `connector:` in the case or in `defaults`)"
        ));
    }
    s
}

// === The case file as written ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaseFile {
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    cases: Vec<RawCase>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    connector: Option<String>,
    #[serde(default)]
    gateway_region: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default)]
    every: Option<String>,
    request: RawRequest,
    expect: RawExpect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    /// A JWT (string) or `{mint: {...}}`: read by [`token`], which knows the field's path.
    #[serde(default)]
    token: Option<Value>,
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, Scalar>,
    #[serde(default)]
    connector: Option<String>,
    #[serde(default)]
    gateway_region: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMintToken {
    mint: RawMint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMint {
    key: String,
    app: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    issued_ago: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    allow: Option<bool>,
    #[serde(default)]
    status: Option<u32>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    dataset: Option<String>,
    #[serde(default)]
    shadow: Option<Vec<String>>,
}

/// A header value: YAML may write `x-count: 5` or `x-flag: true`; it is sent as text.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a header value (a string, number or boolean)")]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

// === Validated cases ===

/// One case, ready to run.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    /// Line of the case in the file, when known.
    pub line: Option<usize>,
    pub at_secs: i64,
    pub repeat: u32,
    pub every_ns: u64,
    pub probe: Probe,
    pub expect: Expect,
}

/// What a case expects of the decision on its last request.
#[derive(Debug, Default)]
pub struct Expect {
    pub allow: Option<bool>,
    pub status: Option<u32>,
    pub code: Option<Code>,
    pub rule: Option<String>,
    pub detail: Option<String>,
    pub app: Option<String>,
    pub dataset: Option<String>,
    pub shadow: Option<Vec<String>>,
}

impl Expect {
    fn wants_denial(&self) -> bool {
        self.allow == Some(false)
            || self.status.is_some()
            || self.code.is_some()
            || self.rule.is_some()
            || self.detail.is_some()
    }

    /// `ALLOW` or `DENY 429 quota-exceeded (rule rate)`, with `*` for what is left open.
    fn summary(&self) -> String {
        let mut s = if self.wants_denial() {
            let status = self.status.or(self.code.map(Code::status));
            let mut s = format!(
                "DENY {} {}",
                status.map_or("*".to_string(), |s| s.to_string()),
                self.code.map_or("*", Code::as_str)
            );
            if let Some(rule) = &self.rule {
                s.push_str(&format!(" (rule {rule})"));
            }
            if let Some(detail) = &self.detail {
                s.push_str(&format!(", detail containing {detail:?}"));
            }
            s
        } else {
            "ALLOW".to_string()
        };
        let mut extra = Vec::new();
        if let Some(app) = &self.app {
            extra.push(format!("app {app}"));
        }
        if let Some(ds) = &self.dataset {
            extra.push(format!("dataset {ds}"));
        }
        if let Some(shadow) = &self.shadow {
            extra.push(format!("shadow [{}]", shadow.join(", ")));
        }
        if !extra.is_empty() {
            s.push_str(&format!("; {}", extra.join(", ")));
        }
        s
    }

    /// Every way the decision differs from the expectation (empty: the case passes).
    fn problems(&self, d: &Decision<'_>) -> Vec<String> {
        let mut out = Vec::new();
        match (&d.denial, self.wants_denial()) {
            (Some(_), false) if self.allow == Some(true) => {
                out.push("expected the request to be allowed".to_string());
            }
            (None, true) => out.push("expected the request to be denied".to_string()),
            (Some(denial), true) => {
                if let Some(status) = self.status {
                    if status != denial.code.status() {
                        out.push(format!("status: expected {status}, got {}", denial.code.status()));
                    }
                }
                if let Some(code) = self.code {
                    if code != denial.code {
                        out.push(format!("code: expected {}, got {}", code.as_str(), denial.code.as_str()));
                    }
                }
                if let Some(rule) = &self.rule {
                    if denial.rule.as_deref() != Some(rule.as_str()) {
                        out.push(format!("rule: expected {rule}, got {}", denial.rule.as_deref().unwrap_or("none")));
                    }
                }
                if let Some(detail) = &self.detail {
                    if !denial.detail.contains(detail.as_str()) {
                        out.push(format!("detail: expected it to contain {detail:?}"));
                    }
                }
            }
            _ => {}
        }
        if let Some(app) = &self.app {
            // The authenticated app, or the one a denial names (a token's app not in the catalog).
            let got = d.app_id();
            if got != Some(app.as_str()) {
                out.push(format!("app: expected {app}, got {}", got.unwrap_or("none")));
            }
        }
        if let Some(ds) = &self.dataset {
            let got = d.dataset.map(|a| a.id.as_str());
            if got != Some(ds.as_str()) {
                out.push(format!("dataset: expected {ds}, got {}", got.unwrap_or("none")));
            }
        }
        if let Some(want) = &self.shadow {
            let got: Vec<&str> = d.shadow_rules();
            if got != want.iter().map(String::as_str).collect::<Vec<_>>() {
                out.push(format!("shadow: expected [{}], got [{}]", want.join(", "), got.join(", ")));
            }
        }
        out
    }
}

// === Loading ===

/// Reads, parses and validates a case file. Errors are display lines: `file:line: [case N
/// (name): ]path: message`. Tokens to mint are minted here, at each case's clock.
pub fn load_cases(file: &Path, policy: &CompiledPolicy, now_secs: i64) -> Result<Vec<Case>, Vec<String>> {
    let text = read_file(file).map_err(|e| e.lines())?;
    let json = to_json_value(&text).map_err(|errors| {
        errors
            .0
            .iter()
            .map(|e| match e.line {
                Some(line) => format!("{}:{line}: {e}", file.display()),
                None => format!("{}: {e}", file.display()),
            })
            .collect::<Vec<_>>()
    })?;
    let loader = Loader { file, text: &text, json: &json, policy };
    // Straight from the YAML text (not from `json`), so that a key written twice is an error.
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    let raw: RawCaseFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        let mut message = inner.to_string();
        if let Some(loc) = inner.location() {
            let at = format!(" at line {} column {}", loc.line(), loc.column());
            message = message.replace(&at, "");
        }
        // serde_yaml_ng prefixes the message with the path of the node it is about (for an
        // unknown field, the mapping holding it): that path is the one to report.
        let mut about = Some(path.as_str());
        while let Some(p) = about.filter(|p| !p.is_empty()) {
            if let Some(rest) = message.strip_prefix(&format!("{p}: ")) {
                let (p, rest) = (p.to_string(), rest.to_string());
                return vec![loader.error_at(&p, inner.location().map(|l| l.line()), &in_document_terms(&rest))];
            }
            about = parent_path(p);
        }
        vec![loader.error_at(&path, inner.location().map(|l| l.line()), &in_document_terms(&message))]
    })?;
    loader.validate(raw, now_secs)
}

struct Loader<'a> {
    file: &'a Path,
    text: &'a str,
    json: &'a Value,
    policy: &'a CompiledPolicy,
}

impl Loader<'_> {
    /// An error line for the field at `path` (`cases[2].expect.code`), naming its case.
    fn error(&self, path: &str, message: &str) -> String {
        self.error_at(path, None, message)
    }

    /// As [`Loader::error`], at `line` when known (else the line of `path`).
    fn error_at(&self, path: &str, line: Option<usize>, message: &str) -> String {
        let file = self.file.display();
        let at = match line.or_else(|| locate(self.text, path)) {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        };
        let case = case_index(path).map(|i| {
            let name = self.json.pointer(&format!("/cases/{i}/name")).and_then(Value::as_str);
            match name {
                Some(name) => format!("case {} ({name:?}): ", i + 1),
                None => format!("case {}: ", i + 1),
            }
        });
        let path = if path.is_empty() { String::new() } else { format!("{path}: ") };
        format!("{at}: {}{path}{message}", case.unwrap_or_default())
    }

    /// Deserializes `value` (found at `base`), with errors at the path of the offending field.
    fn parse<T: DeserializeOwned>(&self, value: Value, base: &str) -> Result<T, String> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            let path = match (base, inner.as_str()) {
                (b, ".") => b.to_string(),
                ("", p) => p.to_string(),
                (b, p) => format!("{b}.{p}"),
            };
            self.error(&path, &e.into_inner().to_string())
        })
    }

    fn validate(&self, raw: RawCaseFile, now_secs: i64) -> Result<Vec<Case>, Vec<String>> {
        let mut errors = Vec::new();
        let file_at = match raw.at.as_deref().map(parse_at).transpose() {
            Ok(at) => at,
            Err(e) => {
                errors.push(self.error("at", &e));
                None
            }
        };
        if raw.cases.is_empty() {
            errors.push(self.error("cases", "no cases: list at least one"));
        }
        let mut cases = Vec::with_capacity(raw.cases.len());
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, case) in raw.cases.into_iter().enumerate() {
            let base = format!("cases[{i}]");
            if let Some(first) = names.insert(case.name.clone(), i) {
                errors.push(self.error(
                    &format!("{base}.name"),
                    &format!("the name of case {} again: names must be unique", first + 1),
                ));
            }
            match self.case(&base, case, &raw.defaults, file_at.unwrap_or(now_secs)) {
                Ok(case) => cases.push(case),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(cases)
        } else {
            Err(errors)
        }
    }

    fn case(&self, base: &str, raw: RawCase, defaults: &RawDefaults, file_at: i64) -> Result<Case, Vec<String>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: &str| {
            errors.push(self.error(&format!("{base}.{field}"), message));
        };
        if raw.name.trim().is_empty() {
            err("name", "a case needs a name");
        }
        let at_secs = match raw.at.as_deref().map(parse_at).transpose() {
            Ok(at) => at.unwrap_or(file_at),
            Err(e) => {
                err("at", &e);
                file_at
            }
        };
        let repeat = raw.repeat.unwrap_or(1);
        if !(1..=MAX_REPEAT).contains(&repeat) {
            err("repeat", &format!("must be 1 to {MAX_REPEAT}"));
        }
        let every_ns = match raw.every.as_deref().map(parse_duration).transpose() {
            Ok(every) => every.unwrap_or(0),
            Err(e) => {
                err("every", &e);
                0
            }
        };
        if raw.every.is_some() && raw.repeat.is_none() {
            err("every", "only means something with `repeat`");
        }

        let req = raw.request;
        if req.app.is_some() && req.api_key.is_some() {
            err("request", "give `app` (assumed) or `api_key` (sent), not both");
        }
        let credential = match (req.app, req.api_key) {
            (Some(app), _) => Credential::App(app),
            (None, Some(key)) => Credential::ApiKey(key),
            (None, None) => Credential::None,
        };
        let token = match req.token {
            None => None,
            Some(value) => match self.token(&format!("{base}.request.token"), value, at_secs) {
                Ok(token) => Some(token),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in defaults.headers.iter().chain(req.headers.iter()) {
            headers.insert(name.to_ascii_lowercase(), value.text());
        }
        for name in headers.keys() {
            if name.is_empty() || name.starts_with(':') {
                errors.push(self.error(&format!("{base}.request.headers"), &format!("{name:?} is not a header name")));
            }
        }
        let method = req.method.or_else(|| defaults.method.clone()).unwrap_or_else(|| "GET".to_string());
        if let Err(e) = split_url(&req.url) {
            errors.push(self.error(&format!("{base}.request.url"), &e));
        }
        if let Err(e) = check_method(&method) {
            errors.push(self.error(&format!("{base}.request.method"), &e));
        }
        let probe = Probe::new(
            self.policy,
            credential,
            token,
            &method,
            &req.url,
            headers.into_iter().collect(),
            req.connector.or_else(|| defaults.connector.clone()),
            req.gateway_region.or_else(|| defaults.gateway_region.clone()),
        );
        let expect = self.expect(&format!("{base}.expect"), raw.expect);
        match (probe, expect) {
            (Ok(probe), Ok(expect)) if errors.is_empty() => {
                Ok(Case { name: raw.name, line: locate(self.text, base), at_secs, repeat, every_ns, probe, expect })
            }
            (probe, expect) => {
                if let Err(e) = probe {
                    // URL and method errors are already reported above.
                    if split_url(&req.url).is_ok() && check_method(&method).is_ok() {
                        errors.push(self.error(&format!("{base}.request"), &e));
                    }
                }
                if let Err(mut e) = expect {
                    errors.append(&mut e);
                }
                Err(errors)
            }
        }
    }

    /// A token as written (a JWT) or minted now from `{mint: {...}}`.
    fn token(&self, path: &str, value: Value, at_secs: i64) -> Result<String, String> {
        let raw: RawMintToken = match value {
            Value::String(token) => return Ok(token),
            other @ Value::Object(_) => self.parse(other, path)?,
            _ => return Err(self.error(path, "expected a JWT (a string) or {mint: {key, app, scope, ttl}}")),
        };
        let path = format!("{path}.mint");
        self.mint(raw.mint, at_secs).map_err(|(field, e)| self.error(&format!("{path}{field}"), &e))
    }

    /// Signs a token with the case's private JWK, as `guardrail mint` does; the policy gives the
    /// issuer and audience unless the case names them. Errors carry the sub-field (`.ttl`).
    fn mint(&self, m: RawMint, at_secs: i64) -> Result<String, (String, String)> {
        let field = |f: &str, e: String| (format!(".{f}"), e);
        let key_path = relative_to(self.file, Path::new(&m.key));
        let text = std::fs::read_to_string(&key_path)
            .map_err(|e| field("key", format!("cannot read {}: {e}", key_path.display())))?;
        let key = SigningKey::from_jwk(&text).map_err(|e| field("key", format!("{}: {e}", key_path.display())))?;
        let secs = |f: &str, text: &str| -> Result<i64, (String, String)> {
            let ns = parse_duration(text).map_err(|e| field(f, e))?;
            i64::try_from(ns / NANOS_PER_SEC).map_err(|_| field(f, format!("{text} is too long")))
        };
        let ttl_secs = match &m.ttl {
            Some(t) => secs("ttl", t)?,
            None => DEFAULT_MINT_TTL_SECS,
        };
        let issued_ago = match &m.issued_ago {
            Some(t) => secs("issued_ago", t)?,
            None => 0,
        };
        let issuers = &self.policy.issuers;
        let issuer = match (&m.issuer, issuers.as_slice()) {
            (Some(name), _) => name.clone(),
            (None, [one]) => one.issuer.clone(),
            (None, []) => return Err(field("issuer", "the policy trusts no JWT issuer: name the `issuer`".into())),
            (None, _) => {
                return Err(field("issuer", "the policy trusts several issuers: choose one with `issuer`".into()))
            }
        };
        let compiled = issuers.iter().find(|i| i.issuer == issuer);
        let audience = m.audience.clone().or_else(|| compiled.and_then(|c| c.audiences.first()).cloned());
        let app_claim = compiled.map(|c| c.app_claim.clone()).filter(|claim| claim != "azp" && claim != "sub");
        let plan = crate::mint::Plan { issuer, audience, kid: Some(key.kid.clone()), app_claim, ttl_secs };
        let request = crate::mint::Request {
            app: m.app,
            scopes: m.scope.as_deref().unwrap_or("").split_whitespace().map(str::to_owned).collect(),
            ttl_secs: Some(ttl_secs),
            issuer: None,
            audience: None,
        };
        crate::mint::mint(&key, &request, &plan, at_secs.saturating_sub(issued_ago))
            .map_err(|e| (String::new(), format!("{e:#}")))
    }

    fn expect(&self, path: &str, raw: RawExpect) -> Result<Expect, Vec<String>> {
        let mut errors = Vec::new();
        let says_something = raw.allow.is_some()
            || raw.status.is_some()
            || raw.code.is_some()
            || raw.rule.is_some()
            || raw.detail.is_some();
        let code = match raw.code.as_deref() {
            None => None,
            Some(name) => match Code::ALL.iter().find(|c| c.as_str() == name) {
                Some(code) => Some(*code),
                None => {
                    let known: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
                    errors.push(self.error(
                        &format!("{path}.code"),
                        &format!("unknown code `{name}`: one of {}", known.join(", ")),
                    ));
                    None
                }
            },
        };
        if let Some(status) = raw.status {
            match code {
                Some(code) if code.status() != status => errors.push(self.error(
                    &format!("{path}.status"),
                    &format!("{status} does not go with code {} (always {})", code.as_str(), code.status()),
                )),
                None if !Code::ALL.iter().any(|c| c.status() == status) => errors.push(self.error(
                    &format!("{path}.status"),
                    &format!("Guardrail never answers {status}: expected 400, 401, 403, 429 or 503 (or `allow: true`)"),
                )),
                _ => {}
            }
        }
        let expect = Expect {
            allow: raw.allow,
            status: raw.status,
            code,
            rule: raw.rule,
            detail: raw.detail,
            app: raw.app,
            dataset: raw.dataset,
            shadow: raw.shadow,
        };
        if expect.allow == Some(true) && expect.wants_denial() {
            errors.push(self.error(path, "`allow: true` cannot go with status, code, rule or detail"));
        }
        if !says_something {
            errors.push(self.error(
                path,
                "say what to expect: `allow: true`, or any of status, code, rule, detail (or `allow: false`)",
            ));
        }
        if errors.is_empty() {
            Ok(expect)
        } else {
            Err(errors)
        }
    }
}

/// `cases[3].expect` → `cases[3]` → `cases` → none.
fn parent_path(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    path.get(..cut)
}

/// `cases[3].expect.code` → 3.
fn case_index(path: &str) -> Option<usize> {
    path.strip_prefix("cases[")?.split(']').next()?.parse().ok()
}

// === Running ===

/// What a case's last request got.
pub struct Outcome<'p> {
    pub decision: Decision<'p>,
    /// Empty when the case passes.
    pub problems: Vec<String>,
}

/// Sends the case's request `repeat` times on a fresh store; judges the last decision.
pub fn run_case<'p>(policy: &'p CompiledPolicy, case: &Case) -> anyhow::Result<Outcome<'p>> {
    let mut store = fresh_store(policy)?;
    let mut tokens = TokenCache::new(16);
    let start = secs_to_ns(case.at_secs);
    let mut decision = judge(policy, &case.probe, start, &mut store, &mut tokens);
    for i in 1..u64::from(case.repeat) {
        let now = start.saturating_add(case.every_ns.saturating_mul(i));
        decision = judge(policy, &case.probe, now, &mut store, &mut tokens);
    }
    let problems = case.expect.problems(&decision);
    Ok(Outcome { decision, problems })
}

fn render_outcome(case: &Case, outcome: &Outcome<'_>, file: &Path, verbose: bool) -> String {
    let mut s = String::new();
    let d = &outcome.decision;
    if outcome.problems.is_empty() {
        s.push_str(&format!("PASS {}\n", case.name));
        if !verbose {
            return s;
        }
    } else {
        let at = case.line.map_or(String::new(), |l| format!(" ({}:{l})", file.display()));
        s.push_str(&format!("FAIL {}{at}\n", case.name));
        s.push_str(&format!("     expected: {}\n", case.expect.summary()));
        s.push_str(&format!("     got:      {}\n", verdict_line(d)));
        let found = found_summary(d);
        if !found.is_empty() {
            s.push_str(&format!("               {found}\n"));
        }
        for problem in &outcome.problems {
            s.push_str(&format!("       - {problem}\n"));
        }
    }
    let p = &case.probe;
    let which = if case.repeat > 1 { format!(" (request {} of {})", case.repeat, case.repeat) } else { String::new() };
    s.push_str(&format!("     trace of {} {}{which}:\n", p.method, p.path));
    // The whole trace, its verdict line included: it shows the check that refused.
    for line in &d.trace {
        s.push_str(&format!("       {line}\n"));
    }
    for line in event_lines(d) {
        s.push_str(&format!("       {line}\n"));
    }
    s
}

/// What the decision found besides its verdict: the app, the dataset, the shadow rules that fired.
fn found_summary(d: &Decision<'_>) -> String {
    let mut found = Vec::new();
    if let Some(app) = d.app {
        found.push(format!("app {}", app.id));
    }
    if let Some(ds) = d.dataset {
        found.push(format!("dataset {}", ds.id));
    }
    let shadow: Vec<&str> = d.shadow_rules();
    if !shadow.is_empty() {
        found.push(format!("shadow [{}]", shadow.join(", ")));
    }
    found.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_index_of_paths() {
        assert_eq!(case_index("cases[3].expect.code"), Some(3));
        assert_eq!(case_index("cases[12]"), Some(12));
        assert_eq!(case_index("at"), None);
        assert_eq!(case_index("defaults.headers"), None);
        assert_eq!(parent_path("cases[3].expect.code"), Some("cases[3].expect"));
        assert_eq!(parent_path("cases[3]"), Some("cases"));
        assert_eq!(parent_path("cases"), None);
    }
}
