"""Broken ring log files at start-up, through a real ``serialmuxd run`` process.

Truncated, empty, foreign (bad magic), another size, unwritable (immutable
file, read-only file system) and a full disk: whatever the state directory
holds, the daemon starts, serves every console (its demo guest answers a
command through a session and the log reads back), says what happened in one
log line naming the console, counts it in ``serialmuxd_ring_errors_total`` and
shows ``serialmuxd_ring_persistent`` 0 where the log could only be kept in
memory.  (ringlog.py's unit tests cover the file logic itself.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from serialmuxd.ringlog import RingLog, file_size
from tests.test_floods import daemon_proc, wait_ready
from tests.test_sessions import recv_json, recv_until

RING = 16384  # ring_bytes of every console here
DEMO = "demo:?boot=0&baud=0"


def make_ring(path: Path, data: bytes, capacity: int = RING) -> int:
    """A real ring file holding ``data``; returns its next offset."""
    with RingLog.open(path, capacity) as ring:
        ring.append(data)
        return ring.next


def run(*argv: str) -> int:
    """A quick system command (chattr, mount); its exit status."""
    return subprocess.run(argv, check=False).returncode


def consoles_toml(names: list[str]) -> str:
    return "".join(f'[[console]]\nname = "{n}"\nuart = "{DEMO}"\nring_bytes = {RING}\n' for n in names)


def log_lines(path: Path) -> list[dict[str, object]]:
    """The daemon's JSON log lines; it must not have logged a traceback (a crash caught late)."""
    text = path.read_text(errors="replace")
    assert "Traceback" not in text, text[text.index("Traceback") - 200 :][:3000]
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def about(lines: list[dict[str, object]], console: str) -> list[dict[str, object]]:
    """Log lines that talk about ``console``'s ring log."""
    return [
        e
        for e in lines
        if f"{console}.ring" in json.dumps(e)
        or (e.get("console") == console and "ring" in str(e.get("event")))
    ]


def metric(text: str, name: str, console: str | None = None) -> float:
    label = f'{{console="{console}"}}' if console else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{label} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}{label} in the metrics")


async def serves(url: str, console: str) -> dict[str, object]:
    """The console answers a command through an interactive session; returns its JSON."""
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{url}/api/v1/consoles/{console}/session") as ws:
            await recv_json(ws, "hello")
            await ws.send_bytes(b"echo served-$((40+2))\r")
            await recv_until(ws, b"served-42", timeout=10)
        r = await s.get(f"{url}/api/v1/consoles/{console}/log", params={"start": "-200"})
        assert b"served-42" in await r.read()
        info: dict[str, object] = await (await s.get(f"{url}/api/v1/consoles/{console}")).json()
        return info


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        return await (await s.get(url + "/metrics")).text()


