"""Structured logs: per-session context is bound, keystrokes never logged."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import structlog
from structlog.testing import capture_logs

from tests.conftest import DaemonFactory, url_of
from tests.test_sessions import recv_json, recv_until


async def test_session_log_lines_carry_console_session_user_peer(make_daemon: DaemonFactory) -> None:
    """Every line logged during a session names console, session, user and peer; none holds keystrokes."""
    d = await make_daemon([{"name": "demo1", "uart": "demo:?boot=0"}])
    secret = "hunter2-keystroke-marker"
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(url_of(d) + "/api/v1/consoles/demo1/session") as ws,
        ):
            hello = await recv_json(ws, "hello")
            await ws.send_bytes(f"echo {secret}\r".encode())
            await recv_until(ws, secret.encode() + b"\r\n")
        await asyncio.sleep(0.2)
    started = [e for e in logs if e["event"] == "session_started"]
    ended = [e for e in logs if e["event"] == "session_ended"]
    assert started and ended
    for e in started + ended:
        assert e["console"] == "demo1" and e["session"] == hello["session"]
        assert e["user"] == "anonymous" and e["peer"] == "127.0.0.1"
    assert ended[0]["reason"] == "client_left"
    assert secret not in repr(logs)


def test_sigterm_exits_0_quickly_and_logs_json_lines(tmp_path: Path) -> None:
    """Under systemd (no terminal) logs are JSON lines; SIGTERM stops within a few seconds with status 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\n[http]\nlisten = ["127.0.0.1:{port}"]\n'
        '[[console]]\nname = "demo1"\nuart = "demo:?boot=0"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "daemon never became ready"
                time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.strip()]  # type: ignore[union-attr]
    events = [e["event"] for e in lines]
    assert "started" in events and events[-1] == "stopped"
    assert all("timestamp" in e and "level" in e for e in lines)


async def test_second_daemon_on_the_same_state_dir_refuses_to_start(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """Two daemons would interleave writes into the same ring files: the second is told who holds it."""
    from serialmuxd.daemon import StartupError

    state = tmp_path / "shared-state"
    await make_daemon([{"name": "demo1", "uart": "demo:?boot=0"}], state_dir=state)
    try:
        await make_daemon([{"name": "demo1", "uart": "demo:?boot=0"}], state_dir=state)
    except StartupError as e:
        assert "another serialmuxd" in str(e) and str(state) in str(e)
    else:
        raise AssertionError("the second daemon started")
