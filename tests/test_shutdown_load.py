"""SIGTERM under load: 1,000 consoles printing at 115200 baud, 1,000 clients attached.

``serialmuxd run`` with 1,000 ``demo:?rate=11520`` consoles (numbered 64-byte
lines at 11,520 B/s each); half the clients are WebSocket watchers, half are
interactive sessions on the local unix sockets, all reading.  SIGTERM must end
the process with status 0 within 5 s; every WebSocket client gets close 1001
and every local client the farewell line; every client saw consecutive lines;
and every ring file reopens clean, holding consecutive lines that match what
its client received at the same offsets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from serialmuxd.backends.demo import RATE_LINE_BYTES
from serialmuxd.ringlog import RingLog
from tests.test_floods import daemon_proc, wait_ready

pytestmark = pytest.mark.slow

CONSOLES = 1000
RING = 65536
RUN_S = 3.0
LINE_RE = re.compile(rb"(\d{10}) [A-Za-z]{51}\r\n")


@dataclass
class Client:
    console: str
    start: int = 0  # ring offset of the first byte received
    data: bytearray = field(default_factory=bytearray)
    closed_with: object = None


def consecutive(data: bytes, what: str) -> int:
    """The numbered lines in ``data`` (after any boot text) run without a gap; returns how many."""
    nums = [int(m.group(1)) for m in LINE_RE.finditer(data)]
    assert nums == list(range(nums[0], nums[0] + len(nums))) if nums else True, f"{what}: gap or repeat"
    return len(nums)


async def watch(http: aiohttp.ClientSession, url: str, c: Client) -> None:
    async with http.ws_connect(f"{url}/api/v1/consoles/{c.console}/session?mode=watch") as ws:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                c.data += msg.data
            elif msg.type is aiohttp.WSMsgType.TEXT:
                hello = json.loads(msg.data)
                if hello["type"] == "hello":
                    c.start = hello["replay_start"]
        c.closed_with = ws.close_code


async def local(path: Path, c: Client, connected: asyncio.Event) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path))
    connected.set()
    try:
        while chunk := await reader.read(65536):
            c.data += chunk
    finally:
        writer.close()
    c.closed_with = "eof"


async def test_sigterm_with_1000_consoles_and_clients_exits_0_within_5s_logs_intact(tmp_path: Path) -> None:
    names = [f"c{i:04d}" for i in range(CONSOLES)]
    consoles = "".join(
        f'[[console]]\nname = "{n}"\nuart = "demo:?rate=11520&boot=0"\nring_bytes = {RING}\n' for n in names
    )
    clients = [Client(n) for n in names]
    with daemon_proc(tmp_path, consoles) as d:
        await wait_ready(d.url)
        tasks: list[asyncio.Task[None]] = []
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
            gate = asyncio.Semaphore(50)

            async def attach(i: int, c: Client) -> None:
                async with gate:
                    if i % 2:
                        tasks.append(asyncio.create_task(watch(http, d.url, c)))
                        await wait_until(lambda: bool(c.data), 10)
                    else:
                        up = asyncio.Event()
                        tasks.append(asyncio.create_task(local(d.sock_dir / f"{c.console}.sock", c, up)))
                        await asyncio.wait_for(up.wait(), 10)

            t0 = time.monotonic()
            await asyncio.gather(*(attach(i, c) for i, c in enumerate(clients)))
            attach_s = time.monotonic() - t0
            await asyncio.sleep(RUN_S)
            got = sum(len(c.data) for c in clients)
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(d.proc.wait, 10)
            stop_s = time.monotonic() - t0
            done, pending = await asyncio.wait(tasks, timeout=10)
            assert not pending, f"{len(pending)} clients never saw the end"
            for t in done:
                t.result()
    print(f"attach {attach_s:.1f} s, {got} bytes to clients in {RUN_S} s, SIGTERM to exit {stop_s:.2f} s")
    assert code == 0
    assert stop_s < 5.0, f"SIGTERM took {stop_s:.2f} s"
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log and '"event": "stopped"' in log
    for i, c in enumerate(clients):
        if i % 2:
            assert c.closed_with == 1001, (c.console, c.closed_with)
        else:
            assert c.data.endswith(
                b"\r\n[serialmuxd] serialmuxd is shutting down; reconnect when it is back\r\n"
            )
        lines = consecutive(bytes(c.data), c.console)
        assert lines >= RUN_S * 11520 / RATE_LINE_BYTES * 0.5, f"{c.console}: only {lines} lines"
    # Every ring file is whole: it reopens without a notice and holds consecutive lines;
    # a watcher's bytes (whose offsets it knows) match the ring at the same offsets.
    state = tmp_path / "state"
    for i, c in enumerate(clients):
        with RingLog.open(state / f"{c.console}.ring", RING) as ring:
            assert ring.persistent and ring.notice is None and ring.error is None, c.console
            first, data, _ = ring.read(None)
            consecutive(data, f"{c.console} ring")
            if i % 2:
                end = c.start + len(c.data)
                assert ring.next >= end
                lo = max(first, c.start)
                if lo < end:
                    assert data[lo - first : end - first] == bytes(c.data[lo - c.start :]), c.console


async def wait_until(pred: object, timeout: float) -> None:
    assert callable(pred)
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)
