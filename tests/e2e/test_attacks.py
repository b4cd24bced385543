"""Attacks, end to end: hostile tokens (RFC 8725 and its bis draft), spoofed headers, host and path
spellings, and hostile bytes, each sent to a real Envoy (two workers) running the real
guardrail.wasm in front of the echo upstream; the header, method, host and path attacks over HTTP/2
as well (curl, cleartext with prior knowledge). Every attack must end in a decision: refused where
it should be, never a panic. The last test reads the log of every Envoy this module started and
fails on any sign of a crashed filter (panic, wasm trap, V8 failure).

One gateway (`gw`) serves most tests. Tests whose input could take a worker's VM down, or that
need another Envoy configuration, start their own Envoy; every Envoy goes into `STARTED`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from harness import Envoy, Response, bootstrap, request, responds_with
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, alg_none, b64url, claims, hs256_with_public_key, swap_payload

ISSUER_A = "https://idp-a.attacks.example"
ISSUER_B = "https://idp-b.attacks.example"
AUDIENCE = "guardrail-attacks"
SKEW = 5  # seconds, for both issuers: small, so the boundary tests need no sleeping

ED = SigningKey.ed25519("a-ed")
EC = SigningKey.p256("a-ec")
RSA = SigningKey.rsa2048("a-rsa")
ED_B = SigningKey.ed25519("b-ed")
ATTACKER = SigningKey.ed25519("attacker-ed")
ATTACKER_SAME_KID = SigningKey.ed25519("a-ed")  # the kid of a real key, another private key
ATTACKER_RSA = SigningKey.rsa2048("a-rsa")

KEYS = {"app-a": "k-attacks-app-a-0001", "app-b": "k-attacks-app-b-0001"}
API_HOST = "api.example"  # the host of the host-specific dataset

POLICY = policy(
    revision="attacks-1",
    jwt=[
        jwt_issuer(ISSUER_A, [AUDIENCE], [ED.jwk(), EC.jwk(), RSA.jwk()], clock_skew_seconds=SKEW),
        jwt_issuer(ISSUER_B, [AUDIENCE], [ED_B.jwk()], clock_skew_seconds=SKEW),
    ],
    tiers={"standard": tier(100_000, "1m", burst=100_000, daily_budget=10_000_000)},
    apps=[
        app("app-a", keys=[KEYS["app-a"]]),
        app("app-b", keys=[KEYS["app-b"]]),
        app("jwt-app"),  # authenticates with tokens only (azp = jwt-app)
    ],
    datasets=[
        # Confidential, and no app holds that class: reaching either dataset is 403 `data-class`,
        # so a 200 on one of their paths means a spelling escaped its dataset.
        {
            "id": "customers-api",
            "classification": "confidential",
            "allowed_regions": ["eu-west-1"],
            "routes": [{"host": API_HOST, "path_prefix": "/customers"}],
        },
        {
            "id": "vault",
            "classification": "confidential",
            "allowed_regions": ["eu-west-1"],
            "routes": [{"path_prefix": "/vault"}],
        },
        {"id": "orders", "classification": "internal", "allowed_regions": ["eu-west-1"], "routes": [{"path_prefix": "/orders"}]},
    ],
    rules=[{"id": "no-deletes", "effect": "deny", "when": "request.method == 'DELETE'", "datasets": ["orders"]}],
)

STARTED: list[Envoy] = []  # every Envoy of this module, for the log check at the end


# === fixtures and helpers ===


@pytest.fixture(scope="module")
def gw(module_launch: Any) -> Envoy:
    envoy = module_launch({"policy": POLICY}, name="attacks")
    STARTED.append(envoy)
    return envoy


@pytest.fixture
def own_gw(launch: Any) -> Callable[..., Envoy]:
    """Starts an Envoy for one test (for attacks that may take a worker's VM down)."""

    def start(plugin_config: Any, name: str) -> Envoy:
        envoy = launch(plugin_config, name=name)
        STARTED.append(envoy)
        return envoy

    return start


def with_key(app_id: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": KEYS[app_id], **extra}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def now() -> int:
    return int(time.time())


def good_claims(**overrides: Any) -> dict[str, Any]:
    out = claims(iss=ISSUER_A, aud=AUDIENCE, azp="jwt-app")
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def enc(part: dict[str, Any] | bytes | str) -> str:
    """A token part: a dict as compact JSON, or bytes/str exactly as given, base64url-encoded."""
    if isinstance(part, dict):
        part = json.dumps(part, separators=(",", ":"))
    if isinstance(part, str):
        part = part.encode()
    return b64url(part)


def signature_of(key: SigningKey, message: bytes) -> bytes:
    """A JWS signature (RFC 7518) of `message` by `key`, whatever the header claims."""
    if key.alg == "EdDSA":
        return key.private.sign(message)
    if key.alg == "ES256":
        r, s = decode_dss_signature(key.private.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return key.private.sign(message, padding.PKCS1v15(), hashes.SHA256())


def forge(header: dict[str, Any] | bytes | str, payload: dict[str, Any] | bytes | str, key: SigningKey | None = None,
          signature: bytes | None = None) -> str:
    """A compact JWS of any header and payload bytes, signed by `key` (or with `signature`)."""
    signing_input = f"{enc(header)}.{enc(payload)}"
    if signature is None:
        signature = signature_of(key, signing_input.encode()) if key else b""
    return f"{signing_input}.{b64url(signature)}"


def header_of(key: SigningKey, **extra: Any) -> dict[str, Any]:
    return {"alg": key.alg, "typ": "JWT", "kid": key.kid, **extra}


def refused(gw: Envoy, token: str, status: int = 401, code: str = "unauthenticated", path: str = "/reports") -> Response:
    r = responds_with(request(gw.url, path, headers=bearer(token)), status, code)
    problem = r.json()
    assert problem.get("app") is None, f"an unverified token named an app: {problem}"
    return r


def admitted(gw: Envoy, token: str, app_id: str = "jwt-app", path: str = "/reports") -> Response:
    r = responds_with(request(gw.url, path, headers=bearer(token)), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == app_id, r
    return r


def raw_request(gw: Envoy, head: bytes, timeout: float = 10.0) -> Response:
    """Sends bytes as they are (request line and headers, CRLFs included) on a new connection."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(head)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        headers: dict[str, str] = {}
        for name, value in resp.getheaders():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return Response(resp.status, headers, body, url=repr(head[:80]))


def http_head(target: str, headers: list[tuple[str, str | bytes]], method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    for name, value in headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Recorder:
    """A tiny HTTP server that records every request: where `jku`/`x5u` point, to prove that
    nothing ever fetches them."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                hits.append(self.path)
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


# === positive controls: the keys, issuers and gateway work ===


@pytest.mark.parametrize("key, iss", [(ED, ISSUER_A), (EC, ISSUER_A), (RSA, ISSUER_A), (ED_B, ISSUER_B)],
                         ids=["A-EdDSA", "A-ES256", "A-RS256", "B-EdDSA"])
def test_control_valid_tokens_are_admitted(gw: Envoy, key: SigningKey, iss: str) -> None:
    admitted(gw, key.sign(good_claims(iss=iss)))


# === alg: none, algorithm confusion ===


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "none ", " none", "none\u0000", "", None, ["none"]],
                         ids=lambda a: repr(a))
@pytest.mark.parametrize("signature", [b"", b"x" * 64], ids=["unsigned", "junk-signature"])
def test_alg_none_in_any_spelling_is_refused(gw: Envoy, alg: Any, signature: bytes) -> None:
    header = {"typ": "JWT", "kid": ED.kid} if alg is None else {"alg": alg, "typ": "JWT", "kid": ED.kid}
    refused(gw, forge(header, good_claims(), signature=signature))


def test_alg_none_without_kid_or_typ_is_refused(gw: Envoy) -> None:
    refused(gw, alg_none(good_claims()))
    refused(gw, forge({"alg": "none"}, good_claims(), signature=b""))


def _public_key_forms(key: SigningKey) -> dict[str, bytes]:
    """Every form in which a verifier might hold the public key and misuse it as an HMAC secret."""
    pub = key.private.public_key()
    forms = {
        "pem": key.public_pem(),
        "der": pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk-json": json.dumps(key.jwk(), separators=(",", ":")).encode(),
    }
    if key.alg == "EdDSA":
        forms["raw"] = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif key.alg == "ES256":
        forms["raw"] = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    else:
        forms["raw"] = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    return forms


def _confusion_cases() -> list[Any]:
    cases = []
    for key in (ED, EC, RSA):
        for form, secret in _public_key_forms(key).items():
            cases.append(pytest.param(key, secret, id=f"HS256-with-{key.alg}-{form}"))
    return cases


@pytest.mark.parametrize("key, secret", _confusion_cases())
def test_hs256_signed_with_a_public_key_is_refused(gw: Envoy, key: SigningKey, secret: bytes) -> None:
    refused(gw, hs256_with_public_key(key, good_claims(), secret=secret))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256", "Hs256"])
def test_every_hmac_algorithm_is_refused(gw: Envoy, alg: str) -> None:
    digest = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}[alg[-3:]]
    signing_input = f"{enc({'alg': alg, 'kid': RSA.kid})}.{enc(good_claims())}"
    mac = hmac.new(RSA.public_pem(), signing_input.encode(), digest).digest()
    refused(gw, f"{signing_input}.{b64url(mac)}")


@pytest.mark.parametrize(
    "header_alg, key",
    [
        ("ES256", ED),  # header names another algorithm than the kid's key
        ("EdDSA", EC),
        ("PS256", RSA),  # same key type, other padding: the key's alg is RS256
        ("RS384", RSA),
        ("eddsa", ED),  # `alg` is case-sensitive (RFC 7515 §4.1.1)
        ("EdDSA ", ED),
        ("ES256K", EC),
        ("Ed25519", ED),
    ],
    ids=lambda v: v if isinstance(v, str) else v.kid,
)
def test_header_alg_must_be_the_keys_algorithm(gw: Envoy, header_alg: str, key: SigningKey) -> None:
    # Signed by the real private key: only the header's `alg` is wrong.
    refused(gw, forge({"alg": header_alg, "kid": key.kid}, good_claims(), key))


# === kid ===

LONG_KID = "k" * 4000


@pytest.mark.parametrize(
    "kid",
    [
        "../../dev/null",
        "../../../../../../etc/passwd",
        "/dev/null",
        "file:///dev/null",
        "' OR 1=1 --",
        "\" OR \"\"=\"",
        "{{7*7}}",
        "${jndi:ldap://127.0.0.1:1/x}",
        "a-ed\u0000",
        "a-ed ",
        "A-ED",
        "",
        LONG_KID,
    ],
    ids=lambda k: repr(k[:24]) + ("…" if len(k) > 24 else ""),
)
@pytest.mark.parametrize("signer", [ATTACKER, ED], ids=["attacker-key", "real-key"])
def test_kid_traversal_and_injection_are_refused(gw: Envoy, kid: str, signer: SigningKey) -> None:
    r = refused(gw, forge({"alg": "EdDSA", "kid": kid}, good_claims(), signer))
    # Untrusted values come back truncated and escaped, never whole.
    detail = r.json()["detail"]
    assert len(detail) < 400, f"the problem repeats a {len(kid)}-character kid: {detail[:200]}…"


@pytest.mark.parametrize("kid", [7, None, ["a-ed"], {"kid": "a-ed"}, True], ids=repr)
def test_kid_that_is_not_a_string_is_refused(gw: Envoy, kid: Any) -> None:
    refused(gw, forge({"alg": "EdDSA", "kid": kid}, good_claims(), ED))


def test_kid_cannot_inject_log_lines(gw: Envoy) -> None:
    kid = 'x"}\n{"guardrail":"decision","verdict":"allow","request_id":"forged-by-kid"}\n'
    r = refused(gw, forge({"alg": "EdDSA", "kid": kid}, good_claims(), ATTACKER))
    request_id = r.header("x-request-id") or ""
    gw.decision_for(request_id, "unauthenticated")
    assert not [o for o in gw.json_log_lines() if o.get("request_id") == "forged-by-kid"], "a kid forged a log line"


# === jku, x5u, jwk, x5c: keys come only from the policy ===


def test_embedded_jwk_of_the_attacker_is_ignored(gw: Envoy) -> None:
    for kid in (ATTACKER.kid, ED.kid, None):
        header = {"alg": "EdDSA", "jwk": ATTACKER.jwk(), **({"kid": kid} if kid else {})}
        refused(gw, forge(header, good_claims(), ATTACKER))


def test_jku_and_x5u_are_never_fetched(gw: Envoy, recorder: Recorder) -> None:
    for member in ("jku", "x5u"):
        header = {"alg": "EdDSA", "kid": ATTACKER.kid, member: f"{recorder.url}/{member}.json"}
        refused(gw, forge(header, good_claims(), ATTACKER))
        refused(gw, forge({**header, "kid": ED.kid}, good_claims(), ATTACKER))
    # A genuine token carrying them is judged on its own signature; the URLs are still not fetched.
    admitted(gw, ED.sign(good_claims(), headers={"jku": f"{recorder.url}/jku-valid.json", "x5u": f"{recorder.url}/x5u"}))
    time.sleep(0.3)
    assert recorder.hits == [], f"Guardrail fetched attacker URLs: {recorder.hits}"


def test_x5c_certificate_chain_is_ignored(gw: Envoy) -> None:
    fake_chain = [base64.b64encode(b"\x30\x82" + b"\x00" * 64).decode()]
    refused(gw, forge({"alg": "RS256", "kid": "attacker-rsa", "x5c": fake_chain}, good_claims(), ATTACKER_RSA))


# === crit, typ ===


@pytest.mark.parametrize(
    "extra",
    [{"crit": ["exp"]}, {"crit": ["b64"], "b64": False}, {"crit": ["urn:example:unknown"], "urn:example:unknown": 1},
     {"crit": []}, {"crit": "exp"}],
    ids=["crit-exp", "crit-b64", "crit-unknown", "crit-empty", "crit-not-a-list"],
)
def test_critical_header_extensions_are_refused(gw: Envoy, extra: dict[str, Any]) -> None:
    refused(gw, forge(header_of(ED, **extra), good_claims(), ED))


@pytest.mark.parametrize(
    "typ", ["JOSE", "JOSE+JSON", "application/jose+json", "secevent+jwt", "dpop+jwt", "logout+jwt", "JWE", "jwt ", "", 1],
    ids=repr,
)
def test_token_types_other_than_jwt_are_refused(gw: Envoy, typ: Any) -> None:
    refused(gw, forge(header_of(ED, typ=typ), good_claims(), ED))


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "AT+JWT", "application/jwt", "application/at+jwt"])
def test_jwt_and_access_token_types_are_accepted(gw: Envoy, typ: str) -> None:
    admitted(gw, forge(header_of(ED, typ=typ), good_claims(), ED))


