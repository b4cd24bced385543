"""The spine of the SPEC decision table, end to end: a real Envoy with the real guardrail.wasm in
front of the echo upstream. One gateway (`gw`) serves the whole module; the tests about loading a
policy start their own.

Rows covered: policy loaded, credential (API key and JWT), catalog, lifecycle, rate, budget; plus
header hygiene, problem+json, RateLimit headers, decision log lines and counters.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from harness import Envoy, prometheus_value, quiet_stats, request, responds_with, settled_deltas, wait_for
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, alg_none, claims, hs256_with_public_key, raw_token, swap_payload

ISSUER = "https://id.e2e.example"
AUDIENCE = "guardrail-e2e"

ED = SigningKey.ed25519("e2e-ed25519")
EC = SigningKey.p256("e2e-p256")
RSA = SigningKey.rsa2048("e2e-rsa")
ROGUE = SigningKey.ed25519("e2e-ed25519")  # same kid as ED, different key: a forged signature
STRANGER = SigningKey.ed25519("e2e-unknown-kid")

KEYS = {  # app id → its API key (the catalog stores only the digest)
    "pos-dashboard": "k-pos-dashboard-e2e-0001",
    "draft-dev": "k-draft-dev-e2e-0001",
    "draft-test": "k-draft-test-e2e-0001",
    "draft-prod": "k-draft-prod-e2e-0001",
    "approved-app": "k-approved-app-e2e-0001",
    "published-app": "k-published-app-e2e-0001",
    "deprecated-app": "k-deprecated-app-e2e-0001",
    "quarantined-app": "k-quarantined-app-e2e-0001",
    "rate-app": "k-rate-app-e2e-0001",
    "burst-app": "k-burst-app-e2e-0001",
    "budget-app": "k-budget-app-e2e-0001",
    "stats-app": "k-stats-app-e2e-0001",
    "log-app": "k-log-app-e2e-0001",
    "refill-app": "k-refill-app-e2e-0001",
}

POLICY = policy(
    revision="spine-1",
    jwt=[jwt_issuer(ISSUER, [AUDIENCE], [ED.jwk(), EC.jwk(), RSA.jwk()])],
    tiers={
        "standard": tier(6000, "1m", burst=1000, daily_budget=1_000_000),
        "tiny": tier(5, "1h", daily_budget=1000),  # burst defaults to requests: 5
        "fifty": tier(50, "1h", burst=50, daily_budget=1_000_000),
        "budget3": tier(6000, "1m", burst=1000, daily_budget=3),
        "refill": tier(3600, "1h", burst=5),  # one a second, five at most: a full bucket in 5 s
    },
    apps=[
        app("pos-dashboard", keys=[KEYS["pos-dashboard"]]),
        app("jwt-app"),  # authenticates with JWTs only (azp = jwt-app)
        app("draft-dev", lifecycle="draft", environment="dev", keys=[KEYS["draft-dev"]]),
        app("draft-test", lifecycle="draft", environment="test", keys=[KEYS["draft-test"]]),
        app("draft-prod", lifecycle="draft", environment="prod", keys=[KEYS["draft-prod"]]),
        app("approved-app", lifecycle="approved", keys=[KEYS["approved-app"]]),
        app("published-app", lifecycle="published", keys=[KEYS["published-app"]]),
        app("deprecated-app", lifecycle="deprecated", keys=[KEYS["deprecated-app"]]),
        app("quarantined-app", lifecycle="quarantined", keys=[KEYS["quarantined-app"]]),
        app("rate-app", tier="tiny", keys=[KEYS["rate-app"]]),
        app("burst-app", tier="fifty", keys=[KEYS["burst-app"]]),
        app("budget-app", tier="budget3", keys=[KEYS["budget-app"]]),
        app("stats-app", tier="tiny", keys=[KEYS["stats-app"]]),
        app("log-app", lifecycle="quarantined", keys=[KEYS["log-app"]]),
        app("refill-app", tier="refill", keys=[KEYS["refill-app"]]),
    ],
)


@pytest.fixture(scope="module")
def gw(module_launch: Any) -> Envoy:
    return module_launch({"policy": POLICY}, name="spine")


def with_key(app_id: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": KEYS[app_id], **extra}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def sf_items(field: str | None) -> dict[str, dict[str, str]]:
    """A structured-field list (RFC 8941) of `"name";k=v;k=v` items as {name: {k: v}} (loosely)."""
    out: dict[str, dict[str, str]] = {}
    for item in (field or "").split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        out[parts[0].strip('"')] = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return out


def positive_int(value: str | None) -> int:
    assert value is not None and re.fullmatch(r"[1-9][0-9]*", value), f"not a positive integer: {value!r}"
    return int(value)


# === policy loaded ===


def test_no_policy_fails_closed_with_503(launch: Any) -> None:
    gw = launch({}, name="no-policy")
    r = request(gw.url, "/anything", headers=with_key("pos-dashboard"))
    responds_with(r, 503, "policy-unavailable")
    gw.decision_for(r.header("x-request-id") or "", "policy-unavailable")


def test_no_policy_with_failure_mode_open_passes(launch: Any) -> None:
    gw = launch({"failure_mode": "open"}, name="open")
    r = request(gw.url, "/anything", headers={"x-guardrail-app": "evil"})
    responds_with(r, 200)
    assert r.upstream["path"] == "/anything"
    assert "x-guardrail-app" not in r.upstream["headers"], "client-sent x-guardrail-app reached the upstream"


@pytest.mark.parametrize(
    "plugin_config, field",
    [
        pytest.param(
            {"policy": {"apiVersion": "guardrail/v1", "kind": "Policy", "tiers": {"x": {"rate": {"requests": 0, "per": "1m"}}}}},
            "tiers.x.rate.requests",
            id="zero-rate",
        ),
        pytest.param({"policy": POLICY, "polcy_url": "http://example"}, "polcy_url", id="unknown-plugin-key"),
        pytest.param({"policy": {**POLICY, "colour": "red"}}, "colour", id="unknown-policy-key"),
        pytest.param({"policy": {**POLICY, "apps": [{**POLICY["apps"][0], "tier": "gold"}]}}, "apps[0].tier", id="unknown-tier"),
    ],
)
def test_invalid_configuration_is_refused_naming_the_field(launch: Any, plugin_config: dict[str, Any], field: str) -> None:
    gw = launch(plugin_config, name="invalid", start=False)
    outcome = gw.settle()
    if outcome == "ready":
        # Envoy kept running: the filter must not have taken the configuration.
        r = request(gw.url, "/", headers=with_key("pos-dashboard"))
        assert r.status != 200, f"Envoy served with an invalid plugin configuration:\n{r}"
    log = wait_for(lambda: gw.log() if field in gw.log() else None, timeout=5, what=f"a log line naming `{field}`")
    lines = [line for line in log.splitlines() if field in line]
    assert any("guardrail" in line.lower() or "wasm" in line.lower() for line in lines), lines


# === credential: API key ===


def test_valid_api_key_reaches_upstream_with_identity(gw: Envoy) -> None:
    r = responds_with(request(gw.url, "/orders/42?x=1", headers=with_key("pos-dashboard")), 200)
    seen = r.upstream
    assert seen["path"] == "/orders/42?x=1"
    assert seen["headers"].get("x-guardrail-app") == "pos-dashboard"
    assert seen["headers"].get("x-guardrail-tier") == "standard"
    assert seen["headers"].get("x-request-id") == r.header("x-request-id")


def test_missing_api_key_is_401(gw: Envoy) -> None:
    r = responds_with(request(gw.url, "/orders"), 401, "unauthenticated")
    assert "app" not in r.json(), "no app is known without a credential"


def test_unknown_api_key_is_401(gw: Envoy) -> None:
    responds_with(request(gw.url, "/orders", headers={"x-api-key": "k-nobody"}), 401, "unauthenticated")


def test_digest_is_not_a_key(gw: Envoy) -> None:
    # The catalog stores digests; presenting the digest itself must not authenticate.
    digest = POLICY["apps"][0]["api_keys"][0]
    responds_with(request(gw.url, "/orders", headers={"x-api-key": digest}), 401, "unauthenticated")


# === credential: JWT ===


@pytest.mark.parametrize("key", [ED, EC, RSA], ids=["EdDSA", "ES256", "RS256"])
def test_valid_jwt_is_admitted(gw: Envoy, key: SigningKey) -> None:
    token = key.sign(claims(iss=ISSUER, aud=AUDIENCE, azp="jwt-app"))
    r = responds_with(request(gw.url, "/reports", headers=bearer(token)), 200)
    assert r.upstream["headers"].get("x-guardrail-app") == "jwt-app"


def _bad_tokens() -> list[Any]:
    good = claims(iss=ISSUER, aud=AUDIENCE, azp="jwt-app")
    past = int(time.time()) - 1000
    return [
        pytest.param(ED.sign(claims(iss=ISSUER, aud=AUDIENCE, azp="jwt-app", now=past, ttl=600)), id="expired"),
        pytest.param(ED.sign({k: v for k, v in good.items() if k != "exp"}), id="no-exp"),
        pytest.param(ED.sign(claims(iss=ISSUER, aud="someone-else", azp="jwt-app")), id="wrong-audience"),
        pytest.param(ED.sign(claims(iss=ISSUER, aud=None, azp="jwt-app")), id="no-audience"),
        pytest.param(ED.sign(claims(iss="https://evil.example", aud=AUDIENCE, azp="jwt-app")), id="wrong-issuer"),
        pytest.param(ROGUE.sign(good), id="bad-signature"),
        pytest.param(swap_payload(ED.sign(good), {**good, "azp": "pos-dashboard"}), id="tampered-payload"),
        pytest.param(STRANGER.sign(good), id="unknown-kid"),
        pytest.param(alg_none(good, kid=ED.kid), id="alg-none"),
        pytest.param(hs256_with_public_key(ED, good), id="hs256-with-ed25519-public-key"),
        pytest.param(hs256_with_public_key(RSA, good), id="hs256-with-rsa-public-key"),
        pytest.param(raw_token({"alg": "EdDSA", "kid": ED.kid}, good, b"\x00" * 64), id="zero-signature"),
        pytest.param("not.a.jwt", id="garbage"),
        pytest.param("", id="empty"),
    ]


@pytest.mark.parametrize("token", _bad_tokens())
def test_bad_jwt_is_401(gw: Envoy, token: str) -> None:
    r = responds_with(request(gw.url, "/reports", headers=bearer(token)), 401, "unauthenticated")
    assert "app" not in r.json() or r.json()["app"] is None, "an unverified token must not name an app"


# === catalog ===


def test_verified_jwt_for_unregistered_app_is_403(gw: Envoy) -> None:
    """The token is verified, so the app it names is known (only not catalogued): the problem and
    the decision line name it."""
    token = EC.sign(claims(iss=ISSUER, aud=AUDIENCE, azp="ghost-app"))
    r = responds_with(request(gw.url, "/reports", headers=bearer(token)), 403, "app-not-registered", app="ghost-app")
    assert r.json().get("rule") == "catalog", r
    line = gw.decision_for(r.header("x-request-id") or "", "app-not-registered")
    assert line.get("app") == "ghost-app" and line.get("rule") == "catalog", line


def test_a_refused_token_with_a_valid_api_key_names_the_keys_app(gw: Envoy) -> None:
    # A token of the configured issuer that fails (a forged signature) is 401 even beside a key.
    forged = ROGUE.sign(claims(iss=ISSUER, aud=AUDIENCE, azp="pos-dashboard"))
    headers = with_key("pos-dashboard", authorization=f"Bearer {forged}")
    r = responds_with(request(gw.url, "/reports", headers=headers), 401, "unauthenticated", app="pos-dashboard")
    line = gw.decision_for(r.header("x-request-id") or "", "unauthenticated")
    assert line.get("app") == "pos-dashboard", line


def test_a_bearer_that_is_not_guardrails_reaches_the_upstream_beside_a_key(gw: Envoy) -> None:
    # Not a JWT of a configured issuer: the upstream's business, passed byte for byte.
    headers = with_key("pos-dashboard", authorization="Bearer not.a.jwt")
    seen = responds_with(request(gw.url, "/reports", headers=headers), 200).upstream["headers"]
    assert seen.get("authorization") == "Bearer not.a.jwt", seen


# === lifecycle ===


@pytest.mark.parametrize(
    "app_id, status",
    [
        ("draft-dev", 200),
        ("draft-test", 403),
        ("draft-prod", 403),
        ("approved-app", 200),
        ("published-app", 200),
        ("deprecated-app", 403),
        ("quarantined-app", 403),
    ],
)
def test_lifecycle(gw: Envoy, app_id: str, status: int) -> None:
    r = request(gw.url, "/catalog", headers=with_key(app_id))
    if status == 200:
        assert responds_with(r, 200).upstream["headers"].get("x-guardrail-app") == app_id
    else:
        responds_with(r, 403, "app-not-active", app=app_id)


# === header hygiene ===


def test_client_cannot_set_guardrail_headers(gw: Envoy) -> None:
    spoofed = with_key(
        "pos-dashboard",
        **{"x-guardrail-app": "evil", "X-Guardrail-Tier": "platinum", "X-Guardrail-Whatever": "1", "x-GUARDRAIL-admin": "yes"},
    )
    headers = responds_with(request(gw.url, "/orders", headers=spoofed), 200).upstream["headers"]
    assert headers.get("x-guardrail-app") == "pos-dashboard"
    assert headers.get("x-guardrail-tier") == "standard"
    leaked = sorted(h for h in headers if h.startswith("x-guardrail-") and h not in ("x-guardrail-app", "x-guardrail-tier"))
    assert not leaked, f"client-sent headers reached the upstream: {leaked}"


def test_spoofed_identity_header_alone_does_not_authenticate(gw: Envoy) -> None:
    responds_with(request(gw.url, "/orders", headers={"x-guardrail-app": "pos-dashboard"}), 401, "unauthenticated")


# === rate, budget, RateLimit headers ===


def test_allowed_response_carries_ratelimit_headers(gw: Envoy) -> None:
    r = responds_with(request(gw.url, "/orders", headers=with_key("approved-app")), 200)
    policy_field = sf_items(r.header("ratelimit-policy"))
    state = sf_items(r.header("ratelimit"))
    assert policy_field, f"no RateLimit-Policy:\n{r}"
    assert state, f"no RateLimit:\n{r}"
    name = "rate" if "rate" in policy_field else next(iter(policy_field))
    # 6000 per 1m with a bucket of 1000: full again 10 s after it is emptied.
    assert policy_field[name].get("q") == "1000" and policy_field[name].get("w") == "10", policy_field
    assert name in state and {"r", "t"} <= set(state[name]), f"RateLimit does not describe {name}: {state}"


def test_rate_limit_then_429(gw: Envoy) -> None:
    remaining = []
    for i in range(5):
        r = responds_with(request(gw.url, "/orders", headers=with_key("rate-app")), 200)
        p = sf_items(r.header("ratelimit-policy"))
        assert p.get("rate", {}).get("q") == "5" and p["rate"].get("w") == "3600", f"RateLimit-Policy: {r.header('ratelimit-policy')}"
        remaining.append(int(sf_items(r.header("ratelimit"))["rate"]["r"]))
    assert remaining == [4, 3, 2, 1, 0], f"RateLimit r= after each request: {remaining}"
    r = responds_with(request(gw.url, "/orders", headers=with_key("rate-app")), 429, "quota-exceeded", app="rate-app")
    retry = positive_int(r.header("retry-after"))
    assert retry <= 3600 / 5 + 1, f"Retry-After {retry}s is longer than one token takes (720s)"
    line = gw.decision_for(r.header("x-request-id") or "", "quota-exceeded")
    assert line.get("app") == "rate-app", line


def test_ratelimit_fields_describe_the_bucket(gw: Envoy) -> None:
    """3600 per 1h with burst 5 refills one a second: `q=5;w=5` (five per five seconds), not
    `w=3600`, which would have a client obeying it wait 720 times longer than it must."""
    seen = []
    for _ in range(5):
        r = responds_with(request(gw.url, "/orders", headers=with_key("refill-app")), 200)
        p = sf_items(r.header("ratelimit-policy"))
        assert p.get("rate") == {"q": "5", "w": "5"}, f"RateLimit-Policy: {r.header('ratelimit-policy')}"
        state = sf_items(r.header("ratelimit"))["rate"]
        seen.append((int(state["r"]), int(state["t"])))
    remaining = [r for r, _ in seen]
    assert remaining == [4, 3, 2, 1, 0], f"r after each request: {seen}"
    assert all(1 <= t <= 5 for _, t in seen), f"t (seconds until the bucket is full) within w: {seen}"
    assert seen[-1][1] == 5, f"an empty bucket is full again in w=5 s: {seen}"
    r = responds_with(request(gw.url, "/orders", headers=with_key("refill-app")), 429, "quota-exceeded", app="refill-app")
    retry = positive_int(r.header("retry-after"))
    assert retry == 1, f"one token comes back each second, so Retry-After is 1, not {retry}"
    time.sleep(retry + 0.2)
    responds_with(request(gw.url, "/orders", headers=with_key("refill-app")), 200)


def test_exact_quota_across_workers(gw: Envoy) -> None:
    """300 concurrent requests on 300 connections (both workers) for an app with 50 tokens."""
    cx_before = _worker_connections(gw)

    def one(_: int) -> tuple[int, str]:
        r = request(gw.url, "/burst", headers=with_key("burst-app"), timeout=30)
        code = r.json().get("type", "") if r.status != 200 else ""
        return r.status, code

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(300)))
    statuses = Counter(status for status, _ in results)
    assert statuses == Counter({200: 50, 429: 250}), f"expected exactly 50 x 200 and 250 x 429, got {dict(statuses)}"
    assert {code for status, code in results if status == 429} == {"urn:guardrail:problem:quota-exceeded"}

    cx_after = _worker_connections(gw)
    busy = [w for w in cx_after if cx_after[w] - cx_before.get(w, 0) > 0]
    assert len(busy) >= 2, f"all connections landed on one worker ({cx_after}); the test proves nothing"


def _worker_connections(gw: Envoy) -> dict[str, int]:
    """Accepted connections per worker of the gateway listener."""
    stats = gw.stats(filter=r"^listener\..*worker_[0-9]+\.downstream_cx_total$")
    return {m.group(1): v for k, v in stats.items() if (m := re.search(r"(worker_\d+)\.downstream_cx_total$", k))}


def test_daily_budget_then_429(gw: Envoy) -> None:
    for _ in range(3):
        responds_with(request(gw.url, "/orders", headers=with_key("budget-app")), 200)
    r = responds_with(request(gw.url, "/orders", headers=with_key("budget-app")), 429, "budget-exhausted", app="budget-app")
    retry = positive_int(r.header("retry-after"))
    assert retry <= 86400, f"Retry-After {retry}s is past the next UTC midnight"


# === decision log, counters ===


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({}, 401, "unauthenticated"),
        ({"x-api-key": KEYS["log-app"]}, 403, "app-not-active"),
    ],
    ids=["unauthenticated", "app-not-active"],
)
def test_every_denial_writes_a_decision_line(gw: Envoy, headers: dict[str, str], status: int, code: str) -> None:
    r = responds_with(request(gw.url, "/audit", headers=headers), status, code)
    request_id = r.header("x-request-id") or ""
    gw.decision_for(request_id, code)
    matching = [o for o in gw.json_log_lines() if o.get("request_id") == request_id and o.get("code") == code]
    assert len(matching) == 1, f"expected one decision line for {request_id}, got {matching}"


def test_counters(gw: Envoy) -> None:
    before = quiet_stats(gw)
    for _ in range(2):
        responds_with(request(gw.url, "/c"), 401, "unauthenticated")
    responds_with(request(gw.url, "/c", headers=with_key("quarantined-app")), 403, "app-not-active")
    for _ in range(5):
        responds_with(request(gw.url, "/c", headers=with_key("stats-app")), 200)
    for _ in range(2):
        responds_with(request(gw.url, "/c", headers=with_key("stats-app")), 429, "quota-exceeded")
    expected = {
        "guardrail.allowed": 5,
        "guardrail.denied.unauthenticated": 2,
        "guardrail.denied.app-not-active": 1,
        "guardrail.denied.quota-exceeded": 2,
        "guardrail.throttled": 2,
    }
    deltas, after = settled_deltas(gw, before, expected)
    names = sorted(after)
    assert any(n.endswith("guardrail.allowed") for n in names), f"no guardrail.allowed counter in /stats: {names}"
    assert deltas == expected, f"counter deltas: {deltas}\n/stats?filter=guardrail: {after}"
    # Nothing more arrives on a later tick: each request counted once.
    time.sleep(0.3)
    assert settled_deltas(gw, before, expected, timeout=0)[0] == expected


def test_prometheus_shows_the_counters(gw: Envoy) -> None:
    before = quiet_stats(gw)
    responds_with(request(gw.url, "/p", headers=with_key("pos-dashboard")), 200)
    responds_with(request(gw.url, "/p"), 401, "unauthenticated")
    deltas, stats = settled_deltas(gw, before, {"guardrail.allowed": 1, "guardrail.denied.unauthenticated": 1})
    assert deltas == {"guardrail.allowed": 1, "guardrail.denied.unauthenticated": 1}, deltas
    text = gw.prometheus()
    for name in ("guardrail.allowed", "guardrail.denied.unauthenticated", "guardrail.throttled"):
        value = prometheus_value(text, name)
        assert value is not None, f"{name} is not in /stats/prometheus:\n" + "\n".join(
            line for line in text.splitlines() if "guardrail" in line
        )
        assert value == gw.counter(name, stats), f"{name}: prometheus {value} != /stats {gw.counter(name, stats)}"
