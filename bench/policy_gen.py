"""The benchmark policies, generated (Python standard library only).

The same shapes as `bench/decide/src/main.rs` (`scenario_policy`): three tiers, N apps with one API
key each, 50 datasets with routes (every fifth one `regulated`, so JIT-only), and R rules of a few
realistic shapes, about 10% unscoped, 20% scoped to a classification and the rest to one or two
datasets. None of the deny rules holds and every allow rule holds for the requests `requests()`
makes, so every rule in scope is evaluated: the worst case for an admitted request.

    doc = policy(apps=1000, rules=20, jwks=[key.jwk()])
    key = api_key(7)        # the plain key of app-00007 (the policy holds its digest)
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable

REGION = "eu-west-1"
ISSUER = "https://id.bench.example"
AUDIENCE = "bench-api"
CONNECTOR = "upstream"
HOST = "api.bench.example"
DATASETS = 50
DEPARTMENTS = ["retail", "marketing", "operations", "finance", "crm", "engineering"]
CLASSES = ["public", "internal", "confidential", "internal", "regulated"]

# A rate no benchmark reaches (one token per nanosecond, a second's worth of burst).
HUGE_TIER = {"rate": {"requests": 1_000_000_000, "per": "1s"}, "daily_budget": 1_000_000_000_000}


def app_id(i: int) -> str:
    return f"app-{i:05}"


def api_key(i: int) -> str:
    """The plain API key of app `i` (as in bench/decide/src/main.rs)."""
    return f"bench-key-{i:05}-{(i * 2_654_435_761) & 0xFFFFFFFF:08x}"


def digest(key: str) -> str:
    """`guardrail hash-key KEY`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def dataset_id(j: int) -> str:
    return f"ds-{j:02}"


def classification(j: int) -> str:
    return CLASSES[j % len(CLASSES)]


def open_datasets() -> list[int]:
    """Datasets an API-key request may reach without a JIT token (all but the regulated ones)."""
    return [j for j in range(DATASETS) if classification(j) != "regulated"]


def rule(k: int) -> dict[str, Any]:
    rid = f"rule-{k:03}"
    shape = k % 10
    if shape == 0:
        effect, when = [
            ("deny", "request.method == 'DELETE'"),
            ("deny", "'x-debug' in request.headers"),
            ("deny", "!(request.method in ['GET', 'HEAD', 'POST']) && app.tier == 'sandbox'"),
            ("deny", "token != null && token.claims.sub == 'blocked-subject'"),
        ][(k // 10) % 4]
        return {"id": rid, "effect": effect, "when": when, "message": "denied by a global rule"}
    if shape in (1, 2):
        cls, effect, when = [
            ("confidential", "deny", "request.path.endsWith('/export') && app.environment != 'prod'"),
            ("internal", "deny", "app.region != 'eu-west-1' && dataset.classification == 'internal'"),
            ("confidential", "allow", "app.department == dataset.owner_department || app.tier == 'standard'"),
        ][(k // 10) % 3]
        return {"id": rid, "effect": effect, "when": when, "classifications": [cls]}
    first, second = (k * 7) % DATASETS, (k * 13 + 5) % DATASETS
    datasets = [dataset_id(first)] if shape % 2 == 0 else [dataset_id(first), dataset_id(second)]
    effect, when = {
        3: ("deny", "request.method == 'DELETE' && dataset.classification != 'public'"),
        4: ("allow", "app.lifecycle == 'published' || app.lifecycle == 'approved'"),
        5: ("deny", "'user-agent' in request.headers && request.headers['user-agent'].startsWith('sqlmap')"),
        6: ("deny", "!(app.region in dataset.allowed_regions)"),
        7: ("allow", "dataset.classification in app.data_classes && app.environment in ['prod', 'test']"),
        8: ("deny", "request.path.contains('/admin/') && app.department != 'engineering'"),
        9: ("deny", "size(app.connectors) == 0 || request.host.endsWith('.internal')"),
    }[shape]
    return {"id": rid, "effect": effect, "when": when, "datasets": datasets}


def app(i: int, *, tier: str = "standard", lifecycle: str | None = None) -> dict[str, Any]:
    return {
        "id": app_id(i),
        "owner": f"owner-{i}@bench.example",
        "team": f"team-{i % 40}",
        "department": DEPARTMENTS[i % len(DEPARTMENTS)],
        "environment": "test" if i % 3 == 0 else "prod",
        "tier": tier,
        "lifecycle": lifecycle or ("published" if i % 2 == 0 else "approved"),
        "region": REGION,
        "data_classes": ["public", "internal", "confidential"],
        "connectors": [CONNECTOR],
        "api_keys": [digest(api_key(i))],
    }


def dataset(j: int) -> dict[str, Any]:
    return {
        "id": dataset_id(j),
        "classification": classification(j),
        "owner_department": DEPARTMENTS[j % len(DEPARTMENTS)],
        "allowed_regions": [REGION, "eu-central-1"],
        "routes": [
            {"path_prefix": f"/api/ds{j:02}", "methods": ["GET", "HEAD", "POST"]},
            {"host": HOST, "path_prefix": f"/v2/ds{j:02}"},
        ],
    }


def policy(
    *,
    apps: int,
    rules: int,
    jwks: Iterable[dict[str, Any]] = (),
    revision: str = "bench-1",
    tier: dict[str, Any] | None = None,
    lifecycles: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The policy document: `apps` apps on the `standard` tier (`tier`, default: never throttled),
    50 datasets, `rules` rules; `lifecycles` overrides some apps' lifecycle by index."""
    lifecycles = lifecycles or {}
    jwks = list(jwks)
    identity: dict[str, Any] = {"api_key_header": "x-api-key"}
    if jwks:
        identity["jwt"] = [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"keys": jwks}}]
    return {
        "apiVersion": "guardrail/v1",
        "kind": "Policy",
        "revision": revision,
        "settings": {"gateway_region": REGION, "identity": identity},
        "tiers": {
            "sandbox": {"rate": {"requests": 5, "per": "1m"}, "daily_budget": 500},
            "standard": tier or HUGE_TIER,
            "restricted": {"rate": {"requests": 60, "per": "1m", "burst": 10}, "daily_budget": 2000},
        },
        "connectors": {"approved": [CONNECTOR]},
        "apps": [app(i, lifecycle=lifecycles.get(i)) for i in range(apps)],
        "datasets": [dataset(j) for j in range(DATASETS)],
        "rules": [rule(k) for k in range(rules)],
    }


def requests(rng: random.Random, n: int, apps: int, tokens: list[str] | None = None) -> list[tuple[str, str, str]]:
    """`n` GET requests as (path, credential header, value): API keys of random apps, alternating
    with bearer tokens from `tokens` when given, each to a random non-regulated dataset."""
    datasets = open_datasets()
    out = []
    for i in range(n):
        path = f"/api/ds{rng.choice(datasets):02}/items/{rng.randrange(100_000)}"
        if tokens and i % 2 == 1:
            out.append((path, "authorization", f"Bearer {rng.choice(tokens)}"))
        else:
            out.append((path, "x-api-key", api_key(rng.randrange(apps))))
    return out
