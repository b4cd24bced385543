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
//! Only the leader talks to the companion. A snapshot it receives is first shared as a candidate
//! (`guardrail.candidate`, generation bumped), so that every worker compiles it while the leader
//! does; then the leader validates it with the same core as `guardrail check`, ACKs or NACKs it,
//! and on success publishes it as the snapshot (`guardrail.snapshot`, generation bumped again).
//! Workers only ever put a snapshot in force, never a candidate.
//!
//! Every worker checks the generation on each request (one small shared-data read). When it moved
//! ([`Follower::sync`]): a new candidate is compiled on the worker's next tick, brought forward to
//! now, while requests go on being decided by the policy in force; a published snapshot the worker
//! compiled ahead is put in force at once, and one it did not is compiled there and then, so that
//! once the leader has ACKed a revision no request is decided by an older one. A worker compiles
//! each revision once; the policy it replaces is freed on a later tick.
//!
//! The shadow candidate (`guardrail serve --candidate`, README "Safe rollout: shadow") is another
//! policy, decided beside the enforced one and never enforced. The leader compiles it, ACKs or
//! NACKs it (`candidate: true`) and publishes it in `guardrail.shadow` (an epoch, then the JSON;
//! empty: none) with its counts reset in `guardrail.shadow.counts` ([`SharedCounts`]); every worker
//! compiles it on its next tick. Workers count where its outcome differs from the enforced one
//! and add their counts into `guardrail.shadow.counts` on every tick; the leader reports them.
//! On a new stream the companion sends the candidate it serves before the first fleet state, so
//! a first fleet state with no candidate before it means none is served: shadowing stops.

use crate::host;
use guardrail_core::compile::{compile_with, parse_json_str, App, CompiledPolicy};
use guardrail_core::fleet::{Callers, Fleet, UsageCounters};
use guardrail_core::quota::{ensure_keys, CounterStore, StoreError};
use guardrail_core::rules::ExpressionCache;
use guardrail_core::shadow::{ShadowCounts, SharedCounts};
use guardrail_core::time::{NANOS_PER_SEC, SECS_PER_DAY};
use guardrail_proto::v1::{
    client_message, server_message, AppUsage, ClientMessage, FleetState, Hello, PolicySnapshot, ServerMessage,
    UnregisteredCaller, UsageReport,
};
use guardrail_proto::v1::{Candidate, ShadowDifference};
use prost::Message;
use std::rc::Rc;
use std::time::Duration;

pub const GEN_KEY: &str = "guardrail.gen";
pub const SNAPSHOT_KEY: &str = "guardrail.snapshot";
/// A snapshot received by the leader and not validated yet, for workers to compile ahead.
pub const CANDIDATE_KEY: &str = "guardrail.candidate";
pub const FLEET_KEY: &str = "guardrail.fleet";
/// The shadow candidate in force: its epoch (8 bytes, little-endian), then its JSON; empty: none.
const SHADOW_KEY: &str = "guardrail.shadow";
/// The differences counted under it by every worker ([`SharedCounts`]).
const SHADOW_COUNTS_KEY: &str = "guardrail.shadow.counts";
/// Difference pairs in one usage report, the largest.
const REPORT_PAIRS: usize = 100;
/// The longest candidate revision accepted (the companion's are far shorter).
const MAX_REVISION_LEN: usize = 256;
const LEADER_KEY: &str = "guardrail.leader";
const NODE_KEY: &str = "guardrail.node";
/// Today's unregistered callers of this Envoy ([`Callers`]), summed over the workers.
pub const CALLERS_KEY: &str = "guardrail.callers";

pub const TICK_MS: u64 = 100;
/// The tick period while a worker has a compile pending: at once, after the current event.
const SOON_MS: u64 = 1;
const LEASE_NS: u64 = 3 * NANOS_PER_SEC;
const REPORT_EVERY_NS: u64 = NANOS_PER_SEC;
const BACKOFF_MIN_NS: u64 = 100_000_000;
const BACKOFF_MAX_NS: u64 = 10 * NANOS_PER_SEC;
/// Messages larger than this from the companion are refused (and the stream reset).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

