"""The console's Requests page end to end (issue 22): a real companion (`serve --http`, SQLite store
in its directory) pushing to a real Envoy with the filter, requests filed over HTTP by the apps
with their API keys (Basic), and the page driven by real headless Chromium: pending requests
listed, approved and rejected through the page by an approver's token pasted once, errors shown
(a token that is no approver's, an approver who owns the app, a request decided meanwhile), and
every outcome checked again through the JSON API, the trail, the app page and Envoy itself (an
approved quota increase lifts the 429 once Envoy has the revision the page showed).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from companion import Companion, with_console_and_envoy, write_policy
from harness import hash_key, request, screenshot, wait_for
from policies import app, policy, tier

KEYS = {"pos": "k-console-req-pos-0001", "tiny": "k-console-req-tiny-0001", "hr": "k-console-req-hr-0001"}
APPROVER = "approver-alice-token-0001"  # alice, of the platform team
OWNER = "approver-posowner-token-0001"  # an approver who owns `pos`
NOT_AN_APPROVER = "not-an-approver-token-0001"
# Typed by a builder into a reason: shown as text, never run.
INJECTED = "<script>document.title='pwned'</script><img src=x id=injected onerror=\"document.title='pwned'\"> black friday"


def make_policy() -> dict[str, Any]:
    return policy(
        revision="console-req-1",
        settings={"approvers": [{"id": "alice", "token": hash_key(APPROVER)},
                                {"id": "pos@e2e.example", "token": hash_key(OWNER)}]},
        tiers={"standard": tier(6000, "1m", burst=1000), "tiny": tier(2, "1h")},
        apps=[
            app("pos", tier="tiny", keys=[KEYS["pos"]]),
            app("tiny", tier="tiny", keys=[KEYS["tiny"]], environment="dev", data_classes=["public"]),
            app("hr", keys=[KEYS["hr"]], data_classes=["public", "internal", "confidential"]),
        ],
    )


class Setup:
    def __init__(self, comp: Companion, gw: Any, base: str, shots: Path):
        self.comp, self.gw, self.base, self.shots = comp, gw, base, shots

    def file(self, app_id: str, **fields: Any) -> dict[str, Any]:
        until = (datetime.now(timezone.utc).date() + timedelta(days=10)).isoformat()
        body = {"app": app_id, "until": until, **fields}
        r = requests.post(f"{self.base}/api/v1/requests", json=body, auth=(app_id, KEYS[app_id]), timeout=10)
        assert r.status_code == 201, r.text
        return r.json()

    def request(self, request_id: str) -> dict[str, Any]:
        r = requests.get(f"{self.base}/api/v1/requests/{request_id}", headers={"Authorization": f"Bearer {APPROVER}"},
                         timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def pending(self) -> list[dict[str, Any]]:
        r = requests.get(f"{self.base}/api/v1/requests?status=pending", headers={"Authorization": f"Bearer {APPROVER}"},
                         timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["requests"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, module_launch: Any) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("console-requests")
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy())
    with with_console_and_envoy(policy_file, tmp / "companion", module_launch, "console-req-1") as (comp, gw, http):
        shots = tmp / "screenshots"
        shots.mkdir()
        yield Setup(comp, gw, http, shots)


def by_css(browser: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css)


def open_requests(browser: Any, setup: Setup, token: str | None) -> None:
    """Opens /requests and pastes `token` as the approver's (None: forgets the one set)."""
    browser.get(setup.base + "/requests")
    if token is None:
        by_css(browser, "#approver-forget").click()
        assert by_css(browser, "#approver-state").text == "no approver token set: paste yours to decide"
        return
    by_css(browser, "#approver-token").send_keys(token)
    by_css(browser, "#approver button[type=submit]").click()
    assert by_css(browser, "#approver-state").text == "an approver token is set for this tab"
    assert by_css(browser, "#approver-token").get_attribute("value") == "", "the field is emptied"


