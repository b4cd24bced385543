"""Requests and approvals across companions sharing Redis (issues 20 and 22).

A real `redis-server` (free loopback port, its own directory, AOF on), two real companions on it
(`guardrail serve --store redis://… --http …`, each with its own copy of the policy file) and one
real Envoy with the filter on each. An app files a quota request on companion A, an approver
approves it on companion B, and:

- both Envoys enforce the new rate (the `RateLimit-Policy` header names it) and both companions
  serve the same revision (no drift in `guardrail status`);
- at the request's end both Envoys revert by themselves, and the trail holds exactly one
  `request-expired` entry (the compare-and-set on the request's status lets one companion do it);
- with Redis stopped while a request is in force, both companions keep serving it and still end it
  on time; filing answers 503 store-unavailable meanwhile; once Redis is back filing works again
  and the request's end is recorded, once.

Skipped, loudly, only where `redis-server` is not installed (./build.sh installs it).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, write_policy
from harness import Envoy, free_port, hash_key, request, wait_for
from policies import app, policy, tier
from test_store import Redis, gateway, require_redis

BASE = "multi-1"
KEY = "k-appr-redis-campaign-0001"
APPROVER = ("ana@e2e.example", "approver-token-redis-ana-0001")
NAMES = ("a", "b")
NODES = {"a": "appr-redis-gw-a", "b": "appr-redis-gw-b"}
# How far ahead a request ends: room for filing, approving and both Envoys acknowledging it.
RUNS_FOR = 15


def make_policy() -> dict[str, Any]:
    return policy(
        revision=BASE,
        settings={"max_request_duration": "30d", "approvers": [{"id": APPROVER[0], "token": hash_key(APPROVER[1])}]},
        tiers={"standard": tier(6000, "1m", burst=1000), "tiny": tier(2, "1h")},
        apps=[app("campaign", keys=[KEY], tier="tiny")],
    )


@dataclass
class Fleet:
    redis: Redis
    comps: dict[str, Companion]
    http: dict[str, str]
    gws: dict[str, Envoy]

    def file(self, on: str, rate: str, until: str) -> requests.Response:
        body = {"kind": "quota", "app": "campaign", "rate": rate, "until": until, "reason": "campaign launch"}
        return requests.post(f"{self.http[on]}/api/v1/requests", json=body, auth=("campaign", KEY), timeout=10)

    def approve(self, on: str, request_id: str) -> dict[str, Any]:
        r = requests.post(f"{self.http[on]}/api/v1/requests/{request_id}/approve",
                          headers={"authorization": f"Bearer {APPROVER[1]}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, on: str, request_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.http[on]}/api/v1/requests/{request_id}",
                         headers={"authorization": f"Bearer {APPROVER[1]}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def trail(self, on: str, request_id: str) -> list[tuple[str, str]]:
        r = requests.get(f"{self.http[on]}/api/v1/audit/events?limit=1000", timeout=10)
        assert r.status_code == 200, r.text
        return [(e["kind"], e["companion"]) for e in r.json()["events"] if e["id"] == request_id]

    def all_acked(self, revision: str) -> bool:
        """Whether each companion's own Envoy acknowledged `revision`, and both serve it."""
        for name, comp in self.comps.items():
            status = comp.status()
            if status["revision"] != revision:
                return False
            mine = [n for n in status["nodes"] if n["connected"] and n["node_id"].split("/")[0] == NODES[name]]
            if len(mine) != 1 or mine[0]["acked_revision"] != revision:
                return False
        return True


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Fleet]:
    require_redis()
    tmp = tmp_path_factory.mktemp("approvals-redis")
    redis = Redis(tmp / "redis").start()
    comps: dict[str, Companion] = {}
    gws: dict[str, Envoy] = {}
    http = {name: f"127.0.0.1:{free_port()}" for name in NAMES}
    try:
        for name in NAMES:
            f = tmp / f"policy-{name}.json"
            write_policy(f, make_policy())
            comps[name] = Companion(f, tmp / f"comp-{name}", name=f"comp-{name}",
                                    args=["--store", redis.url, "--name", f"companion-{name}",
                                          "--http", http[name]]).start()
        for name, comp in comps.items():
            gws[name] = gateway(tmp, f"gw-{name}", NODES[name], upstream.server_port, wasm, comp.port)
            gws[name].start()
        fleet = Fleet(redis, comps, {n: f"http://{a}" for n, a in http.items()}, gws)
        wait_for(lambda: fleet.all_acked(BASE), timeout=15, what=f"both Envoys to acknowledge {BASE}")
        yield fleet
    finally:
        for gw in gws.values():
            gw.stop()
        for comp in comps.values():
            comp.stop()
        redis.stop()


