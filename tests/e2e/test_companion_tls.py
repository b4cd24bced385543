"""The companion over mutual TLS: `guardrail serve --tls-cert --tls-key --tls-client-ca` and Envoys
whose `guardrail_control` cluster has a TLS transport socket (README "Companion TLS").

An Envoy with a client certificate from the companion's client CA gets every push; Envoys that
speak plain text, present no certificate, or one from another CA are refused and keep enforcing
what they had (their inline policy). `guardrail status` needs the CA and a client certificate too.
The companion logs which client certificate opened each stream and each failed handshake with
rustls's reason, and takes renewed certificate files without a restart (refusing a broken renewal
and keeping what it had). The certificates are made here (Python `cryptography`), valid for an hour.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from companion import Companion, guardrail, write_policy
from harness import Envoy, bootstrap, free_port, request, responds_with, wait_for
from policies import app, policy, tier

SERVER_NAME = "guardrail-companion"
KEYS = {"x-app": "k-companion-tls-x-0001"}
REFUSED_FOR = 2.0  # seconds more a refused Envoy gets to (fail to) connect: many attempts (backoff from 100 ms)


def make_policy(revision: str, x: str) -> dict[str, Any]:
    return policy(revision=revision, tiers={"standard": tier(60000, "1m", burst=10000, daily_budget=1_000_000)},
                  apps=[app("x-app", lifecycle=x, keys=[KEYS["x-app"]])])


# === certificates ===


@dataclass
class Issued:
    cert: Path
    key: Path


class Pki:
    """A CA that signs server and client certificates, written as PEM files under `dir`."""

    def __init__(self, dir: Path, name: str) -> None:
        self.dir, self.name = dir, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self.ca = (self._builder(subject, subject, self.key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .sign(self.key, hashes.SHA256()))
        self.ca_pem = dir / f"{name}-ca.pem"
        self.ca_pem.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1)))

    def issue(self, cn: str, *, server: bool, to: Issued | None = None) -> Issued:
        """A certificate for `cn` and its key, written to `to`'s files (replaced atomically) or new ones."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), self.ca.subject, key.public_key())
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(self.key, hashes.SHA256())
        issued = to or Issued(self.dir / f"{self.name}-{cn}.pem", self.dir / f"{self.name}-{cn}.key")
        replace(issued.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        replace(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        return issued


def replace(path: Path, data: bytes) -> None:
    """Writes `path` as a renewal tool does: a file beside it (owner-only), renamed over it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def tls_socket(ca: Path, client: Issued | None) -> dict[str, Any]:
    """The `guardrail_control` cluster's transport socket: verify the companion, present `client`."""
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(ca)},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}],
        },
    }
    if client is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(client.cert)},
                                       "private_key": {"filename": str(client.key)}}]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": SERVER_NAME,
            "common_tls_context": common,
        },
    }


# === fixtures ===


