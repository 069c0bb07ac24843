"""The one small interface every UART backend implements.

Data flows one way: a backend pushes guest output to its sink (the console) per
chunk; keystrokes come back through :meth:`Backend.write`.  A backend owns its
own reconnect loop: :meth:`Backend.run` runs from daemon start to stop and never
returns while the daemon wants the console.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol, runtime_checkable


class BackendSink(Protocol):
    """What a backend feeds: implemented by :class:`serialmuxd.console.Console`."""

    def on_data(self, data: bytes) -> None:
        """Guest output, one chunk as read.  Must not block and must not raise."""

    def on_state(self, up: bool, reason: str) -> None:
        """The link came up (``up=True``) or went down, with a short reason."""


@runtime_checkable
class BufferedSink(BackendSink, Protocol):
    """A sink a backend can read into directly, as ``asyncio.BufferedProtocol`` does.

    The console hands out the free span of its ring log, so guest output goes
    from the socket to the log with no intermediate bytes object.
    """

    def get_buffer(self, sizehint: int) -> memoryview:
        """A writable, non-empty buffer for the next read; valid until buffer_updated."""

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last buffer.  Must not raise."""


@runtime_checkable
class ReceivingSink(BackendSink, Protocol):
    """A sink that does each read itself, into its own storage, with the reader's call.

    The console's is its ring log's ``recv_from``: one call a chunk where the
    buffered pair takes three (backends/readmux.py prefers it).
    """

    def receive(self, recv_into: Callable[[memoryview], int]) -> int:
        """Read once with ``recv_into`` (a socket's); the bytes read, 0 at end of file.

        Raises what ``recv_into`` raises, having stored nothing.
        """


class Backend(abc.ABC):
    """A UART link to one guest.

    ``spec`` is the console's ``uart`` string as configured (``unix:/p``,
    ``/dev/ttyS1``, ``socket://…``, ``demo:``).
    """

    #: actions this backend can do itself, a subset of {"break"}
    capabilities: frozenset[str] = frozenset()

    def __init__(self, spec: str, sink: BackendSink) -> None:
        self.spec = spec
        self.sink = sink

    @property
    @abc.abstractmethod
    def up(self) -> bool:
        """True while the UART link is connected."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, read, and reconnect with capped back-off until cancelled."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Queue keystrokes to the guest.  Raises BackendDown when not connected."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait while the link's write buffer is above its high-water mark.

        Keystrokes get ordinary back-pressure: the session stops reading its
        client until this returns.
        """

    @property
    def congested(self) -> bool:
        """True while keystrokes are queued above the high-water mark."""
        return False

    def pause_reading(self) -> bool:
        """Stop reading the guest for a moment (flow control); False if this backend can't."""
        return False

    def resume_reading(self) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`pause_reading`."""

    async def send_break(self) -> None:
        """Send a serial BREAK.  Raises ActionUnsupported when the link can't."""
        from serialmuxd.errors import ActionUnsupported

        raise ActionUnsupported(f"the {self.spec} backend cannot send a serial BREAK")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the link; called once on shutdown after run() is cancelled."""
