"""The console hub: one per VM.

Data flows one way: backend → console → (ring log, active session, watchers).
Keystrokes flow back only from the active session: session → console →
backend.  Nothing else touches a backend or a ring log directly.

The hot path is :attr:`Console.receive`: the UART reader reads each chunk
straight into the ring log's file mapping with the ring's own ``recv_from``,
one call a chunk, with no bytes object and no copy.  The console is not called
per chunk: it sets the ring's watermark to the next offset at which it has
something to do, and the ring calls :meth:`Console._reached` then.  That is
the next byte while clients are attached and output is not being gathered, the
end of a full gathering window while it is, and never while nobody is attached
(a console nobody watches costs the read and the ring's bookkeeping only).
Attached clients get one non-blocking ``deliver`` each: per chunk while the
console is quiet, per ``coalesce_ms`` while it prints continuously (the output
of one window stays in the ring and goes out as one slice, so a console
streaming at line rate costs one write per client per window instead of one per
chunk read).  Counters are plain integers or ring offsets read at scrape time.
Backends that read with asyncio's buffered protocol use
:meth:`Console.get_buffer` and :meth:`Console.buffer_updated`; those that read
into their own buffers hand chunks to :meth:`Console.on_data`.  Both end in
the ring's ``commit``, which checks the same watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from serialmuxd.backends.base import Backend
from serialmuxd.config import ConsoleConfig
from serialmuxd.errors import ActionUnsupported, BackendDown, SerialmuxdError
from serialmuxd.ringlog import NEVER, RingLog
from serialmuxd.session import Ending, EndReason, Mode, Session

log = structlog.get_logger("serialmuxd.console")

# Magic SysRq command keys (Documentation/admin-guide/sysrq.rst).
SYSRQ_KEYS = "0123456789bcdefghijklmnopqrstuvwxyz"
SYSRQ_GAP_S = 0.1
# Output pending for clients is sent at once when it reaches this size: a
# flood needs no coalescing (its reads are large) and must not wait.
COALESCE_MAX = 16 * 1024


class OutputBatcher:
    """Sends the coalesced output of every console: one timer per window length.

    A console with output pending registers once per window; when the timer
    fires, each registered console delivers what it gathered.  One timer for
    all consoles, rather than one per console, keeps the cost per window flat
    and lets the loop send the batch in one pass.
    """

    def __init__(self) -> None:
        self._due: dict[float, list[Console]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def schedule(self, console: Console, window_s: float) -> None:
        due = self._due.get(window_s)
        if due is None:
            due = self._due[window_s] = []
            loop = asyncio.get_running_loop()
            self._timers[window_s] = loop.call_later(window_s, self._fire, window_s)
        due.append(console)

    def _fire(self, window_s: float) -> None:
        self._timers.pop(window_s, None)
        for console in self._due.pop(window_s, ()):
            console.flush_output()

    def close(self) -> None:
        """Send everything pending now and stop the timers (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        due, self._due = self._due, {}
        for consoles in due.values():
            for console in consoles:
                console.flush_output()


class QmpLink(Protocol):
    """What the console needs from a VM's QMP connection (see qmp.py)."""

    async def send_break(self, chardev: str) -> None: ...
    async def nmi(self) -> None: ...
    async def reset(self) -> None: ...


class ConsoleUnavailable(SerialmuxdError):
    """Attach or action refused; ``code`` is the API error code (disabled, stopped…)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Seat:
    """Pure takeover state: who holds the keyboard, who watches.

    Last writer wins: a new interactive attach always gets the seat and the
    previous holder is returned so the caller can tell it who took over.
    """

    active: str | None = None
    watchers: set[str] = field(default_factory=set)

    def sit(self, session_id: str) -> str | None:
        previous = self.active
        self.active = session_id
        return previous if previous != session_id else None

    def watch(self, session_id: str) -> None:
        self.watchers.add(session_id)

    def leave(self, session_id: str) -> bool:
        """Remove a session; True when it held the seat."""
        self.watchers.discard(session_id)
        if self.active == session_id:
            self.active = None
            return True
        return False


@dataclass
class Counters:
    """Read at scrape time by the metrics collector; bumped per chunk."""

    tx_bytes: int = 0
    reconnects: int = 0
    sessions: int = 0
    takeovers: int = 0
    holds: int = 0  # flow-control holds of the UART for a busy interactive client
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


# (event, console, fields) -> None; the audit log hooks in here.  Fields hold
# user, peer, session and event-specific keys such as reason or from_user.
EventHook = Callable[[str, "Console", dict[str, object]], None]


class Console:
    def __init__(
        self,
        cfg: ConsoleConfig,
        ring: RingLog,
        backend_factory: Callable[[str, Console], Backend],
        *,
        on_event: EventHook | None = None,
        batcher: OutputBatcher | None = None,
    ) -> None:
        self._batcher = batcher
        self._window_s = 0.0
        self.cfg = cfg
        self.name = cfg.name
        self.ring = ring
        self.counters = Counters()
        self.backend: Any = backend_factory(cfg.uart, self)
        self.enabled = True
        self.service_enabled = True
        self.up = False
        self.down_reason = "not connected yet"
        self.up_since: float | None = None
        self.vm_status: str | None = None
        self.qmp: QmpLink | None = None  # from QMP query-status when there is a QMP link
        self._seen_up = False
        self._hold: tuple[Session, asyncio.TimerHandle, int] | None = None
        self._seat = Seat()
        self._active: Session | None = None
        self._watchers: dict[str, Session] = {}
        self._on_event = on_event
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(console=self.name)
        # Where the output read from the UART but not yet delivered to clients
        # starts in the ring (None: nothing pending), and when clients were last
        # written to: see _output.
        self._out_from: int | None = None
        self._last_out = 0.0
        self._rx_base = ring.next
        # Gathered output never exceeds a quarter ring, nor does one read into the
        # ring (RingLog.span_max): what is pending is never overwritten.
        self._coalesce_max = min(COALESCE_MAX, ring.capacity // 4) or 1
        #: ReceivingSink: one read straight into the ring log, the UART reader's
        #: call per chunk (the ring calls back at the watermark; see the module doc).
        self.receive: Callable[[Callable[[memoryview], int]], int] = ring.recv_from
        self._typing_until = 0.0
        ring.on_watermark = self._reached
        self._arm()
        # Keep the attributes set here under 30: CPython 3.11 keeps up to 29 of an
        # instance's attribute values inline; past that every console carries a
        # full dict, ~1.3 KiB more each (measured at 1,000 consoles, see
        # tests/test_console_output.py).

    @property
    def cfg(self) -> ConsoleConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: ConsoleConfig) -> None:
        # Replaced on reload; the coalescing window is cached for the hot path.
        self._cfg = cfg
        self._window_s = cfg.settings.coalesce_ms / 1000 if self._batcher is not None else 0.0

    # --- lifecycle --------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start draining the UART; the task runs until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"backend:{self.name}")
        return self._task

    async def _run(self) -> None:
        try:
            await self.backend.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A backend bug must not take the daemon down; the console shows stopped.
            self._log.exception("backend_crashed")
            self.on_state(False, "backend failed; see the daemon log")

    async def stop(self, ending: Ending) -> None:
        self.end_all(ending)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.backend.close()
        except Exception:
            self._log.exception("backend_close_failed")
        # The ring is left to its owner, who closes (and so flushes) it off the loop.

    # --- backend side (BackendSink) ----------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        """BufferedSink: where a buffered protocol reads the next chunk (the ring log)."""
        return self.ring.writable(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` of guest output were read into :meth:`get_buffer`'s view."""
        self.ring.commit(nbytes)

    def on_data(self, data: bytes) -> None:
        """Guest output from a backend that reads into its own buffers."""
        if len(data) >= self._coalesce_max and self._out_from is not None:
            self.flush_output()  # what is gathered goes out before a big append can overwrite it
        self.ring.append(data)

    def _arm(self) -> None:
        """Set the ring's watermark to where this console next has work (see the module doc)."""
        ring = self.ring
        if self._out_from is not None:
            ring.watermark = self._out_from + self._coalesce_max
        elif self._active is not None or self._watchers:
            # The next byte; _reached takes the output from the mark less one.
            ring.watermark = ring.next + 1
        else:
            ring.watermark = NEVER

    def _reached(self, end: int) -> None:
        """The ring's watermark: new output for the clients, or a full gathering window."""
        try:
            if self._out_from is not None:
                self.flush_output()
            else:
                self._output(self.ring.watermark - 1, end)
                if self._out_from is None:  # sent (gathering set its own mark)
                    self._arm()
        except Exception:
            # Runs inside the UART read: a bug here must not read as a UART error.
            self._log.exception("output_failed")
            self._arm()

    def _output(self, start: int, end: int) -> None:
        """Send the output the ring holds from ``start`` to ``end`` to the clients, now or at the window's end.

        Gathered output stays in the ring until it is sent (``_out_from``), so
        gathering costs nothing per chunk.  ``RingLog.span_max`` and ``_coalesce_max``
        (each at most a quarter ring) keep it from being overwritten meanwhile.
        """
        window = self._window_s
        if window:
            now = time.monotonic()
            if (
                now - self._last_out < window
                and now > self._typing_until
                and end - start < self._coalesce_max
            ):
                # Clients were written to within this window: gather until it ends,
                # or until _coalesce_max bytes are (the mark _arm would set).
                self._out_from = start
                self.ring.watermark = start + self._coalesce_max
                assert self._batcher is not None
                self._batcher.schedule(self, window)
                return
            self._last_out = now
        self._fan_out(self.ring.since(start))

    def flush_output(self) -> None:
        """Deliver the output gathered in this window now (no-op when there is none).

        Also called before anything that must come after the output already in
        the ring: an attach (its replay ends where live output starts), a state
        change, the end of the sessions.
        """
        start = self._out_from
        if start is None:
            return
        self._out_from = None
        if self._window_s:
            self._last_out = time.monotonic()
        try:
            self._fan_out(self.ring.since(start))
        finally:
            self._arm()

    def _fan_out(self, data: bytes) -> None:
        active = self._active
        if active is not None and not active.deliver(data) and self._hold is None:
            self._hold_or_drop(active)
        if self._watchers:
            for w in list(self._watchers.values()):
                if not w.deliver(data):
                    self.drop_too_slow(w)

    def on_state(self, up: bool, reason: str) -> None:
        if up == self.up:
            if not up:
                self.down_reason = reason  # still down, maybe for a new reason
            return
        self.flush_output()
        self.up = up
        if up:
            if self.up_since is not None or self._seen_up:
                self.counters.reconnects += 1
            self._seen_up = True
            self.up_since = time.time()
            self.down_reason = ""
        else:
            self.down_reason = reason
            self.up_since = None
            self._hold_released()  # a new link must not start paused
        self._log.info("backend_up" if up else "backend_down", reason=reason)
        state = self.state
        for s in self.sessions():
            s.state_changed(state)
        self._emit("backend_up" if up else "backend_down", None, {"reason": reason})

    # --- state ------------------------------------------------------------

    @property
    def rx_bytes(self) -> int:
        """Bytes read from the guest since start-up: the ring counts them, not the hot path."""
        return self.ring.next - self._rx_base

    @property
    def state(self) -> str:
        if not (self.enabled and self.service_enabled):
            return "disabled"
        if not self.up:
            return "stopped"
        if self.vm_status is not None and self.vm_status not in {"running", "debug"}:
            return "stopped"
        return "running"

    @property
    def active(self) -> Session | None:
        return self._active

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def sessions(self) -> list[Session]:
        out = list(self._watchers.values())
        if self._active is not None:
            out.append(self._active)
        return out

    def disabled_message(self) -> str:
        if not self.service_enabled:
            return (
                "console service is disabled: an owner can enable it with "
                "POST /api/v1/service/enable (or `serialmuxd enable`)"
            )
        return (
            f"console {self.name} is disabled: an owner can enable it with "
            f"POST /api/v1/consoles/{self.name}/enable (or `serialmuxd enable {self.name}`)"
        )

    def stopped_message(self) -> str:
        return f"console {self.name} is stopped: start the VM and retry"

    # --- sessions ---------------------------------------------------------

    def attach(self, session: Session) -> tuple[int, bytes]:
        """Attach a client; returns (offset, replay bytes) to show before live output.

        Runs without awaiting, so the replay and the live stream meet exactly:
        no byte is shown twice or skipped.
        """
        if not (self.enabled and self.service_enabled):
            raise ConsoleUnavailable("disabled", self.disabled_message())
        # Everyone already attached gets the gathered output before the seat
        # changes; the newcomer gets it in its replay, not twice.
        self.flush_output()
        replay_n = self.cfg.settings.replay_bytes
        start, replay, _ = self.ring.read(-replay_n if replay_n else self.ring.next, None)
        if session.mode is Mode.WATCH:
            self._seat.watch(session.id)
            self._watchers[session.id] = session
            self._arm()  # live output from the end of the replay
            self._emit("watch", session, {})
            return start, replay
        previous_id = self._seat.sit(session.id)
        previous = self._active
        self._active = session
        self._arm()
        self.counters.sessions += 1
        if previous is not None and previous_id == previous.id:
            self.counters.takeovers += 1
            self._emit("takeover", session, {"from_user": previous.user, "from_peer": previous.peer})
            previous.end(Ending(EndReason.TAKEN_OVER, by=session.user, peer=session.peer))
            self._send_detach_sequence()
        else:
            self._emit("attach", session, {})
        return start, replay

    def follow(self, session: Session, start: int | None) -> tuple[int, bytes, bool]:
        """Register a read-only follower from offset ``start`` (None = oldest kept).

        Returns what the ring holds from there; live output follows with no gap.
        """
        if not (self.enabled and self.service_enabled):
            raise ConsoleUnavailable("disabled", self.disabled_message())
        self.flush_output()
        first, data, truncated = self.ring.read(start, None)
        self._seat.watch(session.id)
        self._watchers[session.id] = session
        self._arm()
        self._emit("watch", session, {})
        return first, data, truncated

    def detach(self, session: Session, reason: EndReason = EndReason.CLIENT_LEFT) -> None:
        """Forget a session (idempotent); sends the detach sequence if it held the seat."""
        if self._watchers.pop(session.id, None) is not None:
            self._seat.leave(session.id)
            self._arm()
            self._emit("detach", session, {"reason": reason.label})
            return
        if self._hold is not None and self._hold[0] is session:
            self._hold_released()
        if self._active is session:
            self._seat.leave(session.id)
            self._active = None
            self._arm()
            self._emit("detach", session, {"reason": reason.label})
            self._send_detach_sequence()

    def _hold_or_drop(self, session: Session) -> None:
        """The interactive client is over its buffer: hold the UART briefly, or drop it.

        Flow control for a fast client in a flood, bounded so that a stuck one
        costs the guest at most ``flow_hold_ms`` once: the hold ends when the
        client has drained to a quarter of its buffer, is renewed while it keeps
        draining at least a quarter buffer per hold (64 KiB per 200 ms by
        default, ~320 KB/s, ~28x a 115200-baud line), and otherwise ends with
        the client dropped as too_slow.
        """
        hold_s = self.cfg.settings.flow_hold_ms / 1000
        if hold_s > 0 and self.backend.pause_reading():
            timer = asyncio.get_running_loop().call_later(hold_s, self._hold_expired)
            self._hold = (session, timer, session.backlog())
            self.counters.holds += 1
            session.on_drained(self._hold_released)
        else:
            self.drop_too_slow(session)

    def _hold_released(self) -> None:
        hold = self._hold
        if hold is None:
            return
        self._hold = None
        hold[0].on_drained(None)
        hold[1].cancel()
        self.backend.resume_reading()

    def _hold_expired(self) -> None:
        hold = self._hold
        if hold is None:
            return
        session, _, before = hold
        now = session.backlog()
        if session is self._active and before - now >= self.cfg.settings.client_buffer_bytes // 4:
            # Slower than the flood but moving (a quarter buffer per hold, ~320 KB/s by
            # default): keep holding.  A stuck client makes no progress and goes below.
            timer = asyncio.get_running_loop().call_later(
                self.cfg.settings.flow_hold_ms / 1000, self._hold_expired
            )
            self._hold = (session, timer, now)
            return
        self._hold_released()
        if session is self._active:
            # drained_in_hold 0 with a backlog over the buffer: the client took
            # nothing for flow_hold_ms (stuck, or stalled that long).
            self.drop_too_slow(
                session, drained_in_hold=before - now, flow_hold_ms=self.cfg.settings.flow_hold_ms
            )

    def drop_too_slow(self, session: Session, **why: int) -> None:
        """Close a session over its buffer; the log line says by how much, so an
        operator can tell a stuck client from a flood that outran a live one."""
        self.drop(
            session,
            EndReason.TOO_SLOW,
            "your connection could not keep up with the console output; reconnect to resume",
            backlog=session.backlog(),
            buffer=self.cfg.settings.client_buffer_bytes,
            **why,
        )

    def drop(self, session: Session, reason: EndReason, message: str, **why: int) -> None:
        """End a session the server gave up on (too slow, unresponsive): counted and logged."""
        self.counters.drop(reason.label)
        self._log.warning(
            f"session_{reason.label}", session=session.id, user=session.user, peer=session.peer, **why
        )
        session.end(Ending(reason, message=message))
        self.detach(session, reason)

    def end_all(self, ending: Ending) -> None:
        self.flush_output()  # the last output before the goodbye
        for s in self.sessions():
            s.end(ending)
            self.detach(s, ending.reason)

    def check_idle(self, now: float) -> None:
        limit = self.cfg.settings.idle_timeout_s
        s = self._active
        if limit > 0 and s is not None and now - s.last_input >= limit:
            s.end(Ending(EndReason.IDLE, message=f"no keystroke for {limit:g} s: session closed"))
            self.detach(s, EndReason.IDLE)

    def _send_detach_sequence(self) -> None:
        seq = self.cfg.settings.detach_sequence
        if seq and self.backend.up:
            try:
                self.backend.write(seq)
                self.counters.tx_bytes += len(seq)
            except BackendDown:
                pass

    # --- keystrokes -------------------------------------------------------

    def write(self, session: Session, data: bytes) -> None:
        """Keystrokes from ``session``; ignored unless it holds the seat."""
        if session is not self._active:
            return
        now = session.last_input = time.monotonic()
        # For a window after a keystroke, output goes out as soon as it is read:
        # its echo and the command's answer are not gathered, and typing stays as
        # quick as without coalescing, even on a console that prints continuously.
        self._typing_until = now + self._window_s
        self.flush_output()
        if not self.backend.up:
            return  # VM stopped: typing into the void, as on a real unplugged line
        try:
            self.backend.write(data)
        except BackendDown:
            return
        self.counters.tx_bytes += len(data)

    @property
    def backend_congested(self) -> bool:
        return bool(self.backend.congested)

    async def drain(self) -> None:
        await self.backend.drain()

    # --- actions (break, sysrq, nmi, reset) -----------------------------------

    def _require_running(self) -> None:
        if not (self.enabled and self.service_enabled):
            raise ConsoleUnavailable("disabled", self.disabled_message())
        if not self.up:
            raise ConsoleUnavailable("stopped", self.stopped_message())

    async def send_break(self) -> None:
        self._require_running()
        if self.qmp is not None:
            await self.qmp.send_break(self.cfg.qmp_chardev)
        elif "break" in self.backend.capabilities:
            await self.backend.send_break()
        else:
            raise ActionUnsupported(
                f"console {self.name} cannot send a serial BREAK: its backend {self.cfg.uart} has no "
                'break signal; add qmp = "unix:/path" (the VM\'s QMP socket) to its config'
            )

    async def sysrq(self, key: str) -> None:
        if len(key) != 1 or key not in SYSRQ_KEYS:
            raise ValueError(f"{key!r} is not a SysRq key: use one of {SYSRQ_KEYS}")
        await self.send_break()
        # The guest's 8250 driver needs the BREAK to land before the key does.
        await asyncio.sleep(SYSRQ_GAP_S)
        self.backend.write(key.encode())
        self.counters.tx_bytes += 1

    async def nmi(self) -> None:
        self._require_running()
        if self.qmp is not None:
            await self.qmp.nmi()
        elif "nmi" in self.backend.capabilities:
            await self.backend.nmi()
        else:
            raise ActionUnsupported(
                f"console {self.name} cannot inject an NMI: that needs the VM's QMP socket "
                '(qmp = "unix:/path" in its config)'
            )

    async def reset(self) -> None:
        self._require_running()
        if self.qmp is not None:
            await self.qmp.reset()
        elif "reset" in self.backend.capabilities:
            await self.backend.reset()
        else:
            raise ActionUnsupported(
                f"console {self.name} cannot reset the VM: that needs the VM's QMP socket "
                '(qmp = "unix:/path" in its config)'
            )

    # --- switches ---------------------------------------------------------

    def set_enabled(self, enabled: bool, *, service: bool = False) -> None:
        if service:
            self.service_enabled = enabled
        else:
            self.enabled = enabled
        if not (self.enabled and self.service_enabled):
            self.end_all(Ending(EndReason.DISABLED, message=self.disabled_message()))

    # --- events -----------------------------------------------------------

    def audit_action(
        self, kind: str, *, user: str, peer: str, session_id: str | None, key: str | None = None
    ) -> None:
        extra: dict[str, object] = {"user": user, "peer": peer, "session": session_id}
        if key is not None:
            extra["key"] = key
        self._emit(kind, None, extra)

    def _emit(self, event: str, session: Session | None, extra: dict[str, object]) -> None:
        if self._on_event is not None:
            fields: dict[str, object] = {}
            if session is not None:
                fields = {"user": session.user, "peer": session.peer, "session": session.id}
            fields.update(extra)
            try:
                self._on_event(event, self, fields)
            except Exception:
                self._log.exception("event_hook_failed", hook_event=event)
