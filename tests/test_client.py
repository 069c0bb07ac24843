"""The ``serialmuxd`` client commands, run as real processes against a real daemon.

Each test starts an in-process daemon on 127.0.0.1 and runs the CLI as a
subprocess against its port, so argument parsing, the HTTP client, the
output and the exit statuses are all the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from serialmuxd.client import format_table, human_bytes, normalize_url
from serialmuxd.config import parse_config
from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, Users, url_of, wait_for
from tests.uart import UartServer

DEMO_PROMPT = b"demo# "


@dataclass
class Result:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERIALMUXD_")}
    env.update(extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


class Rig:
    """A daemon with a demo console ``vm1`` and a raw UART console ``raw``."""

    def __init__(self, daemon: Daemon, users: Users, uart: UartServer) -> None:
        self.daemon = daemon
        self.users = users
        self.uart = uart
        self.url = url_of(daemon)

    def args(self, role: str = "owner") -> list[str]:
        return ["--url", self.url, "--token", self.users.tokens[role]]

    async def run(self, *args: str, role: str = "owner", timeout: float = 30.0) -> Result:
        return await cli(*args, *self.args(role), timeout=timeout)

    def ring(self, name: str) -> bytes:
        return bytes(self.daemon.consoles[name].ring.read(None)[1])


@pytest.fixture
async def rig(make_daemon: DaemonFactory, users: Users, tmp_path: Path) -> Rig:
    uart = UartServer(tmp_path / "raw.sock", echo=False)
    await uart.start()
    d = await make_daemon(
        [{"name": "vm1", "uart": "demo:?boot=0"}, {"name": "raw", "uart": f"unix:{uart.path}"}],
        users=users.config(),
    )
    r = Rig(d, users, uart)
    await wait_for(lambda: DEMO_PROMPT in r.ring("vm1"), what="the demo guest's prompt")
    await asyncio.wait_for(uart.connected.wait(), 10)
    return r


# --- pure helpers ------------------------------------------------------------


def test_list_table_columns_are_aligned() -> None:
    """``list`` lines up NAME STATE SESSION WATCHERS LOG whatever the widths."""
    table = format_table(
        [
            {
                "name": "a-long-console-name",
                "state": "running",
                "session": {"user": "alice", "peer": "10.0.0.7", "since": "2026-11-27T07:00:00.000Z"},
                "watchers": 2,
                "log": {"first": 0, "next": 2048, "capacity": 1 << 20},
            },
            {"name": "b", "state": "stopped", "session": None, "watchers": 0, "log": None},
        ]
    ).splitlines()
    assert table[0].split() == ["NAME", "STATE", "SESSION", "WATCHERS", "LOG"]
    assert table[1].split()[:3] == ["a-long-console-name", "running", "alice@10.0.0.7"]
    assert "2 KiB/1 MiB" in table[1]
    expected = {
        "STATE": ["running", "stopped"],
        "SESSION": ["alice@10.0.0.7 since 2026-11-27T07:00:00.000Z", "-"],
        "WATCHERS": ["2", "0"],
        "LOG": ["2 KiB/1 MiB", "-"],
    }
    for col, cells in expected.items():
        at = table[0].index(col)
        for line, cell in zip(table[1:], cells, strict=True):
            assert line[at:].startswith(cell + " ") or line[at:] == cell, (col, table)
            assert line[at - 2 : at] == "  ", (col, table)


def test_human_sizes_and_url_forms() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(1 << 20) == "1 MiB"
    assert normalize_url("127.0.0.1:7480") == "http://127.0.0.1:7480"
    assert normalize_url("https://console.example/host7/") == "https://console.example/host7"


# --- list / status -------------------------------------------------------------


async def test_list_prints_every_console_with_state(rig: Rig) -> None:
    """``list`` shows each console's state in a table; ``--json`` is the server's answer."""
    r = await rig.run("list", role="reader")
    assert r.rc == 0, r.err
    lines = r.text.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "SESSION", "WATCHERS", "LOG"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["vm1"][1] == "running" and rows["vm1"][2] == "-"
    assert rows["raw"][1] == "running"

    r = await rig.run("list", "--json", role="reader")
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    assert {c["name"] for c in data["consoles"]} == {"vm1", "raw"}


async def test_list_shows_who_holds_the_session(rig: Rig) -> None:
    """While someone is attached, ``list`` and ``status`` name them and their address."""
    async with (
        aiohttp.ClientSession(headers=rig.users.header("contributor")) as s,
        s.ws_connect(f"{rig.url}/api/v1/consoles/vm1/session") as ws,
    ):
        await ws.receive()  # hello
        r = await rig.run("list")
        row = next(line for line in r.text.splitlines() if line.startswith("vm1 "))
        assert "contributor@127.0.0.1 since " in row
        r = await rig.run("status", "vm1")
        assert r.rc == 0, r.err
        assert "session:" in r.text and "contributor@127.0.0.1" in r.text
        assert "state:    running" in r.text


async def test_status_json_is_the_console_object(rig: Rig) -> None:
    r = await rig.run("status", "vm1", "--json", role="reader")
    assert r.rc == 0, r.err
    c = json.loads(r.out)
    assert c["name"] == "vm1" and c["state"] == "running" and c["backend"].startswith("demo:")
    assert set(c["log"]) >= {"first", "next", "capacity"}


# --- log ----------------------------------------------------------------------------------


async def test_log_prints_the_whole_retained_log_byte_for_byte(rig: Rig) -> None:
    """``log NAME`` writes the ring exactly, every byte value included (binary-safe)."""
    every_byte = bytes(range(256)) * 4
    await rig.uart.print(every_byte)
    await wait_for(lambda: rig.ring("raw").endswith(every_byte), what="the bytes in the ring")
    r = await rig.run("log", "raw", role="reader")
    assert r.rc == 0, r.err
    assert r.out == rig.ring("raw")
    assert r.out.endswith(every_byte)

    r = await rig.run("log", "vm1", role="reader")
    assert r.rc == 0, r.err
    assert r.out == rig.ring("vm1")
    assert b"Linux version" in r.out and r.out.endswith(DEMO_PROMPT)


async def test_log_start_and_max_bytes_select_a_window(rig: Rig) -> None:
    """``--start -N`` is the last N bytes, ``--start N`` from offset N, ``--max-bytes`` caps it."""
    ring = rig.ring("vm1")
    r = await rig.run("log", "vm1", "--start", "-6", role="reader")
    assert (r.rc, r.out) == (0, ring[-6:])
    r = await rig.run("log", "vm1", "--start", "10", "--max-bytes", "20", role="reader")
    assert (r.rc, r.out) == (0, ring[10:30])


async def test_log_since_uses_the_time_index(rig: Rig) -> None:
    """``--since`` in the past gives everything; in the future, nothing yet."""
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    r = await rig.run("log", "vm1", "--since", past, role="reader")
    assert (r.rc, r.out) == (0, rig.ring("vm1"))
    r = await rig.run("log", "vm1", "--since", future, role="reader")
    assert (r.rc, r.out) == (0, b"")
    r = await rig.run("log", "vm1", "--since", "yesterday", role="reader")
    assert r.rc == 2 and "RFC 3339" in r.err, r


async def test_log_follow_streams_new_output_until_ctrl_c(rig: Rig) -> None:
    """``log --follow`` prints the log, then new output as it comes; Ctrl-C ends it with 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        "log",
        "raw",
        "--follow",
        *rig.args("reader"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await rig.uart.print(b"before follow\r\n")
        await asyncio.wait_for(proc.stdout.readuntil(b"before follow\r\n"), 15)
        await rig.uart.print(b"while following \x00\xff\r\n")
        await asyncio.wait_for(proc.stdout.readuntil(b"while following \x00\xff\r\n"), 10)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_log_follow_says_when_the_daemon_ends_it(users: Users, tmp_path: Path) -> None:
    """A follow cut by the daemon shutting down exits 5 and says so on stderr."""
    d = await _own_daemon(tmp_path, users)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        "log",
        "vm1",
        "-f",
        "--url",
        url_of(d),
        "--token",
        users.tokens["reader"],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readuntil(DEMO_PROMPT), 15)
    finally:
        await d.shutdown()
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 5, err
    assert b"log stream ended" in err


