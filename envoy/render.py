#!/usr/bin/env python3
"""Render an Envoy config of this directory for one run (Python standard library only).

Envoy does no environment-variable substitution. Every value a run changes therefore sits on a
line of its own that ends in `# render: NAME`, and the shipped value on that line is a working
default (the file passes `envoy --mode validate` as shipped). Rendering replaces the value of each
marked line whose NAME is given and leaves everything else, comments included, as it is:

    port_value: 10000  # render: listener_port       --set listener_port=10123
    filename: target/…/guardrail.wasm  # render: wasm_path

`plugin_config` is special: its value is a JSON document (the Guardrail plugin configuration) and
is written as the YAML string Envoy's StringValue expects.

    python3 envoy/render.py envoy/guardrail.yaml -o out.yaml --set listener_port=10123 \\
        --set wasm_path=/abs/guardrail.wasm --policy-file policy.json \\
        --plugin-config '{"gateway_region": "eu-west-1"}'

build.sh and tests/e2e import `render()` from here, so there is one rendering rule.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping

MARKER = re.compile(
    r"^(?P<head>\s*(?:-\s+)?[^\s:#][^:#]*:\s+)(?P<value>.*?)(?P<tail>\s+#\s*render:\s*(?P<name>[a-z_]+)\s*)$"
)

# Names whose value must be a TCP port.
PORTS = {"listener_port", "admin_port", "upstream_port", "control_port"}


def markers(text: str) -> list[str]:
    """The NAMEs of every `# render: NAME` line, in file order."""
    return [m.group("name") for m in map(MARKER.match, text.splitlines()) if m]


def encode(name: str, value: Any) -> str:
    """The YAML text for `value` on a line marked `name`."""
    if name == "plugin_config":
        if not isinstance(value, str):
            value = json.dumps(value, separators=(",", ":"), sort_keys=False)
        json.loads(value)  # refuse to render a configuration that is not JSON at all
        # A JSON string literal is a valid YAML double-quoted scalar.
        return json.dumps(value)
    if name in PORTS:
        port = int(value)
        if not 0 <= port < 65536:  # 0: Envoy picks a free port
            raise ValueError(f"{name}: {port} is not a TCP port")
        return str(port)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def render(text: str, values: Mapping[str, Any], strict: bool = True) -> str:
    """`text` with the value of every line marked with a name in `values` replaced.

    With `strict`, a name in `values` that marks no line is an error (a typo, or a template that
    moved on).
    """
    seen: set[str] = set()
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        end = line[len(body):]
        m = MARKER.match(body)
        if m and m.group("name") in values:
            name = m.group("name")
            seen.add(name)
            body = m.group("head") + encode(name, values[name]) + m.group("tail")
        out.append(body + end)
    missing = set(values) - seen
    if strict and missing:
        raise ValueError(f"no `# render:` line for {', '.join(sorted(missing))}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("template", type=Path)
    p.add_argument("-o", "--output", type=Path, help="where to write (default: standard output)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="value of a `# render: NAME` line")
    p.add_argument("--plugin-config", metavar="JSON", help="the plugin configuration (a JSON object)")
    p.add_argument("--plugin-config-file", type=Path, metavar="FILE", help="the plugin configuration from a file")
    p.add_argument("--policy-file", type=Path, metavar="FILE", help="a policy as JSON, put under `policy` of the plugin configuration")
    args = p.parse_args(argv)

    values: dict[str, Any] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item}: expected NAME=VALUE")
        values[name] = value
    plugin: dict[str, Any] | None = None
    if args.plugin_config_file:
        plugin = json.loads(args.plugin_config_file.read_text())
    if args.plugin_config:
        plugin = {**(plugin or {}), **json.loads(args.plugin_config)}
    if args.policy_file:
        plugin = {**(plugin or {}), "policy": json.loads(args.policy_file.read_text())}
    if plugin is not None:
        if not isinstance(plugin, dict):
            p.error("the plugin configuration must be a JSON object")
        values["plugin_config"] = plugin

    try:
        text = render(args.template.read_text(), values)
    except ValueError as e:
        print(f"render.py: {args.template}: {e}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
