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

use crate::decide::Decision;
use crate::fasthash::FastMap;
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
/// when the request named none) and pair of codes.
#[derive(Debug, Default, Clone)]
pub struct ShadowCounts {
    counts: FastMap<(String, &'static str, &'static str), u64>,
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
        match self.counts.get_mut(&(app.to_string(), enforced, candidate)) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                self.counts.insert((app.to_string(), enforced, candidate), 1);
            }
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn clear(&mut self) {
        self.counts.clear();
    }

    /// The `limit` largest counts, largest first (ties by app, then codes, for a stable report).
    pub fn top(&self, limit: usize) -> Vec<(String, &'static str, &'static str, u64)> {
        let mut all: Vec<_> = self.counts.iter().map(|((a, f, t), n)| (a.clone(), *f, *t, *n)).collect();
        all.sort_by(|x, y| y.3.cmp(&x.3).then_with(|| (&x.0, x.1, x.2).cmp(&(&y.0, y.1, y.2))));
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
}
