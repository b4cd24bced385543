"""Faults under load (issue 7), in real Envoy (two workers) with the real guardrail.wasm: the
companion killed and restarted, a companion sending garbage, an oversized snapshot or a snapshot
that does not compile, a companion that stalls, quota compare-and-swap contention at its worst,
and the wall clock stepping back and forth.

Every scenario runs a background load of concurrent clients (`Load`) through the fault: a
published app's key (must be admitted), a quarantined app's key and an unknown key (must be
refused). Afterwards every response must be exactly what the policy says: 200 for what it admits,
the SPEC's status and problem `type` for what it refuses; no other 5xx, no connection error, and
not one admission of a request that must be refused.

Which policy is in force is visible on every admitted request: each revision names the published
app's tier after itself, and the upstream echoes `x-guardrail-tier`.

- `test_companion_killed_and_restarted_under_load`: the real `guardrail serve` (test_companion.py
  covers the same without load);
- a fake companion (`fake_companion.py`, grpcio with raw bytes) behind one gateway that has an
  inline policy and the control cluster: stalls (silent, then deaf), garbage, oversized, lies;
- `test_cas_contention_*`: 96 clients at once on one small bucket and one small daily budget;
- the clock: a stepped wall clock for one Envoy (`SteppedClock`). libfaketime (Debian 12's
  0.9.10) deadlocks this Envoy before `main` (its constructor's failing `dlsym("__ftime")`
  allocates, which starts Envoy's tcmalloc, which calls the intercepted `poll`, which re-enters
  libfaketime's initialisation), so the module builds a small LD_PRELOAD shim of its own
  (`CLOCK_SHIM_C`, with the system's C compiler) that shifts only CLOCK_REALTIME by an offset the
  test writes to a file.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from companion import Companion, write_policy
from fake_companion import FakeCompanion, FakeStream, length_delimited, padded_snapshot, snapshot, zlib_snapshot
from harness import Envoy, Response, bootstrap, counter_delta, request, responds_with, settled_deltas, wait_for
from policies import app, jwt_issuer, policy, tier
from tokens import SigningKey, claims

CONTROL = {"cluster": "guardrail_control"}
RECONNECT_WITHIN = 15.0  # the filter's backoff is capped at 10 s (plus jitter, a tick, the hello)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # src/control.rs

KEYS = {
    "load-good": "k-faults-good-0001",
    "load-quarantined": "k-faults-quarantined-0001",
    "cas-rate": "k-faults-cas-rate-0001",
    "cas-budget": "k-faults-cas-budget-0001",
    "clock-probe": "k-faults-clock-probe-0001",
    "clock-tokens": "k-faults-clock-tokens-0001",
    "clock-steady": "k-faults-clock-steady-0001",
    "clock-daily": "k-faults-clock-daily-0001",
}
UNKNOWN_KEY = "k-faults-nobody-0001"

# The load's app never runs out, whatever the clock does: a token bucket 7 days deep.
ENDLESS = tier(1_000_000, "7d", burst=1_000_000)


def load_policy(revision: str, *, quarantined: str = "quarantined", apps: list[dict[str, Any]] | None = None,
                tiers: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A policy whose published app `load-good` has a tier named after the revision (so the
    upstream's `x-guardrail-tier` tells which revision admitted a request), with `load-quarantined`
    in lifecycle `quarantined` (a lying snapshot publishes it)."""
    return policy(
        revision=revision,
        tiers={revision: copy.deepcopy(ENDLESS), **(tiers or {})},
        apps=[
            app("load-good", tier=revision, keys=[KEYS["load-good"]]),
            app("load-quarantined", tier=revision, lifecycle=quarantined, keys=[KEYS["load-quarantined"]]),
            *(apps or []),
        ],
        **extra,
    )


# === the load ===


@dataclass(frozen=True)
class Kind:
    """A kind of request in the load and what the policy may answer: (status, problem code) pairs,
    code None for 200, which must then reach the upstream as `app`."""

    name: str
    headers: Mapping[str, str]
    answers: tuple[tuple[int, str | None], ...]
    app: str | None = None


GOOD = Kind("good", {"x-api-key": KEYS["load-good"]}, ((200, None),), app="load-good")
QUARANTINED = Kind("quarantined", {"x-api-key": KEYS["load-quarantined"]}, ((403, "app-not-active"),))
UNKNOWN = Kind("unknown", {"x-api-key": UNKNOWN_KEY}, ((401, "unauthenticated"),))
LOAD_KINDS = (GOOD, QUARANTINED, GOOD, UNKNOWN)


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int  # 0: no HTTP response at all
    code: str  # the problem code of a refusal ("" for a 200)
    rule: str
    tier: str  # x-guardrail-tier as the upstream saw it (admitted requests only)
    started: float  # time.monotonic()
    ended: float
    wrong: str = ""  # why this is not an answer the policy gives ("" when it is)


def judge(kind: Kind, r: Response, started: float) -> Outcome:
    """The outcome of one response: `wrong` says how it differs from every answer `kind` allows
    (checked with `responds_with`: status, problem+json, type, instance = request id)."""
    code = rule = tier_seen = ""
    if r.status != 200:
        try:
            problem = r.json()
            code = str(problem.get("type", "")).removeprefix("urn:guardrail:problem:")
            rule = str(problem.get("rule") or "")
        except ValueError:
            pass
    wrong = ""
    allowed = [(s, c) for s, c in kind.answers if s == r.status and (c is None or c == code)]
    if not allowed:
        wrong = f"{kind.name}: {f'{r.status} {code}'.strip()} is not an answer of the policy {kind.answers}:\n{r}"
    else:
        status, expected = allowed[0]
        try:
            responds_with(r, status, expected)
            if status == 200:
                seen = r.upstream["headers"]
                tier_seen = seen.get("x-guardrail-tier", "")
                if kind.app and seen.get("x-guardrail-app") != kind.app:
                    wrong = f"{kind.name}: admitted as {seen.get('x-guardrail-app')!r}, not {kind.app!r}:\n{r}"
        except (AssertionError, ValueError) as e:
            wrong = f"{kind.name}: {e}"
    return Outcome(kind.name, r.status, code, rule, tier_seen, started, time.monotonic(), wrong)


