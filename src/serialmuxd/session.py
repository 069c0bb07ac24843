"""What a console knows about a client attached to it.

A :class:`Session` is the console-facing half of a WebSocket or unix-socket
client.  The console pushes output with :meth:`Session.deliver`, which must
never block: each transport queues up to its bound and answers False past it,
and the console then drops that client as ``too_slow`` — the UART is never
slowed by a reader.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from serialmuxd.flag import Flag


class Mode(enum.StrEnum):
    INTERACTIVE = "interactive"
    WATCH = "watch"


class EndReason(enum.Enum):
    """Why a session ended, with the WebSocket close code it maps to."""

    CLIENT_LEFT = (1000, "client_left")
    SHUTDOWN = (1001, "shutdown")
    TAKEN_OVER = (4001, "taken_over")
    DISABLED = (4003, "disabled")
    REMOVED = (4004, "removed")
    IDLE = (4008, "idle_timeout")
    TOO_SLOW = (4009, "too_slow")
    # No answer to pings (vanished host, half-open TCP): nothing can be sent any more.
    UNRESPONSIVE = (1006, "unresponsive")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Ending:
    reason: EndReason
    message: str = ""
    by: str = ""  # on takeover: the newcomer
    peer: str = ""


def new_session_id() -> str:
    return secrets.token_hex(6)


class Session(abc.ABC):
    """One attached client; subclasses own the transport."""

    def __init__(self, *, console: str, user: str, peer: str, mode: Mode) -> None:
        self.id = new_session_id()
        self.console = console
        self.user = user
        self.peer = peer
        self.mode = mode
        self.since = time.time()
        self.last_input = time.monotonic()
        self.ending: Ending | None = None
        self._drained: Callable[[], None] | None = None

    @abc.abstractmethod
    def deliver(self, data: bytes) -> bool:
        """Queue guest output; False when the client is over its buffer bound."""

    @abc.abstractmethod
    def state_changed(self, state: str) -> None:
        """The console went ``running`` or ``stopped``."""

    @abc.abstractmethod
    def _close(self, ending: Ending) -> None:
        """Tell the client why (frame or text line) and close the transport."""

    def on_drained(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once when queued output falls to a quarter of the bound."""
        self._drained = callback

    def backlog(self) -> int:
        """Bytes accepted for this client but not yet taken by it (queue + transport)."""
        return 0

    def _check_drained(self, queued: int, bound: int) -> None:
        cb = self._drained
        if cb is not None and queued <= bound // 4:
            self._drained = None
            cb()

    def connection_gone(self) -> bool:
        """True when the client hung up but nothing noticed yet (checked by housekeeping)."""
        return False

    def heartbeat(self, now: float) -> bool:
        """False once the client has left a liveness probe unanswered too long; may
        send the probe (checked by housekeeping, ``now`` from ``time.monotonic``)."""
        return True

    def end(self, ending: Ending) -> None:
        """Close once; later calls keep the first reason (it is the one the user sees)."""
        if self.ending is not None:
            return
        self.ending = ending
        self._close(ending)

    def __repr__(self) -> str:
        # Never includes tokens or keystrokes.
        return f"<{type(self).__name__} {self.id} {self.console} {self.mode} {self.user}@{self.peer}>"


# Coalesce queued output into frames of at most this size: one syscall per
# frame, yet a frame never holds a client's whole backlog.
MAX_FRAME = 64 * 1024
# How long an ended session may take to say goodbye before its connection is cut.
FINISH_TIMEOUT_S = 2.0


class QueuedSession(Session):
    """A session whose transport is written by one pump task.

    ``deliver`` only appends to a bounded queue and wakes the pump; the pump
    awaits the transport (WebSocket, HTTP stream), so a slow client fills its
    own queue and is dropped, and the console never waits.  Consecutive output
    chunks are coalesced into one frame while the pump is busy sending.
    """

    def __init__(self, *, console: str, user: str, peer: str, mode: Mode, bound: int) -> None:
        super().__init__(console=console, user=user, peer=peer, mode=mode)
        self._bound = bound
        self._queued = 0
        # A list and a Flag, not a deque and an Event: ~1.5 KiB less per session,
        # and the queue is short (consecutive output merges into one item).
        self._items: list[bytearray | str] = []
        self._wake = Flag()
        self._finished = False
        self._cut_timer: asyncio.TimerHandle | None = None

    def deliver(self, data: bytes) -> bool:
        if self.ending is not None:
            return True
        n = len(data)
        # Queue even past the bound (by one chunk at most): the console then
        # either holds the UART while this client drains, or drops it.
        self._queued += n
        items = self._items
        if items and isinstance(items[-1], bytearray) and len(items[-1]) + n <= MAX_FRAME:
            items[-1] += data
        else:
            items.append(bytearray(data))
        self._notify()
        return self._queued <= self._bound

    def backlog(self) -> int:
        return self._queued

    @property
    def over_bound(self) -> bool:
        """More queued than the bound allows (control answers to a client that never reads)."""
        return self._queued > self._bound

    def control(self, message: dict[str, object]) -> None:
        """Queue a JSON control message, in order with the output around it.

        Counted against the bound like output; the caller checks :attr:`over_bound`.
        """
        if self.ending is not None:
            return
        text = json.dumps(message, separators=(",", ":"))
        self._queued += len(text)
        self._items.append(text)
        self._notify()

    def state_changed(self, state: str) -> None:
        self.control({"type": "state", "state": state})

    def _notify(self) -> None:
        """Something was queued or the session ended: the pump has work."""
        self._wake.set()

    def _close(self, ending: Ending) -> None:
        self._notify()
        # The pump may be blocked in a send to a client that stopped reading: it
        # would never reach the goodbye and the connection would stay open for
        # ever.  Past the bound, cut it.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._cut_timer = loop.call_later(FINISH_TIMEOUT_S, self._cut)

    def _cut(self) -> None:
        self._cut_timer = None
        if not self._finished:
            self._abort()

    def _abort(self) -> None:
        """Drop the transport at once, unsent output and all."""

    async def pump(self) -> None:
        """Send queued items until the session ends; then send the ending."""
        try:
            await self._pump(until_idle=False)
        finally:
            self._done()

    def _done(self) -> None:
        self._finished = True
        if self._cut_timer is not None:
            self._cut_timer.cancel()
            self._cut_timer = None

    async def _pump(self, *, until_idle: bool) -> bool:
        """Send what is queued; True once the ending is sent too.

        ``until_idle`` returns as soon as the queue is empty, for a pump that is
        started only when something is queued (see WsSession).
        """
        items = self._items
        while True:
            if self.ending is not None and self.ending.reason is EndReason.TOO_SLOW:
                items.clear()  # a stuck client would never take the backlog
            while items:
                # Sent by a helper so that no local keeps the last item (up to a
                # 64 KiB frame) alive while the pump sleeps, for every idle session.
                await self._send_item(items.pop(0))
            if self.ending is not None:
                await self._finish(self.ending)
                return True
            if until_idle:
                return False
            self._wake.clear()
            await self._wake.wait()

    async def _send_item(self, item: bytearray | str) -> None:
        self._queued -= len(item)
        if self._drained is not None:
            self._check_drained(self._queued, self._bound)
        if isinstance(item, str):
            await self._send_text(item)
        else:
            await self._send_bytes(bytes(item))

    @abc.abstractmethod
    async def _send_bytes(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _send_text(self, text: str) -> None: ...

    @abc.abstractmethod
    async def _finish(self, ending: Ending) -> None:
        """Say why and close the transport."""