async def _own_daemon(tmp_path: Path, users: Users, **defaults: Any) -> Daemon:
    """A daemon the test shuts down itself (make_daemon's would be shut down twice)."""
    data: dict[str, Any] = {
        "daemon": {"state_dir": str(tmp_path / "own-state")},
        "http": {"listen": ["127.0.0.1:0"]},
        "console": [{"name": "vm1", "uart": "demo:?boot=0"}],
        "user": users.config(),
    }
    if defaults:
        data["defaults"] = defaults
    d = Daemon(parse_config(data, source="test"))
    await d.startup()
    await wait_for(lambda: DEMO_PROMPT in bytes(d.consoles["vm1"].ring.read(None)[1]), what="prompt")
    return d


# --- actions --------------------------------------------------------------------------------


async def test_sysrq_nmi_and_reset_reach_the_demo_guest(rig: Rig) -> None:
    """``sysrq h`` makes the guest print its SysRq help, ``nmi`` its NMI line, ``reset`` a new boot."""
    mark = rig.daemon.consoles["vm1"].ring.next
    r = await rig.run("sysrq", "vm1", "h", role="contributor")
    assert r.rc == 0, r.err
    assert "SysRq h sent" in r.text
    await wait_for(lambda: b"sysrq: HELP" in rig.ring("vm1")[mark:], what="the SysRq help line")

    r = await rig.run("nmi", "vm1", role="contributor")
    assert r.rc == 0, r.err
    await wait_for(lambda: b"NMI received" in rig.ring("vm1")[mark:], what="the NMI line")

    boots = rig.ring("vm1").count(b"Linux version")
    r = await rig.run("reset", "vm1", role="contributor")
    assert r.rc == 0, r.err
    await wait_for(lambda: rig.ring("vm1").count(b"Linux version") > boots, what="a new boot")


