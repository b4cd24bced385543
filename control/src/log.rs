//! One-line log records on stderr for `guardrail serve`: `2026-03-21T10:00:00.123Z message`.
//!
//! The server's log is read by people tailing it and by tests grepping it, so it stays plain text,
//! one event per line, with the UTC time first.

use guardrail_core::problem::one_line;
pub use guardrail_core::time::rfc3339_secs;
use std::io::Write;
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
