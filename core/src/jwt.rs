//! JWT bearer tokens: the issuers of a policy, compiled once with their inline JWKS, and the
//! verification of a token against them (RFC 7519, with the RFC 8725 best practices).
//!
//! - The algorithm comes from the key, never from the token alone: a key's algorithm is fixed by
//!   its `kty`/`crv` (and `alg`, which must agree), and a token's header `alg` must equal it.
//!   `none` (in any spelling) and the symmetric `HS*` algorithms are always refused.
//! - Keys come only from the policy: the `jku`, `x5u`, `jwk` and `x5c` headers are ignored, never
//!   fetched, never trusted. A header with `crit` is refused (no extension is understood).
//! - Every check fails closed and nothing panics, whatever the input: the token is size-checked
//!   before any decoding, its JSON must be objects without duplicate keys, and `exp` is required.
//! - Time is a parameter (`now_secs`, seconds since the Unix epoch); nothing reads a clock.
//!
//! [`TokenCache`] keeps verified tokens per worker, so a signature is checked once per token and
//! not once per request.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use base64ct::{Base64UrlUnpadded, Encoding};
use jwt_compact::alg::{Ed25519, Es256, Rsa, RsaPublicKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::PolicyError;
use crate::raw::RawJwtIssuer;

/// Tokens longer than this are refused before any decoding or signature work.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// The claim naming the app when an issuer does not say (`app_claim`).
pub const DEFAULT_APP_CLAIM: &str = "azp";
/// Clock skew tolerated when an issuer does not say (`clock_skew_seconds`).
pub const DEFAULT_CLOCK_SKEW_SECONDS: i64 = 30;
/// The largest `clock_skew_seconds` a policy may set.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 600;
/// The RSA modulus sizes accepted (RFC 7518 §3.3 requires at least 2048 bits).
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 4096;
/// The largest NumericDate accepted (9999-12-31T23:59:59Z). Bounding `exp`, `nbf` and `iat` to
/// `0..=MAX_NUMERIC_DATE` keeps every sum and difference of them (and of skews) far from overflow.
const MAX_NUMERIC_DATE: i64 = 253_402_300_799;
/// How much of an untrusted value (issuer, kid, alg…) an error message repeats.
const MAX_SHOWN_CHARS: usize = 64;

type Ed25519Key = <Ed25519 as Algorithm>::VerifyingKey;
type Es256Key = <Es256 as Algorithm>::VerifyingKey;

// === Algorithms and keys ===

/// A JWS algorithm Guardrail verifies. Always asymmetric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigAlg {
    EdDsa,
    Es256,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

impl SigAlg {
    const ALL: [SigAlg; 8] = [
        SigAlg::EdDsa,
        SigAlg::Es256,
        SigAlg::Rs256,
        SigAlg::Rs384,
        SigAlg::Rs512,
        SigAlg::Ps256,
        SigAlg::Ps384,
        SigAlg::Ps512,
    ];

    fn name(self) -> &'static str {
        match self {
            SigAlg::EdDsa => "EdDSA",
            SigAlg::Es256 => "ES256",
            SigAlg::Rs256 => "RS256",
            SigAlg::Rs384 => "RS384",
            SigAlg::Rs512 => "RS512",
            SigAlg::Ps256 => "PS256",
            SigAlg::Ps384 => "PS384",
            SigAlg::Ps512 => "PS512",
        }
    }

    /// Exact, case-sensitive match (RFC 7515 §4.1.1: `alg` is a case-sensitive string).
    fn from_name(name: &str) -> Option<SigAlg> {
        SigAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    fn rsa(self) -> Option<Rsa> {
        match self {
            SigAlg::Rs256 => Some(Rsa::rs256()),
            SigAlg::Rs384 => Some(Rsa::rs384()),
            SigAlg::Rs512 => Some(Rsa::rs512()),
            SigAlg::Ps256 => Some(Rsa::ps256()),
            SigAlg::Ps384 => Some(Rsa::ps384()),
            SigAlg::Ps512 => Some(Rsa::ps512()),
            SigAlg::EdDsa | SigAlg::Es256 => None,
        }
    }
}

/// A public key from a JWKS, with the one algorithm it verifies.
#[derive(Clone)]
enum PublicKey {
    Ed25519(Ed25519Key),
    Es256(Es256Key),
    Rsa(Rsa, RsaPublicKey),
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: SigAlg,
    public: PublicKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg.name()).finish_non_exhaustive()
    }
}

impl Key {
    /// Verifies `signature` over `message` with this key's own algorithm.
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.public {
            PublicKey::Ed25519(key) => check_signature(&Ed25519, key, message, signature),
            PublicKey::Es256(key) => check_signature(&Es256, key, message, signature),
            PublicKey::Rsa(alg, key) => check_signature(alg, key, message, signature),
        }
    }
}

/// Signature check through jwt-compact's `Algorithm`, with the length check its own validator
/// does first (some `try_from_slice` implementations assume the length is right).
fn check_signature<A: Algorithm>(alg: &A, key: &A::VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    if let Some(len) = <A::Signature as AlgorithmSignature>::LENGTH {
        if signature.len() != len.get() {
            return false;
        }
    }
    match <A::Signature as AlgorithmSignature>::try_from_slice(signature) {
        Ok(signature) => alg.verify_signature(&signature, key, message),
        Err(_) => false,
    }
}

// === impl Issuer ===

/// A trusted token issuer of the policy, compiled once per policy with its keys.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The exact `iss` claim of its tokens.
    pub issuer: String,
    /// Where non-empty, a token's `aud` must hold at least one of these.
    pub audiences: Vec<String>,
    /// The claim naming the app (default `azp`).
    pub app_claim: String,
    /// Tolerance for `exp`, `nbf` and `iat` (default 30, at most 600).
    pub clock_skew_seconds: i64,
    keys: Vec<Key>,
}

impl Issuer {
    /// Number of keys in its JWKS.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The algorithms its keys verify, one per key (e.g. `["EdDSA", "RS256"]`).
    pub fn algorithms(&self) -> Vec<&'static str> {
        self.keys.iter().map(|k| k.alg.name()).collect()
    }

    /// Checks the signature with the keys allowed for this header: the `kid`'s key only when the
    /// header names one, else every key whose algorithm is the header's.
    fn check_signature(
        &self,
        alg: SigAlg,
        kid: Option<&str>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), TokenError> {
        if let Some(kid) = kid {
            let key = self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| TokenError::UnknownKid(shown(kid)))?;
            if key.alg != alg {
                return Err(TokenError::AlgorithmMismatch { token: alg.name(), key: key.alg.name() });
            }
            return if key.verifies(message, signature) { Ok(()) } else { Err(TokenError::BadSignature) };
        }
        let mut candidates = self.keys.iter().filter(|k| k.alg == alg).peekable();
        if candidates.peek().is_none() {
            return Err(TokenError::NoKeyForAlgorithm(alg.name()));
        }
        if candidates.any(|k| k.verifies(message, signature)) {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }
}

/// Validates one `settings.identity.jwt[i]` entry (at `path`) and parses its JWKS.
/// Every unusable key is an error naming it; nothing is dropped silently.
pub fn compile_issuer(raw: &RawJwtIssuer, path: &str) -> Result<Issuer, Vec<PolicyError>> {
    let mut errors = Vec::new();
    if raw.issuer.trim().is_empty() {
        errors.push(PolicyError::new(
            format!("{path}.issuer"),
            "empty issuer; it must equal the `iss` claim of the tokens",
        ));
    }
    for (i, audience) in raw.audiences.iter().enumerate() {
        if audience.is_empty() {
            errors.push(PolicyError::new(format!("{path}.audiences[{i}]"), "empty audience"));
        } else if raw.audiences.iter().take(i).any(|a| a == audience) {
            errors.push(PolicyError::new(format!("{path}.audiences[{i}]"), format!("duplicate audience `{audience}`")));
        }
    }
    let app_claim = raw.app_claim.clone().unwrap_or_else(|| DEFAULT_APP_CLAIM.to_owned());
    if app_claim.trim().is_empty() {
        errors.push(PolicyError::new(format!("{path}.app_claim"), "empty claim name"));
    }
    let clock_skew_seconds = raw.clock_skew_seconds.unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS);
    if !(0..=MAX_CLOCK_SKEW_SECONDS).contains(&clock_skew_seconds) {
        errors.push(PolicyError::new(
            format!("{path}.clock_skew_seconds"),
            format!("must be between 0 and {MAX_CLOCK_SKEW_SECONDS} seconds, got {clock_skew_seconds}"),
        ));
    }

    let mut keys: Vec<Key> = Vec::new();
    let mut kid_index: HashMap<String, usize> = HashMap::new();
    for (i, jwk) in raw.jwks.keys.iter().enumerate() {
        let key_path = format!("{path}.jwks.keys[{i}]");
        match parse_jwk(jwk, &key_path) {
            Ok(key) => {
                if let Some(kid) = &key.kid {
                    if let Some(first) = kid_index.get(kid) {
                        errors.push(PolicyError::new(
                            format!("{key_path}.kid"),
                            format!("duplicate kid `{kid}` (also keys[{first}]); a kid names one key"),
                        ));
                        continue;
                    }
                    kid_index.insert(kid.clone(), i);
                }
                keys.push(key);
            }
            Err(e) => errors.push(e),
        }
    }
    if keys.is_empty() {
        let why = if raw.jwks.keys.is_empty() {
            "the JWKS has no keys"
        } else {
            "every key of the JWKS is refused (see above)"
        };
        errors.push(PolicyError::new(format!("{path}.jwks"), format!("no usable key: {why}")));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Issuer { issuer: raw.issuer.clone(), audiences: raw.audiences.clone(), app_claim, clock_skew_seconds, keys })
}