def rfc3339(seconds_from_now: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def limited_by(gw: Envoy, policy_text: str) -> bool:
    """Whether `gw` answers campaign's next request under the limit `policy_text` (RateLimit-Policy)."""
    r = request(gw.url, "/orders", headers={"x-api-key": KEY})
    return policy_text in (r.header("ratelimit-policy") or "")


def approved_on_b_after_filing_on_a(fleet: Fleet, rate: str, runs_for: float) -> tuple[dict[str, Any], dict[str, Any]]:
    r = fleet.file("a", rate, rfc3339(runs_for))
    assert r.status_code == 201, r.text
    filed = r.json()
    # Filed on A, seen pending on B: one store.
    assert fleet.get("b", filed["id"])["status"] == "pending"
    body = fleet.approve("b", filed["id"])
    assert (body["status"], body["decided_by"]) == ("approved", APPROVER[0]), body
    assert body["revision"].startswith(f"{BASE}+req."), body
    wait_for(lambda: fleet.all_acked(body["revision"]), timeout=10,
             what=f"both companions to serve {body['revision']} and both Envoys to acknowledge it")
    return filed, body


def test_a_request_filed_on_one_companion_and_approved_on_the_other_holds_at_both_envoys_and_ends_once(
        fleet: Fleet) -> None:
    for gw in fleet.gws.values():
        assert limited_by(gw, "2;w=3600")
    filed, body = approved_on_b_after_filing_on_a(fleet, "600/1m", RUNS_FOR)
    for gw in fleet.gws.values():
        assert limited_by(gw, "600;w=60"), gw.name
    # Each companion's status shows both serving it (their heartbeats, read from the store every 2 s).
    both = {"companion-a": body["revision"], "companion-b": body["revision"]}
    for comp in fleet.comps.values():
        status = wait_for(lambda c=comp: (s := c.status()) and {x["name"]: x["revision"] for x in s["companions"]
                                                               if x["alive"]} == both and s,
                          timeout=10, what=f"{comp.name}'s status to show both companions on {body['revision']}")
        assert status["drift"] == [] and status["revision"] == body["revision"], status

    # Its end: both companions revert by themselves, and the request is expired once.
    wait_for(lambda: fleet.all_acked(BASE), timeout=RUNS_FOR + 15, what=f"both Envoys back on {BASE}")
    for gw in fleet.gws.values():
        assert limited_by(gw, "2;w=3600"), gw.name
    assert fleet.get("a", filed["id"])["status"] == "expired"
    assert fleet.get("b", filed["id"])["status"] == "expired"
    for on in NAMES:
        trail = fleet.trail(on, filed["id"])
        kinds = sorted(k for k, _ in trail)
        assert kinds == ["request-approved", "request-expired", "request-filed"], trail
        assert ("request-filed", "companion-a") in trail and ("request-approved", "companion-b") in trail, trail


def test_redis_stopped_while_a_request_is_in_force_then_restarted(fleet: Fleet) -> None:
    filed, body = approved_on_b_after_filing_on_a(fleet, "900/1m", RUNS_FOR)
    for gw in fleet.gws.values():
        assert limited_by(gw, "900;w=60"), gw.name

    fleet.redis.stop()
    for comp in fleet.comps.values():
        wait_for(lambda c=comp: c.status()["store"]["available"] is False, timeout=10,
                 what=f"{comp.name} to say the store is unavailable")
    # Both keep serving it while Redis is down.
    assert fleet.all_acked(body["revision"])
    for gw in fleet.gws.values():
        assert limited_by(gw, "900;w=60"), gw.name
    # Nothing can be filed without the store.
    r = fleet.file("a", "1200/1m", rfc3339(3600))
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "urn:guardrail:problem:store-unavailable", r.json()

    # And both end it on time, from what they applied.
    wait_for(lambda: fleet.all_acked(BASE), timeout=RUNS_FOR + 15, what=f"both Envoys back on {BASE} without Redis")
    for gw in fleet.gws.values():
        assert limited_by(gw, "2;w=3600"), gw.name
    for comp in fleet.comps.values():
        assert comp.status()["store"]["available"] is False
        assert comp.log().count("the store is unavailable") == 1, "logged when it happens, not every second"

    fleet.redis.start()
    for comp in fleet.comps.values():
        wait_for(lambda c=comp: c.status()["store"]["available"] is True, timeout=15,
                 what=f"{comp.name} to use Redis again")
    r = fleet.file("a", "1200/1m", rfc3339(3600))
    assert r.status_code == 201, r.text
    # The end that happened without Redis is recorded now, by one companion.
    wait_for(lambda: fleet.get("b", filed["id"])["status"] == "expired", timeout=10,
             what="the request to be marked expired in the store")
    trail = wait_for(lambda: (t := fleet.trail("a", filed["id"])) and len(t) == 3 and t, timeout=10,
                     what="the request's trail")
    assert sorted(k for k, _ in trail) == ["request-approved", "request-expired", "request-filed"], trail
    assert all(c.running for c in fleet.comps.values())
