"""Per-console local sockets: socat attaches interactively and takes over a WebSocket session."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json, recv_until

pytestmark = pytest.mark.skipif(
    shutil.which("socat") is None, reason="socat is installed by scripts/setup.sh --test"
)


def _sockdir(tmp_path: Path) -> Path:
    # Under /tmp, not tmp_path: a unix socket path must fit in 108 bytes.
    return Path(f"/tmp/smx-ls-{os.getpid()}-{id(tmp_path) % 10000}")


@pytest.fixture(autouse=True)
def _remove_sockdir(tmp_path: Path) -> Iterator[None]:
    """Set up before make_daemon, so torn down after its daemons have stopped."""
    yield
    shutil.rmtree(_sockdir(tmp_path), ignore_errors=True)


async def demo_daemon(make_daemon: DaemonFactory, tmp_path: Path) -> tuple[object, Path]:
    sockdir = _sockdir(tmp_path)
    d = await make_daemon(
        [{"name": "demo1", "uart": "demo:?boot=0"}],
        daemon={"unix_listen_dir": str(sockdir)},
    )
    return d, sockdir / "demo1.sock"


async def test_socket_created_with_mode_0660(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Access to NAME.sock is guarded by its file mode: 0660, no world access."""
    _, sock = await demo_daemon(make_daemon, tmp_path)
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


async def test_socat_takes_over_a_websocket_session(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A plain `socat - UNIX-CONNECT:NAME.sock` is an interactive attach: the WebSocket
    holder gets taken_over naming the local user, then 4001; socat's keys reach the guest."""
    d, sock = await demo_daemon(make_daemon, tmp_path)
    console = d.consoles["demo1"]  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/demo1/session") as ws:  # type: ignore[arg-type]
        await recv_json(ws, "hello")
        proc = await asyncio.create_subprocess_exec(
            "socat",
            "-",
            f"UNIX-CONNECT:{sock}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        taken = await recv_json(ws, "taken_over")
        assert taken["by"] == "root" and str(taken["peer"]).startswith("unix:pid ")
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"echo $((6*7))\r")
        await proc.stdin.drain()
        out = b""
        async with asyncio.timeout(10):
            while b"\r\n42\r\n" not in out:
                out += await proc.stdout.read(4096)
        assert console.active is not None and console.active.user == "root"
        # and the WebSocket takes it back: socat is told who and exits
        async with s.ws_connect(url_of(d) + "/api/v1/consoles/demo1/session") as ws2:  # type: ignore[arg-type]
            await recv_json(ws2, "hello")
            async with asyncio.timeout(10):
                while b"session taken over by anonymous from 127.0.0.1" not in out:
                    chunk = await proc.stdout.read(4096)
                    if not chunk:
                        break
                    out += chunk
            assert b"[serialmuxd] session taken over by anonymous from 127.0.0.1" in out
            proc.stdin.close()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            await ws2.send_bytes(b"echo back\r")
            await recv_until(ws2, b"back")


async def test_local_socket_replays_recent_output(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    d, sock = await demo_daemon(make_daemon, tmp_path)
    await wait_for(lambda: b"demo# " in d.consoles["demo1"].ring.read(None)[1])  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_unix_connection(str(sock))
    data = await asyncio.wait_for(reader.readuntil(b"demo# "), 5)
    assert data.endswith(b"demo# ")
    writer.close()
    await writer.wait_closed()


async def test_socket_removed_on_shutdown(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    d, sock = await demo_daemon(make_daemon, tmp_path)
    assert sock.exists()
    await d.shutdown()  # type: ignore[attr-defined]
    assert not sock.exists()
