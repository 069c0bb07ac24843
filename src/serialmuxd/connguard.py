"""A deadline for every HTTP connection to send a complete request head.

aiohttp waits for a request's headers as long as the client likes, so a client
that opens connections and sends a byte now and then (slowloris) holds them,
and their file descriptors, for ever.  Here every connection must send a
complete request head within ``http.request_head_timeout_s`` of connecting,
and again of each response, or it is closed.  The same deadline ends idle
keep-alive connections, as nginx's ``client_header_timeout`` and
``keepalive_timeout`` do.

The deadline is armed by a thin protocol around aiohttp's own (it sees when a
connection starts and ends) and disarmed by the request middleware, which is
the first place a complete request head is known.  Once a request runs (a
WebSocket session, a followed log) nothing here limits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web


class ConnGuard:
    """The deadlines of one daemon's HTTP connections."""

    def __init__(self, timeout_s: Callable[[], float], on_expire: Callable[[], None] | None = None) -> None:
        # A callable: a reload changes the timeout of the connections that come next.
        self._timeout_s = timeout_s
        self._on_expire = on_expire
        # aiohttp's handler (request.protocol) -> the wrapper that owns its deadline.
        self._by_handler: dict[object, HeadDeadline] = {}

    def wrap(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.BaseProtocol]:
        return lambda: HeadDeadline(factory(), self)

    def request_started(self, handler: object) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.disarm()

    def request_finished(self, handler: object) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.arm()

    @property
    def connections(self) -> int:
        return len(self._by_handler)


class HeadDeadline(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's handler; closes the connection when
    its deadline passes."""

    __slots__ = ("_guard", "_inner", "_timer", "_transport")

    def __init__(self, inner: asyncio.BaseProtocol, guard: ConnGuard) -> None:
        self._inner = cast(asyncio.Protocol, inner)
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard._by_handler[self._inner] = self
        self.arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self._guard._by_handler.pop(self._inner, None)
        self._transport = None
        self._inner.connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard._timeout_s(), self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if cast(Any, transport).get_write_buffer_size():
                # Still sending the last answer to a slow reader: not idle yet.
                self.arm()
                return
            if self._guard._on_expire is not None:
                self._guard._on_expire()
            # close, not abort: what the kernel still holds of the last answer is
            # delivered before the FIN, and the descriptor is freed at once all the
            # same.  No 408: a client this slow would not read it either.
            transport.close()


class GuardedTCPSite(web.TCPSite):
    """aiohttp's TCPSite with each connection's protocol wrapped in a HeadDeadline."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, guard: ConnGuard, **kw: Any) -> None:
        super().__init__(runner, host, port, **kw)
        self._guard = guard

    async def start(self) -> None:
        # TCPSite.start without its create_server: BaseSite.start registers the
        # site with the runner, which stops it at cleanup.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