const SERVICE: &str = "guardrail.v1.PolicyService";
const METHOD: &str = "Stream";

/// How the worker's usage map names an exemption's count (`allowed` counts its requests).
pub const EXEMPT_PREFIX: &str = "exempt/";

/// The shared-data key of an exemption's count of requests today.
pub fn exempt_key(id: &str) -> String {
    format!("guardrail.exempt.{id}")
}

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

/// The value of a shared-data key (empty when it is missing or unreadable).
fn shared(key: &str) -> Vec<u8> {
    match host::SharedData.get(key) {
        Ok(Some((bytes, _))) => bytes,
        _ => Vec::new(),
    }
}

fn published_fleet() -> Option<Fleet> {
    Fleet::decode(&shared(FLEET_KEY))
}

/// A snapshot's delta applied to `base` (the policy this node holds), checked against the
/// delta's SHA-256: a node holding another base NACKs it, and the companion sends it whole.
fn apply_delta(delta: &guardrail_proto::v1::PolicyDelta, base: &[u8]) -> Result<Vec<u8>, String> {
    use sha2::Digest;
    let json = guardrail_proto::delta::apply(base, &delta.ops, guardrail_proto::MAX_POLICY_JSON_BYTES)?;
    if sha2::Sha256::digest(&json)[..] != delta.sha256[..] {
        return Err(format!(
            "delta: the policy it makes of the one this node holds is not the companion's (SHA-256 differs; \
             it was made from revision `{}`)",
            delta.base_revision.escape_debug()
        ));
    }
    Ok(json)
}

/// A snapshot's `policy_zlib` inflated, refused past the size a `policy_json` may have.
fn inflate(zlib: &[u8]) -> Result<Vec<u8>, String> {
    let limit = guardrail_proto::MAX_POLICY_JSON_BYTES;
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(zlib, limit).map_err(|e| match e.status {
        miniz_oxide::inflate::TINFLStatus::HasMoreOutput => format!("policy_zlib: inflates past {limit} bytes"),
        status => format!("policy_zlib: not zlib data ({status:?})"),
    })
}

/// A published shadow candidate's epoch and JSON; `None` when none is published.
fn split_shadow(value: &[u8]) -> Option<(u64, &[u8])> {
    let (epoch, json) = value.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*epoch), json))
}

impl Follower {
    /// Where the shadow candidate published can decide differently from the snapshot in force
    /// ([`guardrail_core::shadow::differ`]); `None`: every request is decided twice.
    pub fn differ(&self) -> Option<guardrail_core::shadow::Differ> {
        let (_, candidate) = split_shadow(&self.shadow)?;
        if self.snapshot.is_empty() {
            return None;
        }
        guardrail_core::shadow::differ(&self.snapshot, candidate)
    }
}

/// The shadow candidate in force on this Envoy and its counts (epoch 0 and no revision: none).
fn shadow_counts() -> SharedCounts {
    SharedCounts::decode(&shared(SHADOW_COUNTS_KEY)).unwrap_or_default()
}

/// Adds the shadow candidate in force and its differences (the largest [`REPORT_PAIRS`]) to a
/// usage report. Read after the usage, which workers add after their shadow counts: a report that
/// counts a request's usage counts its difference too.
fn add_shadow(report: &mut UsageReport) {
    let shadow = shadow_counts();
    report.shadow = shadow
        .top(REPORT_PAIRS)
        .into_iter()
        .map(|(app, enforced, candidate, count)| ShadowDifference {
            app: app.to_string(),
            enforced: enforced.to_string(),
            candidate: candidate.to_string(),
            count,
        })
        .collect();
    report.candidate_revision = shadow.revision;
}

/// Publishes `value` as the shadow candidate (empty: none) with its counts starting over, for
/// every worker.
fn publish_shadow(value: &[u8], counts: &SharedCounts) -> Result<u64, StoreError> {
    host::SharedData
        .set(SHADOW_COUNTS_KEY, &counts.encode(), 0)
        .and_then(|()| host::SharedData.set(SHADOW_KEY, value, 0))
        .and_then(|()| bump_generation())
}

