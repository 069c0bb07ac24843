"""One epoll set for reading every UART link, so reading them takes a bounded share of the loop.

uvloop (libuv) reads every ready socket before it runs a single callback: up to
48 rounds of 1,024 sockets per pass.  When thousands of UARTs print at once, one
pass takes hundreds of milliseconds, and everything else waits that long at each
``await``.  At 5,000 consoles at line rate, ``/readyz`` took 0.3-1.5 s; see
bench/RESULTS.md.

Here the UART sockets sit in an epoll set of their own, and that set's
descriptor is the only one the loop watches for them.  Each time it is ready,
one pass reads at most ``budget`` UARTs and returns, so the API's callbacks run
between passes.  With the same load the API answered in 4-18 ms.  Epoll hands
out level-triggered descriptors round-robin, so no UART starves.  Reads still
go straight into the sink's buffer (the console's ring log), one read per ready
UART per pass, as the transports did: a sink with ``receive`` (the console)
does the read itself into its ring, and one with asyncio's ``get_buffer`` and
``buffer_updated`` pair is read into the same way, through a small adapter.

Only reading moves here.  Each link keeps its transport, with reading paused,
for writing keystrokes, flow control and closing, which is well-tested code.
Linux only (``select.epoll``); elsewhere :meth:`ReadMux.create` returns None
and links read through their transports.

The mux reads through a socket object of its own over the link's descriptor:
``recv_into`` goes straight to the socket, where ``os.readv`` took the
file-system path (``vfs_readv``: an iovec copied in, permission hooks).  At
1,000 consoles the daemon used 1.2-6.6 points of a core less in 6 interleaved
pairs of runs (median 2.5, ~7%; bench/RESULTS.md).  The object borrows the
number rather than a duplicate, which would cost a descriptor per console (at
5,000 consoles, past a 20,000 limit), so it must never close it: see
:class:`_BorrowedSocket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Callable

from serialmuxd.backends.base import BackendSink

# UARTs read per pass before the loop gets its turn: ~1 ms of reads at 4-5 µs each.
READS_PER_PASS = 256
# Read size for sinks without a buffer of their own (see _CopyingSink).
COPY_CHUNK = 64 * 1024

#: what the mux calls when a link hits EOF (None) or a read error
OnClosed = Callable[[OSError | None], None]


#: reads once with the given ``recv_into`` into the sink; returns the bytes read (0: EOF)
Receive = Callable[[Callable[[memoryview], int]], int]


class _CopyingSink:
    """A buffer for a sink that only takes chunks (``on_data``): read, then copy out."""

    __slots__ = ("_on_data", "_view")

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self._view = memoryview(bytearray(COPY_CHUNK))

    def receive(self, recv_into: Callable[[memoryview], int]) -> int:
        n = recv_into(self._view)
        if n:
            self._on_data(bytes(self._view[:n]))
        return n


def _buffered_receive(
    get_buffer: Callable[[int], memoryview], buffer_updated: Callable[[int], None]
) -> Receive:
    """``receive`` for a sink with asyncio's buffered-protocol pair."""

    def receive(recv_into: Callable[[memoryview], int]) -> int:
        n = recv_into(get_buffer(-1))
        if n:
            buffer_updated(n)
        return n

    return receive


class _BorrowedSocket(socket.socket):
    """A socket object over a descriptor the link owns: it never closes it.

    A plain socket object closes its descriptor when it is collected, and a
    reader dropped on any path (a late clean-up, a cycle) would then close a
    number that may by now be another link's.  Overriding ``__del__`` replaces
    that finalizer, so the number is only ever closed by its owner.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


class Reader:
    """One link's registration: its own socket object, and what a pass calls for it."""

    __slots__ = ("fd", "on_closed", "paused", "receive", "recv_into", "sock")

    def __init__(self, sock: _BorrowedSocket, sink: BackendSink, on_closed: OnClosed) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.recv_into = sock.recv_into
        # Looked up once: a pass calls it per UART.  The console's is its ring
        # log's recv_from, one Python call per chunk (see console.py).
        receive: Receive | None = getattr(sink, "receive", None)
        if receive is None:
            get_buffer = getattr(sink, "get_buffer", None)
            buffer_updated = getattr(sink, "buffer_updated", None)
            if get_buffer is not None and buffer_updated is not None:
                receive = _buffered_receive(get_buffer, buffer_updated)
            else:
                receive = _CopyingSink(sink.on_data).receive
        self.receive = receive
        self.on_closed = on_closed
        self.paused = False


