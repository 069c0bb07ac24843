"""Ring log files under real file-system trouble: corruption, read-only, disk full, kill -9.

The promises (DESIGN.md "Ring log"): a corrupt or differently sized file is
moved aside as ``NAME.ring.corrupt-<UTC time>`` with a log line and never
crashes the daemon; the new log continues from the old next offset when the old
header is readable, else from 0; when no file can be had the console is still
logged, in memory, with an error saying why; a ``kill -9`` loses nothing that
was appended.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from serialmuxd import ringlog
from serialmuxd.ringlog import DATA_START, RingLog

CAP = 4096
ASIDE = re.compile(r"^vm1\.ring\.corrupt-\d{8}T\d{6}Z$")


def make_ring(path: Path, payload: bytes, capacity: int = CAP) -> int:
    log = RingLog.open(path, capacity)
    assert log.persistent and log.error is None
    log.append(payload)
    nxt = log.next
    log.close()
    return nxt


def asides(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if ".corrupt-" in p.name)


def reopen_expect_moved(path: Path, capacity: int, old_bytes: bytes, continue_from: int, reason: str) -> None:
    with capture_logs() as logs:
        log = RingLog.open(path, capacity)
    assert log.persistent and log.error is None
    moved = asides(path.parent)
    assert len(moved) == 1 and ASIDE.match(moved[0].name), moved
    assert moved[0].read_bytes() == old_bytes, "the bad file is kept untouched for a post-mortem"
    assert log.notice is not None and moved[0].name in log.notice and reason in log.notice
    assert (log.first, log.next) == (continue_from, continue_from)
    events = [e for e in logs if e["event"] == "ringlog_moved_aside"]
    assert len(events) == 1 and events[0]["log_level"] == "warning"
    assert events[0]["path"] == str(path) and events[0]["new_path"] == str(moved[0])
    assert reason in events[0]["reason"]
    # The new file works and survives a reopen.
    log.append(b"after")
    log.close()
    again = RingLog.open(path, capacity)
    assert again.notice is None and again.read(None) == (continue_from, b"after", False)
    again.close()


def test_truncated_file_is_moved_aside_and_offsets_continue(tmp_path: Path) -> None:
    """A ring file cut short (e.g. a bad copy) is set aside; offsets keep counting from its header."""
    path = tmp_path / "vm1.ring"
    nxt = make_ring(path, b"boot log " * 100)
    with open(path, "r+b") as f:
        f.truncate(DATA_START + 100)
    reopen_expect_moved(path, CAP, path.read_bytes(), nxt, "the file is")


def test_file_truncated_inside_header_restarts_at_zero(tmp_path: Path) -> None:
    """A file too short to hold a header gives no trustworthy offset: the new log starts at 0."""
    path = tmp_path / "vm1.ring"
    make_ring(path, b"x" * 50)
    with open(path, "r+b") as f:
        f.truncate(20)
    reopen_expect_moved(path, CAP, path.read_bytes(), 0, "truncated")


def test_zero_length_file_is_moved_aside(tmp_path: Path) -> None:
    """An empty file (crash right after creation by another tool) is set aside, log starts at 0."""
    path = tmp_path / "vm1.ring"
    path.write_bytes(b"")
    reopen_expect_moved(path, CAP, b"", 0, "empty")


def test_wrong_magic_is_moved_aside(tmp_path: Path) -> None:
    """A file that is not a ring log at all is never overwritten in place."""
    path = tmp_path / "vm1.ring"
    junk = b"#!/bin/sh\necho not a ring\n" + bytes(DATA_START + CAP)
    path.write_bytes(junk)
    reopen_expect_moved(path, CAP, junk, 0, "bad magic")


def test_corrupt_header_checksum_is_moved_aside(tmp_path: Path) -> None:
    """A scribbled header field is caught by the checksum; its offsets are not trusted."""
    path = tmp_path / "vm1.ring"
    make_ring(path, b"y" * 300)
    raw = bytearray(path.read_bytes())
    raw[33] ^= 0x40  # inside the base offset field
    path.write_bytes(raw)
    reopen_expect_moved(path, CAP, bytes(raw), 0, "checksum")


def test_implausible_next_offset_is_moved_aside(tmp_path: Path) -> None:
    """next_offset below the log's start (not checksummed, as it changes on every append)."""
    path = tmp_path / "vm1.ring"
    log = RingLog.open(path, CAP)
    log.close()
    # Continue a log from offset 1000, then scribble next_offset down to 5.
    raw = bytearray(path.read_bytes())
    path.unlink()
    raw[64:72] = (5).to_bytes(8, "little")
    raw[32:40] = (1000).to_bytes(8, "little")
    raw[48:52] = zlib.crc32(bytes(raw[:48])).to_bytes(4, "little")
    path.write_bytes(raw)
    reopen_expect_moved(path, CAP, bytes(raw), 0, "implausible")


def test_other_capacity_is_moved_aside_and_offsets_continue(tmp_path: Path) -> None:
    """Changing ring_bytes starts a new file of the new size; offsets keep counting."""
    path = tmp_path / "vm1.ring"
    nxt = make_ring(path, b"z" * 10_000, capacity=CAP)
    old = path.read_bytes()
    reopen_expect_moved(path, 2 * CAP, old, nxt, f"holds {CAP} bytes")
    assert path.stat().st_size == DATA_START + 2 * CAP


def test_two_bad_files_in_one_second_both_kept(tmp_path: Path) -> None:
    """A restart loop that hits two bad files within a second keeps both aside copies."""
    path = tmp_path / "vm1.ring"
    for _ in range(2):
        path.write_bytes(b"")
        RingLog.open(path, CAP).close()
    assert len(asides(tmp_path)) == 2


