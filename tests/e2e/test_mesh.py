"""Fitting a real mesh (SPEC "Fitting a real mesh", issue 19), end to end in real Envoys with two
workers, the real guardrail.wasm and the echo upstream, so every test can also assert what reached
the upstream, byte for byte.

- Who owns which header: `settings.identity.token_header` and `forward_token`. A value that is not
  Guardrail's (another scheme, an opaque bearer, a JWT of an issuer the policy does not name)
  passes untouched beside an API key and is 401 without one; a token of a configured issuer that
  fails is always 401.
- Exemptions by route and by mTLS peer under real mutual TLS (a CA and client certificates with
  SPIFFE URI SANs made here): a listed peer (exactly, or under a `*` prefix) passes; an unlisted
  one, a client without a certificate, a plain-text client, a forged `x-forwarded-client-cert`, a
  SAN spelled to fool a naive split, a certificate of another CA do not. Exempt requests take no
  quota, carry no `x-guardrail-app` and count as `exempt`. `guardrail check` refuses an exemption
  that reaches a regulated or confidential dataset.
- CORS preflights without a credential pass (counted as `preflight`); with a forged one they are
  401. With Envoy's CORS filter before Guardrail, Envoy answers preflights itself.
- Repeated headers over HTTP/1.1 and HTTP/2 (h2c, prior knowledge): a deny rule that holds for any
  value denies, an allow rule must hold for all; thousands of them get a clear refusal.
- Decision log lines (method, host, normalised path, dataset, connector; an unknown key's
  fingerprint, never the key), the audit line of admitted access to sensitive data, the RateLimit
  fields of a 429, and the JSON access log with Guardrail's app, code and dataset.

Gateways (one policy, `identity` settings varying), started side by side:

    mesh   token_header authorization (default), forward_token false (default); TLS and plain text
           on one port; x-forwarded-client-cert forwarded as the client sent it (so a forged one
           reaches the filter); Envoy's path normalisation off, Envoy's header limits as shipped
    fwd    token_header x-app-token, forward_token true
    own    token_header x-guardrail-token
    edge   Envoy's CORS filter before Guardrail; header limits raised to 10,000 headers / 1 MiB
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import (DownstreamTls, Envoy, Response, bootstrap, quiet_stats, request, require_artifact, responds_with,
                     settled_deltas, wait_for)
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, claims, swap_payload

ISSUER = "https://id.mesh.e2e.example"
AUDIENCE = "guardrail-mesh"
ED = SigningKey.ed25519("mesh-ed25519")
# The mesh's own IdP (what Istio's RequestAuthentication validates): no issuer of the policy.
IDP = "https://idp.retailco.e2e.example"
IDP_KEY = SigningKey.p256("idp-p256")

EU = "eu-west-1"
TD = "spiffe://mesh.e2e.example"
LEDGER = f"{TD}/ns/billing/sa/ledger"      # listed exactly
PROBER = f"{TD}/ns/ops/sa/prober"          # under the listed prefix ns/ops/*
STRANGER = f"{TD}/ns/web/sa/frontend"      # listed nowhere
NEAR_MISS = f"{TD}/ns/opsx/sa/prober"      # shares the prefix's characters, not its segment
INJECTED = f"{STRANGER},{LEDGER}"          # one SAN, spelled to fool a split on ","

KEYS = {"mesh-app": "k-mesh-app-0000001", "metered": "k-mesh-metered-0001", "throttled": "k-mesh-throttled-001"}
UNKNOWN_KEY = "k-mesh-nobody-knows-me-42"

ORIGIN = "https://pos.retailco.e2e.example"


def make_policy(identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    classes = ["public", "internal", "confidential", "regulated"]
    doc = policy(
        revision="mesh-1",
        settings={"gateway_region": EU},
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [ED.jwk()])],
        tiers={
            "standard": tier(60000, "1m", burst=10000, daily_budget=1_000_000),
            "tiny": tier(2, "1h", burst=2, daily_budget=1000),
        },
        apps=[
            app("mesh-app", data_classes=classes, keys=[KEYS["mesh-app"]]),
            app("token-app", data_classes=classes),  # no API key: identified by its tokens alone
            app("metered", tier="tiny", keys=[KEYS["metered"]]),
            app("throttled", tier="tiny", keys=[KEYS["throttled"]]),
        ],
        datasets=[
            {"id": "patients", "classification": "regulated", "owner_department": "care",
             "allowed_regions": [EU], "routes": [{"path_prefix": "/patients"}]},  # requires_jit: default true
            {"id": "contracts", "classification": "confidential", "owner_department": "legal",
             "allowed_regions": [EU], "routes": [{"path_prefix": "/contracts"}], "requires_jit": False},
            {"id": "docs", "classification": "public", "owner_department": "platform",
             "allowed_regions": [EU], "routes": [{"path_prefix": "/docs"}]},
            {"id": "tickets", "classification": "public", "owner_department": "support",
             "allowed_regions": [EU], "routes": [{"path_prefix": "/tickets"}]},
            {"id": "reports", "classification": "internal", "owner_department": "finance",
             "allowed_regions": [EU], "routes": [{"path_prefix": "/reports"}]},
        ],
        rules=[
            {"id": "no-blocked-tickets", "effect": "deny", "when": "request.headers['x-t'] == 'blocked'",
             "datasets": ["tickets"], "message": "blocked tickets stay closed"},
            {"id": "reports-for-ok", "effect": "allow", "when": "request.headers['x-u'] == 'ok'",
             "datasets": ["reports"]},
        ],
        exemptions=[
            {"id": "probes", "routes": [{"path_prefix": "/livez", "methods": ["GET"]}],
             "reason": "the kubelet's liveness probes carry no credential"},
            {"id": "mesh-callbacks", "routes": [{"path_prefix": "/internal"}], "peers": [LEDGER, f"{TD}/ns/ops/*"],
             "reason": "ledger and ops workloads call back over mesh mTLS"},
        ],
    )
    if identity:
        doc["settings"]["identity"].update(identity)
    return doc


# === certificates ===


@dataclass
class Issued:
    cert: Path
    key: Path


class SpiffeCa:
    """A CA issuing a server certificate for 127.0.0.1 and client certificates whose only SAN is a
    SPIFFE id (URI), as a mesh's workload certificates are; PEM files under `dir`."""

    def __init__(self, dir: Path, name: str) -> None:  # noqa: A002 (a directory)
        self.dir, self.name, self.count = dir, name, 0
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (self._builder(subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = dir / f"{name}-ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        issuer = self.cert.subject if hasattr(self, "cert") else subject
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2)))

    def issue(self, *, uri: str | None = None, server: bool = False) -> Issued:
        self.count += 1
        key = ec.generate_private_key(ec.SECP256R1())
        if server:
            san: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            assert uri is not None
            san, usage = [x509.UniformResourceIdentifier(uri)], ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (self._builder(x509.Name([]) if not server else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                              key.public_key())
                .add_extension(x509.SubjectAlternativeName(san), critical=not server)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        issued = Issued(self.dir / f"{self.name}-{self.count}.pem", self.dir / f"{self.name}-{self.count}.key")
        issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return issued


# === gateways ===


def mesh_bootstrap(doc: Mapping[str, Any], upstream_port: int, wasm: Path, envoy: Envoy,
                   tls: DownstreamTls | None = None) -> dict[str, Any]:
    config = bootstrap({"policy": doc}, upstream_port=upstream_port, wasm=wasm, access_log_path=envoy.access_log_path,
                       downstream_tls=tls)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # The filter alone normalises paths (as envoy/guardrail.yaml), so decision lines show its work.
    hcm["normalize_path"] = False
    hcm["merge_slashes"] = False
    # Forward x-forwarded-client-cert as the client sent it (Istio's inbound appends to it): a
    # forged header reaches the filter, which must not take a peer from it.
    hcm["forward_client_cert_details"] = "ALWAYS_FORWARD_ONLY"
    return config


def edge_bootstrap(doc: Mapping[str, Any], upstream_port: int, wasm: Path, envoy: Envoy) -> dict[str, Any]:
    """Envoy's CORS filter before Guardrail (README "CORS"); generous header limits."""
    config = bootstrap({"policy": doc}, upstream_port=upstream_port, wasm=wasm, access_log_path=envoy.access_log_path)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    })
    hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"] = {
        "envoy.filters.http.cors": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
            "allow_origin_string_match": [{"exact": ORIGIN}],
            "allow_methods": "GET, POST",
            "allow_headers": "x-api-key, authorization, content-type",
            "max_age": "600",
        }
    }
    hcm["common_http_protocol_options"] = {"max_headers_count": 10000}
    hcm["max_request_headers_kb"] = 1024
    return config


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("mesh")
    ca = SpiffeCa(tmp, "mesh")
    server = ca.issue(server=True)
    rogue = SpiffeCa(tmp, "rogue")
    certs = {
        "ledger": ca.issue(uri=LEDGER), "prober": ca.issue(uri=PROBER), "stranger": ca.issue(uri=STRANGER),
        "near-miss": ca.issue(uri=NEAR_MISS), "injected": ca.issue(uri=INJECTED),
        "rogue-ledger": rogue.issue(uri=LEDGER),
    }
    docs = {
        "mesh": make_policy(),
        "fwd": make_policy({"token_header": "x-app-token", "forward_token": True}),
        "own": make_policy({"token_header": "x-guardrail-token"}),
        "edge": make_policy(),
    }
    gws: dict[str, Envoy] = {}
    for name in docs:
        gws[name] = Envoy({}, tmp / name, name=name)
    tls = DownstreamTls(server.cert, server.key, ca.pem)
    gws["mesh"].config = mesh_bootstrap(docs["mesh"], upstream.server_port, wasm, gws["mesh"], tls)
    for name in ("fwd", "own"):
        gws[name].config = mesh_bootstrap(docs[name], upstream.server_port, wasm, gws[name])
    gws["edge"].config = edge_bootstrap(docs["edge"], upstream.server_port, wasm, gws["edge"])
    try:
        for gw in gws.values():  # they compile the module at once
            gw.spawn()
        for gw in gws.values():
            wait_for(gw._ready, timeout=90, what=f"{gw.name} to be ready (admin /ready LIVE, listener up)")
        yield {"gws": gws, "ca": ca, "certs": certs, "docs": docs, "tmp": tmp}
    finally:
        for gw in gws.values():
            gw.stop()


