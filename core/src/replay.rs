//! Replaying recorded traffic (`guardrail replay`): one record of an Envoy JSON access log, in the
//! format the repository's Envoy configs write, turned back into a [`Request`], decided again with
//! a policy, and compared with what was recorded.
//!
//! What the log cannot tell is reported as [`Undetermined`], never guessed:
//! - credentials are not logged: a request is decided as the app the log names
//!   ([`decide_as_untraced`]), and a recorded 401 cannot be judged again unless the policy now
//!   exempts it or refuses its path first;
//! - request headers are not logged: a request that reaches an enforced rule reading
//!   `request.headers` cannot be judged;
//! - a Guardrail token is logged only as its scopes and lifetime (`guardrail_token`,
//!   `dataset:payments;ttl=600`): the JIT step is judged from that, but a rule reading the
//!   token's claims cannot be; without the field at all, neither can the JIT step.
//!
//! ```
//! use guardrail_core::replay::{Record, Replayer, Outcome};
//! use guardrail_core::decide::Code;
//! let policy = guardrail_core::compile::compile_json_str(r#"{"apiVersion":"guardrail/v1","kind":"Policy",
//!   "settings":{"gateway_region":"eu-west-1"},
//!   "tiers":{"standard":{"rate":{"requests":2,"per":"1m"}}},"connectors":{"approved":["upstream"]},
//!   "apps":[{"id":"a","tier":"standard","lifecycle":"published","environment":"prod",
//!            "region":"eu-west-1","connectors":["upstream"]}]}"#).unwrap();
//! let mut replayer = Replayer::new(&policy, None).unwrap();
//! let line = r#"{"time":"2026-12-06T13:58:23.019Z","request_id":"r1","method":"GET",
//!   "authority":"api.example","path":"/x","status":200,"upstream_cluster":"upstream","peer":"-",
//!   "guardrail_app":"a","guardrail_code":"allow","guardrail_dataset":"-"}"#;
//! let record: Record = serde_json::from_str(line).unwrap();
//! assert!(record.missing().is_empty());
//! assert_eq!(record.recorded(), Ok(Outcome::Allow));
//! let now = record.time_ns().unwrap();
//! assert_eq!(replayer.replay(&record, now), Ok(Outcome::Allow));
//! assert_eq!(replayer.replay(&record, now), Ok(Outcome::Allow));
//! assert_eq!(replayer.replay(&record, now), Ok(Outcome::Deny(Code::QuotaExceeded)));
//! ```

use crate::compile::{CompiledPolicy, Rule};
use crate::decide::{decide, decide_as_untraced, Code, Decision, Pass, Request};
use crate::jwt::{TokenCache, VerifiedToken};
use crate::quota::{ensure_keys, MemoryStore, StoreError};
use crate::raw::{Effect, RuleMode};
use crate::rules::{USES_REQUEST, USES_TOKEN};
use crate::time::{parse_rfc3339, NANOS_PER_SEC};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// The fields a record must have, as the repository's Envoy configs write them.
pub const REQUIRED_FIELDS: [&str; 10] = [
    "time",
    "request_id",
    "method",
    "authority",
    "path",
    "status",
    "upstream_cluster",
    "peer",
    "guardrail_app",
    "guardrail_code",
];

/// The optional fields replay reads.
pub const OPTIONAL_FIELDS: [&str; 2] = ["guardrail_dataset", "guardrail_token"];

// === Record ===

/// A JSON string of the log, borrowed from the line unless it had escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStr<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for LogStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LogStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LogStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LogStr(Cow::Owned(v.to_string())))
            }
            // `status` and `duration_ms` are numbers in some formats, strings in others.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(LogStr(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(LogStr(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(LogStr(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Present in the record (possibly `null`): `Some(None)` for `null`, `None` when absent.
fn present<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Option<LogStr<'a>>>, D::Error> {
    Option::<LogStr<'a>>::deserialize(d).map(Some)
}