async def test_action_the_backend_cannot_do_is_refused_with_the_reason(rig: Rig) -> None:
    """A plain unix-socket console has no NMI: exit 4 with the server's explanation."""
    r = await rig.run("nmi", "raw", role="contributor")
    assert r.rc == 4
    assert "QMP" in r.err


async def test_bad_sysrq_key_is_a_usage_error(rig: Rig) -> None:
    r = await rig.run("sysrq", "vm1", "hh", role="contributor")
    assert r.rc == 2 and "SysRq key" in r.err


# --- exit statuses ---------------------------------------------------------------------------


async def test_unknown_console_exits_4_with_the_servers_message(rig: Rig) -> None:
    """404 → exit 4, and the message tells how to find the right name."""
    for args in (["status", "nope"], ["log", "nope"], ["sysrq", "nope", "h"], ["attach", "nope"]):
        r = await rig.run(*args)
        assert r.rc == 4, (args, r)
        assert "there is no console named nope" in r.err, (args, r.err)


async def test_bad_or_missing_token_exits_4(rig: Rig) -> None:
    """A wrong token is refused (401 → 4); without one, the message says how to give it."""
    r = await cli("list", "--url", rig.url, "--token", "smx_" + "A" * 43)
    assert r.rc == 4 and "not valid" in r.err, r
    r = await cli("list", "--url", rig.url)
    assert r.rc == 4 and "SERIALMUXD_TOKEN" in r.err, r
    r = await cli("attach", "vm1", "--url", rig.url, "--token", "smx_" + "B" * 43)
    assert r.rc == 4 and "not valid" in r.err, r


async def test_missing_role_exits_4_and_names_it(rig: Rig) -> None:
    """A reader may not reset or attach interactively: 403 → 4 with what is missing."""
    r = await rig.run("reset", "vm1", role="reader")
    assert r.rc == 4 and "contributor" in r.err, r
    r = await rig.run("attach", "vm1", role="reader")
    assert r.rc == 4 and "contributor" in r.err, r


