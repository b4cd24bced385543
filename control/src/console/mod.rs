//! The console (`guardrail serve --http ADDR`), on the companion's tokio runtime and reading the
//! policy the hub serves and the fleet's usage: the pages (`/` the catalog with search and
//! filters, `/apps/{id}`, `/kpis`, `/report?quarter=`, `/requests`), the JSON API (`/api/v1/apps`,
//! `/api/v1/apps/{id}`, `/api/v1/kpis`, `/api/v1/report`), `/metrics`, `/healthz` and `/readyz`.
//! Beyond loopback every request but the health checks needs `Authorization: Bearer <token>`
//! (`--http-token-file`).
//!
//! Pages and API render one [`model::Model`] (catalog entries as `guardrail catalog` makes them)
//! and the [`kpis`]. Errors are RFC 9457 problem+json: 401 without the token, 404 for an unknown
//! app, 400 naming a bad parameter (`from`, `to`, `quarter`, `format`), 503 when the store cannot
//! be read.

mod html;
pub mod kpis;
mod metrics;
mod model;
mod query;
mod report;
mod requests;

use crate::log::log;
use crate::serve::hub::Hub;
use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Clone)]
struct Console {
    hub: Arc<Hub>,
    token: Option<Arc<str>>,
    model: Arc<model::Cache>,
    /// `/metrics` as rendered for a model: scrapes between two models (at most a second apart)
    /// share one rendering.
    metrics: Arc<std::sync::Mutex<Option<Rendered>>>,
}

/// A model and its `/metrics` text.
type Rendered = (Arc<model::Model>, axum::body::Bytes);

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
    // The detail may quote what was sent: never to be sniffed as a page.
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
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
    match console.model.get(&console.hub).await {
        Ok(m) => {
            let mut r = (StatusCode::OK, m.apps_json.clone()).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(r) => r,
    }
}

async fn app(State(console): State<Console>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let m = match console.model.get(&console.hub).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    match m.app(&id) {
        Some(a) => json(
            &serde_json::json!({"revision": m.revision, "currency": m.currency, "app": a, "datasets": m.detail(a)}),
        ),
        None => unknown_app(&m, &id),
    }
}

fn unknown_app(m: &model::Model, id: &str) -> Response {
    let shown: String = id.chars().take(128).collect();
    problem(StatusCode::NOT_FOUND, "not-found", &format!("no app `{shown}` in revision {}", m.revision))
}

/// `from` and `to` of a query (`YYYY-MM-DD`, default: the last 30 days to today), or a 400
/// naming the bad one.
fn range(q: &query::Query, today: u64) -> Result<(u64, u64), Response> {
    let day = |name: &str, default: u64| match q.get(name) {
        None | Some("") => Ok(default),
        Some(v) => kpis::parse_date(v).ok_or_else(|| {
            let shown: String = v.chars().take(32).collect();
            problem(StatusCode::BAD_REQUEST, "bad-request", &format!("{name}: `{shown}` is not a date YYYY-MM-DD"))
        }),
    };
    let to = day("to", today)?;
    let from = day("from", to.saturating_sub(29))?;
    if from > to {
        return Err(problem(StatusCode::BAD_REQUEST, "bad-request", "from: after `to`"));
    }
    if to - from >= kpis::MAX_RANGE_DAYS {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "bad-request",
            &format!("from: the range is at most {} days", kpis::MAX_RANGE_DAYS),
        ));
    }
    Ok((from, to))
}

/// The quarter of `?quarter=YYYY-Qn`, or a 400 naming `quarter`.
fn quarter(q: &query::Query) -> Result<(String, u64, u64), Response> {
    let text = q.get("quarter").unwrap_or_default();
    match kpis::parse_quarter(text) {
        Some((from, to)) => Ok((text.to_string(), from, to)),
        None => {
            let shown: String = text.chars().take(32).collect();
            Err(problem(
                StatusCode::BAD_REQUEST,
                "bad-request",
                &format!("quarter: `{shown}` is not YYYY-Qn (e.g. 2026-Q4)"),
            ))
        }
    }
}