/// One access-log line. Every field is optional here so that JSON lacking fields is told apart
/// from garbled JSON ([`Record::missing`]); unknown fields are ignored (the format may grow).
#[derive(Debug, Default, Deserialize)]
pub struct Record<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    pub time: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub request_id: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub method: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub authority: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub path: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub status: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub upstream_cluster: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub peer: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub guardrail_app: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub guardrail_code: Option<Option<LogStr<'a>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub guardrail_dataset: Option<Option<LogStr<'a>>>,
    /// Absent: the filter did not log tokens (unknown); `-`/null: no Guardrail token.
    #[serde(borrow, default, deserialize_with = "present")]
    pub guardrail_token: Option<Option<LogStr<'a>>>,
}

/// A field's value: `None` when absent, null, empty or `-` (Envoy's "no value").
fn value<'r>(field: &'r Option<Option<LogStr<'_>>>) -> Option<&'r str> {
    match field {
        Some(Some(LogStr(v))) if !v.is_empty() && v != "-" => Some(v),
        _ => None,
    }
}

/// What the log says of the Guardrail token a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSeen<'r> {
    /// The log has no `guardrail_token` field.
    Unknown,
    /// No Guardrail token.
    None,
    /// Space-separated scopes, and `exp - iat` when the token had `iat`.
    Scopes { scopes: &'r str, ttl: Option<i64> },
}

impl<'a> Record<'a> {
    /// The required fields this record lacks (a present `null` counts as present: Envoy writes
    /// null for a value it does not have).
    pub fn missing(&self) -> Vec<&'static str> {
        let fields = [
            &self.time,
            &self.request_id,
            &self.method,
            &self.authority,
            &self.path,
            &self.status,
            &self.upstream_cluster,
            &self.peer,
            &self.guardrail_app,
            &self.guardrail_code,
        ];
        REQUIRED_FIELDS.iter().zip(fields).filter(|(_, f)| f.is_none()).map(|(name, _)| *name).collect()
    }

    pub fn request_id(&self) -> &str {
        value(&self.request_id).unwrap_or("-")
    }

    pub fn app(&self) -> Option<&str> {
        value(&self.guardrail_app)
    }

    pub fn code(&self) -> Option<&str> {
        value(&self.guardrail_code)
    }

    pub fn token(&self) -> TokenSeen<'_> {
        match &self.guardrail_token {
            None => TokenSeen::Unknown,
            Some(_) => match value(&self.guardrail_token) {
                None => TokenSeen::None,
                Some(summary) => {
                    let (scopes, ttl) = match summary.rsplit_once(";ttl=") {
                        Some((scopes, ttl)) => (scopes, ttl.trim().parse::<i64>().ok()),
                        None => (summary, None),
                    };
                    TokenSeen::Scopes { scopes, ttl }
                }
            },
        }
    }

    /// `time` (Envoy's `%START_TIME%`, RFC 3339 with milliseconds) in Unix nanoseconds.
    pub fn time_ns(&self) -> Option<u64> {
        parse_time_ns(value(&self.time)?)
    }

    /// What Guardrail decided, from `guardrail_code`.
    pub fn recorded(&self) -> Result<Outcome, Undetermined> {
        let code = self.code().ok_or(Undetermined::NoDecision)?;
        Outcome::parse(code).ok_or(Undetermined::UnknownCode)
    }
}

/// RFC 3339 with a fraction of a second (`2026-12-06T13:58:23.019Z`) in Unix nanoseconds.
pub fn parse_time_ns(text: &str) -> Option<u64> {
    let secs = u64::try_from(parse_rfc3339(text).ok()?).ok()?;
    let mut nanos = 0u64;
    if text.as_bytes().get(19) == Some(&b'.') {
        let digits = text.bytes().skip(20).take_while(u8::is_ascii_digit);
        let mut scale = NANOS_PER_SEC;
        for d in digits.take(9) {
            scale /= 10;
            nanos += u64::from(d - b'0') * scale;
        }
    }
    secs.checked_mul(NANOS_PER_SEC)?.checked_add(nanos)
}

