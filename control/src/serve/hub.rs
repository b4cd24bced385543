//! The hub: the policy snapshot being served, the fleet, and the channels that push both to every
//! connected stream at once.
//!
//! Snapshots and fleet state go out through [`tokio::sync::watch`] channels: each stream sees the
//! newest value, never a queue of stale ones, so a burst of policy edits costs a slow stream one
//! message, not one per edit.
//!
//! ## Revisions
//!
//! A snapshot's revision (what nodes ACK and NACK) is the document's `revision`, unless this
//! companion already served that revision with different content: then it is
//! `<revision>+sha256:<first 8 hex of the content hash>`, so an ACK names one content only. A
//! document without `revision` is served as `sha256:<8 hex>`. The content hash is SHA-256 of the
//! policy as compact JSON, so an edit of comments or layout changes nothing and is not pushed. The
//! pushed `policy_json` carries the snapshot's revision as its `revision`, so the filter's policy
//! and its ACK name the same thing.

use super::fleet::{exhausted_in, Counts, Fleet, FleetError, Node};
use crate::log::log;
use crate::selfservice::requests::Request;
use crate::store::{Caller, CompanionRecord, NodeRecord, Store, UsageRow};
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::rules::ExpressionCache;
use guardrail_core::source::{load_json_document, Document};
use guardrail_core::time::SECS_PER_DAY;
use guardrail_proto::v1;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use tokio::sync::watch;

/// The largest `policy_json` pushed; it must fit the filter's (and the server's) message limit.
pub const MAX_POLICY_JSON_BYTES: usize = guardrail_proto::MAX_POLICY_JSON_BYTES;
/// Revisions remembered to keep labels unambiguous (cleared beyond this).
const MAX_LABELS: usize = 10_000;
/// Revisions served but not yet in the store's audit trail (the oldest are dropped beyond this,
/// with a log line: each holds its snapshot, up to 4 MiB).
const MAX_PENDING_REVISIONS: usize = 16;
/// A companion whose heartbeat is older than this is not alive (its nodes are not connected).
pub const COMPANION_ALIVE_SECS: i64 = 10;

/// Unix seconds; a parameter so that tests can move the day on.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::log::now_secs)
}

/// One validated policy, as pushed.
#[derive(Debug)]
pub struct Snapshot {
    /// What nodes ACK (see the module docs).
    pub revision: String,
    /// SHA-256 of the policy as compact JSON, before its revision is replaced.
    pub content: [u8; 32],
    /// The document as compact JSON, with `revision` set to [`Snapshot::revision`].
    pub json: String,
    /// The snapshot's message as sent, with [`Snapshot::json`] plain and zlib-compressed, each
    /// framed once ([`super::wire::frame`]) and shared by every stream. (A 357 KB policy was
    /// copied per node, 3.5 GB for 10,000 nodes; compressed, 400 MB of fresh encoder buffers.)
    /// Compressed when a node first needs it whole: with deltas most pushes never do, and
    /// compressing 357 KB took about 10 ms between the write and the push.
    framed: guardrail_proto::Bytes,
    framed_zlib: std::sync::OnceLock<guardrail_proto::Bytes>,
    /// The snapshot as a delta of the one served before it (its revision, and the framed message),
    /// for nodes that hold that one; none when the delta would not be much smaller.
    delta: Option<(String, guardrail_proto::Bytes)>,
    pub policy: CompiledPolicy,
}

impl Snapshot {
    /// The framed message for a node; compressed when its Hello said it inflates (`accepts_zlib`).
    pub fn frame(&self, zlib: bool) -> guardrail_proto::Bytes {
        if zlib {
            self.framed_zlib().clone()
        } else {
            self.framed.clone()
        }
    }

    /// The compressed whole snapshot, made on first use (the plain one, should compressing into
    /// memory ever fail).
    fn framed_zlib(&self) -> &guardrail_proto::Bytes {
        self.framed_zlib.get_or_init(|| match zlib(self.json.as_bytes()) {
            Ok(compressed) => framed(&self.revision, Vec::new(), compressed),
            Err(_) => self.framed.clone(),
        })
    }

