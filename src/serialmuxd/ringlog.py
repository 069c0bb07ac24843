"""Per-console ring log: the newest ``capacity`` bytes a guest printed, with offsets.

Every byte a guest prints gets a monotonic 64-bit offset. The log keeps the
newest ``capacity`` bytes in a fixed-size file written through a shared mmap, so
a ``kill -9`` of the daemon loses nothing already appended: the pages live in
the kernel's page cache and reach the disk whether or not we ever call
:meth:`RingLog.flush`.

File layout (``state_dir/NAME.ring``, all integers little-endian)::

    0      header page (4096 bytes)
             0  magic         8s   b"SMXRING1"
             8  version       u32  1
            12  header_size   u32  4096
            16  index_slots   u32  512
            20  reserved      u32  0
            24  capacity      u64  data bytes in this file
            32  base          u64  offset of the first byte this file ever held
            40  created_ns    u64  unix time of creation, nanoseconds
            48  crc32         u32  zlib.crc32 of bytes 0..48 (the fields above)
            52  reserved      u32  0
            64  next_offset   u64  offset the next byte will get       } written on
            72  index_count   u64  time index entries ever written     } every append
    4096   time index: 512 slots of (offset u64, unix time ns i64); entry k
           lives in slot k % 512
    12288  data: ``capacity`` bytes; the byte with offset o lives at o % capacity

The checksum covers only the fields that never change after creation, so a
torn or scribbled header is detected while the append path stays two stores.
``next_offset`` and ``index_count`` are checked for plausibility instead
(``base <= next_offset``). On append the data is copied first and
``next_offset`` is updated last, so a crash at any instant leaves a file whose
bytes in ``[max(base, next - capacity), next)`` are all real guest output.

Time index: an entry ``(offset, t)`` is added by :meth:`RingLog.append` when
bytes arrive and at least one second has passed since the previous entry (or
the wall clock went backwards). Hence every byte in ``[offset_i, offset_i+1)``
was appended within ``[t_i, t_i + 1 s)``, which bounds the error of
:meth:`RingLog.offset_at` to one second; 512 entries cost 8 KiB per console.

A new file is made in place (``O_EXCL``), its blocks reserved and its header
written last, so a creation cut short leaves a file that the next open rejects
(empty, bad magic). A replacement for a bad file is built as ``NAME.ring.new``
and renamed into place, so the bad file stays whole until then.

A file that is corrupt (empty, truncated, bad magic, bad checksum,
implausible offsets) or made for another capacity is renamed to
``NAME.ring.corrupt-<UTC time>`` and a fresh one is made, continuing from the
old ``next_offset`` when the old header was readable. When the file cannot be
created, preallocated or mapped (read-only directory, disk full, permission),
the log lives in memory with the same API, ``persistent`` is False and
``error`` says why; the console keeps being served.

A ring keeps no file descriptor open once mapped: at 5,000 consoles a
descriptor per ring would cost as many as the UART links themselves.  Two
daemons on one ``state_dir`` are kept apart by the daemon's own lock on the
directory (``state_dir/serialmuxd.lock``), not per file.

:meth:`RingLog.open` does blocking file I/O (call it at start-up or in a
thread). :meth:`RingLog.append` and :meth:`RingLog.read` only copy memory.
A RingLog is not thread-safe, except that :meth:`RingLog.flush` may run in a
worker thread while the event loop appends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from serialmuxd.errors import RingLogError

__all__ = ["RingLog", "read_segments", "read_window", "write_segments"]

log = structlog.get_logger("serialmuxd.ringlog")

MAGIC = b"SMXRING1"
VERSION = 1
HEADER_SIZE = 4096
INDEX_SLOTS = 512
INDEX_ENTRY = struct.Struct("<Qq")
INDEX_START = HEADER_SIZE
DATA_START = INDEX_START + INDEX_SLOTS * INDEX_ENTRY.size  # 12288, page aligned

_STATIC = struct.Struct("<8sIIIIQQQ")  # magic .. created_ns: bytes 0..48
_CRC = struct.Struct("<I")
_CRC_AT = _STATIC.size  # 48
_NEXT = struct.Struct("<Q")
_NEXT_INDEX = struct.Struct("<QQ")
_NEXT_AT = 64
_HEADER_READ = _NEXT_AT + _NEXT_INDEX.size  # 80: all header bytes that carry meaning

_SECOND_NS = 1_000_000_000
# writable()'s span limit: as much as uvloop reads at once into its own buffer.
SPAN_MAX = 256 * 1024
# The wall clock the time index records; a module global so tests can steer it.
_now = time.time_ns
# Offsets are u64 on disk; anything near the top is a scribble, not 2**63 bytes of output.
_MAX_OFFSET = 1 << 62
#: a :attr:`RingLog.watermark` the next offset never reaches: no callback
NEVER = 1 << 63


def _no_watermark(next_offset: int) -> None:
    return None


def file_size(capacity: int) -> int:
    """Bytes a ring file of ``capacity`` data bytes occupies."""
    return DATA_START + capacity


# --- pure arithmetic ---------------------------------------------------------


def write_segments(next_offset: int, capacity: int, length: int) -> list[tuple[int, int, int]]:
    """Where an append of ``length`` bytes at ``next_offset`` goes.

    Returns ``[(data_pos, src_start, n), ...]``, at most two segments (the
    second one after wrapping to position 0). When ``length`` exceeds
    ``capacity`` only the last ``capacity`` bytes are written: the earlier ones
    would be overwritten by the same append anyway.
    """
    if length <= 0:
        return []
    src = 0
    if length > capacity:
        src = length - capacity
        length = capacity
    pos = (next_offset + src) % capacity
    room = capacity - pos
    if length <= room:
        return [(pos, src, length)]
    return [(pos, src, room), (0, src + room, length - room)]


def read_window(
    start: int | None,
    next_offset: int,
    capacity: int,
    max_bytes: int | None,
    *,
    base: int = 0,
) -> tuple[int, int, bool]:
    """Resolve a read request to ``(first, end, truncated)``.

    - ``start=None``: from the oldest byte kept.
    - ``start >= 0``: from that offset. Older than the oldest kept byte: from the
      oldest, ``truncated=True``. At or beyond ``next_offset``: ``(next, next, False)``.
    - ``start < 0``: the last ``-start`` bytes; ``truncated=True`` when some of
      them existed but are no longer kept (a young log that simply has fewer
      bytes is not truncated).
    - ``max_bytes`` limits the result to its first ``max_bytes`` bytes, so a
      reader can continue from ``end``.

    ``base`` is the first offset this log ever held (a log continued from an
    older file); bytes below it are not kept.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
    oldest = max(base, next_offset - capacity, 0)
    truncated = False
    if start is None:
        first = oldest
    else:
        wanted = start if start >= 0 else max(next_offset + start, 0)
        if wanted >= next_offset:
            return next_offset, next_offset, False
        if wanted < oldest:
            first, truncated = oldest, True
        else:
            first = wanted
    end = next_offset if max_bytes is None else min(next_offset, first + max_bytes)
    return first, end, truncated


