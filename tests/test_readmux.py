"""The shared UART reader (backends/readmux.py) on real socket pairs.

Its promises: every byte a UART sends reaches the console's buffer in order;
one pass reads at most ``budget`` UARTs, so the loop (and the API) gets its turn
however many UARTs print; ready UARTs are served round-robin, so none starves;
a paused UART is not read; EOF is reported once; a stale reader never unhooks
the link that reuses its descriptor number.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from serialmuxd.backends.base import BackendSink
from serialmuxd.backends.readmux import OnClosed, Reader, ReadMux
from tests.conftest import DaemonFactory, wait_for
from tests.uart import UartServer


class Sink:
    """A BufferedSink that keeps what it was given (the console's role)."""

    def __init__(self, size: int = 4096) -> None:
        self.buf = memoryview(bytearray(size))
        self.got = bytearray()
        self.reads = 0
        self.states: list[tuple[bool, str]] = []

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.got += self.buf[:nbytes]

    def on_data(self, data: bytes) -> None:
        raise AssertionError("a buffered sink is read into, not handed chunks")

    def on_state(self, up: bool, reason: str) -> None:
        self.states.append((up, reason))


class ChunkSink:
    """A sink with only on_data (serial-style)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def on_data(self, data: bytes) -> None:
        self.chunks.append(data)

    def on_state(self, up: bool, reason: str) -> None:
        pass


@pytest.fixture
async def mux() -> AsyncIterator[ReadMux]:
    reads = ReadMux()
    yield reads
    reads.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    """(uart, daemon side): the daemon side non-blocking, as a link's socket is."""
    uart, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    made.append((uart, ours))
    return uart, ours


def wired(
    mux: ReadMux,
    made: list[tuple[socket.socket, socket.socket]],
    sink: BackendSink,
    on_closed: OnClosed = lambda exc: None,
) -> tuple[socket.socket, Reader]:
    """A new UART whose console end the mux reads into ``sink``: (the guest's end, the reader)."""
    uart, ours = pair(made)
    return uart, mux.add(ours.fileno(), sink, on_closed)


async def test_output_reaches_the_sink_in_order(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """What the guest prints lands in the console's buffer byte for byte, in order."""
    sink = Sink()
    uart, _ = wired(mux, pairs, sink)
    sent = b""
    for i in range(50):
        chunk = f"line {i}\r\n".encode()
        uart.sendall(chunk)
        sent += chunk
        if i % 7 == 0:
            await asyncio.sleep(0)
    await wait_for(lambda: bytes(sink.got) == sent, what="all output read")


async def test_one_pass_reads_at_most_budget_uarts_and_serves_all_in_turn(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """With more UARTs ready than the budget, a pass reads ``budget`` of them and
    returns to the loop; the next passes take the others before any twice."""
    mux.budget = 2
    sinks = []
    for _ in range(5):
        sink = Sink()
        uart, _ = wired(mux, pairs, sink)
        uart.sendall(b"x")
        sinks.append(sink)
    # No await from here on: the loop cannot run a pass of its own in between.
    mux._pass()
    assert sum(s.reads for s in sinks) == 2
    mux._pass()
    mux._pass()
    assert [s.reads for s in sinks] == [1] * 5
    mux._pass()  # nothing left to read: nothing read twice
    assert [s.reads for s in sinks] == [1] * 5


async def test_eof_is_reported_once_and_the_reader_is_gone(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """When the VM closes its end, the link hears of it once (and the last bytes are kept)."""
    sink = Sink()
    closed: list[OSError | None] = []
    uart, _ = wired(mux, pairs, sink, closed.append)
    uart.sendall(b"goodbye\r\n")
    uart.close()
    await wait_for(lambda: closed == [None], what="EOF reported")
    assert bytes(sink.got) == b"goodbye\r\n"
    assert len(mux) == 0
    await asyncio.sleep(0.05)
    assert closed == [None]


async def test_a_backlog_larger_than_one_read_is_read_to_the_end_with_nothing_new_arriving(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """What one read leaves in the socket (the view at the ring's end can be small)
    is read by the next passes though the guest prints nothing more, and the
    hang-up after the last bytes is reported once they are in."""
    sink = Sink(size=16)
    closed: list[OSError | None] = []
    uart, _ = wired(mux, pairs, sink, closed.append)
    sent = bytes(range(256)) * 4
    uart.sendall(sent)
    await wait_for(lambda: bytes(sink.got) == sent, what="the whole backlog read")
    assert sink.reads == len(sent) // 16
    uart.sendall(b"last words, longer than one read")
    uart.close()
    await wait_for(lambda: closed == [None], what="EOF reported after the last bytes")
    assert bytes(sink.got) == sent + b"last words, longer than one read"


async def test_a_paused_uart_is_not_read_until_resumed(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """Flow control: while paused the guest's output waits in the socket, hang-up included."""
    sink = Sink()
    closed: list[OSError | None] = []
    uart, reader = wired(mux, pairs, sink, closed.append)
    mux.pause(reader)
    uart.sendall(b"held")
    uart.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.1)
    assert sink.reads == 0 and closed == []
    mux.resume(reader)
    await wait_for(lambda: closed == [None], what="read after resume")
    assert bytes(sink.got) == b"held"


async def test_a_stale_reader_does_not_unhook_the_link_that_reuses_its_descriptor(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """A link's late clean-up must not stop reading, nor close, the next link given the
    same fd number."""
    _uart, ours = pair(pairs)
    old = mux.add(ours.fileno(), Sink(), lambda exc: None)
    fd = ours.fileno()
    uart2, other = pair(pairs)
    ours.close()  # the number is free again (epoll forgot the file by itself)...
    ours2 = other.dup()  # ...and the next link's socket gets it: dup takes the lowest free
    pairs.append((uart2, ours2))
    assert ours2.fileno() == fd
    sink2 = Sink()
    mux.add(ours2.fileno(), sink2, lambda exc: None)
    mux.remove(old)  # the old link's clean-up, late
    del old  # and its reader collected: its socket object must not close the number
    gc.collect()
    uart2.sendall(b"still read")
    await wait_for(lambda: bytes(sink2.got) == b"still read", what="new link read")
    ours2.sendall(b"key")
    assert uart2.recv(16) == b"key"


async def test_the_mux_never_closes_the_links_descriptor(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """The mux reads through a socket object that only borrows the link's number:
    after the reader is removed (or the mux closed) and dropped, the link still
    writes keystrokes on it, and the VM sees the hang-up exactly when the link
    closes it, not before."""
    for how in ("remove", "close"):
        uart, ours = pair(pairs)
        reader = mux.add(ours.fileno(), Sink(), lambda exc: None)
        if how == "remove":
            mux.remove(reader)
        else:
            mux.close()
        del reader
        gc.collect()
        ours.sendall(b"key")
        assert uart.recv(16) == b"key"
        ours.close()
        uart.settimeout(2)
        assert uart.recv(16) == b"", how


async def test_a_sink_without_a_buffer_gets_chunks(
    mux: ReadMux, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """A backend sink that only takes chunks (on_data) is served too."""
    sink = ChunkSink()
    uart, _ = wired(mux, pairs, sink)
    uart.sendall(b"abc")
    await wait_for(lambda: b"".join(sink.chunks) == b"abc", what="chunk delivered")


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReadMux(budget=0)


async def test_the_daemon_reads_socket_uarts_through_the_mux_and_still_writes_keys(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """A unix-socket console is read by the shared reader; keystrokes, hang-up and
    reconnect work as before."""
    uart = UartServer(tmp_path / "vm.sock", echo=False)
    await uart.start()
    try:
        d = await make_daemon([{"name": "vm", "uart": f"unix:{uart.path}"}])
        console = d.consoles["vm"]
        await wait_for(lambda: console.up, what="link up")
        reads = d._reads
        assert reads is not None and len(reads) == 1
        await uart.print(b"login: ")
        await wait_for(lambda: console.ring.next == 7, what="output logged")
        console.backend.write(b"root\r")
        await wait_for(lambda: uart.received.endswith(b"root\r"), what="keystrokes reach the UART")
        await uart.stop()  # the VM goes away
        await wait_for(lambda: not console.up, what="hang-up seen")
        assert len(reads) == 0
        await uart.start()
        await wait_for(lambda: console.up, what="reconnected")
        assert len(reads) == 1
        await uart.print(b"again")
        await wait_for(lambda: console.ring.next == 12, what="output after reconnect logged")
    finally:
        await uart.stop()