@pytest.fixture(scope="module")
def gw(mesh: dict[str, Any]) -> Envoy:
    return mesh["gws"]["mesh"]


@pytest.fixture(scope="module")
def fwd(mesh: dict[str, Any]) -> Envoy:
    return mesh["gws"]["fwd"]


@pytest.fixture(scope="module")
def own(mesh: dict[str, Any]) -> Envoy:
    return mesh["gws"]["own"]


@pytest.fixture(scope="module")
def edge(mesh: dict[str, Any]) -> Envoy:
    return mesh["gws"]["edge"]


# === clients ===


def _response(status: int, pairs: Iterable[tuple[str, str]], body: bytes, url: str) -> Response:
    merged: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return Response(status, merged, body, url=url)


def http1(gw: Envoy, path: str, headers: Iterable[tuple[str, str]] = (), *, method: str = "GET",
       host: str | None = None) -> Response:
    """One HTTP/1.1 request with every header line as given, repeated names included."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return _response(resp.status, resp.getheaders(), resp.read(), f"{method} {gw.url}{path}")
    finally:
        conn.close()


def http2(gw: Envoy, path: str, headers: Iterable[tuple[str, str]] = (), *, method: str = "GET",
          tls_context: ssl.SSLContext | None = None) -> Response:
    """One HTTP/2 request over clear text with prior knowledge (Envoy's `AUTO` codec detects the
    preface), or over TLS (ALPN h2) with `tls_context`; each header field sent as given, repeated
    names included."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=20)
    if tls_context is not None:
        tls_context.set_alpn_protocols(["h2"])
        raw = tls_context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert raw.selected_alpn_protocol() == "h2", raw.selected_alpn_protocol()
    scheme = "https" if tls_context is not None else "http"
    with raw as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", method), (":scheme", scheme), (":authority", f"127.0.0.1:{gw.port}"),
                              (":path", path), *headers], end_stream=True)
        sock.sendall(conn.data_to_send())
        status, pairs, body = 0, [], b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"HTTP/2 connection closed before the response ended (status {status})")
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    pairs = [(k, v) for k, v in event.headers if not k.startswith(":")]
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"HTTP/2 stream reset: {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended:
                return _response(status, pairs, body, f"{method} h2c {gw.url}{path}")


