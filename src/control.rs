//! The link to the companion: one gRPC stream per Envoy process, and the shared-data protocol that
//! hands what arrives on it to every worker.
//!
//! Every root context (one per worker, plus the main thread's) ticks. On each tick it:
//! 1. picks up a new snapshot or fleet state from shared data if the generation moved;
//! 2. flushes its workers' usage counts into the per-app usage keys (compare-and-swap);
//! 3. takes part in the leader election: a lease in `guardrail.leader`, renewed by its holder on
//!    every tick and taken over by anyone once it is [`LEASE_NS`] stale;
//! 4. as leader, keeps the stream open (reconnecting with exponential backoff and jitter), and
//!    reports usage every [`REPORT_EVERY_NS`].
//!
//! Only the leader talks to the companion. It validates each snapshot with the same core as
//! `guardrail check`, ACKs or NACKs it, and on success publishes it to shared data and bumps the
//! generation, which every worker checks on each request: a worker compiles each revision once.

use crate::host;
use guardrail_core::compile::{compile, parse_json_value, CompiledPolicy};
use guardrail_core::fleet::{Fleet, UsageCounters};
use guardrail_core::quota::{CounterStore, StoreError};
use guardrail_core::time::{NANOS_PER_SEC, SECS_PER_DAY};
use guardrail_proto::v1::{
    client_message, server_message, AppUsage, ClientMessage, FleetState, Hello, PolicySnapshot, ServerMessage,
    UsageReport,
};
use prost::Message;

pub const GEN_KEY: &str = "guardrail.gen";
pub const SNAPSHOT_KEY: &str = "guardrail.snapshot";
pub const FLEET_KEY: &str = "guardrail.fleet";
const LEADER_KEY: &str = "guardrail.leader";
const NODE_KEY: &str = "guardrail.node";

pub const TICK_MS: u64 = 100;
const LEASE_NS: u64 = 3 * NANOS_PER_SEC;
const REPORT_EVERY_NS: u64 = NANOS_PER_SEC;
const BACKOFF_MIN_NS: u64 = 100_000_000;
const BACKOFF_MAX_NS: u64 = 10 * NANOS_PER_SEC;
/// Messages larger than this from the companion are refused (and the stream reset).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

const SERVICE: &str = "guardrail.v1.PolicyService";
const METHOD: &str = "Stream";

/// The shared-data key of an app's usage counts.
pub fn usage_key(app: &str) -> String {
    format!("guardrail.usage.{app}")
}

// === Generation, snapshot and fleet in shared data ===

/// The current generation (0 when the companion never sent anything).
pub fn generation() -> u64 {
    match host::SharedData.get(GEN_KEY) {
        Ok(Some((bytes, _))) => bytes.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes),
        _ => 0,
    }
}