/// Members that only private (or symmetric) keys have.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Parses one public JWK (RFC 7517/7518/8037) into a key with its algorithm.
fn parse_jwk(value: &Value, path: &str) -> Result<Key, PolicyError> {
    let err = |field: &str, message: String| {
        let at = if field.is_empty() { path.to_owned() } else { format!("{path}.{field}") };
        PolicyError::new(at, message)
    };
    let Some(jwk) = value.as_object() else {
        return Err(err("", "a JWK must be an object".to_owned()));
    };
    let text = |field: &str| -> Result<Option<&str>, PolicyError> {
        match jwk.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(err(field, "must be a string".to_owned())),
        }
    };
    let required = |field: &str| -> Result<&str, PolicyError> {
        text(field)?.ok_or_else(|| err("", format!("missing `{field}`")))
    };
    let bytes = |field: &str| -> Result<Vec<u8>, PolicyError> {
        let encoded = required(field)?;
        Base64UrlUnpadded::decode_vec(encoded)
            .map_err(|_| err(field, "not base64url (unpadded, RFC 7515 §2)".to_owned()))
    };

    let kty = required("kty")?;
    if kty == "oct" {
        return Err(err(
            "kty",
            "symmetric keys (`kty: oct`) are refused: anyone who can read the policy could \
             mint tokens; use an asymmetric key (OKP/Ed25519, EC/P-256 or RSA)"
                .to_owned(),
        ));
    }
    if let Some(member) = PRIVATE_MEMBERS.into_iter().find(|m| jwk.contains_key(*m)) {
        return Err(err(
            member,
            format!(
                "private key material (`{member}`) in a JWKS: publish only the public key, \
                 and rotate this one"
            ),
        ));
    }
    if let Some(usage) = text("use")? {
        if usage != "sig" {
            let why = format!("a `use: {usage}` key cannot verify signatures; only `use: sig` keys belong here");
            return Err(err("use", why));
        }
    }
    if let Some(ops) = jwk.get("key_ops") {
        let Some(ops) = ops.as_array() else {
            return Err(err("key_ops", "must be a list of strings".to_owned()));
        };
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err(err("key_ops", "the key's `key_ops` do not include `verify`".to_owned()));
        }
    }
    let kid = match text("kid")? {
        Some("") => return Err(err("kid", "empty kid".to_owned())),
        kid => kid.map(str::to_owned),
    };
    let declared = text("alg")?;

    let (alg, public) = match kty {
        "OKP" => {
            let crv = required("crv")?;
            if crv != "Ed25519" {
                return Err(err("crv", format!("unsupported OKP curve `{crv}`; supported: Ed25519")));
            }
            let x = bytes("x")?;
            let jwk = JsonWebKey::KeyPair { curve: "Ed25519".into(), x: x.as_slice().into(), secret: None };
            let key = Ed25519Key::try_from(&jwk).map_err(|e| err("x", format!("not an Ed25519 public key: {e}")))?;
            key.validate().map_err(|_| {
                err("x", "not a valid Ed25519 public key (not a canonical point, or of small order)".to_owned())
            })?;
            (SigAlg::EdDsa, PublicKey::Ed25519(key))
        }
        "EC" => {
            let crv = required("crv")?;
            if crv != "P-256" {
                return Err(err("crv", format!("unsupported EC curve `{crv}`; supported: P-256")));
            }
            let (x, y) = (bytes("x")?, bytes("y")?);
            for (field, coordinate) in [("x", &x), ("y", &y)] {
                if coordinate.len() != 32 {
                    return Err(err(field, format!("a P-256 coordinate is 32 bytes, got {}", coordinate.len())));
                }
            }
            let jwk = JsonWebKey::EllipticCurve {
                curve: "P-256".into(),
                x: x.as_slice().into(),
                y: y.as_slice().into(),
                secret: None,
            };
            let key = Es256Key::try_from(&jwk)
                .map_err(|_| err("", "`x`/`y` is not a point on the P-256 curve".to_owned()))?;
            (SigAlg::Es256, PublicKey::Es256(key))
        }
        "RSA" => {
            let (n, e) = (bytes("n")?, bytes("e")?);
            let bits = bit_length(&n);
            if bits < MIN_RSA_BITS {
                return Err(err(
                    "n",
                    format!("RSA key of {bits} bits is too small; at least {MIN_RSA_BITS} are required"),
                ));
            }
            if bits > MAX_RSA_BITS {
                return Err(err("n", format!("RSA key of {bits} bits is not supported; at most {MAX_RSA_BITS}")));
            }
            let alg = match declared {
                None => SigAlg::Rs256,
                Some(name) => match SigAlg::from_name(name).filter(|a| a.rsa().is_some()) {
                    Some(alg) => alg,
                    None => {
                        return Err(err(
                            "alg",
                            format!(
                                "`alg: {name}` is not an RSA signature algorithm \
                                 (RS256, RS384, RS512, PS256, PS384, PS512)"
                            ),
                        ))
                    }
                },
            };
            let rsa = alg.rsa().ok_or_else(|| err("alg", "not an RSA algorithm".to_owned()))?;
            let jwk = JsonWebKey::Rsa {
                modulus: n.as_slice().into(),
                public_exponent: e.as_slice().into(),
                private_parts: None,
            };
            let key = RsaPublicKey::try_from(&jwk).map_err(|e| err("", format!("not a valid RSA public key: {e}")))?;
            (alg, PublicKey::Rsa(rsa, key))
        }
        other => {
            return Err(err(
                "kty",
                format!("unsupported key type `{other}`; supported: OKP (Ed25519), EC (P-256), RSA"),
            ));
        }
    };
    if let Some(name) = declared {
        if name != alg.name() {
            return Err(err(
                "alg",
                format!("`alg: {name}` does not match the key: a `{kty}` key of this kind verifies {}", alg.name()),
            ));
        }
    }
    Ok(Key { kid, alg, public })
}

/// Bits of a big-endian unsigned integer, leading zero bytes ignored.
fn bit_length(be: &[u8]) -> usize {
    let mut digits = be.iter().skip_while(|b| **b == 0);
    match digits.next() {
        None => 0,
        Some(first) => (8 - first.leading_zeros() as usize) + 8 * digits.count(),
    }
}

// === Verification ===

/// A token that passed [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// Index of its issuer in the issuers slice given to [`verify`].
    pub issuer: usize,
    /// Value of the issuer's `app_claim` (a non-empty string).
    pub app: String,
    /// Every claim of the token, as sent.
    pub claims: Map<String, Value>,
    pub exp: i64,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    /// The `scope` claim split on spaces (empty if absent).
    pub scopes: Vec<String>,
    /// The issuer's clock skew when it was verified, so a cached token is judged as `verify` would.
    pub clock_skew_seconds: i64,
    /// Where `app` was in the catalog when the token was cached: a hint that saves a lookup by id
    /// on later requests, used only if the app at that index still has that id.
    pub app_index: Option<usize>,
}

impl VerifiedToken {
    /// Whether the token is still within its lifetime at `now_secs`: `exp` (plus skew) not
    /// reached, and `nbf` (minus skew), if any, reached.
    pub fn is_valid_at(&self, now_secs: i64) -> bool {
        let skew = self.clock_skew_seconds;
        let not_expired = now_secs < self.exp.saturating_add(skew);
        let started = match self.nbf {
            Some(nbf) => now_secs.saturating_add(skew) >= nbf,
            None => true,
        };
        not_expired && started
    }
}

/// Why a token was refused. The messages are safe to show to the caller: untrusted values are
/// truncated and escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {max} bytes")]
    TooLarge { max: usize },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unsigned tokens (`alg: none`) are refused")]
    AlgNone,
    #[error("symmetric algorithm {0} is refused; tokens must be signed with a key of the issuer's JWKS")]
    SymmetricAlgorithm(String),
    #[error("unsupported algorithm {0}; supported: EdDSA, ES256, RS256/384/512, PS256/384/512")]
    UnsupportedAlgorithm(String),
    #[error("unsupported token type {0}; expected `JWT` or `at+jwt`")]
    UnsupportedType(String),
    #[error("critical header extension {0} is not understood")]
    CriticalHeader(String),
    #[error("token has no `iss` claim")]
    MissingIssuer,
    #[error("unknown issuer {0}")]
    UnknownIssuer(String),
    #[error("no key of the issuer has kid {0}")]
    UnknownKid(String),
    #[error("token algorithm {token} does not match the key's algorithm {key}")]
    AlgorithmMismatch { token: &'static str, key: &'static str },
    #[error("the issuer has no key for algorithm {0}")]
    NoKeyForAlgorithm(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("token has no `exp` claim")]
    MissingExp,
    #[error("invalid `{claim}` claim: {reason}")]
    InvalidClaim { claim: String, reason: &'static str },
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (`nbf`)")]
    NotYetValid,
    #[error("token issued in the future (`iat`)")]
    IssuedInFuture,
    #[error("token has no `aud` claim; the issuer requires one of its audiences")]
    MissingAudience,
    #[error("token audience is not one the issuer accepts")]
    WrongAudience,
    #[error("token has no non-empty string claim `{0}` naming the app")]
    MissingAppClaim(String),
}

/// The index of the configured issuer whose token `token` claims to be: a compact JWS whose
/// (unverified) payload has an `iss` naming one of `issuers`. `None` for anything else (another
/// kind of bearer, a JWT of another issuer), which is then not Guardrail's to judge. Only decodes.
pub fn claimed_issuer(issuers: &[Issuer], token: &str) -> Option<usize> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.is_empty() {
        return None;
    }
    let claims = decode_object(payload, "payload").ok()?;
    let iss = claims.get("iss")?.as_str()?;
    issuers.iter().position(|i| i.issuer == iss)
}