def tls_context(ca: SpiffeCa, client: Issued | None) -> ssl.SSLContext:
    """Verifies Envoy's certificate against `ca`; presents `client` if given."""
    context = ssl.create_default_context(cafile=str(ca.pem))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def tls(gw: Envoy, ca: SpiffeCa, path: str, headers: Mapping[str, str] | None = None, *,
        client: Issued | None = None, method: str = "GET") -> Response:
    """One HTTP/1.1 request over TLS, verifying Envoy's certificate, presenting `client` if given."""
    context = tls_context(ca, client)
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=context, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return _response(resp.status, resp.getheaders(), resp.read(), f"{method} https {gw.url}{path}")
    finally:
        conn.close()


def key(app_id: str) -> dict[str, str]:
    return {"x-api-key": KEYS[app_id]}


def token(app_id: str = "mesh-app", *, ttl: int = 300, **extra: Any) -> str:
    return ED.sign(claims(iss=ISSUER, aud=AUDIENCE, azp=app_id, ttl=ttl, **extra))


def forged(app_id: str = "mesh-app") -> str:
    """A token of the configured issuer whose payload was changed after signing (`admin: true`
    added: with the same claims, swap_payload would give back the valid token)."""
    return swap_payload(token(app_id), claims(iss=ISSUER, aud=AUDIENCE, azp=app_id, admin=True))


def jit(app_id: str = "mesh-app", dataset: str = "patients", **extra: Any) -> str:
    return token(app_id, ttl=120, scope=f"dataset:{dataset}", **extra)


def admitted(r: Response, app_id: str | None) -> dict[str, Any]:
    """Asserts a 200 from the echo upstream and who it was told the app is; its view of the request."""
    responds_with(r, 200)
    seen = r.upstream
    assert seen["headers"].get("x-guardrail-app") == app_id, f"x-guardrail-app should be {app_id!r}:\n{r}"
    return seen


