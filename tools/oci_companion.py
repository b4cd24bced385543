#!/usr/bin/env python3
"""Package the `guardrail` companion binary as a runnable OCI image, without a Docker engine.

The binary should be the static (musl) build that `./build.sh oci` makes: the image has nothing
else in it (no shell, no libc), like a distroless `static` image. One layer (tar+gzip):

    /guardrail                  the binary (0755)
    /etc/guardrail/             where the policy is mounted (a ConfigMap) and TLS files (a Secret)
    /var/lib/guardrail/         the working directory, owned by 65532: `--store sqlite:guardrail.db`
    /tmp/                       1777

The config runs it as user 65532 (non-root) with `guardrail serve --policy /etc/guardrail/policy.yaml
--listen 0.0.0.0:18000` unless the pod gives other args. Deterministic: one binary, one digest.

Usage: oci_companion.py BINARY OUT_DIR [--tag 0.1.0]      prints the manifest digest
       oci_companion.py --verify OUT_DIR [--binary BINARY] checks digests, layout and the binary
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

from oci import CONFIG, LAYER, MANIFEST, sha256, write_blob

USER = 65532
ENTRYPOINT = ["/guardrail"]
CMD = ["serve", "--policy", "/etc/guardrail/policy.yaml", "--listen", "0.0.0.0:18000"]
# (path in the image, mode, owner, is a directory)
TREE = [
    ("etc/", 0o755, 0, True),
    ("etc/guardrail/", 0o755, 0, True),
    ("tmp/", 0o1777, 0, True),
    ("var/", 0o755, 0, True),
    ("var/lib/", 0o755, 0, True),
    ("var/lib/guardrail/", 0o750, USER, True),
]


def layer_tar(binary: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, mode, owner, _ in TREE:
            info = tarfile.TarInfo(path.rstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode, info.mtime, info.uid, info.gid = mode, 0, owner, owner
            tar.addfile(info)
        info = tarfile.TarInfo("guardrail")
        info.size, info.mode, info.mtime, info.uid, info.gid = len(binary), 0o755, 0, 0, 0
        tar.addfile(info, io.BytesIO(binary))
    return buf.getvalue()


def elf_machine(binary: bytes) -> str | None:
    """`amd64` or `arm64` for an ELF executable, else None."""
    if binary[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(binary[18:20], "little")
    return {62: "amd64", 183: "arm64"}.get(machine)


def is_static(binary: bytes) -> bool:
    """No PT_INTERP program header: the kernel runs it without a dynamic loader."""
    if binary[4] != 2:  # ELFCLASS64
        return False
    phoff = int.from_bytes(binary[32:40], "little")
    phentsize = int.from_bytes(binary[54:56], "little")
    phnum = int.from_bytes(binary[56:58], "little")
    for i in range(phnum):
        p_type = int.from_bytes(binary[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        if p_type == 3:  # PT_INTERP
            return False
    return True


def build(binary_path: str, out: str, tag: str) -> dict:
    with open(binary_path, "rb") as f:
        binary = f.read()
    arch = elf_machine(binary)
    if arch is None:
        sys.exit(f"error: {binary_path} is not an x86-64 or arm64 ELF executable")
    if not is_static(binary):
        print(f"warning: {binary_path} is dynamically linked; the image has no libc (build with --target x86_64-unknown-linux-musl)", file=sys.stderr)
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    for name in os.listdir(os.path.join(out, "blobs", "sha256")):
        os.remove(os.path.join(out, "blobs", "sha256", name))
    tar = layer_tar(binary)
    layer = write_blob(out, gzip.compress(tar, compresslevel=9, mtime=0))
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": f"{USER}:{USER}",
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
            "WorkingDir": "/var/lib/guardrail",
            "ExposedPorts": {"18000/tcp": {}, "18001/tcp": {}},
            "Labels": {"org.opencontainers.image.title": "guardrail-companion"},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created_by": "guardrail tools/oci_companion.py", "comment": "static guardrail binary"}],
    }
    config_desc = write_blob(out, json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **config_desc},
        "layers": [{"mediaType": LAYER, **layer}],
        "annotations": {
            "org.opencontainers.image.title": "guardrail-companion",
            "org.opencontainers.image.description": "Guardrail companion: policy push, store, console and CLI",
            "org.opencontainers.image.version": tag,
        },
    }
    manifest_desc = write_blob(out, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MANIFEST,
                **manifest_desc,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return {"manifest": manifest_desc["digest"], "binary_sha256": hashlib.sha256(binary).hexdigest(), "tag": tag, "static": is_static(binary)}


def read_blob(out: str, desc: dict, what: str, problems: list[str]) -> bytes | None:
    digest = desc.get("digest", "")
    try:
        with open(os.path.join(out, "blobs", *digest.split(":", 1)), "rb") as f:
            data = f.read()
    except OSError as e:
        problems.append(f"{what}: blob {digest} missing ({e})")
        return None
    if sha256(data) != digest or len(data) != desc.get("size"):
        problems.append(f"{what}: content does not match its descriptor ({digest}, {desc.get('size')} bytes)")
    return data


def verify(out: str, binary_path: str | None) -> list[str]:
    problems: list[str] = []
    try:
        with open(os.path.join(out, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return [f"layout unreadable: {e}"]
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        return [f"index.json: {len(manifests)} manifests, expected 1"]
    manifest_bytes = read_blob(out, manifests[0], "manifest", problems)
    if manifest_bytes is None:
        return problems
    manifest = json.loads(manifest_bytes)
    config_bytes = read_blob(out, manifest.get("config", {}), "config", problems)
    layers = manifest.get("layers", [])
    gz = read_blob(out, layers[0], "layer", problems) if len(layers) == 1 else None
    if config_bytes is None or gz is None:
        return problems + ([] if len(layers) == 1 else [f"manifest: {len(layers)} layers, expected 1"])
    config = json.loads(config_bytes)
    tar = gzip.decompress(gz)
    if config.get("rootfs", {}).get("diff_ids") != [sha256(tar)]:
        problems.append("config: rootfs.diff_ids does not match the uncompressed layer")
    if config.get("config", {}).get("Entrypoint") != ENTRYPOINT:
        problems.append(f"config: Entrypoint is {config.get('config', {}).get('Entrypoint')}, expected {ENTRYPOINT}")
    if config.get("config", {}).get("User") != f"{USER}:{USER}":
        problems.append("config: the image does not run as the non-root user 65532")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = {m.name: m for m in t.getmembers()}
        member = t.extractfile("guardrail") if "guardrail" in members else None
        binary = member.read() if member else b""
    if not binary:
        problems.append("layer: no /guardrail binary")
    elif not members["guardrail"].mode & 0o111:
        problems.append("layer: /guardrail is not executable")
    work = members.get("var/lib/guardrail")
    if work is None or work.uid != USER:
        problems.append("layer: /var/lib/guardrail is missing or not owned by 65532 (the SQLite store could not be written)")
    if binary_path:
        with open(binary_path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != hashlib.sha256(binary).hexdigest():
                problems.append("layer: /guardrail differs from the binary given")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--verify", metavar="OUT_DIR")
    ap.add_argument("--binary", dest="binary_check")
    args = ap.parse_args()
    if args.verify:
        problems = verify(args.verify, args.binary_check)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(1 if problems else 0)
    if not args.binary or not args.out:
        ap.error("BINARY and OUT_DIR are required (or --verify OUT_DIR)")
    result = build(args.binary, args.out, args.tag)
    print(f"OCI image layout: {args.out} (tag {result['tag']})")
    print(f"manifest digest:  {result['manifest']}")
    print(f"guardrail sha256: {result['binary_sha256']} ({'static' if result['static'] else 'dynamically linked'})")


if __name__ == "__main__":
    main()
