//! Shadow decisions: a candidate policy judged on live traffic without touching it.
//!
//! The filter decides each request with the enforced policy and, when the companion pushed a
//! candidate, with the candidate too. The candidate must not change anything: it reads the same
//! quota buckets through [`ReadOnlyStore`], which discards its writes, and its decision is reduced
//! to an outcome code that is counted per app and `(enforced → candidate)` pair where they differ
//! ([`ShadowCounts`]).
//!
//! ```
//! use guardrail_core::shadow::ShadowCounts;
//! let mut counts = ShadowCounts::default();
//! counts.record("checkout", "allow", "residency-violation");
//! counts.record("checkout", "allow", "allow"); // the same outcome: not counted
//! assert_eq!(counts.top(100), vec![("checkout".to_string(), "allow", "residency-violation", 1)]);
//! ```
//!
//! Each worker of an Envoy counts on its own and adds its counts, on every tick, into one
//! [`SharedCounts`] in proxy-wasm shared data (compare-and-swap), from which the leader reports.

use crate::decide::Decision;
use crate::quota::{CounterStore, StoreError};

/// The outcome code of an admitted request with an app.
pub const ALLOW: &str = "allow";

/// What a decision came to, as one code: `allow`, `exempt`, `preflight`, or the problem code.
pub fn outcome(decision: &Decision<'_>) -> &'static str {
    match (&decision.denial, &decision.pass) {
        (Some(denial), _) => denial.code.as_str(),
        (None, Some(pass)) => pass.code(),
        (None, None) => ALLOW,
    }
}

// === where a candidate can differ ===

/// Where a candidate can decide differently from the policy in force: the ids of the apps and of
/// the datasets that are not the same object in both policies (changed, added or removed). A
/// request whose app (as the candidate identifies it) and dataset (as the candidate's routes
/// match it) are in neither set is decided alike by both: the same app, dataset, rules, settings
/// and quota state give the same decision, so the filter counts the enforced outcome for both
/// and decides it once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Differ {
    pub apps: crate::fasthash::FastSet<String>,
    pub datasets: crate::fasthash::FastSet<String>,
}

/// [`Differ`] from the two policies' JSON; `None` when anything else differs (settings, tiers,
/// connectors, rules, exemptions, issuers; a dataset added, removed or routed otherwise), so that
/// every request is decided with both. `None` also for JSON that does not parse, or apps or
/// datasets without an `id` or listed twice.
///
/// ```
/// use guardrail_core::shadow::differ;
/// let a = br#"{"revision": "1", "tiers": {}, "apps": [{"id": "a", "tier": "t"}, {"id": "b", "tier": "t"}],
///              "datasets": [{"id": "d", "routes": [{"path_prefix": "/d"}], "allowed_regions": ["eu"]}]}"#;
/// let b = br#"{"revision": "2", "tiers": {}, "apps": [{"id": "a", "tier": "t"}, {"id": "b", "tier": "u"}, {"id": "c"}],
///              "datasets": [{"id": "d", "routes": [{"path_prefix": "/d"}], "allowed_regions": ["us"]}]}"#;
/// let d = differ(a, b).unwrap();
/// assert!(d.apps.contains("b") && d.apps.contains("c") && !d.apps.contains("a"));
/// assert!(d.datasets.contains("d"));
/// assert!(differ(a, br#"{"revision": "2", "tiers": {"x": {}}, "apps": []}"#).is_none());
/// ```
pub fn differ(in_force: &[u8], candidate: &[u8]) -> Option<Differ> {
    use serde_json::{Map, Value};
    let in_force: Map<String, Value> = serde_json::from_slice(in_force).ok()?;
    let candidate: Map<String, Value> = serde_json::from_slice(candidate).ok()?;
    fn others(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
        let mut v: Vec<(&String, &Value)> =
            m.iter().filter(|(k, _)| !matches!(k.as_str(), "apps" | "datasets" | "revision")).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
    if others(&in_force) != others(&candidate) {
        return None;
    }
    fn by_id<'v>(m: &'v Map<String, Value>, list: &str) -> Option<crate::fasthash::FastMap<&'v str, &'v Value>> {
        let mut out = crate::fasthash::FastMap::default();
        for item in m.get(list).and_then(Value::as_array).map_or(&[][..], Vec::as_slice) {
            let id = item.get("id").and_then(Value::as_str)?;
            if out.insert(id, item).is_some() {
                return None;
            }
        }
        Some(out)
    }
    fn changed(
        a: &crate::fasthash::FastMap<&str, &Value>,
        b: &crate::fasthash::FastMap<&str, &Value>,
    ) -> crate::fasthash::FastSet<String> {
        let mut out: crate::fasthash::FastSet<String> =
            a.iter().filter(|(id, v)| b.get(*id) != Some(*v)).map(|(id, _)| id.to_string()).collect();
        out.extend(b.keys().filter(|id| !a.contains_key(*id)).map(|id| id.to_string()));
        out
    }
    let apps = changed(&by_id(&in_force, "apps")?, &by_id(&candidate, "apps")?);
    let (da, db) = (by_id(&in_force, "datasets")?, by_id(&candidate, "datasets")?);
    // Requests must reach the same dataset in both: the same ids, each routed alike.
    let same_routes =
        da.len() == db.len() && da.iter().all(|(id, v)| db.get(id).is_some_and(|w| v.get("routes") == w.get("routes")));
    if !same_routes {
        return None;
    }
    Some(Differ { apps, datasets: changed(&da, &db) })
}

