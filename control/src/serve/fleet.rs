//! The fleet as the companion sees it: every node (Envoy process) that said Hello, what it
//! acknowledged or rejected, and its usage per app and UTC day.
//!
//! Pure bookkeeping: no I/O, no clock (every call takes `now`), so it is tested without a server.
//!
//! ## Fleet budgets
//!
//! A node reports absolute counts for one UTC day (its own `day`), so a repeated or reordered
//! report is harmless: each (node, day, app) keeps the highest count seen. The fleet total of an
//! app is the sum over nodes, connected or not (a node that went away still spent what it spent).
//! An app is exhausted for a day once its fleet `allowed` total reaches the daily budget in force
//! (`CompiledPolicy::limits`: the tier's, or an unexpired override's).
//!
//! Accuracy: the companion learns of usage only through reports, so the fleet may overshoot a
//! budget by what it admits between reaching it and the filters applying the pushed
//! exhaustion: at most about (report interval + push latency) × fleet request rate for the app.
//! The filter reports every second, so an app at 100 requests/s across the fleet overshoots by
//! about 100 requests. Each Envoy also enforces the whole budget locally, so no single Envoy ever
//! exceeds it.

use crate::store::{NodeRecord, UsageRow};
use guardrail_core::compile::{CompiledPolicy, MAX_APP_ID_LEN};
use guardrail_proto::v1;
use std::collections::{BTreeMap, HashSet};

/// Nodes connected to this companion at once; a Hello of a new node beyond this is refused.
pub const MAX_NODES: usize = 10_000;
/// This companion's nodes remembered at once: connected, gone with usage of the days kept (fleet
/// budgets count it), or gone less than a day. Beyond it, the gone node without usage seen last
/// longest ago is forgotten to make room; a Hello is refused only when every node remembered is
/// connected or has usage (a runaway client creating node ids). Envoy restarts and rollouts, each
/// a new node id, never use up the cap of connected nodes.
pub const MAX_REMEMBERED: usize = 4 * MAX_NODES;
/// Nodes remembered at once with those other companions sharing the store reported (read from it,
/// never refused: beyond this the store's other nodes are left out of this companion's view).
pub const MAX_FLEET_NODES: usize = 4 * MAX_NODES;
/// Apps in one usage report.
pub const MAX_APPS_PER_REPORT: usize = 10_000;
/// Denial codes per app in one usage report.
pub const MAX_CODES_PER_APP: usize = 64;
/// Connectors per app in one usage report (the filter counts at most 32).
pub const MAX_CONNECTORS_PER_APP: usize = 64;
/// Unregistered callers in one usage report (the filter counts at most 100 a day).
pub const MAX_CALLERS_PER_REPORT: usize = 256;
/// The usage row (in place of an app id, which cannot hold `*`) of a node's unregistered callers
/// of a day: their requests summed by kind (`api-key`, `app`) in `denied`, so the store keeps
/// the registration share's daily history with the usage.
pub const UNREGISTERED_ROW: &str = "*unregistered";
/// The usage rows of the requests each exemption passed (`*exempt/<id>`, their count in
/// `allowed`): no app, no quota, kept and summed with the usage.
pub const EXEMPT_ROW_PREFIX: &str = "*exempt/";
/// Exemptions counted in one report at most.
pub const MAX_EXEMPT_PER_REPORT: usize = 256;

/// Whether a usage row is an app's (not [`UNREGISTERED_ROW`] nor an exemption's): app ids never
/// start with `*`.
pub fn is_app_row(row: &str) -> bool {
    !row.starts_with('*')
}
/// Longest node id, revision or denial code accepted.
pub const MAX_ID_LEN: usize = 256;
/// Longest NACK error kept (the rest is cut, marked with `…`).
pub const MAX_ERROR_LEN: usize = 16 * 1024;
/// A disconnected node without usage of the days kept is forgotten after this long.
pub const FORGET_AFTER_SECS: i64 = 86_400;

/// A client message the fleet refuses; the stream that sent it is closed with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("node_id must be 1 to {MAX_ID_LEN} printable characters")]
    BadNodeId,
    #[error(
        "too many nodes ({MAX_NODES} connected, or {MAX_REMEMBERED} remembered that are connected or have usage of today or yesterday); refusing new ones"
    )]
    TooManyNodes,
    #[error("{0}")]
    BadReport(String),
}

/// Counts of one app on one node (or summed over the fleet) for one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counts {
    pub allowed: u64,
    pub throttled: u64,
    pub soft_limit: u64,
    /// By problem code, e.g. `quota-exceeded`.
    pub denied: BTreeMap<String, u64>,
    /// Of `denied["budget-exhausted"]`: refused because the fleet-wide budget was spent.
    pub fleet_budget: u64,
    /// Admitted requests by upstream connector (for cost).
    pub connectors: BTreeMap<String, u64>,
}