# --- no usable state directory -------------------------------------------------


def check_memory_fallback(log: RingLog, path: Path, why: str) -> None:
    assert not log.persistent
    assert log.error is not None and str(path.name) in log.error and why in log.error
    assert "in memory" in log.error
    log.append(b"still logging")
    assert log.read(-13) == (log.next - 13, b"still logging", False)
    log.flush()
    log.close()


def test_unwritable_state_dir_falls_back_to_memory(tmp_path: Path) -> None:
    """A state_dir that cannot hold files (here: its path runs through a regular file,
    which stops root too, unlike chmod) keeps the console logged in memory."""
    blocker = tmp_path / "state"
    blocker.write_text("I am a file, not a directory\n")
    path = blocker / "vm1.ring"
    with capture_logs() as logs:
        log = RingLog.open(path, CAP)
    assert log.path == path
    assert any(e["event"] == "ringlog_in_memory" for e in logs)
    check_memory_fallback(log, path, "Not a directory")


def test_an_open_ring_holds_no_file_descriptor(tmp_path: Path) -> None:
    """A mapped ring keeps no descriptor open: 5,000 consoles must not cost 5,000 fds.
    (Two daemons on one state_dir are kept apart by the daemon's state_dir lock.)"""
    before = len(os.listdir("/proc/self/fd"))
    rings = [RingLog.open(tmp_path / f"c{i}.ring", CAP) for i in range(20)]
    assert len(os.listdir("/proc/self/fd")) == before
    rings[0].append(b"still written through the mapping")
    rings[0].flush()
    for r in rings:
        r.close()
    assert RingLog.open(tmp_path / "c0.ring", CAP).read(None)[1] == b"still written through the mapping"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (we run as root); skipped where mounting is not permitted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_falls_back_to_memory(tiny_tmpfs: Path) -> None:
    """A ring larger than the free space: no SIGBUS, no crash, an in-memory log and an error."""
    path = tiny_tmpfs / "vm1.ring"
    log = RingLog.open(path, 1 << 20)
    check_memory_fallback(log, path, "No space left on device")
    assert not path.exists() and list(tiny_tmpfs.iterdir()) == [], "no half-made file is left"


def test_read_only_filesystem_keeps_old_log_in_memory(tiny_tmpfs: Path) -> None:
    """A state_dir remounted read-only: the old log is still readable and offsets continue."""
    path = tiny_tmpfs / "vm1.ring"
    nxt = make_ring(path, b"before the remount\n", capacity=CAP)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    log = RingLog.open(path, CAP)
    assert not log.persistent and log.error is not None and "Read-only" in log.error
    assert log.read(None) == (0, b"before the remount\n", False)
    assert log.next == nxt
    check_memory_fallback(log, path, "Read-only file system")


def test_corrupt_file_on_read_only_filesystem_does_not_crash(tiny_tmpfs: Path) -> None:
    """A corrupt file that cannot even be moved aside still yields a working (memory) log."""
    path = tiny_tmpfs / "vm1.ring"
    path.write_bytes(b"garbage")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    log = RingLog.open(path, CAP)
    assert log.next == 0
    check_memory_fallback(log, path, "Read-only file system")
    assert path.read_bytes() == b"garbage"


# --- kill -9 ----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from serialmuxd.ringlog import RingLog

    log = RingLog.open(Path(sys.argv[1]), int(sys.argv[2]))
    assert log.persistent, log.error
    for i in range(int(sys.argv[3])):
        log.append(b"line %06d of the guest's console output\\r\\n" % i)
    print(log.next, flush=True)
    time.sleep(60)
    """
)


def test_sigkill_loses_nothing_appended(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL (no flush, no close) keeps every byte it had appended."""
    path = tmp_path / "vm1.ring"
    capacity = 1 << 16
    lines = 5000  # > capacity in total, so the ring has wrapped
    env = dict(os.environ, PYTHONPATH=str(Path(ringlog.__file__).parents[1]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(capacity), str(lines)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        reported = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    expected = b"".join(b"line %06d of the guest's console output\r\n" % i for i in range(lines))
    log = RingLog.open(path, capacity)
    assert log.error is None and log.notice is None
    assert log.next == reported == len(expected)
    assert log.read(None) == (len(expected) - capacity, expected[-capacity:], False)
    log.close()


CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from serialmuxd.ringlog import RingLog

    # Die by SIGKILL at the instant the named step of creating a new ring starts.
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(os, sys.argv[3], die)
    RingLog.open(Path(sys.argv[1]), int(sys.argv[2]))
    """
)


@pytest.mark.parametrize(
    ("step", "left", "reason"),
    [("posix_fallocate", b"", "empty"), ("pwrite", bytes(DATA_START + CAP), "bad magic")],
)
def test_kill_while_creating_a_new_ring_is_never_taken_for_a_log(
    tmp_path: Path, step: str, left: bytes, reason: str
) -> None:
    """A first start killed half-way through making NAME.ring (made in place, header
    written last) leaves a file the next start rejects and moves aside; the log starts at 0."""
    path = tmp_path / "vm1.ring"
    env = dict(os.environ, PYTHONPATH=str(Path(ringlog.__file__).parents[1]))
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(path), str(CAP), step], env=env, timeout=30
    )
    assert child.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm1.ring"], "made in place, no side file"
    assert path.read_bytes() == left
    reopen_expect_moved(path, CAP, left, 0, reason)