/// Verifies a compact JWS `token` against the policy's issuers at `now_secs` (Unix seconds).
///
/// The issuer is found by the (unverified) `iss` claim; the signature is then checked with that
/// issuer's keys only, and the claims (`exp` required, `nbf`, `iat`, `aud`, the app claim) only
/// after it holds.
pub fn verify(issuers: &[Issuer], token: &str, now_secs: i64) -> Result<VerifiedToken, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge { max: MAX_TOKEN_BYTES });
    }
    let mut parts = token.split('.');
    let (header_b64, payload_b64, signature_b64) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() => (h, p, s),
        _ => return Err(malformed("a JWT is three dot-separated base64url parts (header.payload.signature)")),
    };

    let header = decode_object(header_b64, "header")?;
    let alg = header_algorithm(&header)?;
    check_type(&header)?;
    if let Some(crit) = header.get("crit") {
        let names: Vec<&str> =
            crit.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        return Err(TokenError::CriticalHeader(shown(&names.join(","))));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(malformed("header `kid` must be a string")),
    };

    let claims = decode_object(payload_b64, "payload")?;
    let iss = match claims.get("iss") {
        None => return Err(TokenError::MissingIssuer),
        Some(Value::String(iss)) => iss.as_str(),
        Some(_) => return Err(invalid_claim("iss", "must be a string")),
    };
    let (index, issuer) = issuers
        .iter()
        .enumerate()
        .find(|(_, i)| i.issuer == iss)
        .ok_or_else(|| TokenError::UnknownIssuer(shown(iss)))?;

    if signature_b64.is_empty() {
        return Err(malformed("empty signature"));
    }
    let signature =
        Base64UrlUnpadded::decode_vec(signature_b64).map_err(|_| malformed("signature is not base64url"))?;
    let signing_input = token.get(..header_b64.len() + 1 + payload_b64.len()).ok_or_else(|| malformed("bad layout"))?;
    issuer.check_signature(alg, kid, signing_input.as_bytes(), &signature)?;

    // Authentic from here on: judge the claims.
    let skew = issuer.clock_skew_seconds;
    let exp = numeric_date(&claims, "exp", Rounding::Down)?.ok_or(TokenError::MissingExp)?;
    if now_secs >= exp.saturating_add(skew) {
        return Err(TokenError::Expired);
    }
    let nbf = numeric_date(&claims, "nbf", Rounding::Up)?;
    if nbf.is_some_and(|nbf| now_secs.saturating_add(skew) < nbf) {
        return Err(TokenError::NotYetValid);
    }
    let iat = numeric_date(&claims, "iat", Rounding::Down)?;
    if iat.is_some_and(|iat| iat > now_secs.saturating_add(skew)) {
        return Err(TokenError::IssuedInFuture);
    }
    check_audience(&claims, &issuer.audiences)?;
    let app = match claims.get(&issuer.app_claim) {
        Some(Value::String(app)) if !app.is_empty() => app.clone(),
        _ => return Err(TokenError::MissingAppClaim(issuer.app_claim.clone())),
    };
    let scopes = match claims.get("scope") {
        None => Vec::new(),
        Some(Value::String(scope)) => scope.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        Some(_) => return Err(invalid_claim("scope", "must be a space-separated string")),
    };

    Ok(VerifiedToken { issuer: index, app, claims, exp, iat, nbf, scopes, clock_skew_seconds: skew, app_index: None })
}

fn malformed(why: &str) -> TokenError {
    TokenError::Malformed(why.to_owned())
}

fn invalid_claim(claim: &str, reason: &'static str) -> TokenError {
    TokenError::InvalidClaim { claim: claim.to_owned(), reason }
}

/// An untrusted value as error messages show it: quoted, escaped, truncated.
fn shown(value: &str) -> String {
    let mut cut: String = value.chars().take(MAX_SHOWN_CHARS).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// The header's `alg`, refused unless it is one of the asymmetric algorithms we verify.
fn header_algorithm(header: &Map<String, Value>) -> Result<SigAlg, TokenError> {
    let name = match header.get("alg") {
        Some(Value::String(name)) => name.as_str(),
        Some(_) => return Err(malformed("header `alg` must be a string")),
        None => return Err(malformed("header has no `alg`")),
    };
    if name.eq_ignore_ascii_case("none") {
        return Err(TokenError::AlgNone);
    }
    if let Some(alg) = SigAlg::from_name(name) {
        return Ok(alg);
    }
    if name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("hs")) {
        return Err(TokenError::SymmetricAlgorithm(shown(name)));
    }
    Err(TokenError::UnsupportedAlgorithm(shown(name)))
}

/// `typ`, when present, must say JWT (RFC 7519 §5.1) or an access token (RFC 9068 §2.1).
fn check_type(header: &Map<String, Value>) -> Result<(), TokenError> {
    match header.get("typ") {
        None => Ok(()),
        Some(Value::String(typ)) => {
            let t = typ.strip_prefix("application/").unwrap_or(typ);
            if t.eq_ignore_ascii_case("jwt") || t.eq_ignore_ascii_case("at+jwt") {
                Ok(())
            } else {
                Err(TokenError::UnsupportedType(shown(typ)))
            }
        }
        Some(_) => Err(malformed("header `typ` must be a string")),
    }
}

fn check_audience(claims: &Map<String, Value>, accepted: &[String]) -> Result<(), TokenError> {
    let audiences: Vec<&str> = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => {
            let strings: Vec<&str> = auds.iter().filter_map(Value::as_str).collect();
            if strings.len() != auds.len() {
                return Err(invalid_claim("aud", "must be a string or a list of strings"));
            }
            strings
        }
        Some(_) => return Err(invalid_claim("aud", "must be a string or a list of strings")),
    };
    if accepted.is_empty() {
        return Ok(());
    }
    if audiences.is_empty() {
        return Err(TokenError::MissingAudience);
    }
    if audiences.iter().any(|aud| accepted.iter().any(|a| a == aud)) {
        Ok(())
    } else {
        Err(TokenError::WrongAudience)
    }
}

#[derive(Clone, Copy)]
enum Rounding {
    Down,
    Up,
}

/// A NumericDate claim (RFC 7519 §2): seconds, possibly fractional, in `0..=MAX_NUMERIC_DATE`.
/// Fractions are rounded towards refusal (`exp` down, `nbf` up).
fn numeric_date(claims: &Map<String, Value>, claim: &str, rounding: Rounding) -> Result<Option<i64>, TokenError> {
    let Some(value) = claims.get(claim) else {
        return Ok(None);
    };
    let Value::Number(n) = value else {
        return Err(invalid_claim(claim, "must be a number of seconds since the epoch"));
    };
    let out_of_range = || invalid_claim(claim, "out of range");
    let secs = if let Some(i) = n.as_i64() {
        i
    } else {
        let f = n.as_f64().ok_or_else(out_of_range)?;
        let f = match rounding {
            Rounding::Down => f.floor(),
            Rounding::Up => f.ceil(),
        };
        if !(0.0..=MAX_NUMERIC_DATE as f64).contains(&f) {
            return Err(out_of_range());
        }
        f as i64
    };
    if !(0..=MAX_NUMERIC_DATE).contains(&secs) {
        return Err(out_of_range());
    }
    Ok(Some(secs))
}

/// Decodes one base64url part into a JSON object, refusing non-UTF-8, non-objects and
/// duplicate keys at any depth (serde_json's `Map` would silently keep the last one).
fn decode_object(part: &str, what: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes =
        Base64UrlUnpadded::decode_vec(part).map_err(|_| TokenError::Malformed(format!("{what} is not base64url")))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| TokenError::Malformed(format!("{what} is not UTF-8")))?;
    match serde_json::from_str::<StrictValue>(text) {
        Ok(StrictValue(Value::Object(map))) => Ok(map),
        Ok(_) => Err(TokenError::Malformed(format!("{what} is not a JSON object"))),
        Err(e) => Err(TokenError::Malformed(format!("{what} is not valid JSON: {e}"))),
    }
}

/// A JSON value whose objects have no duplicate keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(deserializer).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {}", shown(&key))));
            }
            let StrictValue(value) = access.next_value()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

// === impl TokenCache ===

/// Per-worker cache of verified tokens, so a signature is checked once per token, not per request.
///
/// Found by a 64-bit fingerprint of the token (a seeded word-at-a-time hash: a SipHash of a
/// 1 KiB token costs more in wasm than the rest of the request), and a hit is only a hit when the
/// whole stored token equals the presented one. Only tokens that passed verification are ever
/// stored, so a crafted token can at most miss; two cached tokens sharing a fingerprint just
/// replace each other. Bounded: when full, expired entries go first (swept at most once per
/// `capacity / 2` inserts, so inserting stays O(1) amortised), else the oldest entry. An entry is
/// never returned once outside its lifetime (`exp` + skew, `nbf` − skew). Clear it whenever the
/// issuers change (indexes and keys are per policy).
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    seed: u64,
    entries: HashMap<u64, CacheEntry, BuildHasherDefault<Fingerprint>>,
    /// Insertion order (fingerprint, sequence number), oldest first. Records whose sequence number
    /// no longer matches their entry (replaced or removed) are stale and skipped; compacted when it
    /// grows too long.
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// The latest `now_secs` seen by `get`, to find expired entries when making room.
    last_now: i64,
    inserts_since_sweep: usize,
}

#[derive(Debug)]
struct CacheEntry {
    seq: u64,
    token: Box<str>,
    verified: Arc<VerifiedToken>,
}

/// The hasher of the fingerprint-keyed map: a fingerprint is already a hash.
#[derive(Debug, Default)]
struct Fingerprint(u64);

