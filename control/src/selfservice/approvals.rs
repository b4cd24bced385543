//! Requests and approvals over HTTP, and the loop that keeps the policy served in step with the
//! approved requests in force.
//!
//! - `POST /api/v1/requests` (JSON, [`Filing`]): an app files a request, authenticated by its API
//!   key as HTTP Basic (`app id:API key`). 201 with the request; its id is `id`.
//! - `GET /api/v1/requests[?status=S][&app=A]`, `GET /api/v1/requests/{id}`: approvers (bearer
//!   token), the console's token, or an app (Basic: its own requests only).
//! - `POST /api/v1/requests/{id}/approve` (optional JSON `{"reason": …}`) and `…/reject` (JSON
//!   `{"reason": …}`, required): an approver of `settings.approvers` by bearer token, or by the
//!   client certificate of the connection (mutual TLS, `--http-client-ca`). Nobody
//!   approves a request of an app they own. Approving applies the request to the policy file
//!   (refused, the request left pending, when the result is not a valid policy), marks it approved
//!   in the store (compare-and-set: of two approvers, or two companions, one wins) and pushes the
//!   new revision to the fleet.
//!
//! Every companion runs [`run_sync`]: every second it reads the requests from the store, marks
//! those past their `until` expired (with a trail entry) and serves the file with the approved
//! ones in force, so a request approved on another companion, or expired, reaches its fleet within
//! a second; while the store is unavailable, requests still expire on time from what it applied.

use super::requests::{file, Filing, Request};
use super::token::basic_credentials;
use super::{console_authorized, json_response, SelfService};
use crate::console::{peer_certificate, problem, Peer};
use crate::log::log;
use crate::serve::hub::{Hub, Offer};
use crate::store::{Event, RequestRecord, Store};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use guardrail_core::compile::{Approver, CompiledPolicy, Credential};
use std::sync::Arc;
use std::time::Duration;

/// Bodies above this are refused before they are parsed.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// How often every companion reads the requests back from the store.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

type Refusal = Box<Response>;

fn refuse(status: StatusCode, code: &str, detail: impl AsRef<str>) -> Refusal {
    Box::new(problem(status, code, detail.as_ref()))
}

/// Who is asking.
enum Caller {
    App(String),
    Approver(Approver),
    Console,
}

/// The caller of a request: by its `Authorization` header an app (HTTP Basic: its id and one of
/// its API keys), an approver (a bearer token whose digest `settings.approvers` lists) or the
/// console (its token); without the header, an approver by the client certificate of the
/// connection (`certificate`: its DER's SHA-256, from the TLS session under `--http-client-ca`).
/// The header wins: under mutual TLS an app presents any certificate of the CA and its API key.
fn caller(
    service: &SelfService,
    policy: &CompiledPolicy,
    headers: &HeaderMap,
    certificate: Option<[u8; 32]>,
) -> Result<Caller, Refusal> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return match certificate {
            Some(digest) => by_certificate(policy, digest),
            None => Err(refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send Authorization: Basic <app id:API key> (an app) or Bearer <approver token>, or connect \
                 with an approver's client certificate",
            )),
        };
    };
    let text = value.to_str().unwrap_or_default();
    if text.len() >= 6 && text[..6].eq_ignore_ascii_case("basic ") {
        let (app, key) = basic_credentials(headers)
            .map_err(|e| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", e))?
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "no Basic credentials"))?;
        return match policy.app_by_api_key(&key) {
            Some(owner) if owner.id == app => Ok(Caller::App(app)),
            _ => Err(refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown app id or API key")),
        };
    }
    let Some(token) = guardrail_core::decide::bearer_token(text) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the Authorization header is neither Basic nor Bearer",
        ));
    };
    let digest = guardrail_core::api_key_digest(token);
    if let Some(a) = policy.settings.approvers.iter().find(|a| a.credential == Credential::Token(digest)) {
        return Ok(Caller::Approver(a.clone()));
    }
    if service.console_token.is_some() && console_authorized(service.console_token.as_deref(), headers) {
        return Ok(Caller::Console);
    }
    Err(refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "the bearer token is no approver's (settings.approvers)"))
}

/// The approver whose `certificate:` is `digest`, or a 403 naming the fingerprint (the TLS
/// handshake proved the certificate; it is just not an approver's).
fn by_certificate(policy: &CompiledPolicy, digest: [u8; 32]) -> Result<Caller, Refusal> {
    match policy.settings.approvers.iter().find(|a| a.credential == Credential::Certificate(digest)) {
        Some(a) => Ok(Caller::Approver(a.clone())),
        None => Err(refuse(
            StatusCode::FORBIDDEN,
            "not-an-approver",
            format!(
                "the client certificate sha256:{} is no approver's (settings.approvers); an app sends \
                 Authorization: Basic <app id:API key>",
                hex::encode(digest)
            ),
        )),
    }
}

