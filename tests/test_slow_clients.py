"""Slow, stuck and vanished clients never stall a UART or another console.

Every stuck client here is a real socket that stops reading (a tiny receive
buffer, so its TCP window closes) and never closes.  The promise checked each
time: the guest's output keeps going into the ring at the guest's rate, the
other console keeps answering, the stuck client is dropped within a bound and
counted in ``session_drops_total``, and its connection is really released
(the daemon's file descriptor count comes back), not left waiting for a
reader that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from serialmuxd import web
from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json, recv_until
from tests.uart import UartServer

WS_UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# Small enough that the client's TCP window closes after a few KiB.
TINY_RCVBUF = 4096
BOUND = 65536  # client_buffer_bytes for these tests
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB of guest output


def open_fds() -> int:
    """File descriptors of this process (the in-process daemon and the test's own clients)."""
    return len(os.listdir("/proc/self/fd"))


def stuck_tcp(host: str, port: int, request: bytes) -> socket.socket:
    """A client that sends one request and then never reads nor closes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)  # before connect: a small window
    s.connect((host, port))
    s.sendall(request)
    return s


def stuck_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
    s.connect(str(path))
    return s


def drops(d: Daemon, console: str, reason: str) -> int:
    return d.consoles[console].counters.drops.get(reason, 0)


@pytest.fixture
async def uarts(tmp_path: Path) -> AsyncIterator[tuple[UartServer, UartServer]]:
    one = UartServer(tmp_path / "vm1.serial", echo=False)
    two = UartServer(tmp_path / "vm2.serial", echo=True)
    await one.start()
    await two.start()
    yield one, two
    await one.stop()
    await two.stop()


async def two_consoles(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path, **kw: object
) -> Daemon:
    one, two = uarts
    d = await make_daemon(
        [
            {"name": "vm1", "uart": f"unix:{one.path}"},
            {"name": "vm2", "uart": f"unix:{two.path}"},
        ],
        defaults={"client_buffer_bytes": BOUND, "ring_bytes": 1 << 22},
        daemon={"unix_listen_dir": str(tmp_path / "run")},
        **kw,  # type: ignore[arg-type]
    )
    await asyncio.wait_for(one.connected.wait(), 10)
    await asyncio.wait_for(two.connected.wait(), 10)
    return d


async def flood_until(
    d: Daemon, uart: UartServer, done: object, *, max_bytes: int = 64 << 20, timeout: float = 20
) -> int:
    """Print 64 KiB chunks as fast as the daemon reads them until ``done()``; returns bytes printed.

    Also checks the promise that matters most: every chunk printed is in the ring
    at once, whatever the stuck clients do (the UART is never slowed).
    """
    assert callable(done)
    console = d.consoles["vm1"]
    start_next = console.ring.next
    printed = 0
    deadline = time.monotonic() + timeout
    while not done():
        assert printed < max_bytes, f"not done after {printed} bytes of output"
        assert time.monotonic() < deadline, "flood timed out"
        await asyncio.wait_for(uart.print(CHUNK), 5)  # would time out if the daemon stopped reading
        printed += len(CHUNK)
    await wait_for(
        lambda: console.ring.next == start_next + printed, 5, "the ring to hold every byte printed"
    )
    return printed


async def echo_check(ws: aiohttp.ClientWebSocketResponse, tag: str) -> None:
    """The other console's interactive session still answers (its UART echoes)."""
    await ws.send_bytes(tag.encode())
    await recv_until(ws, tag.encode(), timeout=10)


async def test_stuck_websocket_watcher_dropped_4009_and_its_socket_released(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """A WebSocket watcher that stops reading is dropped as too_slow once over its bound;
    the daemon then cuts its connection (fd released) instead of waiting for it forever."""
    d = await two_consoles(make_daemon, uarts, tmp_path)
    host, port = d.bound[0].host, d.bound[0].port
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        base = open_fds()
        stuck = stuck_tcp(
            host, port, WS_UPGRADE.format(path="/api/v1/consoles/vm1/session?mode=watch").encode()
        )
        try:
            await wait_for(lambda: d.consoles["vm1"].watcher_count == 1, what="stuck watcher attached")
            await flood_until(d, uarts[0], lambda: drops(d, "vm1", "too_slow") == 1)
            assert d.consoles["vm1"].watcher_count == 0
            await echo_check(other, "vm2-still-answers")
            # Bound: the goodbye gets FINISH_TIMEOUT_S, then the socket is cut.
            await wait_for(lambda: open_fds() == base + 1, 6, "the daemon to release the stuck socket")
            await wait_for(lambda: len(d.sessions) == 1, 2, "the watcher's handler to end")
        finally:
            stuck.close()
    body = d.metrics.render().decode()
    assert 'serialmuxd_session_drops_total{console="vm1",reason="too_slow"} 1.0' in body


async def test_zero_window_follow_stream_dropped_and_released(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """A raw TCP client following the log (follow=1) with a zero window is dropped and cut."""
    d = await two_consoles(make_daemon, uarts, tmp_path)
    host, port = d.bound[0].host, d.bound[0].port
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        base = open_fds()
        req = b"GET /api/v1/consoles/vm1/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        stuck = stuck_tcp(host, port, req)
        try:
            await wait_for(lambda: d.consoles["vm1"].watcher_count == 1, what="follower attached")
            await flood_until(d, uarts[0], lambda: drops(d, "vm1", "too_slow") == 1)
            await echo_check(other, "vm2-after-follow-flood")
            await wait_for(lambda: open_fds() == base + 1, 6, "the daemon to release the stuck follower")
            await wait_for(lambda: len(d.sessions) == 1, 2, "the follower's handler to end")
        finally:
            stuck.close()


async def test_local_socket_client_that_never_reads_dropped_and_released(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """unix_listen_dir/NAME.sock: a client that never reads is dropped as too_slow at once."""
    d = await two_consoles(make_daemon, uarts, tmp_path)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        base = open_fds()
        stuck = stuck_unix(tmp_path / "run" / "vm1.sock")
        try:
            await wait_for(lambda: d.consoles["vm1"].active is not None, what="local session attached")
            await flood_until(d, uarts[0], lambda: drops(d, "vm1", "too_slow") == 1)
            assert d.consoles["vm1"].active is None
            await echo_check(other, "vm2-after-local-flood")
            await wait_for(lambda: open_fds() == base + 1, 6, "the daemon to release the local socket")
        finally:
            stuck.close()


async def test_silent_websocket_client_dropped_by_heartbeat_and_counted(
    make_daemon: DaemonFactory,
    uarts: tuple[UartServer, UartServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that vanished (never answers a ping) on a quiet console is dropped after the
    heartbeat bound (WS_HEARTBEAT_S plus half of it), counted as ``unresponsive``."""
    monkeypatch.setattr(web, "WS_HEARTBEAT_S", 1.0)
    d = await two_consoles(make_daemon, uarts, tmp_path)
    host, port = d.bound[0].host, d.bound[0].port
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        base = open_fds()
        gone = stuck_tcp(host, port, WS_UPGRADE.format(path="/api/v1/consoles/vm1/session").encode())
        stop = asyncio.Event()

        async def live_client() -> int:
            # aiohttp answers pings while receive() runs: a live client keeps reading.
            n = 0
            while not stop.is_set():
                await echo_check(other, f"alive-{n};")
                n += 1
                await asyncio.sleep(0.1)
            return n

        live = asyncio.create_task(live_client())
        try:
            await wait_for(lambda: d.consoles["vm1"].active is not None, what="silent session attached")
            t0 = time.monotonic()
            await wait_for(lambda: d.consoles["vm1"].active is None, 8, "the heartbeat to drop the session")
            took = time.monotonic() - t0
            assert took < 1.5 * 1.0 + 2.0, took
            assert drops(d, "vm1", "unresponsive") == 1
            await wait_for(lambda: open_fds() == base + 1, 6, "the daemon to release the silent socket")
            # the live client answered its pings all along and is still there
            assert drops(d, "vm2", "unresponsive") == 0
        finally:
            stop.set()
            gone.close()
        assert await live > 5
    body = d.metrics.render().decode()
    assert 'serialmuxd_session_drops_total{console="vm1",reason="unresponsive"} 1.0' in body


async def test_quiet_websocket_client_that_answers_pings_is_kept(
    make_daemon: DaemonFactory,
    uarts: tuple[UartServer, UartServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that types nothing on a quiet console but answers the server's pings stays
    attached for many heartbeat periods, and the server answers the client's own pings."""
    monkeypatch.setattr(web, "WS_HEARTBEAT_S", 0.5)
    d = await two_consoles(make_daemon, uarts, tmp_path)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session", autoping=False) as ws,
    ):
        await recv_json(ws, "hello")
        pings = 0
        deadline = time.monotonic() + 4.0  # eight heartbeat periods
        while time.monotonic() < deadline:
            try:
                msg = await ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            assert msg.type is not aiohttp.WSMsgType.CLOSE, msg
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1
                await ws.pong(msg.data)
        assert pings >= 3, f"the server pinged a silent client {pings} times in 4 s"
        assert d.consoles["vm1"].active is not None and drops(d, "vm1", "unresponsive") == 0
        await ws.ping(b"are-you-there")
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is aiohttp.WSMsgType.PONG:
                assert msg.data == b"are-you-there"
                break
            assert msg.type is aiohttp.WSMsgType.PING, msg


async def test_many_stuck_clients_at_once_never_slow_the_uart(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """Ten stuck watchers of each kind on vm1 while it floods: every byte the guest prints
    reaches the ring at once, vm2's session keeps echoing, all thirty are dropped and released."""
    d = await two_consoles(make_daemon, uarts, tmp_path)
    host, port = d.bound[0].host, d.bound[0].port
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        base = open_fds()
        clients: list[socket.socket] = []
        try:
            for _ in range(10):
                clients.append(
                    stuck_tcp(
                        host, port, WS_UPGRADE.format(path="/api/v1/consoles/vm1/session?mode=watch").encode()
                    )
                )
                clients.append(
                    stuck_tcp(
                        host,
                        port,
                        b"GET /api/v1/consoles/vm1/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                    )
                )
            await wait_for(lambda: d.consoles["vm1"].watcher_count == 20, what="20 stuck watchers attached")
            echoes = 0

            def all_dropped() -> bool:
                return drops(d, "vm1", "too_slow") == 20

            async def keep_echoing() -> None:
                nonlocal echoes
                while not all_dropped():
                    await echo_check(other, f"echo-{echoes};")
                    echoes += 1

            echo_task = asyncio.create_task(keep_echoing())
            t0 = time.monotonic()
            printed = await flood_until(d, uarts[0], all_dropped)
            elapsed = time.monotonic() - t0
            await echo_task
            assert echoes >= 1
            assert d.consoles["vm1"].watcher_count == 0
            await wait_for(lambda: open_fds() == base + len(clients), 8, "every stuck socket released")
            # The stuck clients cost the guest nothing: tens of MB/s went through.
            assert printed / elapsed > 1e6, f"{printed} bytes in {elapsed:.1f} s"
        finally:
            for c in clients:
                with contextlib.suppress(OSError):
                    c.close()


async def test_followers_and_waiters_that_leave_a_quiet_console_are_forgotten(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """A `log?follow=1` reader or a `/wait` caller that hangs up while the console is quiet is
    forgotten at once: no watcher, session or task is left behind waiting for output."""
    d = await two_consoles(make_daemon, uarts, tmp_path)
    base_url = url_of(d) + "/api/v1/consoles/vm1"
    await asyncio.sleep(0.1)
    tasks_before = len(asyncio.all_tasks())
    fds_before = open_fds()
    for _ in range(5):
        async with aiohttp.ClientSession() as s:
            r = await s.get(base_url + "/log", params={"follow": "1"})
            assert r.status == 200
            await wait_for(lambda: d.consoles["vm1"].watcher_count == 1, what="follower attached")
            waiter = asyncio.create_task(
                s.get(base_url + "/wait", params={"pattern": "never", "timeout_s": "600"})
            )
            await asyncio.sleep(0.2)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            r.close()
    await wait_for(lambda: d.consoles["vm1"].watcher_count == 0, 3, "the followers to be forgotten")
    await wait_for(lambda: not d.sessions, 3, "no session left")
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, 3, "the handlers' tasks to end")
    await wait_for(lambda: open_fds() <= fds_before, 3, "their sockets closed")


async def test_http_connections_probe_a_vanished_peer_within_a_minute(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """A log follower of a quiet console whose host vanished (no FIN, no RST) is never written
    to and has no heartbeat: TCP keepalive on every HTTP connection, first probe after 30 s
    and dropped after 3 unanswered ones, bounds it (the kernel default is two hours)."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uarts[0].path}"}])
    port = d.bound[0].port
    async with aiohttp.ClientSession() as s:
        r = await s.get(url_of(d) + "/api/v1/consoles/vm1/log", params={"follow": "1"})
        assert r.status == 200
        out = await asyncio.to_thread(
            subprocess.run,
            ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        )
        r.close()
    timers = [int(t) for t in re.findall(r"timer:\(keepalive,(\d+)(?:\.\d+)?sec", out.stdout)]
    assert timers and all(0 < t <= 30 for t in timers), out.stdout


async def test_local_client_that_pauses_then_reads_gets_every_byte_in_order(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """A local client that stops reading for a while (within its buffer bound) and
    then reads again gets all the output, in order, none twice: what the socket
    could not take waits in the session's buffer, and nothing overtakes it."""
    one, _ = uarts
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{one.path}"}],
        defaults={"client_buffer_bytes": 8 << 20, "ring_bytes": 1 << 24},
        daemon={"unix_listen_dir": str(tmp_path / "run")},
    )
    await asyncio.wait_for(one.connected.wait(), 10)
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "run" / "vm1.sock"))
    try:
        await wait_for(lambda: d.consoles["vm1"].active is not None, what="local session attached")
        lines = [f"{i:07d}\n".encode() for i in range(200_000)]
        # Paused client: ~1.6 MB, more than the socket holds, printed in ragged pieces.
        for i in range(0, 150_000, 1500):
            await one.print(b"".join(lines[i : i + 1500]))
        await wait_for(
            lambda: d.consoles["vm1"].active is not None and d.consoles["vm1"].active.backlog() > 0,
            what="output waiting in the session's buffer",
        )
        got = bytearray()
        want = b"".join(lines)

        async def read_all() -> None:
            while len(got) < len(want):
                got.extend(await reader.read(1 << 16))

        reading = asyncio.create_task(read_all())
        # Printed while the backlog drains, then after it: both paths, one stream.
        for i in range(150_000, 200_000, 500):
            await one.print(b"".join(lines[i : i + 500]))
            await asyncio.sleep(0.001)
        await asyncio.wait_for(reading, 20)
        assert bytes(got) == want
        assert drops(d, "vm1", "too_slow") == 0
    finally:
        writer.close()
