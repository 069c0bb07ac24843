"""The audit trail: ``state_dir/audit.jsonl`` and ``GET /api/v1/audit``.

Promises: one JSON object per event (attach, takeover, detach with reason,
watch, break, sysrq, nmi, reset, enable, disable, auth_failure) with time,
event, console, user, peer, session and the ring offset at that moment, so an
auditor reading the ring from that offset sees exactly what the session saw;
the file is append-only, mode 0600, flushed per event; owners read it back
filtered by console and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from serialmuxd.audit import EVENTS, AuditLog
from serialmuxd.daemon import Daemon
from serialmuxd.web import COOKIE
from tests.conftest import DaemonFactory, Users, url_of, wait_for
from tests.uart import UartServer

KEYS = {"time", "event", "console", "user", "peer", "session", "offset"}


async def start(make_daemon: DaemonFactory, users: Users, uart: UartServer) -> Daemon:
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{uart.path}"}, {"name": "demo1", "uart": "demo:?boot=0"}],
        users=users.config(),
    )
    await asyncio.wait_for(uart.connected.wait(), 10)
    await wait_for(lambda: all(c.up for c in d.consoles.values()), what="consoles up")
    return d


def events(d: Daemon) -> list[dict[str, Any]]:
    """What is on disk, line by line (not through the API)."""
    assert d.audit is not None
    lines = d.audit.path.read_text().splitlines()
    out = [json.loads(line) for line in lines]
    for e in out:
        assert e.keys() >= KEYS, e
        assert e["event"] in EVENTS
        assert datetime.fromisoformat(e["time"].replace("Z", "+00:00")).tzinfo is not None
    return out


def ring(d: Daemon, console: str, start: int, end: int) -> bytes:
    first, data, truncated = d.consoles[console].ring.read(start, end - start)
    assert first == start and not truncated
    return data


class Seen:
    """Everything one WebSocket client received, split at its hello."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.data = bytearray()
        self.control: list[dict[str, Any]] = []
        self.close_code: int | None = None

    async def read_until(
        self, needle: bytes | None = None, *, closed: bool = False, timeout: float = 5
    ) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if needle is not None and needle in self.data:
                    return
                if closed and self.close_code is not None:
                    return
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self.data += msg.data
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "hello":
                        self.hello = m
                    else:
                        self.control.append(m)
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    self.close_code = self.ws.close_code
                    return

    @property
    def replay(self) -> int:
        return int(self.hello["log_next"]) - int(self.hello["replay_start"])

    @property
    def live(self) -> bytes:
        """What came after the replay: the output from the attach offset on."""
        return bytes(self.data[self.replay :])


async def attach(
    s: aiohttp.ClientSession, d: Daemon, users: Users, role: str, console: str, mode: str = "interactive"
) -> Seen:
    ws = await s.ws_connect(
        url_of(d) + f"/api/v1/consoles/{console}/session", params={"mode": mode}, headers=users.header(role)
    )
    seen = Seen(ws)
    async with asyncio.timeout(5):
        while not seen.hello:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            m = json.loads(msg.data)
            if m["type"] == "hello":
                seen.hello = m
    return seen