// === Outcome ===

/// A decision as the access log shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Admitted for an app.
    Allow,
    /// Passed by an exemption.
    Exempt,
    /// A credential-less CORS preflight, passed.
    Preflight,
    Deny(Code),
}

impl Outcome {
    /// From a `guardrail_code`.
    pub fn parse(code: &str) -> Option<Outcome> {
        match code {
            "allow" => Some(Outcome::Allow),
            "exempt" => Some(Outcome::Exempt),
            "preflight" => Some(Outcome::Preflight),
            _ => Code::ALL.iter().find(|c| c.as_str() == code).map(|&c| Outcome::Deny(c)),
        }
    }

    pub fn of(decision: &Decision<'_>) -> Outcome {
        match (&decision.denial, &decision.pass) {
            (Some(denial), _) => Outcome::Deny(denial.code),
            (None, Some(Pass::Exempt(_))) => Outcome::Exempt,
            (None, Some(Pass::Preflight)) => Outcome::Preflight,
            (None, None) => Outcome::Allow,
        }
    }

    /// The status Guardrail answers with, 200 for what it passes on (the upstream's may differ).
    pub fn status(self) -> u32 {
        match self {
            Outcome::Deny(code) => code.status(),
            _ => 200,
        }
    }

    /// `guardrail_code` of this outcome.
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Exempt => "exempt",
            Outcome::Preflight => "preflight",
            Outcome::Deny(code) => code.as_str(),
        }
    }
}

/// `200`, `200 exempt`, `403 residency-violation`.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allow => f.write_str("200"),
            other => write!(f, "{} {}", other.status(), other.code()),
        }
    }
}

/// Why a record's decision cannot be determined from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Undetermined {
    /// No `guardrail_code`: Guardrail did not judge the request (another route, a local reply).
    NoDecision,
    /// A `guardrail_code` Guardrail does not write.
    UnknownCode,
    /// `time` is not an RFC 3339 time.
    BadTime,
    /// The decision hangs on the credential, which is never logged: a recorded 401, or a request
    /// recorded without an app that this policy no longer passes without one.
    Credential,
    /// The JIT step needs the token's scopes and the log has no `guardrail_token`.
    TokenScope,
    /// An enforced rule in scope reads `request.headers`, which are not logged.
    Headers,
    /// An enforced rule in scope reads the token's claims, which are not logged.
    TokenClaims,
}

impl Undetermined {
    pub const ALL: [Undetermined; 7] = [
        Undetermined::NoDecision,
        Undetermined::UnknownCode,
        Undetermined::BadTime,
        Undetermined::Credential,
        Undetermined::TokenScope,
        Undetermined::Headers,
        Undetermined::TokenClaims,
    ];

    /// A short machine name (`--json`).
    pub fn id(self) -> &'static str {
        match self {
            Undetermined::NoDecision => "no-decision-recorded",
            Undetermined::UnknownCode => "unknown-code",
            Undetermined::BadTime => "bad-time",
            Undetermined::Credential => "credential-not-recorded",
            Undetermined::TokenScope => "token-scope-not-recorded",
            Undetermined::Headers => "rule-reads-headers",
            Undetermined::TokenClaims => "rule-reads-token-claims",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Undetermined::NoDecision => "no Guardrail decision recorded (guardrail_code is `-`)",
            Undetermined::UnknownCode => "guardrail_code is not one Guardrail writes",
            Undetermined::BadTime => "time is not an RFC 3339 time",
            Undetermined::Credential => {
                "needs the credential, which is not logged (a recorded 401, or no app recorded and not exempt)"
            }
            Undetermined::TokenScope => "token scope not recorded (no guardrail_token field) and the JIT step needs it",
            Undetermined::Headers => "an enforced rule in scope reads request.headers, which are not logged",
            Undetermined::TokenClaims => "an enforced rule in scope reads the token's claims, which are not logged",
        }
    }
}

