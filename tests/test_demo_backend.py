"""The ``demo:`` backend: a simulated guest run under asyncio, seen through a recording sink."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable

import pytest

from serialmuxd.backends.demo import RATE_LINE_BYTES, DemoBackend, parse_demo_spec
from serialmuxd.backends.demoshell import PROMPT
from serialmuxd.errors import BackendDown

BOOT_BANNER = b"[    0.000000] Linux version 6.1.0-demo "


class RecordingSink:
    """Stands in for the console: keeps every chunk and state change, with their times."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks: list[tuple[float, int]] = []
        self.states: list[tuple[bool, str]] = []

    def on_data(self, data: bytes) -> None:
        self.data += data
        self.chunks.append((time.monotonic(), len(data)))

    def on_state(self, up: bool, reason: str) -> None:
        self.states.append((up, reason))

    async def wait_for(self, pattern: bytes, start: int = 0, timeout: float = 5.0) -> int:
        """Wait until ``pattern`` appears at or after ``start``; returns the offset after it."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.data.find(pattern, start)
            if at >= 0:
                return at + len(pattern)
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen in {timeout}s; tail: {bytes(self.data[-300:])!r}")
            await asyncio.sleep(0.005)

    async def wait_state(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.states) < count:
            assert time.monotonic() < deadline, f"states so far: {self.states}"
            await asyncio.sleep(0.005)


Started = tuple[DemoBackend, RecordingSink]


@pytest.fixture
async def start() -> AsyncIterator[Callable[[str], Started]]:
    """Start a DemoBackend's run() for a spec; every one started is cancelled at the end."""
    tasks: list[tuple[DemoBackend, asyncio.Task[None]]] = []

    def _start(spec: str) -> Started:
        sink = RecordingSink()
        backend = DemoBackend(spec, sink)
        tasks.append((backend, asyncio.create_task(backend.run())))
        return backend, sink

    yield _start
    for backend, task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await backend.close()
        assert not backend.up


async def booted(start: Callable[[str], Started], spec: str = "demo:?boot=0") -> Started:
    backend, sink = start(spec)
    await sink.wait_for(PROMPT)
    return backend, sink


async def type_line(backend: DemoBackend, sink: RecordingSink, line: bytes) -> bytes:
    """Type a line, return what it printed up to the next prompt."""
    mark = len(sink.data)
    backend.write(line + b"\r")
    end = await sink.wait_for(b"\r\n" + PROMPT, mark)
    return bytes(sink.data[mark:end])


# --- boot -------------------------------------------------------------------


async def test_boot_reports_up_then_prints_the_boot_log_and_prompt(start: Callable[[str], Started]) -> None:
    """run() says the link is up ("booted"), then prints the kernel log, the banner and `demo# `."""
    backend, sink = start("demo:?boot=0")
    await sink.wait_for(PROMPT)
    assert sink.states == [(True, "booted")]
    assert backend.up
    assert sink.data.startswith(BOOT_BANNER)
    assert b"\r\nserialmuxd demo guest\r\n" in sink.data
    assert sink.data.endswith(b"\r\n" + PROMPT)


async def test_boot_log_is_printed_with_its_delays(start: Callable[[str], Started]) -> None:
    """Without boot=0 the log appears line by line over about a second, like a real boot."""
    t0 = time.monotonic()
    _, sink = start("demo:")
    await sink.wait_for(BOOT_BANNER)
    assert time.monotonic() - t0 < 0.5
    await sink.wait_for(PROMPT, timeout=5)
    took = time.monotonic() - t0
    assert 1.0 <= took <= 3.0
    assert len(sink.chunks) >= 20  # one write per line, not one blob


# --- shell through the backend --------------------------------------------------


async def test_echo_arithmetic_prints_42(start: Callable[[str], Started]) -> None:
    """Typing `echo $((6*7))` at the prompt prints 42 and a new prompt."""
    backend, sink = await booted(start)
    assert await type_line(backend, sink, b"echo $((6*7))") == b"echo $((6*7))\r\n42\r\n" + PROMPT


async def test_write_answers_on_a_later_loop_turn_not_inside_write(start: Callable[[str], Started]) -> None:
    """write() never calls back into the console synchronously."""
    backend, sink = await booted(start)
    before = len(sink.data)
    backend.write(b"x")
    assert len(sink.data) == before
    await sink.wait_for(b"x", before)
    await backend.drain()  # no buffer: returns at once


