//! The console's HTTP side (`guardrail serve --http ADDR`), on the companion's tokio runtime and
//! reading the policy the hub serves: `/healthz`, `/readyz`, `/api/v1/apps` and
//! `/api/v1/apps/{id}` (the catalog entries of `guardrail catalog`). Beyond loopback every request
//! but the health checks needs `Authorization: Bearer <token>` (`--http-token-file`).
//!
//! Errors are RFC 9457 problem+json: 401 without the token, 404 for an unknown app.

use crate::log::log;
use crate::serve::hub::{Hub, Snapshot};
use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::net::TcpListener;

#[derive(Clone)]
struct Console {
    hub: Arc<Hub>,
    token: Option<Arc<str>>,
    keys: Arc<Mutex<Option<KeysOf>>>,
}

/// Every app's API-key digests (by app index) of one snapshot: built once per revision, not once
/// per request (it reads every key of the policy).
type KeysByApp = Arc<Vec<Vec<[u8; 32]>>>;

/// The snapshot a [`KeysByApp`] was built from.
type KeysOf = (Arc<Snapshot>, KeysByApp);

impl Console {
    /// The snapshot served now and its key digests by app.
    fn current(&self) -> (Arc<Snapshot>, KeysByApp) {
        let snapshot = self.hub.current();
        let mut cached = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, keys)) = cached.as_ref() {
            if Arc::ptr_eq(s, &snapshot) {
                return (snapshot, keys.clone());
            }
        }
        let keys = Arc::new(snapshot.policy.api_key_digests_by_app());
        *cached = Some((snapshot.clone(), keys.clone()));
        (snapshot, keys)
    }
}

/// The token that requests must carry when listening on `addr`: none on loopback (unless a file is
/// given), else the one in `token_file`, which is then required.
pub fn token_for(addr: SocketAddr, token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let Some(file) = token_file else {
        if addr.ip().is_loopback() {
            return Ok(None);
        }
        anyhow::bail!(
            "--http {addr} listens beyond loopback: give --http-token-file F so that requests need \
             `Authorization: Bearer <token>` (or listen on 127.0.0.1)"
        );
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading --http-token-file {}", file.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        anyhow::bail!("--http-token-file {}: the token must be at least 16 characters", file.display());
    }
    Ok(Some(token.to_string()))
}

pub(crate) fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:guardrail:problem:{code}"),
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    r
}

fn json(value: &serde_json::Value) -> Response {
    let mut r = (StatusCode::OK, value.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Compares in time independent of where the first difference is.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(console: &Console, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &console.token else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(guardrail_core::decide::bearer_token);
    match given {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(problem(StatusCode::UNAUTHORIZED, "unauthenticated", "the bearer token is not the console's")),
        None => Err(problem(StatusCode::UNAUTHORIZED, "unauthenticated", "send Authorization: Bearer <token>")),
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// Ready once a policy is loaded: the companion does not start without one, so always, with the
/// revision served.
async fn readyz(State(console): State<Console>) -> Response {
    let revision = console.hub.current().revision.clone();
    (StatusCode::OK, format!("ready: revision {revision}\n")).into_response()
}

async fn apps(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let (snapshot, keys) = console.current();
    let now = crate::log::now_secs();
    let entries: Vec<_> = (snapshot.policy.apps.iter().enumerate())
        .map(|(i, a)| {
            let digests = keys.get(i).map(Vec::as_slice).unwrap_or_default();
            crate::catalog::entry(&snapshot.policy, a, digests, now, &Default::default())
        })
        .collect();
    json(&serde_json::json!({"revision": snapshot.revision, "apps": entries}))
}

async fn app(State(console): State<Console>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let (snapshot, keys) = console.current();
    let policy = &snapshot.policy;
    let Some(i) = policy.app_index(&id) else {
        let shown: String = id.chars().take(128).collect();
        return problem(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no app `{shown}` in revision {}", snapshot.revision),
        );
    };
    let Some(a) = policy.apps.get(i) else {
        return problem(StatusCode::NOT_FOUND, "not-found", "no such app");
    };
    let digests = keys.get(i).map(Vec::as_slice).unwrap_or_default();
    let entry = crate::catalog::entry(policy, a, digests, crate::log::now_secs(), &Default::default());
    json(&serde_json::json!({"revision": snapshot.revision, "app": entry}))
}

async fn not_found(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    problem(StatusCode::NOT_FOUND, "not-found", "no such page")
}

/// Serves the console on `listener` until the process stops.
pub fn start(listener: TcpListener, hub: Arc<Hub>, token: Option<String>, more: Router) -> tokio::task::JoinHandle<()> {
    let console = Console { hub, token: token.map(Arc::from), keys: Arc::default() };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/apps", get(apps))
        .route("/api/v1/apps/{id}", get(app))
        .fallback(not_found)
        .with_state(console)
        .merge(more);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            log!("the console stopped: {e}");
        }
    })
}
