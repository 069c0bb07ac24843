"""Many console clients in one process: attach to every endpoint, read, count, check.

Run by ``run.py`` as a subprocess so its CPU is its own and the driver stays free.
The first stdin line is a JSON spec::

    {"endpoints": [ENDPOINT, ...], "check": true, "parallel": 256, "deadline_s": 60}

with ENDPOINT one of

    {"kind": "unix", "path": P}                       raw stream (fake UART, serialmuxd socket)
    {"kind": "tcp", "port": N}                        raw stream on 127.0.0.1 (socat, ser2net)
    {"kind": "ws", "port": N, "path": P, "token": T}  serialmuxd WebSocket, binary frames
    {"kind": "conserver", "port": N, "console": C}    conserver's client protocol
    {"kind": "conman", "port": N, "console": C}       conman's client protocol
    {"kind": "pty", "argv": [...]}                    a client program on its own pty

then commands, one per line: ``snap`` answers one JSON line of counters, ``quit``
closes everything and exits.  Output lines are JSON; the first is ``{"event":
"started"}``.

Every client keeps retrying its attach until ``deadline_s`` (a server that is still
starting refuses connections), and records when its first stream byte arrived, so the
driver can tell when a server had every console serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, cast

from peerproto import (
    ConmanHandshake,
    ConserverHandshake,
    Handshake,
    HandshakeError,
    conserver_port,
)
from stream import StreamChecker

READ_SIZE = 256 * 1024
# One receive buffer for every connection: each read is consumed before the next one
# is made, and 5,000 private 256 KiB buffers would cost 1.25 GB.
SHARED_VIEW = memoryview(bytearray(READ_SIZE))
RETRY_S = 0.05


class Counter:
    """What one client has seen."""

    __slots__ = (
        "attached_at",
        "attempts",
        "bytes",
        "checker",
        "closed",
        "first_byte_at",
        "note",
        "waiter",
    )

    def __init__(self, check: bool) -> None:
        self.bytes = 0
        self.attempts = 0
        self.attached_at = 0.0
        self.first_byte_at = 0.0
        self.closed = False
        self.note = ""
        self.checker: StreamChecker | None = StreamChecker() if check else None
        # Resolved by the first stream byte or by the connection's end.
        self.waiter: asyncio.Future[None] | None = None

    def payload(self, data: bytes | bytearray | memoryview) -> None:
        if not self.bytes:
            self.first_byte_at = time.monotonic()
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)
        self.bytes += len(data)
        if self.checker is not None:
            self.checker.feed(data)


class RawProtocol(asyncio.BufferedProtocol):
    """Counts a raw byte stream; a handshake (peer protocols) may come first."""

    def __init__(self, counter: Counter, handshake: Handshake | None, lost: asyncio.Future[None]):
        self.counter = counter
        self.handshake = handshake
        self.lost = lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if self.handshake is not None:
            self.transport.write(self.handshake.start())

    def get_buffer(self, sizehint: int) -> memoryview:
        return SHARED_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        data = SHARED_VIEW[:nbytes]
        if self.handshake is not None:
            try:
                reply, rest, done = self.handshake.feed(bytes(data))
            except HandshakeError as exc:
                self.counter.note = str(exc)
                if self.transport is not None:
                    self.transport.close()
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
            if not done:
                return
            self.handshake = None
            if not rest:
                return
            data = memoryview(rest)
        self.counter.payload(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.closed = True
        if not self.lost.done():
            self.lost.set_result(None)


def ws_mask(payload: bytes, opcode: int) -> bytes:
    """A masked client frame (RFC 6455 requires clients to mask)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + key + masked


def ws_handshake_request(port: int, path: str, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WsParser:
    """Incremental parser of server-to-client WebSocket frames (never masked).

    ``on_binary`` gets each binary payload; text frames (hello, state, taken_over)
    are kept in ``texts``; a close frame sets ``close_code``.
    """

    def __init__(self, on_binary: Callable[[memoryview], None], send: Callable[[bytes], None]):
        self.on_binary = on_binary
        self.send = send
        self.buf = bytearray()
        self.upgraded = False
        self.status = 0
        self.texts: list[str] = []
        self.close_code = 0
        self.binary_continuation = False

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            self.status = int(head.split(" ", 2)[1])
            del self.buf[: end + 4]
            if self.status != 101:
                self.close_code = -self.status
                return
            self.upgraded = True
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        pos = 0
        size_all = len(buf)
        view = memoryview(buf)
        try:
            while size_all - pos >= 2:
                b0 = buf[pos]
                length = buf[pos + 1] & 0x7F
                head = 2
                if length == 126:
                    if size_all - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    head = 4
                elif length == 127:
                    if size_all - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    head = 10
                if size_all - pos < head + length:
                    break
                payload = view[pos + head : pos + head + length]
                opcode = b0 & 0x0F
                if opcode == 2 or (opcode == 0 and self.binary_continuation):
                    self.binary_continuation = not (b0 & 0x80)
                    self.on_binary(payload)
                elif opcode == 1:
                    self.texts.append(bytes(payload).decode("utf-8", "replace"))
                elif opcode == 8:
                    self.close_code = int.from_bytes(payload[:2], "big") if length >= 2 else 1005
                elif opcode == 9:
                    self.send(ws_mask(bytes(payload), 0xA))
                # Sub-views keep the bytearray exported; release before it is resized.
                payload.release()
                pos += head + length
        finally:
            view.release()
        del buf[:pos]


class WsProtocol(asyncio.Protocol):
    def __init__(self, counter: Counter, request: bytes, lost: asyncio.Future[None]):
        self.counter = counter
        self.request = request
        self.lost = lost
        self.transport: asyncio.Transport | None = None
        self.parser = WsParser(counter.payload, self._send)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.parser.close_code and self.transport is not None:
            self.counter.note = f"closed {self.parser.close_code} {self.parser.texts[-1:]}"
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.closed = True
        if not self.lost.done():
            self.lost.set_result(None)


def make_handshake(endpoint: dict[str, Any]) -> Handshake | None:
    kind = endpoint["kind"]
    if kind == "conserver":
        return ConserverHandshake(endpoint["console"], endpoint.get("user", "bench"))
    if kind == "conman":
        return ConmanHandshake(endpoint["console"], endpoint.get("user", "bench"))
    return None


def controlling_tty() -> None:
    """In the child: a session of its own with the pty as its terminal, as in a login."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyClient:
    """A console client program (conserver's ``console``, ``conman``) on its own pty."""

    def __init__(self, argv: list[str], counter: Counter, loop: asyncio.AbstractEventLoop):
        self.counter = counter
        self.loop = loop
        master, slave = os.openpty()
        # A terminal size, as an interactive user has; some clients ask for it.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty
        )
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        loop.add_reader(master, self._readable)
        counter.attached_at = time.monotonic()

    def _readable(self) -> None:
        try:
            data = os.read(self.master, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.master)
            self.counter.closed = True
            return
        self.counter.payload(data)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.master)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)


