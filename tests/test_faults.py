"""Faults: the daemon killed mid-flood, the VM quitting, crashing and coming back.

- ``kill -9`` of ``serialmuxd run`` while a guest floods its UART: after a
  restart the ring log holds every byte the daemon had read (what a live
  watcher received is there byte for byte, the guest's numbered lines have no
  gap and no duplicate) and new output continues at the old next offset.
- The VM quits, crashes (``kill -9`` of QEMU) and is reset, again and again,
  with an interactive session and a ``log?follow=1`` watcher attached: the
  console reconnects each time without a daemon restart, and the daemon's
  open file descriptors and asyncio tasks are the same before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.guest import INIT_MARKER, GuestFactory, QemuGuest
from tests.test_floods import daemon_proc, wait_ready
from tests.test_sessions import recv_json, recv_until
from tests.uart import UartServer

# A guest that prints numbered lines as fast as the daemon takes them (a QEMU-style
# unix socket server, one client at a time, in its own process so the daemon is
# the bottleneck).  Lines are "%010d\n"; a reconnecting client first gets
# "RECONNECT\n", then a few more lines, then silence.
FLOODER = r"""
import socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
LINES = 4096
fmt = b"%010d\n" * LINES
n = 0
conns = 0
while True:
    conn, _ = srv.accept()
    conns += 1
    try:
        if conns > 1:
            conn.sendall(b"RECONNECT\n")
            for _ in range(4):
                chunk = fmt % tuple(range(n, n + LINES))
                n += LINES
                conn.sendall(chunk)
            while conn.recv(4096):
                pass
            continue
        while True:
            chunk = fmt % tuple(range(n, n + LINES))
            n += LINES  # before sending: a chunk cut by the kill is never renumbered
            conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()
"""
LINE = 11
KILL_AFTER = 6 * 1000 * 1000  # bytes the watcher has seen when the daemon is killed


@contextlib.contextmanager
def flooder(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", FLOODER, str(path)])
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "flooder did not start"
            assert proc.poll() is None, "flooder died"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def check_numbered(data: bytes, first: int = 0) -> int:
    """``data`` is consecutive lines first, first+1, … (the last one may be cut); returns the
    number of complete lines.  Raises with the place of the first gap or duplicate."""
    lines = data.split(b"\n")
    for i, line in enumerate(lines[:-1]):
        want = b"%010d" % (first + i)
        assert line == want, f"line {i} at offset {i * LINE} is {line!r}, expected {want!r}"
    tail = lines[-1]
    assert (b"%010d" % (first + len(lines) - 1)).startswith(tail), f"cut line {tail!r} does not fit"
    return len(lines) - 1


async def follow(url: str, sink: bytearray, started: asyncio.Event) -> None:
    """A live watcher: log?follow=1 from offset 0, everything appended to ``sink``."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        r = await s.get(url + "/api/v1/consoles/vm1/log", params={"follow": "1", "start": "0"})
        assert r.status == 200 and r.headers["X-Log-Start"] == "0"
        started.set()
        with contextlib.suppress(aiohttp.ClientError):
            async for chunk in r.content.iter_any():
                sink += chunk


