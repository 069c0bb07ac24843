"""Transports for sessions over HTTP: WebSocket sessions and ``follow=1`` log streams."""

from __future__ import annotations

import asyncio

from aiohttp import web

from serialmuxd.session import Ending, EndReason, Mode, QueuedSession

# How long a closing session may take to say goodbye before its socket is cut.
FINISH_TIMEOUT_S = 2.0


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
            transport = self.ws._req.transport if self.ws._req is not None else None
            if transport is not None:
                transport.abort()


class StreamSession(QueuedSession):
    """``GET …/log?follow=1``: a read-only follower writing raw bytes to an HTTP body."""

    def __init__(self, resp: web.StreamResponse, *, console: str, user: str, peer: str, bound: int) -> None:
        super().__init__(console=console, user=user, peer=peer, mode=Mode.WATCH, bound=bound)
        self.resp = resp

    async def _send_bytes(self, data: bytes) -> None:
        await self.resp.write(data)

    async def _send_text(self, text: str) -> None:
        return  # state changes are not part of a raw byte stream

    async def _finish(self, ending: Ending) -> None:
        try:
            async with asyncio.timeout(FINISH_TIMEOUT_S):
                await self.resp.write_eof()
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
