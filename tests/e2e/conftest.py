"""Fixtures for the end-to-end suite (see harness.py).

- `upstream`: one in-process echo server for the whole session.
- `browser`: real headless Chromium through chromedriver (Selenium), for one test module.
- `launch` / `module_launch`: start a real Envoy with the Guardrail filter from a plugin
  configuration (`plugin_configuration(policy, **extras)`); stopped at the end of the test / module,
  also when it fails. A module that shares one gateway:

      @pytest.fixture(scope="module")
      def gw(module_launch):
          return module_launch(plugin_configuration(POLICY))

When a test fails, the tail of the log of every Envoy still running is added to its report.
"""

from __future__ import annotations

import shutil
from typing import Any, Callable, Iterator

import pytest

import harness
from harness import Envoy, artifact, bootstrap, echo_mod


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for var in harness.DEFAULTS:
        path = artifact(var)
        lines.append(f"{var}: {path}{'' if path.exists() else '  (missing: ' + harness.BUILD_HINT + ')'}")
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for envoy in list(harness._LIVE):
            report.sections.append((f"{envoy.name} log ({envoy.log_path}), last 30 lines", envoy.log_tail(30)))


@pytest.fixture(scope="session")
def upstream() -> Iterator[Any]:
    """The echo upstream (examples/upstream/echo.py), on a free port."""
    server = echo_mod.serve_in_thread()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def wasm() -> Any:
    path = artifact("GUARDRAIL_WASM")
    if not path.is_file():
        pytest.fail(f"GUARDRAIL_WASM: {path} does not exist; {harness.BUILD_HINT}", pytrace=False)
    if not artifact("ENVOY_BIN").is_file():
        pytest.fail(f"ENVOY_BIN: {artifact('ENVOY_BIN')} does not exist; {harness.BUILD_HINT}", pytrace=False)
    return path


def _launcher(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Any, prefix: str) -> Iterator[Callable[..., Envoy]]:
    started: list[Envoy] = []

    def launch(plugin_config: Any, *, name: str = "envoy", start: bool = True, **bootstrap_args: Any) -> Envoy:
        """An Envoy with the Guardrail filter configured by `plugin_config` (a dict or raw string)
        in front of the echo upstream, writing its JSON access log to `.access_log_path`. With
        `start=False` it is only created (use `.settle()`)."""
        workdir = tmp_path_factory.mktemp(f"{prefix}-{name}")
        envoy = Envoy({}, workdir, name=name)
        bootstrap_args.setdefault("access_log_path", envoy.access_log_path)
        envoy.config = bootstrap(plugin_config, upstream_port=upstream.server_port, wasm=wasm, **bootstrap_args)
        started.append(envoy)
        return envoy.start() if start else envoy

    try:
        yield launch
    finally:
        for envoy in started:
            envoy.stop()


@pytest.fixture
def launch(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Any) -> Iterator[Callable[..., Envoy]]:
    """Starts Envoys that live for one test."""
    yield from _launcher(tmp_path_factory, upstream, wasm, "test")


@pytest.fixture(scope="module")
def module_launch(tmp_path_factory: pytest.TempPathFactory, upstream: Any, wasm: Any) -> Iterator[Callable[..., Envoy]]:
    """Starts Envoys that live for one test module."""
    yield from _launcher(tmp_path_factory, upstream, wasm, "module")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Real headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are not installed (./build.sh installs them: apt-get install chromium "
                    "chromium-driver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield b
    finally:
        b.quit()
