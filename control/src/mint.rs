//! `guardrail mint`: a short-lived JWT for an app, scoped to datasets (a JIT credential).
//!
//! The token is signed with EdDSA (header `{alg: EdDSA, typ: JWT, kid}`) and carries `iss`, `aud`,
//! `sub` and `azp` (the app), `scope` (space-separated), `iat`, `exp` and a random `jti`. Only the
//! token is printed on stdout, so `TOKEN=$(guardrail mint …)` works.
//!
//! Given `--policy`, mint refuses what the filter would refuse, before anyone tries: an app not in
//! the catalog or not active (a draft outside `dev`, deprecated, quarantined, past its `review_by`), a `dataset:` scope
//! for a dataset that does not exist or that the app may not reach (its classification is not among
//! the app's `data_classes`, or the app's region is not in the dataset's `allowed_regions`), and a
//! TTL above `settings.jit_max_ttl`. The issuer is the one whose JWKS holds this key, and the
//! audience its audience; the token is then verified with the policy's issuers, as the filter will.

use crate::jwk::{b64, SigningKey};
use crate::log::now_secs;
use crate::UsageError;
use anyhow::Context;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::duration::parse_duration;
use guardrail_core::time::NANOS_PER_SEC;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// TTL when neither `--ttl` nor a policy says otherwise (the default `jit_max_ttl`).
const DEFAULT_TTL_SECS: i64 = 15 * 60;
/// `iss` and `aud` of a token minted with neither `--policy` nor `--issuer` / `--audience`: the
/// policy's issuer for this key is then `{issuer: guardrail, audiences: [guardrail]}` (or has no
/// `audiences`).
const DEFAULT_ISSUER: &str = "guardrail";
const DEFAULT_AUDIENCE: &str = "guardrail";
/// Without a policy to bound it, a "short-lived" credential lives at most a day.
const MAX_TTL_WITHOUT_POLICY_SECS: i64 = 86_400;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The private signing key (a JWK file written by `guardrail keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The app the token is for (its `azp` and `sub`).
    #[arg(long)]
    app: String,
    /// A dataset to grant, as `dataset:<id>` (e.g. `dataset:loyalty-profiles`); repeat for several.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// Lifetime, e.g. `5m`, `15m` (default: the policy's `jit_max_ttl`, else 15m).
    #[arg(long)]
    ttl: Option<String>,
    /// `iss` claim (default with --policy: the issuer whose JWKS holds the key; else `guardrail`).
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim (default with --policy: the issuer's audience; else `guardrail`).
    #[arg(long)]
    audience: Option<String>,
    /// Check the request against this policy (file or directory) first.
    #[arg(long)]
    policy: Option<PathBuf>,
}

/// What a token will say, once the request is judged acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub issuer: String,
    pub audience: Option<String>,
    /// The `kid` header: the one the trusting issuer lists for the key (if any).
    pub kid: Option<String>,
    /// The claim the issuer reads the app from, when it is not `azp` or `sub`.
    pub app_claim: Option<String>,
    pub ttl_secs: i64,
}

/// A mint request, from the command line.
#[derive(Debug, Clone)]
pub struct Request {
    pub app: String,
    pub scopes: Vec<String>,
    pub ttl_secs: Option<i64>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(&args.key).with_context(|| format!("cannot read the key {}", args.key.display()))?;
    let key = SigningKey::from_jwk(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.key.display()))?;
    warn_if_readable_by_others(&args.key);
    let request = Request {
        app: args.app.clone(),
        scopes: args.scopes.clone(),
        ttl_secs: args.ttl.as_deref().map(ttl_secs).transpose()?,
        issuer: args.issuer.clone(),
        audience: args.audience.clone(),
    };
    check_request(&request)?;
    let now = now_secs();
    let token = match &args.policy {
        None => {
            let plan = plan_without_policy(&request, &key)?;
            if request.issuer.is_none() || request.audience.is_none() {
                eprintln!(
                    "note: no --policy: the token says iss `{}`, aud `{}`; the policy's issuer of this key \
                     must be named so (or give --issuer / --audience, or --policy to take them from it)",
                    plan.issuer,
                    plan.audience.as_deref().unwrap_or_default()
                );
            }
            mint(&key, &request, &plan, now)?
        }
        Some(path) => {
            let Some((_, doc)) = crate::policy::load_or_report(path) else {
                return Ok(ExitCode::FAILURE);
            };
            let plan = match plan_with_policy(&doc.json, &doc.policy, &key, &request, now) {
                Ok(plan) => plan,
                Err(reasons) => {
                    eprintln!("error: refusing to mint a token for app `{}`:", request.app);
                    for reason in reasons {
                        eprintln!("  - {reason}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            let token = mint(&key, &request, &plan, now)?;
            // What the filter will do with it: verify against the policy's issuers.
            let verified = guardrail_core::jwt::verify(&doc.policy.issuers, &token, now)
                .map_err(|e| anyhow::anyhow!("the minted token does not verify with the policy: {e}"))?;
            if verified.app != request.app {
                anyhow::bail!(
                    "the policy reads the app from claim `{}`, which says `{}`",
                    doc.policy.issuers.get(verified.issuer).map_or("?", |i| i.app_claim.as_str()),
                    verified.app
                );
            }
            token
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{token}").context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// `15m` → 900; a lifetime is whole seconds, at least one.
fn ttl_secs(text: &str) -> Result<i64, UsageError> {
    let ns = parse_duration(text).map_err(|e| UsageError(format!("--ttl: {e}")))?;
    if ns % NANOS_PER_SEC != 0 {
        return Err(UsageError(format!("--ttl {text}: a token's lifetime is whole seconds")));
    }
    i64::try_from(ns / NANOS_PER_SEC).map_err(|_| UsageError(format!("--ttl {text}: too long")))
}

/// Checks what needs no policy: the app id and the scopes are usable in a token.
fn check_request(request: &Request) -> Result<(), UsageError> {
    if request.app.is_empty() || request.app.chars().any(char::is_control) {
        return Err(UsageError("--app must be an app id (non-empty, printable)".into()));
    }
    for (i, scope) in request.scopes.iter().enumerate() {
        if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UsageError(format!(
                "--scope {scope:?}: a scope is one word without spaces (the claim is space-separated)"
            )));
        }
        match scope.strip_prefix("dataset:") {
            Some("") => {
                return Err(UsageError("--scope dataset: needs a dataset id, e.g. dataset:loyalty-profiles".into()))
            }
            Some(_) => {}
            // The filter reads only `dataset:<id>` scopes: any other would be a token that opens nothing.
            None => {
                return Err(UsageError(format!(
                    "--scope {scope}: a scope names a dataset as `dataset:<id>`; write --scope dataset:{scope}"
                )))
            }
        }
        if request.scopes[..i].contains(scope) {
            return Err(UsageError(format!("--scope {scope} is given twice")));
        }
    }
    Ok(())
}

fn plan_without_policy(request: &Request, key: &SigningKey) -> Result<Plan, UsageError> {
    let ttl_secs = request.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if ttl_secs > MAX_TTL_WITHOUT_POLICY_SECS {
        return Err(UsageError(format!("--ttl of {ttl_secs} s: a JIT credential lives at most a day")));
    }
    Ok(Plan {
        issuer: request.issuer.clone().unwrap_or_else(|| DEFAULT_ISSUER.to_string()),
        audience: Some(request.audience.clone().unwrap_or_else(|| DEFAULT_AUDIENCE.to_string())),
        kid: Some(key.kid.clone()),
        app_claim: None,
        ttl_secs,
    })
}

/// Judges the request against the policy (`json` is the document, `policy` its compiled form).
/// The error lists every reason the filter would refuse the token, or mint could not make one.
pub fn plan_with_policy(
    json: &Value,
    policy: &CompiledPolicy,
    key: &SigningKey,
    request: &Request,
    now: i64,
) -> Result<Plan, Vec<String>> {
    let mut reasons = Vec::new();
    let mut plan = Plan {
        issuer: String::new(),
        audience: None,
        kid: None,
        app_claim: None,
        ttl_secs: request.ttl_secs.unwrap_or(policy.settings.jit_max_ttl_secs),
    };
    plan_issuer(json, policy, key, request.issuer.as_deref(), request.audience.as_ref(), &mut plan, &mut reasons);

    let app_id = &request.app;
    match policy.app(app_id) {
        None => reasons.push(format!("app `{app_id}` is not in the catalog")),
        Some(app) => {
            // The filter's own lifecycle step (lifecycle, environment, review_by).
            if let Err(denial) = guardrail_core::decide::check_lifecycle(app, now) {
                reasons.push(format!("the filter refuses the app (app-not-active): {}", denial.detail));
            }
            for scope in &request.scopes {
                let Some(id) = scope.strip_prefix("dataset:") else {
                    continue;
                };
                let Some(ds) = policy.datasets.iter().find(|d| d.id == id) else {
                    let known: Vec<&str> = policy.datasets.iter().map(|d| d.id.as_str()).collect();
                    reasons.push(format!(
                        "scope {scope}: no dataset `{id}` in the policy (datasets: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ));
                    continue;
                };
                if !app.data_classes.contains(&ds.classification) {
                    let classes: Vec<&str> = app.data_classes.iter().map(|c| c.as_str()).collect();
                    reasons.push(format!(
                        "scope {scope}: dataset `{id}` holds {} data, which is not among app `{app_id}`'s data_classes ({})",
                        ds.classification.as_str(),
                        if classes.is_empty() { "none".to_string() } else { classes.join(", ") }
                    ));
                }
                if !ds.allowed_regions.contains(&app.region) {
                    reasons.push(format!(
                        "scope {scope}: app `{app_id}` is in region {}, and dataset `{id}` may be reached from {} only",
                        app.region,
                        ds.allowed_regions.join(", ")
                    ));
                }
            }
        }
    }

    let max = policy.settings.jit_max_ttl_secs;
    if plan.ttl_secs > max {
        reasons.push(format!(
            "a lifetime of {} s is above the policy's settings.jit_max_ttl of {max} s: the filter would refuse it as a JIT credential",
            plan.ttl_secs
        ));
    }
    if reasons.is_empty() {
        Ok(plan)
    } else {
        Err(reasons)
    }
}

/// The issuer part of a plan: the issuer of the policy that trusts `key` (`wanted_issuer` if
/// given), its `kid` for the key, the claim it reads the app from, and the audience (`wanted_audience`
/// if given, else the issuer's only one). What does not fit goes to `reasons`.
fn plan_issuer(
    json: &Value,
    policy: &CompiledPolicy,
    key: &SigningKey,
    wanted_issuer: Option<&str>,
    wanted_audience: Option<&String>,
    plan: &mut Plan,
    reasons: &mut Vec<String>,
) {
    let issuer = trusting_issuer(json, key, wanted_issuer);
    match issuer {
        Err(reason) => reasons.push(reason),
        Ok((name, kid)) => {
            plan.issuer = name.clone();
            plan.kid = kid;
            if let Some(compiled) = policy.issuers.iter().find(|i| i.issuer == name) {
                if !matches!(compiled.app_claim.as_str(), "azp" | "sub") {
                    plan.app_claim = Some(compiled.app_claim.clone());
                }
                match (wanted_audience, compiled.audiences.as_slice()) {
                    (Some(a), accepted) if !accepted.is_empty() && !accepted.contains(a) => {
                        reasons
                            .push(format!("audience `{a}` is not one issuer {name} accepts ({})", accepted.join(", ")));
                    }
                    (Some(a), _) => plan.audience = Some(a.clone()),
                    (None, []) => {}
                    (None, [one]) => plan.audience = Some(one.clone()),
                    (None, many) => reasons.push(format!(
                        "issuer {name} accepts several audiences ({}): choose one with --audience",
                        many.join(", ")
                    )),
                }
            }
        }
    }
}

/// The plan of the companion's token service (`serve --issuer-key`) for `policy`: the issuer that
/// trusts `key`, its first audience, lifetimes of `jit_max_ttl`. The error says why none fits.
pub fn service_plan(json: &Value, policy: &CompiledPolicy, key: &SigningKey) -> Result<Plan, String> {
    let mut plan = Plan {
        issuer: String::new(),
        audience: None,
        kid: None,
        app_claim: None,
        ttl_secs: policy.settings.jit_max_ttl_secs,
    };
    let mut reasons = Vec::new();
    let first_audience = trusting_issuer(json, key, None)
        .ok()
        .and_then(|(name, _)| policy.issuers.iter().find(|i| i.issuer == name))
        .and_then(|i| i.audiences.first().cloned());
    plan_issuer(json, policy, key, None, first_audience.as_ref(), &mut plan, &mut reasons);
    if reasons.is_empty() {
        Ok(plan)
    } else {
        Err(reasons.join("; "))
    }
}

/// The issuer of the policy whose JWKS holds `key` (by its public key `x`), with the `kid` that
/// JWKS gives it. `wanted` (from `--issuer`) must be such an issuer.
fn trusting_issuer(json: &Value, key: &SigningKey, wanted: Option<&str>) -> Result<(String, Option<String>), String> {
    let x = key.x();
    let issuers =
        json.pointer("/settings/identity/jwt").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let names: Vec<&str> = issuers.iter().filter_map(|i| i.get("issuer").and_then(Value::as_str)).collect();
    let mut trusting: Vec<(String, Option<String>)> = Vec::new();
    for issuer in issuers {
        let Some(name) = issuer.get("issuer").and_then(Value::as_str) else {
            continue;
        };
        let keys = issuer.pointer("/jwks/keys").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for k in keys {
            if k.get("kty").and_then(Value::as_str) == Some("OKP")
                && k.get("x").and_then(Value::as_str) == Some(x.as_str())
            {
                let kid = k.get("kid").and_then(Value::as_str).map(str::to_owned);
                trusting.push((name.to_owned(), kid));
            }
        }
    }
    let add_it = format!("add its public JWK {} under settings.identity.jwt[].jwks.keys", key.public_jwk());
    match wanted {
        Some(wanted) => {
            if let Some(found) = trusting.into_iter().find(|(name, _)| name == wanted) {
                return Ok(found);
            }
            if names.contains(&wanted) {
                Err(format!("issuer {wanted} does not trust this key (kid {}): {add_it}", key.kid))
            } else {
                Err(format!(
                    "issuer {wanted} is not in the policy (issuers: {})",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ))
            }
        }
        None => match trusting.as_slice() {
            [] => Err(format!("no issuer of the policy trusts this key (kid {}): {add_it}", key.kid)),
            [(first, _), rest @ ..] if rest.iter().any(|(n, _)| n != first) => {
                let mut all: Vec<&str> = trusting.iter().map(|(n, _)| n.as_str()).collect();
                all.dedup();
                Err(format!("several issuers trust this key ({}): choose one with --issuer", all.join(", ")))
            }
            [one, ..] => Ok(one.clone()),
        },
    }
}

/// Signs the token the plan describes, issued at `now`.
pub fn mint(key: &SigningKey, request: &Request, plan: &Plan, now: i64) -> anyhow::Result<String> {
    mint_with_jti(key, request, plan, now).map(|(token, _)| token)
}

/// [`mint`], also returning the token's `jti` (for the audit trail).
pub fn mint_with_jti(key: &SigningKey, request: &Request, plan: &Plan, now: i64) -> anyhow::Result<(String, String)> {
    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|e| anyhow::anyhow!("the system's random number generator failed: {e}"))?;
    let mut header = Map::new();
    header.insert("alg".into(), json!("EdDSA"));
    header.insert("typ".into(), json!("JWT"));
    if let Some(kid) = &plan.kid {
        header.insert("kid".into(), json!(kid));
    }
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(plan.issuer));
    if let Some(aud) = &plan.audience {
        claims.insert("aud".into(), json!(aud));
    }
    claims.insert("sub".into(), json!(request.app));
    claims.insert("azp".into(), json!(request.app));
    if let Some(claim) = &plan.app_claim {
        claims.insert(claim.clone(), json!(request.app));
    }
    if !request.scopes.is_empty() {
        claims.insert("scope".into(), json!(request.scopes.join(" ")));
    }
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now.saturating_add(plan.ttl_secs)));
    let jti = b64(&jti);
    claims.insert("jti".into(), json!(jti));
    Ok((key.sign_jwt(&header, &claims), jti))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: the signing key {} can be read by others (mode {mode:o}); `chmod 600` it",
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &std::path::Path) {}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod mesh_tests;
