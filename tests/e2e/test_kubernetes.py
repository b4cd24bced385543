"""The companion's deployment: examples/kubernetes/ and its OCI image, checked without a cluster.

- The manifests: three companion replicas on one Redis (AOF on), the control channel under mutual
  TLS from cert-manager secrets, the namespace in the mesh; every flag the companion is given is
  one `guardrail serve` takes (its real --help), every volume it mounts exists, the policy in the
  ConfigMap passes `guardrail check`.
- tools/oci_companion.py: a runnable image layout of the built binary (digests, the non-root user,
  the writable working directory for the SQLite store), and the binary in its layer runs.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml

from harness import REPO, require_artifact

MANIFESTS = REPO / "examples" / "kubernetes" / "companion-ha.yaml"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def companion_container() -> dict[str, Any]:
    pod = one("Deployment", "guardrail")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "guardrail")


def flag_values(args: list[str]) -> dict[str, str]:
    assert args[0] == "serve", args
    pairs = args[1:]
    assert len(pairs) % 2 == 0, f"every flag takes a value: {pairs}"
    return dict(zip(pairs[::2], pairs[1::2]))


def test_three_replicas_share_redis_under_mutual_tls() -> None:
    deployment = one("Deployment", "guardrail")
    assert deployment["spec"]["replicas"] == 3
    flags = flag_values(companion_container()["args"])
    assert re.fullmatch(r"redis://redis\.guardrail-system\.svc\.cluster\.local:6379/\d+", flags["--store"]), flags
    for tls in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        assert flags[tls].startswith("/etc/guardrail/tls/"), (tls, flags)
    redis = one("StatefulSet", "guardrail-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis[redis.index("--appendonly") + 1] == "yes", redis
    assert one("PodDisruptionBudget", "guardrail")["spec"]["minAvailable"] == 2
    namespace = one("Namespace", "guardrail-system")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled", "the companion's namespace is in the mesh"
    # The TLS secret mounted is the one cert-manager writes.
    pod = deployment["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    issued = {d["spec"]["secretName"] for d in documents() if d["kind"] == "Certificate"}
    assert secrets <= issued, (secrets, issued)


def test_every_flag_is_one_serve_takes() -> None:
    help_text = subprocess.run(
        [str(require_artifact("GUARDRAIL_BIN")), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in flag_values(companion_container()["args"]):
        assert re.search(rf"(^|\s){re.escape(flag)}[\s=<]", help_text), f"`guardrail serve` has no {flag}:\n{help_text}"


def test_every_mount_has_a_volume_and_the_policy_checks(tmp_path: Path) -> None:
    pod = one("Deployment", "guardrail")["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in companion_container()["volumeMounts"]}
    assert set(mounts) <= volumes, (mounts, volumes)
    flags = flag_values(companion_container()["args"])
    assert flags["--policy"].startswith(mounts["policy"] + "/"), "the policy flag points into the ConfigMap's mount"
    policy = tmp_path / "policy.yaml"
    policy.write_text(one("ConfigMap", "guardrail-policy")["data"]["policy.yaml"])
    result = subprocess.run([str(require_artifact("GUARDRAIL_BIN")), "check", str(policy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_companion_image_layout_runs(tmp_path: Path) -> None:
    binary = require_artifact("GUARDRAIL_BIN")
    out = tmp_path / "oci"
    tool = REPO / "tools" / "oci_companion.py"
    built = subprocess.run([sys.executable, str(tool), str(binary), str(out), "--tag", "test"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    check = subprocess.run([sys.executable, str(tool), "--verify", str(out), "--binary", str(binary)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    config = json.loads((out / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes())
    assert config["config"]["User"] == "65532:65532" and config["config"]["Entrypoint"] == ["/guardrail"]
    layer = out / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.read_bytes()))) as tar:
        member = tar.extractfile("guardrail")
        assert member is not None
        extracted = tmp_path / "guardrail"
        extracted.write_bytes(member.read())
    extracted.chmod(extracted.stat().st_mode | stat.S_IXUSR)
    version = subprocess.run([str(extracted), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("guardrail "), version
    # The verifier is not vacuous: an image whose binary differs is refused.
    other = tmp_path / "other"
    other.write_bytes(extracted.read_bytes() + b"\0")
    refused = subprocess.run([sys.executable, str(tool), "--verify", str(out), "--binary", str(other)], capture_output=True, text=True)
    assert refused.returncode == 1 and "differs" in refused.stderr, refused.stderr


def test_static_companion_when_built() -> None:
    """`./build.sh oci` builds the musl binary; when it is there, it needs no dynamic loader."""
    static = REPO / "target" / "x86_64-unknown-linux-musl" / "release" / "guardrail"
    if os.environ.get("CARGO_TARGET_DIR"):
        static = Path(os.environ["CARGO_TARGET_DIR"]) / "x86_64-unknown-linux-musl" / "release" / "guardrail"
    if not static.exists():
        import pytest

        pytest.skip("no static build here (./build.sh oci makes it)")
    sys.path.insert(0, str(REPO / "tools"))
    from oci_companion import is_static  # noqa: E402

    assert is_static(static.read_bytes()), f"{static} asks for a dynamic loader"
    assert not is_static(Path(require_artifact("GUARDRAIL_BIN")).read_bytes()), "the check tells glibc builds apart"
