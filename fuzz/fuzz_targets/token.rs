//! Bearer tokens against a fixed issuer set (issuer A: EdDSA, ES256 and RS256 keys with an
//! audience; issuer B: an EdDSA key, another app claim, no skew).
//!
//! The first byte picks the mode:
//! - 0: the rest is the token, verified as is. If it verifies, it must be spelled canonically
//!   (another spelling of a valid token is a malleability bug).
//! - 1, 2: the rest is `header-bytes \0 payload-bytes`, base64url-encoded and signed with the
//!   EdDSA or ES256 key of issuer A, so the checks that follow the signature (claims, `crit`,
//!   `typ`, `kid`, audience, time) are fuzzed too. If it verifies, its header named that key's
//!   algorithm (and its kid, if any): no algorithm or key confusion. (RS256 signing costs ~2 s
//!   per input in this instrumented build, so RSA is fuzzed through mode 0: mutated RS256 tokens
//!   against the RSA key, seeded with a valid one.)
//!
//! Any verified token must be within its lifetime, name a configured issuer and an app, and hold
//! an accepted audience where the issuer requires one. Never a panic.
#![no_main]

use base64ct::{Base64UrlUnpadded, Encoding};
use guardrail_core::compile::{compile_json_str, CompiledPolicy};
use guardrail_core::jwt::{verify, TokenCache, VerifiedToken, MAX_TOKEN_BYTES};
use jwt_compact::alg::{Ed25519, Es256, SigningKey as _};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::sync::OnceLock;

const NOW: i64 = 1_795_924_800; // 2026-11-29T04:00:00Z

// The public half of the RSA-2048 test key of core/src/jwt.rs's tests.
const RSA_N: &str = "rKyGWLS5qY_QtctuqZlDnh6JzRwCZgJJ4XzNKaQtx32fNbfVdW07M8eehYlaHkI5Gd2IGhdyrlxr24eQyen0-DA4b4adyoGEnohoIgIYX25KahoVji6ofa-mvesasnc688zUl9O4M9MF7lMPxNgXVY8pADgci_NDhPfWAY-y0YekIjhL1xR6IlKiw_tyXKvHRBVVD1v5SqwXMQe4DbLZm5x6G1pf420X2TeH0rygja9uoZc86dTTHApxlz0h3vvseTfW09myFhBporNp_2X4X6BM5306dt9mISaXivsxZdDr2eT9lRXwmKxMrVzXBmS0rv9F3dphdWCc9gdDct56JQ";

struct Fixture {
    policy: CompiledPolicy,
    ed: <Ed25519 as Algorithm>::SigningKey,
    ec: <Es256 as Algorithm>::SigningKey,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build().unwrap_or_else(|e| panic!("fuzz fixture: {e}")))
}

fn build() -> Result<Fixture, String> {
    let ed = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([7; 32]));
    let other = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([9; 32]));
    let ec = <<Es256 as Algorithm>::SigningKey as jwt_compact::alg::SigningKey<Es256>>::from_slice(&[11; 32])
        .map_err(|e| e.to_string())?;

    let jwk = |public: JsonWebKey<'_>, kid: &str| -> Result<Value, String> {
        let mut v = serde_json::to_value(public).map_err(|e| e.to_string())?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("kid".into(), json!(kid));
            obj.insert("use".into(), json!("sig"));
        }
        Ok(v)
    };
    let ed_jwk = jwk(JsonWebKey::from(&ed.pk), "ed-1")?;
    let other_jwk = jwk(JsonWebKey::from(&other.pk), "b-ed-1")?;
    let ec_jwk = jwk(JsonWebKey::from(&ec.to_verifying_key()), "ec-1")?;
    let policy = json!({
        "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "fuzz",
        "settings": {"identity": {"jwt": [
            {"issuer": "https://a.example", "audiences": ["guardrail", "guardrail-alt"],
             "jwks": {"keys": [ed_jwk, ec_jwk, {"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": "rsa-1", "alg": "RS256"}]}},
            {"issuer": "https://b.example", "app_claim": "client_id", "clock_skew_seconds": 0,
             "jwks": {"keys": [other_jwk]}}
        ]}},
        "tiers": {"standard": {"rate": {"requests": 100, "per": "1m"}}}
    });
    let policy = compile_json_str(&policy.to_string()).map_err(|e| e.to_string())?;
    Ok(Fixture { policy, ed: ed.sk, ec })
}