// === impl ReadOnlyStore ===

/// A [`CounterStore`] that reads the real store and discards every write, so a candidate sees the
/// same quota state as the enforced policy and consumes none of it.
pub struct ReadOnlyStore<'s>(pub &'s mut dyn CounterStore);

impl CounterStore for ReadOnlyStore<'_> {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.0.get(key)
    }

    fn set(&mut self, _key: &str, _value: &[u8], _cas: u32) -> Result<(), StoreError> {
        Ok(())
    }
}

// === impl ShadowCounts ===

/// Counts of requests where the candidate's outcome differs from the enforced one, per app (`-`
/// when the request named none) and pair of codes. A list, not a map: a worker holds the few
/// pairs of one tick (its counts go to [`SharedCounts`] every tick), and a map of its own costs
/// the filter's .wasm kilobytes.
#[derive(Debug, Default, Clone)]
pub struct ShadowCounts {
    counts: Vec<(String, &'static str, &'static str, u64)>,
}

/// The app under which a request without one is counted.
pub const NO_APP: &str = "-";

impl ShadowCounts {
    /// Counts one request, when `enforced` and `candidate` differ. Returns whether they did.
    pub fn record(&mut self, app: &str, enforced: &'static str, candidate: &'static str) -> bool {
        if enforced == candidate {
            return false;
        }
        let app = if app.is_empty() { NO_APP } else { app };
        match self.counts.iter_mut().find(|(a, f, t, _)| a == app && *f == enforced && *t == candidate) {
            Some((_, _, _, n)) => *n = n.saturating_add(1),
            None => self.counts.push((app.to_string(), enforced, candidate, 1)),
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn clear(&mut self) {
        self.counts.clear();
    }

    /// Every count, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'static str, &'static str, u64)> {
        self.counts.iter().map(|(a, f, t, n)| (a.as_str(), *f, *t, *n))
    }

    /// The `limit` largest counts, largest first (ties by app, then codes, for a stable report).
    pub fn top(&self, limit: usize) -> Vec<(String, &'static str, &'static str, u64)> {
        let mut all = self.counts.clone();
        all.sort_by(|x, y| y.3.cmp(&x.3).then_with(|| (&x.0, x.1, x.2).cmp(&(&y.0, y.1, y.2))));
        all.truncate(limit);
        all
    }
}

// === impl SharedCounts ===

/// Pairs an Envoy keeps in [`SharedCounts`]; those beyond are added up under [`OTHER_APPS`].
pub const MAX_SHARED_PAIRS: usize = 1000;

/// The app under which pairs beyond [`MAX_SHARED_PAIRS`] are counted (no app id can be `*`).
pub const OTHER_APPS: &str = "*";

const SHARED_MAGIC: &str = "guardrail-shadow/1";

/// The differences every worker of one Envoy counted under one candidate, since it was put in
/// force, as kept in shared data. `epoch` tells one putting in force from another (the same
/// candidate stopped and sent again starts over): a worker adds its counts only under the epoch it
/// counted them for. `epoch` 0 and an empty revision: no candidate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SharedCounts {
    pub epoch: u64,
    pub revision: String,
    /// `(app, enforced, candidate, count)`, each pair once (a list: see [`ShadowCounts`]).
    counts: Vec<(String, String, String, u64)>,
}