class Load:
    """Concurrent clients, each sending one request after another with `harness.request` (a new
    connection each, so both workers take some), cycling through `kinds`, until `stop()` or,
    with `total`, until that many were sent. `barrier` starts every client at the same instant."""

    def __init__(self, url: str, kinds: tuple[Kind, ...] = LOAD_KINDS, *, clients: int = 8,
                 total: int | None = None, barrier: bool = False) -> None:
        self.url = url
        self.kinds = kinds
        self.clients = clients
        self.total = total
        self._barrier = threading.Barrier(clients) if barrier else None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._outcomes: list[Outcome] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (self.total is not None and self._sent >= self.total):
                return False
            self._sent += 1
            return True

    def _client(self, i: int) -> None:
        if self._barrier is not None:
            self._barrier.wait(timeout=30)
        n = 0
        while self._next():
            kind = self.kinds[(i + n) % len(self.kinds)]
            n += 1
            started = time.monotonic()
            try:
                outcome = judge(kind, request(self.url, f"/load/{kind.name}", headers=kind.headers, timeout=15), started)
            except (OSError, http.client.HTTPException) as e:
                outcome = Outcome(kind.name, 0, "", "", "", started, time.monotonic(), f"{kind.name}: no response: {e!r}")
            except Exception as e:  # noqa: BLE001 - a response this module cannot read is a failure too
                outcome = Outcome(kind.name, 0, "", "", "", started, time.monotonic(), f"{kind.name}: {e!r}")
            with self._lock:
                self._outcomes.append(outcome)

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 120) -> None:
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a load client is stuck"

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def count(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self._outcomes if o.started >= since)

    def wait_for(self, n: int, since: float = 0.0, timeout: float = 30.0) -> None:
        """Waits until `n` requests that started at or after `since` were answered."""
        wait_for(lambda: self.count(since) >= n, timeout=timeout, interval=0.05,
                 what=f"{n} answered requests of the load since t={since:.1f}")

    def tiers(self, start: float, end: float = float("inf")) -> Counter:
        """Tiers the upstream saw on admitted requests that started in [start, end] and ended by `end`."""
        return Counter(o.tier for o in self.outcomes if o.status == 200 and start <= o.started and o.ended <= end)


