"""Client floods: a huge paste, oversize frames, a storm of control messages.

Keystrokes get ordinary back-pressure: when the guest's UART reads slowly the
daemon stops reading the client instead of buffering the paste.  The daemon
under test is a real ``serialmuxd run`` process, so its memory (VmRSS) is
its own; the guest is a UART that reads at a fixed, slow rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json, recv_until
from tests.uart import UartServer

PASTE_BYTES = 10 * 1000 * 1000
FRAME = 64 * 1024  # the largest WebSocket frame the daemon takes
UART_RATE = 4_000_000  # bytes a second the slow guest reads
# What the daemon may grow by while a 10 MB paste goes through: a few frames and
# transport buffers, not the paste.
RSS_GROWTH_LIMIT = 4 * 1024 * 1024


def paste_payload(n: int = PASTE_BYTES) -> bytes:
    """Numbered 16-byte records, so a reordered or lost frame is visible."""
    records = b"".join(b"%015d\n" % i for i in range(n // 16 + 1))
    return records[:n]


PASTE = paste_payload()


class SlowUart:
    """A guest UART (QEMU-style unix socket server) that reads at ``rate`` bytes a second."""

    def __init__(self, path: Path, rate: int) -> None:
        self.path = path
        self.rate = rate
        self.received = bytearray()
        self.connected = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        tick = 0.01
        try:
            while True:
                t0 = time.monotonic()
                data = await reader.read(int(self.rate * tick))
                if not data:
                    break
                self.received += data
                await asyncio.sleep(max(0.0, tick - (time.monotonic() - t0)))
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    url: str
    sock_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def daemon_proc(tmp_path: Path, consoles: str) -> Iterator[DaemonProc]:
    """``serialmuxd run`` with the given ``[[console]]`` tables; stopped with SIGTERM."""
    port = free_port()
    cfg = tmp_path / "floods.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\nunix_listen_dir = "{tmp_path}/run"\n'
        f'[http]\nlisten = ["127.0.0.1:{port}"]\n' + consoles
    )
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield DaemonProc(proc, f"http://127.0.0.1:{port}", tmp_path / "run")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as s, asyncio.timeout(20):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                r = await s.get(url + "/readyz")
                if r.status == 200:
                    return
            await asyncio.sleep(0.05)


class RssWatch:
    """Samples a process's VmRSS every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss_bytes(pid)
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> RssWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.fixture
async def slow_uart(tmp_path: Path) -> AsyncIterator[SlowUart]:
    u = SlowUart(tmp_path / "vm1.serial", UART_RATE)
    await u.start()
    yield u
    await u.stop()


async def warm_up(url: str) -> None:
    """One small paste first, so the daemon's allocator has its working set before measuring."""
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        for _ in range(8):
            await ws.send_bytes(b"w" * FRAME)


async def test_10mb_websocket_paste_reaches_slow_guest_in_order_with_bounded_memory(
    tmp_path: Path, slow_uart: SlowUart
) -> None:
    """A 10 MB paste in 64 KiB WebSocket frames reaches a guest that reads 4 MB/s complete
    and in order; the daemon stops reading the client meanwhile (its memory stays flat)."""
    with daemon_proc(tmp_path, f'[[console]]\nname = "vm1"\nuart = "unix:{slow_uart.path}"\n') as d:
        await wait_ready(d.url)
        await asyncio.wait_for(slow_uart.connected.wait(), 10)
        await warm_up(d.url)
        await wait_for(lambda: len(slow_uart.received) == 8 * FRAME, 10, "the warm-up paste")
        slow_uart.received.clear()
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(d.url + "/api/v1/consoles/vm1/session") as ws,
        ):
            await recv_json(ws, "hello")
            async with RssWatch(d.pid) as rss:
                t0 = time.monotonic()
                for i in range(0, len(PASTE), FRAME):
                    await ws.send_bytes(PASTE[i : i + FRAME])
                await wait_for(lambda: len(slow_uart.received) >= len(PASTE), 30, "the whole paste")
                took = time.monotonic() - t0
        assert bytes(slow_uart.received) == PASTE, "the paste arrived changed, reordered or incomplete"
        assert took >= 0.8 * len(PASTE) / UART_RATE  # the guest's pace, not faster
        assert rss.growth < RSS_GROWTH_LIMIT, f"daemon RSS grew by {rss.growth} bytes during the paste"
        assert d.proc.poll() is None


async def test_10mb_local_socket_paste_reaches_slow_guest_in_order_with_bounded_memory(
    tmp_path: Path, slow_uart: SlowUart
) -> None:
    """The same paste through unix_listen_dir/vm1.sock (socat, picocom): back-pressure, no buffering."""
    with daemon_proc(tmp_path, f'[[console]]\nname = "vm1"\nuart = "unix:{slow_uart.path}"\n') as d:
        await wait_ready(d.url)
        await asyncio.wait_for(slow_uart.connected.wait(), 10)
        await warm_up(d.url)
        await wait_for(lambda: len(slow_uart.received) == 8 * FRAME, 10, "the warm-up paste")
        slow_uart.received.clear()
        reader, writer = await asyncio.open_unix_connection(str(d.sock_dir / "vm1.sock"))
        try:
            async with RssWatch(d.pid) as rss:
                t0 = time.monotonic()
                for i in range(0, len(PASTE), FRAME):
                    writer.write(PASTE[i : i + FRAME])
                    await writer.drain()
                await wait_for(lambda: len(slow_uart.received) >= len(PASTE), 30, "the whole paste")
                took = time.monotonic() - t0
        finally:
            writer.close()
        assert bytes(slow_uart.received) == PASTE
        assert took >= 0.8 * len(PASTE) / UART_RATE
        assert rss.growth < RSS_GROWTH_LIMIT, f"daemon RSS grew by {rss.growth} bytes during the paste"
        _ = reader


