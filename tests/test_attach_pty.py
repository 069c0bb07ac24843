"""``serialmuxd attach`` driven in a real pseudo-terminal, as a person would use it.

A ``bash`` runs in a pty (pexpect); the test types into it. ``stty -a`` taken
in that pty before and after each attach proves the terminal is given back
exactly as it was, however the attach ends: Ctrl-] ., a takeover, SIGTERM,
the daemon shutting down.

The daemon runs in the test's event loop, so every blocking pexpect call goes
through a thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pexpect  # type: ignore[import-untyped]
import pytest

from serialmuxd.config import parse_config
from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, Users, url_of, wait_for
from tests.guest import BOOT_TIMEOUT, PROMPT, GuestFactory

CTRL_BRACKET = "\x1d"
SHELL_PROMPT = "PTYSHELL> "
DEMO_PROMPT = b"demo# "
BIN = Path(sys.executable).parent
# The terminal's file status flags are shared with the shell: uvloop's add_reader
# sets O_NONBLOCK on stdin, and the attach must clear it again.
NONBLOCK_PROBE = (
    f"{sys.executable} -c 'import fcntl, os; "
    'print("O_NONBLOCK=%s" % bool(fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK))\''
)


class Shell:
    """bash in a pseudo-terminal; async wrappers so the in-process daemon keeps running."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.child = pexpect.spawn(
            "bash",
            ["--norc", "--noprofile"],
            env=env,
            cwd=str(tmp),
            timeout=20,
            dimensions=(40, 200),
        )
        self.runs = 0

    async def expect(self, pattern: Any, timeout: float = 20) -> int:
        return int(await asyncio.to_thread(self.child.expect, pattern, timeout=timeout))

    async def expect_exact(self, text: str | bytes, timeout: float = 20) -> None:
        await asyncio.to_thread(self.child.expect_exact, text, timeout=timeout)

    def send(self, text: str) -> None:
        self.child.send(text)

    async def start(self) -> None:
        await self.expect_exact(SHELL_PROMPT)

    def attach(self, *args: str) -> str:
        """Start ``serialmuxd attach`` between two ``stty -a``; returns the run's tag."""
        self.runs += 1
        tag = f"run{self.runs}"
        cmd = " ".join(args)
        snap = f"stty -a; {NONBLOCK_PROBE}"
        self.child.sendline(
            f"({snap}) > {tag}.before; {cmd}; echo {tag}-rc=$?; ({snap}) > {tag}.after; echo {tag}-done"
        )
        return tag

    async def finished(self, tag: str, timeout: float = 20) -> int:
        """The attach's exit status, once both stty snapshots are written."""
        await self.expect(re.compile(rf"{tag}-rc=(\d+)".encode()), timeout)
        match = self.child.match
        assert match is not None
        rc = int(match.group(1))
        await self.expect_exact(f"{tag}-done")
        await self.expect_exact(SHELL_PROMPT)
        return rc

    def assert_terminal_restored(self, tag: str) -> None:
        before = (self.tmp / f"{tag}.before").read_text()
        after = (self.tmp / f"{tag}.after").read_text()
        assert "icanon" in before and "-icanon" not in before, before
        assert "O_NONBLOCK=False" in before, before
        assert after == before

    def close(self) -> None:
        self.child.close(force=True)


@pytest.fixture
async def shell_factory(tmp_path: Path) -> AsyncIterator[Any]:
    shells: list[Shell] = []

    async def make(url: str, token: str) -> Shell:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERIALMUXD_")}
        env.update(
            {
                "PS1": SHELL_PROMPT,
                "TERM": "dumb",
                "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
                "SERIALMUXD_URL": url,
                "SERIALMUXD_TOKEN": token,
                "HISTFILE": "/dev/null",
            }
        )
        sh = Shell(tmp_path, env)
        shells.append(sh)
        await sh.start()
        return sh

    yield make
    for sh in shells:
        sh.close()