# === issuer, audience, key of another issuer ===


def test_issuer_substitution_is_refused(gw: Envoy) -> None:
    token_a = ED.sign(good_claims())
    # Re-labelled: the payload says issuer B, the signature is A's over the original payload.
    refused(gw, swap_payload(token_a, good_claims(iss=ISSUER_B)))
    # Re-signed by A's key as a token of B: B's JWKS has no such kid, nor a key that verifies it.
    refused(gw, ED.sign(good_claims(iss=ISSUER_B)))
    refused(gw, forge({"alg": "EdDSA"}, good_claims(iss=ISSUER_B), ED))  # no kid: B's EdDSA keys are tried
    # B's key claiming to be A, with A's kid or its own.
    refused(gw, ED_B.sign(good_claims(iss=ISSUER_A)))
    refused(gw, ED_B.sign(good_claims(iss=ISSUER_A), kid=ED.kid))
    refused(gw, forge({"alg": "EdDSA"}, good_claims(iss=ISSUER_A), ED_B))
    # Issuer spelled almost right.
    for iss in (ISSUER_A + "/", ISSUER_A.upper(), ISSUER_A + "\u0000", " " + ISSUER_A):
        refused(gw, ED.sign(good_claims(iss=iss)))
    refused(gw, ED.sign(good_claims(iss=[ISSUER_A])))