impl SharedCounts {
    /// No counts yet for the candidate `revision` put in force as `epoch`.
    pub fn new(epoch: u64, revision: &str) -> Self {
        SharedCounts { epoch, revision: revision.to_string(), counts: Vec::new() }
    }

    /// Text, one pair per line: `guardrail-shadow/1 <epoch>`, the revision, then
    /// `<app>\t<enforced>\t<candidate>\t<count>` lines.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{SHARED_MAGIC} {}\n{}\n", self.epoch, self.revision);
        for (app, enforced, candidate, n) in &self.counts {
            out.push_str(&format!("{app}\t{enforced}\t{candidate}\t{n}\n"));
        }
        out.into_bytes()
    }

    /// `None` for anything [`SharedCounts::encode`] did not write.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let epoch = lines.next()?.strip_prefix(SHARED_MAGIC)?.strip_prefix(' ')?.parse().ok()?;
        let revision = lines.next()?.to_string();
        let mut counts: Vec<(String, String, String, u64)> = Vec::new();
        for line in lines {
            let mut fields = line.split('\t');
            let mut field = || fields.next().map(str::to_string);
            let (app, enforced, candidate) = (field()?, field()?, field()?);
            let n: u64 = field()?.parse().ok()?;
            if counts.iter().any(|(a, f, t, _)| (a, f, t) == (&app, &enforced, &candidate)) {
                return None;
            }
            counts.push((app, enforced, candidate, n));
        }
        Some(SharedCounts { epoch, revision, counts })
    }

    /// Adds a worker's counts. Past [`MAX_SHARED_PAIRS`] pairs, a new pair's count goes to
    /// [`OTHER_APPS`], so the totals per pair of codes stay exact.
    pub fn add(&mut self, delta: &ShadowCounts) {
        for (app, enforced, candidate, n) in delta.iter() {
            let found = self.position(app, enforced, candidate);
            let (found, app) = match found {
                None if self.counts.len() >= MAX_SHARED_PAIRS => {
                    (self.position(OTHER_APPS, enforced, candidate), OTHER_APPS)
                }
                found => (found, app),
            };
            match found.and_then(|i| self.counts.get_mut(i)) {
                Some((_, _, _, sum)) => *sum = sum.saturating_add(n),
                None => self.counts.push((app.to_string(), enforced.to_string(), candidate.to_string(), n)),
            }
        }
    }

    fn position(&self, app: &str, enforced: &str, candidate: &str) -> Option<usize> {
        self.counts.iter().position(|(a, f, t, _)| a == app && f == enforced && t == candidate)
    }

    /// The `limit` largest counts, largest first (ties by app, then codes).
    pub fn top(&self, limit: usize) -> Vec<(&str, &str, &str, u64)> {
        let mut all: Vec<_> = self.counts.iter().map(|(a, f, t, n)| (a.as_str(), f.as_str(), t.as_str(), *n)).collect();
        all.sort_by(|x, y| y.3.cmp(&x.3).then_with(|| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2))));
        all.truncate(limit);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::MemoryStore;

    #[test]
    fn read_only_store_reads_through_and_discards_writes() {
        let mut real = MemoryStore::default();
        real.set("k", b"v1", 0).unwrap();
        let before = real.get("k").unwrap();
        let mut shadow = ReadOnlyStore(&mut real);
        assert_eq!(shadow.get("k").unwrap(), before, "reads see the real state");
        let cas = before.as_ref().unwrap().1;
        shadow.set("k", b"v2", cas).unwrap();
        shadow.set("new", b"x", 0).unwrap();
        assert_eq!(real.get("k").unwrap(), before, "a write through the shadow store changes nothing");
        assert_eq!(real.get("new").unwrap(), None, "nor creates a key");
    }

    #[test]
    fn counts_only_differences_and_bounds_the_report() {
        let mut c = ShadowCounts::default();
        let cases: &[(&str, &'static str, &'static str, bool, &str)] = &[
            ("a", "allow", "allow", false, "same outcome is not counted"),
            ("a", "allow", "residency-violation", true, "a difference is"),
            ("a", "allow", "residency-violation", true, "again"),
            ("b", "quota-exceeded", "allow", true, "another app and pair"),
            ("", "invalid-api-key", "allow", true, "no app: counted under -"),
        ];
        for (app, from, to, differs, why) in cases {
            assert_eq!(c.record(app, from, to), *differs, "{why}");
        }
        assert_eq!(
            c.top(100),
            vec![
                ("a".to_string(), "allow", "residency-violation", 2),
                ("-".to_string(), "invalid-api-key", "allow", 1),
                ("b".to_string(), "quota-exceeded", "allow", 1),
            ]
        );
        assert_eq!(c.top(1).len(), 1, "bounded");
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn shared_counts_round_trip_add_up_and_stay_bounded() {
        let mut shared = SharedCounts::new(7, "2+sha256:0a1b2c3d");
        assert_eq!(SharedCounts::decode(&shared.encode()), Some(shared.clone()), "empty round trip");
        let mut worker = ShadowCounts::default();
        worker.record("us-promo", "allow", "residency-violation");
        worker.record("us-promo", "allow", "residency-violation");
        worker.record("", "unauthenticated", "allow");
        shared.add(&worker);
        shared.add(&worker);
        let decoded = SharedCounts::decode(&shared.encode()).unwrap();
        assert_eq!(decoded, shared, "round trip with counts");
        assert_eq!((decoded.epoch, decoded.revision.as_str()), (7, "2+sha256:0a1b2c3d"));
        assert_eq!(
            decoded.top(100),
            vec![("us-promo", "allow", "residency-violation", 4), ("-", "unauthenticated", "allow", 2)],
            "two workers' flushes add up"
        );
        for bad in [&b""[..], b"guardrail-shadow/1 x\nr\n", b"other 1\nr\n", b"guardrail-shadow/1 1\nr\na\tb\tc\n"] {
            assert_eq!(SharedCounts::decode(bad), None, "{:?} is not ours", String::from_utf8_lossy(bad));
        }

        let mut many = ShadowCounts::default();
        for i in 0..MAX_SHARED_PAIRS + 10 {
            many.record(&format!("app-{i}"), "allow", "app-not-active");
        }
        let mut bounded = SharedCounts::new(1, "r");
        bounded.add(&many);
        bounded.add(&many);
        assert_eq!(bounded.counts.len(), MAX_SHARED_PAIRS + 1, "the pairs beyond the bound go under `*`");
        let total: u64 = bounded.top(usize::MAX).iter().map(|p| p.3).sum();
        assert_eq!(total, 2 * (MAX_SHARED_PAIRS as u64 + 10), "no count is lost");
        assert_eq!(bounded.top(1), vec![(OTHER_APPS, "allow", "app-not-active", 20)]);
    }
}