def reached_upstream(r: Response) -> bool:
    """Whether Envoy got `r` from the upstream (the echo server refuses over 100 headers with its
    own 431), rather than answering itself."""
    return r.header("x-envoy-upstream-service-time") is not None


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


# === who owns which header ===

NOT_GUARDRAILS = {
    "basic": "Basic bGVnYWN5LXVzZXI6czNjcmV0",
    "opaque bearer": "Bearer 2YotnFZFEjr1zCsicMWpAA.opaque~token/with+odd=chars",
    "unknown issuer": "Bearer " + IDP_KEY.sign(claims(iss=IDP, aud="retail-api", azp="mobile-web", ttl=600)),
    "lower-case scheme, unknown issuer": "bearer " + IDP_KEY.sign(claims(iss=IDP, aud=None, azp=None, ttl=600)),
}


@pytest.mark.parametrize("value", list(NOT_GUARDRAILS.values()), ids=list(NOT_GUARDRAILS))
def test_a_value_that_is_not_guardrails_passes_byte_for_byte_beside_an_api_key(gw: Envoy, value: str) -> None:
    seen = admitted(request(gw.url, "/docs/1", headers={**key("mesh-app"), "authorization": value}), "mesh-app")
    assert seen["headers"].get("authorization") == value, seen["headers"]
    assert "x-api-key" not in seen["headers"], "the API key never reaches the upstream"


@pytest.mark.parametrize("value", list(NOT_GUARDRAILS.values()), ids=list(NOT_GUARDRAILS))
def test_a_value_that_is_not_guardrails_is_401_without_an_api_key(gw: Envoy, value: str) -> None:
    responds_with(request(gw.url, "/docs/1", headers={"authorization": value}), 401, "unauthenticated")


FAILING = {
    "bad signature": forged,
    "expired": lambda: token(ttl=-600),
    "wrong audience": lambda: ED.sign(claims(iss=ISSUER, aud="someone-else", azp="mesh-app")),
    "another key, same kid": lambda: SigningKey.ed25519("mesh-ed25519").sign(claims(iss=ISSUER, aud=AUDIENCE, azp="mesh-app")),
}


@pytest.mark.parametrize("make", list(FAILING.values()), ids=list(FAILING))
def test_a_failing_token_of_a_configured_issuer_is_401_even_with_an_api_key(gw: Envoy, make: Any) -> None:
    bad = make()
    responds_with(request(gw.url, "/docs/1", headers={**key("mesh-app"), "authorization": f"Bearer {bad}"}),
                  401, "unauthenticated")
    responds_with(request(gw.url, "/docs/1", headers={"authorization": f"Bearer {bad}"}), 401, "unauthenticated")


def test_a_verified_token_is_not_forwarded_by_default(gw: Envoy) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        seen = admitted(request(gw.url, "/docs/1", headers={"authorization": f"{scheme} {token('token-app')}"}),
                        "token-app")
        assert "authorization" not in seen["headers"], f"forward_token false: {scheme} token removed: {seen['headers']}"


def test_forward_token_true_passes_the_verified_token_on(fwd: Envoy) -> None:
    t = token("token-app")
    seen = admitted(request(fwd.url, "/docs/1", headers={"x-app-token": t, "authorization": NOT_GUARDRAILS["basic"]}),
                    "token-app")
    assert seen["headers"].get("x-app-token") == t, seen["headers"]
    assert seen["headers"].get("authorization") == NOT_GUARDRAILS["basic"], "Authorization is not Guardrail's here"


def test_another_token_header_leaves_authorization_alone(own: Envoy) -> None:
    # A token of Guardrail's own issuer in Authorization, with a bad signature: not read, not changed.
    bad = "Bearer " + forged()
    t = token("token-app")
    seen = admitted(request(own.url, "/docs/1", headers={"x-guardrail-token": t, "authorization": bad}), "token-app")
    assert seen["headers"].get("authorization") == bad, seen["headers"]
    assert "x-guardrail-token" not in seen["headers"], "forward_token false: the verified token is removed"
    # Beside an API key, anything in Authorization passes too.
    seen = admitted(request(own.url, "/docs/1", headers={**key("mesh-app"), "authorization": bad}), "mesh-app")
    assert seen["headers"].get("authorization") == bad


def test_another_token_header_means_authorization_is_no_credential(own: Envoy) -> None:
    responds_with(request(own.url, "/docs/1", headers={"authorization": f"Bearer {token('token-app')}"}),
                  401, "unauthenticated")
    responds_with(request(own.url, "/docs/1", headers={**key("mesh-app"), "x-guardrail-token": forged()}),
                  401, "unauthenticated")


# === exemptions ===