def decide(browser: Any, request_id: str, action: str, reason: str = "", expect: str = "") -> str:
    """Clicks Approve or Reject on the pending row of `request_id` (with `reason`) and returns the
    row's outcome once it says something other than the progress."""
    row = f'#pending tr[data-request="{request_id}"]'
    field = by_css(browser, f"{row} .decision-reason")
    field.clear()
    if reason:
        field.send_keys(reason)
    by_css(browser, f"{row} button.{action}").click()
    outcome = by_css(browser, f"{row} .outcome")
    text = wait_for(lambda: outcome.text if outcome.text and not outcome.text.endswith("…") else None, timeout=15,
                    what=f"the outcome of {action} {request_id}")
    assert expect in text, (text, expect)
    return text


def test_a_request_is_approved_from_the_page_and_the_fleet_follows(browser: Any, setup: Setup) -> None:
    from selenium.webdriver.common.by import By

    # pos' tier lets it make 2 requests an hour: the third is throttled.
    statuses = [request(setup.gw.url, "/orders", headers={"x-api-key": KEYS["pos"]}).status for _ in range(3)]
    assert statuses == [200, 200, 429], statuses
    filed = setup.file("pos", kind="quota", rate="600/1m", reason=INJECTED)
    rid = filed["id"]

    browser.get(setup.base + "/")
    assert by_css(browser, "#pending-requests").text == str(len(setup.pending())), "the overview's count"
    by_css(browser, "#pending-requests a").click()
    assert browser.current_url == setup.base + "/requests"
    row = by_css(browser, f'#pending tr[data-request="{rid}"]')
    assert row.find_element(By.CSS_SELECTOR, ".app").text == "pos"
    assert row.find_element(By.CSS_SELECTOR, ".kind").text == "quota"
    assert row.find_element(By.CSS_SELECTOR, ".change").text.startswith("rate 2/1h → 600/1m until "), row.text
    assert row.find_element(By.CSS_SELECTOR, ".reason").text == INJECTED, "the reason as text"
    assert row.find_element(By.CSS_SELECTOR, ".until").text == filed["until"]
    assert row.find_element(By.CSS_SELECTOR, ".risk").text.startswith("amber"), "the app's risk tier"
    assert row.find_element(By.CSS_SELECTOR, ".status").text == "pending"
    assert browser.title == "Requests · Guardrail" and not browser.find_elements(By.ID, "injected"), "nothing ran"
    # The page's script ran (the CSP allows it by its hash): it says no token is set.
    assert by_css(browser, "#approver-state").text.startswith("no approver token set"), "the script did not run"

    open_requests(browser, setup, APPROVER)
    text = decide(browser, rid, "approve", expect="approved by alice · revision ")
    revision = text.split("revision ", 1)[1]
    assert revision.startswith("console-req-1+req."), revision
    screenshot(browser, setup.shots / "requests-approved.png")

    decided = setup.request(rid)
    assert (decided["status"], decided["decided_by"], decided["revision"]) == ("approved", "alice", revision), decided
    # The revision the page showed is served, reaches Envoy, and lifts the throttle.
    assert requests.get(f"{setup.base}/readyz", timeout=10).text.strip() == f"ready: revision {revision}"
    wait_for(lambda: setup.comp.node_acked(revision), timeout=15, what=f"Envoy to acknowledge {revision}")
    wait_for(lambda: request(setup.gw.url, "/orders", headers={"x-api-key": KEYS["pos"]}).status == 200, timeout=10,
             what="pos admitted under its approved rate")

    browser.get(setup.base + "/requests")
    assert not browser.find_elements(By.CSS_SELECTOR, f'#pending tr[data-request="{rid}"]'), "no longer pending"
    row = by_css(browser, f'#decided tr[data-request="{rid}"]')
    assert row.find_element(By.CSS_SELECTOR, ".status").text == "approved"
    assert row.find_element(By.CSS_SELECTOR, ".decided-by").text == "alice"
    assert row.find_element(By.CSS_SELECTOR, ".revision").text == revision

    # The app page and the catalog show what is granted, marked with the request.
    browser.get(setup.base + "/apps/pos")
    granted = by_css(browser, "#granted").text
    assert f"quota rate 600/1m burst 600 {decided['until']} request {rid}" in granted, granted
    browser.get(setup.base + "/")
    assert by_css(browser, 'tr[data-app="pos"] .granted').text == "1 in force, 1 by request"
    app_json = requests.get(f"{setup.base}/api/v1/apps/pos", timeout=10).json()["app"]
    assert [(g["kind"], g["request"]) for g in app_json["granted"]] == [("quota", rid)], app_json["granted"]

    events = requests.get(f"{setup.base}/api/v1/audit/events", timeout=10).json()["events"]
    assert any(e["kind"] == "request-approved" and e["id"] == rid and e["actor"] == "alice" for e in events), events


