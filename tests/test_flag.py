"""Flag: the per-console wake-up behaves like asyncio.Event where the daemon relies on it."""

from __future__ import annotations

import asyncio

import pytest

from serialmuxd.flag import Flag


async def test_wait_returns_at_once_when_set() -> None:
    """A link whose socket already appeared does not sleep for the back-off."""
    flag = Flag(True)
    await asyncio.wait_for(flag.wait(), 0.5)
    assert flag.is_set()


async def test_set_wakes_every_waiter() -> None:
    """Keystroke writers blocked on a full UART all resume when it drains."""
    flag = Flag()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 0.5)


async def test_a_timed_out_waiter_does_not_cancel_the_others() -> None:
    """wait_for(flag.wait(), backoff) timing out must not wake or break other waiters."""
    flag = Flag()
    patient = asyncio.ensure_future(flag.wait())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flag.wait(), 0.01)
    await asyncio.sleep(0)
    assert not patient.done()
    flag.set()
    await asyncio.wait_for(patient, 0.5)


async def test_clear_makes_the_next_wait_block() -> None:
    """A cleared flag blocks again, as the reconnect loop clears it before each try."""
    flag = Flag(True)
    flag.clear()
    assert not flag.is_set()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flag.wait(), 0.01)
    flag.set()
    await asyncio.wait_for(flag.wait(), 0.5)


def test_an_idle_flag_holds_no_future() -> None:
    """Thousands of idle consoles pay for a slotted object, not a waiter queue."""
    flag = Flag()
    flag.set()
    flag.clear()
    assert not hasattr(flag, "__dict__")
    assert flag._fut is None