async def test_unreachable_daemon_exits_3_and_says_where_it_looked() -> None:
    """Nothing listening: exit 3, naming the URL and that the daemon may not be running."""
    r = await cli("list", "--url", "http://127.0.0.1:9")
    assert r.rc == 3
    assert "http://127.0.0.1:9" in r.err and "may not be running" in r.err
    r = await cli("attach", "vm1", env=cli_env(SERIALMUXD_URL="http://127.0.0.1:9"))
    assert r.rc == 3 and "http://127.0.0.1:9" in r.err


async def test_bad_console_name_and_url_are_usage_errors() -> None:
    r = await cli("status", "../etc", "--url", "http://127.0.0.1:9")
    assert r.rc == 2 and "not a valid console name" in r.err
    r = await cli("list", "--url", "ftp://127.0.0.1:9")
    assert r.rc == 2 and "not a daemon URL" in r.err


async def test_url_and_token_work_before_after_and_from_the_environment(rig: Rig) -> None:
    """``--url``/``--token`` before or after the subcommand, or SERIALMUXD_URL/SERIALMUXD_TOKEN."""
    tok = rig.users.tokens["reader"]
    r = await cli("--url", rig.url, "--token", tok, "list")
    assert r.rc == 0, r.err
    r = await cli("list", "--url", rig.url, "--token", tok)
    assert r.rc == 0, r.err
    r = await cli("list", env=cli_env(SERIALMUXD_URL=rig.url, SERIALMUXD_TOKEN=tok))
    assert r.rc == 0, r.err
    # The command line wins over the environment.
    r = await cli(
        "list", "--url", rig.url, env=cli_env(SERIALMUXD_URL="http://127.0.0.1:9", SERIALMUXD_TOKEN=tok)
    )
    assert r.rc == 0, r.err


# --- attach without a terminal -------------------------------------------------------------


