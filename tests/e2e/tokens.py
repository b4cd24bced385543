"""JWT test helpers: signing keys (Ed25519, P-256, RSA-2048) with their public JWKs, tokens signed
with PyJWT, and hand-crafted hostile tokens that no honest library would produce.

    key = SigningKey.ed25519("k-ed")
    policy["settings"]["identity"]["jwt"][0]["jwks"] = {"keys": [key.jwk()]}
    token = key.sign(claims(iss=ISSUER, aud=AUDIENCE, azp="my-app"))
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int, length: int | None = None) -> bytes:
    length = length or max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(length, "big")


@dataclass
class SigningKey:
    """A private key, the JWS algorithm it signs with, and its key id."""

    kid: str
    alg: str
    private: Any

    # === constructors ===

    @classmethod
    def ed25519(cls, kid: str = "ed-1") -> "SigningKey":
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def p256(cls, kid: str = "ec-1") -> "SigningKey":
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rsa2048(cls, kid: str = "rsa-1") -> "SigningKey":
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    # === public half ===

    def jwk(self) -> dict[str, str]:
        """The public key as an RFC 7517 JWK, as it goes into `settings.identity.jwt[].jwks.keys`."""
        pub = self.private.public_key()
        base = {"kid": self.kid, "alg": self.alg, "use": "sig"}
        if self.alg == "EdDSA":
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), **base}
        if self.alg == "ES256":
            nums = pub.public_numbers()
            return {"kty": "EC", "crv": "P-256", "x": b64url(_uint(nums.x, 32)), "y": b64url(_uint(nums.y, 32)), **base}
        nums = pub.public_numbers()
        return {"kty": "RSA", "n": b64url(_uint(nums.n)), "e": b64url(_uint(nums.e)), **base}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # === tokens ===

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None, kid: str | None = None) -> str:
        """A compact JWS of `claims` signed by this key (header `kid` = this key's unless given)."""
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": kid or self.kid, **(headers or {})})


def claims(*, iss: str, aud: str | list[str] | None, azp: str | None, ttl: int = 300, now: int | None = None, **extra: Any) -> dict[str, Any]:
    """Registered claims for a token valid from now for `ttl` seconds (a negative ttl: expired)."""
    now = int(time.time()) if now is None else now
    out: dict[str, Any] = {"iss": iss, "iat": now, "nbf": now, "exp": now + ttl, "sub": azp or "someone"}
    if aud is not None:
        out["aud"] = aud
    if azp is not None:
        out["azp"] = azp
    out.update(extra)
    return out


# === hostile tokens ===


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """Any header, payload and signature bytes, encoded as a compact JWS without any checks."""
    enc = lambda obj: b64url(json.dumps(obj, separators=(",", ":")).encode())  # noqa: E731
    return f"{enc(header)}.{enc(payload)}.{b64url(signature)}"


def alg_none(payload: dict[str, Any], kid: str | None = None) -> str:
    """An unsigned token (`alg: none`, empty signature)."""
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return raw_token(header, payload)


def hs256_with_public_key(key: SigningKey, payload: dict[str, Any], secret: bytes | None = None) -> str:
    """Algorithm confusion: HS256 keyed with the verifier's *public* key (PEM by default).

    A verifier that lets the token choose the algorithm and uses the configured key bytes as an
    HMAC secret accepts it.
    """
    secret = key.public_pem() if secret is None else secret
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    enc = lambda obj: b64url(json.dumps(obj, separators=(",", ":")).encode())  # noqa: E731
    signing_input = f"{enc(header)}.{enc(payload)}".encode()
    return f"{signing_input.decode()}.{b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def swap_payload(token: str, payload: dict[str, Any]) -> str:
    """`token` with its payload replaced and the original signature kept (so the signature is bad)."""
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(payload, separators=(',', ':')).encode())}.{signature}"
