"""The console's output path, one console and its ring, no daemon (a unit of console.py).

Its promises: a chunk read into a console nobody watches costs the ring's own
bookkeeping only (the console is not called); with a client attached, every byte
reaches it exactly once and in order, coalesced while the console streams; the
console is called again only when it has something to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serialmuxd import ringlog
from serialmuxd.config import parse_config
from serialmuxd.console import Console, OutputBatcher
from serialmuxd.ringlog import RingLog
from serialmuxd.session import Ending, Mode, Session


class Client(Session):
    """A session that keeps what it is given."""

    def __init__(self, mode: Mode = Mode.INTERACTIVE) -> None:
        super().__init__(console="vm1", user="u", peer="p", mode=mode)
        self.got = bytearray()
        self.writes = 0

    def deliver(self, data: bytes) -> bool:
        self.got += data
        self.writes += 1
        return True

    def state_changed(self, state: str) -> None:
        pass

    def _close(self, ending: Ending) -> None:
        pass


def read(console: Console, data: bytes) -> None:
    """The UART reader's call: one read of ``data`` straight into the console's ring."""

    def recv_into(view: memoryview) -> int:
        view[: len(data)] = data
        return len(data)

    assert console.receive(recv_into) == len(data)


@pytest.fixture
async def console() -> AsyncIterator[Console]:
    cfg = parse_config(
        {
            "defaults": {"coalesce_ms": 50, "replay_bytes": 0},
            "console": [{"name": "vm1", "uart": "unix:/none"}],
        },
        source="test",
    ).consoles[0]
    batcher = OutputBatcher()
    c = Console(cfg, RingLog.memory(1 << 16), lambda spec, sink: None, batcher=batcher)
    yield c
    batcher.close()


async def test_a_console_nobody_watches_is_not_called_per_chunk(console: Console) -> None:
    """Without clients the ring's watermark is NEVER: reads only store; once a client
    attaches the next byte is its, and after it leaves, reads only store again."""
    ring = console.ring
    assert ring.watermark == ringlog.NEVER
    read(console, b"early boot\r\n")
    assert ring.next == 12
    client = Client()
    console.attach(client)
    assert ring.watermark == ring.next + 1
    read(console, b"login: ")
    assert bytes(client.got) == b"login: "
    console.detach(client)
    assert ring.watermark == ringlog.NEVER
    read(console, b"gone")
    assert bytes(client.got) == b"login: "


async def test_streaming_output_arrives_once_in_order_in_few_writes(console: Console) -> None:
    """Chunks read 5 ms apart reach the client exactly, one write per window, and a
    watcher gets the same; the console is called at the window's end, not per chunk."""
    client, watcher = Client(), Client(Mode.WATCH)
    console.attach(client)
    console.attach(watcher)
    sent = bytearray()
    for i in range(40):
        chunk = b"line %02d\r\n" % i
        read(console, chunk)
        sent += chunk
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # the last window ends
    assert bytes(client.got) == bytes(sent) == bytes(watcher.got)
    assert client.writes <= 12


async def test_a_full_window_goes_out_at_once(console: Console) -> None:
    """Gathered output reaching the coalescing bound is sent on the read that reaches
    it, not at the window's end (a flood never waits for the timer)."""
    client = Client()
    console.attach(client)
    read(console, b"x")  # sent at once (quiet console); the next reads gather
    big = b"y" * 8000
    read(console, big)
    read(console, big)
    assert bytes(client.got) == b"x"  # 16,000 bytes gathered, under the 16 KiB bound
    read(console, big)
    assert bytes(client.got) == b"x" + big * 3


async def test_a_console_keeps_its_attribute_values_inline(console: Console) -> None:
    """Memory per console (at most 64 KiB beyond the ring pages written, at 1,000
    consoles): CPython 3.11 keeps up to 29 attribute values of an instance inline.
    A 30th gives every console a full dict, ~1.3 KiB more each, which the
    1,000-console benchmark saw (WebSocket consoles went over 64 KiB)."""
    assert len(vars(console)) <= 29
