"""The demo guest: a tiny Linux box on ttyS0, as a pure state machine.

No asyncio and no clock: every call that needs the time takes ``now`` (seconds
since the epoch, as ``time.time()`` gives).  The backend in ``demo.py`` owns
pacing, timers and power; this module only decides what the guest prints.

Output model, so that nothing here ever builds a large bytes object:

- :meth:`DemoShell.feed` answers keystrokes with what is printed at once
  (echo, the output of small commands), bounded to about
  :data:`FEED_OUTPUT_LIMIT` bytes.
- Large outputs (``yes``, ``seq``) run as lazy *jobs*; while one runs, input is
  held as typeahead like a tty would, and :meth:`DemoShell.read` hands out the
  job's output in chunks of the caller's size.  :attr:`DemoShell.pending` says
  when there is more to read.
- Power events (reboot, poweroff, panic) are left in
  :meth:`DemoShell.take_action` for the backend; the shell ignores input until
  the backend boots it again with :meth:`DemoShell.boot_log`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

PROMPT = b"demo# "
HOSTNAME = "demo"
KERNEL_RELEASE = "6.1.0-demo"
KERNEL_VERSION = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-demo (2024-01-01)"
BANNER = (
    b"\r\nserialmuxd demo guest\r\nA simulated Linux box on ttyS0: type 'help' for what it knows.\r\n\r\n"
)

#: longest command line, as N_TTY's 4095-byte line buffer
MAX_LINE = 4095
#: input held while a job runs or the guest boots; more is dropped, as by a full tty
MAX_TYPEAHEAD = 64 * 1024
#: ``yes`` and ``seq`` print at most this many lines
MAX_REPEAT = 1_000_000
#: a BREAK arms Magic SysRq for this long, as the kernel's 8250 driver does
SYSRQ_WINDOW_S = 5.0
#: feed() stops running commands once it has this much output; the rest waits as typeahead
FEED_OUTPUT_LIMIT = 16 * 1024
#: chunk size of the lazy generators behind yes and seq
STREAM_CHUNK = 4096
DMESG_LINES = 512

_ARITH_MAX_DEPTH = 64
_ESC_MAX = 256

SYSRQ_HELP = (
    "sysrq: HELP : loglevel(0-9) reBoot Crash terminate-all-tasks(E) memory-full-oom-kill(F) "
    "kill-all-tasks(I) thaw-filesystems(J) saK show-backtrace-all-active-cpus(L) "
    "show-memory-usage(M) nice-all-RT-tasks(N) powerOff show-registers(P) show-all-timers(Q) "
    "unRaw Sync show-task-states(T) Unmount show-blocked-tasks(W) dump-ftrace-buffer(Z)"
)

# (kernel timestamp, message); the backend waits out the gaps between timestamps.
BOOT_LINES: tuple[tuple[float, str], ...] = (
    (
        0.0,
        f"Linux version {KERNEL_RELEASE} (serialmuxd@demo) (gcc (Debian 12.2.0-14) 12.2.0, "
        f"GNU ld (GNU Binutils for Debian) 2.40) {KERNEL_VERSION}",
    ),
    (0.0, "Command line: console=ttyS0,115200n8 root=/dev/vda1 ro"),
    (0.0, "BIOS-provided physical RAM map:"),
    (0.0, "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
    (0.0, "BIOS-e820: [mem 0x0000000000100000-0x0000000007fdffff] usable"),
    (0.0, "NX (Execute Disable) protection: active"),
    (0.0, "DMI: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014"),
    (0.0, "Hypervisor detected: KVM"),
    (0.004612, "tsc: Detected 2399.998 MHz processor"),
    (0.041876, "Memory: 98312K/130680K available (14336K kernel code, 2302K rwdata)"),
    (0.097402, "Console: colour dummy device 80x25"),
    (0.098113, "printk: console [ttyS0] enabled"),
    (0.214987, "smp: Bringing up secondary CPUs ..."),
    (0.215342, "smp: Brought up 1 node, 1 CPU"),
    (0.301551, "Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled"),
    (0.323716, "00:04: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A"),
    (0.412034, "virtio_blk virtio1: [vda] 4194304 512-byte logical blocks (2.15 GB/2.00 GiB)"),
    (0.415877, " vda: vda1"),
    (0.498210, "EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none."),
    (0.498954, "VFS: Mounted root (ext4 filesystem) readonly on device 254:1."),
    (0.512630, "Freeing unused kernel image (initmem) memory: 2800K"),
    (0.513001, "Run /sbin/init as init process"),
    (0.702145, "EXT4-fs (vda1): re-mounted. Quota mode: none."),
    (0.811309, "virtio_net virtio0 ens3: renamed from eth0"),
    (0.934470, "random: crng init done"),
)
#: pause between the last kernel line and the login banner (init starting up)
BANNER_DELAY_S = 0.4

FILES: dict[str, str] = {
    "/etc/fstab": (
        "# /etc/fstab: static file system information.\n"
        "# <file system> <mount point>   <type>  <options>          <dump>  <pass>\n"
        "UUID=6f1c2a7e-4b1d-4c55-9d0e-2c1f4a8b9e21 /  ext4  errors=remount-ro  0  1\n"
        "UUID=0b7d3e5a-91c4-4f0e-8a6b-5d2e7c9f1a34 /boot ext4 defaults        0  2\n"
        "/dev/vdb1       none            swap    sw                 0       0\n"
        "tmpfs           /tmp            tmpfs   defaults,nosuid    0       0\n"
    ),
    "/etc/hostname": HOSTNAME + "\n",
    "/etc/os-release": ('PRETTY_NAME="serialmuxd demo guest"\nNAME="serialmuxd demo"\nID=serialmuxd-demo\n'),
    "/proc/cmdline": "console=ttyS0,115200n8 root=/dev/vda1 ro\n",
    "/proc/version": (
        f"Linux version {KERNEL_RELEASE} (serialmuxd@demo) (gcc (Debian 12.2.0-14) 12.2.0) {KERNEL_VERSION}\n"
    ),
}

ENV: dict[str, str] = {
    "HOME": "/root",
    "HOSTNAME": HOSTNAME,
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "PS1": PROMPT.decode(),
    "SHELL": "/bin/sh",
    "TERM": "vt220",
    "USER": "root",
}
SHELL_PID = 142

HELP = """\
This is the serialmuxd demo guest: a simulated shell, no real Linux underneath.
Commands:
  help                 this list
  echo [-n] ARGS       print ARGS; $((6*7)) integer arithmetic (+ - * / %), $?, $HOME
  uname [-asnrm]       kernel name and version
  dmesg                kernel messages since boot
  yes [TEXT] [N]       print TEXT (default y) N times (at most 1000000)
  seq [FIRST [INCR]] LAST   numbers, one a line (at most 1000000)
  date, uptime, hostname, clear, true, false
  cat FILE             try /etc/fstab, /etc/hostname, /etc/os-release, /proc/cmdline
  exit, logout         end this shell; a fresh one starts
  reboot, poweroff     restart the guest, or power it off for a moment
