"""Running under systemd: the unit file verifies, sd_notify READY/STATUS/STOPPING, hardening holds.

Also home of small helpers for tests that run ``serialmuxd run`` as a process
(free ports, TOML config files, waiting for /readyz).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DaemonProcess

UNIT = REPO / "systemd" / "serialmuxd.service"


# --- helpers shared with test_reload, test_proxy, test_packaging ----------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Just enough TOML for our config shape: tables of scalars and arrays of tables."""
    out: list[str] = []
    for name, body in data.items():
        rows = body if isinstance(body, list) else [body]
        for row in rows:
            out.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in row.items())
            out.append("")
    text = "\n".join(out)
    assert tomllib.loads(text) == dict(data)  # the writer is only trusted once it round-trips
    return text


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(toml_dumps(data))
    return path


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    """Poll ``url``/readyz until 200; fail fast when the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before it was ready")
        try:
            if http_status(url + "/readyz", timeout=1) == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}/readyz did not answer 200 within {timeout} s")
        time.sleep(0.05)


# --- the unit file ----------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """KEY -> values of every assignment in the [Service] section (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, val = line.partition("=")
            settings.setdefault(key, []).append(val)
    return settings


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit; the only change made for the test is pointing
    ExecStart at the serialmuxd this test suite runs (the host path /usr/bin/serialmuxd is absent)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    exe = Path(sys.executable).parent / "serialmuxd"
    assert exe.exists(), "the serialmuxd console script is installed in the test venv"
    text = UNIT.read_text()
    assert text.count("/usr/bin/serialmuxd") == 1  # ExecStart only: nothing else is rewritten
    unit = tmp_path / "serialmuxd.service"
    unit.write_text(text.replace("/usr/bin/serialmuxd", str(exe)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # Offline security review: systemd's own exposure score (0 = locked down, 10 = exposed).
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


def test_unit_file_has_the_promised_settings() -> None:
    """Type=notify, reload by SIGHUP, restart on failure, own user, state/runtime dirs, hardening."""
    s = unit_settings()

    def one(key: str) -> str:
        assert key in s, f"{key}= missing from the unit"
        return s[key][-1]

    assert one("Type") == "notify"
    assert one("ExecStart") == "/usr/bin/serialmuxd run -c /etc/serialmuxd/config.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"  # a config error is not fixed by restarting
    assert one("User") == one("Group") == "serialmuxd"
    assert one("SupplementaryGroups")
    assert one("StateDirectory") == "serialmuxd"
    assert one("RuntimeDirectory") == "serialmuxd"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert s["SystemCallFilter"] == ["@system-service"]
    assert one("CapabilityBoundingSet") == ""
    # tty backends need the real /dev: both would close the device policy to them.
    assert "PrivateDevices" not in s and "ProtectClock" not in s and "DeviceAllow" not in s
    # The stop timeout leaves room for the daemon's own shutdown deadline.
    assert int(one("TimeoutStopSec")) > 5


def test_example_config_passes_check_config_and_sets_every_key() -> None:
    """`serialmuxd check-config -c config.example.toml` passes, and the example shows every key
    the daemon accepts (so it stays the complete reference when keys are added)."""
    from dataclasses import fields

    from serialmuxd.config import ConsoleSettings, DaemonConfig, HttpConfig

    path = REPO / "config.example.toml"
    r = subprocess.run(
        [sys.executable, "-m", "serialmuxd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    example = tomllib.loads(path.read_text())
    assert set(example["daemon"]) == {f.name for f in fields(DaemonConfig)}
    assert set(example["http"]) == {f.name for f in fields(HttpConfig)}
    assert set(example["defaults"]) == {f.name for f in fields(ConsoleSettings)}
    console_keys = set().union(*(c.keys() for c in example["console"]))
    assert {"name", "uart", "qmp", "qmp_chardev"} <= console_keys
    assert set(example["user"][0]) == {"name", "token_sha256", "roles"}


def test_example_config_uses_the_units_directories() -> None:
    """config.example.toml puts state and sockets where StateDirectory/RuntimeDirectory create them."""
    example = tomllib.loads((REPO / "config.example.toml").read_text())
    assert example["daemon"]["state_dir"] == "/var/lib/serialmuxd"
    assert example["daemon"]["unix_listen_dir"] == "/run/serialmuxd"


# --- sd_notify ----------------------------------------------------------------------


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket named by NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def expect(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        """Wait for a datagram line matching ``pattern`` (earlier lines are kept in messages)."""
        rx = re.compile(pattern)
        for line in self.messages:
            if m := rx.fullmatch(line):
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} on NOTIFY_SOCKET; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().splitlines()
            self.messages.extend(lines)
            for line in lines:
                if m := rx.fullmatch(line):
                    return m

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


STATUS = r"STATUS=(\d+) consoles, (\d+) connected, (\d+) interactive sessions?"


def test_notify_ready_only_after_readyz_then_status_and_stopping(
    tmp_path: Path, notify_socket: NotifySocket, daemon_process: Any
) -> None:
    """Type=notify: READY=1 arrives once the listener answers /readyz 200 and the consoles are
    open; STATUS= lines carry console, link and session counts; SIGTERM sends STOPPING=1, exits 0."""
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "http": {"listen": [f"127.0.0.1:{port}"]},
            "console": [
                {"name": "demo1", "uart": "demo:?boot=0"},
                {"name": "vm1", "uart": f"unix:{tmp_path}/absent.serial"},
            ],
        },
    )
    p: DaemonProcess = daemon_process(cfg)
    p.start(env={"NOTIFY_SOCKET": str(notify_socket.path)})
    url = f"http://127.0.0.1:{port}"
    notify_socket.expect("READY=1", timeout=20)
    # The datagram is sent after the listener is bound and the consoles are opened,
    # so the first request after it must already succeed.
    assert http_status(url + "/readyz") == 200
    m = notify_socket.expect(STATUS)
    assert m.group(1) == "2"
    # The demo console connects, the absent VM does not: a later STATUS says so.
    notify_socket.expect(r"STATUS=2 consoles, 1 connected, 0 interactive sessions")

    import asyncio

    import aiohttp

    async def attach() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(url + "/api/v1/consoles/demo1/session") as ws:
            await ws.receive()  # hello
            await asyncio.to_thread(
                notify_socket.expect, r"STATUS=2 consoles, 1 connected, 1 interactive session"
            )

    asyncio.run(attach())
    p.signal(signal.SIGTERM)
    notify_socket.expect("STOPPING=1")
    assert p.wait(15) == 0
    ready_at = notify_socket.messages.index("READY=1")
    assert notify_socket.messages.index("STOPPING=1") > ready_at


def test_no_notify_socket_no_problem(tmp_path: Path, daemon_process: Any) -> None:
    """Outside systemd (no NOTIFY_SOCKET, or a dead one) the daemon runs the same."""
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "http": {"listen": [f"127.0.0.1:{port}"]},
            "console": [{"name": "demo1", "uart": "demo:?boot=0"}],
        },
    )
    p: DaemonProcess = daemon_process(cfg)
    p.start(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert p.proc is not None
    wait_ready(f"http://127.0.0.1:{port}", p.proc)
    p.signal(signal.SIGTERM)
    assert p.wait(15) == 0


# --- hardening: MemoryDenyWriteExecute ------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Sets the kernel's MDWE flag (what MemoryDenyWriteExecute=yes enforces, here by prctl
# rather than seccomp), proves it is in force, then execs the given command.
MDWE_WRAPPER = f"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit(78)  # W+X was allowed: the flag is not in force
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_daemon_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the daemon (CPython, uvloop, aiohttp, RE2,
    ctypes inotify) starts, serves the API, a /wait regex, a WebSocket session, and stops cleanly
    with W+X mappings refused by the kernel."""
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "daemon": {"state_dir": str(tmp_path / "state"), "unix_listen_dir": str(tmp_path / "run")},
            "http": {"listen": [f"127.0.0.1:{port}"]},
            "console": [
                {"name": "demo1", "uart": "demo:?boot=0"},
                {"name": "vm1", "uart": f"unix:{tmp_path}/absent.serial"},
            ],
        },
    )
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", MDWE_WRAPPER, sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(0.2)
        if proc.poll() == 77:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        assert http_status(url + "/api/v1/consoles/demo1/wait?pattern=%23&start=0&timeout_s=5") == 200

        import asyncio

        import aiohttp

        async def session() -> bytes:
            got = bytearray()
            async with (
                aiohttp.ClientSession() as s,
                s.ws_connect(url + "/api/v1/consoles/demo1/session") as ws,
            ):
                await ws.send_bytes(b"echo mdwe-ok\r")
                async with asyncio.timeout(10):
                    while b"mdwe-ok\r\n" not in got:
                        msg = await ws.receive()
                        if msg.type is aiohttp.WSMsgType.BINARY:
                            got += msg.data
            return bytes(got)

        assert b"mdwe-ok\r\n" in asyncio.run(session())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
    assert os.path.exists(tmp_path / "state" / "demo1.ring")
