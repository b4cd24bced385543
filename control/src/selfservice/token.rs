//! `POST /api/v1/token`: JIT tokens by OAuth 2.0 client credentials (RFC 6749 §4.4).
//!
//! The request is form-encoded: `grant_type=client_credentials`, `scope=dataset:<id>` (several
//! space-separated), and the client's credentials: `client_id` (the app id) and `client_secret`
//! (one of its API keys, checked against the digests in the policy), either in the form or as HTTP
//! Basic (§2.3.1: both form-urlencoded, then `id:secret` in base64) — not both. A token is issued
//! only when the filter would admit the app to every dataset asked for on what does not hang on
//! one request ([`guardrail_core::decide::admit_to_dataset`]: lifecycle and review date, an
//! approved connector, region, data class), and for a dataset marked `approval: required` never
//! without an approved request. It lives `settings.jit_max_ttl`, carries a random `jti`, and is
//! recorded in the trail.
//!
//! Errors follow §5.2: `invalid_request` (400), `invalid_client` (401, with `WWW-Authenticate:
//! Basic` when Basic was used), `unsupported_grant_type` (400), `invalid_scope` (400),
//! `unauthorized_client` (400: the app may have no token at all now — not active, overdue, no
//! approved connector). Every answer carries `Cache-Control: no-store`. A client past its rate
//! (`--token-rate`) gets 429 `slow_down` with `Retry-After`: the rate of all companions together
//! when they share a Redis store.

use super::{json_response, SelfService};
use crate::mint::Request;
use crate::store::Event;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64ct::{Base64, Encoding};
use guardrail_core::decide::{admit_to_dataset, Code};
use std::sync::Arc;

/// Bodies above this are refused before they are parsed.
const MAX_FORM_BYTES: usize = 8 * 1024;

/// An OAuth error answer (RFC 6749 §5.2).
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    basic: bool,
    retry_after: Option<u64>,
}

fn refuse(status: StatusCode, error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError { status, error, description: description.into(), basic: false, retry_after: None }
}

fn invalid_request(description: impl Into<String>) -> OAuthError {
    refuse(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_scope(description: impl Into<String>) -> OAuthError {
    refuse(StatusCode::BAD_REQUEST, "invalid_scope", description)
}

impl OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "error_description": self.description});
        let mut r = no_store(json_response(self.status, &body));
        if self.basic && self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"guardrail\", charset=\"UTF-8\""),
            );
        }
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// The form's parameters, each at most once (§3.2: a repeated parameter is an error); parameters
/// sent without a value count as omitted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Form {
    pub grant_type: Option<String>,
    pub scope: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// Parses an `application/x-www-form-urlencoded` body.
pub fn parse_form(body: &[u8]) -> Result<Form, String> {
    let mut form = Form::default();
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if seen.iter().any(|s| *s == name) {
            return Err(format!("parameter `{}` is given more than once", shown(&name)));
        }
        seen.push(name.to_string());
        if value.is_empty() {
            continue;
        }
        let slot = match name.as_ref() {
            "grant_type" => &mut form.grant_type,
            "scope" => &mut form.scope,
            "client_id" => &mut form.client_id,
            "client_secret" => &mut form.client_secret,
            // §3.2 / §4.4.2: unknown parameters are ignored.
            _ => continue,
        };
        *slot = Some(value.into_owned());
    }
    Ok(form)
}

/// At most 64 characters of a client-given string, for an error message.
pub(crate) fn shown(text: &str) -> String {
    let mut s: String = text.chars().take(64).filter(|c| !c.is_control()).collect();
    if text.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// The client id and secret of an `Authorization: Basic` header (RFC 6749 §2.3.1: each
/// form-urlencoded before base64), `None` without one.
pub fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| "the Authorization header is not ASCII".to_string())?;
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return Err("the Authorization header is not `Basic <credentials>`".into());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(format!("client authentication by `{}` is not supported: use Basic or the form", shown(scheme)));
    }
    let decoded = Base64::decode_vec(encoded.trim()).map_err(|_| "the Basic credentials are not base64".to_string())?;
    let decoded = String::from_utf8(decoded).map_err(|_| "the Basic credentials are not UTF-8".to_string())?;
    let (id, secret) = decoded.split_once(':').ok_or("the Basic credentials have no `:`")?;
    let unescape = |s: &str| -> String {
        form_urlencoded::parse(format!("x={s}").as_bytes()).map(|(_, v)| v.into_owned()).collect()
    };
    Ok(Some((unescape(id), unescape(secret))))
}