# --- raw WebSocket frames ---------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, mask)
    return head + mask + masked


def _mask(payload: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


WS_UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def raw_ws(
    host: str, port: int, path: str, *, rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(WS_UPGRADE.format(path=path).encode())
    await writer.drain()
    return reader, writer


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until the daemon closes; (data, True) when it ended with a reset."""
    buf = bytearray()
    async with asyncio.timeout(5):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return bytes(buf), True
            if not chunk:
                return bytes(buf), False
            buf += chunk


@pytest.fixture
async def echo_uarts(tmp_path: Path) -> AsyncIterator[tuple[UartServer, UartServer]]:
    one = UartServer(tmp_path / "vm1.serial", echo=True)
    two = UartServer(tmp_path / "vm2.serial", echo=True)
    await one.start()
    await two.start()
    yield one, two
    await one.stop()
    await two.stop()


async def test_control_message_storm_from_a_client_that_never_reads_is_bounded(
    make_daemon: DaemonFactory, echo_uarts: tuple[UartServer, UartServer]
) -> None:
    """A client that sends pings (or bad control frames) without ever reading the answers
    fills its own bound and is dropped as too_slow; the answers are not queued without end."""
    one, two = echo_uarts
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{one.path}"}, {"name": "vm2", "uart": f"unix:{two.path}"}],
        defaults={"client_buffer_bytes": 65536},
    )
    host, port = d.bound[0].host, d.bound[0].port
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        _, writer = await raw_ws(host, port, "/api/v1/consoles/vm1/session", rcvbuf=4096)
        await wait_for(lambda: d.consoles["vm1"].active is not None, what="storm client attached")
        session = d.consoles["vm1"].active
        ping, bad = ws_frame(0x1, b'{"type":"ping"}'), ws_frame(0x1, b"not json at all")
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # up to 100,000 frames, far beyond a 64 KiB bound of answers
                writer.write((ping + bad) * 250)
                await writer.drain()
                sent += 500
                if d.consoles["vm1"].counters.drops.get("too_slow"):
                    break
        await wait_for(lambda: d.consoles["vm1"].counters.drops.get("too_slow", 0) == 1, 10, "too_slow drop")
        assert session is not None and session.ending is not None
        assert d.consoles["vm1"].active is None
        await other.send_bytes(b"vm2-fine")
        await recv_until(other, b"vm2-fine", timeout=10)
        writer.close()
    _ = sent


async def test_oversize_and_fragmented_oversize_frames_refused_1009_others_unharmed(
    make_daemon: DaemonFactory, echo_uarts: tuple[UartServer, UartServer]
) -> None:
    """A frame over 64 KiB, text or binary, whole or assembled from fragments, ends that
    session with 1009 before anything of it reaches the guest; the other console goes on."""
    one, two = echo_uarts
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{one.path}"}, {"name": "vm2", "uart": f"unix:{two.path}"}]
    )
    host, port = d.bound[0].host, d.bound[0].port
    big = b"Q" * (FRAME + 1)
    cases = {
        "binary": ws_frame(0x2, big),
        "text": ws_frame(0x1, b'{"type":"ping","pad":"' + big + b'"}'),
        "fragments": ws_frame(0x2, big[:40000], fin=False) + ws_frame(0x0, big[40000:], fin=True),
        "length header only": bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + os.urandom(4),
    }
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(url_of(d) + "/api/v1/consoles/vm2/session") as other,
    ):
        await recv_json(other, "hello")
        for name, frame in cases.items():
            reader, writer = await raw_ws(host, port, "/api/v1/consoles/vm1/session")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101"), head
            writer.write(frame)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            rest, reset = await read_to_end(reader)
            close = rest.rfind(b"\x88\x02")
            if close >= 0:
                code = struct.unpack("!H", rest[close + 2 : close + 4])[0]
                assert code == 1009, f"{name}: close code {code}"
            else:
                assert name != "length header only", "nothing was left unread: the close frame must arrive"
                # The daemon closed with the rest of our frame unread, so the kernel
                # answered with a reset, which may overtake the close frame.
                assert reset, f"{name}: neither a close frame nor a reset: {rest[-60:]!r}"
            writer.close()
            assert b"QQQQ" not in one.received, f"{name}: part of the frame reached the guest"
            await other.send_bytes(f"after-{name};".encode())
            await recv_until(other, f"after-{name};".encode(), timeout=10)
        # A frame of exactly 64 KiB is not oversize.
        async with s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
            await recv_json(ws, "hello")
            await ws.send_bytes(b"E" * FRAME)
            await wait_for(lambda: one.received.count(b"E") == FRAME, 10, "the 64 KiB frame at the guest")
    await wait_for(lambda: not d.sessions - {d.consoles["vm2"].active}, 5, "no session left behind")
