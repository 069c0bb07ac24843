"""Backends on real devices: a pty pair, QEMU's -serial pty, reconnect after loss."""

from __future__ import annotations

import asyncio
import os
import re
import tty
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonFactory, url_of, wait_for
from tests.guest import GuestFactory
from tests.test_sessions import attached, recv_json, recv_until
from tests.uart import UartServer


async def test_tty_backend_on_a_real_pty_pair(make_daemon: DaemonFactory) -> None:
    """A /dev/pts/N console is opened with pyserial-asyncio-fast at 115200 8N1: both ways work."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        d = await make_daemon([{"name": "board", "uart": path}])
        await wait_for(lambda: d.consoles["board"].up, what="pty link up")
        banner = b"U-Boot 2024.01\r\n=> "
        os.write(master, banner)
        await wait_for(lambda: d.consoles["board"].ring.next == len(banner), what="pty output logged")
        async with attached(d, "board") as ws:
            assert b"=> " in await recv_until(ws, b"=> ")
            await ws.send_bytes(b"printenv\r")
            loop = asyncio.get_running_loop()
            got = b""
            async with asyncio.timeout(5):
                while b"printenv\r" not in got:
                    got += await loop.run_in_executor(None, os.read, master, 100)
            # BREAK through the serial driver is accepted on a tty
            await ws.send_str('{"type":"break"}')
            await ws.send_str('{"type":"ping"}')
            assert (await recv_json(ws, "pong"))["type"] == "pong"
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.qemu
async def test_tty_backend_on_qemu_serial_pty(make_daemon: DaemonFactory, qemu_guest: GuestFactory) -> None:
    """QEMU's -serial pty works as a console: the guest's shell answers through it."""
    vm = qemu_guest(serial="pty", qmp=False)
    assert vm.pty_path
    d = await make_daemon([{"name": "vm1", "uart": vm.pty_path}])
    async with attached(d, "vm1") as ws:
        async with asyncio.timeout(60):
            while True:
                await ws.send_bytes(b"\r")
                try:
                    await recv_until(ws, b"guest# ", timeout=3)
                    break
                except TimeoutError:
                    continue
        await ws.send_bytes(b"echo $((6*7))\r")
        out = await recv_until(ws, b"\r\n42\r\n", timeout=20)
        assert re.search(rb"\r\n42\r\n", out)


async def test_missing_socket_is_stopped_then_connects_when_it_appears(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """A console whose VM is not running is listed as stopped and connects by itself later."""
    path = tmp_path / "late.serial"
    d = await make_daemon([{"name": "late", "uart": f"unix:{path}"}])
    await wait_for(lambda: d.consoles["late"].down_reason != "not connected yet", what="first attempt")
    assert d.consoles["late"].state == "stopped"
    assert "does not exist" in d.consoles["late"].down_reason
    u = UartServer(path)
    await u.start()
    try:
        await wait_for(lambda: d.consoles["late"].up, timeout=5, what="connect after the socket appears")
        assert d.consoles["late"].state == "running"
    finally:
        await u.stop()


async def test_every_console_of_a_large_host_connects_and_is_listed(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """A host with 600 VMs: the API lists all 600 consoles as soon as it answers, and
    every one of their UART links comes up."""
    import socket

    listeners = []
    try:
        for i in range(600):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(tmp_path / f"u{i}.sock"))
            s.listen(1)  # the kernel completes the connect; nothing needs to accept it
            listeners.append(s)
        d = await make_daemon([{"name": f"vm{i}", "uart": f"unix:{tmp_path}/u{i}.sock"} for i in range(600)])
        async with aiohttp.ClientSession() as http:
            async with http.get(url_of(d) + "/api/v1/consoles") as r:
                assert r.status == 200
                assert len((await r.json())["consoles"]) == 600
            await wait_for(lambda: all(c.up for c in d.consoles.values()), what="all 600 links up")
            async with http.get(url_of(d) + "/readyz") as r:
                assert r.status == 200
    finally:
        for s in listeners:
            s.close()


async def test_tcp_serial_server_console_logs_takes_keys_and_reconnects(make_daemon: DaemonFactory) -> None:
    """A ``tcp:host:port`` console (a ser2net raw port, a BMC's serial over TCP): the
    output is logged and streamed, keystrokes reach the server, and when the server
    comes back after going away the console reconnects by itself."""
    received = bytearray()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"BMC serial ready\r\n")
        try:
            while data := await reader.read(1024):
                received.extend(data)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        d = await make_daemon([{"name": "bmc", "uart": f"tcp:127.0.0.1:{port}"}])
        console = d.consoles["bmc"]
        await wait_for(lambda: console.ring.next == 18, what="banner logged")
        async with attached(d, "bmc") as ws:
            assert b"serial ready" in await recv_until(ws, b"ready\r\n")
            await ws.send_bytes(b"help\r")
            await wait_for(lambda: bytes(received).endswith(b"help\r"), what="keystrokes reach the server")
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()
        await wait_for(lambda: not console.up, what="the server's hang-up seen")
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await wait_for(lambda: console.up, timeout=5, what="reconnected to the restarted server")
        await wait_for(lambda: console.ring.next == 36, what="banner after reconnect logged")
    finally:
        server.close()
        for w in writers:
            w.close()