async def test_yes_is_paced_at_the_baud_rate(start: Callable[[str], Started]) -> None:
    """At 115200 baud (11,520 B/s), 9,000 bytes of `yes` take about 0.8 s, in small chunks."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    t0 = time.monotonic()
    backend.write(b"yes 3000\r")
    await sink.wait_for(b"y\r\n" + PROMPT, mark)
    took = time.monotonic() - t0
    assert 0.6 <= took <= 2.0, took
    assert bytes(sink.data[mark:]).count(b"y\r\n") == 3000
    assert max(n for t, n in sink.chunks if t >= t0) <= 512


async def test_baud_0_prints_large_output_unpaced_in_4k_chunks(start: Callable[[str], Started]) -> None:
    """With baud=0, 300 kB of `yes` arrives fast, in chunks of at most 4 KiB."""
    backend, sink = await booted(start, "demo:?boot=0&baud=0")
    mark = len(sink.data)
    t0 = time.monotonic()
    backend.write(b"yes 100000\r")
    await sink.wait_for(b"y\r\n" + PROMPT, mark, timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert max(n for t, n in sink.chunks if t >= t0) <= 4096


async def test_ctrl_c_stops_a_running_yes(start: Callable[[str], Started]) -> None:
    """Ctrl-C interrupts a paced `yes`: `^C` and a prompt, then the output stops."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    backend.write(b"yes\r")
    await sink.wait_for(b"y\r\ny\r\ny\r\n", mark)
    backend.write(b"\x03")
    end = await sink.wait_for(b"^C\r\n" + PROMPT, mark)
    await asyncio.sleep(0.1)
    assert len(sink.data) == end


# --- power ------------------------------------------------------------------


async def test_poweroff_goes_down_then_boots_again(start: Callable[[str], Started]) -> None:
    """`poweroff`: state goes down (writes refused with BackendDown), then up with a new boot."""
    backend, sink = await booted(start, "demo:?boot=0&off=0.3")
    mark = len(sink.data)
    backend.write(b"poweroff\r")
    await sink.wait_state(2)
    assert sink.states[1][0] is False
    assert not backend.up
    with pytest.raises(BackendDown):
        backend.write(b"x")
    with pytest.raises(BackendDown):
        await backend.send_break()
    await sink.wait_state(3, timeout=3)
    assert sink.states[2] == (True, "booted")
    after = await sink.wait_for(b"reboot: Power down\r\n", mark)
    await sink.wait_for(BOOT_BANNER, after)
    await sink.wait_for(PROMPT, after)
    assert await type_line(backend, sink, b"echo up") == b"echo up\r\nup\r\n" + PROMPT


def test_poweroff_pause_defaults_to_2_seconds() -> None:
    """A plain `demo:` guest stays off for 2 s, long enough to see the stopped state."""
    assert parse_demo_spec("demo:").off_s == 2.0


async def test_reboot_prints_the_boot_log_again_without_going_down(start: Callable[[str], Started]) -> None:
    """`reboot` prints the shutdown, then a fresh boot log; the link stays up (as a VM reset)."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    backend.write(b"reboot\r")
    after = await sink.wait_for(b"reboot: Restarting system\r\n", mark)
    await sink.wait_for(BOOT_BANNER, after)
    await sink.wait_for(PROMPT, after)
    assert sink.states == [(True, "booted")]
    assert await type_line(backend, sink, b"echo again") == b"echo again\r\nagain\r\n" + PROMPT


async def test_reset_restarts_the_guest(start: Callable[[str], Started]) -> None:
    """reset() is a hard reset: no shutdown messages, straight into a new boot log."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    await backend.reset()
    await sink.wait_for(BOOT_BANNER, mark)
    await sink.wait_for(PROMPT, mark)
    assert b"going down" not in sink.data[mark:]


async def test_nmi_prints_uhhuh(start: Callable[[str], Started]) -> None:
    """nmi() makes the guest kernel print its unknown-NMI message."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    await backend.nmi()
    await sink.wait_for(b"Uhhuh. NMI received for unknown reason 00 on CPU 0.\r\n", mark)


def test_demo_backend_can_break_nmi_and_reset() -> None:
    """The console may offer BREAK, NMI and reset on demo: consoles without QMP."""
    assert DemoBackend.capabilities == frozenset({"break", "nmi", "reset"})


# --- SysRq --------------------------------------------------------------------


async def test_break_then_h_prints_sysrq_help(start: Callable[[str], Started]) -> None:
    """BREAK then `h` prints the SysRq HELP line; the `h` never reaches the shell."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    await backend.send_break()
    backend.write(b"h")
    marker = b"sysrq: HELP : loglevel(0-9) reBoot Crash "
    help_at = await sink.wait_for(marker, mark) - len(marker)
    assert re.fullmatch(rb"\r\n\[ *\d+\.\d{6}\] ", sink.data[mark:help_at])  # no echoed h
    assert await type_line(backend, sink, b"") == b"\r\n" + PROMPT  # nor an h on the line