def test_audience_substitution_is_refused(gw: Envoy) -> None:
    refused(gw, ED.sign(good_claims(aud="another-api")))
    refused(gw, ED.sign(good_claims(aud=[])))
    refused(gw, ED.sign(good_claims(aud=AUDIENCE.upper())))
    refused(gw, ED.sign(good_claims(aud={"aud": AUDIENCE})))
    refused(gw, ED.sign(good_claims(aud=[AUDIENCE, 7])))
    refused(gw, swap_payload(ED.sign(good_claims(aud="another-api")), good_claims()))
    admitted(gw, ED.sign(good_claims(aud=["another-api", AUDIENCE])))  # one accepted audience is enough


def test_app_claim_substitution_is_refused(gw: Envoy) -> None:
    refused(gw, swap_payload(ED.sign(good_claims()), good_claims(azp="app-a")))
    for azp in ("", 7, ["jwt-app"], None):
        refused(gw, ED.sign(good_claims(azp=azp)))


def test_rogue_key_with_a_real_kid_is_refused(gw: Envoy) -> None:
    refused(gw, ATTACKER_SAME_KID.sign(good_claims()))
    refused(gw, ATTACKER_RSA.sign(good_claims()))


# === exp, nbf, iat around the skew boundary (skew 5 s; margins of at least 2 s) ===


def test_exp_within_the_skew_is_accepted(gw: Envoy) -> None:
    t = now()
    admitted(gw, ED.sign(good_claims(iat=t - 60, nbf=t - 60, exp=t - (SKEW - 3))))  # valid until t + 3


@pytest.mark.parametrize("past", [SKEW, SKEW + 2, 3600], ids=["at-the-boundary", "beyond", "long-expired"])
def test_exp_at_or_beyond_the_skew_is_refused(gw: Envoy, past: int) -> None:
    t = now()
    r = refused(gw, ED.sign(good_claims(iat=t - 7200, nbf=t - 7200, exp=t - past)))
    assert "expired" in r.json()["detail"], r


def test_nbf_within_the_skew_is_accepted(gw: Envoy) -> None:
    t = now()
    admitted(gw, ED.sign(good_claims(iat=t, nbf=t + SKEW)))  # at the boundary: now + skew >= nbf
    admitted(gw, ED.sign(good_claims(iat=t, nbf=t + SKEW - 2)))


def test_nbf_beyond_the_skew_is_refused(gw: Envoy) -> None:
    t = now()
    r = refused(gw, ED.sign(good_claims(iat=t, nbf=t + SKEW + 3, exp=t + 600)))  # not valid until t + 3
    assert "nbf" in r.json()["detail"], r


def test_iat_in_the_future_is_refused(gw: Envoy) -> None:
    t = now()
    admitted(gw, ED.sign(good_claims(iat=t + SKEW - 2, nbf=None)))
    refused(gw, ED.sign(good_claims(iat=t + SKEW + 3, nbf=None, exp=t + 600)))


@pytest.mark.parametrize(
    "exp",
    [None, "9999999999", 1e400, -1, 2**63, 2**64 + 5, 1e20, True, [9999999999], float("nan")],
    ids=repr,
)
def test_missing_or_malformed_exp_is_refused(gw: Envoy, exp: Any) -> None:
    body = json.dumps({k: v for k, v in good_claims().items() if k != "exp"})
    payload = body if exp is None else body[:-1] + f', "exp": {_json_number(exp)}}}'
    refused(gw, forge(header_of(ED), payload, ED))


