//! The hash of the maps every request looks up: the policy's indexes (apps by id and by API-key
//! digest, approved connectors, the dataset path tree) and the token cache's fingerprints.
//!
//! SipHash, the standard library's default, keeps an attacker who chooses the keys of a map from
//! colliding them; here the keys are the policy's, written by its authors, and a request only looks
//! them up. A lookup never inserts, so a hostile lookup key costs one probe like any other. The
//! hash reads eight bytes at a time and ends with MurmurHash3's avalanche (hashbrown takes both
//! the low bits and the top seven), a fraction of SipHash's cost in wasm.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FastHasher`], for keys from the policy.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
/// A `HashSet` with [`FastHasher`], for keys from the policy.
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        avalanche(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = words(self.0 ^ (bytes.len() as u64).wrapping_mul(K), bytes);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(K).rotate_left(29);
    }
}

/// Seeded hash of `bytes` (the token cache's fingerprint of a token).
pub fn fingerprint(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FastHasher(seed);
    h.write(bytes);
    h.finish()
}

/// Folds `bytes` into `h`, eight at a time, the tail zero-padded.
fn words(mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for w in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    (h ^ u64::from_le_bytes(tail)).wrapping_mul(K)
}

/// MurmurHash3's fmix64: every input bit moves every output bit.
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ h >> 33
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash<T: std::hash::Hash + ?Sized>(v: &T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(v)
    }

    #[test]
    fn equal_keys_hash_alike_and_near_keys_apart() {
        assert_eq!(hash("app-00042"), hash(&"app-00042".to_string()));
        let ids: HashSet<u64> = (0..10_000).map(|i| hash(&format!("app-{i:05}"))).collect();
        assert_eq!(ids.len(), 10_000, "no collisions among 10,000 sequential app ids");
        // The buckets hashbrown picks (low bits) and its control bytes (top 7 bits) both spread.
        let low: HashSet<u64> = (0..1024).map(|i| hash(&format!("app-{i:05}")) & 1023).collect();
        let top: HashSet<u64> = (0..1024).map(|i| hash(&format!("app-{i:05}")) >> 57).collect();
        assert!(low.len() > 600, "{} of 1024 low-bit buckets used", low.len());
        assert_eq!(top.len(), 128, "every top-7-bit value appears");
    }

    #[test]
    fn a_byte_more_or_less_is_another_key() {
        assert_ne!(hash(""), hash("\0"));
        assert_ne!(hash("abcdefgh"), hash("abcdefgh\0"));
        assert_ne!(hash(&[0u8; 32]), hash(&[0u8; 31][..]));
        assert_ne!(fingerprint(1, b"token"), fingerprint(2, b"token"));
    }

    #[test]
    fn maps_find_what_was_put() {
        let mut m: FastMap<String, usize> = FastMap::default();
        for i in 0..5_000 {
            m.insert(format!("host-{i}.example"), i);
        }
        assert!((0..5_000).all(|i| m.get(format!("host-{i}.example").as_str()) == Some(&i)));
        assert_eq!(m.get("host-5000.example"), None);
    }
}