impl std::hash::Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `a == b`, eight bytes at a time (wasm's `memcmp` goes one byte at a time).
fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (wa.remainder(), wb.remainder());
    wa.zip(wb).all(|(x, y)| {
        let (mut p, mut q) = ([0u8; 8], [0u8; 8]);
        p.copy_from_slice(x);
        q.copy_from_slice(y);
        u64::from_ne_bytes(p) == u64::from_ne_bytes(q)
    }) && ra == rb
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (0 caches nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seed: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), capacity),
            entries: HashMap::with_capacity_and_hasher(capacity.min(1024), BuildHasherDefault::default()),
            order: VecDeque::new(),
            next_seq: 0,
            last_now: i64::MIN,
            inserts_since_sweep: 0,
        }
    }

    /// Returns the cached verification if present and still valid at `now_secs` (exp + the
    /// issuer's skew not passed, nbf ok), else None (and drops a stale entry).
    pub fn get(&mut self, token: &str, now_secs: i64) -> Option<Arc<VerifiedToken>> {
        self.last_now = self.last_now.max(now_secs);
        let fp = crate::fasthash::fingerprint(self.seed, token.as_bytes());
        let entry = self.entries.get(&fp).filter(|e| same_token(&e.token, token))?;
        if !entry.verified.is_valid_at(now_secs) {
            self.entries.remove(&fp);
            return None;
        }
        Some(Arc::clone(&entry.verified))
    }

    /// Caches a verification of `token` (replacing any earlier one, or one that shares its
    /// fingerprint), evicting if full. Returns the cached verification.
    pub fn insert(&mut self, token: &str, verified: VerifiedToken) -> Arc<VerifiedToken> {
        let verified = Arc::new(verified);
        if self.capacity == 0 || token.len() > MAX_TOKEN_BYTES {
            return verified;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.inserts_since_sweep = self.inserts_since_sweep.saturating_add(1);
        let fp = crate::fasthash::fingerprint(self.seed, token.as_bytes());
        if !self.entries.contains_key(&fp) {
            self.make_room();
        }
        self.order.push_back((fp, seq));
        self.entries.insert(fp, CacheEntry { seq, token: token.into(), verified: Arc::clone(&verified) });
        if self.order.len() > self.capacity.saturating_mul(2).saturating_add(16) {
            let entries = &self.entries;
            self.order.retain(|(fp, seq)| entries.get(fp).is_some_and(|e| e.seq == *seq));
        }
        verified
    }

    /// Forgets every token (call it when the policy, hence the issuers, change).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.inserts_since_sweep = 0;
    }

    /// Number of cached tokens (some may have expired since; `get` drops them).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes room for one more entry: expired ones first, else the oldest.
    fn make_room(&mut self) {
        if self.entries.len() < self.capacity {
            return;
        }
        if self.inserts_since_sweep >= (self.capacity / 2).max(1) {
            let now = self.last_now;
            self.entries.retain(|_, e| now < e.verified.exp.saturating_add(e.verified.clock_skew_seconds));
            self.inserts_since_sweep = 0;
        }
        while self.entries.len() >= self.capacity {
            let Some((fp, seq)) = self.order.pop_front() else {
                // Unreachable (every entry has a record), but never exceed the bound.
                self.entries.clear();
                break;
            };
            if self.entries.get(&fp).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&fp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jwt_compact::alg::{Hs256, Hs256Key, Hs512, Hs512Key, RsaPrivateKey, SigningKey as _};
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use serde_json::json;

    type TestResult = Result<(), String>;

    const NOW: i64 = 1_795_924_800; // 2026-11-29T04:00:00Z
    const ISS: &str = "https://idp.example.com";
    const OTHER_ISS: &str = "https://other.example.com";

    // A fixed RSA-2048 test key (generated once; signing only happens in tests), and the modulus
    // of an RSA-1024 key for the "too small" case.
    const RSA_N: &str = "rKyGWLS5qY_QtctuqZlDnh6JzRwCZgJJ4XzNKaQtx32fNbfVdW07M8eehYlaHkI5Gd2IGhdyrlxr24eQyen0-DA4b4adyoGEnohoIgIYX25KahoVji6ofa-mvesasnc688zUl9O4M9MF7lMPxNgXVY8pADgci_NDhPfWAY-y0YekIjhL1xR6IlKiw_tyXKvHRBVVD1v5SqwXMQe4DbLZm5x6G1pf420X2TeH0rygja9uoZc86dTTHApxlz0h3vvseTfW09myFhBporNp_2X4X6BM5306dt9mISaXivsxZdDr2eT9lRXwmKxMrVzXBmS0rv9F3dphdWCc9gdDct56JQ";
    const RSA_D: &str = "DhPlF8Yo4osxgHd6NB9lIkxKPvvDB0w1op8GlAKeYoavoap1Sk-nlWW3hcVoYJH_bp1_eznBAA2paSUQ4natoe6-fyXfZ0iZcRpdEQlmMXZAC2Keh3Bu4guyzAY8WjilyLArqfLZME0f9-meM2shteLy0bbWvviMNJhHF-qpBnOGcOtey7eclk_S828fSYCWeTM1BQIQrEugAzEbjsnmB2nbRPojVBWvylJ2Ov-5s9App6kyBSgPyynKdkdqyzZ66UMOKUDLzCOaaNP5aTprQmMYSjWKidcZ6Ok1rEhzrYLSLmOQ4dn5tSVSYNi4u84gdHlKTtjDiTuigNK-ARN8wQ";
    const RSA_P: &str = "7g56mw0MPfrggTUcAg2Z_4iX7w34GTDvetMHKH788btXw1NBnnMMLo2tKaqGFsI3e0JUvknycUH-ELlTpegCd-Xl0W_AlUP6Hfr06y_9hX1cmjl0-hWcWoRYFBgwTgn9SYZ5LSxtuVOqYD4mMwtFmThK6dtjV9Ioj_lEAJyVNeU";
    const RSA_Q: &str = "ubBtdoHtrUp6YSAgtGwgV75IuGBjbneK_6yoGTgB1fEdeA1i7_WQ_ESZ4H4hTazDXs3eZJdcJmfXUT9_25uPdpOBczYg0Ooes6scjlDtaQkAKTNXNAlDmbAueVjjz_vgzwvIxGQIShfkgA1vdfjFwxq5k4unnU3EV8njUZpP70E";
    const RSA_1024_N: &str = "2GnA_td16YRbj7RYfCJnB1IZC8XVsdXY9TwkLkBxTPr8PusKEGuG9RFZlMEihRHsB29OGfsC1tybFhff7_q87SP5q02ujHF-1Aeb3HIgz9LZ-nMp-NW7fechDkiQ0HHrDJyKgEJ-AMoSrlgGvxZZRbkx_loseoQEoWJ8QE1ezUU";

    // === Keys and tokens ===

    enum Signer {
        Ed(<Ed25519 as Algorithm>::SigningKey),
        Ec(<Es256 as Algorithm>::SigningKey),
        Rsa(Rsa, Box<RsaPrivateKey>),
        Hs256(Hs256Key),
        Hs512(Hs512Key),
        /// Appends no signature (for `alg: none`).
        Nothing,
    }

    impl Signer {
        fn sign(&self, message: &[u8]) -> Vec<u8> {
            match self {
                Signer::Ed(key) => Ed25519.sign(key, message).as_bytes().into_owned(),
                Signer::Ec(key) => Es256.sign(key, message).as_bytes().into_owned(),
                Signer::Rsa(alg, key) => alg.sign(key, message).as_bytes().into_owned(),
                Signer::Hs256(key) => Hs256.sign(key, message).as_bytes().into_owned(),
                Signer::Hs512(key) => Hs512.sign(key, message).as_bytes().into_owned(),
                Signer::Nothing => Vec::new(),
            }
        }
    }

    struct Keys {
        ed: Signer,
        ed_no_kid: Signer,
        ec: Signer,
        rs: Signer,
        ps: Signer,
        other: Signer,
        attacker: Signer,
        /// Public JWKs of the signers, with kids.
        ed_jwk: Value,
        ed_no_kid_jwk: Value,
        ec_jwk: Value,
        rsa_jwk: Value,
        other_jwk: Value,
        attacker_jwk: Value,
        /// Raw public key bytes of `ed` (what an algorithm-confusion attacker would HMAC with).
        ed_public_bytes: Vec<u8>,
    }

    fn ed_pair(rng: &mut ChaCha20Rng, kid: Option<&str>) -> Result<(Signer, Value, Vec<u8>), String> {
        let (secret, public) = Ed25519::generate(rng);
        let mut jwk = serde_json::to_value(JsonWebKey::from(&public)).map_err(|e| e.to_string())?;
        if let (Some(kid), Some(obj)) = (kid, jwk.as_object_mut()) {
            obj.insert("kid".into(), json!(kid));
        }
        Ok((Signer::Ed(secret), jwk, public.as_ref().to_vec()))
    }

    fn keys() -> Result<Keys, String> {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (ed, ed_jwk, ed_public_bytes) = ed_pair(&mut rng, Some("ed-1"))?;
        let (ed_no_kid, ed_no_kid_jwk, _) = ed_pair(&mut rng, None)?;
        let (other, other_jwk, _) = ed_pair(&mut rng, Some("other-1"))?;
        let (attacker, attacker_jwk, _) = ed_pair(&mut rng, Some("ed-1"))?;

        let mut scalar = [0_u8; 32];
        rng.fill_bytes(&mut scalar);
        let ec_secret = <<Es256 as Algorithm>::SigningKey as jwt_compact::alg::SigningKey<Es256>>::from_slice(&scalar)
            .map_err(|e| e.to_string())?;
        let ec_public = ec_secret.to_verifying_key();
        let mut ec_jwk = serde_json::to_value(JsonWebKey::from(&ec_public)).map_err(|e| e.to_string())?;
        if let Some(obj) = ec_jwk.as_object_mut() {
            obj.insert("kid".into(), json!("ec-1"));
            obj.insert("alg".into(), json!("ES256"));
            obj.insert("use".into(), json!("sig"));
        }

        let rsa_private: JsonWebKey<'static> =
            serde_json::from_value(json!({"kty": "RSA", "n": RSA_N, "e": "AQAB", "d": RSA_D, "p": RSA_P, "q": RSA_Q}))
                .map_err(|e| e.to_string())?;
        let rsa_key = RsaPrivateKey::try_from(&rsa_private).map_err(|e| e.to_string())?;
        let rsa_jwk = json!({"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": "rsa-1"});

        Ok(Keys {
            ed,
            ed_no_kid,
            ec: Signer::Ec(ec_secret),
            rs: Signer::Rsa(Rsa::rs256(), Box::new(rsa_key.clone())),
            ps: Signer::Rsa(Rsa::ps256(), Box::new(rsa_key)),
            other,
            attacker,
            ed_jwk,
            ed_no_kid_jwk,
            ec_jwk,
            rsa_jwk,
            other_jwk,
            attacker_jwk,
            ed_public_bytes,
        })
    }

    fn with(base: &Value, patch: Value) -> Value {
        let mut out = base.clone();
        if let (Some(out), Value::Object(patch)) = (out.as_object_mut(), patch) {
            for (k, v) in patch {
                if v.is_null() {
                    out.remove(&k);
                } else {
                    out.insert(k, v);
                }
            }
        }
        out
    }

    fn b64(bytes: &[u8]) -> String {
        Base64UrlUnpadded::encode_string(bytes)
    }

    fn raw_token(header: &str, claims: &str, signer: &Signer) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let signature = signer.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    fn token(header: Value, claims: &Value, signer: &Signer) -> String {
        raw_token(&header.to_string(), &claims.to_string(), signer)
    }

    fn claims() -> Value {
        json!({"iss": ISS, "aud": "guardrail", "azp": "app-1", "exp": NOW + 300, "iat": NOW, "scope": "dataset:payroll read"})
    }

    fn raw_issuer(value: Value) -> Result<RawJwtIssuer, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn issuers(k: &Keys) -> Result<Vec<Issuer>, String> {
        let mut ps_jwk = with(&k.rsa_jwk, json!({"kid": "ps-1", "alg": "PS256"}));
        if let Some(obj) = ps_jwk.as_object_mut() {
            obj.insert("key_ops".into(), json!(["verify"]));
        }
        let main = raw_issuer(json!({
            "issuer": ISS,
            "audiences": ["guardrail", "guardrail-alt"],
            "jwks": {"keys": [k.ed_jwk, k.ed_no_kid_jwk, k.ec_jwk, k.rsa_jwk, ps_jwk]},
        }))?;
        let other = raw_issuer(json!({
            "issuer": OTHER_ISS,
            "jwks": {"keys": [k.other_jwk]},
            "app_claim": "client_id",
            "clock_skew_seconds": 0,
        }))?;
        let compile = |raw: &RawJwtIssuer, path: &str| compile_issuer(raw, path).map_err(|e| format!("{e:?}"));
        Ok(vec![compile(&main, "settings.identity.jwt[0]")?, compile(&other, "settings.identity.jwt[1]")?])
    }

    enum Expect {
        Ok { issuer: usize, app: &'static str },
        Err(TokenError),
    }

    fn err_alg(name: &str) -> TokenError {
        TokenError::SymmetricAlgorithm(format!("{name:?}"))
    }

    // === Verification ===

    #[test]
    fn verify_table() -> TestResult {
        let k = keys()?;
        let issuers = issuers(&k)?;
        let c = claims();
        let ed = |claims: &Value| token(json!({"alg": "EdDSA", "kid": "ed-1", "typ": "JWT"}), claims, &k.ed);
        let valid_ed = ed(&c);
        let tampered = {
            let parts: Vec<&str> = valid_ed.split('.').collect();
            let other_payload = b64(with(&c, json!({"azp": "admin-app"})).to_string().as_bytes());
            format!(
                "{}.{}.{}",
                parts.first().copied().unwrap_or(""),
                other_payload,
                parts.get(2).copied().unwrap_or("")
            )
        };
        let other_claims = json!({"iss": OTHER_ISS, "client_id": "app-2", "exp": NOW + 60});
        let header_none = |alg: &str| token(json!({"alg": alg}), &c, &Signer::Nothing);
        let header_none_signed = |alg: &str| token(json!({"alg": alg, "kid": "ed-1"}), &c, &k.ed);
        let hs256 = Signer::Hs256(Hs256Key::new(&k.ed_public_bytes));
        let hs512 = Signer::Hs512(Hs512Key::new(RSA_N.as_bytes()));
        let too_long = format!("{}.{}.{}", "a".repeat(4000), "b".repeat(4000), "c".repeat(MAX_TOKEN_BYTES - 8001 + 1));
        let padded_claims = with(&c, json!({"pad": "x".repeat(MAX_TOKEN_BYTES)}));
        // A genuine token in parts, whose payload has characters only base64url spells `-`/`_`.
        let header_b64 = b64(br#"{"alg":"EdDSA","kid":"ed-1"}"#);
        let claims_b64 = b64(with(&c, json!({"note": "???>>>"})).to_string().as_bytes());
        let sig_b64 = b64(&k.ed.sign(format!("{header_b64}.{claims_b64}").as_bytes()));
        // The last character of an Ed25519 signature carries 4 padding bits: set one of them.
        let non_canonical_sig = {
            let mut chars: Vec<char> = sig_b64.chars().collect();
            if let Some(last) = chars.last_mut() {
                let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let index = alphabet.find(*last).unwrap_or(0);
                *last = alphabet.chars().nth(index ^ 1).unwrap_or('A');
            }
            chars.into_iter().collect::<String>()
        };
        let standard_alphabet = claims_b64.replace('-', "+").replace('_', "/");
        assert_ne!(standard_alphabet, claims_b64, "the payload must have url-only characters");
        let non_utf8 = format!("{}.{claims_b64}.{sig_b64}", b64(&[0xff, 0xfe, 0x7b]));
        let malformed = |m: &str| TokenError::Malformed(m.to_owned());
        let any_malformed = TokenError::Malformed(String::new()); // compared by variant only

        #[rustfmt::skip]
        let cases: Vec<(&str, String, i64, Expect)> = vec![
            // Each algorithm, the happy path.
            ("EdDSA with kid", valid_ed.clone(), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("EdDSA without kid: every EdDSA key is tried", token(json!({"alg": "EdDSA"}), &c, &k.ed_no_kid), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("EdDSA without kid, first key", token(json!({"alg": "EdDSA"}), &c, &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("ES256 with kid", token(json!({"alg": "ES256", "kid": "ec-1"}), &c, &k.ec), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("ES256 without kid", token(json!({"alg": "ES256"}), &c, &k.ec), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("RS256 with kid", token(json!({"alg": "RS256", "kid": "rsa-1"}), &c, &k.rs), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("RS256 without kid", token(json!({"alg": "RS256"}), &c, &k.rs), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("PS256 key declared with alg PS256", token(json!({"alg": "PS256", "kid": "ps-1"}), &c, &k.ps), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("second issuer, its own app claim", token(json!({"alg": "EdDSA", "kid": "other-1"}), &other_claims, &k.other), NOW, Expect::Ok { issuer: 1, app: "app-2" }),
            // typ
            ("typ jwt, any case", token(json!({"alg": "EdDSA", "typ": "jwt"}), &c, &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("typ at+jwt (RFC 9068)", token(json!({"alg": "EdDSA", "typ": "at+JWT"}), &c, &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("typ application/at+jwt", token(json!({"alg": "EdDSA", "typ": "application/at+jwt"}), &c, &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("typ of another kind of token", token(json!({"alg": "EdDSA", "typ": "dpop+jwt"}), &c, &k.ed), NOW, Expect::Err(TokenError::UnsupportedType("\"dpop+jwt\"".into()))),
            ("typ not a string", token(json!({"alg": "EdDSA", "typ": 1}), &c, &k.ed), NOW, Expect::Err(malformed("header `typ` must be a string"))),
            // Signatures
            ("payload changed after signing", tampered, NOW, Expect::Err(TokenError::BadSignature)),
            ("signed by a key not in the JWKS, claiming its kid", token(json!({"alg": "EdDSA", "kid": "ed-1"}), &c, &k.attacker), NOW, Expect::Err(TokenError::BadSignature)),
            ("signed by a key not in the JWKS, no kid", token(json!({"alg": "EdDSA"}), &c, &k.attacker), NOW, Expect::Err(TokenError::BadSignature)),
            ("embedded jwk/jku/x5u/x5c headers are ignored, never trusted", token(json!({"alg": "EdDSA", "jwk": k.attacker_jwk, "jku": "https://evil.example/jwks", "x5u": "https://evil.example/x5", "x5c": ["MIIB"]}), &c, &k.attacker), NOW, Expect::Err(TokenError::BadSignature)),
            ("jku on a genuine token is ignored", token(json!({"alg": "EdDSA", "kid": "ed-1", "jku": "https://evil.example/jwks"}), &c, &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("empty signature", format!("{header_b64}.{claims_b64}."), NOW, Expect::Err(malformed("empty signature"))),
            ("signature not base64url", format!("{header_b64}.{claims_b64}.!!!!"), NOW, Expect::Err(malformed("signature is not base64url"))),
            ("Ed25519 signature of the wrong length", format!("{header_b64}.{claims_b64}.{}", b64(&[1; 63])), NOW, Expect::Err(TokenError::BadSignature)),
            ("RS256 signature of the wrong length", format!("{}.{claims_b64}.{}", b64(br#"{"alg":"RS256"}"#), b64(&[1; 255])), NOW, Expect::Err(TokenError::BadSignature)),
            ("ES256 all-zero signature", format!("{}.{claims_b64}.{}", b64(br#"{"alg":"ES256"}"#), b64(&[0; 64])), NOW, Expect::Err(TokenError::BadSignature)),
            // alg none, in any spelling, signed or not
            ("alg none", header_none("none"), NOW, Expect::Err(TokenError::AlgNone)),
            ("alg None", header_none("None"), NOW, Expect::Err(TokenError::AlgNone)),
            ("alg NONE", header_none("NONE"), NOW, Expect::Err(TokenError::AlgNone)),
            ("alg nOnE", header_none("nOnE"), NOW, Expect::Err(TokenError::AlgNone)),
            ("alg none with a valid signature appended", header_none_signed("none"), NOW, Expect::Err(TokenError::AlgNone)),
            // Algorithm confusion
            ("HS256 keyed with the Ed25519 public key", token(json!({"alg": "HS256", "kid": "ed-1"}), &c, &hs256), NOW, Expect::Err(err_alg("HS256"))),
            ("HS256 without kid", token(json!({"alg": "HS256"}), &c, &hs256), NOW, Expect::Err(err_alg("HS256"))),
            ("hs256, lower case", token(json!({"alg": "hs256"}), &c, &hs256), NOW, Expect::Err(err_alg("hs256"))),
            ("HS512 keyed with the RSA modulus text", token(json!({"alg": "HS512", "kid": "rsa-1"}), &c, &hs512), NOW, Expect::Err(err_alg("HS512"))),
            ("ES256 header on the Ed25519 key's kid", token(json!({"alg": "ES256", "kid": "ed-1"}), &c, &k.ed), NOW, Expect::Err(TokenError::AlgorithmMismatch { token: "ES256", key: "EdDSA" })),
            ("RS256 header on the PS256 key's kid", token(json!({"alg": "RS256", "kid": "ps-1"}), &c, &k.rs), NOW, Expect::Err(TokenError::AlgorithmMismatch { token: "RS256", key: "PS256" })),
            ("ES256 header, Ed25519 signature, no kid: only ES256 keys are tried", token(json!({"alg": "ES256"}), &c, &k.ed), NOW, Expect::Err(TokenError::BadSignature)),
            ("ES256 header where the issuer has no ES256 key", token(json!({"alg": "ES256"}), &other_claims, &k.ec), NOW, Expect::Err(TokenError::NoKeyForAlgorithm("ES256"))),
            ("alg spelled in the wrong case", token(json!({"alg": "eddsa"}), &c, &k.ed), NOW, Expect::Err(TokenError::UnsupportedAlgorithm("\"eddsa\"".into()))),
            ("alg not supported", token(json!({"alg": "ES384"}), &c, &k.ec), NOW, Expect::Err(TokenError::UnsupportedAlgorithm("\"ES384\"".into()))),
            ("alg missing", token(json!({"kid": "ed-1"}), &c, &k.ed), NOW, Expect::Err(malformed("header has no `alg`"))),
            ("alg not a string", token(json!({"alg": ["EdDSA"]}), &c, &k.ed), NOW, Expect::Err(malformed("header `alg` must be a string"))),
            ("crit header", token(json!({"alg": "EdDSA", "crit": ["exp"], "exp": 1}), &c, &k.ed), NOW, Expect::Err(TokenError::CriticalHeader("\"exp\"".into()))),
            ("crit b64 (RFC 7797)", token(json!({"alg": "EdDSA", "crit": ["b64"], "b64": false}), &c, &k.ed), NOW, Expect::Err(TokenError::CriticalHeader("\"b64\"".into()))),
            // kid
            ("unknown kid", token(json!({"alg": "EdDSA", "kid": "nope"}), &c, &k.ed), NOW, Expect::Err(TokenError::UnknownKid("\"nope\"".into()))),
            ("kid not a string", token(json!({"alg": "EdDSA", "kid": 1}), &c, &k.ed), NOW, Expect::Err(malformed("header `kid` must be a string"))),
            // Issuers
            ("unknown issuer", ed(&with(&c, json!({"iss": "https://evil.example"}))), NOW, Expect::Err(TokenError::UnknownIssuer("\"https://evil.example\"".into()))),
            ("issuer differs by a trailing slash", ed(&with(&c, json!({"iss": format!("{ISS}/")}))), NOW, Expect::Err(TokenError::UnknownIssuer(format!("\"{ISS}/\"")))),
            ("no iss", ed(&with(&c, json!({"iss": null}))), NOW, Expect::Err(TokenError::MissingIssuer)),
            ("iss not a string", ed(&with(&c, json!({"iss": 1}))), NOW, Expect::Err(invalid_claim("iss", "must be a string"))),
            ("another issuer's key under this issuer's name", token(json!({"alg": "EdDSA", "kid": "other-1"}), &c, &k.other), NOW, Expect::Err(TokenError::UnknownKid("\"other-1\"".into()))),
            ("another issuer's key, no kid", token(json!({"alg": "EdDSA"}), &c, &k.other), NOW, Expect::Err(TokenError::BadSignature)),
            ("this issuer's key under another issuer's name", token(json!({"alg": "EdDSA", "kid": "ed-1"}), &other_claims, &k.ed), NOW, Expect::Err(TokenError::UnknownKid("\"ed-1\"".into()))),
            ("this issuer's key under another issuer's name, no kid", token(json!({"alg": "EdDSA"}), &other_claims, &k.ed), NOW, Expect::Err(TokenError::BadSignature)),
            // exp, with a 30 s skew (issuer 0) and none (issuer 1)
            ("exp in the past but within the skew", ed(&with(&c, json!({"exp": NOW - 29}))), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("exp + skew == now: expired", ed(&with(&c, json!({"exp": NOW - 30}))), NOW, Expect::Err(TokenError::Expired)),
            ("long expired", ed(&with(&c, json!({"exp": NOW - 3600}))), NOW, Expect::Err(TokenError::Expired)),
            ("no skew: exp == now is expired", token(json!({"alg": "EdDSA"}), &with(&other_claims, json!({"exp": NOW})), &k.other), NOW, Expect::Err(TokenError::Expired)),
            ("no skew: one second left", token(json!({"alg": "EdDSA"}), &with(&other_claims, json!({"exp": NOW + 1})), &k.other), NOW, Expect::Ok { issuer: 1, app: "app-2" }),
            ("fractional exp rounds down", ed(&with(&c, json!({"exp": (NOW - 30) as f64 + 0.9}))), NOW, Expect::Err(TokenError::Expired)),
            ("missing exp", ed(&with(&c, json!({"exp": null}))), NOW, Expect::Err(TokenError::MissingExp)),
            ("exp as a string", ed(&with(&c, json!({"exp": (NOW + 60).to_string()}))), NOW, Expect::Err(invalid_claim("exp", "must be a number of seconds since the epoch"))),
            ("exp negative", ed(&with(&c, json!({"exp": -1}))), NOW, Expect::Err(invalid_claim("exp", "out of range"))),
            ("exp beyond year 9999", ed(&with(&c, json!({"exp": 1e20}))), NOW, Expect::Err(invalid_claim("exp", "out of range"))),
            ("exp beyond u64", ed(&with(&c, json!({"exp": u64::MAX}))), NOW, Expect::Err(invalid_claim("exp", "out of range"))),
            // nbf and iat
            ("nbf == now + skew: valid", ed(&with(&c, json!({"nbf": NOW + 30}))), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("nbf one second beyond the skew", ed(&with(&c, json!({"nbf": NOW + 31}))), NOW, Expect::Err(TokenError::NotYetValid)),
            ("fractional nbf rounds up", ed(&with(&c, json!({"nbf": (NOW + 30) as f64 + 0.1}))), NOW, Expect::Err(TokenError::NotYetValid)),
            ("nbf not a number", ed(&with(&c, json!({"nbf": true}))), NOW, Expect::Err(invalid_claim("nbf", "must be a number of seconds since the epoch"))),
            ("iat == now + skew: valid", ed(&with(&c, json!({"iat": NOW + 30}))), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("iat in the future beyond the skew", ed(&with(&c, json!({"iat": NOW + 31}))), NOW, Expect::Err(TokenError::IssuedInFuture)),
            ("no iat is fine", ed(&with(&c, json!({"iat": null}))), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            // aud
            ("wrong aud", ed(&with(&c, json!({"aud": "someone-else"}))), NOW, Expect::Err(TokenError::WrongAudience)),
            ("aud list holding one accepted audience", ed(&with(&c, json!({"aud": ["x", "guardrail-alt"]}))), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("aud list without an accepted audience", ed(&with(&c, json!({"aud": ["x", "y"]}))), NOW, Expect::Err(TokenError::WrongAudience)),
            ("aud differs in case", ed(&with(&c, json!({"aud": "Guardrail"}))), NOW, Expect::Err(TokenError::WrongAudience)),
            ("no aud where audiences are configured", ed(&with(&c, json!({"aud": null}))), NOW, Expect::Err(TokenError::MissingAudience)),
            ("empty aud list", ed(&with(&c, json!({"aud": []}))), NOW, Expect::Err(TokenError::MissingAudience)),
            ("aud of the wrong type", ed(&with(&c, json!({"aud": ["guardrail", 1]}))), NOW, Expect::Err(invalid_claim("aud", "must be a string or a list of strings"))),
            ("no audiences configured: any aud", token(json!({"alg": "EdDSA"}), &with(&other_claims, json!({"aud": "anything"})), &k.other), NOW, Expect::Ok { issuer: 1, app: "app-2" }),
            ("no audiences configured: no aud", token(json!({"alg": "EdDSA"}), &other_claims, &k.other), NOW, Expect::Ok { issuer: 1, app: "app-2" }),
            // app claim and scope
            ("no azp", ed(&with(&c, json!({"azp": null}))), NOW, Expect::Err(TokenError::MissingAppClaim("azp".into()))),
            ("empty azp", ed(&with(&c, json!({"azp": ""}))), NOW, Expect::Err(TokenError::MissingAppClaim("azp".into()))),
            ("azp not a string", ed(&with(&c, json!({"azp": ["app-1"]}))), NOW, Expect::Err(TokenError::MissingAppClaim("azp".into()))),
            ("azp where the issuer names the app by client_id", token(json!({"alg": "EdDSA"}), &with(&other_claims, json!({"client_id": null, "azp": "app-2"})), &k.other), NOW, Expect::Err(TokenError::MissingAppClaim("client_id".into()))),
            ("scope not a string", ed(&with(&c, json!({"scope": ["dataset:payroll"]}))), NOW, Expect::Err(invalid_claim("scope", "must be a space-separated string"))),
            // Size
            ("one byte over the limit, garbage", too_long, NOW, Expect::Err(TokenError::TooLarge { max: MAX_TOKEN_BYTES })),
            ("validly signed but too large", ed(&padded_claims), NOW, Expect::Err(TokenError::TooLarge { max: MAX_TOKEN_BYTES })),
            // Garbage
            ("empty", String::new(), NOW, Expect::Err(any_malformed.clone())),
            ("a dot", ".".into(), NOW, Expect::Err(any_malformed.clone())),
            ("two dots", "..".into(), NOW, Expect::Err(any_malformed.clone())),
            ("two parts", "a.b".into(), NOW, Expect::Err(any_malformed.clone())),
            ("four parts", "a.b.c.d".into(), NOW, Expect::Err(any_malformed.clone())),
            ("five parts (JWE)", format!("{header_b64}.{claims_b64}.{sig_b64}.a.b"), NOW, Expect::Err(any_malformed.clone())),
            ("not base64", "!!!.###.$$$".into(), NOW, Expect::Err(any_malformed.clone())),
            ("base64 but not JSON", "YWJj.YWJj.YWJj".into(), NOW, Expect::Err(any_malformed.clone())),
            ("padded base64", format!("{}=.{claims_b64}.{sig_b64}", b64(br#"{"alg":"EdDSA","kid":"ed-1"}"#)), NOW, Expect::Err(any_malformed.clone())),
            ("the parts, put together, verify", format!("{header_b64}.{claims_b64}.{sig_b64}"), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
            ("signature in non-canonical base64 (padding bits set)", format!("{header_b64}.{claims_b64}.{non_canonical_sig}"), NOW, Expect::Err(any_malformed.clone())),
            ("standard base64 alphabet", format!("{header_b64}.{standard_alphabet}.{sig_b64}"), NOW, Expect::Err(any_malformed.clone())),
            ("whitespace inside", format!("{header_b64} .{claims_b64}.{sig_b64}"), NOW, Expect::Err(any_malformed.clone())),
            ("header not UTF-8", non_utf8, NOW, Expect::Err(malformed("header is not UTF-8"))),
            ("header a JSON array", raw_token("[1]", &c.to_string(), &k.ed), NOW, Expect::Err(malformed("header is not a JSON object"))),
            ("header JSON null", raw_token("null", &c.to_string(), &k.ed), NOW, Expect::Err(malformed("header is not a JSON object"))),
            ("header with trailing text", raw_token(r#"{"alg":"EdDSA"} x"#, &c.to_string(), &k.ed), NOW, Expect::Err(any_malformed.clone())),
            ("payload a JSON string", raw_token(r#"{"alg":"EdDSA"}"#, r#""claims""#, &k.ed), NOW, Expect::Err(malformed("payload is not a JSON object"))),
            ("payload with a lone surrogate", raw_token(r#"{"alg":"EdDSA"}"#, r#"{"iss":"\ud800"}"#, &k.ed), NOW, Expect::Err(any_malformed.clone())),
            // Duplicate keys: serde_json would keep the last one silently
            ("duplicate alg in the header", raw_token(r#"{"alg":"EdDSA","alg":"none"}"#, &c.to_string(), &k.ed), NOW, Expect::Err(any_malformed.clone())),
            ("duplicate kid in the header", raw_token(r#"{"alg":"EdDSA","kid":"nope","kid":"ed-1"}"#, &c.to_string(), &k.ed), NOW, Expect::Err(any_malformed.clone())),
            ("duplicate azp in the claims", raw_token(r#"{"alg":"EdDSA"}"#, &format!(r#"{{"iss":"{ISS}","aud":"guardrail","exp":{},"azp":"app-1","azp":"admin"}}"#, NOW + 60), &k.ed), NOW, Expect::Err(any_malformed.clone())),
            ("duplicate key in a nested claim", raw_token(r#"{"alg":"EdDSA"}"#, &format!(r#"{{"iss":"{ISS}","aud":"guardrail","exp":{},"azp":"app-1","ctx":{{"role":"a","role":"b"}}}}"#, NOW + 60), &k.ed), NOW, Expect::Err(any_malformed.clone())),
            ("same key in different objects is fine", raw_token(r#"{"alg":"EdDSA"}"#, &format!(r#"{{"iss":"{ISS}","aud":"guardrail","exp":{},"azp":"app-1","a":{{"azp":1}},"b":[{{"azp":2}},{{"azp":3}}]}}"#, NOW + 60), &k.ed), NOW, Expect::Ok { issuer: 0, app: "app-1" }),
        ];

        let mut failures = Vec::new();
        for (message, token, now, expect) in &cases {
            let got = verify(&issuers, token, *now);
            let ok = match (expect, &got) {
                (Expect::Ok { issuer, app }, Ok(v)) => v.issuer == *issuer && v.app == *app,
                (Expect::Err(TokenError::Malformed(want)), Err(TokenError::Malformed(got))) => {
                    want.is_empty() || want == got
                }
                (Expect::Err(want), Err(got)) => want == got,
                _ => false,
            };
            if !ok {
                failures.push(format!("{message}: got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
        Ok(())
    }

    #[test]
    fn verified_token_fields() -> TestResult {
        let k = keys()?;
        let issuers = issuers(&k)?;
        let c = with(&claims(), json!({"scope": " dataset:payroll  read ", "nbf": NOW - 5}));
        let v = verify(&issuers, &token(json!({"alg": "ES256", "kid": "ec-1"}), &c, &k.ec), NOW)
            .map_err(|e| e.to_string())?;
        assert_eq!(v.issuer, 0, "issuer index");
        assert_eq!(v.app, "app-1", "app from azp");
        assert_eq!(v.exp, NOW + 300, "exp");
        assert_eq!(v.iat, Some(NOW), "iat");
        assert_eq!(v.nbf, Some(NOW - 5), "nbf");
        assert_eq!(v.scopes, vec!["dataset:payroll".to_owned(), "read".to_owned()], "scope split on spaces");
        assert_eq!(v.clock_skew_seconds, 30, "default skew");
        assert_eq!(v.claims.get("aud"), Some(&json!("guardrail")), "all claims kept");

        let no_scope = with(&claims(), json!({"scope": null}));
        let v = verify(&issuers, &token(json!({"alg": "EdDSA"}), &no_scope, &k.ed), NOW).map_err(|e| e.to_string())?;
        assert!(v.scopes.is_empty(), "no scope claim, no scopes");
        Ok(())
    }

    #[test]
    fn error_messages_are_readable_and_bounded() {
        let long = "x".repeat(500);
        let e = TokenError::UnknownIssuer(shown(&format!("{long}\n\u{1b}[31m")));
        let text = e.to_string();
        assert!(text.len() < 100, "untrusted text is truncated: {text}");
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "control characters are escaped: {text}");
        assert_eq!(TokenError::AlgNone.to_string(), "unsigned tokens (`alg: none`) are refused", "alg none");
        assert_eq!(TokenError::Expired.to_string(), "token expired", "expired");
        assert_eq!(
            TokenError::AlgorithmMismatch { token: "ES256", key: "EdDSA" }.to_string(),
            "token algorithm ES256 does not match the key's algorithm EdDSA",
            "mismatch"
        );
    }

    // === Compiling issuers ===

    /// (message, raw issuer, expected first error as (path, message fragment), or None for ok)
    type CompileCase = (&'static str, Value, Option<(&'static str, &'static str)>);

    #[test]
    fn compile_table() -> TestResult {
        let k = keys()?;
        let ed = k.ed_jwk.clone();
        let ec = k.ec_jwk.clone();
        let rsa = k.rsa_jwk.clone();
        let base = json!({"issuer": ISS, "audiences": ["guardrail"], "jwks": {"keys": [ed]}});
        let keys_of = |keys: Value| with(&base, json!({"jwks": {"keys": keys}}));
        let p = "settings.identity.jwt[0]";

        #[rustfmt::skip]
        let cases: Vec<CompileCase> = vec![
            ("Ed25519, EC P-256 and RSA keys", keys_of(json!([ed, ec, rsa])), None),
            ("keys without kid", keys_of(json!([with(&ed, json!({"kid": null})), with(&ec, json!({"kid": null}))])), None),
            ("unknown JWK members are ignored (RFC 7517 §4)", keys_of(json!([with(&ed, json!({"x5t": "abc", "ext": true}))])), None),
            ("skew 0 and no audiences", with(&base, json!({"clock_skew_seconds": 0, "audiences": []})), None),
            ("skew 600", with(&base, json!({"clock_skew_seconds": 600})), None),
            ("RSA with alg RS512", keys_of(json!([with(&rsa, json!({"alg": "RS512"}))])), None),
            ("no keys", keys_of(json!([])), Some(("settings.identity.jwt[0].jwks", "no usable key"))),
            ("empty issuer", with(&base, json!({"issuer": ""})), Some(("settings.identity.jwt[0].issuer", "empty issuer"))),
            ("blank issuer", with(&base, json!({"issuer": "  "})), Some(("settings.identity.jwt[0].issuer", "empty issuer"))),
            ("duplicate kid", keys_of(json!([ed, with(&ec, json!({"kid": "ed-1"}))])), Some(("settings.identity.jwt[0].jwks.keys[1].kid", "duplicate kid `ed-1`"))),
            ("empty kid", keys_of(json!([with(&ed, json!({"kid": ""}))])), Some(("settings.identity.jwt[0].jwks.keys[0].kid", "empty kid"))),
            ("Ed25519 private key", keys_of(json!([with(&ed, json!({"d": b64(&[7; 32])}))])), Some(("settings.identity.jwt[0].jwks.keys[0].d", "private key material"))),
            ("EC private key", keys_of(json!([ed, with(&ec, json!({"d": b64(&[7; 32])}))])), Some(("settings.identity.jwt[0].jwks.keys[1].d", "private key material"))),
            ("RSA private key", keys_of(json!([with(&rsa, json!({"d": RSA_D, "p": RSA_P, "q": RSA_Q}))])), Some(("settings.identity.jwt[0].jwks.keys[0].d", "private key material"))),
            ("symmetric key", keys_of(json!([{"kty": "oct", "k": b64(b"secret-secret-secret-secret-1234")}])), Some(("settings.identity.jwt[0].jwks.keys[0].kty", "symmetric keys"))),
            ("OKP Ed448", keys_of(json!([with(&ed, json!({"crv": "Ed448"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].crv", "unsupported OKP curve `Ed448`"))),
            ("OKP X25519 (an encryption curve)", keys_of(json!([with(&ed, json!({"crv": "X25519"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].crv", "unsupported OKP curve"))),
            ("EC P-384", keys_of(json!([with(&ec, json!({"crv": "P-384", "alg": null}))])), Some(("settings.identity.jwt[0].jwks.keys[0].crv", "unsupported EC curve `P-384`"))),
            ("EC secp256k1", keys_of(json!([with(&ec, json!({"crv": "secp256k1", "alg": null}))])), Some(("settings.identity.jwt[0].jwks.keys[0].crv", "unsupported EC curve"))),
            ("RSA 1024", keys_of(json!([with(&rsa, json!({"n": RSA_1024_N}))])), Some(("settings.identity.jwt[0].jwks.keys[0].n", "1024 bits is too small"))),
            ("RSA modulus with leading zeros still counted right", keys_of(json!([with(&rsa, json!({"n": b64(&[&[0_u8, 0][..], &Base64UrlUnpadded::decode_vec(RSA_1024_N).unwrap_or_default()].concat())}))])), Some(("settings.identity.jwt[0].jwks.keys[0].n", "1024 bits"))),
            ("RSA even exponent", keys_of(json!([with(&rsa, json!({"e": "AQAA"}))])), Some(("settings.identity.jwt[0].jwks.keys[0]", "not a valid RSA public key"))),
            ("x not base64url", keys_of(json!([with(&ed, json!({"x": "not base64!"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].x", "not base64url"))),
            ("x padded", keys_of(json!([with(&ed, json!({"x": format!("{}=", ed.get("x").and_then(Value::as_str).unwrap_or(""))}))])), Some(("settings.identity.jwt[0].jwks.keys[0].x", "not base64url"))),
            ("x of the wrong length", keys_of(json!([with(&ed, json!({"x": b64(&[9; 31])}))])), Some(("settings.identity.jwt[0].jwks.keys[0].x", "not an Ed25519 public key"))),
            ("Ed25519 small-order point", keys_of(json!([with(&ed, json!({"x": b64(&[&[1_u8][..], &[0; 31]].concat())}))])), Some(("settings.identity.jwt[0].jwks.keys[0].x", "not a valid Ed25519 public key"))),
            ("EC point not on the curve", keys_of(json!([with(&ec, json!({"x": b64(&[1; 32]), "y": b64(&[1; 32])}))])), Some(("settings.identity.jwt[0].jwks.keys[0]", "not a point on the P-256 curve"))),
            ("EC coordinate too short", keys_of(json!([with(&ec, json!({"y": b64(&[1; 31])}))])), Some(("settings.identity.jwt[0].jwks.keys[0].y", "32 bytes"))),
            ("missing kty", keys_of(json!([with(&ed, json!({"kty": null}))])), Some(("settings.identity.jwt[0].jwks.keys[0]", "missing `kty`"))),
            ("missing x", keys_of(json!([with(&ed, json!({"x": null}))])), Some(("settings.identity.jwt[0].jwks.keys[0]", "missing `x`"))),
            ("unknown kty", keys_of(json!([with(&ed, json!({"kty": "XYZ"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].kty", "unsupported key type `XYZ`"))),
            ("key not an object", keys_of(json!(["ed25519"])), Some(("settings.identity.jwt[0].jwks.keys[0]", "must be an object"))),
            ("kty not a string", keys_of(json!([with(&ed, json!({"kty": 1}))])), Some(("settings.identity.jwt[0].jwks.keys[0].kty", "must be a string"))),
            ("Ed25519 key declaring ES256", keys_of(json!([with(&ed, json!({"alg": "ES256"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].alg", "does not match the key"))),
            ("EC key declaring RS256", keys_of(json!([with(&ec, json!({"alg": "RS256"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].alg", "does not match the key"))),
            ("EC key declaring none", keys_of(json!([with(&ec, json!({"alg": "none"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].alg", "does not match the key"))),
            ("RSA key declaring HS256", keys_of(json!([with(&rsa, json!({"alg": "HS256"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].alg", "not an RSA signature algorithm"))),
            ("encryption key", keys_of(json!([with(&ed, json!({"use": "enc"}))])), Some(("settings.identity.jwt[0].jwks.keys[0].use", "`use: enc`"))),
            ("key_ops without verify", keys_of(json!([with(&ed, json!({"key_ops": ["encrypt"]}))])), Some(("settings.identity.jwt[0].jwks.keys[0].key_ops", "do not include `verify`"))),
            ("skew 601", with(&base, json!({"clock_skew_seconds": 601})), Some(("settings.identity.jwt[0].clock_skew_seconds", "between 0 and 600"))),
            ("negative skew", with(&base, json!({"clock_skew_seconds": -1})), Some(("settings.identity.jwt[0].clock_skew_seconds", "between 0 and 600"))),
            ("empty app claim", with(&base, json!({"app_claim": ""})), Some(("settings.identity.jwt[0].app_claim", "empty claim name"))),
            ("empty audience", with(&base, json!({"audiences": [""]})), Some(("settings.identity.jwt[0].audiences[0]", "empty audience"))),
            ("duplicate audience", with(&base, json!({"audiences": ["a", "a"]})), Some(("settings.identity.jwt[0].audiences[1]", "duplicate audience"))),
        ];

        let mut failures = Vec::new();
        for (message, raw, expect) in &cases {
            let raw = raw_issuer(raw.clone())?;
            let got = compile_issuer(&raw, p);
            let ok = match (expect, &got) {
                (None, Ok(_)) => true,
                (Some((path, fragment)), Err(errors)) => {
                    errors.first().is_some_and(|e| e.path == *path && e.message.contains(fragment))
                }
                _ => false,
            };
            if !ok {
                failures.push(format!("{message}: got {:?}", got.map(|i| i.algorithms())));
            }
        }
        assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
        Ok(())
    }

    #[test]
    fn compile_defaults_and_every_error() -> TestResult {
        let k = keys()?;
        let raw = raw_issuer(json!({"issuer": ISS, "jwks": {"keys": [k.ed_jwk, k.ec_jwk, k.rsa_jwk]}}))?;
        let issuer = compile_issuer(&raw, "jwt[0]").map_err(|e| format!("{e:?}"))?;
        assert_eq!(issuer.app_claim, "azp", "default app claim");
        assert_eq!(issuer.clock_skew_seconds, 30, "default skew");
        assert!(issuer.audiences.is_empty(), "no audiences");
        assert_eq!(issuer.algorithms(), vec!["EdDSA", "ES256", "RS256"], "algorithm from each key");

        // Every problem is reported, not only the first; unusable keys also leave no usable key.
        let raw = raw_issuer(json!({
            "issuer": "",
            "clock_skew_seconds": 9999,
            "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}, with(&k.ed_jwk, json!({"crv": "Ed448"}))]},
        }))?;
        let errors = compile_issuer(&raw, "jwt[0]").err().unwrap_or_default();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "jwt[0].issuer",
                "jwt[0].clock_skew_seconds",
                "jwt[0].jwks.keys[0].kty",
                "jwt[0].jwks.keys[1].crv",
                "jwt[0].jwks"
            ],
            "all errors, in document order: {errors:?}"
        );
        Ok(())
    }

    // === Properties: no panic, no forgery by mutation ===

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_verifies(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let text = String::from_utf8_lossy(&bytes);
            let issuers = issuers(&keys().map_err(proptest::test_runner::TestCaseError::fail)?).map_err(proptest::test_runner::TestCaseError::fail)?;
            proptest::prop_assert!(verify(&issuers, &text, NOW).is_err());
            // Arbitrary base64url parts around a plausible header.
            let forged = format!("{}.{}.{}", b64(br#"{"alg":"EdDSA"}"#), b64(&bytes), b64(&bytes));
            proptest::prop_assert!(verify(&issuers, &forged, NOW).is_err());
        }

        #[test]
        fn one_changed_character_never_verifies(position in 0usize..2000, replacement in 0usize..64) {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let k = keys().map_err(proptest::test_runner::TestCaseError::fail)?;
            let issuers = issuers(&k).map_err(proptest::test_runner::TestCaseError::fail)?;
            let original = token(json!({"alg": "EdDSA", "kid": "ed-1"}), &claims(), &k.ed);
            let mut bytes = original.clone().into_bytes();
            let position = position % bytes.len();
            let new = ALPHABET.get(replacement).copied().unwrap_or(b'A');
            if let Some(b) = bytes.get_mut(position) {
                if *b != b'.' {
                    *b = new;
                }
            }
            let mutated = String::from_utf8(bytes).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let result = verify(&issuers, &mutated, NOW);
            proptest::prop_assert!(mutated == original || result.is_err(), "{} verified: {:?}", mutated, result);
        }
    }

    // === TokenCache ===

    fn verified(exp: i64, nbf: Option<i64>, skew: i64) -> VerifiedToken {
        VerifiedToken {
            issuer: 0,
            app: "app-1".into(),
            claims: Map::new(),
            exp,
            iat: None,
            nbf,
            scopes: Vec::new(),
            clock_skew_seconds: skew,
            app_index: None,
        }
    }

    #[test]
    fn cache_hit_and_miss() {
        let mut cache = TokenCache::new(8);
        assert!(cache.get("t1", NOW).is_none(), "empty cache misses");
        cache.insert("t1", verified(NOW + 60, None, 30));
        assert_eq!(cache.get("t1", NOW).map(|v| v.exp), Some(NOW + 60), "hit after insert");
        assert!(cache.get("t1x", NOW).is_none(), "a different token misses");
        assert!(cache.get("t", NOW).is_none(), "a prefix misses");
        assert_eq!(cache.len(), 1, "one entry");
        cache.insert("t1", verified(NOW + 90, None, 30));
        assert_eq!((cache.len(), cache.get("t1", NOW).map(|v| v.exp)), (1, Some(NOW + 90)), "re-insert replaces");
        cache.clear();
        assert!(cache.is_empty() && cache.get("t1", NOW).is_none(), "clear forgets");
    }

    #[test]
    fn cache_never_returns_expired_or_early_tokens() {
        #[rustfmt::skip]
        let cases: Vec<(&str, VerifiedToken, i64, bool)> = vec![
            ("well before exp", verified(NOW + 60, None, 30), NOW, true),
            ("last second of the skew", verified(NOW, None, 30), NOW + 29, true),
            ("exp + skew reached", verified(NOW, None, 30), NOW + 30, false),
            ("no skew: exp reached", verified(NOW, None, 0), NOW, false),
            ("nbf within skew", verified(NOW + 60, Some(NOW + 30), 30), NOW, true),
            ("nbf beyond skew (clock went back)", verified(NOW + 60, Some(NOW + 31), 30), NOW, false),
            ("exp at the end of time", verified(i64::MAX, None, 600), NOW, true),
        ];
        for (message, v, now, hit) in cases {
            let mut cache = TokenCache::new(4);
            cache.insert("t", v);
            assert_eq!(cache.get("t", now).is_some(), hit, "{message}");
            assert_eq!(cache.len(), usize::from(hit), "{message}: a stale entry is dropped");
        }
    }

    #[test]
    fn cache_agrees_with_verify_at_the_skew_boundary() -> TestResult {
        let k = keys()?;
        let issuers = issuers(&k)?;
        let t = token(json!({"alg": "EdDSA"}), &with(&claims(), json!({"exp": NOW - 29})), &k.ed);
        let mut cache = TokenCache::new(4);
        let v = verify(&issuers, &t, NOW).map_err(|e| e.to_string())?;
        cache.insert(&t, v);
        assert!(cache.get(&t, NOW).is_some(), "verified at NOW, so cached at NOW");
        assert!(cache.get(&t, NOW + 1).is_none(), "expired one second later, like verify");
        assert_eq!(verify(&issuers, &t, NOW + 1), Err(TokenError::Expired), "verify agrees");
        Ok(())
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = TokenCache::new(4);
        for i in 0..100 {
            cache.insert(&format!("t{i}"), verified(NOW + 60, None, 30));
            assert!(cache.len() <= 4, "never more than capacity (after {i})");
        }
        assert!(cache.get("t99", NOW).is_some(), "the newest is kept");
        assert!(cache.get("t0", NOW).is_none(), "the oldest is gone");
        for _ in 0..1000 {
            cache.insert("same", verified(NOW + 60, None, 30));
        }
        assert!(cache.order.len() <= 2 * 4 + 16 + 1, "insertion order stays bounded too: {}", cache.order.len());
        assert!(cache.get("same", NOW).is_some(), "re-inserted token kept");

        let mut none = TokenCache::new(0);
        none.insert("t", verified(NOW + 60, None, 30));
        assert!(none.is_empty(), "capacity 0 caches nothing");

        let mut cache = TokenCache::new(4);
        cache.insert(&"x".repeat(MAX_TOKEN_BYTES + 1), verified(NOW + 60, None, 30));
        assert!(cache.is_empty(), "oversized tokens are never cached");
    }

    #[test]
    fn cache_evicts_expired_before_oldest() {
        let mut cache = TokenCache::new(3);
        cache.insert("old-but-valid", verified(NOW + 600, None, 0));
        cache.insert("expires-soon", verified(NOW + 10, None, 0));
        cache.insert("valid", verified(NOW + 600, None, 0));
        assert!(cache.get("valid", NOW + 20).is_some(), "the clock moves on");
        cache.insert("new", verified(NOW + 600, None, 0));
        assert_eq!(cache.len(), 3, "bounded");
        for kept in ["old-but-valid", "valid", "new"] {
            assert!(cache.get(kept, NOW + 20).is_some(), "{kept} kept: the expired entry went first");
        }
    }
}
