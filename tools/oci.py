#!/usr/bin/env python3
"""Package guardrail.wasm as an OCI image that Istio's WasmPlugin accepts, without a Docker engine.

Follows the Istio Wasm image specification, *compat* variant: an ordinary OCI image whose single
layer (tar+gzip) holds the module as `plugin.wasm` at the root. Any OCI registry takes it, and it
is pushed with standard tools, e.g. `skopeo copy oci:dist/guardrail-oci:0.1.0 docker://REGISTRY/guardrail:0.1.0`
or `crane push dist/guardrail-oci REGISTRY/guardrail:0.1.0`.

The output is an OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
    dist/guardrail-oci/oci-layout
    dist/guardrail-oci/index.json
    dist/guardrail-oci/blobs/sha256/<manifest, config, layer>
Everything is deterministic (fixed mtimes, owners and gzip header), so one module gives one digest.

Usage: oci.py WASM OUT_DIR [--tag 0.1.0]     prints the manifest digest and the module's sha256
       oci.py --verify OUT_DIR [--wasm WASM] checks digests and sizes; exits 1 on any mismatch
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(out: str, data: bytes) -> dict:
    digest = sha256(data)
    path = os.path.join(out, "blobs", "sha256", digest.split(":", 1)[1])
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def layer_tar(wasm: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def build(wasm_path: str, out: str, tag: str) -> dict:
    with open(wasm_path, "rb") as f:
        wasm = f.read()
    if wasm[:4] != b"\0asm":
        sys.exit(f"error: {wasm_path} is not a WebAssembly module")
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    for name in os.listdir(os.path.join(out, "blobs", "sha256")):
        os.remove(os.path.join(out, "blobs", "sha256", name))
    tar = layer_tar(wasm)
    gz = gzip.compress(tar, compresslevel=9, mtime=0)
    layer = write_blob(out, gz)
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created_by": "guardrail tools/oci.py", "comment": "plugin.wasm"}],
    }
    config_desc = write_blob(out, json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **config_desc},
        "layers": [{"mediaType": LAYER, **layer, "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}],
        "annotations": {
            "org.opencontainers.image.title": "guardrail",
            "org.opencontainers.image.description": "Guardrail proxy-wasm filter (Istio Wasm image, compat variant)",
            "org.opencontainers.image.version": tag,
        },
    }
    manifest_desc = write_blob(out, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": MANIFEST, **manifest_desc, "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return {"manifest": manifest_desc["digest"], "wasm_sha256": hashlib.sha256(wasm).hexdigest(), "tag": tag}


def verify(out: str, wasm_path: str | None) -> list[str]:
    """Every problem found in the layout (empty when it is sound)."""
    problems: list[str] = []

    def blob(desc: dict, what: str) -> bytes | None:
        digest = desc.get("digest", "")
        path = os.path.join(out, "blobs", *digest.split(":", 1))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            problems.append(f"{what}: blob {digest} missing ({e})")
            return None
        if sha256(data) != digest:
            problems.append(f"{what}: content hashes to {sha256(data)}, descriptor says {digest}")
        if len(data) != desc.get("size"):
            problems.append(f"{what}: {len(data)} bytes, descriptor says {desc.get('size')}")
        return data

    try:
        with open(os.path.join(out, "oci-layout")) as f:
            if json.load(f).get("imageLayoutVersion") != "1.0.0":
                problems.append("oci-layout: imageLayoutVersion is not 1.0.0")
        with open(os.path.join(out, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return [f"layout unreadable: {e}"]
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        problems.append(f"index.json: {len(manifests)} manifests, expected 1")
    for m in manifests:
        data = blob(m, "manifest")
        if data is None:
            continue
        manifest = json.loads(data)
        if manifest.get("mediaType") != MANIFEST or m.get("mediaType") != MANIFEST:
            problems.append("manifest: wrong media type")
        config = blob(manifest.get("config", {}), "config")
        layers = manifest.get("layers", [])
        if len(layers) != 1:
            problems.append(f"manifest: {len(layers)} layers, the Istio Wasm image spec wants exactly 1")
            continue
        if layers[0].get("mediaType") != LAYER:
            problems.append(f"layer: media type {layers[0].get('mediaType')}, expected {LAYER}")
        gz = blob(layers[0], "layer")
        if gz is None or config is None:
            continue
        try:
            tar = gzip.decompress(gz)
            with tarfile.open(fileobj=io.BytesIO(tar)) as t:
                names = t.getnames()
                member = t.extractfile("plugin.wasm") if names == ["plugin.wasm"] else None
                module = member.read() if member else b""
        except (OSError, EOFError, tarfile.TarError, KeyError) as e:
            problems.append(f"layer: not a readable tar+gzip ({e})")
            continue
        if json.loads(config).get("rootfs", {}).get("diff_ids") != [sha256(tar)]:
            problems.append("config: rootfs.diff_ids does not match the uncompressed layer")
        if names != ["plugin.wasm"]:
            problems.append(f"layer: holds {names}, expected only plugin.wasm")
            continue
        if module[:4] != b"\0asm":
            problems.append("layer: plugin.wasm is not a WebAssembly module")
        if wasm_path:
            with open(wasm_path, "rb") as f:
                want = hashlib.sha256(f.read()).hexdigest()
            got = hashlib.sha256(module).hexdigest()
            if got != want:
                problems.append(f"layer: plugin.wasm sha256 {got} differs from the build's {want}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wasm", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--verify", metavar="OUT_DIR")
    ap.add_argument("--wasm", dest="wasm_check")
    args = ap.parse_args()
    if args.verify:
        problems = verify(args.verify, args.wasm_check)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(1 if problems else 0)
    if not args.wasm or not args.out:
        ap.error("WASM and OUT_DIR are required (or --verify OUT_DIR)")
    result = build(args.wasm, args.out, args.tag)
    print(f"OCI image layout: {args.out} (tag {result['tag']})")
    print(f"manifest digest:  {result['manifest']}")
    print(f"plugin.wasm sha256: {result['wasm_sha256']}")


if __name__ == "__main__":
    main()
