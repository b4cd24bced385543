//! Per-app quotas: a token bucket (as GCRA: one "theoretical arrival time") and a daily budget per
//! UTC day, kept together in ONE shared-data value per app and updated with compare-and-swap, so
//! every Envoy worker draws from the same bucket and an app gets exactly its quota.
//!
//! The value is 25 bytes: a format byte, the bucket's TAT in ns, the UTC day number, the count of
//! requests admitted that day and the latest clock reading that updated it. All-zero means "full
//! bucket, nothing used", so the initial value does not depend on the limits: creating a key twice
//! (the host does not CAS-guard creation) writes the same bytes, and limits can change (an override
//! expires) without touching the stored state.
//!
//! The stored state does not record the limits it was run up under: when they change, the bucket
//! is read under the new ones, its debt capped at their bucket size (see [`step`]), so a raised
//! limit takes effect at once for an app that was throttled under the old one.
//!
//! The wall clock can step (NTP, a VM resumed): stepped back, a bucket reads the latest time it saw
//! until the clock catches up, so it keeps its level instead of
//! locking the app out for the length of the step, and the day's count is kept rather than started
//! over; stepped forward, the bucket refills and a new day starts, as real time passing would.

use crate::compile::Limits;
use crate::time::{NANOS_PER_SEC, SECS_PER_DAY};

/// How many times a compare-and-swap is retried before the request fails closed.
pub const MAX_CAS_RETRIES: u32 = 64;

const FORMAT: u8 = 2;
const VALUE_LEN: usize = 25;
/// The 17-byte format before the clock reading was kept; still read (as "no reading yet").
const FORMAT_V1: u8 = 1;
const VALUE_LEN_V1: usize = 17;

/// Shared counters with compare-and-swap, as proxy-wasm shared data offers them.
pub trait CounterStore {
    /// The value and its CAS token, or `None` when the key does not exist.
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if the key's CAS token is still `cas` (0 = unconditional, used only to create).
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("compare-and-swap mismatch")]
    CasMismatch,
    #[error("shared data unavailable: {0}")]
    Unavailable(String),
}

/// The decoded per-app state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaState {
    pub tat_ns: u64,
    pub day: u32,
    pub used: u32,
    /// The latest clock reading that updated the state (0: none yet).
    pub last_ns: u64,
}

impl QuotaState {
    pub fn encode(&self) -> [u8; VALUE_LEN] {
        let mut out = [0u8; VALUE_LEN];
        out[0] = FORMAT;
        out[1..9].copy_from_slice(&self.tat_ns.to_le_bytes());
        out[9..13].copy_from_slice(&self.day.to_le_bytes());
        out[13..17].copy_from_slice(&self.used.to_le_bytes());
        out[17..25].copy_from_slice(&self.last_ns.to_le_bytes());
        out
    }

    /// Decodes a stored value; anything not written by this version reads as `None`.
    pub fn decode(bytes: &[u8]) -> Option<QuotaState> {
        let last_ns = match (bytes.first(), bytes.len()) {
            (Some(&FORMAT), VALUE_LEN) => u64::from_le_bytes(bytes.get(17..25)?.try_into().ok()?),
            (Some(&FORMAT_V1), VALUE_LEN_V1) => 0,
            _ => return None,
        };
        let tat_ns = u64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?);
        let day = u32::from_le_bytes(bytes.get(9..13)?.try_into().ok()?);
        let used = u32::from_le_bytes(bytes.get(13..17)?.try_into().ok()?);
        Some(QuotaState { tat_ns, day, used, last_ns })
    }
}

/// What the quota said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOutcome {
    Allowed(Usage),
    /// The bucket is empty: 429 `quota-exceeded`.
    RateLimited {
        retry_after_secs: u64,
        /// The quota as it stands (nothing left in the bucket), for the 429's `RateLimit`.
        usage: Usage,
    },
    /// The day's budget is spent: 429 `budget-exhausted`, until the next UTC midnight.
    BudgetExhausted {
        retry_after_secs: u64,
        /// The quota as it stands (nothing left today), for the 429's `RateLimit`.
        usage: Usage,
    },
    /// The state could not be read or updated (missing key, CAS retries exhausted): fail closed.
    Unavailable,
}