fn b64(bytes: &[u8]) -> String {
    Base64UrlUnpadded::encode_string(bytes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            if let Ok(v) = verify(&f.policy.issuers, &token, NOW) {
                check_verified(f, &v);
                let canonical: Option<Vec<String>> =
                    token.split('.').map(|part| Base64UrlUnpadded::decode_vec(part).ok().map(|b| b64(&b))).collect();
                assert_eq!(
                    canonical.map(|c| c.join(".")).as_deref(),
                    Some(&*token),
                    "a non-canonical spelling verified"
                );
            }
        }
        m => {
            let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let (header, payload) = rest.split_at(split);
            let payload = payload.get(1..).unwrap_or(&[]);
            let input = format!("{}.{}", b64(header), b64(payload));
            let (alg, kid, signature) = match m {
                1 => ("EdDSA", "ed-1", Ed25519.sign(&f.ed, input.as_bytes()).as_bytes().into_owned()),
                _ => ("ES256", "ec-1", Es256.sign(&f.ec, input.as_bytes()).as_bytes().into_owned()),
            };
            let token = format!("{input}.{}", b64(&signature));
            if let Ok(v) = verify(&f.policy.issuers, &token, NOW) {
                assert!(token.len() <= MAX_TOKEN_BYTES, "an oversized token verified");
                check_verified(f, &v);
                let header: Value = serde_json::from_slice(header).unwrap_or(Value::Null);
                assert_eq!(
                    header.get("alg").and_then(Value::as_str),
                    Some(alg),
                    "verified with an alg that is not the key's"
                );
                let named = header.get("kid").and_then(Value::as_str);
                assert!(named.is_none() || named == Some(kid), "verified with another key's kid: {named:?}");
                assert_eq!(v.issuer, 0, "signed by issuer A's key but verified for another issuer");
                let mut cache = TokenCache::new(4);
                cache.insert(&token, v.clone());
                assert_eq!(cache.get(&token, NOW), Some(&v), "a verified token is cached at the time it verified");
            }
        }
    }
});

fn check_verified(f: &Fixture, v: &VerifiedToken) {
    let issuer = f.policy.issuers.get(v.issuer).unwrap_or_else(|| panic!("issuer index {} out of range", v.issuer));
    assert!(!v.app.is_empty(), "verified without an app");
    assert_eq!(
        v.claims.get(&issuer.app_claim).and_then(Value::as_str),
        Some(v.app.as_str()),
        "app is not the app claim"
    );
    assert_eq!(v.claims.get("iss").and_then(Value::as_str), Some(issuer.issuer.as_str()), "iss is not the issuer's");
    assert!(NOW < v.exp.saturating_add(issuer.clock_skew_seconds), "expired token verified: exp {}", v.exp);
    assert!(v.nbf.is_none_or(|nbf| NOW.saturating_add(issuer.clock_skew_seconds) >= nbf), "early token verified");
    assert!(v.is_valid_at(NOW), "verified but not valid at NOW");
    if !issuer.audiences.is_empty() {
        let aud = v.claims.get("aud");
        let holds = |a: &Value| a.as_str().is_some_and(|a| issuer.audiences.iter().any(|x| x == a));
        let ok = match aud {
            Some(Value::Array(list)) => list.iter().any(holds),
            Some(a) => holds(a),
            None => false,
        };
        assert!(ok, "audience {aud:?} is not accepted by the issuer");
    }
}
