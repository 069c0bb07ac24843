"""A real unix-socket UART server, like QEMU's ``-chardev socket,server=on``.

It is the guest side for integration tests that do not need a kernel: it
records what the daemon writes, can echo it, and prints whatever the test
asks it to.  One client at a time, as QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


class UartServer:
    def __init__(self, path: Path, *, echo: bool = True) -> None:
        self.path = path
        self.echo = echo
        self.received = bytearray()
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            writer.close()  # QEMU accepts one client
            return
        self.connections += 1
        self._writer = writer
        self.connected.set()
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writer = None
            self.connected.clear()
            writer.close()

    async def print(self, data: bytes) -> None:
        """The guest prints ``data`` (waits for the daemon to be connected)."""
        await asyncio.wait_for(self.connected.wait(), 10)
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def stop(self) -> None:
        """The VM goes away: close the listener, the client and the socket file."""
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
