"""The real companion (`guardrail serve`) and the `guardrail` CLI, for the end-to-end tests.

    comp = Companion(policy_file, tmp).start()          # waits for "serving policy revision"
    write_policy(policy_file, {**doc, "revision": "2"})  # atomic: temp file + os.replace
    wait_for(lambda: comp.node_acked("2"), timeout=10)
    comp.status()                                        # `guardrail status --json`, as a dict
    comp.kill()                                          # SIGKILL, like a crash
    comp.start()                                         # same port again

Every process dies with the test runner (`setpriv --pdeathsig KILL`, as in harness.py) and
`stop()` is idempotent, so fixtures can call it in their finalizers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from harness import _PDEATHSIG, can_connect, free_port, require_artifact, stop_process_group, wait_for

CLI_TIMEOUT = 20.0


def guardrail(*args: str, timeout: float = CLI_TIMEOUT, check: bool = False) -> subprocess.CompletedProcess:
    """Runs the `guardrail` CLI with a timeout (text output captured)."""
    cmd = [str(require_artifact("GUARDRAIL_BIN")), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def write_policy(path: Path, doc: Mapping[str, Any] | str) -> None:
    """Replaces the policy file atomically (a temporary file in the same directory, then
    `os.replace`), as an editor or a config-management tool would."""
    path = Path(path)
    text = doc if isinstance(doc, str) else json.dumps(doc, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keygen(out: Path, kid: str) -> dict[str, Any]:
    """`guardrail keygen --out OUT --kid KID`: writes the private JWK, returns the public one."""
    proc = guardrail("keygen", "--out", str(out), "--kid", kid, check=True)
    jwk = json.loads(proc.stdout.strip().splitlines()[0])
    assert "d" not in jwk, f"keygen printed a private key: {jwk}"
    return jwk


def mint(key: Path, app: str, *scopes: str, ttl: str | None = None, policy: Path | None = None,
         issuer: str | None = None, audience: str | None = None) -> str:
    """`guardrail mint`: a JIT token (raises with the CLI's output if it refuses). Without
    `policy`, give `issuer` and `audience`."""
    args = ["mint", "--key", str(key), "--app", app]
    for scope in scopes:
        args += ["--scope", scope]
    for flag, value in (("--ttl", ttl), ("--policy", policy), ("--issuer", issuer), ("--audience", audience)):
        if value:
            args += [flag, str(value)]
    token = guardrail(*args, check=True).stdout.strip()
    assert token.count(".") == 2, f"mint did not print a compact JWS: {token!r}"
    return token


SERVING = re.compile(r"serving policy revision (\S+) from .* on (\S+):(\d+)")


@dataclass(eq=False)
class Companion:
    """A `guardrail serve --policy POLICY --listen 127.0.0.1:PORT` process. Port 0 (the default)
    lets the companion pick one on the first start; later starts reuse it."""

    policy: Path
    workdir: Path
    name: str = "companion"
    port: int = 0
    args: list[str] = field(default_factory=list)  # more `serve` flags (--tls-cert …)
    status_args: list[str] = field(default_factory=list)  # more `status` flags (--tls-ca …)
    proc: subprocess.Popen | None = None
    starts: int = 0
    _log_files: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.starts}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "Companion":
        assert self.proc is None, "already running"
        self.starts += 1
        log = open(self.log_path, "wb")
        self._log_files.append(log)
        cmd = [*_PDEATHSIG, str(require_artifact("GUARDRAIL_BIN")), "serve", "--policy", str(self.policy),
               "--listen", f"127.0.0.1:{self.port}", *self.args]
        # In its work directory: the default store (`sqlite:guardrail.db`) is the companion's own.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)

        def serving() -> re.Match | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return SERVING.search(self.log())

        try:
            m = wait_for(serving, timeout=timeout, what=f"{self.name} to log 'serving policy revision'")
        except BaseException:
            self.stop()
            raise
        port = int(m.group(3))
        assert self.port in (0, port), f"{self.name} listens on {port}, not {self.port}"
        self.port = port
        wait_for(lambda: can_connect(port), timeout=5, what=f"{self.name} to accept on {port}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "".join((self.workdir / f"{self.name}-{i}.log").read_text(errors="replace")
                       for i in range(1, self.starts + 1) if (self.workdir / f"{self.name}-{i}.log").exists())

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.log()), timeout=timeout, what=f"{self.name} log /{pattern}/")

    def _signal(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process_group(proc, sig)
        for f in self._log_files:
            f.close()
        self._log_files.clear()

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers. Idempotent."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the companion dies without closing its streams."""
        self._signal(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- status ---

    def status(self) -> dict[str, Any]:
        """`guardrail status --server 127.0.0.1:PORT --json` (with `status_args`)."""
        proc = guardrail("status", "--server", self.address, "--json", *self.status_args, timeout=15)
        assert proc.returncode == 0, f"guardrail status exited {proc.returncode}: {proc.stderr}"
        return json.loads(proc.stdout)

    def connected_nodes(self, status: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        status = self.status() if status is None else status
        return [n for n in status.get("nodes", []) if n.get("connected")]

    def node_acked(self, revision: str, count: int = 1) -> dict[str, Any] | None:
        """The status once exactly `count` nodes are connected and all acknowledged `revision`."""
        status = self.status()
        nodes = self.connected_nodes(status)
        if len(nodes) == count and all(n.get("acked_revision") == revision for n in nodes):
            return status
        return None


@contextmanager
def with_console_and_envoy(policy: Path, workdir: Path, launch: Callable[..., Any], revision: str,
                           args: list[str] | None = None) -> Iterator[tuple[Companion, Any, str]]:
    """A companion serving `policy` with its HTTP port (`--http` on a free loopback port, plus
    `args`) and one Envoy of `launch` connected to it, once the Envoy acknowledged `revision`:
    yields the companion, the Envoy and the HTTP port's base URL; stops the companion after."""
    http = f"127.0.0.1:{free_port()}"
    comp = Companion(policy, workdir, args=["--http", http, *(args or [])]).start()
    try:
        gw = launch({"control": {"cluster": "guardrail_control"}}, control_port=comp.port)
        wait_for(lambda: comp.node_acked(revision), timeout=15, what=f"Envoy to acknowledge {revision}")
        yield comp, gw, f"http://{http}"
    finally:
        comp.stop()
