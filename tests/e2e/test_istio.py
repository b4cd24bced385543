"""Istio delivery (examples/istio/) and the OCI image: what can be checked without a cluster.

- Every EnvoyFilter patch's Envoy configuration is extracted, wrapped into a minimal bootstrap
  (an inbound listener whose HTTP connection manager gets the HTTP_FILTER patches before the
  router; CLUSTER patches as clusters) and run through real `envoy --mode validate`, which also
  loads guardrail.wasm and runs its on_configure on the plugin configuration.
- The WasmPlugin's pluginConfig is turned into the plugin configuration Istio would hand the filter
  (pluginName as root_id, the module from the local build) and validated the same way.
- The access log provider (IstioOperator meshConfig, turned on by a Telemetry resource) has the
  JSON fields of envoy/guardrail.yaml and, as the file access log istiod makes of it, validates.
- The OCI image layout built by tools/oci.py: index, manifest, config and layer digests and sizes
  agree, there is one layer holding plugin.wasm, and it is byte for byte the built module.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import REPO, validate

ISTIO = REPO / "examples" / "istio"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def envoyfilters() -> list[dict[str, Any]]:
    return [d for f in sorted(ISTIO.glob("*.yaml")) for d in documents(f) if d.get("kind") == "EnvoyFilter"]


def patches(apply_to: str) -> list[dict[str, Any]]:
    return [p["patch"]["value"] for ef in envoyfilters() for p in ef["spec"]["configPatches"] if p["applyTo"] == apply_to]


def with_local_module(http_filter: dict[str, Any], wasm: Path) -> dict[str, Any]:
    """The same filter, its remote code replaced by the local build (validation must not download)."""
    f = copy.deepcopy(http_filter)
    f["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    return f


def wrap(http_filters: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_8080",
        "route_config": {"virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [*http_filters, router],
    }
    listener = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def run_validate(tmp_path: Path, name: str, bootstrap: dict[str, Any]) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(bootstrap, indent=1))
    return validate(path)


def test_the_istio_resources_are_found() -> None:
    kinds = sorted(d.get("kind") for f in ISTIO.glob("*.yaml") for d in documents(f))
    for kind in ["ConfigMap", "Deployment", "EnvoyFilter", "Service", "WasmPlugin"]:
        assert kind in kinds, kinds
    assert patches("HTTP_FILTER") and patches("CLUSTER")


def test_envoyfilter_patches_validate(wasm: Any, tmp_path: Path) -> None:
    filters = [with_local_module(f, wasm) for f in patches("HTTP_FILTER")]
    result = run_validate(tmp_path, "envoyfilter", wrap(filters, patches("CLUSTER")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoyfilter_remote_code_is_pinned() -> None:
    for f in patches("HTTP_FILTER"):
        code = f["typed_config"]["config"]["vm_config"]["code"]
        remote = code.get("remote")
        assert remote and len(remote.get("sha256", "")) == 64, "remote modules must be pinned by sha256"
        assert remote["http_uri"]["cluster"] in {c["name"] for c in patches("CLUSTER")}, "the artifact cluster is defined"
        assert f["typed_config"]["config"]["fail_open"] is False


def test_wasmplugin_config_is_accepted_by_the_filter(wasm: Any, tmp_path: Path) -> None:
    plugins = [d for f in ISTIO.glob("*.yaml") for d in documents(f) if d.get("kind") == "WasmPlugin"]
    assert plugins
    for plugin in plugins:
        spec = plugin["spec"]
        assert spec["failStrategy"] == "FAIL_CLOSE"
        assert spec["url"].startswith("oci://")
        http_filter = {
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": plugin["metadata"]["name"],
                    "root_id": spec["pluginName"],
                    "fail_open": False,
                    "vm_config": {"vm_id": "guardrail", "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(wasm)}}},
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(spec["pluginConfig"])},
                },
            },
        }
        cluster_name = spec["pluginConfig"]["control"]["cluster"]
        cluster = {
            "name": cluster_name,
            "type": "STATIC",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {"cluster_name": cluster_name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}}}]}]},
        }
        result = run_validate(tmp_path, "wasmplugin", wrap([http_filter], [cluster]))
        assert result.returncode == 0, result.stdout + result.stderr


def test_companion_serves_the_configmap_policy(tmp_path: Path) -> None:
    """The policy in the companion's ConfigMap passes `guardrail check`."""
    from harness import require_artifact

    cm = next(d for d in documents(ISTIO / "companion.yaml") if d.get("kind") == "ConfigMap")
    policy = tmp_path / "policy.yaml"
    policy.write_text(cm["data"]["policy.yaml"])
    result = subprocess.run([str(require_artifact("GUARDRAIL_BIN")), "check", str(policy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_oci_image_layout(wasm: Any, tmp_path: Path) -> None:
    out = tmp_path / "oci"
    tool = REPO / "tools" / "oci.py"
    built = subprocess.run([sys.executable, str(tool), str(wasm), str(out), "--tag", "test"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    check = subprocess.run([sys.executable, str(tool), "--verify", str(out), "--wasm", str(wasm)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "test"
    # The verifier is not vacuous: a flipped byte in the layer is caught.
    layer_digest = json.loads((out / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())["layers"][0]["digest"]
    blob = out / "blobs" / "sha256" / layer_digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    broken = subprocess.run([sys.executable, str(tool), "--verify", str(out), "--wasm", str(wasm)], capture_output=True, text=True)
    assert broken.returncode == 1 and "layer" in broken.stderr, broken.stderr


# === the JSON access log (access-log.yaml) ===


def access_log_provider() -> dict[str, Any]:
    ops = [d for f in sorted(ISTIO.glob("*.yaml")) for d in documents(f) if d.get("kind") == "IstioOperator"]
    providers = [p for op in ops for p in op["spec"]["meshConfig"].get("extensionProviders", [])]
    return next(p for p in providers if "envoyFileAccessLog" in p)


def test_the_access_log_provider_is_the_repositorys_format_and_telemetry_uses_it() -> None:
    from harness import access_log_format

    provider = access_log_provider()
    assert provider["envoyFileAccessLog"]["logFormat"]["labels"] == access_log_format(), \
        "the Istio access log has the fields of envoy/guardrail.yaml"
    telemetry = [d for f in ISTIO.glob("*.yaml") for d in documents(f) if d.get("kind") == "Telemetry"]
    assert telemetry, "a Telemetry resource turns the provider on"
    names = {p["name"] for t in telemetry for a in t["spec"]["accessLogging"] for p in a["providers"]}
    assert provider["name"] in names, (provider["name"], names)


def test_the_access_log_provider_validates_in_envoy(wasm: Any, tmp_path: Path) -> None:
    """What istiod makes of the provider (a file access log whose json_format is `labels`) on the
    inbound connection manager with the filter, through real `envoy --mode validate`."""
    file_log = access_log_provider()["envoyFileAccessLog"]
    filters = [with_local_module(f, wasm) for f in patches("HTTP_FILTER")]
    bootstrap = wrap(filters, patches("CLUSTER"))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(tmp_path / "access.log"),
            "log_format": {"json_format": file_log["logFormat"]["labels"]},
        },
    }]
    result = run_validate(tmp_path, "istio-access-log", bootstrap)
    assert result.returncode == 0, result.stdout + result.stderr