/// Quota figures after an admitted request, for the `RateLimit` headers and soft-limit warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rate_remaining: u64,
    /// Seconds until the bucket is full again.
    pub rate_reset_secs: u64,
    pub budget_remaining: Option<u64>,
    pub budget_reset_secs: u64,
    /// This request took the bucket's usage past `soft_limit_ratio`.
    pub rate_soft_crossed: bool,
    /// This request took the day's usage past `soft_limit_ratio`.
    pub budget_soft_crossed: bool,
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(NANOS_PER_SEC)
}

fn secs_to_next_day(now_ns: u64) -> u64 {
    let now_secs = now_ns / NANOS_PER_SEC;
    (SECS_PER_DAY - now_secs % SECS_PER_DAY).max(1)
}

/// Pure arithmetic: the state after one request at `now_ns`, or why it is refused.
pub fn step(
    state: QuotaState,
    limits: &Limits,
    now_ns: u64,
    soft_ratio: f64,
) -> Result<(QuotaState, Usage), QuotaOutcome> {
    let interval = limits.rate.interval_ns();
    let capacity = interval.saturating_mul(limits.rate.burst);
    // Time never runs backwards for a bucket: a clock stepped back reads as the latest time seen
    // until it catches up, so the bucket keeps its level (no lockout, no refill from the step, and
    // stepping back and forth again credits nothing).
    let clock_ns = now_ns;
    let now_ns = now_ns.max(state.last_ns);
    // Under the limits in force the debt never exceeds the bucket's size past the last admission
    // (TAT <= last + capacity: each admission keeps it so). More of it was run up under other
    // limits: a raised quota (an override, an approved request) reads the bucket as empty at that
    // admission under its own size, so it refills at the new rate from there rather than paying off
    // the old debt first. With unchanged limits this never applies (one comparison on the request
    // path); a state without a clock reading (`last_ns` 0, written by an older filter) is left as is.
    let cap = if state.last_ns == 0 { u64::MAX } else { state.last_ns.saturating_add(capacity) };
    let (tat_ns, last_ns) = (state.tat_ns.min(cap), now_ns);
    let base = tat_ns.max(now_ns);
    let new_tat = base.saturating_add(interval);
    let ahead = new_tat - now_ns;
    if ahead > capacity {
        let usage = standing(&state, limits, now_ns, clock_ns);
        return Err(QuotaOutcome::RateLimited { retry_after_secs: ceil_secs(ahead - capacity).max(1), usage });
    }
    let today = u32::try_from(now_ns / NANOS_PER_SEC / SECS_PER_DAY).unwrap_or(u32::MAX);
    // A later day starts the count over; an earlier one (the clock stepped back across midnight)
    // keeps counting against the later day, so a budget is never spent twice.
    let (day, used_before) = match today.cmp(&state.day) {
        std::cmp::Ordering::Greater => (today, 0),
        _ => (state.day, state.used),
    };
    // The budget resets at the next midnight of the clock as it reads (that is when a new day starts).
    let budget_reset_secs = secs_to_next_day(clock_ns);
    let (used_after, budget_remaining, budget_soft_crossed) = match limits.daily_budget {
        Some(budget) => {
            if u64::from(used_before) >= budget {
                let usage = standing(&state, limits, now_ns, clock_ns);
                return Err(QuotaOutcome::BudgetExhausted { retry_after_secs: budget_reset_secs, usage });
            }
            let after = used_before.saturating_add(1);
            let threshold = soft_ratio * budget as f64;
            let crossed = (f64::from(used_before) < threshold) && (f64::from(after) >= threshold);
            (after, Some(budget - u64::from(after)), crossed)
        }
        None => (used_before.saturating_add(1), None, false),
    };
    let before_fill = (base - now_ns) as f64 / capacity as f64;
    let after_fill = ahead as f64 / capacity as f64;
    let usage = Usage {
        rate_remaining: (capacity - ahead) / interval,
        rate_reset_secs: ceil_secs(ahead),
        budget_remaining,
        budget_reset_secs,
        rate_soft_crossed: before_fill < soft_ratio && after_fill >= soft_ratio,
        budget_soft_crossed,
    };
    Ok((QuotaState { tat_ns: new_tat, day, used: used_after, last_ns }, usage))
}

