"""The companion end to end (issue 4): the real `guardrail serve` pushing a policy file to real
Envoys (two workers each) over gRPC, `guardrail status`, `guardrail mint`, and fleet budgets.

One companion and one gateway (`env.gw`, with an inline policy that differs from the served one)
serve the module; the tests run in file order and each one publishes the revision it needs:

1. the inline policy is in force until the companion answers; then its snapshot;
2. a push reaches enforcement on every worker within seconds;
3. `guardrail status` shows exactly one node (one stream) that acknowledged the file's revision;
4. an invalid, half-written or vanished file changes nothing;
5. the companion killed → the last good snapshot (not the inline policy) stays in force →
   restarted on the same port with a new revision → the gateway reconnects and converges;
6. minted JIT tokens pass the JIT check, and stop passing once expired;
7. a second gateway (no inline policy) joins, and a daily budget holds across both.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from companion import Companion, guardrail, keygen, mint, write_policy
from harness import Envoy, Response, artifact, bootstrap, free_port, request, responds_with, wait_for
from policies import app, jwt_issuer, policy, tier

ISSUER = "https://id.companion.e2e.example"
AUDIENCE = "guardrail-companion"
CONTROL = {"cluster": "guardrail_control"}
FLEET_BUDGET = 10
RECONNECT_WITHIN = 15.0  # the filter's backoff is capped at 10 s (plus jitter, a tick, the hello)

KEYS = {
    "x-app": "k-companion-x-0001",
    "k-app": "k-companion-k-0001",
    "jit-app": "k-companion-jit-0001",
    "fleet-app": "k-companion-fleet-0001",
}


def make_policy(revision: str, issuer_jwk: dict[str, Any], *, x: str = "quarantined", k: str = "published",
                k_tier: str = "standard", **overrides: Any) -> dict[str, Any]:
    """The served policy (and, with other lifecycles, the inline one). `x`/`k` are the
    lifecycles of x-app and k-app; `k_tier` shows in `x-guardrail-tier`."""
    doc = policy(
        revision=revision,
        settings={"jit_max_ttl": "5m"},
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [issuer_jwk], clock_skew_seconds=0)],
        tiers={
            "standard": tier(60000, "1m", burst=10000, daily_budget=1_000_000),
            "gold": tier(60000, "1m", burst=10000, daily_budget=1_000_000),
            "fleet": tier(60000, "1m", burst=10000, daily_budget=FLEET_BUDGET),
        },
        apps=[
            app("x-app", lifecycle=x, keys=[KEYS["x-app"]]),
            app("k-app", lifecycle=k, tier=k_tier, keys=[KEYS["k-app"]]),
            app("jit-app", data_classes=["public", "regulated"], keys=[KEYS["jit-app"]]),
            app("fleet-app", tier="fleet", keys=[KEYS["fleet-app"]]),
        ],
        datasets=[{"id": "customers-eu", "classification": "regulated", "owner_department": "crm",
                   "allowed_regions": ["eu-west-1"], "routes": [{"path_prefix": "/customers"}]}],
    )
    doc.update(overrides)
    return doc


def node_bootstrap(plugin_config: dict[str, Any], node_id: str, *, upstream_port: int, wasm: Path,
                   control_port: int) -> dict[str, Any]:
    config = bootstrap(plugin_config, upstream_port=upstream_port, wasm=wasm, control_port=control_port)
    config["node"] = {"id": node_id, "cluster": "e2e"}
    return config


@dataclass
class Env:
    tmp: Path
    jwk: dict[str, Any]
    key_file: Path
    policy_file: Path
    comp: Companion
    gw: Envoy
    inline: dict[str, Any]
    upstream_port: int
    wasm: Path
    served: dict[str, Any] = field(default_factory=dict)
    serial: int = 0
    extra: list[Envoy] = field(default_factory=list)

    @property
    def revision(self) -> str:
        return str(self.served["revision"])

    def next_policy(self, **kw: Any) -> dict[str, Any]:
        self.serial += 1
        return make_policy(f"c-{self.serial}", self.jwk, **kw)

    def publish(self, doc: dict[str, Any]) -> None:
        write_policy(self.policy_file, doc)
        self.served = doc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Env]:
    """The gateway, started while the companion is still down (so it runs on its inline policy),
    and the companion, prepared on a reserved port but not started."""
    tmp = tmp_path_factory.mktemp("companion")
    key_file = tmp / "issuer.jwk.json"
    jwk = keygen(key_file, "companion-e2e")
    port = free_port()
    inline = make_policy("inline-1", jwk, x="quarantined", k="quarantined")
    gw = Envoy(node_bootstrap({"policy": inline, "control": CONTROL}, "e2e-gw-1", upstream_port=upstream.server_port,
                              wasm=wasm, control_port=port), tmp / "gw-1", name="gw-1")
    e = Env(tmp, jwk, key_file, tmp / "policy.json", Companion(tmp / "policy.json", tmp, port=port), gw, inline,
            upstream.server_port, wasm)
    e.publish(e.next_policy())  # c-1: k-app published, x-app quarantined
    try:
        gw.start()
        yield e
    finally:
        for envoy in [gw, *e.extra]:
            envoy.stop()
        e.comp.stop()


@pytest.fixture
def comp(env: Env) -> Companion:
    """The companion, running, with every gateway on the revision being served."""
    if not env.comp.running:
        env.comp.start()
    try:
        wait_for(lambda: env.comp.node_acked(env.revision, count=1 + len(env.extra)), timeout=RECONNECT_WITHIN,
                 what=f"the gateways to acknowledge {env.revision}")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- companion log ---\n{env.comp.log()[-3000:]}") from None
    return env.comp


# === helpers ===


def key(app_id: str) -> dict[str, str]:
    return {"x-api-key": KEYS[app_id]}


def statuses(gw: Envoy, app_id: str, n: int, path: str = "/orders") -> list[Response]:
    """`n` requests, each on a fresh connection, 8 at a time (so both workers take some)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: request(gw.url, path, headers=key(app_id), timeout=10), range(n)))


