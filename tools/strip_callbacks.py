#!/usr/bin/env python3
"""Removes from a proxy-wasm module the exports of the callbacks Guardrail does not use, in place.

Envoy enters the VM for a callback only when the module exports it, and each entry costs a few
µs of CPU. The Rust SDK exports every callback whether the filter implements it or not, so without
this Envoy would enter Guardrail's VM three more times per request (a response body chunk, the
access log, the end of the stream), and once per body chunk of every request and response, to
run the SDK's empty defaults.

    tools/strip_callbacks.py MODULE.wasm

Idempotent (a module without them is left as it is). Only the export section changes; the
functions stay in the module, unreferenced. Exit 1 with a message when MODULE is not a wasm module
the script can read.
"""

from __future__ import annotations

import sys
from pathlib import Path

# What Guardrail leaves to the SDK's defaults (src/lib.rs implements none of them):
UNUSED = {
    "proxy_on_request_body",      # the decision is made on the headers; bodies pass untouched
    "proxy_on_request_trailers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_log",               # the decision log is written when deciding
    "proxy_on_done",              # without it the host takes a context as done; the root context
                                  # flushes its counters when dropped (on_delete) instead
}

EXPORT_SECTION = 7


def leb128(data: bytes, at: int) -> tuple[int, int]:
    """An unsigned LEB128 at `at`: (value, offset after it)."""
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated LEB128")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at
        if shift > 35:
            raise ValueError("LEB128 longer than 5 bytes")


def encode_leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def strip(module: bytes, names: set[str]) -> tuple[bytes, list[str]]:
    """`module` without the exports named in `names`, and the names removed."""
    if module[:4] != b"\0asm" or module[4:8] != b"\1\0\0\0":
        raise ValueError("not a WebAssembly binary module (version 1)")
    out = bytearray(module[:8])
    removed: list[str] = []
    at = 8
    while at < len(module):
        section_id = module[at]
        size, body = leb128(module, at + 1)
        end = body + size
        if end > len(module):
            raise ValueError(f"section {section_id} runs past the end of the module")
        if section_id != EXPORT_SECTION:
            out += module[at:end]
            at = end
            continue
        count, pos = leb128(module, body)
        kept = bytearray()
        kept_count = 0
        for _ in range(count):
            start = pos
            length, pos = leb128(module, pos)
            name = module[pos:pos + length].decode("utf-8")
            pos += length + 1  # the name, then the kind byte
            _, pos = leb128(module, pos)  # the index
            if name in names:
                removed.append(name)
            else:
                kept += module[start:pos]
                kept_count += 1
        if pos != end:
            raise ValueError("the export section's size does not match its entries")
        section = encode_leb128(kept_count) + kept
        out += bytes([EXPORT_SECTION]) + encode_leb128(len(section)) + section
        at = end
    return bytes(out), removed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: strip_callbacks.py MODULE.wasm", file=sys.stderr)
        return 2
    path = Path(argv[1])
    try:
        stripped, removed = strip(path.read_bytes(), UNUSED)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 1
    if removed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(stripped)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