class Client:
    """Attaches one endpoint, retrying until it delivers a first stream byte."""

    def __init__(self, endpoint: dict[str, Any], check: bool, deadline: float):
        self.endpoint = endpoint
        self.counter = Counter(check)
        self.deadline = deadline
        self.transport: asyncio.BaseTransport | None = None
        self.pty: PtyClient | None = None

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        kind = endpoint["kind"]
        if kind == "pty":
            self.pty = PtyClient(endpoint["argv"], self.counter, loop)
            return
        while True:
            self.counter.attempts += 1
            lost: asyncio.Future[None] = loop.create_future()
            self.counter.waiter = lost
            try:
                self.transport = await self._connect(loop, lost)
            except (OSError, HandshakeError, asyncio.IncompleteReadError) as exc:
                self.counter.note = f"attach: {exc!r}"[:200]
                if time.monotonic() > self.deadline:
                    return
                await asyncio.sleep(RETRY_S)
                continue
            self.counter.attached_at = time.monotonic()
            self.counter.closed = False
            # A server that accepts and then drops us (still starting, console not yet
            # up) is retried; one that delivers a byte has attached us.
            await asyncio.wait([lost], timeout=max(0.0, self.deadline - time.monotonic()))
            if not lost.done():
                self.counter.note = "attached but no byte before the deadline"
            if self.counter.bytes or time.monotonic() > self.deadline:
                return
            await asyncio.sleep(RETRY_S)

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, lost: asyncio.Future[None]
    ) -> asyncio.BaseTransport:
        endpoint = self.endpoint
        kind = endpoint["kind"]
        protocol: asyncio.BaseProtocol
        if kind == "unix":
            protocol = RawProtocol(self.counter, None, lost)
            transport, _ = await loop.create_unix_connection(lambda: protocol, endpoint["path"])
            return transport
        port = int(endpoint["port"])
        if kind == "ws":
            request = ws_handshake_request(port, endpoint["path"], endpoint["token"])
            protocol = WsProtocol(self.counter, request, lost)
        else:
            if kind == "conserver":
                port = await conserver_port(port, endpoint["console"])
            protocol = RawProtocol(self.counter, make_handshake(endpoint), lost)
        transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
        return transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.pty is not None:
            self.pty.close()


def snapshot(clients: list[Client]) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    counters = [c.counter for c in clients]
    checkers = [c.checker for c in counters if c.checker is not None]
    return {
        "event": "snap",
        "t": time.monotonic(),
        "bytes": [c.bytes for c in counters],
        "first_byte_at": [c.first_byte_at for c in counters],
        "attached": sum(1 for c in counters if c.bytes),
        "closed": sum(1 for c in counters if c.closed),
        "good": sum(c.good for c in checkers),
        "errors": sum(c.errors for c in checkers),
        "junk": sum(c.junk for c in checkers),
        "notes": sorted({c.note for c in counters if c.note})[:5],
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "children_cpu_s": children.ru_utime + children.ru_stime,
        "pty_pids": [c.pty.proc.pid for c in clients if c.pty is not None],
    }


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + float(spec.get("deadline_s", 60))
    clients = [Client(e, bool(spec.get("check", True)), deadline) for e in spec["endpoints"]]
    gate = asyncio.Semaphore(int(spec.get("parallel", 256)))

    async def attach(client: Client) -> None:
        async with gate:
            await client.attach()

    attaching = asyncio.gather(*(attach(c) for c in clients))
    emit({"event": "started", "t": time.monotonic(), "pid": os.getpid()})
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    # SIGTERM ends the command loop like "quit", so pty clients are not left behind.
    loop.add_signal_handler(signal.SIGTERM, stdin.feed_eof)
    try:
        while line := await stdin.readline():
            command = line.strip().decode()
            if command == "snap":
                emit(snapshot(clients))
            elif command == "quit":
                break
    finally:
        attaching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attaching
        for client in clients:
            client.close()
        emit({"event": "bye"})


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us with "quit" or SIGTERM
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(sys.stdin.readline())
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(spec))
    else:
        uvloop.run(run(spec))


if __name__ == "__main__":
    main()
