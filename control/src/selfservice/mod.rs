//! Self-service on the companion's HTTP port (`guardrail serve --http ADDR`): the token service
//! (`POST /api/v1/token`, OAuth 2.0 client credentials, [`token`]) and the self-service trail
//! (`GET /api/v1/audit/events`). The console merges [`router`] into its own.
//!
//! Keys stay in the companion: the issuer's private key (`--issuer-key F`) signs, apps authenticate
//! with their API key, and what the token service does is recorded in the store's trail.

pub mod approvals;
pub mod requests;
pub mod token;

use crate::console::{problem, same};
use crate::jwk::SigningKey;
use crate::log::log;
use crate::mint::Plan;
use crate::serve::hub::{Hub, Snapshot};
use crate::store::Event;
use anyhow::Context;
use axum::extract::State;
use axum::http::Uri;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use guardrail_core::duration::parse_duration;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Token requests a client may make (authenticated or not) by default: `--token-rate`.
pub const DEFAULT_TOKEN_RATE: &str = "60/1m";
/// Trail entries waiting for the store; beyond this the token service refuses rather than issue a
/// token the trail would not show.
const TRAIL_QUEUE: usize = 65_536;
/// Entries written to the store in one call.
const TRAIL_BATCH: usize = 1_024;

/// A token plan and the snapshot it was made for.
type PlanOf = (Arc<Snapshot>, Result<Plan, String>);

/// The self-service side of the companion, shared by its handlers.
pub struct SelfService {
    hub: Arc<Hub>,
    key: Option<SigningKey>,
    /// The token plan (issuer, audience, lifetime) of the snapshot it was computed for.
    plan: Mutex<Option<PlanOf>>,
    limiter: Limiter,
    trail: mpsc::Sender<Event>,
    /// The console's token, which the trail's reader must bring (`--http-token-file`).
    console_token: Option<Arc<str>>,
}

/// What `serve` gives the self-service side.
pub struct Options {
    /// `--issuer-key`, already checked by [`load_issuer_key`].
    pub key: Option<SigningKey>,
    /// `--token-rate`: requests per client and window.
    pub token_rate: Rate,
    pub console_token: Option<String>,
}

impl SelfService {
    /// The self-service state, and the task that writes the trail to the hub's store (it writes
    /// what is queued and ends once `stop` turns true).
    pub fn start(
        hub: Arc<Hub>,
        options: Options,
        stop: watch::Receiver<bool>,
    ) -> (Arc<SelfService>, tokio::task::JoinHandle<()>) {
        let (trail, pending) = mpsc::channel(TRAIL_QUEUE);
        let writer = tokio::spawn(write_trail(hub.clone(), pending, stop));
        let service = Arc::new(SelfService {
            hub,
            key: options.key,
            plan: Mutex::new(None),
            limiter: Limiter::new(options.token_rate),
            trail,
            console_token: options.console_token.map(Arc::from),
        });
        (service, writer)
    }

    /// The token plan for the snapshot served now (computed once per revision).
    fn plan(&self, snapshot: &Arc<Snapshot>) -> Result<Plan, String> {
        let Some(key) = &self.key else {
            return Err("this companion was started without --issuer-key: it issues no tokens".into());
        };
        let mut cached = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, plan)) = cached.as_ref() {
            if Arc::ptr_eq(s, snapshot) {
                return plan.clone();
            }
        }
        let plan = serde_json::from_str(&snapshot.json)
            .map_err(|e| format!("the policy served is not JSON: {e}"))
            .and_then(|json| crate::mint::service_plan(&json, &snapshot.policy, key));
        if let Err(why) = &plan {
            log!("token service: revision {} gives the issuer key no issuer: {why}", snapshot.revision);
        }
        *cached = Some((snapshot.clone(), plan.clone()));
        plan
    }

    /// Queues an entry for the trail; false when the queue is full (the store is down for long).
    fn record(&self, event: Event) -> bool {
        self.trail.try_send(event).is_ok()
    }
}

/// Writes queued trail entries to the store in batches, keeping them (and retrying every second)
/// while the store is unavailable. Once `stop` turns true it writes what is queued and ends.
async fn write_trail(hub: Arc<Hub>, mut pending: mpsc::Receiver<Event>, mut stop: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(TRAIL_BATCH);
    loop {
        let last = tokio::select! {
            n = pending.recv_many(&mut batch, TRAIL_BATCH) => n == 0,
            _ = stop.wait_for(|stopped| *stopped) => {
                while let Ok(event) = pending.try_recv() {
                    batch.push(event);
                }
                true
            }
        };
        if !batch.is_empty() {
            write_batch(&hub, &batch).await;
            batch.clear();
        }
        if last {
            return;
        }
    }
}