Keys: Backspace, Ctrl-C, Ctrl-U, Ctrl-W, Ctrl-L, Ctrl-D. A BREAK then a key is Magic SysRq.
Separate commands with ';'. No pipes, redirections, files or jobs.
"""


class Action(enum.Enum):
    """A power event the backend carries out; the shell has printed its messages."""

    #: warm reboot: print the boot log again
    REBOOT = "reboot"
    #: power goes off, the backend waits, then boots again
    POWEROFF = "poweroff"
    #: kernel panic: the guest hangs for a second, then reboots (panic=1)
    PANIC = "panic"


class ShellError(Exception):
    """A shell-level error; the message is printed after ``sh: ``."""


# Escape-sequence parser states (terminal replies and function keys are swallowed).
_E_NONE, _E_ESC, _E_CSI, _E_SS3, _E_INTER, _E_STR, _E_STR_ESC = range(7)


class DemoShell:
    """The guest's kernel console and root shell on ttyS0."""

    def __init__(self) -> None:
        self._now = 0.0
        self._boot_at = 0.0
        self._last_kts = 0.0
        self._dmesg: deque[bytes] = deque(maxlen=DMESG_LINES)
        self._out = bytearray()
        self._spill = bytearray()
        self._typeahead = bytearray()
        self._line = bytearray()
        self._cmdq: deque[str] = deque()
        self._stream: Iterator[bytes] | None = None
        self._job = False
        self._action: Action | None = None
        self._action_taken = False
        self._booting = False
        self._sysrq_at: float | None = None
        self._esc = _E_NONE
        self._esc_len = 0
        self._last_cr = False
        self._bol = True
        self.status = 0
        self._commands: dict[str, Callable[[list[str]], int]] = {
            "help": self._cmd_help,
            "echo": self._cmd_echo,
            "uname": self._cmd_uname,
            "dmesg": self._cmd_dmesg,
            "yes": self._cmd_yes,
            "seq": self._cmd_seq,
            "date": self._cmd_date,
            "uptime": self._cmd_uptime,
            "hostname": self._cmd_hostname,
            "clear": self._cmd_clear,
            "exit": self._cmd_exit,
            "logout": self._cmd_exit,
            "reboot": self._cmd_reboot,
            "poweroff": self._cmd_poweroff,
            "cat": self._cmd_cat,
            "true": lambda args: 0,
            "false": lambda args: 1,
        }

    # --- public API ---------------------------------------------------------

    def boot_log(self, now: float) -> list[tuple[float, bytes]]:
        """Power on: reset everything and return ``(delay_s, chunk)`` pairs to print in order.

        The backend sleeps ``delay_s`` before printing each chunk; the last chunk is
        the prompt.  Input fed until :meth:`boot_done` is kept as typeahead.
        """
        self._now = now
        self._boot_at = now
        self._reset_shell()
        self._typeahead.clear()
        self._spill.clear()
        self._esc = _E_NONE
        self._last_cr = False
        self._action = None
        self._action_taken = False
        self._sysrq_at = None
        self._booting = True
        self._dmesg.clear()
        chunks: list[tuple[float, bytes]] = []
        prev = 0.0
        for ts, msg in BOOT_LINES:
            line = _kline(ts, msg)
            self._dmesg.append(line)
            chunks.append((ts - prev, line + b"\r\n"))
            prev = ts
        self._last_kts = prev
        chunks.append((BANNER_DELAY_S, BANNER))
        chunks.append((0.0, PROMPT))
        self._bol = False
        return chunks

    def boot_done(self, now: float) -> None:
        """The prompt is on screen: typeahead from the boot is now read (see :attr:`pending`)."""
        self._now = now
        self._booting = False

    def arm_sysrq(self, now: float) -> None:
        """A serial BREAK arrived: the next byte within 5 s is a Magic SysRq key."""
        self._sysrq_at = now

    def feed(self, data: bytes, now: float | None = None) -> bytes:
        """Keystrokes in; what the guest prints at once comes back."""
        if now is not None:
            self._now = now
        out = self._out = bytearray()
        i, n = 0, len(data)
        while i < n and self._action is None:
            armed_at = self._sysrq_at
            if armed_at is not None:
                self._sysrq_at = None
                if self._now - armed_at <= SYSRQ_WINDOW_S:
                    self._sysrq(data[i])
                    i += 1
                    continue
            if self._booting:
                self._queue(data, i)
                break
            if self._job or self._spill:
                # Ctrl-C is a signal, not input: it flushes the job, its output and the typeahead.
                cut = data.find(b"\x03", i)
                if cut < 0:
                    self._queue(data, i)
                    break
                self._interrupt()
                i = cut + 1
                continue
            if self._typeahead:
                self._queue(data, i)
                break
            i = self._consume(data, i, FEED_OUTPUT_LIMIT)
            if i < n and not self._job:
                self._queue(data, i)  # output limit reached: read() carries on
                break
        self._note_bol(out)
        return bytes(out)

    @property
    def pending(self) -> bool:
        """More output will come from :meth:`read` (a job runs, or typeahead waits)."""
        if self._action is not None or self._booting:
            return False
        return self._job or bool(self._spill) or bool(self._typeahead)

    def read(self, max_bytes: int, now: float | None = None) -> bytes:
        """The next chunk of lazy output, at most ``max_bytes``; ``b""`` when nothing is pending."""
        if now is not None:
            self._now = now
        out = self._out = self._spill
        while len(out) < max_bytes and self._action is None and not self._booting:
            if self._stream is not None:
                chunk = next(self._stream, None)
                if chunk is None:
                    self._stream = None
                else:
                    out += chunk
                continue
            if self._job:
                self._continue(max_bytes)
            elif self._typeahead:
                held = bytes(self._typeahead)
                self._typeahead.clear()
                k = self._consume(held, 0, max_bytes)
                self._typeahead[0:0] = held[k:]
            else:
                break
        result = bytes(out[:max_bytes])
        del out[:max_bytes]
        self._out = bytearray()
        self._note_bol(result)
        return result

    def take_action(self) -> Action | None:
        """The power event the guest asked for, once; input is ignored until the next boot."""
        if self._action is None or self._action_taken:
            return None
        self._action_taken = True
        return self._action

    def nmi(self, now: float | None = None) -> bytes:
        """An NMI arrived: the kernel's unknown-NMI messages."""
        if now is not None:
            self._now = now
        if self._action is not None:
            return b""
        out = self._out = bytearray()
        self._klog(
            "Uhhuh. NMI received for unknown reason 00 on CPU 0.",
            "Do you have a strange power saving mode enabled?",
            "Dazed and confused, but trying to continue",
        )
        self._note_bol(out)
        return bytes(out)

    # --- line discipline ------------------------------------------------------

    def _queue(self, data: bytes, i: int) -> None:
        room = MAX_TYPEAHEAD - len(self._typeahead)
        if room > 0:
            self._typeahead += data[i : i + room]

    def _consume(self, data: bytes, i: int, limit: int) -> int:
        """Run keys through the line discipline until a job starts or the output is ``limit``."""
        n = len(data)
        out = self._out
        while i < n:
            self._key(data[i])
            i += 1
            if self._job or self._action is not None or len(out) >= limit:
                break
        return i

    def _key(self, b: int) -> None:
        if self._esc != _E_NONE:
            self._escape(b)
            return
        if self._last_cr:
            self._last_cr = False
            if b in (0x0A, 0x00):  # CR LF from some terminals, CR NUL from telnet
                return
        line = self._line
        out = self._out
        if 0x20 <= b != 0x7F:
            if len(line) < MAX_LINE:
                line.append(b)
                out.append(b)
            else:
                out.append(0x07)
        elif b in (0x0D, 0x0A):
            self._last_cr = b == 0x0D
            out += b"\r\n"
            text = line.decode("utf-8", "replace")
            line.clear()
            self._run_line(text)
        elif b in (0x08, 0x7F):
            if line:
                del line[_last_char_start(line) :]
                out += b"\b \b"
        elif b == 0x03:
            line.clear()
            self.status = 130
            out += b"^C\r\n" + PROMPT
        elif b == 0x15:
            out += b"\b \b" * _count_chars(line)
            line.clear()
        elif b == 0x17:
            end = len(line)
            while end and line[end - 1] == 0x20:
                end -= 1
            while end and line[end - 1] != 0x20:
                end -= 1
            out += b"\b \b" * _count_chars(line[end:])
            del line[end:]
        elif b == 0x0C:
            out += b"\x1b[H\x1b[2J" + PROMPT + line
        elif b == 0x04:
            if not line:
                out += b"exit\r\n"
                self._run_line("exit")
        elif b == 0x1B:
            self._esc = _E_ESC
            self._esc_len = 0
        # Tab and the other control characters do nothing here, as in a dumb line editor.

    def _escape(self, b: int) -> None:
        """Swallow one byte of an escape sequence: arrow keys, cursor reports, OSC replies."""
        st = self._esc
        self._esc_len += 1
        if self._esc_len > _ESC_MAX:
            self._esc = _E_NONE
            return
        if st == _E_ESC:
            if b == 0x5B:  # [
                self._esc = _E_CSI
            elif b == 0x4F:  # O
                self._esc = _E_SS3
            elif b in (0x5D, 0x50, 0x58, 0x5E, 0x5F):  # ] P X ^ _ : strings ended by ST or BEL
                self._esc = _E_STR
            elif 0x20 <= b <= 0x2F:
                self._esc = _E_INTER
            elif b == 0x1B:
                self._esc_len = 0
            elif b < 0x20:
                self._esc = _E_NONE
                self._key(b)
            else:
                self._esc = _E_NONE  # Alt+key: dropped
        elif st in (_E_CSI, _E_INTER):
            final_lo = 0x40 if st == _E_CSI else 0x30
            if final_lo <= b <= 0x7E:
                self._esc = _E_NONE
            elif b < 0x20:
                # A control character cuts the sequence short and acts as itself, as on a VT.
                self._esc = _E_NONE
                self._key(b)
            elif b > 0x7E:
                self._esc = _E_NONE
        elif st == _E_SS3:
            self._esc = _E_NONE
        elif st == _E_STR:
            if b == 0x07:
                self._esc = _E_NONE
            elif b == 0x1B:
                self._esc = _E_STR_ESC
        elif st == _E_STR_ESC:
            self._esc = _E_NONE if b == 0x5C else _E_STR

    def _interrupt(self) -> None:
        self._stream = None
        self._cmdq.clear()
        self._spill.clear()
        self._typeahead.clear()
        self._job = False
        self._line.clear()
        self.status = 130
        self._out += b"^C\r\n" + PROMPT

    def _note_bol(self, out: bytes | bytearray) -> None:
        if out:
            self._bol = out[-1] == 0x0A

    def _reset_shell(self) -> None:
        # Not the spill: in read() it holds output already printed in this call.
        self._line.clear()
        self._cmdq.clear()
        self._stream = None
        self._job = False
        self.status = 0

    # --- running commands ---------------------------------------------------

    def _run_line(self, text: str) -> None:
        try:
            commands = split_commands(text)
        except ShellError as e:
            self._print(f"sh: {e}\n")
            self.status = 2
            commands = []
        self._cmdq.extend(commands)
        self._job = True
        self._continue(FEED_OUTPUT_LIMIT)

    def _continue(self, limit: int) -> None:
        """Run queued commands until one streams, the output reaches ``limit``, or all are done."""
        out = self._out
        while self._action is None and self._stream is None:
            if not self._cmdq:
                self._job = False
                out += PROMPT
                return
            if len(out) >= limit:
                return
            self._run_command(self._cmdq.popleft())

    def _run_command(self, cmd: str) -> None:
        try:
            words = expand_words(cmd, self.status)
        except ShellError as e:
            self._print(f"sh: {e}\n")
            self.status = 2
            return
        if not words:
            return
        name, args = words[0], words[1:]
        handler = self._commands.get(name)
        if handler is None:
            self._print(f"sh: {name}: not found\n")
            self.status = 127
            return
        try:
            self.status = handler(args)
        except ShellError as e:
            self._print(f"{name}: {e}\n")
            self.status = 1

    def _print(self, text: str) -> None:
        self._out += text.replace("\n", "\r\n").encode("utf-8", "replace")

    def _cmd_help(self, args: list[str]) -> int:
        self._print(HELP)
        return 0

    def _cmd_echo(self, args: list[str]) -> int:
        newline = True
        if args and args[0] == "-n":
            newline = False
            args = args[1:]
        self._print(" ".join(args) + ("\n" if newline else ""))
        return 0

    def _cmd_uname(self, args: list[str]) -> int:
        fields = {
            "s": "Linux",
            "n": HOSTNAME,
            "r": KERNEL_RELEASE,
            "v": KERNEL_VERSION,
            "m": "x86_64",
            "o": "GNU/Linux",
        }
        wanted: set[str] = set()
        for arg in args:
            if not arg.startswith("-") or arg == "-":
                raise ShellError(f"extra operand '{arg}'")
            for flag in arg[1:]:
                if flag == "a":
                    wanted.update(fields)
                elif flag in fields:
                    wanted.add(flag)
                else:
                    raise ShellError(f"invalid option -- '{flag}'")
        order = [k for k in "snrvmo" if k in (wanted or {"s"})]
        self._print(" ".join(fields[k] for k in order) + "\n")
        return 0

    def _cmd_dmesg(self, args: list[str]) -> int:
        out = self._out
        for line in self._dmesg:
            out += line + b"\r\n"
        return 0

    def _cmd_yes(self, args: list[str]) -> int:
        count = MAX_REPEAT
        if args and _is_int(args[-1]):
            count = int(args[-1])
            args = args[:-1]
            if count < 0:
                raise ShellError(f"invalid count '{count}'")
        text = " ".join(args) if args else "y"
        count = self._cap("yes", count)
        self._stream = _repeat((text + "\n").replace("\n", "\r\n").encode(), count)
        return 0

    def _cmd_seq(self, args: list[str]) -> int:
        if not 1 <= len(args) <= 3:
            raise ShellError("usage: seq [FIRST [INCREMENT]] LAST")
        for a in args:
            if not _is_int(a):
                raise ShellError(f"invalid number '{a}'")
        nums = [int(a) for a in args]
        first, step, last = (
            (1, 1, nums[0]) if len(nums) == 1 else (nums[0], 1, nums[1]) if len(nums) == 2 else nums
        )
        if step == 0:
            raise ShellError("invalid zero increment value: '0'")
        count = max(0, (last - first) // step + 1)
        count = self._cap("seq", count)
        self._stream = _numbers(first, step, count)
        return 0

    def _cap(self, name: str, count: int) -> int:
        if count > MAX_REPEAT:
            self._print(f"{name}: the demo guest prints at most {MAX_REPEAT} lines\n")
            return MAX_REPEAT
        return count

    def _cmd_date(self, args: list[str]) -> int:
        d = datetime.fromtimestamp(self._now, UTC)
        self._print(d.strftime("%a %b ") + f"{d.day:2d}" + d.strftime(" %H:%M:%S UTC %Y") + "\n")
        return 0

    def _cmd_uptime(self, args: list[str]) -> int:
        clock = datetime.fromtimestamp(self._now, UTC).strftime("%H:%M:%S")
        up = max(0, int(self._now - self._boot_at))
        days, rest = divmod(up, 86400)
        hours, minutes = divmod(rest // 60, 60)
        text = f"{days} day{'s' if days != 1 else ''}, " if days else ""
        text += f"{hours:2d}:{minutes:02d}" if hours else f"{minutes} min"
        self._print(f" {clock} up {text},  1 user,  load average: 0.00, 0.00, 0.00\n")
        return 0

    def _cmd_hostname(self, args: list[str]) -> int:
        if args:
            raise ShellError("the demo guest's hostname cannot be changed")
        self._print(HOSTNAME + "\n")
        return 0

    def _cmd_clear(self, args: list[str]) -> int:
        self._out += b"\x1b[H\x1b[2J"
        return 0

    def _cmd_exit(self, args: list[str]) -> int:
        # init respawns the console shell: a fresh one greets like a new login.
        self._reset_shell()
        self._job = True  # _continue prints the new shell's prompt
        self._out += BANNER
        return 0

    def _cmd_reboot(self, args: list[str]) -> int:
        self._going_down("reboot", "reboot: Restarting system")
        self._action = Action.REBOOT
        return 0

    def _cmd_poweroff(self, args: list[str]) -> int:
        self._going_down("poweroff", "reboot: Power down")
        self._action = Action.POWEROFF
        return 0

    def _going_down(self, what: str, kmsg: str) -> None:
        self._print(
            "The system is going down NOW!\nSent SIGTERM to all processes\n"
            f"Sent SIGKILL to all processes\nRequesting system {what}\n"
        )
        self._klog(kmsg)

    def _cmd_cat(self, args: list[str]) -> int:
        if not args:
            raise ShellError("reading the terminal is not supported in the demo guest; name a file")
        status = 0
        for path in args:
            text = FILES.get(path)
            if text is None:
                self._print(f"cat: {path}: No such file or directory\n")
                status = 1
            else:
                self._print(text)
        return status

    # --- kernel: SysRq, printk --------------------------------------------------

    def _sysrq(self, key: int) -> None:
        k = chr(key).lower() if key < 0x80 else ""
        if k == "b":
            self._klog("sysrq: Resetting")
            self._action = Action.REBOOT
        elif k == "c":
            self._klog(
                "sysrq: Trigger a crash",
                "Kernel panic - not syncing: sysrq triggered crash",
                f"CPU: 0 PID: 0 Comm: swapper/0 Not tainted {KERNEL_RELEASE} #1",
                "Hardware name: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1",
                "Call Trace:",
                " <IRQ>",
                " dump_stack_lvl+0x44/0x5c",
                " panic+0x118/0x2ed",
                " sysrq_handle_crash+0x16/0x20",
                " __handle_sysrq.cold+0x43/0x11b",
                " serial8250_handle_irq+0x1c5/0x2c0",
                " </IRQ>",
                "Kernel Offset: disabled",
                "Rebooting in 1 seconds..",
                "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
            )
            self._action = Action.PANIC
        elif k == "s":
            self._klog("sysrq: Emergency Sync", "Emergency Sync complete")
        elif k == "u":
            self._klog("sysrq: Emergency Remount R/O", "Emergency Remount complete")
        elif k == "t":
            self._klog(
                "sysrq: Show State",
                "task:init            state:S stack:0     pid:1     ppid:0      flags:0x00000002",
                "task:kthreadd        state:S stack:0     pid:2     ppid:0      flags:0x00004000",
                "task:jbd2/vda1-8     state:S stack:0     pid:97    ppid:2      flags:0x00004000",
                f"task:sh              state:R  running task     stack:0     pid:{SHELL_PID}",
            )
        elif k == "w":
            self._klog(
                "sysrq: Show Blocked State",
                "task:kworker/0:1     state:D stack:0     pid:23    ppid:2      flags:0x00004000",
                "Call Trace:",
                " <TASK>",
                " __schedule+0x351/0xa20",
                " schedule+0x5d/0xe0",
                " io_schedule+0x42/0x70",
                " </TASK>",
            )
        elif k == "m":
            self._klog(
                "sysrq: Show Memory",
                "Mem-Info:",
                "active_anon:312 inactive_anon:0 isolated_anon:0",
                " active_file:1041 inactive_file:2207 isolated_file:0",
                " free:24577 free_pcp:61 free_cma:0",
                "32766 pages RAM",
                "0 pages HighMem/MovableOnly",
                "1353 pages reserved",
            )
        elif k in ("e", "i"):
            what = "Terminate All Tasks" if k == "e" else "Kill All Tasks"
            self._klog(f"sysrq: {what}")
            # Every task but init died; init respawns the console shell.
            self._reset_shell()
            self._typeahead.clear()
            self._spill.clear()  # the tty hung up: what the dead shell queued is gone
            self._out += BANNER + PROMPT
        elif k == "o":
            self._klog("sysrq: Power Off", "reboot: Power down")
            self._action = Action.POWEROFF
        elif k.isdigit():
            self._klog("sysrq: Changing Loglevel", f"sysrq: Loglevel set to {k}")
        else:
            self._klog(SYSRQ_HELP)

    def _klog(self, *messages: str) -> None:
        """printk to the console: on a line of its own, as the kernel's output lands."""
        t = max(self._now - self._boot_at, self._last_kts)
        self._last_kts = t
        out = self._out
        at_bol = out[-1] == 0x0A if out else self._bol
        if not at_bol:
            out += b"\r\n"
        for msg in messages:
            line = _kline(t, msg)
            self._dmesg.append(line)
            out += line + b"\r\n"


# --- helpers (pure functions) ------------------------------------------------


def _kline(ts: float, msg: str) -> bytes:
    us = round(ts * 1_000_000)
    return f"[{us // 1_000_000:5d}.{us % 1_000_000:06d}] {msg}".encode()


def _last_char_start(line: bytearray) -> int:
    j = len(line) - 1
    while j > 0 and 0x80 <= line[j] < 0xC0:  # UTF-8 continuation bytes
        j -= 1
    return j


def _count_chars(data: bytes | bytearray) -> int:
    return sum(1 for b in data if not 0x80 <= b < 0xC0)


def _is_int(text: str) -> bool:
    t = text[1:] if text[:1] in "+-" else text
    return t.isascii() and t.isdigit() and len(t) <= 19


def _repeat(line: bytes, count: int) -> Iterator[bytes]:
    """``line`` ``count`` times, in chunks of about STREAM_CHUNK bytes."""
    per = max(1, STREAM_CHUNK // len(line))
    full, rest = divmod(count, per)
    chunk = line * per
    for _ in range(full):
        yield chunk
    if rest:
        yield line * rest


def _numbers(first: int, step: int, count: int) -> Iterator[bytes]:
    per = 512
    i = 0
    while i < count:
        n = min(per, count - i)
        start = first + i * step
        yield b"".join([b"%d\r\n" % (start + k * step) for k in range(n)])
        i += n


def split_commands(text: str) -> list[str]:
    """Split a command line on unquoted ``;``; refuse what the demo shell cannot do."""
    commands: list[str] = []
    start = 0
    i, n = 0, len(text)
    quote = ""
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "$" and text.startswith("$((", i):
            end = _arith_end(text, i)
            i = end + 2
            continue
        elif c == ";":
            commands.append(text[start:i])
            start = i + 1
        elif c in "|&<>`" or (c == "$" and text.startswith("$(", i)):
            raise ShellError(
                f"'{c}': pipes, redirections, jobs and command substitution "
                "are not supported in the demo guest"
            )
        i += 1
    if quote:
        raise ShellError("syntax error: unterminated quoted string")
    commands.append(text[start:])
    return [c for c in commands if c.strip()]


def expand_words(cmd: str, status: int) -> list[str]:
    """Quote removal and ``$`` expansion (``$((…))``, ``$?``, ``$$``, ``$NAME``, ``${NAME}``)."""
    words: list[str] = []
    cur: list[str] = []
    have = False
    i, n = 0, len(cmd)
    while i < n:
        c = cmd[i]
        if c in " \t":
            if have:
                words.append("".join(cur))
                cur, have = [], False
            i += 1
            continue
        have = True
        if c == "'":
            j = cmd.find("'", i + 1)
            if j < 0:
                raise ShellError("syntax error: unterminated quoted string")
            cur.append(cmd[i + 1 : j])
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ShellError("syntax error: unterminated quoted string")
                c = cmd[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and cmd[i + 1] in '"\\$`':
                    cur.append(cmd[i + 1])
                    i += 2
                elif c == "$":
                    text, i = _dollar(cmd, i, status)
                    cur.append(text)
                else:
                    cur.append(c)
                    i += 1
        elif c == "\\":
            cur.append(cmd[i + 1 : i + 2])
            i += 2
        elif c == "$":
            text, i = _dollar(cmd, i, status)
            cur.append(text)
        else:
            cur.append(c)
            i += 1
    if have:
        words.append("".join(cur))
    return words


def _arith_end(text: str, i: int) -> int:
    """Index of the ``))`` closing the ``$((`` at ``i``."""
    depth = 0
    j = i + 3
    while j < len(text):
        c = text[j]
        if c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                if text.startswith("))", j):
                    return j
                if j + 1 < len(text):
                    raise ShellError("arithmetic syntax error")
            depth -= 1
        j += 1
    raise ShellError("syntax error: missing '))'")


def _dollar(cmd: str, i: int, status: int) -> tuple[str, int]:
    """Expand the ``$`` at ``i``; returns the text and the index after it."""
    n = len(cmd)
    nxt = cmd[i + 1] if i + 1 < n else ""
    if cmd.startswith("$((", i):
        end = _arith_end(cmd, i)
        return str(arith(cmd[i + 3 : end])), end + 2
    if nxt == "?":
        return str(status), i + 2
    if nxt == "$":
        return str(SHELL_PID), i + 2
    if nxt == "#":
        return "0", i + 2
    if nxt.isdigit():
        return ("sh" if nxt == "0" else ""), i + 2
    if nxt == "{":
        end = cmd.find("}", i + 2)
        if end < 0:
            raise ShellError("syntax error: bad substitution")
        return ENV.get(cmd[i + 2 : end], ""), end + 1
    j = i + 1
    while j < n and (cmd[j].isalnum() or cmd[j] == "_") and cmd[j].isascii():
        j += 1
    if j == i + 1:
        return "$", i + 1
    return ENV.get(cmd[i + 1 : j], ""), j


# --- $((…)) integer arithmetic, 64-bit wrap-around like ash ----------------------


def _wrap(v: int) -> int:
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def arith(expr: str) -> int:
    """Evaluate ``+ - * / %`` and parentheses over 64-bit integers, as the shell does."""
    tokens = _arith_tokens(expr)
    pos = 0

    def peek() -> str:
        return tokens[pos] if pos < len(tokens) else ""

    def take() -> str:
        nonlocal pos
        tok = peek()
        pos += 1
        return tok

    def primary(depth: int) -> int:
        if depth > _ARITH_MAX_DEPTH:
            raise ShellError("arithmetic syntax error: nested too deeply")
        tok = take()
        if tok in ("-", "+"):
            v = primary(depth + 1)
            return _wrap(-v) if tok == "-" else v
        if tok == "(":
            v = expr_(depth + 1)
            if take() != ")":
                raise ShellError("arithmetic syntax error")
            return v
        if tok[:1].isdigit():
            return _wrap(_arith_number(tok))
        if tok[:1].isalpha() or tok[:1] == "_":
            value = ENV.get(tok, "0").strip() or "0"
            return _wrap(_arith_number(value)) if value.isdigit() else 0
        raise ShellError("arithmetic syntax error")

    def term(depth: int) -> int:
        v = primary(depth)
        while peek() in ("*", "/", "%"):
            op = take()
            r = primary(depth)
            if op == "*":
                v = _wrap(v * r)
                continue
            if r == 0:
                raise ShellError("divide by zero")
            q = abs(v) // abs(r)
            q = q if (v < 0) == (r < 0) else -q  # C truncates toward zero
            v = _wrap(q) if op == "/" else _wrap(v - r * q)
        return v

    def expr_(depth: int) -> int:
        v = term(depth)
        while peek() in ("+", "-"):
            op = take()
            r = term(depth)
            v = _wrap(v + r if op == "+" else v - r)
        return v

    if not tokens:
        return 0
    value = expr_(0)
    if pos != len(tokens):
        raise ShellError("arithmetic syntax error")
    return value


def _arith_tokens(expr: str) -> list[str]:
    tokens: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in " \t":
            i += 1
        elif c in "+-*/%()":
            tokens.append(c)
            i += 1
        elif c.isascii() and (c.isalnum() or c == "_"):
            j = i
            while j < n and expr[j].isascii() and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            tokens.append(expr[i:j])
            i = j
        else:
            raise ShellError("arithmetic syntax error")
    return tokens


def _arith_number(tok: str) -> int:
    try:
        if tok[:2].lower() == "0x":
            return int(tok[2:], 16)
        if len(tok) > 1 and tok[0] == "0":
            return int(tok[1:], 8)
        return int(tok, 10)
    except ValueError:
        raise ShellError("arithmetic syntax error") from None