async def test_kill_9_mid_flood_loses_nothing_the_daemon_had_read(tmp_path: Path) -> None:
    """SIGKILL while a guest floods at full speed: after restart the log from offset 0 starts
    with exactly what a live watcher had received, the guest's numbered lines run without a
    gap or duplicate up to the kill, and the new connection's output follows at the old next
    offset."""
    uart = tmp_path / "vm1.serial"
    consoles = (
        f'[[console]]\nname = "vm1"\nuart = "unix:{uart}"\n'
        f"ring_bytes = {128 << 20}\nclient_buffer_bytes = {64 << 20}\n"
    )
    seen = bytearray()
    with flooder(uart):
        with daemon_proc(tmp_path, consoles) as d:
            await wait_ready(d.url)
            started = asyncio.Event()
            watcher = asyncio.create_task(follow(d.url, seen, started))
            await asyncio.wait_for(started.wait(), 10)
            await wait_for(lambda: len(seen) >= KILL_AFTER, 30, f"{KILL_AFTER} bytes at the watcher")
            assert d.proc.poll() is None
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            await asyncio.wait_for(watcher, 10)  # its stream ends with the daemon
        watched = bytes(seen)
        assert len(watched) >= KILL_AFTER
        with daemon_proc(tmp_path, consoles) as d:
            await wait_ready(d.url)
            base = d.url + "/api/v1/consoles/vm1"
            async with aiohttp.ClientSession() as s:
                r = await s.get(
                    base + "/wait", params={"pattern": "RECONNECT", "start": "0", "timeout_s": "20"}
                )
                assert r.status == 200, await r.text()
                old_next = (await r.json())["start"]
                r = await s.get(base + "/log", params={"start": "0", "max_bytes": str(old_next)})
                before = await r.read()
                assert r.headers["X-Log-Start"] == "0" and r.headers["X-Log-Truncated"] == "false"
                # the reconnected guest's few lines, after the marker
                await asyncio.sleep(0.3)
                r = await s.get(base + "/log", params={"start": str(old_next)})
                after = await r.read()
                info = await (await s.get(base)).json()
        log_text = (tmp_path / "daemon.log").read_text()
    assert "ringlog_moved_aside" not in log_text and "ringlog_in_memory" not in log_text, "ring not reused"
    assert info["log"]["first"] == 0, "the ring wrapped: make ring_bytes larger"
    assert len(before) == old_next >= len(watched), "the log lost bytes the watcher had seen"
    assert before[: len(watched)] == watched, "the log differs from what the watcher received"
    complete = check_numbered(before)
    assert complete * LINE >= KILL_AFTER - LINE
    # Offsets continue: the reconnect marker sits exactly at the old next offset, and
    # the lines after it follow on (numbers past the chunk cut off by the kill).
    assert after.startswith(b"RECONNECT\n")
    tail = after[len(b"RECONNECT\n") :]
    first_after = int(tail[:10])
    assert first_after > complete
    assert check_numbered(tail, first_after) >= 4 * 4096 - 1


async def test_wait_finds_a_match_anywhere_in_a_flood(make_daemon: DaemonFactory, uart_path: Path) -> None:
    """/wait searches every byte: a match far behind `start` in a long log, one across a
    64 KiB boundary, and one in the middle of a burst that arrives between two polls."""
    vm = UartServer(uart_path, echo=False)
    await vm.start()
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart_path}"}], defaults={"ring_bytes": 8 << 20})
    await asyncio.wait_for(vm.connected.wait(), 10)
    filler = b"." * 65536
    await vm.print(b"early-needle" + filler * 40)
    await vm.print(filler[:-5] + b"straddle-needle" + filler * 3)
    await wait_for(lambda: d.consoles["vm1"].ring.next == 12 + 65536 * 44 + 10, 10, "the flood in the ring")
    url = url_of(d) + "/api/v1/consoles/vm1/wait"
    async with aiohttp.ClientSession() as s:
        r = await s.get(url, params={"pattern": "early-needle", "start": "0", "timeout_s": "1"})
        assert (await r.json()) == {"match": "early-needle", "start": 0, "end": 12}
        r = await s.get(url, params={"pattern": "straddle-needle", "start": "0", "timeout_s": "1"})
        body = await r.json()
        assert body["start"] == 12 + 65536 * 41 - 5, body
        nxt = d.consoles["vm1"].ring.next
        waiter = asyncio.create_task(s.get(url, params={"pattern": "burst-needle", "timeout_s": "10"}))
        await asyncio.sleep(0.2)
        await vm.print(filler * 8 + b"burst-needle" + filler * 8)
        r = await waiter
        assert (await r.json())["start"] == nxt + 65536 * 8
    await vm.stop()


