"""A fake companion for fault injection: a gRPC server (grpcio, generic handlers, raw bytes) that
speaks `guardrail.v1.PolicyService/Stream` (proto/guardrail/v1/guardrail.proto) by hand, so a test
can send the filter what the real `guardrail serve` never would: garbage, oversized messages,
snapshots that do not compile, or nothing at all.

    fake = FakeCompanion(on_open=lambda s: s.send(snapshot("good-1", policy_doc))).start()
    gw = Envoy(bootstrap({"policy": inline, "control": {"cluster": "guardrail_control"}},
                         upstream_port=..., control_port=fake.port), tmp)
    stream = fake.wait_for_stream()                 # the filter dialled and said Hello
    stream.wait_for(lambda m: m.kind == "ack" and m.revision == "good-1")
    stream.send(b"\\xff" * 32)                       # garbage where a ServerMessage belongs
    stream.send(snapshot("bad-1", {...}))           # well-formed, but the policy does not compile
    nack = stream.wait_for(lambda m: m.kind == "nack")
    fake.stop()

Protobuf is encoded and decoded here with a few lines (varints and length-delimited fields), no
generated stubs: the fake must be able to send bytes no honest encoder produces.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import grpc

SERVICE = "guardrail.v1.PolicyService"

# === protobuf, by hand ===

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(n: int) -> bytes:
    """A base-128 varint (unsigned; negative numbers as their 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, data: bytes | str) -> bytes:
    """Field `number` as a length-delimited value (string, bytes or embedded message)."""
    raw = data.encode() if isinstance(data, str) else data
    return tag(number, LEN) + varint(len(raw)) + raw