/// Adds a worker's shadow counts (counted under `epoch`) into the shared ones. Counts of another
/// epoch than the one in force (a candidate replaced or stopped since) are dropped; counts that
/// cannot be added now (the store busy) are kept for the next tick.
pub fn flush_shadow(epoch: u64, counts: &mut ShadowCounts) {
    if counts.is_empty() {
        return;
    }
    for _ in 0..guardrail_core::quota::MAX_CAS_RETRIES {
        let Ok(Some((bytes, cas))) = host::SharedData.get(SHADOW_COUNTS_KEY) else {
            counts.clear();
            return;
        };
        let mut shared = match SharedCounts::decode(&bytes) {
            Some(shared) if shared.epoch == epoch => shared,
            _ => {
                counts.clear();
                return;
            }
        };
        shared.add(counts);
        match host::SharedData.set(SHADOW_COUNTS_KEY, &shared.encode(), cas) {
            Ok(()) => {
                counts.clear();
                return;
            }
            Err(StoreError::CasMismatch) => continue,
            Err(_) => return,
        }
    }
}

/// Reads and compiles a snapshot's `policy_json`, as `guardrail check` would, reusing the rules'
/// expressions of the previous compile on this worker.
fn compile_json(json: &[u8], expressions: &mut ExpressionCache) -> Result<CompiledPolicy, Vec<String>> {
    let text = std::str::from_utf8(json).map_err(|e| vec![format!("policy_json: not UTF-8 ({e})")])?;
    let raw = parse_json_str(text).map_err(|e| {
        // Not JSON at all, or JSON that is no policy document (then its field is named).
        vec![if e.error.is_data() { e.to_policy_error().to_string() } else { format!("policy_json: {}", e.error) }]
    })?;
    compile_with(raw, expressions).map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

// === impl Follower ===

/// A root context's view of what the leader publishes (see the module docs).
#[derive(Default)]
pub struct Follower {
    /// The generation last looked at.
    generation: u64,
    /// A candidate is waiting for the next tick to be compiled.
    behind: bool,
    /// The tick period was shortened for it.
    soon: bool,
    /// The published snapshot last dealt with (put in force, or refused), as published.
    snapshot: Vec<u8>,
    /// The last candidate compiled ahead, and its policy (`None`: it does not compile).
    ahead: Option<(Vec<u8>, Option<CompiledPolicy>)>,
    /// Policies replaced on this worker: freed by a later tick (freeing one takes milliseconds).
    retired: Vec<Rc<CompiledPolicy>>,
    /// The rules' expressions of the last compile, for the next one.
    expressions: ExpressionCache,
    /// The shadow candidate last dealt with, as published (empty: none).
    shadow: Vec<u8>,
    /// The rules' expressions of the last candidate compile, apart from the enforced policy's.
    shadow_expressions: ExpressionCache,
}

/// A shadow candidate compiled for a worker, with the epoch it was put in force under.
pub struct ShadowPolicy {
    pub epoch: u64,
    pub revision: String,
    pub policy: CompiledPolicy,
}

/// What [`Follower::sync`] found in shared data.
#[derive(Default)]
pub struct Synced {
    /// A validated snapshot to put in force.
    pub policy: Option<CompiledPolicy>,
    /// The fleet state, when the generation moved.
    pub fleet: Option<Option<Fleet>>,
    /// The shadow candidate changed: `Some(None)` stops shadowing.
    pub shadow: Option<Option<ShadowPolicy>>,
}

impl Follower {
    /// Looks at what the leader published: one shared-data read when the generation did not move.
    ///
    /// A published snapshot is put in force at once: compiled ahead, or compiled now (a worker
    /// that has not compiled it ahead decides no request by an older policy once the leader has
    /// ACKed it). A new candidate is compiled ahead on a tick only (`tick`): from a request, the
    /// next tick is brought forward to now, and requests meanwhile are decided by the policy in
    /// force, which the leader has not replaced yet either.
    pub fn sync(&mut self, tick: bool) -> Synced {
        let mut out = Synced::default();
        let generation = generation();
        let moved = generation != self.generation;
        if moved {
            self.generation = generation;
            out.fleet = Some(published_fleet());
        }
        let look = moved || (self.behind && tick);
        if !look {
            if tick {
                // A tick with nothing to compile: the time to free what was replaced.
                self.retired.clear();
            }
            return out;
        }
        self.behind = false;
        let snapshot = shared(SNAPSHOT_KEY);
        if !snapshot.is_empty() && snapshot != self.snapshot {
            out.policy = match self.ahead.take() {
                Some((candidate, Some(policy))) if candidate == snapshot => Some(policy),
                other => {
                    self.ahead = other;
                    compile_json(&snapshot, &mut self.expressions)
                        .map_err(|e| {
                            host::error(&format!(
                                "guardrail: published snapshot does not compile here ({}); keeping the last good policy",
                                e.join("; ")
                            ))
                        })
                        .ok()
                }
            };
            self.snapshot = snapshot;
        }
        // A new shadow candidate is compiled on a tick only, as a candidate snapshot is; stopping is at once.
        let shadow = shared(SHADOW_KEY);
        let mut wait = false;
        if shadow != self.shadow {
            if shadow.is_empty() || tick {
                out.shadow = Some(self.compile_shadow(&shadow));
                self.shadow = shadow;
            } else {
                wait = true;
            }
        }
        let candidate = shared(CANDIDATE_KEY);
        let known = candidate.is_empty()
            || candidate == self.snapshot
            || self.ahead.as_ref().is_some_and(|(ahead, _)| *ahead == candidate);
        if !known {
            if !tick {
                return self.later(out);
            }
            // Not logged when it fails: the leader NACKs it and says why.
            let policy = compile_json(&candidate, &mut self.expressions).ok();
            self.ahead = Some((candidate, policy));
        }
        if wait {
            return self.later(out);
        }
        self.tick_normally();
        out
    }

    /// The published shadow candidate `value` ([`SHADOW_KEY`]) compiled; `None` for none, or one
    /// that does not compile here (the leader compiled it, so that is logged).
    fn compile_shadow(&mut self, value: &[u8]) -> Option<ShadowPolicy> {
        let (epoch, json) = split_shadow(value)?;
        match compile_json(json, &mut self.shadow_expressions) {
            Ok(policy) => Some(ShadowPolicy { epoch, revision: policy.revision.clone(), policy }),
            Err(e) => {
                host::error(&format!(
                    "guardrail: published shadow candidate does not compile here ({}); not shadowing it",
                    e.join("; ")
                ));
                None
            }
        }
    }

    /// The leader published `value` as the shadow candidate and put it in force itself. The
    /// generation is left alone: anything else published meanwhile is still picked up.
    fn adopt_shadow(&mut self, value: &[u8]) {
        self.shadow = value.to_vec();
    }

    /// Leaves the candidate for the next tick, and brings that tick forward (once: setting the
    /// period again would push the tick back).
    fn later(&mut self, out: Synced) -> Synced {
        self.behind = true;
        if !self.soon {
            self.soon = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(SOON_MS)).is_ok();
        }
        out
    }

    fn tick_normally(&mut self) {
        if self.soon {
            self.soon = false;
            let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(TICK_MS));
        }
    }

    /// Keeps a replaced policy until a tick with nothing to compile frees it.
    pub fn retire(&mut self, policy: Option<Rc<CompiledPolicy>>) {
        self.retired.extend(policy);
    }

    /// The leader put `snapshot` (published under `generation`) in force itself.
    fn adopt(&mut self, snapshot: &[u8], generation: u64) {
        self.generation = generation;
        self.snapshot = snapshot.to_vec();
        if self.ahead.as_ref().is_some_and(|(ahead, _)| ahead == snapshot) {
            self.ahead = None;
        }
    }

    /// The leader refused `candidate` (shared under `generation`): nothing to compile ahead.
    fn refused(&mut self, candidate: &[u8], generation: u64) {
        self.generation = generation;
        self.ahead = Some((candidate.to_vec(), None));
    }
}