// === Rules the log cannot judge ===

/// Whether a rule may read `request.headers`: its expression names `request` other than as
/// `request.method`, `request.host` or `request.path` (so `request['headers']`, a string literal
/// holding the word, or `request` passed whole all count: when unsure, it reads them).
pub fn reads_headers(rule: &Rule) -> bool {
    if rule.expr.uses() & USES_REQUEST == 0 {
        return false;
    }
    let src = rule.when.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let word = b"request";
    let mut i = 0;
    while let Some(at) = src.get(i..).and_then(|rest| rest.windows(word.len()).position(|w| w == word)) {
        let start = i + at;
        let end = start + word.len();
        i = end;
        let before_ok = start == 0 || src.get(start - 1).is_some_and(|&b| !ident(b) && b != b'.');
        if !before_ok || src.get(end).is_some_and(|&b| ident(b)) {
            continue; // part of another name (`requests`, `x.request`)
        }
        let mut j = end;
        while src.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if src.get(j) != Some(&b'.') {
            return true;
        }
        j += 1;
        while src.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        let field_start = j;
        while src.get(j).is_some_and(|&b| ident(b)) {
            j += 1;
        }
        let field = src.get(field_start..j).unwrap_or_default();
        if !matches!(field, b"method" | b"host" | b"path") {
            return true;
        }
    }
    false
}

/// Whether a rule reads `token` (its claims, which the log does not have).
pub fn reads_token(rule: &Rule) -> bool {
    rule.expr.uses() & USES_TOKEN != 0
}

/// What the enforced rules in scope of one dataset read that the log lacks.
#[derive(Debug, Clone, Copy, Default)]
struct Blind {
    headers: bool,
    token: bool,
}

impl Blind {
    fn of<'r>(rules: impl Iterator<Item = &'r Rule>) -> Blind {
        rules.filter(|r| r.mode != RuleMode::Shadow).fold(Blind::default(), |b, r| Blind {
            headers: b.headers || reads_headers(r),
            token: b.token || reads_token(r),
        })
    }
}

// === Replayer ===

/// The token value replay sends for a request whose log shows a Guardrail token: it stands for
/// a synthetic [`VerifiedToken`] put in the token cache, so the real JIT check judges it.
const REPLAY_TOKEN: &str = "guardrail-replay-token";

/// Decides recorded requests with one policy, in the order given, on its own quota store (every
/// bucket full at the start), as one Envoy of the fleet would have.
pub struct Replayer<'p> {
    policy: &'p CompiledPolicy,
    store: MemoryStore,
    tokens: TokenCache,
    gateway_region: Option<String>,
    /// By dataset id; `no_dataset` for requests that reach none.
    blind: HashMap<String, Blind>,
    no_dataset: Blind,
    /// Enforced deny rules whose verdict the log can judge when the token is not known / when
    /// it is: a denial by one of them stands whatever the other rules would say.
    rules: HashMap<String, (bool, bool)>,
    token_headers: Vec<(String, String)>,
    preflight_headers: Vec<(String, String)>,
}

