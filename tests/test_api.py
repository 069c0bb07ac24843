"""The HTTP API beyond sessions: wait, switches, audit, errors, OpenAPI + schemathesis."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonFactory, Users, url_of, wait_for
from tests.test_sessions import recv_json
from tests.uart import UartServer


async def test_wait_matches_output_with_offsets_and_times_out_with_408(
    make_daemon: DaemonFactory, uart: UartServer
) -> None:
    """GET /wait returns the match and its offsets; no match in time is 408 with the offset reached."""
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}])
    await asyncio.wait_for(uart.connected.wait(), 10)
    url = url_of(d) + "/api/v1/consoles/vm1/wait"
    async with aiohttp.ClientSession() as s:
        waiter = asyncio.create_task(s.get(url, params={"pattern": r"login: (\w+)", "timeout_s": "10"}))
        await asyncio.sleep(0.2)
        await uart.print(b"booting...\r\nguest login: ")
        await uart.print(b"root\r\n")
        r = await waiter
        assert r.status == 200
        body = await r.json()
        assert body == {"match": "login: root", "start": 18, "end": 29}
        # from an explicit start, output already there matches at once
        r = await s.get(url, params={"pattern": "booting", "start": "0", "timeout_s": "1"})
        assert (await r.json())["start"] == 0
        r = await s.get(url, params={"pattern": "never-printed", "timeout_s": "0"})
        assert r.status == 408
        body = await r.json()
        assert body["error"] == "timeout" and body["next"] == 31
        r = await s.get(url, params={"pattern": "(unclosed"})
        assert r.status == 400 and (await r.json())["error"] == "bad_pattern"
        r = await s.get(url, params={"pattern": r"(a)\1"})  # backreferences are not linear-time
        assert r.status == 400


async def test_disable_closes_live_session_4003_and_refuses_new_ones(
    make_daemon: DaemonFactory, uart: UartServer, users: Users
) -> None:
    """An owner's disable ends the session with a message saying who can enable it; the log keeps recording."""
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}], users=users.config())
    await asyncio.wait_for(uart.connected.wait(), 10)
    base = url_of(d) + "/api/v1"
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(base + "/consoles/vm1/session", headers=users.header("contributor"))
        await recv_json(ws, "hello")
        r = await s.post(base + "/consoles/vm1/disable", headers=users.header("contributor"))
        assert r.status == 403
        r = await s.post(base + "/consoles/vm1/disable", headers=users.header("owner"))
        assert r.status == 200 and (await r.json())["state"] == "disabled"
        err = await recv_json(ws, "error")
        assert "POST /api/v1/consoles/vm1/enable" in str(err["message"])
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4003
        r = await s.get(base + "/consoles/vm1/session", headers=users.header("contributor"))
        assert r.status == 409 and "enable" in (await r.json())["message"]
        r = await s.post(base + "/consoles/vm1/break", headers=users.header("contributor"))
        assert r.status == 409 and (await r.json())["error"] == "disabled"
        await uart.print(b"still logged while disabled")
        await wait_for(lambda: d.consoles["vm1"].ring.next == 27)
        r = await s.post(base + "/consoles/vm1/enable", headers=users.header("owner"))
        assert (await r.json())["state"] == "running"
        ws = await s.ws_connect(base + "/consoles/vm1/session", headers=users.header("contributor"))
        await recv_json(ws, "hello")
        await ws.close()


async def test_service_switch_disables_every_console_and_persists(
    make_daemon: DaemonFactory, uart: UartServer, users: Users, tmp_path: Path
) -> None:
    """The service-wide switch is kept in state_dir across a daemon restart."""
    consoles = [
        {"name": "vm1", "uart": f"unix:{uart.path}"},
        {"name": "demo", "uart": f"unix:{tmp_path}/nope"},
    ]
    state = tmp_path / "st"
    d = await make_daemon(consoles, users=users.config(), state_dir=state)
    base = url_of(d) + "/api/v1"
    async with aiohttp.ClientSession() as s:
        r = await s.post(base + "/service/disable", headers=users.header("owner"))
        assert r.status == 200 and await r.json() == {"enabled": False}
        r = await s.get(base + "/service", headers=users.header("reader"))
        assert await r.json() == {"enabled": False}
        listing = await (await s.get(base + "/consoles", headers=users.header("reader"))).json()
        assert {c["state"] for c in listing["consoles"]} == {"disabled"}
        r = await s.get(base + "/consoles/vm1/session", headers=users.header("contributor"))
        assert r.status == 409 and "POST /api/v1/service/enable" in (await r.json())["message"]
    await d.shutdown()
    d2 = await make_daemon(consoles, users=users.config(), state_dir=state)
    assert d2.consoles["vm1"].state == "disabled"
    async with aiohttp.ClientSession() as s:
        r = await s.post(url_of(d2) + "/api/v1/service/enable", headers=users.header("owner"))
        assert await r.json() == {"enabled": True}


