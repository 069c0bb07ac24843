"""The ``attach`` escape sequence, as a pure parser (no I/O).

Like telnet's, the escape character is recognised anywhere in the input, not
only at the start of a line (as ssh's ``~.`` is): a serial console is often
reached precisely when the line discipline is confused, and a detach that
depends on the guest's notion of "start of line" would fail when it is needed
most.  The price is that a literal Ctrl-] must be typed twice.

After Ctrl-] (0x1d):

- ``.``      detach
- ``b``      send a serial BREAK
- ``?``      show help
- Ctrl-]     send one literal 0x1d
- anything else: both bytes go to the guest unchanged, so a stray Ctrl-]
  loses nothing.

The parser keeps its state between :meth:`EscapeParser.feed` calls, so a
sequence split across two reads (a slow typist, a pty handing over one byte
at a time) is recognised the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

ESCAPE = 0x1D  # Ctrl-]

HELP_LINES = (
    "escape is Ctrl-] followed by:",
    "  .       detach",
    "  b       send a serial BREAK (then a key for magic SysRq)",
    "  ?       this help",
    "  Ctrl-]  send a literal Ctrl-]",
)


@dataclass(frozen=True)
class Send:
    """Bytes for the guest."""

    data: bytes


@dataclass(frozen=True)
class Detach:
    """Leave the session."""


@dataclass(frozen=True)
class Break:
    """Send a serial BREAK."""


@dataclass(frozen=True)
class Help:
    """Show the escape help."""


Action = Send | Detach | Break | Help

_COMMANDS: dict[int, Action] = {
    ord("."): Detach(),
    ord("b"): Break(),
    ord("?"): Help(),
}


class EscapeParser:
    """Turns keyboard input into actions; one instance per attach."""

    def __init__(self, escape: int = ESCAPE) -> None:
        self.escape = escape
        self._pending = False  # saw the escape byte, waiting for the command
        self.detached = False

    @property
    def pending(self) -> bool:
        """True while an escape byte waits for its command byte."""
        return self._pending

    def feed(self, data: bytes) -> list[Action]:
        """Actions for ``data``, in order; adjacent plain bytes come as one Send.

        Input after a Detach is dropped: the session is over, and typed-ahead
        keys must not reach the guest after the user asked to leave.
        """
        actions: list[Action] = []
        if self.detached:
            return actions
        out = bytearray()

        def flush() -> None:
            if out:
                actions.append(Send(bytes(out)))
                out.clear()

        i = 0
        n = len(data)
        esc = self.escape
        while i < n:
            if not self._pending:
                # Copy the run up to the next escape byte in one slice: pastes
                # are large and rarely contain Ctrl-].
                j = data.find(esc, i)
                if j < 0:
                    out += data[i:]
                    break
                out += data[i:j]
                self._pending = True
                i = j + 1
                continue
            b = data[i]
            i += 1
            self._pending = False
            if b == esc:
                out.append(esc)
                continue
            command = _COMMANDS.get(b)
            if command is None:
                out.append(esc)
                out.append(b)
                continue
            flush()
            actions.append(command)
            if isinstance(command, Detach):
                self.detached = True
                return actions
        flush()
        return actions