def read_segments(first: int, end: int, capacity: int) -> list[tuple[int, int]]:
    """Data positions holding offsets ``[first, end)``: ``[(data_pos, n)]``, at most two."""
    n = end - first
    if n <= 0:
        return []
    if n > capacity:
        raise ValueError(f"cannot read {n} bytes from a ring of {capacity}")
    pos = first % capacity
    room = capacity - pos
    if n <= room:
        return [(pos, n)]
    return [(pos, room), (0, n - room)]


# --- header ------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    capacity: int
    base: int
    created_ns: int
    next_offset: int
    index_count: int


@dataclass(frozen=True)
class _Verdict:
    """What an existing file is worth: ``reason`` None means usable."""

    reason: str | None
    header: _Header | None  # set when the header could be read and is plausible


def _static_header(capacity: int, base: int, created_ns: int) -> bytes:
    fields = _STATIC.pack(MAGIC, VERSION, HEADER_SIZE, INDEX_SLOTS, 0, capacity, base, created_ns)
    return fields + _CRC.pack(zlib.crc32(fields))


def _judge(head: bytes, size: int, capacity: int) -> _Verdict:
    """Decide whether a file whose first bytes are ``head`` and size ``size`` is usable."""
    if size == 0:
        return _Verdict("the file is empty", None)
    if len(head) < _HEADER_READ:
        return _Verdict(f"the file is truncated to {size} bytes, shorter than its header", None)
    if head[:8] != MAGIC:
        return _Verdict("it is not a serialmuxd ring log (bad magic)", None)
    _, version, header_size, slots, _, cap, base, created = _STATIC.unpack_from(head, 0)
    (crc,) = _CRC.unpack_from(head, _CRC_AT)
    if crc != zlib.crc32(head[:_CRC_AT]):
        return _Verdict("its header checksum does not match (corrupt header)", None)
    if version != VERSION or header_size != HEADER_SIZE or slots != INDEX_SLOTS:
        return _Verdict(f"it has format version {version}; this serialmuxd reads version {VERSION}", None)
    nxt, count = _NEXT_INDEX.unpack_from(head, _NEXT_AT)
    if cap <= 0 or not base <= nxt < _MAX_OFFSET:
        return _Verdict(f"its offsets are implausible (base {base}, next {nxt})", None)
    header = _Header(cap, base, created, nxt, count)
    if cap != capacity:
        return _Verdict(f"it holds {cap} bytes but the configured size is {capacity}", header)
    if size != file_size(cap):
        return _Verdict(f"the file is {size} bytes but a ring of {cap} bytes needs {file_size(cap)}", header)
    return _Verdict(None, header)