def worker_connections(gw: Envoy) -> dict[str, int]:
    stats = gw.stats(filter=r"^listener\..*worker_[0-9]+\.downstream_cx_total$")
    return {m.group(1): v for k, v in stats.items() if (m := re.search(r"(worker_\d+)\.downstream_cx_total$", k))}


def the_node(comp: Companion) -> tuple[dict[str, Any], dict[str, Any]]:
    """The status and its only node (the module's gateway is the only Envoy of this companion
    until the last test adds a second)."""
    status = comp.status()
    assert len(status["nodes"]) == 1, f"expected exactly one node: {status['nodes']}"
    return status, status["nodes"][0]


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# === 1. inline policy, then the companion's ===


def test_inline_policy_until_the_companion_answers(env: Env) -> None:
    if env.comp.starts:
        pytest.skip("the companion was started by an earlier test; this one must run first in the module")
    # The companion is not up: the inline policy (k-app quarantined) is in force.
    r = request(env.gw.url, "/orders", headers=key("k-app"))
    responds_with(r, 403, "app-not-active", app="k-app")
    assert env.gw.decision_for(r.header("x-request-id") or "", "app-not-active").get("revision") == "inline-1"
    # Let the filter find the companion missing (it dials, fails and backs off) before it comes up.
    wait_for(lambda: re.search(r"control stream closed|cannot open the control stream", env.gw.log()), timeout=5,
             what="the gateway to fail dialling the absent companion")
    responds_with(request(env.gw.url, "/orders", headers=key("k-app")), 403, "app-not-active", app="k-app")

    env.comp.start()
    t0 = time.monotonic()
    wait_for(lambda: request(env.gw.url, "/orders", headers=key("k-app")).status == 200, timeout=RECONNECT_WITHIN,
             what="the companion's c-1 (k-app published) to be enforced")
    took = time.monotonic() - t0
    assert took <= RECONNECT_WITHIN
    wait_for(lambda: env.comp.node_acked("c-1"), timeout=5, what="the ACK of c-1 in guardrail status")
    # The served policy replaced the inline one; x-app is quarantined in both.
    responds_with(request(env.gw.url, "/orders", headers=key("x-app")), 403, "app-not-active", app="x-app")


# === 2. push ===