/// The quota as it stands at `now_ns` (the later of the clock and the last request, see [`step`];
/// `clock_ns` as the clock reads) without taking anything: what a refused request's `RateLimit`
/// fields say.
fn standing(state: &QuotaState, limits: &Limits, now_ns: u64, clock_ns: u64) -> Usage {
    let interval = limits.rate.interval_ns();
    let capacity = interval.saturating_mul(limits.rate.burst);
    let pending = state.tat_ns.saturating_sub(now_ns).min(capacity);
    let today = u32::try_from(now_ns / NANOS_PER_SEC / SECS_PER_DAY).unwrap_or(u32::MAX);
    let used = if today > state.day { 0 } else { u64::from(state.used) };
    Usage {
        rate_remaining: (capacity - pending) / interval.max(1),
        rate_reset_secs: ceil_secs(pending),
        budget_remaining: limits.daily_budget.map(|b| b.saturating_sub(used)),
        budget_reset_secs: secs_to_next_day(clock_ns),
        rate_soft_crossed: false,
        budget_soft_crossed: false,
    }
}

/// The app's quota as it stands in `store`, taking nothing (`None` if it cannot be read).
pub fn peek(store: &mut dyn CounterStore, key: &str, limits: &Limits, now_ns: u64) -> Option<Usage> {
    let (bytes, _) = store.get(key).ok().flatten()?;
    let state = QuotaState::decode(&bytes).unwrap_or_default();
    Some(standing(&state, limits, now_ns.max(state.last_ns), now_ns))
}

/// Takes one request from the app's quota in `store`, retrying compare-and-swap up to
/// [`MAX_CAS_RETRIES`] times. Refused requests write nothing.
pub fn take(store: &mut dyn CounterStore, key: &str, limits: &Limits, now_ns: u64, soft_ratio: f64) -> QuotaOutcome {
    for _ in 0..MAX_CAS_RETRIES {
        let (bytes, cas) = match store.get(key) {
            Ok(Some(found)) => found,
            Ok(None) | Err(_) => return QuotaOutcome::Unavailable,
        };
        // A value this version did not write starts over as a full bucket (still under CAS).
        let state = QuotaState::decode(&bytes).unwrap_or_default();
        let (next, usage) = match step(state, limits, now_ns, soft_ratio) {
            Ok(ok) => ok,
            Err(refused) => return refused,
        };
        match store.set(key, &next.encode(), cas) {
            Ok(()) => return QuotaOutcome::Allowed(usage),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Unavailable(_)) => return QuotaOutcome::Unavailable,
        }
    }
    QuotaOutcome::Unavailable
}

/// Creates the key of every app that has none yet. Called when a policy is applied, never on a
/// request: the host does not CAS-guard creation, and the initial value is the same for everyone.
pub fn ensure_keys<'a>(
    store: &mut dyn CounterStore,
    keys: impl IntoIterator<Item = &'a str>,
) -> Result<usize, StoreError> {
    let mut created = 0;
    for key in keys {
        if store.get(key)?.is_none() {
            store.set(key, &QuotaState::default().encode(), 0)?;
            created += 1;
        }
    }
    Ok(created)
}

// === Stores for tests and the native CLI ===

/// An in-memory store with proxy-wasm's CAS semantics (every write bumps the token).
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: crate::fasthash::FastMap<String, (Vec<u8>, u32)>,
}

impl CounterStore for MemoryStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let Some(entry) = self.entries.get_mut(key) else {
            // A missing key has token 0: only an unconditional write creates it.
            if cas != 0 {
                return Err(StoreError::CasMismatch);
            }
            self.entries.insert(key.to_string(), (value.to_vec(), 1));
            return Ok(());
        };
        if cas != 0 && entry.1 != cas {
            return Err(StoreError::CasMismatch);
        }
        entry.0.clear();
        entry.0.extend_from_slice(value);
        entry.1 = entry.1.wrapping_add(1).max(1);
        Ok(())
    }
}

/// Wraps a store and makes the first `mismatches` writes after each read fail with a CAS
/// mismatch, after letting a rival write land, as a busy second worker would.
#[derive(Debug)]
pub struct ContendedStore<S> {
    pub inner: S,
    pub mismatches_per_write: u32,
    pending: u32,
}

impl<S> ContendedStore<S> {
    pub fn new(inner: S, mismatches_per_write: u32) -> Self {
        Self { inner, mismatches_per_write, pending: 0 }
    }
}

impl<S: CounterStore> CounterStore for ContendedStore<S> {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if cas != 0 && self.pending < self.mismatches_per_write {
            self.pending += 1;
            // A rival rewrites the current value, bumping the CAS token.
            if let Some((current, token)) = self.inner.get(key)? {
                self.inner.set(key, &current, token)?;
            }
            return Err(StoreError::CasMismatch);
        }
        self.pending = 0;
        self.inner.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Rate;