impl<'p> Replayer<'p> {
    /// `gateway_region`: the region the recording Envoy's configuration set, if any (it is not
    /// in the log; default `settings.gateway_region`).
    pub fn new(policy: &'p CompiledPolicy, gateway_region: Option<String>) -> Result<Self, StoreError> {
        let mut store = MemoryStore::default();
        ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str()))?;
        let blind = policy
            .datasets
            .iter()
            .enumerate()
            .map(|(i, ds)| (ds.id.clone(), Blind::of(policy.rules_for(Some(i)))))
            .collect();
        let rules = policy
            .rules
            .iter()
            .filter(|r| r.effect == Effect::Deny && r.mode != RuleMode::Shadow)
            .map(|r| {
                let headers = reads_headers(r);
                let token = reads_token(r);
                (r.id.clone(), (!headers, !headers && !token))
            })
            .collect();
        Ok(Replayer {
            policy,
            store,
            tokens: TokenCache::new(4),
            gateway_region,
            blind,
            no_dataset: Blind::of(policy.rules_for(None)),
            rules,
            token_headers: vec![(policy.settings.token_header.clone(), format!("Bearer {REPLAY_TOKEN}"))],
            preflight_headers: vec![
                ("origin".to_string(), "null".to_string()),
                ("access-control-request-method".to_string(), "GET".to_string()),
            ],
        })
    }

    pub fn policy(&self) -> &'p CompiledPolicy {
        self.policy
    }

    /// Decides `record` at `now_ns` (its time) with this replayer's policy and quota store.
    pub fn replay(&mut self, record: &Record<'_>, now_ns: u64) -> Result<Outcome, Undetermined> {
        let recorded = record.recorded()?;
        let token = record.token();
        let app = record.app();
        let mut req = Request {
            method: value(&record.method).unwrap_or(""),
            host: value(&record.authority).unwrap_or(""),
            path: value(&record.path).unwrap_or(""),
            connector: value(&record.upstream_cluster),
            request_id: record.request_id(),
            headers: &[],
            gateway_region: self.gateway_region.as_deref(),
            fleet: None,
            peer: value(&record.peer),
        };
        let policy = self.policy;
        match (recorded, app) {
            (Outcome::Deny(Code::Unauthenticated), _) | (_, None) => {
                // Recorded without an authenticated app: decided as the filter would without a
                // credential. What then passes or fails before the credential step stands; the
                // rest hangs on a credential the log does not have, except for a preflight, which
                // never carries one.
                if recorded == Outcome::Preflight {
                    req.headers = &self.preflight_headers;
                }
                let d = decide(policy, &req, now_ns, &mut self.store, &mut self.tokens);
                match Outcome::of(&d) {
                    out @ (Outcome::Exempt | Outcome::Preflight | Outcome::Deny(Code::InvalidPath)) => Ok(out),
                    out @ Outcome::Deny(Code::Unauthenticated) if recorded == Outcome::Preflight => Ok(out),
                    _ => Err(Undetermined::Credential),
                }
            }
            (_, Some(app)) => {
                if let TokenSeen::Scopes { scopes, ttl } = token {
                    let now_secs = i64::try_from(now_ns / NANOS_PER_SEC).unwrap_or(i64::MAX);
                    let ttl = ttl.map(|t| t.max(0));
                    let verified = VerifiedToken {
                        issuer: 0,
                        app: app.to_string(),
                        claims: serde_json::Map::new(),
                        exp: now_secs.saturating_add(ttl.unwrap_or(1)),
                        iat: ttl.map(|_| now_secs),
                        nbf: None,
                        scopes: scopes.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                        clock_skew_seconds: 1,
                        app_index: policy.app_index(app),
                    };
                    self.tokens.insert(REPLAY_TOKEN, verified);
                    req.headers = &self.token_headers;
                }
                let d = decide_as_untraced(policy, app, &req, now_ns, &mut self.store, &mut self.tokens);
                self.judge(&d, token)
            }
        }
    }

    /// Whether the log could determine decision `d` of a request decided as its recorded app.
    fn judge(&self, d: &Decision<'_>, token: TokenSeen<'_>) -> Result<Outcome, Undetermined> {
        let out = Outcome::of(d);
        let claims_unknown = !matches!(token, TokenSeen::None);
        match out {
            Outcome::Exempt | Outcome::Preflight => return Ok(out),
            Outcome::Deny(Code::JitRequired) if token == TokenSeen::Unknown => return Err(Undetermined::TokenScope),
            // Refused before the ABAC rules: nothing the log lacks was read.
            Outcome::Deny(
                Code::PolicyUnavailable
                | Code::InvalidPath
                | Code::Unauthenticated
                | Code::AppNotRegistered
                | Code::AppNotActive
                | Code::ConnectorNotApproved
                | Code::ResidencyViolation
                | Code::JitRequired,
            ) => return Ok(out),
            _ => {}
        }
        // Denied by its data class or by an enforced deny rule the log can judge: whatever the
        // other rules say, it is denied with the same code.
        let rule = d.denial.as_ref().and_then(|denial| denial.rule.as_deref());
        if out == Outcome::Deny(Code::AccessDenied) {
            let judged = match rule {
                Some("data-class") => true,
                Some(id) => self.rules.get(id).is_some_and(
                    |&(without_token, with_token)| {
                        if claims_unknown {
                            with_token
                        } else {
                            without_token
                        }
                    },
                ),
                None => false,
            };
            if judged {
                return Ok(out);
            }
        }
        let blind = match d.dataset {
            Some(ds) => self.blind.get(&ds.id).copied().unwrap_or_default(),
            None => self.no_dataset,
        };
        if blind.headers {
            return Err(Undetermined::Headers);
        }
        if blind.token && claims_unknown {
            return Err(Undetermined::TokenClaims);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_json_str;

    fn policy(rules: &str) -> CompiledPolicy {
        let text = format!(
            r#"{{"apiVersion":"guardrail/v1","kind":"Policy","settings":{{"gateway_region":"eu-west-1",
            "identity":{{"jwt":[{{"issuer":"https://id.example","jwks":{{"keys":[{{"kty":"OKP","crv":"Ed25519",
              "kid":"k","alg":"EdDSA","x":"zHSH5Ge9NgQ7ZAc2kp7w-y6Tuexn-Cs00K1kNaE0XrU"}}]}}}}]}}}},
            "tiers":{{"standard":{{"rate":{{"requests":100,"per":"1m"}}}}}},
            "connectors":{{"approved":["upstream"]}},
            "apps":[{{"id":"a","tier":"standard","lifecycle":"published","environment":"prod",
                     "region":"eu-west-1","connectors":["upstream"],
                     "data_classes":["public","internal","confidential","regulated"]}}],
            "datasets":[{{"id":"pay","classification":"regulated","allowed_regions":["eu-west-1"],
                         "routes":[{{"path_prefix":"/pay"}}]}}],
            "rules":{rules}}}"#
        );
        match compile_json_str(&text) {
            Ok(p) => p,
            Err(e) => panic!("test policy: {e:?}"),
        }
    }

    fn record(json: &str) -> Record<'_> {
        match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => panic!("{json}: {e}"),
        }
    }

    #[test]
    fn reads_headers_table() {
        let cases = [
            ("request.method == 'GET'", false, "method only"),
            ("request.path.startsWith('/x') && request . host == 'h'", false, "path and host, spaced"),
            ("request.headers['x-a'] == 'b'", true, "headers"),
            ("request['headers'].size() > 0", true, "indexed"),
            ("'x-a' in request.headers", true, "in headers"),
            ("app.id == 'a' && request.method == 'GET' && size(request) > 0", true, "request whole"),
            ("app.id == 'a'", false, "no request"),
        ];
        for (when, want, why) in cases {
            let rules = format!(r#"[{{"id":"r","effect":"deny","when":{}}}]"#, serde_json::json!(when));
            let p = policy(&rules);
            let Some(rule) = p.rules.first() else { panic!("{why}: no rule") };
            assert_eq!(reads_headers(rule), want, "{why}: {when}");
        }
    }

    #[test]
    fn time_with_fraction() {
        assert_eq!(parse_time_ns("1970-01-01T00:00:01.019Z"), Some(1_019_000_000));
        assert_eq!(parse_time_ns("1970-01-01T00:00:01Z"), Some(1_000_000_000));
        assert_eq!(parse_time_ns("1970-01-01T00:00:01.123456789123Z"), Some(1_123_456_789));
        assert_eq!(parse_time_ns("yesterday"), None);
    }

    const LINE: &str = r#"{"time":"2026-12-06T13:58:23.019Z","request_id":"r1","method":"GET","authority":"h","path":"/pay/1","status":"200","upstream_cluster":"upstream","peer":null,"guardrail_app":"a","guardrail_code":"allow","guardrail_dataset":"pay""#;

    #[test]
    fn jit_is_judged_from_the_recorded_token_summary() {
        let p = policy("[]");
        let mut r = match Replayer::new(&p, None) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        let cases = [
            (",\"guardrail_token\":\"dataset:pay;ttl=600\"}", Ok(Outcome::Allow), "scoped token"),
            (",\"guardrail_token\":\"dataset:other;ttl=600\"}", Ok(Outcome::Deny(Code::JitRequired)), "wrong scope"),
            (",\"guardrail_token\":\"dataset:pay;ttl=3600\"}", Ok(Outcome::Deny(Code::JitRequired)), "too long"),
            (",\"guardrail_token\":\"dataset:pay\"}", Ok(Outcome::Deny(Code::JitRequired)), "no iat"),
            (",\"guardrail_token\":\"-\"}", Ok(Outcome::Deny(Code::JitRequired)), "no token"),
            ("}", Err(Undetermined::TokenScope), "token not logged"),
        ];
        for (tail, want, why) in cases {
            let line = format!("{LINE}{tail}");
            let rec = record(&line);
            let now = rec.time_ns().unwrap_or_default();
            assert_eq!(r.replay(&rec, now), want, "{why}");
        }
    }

    #[test]
    fn rules_reading_what_is_not_logged_are_undetermined() {
        // `m` first: once it denies, `h` is not evaluated (the first enforced denial settles).
        let rules = r#"[{"id":"m","effect":"deny","datasets":["pay"],"when":"request.method == 'DELETE'"},
                        {"id":"h","effect":"deny","datasets":["pay"],"when":"request.headers['x'] == 'y'"},
                        {"id":"t","effect":"deny","mode":"shadow","when":"token != null"}]"#;
        let p = policy(rules);
        let mut r = match Replayer::new(&p, None) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        let get = format!("{LINE},\"guardrail_token\":\"dataset:pay;ttl=60\"}}");
        let rec = record(&get);
        assert_eq!(r.replay(&rec, rec.time_ns().unwrap_or_default()), Err(Undetermined::Headers), "GET");
        let delete = get.replace("\"GET\"", "\"DELETE\"");
        let rec = record(&delete);
        assert_eq!(
            r.replay(&rec, rec.time_ns().unwrap_or_default()),
            Ok(Outcome::Deny(Code::AccessDenied)),
            "a deny rule the log can judge holds: denied whatever the header rule says"
        );
    }

    #[test]
    fn missing_fields_and_values() {
        let rec = record(r#"{"time":"x","method":"GET","guardrail_token":null}"#);
        assert_eq!(
            rec.missing(),
            vec![
                "request_id",
                "authority",
                "path",
                "status",
                "upstream_cluster",
                "peer",
                "guardrail_app",
                "guardrail_code"
            ]
        );
        assert_eq!(rec.token(), TokenSeen::None);
        assert_eq!(rec.recorded(), Err(Undetermined::NoDecision));
        let rec = record(r#"{"path":"/a\"b","status":403,"guardrail_code":"residency-violation","peer":2.5}"#);
        assert_eq!(value(&rec.path), Some("/a\"b"));
        assert_eq!(value(&rec.status), Some("403"));
        assert_eq!(rec.recorded(), Ok(Outcome::Deny(Code::ResidencyViolation)));
        assert_eq!(rec.token(), TokenSeen::Unknown);
    }
}
