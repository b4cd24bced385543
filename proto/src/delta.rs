//! [`v1::PolicyDelta`]'s edits: [`diff`] (the companion, once per change) and [`apply`] (the
//! filter). A policy change is usually small (an app quarantined, a region edited), and a delta
//! sends what changed instead of the whole policy to every node.
//!
//! [`diff`] matches the new text against the base in blocks of [`BLOCK`] bytes, found through a
//! rolling hash and checked byte for byte, each match grown both ways: the result is always
//! exact, only its size depends on how the change lies. The receiver checks the SHA-256 of what
//! [`apply`] gives against the delta's before it uses it.

use crate::v1::DeltaOp;

/// Bytes hashed per index entry: a copy is at least this long.
pub const BLOCK: usize = 32;
/// The rolling hash's multiplier (odd, so it has an inverse modulo 2^32).
const MULTIPLIER: u32 = 0x0100_0193;

/// Hash of `block` (BLOCK bytes), the value [`Rolling`] keeps.
fn hash(block: &[u8]) -> u32 {
    block.iter().fold(0u32, |h, &b| h.wrapping_mul(MULTIPLIER).wrapping_add(u32::from(b)))
}

/// The hash of the window moved one byte on: `out` leaves it, `inn` enters it.
fn roll(h: u32, out: u8, inn: u8, top: u32) -> u32 {
    h.wrapping_sub(u32::from(out).wrapping_mul(top)).wrapping_mul(MULTIPLIER).wrapping_add(u32::from(inn))
}

/// One block in this many, on average, is an anchor that [`diff`] indexes and looks up.
const ANCHOR_EVERY: usize = 16;

/// Whether a block of hash `h` is an anchor: its hash, scrambled (the low bits of the rolling hash
/// mix the bytes poorly), falls in the lowest 1/[`ANCHOR_EVERY`] of the range.
fn is_anchor(h: u32) -> bool {
    h.wrapping_mul(0x9E37_79B1) < u32::MAX / ANCHOR_EVERY as u32
}

/// MULTIPLIER^(BLOCK-1), the weight of the byte leaving the window.
fn top_weight() -> u32 {
    (1..BLOCK).fold(1u32, |w, _| w.wrapping_mul(MULTIPLIER))
}

/// The ops that turn `base` into `new` (see [`v1::PolicyDelta`]): inserts for what the base does
/// not have, copies of runs of at least [`BLOCK`] bytes it has.
pub fn diff(base: &[u8], new: &[u8]) -> Vec<DeltaOp> {
    // The offsets of the base's anchor blocks ([`is_anchor`]: about one in ANCHOR_EVERY, chosen
    // by content), by hash then offset. Being chosen by content, an anchor of the base is an
    // anchor wherever the new text has the same bytes, so a shared run holds one unless it is
    // short; a match is then grown both ways. Indexing every offset instead (357,000 entries for
    // the bench's policy, sorted: 19 ms of each change's 26 before the push) found little more.
    // A policy repeats itself (a thousand apps' entries alike but for their ids), so a block is
    // looked for near where the last match said it would be, not at its first occurrence.
    let top = top_weight();
    let mut index: Vec<(u32, usize)> = Vec::with_capacity(base.len() / ANCHOR_EVERY + 1);
    if base.len() >= BLOCK {
        let mut h = hash(&base[..BLOCK]);
        for start in 0..=base.len() - BLOCK {
            if is_anchor(h) {
                index.push((h, start));
            }
            if start + BLOCK < base.len() {
                h = roll(h, base[start], base[start + BLOCK], top);
            }
        }
    }
    index.sort_unstable();
    let offsets = |h: u32| {
        let first = index.partition_point(|&(k, _)| k < h);
        let end = first + index[first..].partition_point(|&(k, _)| k == h);
        &index[first..end]
    };
    let forward = |from: usize, at: usize| base[from..].iter().zip(&new[at..]).take_while(|(a, b)| a == b).count();
    let mut ops = Vec::new();
    // new[pending..at] is not matched yet: the next op's insert.
    let mut pending = 0;
    let mut at = 0;
    // Where in the base the text at `at` would be if it moved as the last match did.
    let mut shift: isize = 0;
    let mut h = if new.len() >= BLOCK { hash(&new[..BLOCK]) } else { 0 };
    while at + BLOCK <= new.len() {
        let found = is_anchor(h).then(|| {
            let offsets = offsets(h);
            let expected = (at as isize + shift).max(0) as usize;
            let near = offsets.partition_point(|&(_, o)| o < expected);
            (near.saturating_sub(2)..(near + 2).min(offsets.len()))
                .map(|k| offsets[k].1)
                .map(|from| (forward(from, at), from))
                .filter(|&(len, _)| len >= BLOCK)
                .max()
        });
        let found = found.flatten();
        let Some((len, from)) = found else {
            if at + BLOCK < new.len() {
                h = roll(h, new[at], new[at + BLOCK], top);
            }
            at += 1;
            continue;
        };
        // Grow the match back into the pending bytes.
        let mut back = 0;
        while at - back > pending && from > back && base[from - back - 1] == new[at - back - 1] {
            back += 1;
        }
        let (from, start, len) = (from - back, at - back, len + back);
        ops.push(DeltaOp { insert: new[pending..start].to_vec(), copy_offset: from as u64, copy_len: len as u64 });
        shift = from as isize - start as isize;
        at = start + len;
        pending = at;
        if at + BLOCK <= new.len() {
            h = hash(&new[at..at + BLOCK]);
        }
    }
    if pending < new.len() {
        ops.push(DeltaOp { insert: new[pending..].to_vec(), copy_offset: 0, copy_len: 0 });
    }
    ops
}