    /// The framed delta for a node holding revision `held`, if there is one.
    pub fn delta_from(&self, held: &str) -> Option<guardrail_proto::Bytes> {
        self.delta.as_ref().filter(|(base, _)| base == held).map(|(_, frame)| frame.clone())
    }

    /// Makes this snapshot's delta from `base` (the one served before it), kept when it is at
    /// most half the size of the whole compressed snapshot: surely so when it is at most a 32nd
    /// of the JSON (policies compress 5-10 to 1), which needs no compression to tell.
    fn with_delta_from(mut self, base: &Snapshot) -> Self {
        let started = std::time::Instant::now();
        let new = self.json.as_bytes();
        let delta = v1::PolicyDelta {
            base_revision: base.revision.clone(),
            ops: guardrail_proto::delta::diff(base.json.as_bytes(), new),
            sha256: Sha256::digest(new).to_vec(),
        };
        let frame = super::wire::frame(&v1::ServerMessage {
            msg: Some(v1::server_message::Msg::Snapshot(v1::PolicySnapshot {
                revision: self.revision.clone(),
                delta: Some(delta),
                ..Default::default()
            })),
        });
        let size = frame.len();
        if size <= new.len() / 32 || size <= self.framed_zlib().len() / 2 {
            log!(
                "revision {}: a delta of {size} bytes for nodes holding {} (whole: {} bytes of JSON); made in {} ms",
                self.revision,
                base.revision,
                new.len(),
                started.elapsed().as_millis()
            );
            self.delta = Some((base.revision.clone(), frame));
        }
        self
    }
}

/// The snapshot message for `revision`, framed.
fn framed(revision: &str, policy_json: Vec<u8>, policy_zlib: Vec<u8>) -> guardrail_proto::Bytes {
    super::wire::frame(&v1::ServerMessage {
        msg: Some(v1::server_message::Msg::Snapshot(v1::PolicySnapshot {
            revision: revision.to_string(),
            policy_json: policy_json.into(),
            policy_zlib: policy_zlib.into(),
            delta: None,
        })),
    })
}

/// `json` compressed with zlib (RFC 1950).
pub(super) fn zlib(json: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut encoder =
        flate2::write::ZlibEncoder::new(Vec::with_capacity(json.len() / 8), flate2::Compression::default());
    encoder.write_all(json).and_then(|()| encoder.finish()).map_err(|e| format!("cannot compress the policy: {e}"))
}

/// What became of a policy offered to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Pushed to every stream under this revision.
    Published(String),
    /// Same content as the one served (only comments or layout changed): nothing pushed.
    Unchanged(String),
    /// Not servable (e.g. too large); the message says why.
    Refused(String),
}

/// Shared by the gRPC service, the file watcher and the day ticker.
pub struct Hub {
    snapshot: watch::Sender<Arc<Snapshot>>,
    fleet_state: watch::Sender<v1::FleetState>,
    shutdown: watch::Sender<bool>,
    inner: Mutex<Inner>,
    clock: Clock,
    store: OnceLock<Arc<dyn Store>>,
    /// The shadow candidate (`--candidate`), apart from the enforced snapshot.
    pub shadow: super::shadow::Shadow,
    /// The policy file's document and the approved requests served on top of it.
    overlay: Mutex<Overlay>,
}

/// What the served policy is made of: the file's document (as compact JSON text: a copy of a
/// string on every change, parsed again only while requests are applied) and the approved
/// self-service requests in force ([`crate::selfservice::requests::apply`]). Taken before
/// [`Hub::lock`], never after.
struct Overlay {
    file: PathBuf,
    base: String,
    active: Vec<Request>,
}

/// A snapshot served, for the audit trail.
pub struct Served {
    pub snapshot: Arc<Snapshot>,
    pub source: String,
    pub at: i64,
}

/// What changed since the store was last written: taken by the store task every second, off the
/// report path, and given back when the write fails.
#[derive(Default)]
pub struct Dirty {
    pub usage: HashSet<(String, u64)>,
    pub nodes: HashSet<String>,
}

