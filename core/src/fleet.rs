//! State the companion shares with every worker, and the usage they report back:
//! - [`Fleet`]: apps whose daily budget is spent across the whole fleet, for one UTC day;
//! - [`UsageCounters`]: one app's counts for one UTC day on this Envoy (allowed, throttled,
//!   soft-limit warnings, denied by code), kept in shared data so the stream leader can report them.
//!
//! Both have a compact byte encoding for proxy-wasm shared data; a value that does not decode is
//! treated as absent (never as "everything allowed").

use crate::decide::Code;
use std::collections::HashSet;

/// Apps exhausted fleet-wide on `day` (days since 1970-01-01, UTC).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub day: u64,
    pub exhausted: HashSet<String>,
}

impl Fleet {
    /// Is `app` out of budget fleet-wide on `today`? A state for another day says nothing.
    pub fn is_exhausted(&self, app: &str, today: u64) -> bool {
        self.day == today && self.exhausted.contains(app)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.day.to_le_bytes().to_vec();
        let mut apps: Vec<&String> = self.exhausted.iter().collect();
        apps.sort();
        for (i, app) in apps.into_iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(app.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Fleet> {
        let day = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let rest = std::str::from_utf8(bytes.get(8..)?).ok()?;
        let exhausted = rest.split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect();
        Some(Fleet { day, exhausted })
    }
}

/// One app's usage on one Envoy for one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounters {
    pub day: u32,
    pub allowed: u32,
    pub throttled: u32,
    pub soft_limit: u32,
    pub denied: [u32; Code::ALL.len()],
}

const USAGE_LEN: usize = 4 * (4 + Code::ALL.len());

impl UsageCounters {
    pub fn is_zero(&self) -> bool {
        self.allowed == 0 && self.throttled == 0 && self.soft_limit == 0 && self.denied.iter().all(|d| *d == 0)
    }

    /// Adds `delta` (counts for `delta.day`); a later day starts the counts over, an earlier one
    /// (a clock stepped back across midnight) counts towards the later day.
    pub fn merge(&mut self, delta: &UsageCounters) {
        if delta.day > self.day {
            *self = UsageCounters { day: delta.day, ..UsageCounters::default() };
        }
        self.allowed = self.allowed.saturating_add(delta.allowed);
        self.throttled = self.throttled.saturating_add(delta.throttled);
        self.soft_limit = self.soft_limit.saturating_add(delta.soft_limit);
        for (a, b) in self.denied.iter_mut().zip(delta.denied.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    pub fn count_denied(&mut self, code: Code) {
        if let Some(i) = Code::ALL.iter().position(|c| *c == code) {
            if let Some(slot) = self.denied.get_mut(i) {
                *slot = slot.saturating_add(1);
            }
        }
        if code.status() == 429 {
            self.throttled = self.throttled.saturating_add(1);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(USAGE_LEN);
        for v in [self.day, self.allowed, self.throttled, self.soft_limit].iter().chain(self.denied.iter()) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<UsageCounters> {
        if bytes.len() != USAGE_LEN {
            return None;
        }
        let mut words = bytes.chunks_exact(4).map(|c| c.try_into().map(u32::from_le_bytes).unwrap_or(0));
        let mut u = UsageCounters {
            day: words.next()?,
            allowed: words.next()?,
            throttled: words.next()?,
            soft_limit: words.next()?,
            denied: [0; Code::ALL.len()],
        };
        for slot in u.denied.iter_mut() {
            *slot = words.next()?;
        }
        Some(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_roundtrip_and_day() {
        let fleet = Fleet { day: 20_421, exhausted: ["a".to_string(), "b".to_string()].into() };
        let back = Fleet::decode(&fleet.encode());
        assert_eq!(back.as_ref(), Some(&fleet), "roundtrip");
        assert!(fleet.is_exhausted("a", 20_421), "exhausted today");
        assert!(!fleet.is_exhausted("a", 20_422), "a new day clears it");
        assert!(!fleet.is_exhausted("c", 20_421), "other apps unaffected");
        assert_eq!(Fleet::decode(&[1, 2]), None, "short value");
        assert_eq!(Fleet::decode(&Fleet::default().encode()).map(|f| f.exhausted.len()), Some(0), "empty set");
    }

    #[test]
    fn usage_merge_and_roundtrip() {
        let mut total = UsageCounters { day: 7, allowed: 5, ..Default::default() };
        let mut delta = UsageCounters { day: 7, allowed: 2, ..Default::default() };
        delta.count_denied(Code::QuotaExceeded);
        total.merge(&delta);
        assert_eq!((total.allowed, total.throttled), (7, 1), "same day adds");
        assert_eq!(UsageCounters::decode(&total.encode()), Some(total), "roundtrip");
        total.merge(&UsageCounters { day: 8, allowed: 1, ..Default::default() });
        assert_eq!((total.day, total.allowed, total.throttled), (8, 1, 0), "new day starts over");
        assert_eq!(UsageCounters::decode(&[0; 3]), None, "garbage");
    }
}
