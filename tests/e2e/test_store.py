"""The companion's state end to end (issue 20): `guardrail serve --store`, with the real companion
binary, real SQLite files, a real `redis-server` started here (on a free loopback port, its own
directory, AOF on) and real Envoys.

- SQLite: a companion killed with SIGKILL and started again keeps the fleet's usage (a gateway that
  went away still counts towards the fleet budget), its nodes and the audit trail; a second
  companion on the same file is refused.
- Redis: two companions, one Envoy on each: `status` of either shows both nodes and which companion
  each is on; a fleet budget spent through both is enforced at both Envoys; companions serving
  different revisions show as drift; Redis stopped while pushes go on (`store: unavailable`, push
  unaffected), then started again (the store catches up).
- `grpc.health.v1.Health` answers SERVING, asked with gRPC's own Python client.

Redis tests are skipped, loudly, only where `redis-server` is not installed (./build.sh installs it).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from companion import Companion, guardrail, write_policy
from harness import _PDEATHSIG, Envoy, bootstrap, can_connect, free_port, request, responds_with, stop_process_group, wait_for
from policies import app, policy, tier

CONTROL = {"cluster": "guardrail_control"}
FLEET_BUDGET = 10
KEYS = {"fleet-app": "k-store-fleet-0001", "other-app": "k-store-other-0001", "new-app": "k-store-new-0001"}
RECONNECT_WITHIN = 15.0


def make_policy(revision: str, *, other: str = "published", new_app: bool = False) -> dict[str, Any]:
    apps = [
        app("fleet-app", tier="fleet", keys=[KEYS["fleet-app"]]),
        app("other-app", lifecycle=other, keys=[KEYS["other-app"]]),
    ]
    if new_app:
        apps.append(app("new-app", keys=[KEYS["new-app"]]))
    return policy(
        revision=revision,
        tiers={
            "standard": tier(60000, "1m", burst=10000, daily_budget=1_000_000),
            "fleet": tier(60000, "1m", burst=10000, daily_budget=FLEET_BUDGET),
        },
        apps=apps,
    )


def gateway(tmp: Path, name: str, node_id: str, upstream_port: int, wasm: Path, control_port: int) -> Envoy:
    config = bootstrap({"control": CONTROL}, upstream_port=upstream_port, wasm=wasm, control_port=control_port)
    config["node"] = {"id": node_id, "cluster": "e2e"}
    return Envoy(config, tmp / name, name=name)


def send(gw: Envoy, app_id: str, n: int) -> list[int]:
    """`n` requests as `app_id`, each on a fresh connection, 4 at a time (both workers take some)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda _: request(gw.url, "/orders", headers={"x-api-key": KEYS[app_id]}, timeout=10).status,
                             range(n)))


def fleet_usage(comp: Companion, app_id: str) -> dict[str, Any]:
    return {u["app"]: u for u in comp.status()["fleet_usage"]}.get(app_id, {})


def audit(comp: Companion) -> list[dict[str, Any]]:
    import json
    proc = guardrail("audit", "--server", comp.address, "--json", check=True)
    return json.loads(proc.stdout)["revisions"]


def refused_for_the_fleet(gw: Envoy, app_id: str) -> bool:
    r = request(gw.url, "/orders", headers={"x-api-key": KEYS[app_id]})
    return r.status == 429 and r.json().get("rule") == "fleet-budget"


# === Redis, started by the test ===


