"""`guardrail serve --candidate`: the companion half of running a candidate in shadow.

The real companion, no Envoy yet (the filter does not decide with the candidate so far): a candidate
with a syntax error is refused at start with its `file:line` error (exit 1); a later invalid edit
keeps the last good candidate (logged, and shown by `status`); deleting the file stops shadowing.
"""

from __future__ import annotations

from pathlib import Path

from companion import Companion, guardrail
from harness import wait_for

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


def test_a_broken_candidate_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "candidate.yaml"
    bad.write_text(BROKEN)
    run = guardrail("serve", "--policy", str(POLICY), "--candidate", str(bad), "--listen", "127.0.0.1:0",
                    "--store", f"sqlite:{tmp_path / 's.db'}")
    assert run.returncode == 1, run
    assert f"{bad}:4:" in run.stderr, run.stderr


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
