"""`guardrail serve --candidate`: a candidate policy decided in shadow on live traffic.

The companion half alone first: a candidate that fails to parse or to validate is refused at start
with its error (exit 1); a later invalid edit keeps the last good candidate (logged, and shown by
`status`); deleting the file stops shadowing.

Then end to end, a real Envoy (two workers) behind the real companion and the echo upstream, one
module-scoped setup walked through in file order:
1. a candidate that keeps `price-list` in the EU and deprecates `old-app`: every request gets the
   enforced outcome (statuses, upstream headers, quota and access log as without a candidate, no
   decision line of the candidate's), and `guardrail status --json` shows per app exactly the
   requests whose outcome the candidate would have changed;
2. an invalid edit of the candidate is refused by the companion; the last good one keeps counting;
3. a candidate identical to the enforced policy: zero differences over the same mixed traffic;
4. the candidate file deleted: shadowing stops on every worker; requests meanwhile are counted
   nowhere, and the candidate sent again starts from zero.

Last, the protocol with a fake companion (`fake_companion.py`), for what the real one never sends:
a candidate the filter cannot compile (NACKed with `candidate: true`, never used, and the one in
force stops), the same candidate on a new stream (ACKed again, its counts go on), and a new stream
whose first fleet state comes without a candidate before it (shadowing stops).
"""

from __future__ import annotations

import json
import re
import urllib.request
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from companion import Companion, guardrail, write_policy
from fake_companion import FakeCompanion, FakeStream, candidate, fleet, snapshot
from harness import Envoy, Response, bootstrap, free_port, request, responds_with, wait_for
from policies import app, policy, tier

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "retailco" / "policy.yaml"
BROKEN = "apiVersion: guardrail/v1\nrevision: broken\napps: [\n"


def candidate_text() -> str:
    """The retailco residency change: `price-list` without `us-east-1`."""
    lines, in_price_list = [], False
    for line in POLICY.read_text().splitlines():
        if line.startswith("revision: retailco-1"):
            line = "revision: retailco-2"
        if "id: price-list" in line:
            in_price_list = True
        if in_price_list and ", us-east-1]" in line:
            line, in_price_list = line.replace(", us-east-1]", "]"), False
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, error", [
    (BROKEN, ":4:"),
    (candidate_text().replace("tier: sandbox", "tier: no-such-tier", 1), "no-such-tier"),
], ids=["syntax", "validation"])
def test_a_bad_candidate_is_refused_at_start(tmp_path: Path, text: str, error: str) -> None:
    bad = tmp_path / "candidate.yaml"
    bad.write_text(text)
    run = guardrail("serve", "--policy", str(POLICY), "--candidate", str(bad), "--listen", "127.0.0.1:0",
                    "--store", f"sqlite:{tmp_path / 's.db'}")
    assert run.returncode == 1, run
    assert str(bad) in run.stderr and error in run.stderr, run.stderr


def test_the_candidate_is_served_kept_on_a_bad_edit_and_stopped_by_deleting_it(tmp_path: Path) -> None:
    cand = tmp_path / "candidate.yaml"
    cand.write_text(candidate_text())
    c = Companion(POLICY, tmp_path, args=["--candidate", str(cand)]).start()
    try:
        section = c.status()["candidate"]
        assert section["revision"].startswith("retailco-2+sha256:"), section
        assert section["differences"] == [], section
        revision = section["revision"]

        cand.write_text(BROKEN)
        c.wait_for_log(r"candidate change refused; still shadowing revision " + revision.replace("+", r"\+"))
        section = c.status()["candidate"]
        assert section["revision"] == revision, "the last good candidate stays"
        assert f"{cand}:4:" in section["last_error"], section

        cand.unlink()
        c.wait_for_log("candidate file gone: shadowing stopped")
        wait_for(lambda: c.status()["candidate"] is None, timeout=5, what="the candidate section to go")
        assert c.status()["revision"] == "retailco-1", "the enforced policy is untouched"
    finally:
        c.stop()


# === In shadow on a real Envoy ===

NODE = "shadow-gw"
KEYS = {"us-app": "k-shadow-us-0001", "eu-app": "k-shadow-eu-0001", "old-app": "k-shadow-old-0001"}
# 100 requests an hour, bucket of 100: a token comes back every 36 s, so within a phase each
# admitted request's `RateLimit` remaining is exact, and shows whether anything else took one.
RATE = tier(100, "1h", burst=100, daily_budget=100_000)
SETTLE = 15.0