def varint_field(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The (field number, wire type, value) triples of one message; raises ValueError on bytes
    that are not a protobuf message."""
    i = 0

    def read_varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated or overlong varint")
            byte = data[i]
            i += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while i < len(data):
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            yield number, wire_type, read_varint()
        elif wire_type == LEN:
            size = read_varint()
            if i + size > len(data):
                raise ValueError("length-delimited field runs past the end")
            yield number, wire_type, data[i:i + size]
            i += size
        elif wire_type in (I64, I32):
            size = 8 if wire_type == I64 else 4
            yield number, wire_type, data[i:i + size]
            i += size
        else:
            raise ValueError(f"wire type {wire_type}")


# --- what the companion sends (ServerMessage) ---


def snapshot(revision: str, policy: Mapping[str, Any] | str | bytes) -> bytes:
    """`ServerMessage{snapshot: PolicySnapshot{revision, policy_json}}`; a dict is sent as JSON,
    str/bytes as they are (so they may be anything, valid or not)."""
    body = json.dumps(policy, separators=(",", ":")) if isinstance(policy, Mapping) else policy
    return length_delimited(1, length_delimited(1, revision) + length_delimited(2, body))


def zlib_snapshot(revision: str, compressed: bytes) -> bytes:
    """`ServerMessage{snapshot: PolicySnapshot{revision, policy_zlib}}`: the policy as zlib bytes
    (any bytes, valid or not), as the companion sends it to a filter whose Hello accepts it."""
    return length_delimited(1, length_delimited(1, revision) + length_delimited(3, compressed))


def candidate(revision: str, policy: Mapping[str, Any] | str | bytes) -> bytes:
    """`ServerMessage{candidate: Candidate{revision, policy_json}}` (the shadow candidate; an empty
    revision stops shadowing), the policy as for `snapshot`."""
    body = json.dumps(policy, separators=(",", ":")) if isinstance(policy, Mapping) else policy
    return length_delimited(3, length_delimited(1, revision) + length_delimited(2, body))


def fleet(day: int, exhausted: tuple[str, ...] = ()) -> bytes:
    """`ServerMessage{fleet: FleetState{day, exhausted_apps}}`."""
    return length_delimited(2, varint_field(1, day) + b"".join(length_delimited(2, a) for a in exhausted))


def padded_snapshot(revision: str, policy: Mapping[str, Any], size: int) -> bytes:
    """A snapshot of `policy` whose encoded ServerMessage is exactly `size` bytes, the policy's
    JSON padded with trailing spaces (still the same, valid document)."""
    body = json.dumps(policy, separators=(",", ":"))
    pad = max(0, size - len(snapshot(revision, body)))
    for _ in range(8):  # the varint lengths grow with the padding; settle in a step or two
        message = snapshot(revision, body + " " * pad)
        if len(message) == size:
            return message
        pad += size - len(message)
    raise ValueError(f"cannot pad a snapshot of {revision} to exactly {size} bytes")


# --- what the filter sends (ClientMessage) ---

CLIENT_KINDS = {1: "hello", 2: "ack", 3: "nack", 4: "usage"}
STRING_FIELDS = {
    "hello": {1: "node_id", 2: "envoy_version", 3: "filter_version", 4: "revision"},
    "ack": {1: "revision"},
    "nack": {1: "revision", 2: "error"},
}


@dataclass
class ClientMessage:
    """One decoded `ClientMessage`: `kind` is hello, ack, nack or usage; `fields` holds the
    strings of hello/ack/nack by name (and `candidate`, whether an ACK/NACK is the shadow
    candidate's), and for usage `day`, `apps` ({app: {"allowed": n, ..}}), `candidate_revision`
    and `shadow` ([(app, enforced, candidate, count)])."""

    kind: str
    fields: dict[str, Any]
    at: float = field(default_factory=time.monotonic)

    @property
    def revision(self) -> str:
        return str(self.fields.get("revision", ""))

    @property
    def error(self) -> str:
        return str(self.fields.get("error", ""))


def _app_usage(data: bytes) -> tuple[str, dict[str, Any]]:
    name, usage = "", {"allowed": 0, "throttled": 0, "soft_limit": 0, "denied": {}}
    for number, _, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            name = value.decode()
        elif number in (2, 3, 4) and isinstance(value, int):
            usage[("allowed", "throttled", "soft_limit")[number - 2]] = value
        elif number == 5 and isinstance(value, bytes):
            entry = dict((n, v) for n, _, v in fields(value))
            usage["denied"][bytes(entry.get(1, b"")).decode()] = entry.get(2, 0)
    return name, usage


def decode_client_message(data: bytes) -> ClientMessage:
    """Decodes what the filter sent; raises ValueError if it is not a ClientMessage."""
    for number, wire_type, value in fields(data):
        kind = CLIENT_KINDS.get(number)
        if kind is None or wire_type != LEN or not isinstance(value, bytes):
            continue
        if kind == "usage":
            day, apps, revision, shadow = 0, {}, "", []
            for n, _, v in fields(value):
                if n == 1 and isinstance(v, int):
                    day = v
                elif n == 2 and isinstance(v, bytes):
                    name, usage = _app_usage(v)
                    apps[name] = usage
                elif n == 4 and isinstance(v, bytes):
                    revision = v.decode()
                elif n == 5 and isinstance(v, bytes):
                    d = {k: x for k, _, x in fields(v)}
                    text = lambda k: bytes(d.get(k, b"")).decode()  # noqa: E731
                    shadow.append((text(1), text(2), text(3), d.get(4, 0)))
            return ClientMessage(kind, {"day": day, "apps": apps, "candidate_revision": revision, "shadow": shadow})
        names = STRING_FIELDS[kind]
        out: dict[str, Any] = {names[n]: bytes(v).decode() for n, _, v in fields(value)
                               if n in names and isinstance(v, bytes)}
        if kind == "hello":
            out["accepts_zlib"] = any(n == 5 and v == 1 for n, _, v in fields(value))
        flag = {"ack": 2, "nack": 3}.get(kind)
        out["candidate"] = any(n == flag and v == 1 for n, _, v in fields(value))
        return ClientMessage(kind, out)
    raise ValueError(f"not a ClientMessage: {data[:40]!r}")


# === the server ===

_END = object()


class FakeStream:
    """One `Stream` call from the filter: what it received (decoded), and an outbox. `reading`
    cleared makes the fake stop reading the filter's messages (HTTP/2 flow control then backs
    up on the filter's side); set, it reads again."""

    def __init__(self, index: int, reading: bool) -> None:
        self.index = index
        self.received: list[ClientMessage] = []
        self.undecodable: list[bytes] = []
        self.outbox: "queue.Queue[Any]" = queue.Queue()
        self.reading = threading.Event()
        if reading:
            self.reading.set()
        self.opened = time.monotonic()
        self.closed: float | None = None
        self.sent: list[int] = []  # sizes of the messages handed to grpc
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    # --- sending ---

    def send(self, message: bytes) -> None:
        """Queues raw bytes as one gRPC message (nothing checks that they are a ServerMessage)."""
        self.outbox.put(message)

    def end(self) -> None:
        """Ends the call with status OK (the companion going away politely)."""
        self.outbox.put(_END)

    # --- receiving ---

    def _received(self, raw: bytes) -> None:
        with self._changed:
            try:
                self.received.append(decode_client_message(raw))
            except ValueError:
                self.undecodable.append(raw)
            self._changed.notify_all()

    def _close(self) -> None:
        with self._changed:
            self.closed = time.monotonic()
            self._changed.notify_all()

    @property
    def open(self) -> bool:
        return self.closed is None

    def messages(self, kind: str | None = None) -> list[ClientMessage]:
        with self._lock:
            return [m for m in self.received if kind is None or m.kind == kind]

    def wait_for(self, predicate: Callable[[ClientMessage], bool], timeout: float = 10.0,
                 what: str = "a message from the filter") -> ClientMessage:
        """The first received message matching `predicate` (waiting for it)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((m for m in self.received if predicate(m)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"stream {self.index}: timed out after {timeout:.0f}s waiting for {what}; "
                                       f"received {[(m.kind, m.fields) for m in self.received][-5:]}")
                self._changed.wait(min(left, 0.1))

    def wait_for_ack(self, revision: str, timeout: float = 10.0) -> ClientMessage:
        return self.wait_for(lambda m: m.kind == "ack" and m.revision == revision, timeout, f"the ACK of {revision}")

    def wait_for_nack(self, revision: str, timeout: float = 10.0) -> ClientMessage:
        return self.wait_for(lambda m: m.kind == "nack" and m.revision == revision, timeout, f"the NACK of {revision}")


class FakeCompanion:
    """A gRPC server on 127.0.0.1 serving `guardrail.v1.PolicyService/Stream` with raw bytes.

    `on_open(stream)` runs when the filter opens a stream (before anything is sent on it), e.g. to
    queue a snapshot. New streams read the filter's messages unless `reading` is False, and get
    response headers at once unless `send_headers` is False (then the first message, if any,
    carries them). `Status` is not served (UNIMPLEMENTED): a fake needs no `guardrail status`."""

    def __init__(self, on_open: Callable[[FakeStream], None] | None = None, *, reading: bool = True,
                 send_headers: bool = True) -> None:
        self.on_open = on_open
        self.reading = reading
        self.send_headers = send_headers
        self.streams: list[FakeStream] = []
        self.port = 0
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._new_stream = threading.Condition(self._lock)

    def start(self) -> "FakeCompanion":
        # No message size limits on this side: the fake must be able to send what the filter refuses.
        server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-companion"),
                             options=[("grpc.max_send_message_length", -1),
                                      ("grpc.max_receive_message_length", -1)])
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(self._stream)})
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port, "the fake companion could not bind 127.0.0.1"
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Cancels every open stream and stops listening. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(5)

    def __enter__(self) -> "FakeCompanion":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- streams ---

    def wait_for_stream(self, count: int = 1, timeout: float = 15.0) -> FakeStream:
        """The `count`-th stream the filter opened (1-based), once it has said Hello."""
        deadline = time.monotonic() + timeout
        with self._new_stream:
            while len(self.streams) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for stream #{count} "
                                       f"(the filter opened {len(self.streams)})")
                self._new_stream.wait(min(left, 0.1))
            stream = self.streams[count - 1]
        stream.wait_for(lambda m: m.kind == "hello", max(0.1, deadline - time.monotonic()), "Hello")
        return stream

    @property
    def current(self) -> FakeStream:
        with self._lock:
            assert self.streams, "the filter has not opened a stream yet"
            return self.streams[-1]

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._new_stream:
            stream = FakeStream(len(self.streams) + 1, self.reading)
            self.streams.append(stream)
            self._new_stream.notify_all()

        def read() -> None:
            try:
                while True:
                    # Not reading means not asking grpc for the next message at all.
                    while not stream.reading.wait(0.1):
                        if not context.is_active():
                            return
                    raw = next(requests, None)
                    if raw is None:
                        return
                    stream._received(raw)
            except Exception:  # noqa: BLE001 - the call was cancelled under us
                return

        threading.Thread(target=read, name=f"fake-companion-read-{stream.index}", daemon=True).start()
        context.add_callback(stream._close)
        if self.send_headers:
            # The stream is accepted (HTTP/2 response headers) even if nothing is ever sent on it.
            context.send_initial_metadata(())
        if self.on_open is not None:
            self.on_open(stream)
        while context.is_active():
            try:
                item = stream.outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            stream.sent.append(len(item))
            yield item
        stream._close()