async def test_attach_with_piped_input_runs_it_and_detaches_at_end_of_input(rig: Rig) -> None:
    """``printf 'cmd\\r' | serialmuxd attach vm1`` shows the answer, then detaches with 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        "attach",
        "vm1",
        *rig.args("contributor"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(b"echo $((6*7))\r"), 20)
    assert proc.returncode == 0, err
    assert b"\r\n42\r\n" in out
    assert b"attached to vm1 as contributor" in err
    assert b"detached from vm1" in err


async def test_attach_watch_follows_read_only(rig: Rig) -> None:
    """``attach --watch`` shows output, is counted as a watcher and never takes the session."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        "attach",
        "--watch",
        "vm1",
        *rig.args("reader"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(proc.stdout.readuntil(DEMO_PROMPT), 15)
        console = rig.daemon.consoles["vm1"]
        await wait_for(lambda: console.watcher_count == 1, what="the watcher")
        assert console.active is None
        await console.sysrq("h")
        await asyncio.wait_for(proc.stdout.readuntil(b"sysrq: HELP"), 10)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert b"watching vm1 as reader" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_attach_closed_for_idleness_says_so_and_exits_5(users: Users, tmp_path: Path) -> None:
    """An idle_timeout_s close (4008) prints the daemon's reason and exits 5."""
    d = await _own_daemon(tmp_path, users, idle_timeout_s=1)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serialmuxd",
            "attach",
            "vm1",
            "--url",
            url_of(d),
            "--token",
            users.tokens["contributor"],
            stdin=asyncio.subprocess.PIPE,  # open, never written: no keystroke
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        started = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 5, err
        assert b"no keystroke for 1 s" in err
        assert time.monotonic() - started < 15
    finally:
        await d.shutdown()


# --- wait -------------------------------------------------------------------------------------


async def test_wait_exits_0_and_prints_the_match(rig: Rig) -> None:
    """``wait NAME REGEX --start 0`` finds boot output already in the log; from a later
    offset it waits for new output, e.g. the line an NMI makes the guest print."""
    r = await rig.run("wait", "vm1", r"Linux version \S+", "--start", "0", role="reader")
    assert r.rc == 0, r.err
    assert r.text.strip() == "Linux version 6.1.0-demo"

    # --start pins "now" to before the NMI, however slowly the waiter starts.
    mark = str(rig.daemon.consoles["vm1"].ring.next)
    waiter = asyncio.ensure_future(
        rig.run("wait", "vm1", "NMI received", "--start", mark, "--timeout", "20", "--json")
    )
    await rig.daemon.consoles["vm1"].nmi()
    r = await asyncio.wait_for(waiter, 30)
    assert r.rc == 0, r.err
    found = json.loads(r.out)
    assert found["match"] == "NMI received"
    assert rig.ring("vm1")[found["start"] : found["end"]] == b"NMI received"


async def test_wait_timeout_exits_1_with_the_reason(rig: Rig) -> None:
    """No match within --timeout: exit 1 and say so (a script's test step failed)."""
    r = await rig.run("wait", "vm1", "never printed", "--timeout", "1", role="reader")
    assert r.rc == 1
    assert "no match" in r.err


async def test_wait_bad_regex_is_a_usage_error(rig: Rig) -> None:
    r = await rig.run("wait", "vm1", "(unclosed", "--timeout", "1", role="reader")
    assert r.rc == 2, r


# --- enable / disable ----------------------------------------------------------------------------


async def test_disable_and_enable_a_console(rig: Rig) -> None:
    """An owner disables a console: listed as disabled, attach refused (4) with how to undo it;
    ``enable`` brings it back."""
    r = await rig.run("disable", "vm1")
    assert r.rc == 0, r.err
    assert "console vm1 disabled" in r.text
    r = await rig.run("list")
    row = next(line for line in r.text.splitlines() if line.startswith("vm1 "))
    assert row.split()[1] == "disabled"
    r = await rig.run("attach", "vm1", role="contributor")
    assert r.rc == 4
    assert "console vm1 is disabled" in r.err and "serialmuxd enable vm1" in r.err
    r = await rig.run("enable", "vm1")
    assert r.rc == 0, r.err
    r = await rig.run("status", "vm1", "--json")
    assert json.loads(r.out)["state"] == "running"


async def test_disable_and_enable_the_whole_service(rig: Rig) -> None:
    """Without NAME, disable/enable switch the service; every console shows disabled meanwhile."""
    r = await rig.run("disable")
    assert r.rc == 0, r.err
    assert "console service disabled" in r.text
    r = await rig.run("list", "--json")
    assert {c["state"] for c in json.loads(r.out)["consoles"]} == {"disabled"}
    r = await rig.run("sysrq", "vm1", "h", role="contributor")
    assert r.rc == 4 and "service is disabled" in r.err, r
    r = await rig.run("enable")
    assert r.rc == 0, r.err
    r = await rig.run("list", "--json")
    assert "disabled" not in {c["state"] for c in json.loads(r.out)["consoles"]}


async def test_only_an_owner_may_disable(rig: Rig) -> None:
    r = await rig.run("disable", "vm1", role="contributor")
    assert r.rc == 4 and "owner" in r.err, r
    r = await rig.run("disable", role="contributor")
    assert r.rc == 4 and "owner" in r.err, r


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    argv += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return cert, key


async def test_https_daemon_needs_the_ca_and_attach_uses_wss(
    make_daemon: DaemonFactory, users: Users, self_signed: tuple[Path, Path]
) -> None:
    """Against a TLS listener, an untrusted certificate exits 3 and points at --cacert;
    with --cacert, list works and attach goes over wss://."""
    cert, key = self_signed
    d = await make_daemon(
        [{"name": "vm1", "uart": "demo:?boot=0"}],
        users=users.config(),
        http={"tls_cert": str(cert), "tls_key": str(key)},
    )
    url = url_of(d)
    assert url.startswith("https://")
    tok = users.tokens["contributor"]
    r = await cli("list", "--url", url, "--token", tok)
    assert r.rc == 3 and "--cacert" in r.err, r
    r = await cli("list", "--url", url, "--token", tok, "--cacert", str(cert))
    assert r.rc == 0, r.err
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serialmuxd",
        "attach",
        "vm1",
        "--url",
        url,
        "--token",
        tok,
        "--cacert",
        str(cert),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(b"echo $((6*7))\r"), 20)
    assert proc.returncode == 0, err
    assert b"\r\n42\r\n" in out