def make_policy(revision: str, *, price_regions: tuple[str, ...] = ("eu-west-1", "us-east-1"),
                old_lifecycle: str = "published") -> dict[str, Any]:
    return policy(
        revision=revision,
        tiers={"standard": RATE},
        apps=[
            app("us-app", region="us-east-1", keys=[KEYS["us-app"]]),
            app("eu-app", keys=[KEYS["eu-app"]]),
            app("old-app", lifecycle=old_lifecycle, keys=[KEYS["old-app"]]),
        ],
        datasets=[{"id": "price-list", "classification": "internal", "owner_department": "merch",
                   "allowed_regions": list(price_regions), "routes": [{"path_prefix": "/prices"}]}],
    )


ENFORCED = make_policy("shadow-1")
TIGHTENED = make_policy("shadow-2", price_regions=("eu-west-1",), old_lifecycle="deprecated")


@dataclass
class Env:
    comp: Companion
    gw: Envoy
    candidate: Path
    enforced: dict[str, Any]
    console: str = ""

    def shadow(self) -> dict[str, Any] | None:
        return self.comp.status()["candidate"]

    def put_in_force(self, doc: dict[str, Any]) -> str:
        """Writes the candidate file; returns the candidate's revision once the node ACKed it and
        every root context of Envoy (each worker's and the main thread's) decides with it."""
        before = (self.shadow() or {}).get("revision")
        mark = len(self.gw.log())
        write_policy(self.candidate, doc)
        section = wait_for(lambda: (s := self.shadow()) and s["revision"] != before and s["applied_nodes"] and s,
                           timeout=SETTLE, interval=0.2, what="the node to ACK the new candidate")
        revision = section["revision"]
        assert revision.startswith(f"{doc['revision']}+sha256:"), section
        self.wait_for_every_worker(revision, mark)
        return revision

    def wait_for_every_worker(self, revision: str, mark: int = 0) -> None:
        """Until every root context logged, after `mark` in Envoy's log, that it decides with `revision`."""
        section = self.shadow()
        assert section and len(section["applied_nodes"]) == 1, section
        assert section["applied_nodes"][0].startswith(f"{NODE}/"), section
        assert section["nacked_nodes"] == [], section
        contexts = self.root_contexts()
        line = f"candidate `{revision}` decided in shadow on this worker"
        wait_for(lambda: logging_threads(self.gw, line, mark) == contexts, timeout=SETTLE,
                 what=f"{contexts} root contexts to decide with {revision}")

    def root_contexts(self) -> int:
        return root_contexts(self.gw, self.enforced["revision"])

    def usage(self) -> dict[str, int]:
        return {u["app"]: u["allowed"] for u in self.comp.status()["fleet_usage"]}

    def differences_once_reported(self, allowed: dict[str, int]) -> list[dict[str, Any]]:
        """The candidate's differences in `status`, once the node reported the usage `allowed` (per
        app, admitted requests today). A report that counts a request's usage counts its
        difference too, so these are all of them."""
        wait_for(lambda: self.usage() == allowed, timeout=SETTLE, interval=0.2,
                 what=f"the node to report usage {allowed}")
        section = self.shadow()
        assert section is not None, "no candidate section"
        return section["differences"]


def logging_threads(gw: Envoy, text: str, mark: int = 0) -> int:
    """How many Envoy threads (root contexts: one per worker, and the main thread's) logged a line
    holding `text` after byte `mark` of the log."""
    return len({m.group(1) for line in gw.log()[mark:].splitlines() if text in line
                and (m := re.match(r"\[[^]]*\]\[(\d+)\]", line))})