@dataclass
class Env:
    tmp: Path
    pki: Pki
    server: Issued
    client: Issued
    policy_file: Path
    comp: Companion
    upstream_port: int
    wasm: Path

    def gateway(self, name: str, socket: dict[str, Any] | None) -> Envoy:
        """An Envoy (two workers) whose inline policy quarantines x-app, linked to the companion
        through `socket` (None: plain text)."""
        config = bootstrap({"policy": make_policy("inline-1", "quarantined"), "control": {"cluster": "guardrail_control"}},
                           upstream_port=self.upstream_port, wasm=self.wasm, control_port=self.comp.port)
        config["node"] = {"id": name, "cluster": "e2e-tls"}
        if socket is not None:
            control = next(c for c in config["static_resources"]["clusters"] if c["name"] == "guardrail_control")
            control["transport_socket"] = socket
        return Envoy(config, self.tmp / name, name=name).start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("companion-tls")
    pki = Pki(tmp, "fleet")
    server = pki.issue("companion", server=True)
    client = pki.issue("envoy", server=False)
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy("tls-1", "published"))
    comp = Companion(policy_file, tmp / "comp", port=free_port(),
                     args=["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(pki.ca_pem)],
                     status_args=["--tls-ca", str(pki.ca_pem), "--tls-cert", str(client.cert), "--tls-key", str(client.key)])
    comp.start()
    try:
        yield Env(tmp, pki, server, client, policy_file, comp, upstream.server_port, wasm)
    finally:
        comp.stop()


def x_app_status(gw: Envoy) -> int:
    return request(gw.url, "/", headers={"x-api-key": KEYS["x-app"]}).status


# === tests ===


def test_the_companion_says_it_serves_mutual_tls(env: Env) -> None:
    assert "mutual TLS" in env.comp.wait_for_log(r"serving policy revision \S+ .*\)").group(0)


def test_an_envoy_with_a_client_certificate_gets_every_push(env: Env) -> None:
    gw = env.gateway("tls-good", tls_socket(env.pki.ca_pem, env.client))
    try:
        wait_for(lambda: env.comp.node_acked("tls-1"), timeout=20, what="the node to ACK tls-1 over mutual TLS")
        # The log says which certificate opened the stream (the node id is only the client's word).
        fingerprint = hashlib.sha256(der_of(env.client.cert)).hexdigest()
        env.comp.wait_for_log(r"node tls-good/\S+ connected from 127\.0\.0\.1:\d+ "
                              rf"\(client certificate sha256:{fingerprint}\)")
        [node] = env.comp.connected_nodes()
        assert node["client_certificate"] == f"sha256:{fingerprint}", node
        wait_for(lambda: x_app_status(gw) == 200, timeout=10, what="the pushed policy (x-app published) in force")
        write_policy(env.policy_file, make_policy("tls-2", "quarantined"))
        wait_for(lambda: env.comp.node_acked("tls-2"), timeout=20, what="the node to ACK tls-2")
        wait_for(lambda: x_app_status(gw) == 403, timeout=10, what="tls-2 (x-app quarantined) in force")
        responds_with(request(gw.url, "/", headers={"x-api-key": KEYS["x-app"]}), 403, "app-not-active", app="x-app")
    finally:
        gw.stop()
        write_policy(env.policy_file, make_policy("tls-1", "published"))
        wait_for(lambda: env.comp.status().get("revision") == "tls-1", timeout=10, what="tls-1 served again")


@pytest.mark.parametrize("how", ["plain-text", "no-client-certificate", "certificate-of-another-ca", "wrong-companion-ca"])
def test_envoys_without_the_trust_of_both_sides_never_get_the_policy(env: Env, how: str) -> None:
    rogue = Pki(env.tmp, f"rogue-{how}")
    socket = {
        "plain-text": None,
        "no-client-certificate": tls_socket(env.pki.ca_pem, None),
        "certificate-of-another-ca": tls_socket(env.pki.ca_pem, rogue.issue("envoy", server=False)),
        # Envoy must not trust a companion its CA did not sign (a fake companion could push anything).
        "wrong-companion-ca": tls_socket(rogue.ca_pem, env.client),
    }[how]
    gw = env.gateway(f"tls-{how}", socket)
    try:
        wait_for(lambda: "control stream closed" in gw.log(), timeout=15, what=f"{how}: a refused connection attempt")
        time.sleep(REFUSED_FOR)
        assert env.comp.connected_nodes() == [], f"{how}: a node connected:\n{env.comp.status()}"
        # Still the inline policy (x-app quarantined), though the companion serves x-app published.
        responds_with(request(gw.url, "/", headers={"x-api-key": KEYS["x-app"]}), 403, "app-not-active", app="x-app")
        assert "ACK revision" not in gw.log(), f"{how}: the gateway took a snapshot"
        # The companion says who failed and why (rustls's reason), for whoever debugs the link.
        reason = {
            "plain-text": "received corrupt message of type InvalidContentType",
            "no-client-certificate": "peer sent no certificates",
            "certificate-of-another-ca": "invalid peer certificate: UnknownIssuer",
            "wrong-companion-ca": "received fatal alert: UnknownCA",
        }[how]
        env.comp.wait_for_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed: " + re.escape(reason))
    finally:
        gw.stop()


def test_status_needs_the_ca_and_a_client_certificate(env: Env) -> None:
    plain = guardrail("status", "--server", env.comp.address)
    assert plain.returncode == 1 and "--tls-ca" in plain.stderr, plain.stderr
    ca_only = guardrail("status", "--server", env.comp.address, "--tls-ca", str(env.pki.ca_pem))
    assert ca_only.returncode == 1 and "--tls-cert" in ca_only.stderr, ca_only.stderr
    full = guardrail("status", "--server", env.comp.address, *env.comp.status_args)
    assert full.returncode == 0 and "serving revision tls-1" in full.stdout, full.stdout + full.stderr


def test_a_key_that_is_not_the_certificates_stops_serve(env: Env) -> None:
    other = env.pki.issue("other-companion", server=True)
    out = guardrail("serve", "--policy", str(env.policy_file), "--listen", "127.0.0.1:0",
                    "--tls-cert", str(env.server.cert), "--tls-key", str(other.key), timeout=15)
    assert out.returncode == 1, out.stderr
    assert f"--tls-key {other.key}: not the private key of the certificate in --tls-cert {env.server.cert}" in out.stderr, \
        out.stderr


def served_certificate(env: Env) -> bytes:
    """The DER certificate the companion presents to a new connection (as an Envoy with a client
    certificate, over HTTP/2)."""
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_pem))
    ctx.load_cert_chain(str(env.client.cert), str(env.client.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", env.comp.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def der_of(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_refused(env: Env) -> None:
    gw = env.gateway("tls-renewal", tls_socket(env.pki.ca_pem, env.client))
    try:
        wait_for(lambda: env.comp.node_acked("tls-1"), timeout=20, what="the node to ACK tls-1")
        [node] = [n["node_id"] for n in env.comp.connected_nodes()]
        assert served_certificate(env) == der_of(env.server.cert)
        before = der_of(env.server.cert)
        changed = len(re.findall("TLS certificate files changed: new connections get them", env.comp.log()))

        env.pki.issue("companion-renewed", server=True, to=env.server)
        renewed = der_of(env.server.cert)
        assert renewed != before
        wait_for(lambda: env.comp.log().count("TLS certificate files changed: new connections get them") > changed,
                 timeout=10, what="the companion to read the renewed certificate")
        assert served_certificate(env) == renewed
        # The stream opened before the renewal stays up, and pushes still reach it.
        write_policy(env.policy_file, make_policy("tls-3", "quarantined"))
        wait_for(lambda: env.comp.node_acked("tls-3"), timeout=20, what="tls-3 ACKed over the stream opened before")
        assert [n["node_id"] for n in env.comp.connected_nodes()] == [node], env.comp.status()
        assert re.findall(r"node (\S+) connected from", env.comp.log()).count(node) == 1, "the stream was reopened"

        # A renewal that went wrong (the key is not PEM): refused, the renewed certificate stays.
        replace(env.server.key, b"not a key\n")
        env.comp.wait_for_log(r"TLS certificate files changed but are refused, the ones read before stay in force: "
                              r"--tls-key \S+: holds no PEM private key")
        assert served_certificate(env) == renewed
        assert env.comp.running
    finally:
        gw.stop()
        env.pki.issue("companion", server=True, to=env.server)
        write_policy(env.policy_file, make_policy("tls-1", "published"))
        wait_for(lambda: env.comp.status().get("revision") == "tls-1", timeout=10, what="tls-1 served again")