/// `a` raised to `b`, key by key.
fn max_into(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, n) in b {
        match a.get_mut(k) {
            Some(slot) => *slot = (*slot).max(*n),
            None => {
                a.insert(k.clone(), *n);
            }
        }
    }
}

/// `b` added to `a`, key by key.
fn add_into(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    // A key is copied only when it is new (sums over many days and apps repeat the same codes).
    for (k, n) in b {
        match a.get_mut(k) {
            Some(slot) => *slot = slot.saturating_add(*n),
            None => {
                a.insert(k.clone(), *n);
            }
        }
    }
}

/// What `a` has above `b`, key by key (every key of `a`).
fn minus_of(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    a.iter().map(|(k, n)| (k.clone(), n.saturating_sub(b.get(k).copied().unwrap_or(0)))).collect()
}

impl Counts {
    fn from_proto(u: &v1::AppUsage) -> Self {
        Counts {
            allowed: u.allowed,
            throttled: u.throttled,
            soft_limit: u.soft_limit,
            denied: u.denied.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            fleet_budget: u.fleet_budget,
            connectors: u.connectors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }

    /// Keeps the higher of each count: reports are absolute, so the highest is the newest.
    pub fn merge_max(&mut self, other: &Counts) {
        self.allowed = self.allowed.max(other.allowed);
        self.throttled = self.throttled.max(other.throttled);
        self.soft_limit = self.soft_limit.max(other.soft_limit);
        self.fleet_budget = self.fleet_budget.max(other.fleet_budget);
        max_into(&mut self.denied, &other.denied);
        max_into(&mut self.connectors, &other.connectors);
    }

    /// What `self` has above `other`, count by count (0 where it has not more; every code of `self`).
    pub fn minus(&self, other: &Counts) -> Counts {
        Counts {
            allowed: self.allowed.saturating_sub(other.allowed),
            throttled: self.throttled.saturating_sub(other.throttled),
            soft_limit: self.soft_limit.saturating_sub(other.soft_limit),
            denied: minus_of(&self.denied, &other.denied),
            fleet_budget: self.fleet_budget.saturating_sub(other.fleet_budget),
            connectors: minus_of(&self.connectors, &other.connectors),
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.throttled = self.throttled.saturating_add(other.throttled);
        self.soft_limit = self.soft_limit.saturating_add(other.soft_limit);
        self.fleet_budget = self.fleet_budget.saturating_add(other.fleet_budget);
        add_into(&mut self.denied, &other.denied);
        add_into(&mut self.connectors, &other.connectors);
    }

    pub fn to_proto(&self, app: &str) -> v1::AppUsage {
        v1::AppUsage {
            app: app.to_string(),
            allowed: self.allowed,
            throttled: self.throttled,
            soft_limit: self.soft_limit,
            denied: self.denied.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            fleet_budget: self.fleet_budget,
            connectors: self.connectors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

/// One Envoy process, by the node id of its Hello.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub envoy_version: String,
    pub filter_version: String,
    /// The revision it held when it last said Hello.
    pub hello_revision: String,
    pub acked_revision: String,
    pub nacked_revision: String,
    pub last_error: String,
    pub last_seen: i64,
    /// Open streams (1 when healthy; more means two processes share a node id, or a stale stream).
    pub streams: u32,
    /// The client certificate (`sha256:<hex>`) of its latest stream, under mutual TLS.
    pub client_certificate: String,
    /// The companion it opened its latest stream on: this one, or another sharing the store.
    pub companion: String,
    /// Streams open on another (live) companion, as the store says; 0 for nodes of this one.
    pub elsewhere: u32,
    /// Per UTC day, per app.
    usage: BTreeMap<u64, BTreeMap<String, Counts>>,
    /// Per UTC day, the unregistered callers it reported (`(kind, id)` → absolute count).
    callers: BTreeMap<u64, BTreeMap<(String, String), u64>>,
}

/// Every node the companion has heard from (recently), its own and (from the store) those of the
/// other companions sharing the store.
#[derive(Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, Node>,
    /// Per UTC day and app, the sum over nodes of their counts, kept as reports raise them: a
    /// report costs O(apps in it), not O(nodes).
    totals: BTreeMap<u64, BTreeMap<String, Counts>>,
    /// This companion's name, recorded on the nodes that connect to it.
    pub own: String,
    /// What the unregistered callers' counts rose by since the store last took them.
    pub new_callers: BTreeMap<(String, String), u64>,
    /// Nodes with a stream open on this companion (kept as streams open and end).
    connected: usize,
    caps: Caps,
}

/// How many nodes a [`Fleet`] takes: [`MAX_NODES`] and [`MAX_REMEMBERED`] but in tests.
#[derive(Debug, Clone, Copy)]
struct Caps {
    connected: usize,
    remembered: usize,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps { connected: MAX_NODES, remembered: MAX_REMEMBERED }
    }
}

// === impl Fleet ===

impl Fleet {
    /// A stream said Hello: the node is (re)connected (under mutual TLS, with `certificate`).
    pub fn connect(&mut self, hello: &v1::Hello, certificate: &str, now: i64) -> Result<&Node, FleetError> {
        let id = hello.node_id.as_str();
        if !valid_id(id) {
            return Err(FleetError::BadNodeId);
        }
        // The caps are on this companion's own nodes; others' (from the store) do not use them up.
        if !self.nodes.contains_key(id) {
            let Caps { connected, remembered } = self.caps;
            if self.connected >= connected
                || (self.nodes.len() >= remembered
                    && self.nodes.values().filter(|n| n.companion == self.own).count() >= remembered
                    && !self.forget_one_gone())
            {
                return Err(FleetError::TooManyNodes);
            }
        }
        let node = self.nodes.entry(id.to_string()).or_default();
        if node.streams == 0 {
            self.connected += 1;
        }
        node.envoy_version = truncated(&hello.envoy_version, MAX_ID_LEN);
        node.filter_version = truncated(&hello.filter_version, MAX_ID_LEN);
        node.hello_revision = truncated(&hello.revision, MAX_ID_LEN);
        node.last_seen = now;
        node.streams = node.streams.saturating_add(1);
        node.client_certificate = certificate.to_string();
        node.companion.clone_from(&self.own);
        node.elsewhere = 0;
        Ok(node)
    }

    /// Forgets this companion's gone node without usage that was seen last longest ago; `false`
    /// when there is none (every node is connected or has usage a fleet budget counts).
    fn forget_one_gone(&mut self) -> bool {
        let oldest = self
            .nodes
            .iter()
            .filter(|(_, n)| n.companion == self.own && n.streams == 0 && n.elsewhere == 0 && n.usage.is_empty())
            .min_by_key(|(_, n)| n.last_seen)
            .map(|(id, _)| id.clone());
        oldest.is_some_and(|id| self.nodes.remove(&id).is_some())
    }

    /// One of the node's streams ended.
    pub fn disconnect(&mut self, node_id: &str, now: i64) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            if node.streams == 1 {
                self.connected = self.connected.saturating_sub(1);
            }
            node.streams = node.streams.saturating_sub(1);
            node.last_seen = now;
        }
    }