fn approver(caller: Caller) -> Result<Approver, Refusal> {
    match caller {
        Caller::Approver(a) => Ok(a),
        _ => Err(refuse(
            StatusCode::FORBIDDEN,
            "not-an-approver",
            "only an approver listed in settings.approvers may decide requests",
        )),
    }
}

fn store_of(service: &SelfService) -> Result<Arc<dyn Store>, Refusal> {
    service.hub.store().ok_or_else(|| refuse(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "no store attached"))
}

fn unavailable(e: impl std::fmt::Display) -> Refusal {
    refuse(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", format!("the store is unavailable: {e}; try again"))
}

fn json_body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Refusal> {
    if body.len() > MAX_BODY_BYTES {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid-request",
            format!("at most {MAX_BODY_BYTES} bytes"),
        ));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid-request",
            "send Content-Type: application/json",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        refuse(StatusCode::BAD_REQUEST, "invalid-request", format!("the body is not a valid request: {e}"))
    })
}

/// A stored request as the API shows it (the record's status is the one that counts).
pub(crate) fn request_of(record: &RequestRecord) -> Option<Request> {
    let mut request: Request = serde_json::from_str(&record.record).ok()?;
    request.status.clone_from(&record.status);
    Some(request)
}

fn record_of(request: &Request) -> Result<RequestRecord, Refusal> {
    stored(request)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot encode the request: {e}")))
}

/// A request as the store keeps it (its status apart, for the compare-and-set).
fn stored(request: &Request) -> serde_json::Result<RequestRecord> {
    let record = serde_json::to_string(request)?;
    let filed_at = guardrail_core::time::parse_rfc3339(&request.filed_at).unwrap_or(0);
    Ok(RequestRecord { id: request.id.clone(), status: request.status.clone(), filed_at, record })
}

fn new_id() -> Result<String, Refusal> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|e| {
        refuse(StatusCode::SERVICE_UNAVAILABLE, "internal", format!("the system's random number generator failed: {e}"))
    })?;
    Ok(format!("req-{}", hex::encode(bytes)))
}

fn answer(status: StatusCode, request: &Request) -> Response {
    let mut r = json_response(status, &serde_json::to_value(request).unwrap_or_default());
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/requests/{}", request.id)) {
        r.headers_mut().insert(header::LOCATION, location);
    }
    r
}

/// `POST /api/v1/requests`.
pub async fn file_request(
    State(service): State<Arc<SelfService>>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    filed(&service, &headers, peer_certificate(&peer), &body).await.unwrap_or_else(|r| *r)
}

async fn filed(
    service: &SelfService,
    headers: &HeaderMap,
    certificate: Option<[u8; 32]>,
    body: &[u8],
) -> Result<Response, Refusal> {
    let snapshot = service.hub.current();
    let policy = &snapshot.policy;
    let Caller::App(app) = caller(service, policy, headers, certificate)? else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "not-an-app",
            "requests are filed by the app, authenticated by its API key (Authorization: Basic <app id:API key>)",
        ));
    };
    let filing: Filing = json_body(headers, body)?;
    let now = service.hub.now();
    let mut request = file(policy, &filing, &app, new_id()?, now)
        .map_err(|why| refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", why))?;
    // Milliseconds: the list is newest first, also within one second.
    request.filed_at = crate::log::timestamp(std::time::SystemTime::now());
    let store = store_of(service)?;
    // Not twice the same thing: a pending request of the app for the same change is answered.
    let existing = store.requests().await.map_err(unavailable)?;
    if let Some(same) = existing
        .iter()
        .filter_map(request_of)
        .find(|r| r.status == "pending" && r.app == request.app && r.kind == request.kind && r.change == request.change)
    {
        return Err(refuse(
            StatusCode::CONFLICT,
            "duplicate-request",
            format!("request {} asks for the same and is pending", same.id),
        ));
    }
    let added = store.add_request(&record_of(&request)?).await.map_err(unavailable)?;
    if !added {
        return Err(refuse(StatusCode::CONFLICT, "duplicate-request", "a request with this id exists; file it again"));
    }
    trail(service, &request, "request-filed", &request.app, format!("{}: {}", request.change, request.reason)).await;
    log!("request {} filed by app {}: {}", request.id, request.app, request.change);
    Ok(answer(StatusCode::CREATED, &request))
}