class ReadMux:
    """Reads the registered descriptors in passes of at most ``budget`` ready ones."""

    def __init__(self, budget: int = READS_PER_PASS) -> None:
        if budget < 1:
            raise ValueError("budget must be at least 1")
        self.budget = budget
        self._ep: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[int, Reader] = {}

    @classmethod
    def create(cls) -> ReadMux | None:
        """A mux where the platform has epoll; None elsewhere (links read by themselves)."""
        return cls() if hasattr(select, "epoll") else None

    def __len__(self) -> int:
        return len(self._readers)

    def add(self, fd: int, sink: BackendSink, on_closed: OnClosed) -> Reader:
        """Read socket ``fd`` (non-blocking) into ``sink`` from the next pass on, until removed.

        ``fd`` stays the caller's: it writes on it and closes it, after :meth:`remove`.
        ``on_closed`` runs once, after the reader is removed, when a read finds EOF
        or fails: the owner closes the link then.
        """
        if self._ep is None:
            self._ep = select.epoll()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._ep.fileno(), self._pass)
        # Non-blocking already: it is the link's socket.
        reader = Reader(_BorrowedSocket(fileno=fd), sink, on_closed)
        try:
            self._ep.register(fd, select.EPOLLIN)
        except FileExistsError:
            # The number's previous link was closed with its file still open
            # elsewhere, so epoll kept it: this registration now means the new link.
            self._ep.modify(fd, select.EPOLLIN)
        self._readers[fd] = reader
        return reader

    def remove(self, reader: Reader) -> None:
        """Stop reading (idempotent); call before the descriptor is closed.

        Keyed by the reader, not the number: after a close, a new link can get the
        same descriptor number, and the old link's late cleanup must not drop it.
        """
        if self._readers.get(reader.fd) is not reader:
            return
        del self._readers[reader.fd]
        if self._ep is not None and not reader.paused:
            with contextlib.suppress(OSError):  # already closed: epoll dropped it itself
                self._ep.unregister(reader.fd)
        reader.sock.detach()

    def pause(self, reader: Reader) -> None:
        """Leave ``reader`` unread until :meth:`resume` (flow control: the guest waits).

        Unregistered rather than registered for no events: epoll reports a hang-up
        even then, and a pass would read.
        """
        if reader.paused or self._readers.get(reader.fd) is not reader or self._ep is None:
            return
        reader.paused = True
        with contextlib.suppress(OSError):
            self._ep.unregister(reader.fd)

    def resume(self, reader: Reader) -> None:
        if not reader.paused or self._readers.get(reader.fd) is not reader or self._ep is None:
            return
        reader.paused = False
        try:
            self._ep.register(reader.fd, select.EPOLLIN)
        except OSError as e:
            # Closed while paused: report it as a failed read would.
            self._closed(reader, e)

    def _pass(self) -> None:
        """One bounded pass: one read for each of at most ``budget`` ready UARTs."""
        ep = self._ep
        if ep is None:
            return
        readers = self._readers
        for fd, _ in ep.poll(0, self.budget):
            reader = readers.get(fd)
            if reader is None:
                continue
            # Attribute, then call: ``reader.receive(...)`` on a slot is a method
            # lookup CPython 3.11 does not specialise, and this runs per chunk.
            receive = reader.receive
            try:
                n = receive(reader.recv_into)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                self._closed(reader, e)
                continue
            if not n:
                self._closed(reader, None)

    def _closed(self, reader: Reader, exc: OSError | None) -> None:
        self.remove(reader)
        reader.paused = False
        reader.on_closed(exc)

    def close(self) -> None:
        """Stop reading everything (shutdown); the links' own descriptors are left to their owners."""
        for reader in self._readers.values():
            reader.sock.detach()
        self._readers.clear()
        if self._ep is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._ep.fileno())
            self._ep.close()
            self._ep = None
        self._loop = None