def test_push_reaches_enforcement_on_every_worker(env: Env, comp: Companion) -> None:
    assert {r.status for r in statuses(env.gw, "x-app", 16)} == {403}, "x-app should be quarantined before the push"

    env.publish(env.next_policy(x="published"))
    t0 = time.monotonic()
    wait_for(lambda: request(env.gw.url, "/orders", headers=key("x-app")).status == 200, timeout=5, interval=0.01,
             what=f"x-app published by {env.revision} to be enforced")
    latency = time.monotonic() - t0

    before = worker_connections(env.gw)
    results = statuses(env.gw, "x-app", 60)
    after = worker_connections(env.gw)
    assert Counter(r.status for r in results) == Counter({200: 60}), [str(r) for r in results if r.status != 200][:3]
    assert all(r.upstream["headers"].get("x-guardrail-app") == "x-app" for r in results)
    busy = [w for w in after if after[w] - before.get(w, 0) > 0]
    assert len(busy) >= 2, f"all connections landed on one worker ({before} → {after}); the test proves nothing"
    assert latency < 5, f"propagation took {latency:.2f}s"
    wait_for(lambda: comp.node_acked(env.revision), timeout=5, what=f"the ACK of {env.revision}")
    # The gateway held the revision before and said it applies deltas: the change came as edits
    # of the policy it held, checked against the companion's SHA-256, and is what it enforces.
    before_rev = f"c-{env.serial - 1}"
    assert f"ACK revision `{env.revision}` (from a delta of revision `{before_rev}`" in env.gw.log(), \
        env.gw.log()[-2000:]
    assert re.search(rf"revision {env.revision}: a delta of \d+ bytes for nodes holding {before_rev}", comp.log())


# === 3. status ===


def test_status_shows_exactly_one_node_with_the_acked_revision(env: Env, comp: Companion) -> None:
    status, node = the_node(comp)
    assert status["revision"] == env.revision, status
    assert status["last_policy_error"] == "", status
    assert node["connected"] is True, node
    assert node.get("streams", 1) == 1, f"one stream per Envoy process (two workers + main): {node}"
    assert node["acked_revision"] == env.revision and node["in_sync"] is True, node
    assert node["nacked_revision"] == "" and node["last_error"] == "", node
    assert node["client_certificate"] == "", f"plain text: no client certificate: {node}"
    version = subprocess.run([str(artifact("ENVOY_BIN")), "--version"], capture_output=True, text=True).stdout
    # The number (`1.40.0`), not the name `envoy` the filter falls back to, which --version also prints.
    assert re.fullmatch(r"\d+\.\d+\.\d+", node["envoy_version"]), f"Envoy's version number: {node}"
    assert node["envoy_version"] in version, f"Envoy's version, as --version says {version!r}: {node}"
    # Past a leader lease (3 s) nobody took over with a second stream.
    time.sleep(3.5)
    status, again = the_node(comp)
    assert again["node_id"] == node["node_id"] and again["connected"] and again.get("streams", 1) == 1, status
    connects = re.findall(r"node (\S+) connected from", comp.log())
    assert connects == [node["node_id"]], f"the gateway connected {len(connects)} times to this companion: {connects}"


def test_status_human_output(env: Env, comp: Companion) -> None:
    _, node = the_node(comp)
    out = guardrail("status", "--server", comp.address, check=True).stdout
    assert f"serving revision {env.revision}" in out, out
    assert node["node_id"] in out and "1 connected" in out, out


# === 4. bad input ===


def test_invalid_change_is_refused_and_enforcement_stays(env: Env, comp: Companion) -> None:
    good = env.revision
    assert request(env.gw.url, "/orders", headers=key("x-app")).status == 200, "x-app should be published now"

    # Would quarantine x-app, but names a tier that does not exist: refused as a whole.
    bad = make_policy("bad-1", env.jwk, x="quarantined")
    bad["apps"][1]["tier"] = "platinum"
    write_policy(env.policy_file, bad)
    comp.wait_for_log(r"policy change refused", timeout=5)
    status = wait_for(lambda: (s := comp.status())["last_policy_error"] and s, timeout=5, what="last_policy_error")
    assert "platinum" in status["last_policy_error"] or "tier" in status["last_policy_error"], status
    assert status["revision"] == good, status
    assert [n["acked_revision"] for n in comp.connected_nodes(status)] == [good], status

    # A half-written file (no atomic rename) and a vanished file change nothing either.
    env.policy_file.write_text(json.dumps(make_policy("bad-2", env.jwk, x="quarantined"))[:200])
    time.sleep(0.3)
    env.policy_file.unlink()
    time.sleep(0.3)
    status = comp.status()
    assert status["revision"] == good, status
    assert [n["acked_revision"] for n in comp.connected_nodes(status)] == [good], status
    results = statuses(env.gw, "x-app", 16)
    assert {r.status for r in results} == {200}, [str(r) for r in results if r.status != 200][:2]
    assert "bad-1" not in env.gw.log() and "bad-2" not in env.gw.log(), "the gateway heard of a refused revision"

    # The next valid file is served again.
    env.publish(env.next_policy(x="published"))
    wait_for(lambda: comp.node_acked(env.revision), timeout=5, what=f"the ACK of {env.revision}")