/// Writes a trail entry now (the request is stored already; a lost entry is logged).
async fn trail(service: &SelfService, request: &Request, kind: &str, actor: &str, detail: String) {
    let event = Event {
        at: service.hub.now(),
        kind: kind.into(),
        id: request.id.clone(),
        app: request.app.clone(),
        actor: actor.into(),
        detail,
        companion: service.hub.name(),
    };
    if !service.record(event) {
        log!("the self-service trail is full: `{kind}` of request {} is not recorded", request.id);
    }
}

/// `GET /api/v1/requests[?status=S][&app=A]`: newest first.
pub async fn list(State(service): State<Arc<SelfService>>, peer: Peer, headers: HeaderMap, uri: Uri) -> Response {
    listed(&service, &headers, peer_certificate(&peer), &uri).await.unwrap_or_else(|r| *r)
}

async fn listed(
    service: &SelfService,
    headers: &HeaderMap,
    certificate: Option<[u8; 32]>,
    uri: &Uri,
) -> Result<Response, Refusal> {
    let snapshot = service.hub.current();
    let who = caller(service, &snapshot.policy, headers, certificate)?;
    let (mut status, mut app) = (None, None);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "status" if ["pending", "approved", "rejected", "expired"].contains(&v.as_ref()) => {
                status = Some(v.into_owned())
            }
            "status" => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "status: pending, approved, rejected or expired",
                ))
            }
            "app" => app = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Caller::App(own) = &who {
        app = Some(own.clone());
    }
    let store = store_of(service)?;
    let all = store.requests().await.map_err(unavailable)?;
    let mut requests: Vec<Request> = all
        .iter()
        .filter_map(request_of)
        .filter(|r| status.as_ref().is_none_or(|s| *s == r.status) && app.as_ref().is_none_or(|a| *a == r.app))
        .collect();
    requests.sort_by(|a, b| b.filed_at.cmp(&a.filed_at).then_with(|| a.id.cmp(&b.id)));
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "requests": requests })))
}

/// `GET /api/v1/requests/{id}`.
pub async fn show(
    State(service): State<Arc<SelfService>>,
    Path(id): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    shown(&service, &id, &headers, peer_certificate(&peer)).await.unwrap_or_else(|r| *r)
}

async fn shown(
    service: &SelfService,
    id: &str,
    headers: &HeaderMap,
    certificate: Option<[u8; 32]>,
) -> Result<Response, Refusal> {
    let snapshot = service.hub.current();
    let who = caller(service, &snapshot.policy, headers, certificate)?;
    let (_, request) = find(service, id).await?;
    if let Caller::App(own) = who {
        if own != request.app {
            return Err(not_found(id));
        }
    }
    Ok(answer(StatusCode::OK, &request))
}

fn not_found(id: &str) -> Refusal {
    let id: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    refuse(StatusCode::NOT_FOUND, "unknown-request", format!("no request `{id}`"))
}

