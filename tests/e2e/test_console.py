"""The console end to end (issue 21): the real companion with `--http`, a real Envoy reporting to it,
the echo upstream, and the console read three ways — the JSON API, `/metrics` parsed by the
`prometheus_client` OpenMetrics parser, and the HTML pages driven by real headless Chromium
(Debian's `chromium` and `chromium-driver` through Selenium).

Traffic through Envoy: admitted requests (priced per connector), throttles (`quota-exceeded`, and a
daily budget spent: `budget-exhausted` by the Envoy's own count, then `fleet-budget` once the
companion pushed it), denials (`app-not-active`), an unknown API key and a valid token of an app
that is not registered.
The numbers must come out exactly in every view. Screenshots of the catalog, an app page and the
KPIs are written to the test's directory (and to `GUARDRAIL_SCREENSHOTS` when set: `docs/console/`
holds one set made so).

Bad input: an unknown app (404 problem+json), bad dates and quarter (400 naming the parameter), a
huge query string (no panic: the console answers after it), no or a wrong token beyond loopback
(401), and no token file beyond loopback (refused at start).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from companion import Companion, guardrail, write_policy
import harness
from harness import Envoy, bootstrap, free_port, request, wait_for
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, claims

ISSUER = "https://idp.console.example"
AUDIENCE = "guardrail"
KEYS = {"pos": "k-console-pos-0001", "tiny": "k-console-tiny-0001", "hr": "k-console-hr-0001",
        "capped": "k-console-capped-0001"}
CAPPED_BUDGET = 3
UNKNOWN_KEY = "k-console-unknown-0001"
FINGERPRINT = hashlib.sha256(UNKNOWN_KEY.encode()).hexdigest()[:8]
GHOST = "ghost-app"
# Shown literally, never run: an owner and a team a platform team typed, or an attacker did.
INJECTED_OWNER = "<script>document.title='pwned'</script>"
INJECTED_TEAM = '"><img src=x id=injected onerror="document.title=\'pwned\'">'
PRICE = 400.0  # per 1,000 requests: 12 admitted requests cost 4.80 EUR

SENT = {"pos": 10, "tiny": 5, "hr": 2, "unknown": 3, "ghost": 2}


def make_policy(key: SigningKey) -> dict[str, Any]:
    doc = policy(
        revision="console-1",
        settings={"currency": "EUR"},
        jwt=[jwt_issuer(ISSUER, [AUDIENCE], [key.jwk()])],
        tiers={
            "standard": tier(60000, "1m", burst=10000, daily_budget=1_000_000),
            "tiny": tier(1, "1h", burst=2),
            "capped": tier(60000, "1m", burst=10000, daily_budget=CAPPED_BUDGET),
        },
        apps=[
            app("pos", keys=[KEYS["pos"]], data_classes=["public"], department="retail", team="stores"),
            app("tiny", tier="tiny", keys=[KEYS["tiny"]], environment="dev", data_classes=["public"]),
            app("hr", lifecycle="deprecated", keys=[KEYS["hr"]], department="people"),
            app("capped", tier="capped", keys=[KEYS["capped"]], data_classes=["public"]),
            app("never", data_classes=["regulated"], owner=INJECTED_OWNER, team=INJECTED_TEAM, department="finance",
                quota_overrides=[{"daily_budget": 5000, "expires_at": "2099-01-01T00:00:00Z", "reason": "quarter close"}]),
        ],
    )
    doc["connectors"]["pricing"] = {"upstream": {"per_1k_requests": PRICE}}
    doc["datasets"] = [
        {"id": "price-list", "classification": "public", "allowed_regions": ["eu-west-1", "us-east-1"],
         "routes": [{"path_prefix": "/prices"}]},
        {"id": "payroll", "classification": "internal", "allowed_regions": ["us-east-1"], "routes": [{"path_prefix": "/payroll"}]},
    ]
    return doc


@dataclass
class Console:
    comp: Companion
    gw: Envoy
    base: str
    shots: Path
    # `capped`'s refusals once its budget was spent: by this Envoy's own count (`daily-budget`),
    # then for the fleet (`fleet-budget`, once the companion pushed it), as the responses said.
    capped_local: int
    capped_fleet: int

    @property
    def capped(self) -> int:
        return CAPPED_BUDGET + self.capped_local + self.capped_fleet

    @property
    def registered(self) -> int:
        return 17 + self.capped


def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, also for 4xx."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def get_json(url: str) -> Any:
    status, ctype, body = get(url)
    assert status == 200 and ctype.startswith("application/json"), (status, ctype, body)
    return json.loads(body)


def send(gw: Envoy, headers: dict[str, str], n: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda _: request(gw.url, "/orders", headers=headers).status, range(n)))


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    key = SigningKey.ed25519("console-1")
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy(key))
    http_port = free_port()
    comp = Companion(policy_file, tmp / "comp", port=free_port(), args=["--http", f"127.0.0.1:{http_port}"]).start()
    config = bootstrap({"control": {"cluster": "guardrail_control"}}, upstream_port=upstream.server_port, wasm=wasm,
                       control_port=comp.port)
    config["node"] = {"id": "console-gw", "cluster": "e2e"}
    gw = Envoy(config, tmp / "gw", name="console-gw")
    try:
        gw.start()
        wait_for(lambda: comp.node_acked("console-1"), timeout=15, what="the gateway to acknowledge console-1")
        assert send(gw, {"x-api-key": KEYS["pos"]}, SENT["pos"]) == [200] * SENT["pos"]
        tiny = sorted(send(gw, {"x-api-key": KEYS["tiny"]}, SENT["tiny"]))
        assert tiny == [200, 200, 429, 429, 429], tiny
        assert send(gw, {"x-api-key": KEYS["hr"]}, SENT["hr"]) == [403] * SENT["hr"]
        assert send(gw, {"x-api-key": UNKNOWN_KEY}, SENT["unknown"]) == [401] * SENT["unknown"]
        token = key.sign(claims(iss=ISSUER, aud=AUDIENCE, azp=GHOST))
        assert send(gw, {"authorization": f"Bearer {token}"}, SENT["ghost"]) == [403] * SENT["ghost"]
        assert send(gw, {"x-api-key": KEYS["capped"]}, CAPPED_BUDGET) == [200] * CAPPED_BUDGET
        rules: list[str] = []

        def refused_for_the_fleet() -> bool:
            r = request(gw.url, "/orders", headers={"x-api-key": KEYS["capped"]})
            rules.append(f"{r.status} {r.json().get('rule')}")
            return rules[-1] == "429 fleet-budget"

        wait_for(refused_for_the_fleet, timeout=15, interval=0.2, what="capped refused for the fleet budget")
        assert set(rules) <= {"429 daily-budget", "429 fleet-budget"}, rules
        base = f"http://127.0.0.1:{http_port}"
        c = Console(comp, gw, base, tmp / "screenshots", rules.count("429 daily-budget"), rules.count("429 fleet-budget"))

        def arrived() -> bool:
            k = get_json(f"{base}/api/v1/kpis")
            return (k["registration"]["registered_requests"] == c.registered
                    and k["registration"]["unregistered_requests"] == 5
                    and sum(x["requests"] for x in k["unregistered_callers"]) == 5)

        wait_for(arrived, timeout=20, what="the traffic in the console's KPIs")
        c.shots.mkdir()
        yield c
    finally:
        gw.stop()
        comp.stop()


# === the JSON API ===


def test_the_catalog_api_has_every_app_with_todays_numbers(console: Console) -> None:
    apps = {a["id"]: a for a in get_json(f"{console.base}/api/v1/apps")["apps"]}
    assert set(apps) == {"pos", "tiny", "hr", "never", "capped"}, "every app of the policy, also one never seen"
    pos, tiny, hr, never = apps["pos"], apps["tiny"], apps["hr"], apps["never"]
    assert (pos["today"]["requests"], pos["today"]["allowed"], pos["today"]["connectors"]) == (10, 10, {"upstream": 10}), pos
    assert tiny["today"]["denied"] == {"quota-exceeded": 3} and tiny["today"]["throttled"] == 3, tiny
    assert hr["today"]["denied"] == {"app-not-active": 2}, hr
    assert never["today"]["requests"] == 0 and never["last_seen"] is None, never
    assert pos["last_seen"] is not None and pos["cost_30d"] == 4.0 and tiny["cost_30d"] == 0.8, (pos, tiny)
    assert [pos["risk"]["tier"], tiny["risk"]["tier"], hr["risk"]["tier"], never["risk"]["tier"]] == ["amber", "green", "amber", "red"]
    assert pos["api_keys"] == {"count": 1, "fingerprints": [hashlib.sha256(KEYS["pos"].encode()).hexdigest()[:8]]}
    body = json.dumps(apps)
    assert all(k not in body for k in KEYS.values()), "no API key in the API, ever"


def test_an_app_shows_its_override_and_datasets_and_an_unknown_one_is_404(console: Console) -> None:
    never = get_json(f"{console.base}/api/v1/apps/never")["app"]
    assert never["quota"]["overrides"] == [
        {"rate": None, "daily_budget": 5000, "expires_at": "2099-01-01T00:00:00Z", "reason": "quarter close"}
    ], never["quota"]
    datasets = get_json(f"{console.base}/api/v1/apps/hr")["datasets"]
    assert datasets == [
        {"dataset": "price-list", "classification": "public", "allowed_regions": ["eu-west-1", "us-east-1"],
         "from_app_region": True, "requires_jit": False},
        {"dataset": "payroll", "classification": "internal", "allowed_regions": ["us-east-1"],
         "from_app_region": False, "requires_jit": False},
    ], "what hr's data classes (public, internal) reach, and from its region (eu-west-1)"
    assert [d["dataset"] for d in get_json(f"{console.base}/api/v1/apps/pos")["datasets"]] == ["price-list"]
    status, ctype, body = get(f"{console.base}/api/v1/apps/nope")
    assert (status, ctype) == (404, "application/problem+json"), (status, ctype, body)
    assert "nope" in json.loads(body)["detail"]


def test_the_kpis_count_every_outcome(console: Console) -> None:
    k = get_json(f"{console.base}/api/v1/kpis")
    assert k["registration"]["share"] == pytest.approx(console.registered / (console.registered + 5))
    callers = {(c["kind"], c["id"]): c["requests"] for c in k["unregistered_callers"]}
    assert callers == {("api-key", FINGERPRINT): 3, ("app", GHOST): 2}, callers
    throttles = {t.pop("app"): t for t in k["throttles"]}
    assert throttles == {
        "tiny": {"quota_exceeded": 3, "budget_exhausted": 0, "fleet_budget": 0},
        "capped": {"quota_exceeded": 0, "budget_exhausted": console.capped_local, "fleet_budget": console.capped_fleet},
    }, throttles
    assert console.capped_fleet == 1, "the last refusal was for the fleet"
    assert k["denials"] == {"app-not-active": 2, "app-not-registered": 2, "quota-exceeded": 3, "unauthenticated": 3,
                            "budget-exhausted": console.capped_local + console.capped_fleet}, k["denials"]
    assert k["cost"]["total"] == 6.0 and k["cost"]["by_department"] == {"retail": 4.0, "engineering": 2.0}, k["cost"]
    assert k["currency"] == "EUR"
    assert k["apps_by_lifecycle"] == {"published": 4, "deprecated": 1}
    assert k["apps_by_risk"] == {"green": 1, "amber": 3, "red": 1}
    today = k["daily"][-1]
    assert (today["requests"], today["allowed"], today["unregistered"], today["cost"]) == (console.registered, 15, 5, 6.0), today
    assert len(k["daily"]) == 30, "the last 30 days by default"


def test_the_quarterly_report_as_json_and_csv(console: Console) -> None:
    quarter = current_quarter(get_json(f"{console.base}/api/v1/kpis")["to"])
    report = get_json(f"{console.base}/api/v1/report?quarter={quarter}")
    rows = {r["app"]: r for r in report["rows"]}
    assert (rows["pos"]["requests"], rows["tiny"]["throttled"], rows["never"]["requests"]) == (10, 3, 0), rows
    summary, previous = report["summary"], report["previous"]
    assert (summary["registered_requests"], summary["unregistered_requests"], summary["throttled"], summary["denied"],
            summary["cost"]) == (console.registered, 5, console.capped - CAPPED_BUDGET + 3, 7, 6.0), summary
    assert previous["quarter"] == previous_quarter(quarter) and previous["registered_requests"] == 0, previous
    status, ctype, csv = get(f"{console.base}/api/v1/report?quarter={quarter}&format=csv")
    assert status == 200 and ctype.startswith("text/csv"), (status, ctype)
    lines = csv.strip().splitlines()
    assert lines[0].startswith("quarter,app,department"), lines[0]
    assert f"{quarter},pos,retail,stores,published,amber,10,10,0,0,4.00,EUR" in lines, lines
    assert f"{quarter},(unregistered),,,,,5,0,0,5,0.00,EUR" in lines, lines
    status, _, html = get(f"{console.base}/report?quarter={quarter}")
    assert status == 200 and f"Quarterly report {quarter}" in html and "Compared with the quarter before" in html


def current_quarter(day: str) -> str:
    return f"{day[:4]}-Q{(int(day[5:7]) + 2) // 3}"


def previous_quarter(quarter: str) -> str:
    year, q = int(quarter[:4]), int(quarter[-1])
    return f"{year - 1}-Q4" if q == 1 else f"{year}-Q{q - 1}"


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/api/v1/kpis?from=2026-13-01", "from"),
        ("/api/v1/kpis?to=yesterday", "to"),
        ("/api/v1/kpis?from=2026-02-01&to=2026-01-01", "from"),
        ("/kpis?from=2026-02-30", "from"),
        ("/api/v1/report?quarter=2026-Q5", "quarter"),
        ("/api/v1/report", "quarter"),
        ("/report?quarter=%3Cscript%3E", "quarter"),
        ("/api/v1/report?quarter=2026-Q1&format=xml", "format"),
    ],
)
def test_bad_parameters_are_400_naming_them(console: Console, path: str, parameter: str) -> None:
    status, ctype, body = get(console.base + path)
    assert (status, ctype) == (400, "application/problem+json"), (path, status, body)
    assert json.loads(body)["detail"].startswith(f"{parameter}:"), body


def test_a_huge_query_string_does_not_bring_the_console_down(console: Console) -> None:
    for query in ["a=" + "x" * 60_000, "&".join(f"k{i}=v" for i in range(5000)), "from=" + "%" * 10_000]:
        status, _, _ = get(f"{console.base}/api/v1/kpis?{query}")
        assert status in (200, 400, 414, 431), status
    assert get(f"{console.base}/healthz")[0] == 200
    assert console.comp.running


# === /metrics ===


def test_metrics_parse_and_hold_the_fleet(console: Console) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    status, ctype, text = get(f"{console.base}/metrics")
    assert status == 200 and ctype.startswith("application/openmetrics-text"), (status, ctype)
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    per_app: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            if "app" in s.labels:
                per_app[s.labels["app"]] = per_app.get(s.labels["app"], 0) + 1

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("guardrail_app_requests_today", app="pos", outcome="allowed") == 10
    assert value("guardrail_app_requests_today", app="tiny", outcome="quota-exceeded") == 3
    assert value("guardrail_app_requests_today", app="hr", outcome="denied") == 2
    assert value("guardrail_app_requests_today", app="capped", outcome="fleet-budget") == console.capped_fleet
    assert value("guardrail_app_requests_today", app="capped", outcome="budget-exhausted") == console.capped_local
    assert value("guardrail_app_cost_today", app="pos", currency="EUR") == pytest.approx(4.0)
    assert value("guardrail_unregistered_requests_today", kind="api-key") == 3
    assert value("guardrail_unregistered_requests_today", kind="app") == 2
    assert value("guardrail_nodes", state="connected") == 1
    assert value("guardrail_node_revisions", revision="console-1") == 1
    assert value("guardrail_policy_revision", revision="console-1") == 1
    assert value("guardrail_anomalies") == 0
    assert max(per_app.values()) <= 20, per_app


# === the pages, in real headless Chromium ===


def screenshot(browser: Any, console: Console, name: str) -> None:
    harness.screenshot(browser, console.shots / f"{name}.png")


def cell(browser: Any, app_id: str, css: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f'tr[data-app="{app_id}"] {css}').text


def test_the_catalog_page_shows_the_numbers_and_escapes_the_policy(browser: Any, console: Console) -> None:
    from selenium.webdriver.common.by import By

    browser.get(console.base + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#catalog tbody tr")
    assert sorted(r.get_attribute("data-app") for r in rows) == ["capped", "hr", "never", "pos", "tiny"]
    assert cell(browser, "pos", "td.today") == "10"
    assert cell(browser, "tiny", "td.today") == "5"
    assert cell(browser, "never", "td.last-seen") == "never"
    assert cell(browser, "pos", "td.cost") == "4.00 EUR"
    assert cell(browser, "never", "td.risk").startswith("red")
    share = 100 * console.registered / (console.registered + 5)
    assert browser.find_element(By.ID, "share-today").text == f"{share:.1f} %"
    # The injected owner and team are text on the page: no script ran, no element was made.
    assert browser.title == "Catalog · Guardrail", browser.title
    assert not browser.find_elements(By.ID, "injected")
    assert INJECTED_OWNER in browser.find_element(By.CSS_SELECTOR, 'tr[data-app="never"]').text
    screenshot(browser, console, "catalog")

    browser.get(console.base + "/?risk=red")
    assert [r.get_attribute("data-app") for r in browser.find_elements(By.CSS_SELECTOR, "#catalog tbody tr")] == ["never"]
    browser.get(console.base + "/?department=retail&lifecycle=published&environment=prod&team=stores")
    assert [r.get_attribute("data-app") for r in browser.find_elements(By.CSS_SELECTOR, "#catalog tbody tr")] == ["pos"]
    browser.get(console.base + "/?q=TIN")
    assert [r.get_attribute("data-app") for r in browser.find_elements(By.CSS_SELECTOR, "#catalog tbody tr")] == ["tiny"]


def test_an_app_page_has_its_evidence(browser: Any, console: Console) -> None:
    from selenium.webdriver.common.by import By

    browser.get(console.base + "/apps/tiny")
    assert browser.find_element(By.ID, "today").text == "5"
    denials = browser.find_element(By.ID, "denials").text
    assert "quota-exceeded 3" in denials, denials
    assert "upstream approved 2" in browser.find_element(By.ID, "connectors").text
    assert browser.find_elements(By.CSS_SELECTOR, "svg rect"), "the 90-day chart"
    assert "1/1h burst 2" in browser.find_element(By.ID, "quota").text
    assert "price-list public eu-west-1, us-east-1 yes" in browser.find_element(By.ID, "datasets").text
    screenshot(browser, console, "app")

    browser.get(console.base + "/apps/never")
    assert "2099-01-01T00:00:00Z quarter close" in browser.find_element(By.ID, "overrides").text
    assert browser.title.startswith("never"), browser.title


def test_the_kpis_page_has_the_share_callers_and_charts(browser: Any, console: Console) -> None:
    from selenium.webdriver.common.by import By

    browser.get(console.base + "/kpis")
    share = 100 * console.registered / (console.registered + 5)
    assert browser.find_element(By.ID, "share").text == f"{share:.1f} %"
    callers = browser.find_element(By.ID, "unregistered").text
    assert f"api-key {FINGERPRINT} 3" in callers and f"app {GHOST} 2" in callers, callers
    throttles = browser.find_element(By.ID, "throttles").text
    assert "tiny 3 0 0" in throttles and f"capped 0 {console.capped_local} {console.capped_fleet}" in throttles, throttles
    assert browser.find_element(By.ID, "cost").text == "6.00 EUR"
    assert len(browser.find_elements(By.TAG_NAME, "svg")) == 4
    screenshot(browser, console, "kpis")


# === the token beyond loopback ===


def test_beyond_loopback_the_token_is_required(tmp_path: Path) -> None:
    key = SigningKey.ed25519("console-2")
    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, make_policy(key))
    port = free_port()
    run = guardrail("serve", "--policy", str(policy_file), "--listen", "127.0.0.1:0", "--http", f"0.0.0.0:{port}",
                    "--store", f"sqlite:{tmp_path / 'refused.db'}")
    assert run.returncode != 0 and "--http-token-file" in run.stderr, run

    token = "console-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    comp = Companion(policy_file, tmp_path / "comp",
                     args=["--http", f"0.0.0.0:{port}", "--http-token-file", str(tmp_path / "token")]).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=10, what="the console")
        for path in ["/", "/api/v1/apps", "/metrics", "/api/v1/kpis", "/apps/pos", "/requests", "/nope"]:
            for given in [None, "wrong-token-0123456789"]:
                status, ctype, _ = get(base + path, given)
                assert (status, ctype) == (401, "application/problem+json"), (path, given, status)
        assert get(base + "/api/v1/apps", token)[0] == 200
        assert get(base + "/", token)[0] == 200
        assert get(base + "/requests", token)[0] == 200
        assert get(base + "/readyz")[0] == 200, "health checks need no token"
    finally:
        comp.stop()