def root_contexts(gw: Envoy, revision: str) -> int:
    """How many root contexts put `revision` in force: two workers and the main thread, once each
    logged it (a worker puts the companion's policy in force on its next request or tick, so a
    loaded machine may take a moment)."""
    line = f"policy revision `{revision}` in force"
    try:
        wait_for(lambda: logging_threads(gw, line) == 3, timeout=SETTLE, what="three root contexts to log " + line)
    except TimeoutError:
        n = logging_threads(gw, line)
        raise AssertionError(f"expected two workers and the main thread, saw {n}:\n{gw.log_tail()}") from None
    return 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("shadow")
    policy_file, candidate = tmp / "policy.json", tmp / "candidate.json"
    write_policy(policy_file, ENFORCED)
    write_policy(candidate, TIGHTENED)
    port = free_port()
    gw = Envoy({}, tmp / "gw", name="gw")
    config = bootstrap({"control": {"cluster": "guardrail_control"}}, upstream_port=upstream.server_port, wasm=wasm,
                       control_port=port, access_log_path=gw.access_log_path)
    config["node"] = {"id": NODE, "cluster": "e2e"}
    gw.config = config
    console = f"127.0.0.1:{free_port()}"
    comp = Companion(policy_file, tmp, port=port, args=["--candidate", str(candidate), "--http", console])
    try:
        comp.start()
        gw.start()
        wait_for(lambda: comp.node_acked(ENFORCED["revision"]), timeout=SETTLE, what="the node to ACK the policy")
        yield Env(comp, gw, candidate, ENFORCED, f"http://{console}")
    finally:
        gw.stop()
        comp.stop()


def send(gw: Envoy, app_id: str | None, path: str, n: int, extra: dict[str, str] | None = None) -> list[Response]:
    """`n` requests, each on a fresh connection, 8 at a time (so both workers take some)."""
    headers = {"x-api-key": KEYS[app_id]} if app_id else {}
    headers.update(extra or {})
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: request(gw.url, path, headers=headers, timeout=10), range(n)))


def remaining(responses: list[Response]) -> list[int]:
    """The rate bucket's remaining count of each admitted response (`RateLimit: "rate";r=N;…`)."""
    out = []
    for r in responses:
        m = re.search(r'"rate";r=(\d+)', r.header("ratelimit") or "")
        assert m, f"no RateLimit rate item:\n{r}"
        out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def all_admitted(responses: list[Response], app_id: str) -> None:
    for r in responses:
        responds_with(r, 200)
        assert r.upstream["headers"].get("x-guardrail-app") == app_id, r


def test_requests_get_the_enforced_outcome_and_status_counts_the_differences(env: Env) -> None:
    revision = wait_for(lambda: (s := env.shadow()) and s["applied_nodes"] and s["revision"], timeout=SETTLE,
                        interval=0.2, what="the node to ACK the candidate it was started with")
    assert revision.startswith("shadow-2+sha256:")
    env.wait_for_every_worker(revision)

    us = send(env.gw, "us-app", "/prices/shoes", 12)
    eu = send(env.gw, "eu-app", "/prices/shoes", 6)
    old = send(env.gw, "old-app", "/orders", 4)
    anonymous = send(env.gw, None, "/prices/shoes", 2)
    all_admitted(us, "us-app")
    all_admitted(eu, "eu-app")
    all_admitted(old, "old-app")
    for r in anonymous:
        responds_with(r, 401, "unauthenticated")
    # The candidate took nothing from the buckets: each admitted request took one token, once.
    assert remaining(us) == list(range(99, 87, -1)), "us-app: 12 tokens taken, by the enforced policy only"
    assert remaining(eu) == list(range(99, 93, -1)), "eu-app: the candidate admits it too, and takes nothing"

    assert env.differences_once_reported({"us-app": 12, "eu-app": 6, "old-app": 4}) == [
        {"app": "us-app", "enforced": "allow", "candidate": "residency-violation", "count": 12},
        {"app": "old-app", "enforced": "allow", "candidate": "app-not-active", "count": 4},
    ]
    # Nothing of the candidate's reached Envoy's logs or its filter state.
    codes = Counter(o.get("code") for o in env.gw.json_log_lines() if o.get("guardrail"))
    assert codes == Counter({"unauthenticated": 2}), codes
    ids = {r.header("x-request-id") for r in us + eu + old}
    entries = wait_for(lambda: (e := [o for o in env.gw.access_log_lines() if o.get("request_id") in ids])
                       and len(e) == len(ids) and e, timeout=SETTLE, what="the access log entries")
    assert {(e["guardrail_app"], e["guardrail_code"]) for e in entries} == {
        ("us-app", "allow"), ("eu-app", "allow"), ("old-app", "allow")}, entries
    assert "NACK" not in env.gw.log()
    # The console shows the same: its API, and the catalog page's shadow section.
    with urllib.request.urlopen(f"{env.console}/api/v1/shadow", timeout=10) as r:
        shown = json.load(r)["candidate"]
    assert shown["revision"] == revision and [n.split("/")[0] for n in shown["applied_nodes"]] == [NODE], shown
    assert [(d["app"], d["candidate"], d["count"]) for d in shown["differences"]] == [
        ("us-app", "residency-violation", 12), ("old-app", "app-not-active", 4)], shown
    with urllib.request.urlopen(f"{env.console}/", timeout=10) as r:
        page = r.read().decode()
    section = page[page.index('<section id="shadow">'):]
    assert revision in section and "residency-violation" in section and '<td class="shadow-count">12</td>' in section