async def test_session_events_carry_offsets_that_show_what_each_session_saw(
    make_daemon: DaemonFactory, users: Users, uart: UartServer
) -> None:
    """attach, watch, takeover and detach are recorded with user, peer, session id and the
    ring offset; the ring between a session's attach and its end is byte for byte what
    that session was shown live."""
    d = await start(make_daemon, users, uart)
    await uart.print(b"boot: before anyone looked\r\n")
    await wait_for(lambda: d.consoles["vm1"].ring.next == 28)
    async with aiohttp.ClientSession() as s:
        a = await attach(s, d, users, "contributor", "vm1")
        await uart.print(b"seen-by-A\r\n")
        await a.read_until(b"seen-by-A\r\n")
        w = await attach(s, d, users, "reader", "vm1", mode="watch")
        await a.ws.send_bytes(b"typed-by-A\r")
        await a.read_until(b"typed-by-A\r")
        b = await attach(s, d, users, "owner", "vm1")
        await a.read_until(closed=True)
        assert a.close_code == 4001
        await uart.print(b"seen-by-B\r\n")
        await b.read_until(b"seen-by-B\r\n")
        await w.read_until(b"seen-by-B\r\n")
        await b.ws.close()
        await wait_for(lambda: d.consoles["vm1"].active is None)
        await uart.print(b"after-B-left\r\n")
        await w.read_until(b"after-B-left\r\n")
        await w.ws.close()
        await wait_for(lambda: d.consoles["vm1"].watcher_count == 0)
    log = [e for e in events(d) if e["console"] == "vm1"]
    assert [e["event"] for e in log] == ["attach", "watch", "takeover", "detach", "detach"], log
    at, watch, takeover, b_left, w_left = log
    assert at["user"] == "contributor" and at["session"] == a.hello["session"]
    assert watch["user"] == "reader" and watch["session"] == w.hello["session"]
    assert takeover["user"] == "owner" and takeover["session"] == b.hello["session"]
    assert takeover["from_user"] == "contributor" and takeover["from_peer"] == "127.0.0.1"
    assert (b_left["session"], b_left["reason"]) == (b.hello["session"], "client_left")
    assert (w_left["session"], w_left["reason"]) == (w.hello["session"], "client_left")
    assert {e["peer"] for e in log} == {"127.0.0.1"}
    # The offsets: each is where that session's live view began or ended.
    assert at["offset"] == a.hello["log_next"] == 28
    assert takeover["offset"] == b.hello["log_next"]
    assert ring(d, "vm1", at["offset"], takeover["offset"]) == a.live == b"seen-by-A\r\ntyped-by-A\r"
    assert ring(d, "vm1", takeover["offset"], b_left["offset"]) == b.live == b"seen-by-B\r\n"
    assert ring(d, "vm1", watch["offset"], w_left["offset"]) == w.live
    assert w.live.endswith(b"after-B-left\r\n")
    # The replay each one saw first is the ring just before its attach offset.
    assert bytes(a.data[: a.replay]) == ring(d, "vm1", a.hello["replay_start"], at["offset"])


async def test_actions_are_audited_with_user_session_and_the_offset_before_their_effect(
    make_daemon: DaemonFactory, users: Users, uart: UartServer
) -> None:
    """break, sysrq (with its key), nmi and reset, through REST (no session) and through
    a session's control frames (its id); the guest's answer follows the recorded offset."""
    d = await start(make_daemon, users, uart)
    base = url_of(d) + "/api/v1/consoles/demo1"
    hdr = users.header("contributor")
    async with aiohttp.ClientSession() as s:
        for kind in ("break", "nmi"):
            assert (await s.post(f"{base}/{kind}", headers=hdr)).status == 200
        assert (await s.post(f"{base}/sysrq", json={"key": "h"}, headers=hdr)).status == 200
        sess = await attach(s, d, users, "owner", "demo1")
        for frame in ({"type": "sysrq", "key": "h"}, {"type": "nmi"}, {"type": "break"}, {"type": "reset"}):
            before = len(events(d))
            await sess.ws.send_json(frame)
            await wait_for(lambda b=before: len(events(d)) > b, what=f"audit of {frame}")  # type: ignore[misc]
        await sess.read_until(b"Linux version")  # the guest booted again after the reset
        await sess.ws.close()
        await wait_for(lambda: d.consoles["demo1"].active is None)
        assert (await s.post(f"{base}/reset", headers=hdr)).status == 200
        await wait_for(lambda: d.consoles["demo1"].up)
    log = [e for e in events(d) if e["console"] == "demo1" and e["event"] not in {"attach", "detach"}]
    assert [(e["event"], e["user"], e["session"]) for e in log] == [
        ("break", "contributor", None),
        ("nmi", "contributor", None),
        ("sysrq", "contributor", None),
        ("sysrq", "owner", sess.hello["session"]),
        ("nmi", "owner", sess.hello["session"]),
        ("break", "owner", sess.hello["session"]),
        ("reset", "owner", sess.hello["session"]),
        ("reset", "contributor", None),
    ]
    assert [e["key"] for e in log if e["event"] == "sysrq"] == ["h", "h"]
    assert all(e["peer"] == "127.0.0.1" and isinstance(e["offset"], int) for e in log)
    offsets = [e["offset"] for e in log]
    assert offsets == sorted(offsets)
    await wait_for(lambda: d.consoles["demo1"].ring.next > offsets[-1] + 100, what="reboot output")
    end = d.consoles["demo1"].ring.next
    by = {(e["event"], e["session"] is None): e["offset"] for e in log}
    assert b"Uhhuh. NMI received" in ring(d, "demo1", by["nmi", True], by["sysrq", True])
    assert b"sysrq: HELP" in ring(d, "demo1", by["sysrq", True], by["sysrq", False])
    assert b"sysrq: HELP" in ring(d, "demo1", by["sysrq", False], by["nmi", False])
    assert b"Linux version" in ring(d, "demo1", by["reset", True], end)