def test_a_rejection_needs_a_reason_and_is_listed_with_it(browser: Any, setup: Setup) -> None:
    from selenium.webdriver.common.by import By

    rid = setup.file("tiny", kind="connector", connector="s3-export", reason="nightly export")["id"]
    open_requests(browser, setup, APPROVER)
    decide(browser, rid, "reject", expect="a rejection needs a reason")
    assert setup.request(rid)["status"] == "pending", "nothing was sent"

    why = "no customer data to <b>s3</b> yet"
    decide(browser, rid, "reject", reason=why, expect="rejected by alice")
    decided = setup.request(rid)
    assert (decided["status"], decided["decision_reason"], decided.get("revision")) == ("rejected", why, None), decided

    browser.get(setup.base + "/requests")
    row = by_css(browser, f'#decided tr[data-request="{rid}"]')
    assert row.find_element(By.CSS_SELECTOR, ".status").text == "rejected"
    assert row.find_element(By.CSS_SELECTOR, ".decision-reason").text == why
    assert not browser.find_elements(By.CSS_SELECTOR, "#decided b"), "the reason is text"


def test_refusals_are_shown_and_decide_nothing(browser: Any, setup: Setup) -> None:
    hr = setup.file("hr", kind="quota", rate="12000/1m", reason="payroll run")["id"]
    pos = setup.file("pos", kind="quota", rate="1200/1m", reason="the sale goes on")["id"]

    open_requests(browser, setup, NOT_AN_APPROVER)
    decide(browser, hr, "approve", expect="401 unauthenticated: the bearer token is no approver's")
    open_requests(browser, setup, OWNER)
    decide(browser, pos, "approve", expect="403 own-request: pos@e2e.example owns app pos")
    assert [setup.request(r)["status"] for r in (hr, pos)] == ["pending", "pending"]

    # Decided elsewhere while the page was open: the page says so.
    open_requests(browser, setup, APPROVER)
    r = requests.post(f"{setup.base}/api/v1/requests/{hr}/reject", json={"reason": "done by the CLI"},
                      headers={"Authorization": f"Bearer {APPROVER}"}, timeout=10)
    assert r.status_code == 200, r.text
    decide(browser, hr, "approve", expect=f"409 already-decided: request {hr} is rejected by alice")
    # The buttons stay usable after a refusal; without a token the page asks for one first.
    open_requests(browser, setup, None)
    decide(browser, pos, "approve", expect="paste your approver token above first")
    assert setup.request(pos)["status"] == "pending"
    browser.get(setup.base + "/requests")
    screenshot(browser, setup.shots / "requests.png")


def test_the_page_allows_only_its_script_and_no_cross_site_decision(setup: Setup) -> None:
    r = requests.get(f"{setup.base}/requests", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.status_code
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert csp["script-src"].startswith("'sha256-") and " " not in csp["script-src"], csp
    assert (csp["default-src"], csp["connect-src"], csp["form-action"], csp["frame-ancestors"]) == \
        ("'none'", "'self'", "'none'", "'none'"), csp
    assert "set-cookie" not in r.headers, "no cookie: nothing for another site to ride on"
    assert r.text.count("<script>") == 1
    # Another origin's script would need a CORS preflight for the Authorization header: not granted.
    rid = setup.file("tiny", kind="quota", rate="10/1h", reason="a demo")["id"]
    pre = requests.options(f"{setup.base}/api/v1/requests/{rid}/approve", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert "access-control-allow-origin" not in pre.headers, pre.headers
    # … and a plain cross-site form post carries no token.
    post = requests.post(f"{setup.base}/api/v1/requests/{rid}/approve", data={"reason": "x"}, timeout=10,
                         headers={"Origin": "http://evil.example"})
    assert post.status_code == 401, post.text
    assert setup.request(rid)["status"] == "pending"
