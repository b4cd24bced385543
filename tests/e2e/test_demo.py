"""The demo of `./build.sh run`, end to end: envoy/guardrail.yaml rendered the way build.sh renders
it, with examples/policy.yaml inline (via `guardrail export`), and the keys of
examples/demo-keys.txt doing what the printed curl lines promise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, Envoy, artifact, hash_key, render_mod, request, responds_with

POLICY_YAML = REPO / "examples" / "policy.yaml"
DEMO_KEYS = REPO / "examples" / "demo-keys.txt"


def demo_keys() -> dict[str, str]:
    keys = {}
    if DEMO_KEYS.exists():
        for line in DEMO_KEYS.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2:
                keys[parts[0]] = parts[1]
    return keys


def guardrail(*args: str) -> subprocess.CompletedProcess:
    binary = artifact("GUARDRAIL_BIN")
    if not binary.is_file():
        pytest.fail(f"GUARDRAIL_BIN: {binary} does not exist; build it with ./build.sh", pytrace=False)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.fixture(scope="module")
def demo_policy() -> dict[str, Any]:
    if guardrail("export", "--help").returncode != 0:
        pytest.skip("`guardrail export` is not implemented yet")
    result = guardrail("export", str(POLICY_YAML))
    assert result.returncode == 0, f"guardrail export examples/policy.yaml:\n{result.stderr}"
    return json.loads(result.stdout)


def active(app: dict[str, Any]) -> bool:
    lifecycle = app.get("lifecycle")
    return lifecycle in ("approved", "published") or (lifecycle == "draft" and app.get("environment") == "dev")


def test_hash_key_cli_matches_the_catalog_digest() -> None:
    for key in ["a-demo-key-of-some-length", *demo_keys().values()]:
        result = guardrail("hash-key", key)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == hash_key(key), f"guardrail hash-key {key}"


def test_policy_checks() -> None:
    result = guardrail("check", str(POLICY_YAML))
    assert result.returncode == 0, f"guardrail check examples/policy.yaml:\n{result.stdout}{result.stderr}"


def test_demo_keys_belong_to_their_apps(demo_policy: dict[str, Any]) -> None:
    keys = demo_keys()
    assert keys, f"{DEMO_KEYS} has no `app_id key` lines"
    apps = {a["id"]: a for a in demo_policy["apps"]}
    for app_id, key in keys.items():
        assert app_id in apps, f"demo-keys.txt names {app_id}, which is not in the policy"
        assert hash_key(key) in apps[app_id].get("api_keys", []), f"the demo key of {app_id} is not in its api_keys"


@pytest.fixture(scope="module")
def demo_gw(demo_policy: dict[str, Any], upstream: Any, wasm: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("demo")
    text = render_mod.render(
        (REPO / "envoy" / "guardrail.yaml").read_text(),
        {
            "listener_port": 0,  # Envoy picks; the harness reads it from the admin interface
            "admin_port": 0,
            "upstream_port": upstream.server_port,
            "wasm_path": str(wasm),
            "plugin_config": {"policy": demo_policy},
            "access_log_path": workdir / "demo.access.log",  # ACCESS_LOG of `run`
        },
    )
    with Envoy(text, workdir, name="demo") as gw:
        yield gw


def test_demo_decisions(demo_gw: Envoy, demo_policy: dict[str, Any]) -> None:
    apps = {a["id"]: a for a in demo_policy["apps"]}
    responds_with(request(demo_gw.url, "/orders/42"), 401, "unauthenticated")
    responds_with(request(demo_gw.url, "/orders/42", headers={"x-api-key": "not-a-real-key"}), 401, "unauthenticated")
    for app_id, key in demo_keys().items():
        r = request(demo_gw.url, "/orders/42", headers={"x-api-key": key})
        if active(apps[app_id]):
            assert responds_with(r, 200).upstream["headers"].get("x-guardrail-app") == app_id
        else:
            responds_with(r, 403, "app-not-active", app=app_id)


def test_demo_governance_lines(demo_gw: Envoy) -> None:
    """The data-governance lines `run` prints for the demo policy: residency, data classes, JIT (with
    a token minted as the printed line mints it), and the DELETE rule."""
    keys = demo_keys()

    def get(path: str, app: str, method: str = "GET", **headers: str) -> Any:
        return request(demo_gw.url, path, method=method, headers={"x-api-key": keys[app], **headers})

    responds_with(get("/customers/1", "us-promo"), 403, "residency-violation", app="us-promo")
    assert responds_with(get("/catalog/1", "us-promo"), 200).upstream["headers"].get("x-guardrail-app") == "us-promo"
    r = responds_with(get("/customers/1", "promo-builder"), 403, "access-denied", app="promo-builder")
    assert r.json().get("rule") == "data-class", r
    responds_with(get("/customers/1", "pos-dashboard"), 200)
    r = responds_with(get("/customers/1", "pos-dashboard", method="DELETE"), 403, "access-denied", app="pos-dashboard")
    assert r.json().get("rule") == "no-deletes", r
    responds_with(get("/payments/1", "pos-dashboard"), 403, "jit-required", app="pos-dashboard")
    minted = guardrail("mint", "--key", "examples/demo/issuer-key.jwk.json", "--app", "pos-dashboard",
                       "--scope", "dataset:payments", "--ttl", "10m", "--policy", str(POLICY_YAML))
    assert minted.returncode == 0, minted.stderr
    r = get("/payments/1", "pos-dashboard", authorization=f"Bearer {minted.stdout.strip()}")
    assert responds_with(r, 200).upstream["headers"].get("x-guardrail-app") == "pos-dashboard"


def test_demo_quota_line(demo_gw: Envoy, demo_policy: dict[str, Any]) -> None:
    """The app with the smallest bucket gets its burst, then 429 (what `run` prints last)."""
    apps = {a["id"]: a for a in demo_policy["apps"]}
    keys = {i: k for i, k in demo_keys().items() if active(apps[i])}

    def burst(app_id: str) -> int:
        rate = demo_policy["tiers"][apps[app_id]["tier"]]["rate"]
        return int(rate.get("burst") or rate["requests"])

    app_id = min(keys, key=burst)
    n = burst(app_id)
    if n > 100:
        pytest.skip(f"the smallest demo bucket ({app_id}) holds {n} requests")
    statuses = [request(demo_gw.url, "/orders/42", headers={"x-api-key": keys[app_id]}).status for _ in range(n + 1)]
    # One request may already have been spent by test_demo_decisions.
    assert statuses[-1] == 429 and statuses.count(200) >= n - 1, statuses


@pytest.mark.parametrize(
    "path", ["/../catalog/1", "/catalog/../../customers/1", "/%2e%2e/customers/1", "/catalog%2F1", "/cat%00alog/1",
             "/catalog/%zz", "/catalog/%252F"],
)
def test_demo_refuses_every_unsafe_path_as_the_spec_says(demo_gw: Envoy, path: str) -> None:
    """The SPEC's `request` row in the shipped gateway: above the root, an encoded slash, NUL, a bad
    or double escape are 400 invalid-path as problem+json from the filter, with a decision log
    line (Envoy's own normalisation is off there: it would clamp `..` and answer NUL itself)."""
    r = responds_with(request(demo_gw.url, path, headers={"x-api-key": demo_keys()["pos-dashboard"]}), 400,
                      "invalid-path")
    line = demo_gw.decision_for(r.header("x-request-id") or "", "invalid-path")
    assert line.get("status") == 400 and line.get("rule") == "path", line


def test_demo_forwards_the_path_it_judged(demo_gw: Envoy) -> None:
    key = {"x-api-key": demo_keys()["pos-dashboard"]}
    r = responds_with(request(demo_gw.url, "/catalog//shoes/./red/../blue?size=9", headers=key), 200)
    assert r.upstream["path"] == "/catalog/shoes/blue?size=9", r
    responds_with(request(demo_gw.url, "/catalog/%2e%2e/payments/1", headers=key), 403, "jit-required")


def test_demo_access_log(demo_gw: Envoy) -> None:
    """The shipped config's JSON access log (rendered where `ACCESS_LOG` says) records Guardrail's
    outcome of an admitted and a refused request, and no credential."""
    keys = demo_keys()
    ok = responds_with(request(demo_gw.url, "/catalog/1", headers={"x-api-key": keys["us-promo"]}), 200)
    no = responds_with(request(demo_gw.url, "/customers/1", headers={"x-api-key": keys["us-promo"]}), 403,
                       "residency-violation")
    entry = demo_gw.access_log_for(ok.header("x-request-id") or "")
    assert (entry["guardrail_app"], entry["guardrail_code"], entry["status"]) == ("us-promo", "allow", 200), entry
    entry = demo_gw.access_log_for(no.header("x-request-id") or "")
    assert (entry["guardrail_app"], entry["guardrail_code"], entry["status"]) == ("us-promo", "residency-violation", 403), entry
    assert entry["guardrail_dataset"], entry
    assert keys["us-promo"] not in demo_gw.access_log_path.read_text()