async def test_key_typed_before_the_break_is_not_taken_for_sysrq(start: Callable[[str], Started]) -> None:
    """Keys and BREAK keep their order: only the byte after the BREAK is a SysRq key."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    backend.write(b"e")
    await backend.send_break()
    backend.write(b"s")
    await sink.wait_for(b"sysrq: Emergency Sync", mark)
    assert sink.data[mark : mark + 1] == b"e"


async def test_sysrq_b_reboots(start: Callable[[str], Started]) -> None:
    """BREAK + b reboots the guest at once: `sysrq: Resetting`, then the boot log."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    await backend.send_break()
    backend.write(b"b")
    after = await sink.wait_for(b"sysrq: Resetting\r\n", mark)
    await sink.wait_for(BOOT_BANNER, after)
    await sink.wait_for(PROMPT, after)


async def test_sysrq_c_panics_then_reboots_after_a_second(start: Callable[[str], Started]) -> None:
    """BREAK + c prints a kernel panic; the guest hangs about 1 s, then boots again."""
    backend, sink = await booted(start)
    mark = len(sink.data)
    await backend.send_break()
    backend.write(b"c")
    after = await sink.wait_for(b"end Kernel panic - not syncing: sysrq triggered crash ]---\r\n", mark)
    t0 = time.monotonic()
    backend.write(b"echo hung\r")  # a panicked guest reads nothing
    await sink.wait_for(BOOT_BANNER, after)
    assert 0.8 <= time.monotonic() - t0 <= 2.0
    assert b"hung" not in sink.data[after:]


# --- continuous mode (rate=N) -----------------------------------------------------


async def test_rate_mode_prints_about_n_bytes_a_second_of_consecutive_lines(
    start: Callable[[str], Started],
) -> None:
    """rate=11520: over 1 s about 11,520 bytes of numbered lines, none missing, a chunk per tick."""
    _, sink = await booted(start, "demo:?boot=0&rate=11520")
    await sink.wait_for(b"0000000000 ")
    begin = len(sink.data)
    chunks_before = len(sink.chunks)
    t0 = time.monotonic()
    await asyncio.sleep(1.0)
    got = len(sink.data) - begin
    elapsed = time.monotonic() - t0
    assert 0.85 * 11520 * elapsed <= got <= 1.15 * 11520 * elapsed + RATE_LINE_BYTES, got
    ticks = len(sink.chunks) - chunks_before
    assert 15 <= ticks <= 110, ticks  # 10-50 ms ticks, not a call per line
    text = bytes(sink.data[sink.data.find(b"0000000000 ") :])
    lines = text.split(b"\r\n")[:-1]
    assert all(len(ln) + 2 == RATE_LINE_BYTES for ln in lines)
    numbers = [int(ln[:10]) for ln in lines]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= 150


async def test_rate_mode_lines_interleave_with_the_shell(start: Callable[[str], Started]) -> None:
    """In continuous mode the shell still answers between the numbered lines."""
    backend, sink = await booted(start, "demo:?boot=0&rate=2000")
    mark = len(sink.data)
    backend.write(b"echo $((6*7))\r")
    await sink.wait_for(b"\r\n42\r\n", mark)


# --- the spec -------------------------------------------------------------------


def test_spec_options_are_parsed() -> None:
    """demo: options: baud, boot, rate, off; defaults are a 115200-baud guest with a real boot."""
    assert parse_demo_spec("demo:") == parse_demo_spec("demo:?")
    plain = parse_demo_spec("demo:")
    assert (plain.baud, plain.boot, plain.rate, plain.bytes_per_s) == (115200, True, 0, 11520)
    opts = parse_demo_spec("demo:?baud=9600&boot=0&rate=500&off=0.5")
    assert (opts.baud, opts.boot, opts.rate, opts.off_s, opts.bytes_per_s) == (9600, False, 500, 0.5, 960)
    assert parse_demo_spec("demo:?baud=0").bytes_per_s == 0


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("demo:vm1", "takes no path"),
        ("demo:?speed=9600", "unknown option 'speed'"),
        ("demo:?baud", "needs a value"),
        ("demo:?baud=fast", "must be a whole number"),
        ("demo:?baud=10", "out of range"),
        ("demo:?boot=yes", "must be 0"),
        ("demo:?rate=0", "out of range"),
        ("demo:?off=-1", "out of range"),
        ("demo:?boot=0&boot=1", "given twice"),
    ],
)
def test_bad_spec_options_raise_value_error_with_a_sentence(spec: str, words: str) -> None:
    """A bad demo: spec is refused with a message saying what is wrong."""
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_demo_spec(spec)
    with pytest.raises(ValueError):
        DemoBackend(spec, RecordingSink())


async def test_write_before_run_raises_backend_down() -> None:
    """A guest that was never started is down."""
    backend = DemoBackend("demo:", RecordingSink())
    assert not backend.up
    with pytest.raises(BackendDown):
        backend.write(b"x")