/// The text `ops` make of `base`, refused (with the op at fault) past `limit` bytes or where an
/// op copies beyond the base.
pub fn apply(base: &[u8], ops: &[DeltaOp], limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(base.len().min(limit));
    for (k, op) in ops.iter().enumerate() {
        let copy = usize::try_from(op.copy_offset)
            .ok()
            .zip(usize::try_from(op.copy_len).ok())
            .and_then(|(offset, len)| base.get(offset..offset.checked_add(len)?))
            .ok_or_else(|| {
                format!(
                    "delta: op {k} copies {} bytes at {} of a base of {} bytes",
                    op.copy_len,
                    op.copy_offset,
                    base.len()
                )
            })?;
        if out.len() + op.insert.len() + copy.len() > limit {
            return Err(format!("delta: the policy it gives passes {limit} bytes (at op {k})"));
        }
        out.extend_from_slice(&op.insert);
        out.extend_from_slice(copy);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip(base: &[u8], new: &[u8]) -> Vec<DeltaOp> {
        let ops = diff(base, new);
        assert_eq!(apply(base, &ops, usize::MAX).unwrap(), new, "base {} new {}", base.len(), new.len());
        ops
    }

    /// A 1,000-entry document like a policy's apps, with `flip` of them quarantined.
    fn policy(revision: &str, flip: &[usize]) -> Vec<u8> {
        let mut text = String::from("{\"apps\":[");
        for k in 0..1000 {
            let lifecycle = if flip.contains(&k) { "quarantined" } else { "published" };
            text.push_str(&format!(
                "{{\"id\":\"app-{k:05}\",\"lifecycle\":\"{lifecycle}\",\"region\":\"eu-west-1\",\"tier\":\"small\"}},"
            ));
        }
        text.push_str(&format!("],\"revision\":\"{revision}\"}}"));
        text.into_bytes()
    }

    #[test]
    fn a_small_change_is_a_small_delta_and_gives_the_new_text_exactly() {
        let base = policy("r1", &[]);
        let new = policy("r2", &[1, 700]);
        let ops = round_trip(&base, &new);
        let inserted: usize = ops.iter().map(|op| op.insert.len()).sum();
        assert!(inserted < 100, "{inserted} bytes inserted for three small edits");
        assert!(ops.len() <= 4, "{} ops", ops.len());
    }

    #[test]
    fn edge_cases_round_trip() {
        let base = policy("r1", &[3]);
        round_trip(&base, &base);
        round_trip(&base, b"");
        round_trip(b"", &base);
        round_trip(b"short", b"shorter");
        round_trip(&base, &base[..base.len() / 2]);
        round_trip(&base, &base[base.len() / 3..]);
        let mut doubled = base.clone();
        doubled.extend_from_slice(&base);
        round_trip(&base, &doubled);
        let mut reversed = base.clone();
        reversed.reverse();
        round_trip(&base, &reversed);
        // Repetitive text: every block hashes alike.
        round_trip(&[b'a'; 1000], &[b'a'; 1500]);
        round_trip(&[b'a'; 1500], &[[b'a'; 700].as_slice(), b"b", &[b'a'; 700]].concat());
    }

    #[test]
    fn pseudo_random_edits_round_trip() {
        let base = policy("r1", &[]);
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize
        };
        for _ in 0..50 {
            let mut new = base.clone();
            for _ in 0..(next() % 8) {
                let at = next() % new.len();
                match next() % 3 {
                    0 => {
                        let end = (at + next() % 200).min(new.len());
                        new.drain(at..end);
                    }
                    1 => new.splice(at..at, (0..next() % 100).map(|k| (k % 251) as u8)).for_each(drop),
                    _ => new[at] ^= 0x5a,
                }
            }
            round_trip(&base, &new);
        }
    }

    #[test]
    fn a_hostile_delta_is_refused_by_name() {
        let base = b"0123456789";
        let op = |copy_offset, copy_len| DeltaOp { insert: Vec::new(), copy_offset, copy_len };
        assert_eq!(apply(base, &[op(2, 3)], 100).unwrap(), b"234");
        let beyond = apply(base, &[op(8, 3)], 100).unwrap_err();
        assert!(beyond.contains("op 0 copies 3 bytes at 8 of a base of 10 bytes"), "{beyond}");
        assert!(apply(base, &[op(u64::MAX, 2)], 100).unwrap_err().contains("copies"));
        assert!(apply(base, &[op(0, u64::MAX)], 100).unwrap_err().contains("copies"));
        let big = vec![op(0, 10); 11];
        assert!(apply(base, &big, 100).unwrap_err().contains("passes 100 bytes (at op 10)"));
        let insert = DeltaOp { insert: vec![b'x'; 101], copy_offset: 0, copy_len: 0 };
        assert!(apply(base, &[insert], 100).unwrap_err().contains("passes 100 bytes"));
    }
}