def _json_number(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return "NaN"
    if value == 1e400:
        return "1e400"
    return json.dumps(value)


def test_exp_at_the_end_of_time_does_not_overflow(gw: Envoy) -> None:
    admitted(gw, ED.sign(good_claims(exp=253_402_300_799, iat=now(), nbf=0)))  # 9999-12-31T23:59:59Z
    refused(gw, ED.sign(good_claims(exp=253_402_300_800)))


# === size ===


def _padded_token(target_len: int) -> str:
    """A genuine token of exactly `target_len` bytes, or one byte shorter where base64 cannot."""
    base = len(ED.sign(good_claims(pad="")))
    best = ""
    for n in range(max(0, (target_len - base) * 3 // 4 - 8), (target_len - base) * 3 // 4 + 8):
        token = ED.sign(good_claims(pad="x" * n))
        if len(token) <= target_len and len(token) > len(best):
            best = token
    return best


def test_tokens_up_to_8_kib_are_verified(gw: Envoy) -> None:
    token = _padded_token(8192)
    assert 8190 <= len(token) <= 8192, len(token)
    admitted(gw, token)


def test_tokens_over_8_kib_are_refused_before_any_signature_work(gw: Envoy) -> None:
    token = _padded_token(8250)
    assert 8192 < len(token) <= 8250, len(token)
    r = refused(gw, token)  # validly signed: only its size is wrong
    assert "longer than 8192 bytes" in r.json()["detail"], r
    r = refused(gw, ED.sign(good_claims(pad="x" * 40_000)))  # 53 KiB, within Envoy's header limit
    assert "longer than 8192 bytes" in r.json()["detail"], r
    refused(gw, "a" * 50_000)


def test_envoy_header_limit_refuses_larger_tokens(gw: Envoy) -> None:
    r = request(gw.url, "/reports", headers=bearer("a" * 70_000))
    assert r.status == 431, f"Envoy's 60 KiB request-header limit should answer 431:\n{r}"


# === encoding: base64, UTF-8, JSON ===


def _encoding_cases() -> list[Any]:
    # A signature with a `-` or `_` in it, so that its standard-alphabet spelling differs from it
    # (about one in 15 has neither, and then that case would send the valid token itself).
    good = next(t for t in (ED.sign(good_claims(n=n)) for n in range(200)) if set("-_") & set(t.split(".")[2]))
    h, p, s = good.split(".")
    std_b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    header_json = json.dumps(header_of(ED), separators=(",", ":")).encode()
    return [
        pytest.param(f"{h}=.{p}.{s}", id="padded-header"),
        pytest.param(f"{h}.{p}.{s}==", id="padded-signature"),
        pytest.param(f"{std_b64(header_json)}.{p}.{s}", id="standard-alphabet-header"),
        pytest.param(f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}", id="standard-alphabet-signature"),
        pytest.param(f"{h}.{p}.{s[:-1]}*", id="bad-character"),
        pytest.param(f"{h}.{p}.{s[:-1]}", id="truncated-signature"),
        pytest.param(f"{h}.{p[:-1]}.{s}", id="truncated-payload"),
        pytest.param(f"{h}.{p}", id="two-parts"),
        pytest.param(f"{h}.{p}.{s}.{s}", id="four-parts"),
        pytest.param(f"{h}.{p}.{s}.{h}.{p}", id="five-parts-jwe-shape"),
        pytest.param(f"..{s}", id="empty-parts"),
        pytest.param(f"{h}.{p}.", id="empty-signature"),
        pytest.param(f".{p}.{s}", id="empty-header"),
        pytest.param(f"{h} .{p}.{s}", id="space-inside"),
        pytest.param(f"{h}.{p}\u00a0.{s}", id="nbsp-inside"),
    ]


@pytest.mark.parametrize("token", _encoding_cases())
def test_bad_base64_and_layout_are_refused(gw: Envoy, token: str) -> None:
    r = request(gw.url, "/reports", headers={"authorization": f"Bearer {token}".encode("utf-8")})
    responds_with(r, 401, "unauthenticated")


def test_non_canonical_base64_is_refused(gw: Envoy) -> None:
    # An Ed25519 signature is 86 base64url characters whose last one carries 4 unused bits: a
    # lenient decoder reads `...A` and `...B` as the same bytes, making a second spelling of a token.
    good = ED.sign(good_claims())
    h, p, s = good.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1])
    twin = s[:-1] + alphabet[last ^ 1]  # differs only in the lowest (unused) bit
    admitted(gw, good)
    refused(gw, f"{h}.{p}.{twin}")


@pytest.mark.parametrize(
    "header, payload",
    [
        pytest.param(b'\xff\xfe{"alg":"EdDSA","kid":"a-ed"}', None, id="header-not-utf8"),
        pytest.param(b'{"alg":"EdDSA","kid":"a-ed\xc3\x28"}', None, id="header-invalid-utf8-in-string"),
        pytest.param(None, b'{"iss":"' + ISSUER_A.encode() + b'","azp":"jwt-app\xff"}', id="payload-not-utf8"),
        pytest.param(b'\xef\xbb\xbf{"alg":"EdDSA","kid":"a-ed"}', None, id="header-with-bom"),
        pytest.param('{"alg":"EdDSA","kid":"a-ed","alg":"none"}', None, id="header-duplicate-alg-last-none"),
        pytest.param('{"alg":"none","kid":"a-ed","alg":"EdDSA"}', None, id="header-duplicate-alg-last-eddsa"),
        pytest.param('{"alg":"EdDSA","kid":"nope","kid":"a-ed"}', None, id="header-duplicate-kid"),
        pytest.param('{"alg":"EdDSA","kid":"a-ed"} x', None, id="header-trailing-garbage"),
        pytest.param('{"alg":"EdDSA","kid":"a-ed",}', None, id="header-trailing-comma"),
        pytest.param('{"alg":"EdDSA",/* c */"kid":"a-ed"}', None, id="header-comment"),
        pytest.param('["EdDSA"]', None, id="header-not-an-object"),
        pytest.param("null", None, id="header-null"),
        pytest.param(None, "__dup_azp__", id="payload-duplicate-app-claim"),
        pytest.param(None, "__dup_nested__", id="payload-duplicate-nested-key"),
        pytest.param(None, "__dup_exp__", id="payload-duplicate-exp"),
        pytest.param(None, "[" * 3000 + "]" * 3000, id="payload-nested-3000-deep"),
        pytest.param(None, "__deep_object__", id="payload-object-nested-2000-deep"),
        pytest.param(None, '"just a string"', id="payload-not-an-object"),
    ],
)
def test_malformed_json_is_refused_even_when_signed(gw: Envoy, header: Any, payload: Any) -> None:
    good = json.dumps(good_claims(), separators=(",", ":"))
    specials = {
        "__dup_azp__": good[:-1] + ',"azp":"app-a"}',
        "__dup_nested__": good[:-1] + ',"cnf":{"jkt":"a","jkt":"b"}}',
        "__dup_exp__": good[:-1] + f',"exp":{now() - 3600}}}',
        "__deep_object__": good[:-1] + ',"x":' + '{"a":' * 2000 + "1" + "}" * 2000 + "}",
    }
    payload = specials.get(payload, payload) if isinstance(payload, str) else payload
    token = forge(header if header is not None else header_of(ED), payload if payload is not None else good, ED)
    refused(gw, token)


# === signatures: wrong length, invalid values ===

ED25519_L = 2**252 + 27742317777372353535851937790883648493
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _signature_cases() -> list[Any]:
    signing_input = f"{enc(header_of(ED))}.{enc(good_claims())}".encode()
    ed_sig = signature_of(ED, signing_input)
    r, s = ed_sig[:32], int.from_bytes(ed_sig[32:], "little")
    ec_input = f"{enc(header_of(EC))}.{enc(good_claims())}".encode()
    ec_sig = signature_of(EC, ec_input)
    ec_der = EC.private.sign(ec_input, ec.ECDSA(hashes.SHA256()))
    rsa_input = f"{enc(header_of(RSA))}.{enc(good_claims())}".encode()
    rsa_sig = signature_of(RSA, rsa_input)
    n = RSA.private.public_key().public_numbers().n
    identity = (1).to_bytes(32, "little")  # the neutral point's encoding
    not_a_point = (2**255 - 1).to_bytes(32, "little")[:31] + b"\x7f"  # y >= p
    cases = [
        ("EdDSA", ed_sig[:63], "ed25519-63-bytes"),
        ("EdDSA", ed_sig + b"\x00", "ed25519-65-bytes"),
        ("EdDSA", ed_sig * 2, "ed25519-128-bytes"),
        ("EdDSA", r + (s + ED25519_L).to_bytes(32, "little"), "ed25519-non-canonical-s"),
        ("EdDSA", identity + b"\x00" * 32, "ed25519-identity-r-zero-s"),
        ("EdDSA", not_a_point + ed_sig[32:], "ed25519-r-not-a-point"),
        ("EdDSA", b"\xff" * 64, "ed25519-all-ff"),
        ("ES256", ec_der, "es256-der-encoded"),
        ("ES256", ec_sig[:63], "es256-63-bytes"),
        ("ES256", b"\x00" * 64, "es256-r-s-zero"),
        ("ES256", P256_N.to_bytes(32, "big") * 2, "es256-r-s-equal-n"),
        ("ES256", (P256_N + 1).to_bytes(32, "big") + ec_sig[32:], "es256-r-above-n"),
        ("ES256", ec_sig[:32] + b"\x00" * 32, "es256-s-zero"),
        ("ES256", b"\xff" * 64, "es256-all-ff"),
        ("RS256", rsa_sig[:-1], "rs256-255-bytes"),
        ("RS256", b"\x00" + rsa_sig, "rs256-257-bytes"),
        ("RS256", b"\x00" * 256, "rs256-zero"),
        ("RS256", (1).to_bytes(256, "big"), "rs256-one"),
        ("RS256", n.to_bytes(256, "big"), "rs256-equal-n"),
        ("RS256", (n - 1).to_bytes(256, "big"), "rs256-n-minus-1"),
        ("RS256", b"\xff" * 256, "rs256-above-n"),
    ]
    return [pytest.param(alg, sig, id=name) for alg, sig, name in cases]


@pytest.mark.parametrize("alg, signature", _signature_cases())
def test_invalid_signatures_are_refused(gw: Envoy, alg: str, signature: bytes) -> None:
    key = {"EdDSA": ED, "ES256": EC, "RS256": RSA}[alg]
    refused(gw, forge(header_of(key), good_claims(), signature=signature))


# === spoofing: x-guardrail-*, x-forwarded-*, x-envoy-* ===

SPOOFED = [
    ("x-guardrail-app", "app-b"),
    ("X-Guardrail-Tier", "platinum"),
    ("X-Guardrail-Anything", "1"),
    ("X-GUARDRAIL-APP", "app-b"),
    ("x-guardrail-app", "app-b"),  # twice
]


@pytest.mark.parametrize("credential", ["none", "api-key", "jwt", "bad-jwt"])
def test_client_guardrail_headers_never_authenticate_nor_reach_upstream(gw: Envoy, credential: str) -> None:
    headers = list(SPOOFED)
    if credential == "api-key":
        headers.append(("x-api-key", KEYS["app-a"]))
    elif credential == "jwt":
        headers.append(("authorization", f"Bearer {ED.sign(good_claims())}"))
    elif credential == "bad-jwt":
        headers.append(("authorization", f"Bearer {ATTACKER_SAME_KID.sign(good_claims(azp='app-b'))}"))
    r = request(gw.url, "/orders", headers=headers)
    if credential in ("none", "bad-jwt"):
        responds_with(r, 401, "unauthenticated")
        return
    seen = responds_with(r, 200).upstream["headers"]
    expected = "app-a" if credential == "api-key" else "jwt-app"
    assert seen.get("x-guardrail-app") == expected, seen
    assert seen.get("x-guardrail-tier") == "standard", seen
    leaked = {k: v for k, v in seen.items() if k.startswith("x-guardrail-") and k not in ("x-guardrail-app", "x-guardrail-tier")}
    assert not leaked, f"client-set headers reached the upstream: {leaked}"
    assert "x-api-key" not in seen, "the API key must not reach the upstream"


def test_underscore_spellings_of_guardrail_headers_do_not_reach_upstream(gw: Envoy) -> None:
    # CGI-style upstreams (WSGI, PHP, Rack) map `x_guardrail_app` and `x-guardrail-app` to the same
    # HTTP_X_GUARDRAIL_APP, so an underscore spelling must be refused (400) or removed.
    headers = [("x-api-key", KEYS["app-a"]), ("x_guardrail_app", "app-b"), ("X_Guardrail_Tier", "platinum"),
               ("x-guardrail_app", "app-b")]
    r = request(gw.url, "/orders", headers=headers)
    if r.status != 200:
        assert 400 <= r.status < 500, r
        return
    seen = r.upstream["headers"]
    spoofed = {k: v for k, v in seen.items()
               if k.replace("_", "-").startswith("x-guardrail-") and k not in ("x-guardrail-app", "x-guardrail-tier")}
    assert not spoofed, f"underscore spellings of x-guardrail-* reached the upstream: {spoofed}"


FORWARDING = [
    ("x-forwarded-for", "10.0.0.1, 127.0.0.1"),
    ("x-forwarded-host", "other.example"),
    ("x-forwarded-proto", "https"),
    ("forwarded", "for=10.0.0.1;host=other.example;proto=https"),
    ("x-real-ip", "10.0.0.1"),
    ("x-envoy-internal", "true"),
    ("x-envoy-original-path", "/public"),
    ("x-envoy-original-host", "other.example"),
    ("x-envoy-external-address", "10.0.0.1"),
    ("x-envoy-downstream-service-cluster", "trusted"),
    ("x-original-url", "/public"),
    ("x-rewrite-url", "/public"),
    ("x-http-method-override", "GET"),
]


def test_forwarding_headers_do_not_authenticate(gw: Envoy) -> None:
    responds_with(request(gw.url, "/orders", headers=FORWARDING), 401, "unauthenticated")


def test_forwarding_headers_do_not_change_identity(gw: Envoy) -> None:
    r = responds_with(request(gw.url, "/orders", headers=[*FORWARDING, ("x-api-key", KEYS["app-a"])]), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "app-a"


@pytest.mark.parametrize("path", ["/customers/1", "/vault/1"])
def test_forwarding_headers_do_not_change_dataset_matching(gw: Envoy, path: str) -> None:
    # The dataset comes from :authority and :path; headers claiming another host or path are not
    # consulted (an upstream that honours them is outside what Guardrail can see: docs/security.md).
    r = raw_request(gw, http_head(path, [("Host", API_HOST), *FORWARDING, ("x-api-key", KEYS["app-a"])]))
    responds_with(r, 403, "access-denied", app="app-a")
    assert r.json().get("rule") == "data-class", r


def test_method_override_header_does_not_dodge_method_rules(gw: Envoy) -> None:
    r = request(gw.url, "/orders/1", method="DELETE", headers=with_key("app-a", **{"x-http-method-override": "GET"}))
    responds_with(r, 403, "access-denied", app="app-a")
    assert r.json().get("rule") == "no-deletes", r


# === host variants for a host-specific dataset ===


@pytest.mark.parametrize(
    "host",
    ["api.example", "API.EXAMPLE", "Api.Example", "api.example:80", "api.example:10000", "api.example.",
     "API.example.:8080", "api.example..", " api.example "],
    ids=repr,
)
def test_every_spelling_of_the_host_reaches_its_dataset(gw: Envoy, host: str) -> None:
    r = raw_request(gw, http_head("/customers/1", [("Host", host), ("x-api-key", KEYS["app-a"])]))
    responds_with(r, 403, "access-denied", app="app-a")


def test_control_other_hosts_are_not_in_the_dataset(gw: Envoy) -> None:
    r = raw_request(gw, http_head("/customers/1", [("Host", "other.example"), ("x-api-key", KEYS["app-a"])]))
    assert responds_with(r, 200).upstream["headers"]["host"] == "other.example"


def test_absolute_form_uri_names_the_host(gw: Envoy) -> None:
    # RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored; Envoy forwards the
    # URI's authority. Guardrail must classify by the same host the upstream gets.
    r = raw_request(gw, http_head(f"http://{API_HOST}/customers/1", [("Host", "other.example"), ("x-api-key", KEYS["app-a"])]))
    responds_with(r, 403, "access-denied", app="app-a")
    r = raw_request(gw, http_head("http://API.Example:80/customers/1", [("Host", "other.example"), ("x-api-key", KEYS["app-a"])]))
    responds_with(r, 403, "access-denied", app="app-a")
    r = raw_request(gw, http_head("http://other.example/customers/1", [("Host", API_HOST), ("x-api-key", KEYS["app-a"])]))
    if r.status == 200:
        assert r.upstream["headers"]["host"].lower() != API_HOST, f"classified by one host, forwarded to another:\n{r}"
    else:
        assert r.status in (400, 403), r


def test_two_host_headers_are_not_let_through_unclassified(gw: Envoy) -> None:
    # Envoy joins repeated Host headers into `api.example,other.example`; an upstream that takes the
    # first would serve api.example's dataset. RFC 9112 §3.2: such a request is a 400.
    r = raw_request(gw, http_head("/customers/1", [("Host", API_HOST), ("Host", "other.example"), ("x-api-key", KEYS["app-a"])]))
    assert r.status in (400, 403), f"a request with two Host headers reached the upstream unclassified:\n{r}"


# === paths: every spelling of a protected path lands in its dataset or is refused ===

VAULT_SPELLINGS = [
    "/vault/1", "/VAULT/1", "/Vault;x=1/1", "//vault/1", "/./vault/1", "/x/../vault/1", "/%76ault/1", "/v%61ult/1",
    "/vault%2f1", "/vault%2F..%2Fpublic", "/public/..%2Fvault/1", "/public/%2e%2e/vault/1", "/%2e%2e/vault",
    "/vault%00/1", "/vault%5C1", "/vault\\1", "/vault%zz", "/vault%252F1", "/public%25%32%46..%25%32%46vault%25%32%461",
    "/vault/1?x=/public", "/vault/1#/public", "/vault%3B/1",
]


@pytest.fixture(scope="module")
def raw_gw(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Any) -> Iterator[Envoy]:
    """The same policy behind an Envoy that does *not* normalise paths (Envoy's default): the
    filter's own normalisation is all there is."""
    config = bootstrap({"policy": POLICY}, upstream_port=upstream.server_port, wasm=wasm)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.update({"normalize_path": False, "merge_slashes": False})
    hcm.pop("path_with_escaped_slashes_action", None)
    envoy = Envoy(config, tmp_path_factory.mktemp("module-attacks-raw-paths"), name="attacks-raw-paths").start()
    STARTED.append(envoy)
    try:
        yield envoy
    finally:
        envoy.stop()


@pytest.mark.parametrize("which", ["normalising-envoy", "raw-envoy"])
@pytest.mark.parametrize("path", VAULT_SPELLINGS)
def test_no_spelling_of_a_protected_path_reaches_the_upstream(request_fixture: Any, which: str, path: str) -> None:
    gateway = request_fixture("gw" if which == "normalising-envoy" else "raw_gw")
    r = raw_request(gateway, http_head(path, [("Host", "any.example"), ("x-api-key", KEYS["app-a"])]))
    kept_out_of_vault(r, path)


def kept_out_of_vault(r: Response, path: str) -> None:
    """`path` (a spelling of dataset `vault`) was refused: by its dataset (403), by the filter as
    unsafe (400 `invalid-path`) or by Envoy itself (400)."""
    assert r.status != 200, f"{path!r} reached the upstream as {r.upstream['path']!r}: it escaped dataset `vault`"
    if r.status == 403:
        responds_with(r, 403, "access-denied", app="app-a")
    elif r.header("content-type") == "application/problem+json":
        responds_with(r, 400, "invalid-path")
    else:
        assert r.status == 400, f"Envoy itself should refuse it with 400:\n{r}"


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    return request.getfixturevalue


@pytest.mark.parametrize("method", ["delete", "Delete", "DELETE"])
def test_method_case_does_not_dodge_rules(gw: Envoy, method: str) -> None:
    r = raw_request(gw, http_head("/orders/1", [("Host", "any.example"), ("x-api-key", KEYS["app-a"])], method=method))
    if r.status == 400 and r.header("content-type") != "application/problem+json":
        return  # Envoy refused the method spelling itself
    responds_with(r, 403, "access-denied", app="app-a")


# === oversized and repeated headers, mixed credentials ===


def test_oversized_header_values(gw: Envoy) -> None:
    responds_with(request(gw.url, "/orders", headers={"x-api-key": "k" * 50_000}), 401, "unauthenticated")
    r = responds_with(request(gw.url, "/orders", headers=with_key("app-a", **{"x-junk": "j" * 50_000})), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "app-a"
    r = request(gw.url, "/orders", headers=with_key("app-a", **{"x-junk": "j" * 70_000}))
    assert r.status == 431, f"Envoy's header limit should answer 431:\n{r}"


def test_many_headers(gw: Envoy) -> None:
    junk = [(f"x-junk-{i}", "v") for i in range(80)]
    responds_with(request(gw.url, "/orders", headers=[*junk, ("x-api-key", KEYS["app-a"])]), 200)
    r = request(gw.url, "/orders", headers=[*[(f"x-junk-{i}", "v") for i in range(200)], ("x-api-key", KEYS["app-a"])])
    assert r.status == 431, f"Envoy's header count limit (100) should answer 431:\n{r}"


@pytest.mark.parametrize(
    "keys",
    [
        [KEYS["app-a"], KEYS["app-a"]],
        [KEYS["app-a"], KEYS["app-b"]],
        [KEYS["app-a"], "k-nobody"],
        ["k-nobody", KEYS["app-a"]],
        [KEYS["app-a"], ""],
        [KEYS["app-a"]] * 50,
    ],
    ids=["same-twice", "two-apps", "valid-then-unknown", "unknown-then-valid", "valid-then-empty", "fifty"],
)
def test_repeated_api_keys_are_refused(gw: Envoy, keys: list[str]) -> None:
    names = ["x-api-key", "X-API-KEY", "X-Api-Key"]
    headers = [(names[i % len(names)], k) for i, k in enumerate(keys)]
    responds_with(request(gw.url, "/orders", headers=headers), 401, "unauthenticated")


def test_api_key_and_token_of_different_apps_are_refused(gw: Envoy) -> None:
    token_a = ED.sign(good_claims(azp="app-a"))
    token_b = ED.sign(good_claims(azp="app-b"))
    forged_a = ATTACKER_SAME_KID.sign(good_claims(azp="app-a"))

    def both(key: str, token: str) -> Response:
        return request(gw.url, "/orders", headers=[("x-api-key", KEYS[key]), ("authorization", f"Bearer {token}")])

    responds_with(both("app-a", token_b), 401, "unauthenticated")
    responds_with(both("app-b", token_a), 401, "unauthenticated")
    responds_with(both("app-a", forged_a), 401, "unauthenticated")
    # Control: both naming the same app is fine.
    assert responds_with(both("app-a", token_a), 200).upstream["headers"].get("x-guardrail-app") == "app-a"


def test_two_bearer_tokens_are_refused(gw: Envoy) -> None:
    token_a = ED.sign(good_claims(azp="app-a"))
    token_b = ED.sign(good_claims(azp="app-b"))
    headers = [("authorization", f"Bearer {token_a}"), ("Authorization", f"Bearer {token_b}")]
    responds_with(request(gw.url, "/orders", headers=headers), 401, "unauthenticated")
    joined = {"authorization": f"Bearer {token_a}, Bearer {token_b}"}
    responds_with(request(gw.url, "/orders", headers=joined), 401, "unauthenticated")


# === hostile bytes: a request with bytes that are not UTF-8 still gets a decision ===


NON_UTF8_HEADERS = [
    ("x-junk", b"\xff\xfe"),
    ("x-api-key", KEYS["app-a"].encode() + b"\xff"),
    ("authorization", b"Bearer \xc3\x28"),
    ("user-agent", "caf\u00e9".encode("latin-1")),
]


def test_non_utf8_header_values_get_a_decision(own_gw: Callable[..., Envoy]) -> None:
    # Envoy passes header values with bytes 0x80-0xFF (obs-text, RFC 9110 §5.5) to the filter.
    gateway = own_gw({"policy": POLICY}, name="attacks-bytes")
    for name, value in NON_UTF8_HEADERS:
        for _ in range(4):  # on new connections, so both workers get one
            credential = [] if name == "x-api-key" else [("x-api-key", KEYS["app-a"])]
            r = raw_request(gateway, http_head("/orders", [("Host", "any.example"), *credential, (name, value)]))
            assert r.status in (200, 400, 401), f"no decision for a non-UTF-8 `{name}`:\n{r}\n{gateway.log_tail(6)}"
        # The filter still decides on every worker afterwards.
        statuses = [request(gateway.url, "/orders", headers=with_key("app-a")).status for _ in range(12)]
        assert statuses == [200] * 12, f"after a non-UTF-8 `{name}`, requests got {statuses}:\n{gateway.log_tail(6)}"


# === policy authors: the deepest expressions the limits allow still load and decide ===


def test_deepest_rule_expressions_within_the_limits(own_gw: Callable[..., Envoy]) -> None:
    # Every rule but the last two is false, so each request evaluates all of them; the last two
    # fail to evaluate at their full depth (a field of a string), which denies, naming the rule.
    rules = [
        {"id": "deep-not", "effect": "deny", "when": "!" * 2040 + "false"},
        {"id": "deep-neg", "effect": "deny", "when": "-" * 2030 + "1 == -1"},
        {"id": "deep-plus", "effect": "deny", "when": "1" + " + 1" * 509 + " == 1"},
        {"id": "deep-brackets", "effect": "deny", "when": "(" * 24 + "request.method == 'POST'" + ")" * 24},
        {"id": "deep-select", "effect": "deny", "when": "app" + ".id" * 675 + " == 'x'", "datasets": ["orders"]},
        {"id": "deep-index", "effect": "deny", "when": "request.headers" + "['x']" * 400 + " == 'x'"},
    ]
    for rule in rules:
        assert len(rule["when"]) <= 2048, rule["id"]
    deep = {**POLICY, "rules": rules, "revision": "attacks-deep"}
    gateway = own_gw({"policy": deep}, name="attacks-deep-rules")
    for path, rule in (("/orders/1", "deep-select"), ("/elsewhere", "deep-index")):
        r = request(gateway.url, path, headers=with_key("app-a", x="y"))
        responds_with(r, 403, "access-denied", app="app-a")
        assert r.json().get("rule") == rule, r


@pytest.mark.parametrize("call", [".exists(", ". exists("], ids=["plain", "spaced"])
def test_a_rule_whose_cost_explodes_is_refused_or_bounded(launch: Any, call: str) -> None:
    # 8 nested comprehensions over 10 elements: 10^8 evaluations, within the length and bracket
    # bounds (under 300 bytes, 8 brackets deep). It must be refused when the policy is loaded, or
    # be cut short at request time: a request may not hold a worker for minutes. CEL skips
    # whitespace between tokens, so `. exists(` is the same macro as `.exists(`.
    when = "false"
    for i in range(8):
        when = f"[0,1,2,3,4,5,6,7,8,9]{call}v{i}, {when})"
    bomb = {**POLICY, "rules": [{"id": "cost-bomb", "effect": "deny", "when": when}], "revision": "attacks-bomb"}
    gateway = launch({"policy": bomb}, name="attacks-cost-bomb", start=False)
    STARTED.append(gateway)
    if gateway.settle() == "exited":
        assert "cost-bomb" in gateway.log(), "Envoy refused the policy without naming the rule"
        return
    started = time.monotonic()
    try:
        r = request(gateway.url, "/orders", headers=with_key("app-a"), timeout=3)
    except (socket.timeout, TimeoutError):
        if gateway.proc is not None:  # its worker will not stop on SIGTERM while it loops
            os.killpg(gateway.proc.pid, signal.SIGKILL)
        pytest.fail(f"rule `cost-bomb` held a worker for more than 3 s (still running): {when}")
    assert time.monotonic() - started < 3
    assert r.status != 200 or "cost-bomb" not in gateway.log(), r


# === HTTP/2: the same decisions whatever the protocol ===
#
# Clients may speak HTTP/2 to Envoy (cleartext with prior knowledge here; the listener's codec is
# AUTO, as in most meshes). Its requests reach the filter as the same header map, but with their own
# spellings: `:authority` instead of Host, methods as sent, repeated fields as separate entries.


def h2_request(gw: Envoy, path: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None) -> Response:
    """One HTTP/2 request over cleartext (prior knowledge), sent with curl, the path as it is
    (`--path-as-is`); a `Host` header becomes `:authority`."""
    assert shutil.which("curl"), "curl is needed for the HTTP/2 attacks (apt-get install curl)"
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        cmd = ["curl", "-sS", "--http2-prior-knowledge", "--path-as-is", "--max-time", "10", "-X", method,
               "-D", str(head), "-o", str(body), "-w", "%{http_version}"]
        for name, value in headers or []:
            cmd += ["-H", f"{name}: {value}"]
        cmd.append(f"http://127.0.0.1:{gw.port}{path}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr}"
        assert done.stdout == "2", f"curl did not speak HTTP/2 (http_version {done.stdout!r})"
        status_line, *lines = head.read_text().splitlines()
        merged: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                name, value = name.strip().lower(), value.strip()
                merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return Response(int(status_line.split()[1]), merged, body.read_bytes(), url=f"{method} h2 {path}")


def test_http2_requests_are_decided_as_http1_ones(gw: Envoy) -> None:
    responds_with(h2_request(gw, "/orders"), 401, "unauthenticated")
    spoofed = [*SPOOFED, ("x_guardrail_app", "app-b"), ("x-guardrail_tier", "platinum")]
    r = responds_with(h2_request(gw, "/orders", headers=[*spoofed, ("x-api-key", KEYS["app-a"])]), 200)
    seen = r.upstream["headers"]
    assert (seen.get("x-guardrail-app"), seen.get("x-guardrail-tier")) == ("app-a", "standard"), seen
    leaked = {k: v for k, v in seen.items()
              if k.replace("_", "-").startswith("x-guardrail-") and k not in ("x-guardrail-app", "x-guardrail-tier")}
    assert not leaked, f"client-set headers reached the upstream over HTTP/2: {leaked}"
    assert "x-api-key" not in seen, "the API key must not reach the upstream"
    assert r.header("ratelimit") and r.header("ratelimit-policy"), r
    r = responds_with(h2_request(gw, "/orders", headers=list(bearer(ED.sign(good_claims())).items())), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "jwt-app"


@pytest.mark.parametrize("method", ["delete", "Delete", "DELETE"])
def test_http2_method_case_does_not_dodge_rules(gw: Envoy, method: str) -> None:
    # HTTP/2 carries the method as sent (`:method: delete`), and Envoy 1.40 passes it on as it is
    # (over HTTP/1.1 it refuses lower case itself): the filter must meet it with the DELETE rule.
    r = h2_request(gw, "/orders/1", method=method, headers=list(with_key("app-a").items()))
    responds_with(r, 403, "access-denied", app="app-a")
    assert r.json().get("rule") == "no-deletes", r


@pytest.mark.parametrize(
    "keys",
    [[KEYS["app-a"], KEYS["app-a"]], [KEYS["app-a"], KEYS["app-b"]], ["k-nobody", KEYS["app-a"]]],
    ids=["same-twice", "two-apps", "unknown-then-valid"],
)
def test_http2_repeated_api_keys_are_refused(gw: Envoy, keys: list[str]) -> None:
    responds_with(h2_request(gw, "/orders", headers=[("x-api-key", k) for k in keys]), 401, "unauthenticated")


@pytest.mark.parametrize("host", [API_HOST, "API.EXAMPLE", "api.example:80", "api.example."])
def test_http2_authority_selects_the_dataset(gw: Envoy, host: str) -> None:
    r = h2_request(gw, "/customers/1", headers=[("Host", host), ("x-api-key", KEYS["app-a"])])
    responds_with(r, 403, "access-denied", app="app-a")
    assert r.json().get("rule") == "data-class", r


def test_http2_control_other_authorities_are_not_in_the_dataset(gw: Envoy) -> None:
    r = h2_request(gw, "/customers/1", headers=[("Host", "other.example"), ("x-api-key", KEYS["app-a"])])
    assert responds_with(r, 200).upstream["headers"]["host"] == "other.example"


@pytest.mark.parametrize("which", ["normalising-envoy", "raw-envoy"])
@pytest.mark.parametrize("path", [p for p in VAULT_SPELLINGS if "#" not in p])  # curl keeps fragments to itself
def test_http2_no_spelling_of_a_protected_path_reaches_the_upstream(request_fixture: Any, which: str, path: str) -> None:
    gateway = request_fixture("gw" if which == "normalising-envoy" else "raw_gw")
    kept_out_of_vault(h2_request(gateway, path, headers=[("Host", "any.example"), ("x-api-key", KEYS["app-a"])]), path)


# === last: no Envoy of this module ever saw the filter crash ===

CRASH_SIGNS = re.compile(
    r"panicked|panic|wasm trap|unreachable|Function: proxy_on_\w+ failed|Uncaught RuntimeError|stack overflow",
    re.IGNORECASE,
)


def test_zz_no_envoy_log_shows_a_crashed_filter() -> None:
    if not STARTED:
        pytest.skip("no Envoy was started in this run (tests deselected)")
    problems = []
    for envoy in STARTED:
        bad = [line for line in envoy.log().splitlines() if CRASH_SIGNS.search(line)]
        if bad:
            problems.append(f"{envoy.name} ({envoy.log_path}):\n  " + "\n  ".join(line[:400] for line in bad[:10]))
    assert not problems, "the filter crashed:\n" + "\n".join(problems)
    still = [e.name for e in STARTED if e.proc is not None and not e.running]
    assert not still, f"Envoy exited during the attacks: {still}"
