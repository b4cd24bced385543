"""Self-service requests from the command line (issue 22): `guardrail request`, `requests`,
`approve` and `reject` against the real companion (`guardrail serve --http …`, SQLite store in its
work directory). The tests drive only the CLI; the policy revision an approval pushes is checked with
`guardrail status`, the trail with `guardrail audit`.

Every run checks that no API key or token the CLI was given appears in what it printed.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from companion import Companion, guardrail, keygen, write_policy
from harness import free_port, hash_key, wait_for
from policies import app, jwt_issuer, policy, tier

KEYS = {
    "claims-bot": "k-req-claims-0001",
    "pos": "k-req-pos-0001",
    "ledger": "k-req-ledger-0001",
}
TOKENS = {
    "alice": "t-approver-alice-0001",
    "bob": "t-approver-bob-0001",
    "carol@e2e.example": "t-approver-carol-0001",  # owns claims-bot
    "mallory": "t-not-an-approver-0001",  # listed nowhere
    "console": "t-console-token-000001",  # serve --http-token-file
}
SECRETS = [*KEYS.values(), *TOKENS.values()]
ID = re.compile(r"^req-[0-9a-f]{12}$")
TODAY = datetime.datetime.now(datetime.timezone.utc).date()


def day(offset: int) -> str:
    return (TODAY + datetime.timedelta(days=offset)).isoformat()


def make_policy(jwk: dict[str, Any]) -> dict[str, Any]:
    regulated = ("public", "internal", "regulated")
    return policy(
        revision="req-1",
        jwt=[jwt_issuer("https://companion.e2e.example", ["guardrail-e2e"], [jwk])],  # the vault needs JIT
        settings={
            "approvers": [{"id": who, "token": hash_key(TOKENS[who])} for who in ("alice", "bob", "carol@e2e.example")],
            "max_request_duration": "30d",
        },
        tiers={"standard": tier(600, "1m", daily_budget=10_000)},
        apps=[
            app("claims-bot", keys=[KEYS["claims-bot"]], data_classes=regulated, owner="carol@e2e.example",
                review_by=day(5)),
            app("pos", keys=[KEYS["pos"]]),
            app("ledger", keys=[KEYS["ledger"]]),
        ],
        datasets=[
            {"id": "vault", "classification": "regulated", "allowed_regions": ["eu-west-1"],
             "routes": [{"path_prefix": "/vault"}], "approval": "required"},
        ],
    )


class Setup:
    def __init__(self, comp: Companion, server: str, files: dict[str, Path]):
        self.comp, self.server, self.files = comp, server, files


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("requests-cli")
    files = {}
    for name, secret in {**KEYS, **TOKENS}.items():
        files[name] = tmp / f"{name}.secret"
        files[name].write_text(f"  {secret}\n")  # surrounding whitespace is trimmed
        files[name].chmod(0o600)
    policy_file = tmp / "policy.json"
    write_policy(policy_file, make_policy(keygen(tmp / "issuer.jwk", "companion-1")))
    http = f"127.0.0.1:{free_port()}"
    comp = Companion(policy_file, tmp / "companion", args=["--http", http, "--http-token-file", str(files["console"])])
    comp.start()
    try:
        yield Setup(comp, f"http://{http}", files)
    finally:
        comp.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = guardrail(*args)
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, f"`guardrail {args[0]}` printed a secret:\n{proc.stdout}{proc.stderr}"
    return proc


def file_request(setup: Setup, kind: str, app_id: str, *flags: str, until: str | None = None,
                 reason: str = "e2e", key: str | None = None) -> subprocess.CompletedProcess:
    return cli("request", kind, "--server", setup.server, "--app", app_id,
               "--api-key-file", str(setup.files[key or app_id]), "--until", until or day(10), "--reason", reason, *flags)


def filed(proc: subprocess.CompletedProcess) -> str:
    """The id a successful `guardrail request` printed as its last line."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1]
    assert ID.match(last), f"the last line is not a request id: {proc.stdout!r}"
    return last


def as_approver(setup: Setup, verb: str, request_id: str, who: str, *flags: str) -> subprocess.CompletedProcess:
    return cli(verb, request_id, "--server", setup.server, "--token-file", str(setup.files[who]), *flags)


