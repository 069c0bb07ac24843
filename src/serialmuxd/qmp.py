"""A VM's QMP socket: BREAK, NMI, reset and the power state, via ``qemu.qmp``.

QEMU's QMP socket takes one client at a time; the monitor holds it for the
VM's whole life and reconnects like a UART backend (capped back-off, woken by
the socket's creation).  Run-state changes come from QMP events, so a console
shows ``stopped`` as soon as the guest shuts down or is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import structlog
from qemu.qmp import EventListener, QMPClient, Runstate
from qemu.qmp.error import QMPError

from serialmuxd.backends.link import BACKOFF_CAP_S, BACKOFF_FIRST_S, describe_error
from serialmuxd.errors import ActionFailed, BackendDown
from serialmuxd.flag import Flag
from serialmuxd.watch import DirWatcher

log = structlog.get_logger("serialmuxd.qmp")
# qemu.qmp logs every connect failure at ERROR through stdlib logging; our own
# structured line says it once, so keep the library quiet.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

COMMAND_TIMEOUT_S = 5.0
RUNNING_STATES = {"running", "debug"}


class QmpMonitor:
    def __init__(self, console: Any, path: str, *, watcher: DirWatcher | None = None) -> None:
        self._console = console
        self.path = path
        self._watcher = watcher
        self._client: QMPClient | None = None
        self._log = log.bind(console=console.name)
        self.last_error = ""

    @property
    def connected(self) -> bool:
        c = self._client
        return c is not None and c.runstate is Runstate.RUNNING

    async def run(self) -> None:
        wake = Flag()
        if self._watcher is not None:
            self._watcher.register(self.path, wake)
        delay = BACKOFF_FIRST_S
        try:
            while True:
                wake.clear()
                client = QMPClient(f"serialmuxd-{self._console.name}")
                try:
                    await asyncio.wait_for(client.connect(self.path), COMMAND_TIMEOUT_S)
                except (OSError, QMPError, TimeoutError) as e:
                    if self._watcher is not None:
                        self._watcher.register(self.path, wake)  # idempotent; late directories
                    self.last_error = describe_error(e) if isinstance(e, OSError) else str(e)
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                    try:
                        await asyncio.wait_for(wake.wait(), delay)
                        delay = BACKOFF_FIRST_S
                    except TimeoutError:
                        delay = min(delay * 2, BACKOFF_CAP_S)
                    continue
                delay = BACKOFF_FIRST_S
                self._client = client
                self._log.info("qmp_connected", path=self.path)
                try:
                    await self._serve(client)
                finally:
                    self._client = None
                    self._set_status(None)
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                self._log.info("qmp_disconnected")
        finally:
            if self._watcher is not None:
                self._watcher.unregister(self.path, wake)
            c = self._client
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.disconnect()

    async def _serve(self, client: QMPClient) -> None:
        listener = EventListener()
        with client.listen(listener):
            try:
                status = await asyncio.wait_for(client.execute("query-status"), COMMAND_TIMEOUT_S)
                if isinstance(status, dict):
                    self._set_status(str(status.get("status")))
            except (QMPError, TimeoutError, OSError):
                return
            events = asyncio.ensure_future(self._events(listener))
            gone = asyncio.ensure_future(self._wait_gone(client))
            try:
                await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (events, gone):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _wait_gone(self, client: QMPClient) -> None:
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()

    async def _events(self, listener: EventListener) -> None:
        async for event in listener:
            name = event.get("event")
            if name in {"SHUTDOWN", "POWERDOWN"}:
                self._set_status("shutdown")
            elif name == "STOP":
                self._set_status("paused")
            elif name in {"RESUME", "RESET"}:
                self._set_status("running")

    def _set_status(self, status: str | None) -> None:
        console = self._console
        if console.vm_status != status:
            console.vm_status = status
            state = console.state
            for s in console.sessions():
                s.state_changed(state)

    async def _execute(self, command: str, args: dict[str, object] | None = None) -> object:
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            raise BackendDown(
                f"console {self._console.name}: the VM's QMP socket {self.path} is not connected "
                f"({self.last_error or 'VM not running?'})"
            )
        try:
            return await asyncio.wait_for(client.execute(command, args), COMMAND_TIMEOUT_S)
        except TimeoutError:
            raise ActionFailed(f"QEMU did not answer {command} within {COMMAND_TIMEOUT_S:g} s") from None
        except QMPError as e:
            raise ActionFailed(f"QEMU refused {command}: {e}") from None

    async def send_break(self, chardev: str) -> None:
        await self._execute("chardev-send-break", {"id": chardev})

    async def nmi(self) -> None:
        await self._execute("inject-nmi")

    async def reset(self) -> None:
        await self._execute("system_reset")
