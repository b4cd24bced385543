//! One-line log records on stderr for `guardrail serve`: `2026-03-21T10:00:00.123Z message`.
//!
//! The server's log is read by people tailing it and by tests grepping it, so it stays plain text,
//! one event per line, with the UTC time first.

use guardrail_core::problem::one_line;
pub use guardrail_core::time::rfc3339_secs;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one log line (the time is prepended), always one: a node id, a revision or an error a
/// node sent can never start a line of its own ([`one_line`]). A closed stderr is ignored: nothing
/// sensible is left to do, and the server must go on serving.
pub fn line(message: &str) {
    let stamp = timestamp(SystemTime::now());
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{stamp} {}", one_line(message));
}

/// `format!`-style logging through [`line`].
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(&format!($($arg)*))
    };
}
pub(crate) use log;

/// What each node says of itself (it connected, it ACKed or NACKed a revision, it left), which a
/// fleet of thousands says thousands of times a second during a push: at most `per_second` such
/// lines are written each second; the others are counted by what they say (`ACK revision 7`) and
/// summed up once a second by [`NodeLines::flush`], which the companion's ticker calls. A fleet
/// of a few dozen nodes sees every line.
pub struct NodeLines {
    per_second: u32,
    state: Mutex<LeftOut>,
}

#[derive(Default)]
struct LeftOut {
    second: i64,
    written: u32,
    by_kind: BTreeMap<String, u64>,
}

/// The companion's node lines: 50 a second, then one summary line per kind.
pub static NODE_LINES: NodeLines = NodeLines::new(50);

impl NodeLines {
    pub const fn new(per_second: u32) -> NodeLines {
        NodeLines { per_second, state: Mutex::new(LeftOut { second: 0, written: 0, by_kind: BTreeMap::new() }) }
    }

    /// Writes `message()` as a line if this second's budget allows, else counts it under `kind`.
    pub fn line(&self, kind: &str, message: impl FnOnce() -> String) {
        if self.admit(kind, now_secs()) {
            line(&message());
        }
    }

    fn admit(&self, kind: &str, now: i64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.second != now {
            state.second = now;
            state.written = 0;
        }
        if state.written < self.per_second {
            state.written += 1;
            return true;
        }
        *state.by_kind.entry(kind.to_string()).or_default() += 1;
        false
    }

    /// The lines left out since the last call, one per kind: `node lines left out: 9950 × ACK
    /// revision 7 …`.
    pub fn flush(&self) {
        for summary in self.left_out() {
            line(&summary);
        }
    }

    fn left_out(&self) -> Vec<String> {
        let by_kind = std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).by_kind);
        by_kind
            .into_iter()
            .map(|(kind, n)| {
                format!(
                    "node lines left out: {n} × {kind} (at most {} node lines a second; `guardrail status` lists every node)",
                    self.per_second
                )
            })
            .collect()
    }
}

/// `format!`-style logging through [`NODE_LINES`]: `node_log!(kind; "node {id} ...", ...)`.
macro_rules! node_log {
    ($kind:expr; $($arg:tt)*) => {
        $crate::log::NODE_LINES.line(&$kind, || format!($($arg)*))
    };
}
pub(crate) use node_log;

/// Unix seconds now (0 if the clock is before 1970, which it is not).
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// RFC 3339 UTC time with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let whole = rfc3339_secs(secs);
    format!("{}.{:03}Z", whole.trim_end_matches('Z'), since.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lines_past_the_budget_are_counted_by_kind_and_summed_up() {
        let lines = NodeLines::new(3);
        let admitted: Vec<bool> =
            (0..7).map(|i| lines.admit(if i % 2 == 0 { "ACK revision 7" } else { "connected" }, 100)).collect();
        assert_eq!(admitted, [true, true, true, false, false, false, false]);
        assert_eq!(
            lines.left_out(),
            [
                "node lines left out: 2 × ACK revision 7 (at most 3 node lines a second; `guardrail status` lists every node)",
                "node lines left out: 2 × connected (at most 3 node lines a second; `guardrail status` lists every node)",
            ]
        );
        assert!(lines.left_out().is_empty(), "said once");
        assert!(lines.admit("connected", 101), "a new second, a new budget");
    }

    #[test]
    fn formats_utc_times() {
        let cases: &[(i64, &str, &str)] = &[
            (0, "1970-01-01T00:00:00Z", "the epoch"),
            (951_782_400, "2000-02-29T00:00:00Z", "a leap day"),
            (1_798_761_599, "2026-12-31T23:59:59Z", "the last second of a year"),
            (-1, "1969-12-31T23:59:59Z", "before the epoch"),
        ];
        for (secs, want, why) in cases {
            assert_eq!(rfc3339_secs(*secs), *want, "{why}");
        }
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_500);
        assert_eq!(timestamp(at), "1970-01-01T00:00:01.500Z");
    }
}
