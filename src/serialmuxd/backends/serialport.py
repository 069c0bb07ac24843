"""ttys, ptys and pyserial URLs through pyserial-asyncio-fast.

pyserial-asyncio-fast is the maintained drop-in fork of pyserial-asyncio (Home
Assistant's): same API, but it writes directly instead of scheduling a write
callback per call and it supports current Python versions; the original has
not had a release since 2022.
"""

from __future__ import annotations

import asyncio
from typing import Any

import serial
import serial_asyncio_fast

from serialmuxd.backends.base import BackendSink
from serialmuxd.backends.link import LinkBackend, LinkProtocol, UartProtocol
from serialmuxd.errors import ActionFailed, BackendDown
from serialmuxd.watch import DirWatcher

BREAK_S = 0.25


class SerialBackend(LinkBackend):
    capabilities = frozenset({"break"})

    def __init__(
        self, spec: str, sink: BackendSink, *, baud: int = 115200, watcher: DirWatcher | None = None
    ) -> None:
        super().__init__(spec, sink, watcher=watcher)
        self.baud = baud
        if spec.startswith("/dev/"):
            self.watch_path = spec

    async def open(self) -> tuple[asyncio.Transport, LinkProtocol]:
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await serial_asyncio_fast.create_serial_connection(
                loop,
                lambda: UartProtocol(self.sink),
                self.spec,
                baudrate=self.baud,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
            )
        except serial.SerialException as e:
            raise OSError(str(e)) from e
        assert isinstance(proto, UartProtocol)
        return transport, proto

    async def send_break(self) -> None:
        transport: Any = self.transport()
        if transport is None:
            raise BackendDown(f"the serial link {self.spec} is not connected")
        port = transport.serial
        # send_break() sleeps inside the call; drive the break condition ourselves
        # so the loop keeps draining every other console meanwhile.
        try:
            port.break_condition = True
            await asyncio.sleep(BREAK_S)
            port.break_condition = False
        except (serial.SerialException, OSError, ValueError) as e:
            raise ActionFailed(f"the serial driver refused BREAK on {self.spec}: {e}") from e