@dataclass
class Redis:
    """A `redis-server` on a free loopback port with its own directory and the append-only file on;
    `stop()` and `start()` again keep the port and the data."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def listen_args(self) -> list[str]:
        """How it listens (test_store_tls.py: on a TLS port only)."""
        return ["--port", str(self.port)]

    def start(self) -> "Redis":
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [*_PDEATHSIG, "redis-server", *self.listen_args(), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--appendonly", "yes", "--save", ""]
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_for(lambda: can_connect(self.port), timeout=10, what=f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_group(proc)


def require_redis() -> None:
    if shutil.which("redis-server") is None:
        message = ("!!! redis-server is not installed (./build.sh installs it: apt-get install redis-server): "
                   "the Redis store was NOT tested end to end")
        print(f"\n{message}\n")
        pytest.skip(message)


# === grpc.health.v1 ===


def test_health_reports_serving(tmp_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, make_policy("h-1"))
    comp = Companion(policy_file, tmp_path / "comp").start()
    try:
        with grpc.insecure_channel(comp.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "guardrail.v1.PolicyService"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply)
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        comp.stop()


# === SQLite ===


def stored_allowed(db: Path, app_id: str) -> int:
    """The usage of `app_id` today as the SQLite file holds it (summed over nodes)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT COALESCE(SUM(allowed), 0) FROM usage WHERE app = ? AND day = ?",
                           (app_id, int(time.time()) // 86400)).fetchone()
    return int(row[0])


def test_a_companion_killed_and_restarted_keeps_usage_nodes_and_audit(tmp_path: Path, upstream: Any, wasm: Path) -> None:
    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, make_policy("s-1"))
    comp = Companion(policy_file, tmp_path / "comp", port=free_port()).start()
    db = tmp_path / "comp" / "guardrail.db"
    gw1 = gateway(tmp_path, "gw-1", "store-gw-1", upstream.server_port, wasm, comp.port)
    gw2 = gateway(tmp_path, "gw-2", "store-gw-2", upstream.server_port, wasm, comp.port)
    try:
        gw1.start()
        wait_for(lambda: comp.node_acked("s-1"), timeout=RECONNECT_WITHIN, what="gw-1 to acknowledge s-1")
        assert send(gw1, "fleet-app", 6) == [200] * 6
        write_policy(policy_file, make_policy("s-2", other="quarantined", new_app=True))
        wait_for(lambda: comp.node_acked("s-2"), timeout=10, what="gw-1 to acknowledge s-2")
        # Written to the file (what a crash cannot lose), within a write interval of the report.
        wait_for(lambda: stored_allowed(db, "fleet-app") == 6, timeout=10, what="the usage in the SQLite file")
        gw1.stop()  # the node goes away: its usage must still count
        time.sleep(1.5)  # its disconnection is written too

        comp.kill()
        started = time.monotonic()
        comp.start()
        restart = time.monotonic() - started
        assert "loaded" in comp.log(), comp.log()
        status = comp.status()
        usage = {u["app"]: u for u in status["fleet_usage"]}
        assert usage.get("fleet-app", {}).get("allowed") == 6, (usage, comp.log())
        # The filter's node id is the Envoy's, with a part of its own per process.
        nodes = {n["node_id"].split("/")[0]: n for n in status["nodes"]}
        assert "store-gw-1" in nodes and not nodes["store-gw-1"]["connected"], nodes
        assert nodes["store-gw-1"]["acked_revision"] == "s-2", nodes
        assert status["store"]["available"] is True and status["store"]["url"].startswith("sqlite:"), status

        trail = audit(comp)
        assert [r["revision"] for r in trail] == ["s-2", "s-1"], trail
        changes = {(c["kind"], c["id"], c["action"], c["to"]) for c in trail[0]["changes"]}
        assert ("app", "new-app", "added", "") in changes and ("app", "other-app", "lifecycle", "quarantined") in changes, trail
        assert trail[0]["source"].endswith("policy.json") and len(trail[0]["content_sha256"]) == 64, trail

        # A new gateway: 6 spent before the crash by a node now gone + 4 here reach the budget.
        gw2.start()
        wait_for(lambda: comp.node_acked("s-2"), timeout=RECONNECT_WITHIN, what="gw-2 to acknowledge s-2")
        admitted = send(gw2, "fleet-app", FLEET_BUDGET - 6).count(200)
        assert admitted == FLEET_BUDGET - 6
        wait_for(lambda: refused_for_the_fleet(gw2, "fleet-app"), timeout=10,
                 what="gw-2 to refuse fleet-app for the fleet budget")
        print(f"restart after kill -9: serving again in {restart:.2f} s")
    finally:
        gw1.stop()
        gw2.stop()
        comp.stop()


