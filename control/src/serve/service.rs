//! `guardrail.v1.PolicyService`: one bidirectional stream per Envoy process, and `Status`.
//!
//! Each stream runs in its own task. It waits for the client's `Hello` (the first message must be
//! one), sends the current snapshot and fleet state, then relays every newer one while it records
//! the client's ACKs, NACKs and usage reports. Outbound messages go through a small bounded
//! channel: a client that stops reading fills it and its stream is closed, so it never holds up
//! the others (who are fed from the hub's watch channels, not through it). What goes out is framed
//! once and shared by every stream ([`super::wire`]). Inbound messages are bounded in size by the
//! decoder ([`MAX_MESSAGE_BYTES`]) and in rate per stream here.

use super::fleet::{valid_id, FleetError, MAX_ID_LEN};
use super::hub::{Hub, Snapshot};
use super::wire::{self, Out};
use crate::log::{log, node_log};
use crate::pb::policy_service_server::PolicyService;
use guardrail_proto::v1::{self, client_message::Msg};
use guardrail_proto::Bytes;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstDecoder;

/// The largest client message accepted (a usage report of thousands of apps fits easily).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Per-stream limits.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Time a new stream has to say Hello.
    pub hello_timeout: Duration,
    /// Outbound messages queued for one client before it counts as not keeping up.
    pub outbound_queue: usize,
    /// Sustained client messages per second, and the burst above it, before the stream is closed.
    pub messages_per_sec: u32,
    pub message_burst: u32,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            hello_timeout: Duration::from_secs(10),
            outbound_queue: 8,
            messages_per_sec: 50,
            message_burst: 200,
        }
    }
}

/// The tonic service: a handle on the hub.
#[derive(Clone)]
pub struct PolicyServer {
    hub: Arc<Hub>,
    limits: StreamLimits,
}

impl PolicyServer {
    pub fn new(hub: Arc<Hub>, limits: StreamLimits) -> Self {
        PolicyServer { hub, limits }
    }

    /// Opens one `Stream` (answered by hand, see [`super::wire`]): its task decodes the client's
    /// messages with tonic's decoder and sends framed messages to the response body.
    pub fn open(&self, request: http::Request<tonic::body::Body>) -> http::Response<tonic::body::Body> {
        let (parts, body) = request.into_parts();
        let request = Request::from_http(http::Request::from_parts(parts, ()));
        // Under mutual TLS, which client certificate opened the stream (node ids are the
        // client's word; the certificate is not): `sha256:<hex>` of the leaf, as
        // `openssl x509 -noout -fingerprint -sha256` prints it (without colons).
        let certificate = request.peer_certs().and_then(|certs| {
            certs.first().map(|leaf| format!("sha256:{}", hex::encode(Sha256::digest(leaf.as_ref()))))
        });
        let peer = match (request.remote_addr(), &certificate) {
            (Some(addr), Some(cert)) => Some(format!("{addr} (client certificate {cert})")),
            (Some(addr), None) => Some(addr.to_string()),
            (None, _) => None,
        };
        let inbound = Streaming::new_request(ProstDecoder::default(), body, None, Some(MAX_MESSAGE_BYTES));
        let (tx, rx) = mpsc::channel(self.limits.outbound_queue.max(2));
        let certificate = certificate.unwrap_or_default();
        let conn = Connection { hub: self.hub.clone(), limits: self.limits, tx, peer, certificate };
        tokio::spawn(conn.run(inbound));
        wire::streaming(rx)
    }
}

// === impl PolicyService ===

/// What the generated server's `Stream` would return: never called, [`super::wire::Routed`]
/// answers that RPC before it (the generated trait still wants a type and a body for it).
type Unrouted = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyService for PolicyServer {
    type StreamStream = Unrouted;

    async fn stream(
        &self,
        _request: Request<Streaming<v1::ClientMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::internal("the stream RPC is served by serve::wire::Routed"))
    }

    async fn status(&self, _request: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(self.hub.status()))
    }

    async fn audit(&self, request: Request<v1::AuditRequest>) -> Result<Response<v1::AuditResponse>, Status> {
        let Some(store) = self.hub.store() else {
            return Err(Status::failed_precondition("this companion runs without a store: no audit trail"));
        };
        let limit = match request.into_inner().limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let unavailable = |e: crate::store::StoreError| {
            Status::unavailable(format!("store: unavailable ({e}): the audit trail cannot be read"))
        };
        let revisions = store.revisions(limit).await.map_err(unavailable)?;
        let events = store.events(limit.min(DEFAULT_AUDIT_EVENTS)).await.map_err(unavailable)?;
        Ok(Response::new(v1::AuditResponse {
            revisions: revisions.into_iter().map(audit_entry).collect(),
            store: self.hub.store_status(),
            events: events
                .into_iter()
                .map(|e| v1::AuditEvent {
                    at_unix: e.at,
                    kind: e.kind,
                    id: e.id,
                    app: e.app,
                    actor: e.actor,
                    detail: e.detail,
                    companion: e.companion,
                })
                .collect(),
        }))
    }
}

