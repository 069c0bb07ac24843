"""Shared fixtures: an in-process daemon on real sockets, and a daemon process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serialmuxd.auth import new_token, token_sha256
from serialmuxd.config import parse_config
from serialmuxd.daemon import Daemon
from tests.guest import qemu_guest  # noqa: F401  (fixture)
from tests.uart import UartServer

REPO = Path(__file__).resolve().parent.parent


class Users:
    """Tokens for one user per role, made fresh for each test."""

    def __init__(self) -> None:
        self.tokens = {r: new_token() for r in ("reader", "contributor", "owner")}

    def config(self) -> list[dict[str, Any]]:
        return [
            {"name": role, "token_sha256": token_sha256(tok), "roles": {"*": role}}
            for role, tok in self.tokens.items()
        ]

    def header(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def pytest_asyncio_loop_factories(
    config: object, item: object
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, like the daemon (its transports differ from asyncio's)."""
    from serialmuxd.loop import loop_factory

    return {"uvloop": loop_factory()}


@pytest.fixture
def users() -> Users:
    return Users()


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def make_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Start in-process daemons on 127.0.0.1:0; all are shut down at teardown."""
    started: list[Daemon] = []

    async def factory(
        consoles: list[dict[str, Any]],
        *,
        users: list[dict[str, Any]] | None = None,
        defaults: dict[str, Any] | None = None,
        http: dict[str, Any] | None = None,
        daemon: dict[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> Daemon:
        data: dict[str, Any] = {
            "daemon": {"state_dir": str(state_dir or tmp_path / "state"), **(daemon or {})},
            "http": {"listen": ["127.0.0.1:0"], **(http or {})},
            "console": consoles,
        }
        if defaults:
            data["defaults"] = defaults
        if users:
            data["user"] = users
        cfg = parse_config(data, source="test")
        d = Daemon(cfg)
        await d.startup()
        started.append(d)
        return d

    yield factory
    for d in started:
        await d.shutdown()


def url_of(d: Daemon) -> str:
    return d.bound[0].url


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class DaemonProcess:
    """``serialmuxd run`` as a real child process (for signals, kill -9, restarts)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serialmuxd", "run", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(Exception):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    procs: list[DaemonProcess] = []

    def factory(config_path: Path) -> DaemonProcess:
        p = DaemonProcess(config_path, tmp_path / f"daemon-{len(procs)}.log")
        procs.append(p)
        return p

    yield factory
    for p in procs:
        p.stop()


@pytest.fixture
async def uart(tmp_path: Path) -> AsyncIterator[UartServer]:
    """A guest's UART (a real unix-socket server, like QEMU's chardev) that echoes."""
    u = UartServer(tmp_path / "vm1.serial")
    await u.start()
    yield u
    await u.stop()
