"""One client connection driven with blocking calls, for round-trip timing and takeovers.

A round trip is timed around one ``send`` and the blocking read that returns the echo,
with nothing else running in the driver process, so the client adds as little as a
Python client can (a few microseconds) to what the server costs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import subprocess
import termios
import time
from typing import Any

from loadclient import WsParser, controlling_tty, ws_handshake_request, ws_mask
from peerproto import ConmanHandshake, ConserverHandshake, Handshake, conserver_port_blocking


class Closed(Exception):
    """The server closed the connection."""


class Conn:
    """A byte stream to one console: raw socket, WebSocket, peer protocol or pty client."""

    def __init__(self, endpoint: dict[str, Any], connect_timeout: float = 5.0):
        self.endpoint = endpoint
        self.kind = str(endpoint["kind"])
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.master = -1
        self.ws: WsParser | None = None
        self.pending = bytearray()
        self.eof = False
        self.close_code = 0
        if self.kind == "pty":
            self._spawn(endpoint["argv"])
            return
        if self.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(connect_timeout)
            self.sock.connect(endpoint["path"])
        else:
            port = int(endpoint["port"])
            if self.kind == "conserver":
                port = conserver_port_blocking(port, endpoint["console"])
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        if self.kind == "ws":
            self.ws = WsParser(self.pending.extend, self.sock.sendall)
            self.sock.sendall(ws_handshake_request(port, endpoint["path"], endpoint["token"]))
        elif self.kind in ("conserver", "conman"):
            self._handshake(
                ConserverHandshake(endpoint["console"])
                if self.kind == "conserver"
                else ConmanHandshake(endpoint["console"]),
                connect_timeout,
            )

    def _spawn(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")

        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty
        )
        os.close(slave)
        self.master = master

    def _handshake(self, handshake: Handshake, timeout: float) -> None:
        assert self.sock is not None
        self.sock.sendall(handshake.start())
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{self.kind} handshake timed out")
            data = self.sock.recv(65536)
            if not data:
                raise Closed(f"{self.kind} closed during the handshake")
            reply, rest, done = handshake.feed(data)
            if reply:
                self.sock.sendall(reply)
            if done:
                self.pending += rest
                return

    def fileno(self) -> int:
        return self.master if self.sock is None else self.sock.fileno()

    def send(self, data: bytes) -> None:
        if self.sock is None:
            os.write(self.master, data)
        elif self.ws is not None:
            self.sock.sendall(ws_mask(data, 0x2))
        else:
            self.sock.sendall(data)

    def _read_raw(self) -> bytes:
        if self.sock is None:
            try:
                return os.read(self.master, 65536)
            except OSError:  # EIO: the pty's client exited
                return b""
        try:
            return self.sock.recv(262144)
        except ConnectionError:
            return b""

    def recv(self, timeout: float) -> bytes:
        """Stream bytes that are ready (waiting up to ``timeout``); raises Closed at the end."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.eof:
                raise Closed(f"closed (code {self.close_code})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no data")
            ready, _, _ = select.select([self.fileno()], [], [], remaining)
            if not ready:
                raise TimeoutError("no data")
            data = self._read_raw()
            if not data:
                self.eof = True
                continue
            if self.ws is None:
                self.pending += data
            else:
                self.ws.feed(data)
                if self.ws.close_code:
                    self.close_code = self.ws.close_code
                    self.eof = True
        out = bytes(self.pending)
        self.pending.clear()
        return out

    def settle(self, quiet_s: float = 0.25, max_s: float = 5.0) -> bytes:
        """Read and return what arrives until the stream is quiet (banners, replay)."""
        got = bytearray()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                got += self.recv(quiet_s)
            except TimeoutError:
                break
        return bytes(got)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = -1


ECHO_BYTES = b"abcdefghijklmnopqrstuvwxyz"


def echo_round_trips(conn: Conn, count: int, timeout: float = 2.0) -> tuple[list[int], int]:
    """Time ``count`` 1-byte echo round trips in ns; also returns stray bytes seen."""
    times: list[int] = []
    stray = 0
    perf = time.perf_counter_ns
    for i in range(count):
        byte = ECHO_BYTES[i % len(ECHO_BYTES)]
        start = perf()
        conn.send(bytes((byte,)))
        while True:
            data = conn.recv(timeout)
            if byte in data:
                times.append(perf() - start)
                stray += len(data) - 1
                break
            stray += len(data)
    return times, stray