    pub fn seen(&mut self, node_id: &str, now: i64) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.last_seen = now;
        }
    }

    /// The node applied `revision`. Once it holds the served one, an older rejection is history.
    pub fn ack(&mut self, node_id: &str, revision: &str, served: &str) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.acked_revision = truncated(revision, MAX_ID_LEN);
            if revision == served {
                node.nacked_revision.clear();
                node.last_error.clear();
            }
        }
    }

    /// The node refused `revision` and keeps what it had.
    pub fn nack(&mut self, node_id: &str, revision: &str, error: &str) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.nacked_revision = truncated(revision, MAX_ID_LEN);
            node.last_error = truncated(error, MAX_ERROR_LEN);
        }
    }

    /// Records a usage report. Reports for a day other than yesterday, today or tomorrow (a node
    /// whose clock is far off) are refused, as are oversized ones.
    pub fn report(&mut self, node_id: &str, report: &v1::UsageReport, today: u64) -> Result<(), FleetError> {
        if report.day + 1 < today || report.day > today + 1 {
            return Err(FleetError::BadReport(format!(
                "usage report for day {} while the companion's UTC day is {today}: is the node's clock right?",
                report.day
            )));
        }
        if report.apps.len() > MAX_APPS_PER_REPORT {
            return Err(FleetError::BadReport(format!(
                "usage report of {} apps; at most {MAX_APPS_PER_REPORT}",
                report.apps.len()
            )));
        }
        for app in &report.apps {
            if app.app.is_empty() || app.app.chars().count() > MAX_APP_ID_LEN {
                return Err(FleetError::BadReport(format!(
                    "usage report with an app id of {} characters; ids are 1 to {MAX_APP_ID_LEN}",
                    app.app.chars().count()
                )));
            }
            if app.denied.len() > MAX_CODES_PER_APP || app.denied.keys().any(|code| !valid_id(code)) {
                return Err(FleetError::BadReport(format!(
                    "usage report for app `{}` with {} denial codes; at most {MAX_CODES_PER_APP}, each 1 to {MAX_ID_LEN} characters",
                    app.app,
                    app.denied.len()
                )));
            }
        }
        if report.unregistered.len() > MAX_CALLERS_PER_REPORT {
            return Err(FleetError::BadReport(format!(
                "usage report with {} unregistered callers; at most {MAX_CALLERS_PER_REPORT}",
                report.unregistered.len()
            )));
        }
        for c in &report.unregistered {
            let fingerprint = c.id.len() == 8 && c.id.bytes().all(|b| b.is_ascii_hexdigit());
            let ok = match c.kind.as_str() {
                "api-key" => fingerprint,
                "app" => valid_id(&c.id) && c.id.chars().count() <= MAX_APP_ID_LEN,
                _ => false,
            };
            if !ok {
                return Err(FleetError::BadReport(format!(
                    "usage report with an unregistered caller of kind `{}` and id of {} characters: kind is \
                     `api-key` (id: 8 hex digits) or `app` (id: 1 to {MAX_APP_ID_LEN} characters)",
                    truncated(&c.kind, 32),
                    c.id.chars().count()
                )));
            }
        }
        if report.exempt.len() > MAX_EXEMPT_PER_REPORT || report.exempt.keys().any(|id| !valid_id(id)) {
            return Err(FleetError::BadReport(format!(
                "usage report with {} exemption counts; at most {MAX_EXEMPT_PER_REPORT}, each id 1 to {MAX_ID_LEN} characters",
                report.exempt.len()
            )));
        }
        for app in &report.apps {
            if app.connectors.len() > MAX_CONNECTORS_PER_APP || app.connectors.keys().any(|c| !valid_id(c)) {
                return Err(FleetError::BadReport(format!(
                    "usage report for app `{}` with {} connectors; at most {MAX_CONNECTORS_PER_APP}, each 1 to {MAX_ID_LEN} characters",
                    app.app,
                    app.connectors.len()
                )));
            }
        }
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Ok(());
        };
        let seen = node.callers.entry(report.day).or_default();
        for c in &report.unregistered {
            let slot = seen.entry((c.kind.clone(), c.id.clone())).or_default();
            if c.count > *slot {
                let raised = self.new_callers.entry((c.kind.clone(), c.id.clone())).or_default();
                *raised = raised.saturating_add(c.count - *slot);
                *slot = c.count;
            }
        }
        if !seen.is_empty() {
            let mut by_kind = Counts::default();
            for ((kind, _), n) in seen.iter() {
                let slot = by_kind.denied.entry(kind.clone()).or_default();
                *slot = slot.saturating_add(*n);
            }
            self.merge(node_id, report.day, UNREGISTERED_ROW, &by_kind);
        }
        for app in &report.apps {
            self.merge(node_id, report.day, &app.app, &Counts::from_proto(app));
        }
        for (id, n) in &report.exempt {
            let counts = Counts { allowed: *n, ..Counts::default() };
            self.merge(node_id, report.day, &format!("{EXEMPT_ROW_PREFIX}{id}"), &counts);
        }
        Ok(())
    }

    /// Merges one count of a known node (the highest of each count), adding what it raised to the
    /// day's totals.
    fn merge(&mut self, node_id: &str, day: u64, app: &str, counts: &Counts) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        let slot = node.usage.entry(day).or_default().entry(app.to_string()).or_default();
        let before = slot.clone();
        slot.merge_max(counts);
        let raised = slot.minus(&before);
        self.totals.entry(day).or_default().entry(app.to_string()).or_default().add(&raised);
    }

    /// Usage per app for `day`, summed over every node.
    pub fn totals(&self, day: u64) -> BTreeMap<String, Counts> {
        self.totals.get(&day).cloned().unwrap_or_default()
    }

    /// The fleet's count of one app for `day` (the nodes this companion knows).
    pub fn total(&self, day: u64, app: &str) -> Option<&Counts> {
        self.totals.get(&day)?.get(app)
    }
}