    const SEC: u64 = NANOS_PER_SEC;
    const T0: u64 = 1_795_924_800 * SEC; // 2026-11-29T04:00:00Z

    fn limits(requests: u64, per_secs: u64, burst: u64, budget: Option<u64>) -> Limits {
        Limits { rate: Rate { requests, per_ns: per_secs * SEC, burst }, daily_budget: budget }
    }

    #[test]
    fn a_raised_limit_is_not_held_back_by_the_debt_of_the_old_one() {
        // 2 per hour: two requests, then refused for half an hour.
        let old = limits(2, 3600, 2, None);
        let mut state = QuotaState::default();
        for _ in 0..2 {
            state = step(state, &old, T0, 0.7).map(|(s, _)| s).unwrap_or_else(|e| panic!("{e:?}"));
        }
        let throttled = state;
        assert!(matches!(step(state, &old, T0, 0.7), Err(QuotaOutcome::RateLimited { retry_after_secs: 1800, .. })));
        // Raised to 600 per minute (burst 600): the old hour of debt is capped at the new bucket's
        // minute, so the app waits one new interval (100 ms), not half an hour.
        let new = limits(600, 60, 600, None);
        assert!(
            matches!(step(state, &new, T0, 0.7), Err(QuotaOutcome::RateLimited { retry_after_secs: 1, .. })),
            "at the same instant the bucket is empty under the new limits"
        );
        let later = T0 + SEC / 10;
        let (state, usage) = step(state, &new, later, 0.7).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(usage.rate_remaining, 0, "one interval later: admitted, the bucket refilling at the new rate");
        // Ten seconds on, a hundred requests' worth has refilled: the new rate, not the old one.
        let mut admitted = 0;
        let mut s = state;
        while let Ok((next, _)) = step(s, &new, later + 10 * SEC, 0.7) {
            s = next;
            admitted += 1;
        }
        assert_eq!(admitted, 100);
        // With the limits unchanged the cap never applies: under the old limits it is still refused.
        assert!(matches!(
            step(throttled, &old, later, 0.7),
            Err(QuotaOutcome::RateLimited { retry_after_secs: 1800, .. })
        ));
    }

    #[test]
    fn encode_decode_roundtrip_and_garbage() {
        let s = QuotaState { tat_ns: 123_456_789, day: 20_000, used: 42, last_ns: 987_654_321 };
        assert_eq!(QuotaState::decode(&s.encode()), Some(s), "roundtrip");
        let v1 = s.encode();
        let mut v1 = v1.get(..VALUE_LEN_V1).map(<[u8]>::to_vec).unwrap_or_default();
        v1[0] = FORMAT_V1;
        assert_eq!(QuotaState::decode(&v1), Some(QuotaState { last_ns: 0, ..s }), "the 17-byte format still reads");
        assert_eq!(QuotaState::decode(&[]), None, "empty value");
        assert_eq!(QuotaState::decode(&[9; VALUE_LEN]), None, "unknown format byte");
        assert_eq!(QuotaState::decode(&[FORMAT; 3]), None, "short value");
    }

    #[test]
    fn bucket_arithmetic_table() {
        // (what, limits, requests at offsets (secs), expected admitted count)
        let cases: &[(&str, Limits, &[u64], usize)] = &[
            ("burst of 5 at one instant", limits(5, 60, 5, None), &[0; 8], 5),
            ("burst defaults to requests", limits(3, 60, 3, None), &[0; 4], 3),
            ("refill one per 12s", limits(5, 60, 5, None), &[0, 0, 0, 0, 0, 0, 12, 12], 6),
            ("full refill after a window", limits(2, 10, 2, None), &[0, 0, 0, 10, 10, 10], 4),
            ("burst larger than rate", limits(1, 60, 10, None), &[0; 12], 10),
            ("budget stops before bucket", limits(100, 1, 100, Some(3)), &[0; 5], 3),
            ("budget resets next UTC day", limits(100, 1, 100, Some(2)), &[0, 0, 0, 72_000, 72_000, 72_000], 4),
        ];
        for (what, l, offsets, want) in cases {
            let mut state = QuotaState::default();
            let mut admitted = 0;
            for off in offsets.iter() {
                if let Ok((next, _)) = step(state, l, T0 + off * SEC, 0.7) {
                    state = next;
                    admitted += 1;
                }
            }
            assert_eq!(admitted, *want, "{what}");
        }
    }