fn bump_generation() -> Result<u64, StoreError> {
    for _ in 0..guardrail_core::quota::MAX_CAS_RETRIES {
        let (current, cas) = match host::SharedData.get(GEN_KEY)? {
            Some((bytes, cas)) => (bytes.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes), cas),
            None => (0, 0),
        };
        let next = current.wrapping_add(1).max(1);
        match host::SharedData.set(GEN_KEY, &next.to_le_bytes(), cas) {
            Ok(()) => return Ok(next),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// What the companion last published: the policy snapshot (if any) and the fleet state.
pub struct Published {
    pub policy: Option<CompiledPolicy>,
    pub fleet: Option<Fleet>,
}

/// Reads and compiles the published snapshot and fleet state.
pub fn load_published() -> Result<Published, String> {
    let policy = match host::SharedData.get(SNAPSHOT_KEY) {
        Ok(Some((bytes, _))) if !bytes.is_empty() => Some(compile_json(&bytes).map_err(|e| e.join("; "))?),
        _ => None,
    };
    let fleet = match host::SharedData.get(FLEET_KEY) {
        Ok(Some((bytes, _))) => Fleet::decode(&bytes),
        _ => None,
    };
    Ok(Published { policy, fleet })
}

fn compile_json(json: &[u8]) -> Result<CompiledPolicy, Vec<String>> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| vec![format!("policy_json: {e}")])?;
    let raw = parse_json_value(value).map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    compile(raw).map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

// === The stream client ===

#[derive(Debug, PartialEq, Eq)]
enum Link {
    Idle,
    Open(u32),
}

/// Per root context: its election identity and, when leader, the stream.
pub struct ControlClient {
    cluster: String,
    id: u64,
    link: Link,
    next_attempt_ns: u64,
    backoff_ns: u64,
    last_report_ns: u64,
    leader: bool,
    /// Revision in force, for Hello.
    pub revision: String,
}

impl ControlClient {
    pub fn new(cluster: String) -> Self {
        ControlClient {
            cluster,
            id: random_u64() | 1,
            link: Link::Idle,
            next_attempt_ns: 0,
            backoff_ns: BACKOFF_MIN_NS,
            last_report_ns: 0,
            leader: false,
            revision: String::new(),
        }
    }

    /// One tick of the election and the stream. `apps` are the app ids of the policy in force.
    pub fn tick(&mut self, now_ns: u64, apps: &[guardrail_core::compile::App]) {
        self.leader = self.hold_lease(now_ns);
        if !self.leader {
            if let Link::Open(token) = self.link {
                host::info("guardrail: lost the control-stream lease; closing this stream");
                let _ = proxy_wasm::hostcalls::cancel_grpc_stream(token);
                self.link = Link::Idle;
            }
            return;
        }
        if self.link == Link::Idle && now_ns >= self.next_attempt_ns {
            self.connect(now_ns);
        }
        if let Link::Open(token) = self.link {
            if now_ns.saturating_sub(self.last_report_ns) >= REPORT_EVERY_NS {
                self.last_report_ns = now_ns;
                let report = usage_report(now_ns, apps);
                if !report.apps.is_empty() {
                    send(token, client_message::Msg::Usage(report));
                }
            }
        }
    }

    /// Takes or renews the lease; true when this context holds it.
    fn hold_lease(&self, now_ns: u64) -> bool {
        let (holder, until, cas) = match host::SharedData.get(LEADER_KEY) {
            Ok(Some((b, cas))) if b.len() == 16 => {
                let word =
                    |r: std::ops::Range<usize>| b.get(r).and_then(|x| x.try_into().ok()).map_or(0, u64::from_le_bytes);
                (word(0..8), word(8..16), cas)
            }
            Ok(Some((_, cas))) => (0, 0, cas),
            Ok(None) => (0, 0, 0),
            Err(_) => return false,
        };
        if holder != self.id && holder != 0 && until > now_ns {
            return false;
        }
        let mut value = self.id.to_le_bytes().to_vec();
        value.extend_from_slice(&(now_ns + LEASE_NS).to_le_bytes());
        host::SharedData.set(LEADER_KEY, &value, cas).is_ok()
    }

    fn connect(&mut self, now_ns: u64) {
        match proxy_wasm::hostcalls::open_grpc_stream(&self.cluster, SERVICE, METHOD, vec![]) {
            Ok(token) => {
                self.link = Link::Open(token);
                let hello = Hello {
                    node_id: node_id(),
                    envoy_version: envoy_version(),
                    filter_version: env!("CARGO_PKG_VERSION").to_string(),
                    revision: self.revision.clone(),
                };
                send(token, client_message::Msg::Hello(hello));
                self.last_report_ns = now_ns;
                host::info(&format!("guardrail: control stream to cluster `{}` opened", self.cluster));
            }
            Err(status) => {
                host::warn(&format!("guardrail: cannot open the control stream to `{}`: {status:?}", self.cluster));
                self.schedule_retry(now_ns);
            }
        }
    }

    fn schedule_retry(&mut self, now_ns: u64) {
        let jitter = random_u64() % (self.backoff_ns / 2 + 1);
        self.next_attempt_ns = now_ns + self.backoff_ns / 2 + jitter;
        self.backoff_ns = (self.backoff_ns * 2).min(BACKOFF_MAX_NS);
    }

    /// The stream ended (companion gone, reset, or refused): reconnect later.
    pub fn on_close(&mut self, token: u32, status: u32, now_ns: u64) {
        if self.link == Link::Open(token) {
            host::warn(&format!("guardrail: control stream closed (grpc status {status}); reconnecting with backoff"));
            self.link = Link::Idle;
            self.schedule_retry(now_ns);
        }
    }

    /// A message from the companion. Returns a policy to apply on this worker, if one arrived,
    /// with the shared generation it was published under.
    pub fn on_message(&mut self, token: u32, bytes: &[u8]) -> Option<(CompiledPolicy, u64)> {
        if self.link != Link::Open(token) {
            return None;
        }
        self.backoff_ns = BACKOFF_MIN_NS;
        let message = match ServerMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                host::error(&format!("guardrail: undecodable message from the companion ({e}); ignored"));
                return None;
            }
        };
        match message.msg {
            Some(server_message::Msg::Snapshot(snapshot)) => self.on_snapshot(token, snapshot),
            Some(server_message::Msg::Fleet(fleet)) => {
                publish_fleet(&fleet);
                None
            }
            None => None,
        }
    }

    fn on_snapshot(&mut self, token: u32, snapshot: PolicySnapshot) -> Option<(CompiledPolicy, u64)> {
        let nack = |error: String| {
            host::error(&format!("guardrail: NACK revision `{}`: {error}", snapshot.revision));
            send(
                token,
                client_message::Msg::Nack(guardrail_proto::v1::Nack { revision: snapshot.revision.clone(), error }),
            );
        };
        let policy = match compile_json(snapshot.policy_json.as_bytes()) {
            Ok(p) => p,
            Err(errors) => {
                nack(errors.join("\n"));
                return None;
            }
        };
        if policy.revision != snapshot.revision && !snapshot.revision.starts_with(&policy.revision) {
            host::warn(&format!(
                "guardrail: snapshot revision `{}` differs from the document's `{}`",
                snapshot.revision, policy.revision
            ));
        }
        let published = host::SharedData
            .set(SNAPSHOT_KEY, snapshot.policy_json.as_bytes(), 0)
            .and_then(|()| crate::create_keys(&policy))
            .and_then(|()| bump_generation());
        let generation = match published {
            Ok(generation) => generation,
            Err(e) => {
                nack(format!("cannot share the snapshot with the workers: {e}"));
                return None;
            }
        };
        send(token, client_message::Msg::Ack(guardrail_proto::v1::Ack { revision: snapshot.revision.clone() }));
        host::info(&format!("guardrail: ACK revision `{}`", snapshot.revision));
        self.revision = snapshot.revision;
        Some((policy, generation))
    }
}

