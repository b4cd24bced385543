//! Ed25519 signing keys as JSON Web Keys (RFC 7517, RFC 8037): the private JWK that `keygen`
//! writes and `mint` reads, and the public JWK the policy's issuer lists.
//!
//! A private key file looks like
//! `{"kty":"OKP","crv":"Ed25519","kid":"…","alg":"EdDSA","use":"sig","x":"…","d":"…"}`, with `x`
//! the public key and `d` the 32-byte seed, both base64url without padding.

use base64ct::{Base64UrlUnpadded, Encoding};
use ed25519_compact::{KeyPair, Seed};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// An Ed25519 key pair with its key id.
pub struct SigningKey {
    pub kid: String,
    pair: KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private half.
        f.debug_struct("SigningKey").field("kid", &self.kid).field("x", &self.x()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key; `kid` defaults to the key's RFC 7638 thumbprint.
    pub fn generate(kid: Option<String>) -> Result<SigningKey, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("the system's random number generator failed: {e}"))?;
        Ok(SigningKey::from_seed(seed, kid))
    }

    pub fn from_seed(seed: [u8; 32], kid: Option<String>) -> SigningKey {
        let pair = KeyPair::from_seed(Seed::new(seed));
        let kid = kid.unwrap_or_else(|| thumbprint(&b64(pair.pk.as_ref())));
        SigningKey { kid, pair }
    }

    /// Reads a private JWK. The error says what is wrong with it.
    pub fn from_jwk(text: &str) -> Result<SigningKey, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key: {e}"))?;
        let jwk = value.as_object().ok_or("not a JSON Web Key: expected a JSON object")?;
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if jwk.contains_key("keys") {
            return Err("this is a JWKS (a key set); give the private key file `guardrail keygen` wrote".into());
        }
        match (field("kty"), field("crv")) {
            (Some("OKP"), Some("Ed25519")) => {}
            (kty, crv) => {
                return Err(format!(
                    "an Ed25519 key has `kty: OKP, crv: Ed25519`; this one has kty {} and crv {}",
                    kty.unwrap_or("(none)"),
                    crv.unwrap_or("(none)")
                ))
            }
        }
        if let Some(alg) = field("alg") {
            if alg != "EdDSA" {
                return Err(format!("an Ed25519 key signs with `alg: EdDSA`, not `{alg}`"));
            }
        }
        let d = field("d")
            .ok_or("no private part (`d`): this is a public key; give the private key file `guardrail keygen` wrote")?;
        let seed: [u8; 32] = Base64UrlUnpadded::decode_vec(d)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or("`d` must be 32 bytes, base64url without padding")?;
        let kid = match jwk.get("kid") {
            None => None,
            Some(Value::String(kid)) if !kid.is_empty() => Some(kid.clone()),
            Some(_) => return Err("`kid` must be a non-empty string".into()),
        };
        let key = SigningKey::from_seed(seed, kid);
        if let Some(x) = field("x") {
            if x != key.x() {
                return Err("`x` is not the public key of `d`: the file is damaged".into());
            }
        }
        Ok(key)
    }

    /// The public key, base64url.
    pub fn x(&self) -> String {
        b64(self.pair.pk.as_ref())
    }

    /// The public JWK, as the policy's `jwks.keys` lists it.
    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
            "x": self.x(),
        })
    }

    /// The private JWK (the key file).
    pub fn private_jwk(&self) -> Value {
        let mut jwk = self.public_jwk();
        if let Some(object) = jwk.as_object_mut() {
            object.insert("d".into(), Value::String(b64(self.pair.sk.seed().as_ref())));
        }
        jwk
    }

    /// A compact JWS (`header.payload.signature`) over the given header and claims.
    pub fn sign_jwt(&self, header: &Map<String, Value>, claims: &Map<String, Value>) -> String {
        let header = b64(Value::Object(header.clone()).to_string().as_bytes());
        let claims = b64(Value::Object(claims.clone()).to_string().as_bytes());
        let input = format!("{header}.{claims}");
        let signature = self.pair.sk.sign(input.as_bytes(), None);
        format!("{input}.{}", b64(signature.as_ref()))
    }
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    Base64UrlUnpadded::encode_string(bytes)
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key (`x` base64url): SHA-256 over the required
/// members in lexicographic order, base64url.
pub fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    b64(&Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8037_test_vector() {
        // RFC 8037 appendix A.1–A.3: the key, its public half and its thumbprint.
        let text = r#"{"kty":"OKP","crv":"Ed25519",
            "d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let key = SigningKey::from_jwk(text).unwrap();
        assert_eq!(key.x(), "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(key.kid, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn rfc8037_signature() {
        // RFC 8037 appendix A.4: Ed25519 is deterministic, so the JWS is fixed.
        let key =
            SigningKey::from_jwk(r#"{"kty":"OKP","crv":"Ed25519","d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}"#)
                .unwrap();
        let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        let signature = key.pair.sk.sign(input.as_bytes(), None);
        assert_eq!(
            b64(signature.as_ref()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn private_jwk_round_trips() {
        let key = SigningKey::generate(Some("k1".into())).unwrap();
        let again = SigningKey::from_jwk(&key.private_jwk().to_string()).unwrap();
        assert_eq!((again.kid.as_str(), again.x()), ("k1", key.x()));
        assert!(key.public_jwk().get("d").is_none());
        assert!(!format!("{key:?}").contains(&b64(key.pair.sk.seed().as_ref())));
    }

    #[test]
    fn bad_key_files_are_explained() {
        let ok = SigningKey::from_seed([1; 32], None).private_jwk();
        let with = |k: &str, v: Value| {
            let mut j = ok.clone();
            j[k] = v;
            j.to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            ("nope".into(), "not a JSON Web Key"),
            ("[1]".into(), "expected a JSON object"),
            (json!({"keys": []}).to_string(), "this is a JWKS"),
            (with("crv", json!("P-256")), "kty OKP and crv P-256"),
            (with("alg", json!("ES256")), "not `ES256`"),
            (with("d", json!("AAAA")), "`d` must be 32 bytes"),
            (with("x", json!(b64(&[2; 32]))), "damaged"),
            (with("kid", json!(7)), "`kid` must be"),
            (SigningKey::from_seed([1; 32], None).public_jwk().to_string(), "this is a public key"),
        ];
        for (text, want) in cases {
            let err = SigningKey::from_jwk(&text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