def test_an_invalid_edit_is_refused_and_the_last_good_candidate_keeps_counting(env: Env) -> None:
    revision = env.shadow()["revision"]
    bad = make_policy("shadow-bad")
    bad["apps"][0]["tier"] = "no-such-tier"
    write_policy(env.candidate, bad)
    section = wait_for(lambda: (s := env.shadow()) and s["last_error"] and s, timeout=SETTLE, interval=0.2,
                       what="the companion to refuse the edit")
    assert "no-such-tier" in section["last_error"] and "apps[0].tier" in section["last_error"], section
    assert section["revision"] == revision, "the last good candidate stays"

    all_admitted(send(env.gw, "us-app", "/prices/socks", 3), "us-app")
    assert env.differences_once_reported({"us-app": 15, "eu-app": 6, "old-app": 4}) == [
        {"app": "us-app", "enforced": "allow", "candidate": "residency-violation", "count": 15},
        {"app": "old-app", "enforced": "allow", "candidate": "app-not-active", "count": 4},
    ]


def test_a_candidate_identical_to_the_enforced_policy_differs_nowhere(env: Env) -> None:
    env.put_in_force(env.enforced)
    all_admitted(send(env.gw, "us-app", "/prices/hats", 3), "us-app")
    all_admitted(send(env.gw, "eu-app", "/prices/hats", 3), "eu-app")
    all_admitted(send(env.gw, "old-app", "/orders", 2), "old-app")
    for r in send(env.gw, None, "/orders", 2) + send(env.gw, None, "/orders", 2, {"x-api-key": "k-shadow-unknown"}):
        responds_with(r, 401, "unauthenticated")
    assert env.differences_once_reported({"us-app": 18, "eu-app": 9, "old-app": 6}) == []


def test_removing_the_candidate_stops_shadowing_and_a_new_one_starts_from_zero(env: Env) -> None:
    env.put_in_force(TIGHTENED)
    mark = len(env.gw.log())
    env.candidate.unlink()
    env.comp.wait_for_log("candidate file gone: shadowing stopped")
    wait_for(lambda: env.shadow() is None, timeout=SETTLE, interval=0.2, what="the candidate section to go")
    contexts = env.root_contexts()
    wait_for(lambda: logging_threads(env.gw, "no candidate decided in shadow on this worker any more", mark) == contexts,
             timeout=SETTLE, what="every root context to stop shadowing")
    # Counted nowhere: no candidate is in force.
    all_admitted(send(env.gw, "us-app", "/prices/shoes", 5), "us-app")
    wait_for(lambda: env.usage() == {"us-app": 23, "eu-app": 9, "old-app": 6}, timeout=SETTLE, interval=0.2,
             what="the node to report the usage")

    revision = env.put_in_force(TIGHTENED)
    all_admitted(send(env.gw, "us-app", "/prices/shoes", 3), "us-app")
    assert env.differences_once_reported({"us-app": 26, "eu-app": 9, "old-app": 6}) == [
        {"app": "us-app", "enforced": "allow", "candidate": "residency-violation", "count": 3},
    ], "only the requests since the candidate was put in force again"
    assert env.shadow()["revision"] == revision


# === The protocol, with a fake companion ===


