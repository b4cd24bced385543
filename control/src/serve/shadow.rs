//! The shadow candidate (`guardrail serve --candidate C`): a policy every Envoy decides each
//! request with beside the enforced one, never enforcing it.
//!
//! The candidate goes out as its own [`v1::Candidate`] message on its own watch channel, so the
//! enforced snapshot and its ACKs are untouched by it; an empty revision stops shadowing. Nodes ACK
//! and NACK it with `candidate: true`, and report in their usage reports, per app and pair of
//! outcome codes, the requests where it differed from the enforced policy since they put it in
//! force. Those absolute counts are kept per node (the newest report replaces the last) and summed
//! for `guardrail status`, in memory only.

use super::wire::frame;
use crate::log::log;
use guardrail_core::source::Document;
use guardrail_proto::v1;
use guardrail_proto::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

/// Difference pairs shown by `status` (and kept per node).
pub const MAX_PAIRS: usize = 100;

/// What one node said about the candidate.
#[derive(Debug, Default)]
struct NodeShadow {
    acked: String,
    nacked: Option<(String, String)>,
    /// The candidate revision its last report was about, and the differences it reported.
    reported: String,
    differences: Vec<v1::ShadowDifference>,
}

#[derive(Default)]
struct State {
    last_error: String,
    nodes: BTreeMap<String, NodeShadow>,
}

/// The candidate served and what the fleet said about it.
pub struct Shadow {
    pushed: watch::Sender<Arc<Served>>,
    state: Mutex<State>,
}

impl Default for Shadow {
    fn default() -> Self {
        Shadow { pushed: watch::Sender::new(Arc::new(Served::new(v1::Candidate::default()))), state: Mutex::default() }
    }
}

/// The candidate message for a validated document: its revision is `<revision>+sha256:<8 hex>`
/// (`sha256:<8 hex>` without one), never the enforced policy's label, and the JSON carries it.
pub fn candidate_of(doc: &Document) -> Result<v1::Candidate, String> {
    let content: [u8; 32] = Sha256::digest(doc.canonical.as_bytes()).into();
    let short = hex::encode(&content[..4]);
    let revision = if doc.policy.revision.is_empty() {
        format!("sha256:{short}")
    } else {
        format!("{}+sha256:{short}", doc.policy.revision)
    };
    let mut tree = doc.json.clone();
    if let Some(object) = tree.as_object_mut() {
        object.insert("revision".into(), serde_json::Value::String(revision.clone()));
    }
    let policy_json = serde_json::to_string(&tree).map_err(|e| format!("cannot encode the candidate: {e}"))?;
    if policy_json.len() > super::hub::MAX_POLICY_JSON_BYTES {
        return Err(format!("the candidate is {} bytes as JSON; too large to push", policy_json.len()));
    }
    Ok(v1::Candidate { revision, policy_json, policy_zlib: Vec::new() })
}

/// The candidate served, with its message framed once for every stream, plain and compressed (a
/// 357 KB candidate was one copy per node, and is about 50 KB compressed).
#[derive(Debug)]
pub struct Served {
    candidate: v1::Candidate,
    plain: Bytes,
    zlib: Bytes,
}

impl Served {
    fn new(candidate: v1::Candidate) -> Self {
        let message = |c: v1::Candidate| v1::ServerMessage { msg: Some(v1::server_message::Msg::Candidate(c)) };
        let plain = frame(&message(candidate.clone()));
        // Compressing cannot fail in memory; should it, the node gets the candidate plain.
        let zlib = match super::hub::zlib(candidate.policy_json.as_bytes()) {
            Ok(zlib) if !candidate.policy_json.is_empty() => frame(&message(v1::Candidate {
                revision: candidate.revision.clone(),
                policy_json: String::new(),
                policy_zlib: zlib,
            })),
            _ => plain.clone(),
        };
        Served { candidate, plain, zlib }
    }

    /// The framed message for a node; compressed when its Hello said it inflates.
    pub fn frame(&self, zlib: bool) -> Bytes {
        if zlib { &self.zlib } else { &self.plain }.clone()
    }
}