/// Creates the shared-data keys of the apps of `policy` that `previous` did not have (those exist
/// already: keys are created before a policy is put in force, and never removed).
fn create_new_keys(policy: &CompiledPolicy, previous: Option<&CompiledPolicy>) -> Result<(), StoreError> {
    let Some(previous) = previous else {
        return crate::create_keys(policy);
    };
    let new: Vec<&App> = policy.apps.iter().filter(|a| previous.app_index(&a.id).is_none()).collect();
    ensure_keys(&mut host::SharedData, new.iter().map(|a| a.quota_key.as_str()))?;
    let usage = new.iter().map(|a| usage_key(&a.id));
    let exempt = policy.exemptions.iter().filter(|e| !previous.exemptions.iter().any(|p| p.id == e.id));
    crate::create_usage_keys(usage.chain(exempt.map(|e| exempt_key(&e.id))))
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
    /// The stream has not brought its first fleet state yet, and whether a candidate came before it.
    fresh: bool,
    candidate_on_stream: bool,
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
            fresh: false,
            candidate_on_stream: false,
        }
    }

    /// One tick of the election and the stream. `apps` are the app ids of the policy in force.
    pub fn tick(&mut self, now_ns: u64, policy: Option<&CompiledPolicy>) {
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
                let mut report = usage_report(now_ns, policy);
                add_shadow(&mut report);
                if !report.apps.is_empty()
                    || !report.exempt.is_empty()
                    || !report.candidate_revision.is_empty()
                    || !report.unregistered.is_empty()
                {
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
                self.fresh = true;
                self.candidate_on_stream = false;
                let hello = Hello {
                    node_id: node_id(),
                    envoy_version: envoy_version(),
                    filter_version: env!("CARGO_PKG_VERSION").to_string(),
                    revision: self.revision.clone(),
                    accepts_zlib: true,
                    accepts_delta: true,
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

    /// A message from the companion. Returns what to apply on this worker: a policy, a shadow
    /// candidate (`follower` knows them then); `previous` is the policy in force.
    pub fn on_message(
        &mut self,
        token: u32,
        bytes: &[u8],
        follower: &mut Follower,
        previous: Option<&CompiledPolicy>,
    ) -> Synced {
        let mut out = Synced::default();
        if self.link != Link::Open(token) {
            return out;
        }
        self.backoff_ns = BACKOFF_MIN_NS;
        let message = match ServerMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                host::error(&format!("guardrail: undecodable message from the companion ({e}); ignored"));
                return out;
            }
        };
        match message.msg {
            Some(server_message::Msg::Snapshot(snapshot)) => {
                out.policy = self.on_snapshot(token, snapshot, follower, previous);
            }
            Some(server_message::Msg::Fleet(fleet)) => {
                publish_fleet(&fleet);
                // The companion sends the candidate it serves before a stream's first fleet state.
                if std::mem::take(&mut self.fresh) && !self.candidate_on_stream {
                    out.shadow = stop_shadow(follower, "the companion serves none");
                }
            }
            Some(server_message::Msg::Candidate(candidate)) => {
                self.candidate_on_stream = true;
                out.shadow = on_candidate(token, candidate, follower);
            }
            None => {}
        }
        out
    }

    fn on_snapshot(
        &mut self,
        token: u32,
        snapshot: PolicySnapshot,
        follower: &mut Follower,
        previous: Option<&CompiledPolicy>,
    ) -> Option<CompiledPolicy> {
        let nack = |error: String| {
            host::error(&format!("guardrail: NACK revision `{}`: {error}", snapshot.revision));
            send(
                token,
                client_message::Msg::Nack(guardrail_proto::v1::Nack {
                    revision: snapshot.revision.clone(),
                    error,
                    candidate: false,
                }),
            );
        };
        // Edits of the policy this node holds (the one published to the workers), compressed, or
        // as it is.
        let built = match &snapshot.delta {
            Some(delta) => apply_delta(delta, &shared(SNAPSHOT_KEY)).map(Some),
            None if snapshot.policy_zlib.is_empty() => Ok(None),
            None => inflate(&snapshot.policy_zlib).map(Some),
        };
        let built = match built {
            Ok(built) => built,
            Err(error) => {
                nack(error);
                return None;
            }
        };
        let json = built.as_deref().unwrap_or(&snapshot.policy_json[..]);
        // The other workers compile it while this one does. Only an optimisation: if it cannot be
        // shared, they compile the snapshot once it is published.
        let shared = host::SharedData.set(CANDIDATE_KEY, json, 0).and_then(|()| bump_generation());
        let policy = match compile_json(json, &mut follower.expressions) {
            Ok(p) => p,
            Err(errors) => {
                nack(errors.join("\n"));
                if let Ok(generation) = shared {
                    follower.refused(json, generation);
                }
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
            .set(SNAPSHOT_KEY, json, 0)
            .and_then(|()| create_new_keys(&policy, previous))
            .and_then(|()| bump_generation());
        let generation = match published {
            Ok(generation) => generation,
            Err(e) => {
                nack(format!("cannot share the snapshot with the workers: {e}"));
                return None;
            }
        };
        send(
            token,
            client_message::Msg::Ack(guardrail_proto::v1::Ack {
                revision: snapshot.revision.clone(),
                candidate: false,
            }),
        );
        match &snapshot.delta {
            Some(delta) => host::info(&format!(
                "guardrail: ACK revision `{}` (from a delta of revision `{}`, {} ops)",
                snapshot.revision,
                delta.base_revision,
                delta.ops.len()
            )),
            None => host::info(&format!("guardrail: ACK revision `{}`", snapshot.revision)),
        }
        follower.adopt(json, generation);
        self.revision = snapshot.revision;
        Some(policy)
    }
}

/// A shadow candidate from the companion (an empty revision stops shadowing): compiled, ACKed or
/// NACKed (`candidate: true`), and published for every worker. The same revision again (a new
/// stream) is ACKed again and keeps its counts. Returns what to apply on this worker.
fn on_candidate(token: u32, candidate: Candidate, follower: &mut Follower) -> Option<Option<ShadowPolicy>> {
    if candidate.revision.is_empty() {
        return stop_shadow(follower, "the companion stopped it");
    }
    let in_force = shadow_counts();
    let reply = |result: Result<(), String>| {
        let revision = candidate.revision.clone();
        let msg = match result {
            Ok(()) => client_message::Msg::Ack(guardrail_proto::v1::Ack { revision, candidate: true }),
            Err(error) => {
                host::error(&format!("guardrail: NACK candidate `{revision}`: {error}"));
                client_message::Msg::Nack(guardrail_proto::v1::Nack { revision, error, candidate: true })
            }
        };
        send(token, msg);
    };
    if in_force.revision == candidate.revision {
        reply(Ok(()));
        return None;
    }
    // Compressed for a node that inflates, as snapshots are.
    let inflated = if candidate.policy_zlib.is_empty() { Ok(None) } else { inflate(&candidate.policy_zlib).map(Some) };
    let json = match &inflated {
        Ok(Some(bytes)) => &bytes[..],
        _ => candidate.policy_json.as_bytes(),
    };
    let compiled = if candidate.revision.len() > MAX_REVISION_LEN || candidate.revision.chars().any(char::is_control) {
        Err(vec![format!("revision: at most {MAX_REVISION_LEN} bytes, no control characters")])
    } else if let Err(error) = &inflated {
        Err(vec![error.clone()])
    } else {
        compile_json(json, &mut follower.shadow_expressions)
    };
    let policy = match compiled {
        Ok(policy) => policy,
        Err(errors) => {
            // Never used; nor is the candidate it was to replace, which the companion no longer serves.
            reply(Err(errors.join("\n")));
            return stop_shadow(follower, "its replacement was refused");
        }
    };
    // The candidate reads the quota state of its apps: an app only it knows starts with a full
    // bucket, as it would once enforced. Nothing is taken from it.
    let epoch = random_u64() | 1;
    let mut value = epoch.to_le_bytes().to_vec();
    value.extend_from_slice(json);
    let published = ensure_keys(&mut host::SharedData, policy.apps.iter().map(|a| a.quota_key.as_str()))
        .and_then(|_| publish_shadow(&value, &SharedCounts::new(epoch, &candidate.revision)));
    if let Err(e) = published {
        reply(Err(format!("cannot share the candidate with the workers: {e}")));
        return stop_shadow(follower, "its replacement could not be shared");
    }
    follower.adopt_shadow(&value);
    reply(Ok(()));
    host::info(&format!(
        "guardrail: ACK candidate `{}`: decided in shadow beside the enforced policy, never enforced",
        candidate.revision
    ));
    // Workers name it by its document's revision (the companion makes it the message's).
    Some(Some(ShadowPolicy { epoch, revision: policy.revision.clone(), policy }))
}

/// Stops shadowing on every worker, if a candidate is in force (`why` for the log).
fn stop_shadow(follower: &mut Follower, why: &str) -> Option<Option<ShadowPolicy>> {
    let in_force = shadow_counts();
    if in_force.revision.is_empty() {
        return None;
    }
    match publish_shadow(&[], &SharedCounts::default()) {
        Ok(_) => {
            follower.adopt_shadow(&[]);
            host::info(&format!("guardrail: candidate `{}` no longer decided in shadow ({why})", in_force.revision));
            Some(None)
        }
        Err(e) => {
            host::error(&format!("guardrail: cannot stop shadowing candidate `{}`: {e}", in_force.revision));
            None
        }
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

/// Today's counts in a shared usage key, if it has any.
fn todays_usage(key: &str, day: u64) -> Option<UsageCounters> {
    let (bytes, _) = host::SharedData.get(key).ok().flatten()?;
    UsageCounters::decode(&bytes).filter(|u| u64::from(u.day) == day && !u.is_zero())
}

/// Today's usage of every app and exemption, read from the shared usage keys.
fn usage_report(now_ns: u64, policy: Option<&CompiledPolicy>) -> UsageReport {
    let day = now_ns / NANOS_PER_SEC / SECS_PER_DAY;
    let mut report = UsageReport { day, ..UsageReport::default() };
    let Some(policy) = policy else { return report };
    for exemption in &policy.exemptions {
        if let Some(u) = todays_usage(&exempt_key(&exemption.id), day) {
            report.exempt.insert(exemption.id.clone(), u64::from(u.allowed));
        }
    }
    for app in &policy.apps {
        let Some(u) = todays_usage(&usage_key(&app.id), day) else {
            continue;
        };
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
            connectors: u.connectors.iter().map(|(c, n)| (c.clone(), u64::from(*n))).collect(),
            fleet_budget: u64::from(u.fleet_budget),
        });
    }
    let callers = host::SharedData.get(CALLERS_KEY).ok().flatten().and_then(|(bytes, _)| Callers::decode(&bytes));
    for (name, n) in callers.filter(|c| u64::from(c.day) == day).map(|c| c.seen).unwrap_or_default() {
        let Some((kind, id)) = name.split_once(':') else { continue };
        report.unregistered.push(UnregisteredCaller {
            kind: kind.to_string(),
            id: id.to_string(),
            count: u64::from(n),
        });
    }
    report
}

/// Adds this worker's unregistered callers into the shared [`CALLERS_KEY`] (compare-and-swap).
pub fn flush_callers(delta: &mut Callers) {
    if delta.seen.is_empty() {
        return;
    }
    let delta = std::mem::replace(delta, Callers { day: delta.day, seen: Vec::new() });
    for _ in 0..guardrail_core::quota::MAX_CAS_RETRIES {
        let Ok(Some((bytes, cas))) = host::SharedData.get(CALLERS_KEY) else {
            break;
        };
        let mut total = Callers::decode(&bytes).unwrap_or_default();
        total.merge(&delta);
        match host::SharedData.set(CALLERS_KEY, &total.encode(), cas) {
            Err(StoreError::CasMismatch) => continue,
            _ => break,
        }
    }
}

/// Adds this worker's usage deltas into the shared counters: per app, and per exemption for the
/// keys made by [`exempt_key`] (which no app id can spell: app ids have no `/`).
pub fn flush_usage(deltas: &mut std::collections::HashMap<String, UsageCounters>) {
    for (name, delta) in deltas.drain() {
        let key = match name.strip_prefix(EXEMPT_PREFIX) {
            Some(id) => exempt_key(id),
            None => usage_key(&name),
        };
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

/// Envoy's version as its node reports it (`user_agent_build_version.version`, e.g. `1.40.0`):
/// under `xds.node` in current Envoy (1.40 answers nothing for `node`), `node` in older ones, as
/// for [`node_id`]. The filter says `envoy` (the `user_agent_name`) when neither can be read.
fn envoy_version() -> String {
    const NODES: [&[&str]; 2] = [&["xds", "node"], &["node"]];
    let property = |node: &[&str], field: &[&str]| {
        proxy_wasm::hostcalls::get_property(node.iter().chain(field).copied().collect()).ok().flatten()
    };
    let version = |node: &[&str]| {
        let number = |field: &str| {
            let bytes = property(node, &["user_agent_build_version", "version", field])?;
            // A uint32 field of the Node message comes as a CEL uint: 8 bytes, little-endian.
            Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
        };
        Some(format!("{}.{}.{}", number("major_number")?, number("minor_number")?, number("patch")?))
    };
    let name = |node: &[&str]| {
        property(node, &["user_agent_name"]).and_then(|b| String::from_utf8(b).ok()).filter(|s| !s.is_empty())
    };
    NODES
        .into_iter()
        .find_map(version)
        .or_else(|| NODES.into_iter().find_map(name))
        .unwrap_or_else(|| "envoy".to_string())
}

/// A random u64 from WASI's `random_get` (through std's hasher seeding).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(host::now_ns());
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::{apply_delta, inflate};
    use guardrail_proto::v1::PolicyDelta;
    use miniz_oxide::deflate::compress_to_vec_zlib;
    use sha2::Digest;

    /// A delta applies to the policy it was made from; made from another (or lying about its
    /// result), it is refused by its SHA-256, never put in force.
    #[test]
    fn a_delta_applies_only_to_the_policy_it_was_made_from() {
        let base = br#"{"apiVersion":"guardrail/v1","apps":[{"id":"app-a","lifecycle":"published"}],"revision":"1"}"#;
        let new = br#"{"apiVersion":"guardrail/v1","apps":[{"id":"app-a","lifecycle":"quarantined"}],"revision":"2"}"#;
        let delta = PolicyDelta {
            base_revision: "1".into(),
            ops: guardrail_proto::delta::diff(base, new),
            sha256: sha2::Sha256::digest(new).to_vec(),
        };
        assert_eq!(apply_delta(&delta, base).unwrap(), new);
        let other = br#"{"apiVersion":"guardrail/v1","apps":[{"id":"app-b","lifecycle":"published"}],"revision":"1"}"#;
        let error = apply_delta(&delta, other).unwrap_err();
        assert!(error.contains("SHA-256 differs") && error.contains("revision `1`"), "{error}");
        assert!(apply_delta(&delta, b"").unwrap_err().starts_with("delta: op"), "copies past an empty base");
        let lying = PolicyDelta { sha256: vec![0; 32], ..delta };
        assert!(apply_delta(&lying, base).unwrap_err().contains("SHA-256 differs"));
    }

    #[test]
    fn a_compressed_snapshot_inflates_within_the_limit_or_is_refused_by_name() {
        let json = br#"{"apiVersion":"guardrail/v1"}"#;
        assert_eq!(inflate(&compress_to_vec_zlib(json, 6)).unwrap(), json, "round trip");
        let bomb = compress_to_vec_zlib(&vec![b' '; guardrail_proto::MAX_POLICY_JSON_BYTES + 1], 9);
        assert!(bomb.len() < 10_000, "a small message that inflates past the limit");
        assert!(inflate(&bomb).unwrap_err().contains("policy_zlib: inflates past"), "refused, not inflated");
        assert!(inflate(b"not zlib").unwrap_err().starts_with("policy_zlib: not zlib data"));
        assert!(inflate(&compress_to_vec_zlib(json, 6)[..10]).is_err(), "truncated");
    }
}
