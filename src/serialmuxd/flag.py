"""A small awaitable flag for the objects there is one of per console or session.

``asyncio.Event`` allocates a ``deque`` for its waiters up front: ~1 KiB with
the object, before anyone waits.  With several per console (link wake-up,
write-side flow control, a session's pump) that is measurable at thousands of
consoles, and these flags are almost never waited on while set.  A
:class:`Flag` is ~60 bytes and makes its future only when someone waits.
"""

from __future__ import annotations

import asyncio


class Flag:
    """``asyncio.Event``'s set/clear/is_set/wait, allocating only while waited on."""

    __slots__ = ("_fut", "_set")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._fut: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        fut = self._fut
        if fut is None or fut.done():
            fut = self._fut = asyncio.get_running_loop().create_future()
        # Shielded: one waiter cancelled (a wait_for timeout) must not wake the others.
        await asyncio.shield(fut)
