"""Output coalescing (``coalesce_ms``): fewer writes for a streaming console, same bytes.

The promises: a console printing continuously reaches its clients in one
write per window instead of one per chunk; every byte arrives exactly once and
in order, across attaches, takeovers and shutdown; and typing is never slowed:
the echo of a keystroke goes out as soon as the UART answers, whatever the
window.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json, recv_until
from tests.uart import UartServer


async def vm1(make_daemon: DaemonFactory, uart: UartServer, coalesce_ms: int, **defaults: object) -> Daemon:
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{uart.path}"}],
        defaults={"coalesce_ms": coalesce_ms, "replay_bytes": 0, **defaults},
    )
    await asyncio.wait_for(uart.connected.wait(), 10)
    return d


async def frames_until(ws: aiohttp.ClientWebSocketResponse, total: int, timeout: float = 10) -> list[bytes]:
    frames: list[bytes] = []
    async with asyncio.timeout(timeout):
        while sum(map(len, frames)) < total:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                frames.append(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                raise AssertionError(f"closed after {frames!r}")
    return frames


async def stream_chunks(uart: UartServer, n: int, gap_s: float) -> bytes:
    sent = bytearray()
    for i in range(n):
        chunk = b"chunk %03d|" % i
        await uart.print(chunk)
        sent += chunk
        await asyncio.sleep(gap_s)
    return bytes(sent)


@pytest.mark.parametrize(("coalesce_ms", "frames_at_most"), [(300, 8), (0, 30)])
async def test_a_streaming_console_reaches_clients_in_fewer_larger_writes(
    make_daemon: DaemonFactory, uart: UartServer, coalesce_ms: int, frames_at_most: int
) -> None:
    """30 chunks printed 20 ms apart arrive exactly, in a handful of frames with a
    300 ms window (one write per window), and one frame per chunk read with 0."""
    d = await vm1(make_daemon, uart, coalesce_ms)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        sent = await stream_chunks(uart, 30, 0.02)
        frames = await frames_until(ws, len(sent))
        assert b"".join(frames) == sent
        assert len(frames) <= frames_at_most
        if coalesce_ms == 0:
            # The control: without a window, chunks read apart go out apart (a busy
            # machine may still merge a few reads).
            assert len(frames) >= 10


async def test_a_quiet_console_sends_its_first_output_at_once(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """The window only applies while a console keeps printing: after a pause, output
    goes out as soon as it is read, even with the widest window."""
    d = await vm1(make_daemon, uart, 1000)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        await uart.print(b"first")
        assert await recv_until(ws, b"first", timeout=0.9) == b"first"
        await asyncio.sleep(1.1)  # quiet for longer than the window
        await uart.print(b"second")
        assert await recv_until(ws, b"second", timeout=0.9) == b"second"


async def test_keystroke_echo_is_not_held_back_by_a_streaming_console(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """Typing into a console that prints continuously: each echo comes back well within
    the 1 s window (a keystroke sends what was gathered, and the answer, at once),
    and output and echoes stay in order."""
    d = await vm1(make_daemon, uart, 1000)
    stop = asyncio.Event()

    async def chatter() -> None:
        i = 0
        while not stop.is_set():
            await uart.print(b"<%d>" % i)
            i += 1
            await asyncio.sleep(0.03)

    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        background = asyncio.create_task(chatter())
        try:
            await asyncio.sleep(0.2)  # the console is streaming: its output is being gathered
            for key in (b"K1", b"K2", b"K3", b"K4", b"K5"):
                began = time.monotonic()
                await ws.send_bytes(key)
                await recv_until(ws, key, timeout=5)
                assert time.monotonic() - began < 0.3, f"echo of {key!r} waited for the window"
        finally:
            stop.set()
            await background
    assert bytes(uart.received) == b"K1K2K3K4K5"


async def test_takeover_within_a_window_shows_every_byte_once(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """Output gathered when a second client takes over goes to the first one before it
    is told, and reaches the newcomer in its replay only: nothing twice, nothing lost."""
    d = await vm1(make_daemon, uart, 1000, replay_bytes=4096)
    console = d.consoles["vm1"]
    async with aiohttp.ClientSession() as s:
        first = await s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session")
        await recv_json(first, "hello")
        await uart.print(b"one,")
        await recv_until(first, b"one,")
        await uart.print(b"two,")  # within the window: gathered, not yet sent
        await wait_for(lambda: console.ring.next == 8)
        second = await s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session")
        hello = await recv_json(second, "hello")
        assert hello["replay_start"] == 0
        assert await recv_until(first, b"two,", timeout=0.9) == b"two,"
        await recv_json(first, "taken_over")
        await uart.print(b"three,")
        seen = await recv_until(second, b"three,")
        assert seen == b"one,two,three,"
        await first.close()
        await second.close()


async def test_shutdown_sends_gathered_output_before_the_goodbye(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """SIGTERM during a window: the client gets the last output, then close 1001."""
    d = await vm1(make_daemon, uart, 1000)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        await uart.print(b"before,")
        await recv_until(ws, b"before,")
        await uart.print(b"last words")
        await wait_for(lambda: d.consoles["vm1"].ring.next == len(b"before,last words"))
        stopper = asyncio.create_task(d.shutdown())
        assert await recv_until(ws, b"last words") == b"last words"
        msg = await ws.receive()
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await stopper


async def test_local_socket_stream_is_exact_with_coalescing(
    make_daemon: DaemonFactory, uart: UartServer, tmp_path: Path
) -> None:
    """The local socket gets the same coalesced stream: every byte once, in order."""
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{uart.path}"}],
        defaults={"coalesce_ms": 200, "replay_bytes": 0},
        daemon={"unix_listen_dir": str(tmp_path / "sock")},
    )
    await asyncio.wait_for(uart.connected.wait(), 10)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(tmp_path / "sock" / "vm1.sock"))
        await wait_for(lambda: d.consoles["vm1"].active is not None)
        sent = await stream_chunks(uart, 40, 0.005)
        got = bytearray()
        async with asyncio.timeout(10):
            while len(got) < len(sent):
                got += await loop.sock_recv(sock, 65536)
        assert bytes(got) == sent


async def test_a_ring_smaller_than_a_window_of_output_still_delivers_every_byte(
    make_daemon: DaemonFactory, uart: UartServer, tmp_path: Path
) -> None:
    """Gathered output waits in the ring log itself, so a 4 KiB ring and a 300 ms window
    with 200 KiB printed in between (chunks of 1 byte to 10 KiB) must not overwrite
    what a client has not been sent yet: every byte arrives once, in order."""
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{uart.path}"}],
        defaults={"coalesce_ms": 300, "replay_bytes": 0, "ring_bytes": 4096},
        daemon={"unix_listen_dir": str(tmp_path / "sock")},
    )
    await asyncio.wait_for(uart.connected.wait(), 10)
    loop = asyncio.get_running_loop()
    sizes = [1, 7, 300, 1023, 1024, 1025, 4095, 4096, 4097, 10240]
    sent = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(tmp_path / "sock" / "vm1.sock"))
        await wait_for(lambda: d.consoles["vm1"].active is not None)
        got = bytearray()

        async def read_all() -> None:
            while len(got) < 200 * 1024:
                got.extend(await loop.sock_recv(sock, 65536))

        reader = asyncio.create_task(read_all())
        i = 0
        while len(sent) < 200 * 1024:
            n = min(sizes[i % len(sizes)], 200 * 1024 - len(sent))
            chunk = bytes((i + k) % 251 for k in range(n))
            await uart.print(chunk)
            sent += chunk
            i += 1
            if i % 16 == 0:
                await asyncio.sleep(0.01)  # some reads apart, some merged
        await asyncio.wait_for(reader, 20)
        assert got == sent
    ring = d.consoles["vm1"].ring
    assert ring.next == len(sent)
    assert ring.read(None)[1] == bytes(sent[-4096:])
