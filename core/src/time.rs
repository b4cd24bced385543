//! Time as plain numbers: the clock is always a parameter (no test sleeps).
//! [`parse_rfc3339`] reads the timestamps of `quota_overrides[].expires_at`.

/// Nanoseconds in a second and in a UTC day.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;
pub const SECS_PER_DAY: u64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses an RFC 3339 date-time (`2026-12-24T18:00:00Z`, `2026-12-24T18:00:00.5+01:00`) into
/// whole Unix seconds (fractions are dropped). Lower-case `t`/`z` are accepted as RFC 3339 allows.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let bad = || format!("bad RFC 3339 time `{text}`: expected e.g. 2026-12-24T18:00:00Z");
    let b = text.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<u32, String> {
        let part = text.get(range).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<u32>().map_err(|_| bad())
    };
    let year = i64::from(num(0..4)?);
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    let sep_ok = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && matches!(b.get(10), Some(b'T' | b't' | b' '))
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    if !sep_ok {
        return Err(bad());
    }
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(format!("bad RFC 3339 time `{text}`: date or time out of range"));
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b.get(i + 3) == Some(&b':') => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let secs = i64::from(oh * 3600 + om * 60);
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return Err(format!("bad RFC 3339 time `{text}`: a time zone (`Z` or `+01:00`) is required")),
    };
    let days = days_from_civil(year, month, day);
    let second = second.min(59); // a leap second counts as :59
    Ok(days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs)
}

/// Parses a calendar date `YYYY-MM-DD` (UTC) into the Unix second its day starts.
pub fn parse_date(text: &str) -> Result<i64, String> {
    if text.len() != 10 {
        return Err(format!("bad date `{text}`: expected YYYY-MM-DD, e.g. 2026-12-24"));
    }
    parse_rfc3339(&format!("{text}T00:00:00Z"))
        .map_err(|_| format!("bad date `{text}`: expected YYYY-MM-DD, e.g. 2026-12-24"))
}

/// RFC 3339 UTC time of Unix seconds, e.g. `2026-03-21T10:00:00Z` (Howard Hinnant's
/// `civil_from_days`).
pub fn rfc3339_secs(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        let cases: &[(&str, Result<i64, ()>, &str)] = &[
            ("1970-01-01T00:00:00Z", Ok(0), "epoch"),
            ("2026-11-29T04:00:00Z", Ok(1_795_924_800), "today"),
            ("2026-11-29T05:00:00+01:00", Ok(1_795_924_800), "positive offset"),
            ("2026-11-28T23:00:00-05:00", Ok(1_795_924_800), "negative offset"),
            ("2026-11-29t04:00:00.999z", Ok(1_795_924_800), "lower case and fraction"),
            ("2024-02-29T00:00:00Z", Ok(1_709_164_800), "leap day"),
            ("2025-02-29T00:00:00Z", Err(()), "not a leap year"),
            ("2026-13-01T00:00:00Z", Err(()), "month 13"),
            ("2026-11-29T24:00:00Z", Err(()), "hour 24"),
            ("2026-11-29T04:00:00", Err(()), "no zone"),
            ("2026-11-29", Err(()), "date only"),
            ("tomorrow", Err(()), "words"),
            ("2026-11-29T04:00:00.Z", Err(()), "empty fraction"),
            ("2026-11-29T04:00:00+0100", Err(()), "offset without colon"),
            ("2026-1１-29T04:00:00Z", Err(()), "non-ascii digit"),
            ("", Err(()), "empty"),
        ];
        for (input, want, why) in cases {
            assert_eq!(&parse_rfc3339(input).map_err(|_| ()), want, "{why}: {input:?}");
        }
    }
}