def test_an_exempt_route_passes_without_a_credential(gw: Envoy) -> None:
    before = quiet_stats(gw)
    r = http1(gw, "/livez", [("x-guardrail-app", "admin")])
    seen = admitted(r, None)
    assert not any(h.startswith("x-guardrail-") for h in seen["headers"]), seen["headers"]
    deltas, _ = settled_deltas(gw, before, {"guardrail.exempt": 1})
    assert deltas["guardrail.exempt"] == 1, deltas
    entry = gw.access_log_for(r.header("x-request-id") or "")
    assert entry["guardrail_code"] == "exempt" and entry["guardrail_app"] in (None, "-", ""), entry


def test_an_exempt_route_is_only_its_methods_and_prefix(gw: Envoy) -> None:
    responds_with(http1(gw, "/livez", method="POST"), 401, "unauthenticated")
    responds_with(http1(gw, "/livezz"), 401, "unauthenticated")
    responds_with(http1(gw, "/docs/livez"), 401, "unauthenticated")


def test_exempt_requests_take_no_quota_and_carry_no_app(gw: Envoy) -> None:
    before = quiet_stats(gw)
    for i in range(5):
        headers = key("metered") if i % 2 else {}
        seen = admitted(request(gw.url, "/livez", headers=headers), None)
        assert "x-guardrail-app" not in seen["headers"], seen["headers"]
    deltas, _ = settled_deltas(gw, before, {"guardrail.exempt": 5})
    assert deltas["guardrail.exempt"] == 5, deltas
    # The bucket (burst 2) is whole: two admitted, the third refused.
    for _ in range(2):
        admitted(request(gw.url, "/docs/1", headers=key("metered")), "metered")
    responds_with(request(gw.url, "/docs/1", headers=key("metered")), 429, "quota-exceeded", app="metered")


def test_a_listed_peer_passes_under_mutual_tls(gw: Envoy, mesh: dict[str, Any]) -> None:
    ca, certs = mesh["ca"], mesh["certs"]
    before = quiet_stats(gw)
    for who, spiffe in (("ledger", LEDGER), ("prober", PROBER)):
        r = tls(gw, ca, "/internal/settle", client=certs[who])
        seen = admitted(r, None)
        entry = gw.access_log_for(r.header("x-request-id") or "")
        assert entry["peer"] == spiffe, entry
        assert entry["guardrail_code"] == "exempt", entry
    deltas, _ = settled_deltas(gw, before, {"guardrail.exempt": 2})
    assert deltas["guardrail.exempt"] == 2, deltas


def test_a_listed_peer_passes_over_http2_too(gw: Envoy, mesh: dict[str, Any]) -> None:
    ca, certs = mesh["ca"], mesh["certs"]
    r = http2(gw, "/internal/settle", tls_context=tls_context(ca, certs["prober"]))
    admitted(r, None)
    assert gw.access_log_for(r.header("x-request-id") or "")["protocol"] == "HTTP/2"
    responds_with(http2(gw, "/internal/settle", tls_context=tls_context(ca, certs["stranger"])), 401, "unauthenticated")


@pytest.mark.parametrize("who", ["stranger", "near-miss", "injected", None], ids=["unlisted", "prefix-near-miss", "comma-injected-san", "no-certificate"])
def test_an_unlisted_peer_is_not_exempt(gw: Envoy, mesh: dict[str, Any], who: str | None) -> None:
    client = mesh["certs"][who] if who else None
    responds_with(tls(gw, mesh["ca"], "/internal/settle", client=client), 401, "unauthenticated")


def test_a_listed_peer_is_exempt_only_on_the_exemptions_routes(gw: Envoy, mesh: dict[str, Any]) -> None:
    responds_with(tls(gw, mesh["ca"], "/docs/1", client=mesh["certs"]["ledger"]), 401, "unauthenticated")
    # With its own credential, a listed peer is governed as that app.
    admitted(tls(gw, mesh["ca"], "/docs/1", key("mesh-app"), client=mesh["certs"]["ledger"]), "mesh-app")


def test_a_plain_text_client_and_a_forged_client_cert_header_are_not_exempt(gw: Envoy, mesh: dict[str, Any]) -> None:
    xfcc = f'By={TD}/ns/pay/sa/api;Hash=0123456789abcdef;Subject="";URI={LEDGER}'
    responds_with(http1(gw, "/internal/settle"), 401, "unauthenticated")
    responds_with(http1(gw, "/internal/settle", [("x-forwarded-client-cert", xfcc)]), 401, "unauthenticated")
    responds_with(tls(gw, mesh["ca"], "/internal/settle", {"x-forwarded-client-cert": xfcc},
                      client=mesh["certs"]["stranger"]), 401, "unauthenticated")
    # The forged header did reach the filter's request phase: Envoy forwards it as sent here.
    seen = admitted(http1(gw, "/docs/1", [("x-forwarded-client-cert", xfcc), *key("mesh-app").items()]), "mesh-app")
    assert seen["headers"].get("x-forwarded-client-cert") == xfcc


