"""Prometheus metrics, read from the consoles' plain counters at scrape time.

Nothing on the per-byte or per-chunk path touches prometheus-client: consoles
bump integers, and this collector turns them into families when scraped.  The
label set is exactly the configured consoles, so a console removed by reload
disappears from the next scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serialmuxd import __version__

if TYPE_CHECKING:
    from serialmuxd.console import Console

P = "serialmuxd_"
DROP_REASONS = ("too_slow", "unresponsive")
MAX_ROUTES = 200  # routes are the app's own patterns, but bound the table anyway


class Metrics(Collector):
    def __init__(self, consoles: Callable[[], Mapping[str, Console]]) -> None:
        self._consoles = consoles
        self.auth_failures = 0
        self.ring_errors = 0
        self.http_head_timeouts = 0
        self.http_requests: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def http_request(self, route: str, status: int) -> None:
        key = (route, str(status))
        if key in self.http_requests or len(self.http_requests) < MAX_ROUTES * 8:
            self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def http_head_timeout(self) -> None:
        self.http_head_timeouts += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        consoles = list(self._consoles().values())
        lab = ["console"]
        rx = CounterMetricFamily(P + "uart_rx_bytes", "Bytes read from the guest's UART", labels=lab)
        tx = CounterMetricFamily(P + "uart_tx_bytes", "Bytes written to the guest's UART", labels=lab)
        up = GaugeMetricFamily(P + "backend_up", "1 when the UART link is connected", labels=lab)
        rec = CounterMetricFamily(
            P + "backend_reconnects", "UART link re-established after a loss", labels=lab
        )
        act = GaugeMetricFamily(
            P + "session_active", "1 while an interactive session is attached", labels=lab
        )
        ses = CounterMetricFamily(P + "sessions", "Interactive sessions attached", labels=lab)
        tak = CounterMetricFamily(
            P + "takeovers", "Interactive sessions taken over by a newcomer", labels=lab
        )
        holds = CounterMetricFamily(
            P + "flow_holds",
            "UART reads held while the interactive client drained (flow_hold_ms)",
            labels=lab,
        )
        drops = CounterMetricFamily(
            P + "session_drops", "Sessions dropped by the server", labels=["console", "reason"]
        )
        cap = GaugeMetricFamily(P + "ring_capacity_bytes", "Size of the ring log", labels=lab)
        nxt = GaugeMetricFamily(P + "ring_next_offset", "Offset the next logged byte gets", labels=lab)
        persist = GaugeMetricFamily(
            P + "ring_persistent",
            "1 when the ring log is on disk, 0 when kept in memory after an error",
            labels=lab,
        )
        watchers = GaugeMetricFamily(P + "watchers", "Read-only followers attached", labels=lab)
        for c in consoles:
            n = [c.name]
            k = c.counters
            rx.add_metric(n, c.rx_bytes)
            tx.add_metric(n, k.tx_bytes)
            up.add_metric(n, 1 if c.up else 0)
            rec.add_metric(n, k.reconnects)
            act.add_metric(n, 1 if c.active is not None else 0)
            ses.add_metric(n, k.sessions)
            tak.add_metric(n, k.takeovers)
            holds.add_metric(n, k.holds)
            for reason in sorted(set(DROP_REASONS) | k.drops.keys()):
                drops.add_metric([c.name, reason], k.drops.get(reason, 0))
            cap.add_metric(n, c.ring.capacity)
            nxt.add_metric(n, c.ring.next)
            persist.add_metric(n, 1 if c.ring.persistent else 0)
            watchers.add_metric(n, c.watcher_count)
        yield from (rx, tx, up, rec, act, ses, tak, holds, drops, cap, nxt, persist, watchers)
        yield GaugeMetricFamily(P + "consoles", "Configured consoles", value=len(consoles))
        yield CounterMetricFamily(P + "auth_failures", "Failed authentications", value=self.auth_failures)
        yield CounterMetricFamily(
            P + "ring_errors", "Ring log files moved aside or unusable", value=self.ring_errors
        )
        yield CounterMetricFamily(
            P + "http_request_head_timeouts",
            "HTTP connections closed for not sending a complete request head in time",
            value=self.http_head_timeouts,
        )
        http = CounterMetricFamily(
            P + "http_requests", "HTTP requests by route and status", labels=["route", "code"]
        )
        for (route, code), v in sorted(self.http_requests.items()):
            http.add_metric([route, code], v)
        yield http
        info = GaugeMetricFamily(P + "build_info", "Version of serialmuxd", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