fn publish_fleet(state: &FleetState) {
    let fleet = Fleet { day: state.day, exhausted: state.exhausted_apps.iter().cloned().collect() };
    let result = host::SharedData.set(FLEET_KEY, &fleet.encode(), 0).and_then(|()| bump_generation().map(|_| ()));
    match result {
        Ok(()) => host::info(&format!(
            "guardrail: fleet state for day {}: {} app(s) out of budget fleet-wide",
            state.day,
            state.exhausted_apps.len()
        )),
        Err(e) => host::error(&format!("guardrail: cannot share the fleet state: {e}")),
    }
}

fn send(token: u32, msg: client_message::Msg) {
    let bytes = ClientMessage { msg: Some(msg) }.encode_to_vec();
    if let Err(status) = proxy_wasm::hostcalls::send_grpc_stream_message(token, Some(&bytes), false) {
        host::warn(&format!("guardrail: cannot send on the control stream: {status:?}"));
    }
}

/// Today's usage of every app, read from the shared usage keys.
fn usage_report(now_ns: u64, apps: &[guardrail_core::compile::App]) -> UsageReport {
    let day = now_ns / NANOS_PER_SEC / SECS_PER_DAY;
    let mut report = UsageReport { day, apps: Vec::new() };
    for app in apps {
        let Ok(Some((bytes, _))) = host::SharedData.get(&usage_key(&app.id)) else {
            continue;
        };
        let Some(u) = UsageCounters::decode(&bytes) else {
            continue;
        };
        if u64::from(u.day) != day || u.is_zero() {
            continue;
        }
        let denied = guardrail_core::decide::Code::ALL
            .iter()
            .zip(u.denied.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(code, n)| (code.as_str().to_string(), u64::from(*n)))
            .collect();
        report.apps.push(AppUsage {
            app: app.id.clone(),
            allowed: u64::from(u.allowed),
            throttled: u64::from(u.throttled),
            soft_limit: u64::from(u.soft_limit),
            denied,
        });
    }
    report
}

/// Adds this worker's usage deltas into the shared per-app counters.
pub fn flush_usage(deltas: &mut std::collections::HashMap<String, UsageCounters>) {
    for (app, delta) in deltas.drain() {
        let key = usage_key(&app);
        for _ in 0..guardrail_core::quota::MAX_CAS_RETRIES {
            let Ok(Some((bytes, cas))) = host::SharedData.get(&key) else {
                break;
            };
            let mut total = UsageCounters::decode(&bytes).unwrap_or_default();
            total.merge(&delta);
            match host::SharedData.set(&key, &total.encode(), cas) {
                Err(StoreError::CasMismatch) => continue,
                _ => break,
            }
        }
    }
}

fn node_id() -> String {
    // Envoy's node id (`--service-node` or bootstrap `node.id`): `xds.node.id` in current Envoy,
    // `node.id` in older ones.
    let configured = [vec!["xds", "node", "id"], vec!["node", "id"]].into_iter().find_map(|path| {
        proxy_wasm::hostcalls::get_property(path)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
    });
    let local = match host::SharedData.get(NODE_KEY) {
        Ok(Some((bytes, _))) => String::from_utf8(bytes).unwrap_or_default(),
        _ => String::new(),
    };
    let local = if local.is_empty() {
        let generated = format!("{:016x}", random_u64());
        let _ = host::SharedData.set(NODE_KEY, generated.as_bytes(), 0);
        generated
    } else {
        local
    };
    match configured {
        Some(id) => format!("{id}/{local}"),
        None => format!("envoy-{local}"),
    }
}

/// Envoy reports its build as `node.user_agent_build_version`; the filter only says "envoy" when
/// that is not readable as text.
fn envoy_version() -> String {
    proxy_wasm::hostcalls::get_property(vec!["node", "user_agent_name"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "envoy".to_string())
}

/// A random u64 from WASI's `random_get` (through std's hasher seeding).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(host::now_ns());
    h.finish()
}
