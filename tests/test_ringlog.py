"""Ring log behaviour checked against a model: a bytes object of everything ever written.

The promises: every byte gets a monotonic offset; the newest ``capacity`` bytes
are kept; reads by offset, by "last N" and from the oldest return exactly the
model's bytes with the right ``truncated`` flag; offsets and data survive a
close and a crash (object dropped without flush or close); ``offset_at`` never
skips output written at or after the asked time and is off by at most a second.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serialmuxd import ringlog
from serialmuxd.ringlog import RingLog, read_segments, read_window, write_segments

# --- the model ----------------------------------------------------------------


@dataclass
class Model:
    capacity: int
    everything: bytearray = field(default_factory=bytearray)

    @property
    def next(self) -> int:
        return len(self.everything)

    @property
    def first(self) -> int:
        return max(0, self.next - self.capacity)

    def read(self, start: int | None, max_bytes: int | None) -> tuple[int, bytes, bool]:
        n, kept = self.next, self.first
        truncated = False
        if start is None:
            f = kept
        else:
            want = start if start >= 0 else max(n + start, 0)
            if want >= n:
                return n, b"", False
            f, truncated = (kept, True) if want < kept else (want, False)
        end = n if max_bytes is None else min(n, f + max_bytes)
        return f, bytes(self.everything[f:end]), truncated


capacities = st.integers(min_value=1, max_value=64)
starts = st.one_of(st.none(), st.integers(min_value=-200, max_value=400))
max_bytes_st = st.one_of(st.none(), st.integers(min_value=0, max_value=100))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=150)),
        st.tuples(st.just("read"), st.tuples(starts, max_bytes_st)),
        # A socket read into writable() spans, as the console does for a UART.
        st.tuples(st.just("recv"), st.tuples(st.binary(max_size=150), st.integers(1, 80))),
        st.tuples(st.just("since"), st.integers(min_value=-10, max_value=400)),
    ),
    max_size=40,
)


def check_reads(log: RingLog, model: Model, start: int | None, max_bytes: int | None) -> None:
    assert log.read(start, max_bytes) == model.read(start, max_bytes), (start, max_bytes)


def check_state(log: RingLog, model: Model) -> None:
    assert log.next == model.next
    assert log.first == model.first
    check_reads(log, model, None, None)


# --- pure functions -------------------------------------------------------------


@given(capacities, st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_write_segments_place_every_kept_byte_at_offset_mod_capacity(
    capacity: int, lengths: list[int]
) -> None:
    """Appending through write_segments puts byte o at position o % capacity, in at most 2 copies."""
    buf = bytearray(capacity)
    model = Model(capacity)
    for length in lengths:
        chunk = bytes((model.next + i) * 7 % 251 for i in range(length))
        segs = write_segments(model.next, capacity, length)
        assert len(segs) <= 2
        assert sum(n for _, _, n in segs) == min(length, capacity)
        for pos, src, n in segs:
            assert pos >= 0 and n > 0 and pos + n <= capacity
            buf[pos : pos + n] = chunk[src : src + n]
        model.everything += chunk
        for o in range(model.first, model.next):
            assert buf[o % capacity] == model.everything[o]


@given(capacities, st.integers(min_value=0, max_value=10**6), starts, max_bytes_st)
def test_read_window_matches_model(
    capacity: int, next_offset: int, start: int | None, max_bytes: int | None
) -> None:
    """read_window resolves None / positive / negative starts and max_bytes like the model."""
    model = Model(capacity, bytearray(next_offset))
    f, end, truncated = read_window(start, next_offset, capacity, max_bytes)
    mf, data, mt = model.read(start, max_bytes)
    assert (f, end - f, truncated) == (mf, len(data), mt)
    assert model.first <= f <= end <= next_offset


@given(
    capacities,
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
    starts,
)
def test_read_window_never_goes_below_base(capacity: int, base: int, extra: int, start: int | None) -> None:
    """A log continued from an older file never offers bytes below its start offset."""
    nxt = base + extra
    f, end, truncated = read_window(start, nxt, capacity, None, base=base)
    assert end == nxt and max(base, nxt - capacity) <= f <= nxt
    if start is not None and 0 <= start < max(base, nxt - capacity) and start < nxt:
        assert truncated


@given(capacities, st.integers(min_value=0, max_value=10**6), st.data())
def test_read_segments_cover_window_in_order(capacity: int, first: int, data: st.DataObject) -> None:
    """read_segments yields at most two runs that together are offsets [first, end) in order."""
    n = data.draw(st.integers(min_value=0, max_value=capacity))
    segs = read_segments(first, first + n, capacity)
    assert len(segs) <= 2
    positions = [p for pos, k in segs for p in range(pos, pos + k)]
    assert positions == [(first + i) % capacity for i in range(n)]


def test_read_window_rejects_negative_max_bytes() -> None:
    """A negative max_bytes is a programming error, not an empty read."""
    with pytest.raises(ValueError):
        read_window(None, 10, 10, -1)


# --- RingLog in memory and on disk ---------------------------------------------


def recv_into(log: RingLog, data: bytes, limit: int) -> None:
    """What a BufferedProtocol read loop does: fill a prefix of each writable span
    with what the socket has (at most ``limit`` at a time), commit, repeat."""
    while data:
        view = log.writable()
        assert 0 < len(view) <= log.span_max
        assert log.span_max <= max(1, log.capacity // 4)
        k = min(len(view), len(data), limit)
        view[:k] = data[:k]
        view.release()
        before = log.next
        assert log.commit(k) == before + k
        data = data[k:]


def run_ops(log: RingLog, model: Model, operations: list[tuple[str, object]]) -> None:
    for op, arg in operations:
        if op == "append":
            assert isinstance(arg, bytes)
            model.everything += arg
            assert log.append(arg) == model.next
        elif op == "recv":
            chunk, limit = cast(tuple[bytes, int], arg)
            model.everything += chunk
            recv_into(log, chunk, limit)
        elif op == "since":
            since = cast(int, arg)
            assert log.since(since) == bytes(model.everything[max(since, model.first) :])
        else:
            start, max_bytes = cast(tuple[int | None, int | None], arg)
            check_reads(log, model, start, max_bytes)
        assert log.next == model.next and log.first == model.first
    check_state(log, model)


@given(capacities, ops)
def test_memory_ring_matches_model(capacity: int, operations: list[tuple[str, object]]) -> None:
    """RingLog.memory keeps exactly the newest capacity bytes with model offsets,
    whether output is appended or read straight into its writable spans."""
    log = RingLog.memory(capacity)
    assert not log.persistent and log.error is None and log.path is None
    run_ops(log, Model(capacity), operations)


@given(capacities, st.binary(max_size=200))
def test_append_accepts_bytearray_and_memoryview(capacity: int, chunk: bytes) -> None:
    """Backends hand over bytes, bytearray or memoryview; all are stored the same."""
    model = Model(capacity)
    log = RingLog.memory(capacity)
    for kind in (bytes, bytearray, memoryview):
        log.append(kind(chunk))
        model.everything += chunk
    check_state(log, model)


@pytest.fixture
def ring_dir() -> Iterator[Path]:
    # Hypothesis reruns the test body many times; a per-example directory keeps them apart.
    with tempfile.TemporaryDirectory(prefix="ringlog-") as d:
        yield Path(d)


def fresh_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="ringlog-")


@settings(max_examples=60, deadline=None)
@given(capacities, ops, ops, st.sampled_from(["close", "crash"]))
def test_file_ring_matches_model_across_reopen(
    capacity: int,
    before: list[tuple[str, object]],
    after: list[tuple[str, object]],
    how: str,
) -> None:
    """A file ring matches the model, and a reopen after close or crash keeps offsets and
    data, including bytes read straight into the mapping (writable/commit)."""
    with fresh_dir() as d:
        path = Path(d) / "vm1.ring"
        model = Model(capacity)
        log = RingLog.open(path, capacity)
        assert log.persistent and log.error is None and log.notice is None
        run_ops(log, model, before)
        if how == "close":
            log.close()
        else:
            # Simulated crash: no flush, no close; the mapping just goes away.
            del log
            gc.collect()
        log = RingLog.open(path, capacity)
        assert log.persistent and log.error is None and log.notice is None
        check_state(log, model)
        run_ops(log, model, after)
        log.close()


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_next_offset_on_disk_is_little_endian_on_any_host(
    monkeypatch: pytest.MonkeyPatch, ring_dir: Path, byteorder: str
) -> None:
    """The header's next offset, stored after every chunk, is the file format's
    little-endian u64 whatever the host's byte order, so a ring file moves between
    hosts and a crash loses nothing on either kind."""
    monkeypatch.setattr(ringlog.sys, "byteorder", byteorder)
    path = ring_dir / "vm1.ring"
    log = RingLog.open(path, 4096)
    log.append(b"a" * 3000)
    view = log.writable()
    view[:300] = b"b" * 300
    log.commit(300)
    assert int.from_bytes(path.read_bytes()[64:72], "little") == 3300
    del log, view  # a crash: no close, no flush
    gc.collect()
    monkeypatch.setattr(ringlog.sys, "byteorder", "little")
    again = RingLog.open(path, 4096)
    assert again.next == 3300
    assert again.read(None)[1] == b"a" * 3000 + b"b" * 300
    again.close()


def test_close_is_idempotent_and_flush_is_harmless(ring_dir: Path) -> None:
    """Shutdown may flush and close more than once without errors."""
    log = RingLog.open(ring_dir / "a.ring", 100)
    log.append(b"x" * 10)
    log.flush()
    log.close()
    log.close()
    mem = RingLog.memory(10)
    mem.flush()
    mem.close()


def test_capacity_below_one_is_refused() -> None:
    """A zero-byte ring is a configuration error, reported as such."""
    with pytest.raises(ValueError):
        RingLog.memory(0)


# --- time index ------------------------------------------------------------------


class FakeClock:
    def __init__(self, start_ns: int) -> None:
        self.now = start_ns

    def __call__(self) -> int:
        return self.now


SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The ring's wall clock, steered by the test (starts at T0)."""
    steered = FakeClock(T0)
    monkeypatch.setattr(ringlog, "_now", steered)
    return steered


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=300),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=3 * SEC), st.integers(0, 40)),
        max_size=60,
    ),
    st.lists(st.integers(min_value=-2 * SEC, max_value=200 * SEC), min_size=1, max_size=10),
)
def test_offset_at_never_skips_output_and_is_within_a_second(
    capacity: int,
    appends: list[tuple[int, int]],
    queries: list[int],
) -> None:
    """offset_at(t) starts at or before the first byte appended at or after t, at most 1 s early."""
    clock = FakeClock(T0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ringlog, "_now", clock)
        check_offset_at(clock, capacity, appends, queries)