def test_a_second_companion_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, make_policy("l-1"))
    store = f"sqlite:{tmp_path / 'shared.db'}"
    first = Companion(policy_file, tmp_path / "first", args=["--store", store]).start()
    try:
        second = guardrail("serve", "--policy", str(policy_file), "--listen", "127.0.0.1:0", "--store", store, timeout=15)
        assert second.returncode == 1, second.stderr
        assert "in use by another companion" in second.stderr and str(first.proc.pid) in second.stderr, second.stderr
    finally:
        first.stop()
    # Once the first is gone, the file is free.
    again = Companion(policy_file, tmp_path / "again", args=["--store", store]).start()
    again.stop()


# === Redis: two companions, one fleet ===


@dataclass
class Fleet:
    redis: Redis
    comps: list[Companion]
    files: list[Path]
    gws: list[Envoy]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Fleet]:
    require_redis()
    tmp = tmp_path_factory.mktemp("store-redis")
    redis = Redis(tmp / "redis").start()
    comps, files, gws = [], [], []
    try:
        for name in ("a", "b"):
            f = tmp / f"policy-{name}.json"
            write_policy(f, make_policy("r-1"))
            files.append(f)
            comps.append(Companion(f, tmp / f"comp-{name}", name=f"comp-{name}",
                                   args=["--store", redis.url, "--name", f"companion-{name}"]).start())
        for name, comp in zip(("a", "b"), comps):
            gw = gateway(tmp, f"gw-{name}", f"redis-gw-{name}", upstream.server_port, wasm, comp.port)
            gws.append(gw)
            gw.start()
        for comp in comps:
            # Each companion's status shows both nodes: its own and the other's.
            wait_for(lambda c=comp: c.node_acked("r-1", count=2), timeout=RECONNECT_WITHIN,
                     what=f"{comp.name} to show both nodes on r-1")
        yield Fleet(redis, comps, files, gws)
    finally:
        for gw in gws:
            gw.stop()
        for comp in comps:
            comp.stop()
        redis.stop()


def acked(comp: Companion, node: str, revision: str) -> bool:
    """Whether `comp`'s status shows `node` (the Envoy's id) connected, on `revision`."""
    return any(n["node_id"].split("/")[0] == node and n["connected"] and n["acked_revision"] == revision
               for n in comp.status()["nodes"])


def both_nodes(comp: Companion) -> dict[str, Any] | None:
    nodes = {n["node_id"].split("/")[0]: n for n in comp.status()["nodes"] if n["connected"]}
    want = {"redis-gw-a": "companion-a", "redis-gw-b": "companion-b"}
    if {k: nodes.get(k, {}).get("companion") for k in want} == want:
        return nodes
    return None


def test_status_of_either_companion_shows_the_whole_fleet(fleet: Fleet) -> None:
    for comp in fleet.comps:
        nodes = wait_for(lambda c=comp: both_nodes(c), timeout=10, what=f"{comp.name} to show both nodes")
        assert all(n["acked_revision"] == "r-1" for n in nodes.values()), nodes
        status = comp.status()
        assert {c["name"] for c in status["companions"] if c["alive"]} == {"companion-a", "companion-b"}, status
        assert status["drift"] == [], status
    text = guardrail("status", "--server", fleet.comps[0].address, check=True).stdout
    assert "companion companion-a, store: ok (redis://127.0.0.1:" in text, text
    assert "companions sharing the store: 2" in text, text