async def test_switches_are_audited_and_a_disabled_session_ends_with_reason_disabled(
    make_daemon: DaemonFactory, users: Users, uart: UartServer
) -> None:
    """enable/disable of a console (with its offset) and of the service (console null);
    the session the disable closed has a detach with reason disabled."""
    d = await start(make_daemon, users, uart)
    base = url_of(d) + "/api/v1"
    own = users.header("owner")
    async with aiohttp.ClientSession() as s:
        a = await attach(s, d, users, "contributor", "vm1")
        await uart.print(b"0123456789")
        await a.read_until(b"0123456789")
        assert (await s.post(base + "/consoles/vm1/disable", headers=own)).status == 200
        await a.read_until(closed=True)
        assert a.close_code == 4003
        assert (await s.post(base + "/consoles/vm1/enable", headers=own)).status == 200
        assert (await s.post(base + "/service/disable", headers=own)).status == 200
        assert (await s.post(base + "/service/enable", headers=own)).status == 200
    log = [e for e in events(d) if e["event"] in {"disable", "enable", "detach"}]
    assert [(e["event"], e["console"], e["user"]) for e in log] == [
        ("disable", "vm1", "owner"),
        ("detach", "vm1", "contributor"),
        ("enable", "vm1", "owner"),
        ("disable", None, "owner"),
        ("enable", None, "owner"),
    ]
    assert log[0]["offset"] == 10 and log[1]["reason"] == "disabled" and log[1]["offset"] == 10
    assert log[3]["offset"] is None and log[3]["peer"] == "127.0.0.1"


async def test_auth_failures_are_audited_without_the_credential(
    make_daemon: DaemonFactory, users: Users, uart: UartServer
) -> None:
    """A bad token, no token, a bad cookie and a failed web login each leave an
    auth_failure with the peer and a reason; the presented secret never appears."""
    d = await start(make_daemon, users, uart)
    base = url_of(d)
    wrong = "smx_" + "W" * 43
    bad_cookie = "bm9ib2R5fDk5OTk5OTk5OTk5fGFiYw"
    async with aiohttp.ClientSession() as s:
        await s.get(base + "/api/v1/consoles", headers={"Authorization": f"Bearer {wrong}"})
        await s.get(base + "/api/v1/consoles")
        await s.get(base + "/api/v1/consoles", headers={"Cookie": f"{COOKIE}={bad_cookie}"})
        r = await s.post(base + "/login", data={"token": wrong + "x"}, allow_redirects=False)
        assert r.status == 401
    log = [e for e in events(d) if e["event"] == "auth_failure"]
    assert len(log) == 4
    assert all(e["peer"] == "127.0.0.1" and e["user"] == "" and e["reason"] for e in log)
    assert [e["reason"] for e in log][:2] == ["bad token", "no token"]
    text = (d.state_dir / "audit.jsonl").read_text()
    assert "W" * 20 not in text and bad_cookie not in text


async def test_audit_file_is_0600_append_only_and_kept_across_restarts(
    make_daemon: DaemonFactory, users: Users, uart: UartServer, tmp_path: Path
) -> None:
    """The file is opened O_APPEND with mode 0600 (a pre-existing looser mode is
    tightened), every event is on disk as soon as it happened, and a restart appends."""
    state = tmp_path / "state"
    state.mkdir()
    path = state / "audit.jsonl"
    path.write_text('{"event":"from before","time":"2026-01-01T00:00:00Z"}\n')
    path.chmod(0o644)
    d = await start(make_daemon, users, uart)
    assert d.audit is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fd = d.audit._fd
    assert os.path.samefile(f"/proc/self/fd/{fd}", path)
    flags = int(
        dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines())[
            "flags"
        ],
        8,
    )
    assert flags & os.O_APPEND and flags & os.O_ACCMODE == os.O_WRONLY
    async with aiohttp.ClientSession() as s:
        await s.post(url_of(d) + "/api/v1/consoles/vm1/disable", headers=users.header("owner"))
        # On disk at once: no buffer between the event and the file.
        assert path.read_text().splitlines()[-1].startswith('{"time"')
        assert json.loads(path.read_text().splitlines()[-1])["event"] == "disable"
    await d.shutdown()
    d2 = await start(make_daemon, users, uart)
    async with aiohttp.ClientSession() as s:
        await s.post(url_of(d2) + "/api/v1/consoles/vm1/enable", headers=users.header("owner"))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["event"] == "from before"
    assert [json.loads(x)["event"] for x in lines[1:]] == ["disable", "enable"]