@pytest.mark.qemu
@pytest.mark.slow
async def test_kill_9_mid_seq_in_a_real_guest_loses_nothing_read(
    tmp_path: Path, qemu_guest: GuestFactory
) -> None:
    """The same with a real guest printing `seq`: killed mid-output, the restarted daemon's
    log holds what the watcher saw, in order, and the guest's later output follows it."""
    vm: QemuGuest = qemu_guest(start=False, qmp=False, wait=True)
    consoles = f'[[console]]\nname = "vm1"\nuart = "unix:{vm.uart_path}"\nring_bytes = {16 << 20}\n'
    seen = bytearray()
    await asyncio.to_thread(vm.start)
    with daemon_proc(tmp_path, consoles) as d:
        await wait_ready(d.url)
        started = asyncio.Event()
        watcher = asyncio.create_task(follow(d.url, seen, started))
        await asyncio.wait_for(started.wait(), 10)
        async with aiohttp.ClientSession() as s, s.ws_connect(d.url + "/api/v1/consoles/vm1/session") as ws:
            await recv_json(ws, "hello")
            await recv_until(ws, b"guest# ", timeout=60)
            await asyncio.sleep(0.3)
            await ws.send_bytes(b"seq 1 200000\r")
            await wait_for(lambda: b"\r\n60000\r\n" in seen[-200000:], 60, "seq to reach 60000")
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
        await asyncio.wait_for(watcher, 10)
    watched = bytes(seen)
    old_next = ring_next_on_disk(tmp_path / "state" / "vm1.ring")
    assert old_next >= len(watched)
    with daemon_proc(tmp_path, consoles) as d:
        await wait_ready(d.url)
        base = d.url + "/api/v1/consoles/vm1"
        async with aiohttp.ClientSession() as s:
            r = await s.get(base + "/log", params={"start": "0", "max_bytes": str(old_next)})
            before = await r.read()
            assert len(before) == old_next and before[: len(watched)] == watched
            pattern = r"\r\n200000\r\n"
            r = await s.get(
                base + "/wait", params={"pattern": pattern, "start": str(old_next), "timeout_s": "60"}
            )
            assert r.status == 200, await r.text()
            r = await s.get(
                base + "/log", params={"start": str(old_next), "max_bytes": str((await r.json())["end"])}
            )
            after = await r.read()
    # Up to the kill: the guest's numbers in order, none twice.  TCG can drop a character
    # of guest output now and then (QEMU-RIG-NOTES: "1207" arrives as "207", or a line
    # goes missing), so up to 3 such slips are let through; a repeated or lost chunk of
    # output would be many.  The bytes themselves are compared with the watcher above.
    nums = [int(m) for m in re.findall(rb"\r\n(\d+)(?=\r\n)", before)]
    nums = nums[nums.index(1) :]
    assert seq_slips(nums, 1) <= 3, f"lines out of sequence before the kill: {nums[:50]}..."
    # After the restart (QEMU threw away what the guest printed meanwhile): later numbers,
    # in sequence, up to the end of seq.
    later = [int(m) for m in re.findall(rb"\r\n(\d+)(?=\r\n)", after)]
    assert later and later[0] > nums[-1] and later[-1] == 200000
    assert seq_slips(later, later[0]) <= 3, "lines out of sequence after the restart"


def seq_slips(nums: list[int], first: int) -> int:
    """How far ``nums`` is from first, first+1, …: lines missing plus numbers garbled."""
    slips, want = 0, first
    for n in nums:
        if n == want:
            want += 1
        elif want < n <= want + 3:  # a line or a few lost
            slips += n - want
            want = n + 1
        else:  # a garbled number (a dropped digit), or a repeat
            slips += 1
            want += 1
    return slips


def ring_next_on_disk(path: Path) -> int:
    """The next offset a ring file records (header field at byte 64), read with no lock."""
    with open(path, "rb") as f:
        head = f.read(72)
    return int(struct.unpack_from("<Q", head, 64)[0])