# A snapshot the filter NACKs: `guardrail serve` validates with the same core before pushing, so it
# never sends one; test_faults.py::test_lying_companion_is_nacked_and_the_last_good_policy_stays
# makes a fake companion push them (and garbage, oversized and stalled streams).


# === 5. companion down, then back ===


def test_companion_killed_last_good_policy_then_reconnects_and_converges(env: Env, comp: Companion) -> None:
    # The inline policy quarantines k-app; the served one publishes it.
    assert env.inline["apps"][1]["lifecycle"] == "quarantined" and env.served["apps"][1]["lifecycle"] == "published"
    last_good = env.revision
    assert {r.status for r in statuses(env.gw, "k-app", 8)} == {200}

    closed = env.gw.log().count("control stream closed")
    comp.kill()
    wait_for(lambda: env.gw.log().count("control stream closed") > closed, timeout=5,
             what="the gateway to notice the companion died")
    for _ in range(3):
        results = statuses(env.gw, "k-app", 8)
        assert {r.status for r in results} == {200}, (
            f"with the companion down the last good snapshot ({last_good}) must stay in force, not the inline policy:\n"
            + "\n".join(str(r) for r in results if r.status != 200)[:1500])
        assert {r.upstream["headers"].get("x-guardrail-tier") for r in results} == {"standard"}
        time.sleep(0.3)

    # A new revision while it is down: k-app moves to the gold tier.
    env.publish(env.next_policy(x="published", k_tier="gold"))
    comp.start()
    t0 = time.monotonic()
    wait_for(lambda: comp.node_acked(env.revision), timeout=RECONNECT_WITHIN,
             what=f"the gateway to reconnect and acknowledge {env.revision}")
    took = time.monotonic() - t0
    tiers = {r.upstream["headers"].get("x-guardrail-tier") for r in statuses(env.gw, "k-app", 16)}
    assert tiers == {"gold"}, f"after reconverging k-app should be gold on every worker: {tiers}"
    _, node = the_node(comp)
    assert node["connected"] and node.get("streams", 1) == 1 and node["acked_revision"] == env.revision, node
    assert took <= RECONNECT_WITHIN


# === 6. JIT credentials ===


