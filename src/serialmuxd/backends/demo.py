"""``demo:`` — a simulated guest inside the daemon, so it runs with no VM at all.

The guest's behaviour (boot log, shell, SysRq, NMI) lives in the pure
:mod:`serialmuxd.backends.demoshell`; this module gives it time and power: it
prints the boot log with its delays, paces large outputs at the UART's byte
rate, powers off and on, and in continuous mode (``rate=N``) prints numbered
lines for load tests.

Spec options, after ``?`` and joined with ``&`` (``demo:?boot=0&baud=0``):

``baud=N``
    pace large outputs (``yes``, ``seq``) as an 8N1 UART at N baud, N/10 bytes
    a second; default 115200 (11,520 B/s); ``0`` prints them as fast as the
    loop allows, 4 KiB at a time.
``boot=0|1``
    ``0`` prints the boot log at once instead of over about 1.3 s.
``rate=N``
    continuous mode: after boot, print numbered lines for ever at N bytes a
    second (``%010d `` + filler + CRLF, 64 bytes each, numbered from 0 at each
    boot), one chunk per timer tick of 10–50 ms.
``off=S``
    how long ``poweroff`` keeps the guest down, in seconds; default 2.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from serialmuxd.backends.base import Backend, BackendSink
from serialmuxd.backends.demoshell import Action, DemoShell
from serialmuxd.errors import BackendDown

#: how long a panicked guest hangs before it reboots (as with panic=1)
PANIC_REBOOT_S = 1.0
#: chunk of an unpaced (baud=0) output; the loop gets a turn between chunks
UNPACED_CHUNK = 4096
#: a paced output is cut into chunks of this many seconds of UART time
PACE_TICK_S = 0.02

RATE_FILLER = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY"
#: one continuous-mode line: ``RATE_LINE % i``, 64 bytes while i < 10**10
RATE_LINE = b"%010d " + RATE_FILLER + b"\r\n"
RATE_LINE_BYTES = len(RATE_LINE % 0)
RATE_TICK_MIN_S = 0.01
RATE_TICK_MAX_S = 0.05
#: a tick aims at this many bytes, within the tick bounds above
RATE_TICK_BYTES = 16384
#: lines per on_data call in continuous mode (64 KiB)
RATE_MAX_LINES_PER_CHUNK = 1024
#: after a stall the line printer catches up at most this much time
RATE_MAX_BACKLOG_S = 1.0

MAX_BAUD = 100_000_000
MAX_RATE = 100_000_000
MAX_OFF_S = 600.0

_EXAMPLE = "e.g. demo:?boot=0&baud=0 or demo:?rate=11520"


@dataclass(frozen=True)
class DemoOptions:
    """The options of a ``demo:`` spec, validated."""

    baud: int = 115200
    boot: bool = True
    rate: int = 0
    off_s: float = 2.0

    @property
    def bytes_per_s(self) -> int:
        """UART bytes a second at ``baud`` with 8N1 framing (10 bits a byte); 0 = unpaced."""
        return self.baud // 10


def parse_demo_spec(spec: str) -> DemoOptions:
    """Parse ``demo:`` or ``demo:?key=value&…``; raises ValueError with a sentence."""
    if not spec.startswith("demo:"):
        raise ValueError(f"{spec!r} is not a demo backend: it must start with demo: ({_EXAMPLE})")
    path, _, query = spec[5:].partition("?")
    if path:
        raise ValueError(f"demo: takes no path ({path!r}); options go after '?', {_EXAMPLE}")
    values: dict[str, str] = {}
    for pair in query.split("&") if query else []:
        key, eq, value = pair.partition("=")
        if not eq or not value:
            raise ValueError(f"demo: option {pair!r} needs a value, {_EXAMPLE}")
        if key not in ("baud", "boot", "rate", "off"):
            raise ValueError(f"demo: unknown option {key!r}: the options are baud, boot, rate and off")
        if key in values:
            raise ValueError(f"demo: option {key!r} is given twice")
        values[key] = value
    defaults = DemoOptions()
    baud, boot, rate, off = defaults.baud, defaults.boot, defaults.rate, defaults.off_s
    if "baud" in values:
        baud = _int_option("baud", values["baud"])
        if baud != 0 and not 50 <= baud <= MAX_BAUD:
            raise ValueError(
                f"demo: baud={baud} is out of range: use 0 (unpaced) or 50 to {MAX_BAUD}, e.g. baud=115200"
            )
    if "boot" in values:
        if values["boot"] not in ("0", "1"):
            raise ValueError(
                f"demo: boot={values['boot']!r} must be 0 (instant boot) or 1 (boot log with its delays)"
            )
        boot = values["boot"] == "1"
    if "rate" in values:
        rate = _int_option("rate", values["rate"])
        if not 1 <= rate <= MAX_RATE:
            raise ValueError(f"demo: rate={rate} is out of range: bytes a second from 1 to {MAX_RATE}")
    if "off" in values:
        try:
            off = float(values["off"])
        except ValueError:
            raise ValueError(f"demo: off={values['off']!r} must be a number of seconds, e.g. off=2") from None
        if not 0 <= off <= MAX_OFF_S:
            raise ValueError(f"demo: off={off:g} is out of range: seconds from 0 to {MAX_OFF_S:g}")
    return DemoOptions(baud=baud, boot=boot, rate=rate, off_s=off)


def _int_option(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise ValueError(f"demo: {key}={value!r} must be a whole number, e.g. {key}=115200")
    return int(value)


class DemoBackend(Backend):
    """A simulated Linux guest on ttyS0: boot log, a small shell, SysRq, NMI, reset, power."""

    capabilities = frozenset({"break", "nmi", "reset"})

    def __init__(self, spec: str, sink: BackendSink) -> None:
        super().__init__(spec, sink)
        self.options = parse_demo_spec(spec)
        self.shell = DemoShell()
        bps = self.options.bytes_per_s
        self._bps = bps
        self._chunk = max(16, min(UNPACED_CHUNK, int(bps * PACE_TICK_S))) if bps else UNPACED_CHUNK
        self._up = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._power: asyncio.Future[Action] | None = None
        self._guest: asyncio.Task[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        # continuous mode
        rate = self.options.rate
        self._rate_tick_s = (
            min(RATE_TICK_MAX_S, max(RATE_TICK_MIN_S, RATE_TICK_BYTES / rate)) if rate else 0.0
        )
        self._rate_handle: asyncio.TimerHandle | None = None
        self._rate_line = 0
        self._rate_credit = 0.0
        self._rate_last = 0.0
        self._rate_next = 0.0

    @property
    def up(self) -> bool:
        return self._up

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            self._power_on()
            while True:
                self._power = loop.create_future()
                self._guest = loop.create_task(self._boot())
                action = await self._power
                self._halt()
                if action is Action.POWEROFF:
                    self._up = False
                    self.sink.on_state(False, "the demo guest is powered off; it boots again shortly")
                    await asyncio.sleep(self.options.off_s)
                    self._power_on()
                elif action is Action.PANIC:
                    await asyncio.sleep(PANIC_REBOOT_S)
        finally:
            self._halt()
            self._up = False
            self._power = None

    def write(self, data: bytes) -> None:
        loop = self._require_up()
        # Answered on the next loop turn, never from inside the caller (the console).
        loop.call_soon(self._input, data)

    async def drain(self) -> None:
        return None

    async def send_break(self) -> None:
        loop = self._require_up()
        # Queued behind earlier keystrokes, so a key typed before the BREAK is not taken for SysRq.
        loop.call_soon(self._arm_sysrq)

    async def nmi(self) -> None:
        """Inject an NMI: the guest kernel reports it on the console."""
        self._require_up()
        self._loop_or_fail().call_soon(self._nmi)

    async def reset(self) -> None:
        """Hard reset: no shutdown messages, the boot log starts again."""
        self._require_up()
        self._loop_or_fail().call_soon(self._request, Action.REBOOT)

    async def close(self) -> None:
        self._halt()

    # --- internals --------------------------------------------------------

    def _require_up(self) -> asyncio.AbstractEventLoop:
        if not self._up:
            raise BackendDown("the demo guest is powered off; it boots again in a few seconds")
        return self._loop_or_fail()

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise BackendDown("the demo guest is not running")
        return self._loop

    def _power_on(self) -> None:
        self._up = True
        self.sink.on_state(True, "booted")

    def _request(self, action: Action) -> None:
        power = self._power
        if power is not None and not power.done():
            power.set_result(action)

    def _halt(self) -> None:
        """Stop everything the running guest does; the shell ignores input until the next boot."""
        for task in (self._guest, self._pump_task):
            if task is not None:
                task.cancel()
        self._guest = self._pump_task = None
        if self._rate_handle is not None:
            self._rate_handle.cancel()
            self._rate_handle = None

    async def _boot(self) -> None:
        chunks = self.shell.boot_log(time.time())
        if self.options.boot:
            for delay, chunk in chunks:
                if delay > 0:
                    await asyncio.sleep(delay)
                self.sink.on_data(chunk)
        else:
            self.sink.on_data(b"".join(chunk for _, chunk in chunks))
        self.shell.boot_done(time.time())
        self._after_shell()
        if self.options.rate:
            self._start_rate()

    def _input(self, data: bytes) -> None:
        if not self._up:
            return
        out = self.shell.feed(data, time.time())
        if out:
            self.sink.on_data(out)
        self._after_shell()

    def _arm_sysrq(self) -> None:
        self.shell.arm_sysrq(time.time())

    def _nmi(self) -> None:
        if self._up:
            out = self.shell.nmi(time.time())
            if out:
                self.sink.on_data(out)

    def _after_shell(self) -> None:
        action = self.shell.take_action()
        if action is not None:
            self._request(action)
        elif self.shell.pending and self._pump_task is None and self._loop is not None:
            self._pump_task = self._loop.create_task(self._pump())

    async def _pump(self) -> None:
        """Hand out the shell's lazy output at the UART's pace."""
        loop = asyncio.get_running_loop()
        shell, sink, bps, size = self.shell, self.sink, self._bps, self._chunk
        me = asyncio.current_task()
        try:
            due = loop.time()
            while shell.pending:
                chunk = shell.read(size, time.time())
                if chunk:
                    sink.on_data(chunk)
                action = shell.take_action()
                if action is not None:
                    self._request(action)
                    return
                if not bps:
                    await asyncio.sleep(0)
                    continue
                now = loop.time()
                # The schedule, not the wake-up time, sets the pace; after a stall it restarts.
                due = max(due, now - PACE_TICK_S) + len(chunk) / bps
                await asyncio.sleep(max(0.0, due - now))
        finally:
            if self._pump_task is me:
                self._pump_task = None

    # --- continuous mode (rate=N) -------------------------------------------

    def _start_rate(self) -> None:
        loop = self._loop
        assert loop is not None
        self._rate_line = 0
        self._rate_credit = 0.0
        now = loop.time()
        self._rate_last = now
        self._rate_next = now + self._rate_tick_s
        self._rate_handle = loop.call_at(self._rate_next, self._rate_tick)

    def _rate_tick(self) -> None:
        # Hot path for load tests (1,000 consoles): one join per tick, no per-byte work.
        loop = self._loop
        assert loop is not None
        rate = self.options.rate
        now = loop.time()
        credit = self._rate_credit + (now - self._rate_last) * rate
        self._rate_last = now
        credit = min(credit, max(rate * RATE_MAX_BACKLOG_S, 2.0 * RATE_LINE_BYTES))
        lines = int(credit // RATE_LINE_BYTES)
        self._rate_credit = credit - lines * RATE_LINE_BYTES
        first = self._rate_line
        self._rate_line = first + lines
        fmt, on_data = RATE_LINE, self.sink.on_data
        while lines > 0:
            n = min(lines, RATE_MAX_LINES_PER_CHUNK)
            on_data(b"".join([fmt % i for i in range(first, first + n)]))
            first += n
            lines -= n
        nxt = self._rate_next + self._rate_tick_s
        self._rate_next = nxt if nxt > now else now + self._rate_tick_s
        self._rate_handle = loop.call_at(self._rate_next, self._rate_tick)