/// Writes one batch, retrying every second while the store is unavailable.
async fn write_batch(hub: &Hub, batch: &[Event]) {
    loop {
        let Some(store) = hub.store() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        match store.add_events(batch).await {
            Ok(()) => return,
            Err(e) => {
                log!("the self-service trail could not be written ({} entries kept): {e}", batch.len());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Reads `--issuer-key F` for `serve`: refused when the file can be read by group or others, is
/// not an Ed25519 private JWK, or no issuer of the policy (`json`, as served) trusts it.
pub fn load_issuer_key(path: &Path, snapshot: &Snapshot) -> anyhow::Result<SigningKey> {
    refuse_if_readable_by_others(path)?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--issuer-key {}: cannot read", path.display()))?;
    let key = SigningKey::from_jwk(&text).map_err(|e| anyhow::anyhow!("--issuer-key {}: {e}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&snapshot.json).context("the policy served is not JSON")?;
    crate::mint::service_plan(&json, &snapshot.policy, &key)
        .map_err(|why| anyhow::anyhow!("--issuer-key {}: {why}", path.display()))?;
    Ok(key)
}

#[cfg(unix)]
fn refuse_if_readable_by_others(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("--issuer-key {}: cannot read", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    let who = match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (true, true) => "its group and others",
        (true, false) => "its group",
        (false, true) => "others",
        (false, false) => return Ok(()),
    };
    anyhow::bail!(
        "--issuer-key {}: the private key can be read by {who} (mode {mode:o}); `chmod 600 {}` and start again",
        path.display(),
        path.display()
    )
}

#[cfg(not(unix))]
fn refuse_if_readable_by_others(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// The routes of the self-service side, to merge into the console's router.
pub fn router(service: Arc<SelfService>) -> Router {
    Router::new()
        .route("/api/v1/token", post(token::issue))
        .route("/api/v1/requests", post(approvals::file_request).get(approvals::list))
        .route("/api/v1/requests/{id}", get(approvals::show))
        .route("/api/v1/requests/{id}/approve", post(approvals::approve))
        .route("/api/v1/requests/{id}/reject", post(approvals::reject))
        .route("/api/v1/audit/events", get(events))
        .with_state(service)
}

// === the trail ===

/// `GET /api/v1/audit/events[?limit=N]`: the newest entries of the self-service trail (default
/// 100), newest first. Needs the console's token where the console does.
async fn events(State(service): State<Arc<SelfService>>, headers: HeaderMap, uri: Uri) -> Response {
    if !console_authorized(service.console_token.as_deref(), &headers) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send Authorization: Bearer <the console's token>",
        );
    }
    let query = uri.query().unwrap_or("");
    let limit = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "limit").map(|(_, v)| v.parse::<usize>());
    let limit = match limit {
        None => 100,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        Some(_) => return problem(StatusCode::BAD_REQUEST, "invalid-request", "limit: a number from 1 to 10000"),
    };
    let Some(store) = service.hub.store() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "no store attached");
    };
    match store.events(limit).await {
        Ok(events) => json_response(StatusCode::OK, &serde_json::json!({ "events": events })),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", &e.to_string()),
    }
}

/// Whether `headers` bring the console's token (always, when the console has none).
pub(crate) fn console_authorized(token: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(token) = token else { return true };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(guardrail_core::decide::bearer_token);
    given.is_some_and(|g| same(g.as_bytes(), token.as_bytes()))
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut r = (status, value.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// === rates ===

/// `requests` per `per` (a token bucket of `requests`, refilled evenly over `per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub per: Duration,
}

/// Parses `N/DURATION` (`60/1m`, `3000/1m`, `5/1s`); `what` names the flag in the error.
pub fn parse_rate(text: &str, what: &str) -> Result<Rate, String> {
    let bad = |why: &str| format!("{what} {text}: {why}; expected REQUESTS/DURATION, e.g. 3000/1m");
    let (n, per) = text.split_once('/').ok_or_else(|| bad("no `/`"))?;
    let requests: u64 = n.trim().parse().map_err(|_| bad("the number of requests is not a whole number"))?;
    if requests == 0 {
        return Err(bad("zero requests is not a rate"));
    }
    let per_ns = parse_duration(per.trim()).map_err(|e| bad(&e.to_string()))?;
    Ok(Rate { requests, per: Duration::from_nanos(per_ns) })
}

impl SelfService {
    /// Takes one token request of `client`: from the bucket every companion of a shared store
    /// (Redis) shares, so that N companions behind one address still give a client its rate, not
    /// N times it; else from this companion's own (one companion, or Redis unreachable: then each
    /// companion limits on its own until it is back; `status` and the log say the store is down,
    /// and while they do the store is not asked, so no request waits for its timeout).
    async fn take_token_request(&self, client: &str) -> Result<(), u64> {
        let down = self.hub.store_status().is_some_and(|s| !s.available);
        if let Some(store) = self.hub.store().filter(|_| !down) {
            let rate = &self.limiter.rate;
            if let Ok(Some(taken)) = store.take_token_request(client, rate.requests, rate.per).await {
                return taken;
            }
        }
        self.limiter.take(client, Instant::now())
    }
}

/// Token buckets by client id, in this companion's memory.
struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    fn new(rate: Rate) -> Limiter {
        Limiter { rate, buckets: Mutex::default() }
    }

    /// Takes one request of `client`'s bucket; the error is the seconds until one is back.
    fn take(&self, client: &str, now: Instant) -> Result<(), u64> {
        let capacity = self.rate.requests as f64;
        let per_sec = capacity / self.rate.per.as_secs_f64();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (level, at) = buckets.entry(client.to_string()).or_insert((capacity, now));
        *level = (*level + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(capacity);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            return Ok(());
        }
        Err(((1.0 - *level) / per_sec).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests;