async fn kpis_of(console: &Console, from: u64, to: u64) -> Result<(Arc<model::Model>, kpis::Kpis), Response> {
    let m = console.model.get(&console.hub).await?;
    let days = console.model.days(&console.hub, from.saturating_sub(kpis::TRAILING_DAYS), to).await?;
    let k = kpis::kpis(&m.snapshot.policy, &days, &m.callers, from, to);
    Ok((m, k))
}

/// Authorised, the range of the query's `from` and `to`, and its KPIs.
async fn range_kpis(
    console: &Console,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Arc<model::Model>, kpis::Kpis), Response> {
    authorized(console, headers)?;
    let (from, to) = range(&query::Query::parse(uri.query()), console.hub.today())?;
    kpis_of(console, from, to).await
}

/// Authorised, the query's `quarter` and its report, and the query.
async fn quarter_report(
    console: &Console,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(report::Report, query::Query), Response> {
    authorized(console, headers)?;
    let q = query::Query::parse(uri.query());
    let (name, from, to) = quarter(&q)?;
    let (m, k) = kpis_of(console, from, to).await?;
    let mut report = report::Report::new(&name, &m, k);
    // The quarter before, summed the same way, to compare with (days before the store's history
    // count nothing).
    if let Some((before, (from, to))) =
        kpis::previous_quarter(&name).and_then(|p| kpis::parse_quarter(&p).map(|r| (p, r)))
    {
        let (_, k) = kpis_of(console, from, to).await?;
        report.previous = Some(report::Summary::of(&before, &k));
    }
    Ok((report, q))
}

fn either(r: Result<Response, Response>) -> Response {
    r.unwrap_or_else(|e| e)
}

async fn api_kpis(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    either(range_kpis(&console, &headers, &uri).await.map(|(_, k)| json(&serde_json::json!(k))))
}

async fn page_kpis(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    either(range_kpis(&console, &headers, &uri).await.map(|(m, k)| html(html::kpis(&m, &k))))
}

async fn api_report(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (report, q) = match quarter_report(&console, &headers, &uri).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match q.get("format").unwrap_or("json") {
        "json" => json(&serde_json::json!(report)),
        "csv" => {
            let mut r = (StatusCode::OK, report.csv()).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
            r
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            problem(StatusCode::BAD_REQUEST, "bad-request", &format!("format: `{shown}` is neither json nor csv"))
        }
    }
}

async fn page_report(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    either(quarter_report(&console, &headers, &uri).await.map(|(report, _)| html(html::report(&report))))
}

async fn page_catalog(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let q = query::Query::parse(uri.query());
    let candidate = console.hub.candidate_status();
    let pending = requests::pending_count(&console.hub).await;
    match console.model.get(&console.hub).await {
        Ok(m) => html(html::catalog(&m, &q, candidate.as_ref(), pending)),
        Err(r) => r,
    }
}

/// `/requests[?app=ID]`: the self-service requests, pending first (see [`requests`]).
async fn page_requests(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let q = query::Query::parse(uri.query());
    let m = match console.model.get(&console.hub).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    match requests::load(&console.hub).await {
        Ok(all) => {
            let risk = |app: &str| m.app(app).map(|a| a.entry.risk.clone());
            let mut r = html(requests::render(&all, &risk, q.value("app")));
            r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, requests::CSP.clone());
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(r) => r,
    }
}

/// The shadow candidate (`serve --candidate`): its revision, the nodes deciding with it, those
/// that rejected it, and where its outcomes differ from the enforced policy's, per app and pair of
/// outcomes (summed over nodes, largest first). `{"candidate": null}` when none is served.
async fn api_shadow(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let candidate = console.hub.candidate_status().map(|c| {
        serde_json::json!({
            "revision": c.revision,
            "last_error": c.last_error,
            "applied_nodes": c.applied_nodes,
            "nacked_nodes": c.nacked_nodes,
            "differences": c.differences.iter().map(|d| serde_json::json!({
                "app": d.app, "enforced": d.enforced, "candidate": d.candidate, "count": d.count,
            })).collect::<Vec<_>>(),
        })
    });
    json(&serde_json::json!({ "candidate": candidate }))
}

async fn page_app(State(console): State<Console>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let today = console.hub.today();
    let days = match console.model.days(&console.hub, today.saturating_sub(89), today).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let m = match console.model.get(&console.hub).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    match m.app(&id) {
        Some(a) => html(html::app(&m, a, &days, today)),
        None => unknown_app(&m, &id),
    }
}

async fn metrics_page(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    let m = match console.model.get(&console.hub).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let cached = {
        let slot = console.metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref().filter(|(of, _)| Arc::ptr_eq(of, &m)).map(|(_, text)| text.clone())
    };
    let rendered = match cached {
        Some(text) => Ok(text),
        None => metrics::render(&console.hub, &m).map(|text| {
            let text = axum::body::Bytes::from(text);
            *console.metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((m.clone(), text.clone()));
            text
        }),
    };
    match rendered {
        Ok(text) => {
            let mut r = (StatusCode::OK, text).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", &format!("metrics: {e}")),
    }
}

fn html(body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    r
}

async fn not_found(State(console): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&console, &headers) {
        return r;
    }
    problem(StatusCode::NOT_FOUND, "not-found", "no such page")
}

/// The client certificate of the connection a request came on (`--http-client-ca`): the SHA-256
/// of its DER, as `settings.approvers[].certificate` lists it. The server takes it from the TLS
/// session, never from a header; `None` on a connection without one.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientCertificate(pub Option<[u8; 32]>);

/// What a handler extracts to learn the connection's client certificate (absent when the port is
/// plain text or the router is called directly, as unit tests do).
pub type Peer = Option<axum::Extension<axum::extract::ConnectInfo<ClientCertificate>>>;

/// The fingerprint of the client certificate a request came with, if any.
pub fn peer_certificate(peer: &Peer) -> Option<[u8; 32]> {
    peer.as_ref().and_then(|axum::Extension(axum::extract::ConnectInfo(c))| c.0)
}

/// The connections that completed a TLS handshake (see [`crate::serve::tls_incoming`]).
struct TlsListener {
    handshaken: tokio::sync::mpsc::Receiver<std::io::Result<TlsStream>>,
    addr: SocketAddr,
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsStream, SocketAddr) {
        loop {
            match self.handshaken.recv().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop ends only when this receiver is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for ClientCertificate {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let (_, session) = stream.io().get_ref();
        ClientCertificate(session.peer_certificates().and_then(|chain| chain.first()).map(crate::tls::fingerprint))
    }
}

/// Serves the console on `listener` until the process stops: over TLS with `tls` (each request
/// then knows the connection's [`ClientCertificate`]), else plain text.
pub fn start(
    listener: TcpListener,
    hub: Arc<Hub>,
    token: Option<String>,
    more: Router,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> tokio::task::JoinHandle<()> {
    let console = Console { hub, token: token.map(Arc::from), model: Arc::default(), metrics: Arc::default() };
    let router = Router::new()
        .route("/", get(page_catalog))
        .route("/apps/{id}", get(page_app))
        .route("/kpis", get(page_kpis))
        .route("/report", get(page_report))
        .route("/requests", get(page_requests))
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/apps", get(apps))
        .route("/api/v1/apps/{id}", get(app))
        .route("/api/v1/kpis", get(api_kpis))
        .route("/api/v1/report", get(api_report))
        .route("/api/v1/shadow", get(api_shadow))
        .fallback(not_found)
        .with_state(console)
        .merge(more);
    tokio::spawn(async move {
        let served = match tls {
            None => axum::serve(listener, router).await,
            Some(tls) => match listener.local_addr() {
                Ok(addr) => {
                    let handshaken = crate::serve::tls_incoming(listener, tls, true).into_inner();
                    let service = router.into_make_service_with_connect_info::<ClientCertificate>();
                    axum::serve(TlsListener { handshaken, addr }, service).await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = served {
            log!("the console stopped: {e}");
        }
    })
}