# --- VM lifecycle -------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Attached:
    """An interactive WebSocket session and a log?follow=1 watcher, both kept reading."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session_out = bytearray()
        self.states: list[str] = []
        self.watched = bytearray()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Attached:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        self.ws = await self._http.ws_connect(self.url + "/api/v1/consoles/vm1/session")
        await recv_json(self.ws, "hello")
        r = await self._http.get(self.url + "/api/v1/consoles/vm1/log", params={"follow": "1"})
        assert r.status == 200
        self._tasks = [asyncio.create_task(self._read_ws()), asyncio.create_task(self._read_log(r))]
        return self

    async def _read_ws(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                self.session_out += msg.data
            elif msg.type is aiohttp.WSMsgType.TEXT and '"state"' in msg.data:
                self.states.append(msg.json()["state"])

    async def _read_log(self, r: aiohttp.ClientResponse) -> None:
        async for chunk in r.content.iter_any():
            self.watched += chunk

    async def type(self, data: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(data)

    @property
    def alive(self) -> bool:
        return all(not t.done() for t in self._tasks)

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await t
        if self.ws is not None:
            await self.ws.close()
        if self._http is not None:
            await self._http.close()


async def settle(d: Daemon) -> tuple[int, int]:
    """(open fds, asyncio tasks) once the loop has had a moment to finish what it started."""
    await asyncio.sleep(0.3)
    return open_fds(), len(asyncio.all_tasks())


@pytest.fixture
async def uart_path(tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path / "vm1.serial"


async def test_uart_gone_and_back_20_times_reconnects_without_leaking(
    make_daemon: DaemonFactory, uart_path: Path
) -> None:
    """The VM's socket closes (quit) or vanishes (crash) and comes back 20 times with a
    session and a follower attached: each time the console reconnects, both clients see the
    new output, and the daemon's fds and tasks are what they were."""
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart_path}"}])
    vm = UartServer(uart_path)
    await vm.start()
    await asyncio.wait_for(vm.connected.wait(), 10)
    async with Attached(url_of(d)) as clients:
        await vm.print(b"boot 0\r\n")
        await wait_for(lambda: b"boot 0" in clients.watched, what="first boot seen")
        fds, tasks = await settle(d)
        for cycle in range(1, 21):
            if cycle % 2:
                await vm.stop()  # quit: QEMU closes the link and removes its socket
            else:
                # crash: the process dies; the socket file stays behind, refusing
                if vm._writer is not None:
                    vm._writer.transport.abort()
                assert vm._server is not None
                vm._server.close()
            await wait_for(lambda: not d.consoles["vm1"].up, 5, "the console to go down")
            with contextlib.suppress(FileNotFoundError):
                uart_path.unlink()
            vm = UartServer(uart_path)
            await vm.start()
            await asyncio.wait_for(vm.connected.wait(), 5)
            line = f"boot {cycle}\r\n".encode()
            await vm.print(line)
            await clients.type(f"typed {cycle};".encode())
            typed, guest = f"typed {cycle};".encode(), vm
            await wait_for(
                lambda line=line: line in clients.watched and line in clients.session_out, 5, "new boot"
            )
            await wait_for(lambda t=typed, g=guest: t in g.received, 5, "keystrokes at the guest")
        assert clients.alive
        assert d.consoles["vm1"].counters.reconnects == 20
        assert clients.states.count("stopped") == 20 and clients.states.count("running") == 20
        after = await settle(d)
        assert after == (fds, tasks), f"fds, tasks before {(fds, tasks)} and after {after}"
    await vm.stop()


async def test_dying_vm_does_not_flap_the_console(make_daemon: DaemonFactory, uart_path: Path) -> None:
    """A VM that drops the link a moment before its listening socket goes (as a killed QEMU
    tears down its fds) is one stop: no reconnect into the dying socket, no running/stopped
    flapping shown to the attached session."""
    import socket

    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(uart_path))
    listener.listen(8)
    listener.setblocking(False)
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart_path}"}])
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
    async with Attached(url_of(d)) as clients:
        await wait_for(lambda: d.consoles["vm1"].up, 5, "link up")
        conn.close()  # the link drops first...
        await asyncio.sleep(0.02)
        listener.close()  # ...then the listening socket, never accepting again
        await wait_for(lambda: "stopped" in clients.states, 5, "stopped")
        await asyncio.sleep(0.3)
        assert clients.states == ["stopped"], clients.states
        assert d.consoles["vm1"].counters.reconnects == 0


