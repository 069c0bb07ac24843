"""Keystrokes and tokens never reach a log line, the audit log or a repr.

The promise is checked where it could break: structlog events captured in
process while sessions type a unique marker and clients present good and bad
tokens (headers, cookies, the login form); the JSON log of a real
``serialmuxd run`` at debug level doing the same, plus a reload with a token
pasted where its hash belongs; the audit file; and ``repr()`` of the objects
that hold credentials or sessions.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from serialmuxd.auth import new_token, token_sha256
from serialmuxd.daemon import Daemon
from serialmuxd.web import COOKIE
from tests.conftest import DaemonFactory, DaemonProcess, url_of, wait_for
from tests.test_sessions import recv_json, recv_until

# Unique per run so a hit can only come from this test.
MARKER = f"KEYSTROKE-MARKER-{time.time_ns()}"


class Secrets:
    def __init__(self) -> None:
        self.tokens = {r: new_token() for r in ("reader", "contributor", "owner")}
        self.bad = [new_token(), new_token(), "smx_" + "Q" * 43]
        self.cookies: list[str] = []

    def users(self) -> list[dict[str, Any]]:
        return [
            {"name": r, "token_sha256": token_sha256(t), "roles": {"*": r}} for r, t in self.tokens.items()
        ]

    def all(self) -> list[str]:
        return [*self.tokens.values(), *self.bad, *self.cookies, MARKER]

    def assert_absent(self, where: str, text: str) -> None:
        for secret in self.all():
            # Also a prefix of it: a truncated or partly redacted secret is still a leak.
            for probe in (secret, secret[:24]):
                assert probe not in text, f"{where} holds a secret ({probe[:12]}…)"
        assert MARKER.split("-")[-1] not in text, f"{where} holds the typed marker's digits"


async def exercise(base: str, secrets: Secrets, console: str, sock: Path | None) -> None:
    """Everything a client can do with a secret: type it, log in with it, present it."""
    hdr = {"Authorization": f"Bearer {secrets.tokens['contributor']}"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        ws = await s.ws_connect(f"{base}/api/v1/consoles/{console}/session", headers=hdr)
        await recv_json(ws, "hello")
        await ws.send_bytes(f"echo {MARKER}\r".encode())
        await recv_until(ws, f"\r\n{MARKER}".encode())  # the guest answered: the keys went through
        await ws.send_json({"type": "sysrq", "key": "h"})
        await ws.close()
        watch = await s.ws_connect(
            f"{base}/api/v1/consoles/{console}/session?mode=watch",
            headers={"Authorization": f"Bearer {secrets.tokens['reader']}"},
        )
        await recv_json(watch, "hello")
        await watch.send_bytes(MARKER.encode())  # refused (read-only), still not logged
        await recv_json(watch, "error")
        await watch.close()
        # Five failures: as many as the limiter lets through before it answers 429
        # without looking at the credential.
        url = f"{base}/api/v1/consoles"
        for headers in (
            {"Authorization": f"Bearer {secrets.bad[0]}"},
            {"Authorization": f"Token {secrets.bad[1]}"},
            {"Authorization": secrets.bad[2]},
            {"Cookie": f"{COOKIE}={secrets.bad[0]}"},
        ):
            assert (await s.get(url, headers=headers)).status == 401
        r = await s.post(f"{base}/login", data={"token": secrets.bad[1]}, allow_redirects=False)
        assert r.status == 401
        await asyncio.sleep(1.1)  # past the failure limiter's first penalty
        r = await s.post(
            f"{base}/login",
            data={"token": secrets.tokens["owner"]},
            headers={"Origin": base},
            allow_redirects=False,
        )
        assert r.status == 303, await r.text()
        secrets.cookies.append(r.cookies[COOKIE].value)
        r = await s.post(f"{base}/api/v1/consoles/{console}/disable", headers={"Origin": base})
        assert r.status == 200
        r = await s.post(f"{base}/api/v1/consoles/{console}/enable", headers={"Origin": base})
        assert r.status == 200
        r = await s.post(f"{base}/api/v1/consoles/{console}/nmi", headers={"Origin": "https://evil.example"})
        assert r.status == 403
        r = await s.get(
            f"{base}/api/v1/audit", headers={"Authorization": f"Bearer {secrets.tokens['owner']}"}
        )
        assert r.status == 200
    if sock is not None:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(f"echo {MARKER}-local\r".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            buf = b""
            while f"\r\n{MARKER}-local".encode() not in buf:
                buf += await reader.read(4096)
        writer.close()


def reprs(d: Daemon, secrets: Secrets) -> str:
    """repr() and str() of everything that holds a user, a credential or a session."""
    objs: list[object] = [d, d.config, d.config.http, d.auth, d.limiter, *d.config.users]
    for token in secrets.tokens.values():
        principal = d.auth.from_token(token)
        assert principal is not None
        objs += [principal, d.auth.from_cookie(d.auth.make_cookie(principal, 60))]
    for c in d.consoles.values():
        objs += [c, c.cfg, *c.sessions()]
    objs += list(d.sessions)
    return "\n".join(repr(o) + "\n" + str(o) for o in objs)


async def test_captured_log_events_audit_and_reprs_hold_no_keystrokes_or_tokens(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """In process, every structlog event (all levels, all fields) while sessions type a
    marker and clients present good and bad tokens and cookies: none of it is logged."""
    secrets = Secrets()
    with structlog.testing.capture_logs() as entries:
        d = await make_daemon(
            [{"name": "demo1", "uart": "demo:?boot=0"}],
            users=secrets.users(),
            daemon={"unix_listen_dir": str(tmp_path / "run")},
        )
        await wait_for(lambda: d.consoles["demo1"].up)
        live: list[str] = []
        async with aiohttp.ClientSession() as s:
            # A session open while the reprs are taken.
            ws = await s.ws_connect(
                url_of(d) + "/api/v1/consoles/demo1/session?mode=watch",
                headers={"Authorization": f"Bearer {secrets.tokens['reader']}"},
            )
            await recv_json(ws, "hello")
            await exercise(url_of(d), secrets, "demo1", tmp_path / "run" / "demo1.sock")
            live.append(reprs(d, secrets))
            await ws.close()
        seen = d.consoles["demo1"].ring.read(0, None)[1]
        await d.shutdown()
    assert any(e["event"] == "session_started" for e in entries), "capture works"
    assert seen.count(MARKER.encode()) >= 4, "the guest did see it (echo and output, twice)"
    secrets.assert_absent("a structlog event", repr(entries))
    secrets.assert_absent("audit.jsonl", (d.state_dir / "audit.jsonl").read_text())
    secrets.assert_absent("a repr", live[0] + reprs(d, secrets))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, port: int, users: str) -> str:
    return (
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nunix_listen_dir = "{tmp_path / "run"}"\n'
        'log_level = "debug"\nlog_format = "json"\n'
        f'[http]\nlisten = ["127.0.0.1:{port}"]\n'
        '[[console]]\nname = "demo1"\nuart = "demo:?boot=0"\n' + users
    )


def _users_toml(users: list[dict[str, Any]]) -> str:
    return "".join(
        f'[[user]]\nname = "{u["name"]}"\ntoken_sha256 = "{u["token_sha256"]}"\n'
        f'roles = {{ "*" = "{u["roles"]["*"]}" }}\n'
        for u in users
    )


async def _wait_http(base: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                if (await s.get(base + "/readyz")).status == 200:
                    return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the daemon did not become ready")
            await asyncio.sleep(0.1)


async def test_daemon_json_log_at_debug_holds_no_keystrokes_or_tokens(
    tmp_path: Path, daemon_process: Callable[[Path], DaemonProcess]
) -> None:
    """The real thing: `serialmuxd run` with JSON logs at debug level, sessions typing a
    marker, good and bad tokens and cookies, then a SIGHUP with a token pasted where
    its hash belongs (a likely mistake): no line of its output holds any of them."""
    secrets = Secrets()
    port = _free_port()
    cfg = tmp_path / "serialmuxd.toml"
    cfg.write_text(_config(tmp_path, port, _users_toml(secrets.users())))
    proc = daemon_process(cfg)
    proc.start()
    base = f"http://127.0.0.1:{port}"
    await _wait_http(base)
    await exercise(base, secrets, "demo1", tmp_path / "run" / "demo1.sock")
    # The operator pastes the token itself into token_sha256: the reload is refused,
    # and the refusal (log line and audit event) must not quote the value.
    pasted = secrets.tokens["owner"]
    cfg.write_text(
        _config(
            tmp_path,
            port,
            f'[[user]]\nname = "owner"\ntoken_sha256 = "{pasted}"\nroles = {{ "*" = "owner" }}\n',
        )
    )
    proc.signal(signal.SIGHUP)
    audit = tmp_path / "state" / "audit.jsonl"
    await wait_for(lambda: "config_reload" in audit.read_text(), what="reload audited")
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    text = proc.log_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    names = {e.get("event") for e in events}
    assert {"started", "session_started", "session_ended", "stopped"} <= names, names
    refused = [e for e in events if e.get("event") == "reload_refused"]
    assert refused and "token_sha256" in refused[0]["error"]
    secrets.assert_absent("the daemon's log", text)
    secrets.assert_absent("audit.jsonl", audit.read_text())
    assert not re.search(r"smx_[A-Za-z0-9_-]{20}", text), "something that looks like a token was logged"