SMX = f"{sys.executable} -m serialmuxd"


async def demo_daemon(make_daemon: DaemonFactory, users: Users, spec: str = "demo:?boot=0") -> Daemon:
    d = await make_daemon([{"name": "vm1", "uart": spec}], users=users.config())
    await wait_for(
        lambda: DEMO_PROMPT in bytes(d.consoles["vm1"].ring.read(None)[1]), what="the demo guest's prompt"
    )
    return d


async def test_attach_runs_a_command_detaches_and_restores_the_terminal(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """Attach, run ``echo $((6*7))``, see 42, Ctrl-] ? shows help, Ctrl-] . detaches with 0;
    ``stty -a`` before and after are identical."""
    d = await demo_daemon(make_daemon, users)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact(
        "[serialmuxd] attached to vm1 as contributor (Ctrl-] . to detach, Ctrl-] ? for help)"
    )
    await sh.expect_exact(DEMO_PROMPT)  # replayed from the log
    sh.send("echo $((6*7))\r")
    await sh.expect_exact("\r\n42\r\n")
    await sh.expect_exact(DEMO_PROMPT)
    sh.send(CTRL_BRACKET + "?")
    await sh.expect_exact("[serialmuxd]   .       detach")
    sh.send(CTRL_BRACKET + ".")
    await sh.expect_exact("[serialmuxd] detached from vm1")
    assert await sh.finished(tag) == 0
    sh.assert_terminal_restored(tag)
    assert d.consoles["vm1"].active is None


async def test_escape_b_sends_a_break_for_sysrq(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """Ctrl-] b sends a serial BREAK; the next key is the SysRq command (h prints the help)."""
    d = await demo_daemon(make_daemon, users)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact(DEMO_PROMPT)
    sh.send(CTRL_BRACKET + "b")
    await asyncio.sleep(0.3)  # the BREAK goes as a control frame; let it land before the key
    sh.send("h")
    await sh.expect_exact("sysrq: HELP")
    sh.send(CTRL_BRACKET + ".")
    assert await sh.finished(tag) == 0
    sh.assert_terminal_restored(tag)


async def test_takeover_names_the_newcomer_exits_5_and_restores_the_terminal(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """When someone else attaches, the CLI prints who took the session from where and exits 5."""
    d = await demo_daemon(make_daemon, users)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact("attached to vm1 as contributor")
    await sh.expect_exact(DEMO_PROMPT)
    await wait_for(lambda: d.consoles["vm1"].active is not None, what="the CLI's session")
    async with (
        aiohttp.ClientSession(headers=users.header("owner")) as s,
        s.ws_connect(f"{url_of(d)}/api/v1/consoles/vm1/session") as ws,
    ):
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "hello"
        await sh.expect_exact("[serialmuxd] session taken over by owner from 127.0.0.1")
        assert await sh.finished(tag) == 5
    sh.assert_terminal_restored(tag)


async def test_sigterm_detaches_and_restores_the_terminal(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """SIGTERM to an attached CLI leaves the terminal as it found it (exit 128+15)."""
    d = await demo_daemon(make_daemon, users)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach("bash -c 'echo CLIPID=$$; exec", SMX, "attach vm1'")
    await sh.expect(re.compile(rb"CLIPID=(\d+)"))
    assert sh.child.match is not None
    pid = int(sh.child.match.group(1))
    await sh.expect_exact(DEMO_PROMPT)
    os.kill(pid, signal.SIGTERM)
    await sh.expect_exact("[serialmuxd] detached from vm1 (SIGTERM)")
    assert await sh.finished(tag) == 128 + signal.SIGTERM
    sh.assert_terminal_restored(tag)


async def test_vm_stop_and_start_are_shown_and_the_session_stays(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """``poweroff`` in the guest shows "stopped: waiting for the VM to start", then "running";
    the same session sees the next boot."""
    d = await demo_daemon(make_daemon, users, "demo:?boot=0&off=1")
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact(DEMO_PROMPT)
    sh.send("poweroff\r")
    await sh.expect_exact("[serialmuxd] console vm1 stopped: waiting for the VM to start")
    await sh.expect_exact("[serialmuxd] console vm1 running")
    await sh.expect_exact("Linux version")
    await sh.expect_exact(DEMO_PROMPT)
    sh.send(CTRL_BRACKET + ".")
    assert await sh.finished(tag) == 0
    sh.assert_terminal_restored(tag)


async def test_daemon_shutdown_ends_the_attach_with_5(
    users: Users, tmp_path: Path, shell_factory: Any
) -> None:
    """SIGTERM to the daemon (close 1001): the CLI says it is shutting down, exits 5, terminal restored."""
    data: dict[str, Any] = {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "http": {"listen": ["127.0.0.1:0"]},
        "console": [{"name": "vm1", "uart": "demo:?boot=0"}],
        "user": users.config(),
    }
    d = Daemon(parse_config(data, source="test"))
    await d.startup()
    try:
        sh = await shell_factory(url_of(d), users.tokens["contributor"])
        tag = sh.attach(SMX, "attach", "vm1")
        await sh.expect_exact("attached to vm1")
        await wait_for(lambda: d.consoles["vm1"].active is not None, what="the CLI's session")
    finally:
        await d.shutdown()
    await sh.expect_exact("[serialmuxd] serialmuxd is shutting down")
    assert await sh.finished(tag) == 5
    sh.assert_terminal_restored(tag)


async def test_disabling_the_console_ends_the_attach_with_the_reason(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any
) -> None:
    """An owner disables the console (close 4003): the CLI prints the daemon's message,
    which says how to enable it again, and exits 5."""
    d = await demo_daemon(make_daemon, users)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact(DEMO_PROMPT)
    await wait_for(lambda: d.consoles["vm1"].active is not None, what="the CLI's session")
    async with (
        aiohttp.ClientSession(headers=users.header("owner")) as s,
        s.post(f"{url_of(d)}/api/v1/consoles/vm1/disable") as resp,
    ):
        assert resp.status == 200, await resp.text()
    await sh.expect_exact("[serialmuxd] console vm1 is disabled: an owner can enable it")
    assert await sh.finished(tag) == 5
    sh.assert_terminal_restored(tag)


@pytest.mark.qemu
@pytest.mark.slow
async def test_attach_to_a_real_qemu_guest(
    make_daemon: DaemonFactory, users: Users, shell_factory: Any, qemu_guest: GuestFactory
) -> None:
    """Against a booted Linux guest on a QEMU unix-socket UART: run a command, see its answer,
    detach with Ctrl-] ., and the terminal is restored."""
    vm = await asyncio.to_thread(qemu_guest, wait=True)
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{vm.uart_path}", "qmp": f"unix:{vm.qmp_path}"}],
        users=users.config(),
    )
    await wait_for(
        lambda: PROMPT in bytes(d.consoles["vm1"].ring.read(None)[1]),
        timeout=BOOT_TIMEOUT,
        what="the guest's shell prompt",
    )
    # Late kernel messages follow the prompt; let them pass so the command line is clean.
    await asyncio.sleep(1.0)
    sh = await shell_factory(url_of(d), users.tokens["contributor"])
    tag = sh.attach(SMX, "attach", "vm1")
    await sh.expect_exact("attached to vm1 as contributor")
    await sh.expect_exact(PROMPT)
    sh.send("echo $((6*7))\r")
    await sh.expect_exact("\r\n42\r\n", timeout=30)
    await sh.expect_exact(PROMPT)
    sh.send(CTRL_BRACKET + ".")
    await sh.expect_exact("[serialmuxd] detached from vm1")
    assert await sh.finished(tag) == 0
    sh.assert_terminal_restored(tag)
