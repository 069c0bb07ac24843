"""The client side of conserver's and conman's wire protocols, as their own clients speak them.

Taken from ``strace`` of the Debian clients (conserver-client 8.2.7 with ``-E``, i.e.
no TLS, and conman 0.2.7), so a benchmark can attach thousands of consoles from one
process, byte for byte as ``console`` and ``conman`` would, without a pty and a
client process per console.

conserver: the master port answers ``call NAME`` with the port of the child process
that serves NAME; on that port the same login and call attach the console, then
``^Ec;`` asks for the ``[connected]`` line, after which the stream is raw::

    S: ok\\r\\n          C: login USER\\r\\n
    S: ok\\r\\n          C: call NAME\\r\\n
    S: [attached]\\r\\n  C: \\x05c;
    S: [connected]\\r\\n ...console bytes...

conman: one connection::

    C: HELLO USER='USER' TTY='TTY'\\n       S: OK\\n
    C: CONNECT CONSOLE='NAME'\\n            S: OK CONSOLE='NAME'\\n  ...console bytes...
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol


class HandshakeError(Exception):
    pass


class Handshake(Protocol):
    def start(self) -> bytes: ...

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Consume server bytes; return (bytes to send, stream bytes after it, done)."""
        ...


class _LineHandshake:
    """A sequence of (expected line prefix, reply) steps, then the raw stream."""

    def __init__(self, opening: bytes, steps: list[tuple[bytes, bytes]], newline: bytes):
        self.opening = opening
        self.steps = steps
        self.newline = newline
        self.buf = b""

    def start(self) -> bytes:
        return self.opening

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        self.buf += data
        reply = b""
        while self.steps:
            end = self.buf.find(self.newline)
            if end < 0:
                return reply, b"", False
            line = self.buf[:end]
            self.buf = self.buf[end + len(self.newline) :]
            expected, answer = self.steps[0]
            if not line.startswith(expected):
                raise HandshakeError(f"expected {expected!r}, got {line!r}")
            self.steps.pop(0)
            reply += answer
        rest, self.buf = self.buf, b""
        return reply, rest, True


class ConserverHandshake(_LineHandshake):
    """Attach on the child port that serves the console (see :func:`conserver_port`)."""

    def __init__(self, console: str, user: str = "bench"):
        super().__init__(
            b"",
            [
                (b"ok", f"login {user}\r\n".encode()),
                (b"ok", f"call {console}\r\n".encode()),
                (b"[attached]", b"\x05c;"),
                (b"[connected]", b""),
            ],
            b"\r\n",
        )


class ConmanHandshake(_LineHandshake):
    def __init__(self, console: str, user: str = "bench"):
        super().__init__(
            f"HELLO USER='{user}' TTY='bench'\n".encode(),
            [
                (b"OK", f"CONNECT CONSOLE='{console}'\n".encode()),
                (b"OK", b""),
            ],
            b"\n",
        )


async def conserver_port(master_port: int, console: str, user: str = "bench") -> int:
    """Ask conserver's master which port serves ``console`` (as ``console`` does first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", master_port)
    try:

        async def expect_line() -> bytes:
            line = await reader.readuntil(b"\r\n")
            return line[:-2]

        if await expect_line() != b"ok":
            raise HandshakeError("conserver master did not greet")
        writer.write(f"login {user}\r\n".encode())
        if await expect_line() != b"ok":
            raise HandshakeError("conserver master refused login")
        writer.write(f"call {console}\r\n".encode())
        answer = await expect_line()
        writer.write(b"exit\r\n")
        if not answer.isdigit():
            raise HandshakeError(f"conserver master: call {console}: {answer!r}")
        return int(answer)
    finally:
        writer.close()


def conserver_port_blocking(master_port: int, console: str, user: str = "bench") -> int:
    """:func:`conserver_port` for blocking callers."""
    with socket.create_connection(("127.0.0.1", master_port), timeout=5) as sock:
        lines = sock.makefile("rb")

        def expect_line() -> bytes:
            return lines.readline().rstrip(b"\r\n")

        if expect_line() != b"ok":
            raise HandshakeError("conserver master did not greet")
        sock.sendall(f"login {user}\r\n".encode())
        if expect_line() != b"ok":
            raise HandshakeError("conserver master refused login")
        sock.sendall(f"call {console}\r\n".encode())
        answer = expect_line()
        sock.sendall(b"exit\r\n")
        if not answer.isdigit():
            raise HandshakeError(f"conserver master: call {console}: {answer!r}")
        return int(answer)
