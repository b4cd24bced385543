"""The companion's HTTP port over mutual TLS (`serve --http-tls-cert --http-tls-key --http-client-ca`)
and an approver listed by certificate (issue 22): `settings.approvers[] = {id, certificate:
"sha256:<hex>"}` approves with the client certificate of the connection, no token.

The real companion (SQLite store in its work directory) serves its console, JSON API and
`/metrics` over HTTPS, requiring a client certificate from the people's CA (made here with the
`Pki` of test_companion_tls.py). An app files a request with Python `requests`, presenting a
certificate of that CA and its API key (HTTP Basic); the approver approves it with `guardrail
approve --tls-ca --tls-cert --tls-key` and `guardrail status` shows the revision pushed. A
certificate not listed among the approvers is refused naming its fingerprint; without a client
certificate, or with one from another CA, the TLS handshake is refused (health checks included);
plain HTTP to the port gets a 400 saying to use https://. A renewed certificate is served without
a restart.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, guardrail, write_policy
from harness import free_port, hash_key, wait_for
from policies import app, policy, tier
from test_companion_tls import Issued, Pki, der_of

KEY = "k-https-claims-0001"
BOB_TOKEN = "t-https-approver-bob-0001"
TOMORROW = (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=10)).isoformat()
ID = re.compile(r"^req-[0-9a-f]{12}$")


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(der_of(cert)).hexdigest()


@dataclass
class Env:
    tmp: Path
    pki: Pki
    base: str  # https://127.0.0.1:PORT
    port: int
    people: dict[str, Issued]  # alice (approver), mallory (not one), claims-bot (the app's)
    stranger: Issued  # signed by another CA
    server: Issued  # the HTTP port's certificate
    files: dict[str, Path]
    comp: Companion

    def tls(self, who: str) -> list[str]:
        """The CLI's TLS flags presenting `who`'s certificate."""
        return ["--tls-ca", str(self.pki.ca_pem), "--tls-cert", str(self.people[who].cert),
                "--tls-key", str(self.people[who].key)]

    def get(self, path: str, who: str | None, **kw: Any) -> requests.Response:
        cert = None if who is None else (str(self.people[who].cert), str(self.people[who].key))
        return requests.get(self.base + path, verify=str(self.pki.ca_pem), cert=cert, timeout=10, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("https-approvals")
    pki = Pki(tmp, "people")
    server = pki.issue("companion", server=True)
    people = {who: pki.issue(who, server=False) for who in ("alice", "mallory", "claims-bot")}
    stranger = Pki(tmp, "other").issue("alice", server=False)
    files = {"key": tmp / "claims-bot.key-secret", "bob": tmp / "bob.token"}
    files["key"].write_text(KEY + "\n")
    files["bob"].write_text(BOB_TOKEN + "\n")
    policy_file = tmp / "policy.json"
    write_policy(policy_file, policy(
        revision="https-1",
        settings={"approvers": [{"id": "alice@e2e.example", "certificate": f"sha256:{fingerprint(people['alice'].cert)}"},
                                {"id": "bob@e2e.example", "token": hash_key(BOB_TOKEN)}]},
        tiers={"standard": tier(600, "1m", daily_budget=10_000)},
        apps=[app("claims-bot", keys=[KEY], owner="carol@e2e.example")],
    ))
    port = free_port()
    comp = Companion(policy_file, tmp / "companion", args=[
        "--http", f"127.0.0.1:{port}", "--http-tls-cert", str(server.cert), "--http-tls-key", str(server.key),
        "--http-client-ca", str(pki.ca_pem)])
    comp.start()
    try:
        yield Env(tmp, pki, f"https://127.0.0.1:{port}", port, people, stranger, server, files, comp)
    finally:
        comp.stop()


def file_request(env: Env, rate: str) -> requests.Response:
    """The app files a quota request: a certificate of the CA for the connection, its API key as Basic."""
    body = {"kind": "quota", "app": "claims-bot", "rate": rate, "until": TOMORROW, "reason": "month-end batch"}
    return requests.post(env.base + "/api/v1/requests", json=body, auth=("claims-bot", KEY),
                         verify=str(env.pki.ca_pem), cert=(str(env.people["claims-bot"].cert), str(env.people["claims-bot"].key)),
                         timeout=10)


def problem(r: requests.Response, status: int, code: str, *parts: str) -> None:
    assert r.status_code == status, f"{r.status_code}: {r.text}"
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == f"urn:guardrail:problem:{code}", body
    for part in parts:
        assert part in body["detail"], body


def test_the_companion_says_its_console_is_on_mutual_tls(env: Env) -> None:
    env.comp.wait_for_log(rf"console on https://127\.0\.0\.1:{env.port}/ \(mutual TLS\)")


def test_an_app_files_and_the_certificate_approver_approves_with_the_cli(env: Env) -> None:
    filed = file_request(env, "3000/1m")
    assert filed.status_code == 201, filed.text
    request = filed.json()
    assert ID.match(request["id"]) and request["status"] == "pending", request
    assert filed.headers["location"] == f"/api/v1/requests/{request['id']}"

    # The approver lists the pending requests and approves, with nothing but the certificate.
    proc = guardrail("requests", "--server", env.base, *env.tls("alice"), "--status", "pending", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)["requests"]] == [request["id"]]
    proc = guardrail("approve", request["id"], "--server", env.base, *env.tls("alice"), "--reason", "ok for December")
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    m = re.search(rf"request {request['id']} approved: revision (\S+) pushed to the fleet", proc.stdout)
    assert m, proc.stdout
    revision = m.group(1)
    assert "approved by alice@e2e.example" in proc.stdout, proc.stdout
    assert revision != "https-1"

    # The fleet's revision is the approval's (gRPC port, plain text here).
    assert env.comp.status()["revision"] == revision
    # The app sees its request decided by the certificate's approver.
    shown = requests.get(f"{env.base}/api/v1/requests/{request['id']}", auth=("claims-bot", KEY),
                         verify=str(env.pki.ca_pem), cert=(str(env.people["claims-bot"].cert), str(env.people["claims-bot"].key)),
                         timeout=10).json()
    assert (shown["status"], shown["decided_by"], shown["revision"]) == ("approved", "alice@e2e.example", revision), shown
    # An approver by token still acts (the header wins over the connection's certificate).
    proc = guardrail("requests", "--server", env.base, *env.tls("mallory"), "--token-file", str(env.files["bob"]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert request["id"] in proc.stdout


def test_a_certificate_not_among_the_approvers_is_refused_naming_it(env: Env) -> None:
    filed = file_request(env, "9000/1m")  # more than the 3000/1m approved above
    assert filed.status_code == 201, filed.text
    rid = filed.json()["id"]
    mallory = fingerprint(env.people["mallory"].cert)
    r = requests.post(f"{env.base}/api/v1/requests/{rid}/approve", verify=str(env.pki.ca_pem),
                      cert=(str(env.people["mallory"].cert), str(env.people["mallory"].key)), timeout=10)
    problem(r, 403, "not-an-approver", f"the client certificate sha256:{mallory} is no approver's (settings.approvers)")
    proc = guardrail("approve", rid, "--server", env.base, *env.tls("mallory"))
    assert proc.returncode == 1, proc.stdout
    assert f"refused (403 not-an-approver): the client certificate sha256:{mallory}" in proc.stderr, proc.stderr
    # The app's own certificate does not make it an approver either, and the request stays pending.
    proc = guardrail("approve", rid, "--server", env.base, *env.tls("claims-bot"))
    assert proc.returncode == 1 and "403 not-an-approver" in proc.stderr, proc.stderr
    r = env.get(f"/api/v1/requests/{rid}", "alice")
    assert r.status_code == 200 and r.json()["status"] == "pending", r.text


def test_without_a_client_certificate_of_the_ca_the_handshake_is_refused(env: Env) -> None:
    for path in ("/api/v1/requests", "/healthz"):  # the health checks too (README: probes)
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            env.get(path, None)
    env.comp.wait_for_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed: .*peer sent no certificates")
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        requests.get(env.base + "/healthz", verify=str(env.pki.ca_pem),
                     cert=(str(env.stranger.cert), str(env.stranger.key)), timeout=10)
    env.comp.wait_for_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed: .*UnknownIssuer")
    # The CLI without --tls-cert: a token alone does not get through the handshake.
    proc = guardrail("requests", "--server", env.base, "--tls-ca", str(env.pki.ca_pem), "--token-file", str(env.files["bob"]))
    assert proc.returncode == 1, proc.stdout
    assert "client certificate" in proc.stderr and "--tls-cert" in proc.stderr, proc.stderr
    # A CLI that does not trust the companion's CA stops at the handshake.
    proc = guardrail("requests", "--server", env.base, "--tls-ca", str(env.tmp / "other-ca.pem"), *env.tls("alice")[2:])
    assert proc.returncode == 1 and "TLS handshake failed" in proc.stderr, proc.stderr


def test_plain_http_to_the_tls_port_is_told_to_use_https(env: Env) -> None:
    r = requests.get(f"http://127.0.0.1:{env.port}/healthz", timeout=10)
    assert r.status_code == 400 and "this port speaks HTTPS" in r.text and "https://" in r.text, r.text
    proc = guardrail("requests", "--server", f"http://127.0.0.1:{env.port}", "--token-file", str(env.files["bob"]))
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.strip().endswith("answered 400 to GET /api/v1/requests: this port speaks HTTPS "
                                        "(serve --http-tls-cert): use https://"), proc.stderr


def test_the_console_metrics_and_health_checks_work_over_tls(env: Env) -> None:
    page = env.get("/", "alice")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:200]
    assert "claims-bot" in page.text
    assert env.get("/requests", "alice").status_code == 200
    metrics = env.get("/metrics", "mallory")  # any certificate of the CA: the console has no approvers' pages
    assert metrics.status_code == 200, metrics.text[:200]
    assert metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert "guardrail_" in metrics.text and metrics.text.rstrip().endswith("# EOF")
    health = env.get("/healthz", "alice")
    assert health.status_code == 200 and health.text == "ok\n"
    ready = env.get("/readyz", "alice")
    assert ready.status_code == 200 and ready.text.startswith("ready: revision ")



def served_certificate(env: Env) -> bytes:
    """The DER of the certificate the HTTP port serves to a new connection (alice's client certificate)."""
    context = ssl.create_default_context(cafile=str(env.pki.ca_pem))
    context.load_cert_chain(str(env.people["alice"].cert), str(env.people["alice"].key))
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_renewed_certificate_of_the_http_port_is_served_without_a_restart(env: Env) -> None:
    before = served_certificate(env)
    assert before == der_of(env.server.cert)
    reloads = env.comp.log().count("HTTP port: TLS certificate files changed: new connections get them")
    env.pki.issue("companion", server=True, to=env.server)  # renewed in place, as cert-manager does
    wait_for(lambda: env.comp.log().count("HTTP port: TLS certificate files changed: new connections get them") > reloads,
             timeout=10, what="the companion to read the renewed HTTP certificate")
    after = served_certificate(env)
    assert after == der_of(env.server.cert) and after != before
    assert env.get("/healthz", "alice").status_code == 200


def test_tls_without_a_client_ca_needs_no_client_certificate(env: Env) -> None:
    """`--http-tls-cert/--http-tls-key` alone: HTTPS for everyone; approvers act by token."""
    port = free_port()
    comp = Companion(env.comp.policy, env.tmp / "tls-only", name="tls-only", args=[
        "--http", f"127.0.0.1:{port}", "--http-tls-cert", str(env.server.cert), "--http-tls-key", str(env.server.key)])
    comp.start()
    try:
        comp.wait_for_log(rf"console on https://127\.0\.0\.1:{port}/ \(TLS\)")
        base = f"https://127.0.0.1:{port}"
        health = requests.get(base + "/healthz", verify=str(env.pki.ca_pem), timeout=10)
        assert health.status_code == 200 and health.text == "ok\n"
        proc = guardrail("requests", "--server", base, "--tls-ca", str(env.pki.ca_pem), "--token-file", str(env.files["bob"]))
        assert proc.returncode == 0, proc.stderr
        # Without a client CA no certificate is asked for: a call without a token is no approver's.
        r = requests.get(base + "/api/v1/requests", verify=str(env.pki.ca_pem), timeout=10)
        problem(r, 401, "unauthenticated", "Authorization")
    finally:
        comp.stop()
