//! State the companion shares with every worker, and the usage they report back:
//! - [`Fleet`]: apps whose daily budget is spent across the whole fleet, for one UTC day;
//! - [`UsageCounters`]: one app's counts for one UTC day on this Envoy (allowed, throttled,
//!   soft-limit warnings, denied by code, fleet-budget refusals, admitted requests by connector),
//!   kept in shared data so the stream leader can report them;
//! - [`Callers`]: the unregistered callers one Envoy saw in a UTC day (unknown API keys by
//!   fingerprint, apps of valid tokens that are not in the catalog), for the console's KPIs.
//!
//! All have a compact byte encoding for proxy-wasm shared data; a value that does not decode is
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

/// Connectors counted per app and day; admitted requests to others are counted in `allowed` only.
pub const MAX_CONNECTORS: usize = 32;
/// Unregistered callers counted per Envoy and day (the most a usage report carries); later ones
/// are not counted (the denial log still names each).
pub const MAX_CALLERS: usize = 100;

/// One app's usage on one Envoy for one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageCounters {
    pub day: u32,
    pub allowed: u32,
    pub throttled: u32,
    pub soft_limit: u32,
    /// Of `denied[budget-exhausted]`: refused because the budget is spent across the fleet.
    pub fleet_budget: u32,
    pub denied: [u32; Code::ALL.len()],
    /// Admitted requests by upstream connector (at most [`MAX_CONNECTORS`]), for cost.
    pub connectors: Vec<(String, u32)>,
}

/// The fixed part of an encoded [`UsageCounters`]; the connectors follow.
const USAGE_LEN: usize = 4 * (5 + Code::ALL.len());

fn add_named(list: &mut Vec<(String, u32)>, name: &str, n: u32, max: usize) {
    if let Some(slot) = list.iter_mut().find(|(k, _)| k == name) {
        slot.1 = slot.1.saturating_add(n);
    } else if list.len() < max {
        list.push((name.to_string(), n));
    }
}

