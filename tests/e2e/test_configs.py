"""Every Envoy config shipped in envoy/ and examples/ passes `envoy --mode validate`.

Validation loads guardrail.wasm into V8 and runs its `on_configure`, so a config passes only if the
filter accepts its plugin configuration too. A config is checked exactly as shipped, from the
repository root, when GUARDRAIL_WASM is the default path; otherwise it is rendered the way build.sh
renders it (envoy/render.py: the `wasm_path` line points at GUARDRAIL_WASM).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from harness import DEFAULTS, REPO, render_mod, validate


def shipped_envoy_configs() -> list[Path]:
    """YAML files in envoy/ and examples/ that are Envoy bootstraps (have `static_resources`)."""
    files = sorted((REPO / "envoy").rglob("*.yaml")) + sorted((REPO / "examples").rglob("*.yaml"))
    return [f for f in files if re.search(r"^static_resources\s*:", f.read_text(errors="replace"), re.M)]


CONFIGS = shipped_envoy_configs()
IDS = [str(p.relative_to(REPO)) for p in CONFIGS]


def test_the_known_configs_are_found() -> None:
    assert {"envoy/guardrail.yaml", "envoy/existing-listener.yaml"} <= set(IDS), IDS


def test_guardrail_yaml_has_every_render_marker() -> None:
    names = render_mod.markers((REPO / "envoy" / "guardrail.yaml").read_text())
    assert sorted(names) == sorted(
        ["admin_port", "listener_port", "upstream_port", "control_port", "wasm_path", "plugin_config", "access_log_path"]
    ), names


def test_render_replaces_only_marked_values() -> None:
    text = (REPO / "envoy" / "guardrail.yaml").read_text()
    plugin = {"policy": {"apiVersion": "guardrail/v1", "kind": "Policy", "revision": "it's \"quoted\""}}
    out = render_mod.render(text, {"listener_port": 10123, "wasm_path": "/x/g.wasm", "plugin_config": plugin})
    assert "port_value: 10123  # render: listener_port" in out
    assert 'filename: "/x/g.wasm"  # render: wasm_path' in out
    assert out.count("\n") == text.count("\n")
    with pytest.raises(ValueError):
        render_mod.render(text, {"listner_port": 1})


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_validates(config: Path, wasm: Path, tmp_path: Path) -> None:
    shipped_wasm = REPO / DEFAULTS["GUARDRAIL_WASM"]
    if shipped_wasm.is_file() and shipped_wasm.samefile(wasm):
        # Exactly as shipped: the relative wasm path resolves from the repository root.
        path = config
    else:
        # The module is elsewhere (GUARDRAIL_WASM): render the `wasm_path` line as build.sh does.
        path = tmp_path / config.name
        path.write_text(render_mod.render(config.read_text(), {"wasm_path": str(wasm)}, strict=False))
    result = validate(path, cwd=REPO)
    assert result.returncode == 0, f"envoy --mode validate {config.relative_to(REPO)}:\n{result.stdout}{result.stderr}"


def test_validation_rejects_a_bad_plugin_configuration(wasm: Any, tmp_path: Path) -> None:
    """Proves the checks above exercise the filter's configuration, not only Envoy's schema."""
    config = REPO / "envoy" / "guardrail.yaml"
    rendered = tmp_path / "bad.yaml"
    values = {"wasm_path": str(wasm), "plugin_config": {"policy": {"apiVersion": "guardrail/v1", "kind": "Policy"}, "bogus": 1}}
    rendered.write_text(render_mod.render(config.read_text(), values))
    result = validate(rendered)
    assert result.returncode != 0, f"a plugin configuration with an unknown key validated:\n{result.stdout}{result.stderr}"
    assert "bogus" in result.stdout + result.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_connection_manager_writes_the_json_access_log(config: Path) -> None:
    """One access log format everywhere (the repository's, with Guardrail's filter state), so a log
    pipeline reads every Envoy of the repository alike; never a credential in it."""
    import yaml

    from harness import access_log_format

    expected = access_log_format()
    assert {"guardrail_app", "guardrail_code", "guardrail_dataset", "guardrail_token", "peer"} <= set(expected), expected
    headers = {h.lower() for v in expected.values() for h in re.findall(r"%REQ\(([^)?]*)", v)}
    assert headers <= {"x-request-id", ":method", ":authority", ":path"}, f"a request header that may hold a credential: {headers}"
    bootstrap = yaml.safe_load(config.read_text())
    hcms = [f["typed_config"] for listener in bootstrap["static_resources"].get("listeners", [])
            for chain in listener["filter_chains"] for f in chain["filters"]
            if f["name"] == "envoy.filters.network.http_connection_manager"]
    assert hcms, "no HTTP connection manager"
    for hcm in hcms:
        formats = [log["typed_config"]["log_format"]["json_format"] for log in hcm.get("access_log", [])
                   if "json_format" in log["typed_config"].get("log_format", {})]
        assert formats == [expected], f"{hcm['stat_prefix']}: {formats}"