/// The apps of `totals` whose `allowed` reached the daily budget in force at `now` (sorted). Apps
/// no longer in the catalog have no budget here.
pub fn exhausted_in(totals: BTreeMap<String, Counts>, policy: &CompiledPolicy, now: i64) -> Vec<String> {
    totals
        .into_iter()
        .filter(|(app, counts)| {
            policy
                .app(app)
                .and_then(|a| policy.limits(a, now))
                .and_then(|l| l.daily_budget)
                .is_some_and(|budget| counts.allowed >= budget)
        })
        .map(|(app, _)| app)
        .collect()
}

impl Fleet {
    /// Drops usage of days before yesterday, and nodes gone for a day with none left.
    pub fn prune(&mut self, today: u64, now: i64) {
        for node in self.nodes.values_mut() {
            node.usage.retain(|day, _| day + 1 >= today);
            node.callers.retain(|day, _| day + 1 >= today);
        }
        self.totals.retain(|day, _| day + 1 >= today);
        self.nodes.retain(|_, n| {
            n.streams > 0 || n.elsewhere > 0 || !n.usage.is_empty() || now - n.last_seen < FORGET_AFTER_SECS
        });
    }

    // --- the store ---

    /// The node as the store keeps it (`None` for an unknown node).
    pub fn record(&self, node_id: &str) -> Option<NodeRecord> {
        let n = self.nodes.get(node_id)?;
        Some(NodeRecord {
            node_id: node_id.to_string(),
            companion: n.companion.clone(),
            envoy_version: n.envoy_version.clone(),
            filter_version: n.filter_version.clone(),
            acked_revision: n.acked_revision.clone(),
            nacked_revision: n.nacked_revision.clone(),
            last_error: n.last_error.clone(),
            last_seen: n.last_seen,
            streams: n.streams,
            client_certificate: n.client_certificate.clone(),
        })
    }

