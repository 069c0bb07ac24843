"""Shared reconnect loop for stream backends (unix socket, TCP, serial ports).

A backend subclass only says how to open one connection; this module owns the
state, the capped exponential back-off, the wake-up on socket creation and the
write-side flow control.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import Any, cast

from serialmuxd.backends.base import Backend, BackendSink, BufferedSink
from serialmuxd.backends.readmux import Reader, ReadMux
from serialmuxd.errors import BackendDown
from serialmuxd.flag import Flag
from serialmuxd.watch import DirWatcher

BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0
# Keystrokes queue in the transport up to this before the session stops reading.
WRITE_HIGH_WATER = 64 * 1024


class LinkProtocol(asyncio.BaseProtocol):
    """Link state and write-side flow control, shared by both ways of reading."""

    # One per console: slots and a Flag keep it small (see flag.py).
    __slots__ = ("_resume", "closed", "transport")

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._resume = Flag(True)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def eof_received(self) -> bool | None:
        return False  # close our side too: the VM went away

    def connection_lost(self, exc: Exception | None) -> None:
        self._resume.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._resume.clear()

    def resume_writing(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    async def drain(self) -> None:
        await self._resume.wait()


class UartProtocol(LinkProtocol, asyncio.Protocol):
    """Hands the sink each chunk as the transport read it (serial ports)."""

    __slots__ = ("_on_data",)

    def __init__(self, sink: BackendSink) -> None:
        super().__init__()
        self._on_data = sink.on_data

    def data_received(self, data: bytes) -> None:
        self._on_data(data)


class BufferedUartProtocol(LinkProtocol, asyncio.BufferedProtocol):
    """Reads the UART straight into the sink's buffer: the console's ring log.

    At 1,000 consoles printing at line rate this is most of the daemon's work
    per chunk.  Skipping the bytes object and the copy into the ring, and
    calling the sink's own methods with no wrapper frame in between (the loop
    looks ``get_buffer`` and ``buffer_updated`` up once, as attributes), saves
    several points of a core (bench/RESULTS.md).
    """

    __slots__ = ("buffer_updated", "get_buffer")

    def __init__(self, sink: BufferedSink) -> None:
        super().__init__()
        self.get_buffer = sink.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = sink.buffer_updated  # type: ignore[method-assign]


def link_protocol(sink: BackendSink) -> LinkProtocol:
    """The protocol for a socket link: buffered when the sink offers a buffer."""
    # Not isinstance() on the runtime-checkable Protocol: that costs ~20 µs a
    # call, 0.2 s of a 5,000-console start.
    if hasattr(sink, "buffer_updated") and hasattr(sink, "get_buffer"):
        return BufferedUartProtocol(cast(BufferedSink, sink))
    return UartProtocol(sink)


class LinkBackend(Backend):
    """Connect, read until the link drops, back off, repeat — until cancelled."""

    #: a path whose creation should wake the reconnect loop early, if any
    watch_path: str | None = None

    def __init__(
        self,
        spec: str,
        sink: BackendSink,
        *,
        watcher: DirWatcher | None = None,
        reads: ReadMux | None = None,
    ) -> None:
        super().__init__(spec, sink)
        self._proto: LinkProtocol | None = None
        self._watcher = watcher
        self._reads = reads
        self._reader: Reader | None = None
        self.last_error = ""
        self.parse_spec(spec)

    def parse_spec(self, spec: str) -> None:
        """Take what this kind of link needs from the ``uart`` string (already validated)."""

    @property
    def up(self) -> bool:
        return self._proto is not None

    @abc.abstractmethod
    async def open(self) -> tuple[asyncio.Transport, LinkProtocol]:
        """Open one connection; raise OSError (or ValueError) with the reason when it fails."""

    async def run(self) -> None:
        wake = Flag()
        if self._watcher is not None and self.watch_path:
            self._watcher.register(self.watch_path, wake)
        delay = BACKOFF_FIRST_S
        try:
            while True:
                wake.clear()
                try:
                    _, proto = await self.open()
                except (OSError, ValueError) as e:
                    if self._watcher is not None and self.watch_path:
                        # Idempotent; picks up a socket directory created after start-up.
                        self._watcher.register(self.watch_path, wake)
                    reason = describe_error(e)
                    if reason != self.last_error:
                        self.last_error = reason
                    self.sink.on_state(False, reason)
                    try:
                        await asyncio.wait_for(wake.wait(), delay)
                        delay = BACKOFF_FIRST_S  # the socket appeared: try at once, then quickly
                    except TimeoutError:
                        delay = min(delay * 2, BACKOFF_CAP_S)
                    continue
                delay = BACKOFF_FIRST_S
                self.last_error = ""
                self._proto = proto
                self._reader = self._read_through_mux(proto)
                self.sink.on_state(True, "connected")
                try:
                    await proto.closed
                finally:
                    self._drop_reader()
                    self._proto = None
                    if proto.transport is not None and not proto.transport.is_closing():
                        proto.transport.abort()
                self.sink.on_state(False, "the VM closed the serial link")
                # A dying QEMU can keep its listening socket open a moment after the
                # link drops: reconnecting at once "succeeds" into it and flaps the
                # console running/stopped.  A new socket (VM restarted) wakes us sooner.
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), BACKOFF_FIRST_S)
        finally:
            if self._watcher is not None and self.watch_path:
                self._watcher.unregister(self.watch_path, wake)
            self._drop_reader()
            proto_now = self._proto
            if (
                proto_now is not None
                and proto_now.transport is not None
                and not proto_now.transport.is_closing()
            ):
                proto_now.transport.abort()
            self._proto = None

    def _read_through_mux(self, proto: LinkProtocol) -> Reader | None:
        """Hand reading to the shared ReadMux (see readmux.py); None: the transport reads.

        The transport read whatever came before this (into the same sink, in
        order); from here on it only writes.
        """
        transport = proto.transport
        if self._reads is None or transport is None or transport.is_closing():
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        transport.pause_reading()

        def closed(exc: OSError | None) -> None:
            # EOF or a read error: what the transport would have done, reading itself.
            # Keystrokes still queued cannot reach a VM that went away.
            self._reader = None
            if not transport.is_closing():
                transport.abort()

        return self._reads.add(sock.fileno(), self.sink, closed)

    def _drop_reader(self) -> None:
        """Before the link's descriptor is closed: a new link may reuse its number."""
        reader, self._reader = self._reader, None
        if reader is not None and self._reads is not None:
            self._reads.remove(reader)

    def pause_reading(self) -> bool:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return False
        if self._reader is not None and self._reads is not None:
            self._reads.pause(self._reader)
        else:
            proto.transport.pause_reading()
        return True

    def resume_reading(self) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return
        if self._reader is not None and self._reads is not None:
            self._reads.resume(self._reader)
        else:
            proto.transport.resume_reading()

    @property
    def congested(self) -> bool:
        proto = self._proto
        return proto is not None and proto.paused

    def write(self, data: bytes) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            raise BackendDown(f"the serial link {self.spec} is not connected")
        proto.transport.write(data)

    async def drain(self) -> None:
        proto = self._proto
        if proto is not None:
            await proto.drain()

    def transport(self) -> Any:
        return None if self._proto is None else self._proto.transport


def describe_error(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "the serial socket does not exist (VM not running?)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (VM not running, or another client holds the serial socket)"
    if isinstance(e, PermissionError):
        return "permission denied on the serial socket: add the daemon's user to its group"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