async def test_audit_records_attach_takeover_action_and_auth_failure_with_offsets(
    make_daemon: DaemonFactory, uart: UartServer, users: Users, tmp_path: Path
) -> None:
    """audit.jsonl (0600) holds who did what with the ring offset at that moment."""
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}], users=users.config())
    await asyncio.wait_for(uart.connected.wait(), 10)
    base = url_of(d) + "/api/v1"
    await uart.print(b"0123456789")
    await wait_for(lambda: d.consoles["vm1"].ring.next == 10)
    async with aiohttp.ClientSession() as s:
        a = await s.ws_connect(base + "/consoles/vm1/session", headers=users.header("contributor"))
        hello = await recv_json(a, "hello")
        await uart.print(b"abc")
        await wait_for(lambda: d.consoles["vm1"].ring.next == 13)
        b = await s.ws_connect(base + "/consoles/vm1/session", headers=users.header("owner"))
        await recv_json(b, "hello")
        await s.get(base + "/consoles", headers={"Authorization": "Bearer smx_wrong"})
        await b.close()
        await wait_for(lambda: d.consoles["vm1"].active is None)
        r = await s.get(base + "/audit", headers=users.header("owner"))
        events = (await r.json())["events"]
        r = await s.get(base + "/audit", headers=users.header("contributor"))
        assert r.status == 403
    kinds = [e["event"] for e in events]
    assert kinds[:4] == ["attach", "takeover", "auth_failure", "detach"], kinds
    attach, takeover, failure, detach = events[:4]
    assert (
        attach["user"] == "contributor" and attach["offset"] == 10 and attach["session"] == hello["session"]
    )
    assert takeover["user"] == "owner" and takeover["from_user"] == "contributor" and takeover["offset"] == 13
    assert failure["peer"] == "127.0.0.1" and failure["user"] == ""
    assert detach["reason"] == "client_left"
    path = tmp_path / "state" / "audit.jsonl"
    assert os.stat(path).st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    assert all(json.loads(line)["time"].endswith("Z") for line in lines)
    assert "smx_wrong" not in path.read_text()


async def test_auth_failures_are_rate_limited_with_retry_after(
    make_daemon: DaemonFactory, uart: UartServer, users: Users
) -> None:
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}], users=users.config())
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(8):
            r = await s.get(url_of(d) + "/api/v1/consoles", headers={"Authorization": "Bearer smx_guess"})
            statuses.append(r.status)
        assert statuses[:5] == [401] * 5 and 429 in statuses
        r = await s.get(url_of(d) + "/api/v1/consoles", headers={"Authorization": "Bearer smx_guess"})
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert d.metrics.auth_failures >= 8


async def test_unknown_route_and_method_are_json_errors(make_daemon: DaemonFactory, uart: UartServer) -> None:
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}])
    async with aiohttp.ClientSession() as s:
        r = await s.get(url_of(d) + "/api/v1/nope")
        assert r.status == 404 and (await r.json())["error"] == "not_found"
        r = await s.delete(url_of(d) + "/api/v1/consoles")
        assert r.status == 405 and (await r.json())["message"]
        r = await s.post(url_of(d) + "/api/v1/consoles/vm1/sysrq", data="not json")
        assert r.status == 400 and "key" in (await r.json())["message"]


async def test_openapi_lists_every_route_the_server_has(make_daemon: DaemonFactory, uart: UartServer) -> None:
    """A route added to the server without a line in openapi.json fails here."""
    d = await make_daemon([{"name": "vm1", "uart": f"unix:{uart.path}"}])
    async with aiohttp.ClientSession() as s:
        doc = await (await s.get(url_of(d) + "/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    documented = {("/api/v1" + path, m.upper()) for path, ops in doc["paths"].items() for m in ops}
    from serialmuxd.web import build_app

    app = build_app(d)
    served = {
        (r.resource.canonical, r.method)
        for r in app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/api/v1") and r.method != "HEAD"
    }
    assert served == documented


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_finds_no_mismatch_against_the_running_daemon(tmp_path: Path, users: Users) -> None:
    """schemathesis drives every documented operation with generated input: the daemon
    answers as the document says, never 5xx, and stays up."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a test dependency"
    port = _free_port()
    cfg = tmp_path / "c.toml"
    lines = [
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"',
        f'[http]\nlisten = ["127.0.0.1:{port}"]',
        '[[console]]\nname = "demo1"\nuart = "demo:?boot=0"',
        f'[[console]]\nname = "vm1"\nuart = "unix:{tmp_path}/absent.serial"',
    ]
    for u in users.config():
        lines.append(
            f'[[user]]\nname = "{u["name"]}"\ntoken_sha256 = "{u["token_sha256"]}"\nroles = {{ "*" = "{u["roles"]["*"]}" }}'
        )
    cfg.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "wb"),  # noqa: SIM115
    )
    try:
        import time
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        r = subprocess.run(
            [
                st,
                "run",
                f"http://127.0.0.1:{port}/api/v1/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "ignored_auth,positive_data_acceptance,missing_required_header,unsupported_method",
                "-H",
                f"Authorization: Bearer {users.tokens['owner']}",
                "--max-examples",
                "25",
                "--request-timeout",
                "10",
                "--generation-deterministic",
                "--phases",
                "examples,fuzzing,stateful",
                "--exclude-path",
                "/consoles/{name}/session",
                "--exclude-path-regex",
                "/(service|consoles/\\{name\\})/(enable|disable)$|/reset$",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=500,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
                "PYTHONPATH": str(Path(__file__).parent.parent),
            },
        )
        assert proc.poll() is None, "the daemon died under schemathesis"
        (tmp_path / "schemathesis.txt").write_text(r.stdout + r.stderr)
        assert r.returncode == 0, _summary(r.stdout) + r.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(10)


def _summary(out: str) -> str:
    """schemathesis output with its very long generated values cut down."""
    import re

    return re.sub(r"(\S{200})\S+", r"\1…", out)[-8000:]
