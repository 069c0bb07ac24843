"""Slow HTTP clients cannot hold connections: the request-head deadline (connguard.py).

A client must send a complete request head within ``http.request_head_timeout_s``
of connecting and of each answer; a running WebSocket session, a followed log and
an answer still being read by a slow reader are not cut.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp

from tests.conftest import DaemonFactory, url_of
from tests.uart import UartServer

TIMEOUT_S = 1.0


async def daemon_on(make_daemon: DaemonFactory, uart: UartServer, **defaults: object):  # type: ignore[no-untyped-def]
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{uart.path}"}],
        http={"request_head_timeout_s": TIMEOUT_S},
        defaults=dict(defaults) or None,
    )
    await asyncio.wait_for(uart.connected.wait(), 10)
    return d


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def closed_after(reader: asyncio.StreamReader, limit_s: float) -> float:
    """Seconds until the server closes the connection (EOF or reset)."""
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), limit_s):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


async def test_a_trickled_request_head_is_cut_at_the_deadline(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """A slowloris client (a header byte every 0.2 s, never finishing) is disconnected
    about request_head_timeout_s after connecting, and the cut is counted."""
    d = await daemon_on(make_daemon, uart)
    b = d.bound[0]
    reader, writer = await asyncio.open_connection(b.host, b.port)
    t0 = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.2)
            writer.write(b"a")

    dribbler = asyncio.ensure_future(trickle())
    try:
        await closed_after(reader, 10)
    finally:
        dribbler.cancel()
        writer.close()
    waited = time.monotonic() - t0
    assert TIMEOUT_S * 0.8 <= waited < TIMEOUT_S + 3, waited
    async with aiohttp.ClientSession() as http, http.get(url_of(d) + "/metrics") as r:
        assert metric(await r.text(), "serialmuxd_http_request_head_timeouts_total") == 1


async def test_an_idle_keepalive_connection_is_closed(make_daemon: DaemonFactory, uart: UartServer) -> None:
    """After an answer, a connection that sends nothing more is closed at the deadline."""
    d = await daemon_on(make_daemon, uart)
    b = d.bound[0]
    reader, writer = await asyncio.open_connection(b.host, b.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    waited = await closed_after(reader, 10)
    writer.close()
    assert waited < TIMEOUT_S + 3, waited


async def test_keepalive_requests_within_the_deadline_all_get_answers(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """A client that keeps asking (a scraper, a browser) keeps its connection: each
    answer starts a new deadline."""
    d = await daemon_on(make_daemon, uart)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(5):
            async with http.get(url_of(d) + "/healthz") as r:
                assert r.status == 200
            await asyncio.sleep(TIMEOUT_S * 0.6)
    # One connection carried all five: none was cut and reopened.
    assert d.conn_guard.connections <= 1


async def test_a_websocket_session_and_a_followed_log_outlive_the_deadline(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """Running requests are not limited: a session idle for 3× the deadline still echoes,
    and a follower still gets new output."""
    d = await daemon_on(make_daemon, uart)
    base = url_of(d)
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/api/v1/consoles/vm1/log?follow=1&start=-1") as follow,
    ):
        assert follow.status == 200
        async with http.ws_connect(base + "/api/v1/consoles/vm1/session") as ws:
            await asyncio.sleep(TIMEOUT_S * 3)
            await ws.send_bytes(b"still-here\n")
            seen = b""
            while b"still-here" not in seen:
                msg = await asyncio.wait_for(ws.receive(), 5)
                if msg.type is aiohttp.WSMsgType.BINARY:
                    seen += msg.data
        followed = b""
        while b"still-here" not in followed:
            followed += await asyncio.wait_for(follow.content.read(4096), 5)


async def test_a_slow_reader_gets_the_whole_log_past_the_deadline(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """A 512 KiB log read slowly, over several deadlines, arrives whole: a deadline that
    passes while the answer is still on its way closes gracefully (after the data)."""
    d = await daemon_on(make_daemon, uart)
    payload = bytes(range(256)) * 2048
    await uart.print(payload)
    ring = d.consoles["vm1"].ring
    deadline = time.monotonic() + 10
    while ring.next < len(payload) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    b = d.bound[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (b.host, b.port))
    # A small limit: the stream pauses reading when 8 KiB are unread, so the rest waits
    # in the kernel on the server side, as for a client on a slow link.
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    # Keep-alive (no Connection: close): aiohttp would otherwise close the connection
    # itself after the answer, and the deadline would have nothing to cut.
    writer.write(b"GET /api/v1/consoles/vm1/log HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
    )
    body = b""
    t0 = time.monotonic()
    while len(body) < length:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        if not chunk:
            break
        body += chunk
        await asyncio.sleep(0.02)  # ~200 KiB/s at most: spread over several deadlines
    writer.close()
    assert time.monotonic() - t0 > TIMEOUT_S
    assert len(body) == length and body.endswith(payload), (len(body), length)
