"""SIGHUP reload of a running ``serialmuxd run``: what changes, what stays, what is refused."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serialmuxd.auth import new_token, token_sha256
from tests.conftest import DaemonProcess
from tests.test_sessions import recv_json, recv_until
from tests.test_systemd import NotifySocket, free_port, write_config
from tests.uart import UartServer


@pytest.fixture
async def uarts(tmp_path: Path) -> AsyncIterator[dict[str, UartServer]]:
    servers = {n: UartServer(tmp_path / f"{n}.serial") for n in ("vm1", "vm2", "vm3")}
    for u in servers.values():
        await u.start()
    yield servers
    for u in servers.values():
        await u.stop()


def user(name: str, token: str, roles: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "token_sha256": token_sha256(token), "roles": roles}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def recv_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> int:
    """Read until the server's close frame; its code.

    Taken from the frame itself: the server may drop the TCP connection right after it,
    and the client then reports its own failed close reply as 1006.
    """
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise AssertionError(f"connection ended without a close frame: {ws.exception()}")


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in the metrics")


async def hup_and_wait(p: DaemonProcess, notify: NotifySocket) -> None:
    """SIGHUP, then wait for the RELOADING=1 ... READY=1 pair the daemon sends systemd."""
    notify.messages.clear()
    p.signal(signal.SIGHUP)
    await asyncio.to_thread(notify.expect, "RELOADING=1")
    await asyncio.to_thread(notify.expect, "READY=1")
    assert notify.messages.index("READY=1") > notify.messages.index("RELOADING=1")


@pytest.mark.timeout(90)
async def test_sighup_reload_keeps_untouched_session_and_link_while_consoles_users_defaults_change(
    tmp_path: Path,
    uarts: dict[str, UartServer],
    daemon_process: Callable[[Path], DaemonProcess],
) -> None:
    """Across SIGHUP: vm1's WebSocket session and UART link survive (no reconnect, one UART
    connection); vm2, removed, closes its session with 4004; vm3, added, is listed and connectable;
    a removed user's token stops working and a new one works; a user whose grant was withdrawn
    loses its live session (4003); the new replay_bytes applies to the next attach; the reload
    is audited as config_reload."""
    keeper, old, new = new_token(), new_token(), new_token()
    port, mport = free_port(), free_port()
    state = tmp_path / "state"
    base_cfg: dict[str, Any] = {
        "daemon": {"state_dir": str(state), "log_format": "json"},
        "http": {"listen": [f"127.0.0.1:{port}"], "metrics_listen": f"127.0.0.1:{mport}"},
        "defaults": {"replay_bytes": 4096},
    }
    cfg_path = write_config(
        tmp_path / "config.toml",
        {
            **base_cfg,
            "console": [
                {"name": "vm1", "uart": f"unix:{uarts['vm1'].path}"},
                {"name": "vm2", "uart": f"unix:{uarts['vm2'].path}"},
            ],
            "user": [user("keeper", keeper, {"*": "contributor"}), user("old", old, {"*": "reader"})],
        },
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    p = daemon_process(cfg_path)
    p.start(env={"NOTIFY_SOCKET": str(notify.path)})
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(notify.expect, "READY=1", 20)
        await asyncio.wait_for(uarts["vm1"].connected.wait(), 10)
        await asyncio.wait_for(uarts["vm2"].connected.wait(), 10)
        await uarts["vm1"].print(b"vm1 boot log\r\nlogin: ")

        async with aiohttp.ClientSession() as s:
            live = await s.ws_connect(url + "/api/v1/consoles/vm1/session", headers=bearer(keeper))
            await recv_json(live, "hello")
            await recv_until(live, b"login: ")
            doomed = await s.ws_connect(url + "/api/v1/consoles/vm2/session", headers=bearer(keeper))
            await recv_json(doomed, "hello")
            revoked = await s.ws_connect(url + "/api/v1/consoles/vm1/session?mode=watch", headers=bearer(old))
            await recv_json(revoked, "hello")
            await live.send_bytes(b"before\r")
            await recv_until(live, b"before\r")

            # vm2 removed, vm3 added, user "old" replaced by "new", replay_bytes 4096 -> 5.
            write_config(
                cfg_path,
                {
                    **base_cfg,
                    "defaults": {"replay_bytes": 5},
                    "console": [
                        {"name": "vm1", "uart": f"unix:{uarts['vm1'].path}"},
                        {"name": "vm3", "uart": f"unix:{uarts['vm3'].path}"},
                    ],
                    "user": [user("keeper", keeper, {"*": "contributor"}), user("new", new, {"*": "reader"})],
                },
            )
            await hup_and_wait(p, notify)

            assert await recv_close(doomed) == 4004
            assert await recv_close(revoked) == 4003
            # The untouched session is still live, both ways.
            await live.send_bytes(b"after\r")
            await recv_until(live, b"after\r")
            await uarts["vm1"].print(b"still here")
            await recv_until(live, b"still here")
            assert not live.closed

            r = await s.get(url + "/api/v1/consoles", headers=bearer(old))
            assert r.status == 401
            r = await s.get(url + "/api/v1/consoles", headers=bearer(new))
            assert r.status == 200
            listed = [c["name"] for c in (await r.json())["consoles"]]
            assert listed == ["vm1", "vm3"]

            await asyncio.wait_for(uarts["vm3"].connected.wait(), 10)
            async with s.ws_connect(url + "/api/v1/consoles/vm3/session", headers=bearer(keeper)) as ws3:
                await recv_json(ws3, "hello")
                await ws3.send_bytes(b"vm3 works\r")
                await recv_until(ws3, b"vm3 works\r")

            # New replay_bytes: a watcher attaching now gets exactly the last 5 bytes.
            async with s.ws_connect(
                url + "/api/v1/consoles/vm1/session?mode=watch", headers=bearer(new)
            ) as w:
                hello = await recv_json(w, "hello")
                assert hello["log_next"] - hello["replay_start"] == 5
                assert await recv_until(w, b"here") == b" here"  # of "...still here"

            # vm1's link never dropped: no reconnect counted, one connection ever seen by its UART.
            r = await s.get(f"http://127.0.0.1:{mport}/metrics")
            text = await r.text()
            assert metric(text, "serialmuxd_backend_reconnects_total", console="vm1") == 0
            assert metric(text, "serialmuxd_backend_up", console="vm1") == 1
            assert 'console="vm2"' not in text
            assert uarts["vm1"].connections == 1
            await live.close()

        events = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        reloads = [e for e in events if e["event"] == "config_reload"]
        assert len(reloads) == 1
        assert reloads[0]["result"] == "applied"
        assert reloads[0]["added"] == ["vm3"] and reloads[0]["removed"] == ["vm2"]
        assert reloads[0]["sessions_revoked"] == 1
        for key in ("time", "event", "console", "user", "peer", "session", "offset"):
            assert key in reloads[0]
    finally:
        notify.close()


@pytest.mark.timeout(60)
async def test_bad_file_on_reload_is_refused_logged_audited_and_old_config_keeps_running(
    tmp_path: Path, daemon_process: Callable[[Path], DaemonProcess]
) -> None:
    """A reload with a broken file changes nothing: the log names the file and key, the audit log
    records a refused config_reload, tokens and consoles of the running config still work."""
    token = new_token()
    port = free_port()
    state = tmp_path / "state"
    good = {
        "daemon": {"state_dir": str(state), "log_format": "json"},
        "http": {"listen": [f"127.0.0.1:{port}"]},
        "console": [{"name": "demo1", "uart": "demo:?boot=0"}],
        "user": [user("alice", token, {"*": "contributor"})],
    }
    cfg_path = write_config(tmp_path / "config.toml", good)
    notify = NotifySocket(tmp_path / "notify.sock")
    p = daemon_process(cfg_path)
    p.start(env={"NOTIFY_SOCKET": str(notify.path)})
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(notify.expect, "READY=1", 20)
        async with aiohttp.ClientSession(headers=bearer(token)) as s:
            ws = await s.ws_connect(url + "/api/v1/consoles/demo1/session")
            await recv_json(ws, "hello")

            # A key the daemon does not know: refused, naming it.
            broken = dict(good, console=[{"name": "demo1", "uart": "demo:?boot=0", "ring_size": 5}])
            write_config(cfg_path, broken)
            await hup_and_wait(p, notify)
            # Not even TOML.
            cfg_path.write_text("[daemon\nstate_dir = \n")
            await hup_and_wait(p, notify)

            refusals = [
                json.loads(line)
                for line in p.log_text().splitlines()
                if line.startswith("{") and '"reload_refused"' in line
            ]
            assert len(refusals) == 2
            assert "console[0] (demo1).ring_size: unknown key" in refusals[0]["error"]
            assert str(cfg_path) in refusals[0]["error"]
            assert "not valid TOML" in refusals[1]["error"]

            r = await s.get(url + "/api/v1/consoles")
            assert r.status == 200
            assert [c["name"] for c in (await r.json())["consoles"]] == ["demo1"]
            await ws.send_bytes(b"echo still-running\r")
            await recv_until(ws, b"still-running\r\n")
            await ws.close()

        events = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        reloads = [e for e in events if e["event"] == "config_reload"]
        assert [e["result"] for e in reloads] == ["refused", "refused"]
        assert "ring_size" in reloads[0]["reason"]
    finally:
        notify.close()
    p.signal(signal.SIGTERM)
    assert p.wait(15) == 0