def _aside_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while candidate.exists():
        # Two bad files within one second (e.g. a restart loop): keep both.
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return candidate


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class _Fallback(Exception):
    """Internal: the file route failed; carries the sentence for ``error``."""

    def __init__(self, message: str, base: int = 0, seed: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.base = base
        self.seed = seed


# --- the log -----------------------------------------------------------------


class RingLog:
    """The newest ``capacity`` bytes of one console's output, addressed by offset."""

    path: Path | None
    capacity: int
    persistent: bool
    error: str | None
    notice: str | None

    def __init__(
        self,
        mm: mmap.mmap,
        capacity: int,
        *,
        path: Path | None,
        fd: int | None,
        error: str | None = None,
        notice: str | None = None,
        head: bytes | None = None,
    ) -> None:
        # Use RingLog.open or RingLog.memory; this takes over an initialised mapping.
        self._mm = mm
        self.persistent = fd is not None
        if fd is not None:
            # The MAP_SHARED mapping keeps the file's pages; the descriptor is not needed.
            os.close(fd)
        self._lock = threading.Lock()
        # A RingLog dropped without close() must still unmap, as a crashed
        # process would; close() runs this finalizer itself.
        # The data area as a writable view, sliced by writable() for reads
        # straight from a socket into the log.
        self._data = memoryview(mm)[DATA_START : DATA_START + capacity]
        # The header's next-offset word, stored to after every chunk: one item
        # assignment, where struct.pack_into exports and releases the whole
        # mapping's buffer each time (commit() 173 -> 145 ns in a tight loop).
        self._next_word = _word_at(mm, _NEXT_AT)
        #: the longest span writable() hands out: a quarter ring at most, so that a
        #: reader gathering output in the log for a quarter ring more (the console's
        #: coalescing) never has it overwritten by one read
        self.span_max = min(SPAN_MAX, capacity // 4) or 1
        #: once the next offset reaches this, each store calls :attr:`on_watermark`
        #: with the new next offset, until the owner moves the mark.  The console's
        #: hook: its output decisions run when they are due, not on every chunk.
        self.watermark = NEVER
        self.on_watermark: Callable[[int], None] = _no_watermark
        self._release = weakref.finalize(self, _release, self._data, self._next_word, mm)
        self.path = path
        self.capacity = capacity
        self.error = error
        self.notice = notice
        # Parse from a copy read with pread() when the opener has one: a read
        # through the mapping would make the kernel map up to 64 KiB of
        # neighbouring cached pages (fault-around) into every console's memory.
        src: bytes | mmap.mmap = head if head is not None else mm
        h = _read_header(src)
        self._base = h.base
        self._next = h.next_offset
        self._pos = h.next_offset % capacity
        self._index_count = h.index_count
        self._last_index_ns = 0
        if h.index_count:
            _, self._last_index_ns = INDEX_ENTRY.unpack_from(
                src, INDEX_START + ((h.index_count - 1) % INDEX_SLOTS) * INDEX_ENTRY.size
            )

    # --- construction --------------------------------------------------------

    @classmethod
    def memory(cls, capacity: int, *, base: int = 0) -> RingLog:
        """A ring kept in anonymous memory only (fallback, tests, benchmarks)."""
        return cls._memory(capacity, base=base, path=None)

    @classmethod
    def _memory(
        cls,
        capacity: int,
        *,
        base: int,
        path: Path | None,
        seed: bytes | None = None,
        error: str | None = None,
        notice: str | None = None,
    ) -> RingLog:
        _check_capacity(capacity)
        try:
            mm = mmap.mmap(-1, file_size(capacity))
        except OSError as exc:
            raise RingLogError(
                f"cannot allocate {capacity} bytes of memory for a ring log: {_why(exc)}"
            ) from exc
        if seed is not None:
            mm[: len(seed)] = seed
        else:
            _init_header(mm, capacity, base)
        return cls(mm, capacity, path=path, fd=None, error=error, notice=notice)

    @classmethod
    def open(cls, path: Path, capacity: int) -> RingLog:
        """Open or create the ring file at ``path``; never raises for file problems.

        A corrupt or differently sized file is moved aside (``notice`` says so);
        when no usable file can be had the log lives in memory (``error`` says
        why). Raises only ValueError for a capacity < 1, and RingLogError when
        not even memory for the fallback can be had.
        """
        _check_capacity(capacity)
        path = Path(path)
        try:
            # Two rounds: a file that appears between the two calls (another
            # process despite the state_dir lock) is opened, never overwritten.
            for _ in range(2):
                try:
                    return cls._open_existing(path, capacity)
                except FileNotFoundError:
                    pass
                except _Unusable as bad:
                    base = bad.header.next_offset if bad.header else 0
                    return cls._replace(path, capacity, base, aside_reason=bad.reason)
                try:
                    return cls._create_new(path, capacity)
                except FileExistsError:
                    continue
            raise _Fallback(
                f"{path} keeps appearing and disappearing while it is opened; "
                "keeping the log in memory until restart"
            )
        except _Fallback as fb:
            # An error, not a warning: what the guest prints now is lost at the next restart.
            log.error("ringlog_in_memory", path=str(path), error=fb.message)
            return cls._memory(capacity, base=fb.base, path=path, seed=fb.seed, error=fb.message)

    @classmethod
    def _open_existing(cls, path: Path, capacity: int) -> RingLog:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            problem = f"cannot open {path} for writing: {_why(exc)}"
            raise _read_only_fallback(path, capacity, problem) from exc
        try:
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, _HEADER_READ, 0)
            except OSError as exc:
                raise _Fallback(
                    f"cannot read {path}: {_why(exc)}; keeping the log in memory until restart"
                ) from exc
            verdict = _judge(head, size, capacity)
            if verdict.reason is not None:
                raise _Unusable(verdict.reason, verdict.header)
            try:
                # A sparse file (e.g. copied with cp --sparse) would SIGBUS on a full disk.
                os.posix_fallocate(fd, 0, file_size(capacity))
                mm = _map_shared(fd, file_size(capacity))
            except OSError as exc:
                raise _read_only_fallback(
                    path, capacity, f"cannot map {path} for writing: {_why(exc)}"
                ) from exc
            try:
                meta = os.pread(fd, DATA_START, 0)
            except OSError:
                meta = None
            return cls(
                mm, capacity, path=path, fd=fd, head=meta if meta and len(meta) == DATA_START else None
            )
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _create_new(cls, path: Path, capacity: int) -> RingLog:
        # The common first start: make NAME.ring in place, no side name and no
        # rename (each a metadata update per console). A crash before the
        # header is written leaves an empty or all-zero file, which the next
        # open rejects (empty, bad magic) and moves aside like any corrupt one.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _Fallback(
                f"cannot create {path}: {_why(exc)}; keeping the log in memory until restart"
            ) from exc
        try:
            try:
                mm, head = _fill_new(fd, capacity, 0)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise _Fallback(
                    f"cannot create {path}: {_why(exc)}; keeping the log in memory until restart"
                ) from exc
            return cls(mm, capacity, path=path, fd=fd, head=head)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _replace(cls, path: Path, capacity: int, base: int, *, aside_reason: str) -> RingLog:
        # A bad file is in the way: build the new one under a side name and
        # rename it into place, so NAME.ring is at every instant either the
        # old file (still there for a post-mortem) or a complete new one.
        tmp = path.with_name(path.name + ".new")
        gone = f"{path} is unusable ({aside_reason}) and "
        try:
            # O_TRUNC: a .new left by a crash may hold anything.
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise _Fallback(
                f"{gone}cannot create {tmp}: {_why(exc)}; keeping the log in memory until restart",
                base,
            ) from exc
        try:
            try:
                mm, head = _fill_new(fd, capacity, base)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _Fallback(
                    f"{gone}cannot create {path}: {_why(exc)}; keeping the log in memory until restart",
                    base,
                ) from exc
            try:
                aside = _aside_path(path)
                os.rename(path, aside)
                notice = (
                    f"{path} was unusable ({aside_reason}); moved it to {aside.name} "
                    f"and started a new log at offset {base}"
                )
                log.warning(
                    "ringlog_moved_aside",
                    path=str(path),
                    reason=aside_reason,
                    new_path=str(aside),
                    continue_from=base,
                )
                os.rename(tmp, path)
            except OSError as exc:
                mm.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _Fallback(
                    f"{gone}cannot put a new ring file in place at {path}: {_why(exc)}; "
                    "keeping the log in memory until restart",
                    base,
                ) from exc
            return cls(mm, capacity, path=path, fd=fd, notice=notice, head=head)
        except BaseException:
            os.close(fd)
            raise

    # --- state ---------------------------------------------------------------

    @property
    def next(self) -> int:
        """Offset the next appended byte will get."""
        return self._next

    @property
    def first(self) -> int:
        """Oldest offset still kept (never below the offset this log started at)."""
        return max(self._base, self._next - self.capacity)

    @property
    def base(self) -> int:
        """Offset this log started at (0, or the old next offset of a replaced file)."""
        return self._base

    def __repr__(self) -> str:
        where = str(self.path) if self.persistent else "memory"
        return f"<RingLog {where} capacity={self.capacity} first={self.first} next={self._next}>"

    # --- hot path ------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` and return the new next offset. Memory copies only."""
        n = len(data)
        if not n:
            return self._next
        mm = self._mm
        pos = self._pos
        cap = self.capacity
        if n <= cap - pos:
            mm[DATA_START + pos : DATA_START + pos + n] = data
        else:
            for dpos, src, k in write_segments(self._next, cap, n):
                mm[DATA_START + dpos : DATA_START + dpos + k] = data[src : src + k]
        return self.commit(n)

    def writable(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes go: at most :attr:`span_max` bytes, never past the end.

        For reading a socket straight into the log (it is an
        ``asyncio.BufferedProtocol.get_buffer``), which saves making a bytes
        object per chunk and copying it here.  Fill a prefix, then
        :meth:`commit` its length before anything else touches the log.
        ``sizehint`` is ignored, as asyncio allows.
        """
        pos = self._pos
        return self._data[pos : pos + self.span_max]

    def commit(self, n: int) -> int:
        """Account for ``n`` bytes just stored at the write position; the new next offset."""
        nxt = self._next
        new = nxt + n
        self._pos = new % self.capacity
        now = _now()
        last = self._last_index_ns
        if now - last >= _SECOND_NS or now < last:
            self._stamp(nxt, new, now)
        else:
            self._next_word[0] = new
        self._next = new
        if new >= self.watermark:
            self.on_watermark(new)
        return new

    def recv_from(self, recv_into: Callable[[memoryview], int]) -> int:
        """Read once with ``recv_into`` (a socket's) straight into the log; the bytes stored.

        :meth:`writable` and :meth:`commit` in one call, for a reader that runs
        once per chunk from every UART.  With the console's watermark (which
        takes the console's own call off the chunks that need nothing from it),
        a chunk read for a console nobody watches costs ~8% less (~0.3 µs at
        1,000 consoles, bench/chunk_path.py in bench/RESULTS.md).  Whatever ``recv_into`` raises leaves
        the log as it was; 0 (end of file) stores nothing.
        """
        nxt = self._next
        pos = self._pos
        n = recv_into(self._data[pos : pos + self.span_max])
        if n:
            # commit()'s body, inlined: this is the call per chunk, and the
            # frame it saves is part of the measured gain (bench/RESULTS.md).
            new = nxt + n
            self._pos = new % self.capacity
            now = _now()
            last = self._last_index_ns
            if now - last >= _SECOND_NS or now < last:
                self._stamp(nxt, new, now)
            else:
                self._next_word[0] = new
            self._next = new
            if new >= self.watermark:
                self.on_watermark(new)
        return n

    def _stamp(self, nxt: int, new: int, now: int) -> None:
        """Index entry ``(nxt, now)``, then the header's counters (new next offset, entries)."""
        count = self._index_count
        mm = self._mm
        INDEX_ENTRY.pack_into(mm, INDEX_START + (count % INDEX_SLOTS) * INDEX_ENTRY.size, nxt, now)
        self._index_count = count + 1
        self._last_index_ns = now
        # Data and index entry first, then the counters: a crash in between
        # leaves the previous, consistent state.
        _NEXT_INDEX.pack_into(mm, _NEXT_AT, new, count + 1)

    def since(self, start: int) -> bytes:
        """A copy of everything from offset ``start`` (clamped to :attr:`first`) to :attr:`next`."""
        nxt = self._next
        cap = self.capacity
        # Not max(): this runs once per client write, and the builtin costs more
        # than the two comparisons.
        if start < nxt - cap:
            start = nxt - cap
        if start < self._base:
            start = self._base
        n = nxt - start
        if n <= 0:
            return b""
        pos = start % cap
        mm = self._mm
        if n <= cap - pos:
            return mm[DATA_START + pos : DATA_START + pos + n]
        return mm[DATA_START + pos : DATA_START + cap] + mm[DATA_START : DATA_START + pos + n - cap]

    def read(self, start: int | None, max_bytes: int | None = None) -> tuple[int, bytes, bool]:
        """``(first_offset, data, truncated)`` for a request resolved by :func:`read_window`."""
        first, end, truncated = read_window(start, self._next, self.capacity, max_bytes, base=self._base)
        segs = read_segments(first, end, self.capacity)
        mm = self._mm
        if not segs:
            return first, b"", truncated
        if len(segs) == 1:
            pos, n = segs[0]
            return first, mm[DATA_START + pos : DATA_START + pos + n], truncated
        (p0, n0), (p1, n1) = segs
        return (
            first,
            mm[DATA_START + p0 : DATA_START + p0 + n0] + mm[DATA_START + p1 : DATA_START + p1 + n1],
            truncated,
        )

    # --- time index ----------------------------------------------------------

    def _index(self) -> list[tuple[int, int]]:
        """Retained index entries in the order written, implausible ones dropped."""
        count = self._index_count
        out: list[tuple[int, int]] = []
        prev = -1
        for k in range(max(0, count - INDEX_SLOTS), count):
            off, t = INDEX_ENTRY.unpack_from(self._mm, INDEX_START + (k % INDEX_SLOTS) * INDEX_ENTRY.size)
            if off < prev or off < self._base or off > self._next or t <= 0:
                continue
            out.append((off, t))
            prev = off
        return out

    def offset_at(self, when: float) -> int:
        """Offset of the first byte appended at or after unix time ``when``.

        Granularity is one second: the answer may include up to one second of
        output appended before ``when`` but never skips output appended at or
        after it. When ``when`` predates the oldest index entry still kept and
        older bytes are still in the ring, the answer is :attr:`first`. The
        result is clamped to ``[first, next]``. Wall-clock steps backwards make
        the answer approximate.
        """
        first = self.first
        when_ns = int(when * _SECOND_NS)
        entries = self._index()
        if not entries:
            return first
        for i, (off, t) in enumerate(entries):
            # Entry i's bytes were all appended within [t, t + 1 s).
            if t + _SECOND_NS > when_ns:
                if i == 0 and off > first:
                    # Bytes before the oldest kept entry have unknown times.
                    return first
                return min(max(off, first), self._next)
        return self._next

    # --- durability ----------------------------------------------------------

    def flush(self) -> None:
        """Write dirty pages to disk (fdatasync). Safe to call from a worker thread.

        Only needed against power loss: a daemon crash loses nothing without it.
        Failures are logged, not raised, so the console keeps running.
        """
        with self._lock:
            if not self.persistent or self.path is None or self._mm.closed:
                return
            try:
                # fdatasync on any descriptor of the file writes the mapping's dirty
                # pages (the page cache is per inode) and, unlike mmap.flush,
                # releases the GIL; a short-lived descriptor keeps none open.
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("ringlog_flush_failed", path=str(self.path), error=_why(exc))

    def close(self) -> None:
        """Flush and release the file; idempotent. The log is unusable afterwards."""
        self.flush()
        with self._lock:
            self._release()

    def __enter__(self) -> RingLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# --- helpers -----------------------------------------------------------------


class _Unusable(Exception):
    def __init__(self, reason: str, header: _Header | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header


_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    return libc


_LIBC: ctypes.CDLL | None = None


def _map_shared(fd: int, size: int) -> mmap.mmap:
    """A MAP_SHARED mapping of ``fd`` as an ``mmap.mmap`` that holds no descriptor.

    CPython's mmap (before 3.13's ``trackfd=False``) keeps a dup() of the file
    descriptor for the mapping's lifetime: one descriptor per console, 5,000 at
    5,000 consoles, as many as the UART links.  Instead, make an anonymous
    mapping of the right size (no descriptor) and map the file over the same
    addresses with MAP_FIXED; mmap's own close() then unmaps the file mapping.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc()
    mm = mmap.mmap(-1, size)
    view = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(view)
    del view  # release the buffer export, or mm.close() would refuse
    got = _LIBC.mmap(addr, size, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != addr:
        err = ctypes.get_errno()
        mm.close()
        raise OSError(err, os.strerror(err))
    return mm


class _PackedWord:
    """A little-endian u64 in a mapping, for hosts where a native view would be big-endian."""

    __slots__ = ("_at", "_mm")

    def __init__(self, mm: mmap.mmap, at: int) -> None:
        self._mm = mm
        self._at = at

    def __setitem__(self, index: int, value: int) -> None:
        _NEXT.pack_into(self._mm, self._at, value)

    def release(self) -> None:
        return


def _word_at(mm: mmap.mmap, at: int) -> memoryview | _PackedWord:
    """A one-item writable view of the file's little-endian u64 at ``at``."""
    if sys.byteorder == "little":
        return memoryview(mm)[at : at + 8].cast("Q")
    return _PackedWord(mm, at)


def _release(data: memoryview, word: memoryview | _PackedWord, mm: mmap.mmap) -> None:
    data.release()
    word.release()
    if not mm.closed:
        try:
            mm.close()
        except BufferError:
            # A view of the data area is still alive somewhere (a read in
            # flight at a crash-stop): the mapping goes when that view does.
            log.warning("ringlog_unmap_deferred")


def _check_capacity(capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"ring log capacity must be at least 1 byte, not {capacity}")


def _new_header(capacity: int, base: int) -> bytes:
    """The header bytes that carry meaning (0.._HEADER_READ) of a fresh, empty log."""
    static = _static_header(capacity, base, time.time_ns())
    return static + bytes(_NEXT_AT - len(static)) + _NEXT_INDEX.pack(base, 0)


def _init_header(mm: mmap.mmap, capacity: int, base: int) -> None:
    # Only for fresh anonymous memory, which is zero already.
    mm[0:_HEADER_READ] = _new_header(capacity, base)


def _fill_new(fd: int, capacity: int, base: int) -> tuple[mmap.mmap, bytes]:
    """Preallocate, write the header of and map an empty file; returns the mapping and header.

    Writing to a mapped hole on a full filesystem raises SIGBUS and kills the
    daemon, so every block is reserved before anything is written. The blocks
    read as zeros, so only the header's meaningful bytes are written, with
    pwrite rather than through the mapping: a store through a fresh shared
    mapping faults the page in with readahead, ~190 KiB of zero pages in the
    page cache and ~0.3 ms per console (ext4, measured). The returned copy
    spares the constructor a read through the mapping, so creating a ring
    touches none of its mapped pages.
    """
    size = file_size(capacity)
    os.posix_fallocate(fd, 0, size)
    head = _new_header(capacity, base)
    if os.pwrite(fd, head, 0) != len(head):
        raise OSError(errno.EIO, f"short write of the {len(head)}-byte header")
    mm = _map_shared(fd, size)
    # Without this the first append's write fault reads ahead ~190 KiB of the
    # new file's zeros into the page cache: ~0.5 ms and 190 KiB per console
    # (measured on ext4). A new file has no history to read ahead for.
    with contextlib.suppress(OSError):
        mm.madvise(mmap.MADV_RANDOM)
    return mm, head


def _read_header(mm: mmap.mmap | bytes) -> _Header:
    _, _, _, _, _, cap, base, created = _STATIC.unpack_from(mm, 0)
    nxt, count = _NEXT_INDEX.unpack_from(mm, _NEXT_AT)
    return _Header(cap, base, created, nxt, count)


def _read_only_fallback(path: Path, capacity: int, problem: str) -> _Fallback:
    """Fallback that starts from the file's content when it can at least be read."""
    try:
        with open(path, "rb") as f:
            content = f.read(file_size(capacity) + 1)
    except OSError:
        content = b""
    verdict = _judge(content[:_HEADER_READ], len(content), capacity)
    if verdict.reason is None and verdict.header is not None:
        return _Fallback(
            f"{problem}; keeping the log in memory (continuing from offset "
            f"{verdict.header.next_offset}) until restart",
            verdict.header.base,
            seed=content,
        )
    base = verdict.header.next_offset if verdict.header else 0
    return _Fallback(f"{problem}; keeping the log in memory until restart", base)
