"""Prometheus metrics: every contract name, values after a known workload, both listeners."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serialmuxd import __version__
from serialmuxd.config import parse_config
from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, Users, url_of, wait_for
from tests.test_sessions import recv_json, recv_until
from tests.uart import UartServer

# The names of DESIGN.md "Metrics", as they appear in the text format.
PER_CONSOLE = (
    "serialmuxd_uart_rx_bytes_total",
    "serialmuxd_uart_tx_bytes_total",
    "serialmuxd_backend_up",
    "serialmuxd_backend_reconnects_total",
    "serialmuxd_session_active",
    "serialmuxd_sessions_total",
    "serialmuxd_takeovers_total",
    "serialmuxd_session_drops_total",
    "serialmuxd_ring_capacity_bytes",
    "serialmuxd_ring_next_offset",
)
GLOBAL = (
    "serialmuxd_consoles",
    "serialmuxd_auth_failures_total",
    "serialmuxd_http_requests_total",
    "serialmuxd_build_info",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Metrics text -> {(sample name, labels): value}, through prometheus-client's own parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} missing; have {sorted(k[0] for k in samples)}"
    return samples[key]


def consoles_in(samples: Samples) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == "console"}


@pytest.fixture
async def uarts(tmp_path: Path) -> AsyncIterator[tuple[UartServer, UartServer]]:
    a = UartServer(tmp_path / "vm1.serial")
    b = UartServer(tmp_path / "vm2.serial", echo=False)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


async def drop_too_slow(d: Daemon, uart: UartServer) -> None:
    """A watcher that completes the upgrade and never reads, flooded until dropped."""
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((d.bound[0].host, d.bound[0].port))
    try:
        stuck.sendall(
            b"GET /api/v1/consoles/vm2/session?mode=watch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        # The fixture's daemon has no users: open access on loopback, so no token needed.
        await wait_for(lambda: d.consoles["vm2"].watcher_count == 1, what="stuck watcher")
        chunk = b"y" * 65536
        for _ in range(400):  # bounded: far more than the 4 KiB bound plus any socket buffer
            await uart.print(chunk)
            if d.consoles["vm2"].counters.drops.get("too_slow"):
                break
        await wait_for(lambda: d.consoles["vm2"].counters.drops.get("too_slow", 0) == 1, what="drop")
    finally:
        stuck.close()


async def test_metrics_count_a_known_workload_on_both_listeners(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], users: Users
) -> None:
    """Bytes both ways, a takeover and an auth failure show up with exact values, on /metrics
    (reader token) and on the unauthenticated metrics_listen; every contract name is there."""
    u1, u2 = uarts
    d = await make_daemon(
        [
            {"name": "vm1", "uart": f"unix:{u1.path}", "ring_bytes": 65536},
            {"name": "vm2", "uart": f"unix:{u2.path}", "client_buffer_bytes": 4096},
        ],
        users=users.config(),
        http={"metrics_listen": "127.0.0.1:0"},
    )
    await asyncio.wait_for(u1.connected.wait(), 10)
    await asyncio.wait_for(u2.connected.wait(), 10)
    base = url_of(d)
    assert d.metrics_bound is not None
    open_url = d.metrics_bound.url + "/metrics"

    await u1.print(b"boot\r\n")  # 6 bytes from the guest
    await wait_for(lambda: d.consoles["vm1"].ring.next == 6)
    ws_url = base + "/api/v1/consoles/vm1/session"
    async with aiohttp.ClientSession(headers=users.header("contributor")) as s:
        first = await s.ws_connect(ws_url)
        await recv_json(first, "hello")
        await first.send_bytes(b"ls\r")  # 3 keystrokes, echoed by the test UART
        await recv_until(first, b"ls\r")
        second = await s.ws_connect(ws_url)  # takes over
        await recv_json(second, "hello")
        await recv_json(first, "taken_over")
        await second.send_bytes(b"x")
        await recv_until(second, b"x")
        await first.close()

        async with aiohttp.ClientSession() as anon:
            r = await anon.get(base + "/api/v1/consoles", headers={"Authorization": "Bearer smx_wrong"})
            assert r.status == 401
        r2 = await s.get(base + "/api/v1/consoles")
        assert r2.status == 200
        r3 = await s.get(base + "/api/v1/consoles")
        assert r3.status == 200

        async with aiohttp.ClientSession() as anon:
            r = await anon.get(base + "/metrics", headers=users.header("reader"))
            assert r.status == 200
            authed = parse(await r.text())
        opened = await scrape(open_url)
        await second.close()

    for samples in (authed, opened):
        names = {name for name, _ in samples}
        for name in PER_CONSOLE + GLOBAL:
            assert name in names, f"{name} missing from /metrics"
        assert value(samples, "serialmuxd_uart_rx_bytes_total", console="vm1") == 6 + 3 + 1
        assert value(samples, "serialmuxd_uart_tx_bytes_total", console="vm1") == 3 + 1
        assert value(samples, "serialmuxd_backend_up", console="vm1") == 1
        assert value(samples, "serialmuxd_backend_reconnects_total", console="vm1") == 0
        assert value(samples, "serialmuxd_session_active", console="vm1") == 1
        assert value(samples, "serialmuxd_sessions_total", console="vm1") == 2
        assert value(samples, "serialmuxd_takeovers_total", console="vm1") == 1
        assert value(samples, "serialmuxd_session_drops_total", console="vm1", reason="too_slow") == 0
        assert value(samples, "serialmuxd_ring_capacity_bytes", console="vm1") == 65536
        assert value(samples, "serialmuxd_ring_next_offset", console="vm1") == 10
        assert value(samples, "serialmuxd_ring_capacity_bytes", console="vm2") == 1 << 20
        assert value(samples, "serialmuxd_consoles") == 2
        assert value(samples, "serialmuxd_auth_failures_total") == 1
        assert value(samples, "serialmuxd_http_requests_total", route="/api/v1/consoles", code="200") == 2
        assert value(samples, "serialmuxd_http_requests_total", route="/api/v1/consoles", code="401") == 1
        assert value(samples, "serialmuxd_build_info", version=__version__) == 1
    # The open listener's scrape came after the authenticated one, which it counts.
    assert value(opened, "serialmuxd_http_requests_total", route="/metrics", code="200") == 1


async def test_metrics_on_the_main_listener_need_a_reader_token(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], users: Users
) -> None:
    """/metrics on the API listener is reader-only; metrics_listen serves it without a token."""
    u1, _ = uarts
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{u1.path}"}],
        users=[*users.config(), {"name": "vm1-only", "token_sha256": "0" * 64, "roles": {"vm1": "owner"}}],
        http={"metrics_listen": "127.0.0.1:0"},
    )
    assert d.metrics_bound is not None
    async with aiohttp.ClientSession() as s:
        r = await s.get(url_of(d) + "/metrics")
        assert r.status == 401
        r = await s.get(url_of(d) + "/metrics", headers=users.header("reader"))
        assert r.status == 200
        r = await s.get(d.metrics_bound.url + "/metrics")
        assert r.status == 200
        # The scrape listener serves nothing of the API.
        r = await s.get(d.metrics_bound.url + "/api/v1/consoles")
        assert r.status == 404


async def test_too_slow_drop_is_counted_by_reason(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer]
) -> None:
    """A watcher that stops reading is dropped and counted in session_drops_total{reason="too_slow"};
    rx bytes and the ring offset keep counting every byte the guest printed."""
    _, u2 = uarts
    d = await make_daemon([{"name": "vm2", "uart": f"unix:{u2.path}", "client_buffer_bytes": 4096}])
    await asyncio.wait_for(u2.connected.wait(), 10)
    await drop_too_slow(d, u2)
    samples = parse(d.metrics.render().decode())
    assert value(samples, "serialmuxd_session_drops_total", console="vm2", reason="too_slow") == 1
    rx = value(samples, "serialmuxd_uart_rx_bytes_total", console="vm2")
    assert rx == value(samples, "serialmuxd_ring_next_offset", console="vm2") == d.consoles["vm2"].ring.next
    assert rx >= 65536
    assert value(samples, "serialmuxd_session_active", console="vm2") == 0


async def test_console_removed_by_reload_disappears_from_metrics(
    make_daemon: DaemonFactory, uarts: tuple[UartServer, UartServer], tmp_path: Path
) -> None:
    """Label cardinality follows the configuration: after a reload drops vm2, no series names it."""
    u1, u2 = uarts
    consoles = [
        {"name": "vm1", "uart": f"unix:{u1.path}"},
        {"name": "vm2", "uart": f"unix:{u2.path}"},
    ]
    d = await make_daemon(consoles)
    assert consoles_in(parse(d.metrics.render().decode())) == {"vm1", "vm2"}
    new = parse_config(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "http": {"listen": ["127.0.0.1:0"]},
            "console": consoles[:1],
        },
        source="test",
    )
    await d.apply_config(new)
    after = parse(d.metrics.render().decode())
    assert consoles_in(after) == {"vm1"}
    assert value(after, "serialmuxd_consoles") == 1
