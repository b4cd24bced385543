"""The store over TLS (issue 20): `guardrail serve --store rediss://… --store-ca F [--store-cert F
--store-key F]` against a real `redis-server` listening only on a TLS port (`--port 0 --tls-port`),
which requires a client certificate (Redis's default `tls-auth-clients yes`). The certificates are
made here with the mutual-TLS helpers of test_companion_tls.py (Python `cryptography`).

- Two companions on the TLS Redis share it: a request filed on one is listed on the other, and
  `redis-cli --tls` finds it in Redis; the audit trail is read back from it.
- A companion trusting another CA is refused: `status` and the log say the store is unavailable
  with rustls's reason, and it serves the policy all the same.
- The flags are checked: `--store-ca` with a plain `redis://` store, or a CA file that is not PEM,
  is a clear error naming the flag.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, guardrail, write_policy
from harness import free_port, wait_for
from policies import app, policy, tier
from test_companion_tls import Issued, Pki
from test_store import Redis, require_redis

KEY = "k-store-tls-app-0001"


def make_policy(revision: str) -> dict[str, Any]:
    return policy(revision=revision, settings={"max_request_duration": "30d"},
                  tiers={"standard": tier(60, "1m", burst=60)}, apps=[app("tls-app", keys=[KEY])])


@dataclass(kw_only=True)
class TlsRedis(Redis):
    """A `redis-server` (test_store.py's) that listens only on a TLS port, with the certificate of
    `server` (signed by `ca`), requiring client certificates signed by `ca`."""

    ca: Path
    server: Issued

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.server.cert),
                "--tls-key-file", str(self.server.key), "--tls-ca-cert-file", str(self.ca)]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def cli(self, client: Issued, *args: str) -> str:
        """`redis-cli --tls` with `client`'s certificate."""
        proc = subprocess.run(["redis-cli", "--tls", "--cacert", str(self.ca), "--cert", str(client.cert),
                               "--key", str(client.key), "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10, check=True)
        return proc.stdout.strip()


@dataclass
class Env:
    tmp: Path
    pki: Pki
    other: Pki
    client: Issued
    redis: TlsRedis
    policy_file: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_redis()
    tmp = tmp_path_factory.mktemp("store-tls")
    pki, other = Pki(tmp, "redis"), Pki(tmp, "other")
    redis = TlsRedis(dir=tmp / "redis", ca=pki.ca_pem, server=pki.issue("redis-server", server=True))
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy("tls-1"))
    try:
        redis.start()
        yield Env(tmp, pki, other, pki.issue("companion", server=False), redis, policy_file)
    finally:
        redis.stop()


def tls_companion(env: Env, name: str, *, ca: Path, http: str | None = None) -> Companion:
    args = ["--store", env.redis.url, "--name", name, "--store-ca", str(ca),
            "--store-cert", str(env.client.cert), "--store-key", str(env.client.key)]
    if http:
        args += ["--http", http]
    return Companion(env.policy_file, env.tmp / name, name=name, args=args)


def test_companions_on_a_tls_redis_store_and_read_what_they_share(env: Env) -> None:
    http = {name: f"127.0.0.1:{free_port()}" for name in ("tls-a", "tls-b")}
    comps = [tls_companion(env, name, ca=env.pki.ca_pem, http=addr) for name, addr in http.items()]
    try:
        for comp in comps:
            comp.start()
        for comp in comps:
            status = wait_for(lambda c=comp: (s := c.status())["store"]["available"] and s, timeout=10,
                              what=f"{comp.name} to reach Redis over TLS")
            assert status["store"]["url"] == env.redis.url, status
        until = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"kind": "quota", "app": "tls-app", "rate": "600/1m", "until": until, "reason": "tls"}
        r = requests.post(f"http://{http['tls-a']}/api/v1/requests", json=body, auth=("tls-app", KEY), timeout=10)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        # Filed through tls-a, read back through tls-b: both went through Redis over TLS.
        r = requests.get(f"http://{http['tls-b']}/api/v1/requests", auth=("tls-app", KEY), timeout=10)
        assert r.status_code == 200, r.text
        assert [q["id"] for q in r.json()["requests"]] == [rid], r.json()
        assert env.redis.cli(env.client, "HEXISTS", "guardrail:v1:requests", rid) == "1"
        # The revision served is in the audit trail kept in Redis.
        trail = wait_for(lambda: (t := json.loads(guardrail("audit", "--server", comps[1].address, "--json",
                                                             check=True).stdout)["revisions"]) and t,
                         timeout=10, what="the audit trail read from Redis")
        assert [t["revision"] for t in trail] == ["tls-1"], trail
        assert "store: ok (rediss://127.0.0.1:" in guardrail("status", "--server", comps[0].address, check=True).stdout
    finally:
        for comp in comps:
            comp.stop()


def test_a_redis_certificate_from_another_ca_is_refused_with_the_reason(env: Env) -> None:
    comp = tls_companion(env, "wrong-ca", ca=env.other.ca_pem).start()
    try:
        status = wait_for(lambda: (s := comp.status())["store"]["available"] is False and s, timeout=10,
                          what="the store to be unavailable")
        assert status["revision"] == "tls-1", status
        error = status["store"].get("error", "")
        assert "UnknownIssuer" in error or "invalid peer certificate" in error, status
        comp.wait_for_log(r"store: unavailable \(rediss://127\.0\.0\.1:\d+/0: .*(invalid peer certificate|UnknownIssuer)")
    finally:
        comp.stop()


def test_store_tls_flags_are_checked(env: Env) -> None:
    serve = ["serve", "--policy", str(env.policy_file), "--listen", "127.0.0.1:0"]
    plain = guardrail(*serve, "--store", "redis://127.0.0.1:1/0", "--store-ca", str(env.pki.ca_pem), timeout=15)
    assert plain.returncode == 2 and "--store-ca" in plain.stderr and "rediss://" in plain.stderr, plain.stderr
    not_pem = env.tmp / "not-a-ca.pem"
    not_pem.write_text("not a certificate\n")
    bad = guardrail(*serve, "--store", env.redis.url, "--store-ca", str(not_pem), timeout=15)
    assert bad.returncode != 0 and f"--store-ca {not_pem}" in bad.stderr, bad.stderr
    missing = guardrail(*serve, "--store", env.redis.url, "--store-ca", str(env.tmp / "nope.pem"), timeout=15)
    assert missing.returncode != 0 and "--store-ca" in missing.stderr and "nope.pem" in missing.stderr, missing.stderr