async def test_audit_api_filters_by_console_and_time_for_owners_only(
    make_daemon: DaemonFactory, users: Users, uart: UartServer
) -> None:
    """GET /audit?console=&since= returns matching events oldest first, to owners only."""
    d = await start(make_daemon, users, uart)
    base = url_of(d) + "/api/v1"
    own = users.header("owner")
    async with aiohttp.ClientSession() as s:
        await s.post(base + "/consoles/vm1/disable", headers=own)
        await s.post(base + "/consoles/demo1/disable", headers=own)
        await asyncio.sleep(0.01)
        middle = datetime.now(UTC)
        await asyncio.sleep(0.01)
        await s.post(base + "/consoles/vm1/enable", headers=own)
        await s.post(base + "/consoles/demo1/enable", headers=own)

        async def get(**params: str) -> list[dict[str, Any]]:
            r = await s.get(base + "/audit", params=params, headers=own)
            assert r.status == 200, await r.text()
            return (await r.json())["events"]  # type: ignore[no-any-return]

        every = await get()
        assert [(e["event"], e["console"]) for e in every] == [
            ("disable", "vm1"),
            ("disable", "demo1"),
            ("enable", "vm1"),
            ("enable", "demo1"),
        ]
        assert [e["event"] for e in await get(console="vm1")] == ["disable", "enable"]
        since = middle.isoformat().replace("+00:00", "Z")
        assert [(e["event"], e["console"]) for e in await get(since=since)] == [
            ("enable", "vm1"),
            ("enable", "demo1"),
        ]
        assert [e["console"] for e in await get(console="demo1", since=since)] == ["demo1"]
        assert await get(since="2999-01-01T00:00:00Z") == []
        assert await get(console="nosuch") == []
        for role, status in (("contributor", 403), ("reader", 403)):
            r = await s.get(base + "/audit", headers=users.header(role))
            assert r.status == status
        r = await s.get(base + "/audit")
        assert r.status == 401
        r = await s.get(base + "/audit", params={"since": "yesterday"}, headers=own)
        assert r.status == 400 and "RFC 3339" in (await r.json())["message"]


def test_reading_returns_the_newest_events_when_there_are_more_than_the_limit(tmp_path: Path) -> None:
    """A long-lived host has more events than one answer holds: the answer is the newest
    ones (oldest first), not the oldest ones from months ago; a torn last line is skipped."""
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(50):
        log.record("watch", console="vm1" if i % 2 else "vm2", user=f"u{i}", peer="p", offset=i)
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"time": "2026-')  # a crash mid-write
    got = log.read(limit=10)
    assert [e["offset"] for e in got] == list(range(40, 50))
    assert [e["offset"] for e in log.read(console="vm1", limit=3)] == [45, 47, 49]
    assert len(log.read()) == 50
    log.close()


def test_record_returns_the_entry_with_every_contract_key(tmp_path: Path) -> None:
    """Pure shape: keys always present (null when they do not apply), extras only when set."""
    log = AuditLog(tmp_path / "audit.jsonl")
    e = log.record(
        "detach",
        console="vm1",
        user="alice",
        peer="::1",
        session="abc",
        offset=7,
        reason="idle_timeout",
        from_user=None,
    )
    assert e.keys() >= KEYS and e["reason"] == "idle_timeout" and "from_user" not in e
    e = log.record("enable", user="bob", peer="127.0.0.1")
    assert e["console"] is None and e["session"] is None and e["offset"] is None
    assert time.time() - datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")).timestamp() < 5
    log.close()
