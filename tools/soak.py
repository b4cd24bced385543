#!/usr/bin/env python3
"""Soak: Guardrail in real Envoy (2 workers) under steady load for a while, with 1,000 apps.

Passes when, over the whole run:
- Envoy's memory stays flat (RSS after warm-up grows by less than SOAK_RSS_GROWTH, default 10%):
  shared-data keys are bounded (two per app, created when the policy is applied);
- no response is a 5xx;
- every denial the clients saw has its decision-log line (counted by request id).

Usage: tools/soak.py [SECONDS]  (default 600; `./build.sh soak` runs it). Prints a JSON summary.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import harness  # noqa: E402  (the end-to-end harness: the same Envoy bootstrap as the tests)

APPS = int(os.environ.get("SOAK_APPS", "1000"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "8"))


def key(i: int) -> str:
    return f"soak-key-{i:05d}-0123456789abcdef"


def policy() -> dict:
    apps = []
    for i in range(APPS):
        lifecycle = "quarantined" if i % 50 == 0 else "published"
        tier = "tiny" if i % 10 == 1 else "standard"
        apps.append({
            "id": f"app-{i:05d}", "environment": "prod", "tier": tier, "lifecycle": lifecycle,
            "region": "eu-west-1", "data_classes": ["public"], "connectors": ["upstream"],
            "api_keys": ["sha256:" + hashlib.sha256(key(i).encode()).hexdigest()],
        })
    return {
        "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "soak",
        "settings": {"gateway_region": "eu-west-1"},
        "tiers": {
            "standard": {"rate": {"requests": 100000, "per": "1s"}},
            "tiny": {"rate": {"requests": 2, "per": "1s", "burst": 2}},
        },
        "connectors": {"approved": ["upstream"]},
        "apps": apps,
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 600.0
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"guardrail-soak-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    upstream_port = harness.free_port()
    upstream = subprocess.Popen([sys.executable, str(REPO / "examples" / "upstream" / "echo.py"), "--port", str(upstream_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    envoy = harness.Envoy(harness.bootstrap(harness.plugin_configuration(policy()), upstream_port=upstream_port), workdir=work, name="soak")
    statuses: dict[int, int] = {}
    denied_ids: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    samples: list[tuple[float, int]] = []
    try:
        envoy.start(timeout=60)
        pid = envoy.proc.pid if envoy.proc else 0

        def client(seed: int) -> None:
            rng = random.Random(seed)
            conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
            while time.monotonic() < stop:
                i = rng.randrange(APPS)
                try:
                    conn.request("GET", f"/items/{rng.randrange(10_000)}", headers={"x-api-key": key(i)})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
                    with lock:
                        statuses[-1] = statuses.get(-1, 0) + 1
                    continue
                with lock:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status in (401, 403, 429):
                        denied_ids.append(json.loads(body).get("instance", ""))

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() < stop:
            samples.append((round(time.monotonic() - started, 1), rss_kb(pid)))
            time.sleep(min(10.0, max(1.0, seconds / 60)))
        for t in threads:
            t.join(timeout=15)
        samples.append((round(time.monotonic() - started, 1), rss_kb(pid)))
        time.sleep(1.0)  # let the last log lines reach the file
        logged = {line.get("request_id") for line in envoy.json_log_lines() if line.get("guardrail") == "decision"}
    finally:
        envoy.stop()
        upstream.kill()
    warm = [kb for t, kb in samples if t >= min(60.0, seconds / 5)] or [kb for _, kb in samples]
    growth = (warm[-1] - warm[0]) / warm[0] if warm and warm[0] else 0.0
    missing = [r for r in denied_ids if r not in logged]
    total = sum(v for k, v in statuses.items() if k > 0)
    summary = {
        "seconds": seconds, "apps": APPS, "requests": total, "req_per_s": round(total / seconds, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "rss_kb_samples": samples, "rss_growth_after_warmup": round(growth, 4),
        "denials": len(denied_ids), "denials_without_log_line": len(missing),
    }
    print(json.dumps(summary))
    failures = []
    if any(k >= 500 for k in statuses) or statuses.get(-1):
        failures.append("5xx responses or connection errors")
    if growth >= float(os.environ.get("SOAK_RSS_GROWTH", "0.10")):
        failures.append(f"RSS grew {growth:.1%} after warm-up")
    if missing:
        failures.append(f"{len(missing)} denials without a decision-log line")
    if total == 0:
        failures.append("no requests completed")
    for f in failures:
        print(f"soak: FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
