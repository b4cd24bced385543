#!/usr/bin/env python3
"""A synthetic Envoy JSON access log for `guardrail replay`, over examples/retailco/policy.yaml.

    bench/replay_log.py OUT.log [LINES]     # default 1,000,000 lines; OUT.log.gz writes gzip

The fields are those of the repository's access-log format (see README "Safe rollout: replay").
The mix, at 50 requests/s spread over the apps (fixed seed): apps reading their datasets, some
with a JIT token, a US app refused EU data, a draft in prod, unauthenticated calls; the recorded
codes are what retailco-1 decides, so a replay of the same policy changes nothing but the 401s
and the quota-dependent lines, which it recomputes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import random
import sys
from pathlib import Path

HOST = "api.retailco.example"
# (app, method, path, cluster, token, code): what the retailco-1 policy decides for each.
MIX = [
    ("crm-console", "GET", "/catalog/items/{n}", "upstream", "-", "allow"),
    ("crm-console", "GET", "/customers/{n}", "upstream", "dataset:customer-profiles;ttl=600", "allow"),
    ("crm-console", "GET", "/customers/{n}", "upstream", "-", "jit-required"),
    ("inventory-sync", "GET", "/inventory/{n}", "inventory-api", "-", "allow"),
    ("inventory-sync", "PUT", "/inventory/{n}", "inventory-api", "-", "allow"),
    ("us-promo", "GET", "/prices/{n}", "upstream", "-", "allow"),
    ("us-promo", "GET", "/customers/{n}", "upstream", "-", "residency-violation"),
    ("finance-dash", "GET", "/loyalty/{n}", "upstream", "-", "access-denied"),
    ("finance-dash", "GET", "/promotions/{n}", "upstream", "-", "allow"),
    ("store-locator", "GET", "/catalog/stores", "upstream", "-", "app-not-active"),
    ("partner-insights", "POST", "/catalog/export", "partner-analytics", "-", "connector-not-approved"),
    ("merch-insights", "GET", "/loyalty/{n}", "upstream", "dataset:loyalty-accounts;ttl=900", "allow"),
    ("-", "GET", "/prices/{n}", "upstream", "-", "unauthenticated"),
]
STATUS = {"allow": 200, "unauthenticated": 401, "quota-exceeded": 429, "budget-exhausted": 429}


def lines(n: int, seed: int = 7):
    rng = random.Random(seed)
    t = dt.datetime(2026, 12, 6, 9, 0, 0, tzinfo=dt.timezone.utc)
    step = dt.timedelta(milliseconds=20)
    for i in range(n):
        app, method, path, cluster, token, code = rng.choice(MIX)
        stamp = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
        t += step
        status = STATUS.get(code, 403)
        yield (
            f'{{"time":"{stamp}","request_id":"{i:08x}-5c1e-4b7e-9a51-{rng.getrandbits(48):012x}",'
            f'"method":"{method}","authority":"{HOST}","path":"{path.format(n=rng.randrange(10000))}",'
            f'"protocol":"HTTP/1.1","status":{status},"response_flags":"-","upstream_cluster":"{cluster}",'
            f'"duration_ms":{rng.randrange(1, 40)},"peer":"-","guardrail_app":"{app}","guardrail_code":"{code}",'
            f'"guardrail_dataset":"-","guardrail_token":"{token}"}}\n'
        )


def write(path: Path, n: int) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines(lines(n))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000)