/// `(name, count)` pairs as `u8` length, name, `u32` count (names longer than 255 bytes are cut
/// off by the caller's bound: connector names and ids are short).
fn encode_named(out: &mut Vec<u8>, list: &[(String, u32)]) {
    for (name, n) in list {
        let bytes = name.as_bytes();
        let len = bytes.len().min(255);
        out.push(u8::try_from(len).unwrap_or(u8::MAX));
        out.extend_from_slice(bytes.get(..len).unwrap_or_default());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn decode_named(mut bytes: &[u8], max: usize) -> Option<Vec<(String, u32)>> {
    let mut list = Vec::new();
    while let Some((&len, rest)) = bytes.split_first() {
        let len = usize::from(len);
        let name = std::str::from_utf8(rest.get(..len)?).ok()?;
        let n = u32::from_le_bytes(rest.get(len..len + 4)?.try_into().ok()?);
        if list.len() >= max {
            return None;
        }
        list.push((name.to_string(), n));
        bytes = rest.get(len + 4..)?;
    }
    Some(list)
}

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
        self.fleet_budget = self.fleet_budget.saturating_add(delta.fleet_budget);
        for (a, b) in self.denied.iter_mut().zip(delta.denied.iter()) {
            *a = a.saturating_add(*b);
        }
        for (name, n) in &delta.connectors {
            add_named(&mut self.connectors, name, *n, MAX_CONNECTORS);
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

    /// One admitted request, to `connector` when Envoy named one.
    pub fn count_allowed(&mut self, connector: Option<&str>) {
        self.allowed = self.allowed.saturating_add(1);
        if let Some(c) = connector {
            add_named(&mut self.connectors, c, 1, MAX_CONNECTORS);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(USAGE_LEN + self.connectors.len() * 16);
        let fixed = [self.day, self.allowed, self.throttled, self.soft_limit, self.fleet_budget];
        for v in fixed.iter().chain(self.denied.iter()) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        encode_named(&mut out, &self.connectors);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<UsageCounters> {
        let mut words =
            bytes.get(..USAGE_LEN)?.chunks_exact(4).map(|c| c.try_into().map(u32::from_le_bytes).unwrap_or(0));
        let mut u = UsageCounters {
            day: words.next()?,
            allowed: words.next()?,
            throttled: words.next()?,
            soft_limit: words.next()?,
            fleet_budget: words.next()?,
            denied: [0; Code::ALL.len()],
            connectors: Vec::new(),
        };
        for slot in u.denied.iter_mut() {
            *slot = words.next()?;
        }
        u.connectors = decode_named(bytes.get(USAGE_LEN..)?, MAX_CONNECTORS)?;
        Some(u)
    }
}

/// The callers one Envoy saw on one UTC day that the catalog does not know, by `kind:id`
/// ([`Callers::API_KEY`] with the key's fingerprint, [`Callers::APP`] with a token's app id), at
/// most [`MAX_CALLERS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Callers {
    pub day: u32,
    pub seen: Vec<(String, u32)>,
}

impl Callers {
    pub const API_KEY: &'static str = "api-key";
    pub const APP: &'static str = "app";

    /// Counts `n` requests of `kind:id` (e.g. `api-key:0a1b2c3d`).
    pub fn count(&mut self, name: &str, n: u32) {
        add_named(&mut self.seen, name, n, MAX_CALLERS);
    }

    /// Adds `delta`; a later day starts over, as for [`UsageCounters::merge`].
    pub fn merge(&mut self, delta: &Callers) {
        if delta.day > self.day {
            *self = Callers { day: delta.day, seen: Vec::new() };
        }
        for (name, n) in &delta.seen {
            self.count(name, *n);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.day.to_le_bytes().to_vec();
        encode_named(&mut out, &self.seen);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Callers> {
        let day = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
        Some(Callers { day, seen: decode_named(bytes.get(4..)?, MAX_CALLERS)? })
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
        total.count_allowed(Some("crm"));
        total.count_allowed(Some("crm"));
        total.count_allowed(None);
        total.fleet_budget = 3;
        assert_eq!(total.connectors, vec![("crm".to_string(), 2)], "by connector");
        assert_eq!(UsageCounters::decode(&total.encode()), Some(total.clone()), "roundtrip");
        total.merge(&UsageCounters { day: 8, allowed: 1, ..Default::default() });
        assert_eq!((total.day, total.allowed, total.throttled), (8, 1, 0), "new day starts over");
        assert!(total.connectors.is_empty(), "new day starts over");
        assert_eq!(UsageCounters::decode(&[0; 3]), None, "garbage");
        let mut bad = total.encode();
        bad.extend_from_slice(&[9, b'x']);
        assert_eq!(UsageCounters::decode(&bad), None, "a cut connector name");
    }

    #[test]
    fn connectors_and_callers_are_bounded() {
        let mut u = UsageCounters::default();
        for i in 0..MAX_CONNECTORS + 5 {
            u.count_allowed(Some(&format!("c{i}")));
        }
        assert_eq!((u.allowed as usize, u.connectors.len()), (MAX_CONNECTORS + 5, MAX_CONNECTORS), "bounded");
        let mut c = Callers { day: 3, ..Default::default() };
        for i in 0..MAX_CALLERS + 5 {
            c.count(&format!("api-key:{i:08x}"), 1);
        }
        c.count("api-key:00000000", 2);
        assert_eq!(c.seen.len(), MAX_CALLERS, "bounded");
        assert_eq!(c.seen.first(), Some(&("api-key:00000000".to_string(), 3)), "counted");
        assert_eq!(Callers::decode(&c.encode()), Some(c.clone()), "roundtrip");
        let mut later = Callers { day: 4, ..Default::default() };
        later.count("app:ghost", 1);
        c.merge(&later);
        assert_eq!(c, later, "a new day starts over");
        assert_eq!(Callers::decode(&[1]), None, "garbage");
    }
}