/// Self-service events `audit` returns at most (the newest; `GET /api/v1/audit/events` pages further).
const DEFAULT_AUDIT_EVENTS: usize = 100;

fn audit_entry(r: crate::store::Revision) -> v1::AuditEntry {
    v1::AuditEntry {
        revision: r.revision,
        content_sha256: r.content_sha256,
        first_served_unix: r.first_served,
        source: r.source,
        companion: r.companion,
        changes: r
            .changes
            .into_iter()
            .map(|c| v1::PolicyChange { kind: c.kind, id: c.id, action: c.action, from: c.from, to: c.to })
            .collect(),
    }
}

// === impl Connection ===

/// One client stream.
struct Connection {
    hub: Arc<Hub>,
    limits: StreamLimits,
    tx: mpsc::Sender<Out>,
    /// The client's address, and under mutual TLS its certificate's fingerprint.
    peer: Option<String>,
    /// Under mutual TLS, `sha256:<hex>` of the client's certificate; else empty.
    certificate: String,
}

/// What one stream knows of its node.
struct StreamState {
    /// Its Hello said it inflates snapshots (`accepts_zlib`), and applies deltas (`accepts_delta`).
    zlib: bool,
    delta: bool,
    /// The revision it holds: the one its Hello named, then the last it ACKed.
    held: String,
    /// The revision last sent to it as a delta (until it is sent whole).
    delta_sent: Option<String>,
}

/// Why a stream ended; `Some` status is sent to the client.
type End = Option<Status>;