    /// Ids of the nodes connected to this companion.
    /// Ids of the nodes connected to this companion or, as the store says, to another live one.
    pub fn connected_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().filter(|(_, n)| n.streams > 0 || n.elsewhere > 0).map(|(id, _)| id.as_str())
    }

    pub fn connected_here(&self) -> Vec<String> {
        self.nodes.iter().filter(|(_, n)| n.streams > 0).map(|(id, _)| id.clone()).collect()
    }

    /// Ids of the nodes of this companion (connected now or before).
    pub fn own_nodes(&self) -> Vec<String> {
        self.nodes.iter().filter(|(_, n)| n.companion == self.own).map(|(id, _)| id.clone()).collect()
    }

    /// The node's usage of `day`, as rows for the store.
    pub fn usage_rows(&self, node_id: &str, day: u64) -> Vec<UsageRow> {
        let Some(apps) = self.nodes.get(node_id).and_then(|n| n.usage.get(&day)) else {
            return Vec::new();
        };
        apps.iter()
            .map(|(app, counts)| UsageRow { day, node: node_id.to_string(), app: app.clone(), counts: counts.clone() })
            .collect()
    }

    /// The (node, day) pairs holding usage.
    pub fn usage_keys(&self) -> Vec<(String, u64)> {
        self.nodes.iter().flat_map(|(id, n)| n.usage.keys().map(move |day| (id.clone(), *day))).collect()
    }

    /// Usage read from the store (this companion's before a restart, or other companions' nodes):
    /// merged by the highest count, as reports are. Beyond [`MAX_FLEET_NODES`], new nodes are skipped.
    pub fn absorb_usage(&mut self, rows: &[UsageRow]) {
        for row in rows {
            if !self.nodes.contains_key(&row.node) && (self.nodes.len() >= MAX_FLEET_NODES || !valid_id(&row.node)) {
                continue;
            }
            self.nodes.entry(row.node.clone()).or_default();
            self.merge(&row.node, row.day, &row.app, &row.counts);
        }
    }

    /// Node records read from the store. A node connected here is this companion's to describe;
    /// any other takes the record, and counts as connected when its companion is one of `alive`
    /// (and not this one: streams this companion had before a restart are gone).
    pub fn absorb_nodes(&mut self, records: &[NodeRecord], alive: &HashSet<String>) {
        for r in records {
            if self.nodes.get(&r.node_id).is_some_and(|n| n.streams > 0) {
                continue;
            }
            if !self.nodes.contains_key(&r.node_id) && (self.nodes.len() >= MAX_FLEET_NODES || !valid_id(&r.node_id)) {
                continue;
            }
            let node = self.nodes.entry(r.node_id.clone()).or_default();
            node.companion.clone_from(&r.companion);
            node.envoy_version.clone_from(&r.envoy_version);
            node.filter_version.clone_from(&r.filter_version);
            node.acked_revision.clone_from(&r.acked_revision);
            node.nacked_revision.clone_from(&r.nacked_revision);
            node.last_error.clone_from(&r.last_error);
            node.last_seen = node.last_seen.max(r.last_seen);
            node.client_certificate.clone_from(&r.client_certificate);
            node.elsewhere = if r.companion != self.own && alive.contains(&r.companion) { r.streams } else { 0 };
        }
    }

    #[cfg(test)]
    pub fn get(&self, node_id: &str) -> Option<&Node> {
        self.nodes.get(node_id)
    }

    /// Every node, by id.
    pub fn to_proto(&self) -> Vec<v1::Node> {
        self.nodes
            .iter()
            .map(|(id, n)| v1::Node {
                node_id: id.clone(),
                envoy_version: n.envoy_version.clone(),
                filter_version: n.filter_version.clone(),
                acked_revision: n.acked_revision.clone(),
                nacked_revision: n.nacked_revision.clone(),
                last_error: n.last_error.clone(),
                last_seen_unix: n.last_seen,
                connected: n.streams > 0 || n.elsewhere > 0,
                streams: if n.streams > 0 { n.streams } else { n.elsewhere },
                client_certificate: n.client_certificate.clone(),
                companion: n.companion.clone(),
            })
            .collect()
    }
}