async def test_corrupt_and_foreign_ring_files_moved_aside_console_served(tmp_path: Path) -> None:
    """Each broken file is moved aside with one log line; the console runs on a fresh log,
    continuing from the old next offset when the old header could still be read."""
    state = tmp_path / "state"
    state.mkdir()
    ok_next = make_ring(state / "good.ring", b"kept\r\n" * 100)
    sized_next = make_ring(state / "sized.ring", b"x" * 5000, capacity=RING * 2)
    cut_next = make_ring(state / "cut.ring", b"y" * 3000)
    with open(state / "cut.ring", "r+b") as f:
        f.truncate(file_size(RING) // 2)  # header intact, data cut off
    (state / "empty.ring").write_bytes(b"")
    (state / "short.ring").write_bytes(b"SMXRING1\x01")  # shorter than a header
    (state / "foreign.ring").write_bytes(os.urandom(file_size(RING)))
    names = ["good", "sized", "cut", "empty", "short", "foreign"]
    with daemon_proc(tmp_path, consoles_toml(names)) as d:
        await wait_ready(d.url)
        infos = {n: await serves(d.url, n) for n in names}
        text = await scrape(d.url)
        assert d.proc.poll() is None
    lines = log_lines(tmp_path / "daemon.log")
    assert about(lines, "good") == []
    for n in names[1:]:
        said = about(lines, n)
        assert len(said) == 1, f"{n}: {len(said)} log lines about its ring: {said}"
        assert said[0]["event"] == "ringlog_moved_aside" and said[0]["level"] == "warning"
        assert said[0]["console"] == n and said[0]["new_path"].startswith(str(state / f"{n}.ring.corrupt-"))  # type: ignore[union-attr]
        assert len(list(state.glob(f"{n}.ring.corrupt-*"))) == 1, n
        assert metric(text, "serialmuxd_ring_persistent", n) == 1
    assert metric(text, "serialmuxd_ring_errors_total") == 5
    log_of = {n: infos[n]["log"] for n in names}
    assert log_of["good"]["first"] == 0 and log_of["good"]["next"] > ok_next  # type: ignore[index]
    assert log_of["sized"]["first"] == sized_next  # type: ignore[index]
    assert log_of["cut"]["first"] == cut_next  # type: ignore[index]
    for n in ("empty", "short", "foreign"):
        assert log_of[n]["first"] == 0  # type: ignore[index]


async def test_immutable_ring_file_kept_in_memory_from_its_content(tmp_path: Path) -> None:
    """A ring file that cannot be opened for writing (chattr +i) is read once; the log then
    lives in memory from that content, offsets continuing, persistent 0, one error line."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr")
    state = tmp_path / "state"
    state.mkdir()
    old_next = make_ring(state / "frozen.ring", b"before the freeze\r\n")
    if run("chattr", "+i", str(state / "frozen.ring")) != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        with daemon_proc(tmp_path, consoles_toml(["frozen"])) as d:
            await wait_ready(d.url)
            info = await serves(d.url, "frozen")
            async with aiohttp.ClientSession() as s:
                r = await s.get(d.url + "/api/v1/consoles/frozen/log", params={"start": "0"})
                assert (await r.read()).startswith(b"before the freeze\r\n")
            text = await scrape(d.url)
    finally:
        run("chattr", "-i", str(state / "frozen.ring"))
    assert info["log"]["first"] == 0 and info["log"]["next"] > old_next  # type: ignore[index]
    assert "error" in info["log"]  # type: ignore[operator]
    assert metric(text, "serialmuxd_ring_persistent", "frozen") == 0
    assert metric(text, "serialmuxd_ring_errors_total") == 1
    said = about(log_lines(tmp_path / "daemon.log"), "frozen")
    assert len(said) == 1 and said[0]["event"] == "ringlog_in_memory" and said[0]["level"] == "error", said


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=False
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_full_disk_keeps_logs_in_memory_and_serves(tmp_path: Path) -> None:
    """state_dir on a full file system: ring files cannot be made, the audit log and the
    cookie key cannot be written; every console still runs with its log in memory."""
    with tmpfs(tmp_path / "state", "512k") as state:
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        names = ["full1", "full2"]
        with daemon_proc(tmp_path, consoles_toml(names)) as d:
            await wait_ready(d.url)
            infos = {n: await serves(d.url, n) for n in names}
            text = await scrape(d.url)
            assert d.proc.poll() is None
        lines = log_lines(tmp_path / "daemon.log")
        for n in names:
            assert metric(text, "serialmuxd_ring_persistent", n) == 0
            assert "error" in infos[n]["log"]  # type: ignore[operator]
            said = about(lines, n)
            assert (
                len(said) == 1 and said[0]["event"] == "ringlog_in_memory" and said[0]["level"] == "error"
            ), said
            assert "No space left" in json.dumps(said[0])
            assert not (state / f"{n}.ring").exists() and not (state / f"{n}.ring.new").exists()
        assert metric(text, "serialmuxd_ring_errors_total") == 2
        # the audit log could not be written either: said, not crashed on
        assert any(e["event"] == "audit_write_failed" for e in lines)


async def test_read_only_state_dir_continues_from_the_files_in_memory(tmp_path: Path) -> None:
    """state_dir remounted read-only (a failing disk): the rings are read and continued in
    memory at their old offsets; nothing crashes, each console says so once."""
    with tmpfs(tmp_path / "state", "4m") as state:
        nexts = {n: make_ring(state / f"{n}.ring", f"{n} before\r\n".encode()) for n in ("ro1", "ro2")}
        assert run("mount", "-o", "remount,ro", str(state)) == 0
        with daemon_proc(tmp_path, consoles_toml(["ro1", "ro2"])) as d:
            await wait_ready(d.url)
            for n in ("ro1", "ro2"):
                info = await serves(d.url, n)
                assert info["log"]["first"] == 0 and info["log"]["next"] > nexts[n]  # type: ignore[index]
                async with aiohttp.ClientSession() as s:
                    r2 = await s.get(f"{d.url}/api/v1/consoles/{n}/log", params={"start": "0"})
                    assert (await r2.read()).startswith(f"{n} before\r\n".encode())
            text = await scrape(d.url)
            d.proc.terminate()
            assert d.proc.wait(10) == 0
        lines = log_lines(tmp_path / "daemon.log")
        for n in ("ro1", "ro2"):
            assert metric(text, "serialmuxd_ring_persistent", n) == 0
            said = about(lines, n)
            assert (
                len(said) == 1 and said[0]["event"] == "ringlog_in_memory" and said[0]["level"] == "error"
            ), said
        assert metric(text, "serialmuxd_ring_errors_total") == 2