impl Connection {
    async fn run(self, mut inbound: Streaming<v1::ClientMessage>) {
        let peer = self.peer.clone().unwrap_or_else(|| "unknown peer".to_string());
        let hello = match self.hello(&mut inbound).await {
            Ok(hello) => hello,
            Err(end) => {
                if let Some(status) = &end {
                    log!("stream from {peer} closed before Hello: {}", status.message());
                }
                self.close(end);
                return;
            }
        };
        let node = hello.node_id.clone();
        match self.hub.connect(&hello, &self.certificate) {
            Ok(n) => node_log!("connected";
                "node {node} connected from {peer} (envoy {}, filter {}, holding revision {}){}",
                or_dash(&hello.envoy_version),
                or_dash(&hello.filter_version),
                or_dash(&hello.revision),
                if n.streams > 1 { format!("; it now has {} streams open", n.streams) } else { String::new() }
            ),
            Err(e) => {
                log!("stream from {peer} refused: {e}");
                self.close(Some(match e {
                    FleetError::TooManyNodes => Status::resource_exhausted(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                }));
                return;
            }
        }
        let mut stream = StreamState {
            zlib: hello.accepts_zlib,
            delta: hello.accepts_delta,
            held: hello.revision.clone(),
            delta_sent: None,
        };
        let end = self.serve(&node, &mut stream, &mut inbound).await;
        self.hub.disconnect(&node);
        match &end {
            Some(status) => {
                node_log!(format!("disconnected: {}", status.message()); "node {node} disconnected: {}", status.message())
            }
            None => node_log!("disconnected"; "node {node} disconnected"),
        }
        self.close(end);
    }

    /// Waits for the first message, which must be a valid Hello.
    async fn hello(&self, inbound: &mut Streaming<v1::ClientMessage>) -> Result<v1::Hello, End> {
        let first = tokio::time::timeout(self.limits.hello_timeout, inbound.message()).await;
        match first {
            Err(_) => Err(Some(Status::deadline_exceeded(format!(
                "no Hello within {} s",
                self.limits.hello_timeout.as_secs_f32()
            )))),
            Ok(Err(status)) => Err(Some(status)),
            Ok(Ok(None)) => Err(None),
            Ok(Ok(Some(v1::ClientMessage { msg: Some(Msg::Hello(hello)) }))) => {
                if valid_id(&hello.node_id) {
                    Ok(hello)
                } else {
                    Err(Some(Status::invalid_argument(FleetError::BadNodeId.to_string())))
                }
            }
            Ok(Ok(Some(_))) => Err(Some(Status::failed_precondition("the first message on the stream must be Hello"))),
        }
    }

    /// Relays snapshots and fleet state, and handles client messages, until the stream ends.
    async fn serve(&self, node: &str, stream: &mut StreamState, inbound: &mut Streaming<v1::ClientMessage>) -> End {
        let mut snapshots = self.hub.snapshots();
        let mut fleet = self.hub.fleet_states();
        let mut candidates = self.hub.shadow.subscribe();
        let mut shutdown = self.hub.shutdowns();
        if *shutdown.borrow_and_update() {
            return Some(Status::unavailable("the companion is stopping"));
        }
        let snapshot = snapshots.borrow_and_update().clone();
        if !self.send_snapshot(node, &snapshot, stream) {
            return None;
        }
        // The candidate before the first fleet state: a node that gets the fleet state with no
        // candidate before it stops shadowing one it had from an earlier stream.
        let candidate = candidates.borrow_and_update().clone();
        if !candidate.revision.is_empty() && !self.send(node, candidate.frame(stream.zlib)) {
            return None;
        }
        let state = fleet.borrow_and_update().clone();
        if !self.send(node, wire::frame(&fleet_message(state))) {
            return None;
        }
        let mut bucket = Bucket::new(self.limits, Instant::now());
        loop {
            // Biased: a policy goes out before the fleet state computed with it.
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return Some(Status::unavailable("the companion is stopping"));
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Some(Status::unavailable("the companion is stopping"));
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if !self.send_snapshot(node, &snapshot, stream) {
                        return None;
                    }
                }
                changed = candidates.changed() => {
                    if changed.is_err() {
                        return Some(Status::unavailable("the companion is stopping"));
                    }
                    let candidate = candidates.borrow_and_update().clone();
                    if !self.send(node, candidate.frame(stream.zlib)) {
                        return None;
                    }
                }
                changed = fleet.changed() => {
                    if changed.is_err() {
                        return Some(Status::unavailable("the companion is stopping"));
                    }
                    let state = fleet.borrow_and_update().clone();
                    if !self.send(node, wire::frame(&fleet_message(state))) {
                        return None;
                    }
                }
                () = self.tx.closed() => return None,
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if !bucket.take(Instant::now()) {
                            return Some(Status::resource_exhausted(format!(
                                "more than {} messages per second",
                                self.limits.messages_per_sec
                            )));
                        }
                        if let Err(status) = self.handle(node, message, stream) {
                            return Some(status);
                        }
                    }
                    Ok(None) => return None,
                    // A transport error, or a message over the size limit.
                    Err(status) => return Some(status),
                },
            }
        }
    }

    /// One client message after Hello.
    fn handle(&self, node: &str, message: v1::ClientMessage, stream: &mut StreamState) -> Result<(), Status> {
        self.hub.seen(node);
        match message.msg {
            Some(Msg::Hello(hello)) if hello.node_id == node => Ok(()),
            Some(Msg::Hello(_)) => {
                Err(Status::invalid_argument("a second Hello with another node_id; open one stream per node"))
            }
            Some(Msg::Ack(ack)) if ack.candidate => {
                check_revision(&ack.revision)?;
                self.hub.shadow.ack(node, &ack.revision);
                node_log!(format!("ACK candidate {}", ack.revision); "node {node} ACK candidate {} (in shadow)", ack.revision);
                Ok(())
            }
            Some(Msg::Nack(nack)) if nack.candidate => {
                check_revision(&nack.revision)?;
                self.hub.shadow.nack(node, &nack.revision, &nack.error);
                let first = nack.error.lines().next().unwrap_or("(no error given)");
                node_log!(format!("NACK candidate {}", nack.revision);
                    "node {node} NACK candidate {}: {} (its enforced policy is untouched)",
                    nack.revision,
                    super::fleet::truncated(first, 500)
                );
                Ok(())
            }
            Some(Msg::Ack(ack)) => {
                check_revision(&ack.revision)?;
                stream.held.clone_from(&ack.revision);
                let served = self.hub.current().revision.clone();
                self.hub.ack(node, &ack.revision);
                let kind = format!("ACK revision {}", ack.revision);
                if ack.revision == served {
                    node_log!(kind; "node {node} ACK revision {}", ack.revision);
                } else {
                    node_log!(kind; "node {node} ACK revision {} (serving {served})", ack.revision);
                }
                Ok(())
            }
            Some(Msg::Nack(nack))
                if stream.delta_sent.as_ref() == Some(&nack.revision) && nack.error.starts_with("delta:") =>
            {
                check_revision(&nack.revision)?;
                // The node could not apply the delta (it holds another base, or the result's
                // hash differed; the filter's errors for that start with `delta:`): it keeps its
                // policy, and gets this revision whole, once. A NACK of the policy itself is
                // recorded as any other.
                stream.delta_sent = None;
                let first = nack.error.lines().next().unwrap_or("(no error given)");
                node_log!(format!("delta of revision {} not applied, sent whole", nack.revision);
                    "node {node} could not apply the delta of revision {}: {}; sending it whole",
                    nack.revision,
                    super::fleet::truncated(first, 500)
                );
                let snapshot = self.hub.current();
                if snapshot.revision == nack.revision && !self.send(node, snapshot.frame(stream.zlib)) {
                    return Err(Status::resource_exhausted("not reading its stream"));
                }
                Ok(())
            }
            Some(Msg::Nack(nack)) => {
                check_revision(&nack.revision)?;
                self.hub.nack(node, &nack.revision, &nack.error);
                let mut lines = nack.error.lines().filter(|l| !l.trim().is_empty());
                let first = lines.next().unwrap_or("(no error given)");
                let more = lines.count();
                node_log!(format!("NACK revision {}", nack.revision);
                    "node {node} NACK revision {}: {}{} (it keeps its previous policy)",
                    nack.revision,
                    super::fleet::truncated(first, 500),
                    if more > 0 { format!(" (+{more} more lines; see `guardrail status`)") } else { String::new() }
                );
                Ok(())
            }
            Some(Msg::Usage(report)) => {
                self.hub.shadow.report(node, &report);
                self.hub.report(node, &report).map_err(|e| Status::invalid_argument(e.to_string()))
            }
            None => Err(Status::invalid_argument("empty client message")),
        }
    }

    /// Queues a snapshot: as a delta when the node takes deltas and holds the one it is made
    /// from, else whole (compressed when the node inflates).
    fn send_snapshot(&self, node: &str, snapshot: &Snapshot, stream: &mut StreamState) -> bool {
        match snapshot.delta_from(&stream.held).filter(|_| stream.delta) {
            Some(frame) => {
                stream.delta_sent = Some(snapshot.revision.clone());
                self.send(node, frame)
            }
            None => {
                stream.delta_sent = None;
                self.send(node, snapshot.frame(stream.zlib))
            }
        }
    }

    /// Queues one framed message; `false` (and the stream is over) if the client is gone or not
    /// reading.
    fn send(&self, node: &str, frame: Bytes) -> bool {
        match self.tx.try_send(Out::Message(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                log!(
                    "node {node} is not reading its stream ({} messages queued): closing it",
                    self.limits.outbound_queue
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ends the stream, with `end`'s status when there is one and room for it.
    fn close(self, end: End) {
        if let Some(status) = end {
            let _ = self.tx.try_send(Out::End(status));
        }
    }
}

fn fleet_message(state: v1::FleetState) -> v1::ServerMessage {
    v1::ServerMessage { msg: Some(v1::server_message::Msg::Fleet(state)) }
}

fn check_revision(revision: &str) -> Result<(), Status> {
    if revision.chars().count() > MAX_ID_LEN || revision.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("a revision is at most {MAX_ID_LEN} printable characters")));
    }
    Ok(())
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// A token bucket over client messages.
struct Bucket {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(limits: StreamLimits, now: Instant) -> Self {
        let burst = f64::from(limits.message_burst.max(1));
        Bucket { tokens: burst, per_sec: f64::from(limits.messages_per_sec.max(1)), burst, at: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
