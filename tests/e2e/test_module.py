"""The built guardrail.wasm: Envoy enters the VM only for the callbacks it exports, and the build
removes those Guardrail leaves to the SDK's empty defaults (tools/strip_callbacks.py). Checks the
module's exports, the script on bad input, and that requests and responses with bodies still
pass through a real Envoy, decided and counted, without those callbacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from harness import Envoy, request, responds_with, wait_for
from policies import app, policy, tier

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import strip_callbacks  # noqa: E402 (tools/ is not a package)

KEY = "k-module-exports-0001"

# What Envoy calls Guardrail for: without any of these the filter would not work.
NEEDED = {
    "_initialize", "memory", "proxy_abi_version_0_2_1", "proxy_on_memory_allocate", "proxy_on_vm_start",
    "proxy_on_configure", "proxy_on_tick", "proxy_on_context_create", "proxy_on_request_headers",
    "proxy_on_response_headers", "proxy_on_delete", "proxy_on_grpc_receive", "proxy_on_grpc_close",
}


def exports(module: bytes) -> list[str]:
    names: list[str] = []
    at = 8
    while at < len(module):
        section_id = module[at]
        size, body = strip_callbacks.leb128(module, at + 1)
        if section_id == strip_callbacks.EXPORT_SECTION:
            count, pos = strip_callbacks.leb128(module, body)
            for _ in range(count):
                length, pos = strip_callbacks.leb128(module, pos)
                names.append(module[pos:pos + length].decode())
                _, pos = strip_callbacks.leb128(module, pos + length + 1)
        at = body + size
    return names


def test_the_module_exports_what_envoy_needs_and_no_unused_callback(wasm: Path) -> None:
    names = set(exports(wasm.read_bytes()))
    assert NEEDED <= names, f"missing: {sorted(NEEDED - names)}"
    assert not names & strip_callbacks.UNUSED, f"still exported: {sorted(names & strip_callbacks.UNUSED)}"


def test_stripping_again_changes_nothing_and_bad_modules_are_refused(wasm: Path, tmp_path: Path) -> None:
    module = wasm.read_bytes()
    again, removed = strip_callbacks.strip(module, strip_callbacks.UNUSED)
    assert (again, removed) == (module, [])
    # A module exporting what cargo's build does (some needed, some not) loses exactly the unused ones,
    # the other sections untouched.
    names = ["proxy_on_request_headers", "proxy_on_log", "memory", "proxy_on_response_body", "proxy_on_delete"]
    entries = b"".join(strip_callbacks.encode_leb128(len(n)) + n.encode() + b"\0" + strip_callbacks.encode_leb128(i)
                       for i, n in enumerate(names))
    section = strip_callbacks.encode_leb128(len(names)) + entries
    custom = b"\0\x05\x04note"  # a custom section (id 0) before it, 5 bytes: name "note"
    synthetic = b"\0asm\1\0\0\0" + custom + b"\x07" + strip_callbacks.encode_leb128(len(section)) + section
    stripped, removed = strip_callbacks.strip(synthetic, strip_callbacks.UNUSED)
    assert sorted(removed) == ["proxy_on_log", "proxy_on_response_body"]
    assert exports(stripped) == ["proxy_on_request_headers", "memory", "proxy_on_delete"]
    assert stripped.startswith(b"\0asm\1\0\0\0" + custom)
    for bad, why in [
        (b"", "not a WebAssembly binary module"),
        (b"\0asm\2\0\0\0", "not a WebAssembly binary module"),
        (module[:len(module) // 2], "runs past the end of the module"),
        (module[:8] + b"\x07\xff\xff\xff\xff\xff", "LEB128"),
    ]:
        with pytest.raises(ValueError, match=why):
            strip_callbacks.strip(bad, strip_callbacks.UNUSED)
    target = tmp_path / "not.wasm"
    target.write_bytes(b"plain text")
    assert strip_callbacks.main(["strip_callbacks.py", str(target)]) == 1
    assert target.read_bytes() == b"plain text", "a file that is not a module is left alone"


@pytest.fixture(scope="module")
def gw(module_launch: Any) -> Envoy:
    return module_launch({"policy": policy(revision="module-1", tiers={"standard": tier(1000, "1m")}, apps=[app("body-app", keys=[KEY])])}, name="module")


def test_bodies_pass_both_ways_decided_and_counted(gw: Envoy) -> None:
    before = gw.stats()
    body = bytes(range(256)) * 4096  # 1 MiB: many body chunks through Envoy, none into the VM
    r = responds_with(request(gw.url, "/upload", method="POST", headers={"x-api-key": KEY}, body=body), 200)
    assert r.upstream["body_bytes"] == len(body) and r.upstream["headers"].get("x-guardrail-app") == "body-app"
    assert r.header("ratelimit") and r.header("ratelimit-policy"), r.headers
    responds_with(request(gw.url, "/upload", method="POST", headers={"x-api-key": "k-not-in-the-catalog-01"},
                          body=body), 401, "unauthenticated")
    wait_for(lambda: gw.counter("guardrail.allowed") - gw.counter("guardrail.allowed", before) == 1
             and gw.counter("guardrail.denied.unauthenticated") - gw.counter("guardrail.denied.unauthenticated", before) == 1,
             timeout=5, what="the counters of both requests (flushed on the next tick)")