/// A batch for the store: the rows and records of a [`Dirty`] set, as they are now.
pub struct Batch {
    pub keys: Dirty,
    pub usage: Vec<UsageRow>,
    pub nodes: Vec<NodeRecord>,
    /// What the unregistered callers' counts rose by, seen now.
    pub callers: Vec<Caller>,
}

struct Inner {
    fleet: Fleet,
    dirty: Dirty,
    served: Vec<Served>,
    /// Fleet totals per app of a day as the store last had them (every companion's nodes).
    store_totals: (u64, BTreeMap<String, Counts>),
    /// The companions sharing the store, as it last said.
    companions: Vec<CompanionRecord>,
    /// The store's URL and, while it is unavailable, why.
    store_health: Option<(String, Option<String>)>,
    last_policy_error: String,
    /// What a change left to free (the snapshot it replaced, the document's JSON tree): freed by the
    /// next [`Hub::tick`], not before the change is pushed and logged.
    retired: Vec<Box<dyn std::any::Any + Send + Sync>>,
    /// Label → content hash of every revision served by this process.
    labels: HashMap<String, [u8; 32]>,
}

// === impl Hub ===

impl Hub {
    /// A hub serving `doc` (already validated, read from `file`).
    pub fn new(file: &Path, doc: Document, clock: Clock) -> Result<Arc<Hub>, String> {
        let mut labels = HashMap::new();
        let overlay = Overlay { file: file.to_path_buf(), base: doc.canonical.clone(), active: Vec::new() };
        let content = content_of(&doc);
        let (snapshot, _) = make_snapshot(file, doc, content, &mut labels)?;
        let now = clock();
        let today = day_of(now);
        let snapshot = Arc::new(snapshot);
        let served = vec![Served { snapshot: snapshot.clone(), source: file.display().to_string(), at: now }];
        let hub = Hub {
            snapshot: watch::Sender::new(snapshot),
            fleet_state: watch::Sender::new(v1::FleetState { day: today, exhausted_apps: Vec::new() }),
            shutdown: watch::Sender::new(false),
            inner: Mutex::new(Inner {
                fleet: Fleet::default(),
                dirty: Dirty::default(),
                served,
                store_totals: (today, BTreeMap::new()),
                companions: Vec::new(),
                store_health: None,
                last_policy_error: String::new(),
                retired: Vec::new(),
                labels,
            }),
            clock,
            store: OnceLock::new(),
            shadow: super::shadow::Shadow::default(),
            overlay: Mutex::new(overlay),
        };
        Ok(Arc::new(hub))
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    pub fn today(&self) -> u64 {
        day_of(self.now())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the bookkeeping half-updated in a way that
        // matters more than stopping the service would.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn fleet_states(&self) -> watch::Receiver<v1::FleetState> {
        self.fleet_state.subscribe()
    }

    pub fn shutdowns(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks every stream to end (the server is stopping).
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Serves `doc` (validated, from `file`), with the approved requests in force applied, unless
    /// its content is the one served already. Requests that no longer apply to the file (their app
    /// is gone, or the result is invalid) are left out, each with a log line.
    pub fn offer(&self, file: &Path, doc: Document) -> Offer {
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        overlay.file = file.to_path_buf();
        overlay.base.clone_from(&doc.canonical);
        if overlay.active.is_empty() {
            return self.publish(file, doc, file.display().to_string());
        }
        if let Ok((doc, source)) = overlaid(&overlay.base, &overlay.active) {
            return self.publish(file, doc, format!("{} + {source}", file.display()));
        }
        // Each request the new file cannot take is left out, named; the others stay in force.
        let active = std::mem::take(&mut overlay.active);
        overlay.active = fitting(&overlay.base, active);
        match overlaid(&overlay.base, &overlay.active) {
            Ok((doc, source)) if !overlay.active.is_empty() => {
                self.publish(file, doc, format!("{} + {source}", file.display()))
            }
            _ => self.publish(file, doc, file.display().to_string()),
        }
    }

    /// Serves the policy file with `active` (approved requests in force) applied instead of the
    /// ones applied now; refused, with nothing changed, when the result is not a valid policy.
    pub fn set_requests(&self, active: Vec<Request>) -> Result<Offer, String> {
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let file = overlay.file.clone();
        let offer = if active.is_empty() {
            let doc = load_json_document(&overlay.base, &mut ExpressionCache::default())
                .ok_or("the policy file's document is not JSON")?
                .map_err(|e| e.to_string())?;
            self.publish(&file, doc, file.display().to_string())
        } else {
            let (doc, source) = overlaid(&overlay.base, &active)?;
            self.publish(&file, doc, format!("{} + {source}", file.display()))
        };
        if let Offer::Refused(why) = &offer {
            return Err(why.clone());
        }
        overlay.active = active;
        Ok(offer)
    }

    /// Whether the policy file with `active` applied would be a valid policy (the errors if not).
    pub fn check_requests(&self, active: &[Request]) -> Result<(), String> {
        let overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        overlaid(&overlay.base, active).map(drop)
    }

    /// Of `active`, those the policy file can take together (in order; each left out is logged).
    pub fn fitting(&self, active: Vec<Request>) -> Vec<Request> {
        let overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        fitting(&overlay.base, active)
    }

    /// The approved requests applied to the policy served now.
    pub fn requests_in_force(&self) -> Vec<Request> {
        self.overlay.lock().unwrap_or_else(PoisonError::into_inner).active.clone()
    }

    /// Serves `doc` (validated, from `file`; `source` for the audit trail) unless its content is
    /// the one served already.
    /// Its callers hold the overlay lock: one publication at a time.
    fn publish(&self, file: &Path, doc: Document, source: String) -> Offer {
        let current = self.current();
        let content = content_of(&doc);
        let made = {
            let mut inner = self.lock();
            if content == current.content {
                inner.last_policy_error.clear();
                return Offer::Unchanged(current.revision.clone());
            }
            match make_snapshot(file, doc, content, &mut inner.labels) {
                Ok(made) => made,
                Err(e) => return self.refused(&mut inner, e),
            }
        };
        let (snapshot, tree) = made;
        let revision = snapshot.revision.clone();
        // Not under the lock every stream's ACKs and reports take: a delta of a 357 KB policy
        // takes milliseconds. (`current` is still the one served: publications are serial.)
        let snapshot = Arc::new(snapshot.with_delta_from(&current));
        let mut inner = self.lock();
        if inner.served.len() >= MAX_PENDING_REVISIONS {
            let dropped = inner.served.remove(0);
            log!(
                "store: revision {} is left out of the audit trail ({MAX_PENDING_REVISIONS} revisions are waiting for the store)",
                dropped.snapshot.revision
            );
        }
        inner.served.push(Served { snapshot: snapshot.clone(), source, at: self.now() });
        let previous = self.snapshot.send_replace(snapshot);
        inner.last_policy_error.clear();
        self.recompute(&inner);
        // Freeing a large compiled policy takes milliseconds: not before the push is logged.
        inner.retired.push(Box::new(previous));
        inner.retired.push(Box::new(tree));
        Offer::Published(revision)
    }

    fn refused(&self, inner: &mut Inner, error: String) -> Offer {
        inner.last_policy_error = error.clone();
        Offer::Refused(error)
    }

    /// Records why the newest policy change was not applied (shown by `guardrail status`).
    pub fn policy_error(&self, error: String) {
        self.lock().last_policy_error = error;
    }

    // --- nodes ---

    pub fn connect(&self, hello: &v1::Hello, certificate: &str) -> Result<Node, FleetError> {
        let now = self.now();
        let mut inner = self.lock();
        let node = inner.fleet.connect(hello, certificate, now).cloned()?;
        inner.dirty.nodes.insert(hello.node_id.clone());
        Ok(node)
    }

    pub fn disconnect(&self, node_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        inner.fleet.disconnect(node_id, now);
        inner.dirty.nodes.insert(node_id.to_string());
    }

    pub fn seen(&self, node_id: &str) {
        let now = self.now();
        self.lock().fleet.seen(node_id, now);
    }

    pub fn ack(&self, node_id: &str, revision: &str) {
        let served = self.current().revision.clone();
        let mut inner = self.lock();
        inner.fleet.ack(node_id, revision, &served);
        inner.dirty.nodes.insert(node_id.to_string());
    }

    pub fn nack(&self, node_id: &str, revision: &str, error: &str) {
        let mut inner = self.lock();
        inner.fleet.nack(node_id, revision, error);
        inner.dirty.nodes.insert(node_id.to_string());
    }

    #[cfg(test)]
    pub fn node(&self, node_id: &str) -> Option<Node> {
        self.lock().fleet.get(node_id).cloned()
    }

    /// Records a usage report and pushes the fleet state if an app became exhausted.
    pub fn report(&self, node_id: &str, report: &v1::UsageReport) -> Result<(), FleetError> {
        let today = self.today();
        let mut inner = self.lock();
        inner.fleet.report(node_id, report, today)?;
        inner.dirty.usage.insert((node_id.to_string(), report.day));
        if self.may_exhaust(&inner, report) {
            self.recompute(&inner);
        }
        Ok(())
    }

    /// Whether `report` may have made an app exhausted fleet-wide: one of its apps of today, with
    /// a daily budget, now at or over it and not yet pushed as exhausted. O(apps in the report),
    /// so that a report does not cost O(apps in the policy) under the lock every handler shares;
    /// everything else that changes the exhausted set (a new day, a policy, an override expiring,
    /// the store's totals) recomputes it on [`Hub::tick`] or where it happens.
    fn may_exhaust(&self, inner: &Inner, report: &v1::UsageReport) -> bool {
        let now = self.now();
        let day = day_of(now);
        if report.day != day {
            return false;
        }
        let snapshot = self.current();
        let state = self.fleet_state.borrow();
        if state.day != day {
            return true;
        }
        report.apps.iter().any(|usage| {
            let Some(budget) = snapshot
                .policy
                .app(&usage.app)
                .and_then(|a| snapshot.policy.limits(a, now))
                .and_then(|l| l.daily_budget)
            else {
                return false;
            };
            let own = inner.fleet.total(day, &usage.app).map_or(0, |c| c.allowed);
            let stored = match &inner.store_totals {
                (d, totals) if *d == day => totals.get(&usage.app).map_or(0, |c| c.allowed),
                _ => 0,
            };
            own.max(stored) >= budget && !state.exhausted_apps.contains(&usage.app)
        })
    }

    // --- the store ---

    /// Gives the hub its store (once): `Audit` reads it.
    pub fn attach_store(&self, store: Arc<dyn Store>, name: &str) {
        let url = store.url().to_string();
        let _ = self.store.set(store);
        let mut inner = self.lock();
        inner.fleet.own = name.to_string();
        inner.store_health = Some((url, None));
    }

    /// Usage per app of `day` over the fleet (see [`fleet_totals`]).
    pub fn fleet_totals(&self, day: u64) -> BTreeMap<String, Counts> {
        fleet_totals(&self.lock(), day)
    }

    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.get().cloned()
    }

    /// This companion's name (empty without a store).
    pub fn name(&self) -> String {
        self.lock().fleet.own.clone()
    }

    /// What changed since the last call, as it is now.
    pub fn take_batch(&self) -> Batch {
        let mut inner = self.lock();
        let keys = std::mem::take(&mut inner.dirty);
        let usage = keys.usage.iter().flat_map(|(node, day)| inner.fleet.usage_rows(node, *day)).collect();
        let nodes = keys.nodes.iter().filter_map(|id| inner.fleet.record(id)).collect();
        let now = self.now();
        let callers = std::mem::take(&mut inner.fleet.new_callers)
            .into_iter()
            .map(|((kind, id), count)| Caller { kind, id, count, last_seen: now })
            .collect();
        Batch { keys, usage, nodes, callers }
    }

    /// Caller counts the store did not take: written with the next batch.
    pub fn requeue_callers(&self, callers: Vec<Caller>) {
        let mut inner = self.lock();
        for c in callers {
            let slot = inner.fleet.new_callers.entry((c.kind, c.id)).or_default();
            *slot = slot.saturating_add(c.count);
        }
    }

    /// A batch the store did not take: written with the next one.
    pub fn requeue(&self, keys: Dirty) {
        let mut inner = self.lock();
        inner.dirty.usage.extend(keys.usage);
        inner.dirty.nodes.extend(keys.nodes);
    }

    /// Marks everything this companion knows of its own nodes for writing (the store came back
    /// and may have lost writes), or with `connected_only` just the connected ones (their
    /// `last_seen`).
    pub fn mark_own(&self, connected_only: bool) {
        let mut inner = self.lock();
        let ids = if connected_only { inner.fleet.connected_here() } else { inner.fleet.own_nodes() };
        if !connected_only {
            let keys: Vec<(String, u64)> =
                inner.fleet.usage_keys().into_iter().filter(|(node, _)| ids.contains(node)).collect();
            inner.dirty.usage.extend(keys);
        }
        inner.dirty.nodes.extend(ids);
    }

    /// Revisions served and not yet in the audit trail.
    pub fn take_served(&self) -> Vec<Served> {
        std::mem::take(&mut self.lock().served)
    }

    /// Revisions the store did not take, before those served since.
    pub fn requeue_served(&self, mut served: Vec<Served>) {
        let mut inner = self.lock();
        served.append(&mut inner.served);
        let excess = served.len().saturating_sub(MAX_PENDING_REVISIONS);
        served.drain(..excess);
        inner.served = served;
    }

    /// Usage and node records read from the store; `alive`: the companions heard from lately.
    pub fn absorb(&self, usage: &[UsageRow], nodes: &[NodeRecord]) {
        let now = self.now();
        let mut inner = self.lock();
        let alive: HashSet<String> = inner
            .companions
            .iter()
            .filter(|c| now - c.last_seen <= COMPANION_ALIVE_SECS)
            .map(|c| c.name.clone())
            .collect();
        inner.fleet.absorb_usage(usage);
        inner.fleet.absorb_nodes(nodes, &alive);
        self.recompute(&inner);
    }

    /// The fleet totals of `day` as the store has them, from every companion's nodes.
    pub fn set_store_totals(&self, day: u64, totals: BTreeMap<String, Counts>) {
        let mut inner = self.lock();
        inner.store_totals = (day, totals);
        self.recompute(&inner);
    }

    pub fn set_companions(&self, companions: Vec<CompanionRecord>) {
        self.lock().companions = companions;
    }

    /// Whether the store answered its last operation (`None`) or why not.
    pub fn set_store_error(&self, error: Option<String>) {
        if let Some((_, e)) = self.lock().store_health.as_mut() {
            *e = error;
        }
    }

    /// This companion, as the store keeps it.
    pub fn companion_record(&self, started: i64) -> CompanionRecord {
        let snapshot = self.current();
        CompanionRecord {
            name: self.name(),
            revision: snapshot.revision.clone(),
            content_sha256: hex::encode(snapshot.content),
            started,
            last_seen: self.now(),
        }
    }

    /// Status of the store for `status` and `audit`.
    pub fn store_status(&self) -> Option<v1::StoreStatus> {
        store_status_of(&self.lock())
    }

    /// Once a second or so: a new UTC day empties the exhausted set, an expiring override may
    /// lower a budget, old usage is forgotten, and the snapshot replaced last is freed.
    pub fn tick(&self) {
        let now = self.now();
        let mut inner = self.lock();
        inner.fleet.prune(day_of(now), now);
        self.recompute(&inner);
        let retired = std::mem::take(&mut inner.retired);
        drop(inner);
        drop(retired);
    }

    /// Recomputes today's exhausted apps; pushes them when they (or the day) changed.
    fn recompute(&self, inner: &Inner) {
        let now = self.now();
        let day = day_of(now);
        let snapshot = self.current();
        let exhausted = exhausted_in(fleet_totals(inner, day), &snapshot.policy, now);
        self.fleet_state.send_if_modified(|state| {
            if state.day == day && state.exhausted_apps == exhausted {
                return false;
            }
            let added: Vec<&String> =
                exhausted.iter().filter(|a| state.day != day || !state.exhausted_apps.contains(a)).collect();
            if state.day != day {
                log!("UTC day {day} began: no app is exhausted fleet-wide");
            }
            for app in added {
                log!("app {app} spent its daily budget fleet-wide (day {day}): pushing to every node");
            }
            state.day = day;
            state.exhausted_apps = exhausted;
            true
        });
    }

    /// The shadow candidate's section of `status` alone (`None` when none is served), for the
    /// console: without building every node's record.
    pub fn candidate_status(&self) -> Option<v1::CandidateStatus> {
        let inner = self.lock();
        let connected: HashSet<&str> = inner.fleet.connected_ids().collect();
        self.shadow.status(|id| connected.contains(id))
    }

    pub fn status(&self) -> v1::StatusResponse {
        let now = self.now();
        let day = day_of(now);
        let snapshot = self.current();
        let inner = self.lock();
        let totals: BTreeMap<String, Counts> = fleet_totals(&inner, day);
        let daily_budgets = snapshot
            .policy
            .apps
            .iter()
            .filter_map(|a| {
                let budget = snapshot.policy.limits(a, now)?.daily_budget?;
                Some((a.id.clone(), budget))
            })
            .collect();
        let nodes = inner.fleet.to_proto();
        // A set, not a scan per node: with a candidate, 10,000 nodes were 10^8 comparisons.
        let connected: HashSet<&str> = nodes.iter().filter(|n| n.connected).map(|n| n.node_id.as_str()).collect();
        let candidate = self.shadow.status(|id| connected.contains(id));
        v1::StatusResponse {
            revision: snapshot.revision.clone(),
            nodes,
            candidate,
            fleet_usage: (totals.iter().filter(|(row, _)| super::fleet::is_app_row(row)))
                .map(|(app, c)| c.to_proto(app))
                .collect(),
            exempt: totals
                .iter()
                .filter_map(|(row, c)| {
                    Some((row.strip_prefix(super::fleet::EXEMPT_ROW_PREFIX)?.to_string(), c.allowed))
                })
                .collect(),
            day,
            last_policy_error: inner.last_policy_error.clone(),
            exhausted_apps: exhausted_in(totals, &snapshot.policy, now),
            daily_budgets,
            companion: inner.fleet.own.clone(),
            store: store_status_of(&inner),
            companions: inner
                .companions
                .iter()
                .map(|c| v1::Companion {
                    name: c.name.clone(),
                    revision: c.revision.clone(),
                    content_sha256: c.content_sha256.clone(),
                    last_seen_unix: c.last_seen,
                    alive: now - c.last_seen <= COMPANION_ALIVE_SECS,
                })
                .collect(),
        }
    }
}

fn store_status_of(inner: &Inner) -> Option<v1::StoreStatus> {
    inner.store_health.as_ref().map(|(url, error)| v1::StoreStatus {
        url: url.clone(),
        available: error.is_none(),
        error: error.clone().unwrap_or_default(),
    })
}

/// Usage per app of `day` over the fleet: the sum over the nodes this companion knows, or the
/// store's totals (which count every companion's nodes) where they are higher. The store's lag
/// behind this companion's own reports is at most one write interval.
fn fleet_totals(inner: &Inner, day: u64) -> BTreeMap<String, Counts> {
    let mut totals = inner.fleet.totals(day);
    if inner.store_totals.0 == day {
        for (app, stored) in &inner.store_totals.1 {
            totals.entry(app.clone()).or_default().merge_max(stored);
        }
    }
    totals
}

/// Days since 1970-01-01 (UTC) of Unix seconds.
pub fn day_of(secs: i64) -> u64 {
    u64::try_from(secs.max(0)).unwrap_or(0) / SECS_PER_DAY
}

/// SHA-256 of the document as compact JSON.
fn content_of(doc: &Document) -> [u8; 32] {
    Sha256::digest(doc.canonical.as_bytes()).into()
}

/// Labels the document (see the module docs) and checks what will be pushed. Also returns the
/// document's JSON tree, for the caller to free when it suits.
/// Of `active`, those `base` can take together, in order: each that makes the policy invalid
/// with the ones kept before it is left out, with a log line.
fn fitting(base: &str, active: Vec<Request>) -> Vec<Request> {
    let mut kept: Vec<Request> = Vec::with_capacity(active.len());
    for request in active {
        kept.push(request);
        if let Err(why) = overlaid(base, &kept) {
            if let Some(r) = kept.pop() {
                log!("approved request {} does not apply to the policy file as it is now, left out: {why}", r.id);
            }
        }
    }
    kept
}

/// The policy file's JSON with `active` applied, compiled, and the words for the audit trail's
/// source (`requests req-1, req-2`); the errors of the result when it is not a valid policy.
fn overlaid(base: &str, active: &[Request]) -> Result<(Document, String), String> {
    let base: serde_json::Value =
        serde_json::from_str(base).map_err(|e| format!("the policy file's document is not JSON: {e}"))?;
    let (json, skipped) = crate::selfservice::requests::apply(&base, active);
    let applied: Vec<&str> =
        active.iter().map(|r| r.id.as_str()).filter(|id| !skipped.iter().any(|s| s == id)).collect();
    if !skipped.is_empty() {
        log!("approved requests {} name apps the policy file no longer has: not applied", skipped.join(", "));
    }
    let text = serde_json::to_string(&json).map_err(|e| format!("cannot encode the policy: {e}"))?;
    let doc = load_json_document(&text, &mut ExpressionCache::default())
        .ok_or("the policy with the requests applied is not one JSON document")?
        .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
    Ok((doc, format!("requests {}", applied.join(", "))))
}

fn make_snapshot(
    file: &Path,
    doc: Document,
    content: [u8; 32],
    labels: &mut HashMap<String, [u8; 32]>,
) -> Result<(Snapshot, serde_json::Value), String> {
    let doc_revision = doc.policy.revision.clone();
    let short = hex::encode(&content[..4]);
    let revision = if doc_revision.is_empty() {
        format!("sha256:{short}")
    } else if labels.get(&doc_revision).is_some_and(|c| *c != content) {
        format!("{doc_revision}+sha256:{short}")
    } else {
        doc_revision.clone()
    };
    let label = serde_json::Value::String(revision.clone());
    let mut tree = doc.json;
    let json = if tree.get("revision") == Some(&label) {
        doc.canonical
    } else {
        if let Some(object) = tree.as_object_mut() {
            object.insert("revision".into(), label);
        }
        serde_json::to_string(&tree).map_err(|e| format!("cannot encode the policy: {e}"))?
    };
    if json.len() > MAX_POLICY_JSON_BYTES {
        return Err(format!(
            "{}: the policy is {} bytes as JSON; at most {MAX_POLICY_JSON_BYTES} can be pushed",
            file.display(),
            json.len()
        ));
    }
    // What the filter compiles is what was validated: the policy was compiled from the canonical
    // JSON (`Document::canonical`), and the pushed JSON differs from it at most in `revision`, now
    // this label (a revision may be any string). Compiling it a second time would find nothing new.
    let mut policy = doc.policy;
    policy.revision.clone_from(&revision);
    if labels.len() >= MAX_LABELS {
        labels.clear();
    }
    labels.entry(doc_revision).or_insert(content);
    labels.insert(revision.clone(), content);
    let framed = framed(&revision, json.clone().into_bytes(), Vec::new());
    let framed_zlib = std::sync::OnceLock::new();
    Ok((Snapshot { revision, content, json, framed, framed_zlib, delta: None, policy }, tree))
}
