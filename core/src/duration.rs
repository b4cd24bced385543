//! Durations as policy authors write them: `500ms`, `1s`, `30s`, `1m`, `1h`, `1d`, `1h30m`.

/// Parses a duration into nanoseconds. Rejects bare numbers, zero, unknown units and overflow.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. `30s`, `1m`, `1h`".into());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!("bad duration `{text}`: expected a number before each unit"));
        }
        let number: u64 = s[start..i].parse().map_err(|_| format!("bad duration `{text}`: number too large"))?;
        let unit_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() {
            i += 1;
        }
        let scale: u64 = match s[unit_start..i].trim() {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(format!("bad duration `{text}`: missing unit (ms, s, m, h or d)")),
            other => return Err(format!("bad duration `{text}`: unknown unit `{other}` (use ms, s, m, h or d)")),
        };
        let part = number.checked_mul(scale).ok_or_else(|| format!("bad duration `{text}`: too large"))?;
        total = total.checked_add(part).ok_or_else(|| format!("bad duration `{text}`: too large"))?;
    }
    if total == 0 {
        return Err(format!("bad duration `{text}`: must be greater than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_table() {
        let cases: &[(&str, Result<u64, ()>, &str)] = &[
            ("1s", Ok(1_000_000_000), "seconds"),
            ("30s", Ok(30_000_000_000), "tens of seconds"),
            ("1m", Ok(60_000_000_000), "minute"),
            ("1h", Ok(3_600_000_000_000), "hour"),
            ("1d", Ok(86_400_000_000_000), "day"),
            ("1h30m", Ok(5_400_000_000_000), "compound"),
            ("250ms", Ok(250_000_000), "milliseconds"),
            ("60", Err(()), "bare number has no unit"),
            ("", Err(()), "empty"),
            ("0s", Err(()), "zero"),
            ("-1s", Err(()), "negative"),
            ("1 fortnight", Err(()), "unknown unit"),
            ("1y", Err(()), "unknown unit y"),
            ("99999999999999999999s", Err(()), "overflow"),
            ("1.5s", Err(()), "fractions are not accepted"),
        ];
        for (input, want, why) in cases {
            let got = parse_duration(input).map_err(|_| ());
            assert_eq!(&got, want, "{why}: parse_duration({input:?})");
        }
    }
}
