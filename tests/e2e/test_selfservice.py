"""Self-service end to end (issue 22): the companion's token service with a standard OAuth 2.0
client (Authlib, client credentials per RFC 6749 §4.4), its token used through real Envoy, and
attestation (`apps[].review_by`) enforced by the filter.

One real companion (`guardrail serve --http … --issuer-key …`, SQLite store in its directory)
pushes the policy to one real Envoy with the filter; the echo upstream stands behind it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import jwt as pyjwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session, OAuthError

from companion import Companion, guardrail, keygen, with_console_and_envoy, write_policy
from harness import free_port, request, responds_with, wait_for
from policies import app, jwt_issuer, policy, tier

ISSUER = "https://companion.e2e.example"
AUDIENCE = "guardrail-e2e"
KEYS = {
    "claims-bot": "k-self-claims-0001",
    "us-bot": "k-self-us-0001",
    "marketing": "k-self-marketing-0001",
    "frozen": "k-self-frozen-0001",
    "overdue": "k-self-overdue-0001",
    "vault-bot": "k-self-vault-0001",
    "hammer": "k-self-hammer-0001",
    "limited": "k-self-limited-0001",
}
TOKEN_RATE = "40/1h"  # per client: 40 at once, then one every 90 s


def make_policy(jwk: dict[str, Any]) -> dict[str, Any]:
    regulated = ("public", "internal", "regulated")
    return policy(
        revision="self-1",
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [jwk])],
        settings={"jit_max_ttl": "5m"},
        tiers={"standard": tier(6000, "1m", burst=1000), "tiny": tier(2, "1h")},
        apps=[
            app("claims-bot", keys=[KEYS["claims-bot"]], data_classes=regulated, review_by="2099-12-31"),
            app("us-bot", keys=[KEYS["us-bot"]], data_classes=regulated, region="us-east-1"),
            app("marketing", keys=[KEYS["marketing"]]),
            app("frozen", keys=[KEYS["frozen"]], data_classes=regulated, lifecycle="quarantined"),
            app("overdue", keys=[KEYS["overdue"]], data_classes=regulated, review_by="2024-01-31"),
            app("vault-bot", keys=[KEYS["vault-bot"]], data_classes=regulated),
            app("hammer", keys=[KEYS["hammer"]], data_classes=regulated),
            app("limited", keys=[KEYS["limited"]], tier="tiny"),
        ],
        datasets=[
            {"id": "payments", "classification": "regulated", "allowed_regions": ["eu-west-1"],
             "routes": [{"path_prefix": "/payments"}]},
            {"id": "vault", "classification": "regulated", "allowed_regions": ["eu-west-1"],
             "routes": [{"path_prefix": "/vault"}], "approval": "required"},
            {"id": "catalog", "classification": "public", "allowed_regions": ["eu-west-1", "us-east-1"],
             "routes": [{"path_prefix": "/catalog"}]},
        ],
    )


class Setup:
    def __init__(self, comp: Companion, gw: Any, http: str, key_file: Path, policy_file: Path):
        self.comp, self.gw, self.http, self.key_file, self.policy_file = comp, gw, http, key_file, policy_file

    @property
    def token_url(self) -> str:
        return f"{self.http}/api/v1/token"

    def post(self, data: Any, **kwargs: Any) -> requests.Response:
        return requests.post(self.token_url, data=data, timeout=10, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, module_launch: Any) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("selfservice")
    key_file = tmp / "issuer.jwk"
    jwk = keygen(key_file, "companion-1")
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy(jwk))
    with with_console_and_envoy(policy_file, tmp / "companion", module_launch, "self-1",
                                ["--issuer-key", str(key_file), "--token-rate", TOKEN_RATE]) as (comp, gw, http):
        yield Setup(comp, gw, http, key_file, policy_file)


def client(setup: Setup, app_id: str, auth: str = "client_secret_basic", secret: str | None = None) -> OAuth2Session:
    return OAuth2Session(client_id=app_id, client_secret=secret or KEYS[app_id],
                         token_endpoint_auth_method=auth, scope="dataset:payments")


def trail(setup: Setup) -> list[dict[str, Any]]:
    r = requests.get(f"{setup.http}/api/v1/audit/events?limit=1000", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["events"]


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
def test_an_oauth_client_gets_a_jit_token_and_reads_regulated_data_through_envoy(setup: Setup, auth: str) -> None:
    headers = {"x-api-key": KEYS["claims-bot"]}
    responds_with(request(setup.gw.url, "/payments/7", headers=headers), 403, "jit-required", app="claims-bot")

    token = client(setup, "claims-bot", auth).fetch_token(setup.token_url, grant_type="client_credentials")
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 300, "the policy's jit_max_ttl"
    assert token["scope"] == "dataset:payments"
    claims = pyjwt.decode(token["access_token"], options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["azp"], claims["scope"]) == (ISSUER, AUDIENCE, "claims-bot", "dataset:payments")
    assert claims["exp"] - claims["iat"] == 300 and len(claims["jti"]) >= 16

    r = request(setup.gw.url, "/payments/7", headers={**headers, "authorization": f"Bearer {token['access_token']}"})
    responds_with(r, 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "claims-bot"
    # The token opens what it is scoped to, nothing else.
    responds_with(request(setup.gw.url, "/vault/1", headers={**headers, "authorization": f"Bearer {token['access_token']}"}),
                  403, "jit-required")

    # The trail has the token's jti, the app and the scope.
    entry = wait_for(lambda: next((e for e in trail(setup) if e["id"] == claims["jti"]), None), timeout=10,
                     what="the token in the trail")
    assert (entry["kind"], entry["app"], entry["actor"]) == ("token", "claims-bot", "claims-bot")
    assert "scope dataset:payments" in entry["detail"], entry
    # … and `guardrail audit` shows it beside the revisions.
    audit = json.loads(guardrail("audit", "--server", setup.comp.address, "--json", check=True).stdout)
    assert claims["jti"] in [e["id"] for e in audit["events"] if e["kind"] == "token"], audit["events"]


def test_the_token_endpoint_answers_per_rfc_6749(setup: Setup) -> None:
    ok = {"grant_type": "client_credentials", "scope": "dataset:payments"}

    def creds(app_id: str, secret: str | None = None) -> dict[str, str]:
        return {"client_id": app_id, "client_secret": secret or KEYS[app_id]}

    # (why, form, extra kwargs, status, error, part of the description)
    cases: list[tuple[str, Any, dict[str, Any], int, str, str]] = [
        ("wrong secret", {**ok, **creds("claims-bot", "nope")}, {}, 401, "invalid_client", "unknown client or wrong secret"),
        ("another app's key", {**ok, **creds("claims-bot", KEYS["marketing"])}, {}, 401, "invalid_client", "wrong secret"),
        ("unknown client", {**ok, "client_id": "ghost", "client_secret": "x"}, {}, 401, "invalid_client", "unknown client"),
        ("no client authentication", {**ok, "client_id": "claims-bot"}, {}, 401, "invalid_client", "no client authentication"),
        ("no grant_type", {"scope": "dataset:payments", **creds("claims-bot")}, {}, 400, "invalid_request", "grant_type is missing"),
        ("another grant", {**ok, "grant_type": "password", **creds("claims-bot")}, {}, 400, "unsupported_grant_type", "client_credentials only"),
        ("a repeated parameter", "grant_type=client_credentials&scope=dataset:payments&scope=dataset:catalog"
         f"&client_id=claims-bot&client_secret={KEYS['claims-bot']}", {"headers": {"content-type": "application/x-www-form-urlencoded"}},
         400, "invalid_request", "`scope` is given more than once"),
        ("JSON instead of a form", None, {"json": {**ok, **creds("claims-bot")}}, 400, "invalid_request", "application/x-www-form-urlencoded"),
        ("Basic and the form", {**ok, **creds("claims-bot")}, {"auth": ("claims-bot", KEYS["claims-bot"])}, 400, "invalid_request", "not both"),
        ("no scope", {"grant_type": "client_credentials", **creds("claims-bot")}, {}, 400, "invalid_scope", "no scope"),
        ("not a dataset scope", {**ok, "scope": "admin", **creds("claims-bot")}, {}, 400, "invalid_scope", "dataset:<id>"),
        ("unknown dataset", {**ok, "scope": "dataset:nope", **creds("claims-bot")}, {}, 400, "invalid_scope", "no dataset `nope`"),
        ("the app's region", {**ok, **creds("us-bot")}, {}, 400, "invalid_scope", "residency-violation"),
        ("the app's data classes", {**ok, **creds("marketing")}, {}, 400, "invalid_scope", "may not access regulated data"),
        ("quarantined", {**ok, **creds("frozen")}, {}, 400, "unauthorized_client", "is quarantined (app-not-active)"),
        ("review overdue", {**ok, **creds("overdue")}, {}, 400, "unauthorized_client", "review overdue since 2024-01-31"),
        ("approval required", {**ok, "scope": "dataset:vault", **creds("vault-bot")}, {}, 400, "invalid_scope", "approval: required"),
    ]
    for why, form, kwargs, status, error, part in cases:
        r = setup.post(form, **kwargs)
        assert r.status_code == status, f"{why}: {r.status_code} {r.text}"
        body = r.json()
        assert body["error"] == error, f"{why}: {body}"
        assert part in body["error_description"], f"{why}: {body['error_description']!r} lacks {part!r}"
        assert r.headers.get("cache-control") == "no-store", f"{why}: {r.headers}"
        assert r.headers["content-type"].startswith("application/json"), why

    # HTTP Basic refused: 401 with WWW-Authenticate (§5.2), as the OAuth client sees it.
    r = setup.post(ok, auth=("claims-bot", "wrong"))
    assert r.status_code == 401 and r.headers.get("www-authenticate", "").startswith("Basic"), r.headers
    with pytest.raises(OAuthError) as refused:
        client(setup, "marketing").fetch_token(setup.token_url, grant_type="client_credentials")
    assert refused.value.error == "invalid_scope"
    # A public dataset is fine for the same app.
    r = setup.post({**ok, "scope": "dataset:catalog", **creds("marketing")})
    assert r.status_code == 200 and r.json()["scope"] == "dataset:catalog", r.text
    # Nothing refused is in the trail: every token entry is for a token issued.
    assert {e["app"] for e in trail(setup) if e["kind"] == "token"} <= {"claims-bot", "marketing"}


def test_each_client_is_rate_limited_on_its_own(setup: Setup) -> None:
    form = {"grant_type": "client_credentials", "scope": "dataset:payments", "client_id": "hammer"}
    # Wrong secrets count too: the limit is what stops guessing.
    statuses = [setup.post({**form, "client_secret": f"guess-{i}"}).status_code for i in range(40)]
    assert statuses == [401] * 40, statuses
    r = setup.post({**form, "client_secret": KEYS["hammer"]})
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "slow_down" and int(r.headers["retry-after"]) > 0, (r.headers, r.text)
    assert r.headers.get("cache-control") == "no-store"
    # Another client is not held back by it.
    r = setup.post({**form, "client_id": "vault-bot", "client_secret": KEYS["vault-bot"]})
    assert r.status_code == 200, r.text


def test_an_app_past_its_review_date_is_refused_by_envoy(setup: Setup) -> None:
    r = request(setup.gw.url, "/catalog/1", headers={"x-api-key": KEYS["overdue"]})
    responds_with(r, 403, "app-not-active", app="overdue")
    assert "review overdue since 2024-01-31" in r.json()["detail"], r.json()
    assert r.json()["rule"] == "review_by"
    responds_with(request(setup.gw.url, "/catalog/1", headers={"x-api-key": KEYS["claims-bot"]}), 200)


def test_check_warns_before_the_review_date(tmp_path: Path) -> None:
    import datetime
    soon = (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=5)).isoformat()
    doc = policy(tiers={"standard": tier(60, "1m")}, apps=[app("soon", review_by=soon)])
    path = tmp_path / "policy.json"
    write_policy(path, doc)
    proc = guardrail("check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"apps[0].review_by: app `soon` is due for review by {soon} (in 5 days)" in proc.stdout + proc.stderr


def test_tokens_issued_just_before_a_stop_are_in_the_trail_after_a_restart(setup: Setup, tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    comp = Companion(setup.policy_file, tmp_path / "restarted",
                     args=["--http", http, "--issuer-key", str(setup.key_file)])
    comp.start()
    try:
        jtis = []
        for _ in range(5):
            r = requests.post(f"http://{http}/api/v1/token", auth=("vault-bot", KEYS["vault-bot"]), timeout=10,
                              data={"grant_type": "client_credentials", "scope": "dataset:payments"})
            assert r.status_code == 200, r.text
            jtis.append(pyjwt.decode(r.json()["access_token"], options={"verify_signature": False})["jti"])
        comp.stop()  # SIGTERM right after: the queued entries are written before the exit
        comp.start()
        audit = json.loads(guardrail("audit", "--server", comp.address, "--json", check=True).stdout)
        assert set(jtis) <= {e["id"] for e in audit["events"]}, (jtis, audit["events"])
    finally:
        comp.stop()


def test_the_companion_refuses_an_issuer_key_others_can_read_or_no_issuer_trusts(setup: Setup, tmp_path: Path) -> None:
    loose = tmp_path / "loose.jwk"
    loose.write_text(setup.key_file.read_text())
    os.chmod(loose, 0o644)
    stranger = tmp_path / "stranger.jwk"
    keygen(stranger, "stranger")
    for key, part in [(loose, "can be read by its group and others (mode 644)"),
                      (stranger, "no issuer of the policy trusts this key")]:
        proc = guardrail("serve", "--policy", str(setup.policy_file), "--listen", "127.0.0.1:0", "--store",
                         f"sqlite:{tmp_path / (key.name + '.db')}", "--http", "127.0.0.1:0", "--issuer-key", str(key))
        assert proc.returncode == 1, f"{key.name}: exited {proc.returncode}\n{proc.stderr}"
        assert f"--issuer-key {key}" in proc.stderr and part in proc.stderr, proc.stderr


def test_a_raised_quota_takes_effect_at_once_for_a_throttled_app(setup: Setup) -> None:
    """The mechanism an approved quota request will use: a quota override pushed to the fleet. An
    app throttled under 2 per hour is not held back for the rest of the hour by its old bucket."""
    headers = {"x-api-key": KEYS["limited"]}
    assert [request(setup.gw.url, "/catalog/1", headers=headers).status for _ in range(2)] == [200, 200]
    r = responds_with(request(setup.gw.url, "/catalog/1", headers=headers), 429, "quota-exceeded", app="limited")
    assert int(r.header("retry-after")) > 60, r  # under the old limit: half an hour

    doc = json.loads(setup.policy_file.read_text())
    doc["revision"] = "self-2"
    for a in doc["apps"]:
        if a["id"] == "limited":
            a["quota_overrides"] = [{"rate": {"requests": 600, "per": "1m"}, "expires_at": "2099-01-01T00:00:00Z",
                                     "reason": "approved increase"}]
    write_policy(setup.policy_file, doc)
    wait_for(lambda: setup.comp.node_acked("self-2"), timeout=15, what="Envoy to acknowledge self-2")
    # The first request may still find the bucket empty under the new limit (one interval, 100 ms).
    r = wait_for(lambda: (lambda r: r if r.status == 200 else None)(request(setup.gw.url, "/catalog/1", headers=headers)),
                 timeout=5, what="the raised quota to admit the throttled app")
    assert "600" in (r.header("ratelimit-policy") or ""), r.headers


def test_the_console_warns_of_reviews_due_as_check_does(setup: Setup) -> None:
    page = requests.get(f"{setup.http}/", timeout=10)
    assert page.status_code == 200, page.text
    section = page.text[page.text.index('<section id="reviews-due">'):]
    section = section[:section.index("</section>")]
    assert "app `overdue`: review overdue since 2024-01-31" in section, section
    assert "claims-bot" not in section, "a review years ahead is not due"
    apps = {a["id"]: a for a in requests.get(f"{setup.http}/api/v1/apps", timeout=10).json()["apps"]}
    assert "review overdue since 2024-01-31" in apps["overdue"]["review_due"], apps["overdue"]
    assert "review_due" not in apps["claims-bot"], apps["claims-bot"]
    app_page = requests.get(f"{setup.http}/apps/overdue", timeout=10).text
    assert 'id="review-due"' in app_page and "review overdue since 2024-01-31" in app_page