async fn find(service: &SelfService, id: &str) -> Result<(Arc<dyn Store>, Request), Refusal> {
    let store = store_of(service)?;
    let all = store.requests().await.map_err(unavailable)?;
    let request = all.iter().find(|r| r.id == id).and_then(request_of).ok_or_else(|| not_found(id))?;
    Ok((store, request))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/requests/{id}/approve`.
pub async fn approve(
    State(service): State<Arc<SelfService>>,
    Path(id): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = Asking { headers: &headers, certificate: peer_certificate(&peer) };
    decided(&service, &id, caller, &body, true).await.unwrap_or_else(|r| *r)
}

/// `POST /api/v1/requests/{id}/reject`.
pub async fn reject(
    State(service): State<Arc<SelfService>>,
    Path(id): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = Asking { headers: &headers, certificate: peer_certificate(&peer) };
    decided(&service, &id, caller, &body, false).await.unwrap_or_else(|r| *r)
}

/// Who asks to decide: the request's headers and the connection's client certificate.
struct Asking<'a> {
    headers: &'a HeaderMap,
    certificate: Option<[u8; 32]>,
}

async fn decided(
    service: &SelfService,
    id: &str,
    asking: Asking<'_>,
    body: &[u8],
    approving: bool,
) -> Result<Response, Refusal> {
    let headers = asking.headers;
    let snapshot = service.hub.current();
    let policy = &snapshot.policy;
    let approver = approver(caller(service, policy, headers, asking.certificate)?)?;
    let decision: Decision = if body.is_empty() { Decision::default() } else { json_body(headers, body)? };
    let reason = decision.reason.map(|r| r.trim().to_string()).filter(|r| !r.is_empty());
    if reason.as_ref().is_some_and(|r| r.chars().count() > super::requests::MAX_REASON_CHARS) {
        return Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "reason: at most 1000 characters"));
    }
    if !approving && reason.is_none() {
        return Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "reason: say why it is rejected"));
    }
    let (store, mut request) = find(service, id).await?;
    if request.status != "pending" {
        let by = match (&request.decided_by, &request.decided_at) {
            (Some(who), Some(at)) => format!(" by {who} at {at}"),
            _ => String::new(),
        };
        return Err(refuse(StatusCode::CONFLICT, "already-decided", format!("request {id} is {}{by}", request.status)));
    }
    let now = service.hub.now();
    if now >= request.until_secs {
        return Err(refuse(
            StatusCode::CONFLICT,
            "request-expired",
            format!("request {id} ended at {} before it was decided", request.until),
        ));
    }
    if let Some(app) = policy.app(&request.app) {
        if app.owner.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(&approver.id)) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "own-request",
                format!("{} owns app {}: nobody approves a request of their own app", approver.id, request.app),
            ));
        }
    } else if approving {
        return Err(refuse(
            StatusCode::CONFLICT,
            "unknown-app",
            format!("app {} is no longer in the policy: the request cannot apply", request.app),
        ));
    }
    request.status = if approving { "approved" } else { "rejected" }.into();
    request.decided_by = Some(approver.id.clone());
    // Milliseconds: of two approvals in one second, the later one's limits hold (see `in_order`).
    request.decided_at = Some(crate::log::timestamp(std::time::SystemTime::now()));
    request.decision_reason = reason.clone();
    let mut active: Vec<Request> = service.hub.requests_in_force().into_iter().filter(|r| r.in_force(now)).collect();
    if approving {
        active.retain(|r| r.id != request.id);
        active.push(request.clone());
        super::requests::in_order(&mut active);
        service.hub.check_requests(&active).map_err(|why| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-policy",
                format!("approving request {id} would make the policy invalid, so it stays pending: {why}"),
            )
        })?;
    }
    if !store.update_request("pending", &record_of(&request)?).await.map_err(unavailable)? {
        return Err(refuse(StatusCode::CONFLICT, "already-decided", format!("request {id} was decided meanwhile")));
    }
    if approving {
        match service.hub.set_requests(active) {
            Ok(Offer::Published(revision) | Offer::Unchanged(revision)) => {
                request.revision = Some(revision.clone());
                log!("request {id} approved by {}: {} (revision {revision})", approver.id, request.change);
                // The revision is for the reader; the status is what counts (and is set).
                if let Ok(record) = record_of(&request) {
                    let _ = store.update_request("approved", &record).await;
                }
            }
            Ok(Offer::Refused(why)) | Err(why) => {
                // Back to pending: nothing half-applied.
                let mut back = request.clone();
                back.status = "pending".into();
                (back.decided_by, back.decided_at, back.decision_reason) = (None, None, None);
                let _ = store.update_request("approved", &record_of(&back)?).await;
                return Err(refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-policy",
                    format!("request {id} could not be applied, so it stays pending: {why}"),
                ));
            }
        }
        let detail = format!("{}; revision {}", request.change, request.revision.as_deref().unwrap_or("?"));
        trail(service, &request, "request-approved", &approver.id, detail).await;
    } else {
        log!("request {id} rejected by {}", approver.id);
        let detail = format!("rejected: {}", reason.unwrap_or_default());
        trail(service, &request, "request-rejected", &approver.id, detail).await;
    }
    Ok(answer(StatusCode::OK, &request))
}

// === the sync loop ===

/// What the loop last tried to serve: (id, until) of each request, to act on changes only; and
/// whether the store failed last time (its unavailability is logged when it starts, not every pass).
#[derive(Default)]
pub struct Sync {
    wanted: Option<Vec<(String, i64)>>,
    store_down: bool,
}

/// Runs [`sync`] every [`SYNC_INTERVAL`] until `stop` turns true.
pub async fn run_sync(hub: Arc<Hub>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut state = Sync::default();
    let mut every = tokio::time::interval(SYNC_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopped = tokio::select! {
            _ = every.tick() => false,
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        if stopped {
            return;
        }
        sync(&hub, &mut state).await;
    }
}

/// One pass: expires what ended, then serves the file with the approved requests in force.
pub async fn sync(hub: &Hub, state: &mut Sync) {
    let now = hub.now();
    let stored = match hub.store() {
        Some(store) => match store.requests().await {
            Ok(records) => {
                if std::mem::take(&mut state.store_down) {
                    log!("requests: the store answers again; ends that passed meanwhile are recorded now");
                }
                Some((store, records))
            }
            Err(e) => {
                if !std::mem::replace(&mut state.store_down, true) {
                    log!("requests: the store is unavailable ({e}); the approved ones applied stay until they end");
                }
                None
            }
        },
        None => None,
    };
    let mut active: Vec<Request> = match stored {
        Some((store, records)) => {
            let mut active = Vec::new();
            for record in &records {
                let Some(request) = request_of(record) else { continue };
                let open = request.status == "pending" || request.status == "approved";
                if open && now >= request.until_secs {
                    expire(hub, store.as_ref(), request).await;
                } else if request.in_force(now) {
                    active.push(request);
                }
            }
            active
        }
        None => hub.requests_in_force().into_iter().filter(|r| r.in_force(now)).collect(),
    };
    super::requests::in_order(&mut active);
    let wanted: Vec<(String, i64)> = active.iter().map(|r| (r.id.clone(), r.until_secs)).collect();
    let applied: Vec<(String, i64)> = hub.requests_in_force().iter().map(|r| (r.id.clone(), r.until_secs)).collect();
    // Once tried, a set is not tried again every second (a request the file cannot take is logged once).
    let tried = state.wanted.as_ref() == Some(&wanted);
    state.wanted = Some(wanted.clone());
    if wanted == applied || tried {
        return;
    }
    // Served as they are (one compile); when the file can no longer take one of them (it changed
    // since), each such request is left out, named, and the rest served.
    let (served, ids) = match hub.set_requests(active.clone()) {
        Err(_) => {
            let kept = hub.fitting(active);
            let ids = ids_of(&kept);
            (hub.set_requests(kept), ids)
        }
        done => (done, ids_of(&active)),
    };
    match served {
        Ok(Offer::Published(revision)) => log!("approved requests in force: {ids}; revision {revision} pushed"),
        Ok(_) => {}
        Err(why) => log!("approved requests in force ({ids}) could not be served: {why}"),
    }
}

/// The ids of `requests`, for a log line (`none` for none).
fn ids_of(requests: &[Request]) -> String {
    let ids: Vec<&str> = requests.iter().map(|r| r.id.as_str()).collect();
    if ids.is_empty() {
        "none".to_string()
    } else {
        ids.join(", ")
    }
}

/// Marks `request` expired (compare-and-set: one companion does it) with a trail entry.
async fn expire(hub: &Hub, store: &dyn Store, mut request: Request) {
    let from = request.status.clone();
    request.status = "expired".into();
    let Ok(record) = stored(&request) else { return };
    match store.update_request(&from, &record).await {
        Ok(true) => {
            log!("request {} ({from}) ended at {}: {}", request.id, request.until, request.change);
            let event = Event {
                at: hub.now(),
                kind: "request-expired".into(),
                id: request.id.clone(),
                app: request.app.clone(),
                actor: hub.name(),
                detail: format!("was {from}: {}", request.change),
                companion: hub.name(),
            };
            if let Err(e) = store.add_events(&[event]).await {
                log!("the trail entry of request {}'s end could not be written: {e}", request.id);
            }
        }
        Ok(false) => {}
        Err(e) => log!("request {} could not be marked expired: {e}", request.id),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_client_certificate_is_an_approver_only_when_listed() {
        let (alice, bob) = ([0xa1u8; 32], [0xb0u8; 32]);
        let doc = serde_json::json!({
            "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "1",
            "settings": {"approvers": [
                {"id": "alice@x", "certificate": format!("sha256:{}", hex::encode(alice))},
                {"id": "tom@x", "token": format!("sha256:{}", hex::encode(bob))}
            ]},
            "apps": []
        });
        let policy = guardrail_core::compile::compile_json_str(&doc.to_string()).unwrap();
        match by_certificate(&policy, alice) {
            Ok(Caller::Approver(a)) => assert_eq!(a.id, "alice@x"),
            _ => panic!("alice's certificate is an approver's"),
        }
        // Bob's digest is listed, but as a token: a certificate with that digest is not him.
        let refused = by_certificate(&policy, bob).err().map(|r| r.status());
        assert_eq!(refused, Some(StatusCode::FORBIDDEN));
        let refused = by_certificate(&policy, [0; 32]).err().unwrap();
        let body = body_of(*refused);
        assert!(
            body.contains("not-an-approver") && body.contains(&format!("sha256:{}", hex::encode([0u8; 32]))),
            "{body}"
        );
    }

    fn body_of(r: Response) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = runtime.block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
