"""Flow control for the interactive client in a flood, bounded for stuck clients."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json


class Flooder:
    """A guest that prints numbered 64-byte lines as fast as the daemon reads (a socket chardev flood)."""

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.total = total
        self.sent = 0
        self.digest = hashlib.sha256()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = 0
        while self.sent < self.total:
            block = b"".join(b"%010d " % (i + k) + b"x" * 52 + b"\r\n" for k in range(1024))
            i += 1024
            writer.write(block)
            self.digest.update(block)
            self.sent += len(block)
            await writer.drain()
        await asyncio.sleep(3600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def flooder(tmp_path: Path) -> AsyncIterator[Flooder]:
    f = Flooder(tmp_path / "flood.serial", total=64 * 1024 * 1024)
    await f.start()
    yield f
    await f.stop()


async def test_fast_client_gets_a_flood_losslessly(make_daemon: DaemonFactory, flooder: Flooder) -> None:
    """A client that keeps reading receives every byte of a 64 MB flood, in order, and is
    never dropped (the UART is held whenever it falls a buffer behind)."""
    d = await make_daemon(
        [{"name": "f", "uart": f"unix:{flooder.path}"}], defaults={"replay_bytes": 0, "ring_bytes": 1 << 20}
    )
    got = hashlib.sha256()
    n = 0
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/f/session") as ws:
        await recv_json(ws, "hello")
        start = d.consoles["f"].ring.next
        assert start == 0 or start < flooder.total
        async with asyncio.timeout(60):
            while n < flooder.total - start:
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                got.update(msg.data)
                n += len(msg.data)
    c = d.consoles["f"]
    assert c.counters.drops.get("too_slow", 0) == 0
    if start == 0:
        assert got.hexdigest() == flooder.digest.hexdigest()


async def test_stuck_interactive_client_holds_the_uart_once_then_is_dropped(
    make_daemon: DaemonFactory, flooder: Flooder
) -> None:
    """A client that stops reading costs the guest at most flow_hold_ms: then it is
    dropped as too_slow and the UART is read again."""
    d = await make_daemon(
        [{"name": "f", "uart": f"unix:{flooder.path}"}],
        defaults={"replay_bytes": 0, "flow_hold_ms": 300, "client_buffer_bytes": 65536},
    )
    host, port = d.bound[0].host, d.bound[0].port
    import socket

    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, port))
    stuck.sendall(
        b"GET /api/v1/consoles/f/session HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    c = d.consoles["f"]
    with capture_logs() as logs:
        await wait_for(lambda: c.counters.drops.get("too_slow", 0) == 1, 10, "stuck client dropped")
    assert c.counters.holds >= 1
    # The warning says why, so an operator can tell a stuck client from a slow one.
    (slow,) = [e for e in logs if e["event"] == "session_too_slow"]
    assert slow["console"] == "f" and slow["buffer"] == 65536 and slow["flow_hold_ms"] == 300
    assert slow["backlog"] > 65536 // 4 and slow["drained_in_hold"] < 65536 // 4
    after = c.ring.next
    await wait_for(lambda: c.ring.next > after + (1 << 20), 10, "UART read again after the drop")
    stuck.close()


async def test_flow_hold_0_drops_at_once_and_never_pauses(
    make_daemon: DaemonFactory, flooder: Flooder
) -> None:
    d = await make_daemon(
        [{"name": "f", "uart": f"unix:{flooder.path}"}],
        defaults={"replay_bytes": 0, "flow_hold_ms": 0, "client_buffer_bytes": 65536},
    )
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/f/session"):
        # never read: the queue fills at once
        c = d.consoles["f"]
        await wait_for(lambda: c.counters.drops.get("too_slow", 0) == 1, 10, "drop")
        assert c.counters.holds == 0


def test_binary_frame_header_lengths() -> None:
    """Direct-path frames follow RFC 6455 for the 7-bit, 16-bit and 64-bit length forms."""
    from serialmuxd.wssession import binary_frame_header

    assert binary_frame_header(5) == b"\x82\x05"
    assert binary_frame_header(125) == b"\x82\x7d"
    assert binary_frame_header(126) == b"\x82\x7e\x00\x7e"
    assert binary_frame_header(65535) == b"\x82\x7e\xff\xff"
    assert binary_frame_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")