def test_a_fleet_budget_spent_through_two_companions_holds_at_both_envoys(fleet: Fleet) -> None:
    # 6 + 6 = 12 > 10: each Envoy, and each companion's own nodes, stay under the budget alone.
    for gw in fleet.gws:
        assert send(gw, "fleet-app", FLEET_BUDGET // 2 + 1) == [200] * (FLEET_BUDGET // 2 + 1)
    spent = time.monotonic()
    for comp in fleet.comps:
        wait_for(lambda c=comp: "fleet-app" in c.status()["exhausted_apps"], timeout=10,
                 what=f"{comp.name} to see fleet-app spent fleet-wide")
    for gw in fleet.gws:
        wait_for(lambda g=gw: refused_for_the_fleet(g, "fleet-app"), timeout=10,
                 what=f"{gw.name} to refuse fleet-app for the fleet budget")
        responds_with(request(gw.url, "/orders", headers={"x-api-key": KEYS["other-app"]}), 200)
    print(f"fleet budget spent through two companions: refused at both Envoys {time.monotonic() - spent:.2f} s "
          "after the last admitted request")
    assert fleet_usage(fleet.comps[1], "fleet-app")["allowed"] >= 12


def test_companions_serving_different_revisions_show_drift(fleet: Fleet) -> None:
    write_policy(fleet.files[1], make_policy("r-2", new_app=True))
    wait_for(lambda: acked(fleet.comps[1], "redis-gw-b", "r-2"), timeout=10, what="companion-b's node to ACK r-2")
    status = wait_for(lambda: (s := fleet.comps[0].status())["drift"] and s, timeout=10, what="drift in status")
    assert status["drift"] == ["r-1", "r-2"], status
    text = guardrail("status", "--server", fleet.comps[0].address, check=True).stdout
    assert "DRIFT: live companions serve different revisions: r-1, r-2" in text, text
    write_policy(fleet.files[0], make_policy("r-2", new_app=True))
    wait_for(lambda: acked(fleet.comps[0], "redis-gw-a", "r-2"), timeout=10, what="companion-a's node to ACK r-2")
    wait_for(lambda: fleet.comps[1].status()["drift"] == [], timeout=10, what="the drift to end")
    # One audit entry for r-2, though both companions served it.
    assert [r["revision"] for r in audit(fleet.comps[0])].count("r-2") == 1


def test_redis_stopped_then_restarted_while_pushes_go_on(fleet: Fleet) -> None:
    comp = fleet.comps[0]
    fleet.redis.stop()
    # Both companions see the outage (each logs it once) before Redis comes back.
    for c in fleet.comps:
        wait_for(lambda c=c: c.status()["store"]["available"] is False, timeout=10,
                 what=f"{c.name}'s status to say the store is down")
    text = guardrail("status", "--server", comp.address, check=True).stdout
    assert "store: unavailable" in text, text
    comp.wait_for_log(r"store: unavailable")

    # Push goes on without the store.
    for f in fleet.files:
        write_policy(f, make_policy("r-3", other="deprecated", new_app=True))
    for c, node in zip(fleet.comps, ("redis-gw-a", "redis-gw-b")):
        wait_for(lambda c=c, node=node: acked(c, node, "r-3"), timeout=10, what=f"{node} to ACK r-3 without Redis")
    assert comp.log().count("store: unavailable") == 1, "logged once a minute at most"

    fleet.redis.start()
    for c in fleet.comps:
        wait_for(lambda c=c: c.status()["store"]["available"] is True, timeout=15, what=f"{c.name} to use Redis again")
        c.wait_for_log(r"store: available again")
    # What happened meanwhile is caught up: the revision served during the outage is in the trail.
    trail = wait_for(lambda: (t := audit(comp)) and t[0]["revision"] == "r-3" and t, timeout=10,
                     what="r-3 in the audit trail")
    assert ("app", "other-app", "lifecycle", "deprecated") in {(c["kind"], c["id"], c["action"], c["to"])
                                                               for c in trail[0]["changes"]}, trail
    assert all(c.running for c in fleet.comps)


def test_a_companion_started_while_redis_is_down_serves_then_catches_up(tmp_path: Path) -> None:
    require_redis()
    redis = Redis(tmp_path / "redis")  # not started yet
    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, make_policy("d-1"))
    comp = Companion(policy_file, tmp_path / "comp", args=["--store", redis.url, "--name", "early"]).start()
    try:
        status = comp.status()
        assert status["store"]["available"] is False and status["revision"] == "d-1", status
        write_policy(policy_file, make_policy("d-2", new_app=True))
        comp.wait_for_log(r"pushing to every node")
        redis.start()
        wait_for(lambda: comp.status()["store"]["available"] is True, timeout=15, what="the store to answer")
        trail = wait_for(lambda: (t := audit(comp)) and len(t) == 2 and t, timeout=10, what="both revisions in the trail")
        assert [r["revision"] for r in trail] == ["d-2", "d-1"], trail
        assert trail[0]["changes"] == [{"kind": "app", "id": "new-app", "action": "added", "from": "", "to": ""}], trail
        wait_for(lambda: [c["name"] for c in comp.status()["companions"]] == ["early"], timeout=5,
                 what="the companion's heartbeat in the store")
    finally:
        comp.stop()
        redis.stop()