def test_minted_token_passes_the_jit_check_until_it_expires(env: Env, comp: Companion) -> None:
    scope = "dataset:customers-eu"
    responds_with(request(env.gw.url, "/customers/1", headers=key("jit-app")), 403, "jit-required", app="jit-app")

    token = mint(env.key_file, "jit-app", scope, ttl="2m", policy=env.policy_file)
    c = jwt_claims(token)
    assert c["azp"] == "jit-app" and scope in c["scope"].split() and c["exp"] - c["iat"] == 120, c
    assert c["iss"] == ISSUER and (c["aud"] == AUDIENCE or AUDIENCE in c["aud"]) and c.get("jti"), c
    r = responds_with(request(env.gw.url, "/customers/1", headers={"authorization": f"Bearer {token}"}), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "jit-app"
    responds_with(request(env.gw.url, "/customers/1", headers={**key("jit-app"), "authorization": f"Bearer {token}"}), 200)

    # A token for another dataset is no JIT credential for this one.
    other = mint(env.key_file, "jit-app", "dataset:orders", ttl="1m", issuer=ISSUER, audience=AUDIENCE)
    r = request(env.gw.url, "/customers/1", headers={"authorization": f"Bearer {other}"})
    responds_with(r, 403, "jit-required", app="jit-app")
    assert r.header("www-authenticate") == 'Bearer error="insufficient_scope", scope="dataset:customers-eu"', r

    # A short-lived one works, then (clock skew 0 for this issuer) stops working once expired,
    # also for workers that cached it as verified.
    short = mint(env.key_file, "jit-app", scope, ttl="3s", policy=env.policy_file)
    exp = jwt_claims(short)["exp"]
    for _ in range(6):
        responds_with(request(env.gw.url, "/customers/2", headers={"authorization": f"Bearer {short}"}), 200)
    time.sleep(max(0.0, exp - time.time()) + 1.2)
    for _ in range(6):
        r = request(env.gw.url, "/customers/2", headers={"authorization": f"Bearer {short}"})
        responds_with(r, 401, "unauthenticated")


def test_mint_refuses_against_the_policy(env: Env) -> None:
    scope = "dataset:customers-eu"
    for args, why in [
        (["--app", "ghost-app", "--scope", scope], "not in the catalog"),
        (["--app", "jit-app", "--scope", scope, "--ttl", "10m"], "jit_max_ttl"),
        (["--app", "fleet-app", "--scope", scope, "--ttl", "1m"], "data_classes"),
    ]:
        proc = guardrail("mint", "--key", str(env.key_file), "--policy", str(env.policy_file), *args)
        assert proc.returncode != 0 and not proc.stdout.strip(), (args, proc)
        assert why in proc.stderr, (args, proc.stderr)


# === 7. fleet budget across two gateways ===


def test_fleet_budget_holds_across_two_gateways(env: Env, comp: Companion) -> None:
    gw2 = Envoy(node_bootstrap({"control": CONTROL}, "e2e-gw-2", upstream_port=env.upstream_port, wasm=env.wasm,
                               control_port=comp.port), env.tmp / "gw-2", name="gw-2")
    env.extra.append(gw2)
    gw2.start()
    wait_for(lambda: comp.node_acked(env.revision, count=2), timeout=RECONNECT_WITHIN,
             what=f"both gateways to acknowledge {env.revision}")
    gateways = [env.gw, gw2]

    # 6 + 6 = 12 > 10: each gateway stays under the budget on its own.
    per_gw = FLEET_BUDGET // 2 + 1
    admitted = Counter()
    for gw in gateways:
        for r in statuses(gw, "fleet-app", per_gw):
            responds_with(r, 200)
            admitted[gw.name] += 1

    status = wait_for(lambda: (s := comp.status()) and "fleet-app" in s["exhausted_apps"] and s, timeout=10,
                      what="the companion to see fleet-app's budget spent")
    usage = {u["app"]: u for u in status["fleet_usage"]}
    assert usage["fleet-app"]["allowed"] >= 2 * per_gw, usage
    assert usage["fleet-app"]["daily_budget"] == FLEET_BUDGET and usage["fleet-app"]["exhausted"] is True, usage

    def refused_everywhere() -> bool:
        ok = True
        for gw in gateways:
            r = request(gw.url, "/orders", headers=key("fleet-app"))
            if r.status == 200:
                admitted[gw.name] += 1
                ok = False
        return ok

    wait_for(refused_everywhere, timeout=5, what="both gateways to refuse fleet-app")
    assert all(n < FLEET_BUDGET for n in admitted.values()), f"a gateway reached the budget on its own: {admitted}"
    for gw in gateways:
        for r in statuses(gw, "fleet-app", 4):
            responds_with(r, 429, "budget-exhausted", app="fleet-app")
            assert r.json().get("rule") == "fleet-budget", r
            retry = int(r.header("retry-after") or "0")
            assert 0 < retry <= 86400, r
    # Other apps are untouched.
    responds_with(request(gw2.url, "/orders", headers=key("x-app")), 200)

    # The refusals show in the fleet usage once reported.
    def denied_reported() -> Any:
        u = {x["app"]: x for x in comp.status()["fleet_usage"]}.get("fleet-app", {})
        return u.get("denied", {}).get("budget-exhausted", 0) >= 8 and u

    u = wait_for(denied_reported, timeout=5, what="the budget-exhausted refusals in the fleet usage")
    assert u["throttled"] >= 8, u
