"""QEMU's socket chardev (``unix:/path``) and raw TCP serial servers (``tcp:host:port``)."""

from __future__ import annotations

import asyncio

from serialmuxd.backends.link import LinkBackend, LinkProtocol, link_protocol
from serialmuxd.config import validate_listen


class UnixSocketBackend(LinkBackend):
    """The daemon is the single client of ``-chardev socket,server=on``."""

    def parse_spec(self, spec: str) -> None:
        self.path = spec.removeprefix("unix:")
        self.watch_path = self.path

    async def open(self) -> tuple[asyncio.Transport, LinkProtocol]:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_unix_connection(lambda: link_protocol(self.sink), self.path)
        return transport, proto


class TcpBackend(LinkBackend):
    """A raw TCP serial server (ser2net ``raw`` port, a BMC's serial-over-TCP)."""

    def parse_spec(self, spec: str) -> None:
        self.host, self.port = validate_listen(spec.removeprefix("tcp:"))

    async def open(self) -> tuple[asyncio.Transport, LinkProtocol]:
        loop = asyncio.get_running_loop()
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: link_protocol(self.sink), self.host, self.port), 5
        )
        return transport, proto