def check_offset_at(
    clock: FakeClock, capacity: int, appends: list[tuple[int, int]], queries: list[int]
) -> None:
    log = RingLog.memory(capacity)
    times: list[int] = []  # append time of every byte ever written
    for gap, n in appends:
        clock.now += gap
        log.append(b"z" * n)
        times += [clock.now] * n
    for q in queries:
        when = T0 + q
        r = log.offset_at(when / SEC)
        assert log.first <= r <= log.next
        # Never skips: everything before r (that is still kept) was appended before `when`.
        # Float seconds lose sub-microsecond precision, hence the small slack.
        assert all(times[o] < when + 1000 for o in range(log.first, r))
        # Granularity: everything from r on was appended no earlier than 1 s before `when`.
        assert all(times[o] > when - SEC - 1000 for o in range(r, log.next))


def test_offset_at_survives_reopen_and_index_wrap(monkeypatch: pytest.MonkeyPatch, ring_dir: Path) -> None:
    """The time index is on disk: after a restart ``since=`` still finds the right offset."""
    clock = FakeClock(T0)
    monkeypatch.setattr(ringlog, "_now", clock)
    path = ring_dir / "vm1.ring"
    log = RingLog.open(path, 1 << 16)
    for _ in range(700):  # more seconds than the 512-entry index holds
        clock.now += SEC
        log.append(b"0123456789")
    log.close()
    log = RingLog.open(path, 1 << 16)
    assert log.next == 7000
    # Second k (1-based) wrote offsets [10(k-1), 10k).
    assert log.offset_at((T0 + 650 * SEC) / SEC) == 6490
    assert log.offset_at((T0 + 10_000 * SEC) / SEC) == 7000
    # Older than the index reaches: everything kept, never a gap.
    assert log.offset_at((T0 + 5 * SEC) / SEC) == log.first == 0
    clock.now += SEC
    log.append(b"new")
    assert log.offset_at(clock.now / SEC) == 7000
    log.close()