impl std::ops::Deref for Served {
    type Target = v1::Candidate;

    fn deref(&self) -> &v1::Candidate {
        &self.candidate
    }
}

// === impl Shadow ===

impl Shadow {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The candidate served (revision "" when none).
    pub fn current(&self) -> Arc<Served> {
        self.pushed.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Served>> {
        self.pushed.subscribe()
    }

    /// Pushes `candidate` to every stream (`None` stops shadowing). Returns whether it changed.
    /// A change forgets what nodes said about the candidate before: they start counting over,
    /// and a revision served again after a stop is applied once ACKed again.
    pub fn set(&self, candidate: Option<v1::Candidate>) -> bool {
        let candidate = candidate.unwrap_or_default();
        let mut state = self.lock();
        state.last_error.clear();
        if self.current().revision == candidate.revision {
            return false;
        }
        state.nodes.clear();
        self.pushed.send_replace(Arc::new(Served::new(candidate)));
        true
    }

    /// Why the newest candidate change was refused (the last good one stays).
    pub fn refused(&self, error: String) {
        self.lock().last_error = error;
    }

    pub fn last_error(&self) -> String {
        self.lock().last_error.clone()
    }

    pub fn ack(&self, node: &str, revision: &str) {
        let mut state = self.lock();
        let n = state.nodes.entry(node.to_string()).or_default();
        n.acked = revision.to_string();
        if n.nacked.as_ref().is_some_and(|(r, _)| r == revision) {
            n.nacked = None;
        }
    }

    pub fn nack(&self, node: &str, revision: &str, error: &str) {
        let mut state = self.lock();
        let n = state.nodes.entry(node.to_string()).or_default();
        n.nacked = Some((revision.to_string(), error.to_string()));
    }

    /// A usage report's shadow part: the differences `node` counted under its candidate.
    pub fn report(&self, node: &str, report: &v1::UsageReport) {
        if report.candidate_revision.is_empty() && report.shadow.is_empty() {
            if let Some(n) = self.lock().nodes.get_mut(node) {
                n.reported.clear();
                n.differences.clear();
            }
            return;
        }
        let mut state = self.lock();
        let n = state.nodes.entry(node.to_string()).or_default();
        n.reported = report.candidate_revision.clone();
        n.differences = report.shadow.iter().take(MAX_PAIRS).cloned().collect();
    }

    /// The candidate's part of `guardrail status`, when one is served. `connected` says which
    /// nodes are.
    pub fn status(&self, connected: impl Fn(&str) -> bool) -> Option<v1::CandidateStatus> {
        let current = self.current();
        let state = self.lock();
        if current.revision.is_empty() {
            return None;
        }
        let revision = &current.revision;
        let mut sums: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
        let mut applied = Vec::new();
        let mut nacked = Vec::new();
        for (node, n) in &state.nodes {
            if n.acked == *revision && connected(node) {
                applied.push(node.clone());
            }
            if let Some((r, error)) = &n.nacked {
                if r == revision {
                    nacked.push(format!("{node}: {}", error.lines().next().unwrap_or("")));
                }
            }
            if n.reported == *revision {
                for d in &n.differences {
                    let sum = sums.entry((&d.app, &d.enforced, &d.candidate)).or_default();
                    *sum = sum.saturating_add(d.count);
                }
            }
        }
        let mut differences: Vec<v1::ShadowDifference> = sums
            .into_iter()
            .map(|((app, enforced, candidate), count)| v1::ShadowDifference {
                app: app.into(),
                enforced: enforced.into(),
                candidate: candidate.into(),
                count,
            })
            .collect();
        differences.sort_by_key(|d| std::cmp::Reverse(d.count));
        differences.truncate(MAX_PAIRS);
        Some(v1::CandidateStatus {
            revision: revision.clone(),
            last_error: state.last_error.clone(),
            applied_nodes: applied,
            nacked_nodes: nacked,
            differences,
        })
    }
}

// === The candidate file ===

/// Polls the candidate file every `interval` until `stop`: a valid change is pushed, an invalid one
/// is refused with its `file:line` errors (the last good candidate stays) once
/// [`super::watch::CONFIRM_POLLS`] polls in a row found the same errors (a file caught half
/// written is not worth a refusal), and a file that is gone stops shadowing. `text` is the
/// content served already.
pub fn watch(
    source: super::watch::Source,
    hub: Arc<super::hub::Hub>,
    mut text: Option<String>,
    interval: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    // The errors of the last polls, and how many polls in a row found them.
    let mut failing = super::watch::Streak::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(interval);
        let gone = source.file().map_or(true, |f| !f.exists());
        if gone {
            if text.take().is_some() {
                hub.shadow.set(None);
                log!("candidate file gone: shadowing stopped on every node");
            }
            continue;
        }
        let loaded = source.load();
        if loaded.is_ok() {
            failing.clear();
        }
        match loaded {
            Ok((file, new, doc)) if text.as_deref() != Some(new.as_str()) => {
                text = Some(new);
                match candidate_of(&doc) {
                    Ok(candidate) => {
                        let revision = candidate.revision.clone();
                        if hub.shadow.set(Some(candidate)) {
                            log!(
                                "candidate revision {revision} from {}: decided in shadow on every node",
                                file.display()
                            );
                        }
                    }
                    Err(why) => {
                        log!("candidate change refused: {why}");
                        hub.shadow.refused(why);
                    }
                }
            }
            Ok(_) => {}
            Err(lines) => {
                let joined = lines.join("\n");
                if failing.see(joined.clone()) >= super::watch::CONFIRM_POLLS && hub.shadow.last_error() != joined {
                    for line in &lines {
                        log!("candidate change refused: {line}");
                    }
                    log!("candidate change refused; still shadowing revision {}", hub.shadow.current().revision);
                    hub.shadow.refused(joined);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(app: &str, from: &str, to: &str, count: u64) -> v1::ShadowDifference {
        v1::ShadowDifference { app: app.into(), enforced: from.into(), candidate: to.into(), count }
    }

    fn report(revision: &str, shadow: Vec<v1::ShadowDifference>) -> v1::UsageReport {
        v1::UsageReport { candidate_revision: revision.into(), shadow, ..Default::default() }
    }

    #[test]
    fn sums_the_fleet_for_the_candidate_served_only() {
        let shadow = Shadow::default();
        assert!(shadow.status(|_| true).is_none(), "no candidate: no section");
        assert!(shadow.set(Some(v1::Candidate {
            revision: "c1".into(),
            policy_json: "{}".into(),
            ..Default::default()
        })));
        shadow.ack("a", "c1");
        shadow.ack("b", "c1");
        shadow.nack("c", "c1", "rules[0].when: bad\nmore");
        shadow.report("a", &report("c1", vec![diff("app", "allow", "residency-violation", 3)]));
        shadow.report("a", &report("c1", vec![diff("app", "allow", "residency-violation", 5)]));
        shadow.report("b", &report("c1", vec![diff("app", "allow", "residency-violation", 2)]));
        shadow.report("c", &report("c0", vec![diff("app", "allow", "quota-exceeded", 9)]));
        let s = shadow.status(|n| n != "b").unwrap();
        assert_eq!(s.revision, "c1");
        assert_eq!(s.applied_nodes, vec!["a".to_string()], "b is not connected");
        assert_eq!(s.nacked_nodes, vec!["c: rules[0].when: bad".to_string()]);
        assert_eq!(
            s.differences,
            vec![diff("app", "allow", "residency-violation", 7)],
            "absolute counts: the newest report per node, summed; another revision's left out"
        );
        assert!(shadow.set(None), "stopping is a change");
        assert!(shadow.status(|_| true).is_none());
        assert_eq!(shadow.current().revision, "", "an empty revision stops shadowing on the nodes");
        assert!(shadow.set(Some(v1::Candidate {
            revision: "c1".into(),
            policy_json: "{}".into(),
            ..Default::default()
        })));
        let again = shadow.status(|_| true).unwrap();
        assert!(again.applied_nodes.is_empty(), "served again: applied once ACKed again");
        assert!(again.differences.is_empty(), "served again: counted from zero");
    }
}
