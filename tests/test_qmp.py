"""BREAK, SysRq, NMI and reset through a real QEMU guest's QMP socket (qemu.qmp)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.guest import GuestFactory, QemuGuest
from tests.test_e2e_qemu import poke_prompt
from tests.test_sessions import recv_json

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


async def _settle(d: Daemon, quiet: float = 0.8, timeout: float = 20) -> None:
    """Wait until the guest has printed nothing for `quiet` s (SysRq timing, QEMU-RIG-NOTES)."""
    ring = d.consoles["vm1"].ring
    loop = asyncio.get_running_loop()
    last, since = ring.next, loop.time()
    deadline = loop.time() + timeout
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.05)
        if ring.next != last:
            last, since = ring.next, loop.time()


async def _booted(make_daemon: DaemonFactory, qemu_guest: GuestFactory) -> tuple[Daemon, QemuGuest]:
    vm = qemu_guest(start=False, qmp=True)
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{vm.uart_path}", "qmp": f"unix:{vm.qmp_path}"}])
    await asyncio.to_thread(vm.start)
    c = d.consoles["vm1"]
    await wait_for(lambda: c.up and c.vm_status == "running", 30, "UART and QMP connected, VM running")
    await wait_for(lambda: b"guest# " in c.ring.read(None)[1], 60, "shell prompt")
    return d, vm


async def _sysrq_h(
    s: aiohttp.ClientSession, d: Daemon, via_ws: aiohttp.ClientWebSocketResponse | None
) -> bool:
    ring = d.consoles["vm1"].ring
    await _settle(d)
    start = ring.next
    if via_ws is None:
        r = await s.post(url_of(d) + "/api/v1/consoles/vm1/sysrq", json={"key": "h"})
        assert r.status == 200, await r.text()
    else:
        await via_ws.send_str('{"type":"sysrq","key":"h"}')
    try:
        await wait_for(lambda: b"sysrq: HELP" in ring.read(start)[1], 8, "sysrq help line")
        return True
    except AssertionError:
        return False


async def test_sysrq_h_prints_kernel_help_line_into_the_log(
    make_daemon: DaemonFactory, qemu_guest: GuestFactory
) -> None:
    """POST /sysrq {"key":"h"} (BREAK then h via QMP) makes the kernel print its sysrq help line."""
    d, _ = await _booted(make_daemon, qemu_guest)
    async with aiohttp.ClientSession() as s:
        # A BREAK can land on a byte still in the emulated UART (QEMU-RIG-NOTES); retry once.
        assert await _sysrq_h(s, d, None) or await _sysrq_h(s, d, None)
        async with s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
            await recv_json(ws, "hello")
            assert await _sysrq_h(s, d, ws) or await _sysrq_h(s, d, ws)


async def test_nmi_prints_kernel_nmi_message(make_daemon: DaemonFactory, qemu_guest: GuestFactory) -> None:
    d, _ = await _booted(make_daemon, qemu_guest)
    ring = d.consoles["vm1"].ring
    start = ring.next
    async with aiohttp.ClientSession() as s:
        r = await s.post(url_of(d) + "/api/v1/consoles/vm1/nmi")
        assert r.status == 200, await r.text()
    await wait_for(lambda: b"NMI received" in ring.read(start)[1], 15, "kernel NMI message")


async def test_reset_reboots_guest_and_new_boot_shows_in_log(
    make_daemon: DaemonFactory, qemu_guest: GuestFactory
) -> None:
    d, _ = await _booted(make_daemon, qemu_guest)
    ring = d.consoles["vm1"].ring
    start = ring.next
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        await ws.send_str('{"type":"reset"}')
        await wait_for(lambda: b"Linux version" in ring.read(start)[1], 30, "new boot after reset")
        await wait_for(
            lambda: b"serialmuxd-guest: init started" in ring.read(start)[1], 60, "init after reset"
        )
        await poke_prompt(ws)
    assert d.consoles["vm1"].up


async def test_actions_on_stopped_vm_answer_409_start_the_vm(
    make_daemon: DaemonFactory, qemu_guest: GuestFactory
) -> None:
    """While the VM is down, actions answer 409 with the cloud console's sentence."""
    vm = qemu_guest(start=False, qmp=True)
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{vm.uart_path}", "qmp": f"unix:{vm.qmp_path}"}])
    async with aiohttp.ClientSession() as s:
        for action in ("break", "nmi", "reset"):
            r = await s.post(url_of(d) + f"/api/v1/consoles/vm1/{action}")
            assert r.status == 409
            body = await r.json()
            assert body == {"error": "stopped", "message": "console vm1 is stopped: start the VM and retry"}


async def test_nmi_without_qmp_is_409_saying_why(
    make_daemon: DaemonFactory, qemu_guest: GuestFactory
) -> None:
    vm = qemu_guest(qmp=False)
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{vm.uart_path}"}])
    await wait_for(lambda: d.consoles["vm1"].up, 30, "UART connected")
    async with aiohttp.ClientSession() as s:
        r = await s.post(url_of(d) + "/api/v1/consoles/vm1/nmi")
        assert r.status == 409
        assert "QMP" in (await r.json())["message"]