/// Non-empty, at most [`MAX_ID_LEN`] characters, no control characters (they end up in logs).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// `text` cut to at most `max` characters (marked with `…` when cut).
pub fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str) -> v1::Hello {
        v1::Hello {
            node_id: id.into(),
            envoy_version: "1.33.0".into(),
            filter_version: "0.1.0".into(),
            revision: String::new(),
            accepts_zlib: false,
            accepts_delta: false,
        }
    }

    fn report(day: u64, apps: &[(&str, u64)]) -> v1::UsageReport {
        v1::UsageReport {
            day,
            apps: apps
                .iter()
                .map(|(app, allowed)| v1::AppUsage { app: (*app).into(), allowed: *allowed, ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn node_ids_are_checked() {
        let mut fleet = Fleet::default();
        let cases: &[(&str, bool, &str)] = &[
            ("envoy-1", true, "plain"),
            ("", false, "empty"),
            ("a\nb", false, "control character"),
            (&"x".repeat(MAX_ID_LEN), true, "longest"),
            (&"x".repeat(MAX_ID_LEN + 1), false, "too long"),
        ];
        for (id, ok, why) in cases {
            assert_eq!(fleet.connect(&hello(id), "", 0).is_ok(), *ok, "{why}");
        }
    }

    #[test]
    fn the_status_names_the_client_certificate_of_the_latest_stream() {
        let mut fleet = Fleet::default();
        assert!(fleet.connect(&hello("a"), "sha256:01", 1).is_ok());
        assert_eq!(fleet.to_proto()[0].client_certificate, "sha256:01");
        assert!(fleet.connect(&hello("a"), "sha256:02", 2).is_ok());
        assert_eq!(fleet.to_proto()[0].client_certificate, "sha256:02", "another certificate took the node id");
        assert!(fleet.connect(&hello("a"), "", 3).is_ok());
        assert_eq!(fleet.to_proto()[0].client_certificate, "", "then a stream without one");
    }

    #[test]
    fn streams_are_counted_per_node() {
        let mut fleet = Fleet::default();
        assert!(fleet.connect(&hello("a"), "", 1).is_ok());
        assert!(fleet.connect(&hello("a"), "", 2).is_ok());
        assert_eq!(fleet.get("a").map(|n| n.streams), Some(2));
        fleet.disconnect("a", 3);
        fleet.disconnect("a", 4);
        fleet.disconnect("a", 5);
        let node = fleet.get("a").cloned().unwrap_or_default();
        assert_eq!((node.streams, node.last_seen), (0, 5), "never below zero");
        assert!(!fleet.to_proto()[0].connected);
    }

    #[test]
    fn ack_of_the_served_revision_clears_an_older_nack() {
        let mut fleet = Fleet::default();
        assert!(fleet.connect(&hello("a"), "", 0).is_ok());
        fleet.nack("a", "8", "rules[0].when: syntax error");
        fleet.ack("a", "7", "8");
        let n = fleet.get("a").cloned().unwrap_or_default();
        assert_eq!(
            (n.acked_revision.as_str(), n.nacked_revision.as_str()),
            ("7", "8"),
            "the NACK of 8 stands while 8 is served"
        );
        fleet.ack("a", "9", "9");
        let n = fleet.get("a").cloned().unwrap_or_default();
        assert_eq!((n.nacked_revision.as_str(), n.last_error.as_str()), ("", ""));
    }

    #[test]
    fn usage_sums_nodes_and_keeps_the_highest_count() {
        let mut fleet = Fleet::default();
        for id in ["a", "b"] {
            assert!(fleet.connect(&hello(id), "", 0).is_ok());
        }
        let today = 20_000;
        assert!(fleet.report("a", &report(today, &[("app", 10), ("other", 1)]), today).is_ok());
        assert!(fleet.report("a", &report(today, &[("app", 7)]), today).is_ok(), "reordered");
        assert!(fleet.report("b", &report(today, &[("app", 5)]), today).is_ok());
        assert!(fleet.report("b", &report(today - 1, &[("app", 1000)]), today).is_ok());
        let totals = fleet.totals(today);
        assert_eq!(totals.get("app").map(|c| c.allowed), Some(15));
        assert_eq!(totals.get("other").map(|c| c.allowed), Some(1));
        fleet.disconnect("b", 1);
        assert_eq!(
            fleet.totals(today).get("app").map(|c| c.allowed),
            Some(15),
            "a node that went away still spent what it spent"
        );
    }

    #[test]
    fn unregistered_callers_rise_by_what_each_node_adds() {
        let mut fleet = Fleet::default();
        for id in ["a", "b"] {
            assert!(fleet.connect(&hello(id), "", 0).is_ok());
        }
        let today = 20_000;
        let caller = |kind: &str, id: &str, count| v1::UnregisteredCaller { kind: kind.into(), id: id.into(), count };
        let with =
            |callers: Vec<v1::UnregisteredCaller>| v1::UsageReport { unregistered: callers, ..report(today, &[]) };
        let key = |kind: &str, id: &str| (kind.to_string(), id.to_string());
        assert!(fleet.report("a", &with(vec![caller("api-key", "0a1b2c3d", 3)]), today).is_ok());
        assert!(fleet.report("a", &with(vec![caller("api-key", "0a1b2c3d", 5)]), today).is_ok(), "rises by 2");
        assert!(fleet.report("a", &with(vec![caller("api-key", "0a1b2c3d", 4)]), today).is_ok(), "reordered: nothing");
        assert!(fleet
            .report("b", &with(vec![caller("api-key", "0a1b2c3d", 1), caller("app", "ghost", 7)]), today)
            .is_ok());
        let want: BTreeMap<_, _> = [(key("api-key", "0a1b2c3d"), 6), (key("app", "ghost"), 7)].into_iter().collect();
        assert_eq!(std::mem::take(&mut fleet.new_callers), want);
        let row = fleet.totals(today).get(UNREGISTERED_ROW).map(|c| c.denied.clone()).unwrap_or_default();
        let want: BTreeMap<String, u64> = [("api-key".to_string(), 6), ("app".to_string(), 7)].into_iter().collect();
        assert_eq!(row, want, "the day's unregistered requests by kind, summed over nodes");
        for (why, bad) in [
            ("kind", caller("user", "x", 1)),
            ("fingerprint", caller("api-key", "not-hex!", 1)),
            ("empty app", caller("app", "", 1)),
            ("control character", caller("app", "a\nb", 1)),
        ] {
            assert!(fleet.report("a", &with(vec![bad]), today).is_err(), "{why}");
        }
        let many = (0..=MAX_CALLERS_PER_REPORT).map(|i| caller("api-key", &format!("{i:08x}"), 1)).collect();
        assert!(fleet.report("a", &with(many), today).is_err(), "too many");
        assert!(fleet.new_callers.is_empty(), "a refused report counts nothing");
    }

    #[test]
    fn totals_kept_as_reports_come_are_the_sum_over_nodes() {
        let mut fleet = Fleet::default();
        let today = 20_000;
        for id in ["a", "b", "c"] {
            assert!(fleet.connect(&hello(id), "", 0).is_ok());
        }
        // Reports rising, repeated and reordered, with denial codes coming and going.
        let mut seed: u64 = 7;
        for _ in 0..500 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let node = ["a", "b", "c"][usize::try_from(seed >> 62).unwrap_or(0) % 3];
            let app = ["x", "y"][usize::from(seed & 1 == 1)];
            let mut r = report(today - (seed >> 10) % 2, &[(app, (seed >> 20) % 100)]);
            r.apps[0].throttled = (seed >> 30) % 10;
            r.apps[0].denied = [(format!("code-{}", (seed >> 40) % 3), (seed >> 44) % 7)].into_iter().collect();
            assert!(fleet.report(node, &r, today).is_ok());
        }
        for day in [today - 1, today] {
            let mut sum: BTreeMap<String, Counts> = BTreeMap::new();
            for node in fleet.nodes.values() {
                for (app, counts) in node.usage.get(&day).into_iter().flatten() {
                    sum.entry(app.clone()).or_default().add(counts);
                }
            }
            assert_eq!(fleet.totals(day), sum, "day {day}");
        }
    }

    #[test]
    fn restarted_nodes_do_not_use_up_the_cap_and_nodes_with_usage_are_never_forgotten_for_room() {
        // The real caps scaled down 100 times (40,000 connects cost minutes in a debug build).
        let caps = Caps { connected: MAX_NODES / 100, remembered: MAX_REMEMBERED / 100 };
        let mut fleet = Fleet { own: "cp-a".into(), caps, ..Fleet::default() };
        let today = 20_000;
        // A rollout a day: every Envoy comes back under a new node id.
        for round in 0..4 {
            for i in 0..caps.connected {
                let id = format!("r{round}-{i}");
                fleet.connect(&hello(&id), "", round).unwrap();
                fleet.disconnect(&id, round);
            }
        }
        assert_eq!(fleet.nodes.len(), caps.remembered);
        // Connected to the cap, and the next one refused.
        for i in 0..caps.connected {
            let id = format!("live-{i}");
            assert!(fleet.connect(&hello(&id), "", 10).is_ok(), "a new node beside gone ones: {id}");
        }
        assert_eq!(fleet.nodes.len(), caps.remembered, "the gone nodes seen longest ago made room");
        assert!(!fleet.nodes.contains_key("r0-0") && fleet.nodes.contains_key("r3-0"), "oldest first");
        assert_eq!(fleet.connect(&hello("one-too-many"), "", 10).unwrap_err(), FleetError::TooManyNodes);
        // A node that reconnects is not new; one that leaves makes room for a new one.
        assert!(fleet.connect(&hello("live-1"), "", 10).is_ok(), "a second stream of a connected node");
        fleet.disconnect("live-1", 10);
        // A gone node whose usage a fleet budget counts is not forgotten for room.
        fleet.report("live-0", &report(today, &[("app-a", 5)]), today).unwrap();
        fleet.disconnect("live-0", 11);
        for n in fleet.nodes.values_mut().filter(|n| n.streams == 0 && n.usage.is_empty()) {
            n.last_seen = 12;
        }
        assert!(fleet.connect(&hello("another"), "", 12).is_ok(), "room made from a gone node without usage");
        assert!(fleet.nodes.contains_key("live-0"), "the node with usage stays");
        assert_eq!(fleet.totals(today).get("app-a").map(|c| c.allowed), Some(5));
    }

    #[test]
    fn nodes_of_other_companions_do_not_use_up_the_cap() {
        let mut fleet = Fleet { own: "cp-a".into(), ..Fleet::default() };
        let others: Vec<NodeRecord> = (0..MAX_NODES)
            .map(|i| NodeRecord {
                node_id: format!("b-{i}"),
                companion: "cp-b".into(),
                streams: 1,
                ..Default::default()
            })
            .collect();
        fleet.absorb_nodes(&others, &["cp-b".to_string()].into_iter().collect());
        assert_eq!(fleet.to_proto().iter().filter(|n| n.connected).count(), MAX_NODES, "cp-b is alive");
        assert!(fleet.connect(&hello("a-0"), "", 0).is_ok(), "cp-a has no node of its own yet");
        assert_eq!(fleet.get("a-0").map(|n| n.companion.as_str()), Some("cp-a"));
    }

    #[test]
    fn bad_reports_are_refused() {
        let mut fleet = Fleet::default();
        assert!(fleet.connect(&hello("a"), "", 0).is_ok());
        let today = 20_000;
        let mut many_codes = report(today, &[("app", 1)]);
        many_codes.apps[0].denied = (0..=MAX_CODES_PER_APP).map(|i| (format!("code-{i}"), 1)).collect();
        let cases: Vec<(v1::UsageReport, &str)> = vec![
            (report(today - 2, &[("app", 1)]), "the day before yesterday"),
            (report(today + 2, &[("app", 1)]), "after tomorrow"),
            (report(today, &[("", 1)]), "empty app id"),
            (report(today, &[(&"x".repeat(MAX_APP_ID_LEN + 1), 1)]), "app id too long"),
            (many_codes, "too many denial codes"),
        ];
        for (r, why) in cases {
            assert!(fleet.report("a", &r, today).is_err(), "{why}");
        }
        assert!(fleet.totals(today).is_empty(), "nothing was recorded");
    }

    #[test]
    fn prune_forgets_old_days_and_gone_nodes() {
        let mut fleet = Fleet::default();
        let today = 20_000;
        assert!(fleet.connect(&hello("gone"), "", 0).is_ok());
        assert!(fleet.connect(&hello("here"), "", 0).is_ok());
        assert!(fleet.report("gone", &report(today - 1, &[("app", 3)]), today).is_ok());
        fleet.disconnect("gone", 0);
        fleet.prune(today, FORGET_AFTER_SECS);
        assert!(fleet.get("gone").is_some(), "its usage of yesterday is kept");
        fleet.prune(today + 1, FORGET_AFTER_SECS);
        assert!(fleet.get("gone").is_none());
        assert!(fleet.get("here").is_some(), "connected nodes stay");
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncated("ééé", 2), "éé…");
        assert_eq!(truncated("abc", 3), "abc");
    }
}