def test_time_index_records_at_most_once_per_second(clock: FakeClock) -> None:
    """A flood of chunks within one second costs one index entry, not one per chunk."""
    log = RingLog.memory(1 << 20)
    for i in range(1000):
        clock.now = T0 + i * 1000  # 1000 appends within a millisecond
        log.append(b"a" * 100)
    assert len(log._index()) == 1
    clock.now = T0 + SEC
    log.append(b"b")
    assert len(log._index()) == 2


def test_empty_log_offset_at_is_next() -> None:
    """Asking a log that never received a byte for any time gives its next offset."""
    log = RingLog.memory(10)
    assert log.offset_at(0.0) == log.offset_at(4e9) == 0


# --- reads straight into the log (recv_from) and the watermark ----------------------


def recv_store(log: RingLog, data: bytes) -> int:
    """Store ``data`` with ``recv_from``, read by read, as the UART reader does."""
    rest = memoryview(data)
    while rest:

        def recv_into(view: memoryview, rest: memoryview = rest) -> int:
            k = min(len(view), len(rest))
            view[:k] = rest[:k]
            return k

        rest = rest[log.recv_from(recv_into) :]
    return log.next


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.lists(st.binary(min_size=1, max_size=200), max_size=30))
def test_reads_straight_into_the_log_store_what_appends_store(capacity: int, chunks: list[bytes]) -> None:
    """A chunk read into the log with recv_from is kept exactly as an append keeps it:
    same bytes, same offsets, across wraps."""
    by_append, by_read = RingLog.memory(capacity), RingLog.memory(capacity)
    for chunk in chunks:
        by_append.append(chunk)
        recv_store(by_read, chunk)
        assert by_read.next == by_append.next
        assert by_read.read(None) == by_append.read(None)


