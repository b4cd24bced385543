//! The query string of a console URL: `name=value` pairs, `+` and `%XX` decoded (invalid escapes
//! and bytes kept as they are, never an error), the first value of a name winning. At most
//! [`MAX_PAIRS`] pairs are read; a longer query is cut there.

/// Pairs read from one query string.
pub const MAX_PAIRS: usize = 64;

#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match b {
            b'+' => out.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    pub fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .take(MAX_PAIRS)
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        Query(pairs)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of `name`, or "" (a filter that is not set).
    pub fn value(&self, name: &str) -> &str {
        self.get(name).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_decoded_and_bounded() {
        let q = Query::parse(Some("q=a+b%20c&team=&x=%ZZ%4&from=2026-01-01&q=second&%e2%82%ac=%FF"));
        let cases = [
            ("q", Some("a b c")),
            ("team", Some("")),
            ("x", Some("%ZZ%4")),
            ("missing", None),
            ("€", Some("\u{fffd}")),
        ];
        for (name, want) in cases {
            assert_eq!(q.get(name), want, "{name}");
        }
        let long = "a=1&".repeat(10_000);
        assert_eq!(Query::parse(Some(&long)).0.len(), MAX_PAIRS, "bounded");
        assert!(Query::parse(None).0.is_empty());
    }
}