def listed(setup: Setup, *flags: str, who: str = "alice") -> list[dict[str, Any]]:
    proc = cli("requests", "--server", setup.server, "--token-file", str(setup.files[who]), "--json", *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["requests"]


def refused(proc: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, not {code}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr}"


def test_a_builder_files_each_kind_and_approvers_decide(setup: Setup) -> None:
    quota = file_request(setup, "quota", "claims-bot", "--rate", "3000/1m", "--daily-budget", "50000",
                         reason="month-end batch")
    quota_id = filed(quota)
    assert f"request {quota_id} filed, pending" in quota.stdout
    assert f"rate 600/1m → 3000/1m, daily budget 10000 → 50000 until {day(11)}T00:00:00Z" in quota.stdout
    assert re.search(r"risk\s+(green|amber|red)", quota.stdout), quota.stdout

    connector_id = filed(file_request(setup, "connector", "claims-bot", "--connector", "partner-api"))
    access = file_request(setup, "access", "claims-bot", "--dataset", "vault", "--json")
    assert access.returncode == 0, access.stderr
    access_request = json.loads(access.stdout)
    assert (access_request["kind"], access_request["dataset"], access_request["status"]) == ("access", "vault", "pending")
    review_id = filed(file_request(setup, "review", "claims-bot", until=day(25)))

    # The approver's list, newest first, as a table and as JSON.
    table = cli("requests", "--server", setup.server, "--token-file", str(setup.files["alice"]), "--status", "pending")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ID", "APP", "KIND", "STATUS", "UNTIL", "RISK", "CHANGE"]
    ids = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    # Newest first; the companion keeps filing times in seconds, so within one second by id.
    assert sorted(ids) == sorted([review_id, access_request["id"], connector_id, quota_id]), table.stdout
    filed_at = {r["id"]: r["filed_at"] for r in listed(setup, "--status", "pending")}
    assert [filed_at[i] for i in ids] == sorted(filed_at[i] for i in ids)[::-1], table.stdout
    assert "may reach connector `partner-api`" in table.stdout
    # The app sees its own, with its key.
    own = cli("requests", "--server", setup.server, "--app", "claims-bot", "--api-key-file", str(setup.files["claims-bot"]))
    assert own.returncode == 0 and quota_id in own.stdout, own.stdout + own.stderr

    # Approve: the revision pushed is the one the companion serves.
    approved = as_approver(setup, "approve", quota_id, "alice", "--reason", "batch agreed")
    assert approved.returncode == 0, approved.stderr
    m = re.search(r"request (\S+) approved: revision (\S+) pushed to the fleet", approved.stdout)
    assert m and m.group(1) == quota_id, approved.stdout
    revision = m.group(2)
    assert revision.startswith("req-1+req."), revision
    assert "approved by alice" in approved.stdout
    wait_for(lambda: setup.comp.status()["revision"] == revision, timeout=10, what=f"the companion to serve {revision}")

    # Reject with a reason; the builder reads it.
    rejected = as_approver(setup, "reject", connector_id, "bob", "--reason", "use the approved partner gateway", "--json")
    assert rejected.returncode == 0, rejected.stderr
    decided = json.loads(rejected.stdout)
    assert (decided["status"], decided["decided_by"], decided["decision_reason"]) == (
        "rejected", "bob", "use the approved partner gateway")
    assert [r["id"] for r in listed(setup, "--status", "rejected", "--app", "claims-bot")] == [connector_id]

    # The owner of the app cannot approve it; another approver can.
    refused(as_approver(setup, "approve", review_id, "carol@e2e.example"), "refused (403 own-request)",
            "carol@e2e.example owns app claims-bot")
    assert as_approver(setup, "approve", review_id, "bob").returncode == 0

    # Approving twice: the second is told who decided.
    refused(as_approver(setup, "approve", quota_id, "bob"), "refused (409 already-decided)",
            f"request {quota_id} is approved by alice at ")

    # The trail has the filing and the decisions.
    audit = json.loads(guardrail("audit", "--server", setup.comp.address, "--json", check=True).stdout)
    kinds = {(e["kind"], e["id"]) for e in audit["events"]}
    assert {("request-filed", quota_id), ("request-approved", quota_id), ("request-rejected", connector_id)} <= kinds


def test_an_app_is_refused_with_a_wrong_or_unknown_key(setup: Setup) -> None:
    hint = "hint: --app must be the app's id and --api-key-file hold one of its keys"
    refused(file_request(setup, "quota", "ghost", "--rate", "3000/1m", key="pos"),
            "refused (401 unauthenticated): unknown app id or API key", hint)
    refused(file_request(setup, "quota", "pos", "--rate", "3000/1m", key="ledger"),
            "refused (401 unauthenticated): unknown app id or API key", hint)


@pytest.mark.parametrize("kind, flags, until, message", [
    ("access", ["--dataset", "nope"], day(10), "refused (422 invalid-request): dataset `nope`: not in the policy"),
    ("quota", ["--rate", "3000/1m"], "2020-01-01", "refused (422 invalid-request): until 2020-01-02T00:00:00Z: in the past"),
    ("quota", ["--rate", "3000/1m"], day(45), "beyond the policy's maximum of 30 days ahead (settings.max_request_duration)"),
    ("quota", ["--rate", "5/1m"], day(10), "rate 5/1m: app `pos` already has 600/1m — ask for more than it has"),
    ("quota", ["--rate", "lots"], day(10), "rate lots: no `/`"),
    ("connector", ["--connector", "upstream"], day(10), "connector `upstream`: app `pos` may reach it already"),
])
def test_the_companion_refuses_a_bad_request_naming_the_field(setup: Setup, kind: str, flags: list[str], until: str,
                                                              message: str) -> None:
    refused(file_request(setup, kind, "pos", *flags, until=until), message)


def test_a_request_filed_twice_is_refused(setup: Setup) -> None:
    first = filed(file_request(setup, "quota", "ledger", "--daily-budget", "20000"))
    refused(file_request(setup, "quota", "ledger", "--daily-budget", "20000"),
            f"refused (409 duplicate-request): request {first} asks for the same and is pending")


def test_only_approvers_decide(setup: Setup) -> None:
    request_id = filed(file_request(setup, "quota", "ledger", "--rate", "1200/1m"))
    refused(as_approver(setup, "approve", request_id, "mallory"),
            "refused (401 unauthenticated): the bearer token is no approver's",
            "hint: --token-file must hold an approver's token")
    # The console's token lists requests but decides none.
    assert request_id in [r["id"] for r in listed(setup, who="console")]
    refused(as_approver(setup, "approve", request_id, "console"), "refused (403 not-an-approver)")
    refused(as_approver(setup, "reject", "req-000000000000", "alice", "--reason", "no"),
            "refused (404 unknown-request): no request `req-000000000000`")
    assert [r["status"] for r in listed(setup, "--app", "ledger") if r["id"] == request_id] == ["pending"]


def test_command_line_mistakes_are_usage_errors(setup: Setup) -> None:
    request_id = filed(file_request(setup, "quota", "pos", "--rate", "900/1m"))
    refused(as_approver(setup, "reject", request_id, "alice"), "--reason <TEXT>", code=2)
    refused(file_request(setup, "quota", "pos"), "a quota request needs --rate REQUESTS/DURATION and/or --daily-budget N",
            code=2)
    refused(file_request(setup, "review", "pos", "--dataset", "vault"), "--dataset is not part of a review request", code=2)
    refused(file_request(setup, "refund", "pos"), "invalid value 'refund'", code=2)
    refused(as_approver(setup, "approve", "../../token", "alice"), "ID `../../token`: not a request id", code=2)
    https = setup.server.replace("http://", "https://")
    refused(cli("requests", "--server", https, "--token-file", str(setup.files["alice"])),
            "https:// needs --tls-ca FILE", code=2)
    assert [r["status"] for r in listed(setup, "--app", "pos") if r["id"] == request_id] == ["pending"]


def test_a_companion_that_is_not_there_is_named(setup: Setup) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    proc = cli("request", "quota", "--server", server, "--app", "pos", "--api-key-file", str(setup.files["pos"]),
               "--rate", "3000/1m", "--until", day(10), "--reason", "e2e")
    refused(proc, f"cannot reach the companion at {server}: connection refused")
    refused(cli("requests", "--server", server, "--token-file", str(setup.files["alice"])),
            f"cannot reach the companion at {server}: connection refused")
    # The gRPC port is not the HTTP one: said so.
    refused(cli("requests", "--server", f"http://{setup.comp.address}", "--token-file", str(setup.files["alice"])),
            f"cannot reach the companion at http://{setup.comp.address}", "--http address")
