#!/usr/bin/env python3
"""A demo upstream: answers every request with 200 and a JSON echo of what reached it.

    {"method": "GET", "path": "/orders?x=1", "headers": {"x-guardrail-app": "pos-dashboard", ...},
     "body_bytes": 0}

Header names are lower-cased; repeated headers are joined with ", ". So a client (or a test) sees
exactly which headers Guardrail let through and which it added. Python standard library only.

    python3 examples/upstream/echo.py --port 18080        # what `./build.sh run` starts

The end-to-end tests start the same server in-process with `make_server()`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect
    server_version = "guardrail-echo"
    sys_version = ""
    quiet = True

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        payload = json.dumps(
            {"method": self.command, "path": self.path, "headers": headers, "body_bytes": len(body)},
            indent=2,
        ).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        if not self.quiet:
            super().log_message(format, *args)


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the tests open hundreds of connections at once


def make_server(host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> EchoServer:
    """A bound (not yet serving) echo server; port 0 picks a free port (see `.server_port`)."""
    handler = type("Handler", (EchoHandler,), {"quiet": quiet})
    return EchoServer((host, port), handler)


def serve_in_thread(host: str = "127.0.0.1", port: int = 0) -> EchoServer:
    """Starts an echo server on a daemon thread; stop it with `.shutdown()` then `.server_close()`."""
    server = make_server(host, port)
    threading.Thread(target=server.serve_forever, name="echo-upstream", daemon=True).start()
    return server


def main() -> int:
    p = argparse.ArgumentParser(description="Guardrail demo upstream: echoes each request as JSON.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args()
    server = make_server(args.host, args.port, quiet=not args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"echo upstream on http://{args.host}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
