//! The plugin configuration (Envoy's `configuration` of the wasm filter, a JSON string):
//! `{"policy": {..}, "control": {"cluster": ".."}, "gateway_region": "..", "failure_mode": "closed"}`.

use guardrail_core::compile::{compile, parse_json_str, CompiledPolicy};
use guardrail_core::raw::FailureMode;
use guardrail_core::PolicyError;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilterConfig {
    #[serde(default)]
    policy: Option<serde_json::Value>,
    #[serde(default)]
    control: Option<RawControl>,
    #[serde(default)]
    gateway_region: Option<String>,
    #[serde(default)]
    failure_mode: Option<FailureMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    cluster: String,
}

/// A validated plugin configuration.
pub struct FilterConfig {
    pub policy: Option<CompiledPolicy>,
    pub control_cluster: Option<String>,
    pub gateway_region: Option<String>,
    /// What to do while no policy is loaded; a loaded policy's `settings.failure_mode` wins.
    pub failure_mode: FailureMode,
}

/// Parses the plugin configuration; every error names its field (`policy.apps[2].tier`).
pub fn parse(bytes: &[u8]) -> Result<FilterConfig, Vec<PolicyError>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(FilterConfig {
            policy: None,
            control_cluster: None,
            gateway_region: None,
            failure_mode: FailureMode::Closed,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw: RawFilterConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        vec![PolicyError::new(if path == "." { String::new() } else { path }, e.into_inner().to_string())]
    })?;
    let prefix = |mut e: PolicyError| {
        e.path = if e.path.is_empty() { "policy".into() } else { format!("policy.{}", e.path) };
        e
    };
    let policy = match raw.policy {
        Some(value) => {
            // Read as JSON text, by the one reader the policy types have (`parse_json_str`).
            let text = value.to_string();
            let raw_policy = parse_json_str(&text).map_err(|e| vec![prefix(e.to_policy_error())])?;
            Some(compile(raw_policy).map_err(|e| e.0.into_iter().map(prefix).collect::<Vec<_>>())?)
        }
        None => None,
    };
    if let Some(control) = &raw.control {
        if control.cluster.trim().is_empty() {
            return Err(vec![PolicyError::new("control.cluster", "empty cluster name")]);
        }
    }
    if raw.gateway_region.as_deref().is_some_and(|r| r.trim().is_empty()) {
        return Err(vec![PolicyError::new("gateway_region", "empty region")]);
    }
    Ok(FilterConfig {
        policy,
        control_cluster: raw.control.map(|c| c.cluster),
        gateway_region: raw.gateway_region,
        failure_mode: raw.failure_mode.unwrap_or_default(),
    })
}