def test_a_failed_or_empty_read_stores_nothing() -> None:
    """recv_from passes the socket's error on and an end of file stores nothing:
    the log and its watermark are untouched."""
    log = RingLog.memory(64)
    log.append(b"kept")
    calls: list[int] = []
    log.on_watermark = calls.append
    log.watermark = log.next + 1

    def would_block(view: memoryview) -> int:
        raise BlockingIOError

    with pytest.raises(BlockingIOError):
        log.recv_from(would_block)
    assert log.recv_from(lambda view: 0) == 0
    assert log.next == 4 and log.read(None)[1] == b"kept" and calls == []


def test_the_watermark_calls_back_once_reached_whatever_stores_the_bytes() -> None:
    """The owner is called with the new next offset by the store that reaches the
    mark (append, commit or recv_from) and by every store after it, until it moves
    the mark; never before, and never with the mark at NEVER."""
    log = RingLog.memory(1024)
    calls: list[int] = []
    log.on_watermark = calls.append
    log.watermark = 10
    log.append(b"a" * 5)
    recv_store(log, b"b" * 4)
    assert calls == []
    log.append(b"c")
    assert calls == [10]
    recv_store(log, b"d")
    assert calls == [10, 11]
    log.watermark = ringlog.NEVER
    log.append(b"e" * 100)
    assert calls == [10, 11]
    log.watermark = log.next + 1
    log.writable()[:3] = b"xyz"
    log.commit(3)
    assert calls == [10, 11, 114]


def test_a_read_straight_into_the_file_survives_a_crash(ring_dir: Path) -> None:
    """A socket read into the mapped file with recv_from is on disk with its offset
    when the process dies right after it (no close, no flush)."""
    import socket

    path = ring_dir / "vm1.ring"
    log = RingLog.open(path, 4096)
    a, b = socket.socketpair()
    try:
        b.sendall(b"login: ")
        assert log.recv_from(a.recv_into) == 7
        b.sendall(b"root\r\n" * 1000)  # more than span_max: several reads, one wrap
        a.setblocking(False)
        while True:
            try:
                log.recv_from(a.recv_into)
            except BlockingIOError:
                break
        assert log.next == 7 + 6000
        reopened = RingLog.open(path, 4096)  # as a restarted daemon would, the first still open
        assert reopened.next == log.next
        assert reopened.read(None) == log.read(None)
        reopened.close()
    finally:
        a.close()
        b.close()
        log.close()


def test_offset_at_never_skips_output_read_straight_into_the_log(clock: FakeClock) -> None:
    """The time index is kept by recv_from as by append: ``since=`` finds a read's bytes."""
    log = RingLog.memory(1 << 16)
    for _ in range(5):
        clock.now += 2 * SEC
        recv_store(log, b"0123456789")
    assert len(log._index()) == 5
    assert log.offset_at((T0 + 5 * SEC) / SEC) == 20
    assert log.offset_at((T0 + 6 * SEC) / SEC) == 20
    assert log.offset_at((T0 + 7 * SEC) / SEC) == 30
