"""Transports for sessions over HTTP: WebSocket sessions and ``follow=1`` log streams."""

from __future__ import annotations

import asyncio

from aiohttp import web

from serialmuxd.session import FINISH_TIMEOUT_S, Ending, EndReason, Mode, QueuedSession


class WsSession(QueuedSession):
    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        console: str,
        user: str,
        peer: str,
        mode: Mode,
        bound: int,
    ) -> None:
        super().__init__(console=console, user=user, peer=peer, mode=mode, bound=bound)
        self.ws = ws
        self._transport = _transport_of(ws)

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