def test_a_certificate_of_another_ca_does_not_get_through_the_handshake(gw: Envoy, mesh: dict[str, Any]) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        r = tls(gw, mesh["ca"], "/internal/settle", client=mesh["certs"]["rogue-ledger"])
        assert r.status != 200, f"a certificate of another CA claiming {LEDGER} was exempted:\n{r}"
        raise ConnectionError(f"refused with {r.status}")


def check(doc: Mapping[str, Any], tmp: Path, name: str) -> subprocess.CompletedProcess:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    return subprocess.run([str(require_artifact("GUARDRAIL_BIN")), "check", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_check_accepts_the_mesh_policy(mesh: dict[str, Any]) -> None:
    result = check(mesh["docs"]["mesh"], mesh["tmp"], "mesh-policy")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("route,dataset", [({"path_prefix": "/patients"}, "patients"),
                                           ({"path_prefix": "/contracts/archive"}, "contracts"),
                                           ({"path_prefix": "/"}, "patients")],
                         ids=["regulated", "confidential-subpath", "everything"])
def test_check_refuses_an_exemption_reaching_sensitive_data(mesh: dict[str, Any], route: dict[str, Any],
                                                            dataset: str) -> None:
    doc = make_policy()
    doc["exemptions"].append({"id": "too-wide", "routes": [route], "reason": "convenience"})
    result = check(doc, mesh["tmp"], f"too-wide-{dataset}")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "too-wide" in out and dataset in out, f"the error names the exemption and the dataset:\n{out}"


def test_check_refuses_an_exemption_with_neither_routes_nor_peers(mesh: dict[str, Any]) -> None:
    doc = make_policy()
    doc["exemptions"].append({"id": "empty", "reason": "oops"})
    result = check(doc, mesh["tmp"], "empty-exemption")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "empty" in result.stdout + result.stderr


# === CORS preflights ===

PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST",
             "access-control-request-headers": "x-api-key, content-type"}


def test_a_browser_preflight_without_a_credential_passes(gw: Envoy) -> None:
    before = quiet_stats(gw)
    r = request(gw.url, "/docs/1", method="OPTIONS", headers={**PREFLIGHT, "user-agent": "Mozilla/5.0",
                                                               "sec-fetch-mode": "cors", "accept": "*/*"})
    seen = admitted(r, None)
    assert seen["method"] == "OPTIONS" and seen["headers"]["origin"] == ORIGIN, seen
    deltas, _ = settled_deltas(gw, before, {"guardrail.preflight": 1})
    assert deltas["guardrail.preflight"] == 1, deltas
    assert gw.access_log_for(r.header("x-request-id") or "")["guardrail_code"] == "preflight"


def test_an_options_request_that_is_no_preflight_needs_a_credential(gw: Envoy) -> None:
    responds_with(request(gw.url, "/docs/1", method="OPTIONS", headers={"origin": ORIGIN}), 401, "unauthenticated")
    responds_with(request(gw.url, "/docs/1", method="OPTIONS",
                          headers={"access-control-request-method": "POST"}), 401, "unauthenticated")


@pytest.mark.parametrize("credential", [
    {"x-api-key": UNKNOWN_KEY},
    {"authorization": "Bearer " + forged()},
], ids=["unknown-api-key", "forged-token"])
def test_a_preflight_with_a_forged_credential_is_401(gw: Envoy, credential: dict[str, str]) -> None:
    responds_with(request(gw.url, "/docs/1", method="OPTIONS", headers={**PREFLIGHT, **credential}), 401, "unauthenticated")


def test_envoys_cors_filter_before_guardrail_answers_preflights(edge: Envoy) -> None:
    before = quiet_stats(edge)
    r = request(edge.url, "/docs/1", method="OPTIONS", headers=PREFLIGHT)
    assert r.status == 200, r
    assert r.header("access-control-allow-origin") == ORIGIN, r
    assert "x-api-key" in (r.header("access-control-allow-headers") or ""), r
    assert b'"method"' not in r.body, f"Envoy answered, the upstream did not:\n{r}"
    # The actual request is governed as usual, and gets its CORS headers.
    refused = responds_with(request(edge.url, "/docs/1", headers={"origin": ORIGIN}), 401, "unauthenticated")
    assert refused.header("access-control-allow-origin") == ORIGIN, f"the page can read the problem:\n{refused}"
    ok = request(edge.url, "/docs/1", headers={"origin": ORIGIN, **key("mesh-app")})
    admitted(ok, "mesh-app")
    assert ok.header("access-control-allow-origin") == ORIGIN, ok
    time.sleep(0.3)
    assert edge.counter("guardrail.preflight") - edge.counter("guardrail.preflight", before) == 0


# === repeated headers ===

CLIENTS = {"http1": http1, "http2": http2}


@pytest.mark.parametrize("client", list(CLIENTS.values()), ids=list(CLIENTS))
@pytest.mark.parametrize("values,status", [
    (["ok"], 200), (["blocked"], 403), (["ok", "blocked"], 403), (["blocked", "ok"], 403),
    (["ok", "ok", "ok", "blocked"], 403), (["ok", "ok"], 200),
], ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_a_deny_rule_holding_for_any_value_denies(gw: Envoy, client: Any, values: list[str], status: int) -> None:
    r = client(gw, "/tickets/9", [*key("mesh-app").items(), *(("x-t", v) for v in values)])
    if status == 200:
        seen = admitted(r, "mesh-app")
        assert seen["headers"].get("x-t") == ", ".join(values), "the upstream gets every value"
    else:
        responds_with(r, 403, "access-denied", app="mesh-app")
        assert r.json().get("rule") == "no-blocked-tickets", r


@pytest.mark.parametrize("client", list(CLIENTS.values()), ids=list(CLIENTS))
@pytest.mark.parametrize("values,status", [
    (["ok"], 200), (["ok", "ok"], 200), (["ok", "no"], 403), (["no", "ok"], 403), (["no"], 403),
], ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_an_allow_rule_must_hold_for_every_value(gw: Envoy, client: Any, values: list[str], status: int) -> None:
    r = client(gw, "/reports/q3", [*key("mesh-app").items(), *(("x-u", v) for v in values)])
    if status == 200:
        admitted(r, "mesh-app")
    else:
        responds_with(r, 403, "access-denied", app="mesh-app")


def test_thousands_of_repeated_headers_get_envoys_431(gw: Envoy) -> None:
    headers = [*key("mesh-app").items(), *(("x-t", "ok") for _ in range(3000)), ("x-t", "blocked")]
    r = http1(gw, "/tickets/9", headers)
    assert r.status == 431 and not reached_upstream(r), f"Envoy's own 431 (100 headers at most):\n{r}"
    admitted(request(gw.url, "/docs/1", headers=key("mesh-app")), "mesh-app")
    assert gw.crash_lines() == []


@pytest.mark.parametrize("client", list(CLIENTS.values()), ids=list(CLIENTS))
def test_thousands_of_repeated_headers_within_envoys_limits_are_refused_not_passed(edge: Envoy, client: Any) -> None:
    headers = [*key("mesh-app").items(), *(("x-t", "ok") for _ in range(3000)), ("x-t", "blocked")]
    try:
        r = client(edge, "/tickets/9", headers)
    except ConnectionError as e:  # an HTTP/2 reset is a refusal too
        r = None
        reason = str(e)
    if r is not None:
        assert r.status in (403, 431) and not reached_upstream(r), f"3,001 values, one blocked: refused clearly:\n{r}"
        if r.status == 403:
            responds_with(r, 403, "access-denied")
    else:
        assert "reset" in reason or "closed" in reason, reason
    admitted(request(edge.url, "/docs/1", headers=key("mesh-app")), "mesh-app")
    assert edge.crash_lines() == []


# === decision log lines, audit, RateLimit ===


def test_decision_lines_carry_method_host_path_dataset_and_connector(gw: Envoy) -> None:
    r = http1(gw, "/reports//q3/./summary?x=1", [*key("mesh-app").items(), ("x-u", "no")], method="POST",
           host="api.mesh.e2e.example")
    responds_with(r, 403, "access-denied")
    line = gw.decision_for(r.header("x-request-id") or "", "access-denied")
    assert line["method"] == "POST", line
    assert line["host"] == "api.mesh.e2e.example", line
    assert line["path"] in ("/reports/q3/summary", "/reports/q3/summary?x=1"), line
    assert line["dataset"] == "reports" and line["connector"] == "upstream", line


def test_an_unknown_api_key_is_logged_by_its_fingerprint_never_itself(gw: Envoy) -> None:
    r = request(gw.url, "/docs/1", headers={"x-api-key": UNKNOWN_KEY})
    responds_with(r, 401, "unauthenticated")
    line = gw.decision_for(r.header("x-request-id") or "", "unauthenticated")
    assert line["key_fingerprint"] == fingerprint(UNKNOWN_KEY), line
    for field in ("method", "host", "path", "dataset", "connector"):
        assert field in line, f"{field} missing: {line}"
    assert line["method"] == "GET" and line["path"] == "/docs/1", line
    entry = gw.access_log_for(r.header("x-request-id") or "")
    assert entry["guardrail_code"] == "unauthenticated", entry
    assert UNKNOWN_KEY not in gw.log(), "the key itself is in Envoy's log"
    assert UNKNOWN_KEY not in gw.access_log_path.read_text(), "the key itself is in the access log"


def audit_lines(gw: Envoy, request_id: str) -> list[dict[str, Any]]:
    return [o for o in gw.json_log_lines() if o.get("request_id") == request_id and o.get("verdict") == "allow"]


def test_admitted_access_to_regulated_data_writes_one_audit_line_with_the_jti(gw: Envoy) -> None:
    t = jit("mesh-app", jti="jti-mesh-7f3a")
    r = request(gw.url, "/patients/7", headers={**key("mesh-app"), "authorization": f"Bearer {t}"})
    seen = admitted(r, "mesh-app")
    assert "authorization" not in seen["headers"], "forward_token false: the JIT token is not replayable upstream"
    rid = r.header("x-request-id") or ""
    line = wait_for(lambda: audit_lines(gw, rid), what="the audit line")[0]
    time.sleep(0.2)
    assert len(audit_lines(gw, rid)) == 1, audit_lines(gw, rid)
    assert line["guardrail"] == "decision", line
    assert (line["app"], line["dataset"], line["method"], line["path"], line["jti"]) == \
        ("mesh-app", "patients", "GET", "/patients/7", "jti-mesh-7f3a"), line
    entry = gw.access_log_for(rid)
    assert (entry["guardrail_app"], entry["guardrail_code"], entry["guardrail_dataset"]) == ("mesh-app", "allow", "patients")
    # The token's scopes and lifetime (for `guardrail replay`), never the token.
    assert "dataset:patients" in (entry["guardrail_token"] or ""), entry
    assert t not in gw.access_log_path.read_text() and t.split(".")[2] not in gw.access_log_path.read_text()


def test_admitted_access_to_confidential_data_without_a_token_has_a_null_jti(gw: Envoy) -> None:
    r = request(gw.url, "/contracts/12", headers=key("mesh-app"))
    admitted(r, "mesh-app")
    rid = r.header("x-request-id") or ""
    line = wait_for(lambda: audit_lines(gw, rid), what="the audit line")[0]
    assert line["dataset"] == "contracts" and line["jti"] is None, line


def test_admitted_access_to_public_data_writes_no_audit_line(gw: Envoy) -> None:
    r = request(gw.url, "/docs/1", headers=key("mesh-app"))
    admitted(r, "mesh-app")
    gw.access_log_for(r.header("x-request-id") or "")  # the request is over
    time.sleep(0.2)
    assert audit_lines(gw, r.header("x-request-id") or "") == []


def test_a_429_carries_the_ratelimit_fields(gw: Envoy) -> None:
    for _ in range(2):
        admitted(request(gw.url, "/docs/1", headers=key("throttled")), "throttled")
    r = request(gw.url, "/docs/1", headers=key("throttled"))
    responds_with(r, 429, "quota-exceeded", app="throttled")
    assert r.header("retry-after"), r
    policy_field, field = r.header("ratelimit-policy") or "", r.header("ratelimit") or ""
    assert '"rate";q=2' in policy_field, r
    assert '"rate";r=0' in field, r


# === the access log ===


def test_the_access_log_shows_app_code_and_dataset(gw: Envoy) -> None:
    ok = request(gw.url, "/contracts/3", headers=key("mesh-app"))
    admitted(ok, "mesh-app")
    no = http1(gw, "/reports/q4", [*key("mesh-app").items(), ("x-u", "no")])
    responds_with(no, 403, "access-denied")
    anon = request(gw.url, "/docs/1")
    responds_with(anon, 401, "unauthenticated")

    entry = gw.access_log_for(ok.header("x-request-id") or "")
    assert (entry["guardrail_app"], entry["guardrail_code"], entry["guardrail_dataset"]) == ("mesh-app", "allow", "contracts"), entry
    assert int(entry["status"]) == 200 and entry["upstream_cluster"] == "upstream", entry
    assert entry["guardrail_token"] is None, "no token, no token field"
    assert entry["method"] == "GET" and entry["path"] == "/contracts/3" and entry["protocol"] == "HTTP/1.1", entry

    entry = gw.access_log_for(no.header("x-request-id") or "")
    assert (entry["guardrail_app"], entry["guardrail_code"], entry["guardrail_dataset"]) == ("mesh-app", "access-denied", "reports"), entry
    assert int(entry["status"]) == 403, entry

    entry = gw.access_log_for(anon.header("x-request-id") or "")
    assert entry["guardrail_code"] == "unauthenticated" and int(entry["status"]) == 401, entry

    text = gw.access_log_path.read_text()
    assert KEYS["mesh-app"] not in text, "an API key in the access log"
    assert set(json.loads(text.splitlines()[0])) == {
        "time", "request_id", "method", "authority", "path", "protocol", "status", "response_flags",
        "upstream_cluster", "duration_ms", "peer", "guardrail_app", "guardrail_code", "guardrail_dataset",
        "guardrail_token"}


def test_no_gateway_crashed(mesh: dict[str, Any]) -> None:
    for envoy in mesh["gws"].values():
        assert envoy.running, f"{envoy.name} stopped"
        assert envoy.crash_lines() == [], envoy.crash_lines()
