"""Requests and approvals end to end (issue 22): an app files a request over the companion's HTTP
API with its API key, an approver of `settings.approvers` approves it with their token, the
companion pushes the policy with the request applied as a new revision, real Envoy enforces it, and
at the request's end the fleet reverts by itself.

One real companion (`guardrail serve --http … --issuer-key …`, SQLite store in its directory)
pushes the policy to one real Envoy with the filter; the echo upstream stands behind it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, guardrail, keygen, with_console_and_envoy, write_policy
from harness import hash_key, request, responds_with, wait_for
from policies import CONNECTOR, app, jwt_issuer, policy, tier

ISSUER = "https://companion.approvals.example"
AUDIENCE = "guardrail-e2e"
REVISION = "appr-1"
KEYS = {
    "campaign": "k-appr-campaign-0001",
    "vault-bot": "k-appr-vault-0001",
    "legacy": "k-appr-legacy-0001",
    "stale": "k-appr-stale-0001",
    "owned": "k-appr-owned-0001",
    "scratch-bot": "k-appr-scratch-0001",
}
APPROVER = ("ana@e2e.example", "approver-token-ana-0001")
OWNER_APPROVER = ("olga@e2e.example", "approver-token-olga-0001")  # owns app `owned`
NOT_AN_APPROVER = "someone-elses-token-0001"


def make_policy(jwk: dict[str, Any], with_scratch: bool = True) -> dict[str, Any]:
    regulated = ("public", "internal", "regulated")
    datasets = [
        {"id": "vault", "classification": "regulated", "allowed_regions": ["eu-west-1"],
         "routes": [{"path_prefix": "/vault"}], "approval": "required"},
        {"id": "catalog", "classification": "public", "allowed_regions": ["eu-west-1"],
         "routes": [{"path_prefix": "/catalog"}]},
    ]
    if with_scratch:
        datasets.append({"id": "scratch", "classification": "regulated", "allowed_regions": ["eu-west-1"],
                         "routes": [{"path_prefix": "/scratch"}], "approval": "required"})
    yesterday = (datetime.datetime.now(datetime.timezone.utc).date() - datetime.timedelta(days=1)).isoformat()
    owned = app("owned", keys=[KEYS["owned"]], tier="tiny")
    owned["owner"] = OWNER_APPROVER[0]
    return policy(
        revision=REVISION,
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [jwk])],
        settings={
            "jit_max_ttl": "5m",
            "max_request_duration": "30d",
            "approvers": [{"id": APPROVER[0], "token": hash_key(APPROVER[1])},
                          {"id": OWNER_APPROVER[0], "token": hash_key(OWNER_APPROVER[1])}],
        },
        tiers={"standard": tier(6000, "1m", burst=1000), "tiny": tier(2, "1h")},
        apps=[
            app("campaign", keys=[KEYS["campaign"]], tier="tiny"),
            app("vault-bot", keys=[KEYS["vault-bot"]], data_classes=regulated),
            app("legacy", keys=[KEYS["legacy"]], connectors=()),
            app("stale", keys=[KEYS["stale"]], review_by=yesterday),
            owned,
            app("scratch-bot", keys=[KEYS["scratch-bot"]], data_classes=regulated),
        ],
        datasets=datasets,
        exemptions=[{"id": "probes", "routes": [{"path_prefix": "/livez", "methods": ["GET"]}],
                     "reason": "the kubelet's liveness probes carry no credential"}],
    )


class Setup:
    def __init__(self, comp: Companion, gw: Any, http: str, policy_file: Path, jwk: dict[str, Any]):
        self.comp, self.gw, self.http, self.policy_file, self.jwk = comp, gw, http, policy_file, jwk

    def file(self, app_id: str, key: str | None = None, **fields: Any) -> requests.Response:
        body = {"app": app_id, "reason": "e2e", **fields}
        return requests.post(f"{self.http}/api/v1/requests", json=body, auth=(app_id, key or KEYS[app_id]), timeout=10)

    def decide(self, request_id: str, verb: str, token: str, **body: Any) -> requests.Response:
        return requests.post(f"{self.http}/api/v1/requests/{request_id}/{verb}", json=body or None,
                             headers={"authorization": f"Bearer {token}"}, timeout=10)

    def get(self, request_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.http}/api/v1/requests/{request_id}",
                         headers={"authorization": f"Bearer {APPROVER[1]}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def acked(self) -> str:
        """The revision Envoy acknowledged last (the one it enforces)."""
        nodes = self.comp.connected_nodes()
        assert len(nodes) == 1, nodes
        return nodes[0].get("acked_revision", "")

    def trail(self) -> list[dict[str, Any]]:
        r = requests.get(f"{self.http}/api/v1/audit/events?limit=1000", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["events"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, module_launch: Any) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("approvals")
    key_file = tmp / "issuer.jwk"
    jwk = keygen(key_file, "companion-1")
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy(jwk))
    with with_console_and_envoy(policy_file, tmp / "companion", module_launch, REVISION,
                                ["--issuer-key", str(key_file)]) as (comp, gw, http):
        yield Setup(comp, gw, http, policy_file, jwk)


def rfc3339(seconds_from_now: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def approved(setup: Setup, request_id: str) -> dict[str, Any]:
    r = setup.decide(request_id, "approve", APPROVER[1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["decided_by"]) == ("approved", APPROVER[0]), body
    assert body["revision"].startswith(f"{REVISION}+req."), body
    wait_for(lambda: setup.acked() == body["revision"], timeout=15, what=f"Envoy to acknowledge {body['revision']}")
    return body


def test_a_quota_request_is_filed_approved_enforced_by_envoy_and_gone_at_its_end(setup: Setup) -> None:
    headers = {"x-api-key": KEYS["campaign"]}
    assert [request(setup.gw.url, "/catalog/1", headers=headers).status for _ in range(2)] == [200, 200]
    responds_with(request(setup.gw.url, "/catalog/1", headers=headers), 429, "quota-exceeded", app="campaign")

    # Filed as the app, with its API key; ends 12 s from now.
    r = setup.file("campaign", kind="quota", rate="600/1m", until=rfc3339(12), reason="winter campaign launch")
    assert r.status_code == 201, r.text
    filed = r.json()
    assert filed["status"] == "pending" and filed["risk_tier"] in ("green", "amber", "red"), filed
    assert filed["change"].startswith("rate 2/1h → 600/1m until "), filed
    assert r.headers["location"] == f"/api/v1/requests/{filed['id']}"
    # Pending changes nothing.
    assert setup.acked() == REVISION
    responds_with(request(setup.gw.url, "/catalog/1", headers=headers), 429, "quota-exceeded")

    body = approved(setup, filed["id"])
    # Enforced at once: the throttled app is admitted under the new limit, its old bucket's debt (half an
    # hour under 2/1h) capped at the new bucket, so it waits one new interval (100 ms) at most.
    r = wait_for(lambda: (lambda r: r if r.status == 200 else None)(request(setup.gw.url, "/catalog/1", headers=headers)),
                 timeout=5, what="the approved quota to admit the throttled app")
    assert "600;w=60" in (r.header("ratelimit-policy") or ""), r.headers
    # The served policy says where the override comes from.
    status = setup.comp.status()
    assert status["revision"] == body["revision"], status

    # At its end the request expires by itself and the fleet is back on the file's policy.
    wait_for(lambda: setup.get(filed["id"])["status"] == "expired", timeout=25, what="the request to expire")
    wait_for(lambda: setup.acked() == REVISION, timeout=15, what=f"Envoy back on {REVISION}")
    r = wait_for(lambda: (lambda r: r if r.status == 429 else None)(request(setup.gw.url, "/catalog/1", headers=headers)),
                 timeout=5, what="the old limit to throttle the app again")
    assert "2;w=3600" in (r.header("ratelimit-policy") or ""), r.headers

    kinds = [(e["kind"], e["actor"]) for e in setup.trail() if e["id"] == filed["id"]]
    assert ("request-filed", "campaign") in kinds and ("request-approved", APPROVER[0]) in kinds, kinds
    assert any(k == "request-expired" for k, _ in kinds), kinds
    # The audit trail of revisions names the request as the source of its revision.
    audit = json.loads(guardrail("audit", "--server", setup.comp.address, "--json", check=True).stdout)
    sources = {r["revision"]: r["source"] for r in audit["revisions"]}
    assert filed["id"] in sources.get(body["revision"], ""), sources


def test_access_to_a_dataset_that_needs_approval_is_tokened_only_within_an_approved_request(setup: Setup) -> None:
    form = {"grant_type": "client_credentials", "scope": "dataset:vault"}
    token_url = f"{setup.http}/api/v1/token"
    r = requests.post(token_url, data=form, auth=("vault-bot", KEYS["vault-bot"]), timeout=10)
    assert r.status_code == 400 and "approval: required" in r.json()["error_description"], r.text

    r = setup.file("vault-bot", kind="access", dataset="vault", until=rfc3339(3600), reason="quarter-end audit")
    assert r.status_code == 201, r.text
    approved(setup, r.json()["id"])

    r = requests.post(token_url, data=form, auth=("vault-bot", KEYS["vault-bot"]), timeout=10)
    assert r.status_code == 200, r.text
    token = r.json()
    assert token["scope"] == "dataset:vault" and 0 < token["expires_in"] <= 300, token
    headers = {"x-api-key": KEYS["vault-bot"]}
    responds_with(request(setup.gw.url, "/vault/1", headers=headers), 403, "jit-required")
    r = request(setup.gw.url, "/vault/1", headers={**headers, "authorization": f"Bearer {token['access_token']}"})
    responds_with(r, 200)
    # Another app with the same classes has no grant.
    r = requests.post(token_url, data=form, auth=("scratch-bot", KEYS["scratch-bot"]), timeout=10)
    assert r.status_code == 400, r.text


def test_a_connector_exception_and_a_review_are_enforced_by_envoy_once_approved(setup: Setup) -> None:
    legacy = {"x-api-key": KEYS["legacy"]}
    responds_with(request(setup.gw.url, "/catalog/1", headers=legacy), 403, "connector-not-approved", app="legacy")
    r = setup.file("legacy", kind="connector", connector=CONNECTOR, until=rfc3339(3600), reason="migration")
    assert r.status_code == 201, r.text
    approved(setup, r.json()["id"])
    responds_with(request(setup.gw.url, "/catalog/1", headers=legacy), 200)

    stale = {"x-api-key": KEYS["stale"]}
    r = request(setup.gw.url, "/catalog/1", headers=stale)
    responds_with(r, 403, "app-not-active", app="stale")
    assert "review overdue" in r.json()["detail"]
    until = (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=20)).isoformat()
    r = setup.file("stale", kind="review", until=until, reason="re-attested by the team")
    assert r.status_code == 201, r.text
    approved(setup, r.json()["id"])
    responds_with(request(setup.gw.url, "/catalog/1", headers=stale), 200)


def test_approved_requests_outlive_a_restart_of_the_companion(setup: Setup) -> None:
    before = setup.comp.status()["revision"]
    assert "+req." in before, "the earlier tests left approved requests in force"
    setup.comp.stop()
    setup.comp.start()
    # The first snapshot after the restart already carries them: the same revision, acknowledged again.
    assert setup.comp.status()["revision"] == before
    wait_for(lambda: setup.comp.node_acked(before), timeout=20, what=f"Envoy to acknowledge {before} again")
    responds_with(request(setup.gw.url, "/catalog/1", headers={"x-api-key": KEYS["legacy"]}), 200)


def test_bad_filings_and_decisions_get_clear_errors_and_change_nothing(setup: Setup) -> None:
    def problem(r: requests.Response, status: int, code: str, part: str) -> None:
        assert r.status_code == status, f"{r.status_code} {r.text}"
        body = r.json()
        assert body["type"] == f"urn:guardrail:problem:{code}", body
        assert part in body["detail"], f"{body['detail']!r} lacks {part!r}"

    revision = setup.comp.status()["revision"]
    until = rfc3339(3600)
    problem(setup.file("campaign", key="wrong-key", kind="quota", rate="600/1m", until=until), 401, "unauthenticated", "unknown app id or API key")
    problem(setup.file("ghost", key="x", kind="quota", rate="600/1m", until=until), 401, "unauthenticated", "unknown app")
    problem(setup.file("campaign", kind="quota", rate="1/1h", until=until), 422, "invalid-request", "already has 2/1h")
    problem(setup.file("campaign", kind="quota", rate="600/1m", until="2020-01-01"), 422, "invalid-request", "in the past")
    problem(setup.file("campaign", kind="quota", rate="600/1m", until=rfc3339(40 * 86400)), 422, "invalid-request", "beyond the policy's maximum of 30 days")
    problem(setup.file("vault-bot", kind="access", dataset="nope", until=until), 422, "invalid-request", "dataset `nope`: not in the policy")
    problem(setup.file("campaign", kind="quota", rate="600/1m", until=until, colour="red"), 400, "invalid-request", "unknown field `colour`")
    r = requests.post(f"{setup.http}/api/v1/requests", data="{not json", auth=("campaign", KEYS["campaign"]),
                      headers={"content-type": "application/json"}, timeout=10)
    problem(r, 400, "invalid-request", "not a valid request")

    filed = setup.file("owned", kind="quota", rate="600/1m", until=until)
    assert filed.status_code == 201, filed.text
    rid = filed.json()["id"]
    problem(setup.file("owned", kind="quota", rate="600/1m", until=until), 409, "duplicate-request", rid)
    problem(setup.decide(rid, "approve", NOT_AN_APPROVER), 401, "unauthenticated", "no approver's")
    problem(setup.decide(rid, "approve", OWNER_APPROVER[1]), 403, "own-request", "nobody approves a request of their own app")
    r = requests.post(f"{setup.http}/api/v1/requests/{rid}/approve", auth=("owned", KEYS["owned"]), timeout=10)
    problem(r, 403, "not-an-approver", "settings.approvers")
    problem(setup.decide(rid, "reject", APPROVER[1]), 422, "invalid-request", "say why it is rejected")
    problem(setup.decide("req-000000000000", "approve", APPROVER[1]), 404, "unknown-request", "no request")
    assert setup.get(rid)["status"] == "pending"
    r = setup.decide(rid, "reject", APPROVER[1], reason="no business case")
    assert r.status_code == 200 and r.json()["status"] == "rejected", r.text
    problem(setup.decide(rid, "approve", APPROVER[1]), 409, "already-decided", f"is rejected by {APPROVER[0]}")
    # Nothing of it reached the fleet.
    assert setup.comp.status()["revision"] == revision


def test_a_request_the_policy_can_no_longer_take_is_refused_at_approval_and_stays_pending(setup: Setup) -> None:
    r = setup.file("scratch-bot", kind="access", dataset="scratch", until=rfc3339(3600), reason="one-off export")
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    # The platform team drops the dataset from the file meanwhile.
    doc = make_policy(setup.jwk, with_scratch=False)
    doc["revision"] = "appr-2"
    write_policy(setup.policy_file, doc)
    wait_for(lambda: setup.acked().startswith("appr-2"), timeout=15, what="Envoy to acknowledge appr-2")
    revision = setup.comp.status()["revision"]
    r = setup.decide(rid, "approve", APPROVER[1])
    assert r.status_code == 422, r.text
    assert "unknown dataset `scratch`" in r.json()["detail"] and "stays pending" in r.json()["detail"], r.json()
    assert setup.get(rid)["status"] == "pending"
    assert setup.comp.status()["revision"] == revision
    # The other approved requests stayed in force on the new file.
    assert "+req." in revision, revision


def test_exempt_requests_are_counted_apart_in_the_companions_status(setup: Setup) -> None:
    before = setup.comp.status().get("exempt", {}).get("probes", 0)
    for _ in range(3):
        responds_with(request(setup.gw.url, "/livez"), 200)
    status = wait_for(lambda: (s := setup.comp.status()) and s.get("exempt", {}).get("probes") == before + 3 and s,
                      timeout=15, what="the exempt count in status")
    assert all(not u["app"].startswith("*") for u in status["fleet_usage"]), status["fleet_usage"]
    text = guardrail("status", "--server", setup.comp.address, check=True).stdout
    assert f"exempt (requests passed without an app, no quota): probes {before + 3}" in text, text
