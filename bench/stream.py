"""The byte stream the fake VM prints, and a checker that detects loss, duplication or damage.

Every UART prints the same pseudo-random stream of printable ASCII, where the byte at
stream offset k is ``PATTERN[k % PERIOD]``.  A reader that joins mid-stream (as a
console server's client always does) locates its phase from 32 bytes of data: 32
random printable bytes are unique in a 65,521-byte period with overwhelming
probability.  From then on each chunk is checked with one memcmp, so loss, duplication
or corruption anywhere shows up as a mismatch and a resync.

Printable ASCII (0x20-0x7e) is used rather than full 8-bit data so that no peer
rewrites it: no telnet IAC (0xff), no newline for a pty's output processing, no
escape characters of conserver (^E) or of the console clients.  It is still ~6.5
bits of entropy per byte, so nothing along the way can compress it away.
"""

from __future__ import annotations

import random

PERIOD = 65521  # prime, so chunk sizes and tick sizes never line up with it
SYNC_BYTES = 32
MAX_CHUNK = 256 * 1024

PATTERN = bytes(random.Random(0x5E71A1).choices(range(0x20, 0x7F), k=PERIOD))
# PATTERN repeated far enough that any chunk of up to MAX_CHUNK bytes starting at any
# phase is one slice, so producing and checking a chunk never wraps by hand.
EXTENDED = PATTERN * (2 + MAX_CHUNK // PERIOD)
EXTENDED_VIEW = memoryview(EXTENDED)


def chunk(offset: int, size: int) -> memoryview:
    """The ``size`` bytes of the stream that start at ``offset`` (size <= MAX_CHUNK)."""
    phase = offset % PERIOD
    return EXTENDED_VIEW[phase : phase + size]


class StreamChecker:
    """Follows one reader's view of a UART stream; counts good bytes and breaks.

    ``junk`` counts bytes that could not be placed in the stream (banners such as
    conserver's ``[Enter `^Ec?' for help]``, or the damaged part around a break),
    ``errors`` counts mismatches after sync (each one is loss, duplication or damage),
    ``good`` counts bytes that matched.
    """

    __slots__ = ("_pending", "errors", "good", "junk", "phase", "synced")

    def __init__(self) -> None:
        self.synced = False
        self.phase = 0
        self.errors = 0
        self.good = 0
        self.junk = 0
        self._pending = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.synced:
            size = len(data)
            phase = self.phase
            if size <= MAX_CHUNK and EXTENDED[phase : phase + size] == data:
                self.phase = (phase + size) % PERIOD
                self.good += size
                return
            if size > MAX_CHUNK:
                view = memoryview(data)
                for start in range(0, size, MAX_CHUNK):
                    self.feed(view[start : start + MAX_CHUNK])
                return
            self.errors += 1
            self.synced = False
        self._pending += data
        self._try_sync()

    def _try_sync(self) -> None:
        pending = self._pending
        if len(pending) < SYNC_BYTES:
            return
        found = EXTENDED.find(bytes(pending[-SYNC_BYTES:]), 0, PERIOD + SYNC_BYTES)
        if found < 0:
            # Not stream data (yet): keep a bounded tail and wait for more.
            if len(pending) > 4 * SYNC_BYTES:
                self.junk += len(pending) - SYNC_BYTES
                del pending[:-SYNC_BYTES]
            return
        end_phase = (found + SYNC_BYTES) % PERIOD
        # Find where the stream data starts (what comes before it is a banner or the
        # tail of a broken stretch): the matching suffixes of ``pending`` are nested,
        # so the longest one is found by bisection with one memcmp per step.
        low, high = SYNC_BYTES, len(pending)
        while low < high:
            mid = (low + high + 1) // 2
            start = (end_phase - mid) % PERIOD
            if EXTENDED[start : start + mid] == pending[-mid:]:
                low = mid
            else:
                high = mid - 1
        self.junk += len(pending) - low
        self.good += low
        self.phase = end_phase
        self.synced = True
        pending.clear()
