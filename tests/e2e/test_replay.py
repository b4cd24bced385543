"""`guardrail replay` on a log real Envoy wrote: mixed traffic through the Guardrail filter, recorded
by a JSON access log in the repository's format (issue 23), then replayed with the real CLI.

Self-consistency: against the policy in force, no decision changes (exit 0); against a candidate
with `prices` narrowed to the EU and the `tight` tier from 5 to 3 requests a minute, exactly those
differences (exit 3).

The access log is added to this test's bootstrap (the format of README "Safe rollout: replay"), so
the test does not depend on which of envoy/'s configs carry it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness import Envoy, bootstrap, plugin_configuration, request, require_artifact, responds_with, wait_for
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, claims

ED = SigningKey.ed25519("replay-ed25519")
ISSUER = "https://id.replay-e2e.example"
AUDIENCE = "replay-e2e"
EU, US = "eu-west-1", "us-east-1"
KEYS = {"eu-app": "k-replay-eu-0001", "us-app": "k-replay-us-0001", "burst-app": "k-replay-burst-0001"}

def make_policy(revision: str, prices_regions: list[str], tight_requests: int) -> dict[str, Any]:
    return policy(
        revision=revision,
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [ED.jwk()])],
        tiers={"standard": tier(600, "1m", burst=100), "tight": tier(tight_requests, "1m", burst=tight_requests)},
        apps=[
            app("eu-app", keys=[KEYS["eu-app"]], data_classes=["public", "internal", "regulated"]),
            app("us-app", keys=[KEYS["us-app"]], region=US),
            app("burst-app", keys=[KEYS["burst-app"]], tier="tight"),
        ],
        datasets=[
            {"id": "profiles", "classification": "regulated", "allowed_regions": [EU],
             "routes": [{"path_prefix": "/profiles"}]},
            {"id": "prices", "classification": "internal", "allowed_regions": prices_regions,
             "routes": [{"path_prefix": "/prices"}]},
        ],
        rules=[{"id": "no-profile-deletes", "effect": "deny", "datasets": ["profiles"],
                "when": "request.method == 'DELETE'"}],
        exemptions=[{"id": "probes", "routes": [{"path_prefix": "/healthz", "methods": ["GET"]}]}],
    )


CURRENT = make_policy("current", [EU, US], 5)
CANDIDATE = make_policy("candidate", [EU], 3)


def key(app_id: str) -> dict[str, str]:
    return {"x-api-key": KEYS[app_id]}


def jit(app_id: str, scope: str = "dataset:profiles") -> dict[str, str]:
    return {"authorization": "Bearer " + ED.sign(claims(iss=ISSUER, aud=AUDIENCE, azp=app_id, ttl=120, scope=scope))}


def replay(*args: str) -> tuple[int, dict[str, Any], str]:
    cmd = [str(require_artifact("GUARDRAIL_BIN")), "replay", "--json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        report = {}
    return r.returncode, report, r.stderr


def changes(report: dict[str, Any]) -> list[str]:
    return sorted(f"{a['app']}: {c['from']['label']} → {c['to']['label']}: {c['count']}"
                  for a in report["apps"] for c in a["changes"])


def reasons(report: dict[str, Any]) -> dict[str, int]:
    return {r["reason"]: r["count"] for r in report["undetermined"]["reasons"]}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> dict[str, Any]:
    """Mixed traffic through a real Envoy; its access log, and the files of both policies."""
    work = tmp_path_factory.mktemp("replay")
    log_path = work / "access.log"
    # The repository's own access-log format (envoy/guardrail.yaml), as replay reads it.
    config = bootstrap(plugin_configuration(CURRENT), upstream_port=upstream.server_port, wasm=wasm,
                       access_log_path=log_path)
    gw = Envoy(config, work, name="replay")
    sent = 0
    with gw:
        def go(path: str, status: int, code: str | None = None, **kw: Any) -> None:
            nonlocal sent
            responds_with(request(gw.url, path, **kw), status, code)
            sent += 1

        for i in range(4):
            go(f"/prices/{i}", 200, headers=key("eu-app"))
            go(f"/prices/{i}", 200, headers=key("us-app"))
        go("/profiles/7", 200, headers={**key("eu-app"), **jit("eu-app")})
        go("/profiles/7", 403, "jit-required", headers=key("eu-app"))
        go("/profiles/7", 403, "jit-required", headers={**key("eu-app"), **jit("eu-app", "dataset:prices")})
        go("/profiles/7", 403, "access-denied", method="DELETE", headers={**key("eu-app"), **jit("eu-app")})
        go("/profiles/7", 403, "residency-violation", headers=key("us-app"))
        go("/prices/1", 401, "unauthenticated")
        go("/healthz", 200)
        go("/prices/1", 200, method="OPTIONS",
           headers={"origin": "https://app.example", "access-control-request-method": "GET"})
        for i in range(8):  # the tight tier's bucket holds 5
            go("/prices/9", 200 if i < 5 else 429, "quota-exceeded" if i >= 5 else None, headers=key("burst-app"))

        def logged() -> list[str] | None:
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            return lines if len(lines) >= sent else None

        lines = wait_for(logged, timeout=10, what=f"{sent} access-log lines")
    current = work / "current.json"
    current.write_text(json.dumps(CURRENT))
    candidate = work / "candidate.json"
    candidate.write_text(json.dumps(CANDIDATE))
    records = [json.loads(line) for line in lines]
    # A filter built before it set wasm.guardrail_token logs null for every request: then the log is
    # replayed as one of a format without the field (the JIT step is undetermined).
    jit_allowed = next(r for r in records if r["path"] == "/profiles/7" and r["guardrail_code"] == "allow")
    logs_tokens = jit_allowed.get("guardrail_token") not in (None, "-")
    if not logs_tokens:
        for r in records:
            r.pop("guardrail_token", None)
    log = work / "replay.log"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"log": log, "records": records, "current": current, "candidate": candidate, "logs_tokens": logs_tokens,
            "work": work}


def test_the_access_log_records_guardrails_outcome(recorded: dict[str, Any]) -> None:
    codes = {r["guardrail_code"] for r in recorded["records"]}
    assert codes >= {"allow", "jit-required", "access-denied", "residency-violation", "unauthenticated", "exempt",
                     "preflight", "quota-exceeded"}, codes
    assert all(r["time"].endswith("Z") and r["request_id"] for r in recorded["records"])


def test_replaying_the_policy_in_force_changes_nothing(recorded: dict[str, Any]) -> None:
    code, report, err = replay("--policy", str(recorded["current"]), str(recorded["log"]))
    assert code == 0, f"{err}\n{json.dumps(report, indent=1)}"
    assert report["records"] == len(recorded["records"])
    assert report["changed"] == 0 and changes(report) == []
    expected = {"credential-not-recorded": 1}  # the 401: its (absent) credential is not logged
    if not recorded["logs_tokens"]:
        expected["token-scope-not-recorded"] = 4  # the four requests that reach the JIT step
    assert reasons(report) == expected, json.dumps(report, indent=1)
    assert report["malformed"]["count"] == 0


def test_replaying_a_changed_policy_shows_exactly_its_differences(recorded: dict[str, Any]) -> None:
    gz = recorded["work"] / "replay.log.gz"
    gz.write_bytes(gzip.compress(recorded["log"].read_bytes()))
    code, report, err = replay("--policy", str(recorded["candidate"]), str(gz))
    assert code == 3, err
    assert changes(report) == [
        "burst-app: 200 → 429 quota-exceeded: 2",
        "us-app: 200 → 403 residency-violation: 4",
    ], json.dumps(report, indent=1)
    code, baseline, err = replay("--policy", str(recorded["candidate"]), "--baseline", str(recorded["current"]),
                                 str(recorded["log"]))
    assert code == 3, err
    assert changes(baseline) == changes(report)


def test_an_envoy_default_format_log_is_refused_naming_the_fields(recorded: dict[str, Any], tmp_path: Path) -> None:
    text = tmp_path / "text.log"
    text.write_text('[2026-12-06T13:58:23.019Z] "GET /prices/1 HTTP/1.1" 200 - 0 12 3 2 "-" "curl/8.5.0" '
                    '"5f0c…" "api.example" "127.0.0.1:8080"\n')
    code, _, err = replay("--policy", str(recorded["current"]), str(text))
    assert code == 1
    assert "not a JSON access log" in err and "guardrail_code" in err, err