/// `POST /api/v1/token`.
pub async fn issue(State(service): State<Arc<SelfService>>, headers: HeaderMap, body: Bytes) -> Response {
    match judge(&service, &headers, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn judge(service: &SelfService, headers: &HeaderMap, body: &[u8]) -> Result<Response, OAuthError> {
    let form_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = form_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(invalid_request(format!(
            "the request must be application/x-www-form-urlencoded (RFC 6749 §4.4.2), not `{}`",
            shown(if media.is_empty() { "(none)" } else { media })
        )));
    }
    if body.len() > MAX_FORM_BYTES {
        return Err(invalid_request(format!("the form is larger than {MAX_FORM_BYTES} bytes")));
    }
    let form = parse_form(body).map_err(invalid_request)?;
    let basic = basic_credentials(headers).map_err(|e| OAuthError { basic: true, ..invalid_request(e) })?;
    let used_basic = basic.is_some();
    let (client_id, secret) = match (basic, form.client_secret) {
        (Some(_), Some(_)) => {
            return Err(invalid_request(
                "the client authenticates once: HTTP Basic or client_secret in the form, not both",
            ))
        }
        (Some((id, secret)), None) => {
            if form.client_id.as_ref().is_some_and(|f| *f != id) {
                return Err(invalid_request("client_id in the form is not the one of the Basic credentials"));
            }
            (id, secret)
        }
        (None, secret) => {
            let Some(id) = form.client_id else {
                return Err(OAuthError {
                    basic: true,
                    ..refuse(StatusCode::UNAUTHORIZED, "invalid_client", "no client_id: send the app id as client_id")
                });
            };
            let Some(secret) = secret else {
                return Err(OAuthError {
                    basic: true,
                    ..refuse(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        "no client authentication: send the app's API key as client_secret or by HTTP Basic",
                    )
                });
            };
            (id, secret)
        }
    };
    match form.grant_type.as_deref() {
        None => return Err(invalid_request("grant_type is missing: send grant_type=client_credentials")),
        Some("client_credentials") => {}
        Some(other) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type `{}`: this token endpoint supports client_credentials only", shown(other)),
            ))
        }
    }

    let snapshot = service.hub.current();
    let policy = &snapshot.policy;
    let unknown = || OAuthError {
        basic: used_basic,
        ..refuse(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client or wrong secret")
    };
    // Only apps of the catalog have a bucket (memory is bounded by the catalog).
    let Some(app) = policy.app(&client_id) else {
        return Err(unknown());
    };
    if let Err(retry_after) = service.take_token_request(&app.id).await {
        return Err(OAuthError {
            retry_after: Some(retry_after),
            ..refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                format!(
                    "client `{}` made more than {} token requests in {:?}",
                    app.id, service.limiter.rate.requests, service.limiter.rate.per
                ),
            )
        });
    }
    if policy.app_by_api_key(&secret).is_none_or(|owner| owner.id != app.id) {
        return Err(unknown());
    }

    let Some(scope) = form.scope else {
        return Err(invalid_scope("no scope: ask for scope=dataset:<id>"));
    };
    let scopes: Vec<String> = scope.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
    if scopes.is_empty() {
        return Err(invalid_scope("no scope: ask for scope=dataset:<id>"));
    }
    let now = service.hub.now();
    let mut ends: Option<i64> = None;
    for (i, s) in scopes.iter().enumerate() {
        if scopes[..i].contains(s) {
            return Err(invalid_scope(format!("scope `{}` is asked for twice", shown(s))));
        }
        let Some(id) = s.strip_prefix("dataset:") else {
            return Err(invalid_scope(format!("scope `{}`: scopes name datasets, as dataset:<id>", shown(s))));
        };
        let Some(ds) = policy.datasets.iter().find(|d| d.id == id) else {
            return Err(invalid_scope(format!("scope `{}`: no dataset `{}` in the policy", shown(s), shown(id))));
        };
        if let Err(denial) = admit_to_dataset(policy, app, ds, now) {
            let detail = format!("the filter would refuse it: {} ({})", denial.detail, denial.code.as_str());
            return Err(match denial.code {
                // The app may have no token at all now.
                Code::AppNotActive | Code::ConnectorNotApproved => {
                    refuse(StatusCode::BAD_REQUEST, "unauthorized_client", detail)
                }
                _ => invalid_scope(format!("scope `{s}`: {detail}")),
            });
        }
        if ds.approval_required {
            if let Some(grant) = app.access_grant(id, now) {
                // The token ends with the approval at the latest.
                ends = Some(ends.map_or(grant.expires_at_secs, |e: i64| e.min(grant.expires_at_secs)));
                continue;
            }
            return Err(invalid_scope(format!(
                "scope `{s}`: dataset `{id}` is marked approval: required and app `{}` has no approved access request \
                 for it in force (file one: guardrail request access --dataset {id} …)",
                app.id
            )));
        }
    }

    let mut plan = service
        .plan(&snapshot)
        .map_err(|why| refuse(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", why))?;
    if let Some(ends) = ends {
        plan.ttl_secs = plan.ttl_secs.min(ends.saturating_sub(now)).max(1);
    }
    let request = Request { app: app.id.clone(), scopes: scopes.clone(), ttl_secs: None, issuer: None, audience: None };
    let key = service.key.as_ref().ok_or_else(|| {
        refuse(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "no --issuer-key on this companion")
    })?;
    let (token, jti) = crate::mint::mint_with_jti(key, &request, &plan, now)
        .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.to_string()))?;
    let scope = scopes.join(" ");
    let recorded = service.record(Event {
        at: now,
        kind: "token".into(),
        id: jti,
        app: app.id.clone(),
        actor: app.id.clone(),
        detail: format!("scope {scope}, expires {}", crate::log::rfc3339_secs(now.saturating_add(plan.ttl_secs))),
        companion: service.hub.name(),
    });
    if !recorded {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the audit trail cannot take more entries now (the store is unavailable): no token is issued unrecorded",
        ));
    }
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": plan.ttl_secs,
        "scope": scope,
    });
    Ok(no_store(json_response(StatusCode::OK, &body)))
}