    /// Runs `(offset from T0 in seconds, may be negative)` requests; returns which were admitted.
    fn admitted_at(l: &Limits, offsets: &[i64]) -> Vec<bool> {
        let mut state = QuotaState::default();
        offsets
            .iter()
            .map(|off| {
                let now = T0.saturating_add_signed(off * SEC as i64);
                match step(state, l, now, 0.7) {
                    Ok((next, _)) => {
                        state = next;
                        true
                    }
                    Err(_) => false,
                }
            })
            .collect()
    }

    #[test]
    fn clock_steps_neither_lock_out_nor_refill() {
        let hour = 3600;
        // 5 of a 100-request bucket used, then the clock steps back an hour: still 95 left.
        let l = limits(600, 60, 100, None);
        let mut offsets = vec![0; 5];
        offsets.extend([1 - hour; 95]);
        offsets.push(1 - hour);
        let got = admitted_at(&l, &offsets);
        assert!(got[..100].iter().all(|&a| a), "within the bucket after a step back: {got:?}");
        assert!(!got[100], "and not one more");
        // A drained bucket stays drained after a step back, and refills with time after it.
        let l = limits(10, 3600, 10, None);
        let mut offsets = vec![0; 10];
        offsets.extend([-hour, -hour + 1]);
        offsets.extend([-hour + 360; 2]);
        let got = admitted_at(&l, &offsets);
        assert_eq!(got[10..], [false, false, false, false], "no refill from a step back, nor while behind");
        let got = admitted_at(&l, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -hour, 360, 360]);
        assert_eq!(got[10..], [false, true, false], "back and forth again: one token for 6 real minutes");
        // Two workers reading the clock a moment apart is not a step: no credit.
        let l = limits(1, 3600, 1, None);
        assert_eq!(admitted_at(&l, &[1, 0, 1, 0]), [true, false, false, false], "sub-second reordering");
    }

    #[test]
    fn daily_budget_is_not_spent_twice_across_midnight() {
        let l = limits(1000, 1, 1000, Some(3));
        let midnight = 72_000; // T0 is 04:00 UTC, so T0 + 20 h is the next midnight
        let mut offsets = vec![midnight - 120; 4]; // 3 of 3 at 23:58, then refused
        offsets.extend([midnight + 120; 4]); // a new day: 3 more
        offsets.extend([midnight - 120; 2]); // stepped back to 23:58: the later day's count holds
        offsets.extend([midnight + 120; 2]);
        let got = admitted_at(&l, &offsets);
        let want = [true, true, true, false, true, true, true, false, false, false, false, false];
        assert_eq!(got, want);
    }

    #[test]
    fn retry_after_and_headers_figures() {
        let l = limits(5, 60, 5, Some(1000));
        let mut state = QuotaState::default();
        let mut last = None;
        for _ in 0..5 {
            let (next, usage) = step(state, &l, T0, 0.7).map_err(|_| "admitted").unwrap_or_else(|_| unreachable!());
            state = next;
            last = Some(usage);
        }
        let usage = last.unwrap_or_else(|| unreachable!());
        assert_eq!(usage.rate_remaining, 0, "bucket empty after 5");
        assert_eq!(usage.rate_reset_secs, 60, "full again in 60s");
        assert_eq!(usage.budget_remaining, Some(995), "budget left");
        let refused = Usage {
            rate_remaining: 0,
            rate_reset_secs: 60,
            budget_remaining: Some(995),
            budget_reset_secs: 72_000,
            rate_soft_crossed: false,
            budget_soft_crossed: false,
        };
        assert_eq!(
            step(state, &l, T0, 0.7).err(),
            Some(QuotaOutcome::RateLimited { retry_after_secs: 12, usage: refused }),
            "next token in 12s; the bucket as it stands, nothing taken"
        );
        // 2026-11-29T04:00:00Z is 20h before midnight.
        let l = limits(100, 1, 100, Some(1));
        let (s1, _) = step(QuotaState::default(), &l, T0, 0.7).unwrap_or_else(|_| unreachable!());
        let refused = Usage {
            rate_remaining: 99,
            rate_reset_secs: 1,
            budget_remaining: Some(0),
            budget_reset_secs: 72_000,
            rate_soft_crossed: false,
            budget_soft_crossed: false,
        };
        assert_eq!(
            step(s1, &l, T0, 0.7).err(),
            Some(QuotaOutcome::BudgetExhausted { retry_after_secs: 72_000, usage: refused }),
            "budget retry at midnight; nothing left today"
        );
    }

    #[test]
    fn soft_limit_crossed_once() {
        let l = limits(10, 60, 10, Some(10));
        let mut state = QuotaState::default();
        let mut rate_crossings = vec![];
        let mut budget_crossings = vec![];
        for i in 1..=10 {
            let (next, usage) = step(state, &l, T0, 0.7).unwrap_or_else(|_| unreachable!());
            state = next;
            if usage.rate_soft_crossed {
                rate_crossings.push(i);
            }
            if usage.budget_soft_crossed {
                budget_crossings.push(i);
            }
        }
        assert_eq!(rate_crossings, vec![7], "bucket crosses 70% on the 7th request");
        assert_eq!(budget_crossings, vec![7], "budget crosses 70% on the 7th request");
    }

    #[test]
    fn clock_going_backwards_keeps_the_bucket_level() {
        // 3 of 5 at +100 s; back to 0 s: 2 left, not 5 (no refill from the step) and not 0 (no
        // lockout); no refill until the clock is past +100 s again, then one per 12 s.
        let l = limits(5, 60, 5, None);
        let got = admitted_at(&l, &[100, 100, 100, 0, 0, 0, 50, 50, 50, 50, 50, 112]);
        assert_eq!(got, [true, true, true, true, true, false, false, false, false, false, false, true]);
    }

    // === CounterStore contract suite, run against every store ===

    fn contract_exact_quota(store: &mut dyn CounterStore, what: &str) {
        let l = limits(50, 3600, 50, None);
        assert_eq!(ensure_keys(store, ["guardrail.quota.a"]), Ok(1), "{what}: creates the key");
        assert_eq!(ensure_keys(store, ["guardrail.quota.a"]), Ok(0), "{what}: keeps an existing key");
        let mut allowed = 0;
        let mut limited = 0;
        for _ in 0..300 {
            match take(store, "guardrail.quota.a", &l, T0, 0.7) {
                QuotaOutcome::Allowed(_) => allowed += 1,
                QuotaOutcome::RateLimited { .. } => limited += 1,
                other => panic!("{what}: unexpected {other:?}"),
            }
        }
        assert_eq!((allowed, limited), (50, 250), "{what}: exactly the quota");
        assert_eq!(
            take(store, "guardrail.quota.missing", &l, T0, 0.7),
            QuotaOutcome::Unavailable,
            "{what}: missing key fails closed"
        );
    }

    macro_rules! test_with_all_stores {
        ($name:ident, $body:ident) => {
            mod $name {
                use super::*;
                #[test]
                fn memory() {
                    $body(&mut MemoryStore::default(), "memory");
                }
                #[test]
                fn contended() {
                    $body(&mut ContendedStore::new(MemoryStore::default(), 3), "3 CAS mismatches per write");
                }
            }
        };
    }
    test_with_all_stores!(exact_quota, contract_exact_quota);

    #[test]
    fn cas_retries_exhausted_fail_closed() {
        let mut store = ContendedStore::new(MemoryStore::default(), MAX_CAS_RETRIES + 1);
        let _ = ensure_keys(&mut store, ["k"]);
        let l = limits(5, 60, 5, None);
        assert_eq!(
            take(&mut store, "k", &l, T0, 0.7),
            QuotaOutcome::Unavailable,
            "endless contention is refused, not admitted"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_more_than_burst_plus_refill(burst in 1u64..50, requests in 1u64..50, per in 1u64..100, offsets in proptest::collection::vec(0u64..200, 1..200)) {
            let l = limits(requests, per, burst, None);
            let mut sorted = offsets.clone();
            sorted.sort_unstable();
            let mut state = QuotaState::default();
            let mut admitted = 0u64;
            for off in &sorted {
                if let Ok((next, _)) = step(state, &l, T0 + off * SEC, 0.7) { state = next; admitted += 1; }
            }
            let span = sorted.last().copied().unwrap_or(0) - sorted.first().copied().unwrap_or(0);
            let refill = span * SEC / l.rate.interval_ns();
            proptest::prop_assert!(admitted <= burst + refill, "admitted {} > burst {} + refill {}", admitted, burst, refill);
        }
    }
}
