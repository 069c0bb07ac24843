"""Sessions over real sockets: takeover, replay, watch, slow clients, log reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import aiohttp

from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.uart import UartServer


async def vm1(make_daemon: DaemonFactory, uart: UartServer, **kw: object) -> Daemon:
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}], **kw)
    await asyncio.wait_for(uart.connected.wait(), 10)
    return d


async def recv_json(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data["type"] == kind:
                    return data  # type: ignore[no-any-return]
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                raise AssertionError(f"closed ({msg.data}) before a {kind} frame")


@contextlib.asynccontextmanager
async def attached(d: Daemon, console: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """An interactive WebSocket session on ``console``, past its hello frame."""
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"{url_of(d)}/api/v1/consoles/{console}/session") as ws,
    ):
        await recv_json(ws, "hello")
        yield ws


async def recv_until(ws: aiohttp.ClientWebSocketResponse, needle: bytes, timeout: float = 5) -> bytes:
    buf = bytearray()
    async with asyncio.timeout(timeout):
        while needle not in buf:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                buf += msg.data
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                raise AssertionError(f"closed before {needle!r}; got {bytes(buf)!r}")
    return bytes(buf)


async def test_attach_replays_recent_output_then_streams_live(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """Attaching shows the last replay_bytes so the prompt is on screen, then live output."""
    d = await vm1(make_daemon, uart, defaults={"replay_bytes": 10})
    await uart.print(b"old boot line\r\nprompt# ")
    await wait_for(lambda: d.consoles["vm1"].ring.next == 23)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        hello = await recv_json(ws, "hello")
        assert hello["mode"] == "interactive" and hello["state"] == "running"
        assert hello["log_next"] == 23
        assert await recv_until(ws, b"prompt# ") == b"\r\nprompt# "  # exactly the last 10 bytes
        await uart.print(b"live!")
        assert await recv_until(ws, b"live!") == b"live!"


async def test_keystrokes_reach_the_guest_in_order(make_daemon: DaemonFactory, uart: UartServer) -> None:
    d = await vm1(make_daemon, uart)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        for i in range(50):
            await ws.send_bytes(f"{i},".encode())
        await recv_until(ws, b"49,")  # the test UART echoes
        assert bytes(uart.received) == b"".join(f"{i},".encode() for i in range(50))


async def test_takeover_closes_old_session_with_4001_naming_newcomer(
    make_daemon: DaemonFactory, uart: UartServer, users: object
) -> None:
    """Last writer wins: the old session gets taken_over (who, from where) then close 4001."""
    from tests.conftest import Users

    assert isinstance(users, Users)
    d = await vm1(make_daemon, uart, users=users.config())
    url = url_of(d) + "/api/v1/consoles/vm1/session"
    async with aiohttp.ClientSession() as s:
        old = await s.ws_connect(url, headers=users.header("contributor"))
        await recv_json(old, "hello")
        new = await s.ws_connect(url, headers=users.header("owner"))
        hello = await recv_json(new, "hello")
        msg = await recv_json(old, "taken_over")
        assert msg == {"type": "taken_over", "by": "owner", "peer": "127.0.0.1"}
        closing = await old.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001
        # Only the newcomer types now.
        await new.send_bytes(b"mine")
        await recv_until(new, b"mine")
        assert d.consoles["vm1"].active is not None and d.consoles["vm1"].active.id == hello["session"]
        assert d.consoles["vm1"].counters.takeovers == 1
        await new.close()


async def test_detach_sequence_sent_on_takeover_and_on_leave(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """The next user does not inherit a logged-in shell."""
    d = await vm1(make_daemon, uart, defaults={"detach_sequence": "exit\r"})
    url = url_of(d) + "/api/v1/consoles/vm1/session"
    async with aiohttp.ClientSession() as s:
        a = await s.ws_connect(url)
        await recv_json(a, "hello")
        b = await s.ws_connect(url)
        await recv_json(b, "hello")
        await wait_for(lambda: bytes(uart.received) == b"exit\r", what="detach sequence on takeover")
        await b.close()
        await wait_for(lambda: bytes(uart.received) == b"exit\rexit\r", what="detach sequence on leave")
        await a.close()


async def test_watchers_see_output_but_cannot_type_or_take_over(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    d = await vm1(make_daemon, uart)
    base = url_of(d) + "/api/v1/consoles/vm1/session"
    async with aiohttp.ClientSession() as s:
        active = await s.ws_connect(base)
        await recv_json(active, "hello")
        watch = await s.ws_connect(base + "?mode=watch")
        hello = await recv_json(watch, "hello")
        assert hello["mode"] == "watch"
        await watch.send_bytes(b"sneaky")
        err = await recv_json(watch, "error")
        assert err["error"] == "read_only"
        await active.send_bytes(b"hello")
        assert b"hello" in await recv_until(watch, b"hello")
        assert b"sneaky" not in uart.received
        assert d.consoles["vm1"].active is not None  # the watcher did not take over
        assert d.consoles["vm1"].watcher_count == 1
        await watch.close()
        await active.close()


async def test_slow_client_dropped_4009_while_other_client_still_answers(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """A client that stops reading is closed as too_slow; the UART and other sessions go on."""
    d = await vm1(make_daemon, uart, defaults={"client_buffer_bytes": 65536})
    base = url_of(d) + "/api/v1/consoles/vm1/session?mode=watch"
    # A raw socket that completes the upgrade and then never reads again.
    host, port = d.bound[0].host, d.bound[0].port
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    stuck.connect((host, port))
    stuck.sendall(
        b"GET /api/v1/consoles/vm1/session?mode=watch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with aiohttp.ClientSession() as s:
        await wait_for(lambda: d.consoles["vm1"].watcher_count == 1, what="stuck watcher attached")
        active = await s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session")
        await recv_json(active, "hello")
        chunk = b"x" * 65536
        for _ in range(400):  # 26 MB of guest output, far over the 64 KiB bound and any socket buffer
            await uart.print(chunk)
            if d.consoles["vm1"].counters.drops.get("too_slow", 0):
                break
        await wait_for(lambda: d.consoles["vm1"].counters.drops.get("too_slow", 0) == 1, what="too_slow drop")
        assert d.consoles["vm1"].watcher_count == 0
        # The active client kept reading: its echo still answers.
        await active.send_bytes(b"ping-after-flood")
        await recv_until(active, b"ping-after-flood", timeout=20)
        assert d.consoles["vm1"].ring.next >= 65536
        await active.close()
    stuck.close()
    _ = base


async def test_log_read_by_offset_negative_start_and_truncated(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    d = await vm1(make_daemon, uart, defaults={"ring_bytes": 4096, "replay_bytes": 100})
    data = bytes(range(256)) * 20  # 5120 bytes > 4096 ring
    await uart.print(data)
    await wait_for(lambda: d.consoles["vm1"].ring.next == 5120)
    log_url = url_of(d) + "/api/v1/consoles/vm1/log"
    async with aiohttp.ClientSession() as s:
        r = await s.get(log_url)
        body = await r.read()
        assert r.headers["X-Log-Start"] == "1024" and r.headers["X-Log-Next"] == "5120"
        assert r.headers["X-Log-Truncated"] == "false"
        assert body == data[1024:]
        r = await s.get(log_url, params={"start": "0"})
        assert r.headers["X-Log-Truncated"] == "true" and r.headers["X-Log-Start"] == "1024"
        r = await s.get(log_url, params={"start": "-10"})
        assert await r.read() == data[-10:] and r.headers["X-Log-Start"] == "5110"
        r = await s.get(log_url, params={"start": "2000", "max_bytes": "5"})
        assert await r.read() == data[2000:2005] and r.headers["X-Log-Next"] == "2005"
        r = await s.get(log_url, params={"start": "abc"})
        assert r.status == 400 and (await r.json())["error"] == "bad_parameter"


async def test_backend_loss_shows_stopped_and_session_sees_next_boot(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """A session attached across a VM stop and start sees the new boot, no daemon restart."""
    d = await vm1(make_daemon, uart)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        await uart.stop()
        assert (await recv_json(ws, "state"))["state"] == "stopped"
        r = await s.get(url_of(d) + "/api/v1/consoles/vm1")
        assert (await r.json())["state"] == "stopped"
        again = UartServer(uart.path)
        await again.start()
        assert (await recv_json(ws, "state"))["state"] == "running"
        await again.print(b"Linux version 6.1 second boot")
        await recv_until(ws, b"second boot")
        assert d.consoles["vm1"].counters.reconnects == 1
        await again.stop()


async def test_unknown_console_404_and_bad_name_400(make_daemon: DaemonFactory, uart: UartServer) -> None:
    d = await vm1(make_daemon, uart)
    async with aiohttp.ClientSession() as s:
        r = await s.get(url_of(d) + "/api/v1/consoles/nope/session")
        assert r.status == 404
        body = await r.json()
        assert body["error"] == "no_such_console" and "GET /api/v1/consoles" in body["message"]
        r = await s.get(url_of(d) + "/api/v1/consoles/" + "x" * 10_000)
        assert r.status in (400, 414)
        r = await s.get(url_of(d) + "/api/v1/consoles/a%00b")
        assert r.status == 400


async def test_malformed_control_frames_get_error_and_session_stays(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    d = await vm1(make_daemon, uart)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        for bad in [
            "not json",
            "[]",
            '{"type": 3}',
            '{"type": "launch"}',
            '{"type":"sysrq","key":"toolong"}',
        ]:
            await ws.send_str(bad)
            err = await recv_json(ws, "error")
            assert err["message"]
        await ws.send_str('{"type":"ping"}')
        assert (await recv_json(ws, "pong"))["type"] == "pong"
        await ws.send_str('{"type":"break"}')
        err = await recv_json(ws, "error")
        assert err["error"] == "unsupported" and "qmp" in str(err["message"])


async def test_oversize_frame_refused_1009_daemon_unharmed(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    d = await vm1(make_daemon, uart)
    url = url_of(d) + "/api/v1/consoles/vm1/session"
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url)
        await recv_json(ws, "hello")
        await ws.send_bytes(b"z" * (1 << 20))
        msg = await ws.receive(timeout=5)
        while msg.type is not aiohttp.WSMsgType.CLOSE:
            msg = await ws.receive(timeout=5)
        assert msg.data == 1009
        assert b"z" * 1000 not in uart.received
        ws2 = await s.ws_connect(url)
        await recv_json(ws2, "hello")
        await ws2.close()


async def test_shutdown_closes_sessions_with_1001(make_daemon: DaemonFactory, uart: UartServer) -> None:
    d = await vm1(make_daemon, uart)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        stopper = asyncio.create_task(d.shutdown())
        msg = await ws.receive(timeout=5)
        while msg.type is not aiohttp.WSMsgType.CLOSE:
            msg = await ws.receive(timeout=5)
        assert msg.data == 1001
        await asyncio.wait_for(stopper, 10)


async def test_idle_session_closed_4008(make_daemon: DaemonFactory, uart: UartServer) -> None:
    d = await vm1(make_daemon, uart, defaults={"idle_timeout_s": 1})
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        msg = await ws.receive(timeout=5)
        while msg.type is not aiohttp.WSMsgType.CLOSE:
            msg = await ws.receive(timeout=5)
        assert msg.data == 4008


async def test_a_session_that_keeps_up_carries_no_pump_task_and_still_gets_everything(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """Memory per session: a WebSocket client that keeps up is written to directly, so
    its session holds no pump task once the hello and replay are out; control answers
    and the goodbye start one on demand, in order with the output around them."""
    from serialmuxd.wssession import WsSession

    d = await vm1(make_daemon, uart)
    await uart.print(b"boot,")
    await wait_for(lambda: d.consoles["vm1"].ring.next == 5)
    async with aiohttp.ClientSession() as s, s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as ws:
        await recv_json(ws, "hello")
        assert await recv_until(ws, b"boot,") == b"boot,"
        (session,) = [x for x in d.sessions if isinstance(x, WsSession)]
        await wait_for(lambda: session.sender is None)
        await uart.print(b"live,")
        assert await recv_until(ws, b"live,") == b"live,"
        assert session.sender is None  # the direct path: no task made for output
        await ws.send_str('{"type": "ping"}')
        await recv_json(ws, "pong")
        await ws.send_str("not json")
        err = await recv_json(ws, "error")
        assert err["error"] == "bad_message"
        await uart.print(b"after,")
        assert await recv_until(ws, b"after,") == b"after,"
        await wait_for(lambda: session.sender is None)
        # The goodbye: a takeover ends this session with its message and close code.
        async with s.ws_connect(url_of(d) + "/api/v1/consoles/vm1/session") as newcomer:
            await recv_json(newcomer, "hello")
            await recv_json(ws, "taken_over")
            closing = await ws.receive(timeout=5)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001
    await wait_for(lambda: session.sender is None)