def summary(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """{kind: {"200": n, "403 app-not-active": n, ..}}, for reports and failure messages."""
    out: dict[str, Counter] = {}
    for o in outcomes:
        out.setdefault(o.kind, Counter())[f"{o.status} {o.code}".strip() if o.status else "no response"] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def assert_only_policy_answers(outcomes: list[Outcome], kinds: tuple[Kind, ...] = LOAD_KINDS, what: str = "") -> None:
    """Every response is one the policy gives for its kind (see `judge`), and every kind was sent."""
    wrong = [o for o in outcomes if o.wrong]
    assert not wrong, (f"{len(wrong)} of {len(outcomes)} responses were not the policy's answer ({summary(outcomes)}):\n"
                       + "\n".join(o.wrong[:700] for o in wrong[:5]))
    sent = Counter(o.kind for o in outcomes)
    missing = {k.name for k in kinds} - set(sent)
    assert not missing, f"the load sent no {missing} requests: {sent}"
    print(f"\n[{what}] {len(outcomes)} requests: {summary(outcomes)}")


def assert_no_crash(gw: Envoy) -> None:
    lines = gw.crash_lines()
    assert not lines, f"{gw.name}: the filter crashed:\n" + "\n".join(line[:400] for line in lines[:10])


def guardrail_log_lines(gw: Envoy, text: str) -> list[str]:
    return [line for line in gw.log().splitlines() if "guardrail:" in line and text in line]


# === 1. the real companion killed and restarted under load ===


def test_companion_killed_and_restarted_under_load(tmp_path: Path, launch: Callable[..., Envoy]) -> None:
    """Kill -9 of `guardrail serve` in the middle of the load: the gateway keeps enforcing the last
    good snapshot (c-1, not its inline policy) on every request; restarted with a new revision (c-2)
    it reconnects, acknowledges it, and every request started after the ACK is judged by c-2. No
    request fails, the quarantined and the unknown keys are never admitted."""
    policy_file = tmp_path / "policy.json"
    write_policy(policy_file, load_policy("c-1"))
    comp = Companion(policy_file, tmp_path / "companion")
    try:
        comp.start()
        gw = launch({"policy": load_policy("killed-inline"), "control": CONTROL}, name="killed", control_port=comp.port)
        wait_for(lambda: comp.node_acked("c-1"), timeout=RECONNECT_WITHIN, what="the ACK of c-1")

        with Load(gw.url) as load:
            load.wait_for(60)
            closed = gw.log().count("control stream closed")
            comp.kill()
            killed = time.monotonic()
            wait_for(lambda: gw.log().count("control stream closed") > closed, timeout=5,
                     what="the gateway to notice the companion died")
            load.wait_for(150, since=killed)  # the companion stays down while the load goes on
            time.sleep(max(0.0, killed + 1.5 - time.monotonic()))

            write_policy(policy_file, load_policy("c-2"))
            restarted = time.monotonic()
            comp.start()
            wait_for(lambda: comp.node_acked("c-2"), timeout=RECONNECT_WITHIN,
                     what="the gateway to reconnect and acknowledge c-2")
            acked = time.monotonic()
            load.wait_for(100, since=acked)

        outcomes = load.outcomes
        assert_only_policy_answers(outcomes, what="companion killed")
        assert set(load.tiers(0)) <= {"c-1", "c-2"}, f"the inline policy came back: {load.tiers(0)}"
        down = load.tiers(killed, restarted)
        assert down and set(down) == {"c-1"}, f"with the companion down the last good snapshot c-1 must hold: {down}"
        after = load.tiers(acked)
        assert after and set(after) == {"c-2"}, f"requests started after the ACK of c-2 must be judged by it: {after}"
        print(f"[companion killed] down {restarted - killed:.1f}s ({sum(down.values())} admitted by c-1), "
              f"reconnected and acked in {acked - restarted:.1f}s")

        status = comp.status()
        nodes = comp.connected_nodes(status)
        assert len(nodes) == 1 and nodes[0].get("streams", 1) == 1 and nodes[0]["acked_revision"] == "c-2", status
        assert_no_crash(gw)
    finally:
        comp.stop()


# === 2. a fake companion: stalls, garbage, oversized, lies ===


@dataclass
class FakeGateway:
    """One gateway (inline policy `fake-inline` + the control cluster) dialling the fake. Each
    test opens a fresh stream with `next_stream` and leaves the policy it pushed in force;
    `in_force` tracks which revision that is."""

    fake: FakeCompanion
    gw: Envoy
    in_force: str = "fake-inline"
    _serial: int = field(default=0)

    def next_stream(self, on_open: Callable[[FakeStream], None] | None, *, reading: bool = True,
                    send_headers: bool = True) -> FakeStream:
        """Ends the current stream (status OK) so that the filter dials again, and returns the new
        stream once it said Hello; `on_open` etc. apply to it."""
        self.fake.on_open, self.fake.reading, self.fake.send_headers = on_open, reading, send_headers
        count = len(self.fake.streams)
        if count:
            self.fake.current.end()
        stream = self.fake.wait_for_stream(count + 1, timeout=RECONNECT_WITHIN)
        hello = stream.messages("hello")[0]
        assert hello.revision == self.in_force, f"the filter says it runs {hello.revision}, not {self.in_force}"
        return stream

    def revision(self, name: str) -> str:
        self._serial += 1
        return f"fake-{self._serial}-{name}"

    def open_with(self, revision: str) -> FakeStream:
        """Waits for the filter's next stream, sends a good snapshot of `revision` as it opens and
        waits for its ACK: the policy in force from then on."""
        stream = self.next_stream(lambda s: s.send(snapshot(revision, load_policy(revision))))
        stream.wait_for_ack(revision)
        self.in_force = revision
        return stream

    def push_good(self, stream: FakeStream, revision: str) -> float:
        """Sends a good snapshot on `stream`, waits for its ACK; returns when the ACK came."""
        stream.send(snapshot(revision, load_policy(revision)))
        stream.wait_for_ack(revision)
        self.in_force = revision
        return time.monotonic()


@pytest.fixture(scope="module")
def fake_gw(module_launch: Callable[..., Envoy]) -> Iterator[FakeGateway]:
    fake = FakeCompanion(on_open=None).start()
    try:
        gw = module_launch({"policy": load_policy("fake-inline"), "control": CONTROL}, name="fake-gw", control_port=fake.port)
        fake.wait_for_stream(1, timeout=RECONNECT_WITHIN)
        yield FakeGateway(fake, gw)
    finally:
        fake.stop()


def test_silent_companion_stalls_nothing(fake_gw: FakeGateway) -> None:
    """A companion that accepts the stream and never answers (no response headers, no message):
    the policy in force keeps being enforced on every request, the filter keeps its one stream
    (no reconnect churn) and keeps reporting usage on it; a snapshot that finally comes on that
    same stream is applied."""
    gw, fake = fake_gw.gw, fake_gw.fake
    before = fake_gw.in_force
    with Load(gw.url) as load:
        stream = fake_gw.next_stream(None, send_headers=False)
        stalled = time.monotonic()
        load.wait_for(200, since=stalled)
        stream.wait_for(lambda m: m.kind == "usage" and m.at > stalled, what="a usage report on the silent stream")
        assert stream.open and fake.current is stream, f"the filter dropped the silent stream ({len(fake.streams)} streams)"

        late = fake_gw.revision("late")
        sent = time.monotonic()
        acked = fake_gw.push_good(stream, late)
        load.wait_for(60, since=acked)

    assert_only_policy_answers(load.outcomes, what="silent companion")
    during = load.tiers(stalled, sent)
    assert during and set(during) == {before}, f"during the stall {before} must stay in force: {during}"
    assert set(load.tiers(acked)) == {late}, load.tiers(acked)
    assert fake.current is stream and stream.open
    assert_no_crash(gw)


def test_deaf_companion_stalls_nothing(fake_gw: FakeGateway) -> None:
    """A companion that stops reading the stream after the first ACK (the filter's ACKs and
    usage reports pile up in HTTP/2 flow control): the last good policy keeps being enforced; a
    snapshot sent meanwhile is still applied, and once the companion reads again its ACK arrives
    on the same stream."""
    gw, fake = fake_gw.gw, fake_gw.fake
    first = fake_gw.revision("deaf")
    with Load(gw.url) as load:
        stream = fake_gw.open_with(first)
        stream.reading.clear()
        deaf = time.monotonic()
        read_while_deaf = len(stream.received)
        load.wait_for(200, since=deaf)

        second = fake_gw.revision("while-deaf")
        stream.send(snapshot(second, load_policy(second)))
        sent = time.monotonic()
        wait_for(lambda: load.tiers(sent)[second] > 0, timeout=10, what=f"{second} to be enforced")
        # At most the one message the reader was already waiting for when it went deaf.
        read_while_deaf = len(stream.received) - read_while_deaf
        stream.reading.set()
        stream.wait_for_ack(second)
        fake_gw.in_force = second
        load.wait_for(60, since=time.monotonic())

    assert_only_policy_answers(load.outcomes, what="deaf companion")
    during = load.tiers(deaf, sent)
    assert during and set(during) == {first}, f"while the companion was deaf {first} must stay in force: {during}"
    assert read_while_deaf <= 1, f"the fake kept reading while deaf: {stream.received}"
    assert fake.current is stream and stream.open, "the filter dropped the stream of a deaf companion"
    assert_no_crash(gw)


UNDECODABLE = [
    pytest.param(b"\xff" * 32, id="invalid-varint"),
    pytest.param(b"\x0f", id="wire-type-7"),
    pytest.param(snapshot("cut", load_policy("cut", quarantined="published"))[:-40], id="truncated"),
    pytest.param(length_delimited(1, length_delimited(1, b"\xff\xfe\xfd")), id="revision-not-utf8"),
]
UNDECODABLE_BYTES = [p.values[0] for p in UNDECODABLE]
# Snapshots whose policy_json is no policy document, and what their NACK must say.
NOT_A_POLICY = {
    "garbage-not-json": ("{not json", "policy_json"),
    "garbage-binary": ("\x00\x01\x02\x7f", "policy_json"),
    "garbage-empty": ("", "policy_json"),
    "garbage-array": ("[1, 2, 3]", "invalid type"),
}


def test_garbage_from_the_companion_changes_nothing(fake_gw: FakeGateway) -> None:
    """Bytes that are no ServerMessage (bad varint, wire type 7, truncated, a string that is not
    UTF-8) are logged as errors and ignored; snapshots whose policy_json is not a policy document
    (not JSON, control bytes, empty, an array) are NACKed with the parse error; an empty message
    is ignored. The last good policy stays in
    force on every request, the stream survives, and the next good snapshot is applied."""
    gw, fake = fake_gw.gw, fake_gw.fake
    good = fake_gw.revision("before-garbage")
    undecodable_before = len(guardrail_log_lines(gw, "undecodable message from the companion"))
    with Load(gw.url) as load:
        stream = fake_gw.open_with(good)
        garbage_from = time.monotonic()
        for raw in UNDECODABLE_BYTES:
            stream.send(raw)
        stream.send(b"")  # an empty ServerMessage: no snapshot, nothing to do
        for revision, (body, _) in NOT_A_POLICY.items():
            stream.send(snapshot(revision, body))
        nacks = {revision: stream.wait_for_nack(revision) for revision in NOT_A_POLICY}
        wait_for(lambda: len(guardrail_log_lines(gw, "undecodable message from the companion"))
                 >= undecodable_before + len(UNDECODABLE_BYTES), timeout=5, what="an error line per undecodable message")
        load.wait_for(150, since=garbage_from)

        after = fake_gw.revision("after-garbage")
        # Until the good snapshot is sent only {good} may decide; once its ACK is back only it. (In
        # between the filter may already enforce it: it publishes to the workers, then ACKs.)
        sent = time.monotonic()
        acked = fake_gw.push_good(stream, after)
        load.wait_for(60, since=acked)

    assert_only_policy_answers(load.outcomes, what="garbage")
    for revision, (_, says) in NOT_A_POLICY.items():
        assert says in nacks[revision].error, f"the NACK of {revision} should say {says!r}: {nacks[revision].error!r}"
    acks = {m.revision for m in stream.messages("ack")}
    assert acks == {good, after}, f"the filter acknowledged garbage: {acks}"
    during = load.tiers(garbage_from, sent)
    assert during and set(during) == {good}, f"{good} must stay in force through the garbage: {during}"
    assert set(load.tiers(acked)) == {after}
    assert fake.current is stream and stream.open, "garbage should not cost the stream"
    errors = guardrail_log_lines(gw, "undecodable message from the companion")[undecodable_before:]
    assert len(errors) == len(UNDECODABLE_BYTES) and all("[error]" in line for line in errors), errors
    assert_no_crash(gw)


def test_oversized_snapshot_is_refused_and_the_stream_comes_back(fake_gw: FakeGateway) -> None:
    """A snapshot one byte over the 8 MiB limit (a valid policy that would publish the quarantined
    app) is refused before it is read (error log line naming its size), the stream is reset and
    dialled again, the Hello on the new stream names the last good revision, and a snapshot of
    exactly 8 MiB is then accepted. Nothing of the oversized snapshot is ever enforced."""
    gw, fake = fake_gw.gw, fake_gw.fake
    good = fake_gw.revision("before-oversized")
    at_limit = fake_gw.revision("8MiB")
    big = padded_snapshot("oversized", load_policy("oversized", quarantined="published"), MAX_MESSAGE_BYTES + 1)
    exact = padded_snapshot(at_limit, load_policy(at_limit), MAX_MESSAGE_BYTES)
    assert len(big) == MAX_MESSAGE_BYTES + 1 and len(exact) == MAX_MESSAGE_BYTES
    with Load(gw.url) as load:
        stream = fake_gw.open_with(good)
        fake.on_open = lambda s: s.send(exact)  # for the stream the filter dials after the reset
        sent = time.monotonic()
        stream.send(big)
        refused = f"{MAX_MESSAGE_BYTES + 1}-byte message from the companion refused (limit {MAX_MESSAGE_BYTES})"
        wait_for(lambda: guardrail_log_lines(gw, refused), timeout=20, what="the filter to refuse the oversized message")
        again = fake.wait_for_stream(stream.index + 1, timeout=RECONNECT_WITHIN)
        hello = again.messages("hello")[0]
        again.wait_for_ack(at_limit, timeout=20)
        acked = time.monotonic()
        fake_gw.in_force = at_limit
        load.wait_for(60, since=acked)

    assert_only_policy_answers(load.outcomes, what="oversized")
    assert hello.revision == good, f"after the reset the filter should still run {good}: {hello.fields}"
    assert not stream.open, "the stream that carried the oversized message should have been reset"
    everything = [m for s in fake.streams for m in s.received]
    assert not [m for m in everything if m.revision == "oversized"], "the oversized snapshot was acknowledged or NACKed"
    assert all("[error]" in line for line in guardrail_log_lines(gw, refused)), guardrail_log_lines(gw, refused)
    # Until the stream that carries the 8 MiB snapshot opened (it is sent as it opens, and may be
    # enforced before its ACK is back), only {good}.
    during = load.tiers(sent, again.opened)
    assert during and set(during) == {good}, f"{good} must stay in force: {during}"
    assert set(load.tiers(acked)) == {at_limit}
    assert_no_crash(gw)


def _lie(revision: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = load_policy(revision, quarantined="published")
    change(doc)
    return doc


# Well-formed snapshots that would publish the quarantined app, each with one error the filter
# must find (and name in its NACK).
LIES: dict[str, tuple[dict[str, Any], str]] = {
    "lie-unknown-tier": (_lie("lie-unknown-tier", lambda d: d["apps"][1].update(tier="platinum")), "apps[1].tier"),
    "lie-unknown-key": (_lie("lie-unknown-key", lambda d: d.update(colour="red")), "colour"),
    "lie-zero-rate": (_lie("lie-zero-rate", lambda d: d["tiers"]["lie-zero-rate"]["rate"].update(requests=0)),
                      "tiers.lie-zero-rate.rate.requests"),
    "lie-cel": (_lie("lie-cel", lambda d: d.update(rules=[{"id": "r1", "effect": "deny", "when": "request.method =="}])),
                "rules[0].when"),
    "lie-key-of-another-app": (_lie("lie-key-of-another-app", lambda d: d["apps"][0]["api_keys"].extend(d["apps"][1]["api_keys"])),
                               "api_keys"),
    "lie-lifecycle": (_lie("lie-lifecycle", lambda d: d["apps"][1].update(lifecycle="live")), "apps[1].lifecycle"),
    "lie-api-version": (_lie("lie-api-version", lambda d: d.update(apiVersion="guardrail/v2")), "apiVersion"),
}


def test_lying_companion_is_nacked_and_the_last_good_policy_stays(fake_gw: FakeGateway) -> None:
    """Well-formed snapshots whose policy does not compile (unknown tier, unknown key, zero rate,
    CEL syntax error, one key for two apps, unknown lifecycle, wrong apiVersion), each of which
    would publish the quarantined app: the filter NACKs every one with an error naming the bad
    field, logs it, never enforces any of it, and applies the next good snapshot."""
    gw, fake = fake_gw.gw, fake_gw.fake
    good = fake_gw.revision("before-lies")
    with Load(gw.url) as load:
        stream = fake_gw.open_with(good)
        lies_from = time.monotonic()
        for revision, (doc, _) in LIES.items():
            stream.send(snapshot(revision, doc))
        nacks = {revision: stream.wait_for_nack(revision) for revision in LIES}
        load.wait_for(150, since=lies_from)
        after = fake_gw.revision("after-lies")
        # Until the good snapshot is sent only {good} may decide; once its ACK is back only it. (In
        # between the filter may already enforce it: it publishes to the workers, then ACKs.)
        sent = time.monotonic()
        acked = fake_gw.push_good(stream, after)
        load.wait_for(60, since=acked)

    assert_only_policy_answers(load.outcomes, what="lies")
    for revision, (_, field_path) in LIES.items():
        error = nacks[revision].error
        assert field_path in error, f"the NACK of {revision} should name {field_path}: {error!r}"
        assert guardrail_log_lines(gw, f"NACK revision `{revision}`"), f"no log line for the NACK of {revision}"
    assert {m.revision for m in stream.messages("ack")} == {good, after}, "a lie was acknowledged"
    during = load.tiers(lies_from, sent)
    assert during and set(during) == {good}, f"{good} must stay in force through the lies: {during}"
    assert set(load.tiers(acked)) == {after}
    assert fake.current is stream and stream.open
    assert_no_crash(gw)


def test_nothing_the_companion_sends_starts_a_line_of_its_own_in_envoys_log(fake_gw: FakeGateway) -> None:
    """A lying companion names revisions with a line break and a forged decision line after it,
    and sends a policy whose unknown field's name does the same: Envoy's log names each on the
    line of its ACK or NACK, escaped (`\\u000a`, `\\u2028`), and no line of the log is the forgery."""
    gw = fake_gw.gw
    forged = '{"kind":"decision","verdict":"allow","app":"forged-by-the-companion"}'
    stream = fake_gw.open_with(fake_gw.revision("before-forgery"))
    refused = fake_gw.revision("refused") + "\n" + forged
    stream.send(snapshot(refused, {**load_policy("fake-refused"), "bogus\n" + forged: 1}))
    nack = stream.wait_for_nack(refused)
    assert "bogus" in nack.error, nack.error
    plain = fake_gw.revision("acked")
    acked = plain + "\u2028\r\n" + forged
    stream.send(snapshot(acked, load_policy(plain)))
    stream.wait_for_ack(acked)
    fake_gw.in_force = acked
    fake_gw.push_good(stream, fake_gw.revision("after-forgery"))

    escaped = forged.replace("\n", "")
    assert guardrail_log_lines(gw, f"NACK revision `{refused.split(chr(10))[0]}\\u000a{escaped}`"), gw.log_tail()
    assert guardrail_log_lines(gw, "bogus\\u000a"), "the NACK's error should quote the field escaped"
    assert guardrail_log_lines(gw, f"ACK revision `{plain}\\u2028\\u000d\\u000a{escaped}`"), gw.log_tail()
    lines = gw.log().splitlines()
    assert not [line for line in lines if "forged-by-the-companion" in line and not line.startswith("[")], \
        "a line of Envoy's log does not come from Envoy"
    assert not [line for line in lines if "\u2028" in line or "\x85" in line]
    assert_no_crash(gw)


def test_compressed_snapshots_are_inflated_within_the_limit(fake_gw: FakeGateway) -> None:
    """The filter's Hello says it inflates snapshots (the companion then sends `policy_zlib`): a
    compressed policy is enforced like a plain one; one that inflates past the 4 MiB a policy may
    have (a 4 KiB "zip bomb"), a truncated one and bytes that are not zlib are NACKed naming
    `policy_zlib`, and the policy in force stays."""
    gw, fake = fake_gw.gw, fake_gw.fake
    good = fake_gw.revision("zlib-before")
    body = json.dumps(load_policy("zlib-cut"), separators=(",", ":")).encode()
    bad = {
        "zlib-bomb": (zlib.compress(b" " * (4 * 1024 * 1024), 9), "policy_zlib: inflates past"),
        "zlib-cut": (zlib.compress(body)[:-20], "policy_zlib:"),
        "zlib-garbage": (b"this is not zlib", "policy_zlib: not zlib data"),
    }
    with Load(gw.url) as load:
        stream = fake_gw.open_with(good)
        hellos = stream.messages("hello")
        assert hellos and hellos[-1].fields.get("accepts_zlib") is True, f"the Hello should accept zlib: {hellos}"
        bad_from = time.monotonic()
        for revision, (data, _) in bad.items():
            stream.send(zlib_snapshot(revision, data))
        nacks = {revision: stream.wait_for_nack(revision) for revision in bad}
        load.wait_for(60, since=bad_from)
        after = fake_gw.revision("zlib-after")
        sent = time.monotonic()
        stream.send(zlib_snapshot(after, zlib.compress(json.dumps(load_policy(after), separators=(",", ":")).encode())))
        stream.wait_for_ack(after)
        fake_gw.in_force = after
        acked = time.monotonic()
        load.wait_for(60, since=acked)

    for revision, (_, error) in bad.items():
        assert error in nacks[revision].error, f"the NACK of {revision} should say {error!r}: {nacks[revision].error!r}"
    assert {m.revision for m in stream.messages("ack")} == {good, after}, "a bad compressed snapshot was acknowledged"
    during = load.tiers(bad_from, sent)
    assert during and set(during) == {good}, f"{good} must stay in force through the bad snapshots: {during}"
    assert set(load.tiers(acked)) == {after}, "the compressed revision is enforced"
    assert fake.current is stream and stream.open
    assert_no_crash(gw)


# === 3. compare-and-swap contention at its worst ===

CAS_QUOTA = 100
CAS_CLIENTS = 96
CAS_REQUESTS = 960
CAS_RATE = Kind("cas-rate", {"x-api-key": KEYS["cas-rate"]}, ((200, None), (429, "quota-exceeded")), app="cas-rate")
CAS_BUDGET = Kind("cas-budget", {"x-api-key": KEYS["cas-budget"]}, ((200, None), (429, "budget-exhausted")), app="cas-budget")
CAS_KINDS = (CAS_RATE, CAS_BUDGET, QUARANTINED, CAS_RATE, CAS_BUDGET, UNKNOWN)


def test_cas_contention_at_its_worst_admits_exactly_the_quota(launch: Callable[..., Envoy]) -> None:
    """96 clients released at once, on both workers, on one app with a bucket of 100 (no refill
    within the test) and one with a daily budget of 100, mixed with a quarantined and an unknown
    key: exactly 100 of each app are admitted, the rest get 429 with the SPEC's problem type (never
    the `quota-store` fallback of an exhausted compare-and-swap), nothing else."""
    doc = load_policy("cas", apps=[app("cas-rate", tier="bucket-100", keys=[KEYS["cas-rate"]]),
                                   app("cas-budget", tier="budget-100", keys=[KEYS["cas-budget"]])],
                      tiers={"bucket-100": tier(CAS_QUOTA, "1d", burst=CAS_QUOTA),
                             "budget-100": tier(1_000_000, "7d", burst=1_000_000, daily_budget=CAS_QUOTA)})
    gw = launch({"policy": doc}, name="cas")
    before, cx_before = gw.stats(), gw.worker_connections()
    with Load(gw.url, CAS_KINDS, clients=CAS_CLIENTS, total=CAS_REQUESTS, barrier=True) as load:
        load.join()
    cx_after = gw.worker_connections()

    outcomes = load.outcomes
    assert len(outcomes) == CAS_REQUESTS
    assert_only_policy_answers(outcomes, CAS_KINDS, what="CAS contention")
    admitted = Counter(o.kind for o in outcomes if o.status == 200)
    assert admitted["cas-rate"] == CAS_QUOTA, f"bucket of {CAS_QUOTA}: {summary(outcomes)}"
    assert admitted["cas-budget"] == CAS_QUOTA, f"daily budget of {CAS_QUOTA}: {summary(outcomes)}"
    rules = Counter((o.kind, o.rule) for o in outcomes if o.status == 429)
    assert not [r for r in rules if r[1] == "quota-store"], f"compare-and-swap gave up: {rules}"
    busy = [w for w in cx_after if cx_after[w] - cx_before.get(w, 0) > 0]
    assert len(busy) >= 2, f"all connections landed on one worker ({cx_before} → {cx_after}); the test proves nothing"
    refused = Counter(o.kind for o in outcomes if o.status == 429)
    expected = {
        "guardrail.allowed": admitted["cas-rate"] + admitted["cas-budget"],
        "guardrail.denied.quota-exceeded": refused["cas-rate"],
        "guardrail.denied.budget-exhausted": refused["cas-budget"],
        "guardrail.throttled": refused["cas-rate"] + refused["cas-budget"],
    }
    assert settled_deltas(gw, before, expected)[0] == expected
    print(f"[CAS contention] 429 rules: {dict(rules)}; connections per worker: "
          f"{ {w: cx_after[w] - cx_before.get(w, 0) for w in cx_after} }")
    assert_no_crash(gw)


# === 4. the wall clock stepping back and forth ===

# An LD_PRELOAD shim for Envoy: CLOCK_REALTIME (and gettimeofday) shifted by the signed 64-bit
# nanoseconds at the start of $GUARDRAIL_CLOCK_OFFSET_FILE, read through a shared mapping on every
# call, so a test steps the clock of a running Envoy by writing 8 bytes. The monotonic clocks
# (Envoy's timers) are untouched. It calls neither malloc nor a failing dlsym, which is what makes
# libfaketime hang this Envoy (see the module docstring).
CLOCK_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_fn)(clockid_t, struct timespec *);
static clock_fn real_clock;
static const volatile int64_t *offset_ns;
static int ready;

static void setup(void) {
  if (__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) return;
  const char *path = getenv("GUARDRAIL_CLOCK_OFFSET_FILE");
  if (path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      void *p = mmap(0, 8, PROT_READ, MAP_SHARED, fd, 0);
      close(fd);
      if (p != MAP_FAILED) offset_ns = p;
    }
  }
  __atomic_store_n(&real_clock, (clock_fn)dlsym(RTLD_NEXT, "clock_gettime"), __ATOMIC_RELEASE);
  __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void init(void) { setup(); }

int clock_gettime(clockid_t clock, struct timespec *ts) {
  clock_fn real = __atomic_load_n(&real_clock, __ATOMIC_ACQUIRE);
  int rc = real ? real(clock, ts) : (int)syscall(SYS_clock_gettime, clock, ts);
  if (rc != 0 || (clock != CLOCK_REALTIME && clock != CLOCK_REALTIME_COARSE)) return rc;
  setup();
  int64_t ns = (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec + (offset_ns ? *offset_ns : 0);
  ts->tv_sec = ns / 1000000000;
  ts->tv_nsec = ns % 1000000000;
  return 0;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
  struct timespec ts;
  int rc = clock_gettime(CLOCK_REALTIME, &ts);
  if (rc == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
  (void)tz;
  return rc;
}
"""

SECS_PER_DAY = 86_400


class SteppedClock:
    """The wall clock of one Envoy: real time plus an offset the test changes at any moment."""

    def __init__(self, shim: Path, offset_file: Path) -> None:
        self.shim = shim
        self.path = offset_file
        self.path.write_bytes(struct.pack("<q", 0))
        self.offset = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.shim), "GUARDRAIL_CLOCK_OFFSET_FILE": str(self.path)}

    def set(self, offset_seconds: float) -> None:
        """Steps the clock to real time + `offset_seconds` (forward or back) at once."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<q", int(offset_seconds * 1e9)), 0)
        finally:
            os.close(fd)
        self.offset = offset_seconds

    def now(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def clock_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the clock shim; Rust on Linux needs one: apt-get install gcc")
    out = tmp_path_factory.mktemp("clock-shim")
    (out / "clock_shim.c").write_text(CLOCK_SHIM_C)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out / "clock_shim.so"), str(out / "clock_shim.c"), "-ldl"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"cannot build the clock shim:\n{proc.stderr}"
    return out / "clock_shim.so"


JWT_KEY = SigningKey.ed25519("faults-clock")
JWT_ISSUER = "https://id.faults.e2e.example"
JWT_AUDIENCE = "guardrail-faults"


def clock_policy() -> dict[str, Any]:
    return load_policy(
        "clock",
        jwt=[jwt_issuer(JWT_ISSUER, [JWT_AUDIENCE], [JWT_KEY.jwk()], clock_skew_seconds=30)],
        tiers={
            "probe": tier(1_000_000, "7d", burst=1_000_000, daily_budget=1_000_000_000),
            "ten-an-hour": tier(10, "1h"),  # one token every 6 minutes, a bucket of 10
            "steady": tier(600, "1m", burst=100),
            "three-a-day": tier(1000, "1d", daily_budget=3),  # a bucket a day deep: only the budget limits
        },
        apps=[
            app("clock-probe", tier="probe", keys=[KEYS["clock-probe"]]),
            app("clock-tokens", tier="ten-an-hour", keys=[KEYS["clock-tokens"]]),
            app("clock-steady", tier="steady", keys=[KEYS["clock-steady"]]),
            app("clock-daily", tier="three-a-day", keys=[KEYS["clock-daily"]]),
            app("clock-jwt", tier="clock"),
        ],
    )


@dataclass
class ClockGateway:
    gw: Envoy
    clock: SteppedClock

    def step(self, offset_seconds: float) -> None:
        """Steps the gateway's clock and checks that the filter sees it (within 5 s)."""
        self.clock.set(offset_seconds)
        seen = self.filter_time_of_day()
        want = self.clock.now() % SECS_PER_DAY
        gap = min(abs(seen - want), SECS_PER_DAY - abs(seen - want))
        assert gap <= 5, f"the filter's clock is at {seen:.0f}s of its day, not {want:.0f}s: the step did not reach it"

    def filter_time_of_day(self) -> float:
        """Seconds since UTC midnight on the filter's clock, from the daily budget's reset time
        (`RateLimit: .., "daily";r=..;t=<seconds to the next UTC midnight>`)."""
        r = responds_with(request(self.gw.url, "/probe", headers={"x-api-key": KEYS["clock-probe"]}), 200)
        m = re.search(r'"daily";r=\d+;t=(\d+)', r.header("ratelimit") or "")
        assert m, f"no daily item in RateLimit: {r}"
        return (SECS_PER_DAY - int(m.group(1))) % SECS_PER_DAY


@pytest.fixture(scope="module")
def clock_module_gw(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Path, clock_shim: Path) -> Iterator[ClockGateway]:
    tmp = tmp_path_factory.mktemp("clock")
    clock = SteppedClock(clock_shim, tmp / "clock-offset")
    gw = Envoy(bootstrap({"policy": clock_policy()}, upstream_port=upstream.server_port, wasm=wasm), tmp, name="clock", env=clock.env)
    with gw:
        yield ClockGateway(gw, clock)


@pytest.fixture
def clock_gw(clock_module_gw: ClockGateway) -> Iterator[ClockGateway]:
    """The clock gateway at real time; set back to real time after the test."""
    clock_module_gw.step(0)
    yield clock_module_gw
    clock_module_gw.clock.set(0)


def answers(gw: Envoy, key: str, n: int, headers: Mapping[str, str] | None = None) -> tuple[Counter, list[Response]]:
    """`n` requests one after the other: ({"200": a, "429 quota-exceeded": b, ..}, responses)."""
    responses = [request(gw.url, "/clock", headers=headers or {"x-api-key": key}) for _ in range(n)]
    counts: Counter = Counter()
    for r in responses:
        code = r.json().get("type", "").removeprefix("urn:guardrail:problem:") if r.status != 200 else ""
        counts[f"{r.status} {code}".strip()] += 1
    return counts, responses


def assert_phases(phases: list[tuple[str, Counter, Counter]]) -> None:
    table = "\n".join(f"  {'ok  ' if want == got else 'FAIL'} {label}: expected {dict(want)}, got {dict(got)}"
                      for label, want, got in phases)
    print(f"\n{table}")
    assert all(want == got for _, want, got in phases), f"admissions per clock step:\n{table}"


def test_clock_stepping_back_returns_no_tokens_and_forward_refills_as_the_policy_says(clock_gw: ClockGateway) -> None:
    """A bucket of 10 refilling one token per 6 minutes, drained at the real time: an hour back
    admits nothing more; 6 minutes forward of real time, exactly one; an hour forward, exactly the
    10 the bucket holds. The load is judged by the same clock and never fails."""
    gw, key = clock_gw.gw, KEYS["clock-tokens"]
    phases = []
    with Load(gw.url) as load:
        got, _ = answers(gw, key, 12)
        phases.append(("drained at the real time", Counter({"200": 10, "429 quota-exceeded": 2}), got))
        clock_gw.step(-3600)
        got, refused = answers(gw, key, 10)
        phases.append(("an hour back", Counter({"429 quota-exceeded": 10}), got))
        clock_gw.step(360)
        got, _ = answers(gw, key, 5)
        phases.append(("6 minutes past the real time: one token", Counter({"200": 1, "429 quota-exceeded": 4}), got))
        clock_gw.step(3600 + 360)
        got, _ = answers(gw, key, 15)
        phases.append(("an hour later: the whole bucket", Counter({"200": 10, "429 quota-exceeded": 5}), got))
        load.wait_for(100)
    assert_phases(phases)
    for r in refused:
        responds_with(r, 429, "quota-exceeded", app="clock-tokens")
        assert int(r.header("retry-after") or "0") > 0, r
    assert_only_policy_answers(load.outcomes, what="clock: tokens")
    assert_no_crash(gw)


def test_clock_stepping_back_does_not_lock_out_an_app_within_its_quota(clock_gw: ClockGateway) -> None:
    """An app that used 5 of its bucket of 100 (600 a minute) at the real time, then the clock
    steps back an hour (an NTP correction): the policy still admits it, at the latest once a
    second of its rate (10 tokens) has passed. No token comes back from the step either way."""
    gw, key = clock_gw.gw, KEYS["clock-steady"]
    with Load(gw.url) as load:
        got, _ = answers(gw, key, 5)
        assert got == Counter({"200": 5}), got
        clock_gw.step(-3600)
        time.sleep(1.0)  # 10 tokens' worth of the policy's rate (600 a minute) on any reading of the clock
        r = request(gw.url, "/clock", headers={"x-api-key": key})
        load.wait_for(60)
    assert_only_policy_answers(load.outcomes, what="clock: steady")
    assert r.status == 200, (f"after the clock stepped back an hour, an app that used 5 of 100 tokens is refused "
                             f"(Retry-After: {r.header('retry-after')}s): a step back locks an app out for the "
                             f"length of the step:\n{r}")


def test_daily_budget_resets_only_on_a_real_day_change_forward(clock_gw: ClockGateway) -> None:
    """A daily budget of 3 (and a bucket a day deep, so only the budget limits): spent two minutes
    before a UTC midnight (Retry-After: those two minutes); an hour back, the same day: still
    spent; two minutes past midnight: a new day, 3 more; back before midnight: the old day, whose
    3 are spent; forward again: the new day's 3 are spent too."""
    gw, key = clock_gw.gw, KEYS["clock-daily"]
    now = time.time()
    midnight = round(now / SECS_PER_DAY) * SECS_PER_DAY  # the nearest UTC midnight, so |offset| <= 12 h
    before, after = midnight - 120 - now, midnight + 120 - now
    spent = Counter({"429 budget-exhausted": 3})
    phases = []
    with Load(gw.url) as load:
        clock_gw.step(before)
        got, responses = answers(gw, key, 6)
        phases.append(("2 minutes before midnight", Counter({"200": 3, "429 budget-exhausted": 3}), got))
        retry_before_midnight = [int(r.header("retry-after") or "0") for r in responses if r.status == 429]
        clock_gw.step(before - 3600)
        phases.append(("an hour back, the same day", spent, answers(gw, key, 3)[0]))
        clock_gw.step(after)
        phases.append(("2 minutes past midnight: a new day", Counter({"200": 3, "429 budget-exhausted": 3}), answers(gw, key, 6)[0]))
        clock_gw.step(before)
        phases.append(("back before midnight: the old day, spent", spent, answers(gw, key, 3)[0]))
        clock_gw.step(after)
        phases.append(("past midnight again: the new day, spent", spent, answers(gw, key, 3)[0]))
        load.wait_for(100)
    assert_only_policy_answers(load.outcomes, what="clock: daily budget")
    assert all(0 < s <= 130 for s in retry_before_midnight), (
        f"Retry-After two minutes before midnight should be about 120 s: {retry_before_midnight}")
    assert_phases(phases)


def test_jwt_exp_and_nbf_are_judged_by_the_stepped_clock(clock_gw: ClockGateway) -> None:
    """A token valid for 10 minutes is admitted, refused once the clock steps 20 minutes ahead
    (also by workers that cached it as verified), admitted again when the clock comes back; a
    token valid from 30 minutes on is refused now and admitted once the clock gets there."""
    gw = clock_gw.gw
    now = int(time.time())
    current = JWT_KEY.sign(claims(iss=JWT_ISSUER, aud=JWT_AUDIENCE, azp="clock-jwt", now=now, ttl=600))
    future = JWT_KEY.sign(claims(iss=JWT_ISSUER, aud=JWT_AUDIENCE, azp="clock-jwt", now=now + 1800, ttl=600))
    bearer = {"authorization": f"Bearer {current}"}
    later = {"authorization": f"Bearer {future}"}
    phases = []
    with Load(gw.url) as load:
        phases.append(("valid token at the real time", Counter({"200": 8}), answers(gw, "", 8, bearer)[0]))
        phases.append(("not-yet-valid token at the real time", Counter({"401 unauthenticated": 8}), answers(gw, "", 8, later)[0]))
        clock_gw.step(1200)
        phases.append(("valid token, 20 minutes later: expired", Counter({"401 unauthenticated": 8}), answers(gw, "", 8, bearer)[0]))
        clock_gw.step(2000)
        phases.append(("future token, 33 minutes later: valid", Counter({"200": 8}), answers(gw, "", 8, later)[0]))
        clock_gw.step(0)
        phases.append(("valid token, back at the real time", Counter({"200": 8}), answers(gw, "", 8, bearer)[0]))
        phases.append(("future token, back at the real time", Counter({"401 unauthenticated": 8}), answers(gw, "", 8, later)[0]))
        load.wait_for(100)
    assert_only_policy_answers(load.outcomes, what="clock: JWT")
    assert_phases(phases)
    assert_no_crash(gw)
