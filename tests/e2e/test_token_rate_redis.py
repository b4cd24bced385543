"""The token service's rate across companions sharing Redis.

A real `redis-server` and two real companions on it (`guardrail serve --store redis://… --http …
--issuer-key … --token-rate 3/1h`, one issuer key), as a Kubernetes Service would put them behind
one address. A client asking both in turn gets `--token-rate` in all, not once per companion: the
bucket lives in Redis (GCRA on Redis's clock). Another client keeps a bucket of its own. With Redis
stopped each companion limits on its own, and the token service goes on.

Skipped, loudly, only where `redis-server` is not installed (./build.sh installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, keygen, write_policy
from harness import free_port
from policies import app, jwt_issuer, policy, tier
from test_store import Redis, require_redis

ISSUER = "https://companion.rate.e2e.example"
KEYS = {"claims-bot": "k-rate-claims-0001", "pos": "k-rate-pos-0001"}
NAMES = ("a", "b")


def make_policy(jwk: dict[str, Any]) -> dict[str, Any]:
    classes = ("public", "internal", "regulated")
    return policy(
        revision="rate-1",
        jwt=[jwt_issuer(ISSUER, ["rate-e2e"], [jwk])],
        tiers={"standard": tier(600, "1m")},
        apps=[app(a, keys=[k], data_classes=classes) for a, k in KEYS.items()],
        datasets=[{"id": "payments", "classification": "regulated", "allowed_regions": ["eu-west-1"],
                   "routes": [{"path_prefix": "/payments"}]}],
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Redis, dict[str, str]]]:
    require_redis()
    tmp = tmp_path_factory.mktemp("token-rate-redis")
    key_file = tmp / "issuer.jwk"
    jwk = keygen(key_file, "rate-1")
    redis = Redis(tmp / "redis").start()
    comps: list[Companion] = []
    http = {name: f"127.0.0.1:{free_port()}" for name in NAMES}
    try:
        for name in NAMES:
            f = tmp / f"policy-{name}.json"
            write_policy(f, make_policy(jwk))
            comps.append(Companion(f, tmp / f"comp-{name}", name=f"comp-{name}",
                                   args=["--store", redis.url, "--name", f"companion-{name}", "--http", http[name],
                                         "--issuer-key", str(key_file), "--token-rate", "3/1h"]).start())
        yield redis, {n: f"http://{a}/api/v1/token" for n, a in http.items()}
    finally:
        for comp in comps:
            comp.stop()
        redis.stop()


def ask(url: str, client: str) -> requests.Response:
    return requests.post(url, auth=(client, KEYS[client]), timeout=10,
                         data={"grant_type": "client_credentials", "scope": "dataset:payments"})


def test_two_companions_on_one_redis_give_a_client_its_rate_once(pair: tuple[Redis, dict[str, str]]) -> None:
    _, urls = pair
    answers = [ask(urls[NAMES[i % 2]], "claims-bot") for i in range(6)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429, 429], [r.text for r in answers]
    for refused in answers[3:]:
        assert refused.json()["error"] == "slow_down", refused.text
        # One is back in 1200 s (an hour / 3).
        assert 1100 <= int(refused.headers["retry-after"]) <= 1200, refused.headers
    assert ask(urls["b"], "pos").status_code == 200, "another client has a bucket of its own"


def test_with_redis_stopped_each_companion_limits_on_its_own(pair: tuple[Redis, dict[str, str]]) -> None:
    redis, urls = pair
    redis.stop()
    try:
        for url in urls.values():
            answers = [ask(url, "pos").status_code for _ in range(4)]
            assert answers == [200, 200, 200, 429], f"{url}: {answers}"
    finally:
        redis.start()
