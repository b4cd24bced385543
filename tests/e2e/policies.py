"""Builders for policy documents (`apiVersion: guardrail/v1`) as Python dicts, per SPEC.md.

    POLICY = policy(
        tiers={"standard": tier(600, "1m", burst=100, daily_budget=100_000)},
        apps=[app("pos", tier="standard", keys=["k-pos"])],
    )
"""

from __future__ import annotations

from typing import Any, Iterable

from harness import hash_key

REGION = "eu-west-1"
CONNECTOR = "upstream"  # the cluster the e2e bootstrap routes to


def tier(requests: int, per: str, *, burst: int | None = None, daily_budget: int | None = None) -> dict[str, Any]:
    rate: dict[str, Any] = {"requests": requests, "per": per}
    if burst is not None:
        rate["burst"] = burst
    out: dict[str, Any] = {"rate": rate}
    if daily_budget is not None:
        out["daily_budget"] = daily_budget
    return out


def app(
    id: str,  # noqa: A002 (the policy's field name)
    *,
    tier: str = "standard",
    lifecycle: str = "published",
    environment: str = "prod",
    keys: Iterable[str] = (),
    region: str = REGION,
    data_classes: Iterable[str] = ("public", "internal"),
    connectors: Iterable[str] = (CONNECTOR,),
    **extra: Any,
) -> dict[str, Any]:
    """A catalog entry; `keys` are plain API keys, stored as their `sha256:` digests."""
    return {
        "id": id,
        "owner": f"{id}@e2e.example",
        "team": "e2e",
        "department": "engineering",
        "environment": environment,
        "tier": tier,
        "lifecycle": lifecycle,
        "region": region,
        "data_classes": list(data_classes),
        "connectors": list(connectors),
        "api_keys": [hash_key(k) for k in keys],
        **extra,
    }


def jwt_issuer(issuer: str, audiences: Iterable[str], jwks: Iterable[dict[str, Any]], app_claim: str = "azp", clock_skew_seconds: int = 30) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "audiences": list(audiences),
        "jwks": {"keys": list(jwks)},
        "app_claim": app_claim,
        "clock_skew_seconds": clock_skew_seconds,
    }


def policy(
    *,
    tiers: dict[str, Any],
    apps: list[dict[str, Any]],
    revision: str = "e2e-1",
    jwt: Iterable[dict[str, Any]] = (),
    approved_connectors: Iterable[str] = (CONNECTOR,),
    settings: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "guardrail/v1",
        "kind": "Policy",
        "revision": revision,
        "settings": {
            "gateway_region": REGION,
            "failure_mode": "closed",
            "identity": {"api_key_header": "x-api-key", "jwt": list(jwt)},
            **(settings or {}),
        },
        "tiers": tiers,
        "connectors": {"approved": list(approved_connectors)},
        "apps": apps,
    }
    doc.update(extra)
    return doc