@pytest.mark.qemu
@pytest.mark.slow
async def test_real_vm_quit_crash_reset_cycles_reconnect_without_leaking(
    make_daemon: DaemonFactory, qemu_guest: GuestFactory
) -> None:
    """QEMU quits (SIGTERM), is killed (-9), is reset through the daemon's QMP link and
    started again, with a session and a follower attached: each boot is seen on both,
    keystrokes reach the new guest, no daemon restart, no leaked fd or task."""
    vm: QemuGuest = qemu_guest(start=False, qmp=True)
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{vm.uart_path}", "qmp": f"unix:{vm.qmp_path}"}],
    )
    await asyncio.to_thread(vm.start)
    console = d.consoles["vm1"]

    async def booted(clients: Attached, boots: int) -> None:
        await wait_for(lambda: clients.watched.count(INIT_MARKER) >= boots, 60, f"boot {boots}")
        await wait_for(lambda: clients.session_out.count(INIT_MARKER) >= boots, 5, f"boot {boots} in session")

    async def answers(clients: Attached, tag: str) -> None:
        async with asyncio.timeout(40):
            while f"\r\n{tag}-ok".encode() not in clients.session_out:
                await clients.type(f"echo {tag}-ok\r".encode())
                await asyncio.sleep(1.5)

    async with Attached(url_of(d)) as clients:
        await booted(clients, 1)
        await answers(clients, "boot1")
        await wait_for(lambda: console.qmp is not None and console.vm_status == "running", 10, "QMP up")
        fds, tasks = await settle(d)
        boots = 1
        for how in ("quit", "kill", "reset"):
            if how == "reset":
                async with aiohttp.ClientSession() as s:
                    r = await s.post(url_of(d) + "/api/v1/consoles/vm1/reset")
                    assert r.status == 200, await r.text()
            else:
                assert vm.pid is not None
                if how == "quit":
                    os.kill(vm.pid, signal.SIGTERM)
                    await asyncio.to_thread(vm.wait_exit, 20)
                else:
                    await asyncio.to_thread(vm.kill)
                await wait_for(lambda: not console.up, 10, f"the console to go down after {how}")
                await asyncio.to_thread(vm.start)
            boots += 1
            await booted(clients, boots)
            await answers(clients, f"boot{boots}")
            await wait_for(lambda: console.vm_status == "running", 10, "QMP back")
        assert clients.alive
        assert console.counters.reconnects == 2
        after = await settle(d)
        assert after == (fds, tasks), f"fds, tasks before {(fds, tasks)} and after {after}"


async def test_ended_websocket_sessions_are_freed_at_once(make_daemon: DaemonFactory) -> None:
    """Sessions that end (closed by the client, taken over) leave nothing behind: no
    WebSocketResponse is still alive a moment later (aiohttp's heartbeat timers used to
    keep each for up to 45 s, a plateau of megabytes under steady takeovers)."""
    import gc

    from aiohttp import web as aioweb

    d = await make_daemon([{"name": "vm1", "uart": "demo:?rate=11520&boot=0"}])

    async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _ in ws:  # reading: aiohttp answers the daemon's close frame
            pass

    async with aiohttp.ClientSession() as s:
        old: asyncio.Task[None] | None = None
        for _ in range(40):
            ws = await s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session")
            await recv_json(ws, "hello")  # the previous session is taken over here
            await recv_until(ws, b"\r\n")
            if old is not None:
                await asyncio.wait_for(old, 5)
            old = asyncio.create_task(until_closed(ws))
        await ws.close()
    await wait_for(lambda: not d.sessions, 5, "every session ended")
    assert d.consoles["vm1"].counters.takeovers == 39

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, aioweb.WebSocketResponse))

    await wait_for(lambda: alive() == 0, 3, "every WebSocketResponse freed")
