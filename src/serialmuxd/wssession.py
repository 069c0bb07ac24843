"""Transports for sessions over HTTP: WebSocket sessions and ``follow=1`` log streams."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from aiohttp import web

from serialmuxd.session import FINISH_TIMEOUT_S, Ending, EndReason, Mode, QueuedSession

_OP_BINARY = 0x2
_FIN = 0x80
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
# While a console is held for this client, check every this often whether it drained.
_DRAIN_POLL_S = 0.005
# An unmasked, empty, final ping frame (RFC 6455 5.5.2).
PING_FRAME = b"\x89\x00"


def binary_frame_header(n: int) -> bytes:
    """RFC 6455 header of an unmasked (server-to-client) final binary frame of n bytes."""
    if n < 126:
        return bytes((_FIN | _OP_BINARY, n))
    if n < 65536:
        return _HEAD16.pack(_FIN | _OP_BINARY, 126, n)
    return _HEAD64.pack(_FIN | _OP_BINARY, 127, n)


class WsSession(QueuedSession):
    """A WebSocket session with a direct path for console output.

    When nothing is queued (the common case: a client that keeps up), output is
    framed here and written straight to the transport with one ``writelines``:
    no pump wake-up, no coroutine per chunk.  The queue and its pump take over
    whenever something is waiting (hello, replay, control answers, a backlog),
    so frames always leave in order.  The bound is the transport's own buffer.

    The pump is a task only while something is queued: a session streaming
    through the direct path carries no idle task (~1.2 KiB each, measured at
    1,000 sessions).  :attr:`sender` is the running one, if any.

    Liveness is checked by the daemon's once-a-second housekeeping through
    :meth:`heartbeat`, not by a timer per connection (aiohttp's ``heartbeat=``
    keeps ~0.5 KiB of timer state per session, and re-arms it on every frame).
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        console: str,
        user: str,
        peer: str,
        mode: Mode,
        bound: int,
        heartbeat_s: float,
    ) -> None:
        super().__init__(console=console, user=user, peer=peer, mode=mode, bound=bound)
        self.ws = ws
        self._transport = _transport_of(ws)
        self._poll: asyncio.TimerHandle | None = None
        self.sender: asyncio.Task[None] | None = None
        self._heartbeat_s = heartbeat_s
        self._heard_at = time.monotonic()
        self._pinged_at = 0.0  # 0: no ping unanswered

    def heard(self) -> None:
        """A frame came from the client (any frame: a pong, a keystroke, a close)."""
        self._heard_at = time.monotonic()
        self._pinged_at = 0.0

    def heartbeat(self, now: float) -> bool:
        """Ping a client silent for ``heartbeat_s``; False once it left the ping
        unanswered for half that again (a vanished host, a half-open TCP)."""
        if self._pinged_at:
            return now - self._pinged_at < self._heartbeat_s / 2
        if now - self._heard_at >= self._heartbeat_s:
            t = self._transport
            if t is not None and not t.is_closing():
                # Frames are written whole (ours and aiohttp's), so a control
                # frame may go between any two of them.
                t.write(PING_FRAME)
            self._pinged_at = now
        return True

    def _notify(self) -> None:
        if self.sender is not None or self._finished:
            return  # the running one sees the new item (or the ending) before it stops
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.sender = loop.create_task(self._send_queued(), name=f"pump:{self.id}")

    async def _send_queued(self) -> None:
        try:
            if await self._pump(until_idle=True):
                self._done()
        except (ConnectionError, RuntimeError):
            # The client is gone mid-send; the reader notices and ends the session.
            self._abort()
            self._done()
        finally:
            self.sender = None

    def deliver(self, data: bytes) -> bool:
        t = self._transport
        if (
            self.ending is None
            and not self._items
            and t is not None
            and not t.is_closing()
            and not self.ws.closed
        ):
            t.writelines((binary_frame_header(len(data)), data))
            return t.get_write_buffer_size() <= self._bound
        return super().deliver(data)

    def backlog(self) -> int:
        t = self._transport
        return self._queued + (t.get_write_buffer_size() if t is not None else 0)

    def on_drained(self, callback: Callable[[], None] | None) -> None:
        super().on_drained(callback)
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if callback is not None:
            self._poll = asyncio.get_running_loop().call_later(_DRAIN_POLL_S, self._poll_drained)

    def _poll_drained(self) -> None:
        """Output written directly sits in the transport, whose drain we can't hook:
        look every few ms while held (a hold lasts at most flow_hold_ms)."""
        self._poll = None
        if self._drained is None:
            return
        if self.backlog() <= self._bound // 4:
            self._check_drained(0, self._bound)
        else:
            self._poll = asyncio.get_running_loop().call_later(_DRAIN_POLL_S, self._poll_drained)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def _send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def _finish(self, ending: Ending) -> None:
        try:
            async with asyncio.timeout(FINISH_TIMEOUT_S):
                if ending.reason is EndReason.TAKEN_OVER:
                    await self.ws.send_json({"type": "taken_over", "by": ending.by, "peer": ending.peer})
                elif ending.message:
                    await self.ws.send_json(
                        {"type": "error", "error": ending.reason.label, "message": ending.message}
                    )
                await self.ws.close(code=ending.reason.code, message=ending.reason.label.encode())
        except (TimeoutError, ConnectionError, RuntimeError):
            # A stuck or vanished client: cut it; it can't be told anything more.
            self._abort()
            return
        t = self._transport
        if t is not None and t.get_write_buffer_size():
            # Closed (e.g. by the heartbeat) with output still unsent: a close()
            # would wait for a reader that is not coming.
            t.abort()


class StreamSession(QueuedSession):
    """``GET …/log?follow=1``: a read-only follower writing raw bytes to an HTTP body."""

    def __init__(self, resp: web.StreamResponse, *, console: str, user: str, peer: str, bound: int) -> None:
        super().__init__(console=console, user=user, peer=peer, mode=Mode.WATCH, bound=bound)
        self.resp = resp

    def _transport(self) -> asyncio.Transport | None:
        req = self.resp._req  # set by prepare()
        return None if req is None else req.transport

    def _abort(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.abort()

    def connection_gone(self) -> bool:
        # A follower of a quiet console is only written to when output comes;
        # without this check one that hung up would wait for ever.
        transport = self._transport()
        return self.resp.prepared and (transport is None or transport.is_closing())

    async def _send_bytes(self, data: bytes) -> None:
        await self.resp.write(data)

    async def _send_text(self, text: str) -> None:
        return  # state changes are not part of a raw byte stream

    async def _finish(self, ending: Ending) -> None:
        try:
            async with asyncio.timeout(FINISH_TIMEOUT_S):
                await self.resp.write_eof()
        except (TimeoutError, ConnectionError, RuntimeError):
            self._abort()


def _transport_of(ws: web.WebSocketResponse) -> asyncio.Transport | None:
    req = ws._req  # set by prepare(), which runs before a session is made
    return None if req is None else req.transport