def test_the_filter_nacks_a_candidate_it_cannot_compile_and_follows_the_stream(
        launch: Any) -> None:
    day = int(time.time()) // 86400
    good = {**TIGHTENED, "revision": "cand-1"}

    def opening(*messages: bytes) -> Any:
        return lambda s: [s.send(m) for m in (snapshot("shadow-1", ENFORCED), *messages, fleet(day))]

    fake = FakeCompanion(on_open=opening(candidate("cand-1", good))).start()
    try:
        gw = launch({"policy": ENFORCED, "control": {"cluster": "guardrail_control"}}, name="fake-gw",
                    control_port=fake.port)
        contexts = lambda: root_contexts(gw, ENFORCED["revision"])  # noqa: E731
        stream = fake.wait_for_stream()
        ack = stream.wait_for(lambda m: m.kind == "ack" and m.revision == "cand-1", what="the candidate's ACK")
        assert ack.fields["candidate"] is True, ack.fields
        assert stream.wait_for_ack("shadow-1").fields["candidate"] is False

        def every_worker(line: str, mark: int) -> None:
            wait_for(lambda: logging_threads(gw, line, mark) == contexts(), timeout=SETTLE,
                     what=f"{line!r} from every root context")

        def reported(s: FakeStream, revision: str, shadow: list[tuple[str, str, str, int]], us_app: int) -> None:
            s.wait_for(lambda m: m.kind == "usage" and m.fields["apps"].get("us-app", {}).get("allowed") == us_app
                       and m.fields["candidate_revision"] == revision and m.fields["shadow"] == shadow,
                       timeout=SETTLE, what=f"a report of {us_app} us-app requests, {revision!r}: {shadow}")

        every_worker("candidate `cand-1` decided in shadow on this worker", 0)
        all_admitted(send(gw, "us-app", "/prices/shoes", 5), "us-app")
        reported(stream, "cand-1", [("us-app", "allow", "residency-violation", 5)], 5)

        # The same candidate on a new stream: ACKed again, and it keeps counting.
        stream.end()
        stream = fake.wait_for_stream(2, timeout=SETTLE)
        assert stream.wait_for(lambda m: m.kind == "ack" and m.revision == "cand-1").fields["candidate"] is True
        all_admitted(send(gw, "us-app", "/prices/shoes", 2), "us-app")
        reported(stream, "cand-1", [("us-app", "allow", "residency-violation", 7)], 7)

        # One the filter cannot compile: NACKed, never used; the one in force stops with it.
        mark = len(gw.log())
        stream.send(candidate("cand-bad", {**good, "revision": "cand-bad", "tiers": {}}))
        nack = stream.wait_for_nack("cand-bad")
        assert nack.fields["candidate"] is True and "tier" in nack.error, nack.fields
        every_worker("no candidate decided in shadow on this worker any more", mark)
        all_admitted(send(gw, "us-app", "/prices/shoes", 2), "us-app")
        reported(stream, "", [], 9)

        # A new stream whose first fleet state has no candidate before it: shadowing stops.
        stream.send(candidate("cand-2", {**good, "revision": "cand-2"}))
        stream.wait_for(lambda m: m.kind == "ack" and m.revision == "cand-2")
        every_worker("candidate `cand-2` decided in shadow on this worker", mark)
        mark = len(gw.log())
        fake.on_open = opening()
        stream.end()
        stream = fake.wait_for_stream(3, timeout=SETTLE)
        every_worker("no candidate decided in shadow on this worker any more", mark)
        assert "candidate `cand-2` no longer decided in shadow (the companion serves none)" in gw.log()[mark:]
        all_admitted(send(gw, "us-app", "/prices/shoes", 1), "us-app")
        reported(stream, "", [], 10)
        codes = Counter(o.get("code") for o in gw.json_log_lines() if o.get("guardrail"))
        assert codes == Counter(), f"no decision line of any candidate's: {codes}"
    finally:
        fake.stop()


def test_a_candidate_that_changes_one_app_differs_for_that_app_only(env: Env) -> None:
    # Only `apps` differ: the filter decides the other apps' requests once (both policies decide
    # them alike) and the changed app's with both.
    env.put_in_force(make_policy("shadow-3", old_lifecycle="deprecated"))
    before = env.usage()
    all_admitted(send(env.gw, "us-app", "/prices/belts", 3), "us-app")
    all_admitted(send(env.gw, "eu-app", "/prices/belts", 3), "eu-app")
    all_admitted(send(env.gw, "old-app", "/orders", 2), "old-app")
    for r in send(env.gw, None, "/orders", 1, {"x-api-key": "k-shadow-unknown"}):
        responds_with(r, 401, "unauthenticated")
    after = {app: before.get(app, 0) + n for app, n in {"us-app": 3, "eu-app": 3, "old-app": 2}.items()}
    assert env.differences_once_reported(after) == [
        {"app": "old-app", "enforced": "allow", "candidate": "app-not-active", "count": 2},
    ]

