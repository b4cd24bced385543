"""Where Envoy really sends a request that Guardrail admitted.

Envoy picks a route before the filter runs and picks it again after the filter changed the request
headers (it removes client `x-guardrail-*` and the API key, adds `x-guardrail-app`/`-tier`, and
puts the normalised path in `:path`). A route that matches on any of those can send the request to
another cluster than the one the connector check judged. The filter sees that cluster in the
response phase: if the app may not reach it, the response is withheld (403 connector-not-approved,
one decision log line); if it may, nothing changes. And what reaches the upstream is the path the
filter judged, whatever spelling the client sent.

The gateway runs without Envoy's own path normalisation (Envoy's default), so the filter alone
stands between a raw path and the upstream. Its routes, all to the echo upstream:

    /z   + x-guardrail-app: rt-app   → thirdparty (not approved)
    /w   + x-guardrail-app: rt-app   → crm (approved, in rt-app's list)
    /y   + x-api-key present         → upstream;   /y → thirdparty
    /s   + x-guardrail-app: spoof    → upstream;   /s → thirdparty
    /crm                             → crm
    /                                → upstream
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import Envoy, _static_cluster, bootstrap, request, responds_with
from policies import app, policy, tier

KEY = "k-routing-rt-app-0001"
OTHER_KEY = "k-routing-upstream-only-0001"


def routing_policy() -> dict[str, Any]:
    return policy(
        revision="routing-1",
        tiers={"standard": tier(60000, "1m", burst=10000)},
        approved_connectors=["upstream", "crm"],
        apps=[
            app("rt-app", keys=[KEY], connectors=["upstream", "crm"]),
            app("upstream-only", keys=[OTHER_KEY], connectors=["upstream"]),
        ],
        datasets=[
            {"id": "catalog", "classification": "public", "owner_department": "merch",
             "allowed_regions": ["eu-west-1"], "routes": [{"path_prefix": "/catalog"}]},
            {"id": "secrets", "classification": "confidential", "owner_department": "sec",
             "allowed_regions": ["eu-west-1"], "routes": [{"path_prefix": "/secrets"}]},
        ],
    )


def header_route(prefix: str, header: str, cluster: str, exact: str | None = None) -> dict[str, Any]:
    matcher: dict[str, Any] = {"name": header}
    if exact is None:
        matcher["present_match"] = True
    else:
        matcher["string_match"] = {"exact": exact}
    return {"match": {"path_separated_prefix": prefix, "headers": [matcher]}, "route": {"cluster": cluster},
            "request_headers_to_add": [{"header": {"key": "x-routed-to", "value": cluster}}]}


def plain_route(prefix: str, cluster: str) -> dict[str, Any]:
    match = {"prefix": "/"} if prefix == "/" else {"path_separated_prefix": prefix}
    return {"match": match, "route": {"cluster": cluster},
            "request_headers_to_add": [{"header": {"key": "x-routed-to", "value": cluster}}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Envoy]:
    config = bootstrap({"policy": routing_policy()}, upstream_port=upstream.server_port, wasm=wasm)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["normalize_path"] = False
    hcm["merge_slashes"] = False
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        header_route("/z", "x-guardrail-app", "thirdparty", exact="rt-app"),
        header_route("/w", "x-guardrail-app", "crm", exact="rt-app"),
        header_route("/y", "x-api-key", "upstream"),
        plain_route("/y", "thirdparty"),
        header_route("/s", "x-guardrail-app", "upstream", exact="spoof"),
        plain_route("/s", "thirdparty"),
        plain_route("/crm", "crm"),
        plain_route("/", "upstream"),
    ]
    config["static_resources"]["clusters"] += [_static_cluster(c, upstream.server_port) for c in ("crm", "thirdparty")]
    envoy = Envoy(config, tmp_path_factory.mktemp("routing"), name="routing").start()
    try:
        yield envoy
    finally:
        envoy.stop()


def withheld(gw: Envoy, r: Any, cluster: str, judged: str) -> None:
    responds_with(r, 403, "connector-not-approved", app="rt-app")
    problem = r.json()
    assert problem.get("rule") == "connector", r
    assert f"routed the request to `{cluster}`" in problem["detail"] and f"judged for `{judged}`" in problem["detail"], r
    assert "x-routed-to" not in r.body.decode(errors="replace"), f"the upstream's response leaked:\n{r}"
    line = gw.decision_for(r.header("x-request-id") or "", "connector-not-approved")
    assert line.get("status") == 403 and line.get("app") == "rt-app" and line.get("rule") == "connector", line


def test_a_route_on_the_app_header_to_an_unapproved_cluster_is_withheld(gw: Envoy) -> None:
    withheld(gw, request(gw.url, "/z/1", headers={"x-api-key": KEY}), "thirdparty", "upstream")


def test_a_route_on_the_api_key_header_that_guardrail_removes_is_withheld(gw: Envoy) -> None:
    withheld(gw, request(gw.url, "/y/1", headers={"x-api-key": KEY}), "thirdparty", "upstream")


def test_a_spoofed_header_that_steered_the_first_route_is_withheld(gw: Envoy) -> None:
    r = request(gw.url, "/s/1", headers={"x-api-key": KEY, "x-guardrail-app": "spoof"})
    withheld(gw, r, "thirdparty", "upstream")


def test_a_route_change_to_a_cluster_the_app_may_reach_is_answered(gw: Envoy) -> None:
    r = responds_with(request(gw.url, "/w/1", headers={"x-api-key": KEY}), 200)
    assert r.upstream["headers"].get("x-routed-to") == "crm", r
    assert r.upstream["headers"].get("x-guardrail-app") == "rt-app", r


def test_an_app_that_may_not_reach_the_new_cluster_is_withheld_there(gw: Envoy) -> None:
    # upstream-only lists only `upstream`; its header does not steer /w, so it stays there.
    r = responds_with(request(gw.url, "/w/1", headers={"x-api-key": OTHER_KEY}), 200)
    assert r.upstream["headers"].get("x-routed-to") == "upstream", r


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/open/../catalog/1", "/catalog/1"),
        ("/catalog/1/../../open/x?q=1", "/open/x?q=1"),
        ("/secrets/%2e%2e/catalog/x", "/catalog/x"),
        ("/secrets/1/.%2e/..//catalog/x?a=/../b", "/catalog/x?a=/../b"),
        ("//catalog//x/", "/catalog/x/"),
        ("/%63atalog/x", "/catalog/x"),
        ("/catalog/x", "/catalog/x"),
        ("/catalog/x/", "/catalog/x/"),
    ],
)
def test_the_upstream_gets_the_path_that_was_judged(gw: Envoy, raw: str, forwarded: str) -> None:
    r = responds_with(request(gw.url, raw, headers={"x-api-key": KEY}), 200)
    assert r.upstream["path"] == forwarded, f"{raw}: the upstream got {r.upstream['path']!r}"


def test_a_path_judged_as_another_dataset_never_reaches_it_under_its_spelling(gw: Envoy) -> None:
    # rt-app may not read confidential data: however the path is spelled, /secrets is refused.
    for raw in ["/catalog/../secrets/1", "/catalog/%2e%2e/secrets/1", "//secrets/1", "/%73ecrets/1"]:
        r = request(gw.url, raw, headers={"x-api-key": KEY})
        responds_with(r, 403, "access-denied", app="rt-app")


def test_a_normalised_path_routed_to_a_cluster_the_app_may_not_reach_is_withheld(gw: Envoy) -> None:
    # Envoy routes the raw /catalog/../crm/x by `/` to upstream; the normalised /crm/x goes to crm,
    # which upstream-only may not reach.
    r = request(gw.url, "/catalog/../crm/x", headers={"x-api-key": OTHER_KEY})
    responds_with(r, 403, "connector-not-approved", app="upstream-only")
    assert "routed the request to `crm`" in r.json()["detail"], r
