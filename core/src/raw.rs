//! The policy document as written (`apiVersion: guardrail/v1`), parsed with serde.
//! Every struct denies unknown fields: a typo is an error, never silently ignored.
//! Meaning and cross-references are checked when it is compiled (see [`crate::compile`]).

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub revision: Option<Revision>,
    #[serde(default)]
    pub settings: RawSettings,
    #[serde(default)]
    pub tiers: BTreeMap<String, RawTier>,
    #[serde(default)]
    pub connectors: RawConnectors,
    #[serde(default)]
    pub apps: Vec<RawApp>,
    #[serde(default)]
    pub datasets: Vec<RawDataset>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub exemptions: Vec<RawExemption>,
}

/// A revision may be written as a whole number or a string; it is kept as text.
#[derive(Debug, Clone)]
pub enum Revision {
    Number(i64),
    Text(String),
}

/// Read as a JSON value (a reader the filter has anyway, for the JWKS keys) rather than as an
/// `untagged` enum, which could only say that no variant matched: a fraction, or any other value,
/// gets an error that says what to write.
impl<'de> Deserialize<'de> for Revision {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(s) => Ok(Revision::Text(s)),
            serde_json::Value::Number(n) if !n.is_f64() => {
                Ok(n.as_i64().map_or(Revision::Text(n.to_string()), Revision::Number))
            }
            other => Err(de::Error::custom(format_args!("must be a whole number or a string, not {other}"))),
        }
    }
}

impl Revision {
    pub fn to_text(&self) -> String {
        match self {
            Revision::Number(n) => n.to_string(),
            Revision::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    #[serde(default)]
    pub gateway_region: Option<String>,
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    #[serde(default)]
    pub soft_limit_ratio: Option<f64>,
    #[serde(default)]
    pub jit_max_ttl: Option<String>,
    #[serde(default)]
    pub identity: RawIdentity,
    /// The currency of `connectors.pricing` (ISO 4217, default `USD`).
    #[serde(default)]
    pub currency: Option<String>,
    /// Who may approve self-service requests (`guardrail approve`).
    #[serde(default)]
    pub approvers: Vec<RawApprover>,
    /// The longest a self-service request may last (its `until` at most this far ahead; default
    /// `90d`).
    #[serde(default)]
    pub max_request_duration: Option<String>,
}

/// An approver: an `id` (a person) and how the companion recognises them: the digest of a bearer
/// token (`sha256:<hex>`, as `guardrail hash-key` prints it) or of a client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApprover {
    pub id: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub certificate: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// The header holding Guardrail's bearer token (default `authorization`, as `Bearer <jwt>`).
    #[serde(default)]
    pub token_header: Option<String>,
    /// Whether a verified Guardrail token is passed on to the upstream (default false).
    #[serde(default)]
    pub forward_token: Option<bool>,
    #[serde(default)]
    pub jwt: Vec<RawJwtIssuer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtIssuer {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks: RawJwks,
    #[serde(default)]
    pub app_claim: Option<String>,
    #[serde(default)]
    pub clock_skew_seconds: Option<i64>,
}

/// An inline JWK Set (RFC 7517). Keys stay as JSON values: each is parsed and checked on compile,
/// and a key that is not usable is an error naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwks {
    pub keys: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub rate: RawRate,
    #[serde(default)]
    pub daily_budget: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub requests: i64,
    pub per: String,
    #[serde(default)]
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnectors {
    #[serde(default)]
    pub approved: Vec<String>,
    /// What a connector costs, for the console's cost per app and department.
    #[serde(default)]
    pub pricing: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub per_1k_requests: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Dev,
    Test,
    Prod,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Test => "test",
            Environment::Prod => "prod",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    Draft,
    Approved,
    Published,
    Deprecated,
    Quarantined,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Draft => "draft",
            Lifecycle::Approved => "approved",
            Lifecycle::Published => "published",
            Lifecycle::Deprecated => "deprecated",
            Lifecycle::Quarantined => "quarantined",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classification {
    Public,
    Internal,
    Confidential,
    Regulated,
}

impl Classification {
    /// This classification's bit in [`crate::compile::AppMasks::classes`].
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Public => "public",
            Classification::Internal => "internal",
            Classification::Confidential => "confidential",
            Classification::Regulated => "regulated",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub id: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub department: Option<String>,
    pub environment: Environment,
    pub tier: String,
    pub lifecycle: Lifecycle,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub data_classes: Vec<Classification>,
    #[serde(default)]
    pub connectors: Vec<String>,
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub quota_overrides: Vec<RawQuotaOverride>,
    /// The date (`YYYY-MM-DD`, UTC) by which the app must be re-attested; after that day the
    /// filter refuses it (`app-not-active`, "review overdue since …").
    #[serde(default)]
    pub review_by: Option<String>,
    /// Connectors the app may reach although `connectors.approved` (or its own `connectors`) does
    /// not list them, each until `expires_at`: approved connector requests (`guardrail request
    /// connector`), or written by hand.
    #[serde(default)]
    pub connector_exceptions: Vec<RawConnectorException>,
    /// Datasets marked `approval: required` for which the companion's token service may issue the
    /// app JIT tokens, each until `expires_at`: approved access requests.
    #[serde(default)]
    pub access_grants: Vec<RawAccessGrant>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnectorException {
    pub connector: String,
    pub expires_at: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessGrant {
    pub dataset: String,
    pub expires_at: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotaOverride {
    #[serde(default)]
    pub rate: Option<RawRate>,
    #[serde(default)]
    pub daily_budget: Option<i64>,
    pub expires_at: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    pub id: String,
    pub classification: Classification,
    #[serde(default)]
    pub owner_department: Option<String>,
    #[serde(default)]
    pub allowed_regions: Option<Vec<String>>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub requires_jit: Option<bool>,
    /// `required`: the companion's token service issues JIT tokens for this dataset only within an
    /// approved access request (`none`, the default: whenever the policy admits the app).
    #[serde(default)]
    pub approval: Option<Approval>,
}

/// Whether JIT access to a dataset needs a human's approval first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    #[default]
    None,
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub host: Option<String>,
    pub path_prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: String,
    pub effect: Effect,
    pub when: String,
    #[serde(default)]
    pub datasets: Vec<String>,
    #[serde(default)]
    pub classifications: Vec<Classification>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub mode: RuleMode,
}

/// Callers that pass without an app credential: by route and/or by the mTLS peer's SPIFFE id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExemption {
    pub id: String,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub reason: Option<String>,
}
