"""A real QEMU guest for end-to-end tests: start, talk to its UART, QMP, stop.

The guest is a Debian cloud kernel plus a busybox initramfs built by
``scripts/build-guest.sh``. It prints :data:`INIT_MARKER` when ``/init`` runs
and then gives a root shell on ttyS0 whose prompt is :data:`PROMPT` (busybox
ash follows every prompt with ``ESC[6n``, a cursor-position query).

Use from a test module::

    from tests.guest import PROMPT, UartClient, qemu_guest  # noqa: F401

    @pytest.mark.qemu
    def test_something(qemu_guest: GuestFactory) -> None:
        vm = qemu_guest(wait=True)           # started; QEMU waits for the first client
        with UartClient(vm.uart_path) as uart:
            uart.read_until(PROMPT_RE)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
QEMU_BINARY = "qemu-system-x86_64"

#: Printed by the guest's /init (followed by " (kernel <uname -r>)").
INIT_MARKER = b"serialmuxd-guest: init started"
#: The guest shell's prompt, exactly.
PROMPT = b"guest# "
#: Matches a prompt at the start of a line, with or without ash's ESC[6n after it.
PROMPT_RE = re.compile(rb"^guest# (?:\x1b\[6n)?", re.MULTILINE)

# Room for boot on a loaded 2-core machine under TCG (an idle one boots in ~2.5 s).
BOOT_TIMEOUT = 30.0

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107

_PTY_RE = re.compile(rb"char device redirected to (/dev/pts/\d+) \(label serial0\)")


def qemu_available() -> bool:
    """True when qemu-system-x86_64 is installed."""
    return shutil.which(QEMU_BINARY) is not None


def guest_dir() -> Path:
    """Where build-guest.sh puts the images (``SERIALMUXD_GUEST_DIR`` overrides)."""
    override = os.environ.get("SERIALMUXD_GUEST_DIR")
    return Path(override) if override else REPO_ROOT / ".cache" / "guest"


@functools.cache
def guest_images() -> tuple[Path, Path]:
    """Build (or reuse) the guest once per process; return (vmlinuz, initrd.gz)."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{BUILD_SCRIPT} failed with status {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    out = guest_dir()
    return out / "vmlinuz", out / "initrd.gz"


class QmpError(Exception):
    """QMP answered with an error, or could not be spoken to."""


class QmpBusy(QmpError):
    """The QMP socket accepted but sent no greeting: another client holds it."""


def qmp_execute(
    qmp_path: Path | str,
    command: str,
    arguments: Mapping[str, object] | None = None,
    *,
    timeout: float = 5.0,
) -> Any:
    """Run one QMP command on a fresh connection and return its ``return`` value.

    QEMU serves one QMP client at a time and leaves others queued in the listen
    backlog without a greeting, so a missing greeting within ``timeout`` means
    someone else (e.g. the daemon under test) holds the monitor: QmpBusy.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(qmp_path))
        reader = sock.makefile("rb")

        def next_reply() -> dict[str, Any]:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                line = reader.readline()
                if not line:
                    raise EOFError("QMP connection closed")
                message: dict[str, Any] = json.loads(line)
                if "event" not in message:
                    return message

        try:
            greeting = next_reply()
        except TimeoutError as exc:
            raise QmpBusy(f"no QMP greeting on {qmp_path} within {timeout}s") from exc
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting!r}")
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            request: dict[str, object] = {"execute": execute}
            if args:
                request["arguments"] = dict(args)
            sock.sendall(json.dumps(request).encode() + b"\n")
            try:
                reply = next_reply()
            except EOFError:
                if execute == "quit":
                    # QEMU may close the monitor before its answer gets out.
                    return {}
                raise
            if "error" in reply:
                raise QmpError(f"{execute}: {reply['error']}")
        return reply.get("return")


_live_guests: set[QemuGuest] = set()


@atexit.register
def _kill_leftovers() -> None:
    # A test process that dies without fixture teardown must not leave
    # TCG guests eating the 2 shared cores.
    for guest in list(_live_guests):
        with contextlib.suppress(Exception):
            guest.kill()


class QemuGuest:
    """One qemu-system-x86_64 process running the test guest.

    The UART is COM1/ttyS0 on chardev ``serial0``: a unix socket server at
    ``uart_path`` (``serial="unix"``) or a pty (``serial="pty"``, path in
    ``pty_path`` after start). With ``wait=True`` QEMU does not start the guest
    until the first client connects, so no boot byte is lost. QMP listens at
    ``qmp_path`` (one client at a time).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "vm1",
        serial: Literal["unix", "pty"] = "unix",
        wait: bool = False,
        qmp: bool = True,
        extra_args: Sequence[str] = (),
        kernel_args: str = "",
        start_timeout: float = BOOT_TIMEOUT,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.serial = serial
        self.wait = wait
        self.qmp_enabled = qmp
        self.extra_args = tuple(extra_args)
        self.kernel_args = kernel_args
        self.start_timeout = start_timeout
        self.uart_path = self.workdir / f"{name}.serial"
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.log_path = self.workdir / f"{name}.qemu.log"
        self.pty_path: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        for path in (self.uart_path, self.qmp_path):
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise ValueError(
                    f"{path} is longer than a unix socket path may be "
                    f"({_UNIX_PATH_MAX} bytes): use a shorter workdir"
                )

    def __repr__(self) -> str:
        return f"QemuGuest(name={self.name!r}, serial={self.serial!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The QEMU command line (needs the guest images, so builds them)."""
        vmlinuz, initrd = guest_images()
        append = "console=ttyS0,115200"
        if self.kernel_args:
            append += " " + self.kernel_args
        # KVM hangs after "Probing EDD" on these machines (QEMU-RIG-NOTES).
        argv = [QEMU_BINARY, "-name", self.name, "-accel", "tcg", "-cpu", "max", "-m", "256"]
        argv += ["-nodefaults", "-no-user-config", "-display", "none"]
        argv += ["-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append]
        # QMP comes before the serial chardev: with wait=on QEMU blocks while
        # creating that chardev, and the monitor should already be listening.
        if self.qmp_enabled:
            argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.serial == "unix":
            wait = "on" if self.wait else "off"
            chardev = f"socket,id=serial0,path={self.uart_path},server=on,wait={wait}"
        else:
            chardev = "pty,id=serial0"
        argv += ["-chardev", chardev, "-serial", "chardev:serial0", *self.extra_args]
        return argv

    def start(self) -> None:
        """Launch QEMU and return once the UART (and QMP) endpoint exists."""
        if self.running():
            raise RuntimeError(f"{self!r} is already running")
        argv = self.command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A killed QEMU leaves its socket files; waiting for them to appear
        # only means something once the old ones are gone.
        for path in (self.uart_path, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.pty_path = None
        with open(self.log_path, "ab") as log:
            log.write(f"### {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C in the pytest terminal is for pytest, and
            # teardown stops QEMU explicitly.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live_guests.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.running():
                raise RuntimeError(
                    f"QEMU exited with status {self.returncode} during start:\n{self.log_tail()}"
                )
            if self._endpoints_ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"QEMU's endpoints did not appear within {self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _endpoints_ready(self) -> bool:
        if self.qmp_enabled and not _is_socket(self.qmp_path):
            return False
        if self.serial == "unix":
            return _is_socket(self.uart_path)
        match = _PTY_RE.search(self.log_path.read_bytes())
        if match is None:
            return False
        self.pty_path = match.group(1).decode()
        return True

    def log_tail(self, limit: int = 4000) -> str:
        """The end of QEMU's own output, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no QEMU log)"
        return data[-limit:].decode(errors="replace")

    def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 5.0
    ) -> Any:
        """Run one QMP command (fails with QmpBusy while the daemon holds QMP)."""
        if not self.qmp_enabled:
            raise QmpError(f"{self.name} was started without QMP")
        return qmp_execute(self.qmp_path, command, arguments, timeout=timeout)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for QEMU to exit by itself; return its status."""
        if self._proc is None:
            raise RuntimeError(f"{self!r} was never started")
        code = self._proc.wait(timeout)
        _live_guests.discard(self)
        return code

    def quit(self, timeout: float = 10.0) -> None:
        """Stop QEMU gracefully: QMP quit, else SIGTERM, SIGKILL as a last resort."""
        if self._proc is None or not self.running():
            self._reap()
            return
        deadline = time.monotonic() + timeout
        asked = False
        if self.qmp_enabled:
            # QMP may be held by the daemon under test (one client at a time).
            with contextlib.suppress(QmpError, OSError, EOFError, ValueError):
                self.qmp("quit", timeout=min(2.0, timeout / 2))
                asked = True
        if not asked or not self._wait_until(deadline):
            self._proc.send_signal(signal.SIGTERM)
            if not self._wait_until(max(deadline, time.monotonic() + 3.0)):
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL QEMU (as a host crash would) and wait for it."""
        if self._proc is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._reap()

    def _wait_until(self, deadline: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
        _live_guests.discard(self)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


class UartClient:
    """A blocking client of a guest UART: a QEMU unix socket or a pty.

    ``transcript`` keeps every byte received, for failure messages.
    """

    def __init__(self, path: Path | str, *, pty: bool = False, connect_timeout: float = 10.0) -> None:
        self.path = str(path)
        self.transcript = bytearray()
        self.last_match: re.Match[bytes] | None = None
        self._pending = bytearray()
        self._sock: socket.socket | None = None
        self._eof = False
        if pty:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY)
            # Raw at once: the slave's default echo would feed the guest's
            # own output back to it as keystrokes.
            tty.setraw(self._fd, termios.TCSANOW)
        else:
            self._sock = _connect_unix(self.path, connect_timeout)
            self._fd = self._sock.fileno()

    def __enter__(self) -> UartClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
        self._fd = -1

    def send(self, data: bytes) -> None:
        if self._sock is not None:
            self._sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _read_some(self, timeout: float) -> bytes:
        """Whatever arrives within timeout (b"" if nothing; EOFError at end)."""
        if self._eof:
            raise EOFError(f"{self.path} closed")
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            data = os.read(self._fd, 65536)
        except OSError:
            # A pty whose QEMU went away reads EIO.
            data = b""
        if not data:
            self._eof = True
            raise EOFError(f"{self.path} closed")
        self.transcript += data
        self._pending += data
        return data

    def read_until(self, pattern: bytes | re.Pattern[bytes], timeout: float = BOOT_TIMEOUT) -> bytes:
        """Consume and return output up to and including the first match.

        ``pattern`` is a literal byte string or a compiled bytes regex; the
        match object is kept in ``last_match``. TimeoutError (or EOFError)
        shows the tail of what was seen.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._pending)
            if match is not None:
                self.last_match = match
                consumed = bytes(self._pending[: match.end()])
                del self._pending[: match.end()]
                return consumed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {regex.pattern!r} on {self.path} within {timeout}s; "
                    f"last output: {bytes(self.transcript[-1500:])!r}"
                )
            try:
                self._read_some(min(remaining, 0.5))
            except EOFError as exc:
                raise EOFError(
                    f"{self.path} closed before {regex.pattern!r}; "
                    f"last output: {bytes(self.transcript[-1500:])!r}"
                ) from exc

    def read_quiet(self, quiet: float = 0.5, timeout: float = 10.0) -> bytes:
        """Consume output until none arrives for ``quiet`` seconds (or timeout).

        Use before a BREAK: a byte sent while the kernel prints can sit in the
        emulated UART and swallow the SysRq (QEMU-RIG-NOTES).
        """
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            if self._read_some(min(quiet, deadline - time.monotonic())):
                last = time.monotonic()
            elif time.monotonic() - last >= quiet:
                break
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def poke_until(
        self,
        pattern: bytes | re.Pattern[bytes],
        *,
        poke: bytes = b"\r",
        interval: float = 2.0,
        timeout: float = BOOT_TIMEOUT,
    ) -> bytes:
        """Like read_until, sending ``poke`` every ``interval`` s without a match.

        For endpoints that may have missed the output already printed (a pty
        opened after boot, a ``wait=off`` socket).
        """
        deadline = time.monotonic() + timeout
        seen = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            try:
                return bytes(seen) + self.read_until(pattern, min(interval, max(remaining, 0.01)))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                self.send(poke)


def _connect_unix(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


GuestFactory = Callable[..., QemuGuest]


@pytest.fixture
def qemu_guest() -> Iterator[GuestFactory]:
    """Factory of started QEMU guests, all killed at teardown.

    ``qemu_guest(workdir=None, start=True, **QemuGuest_kwargs)``; without a
    workdir each guest gets a short fresh directory under /tmp (unix socket
    paths are limited to 107 bytes, pytest's tmp_path can exceed that).
    ``start=False`` returns the guest unstarted, e.g. to start the daemon first.
    Skips the test when QEMU is not installed.
    """
    if not qemu_available():
        pytest.skip(f"{QEMU_BINARY} is not installed")
    guest_images()
    guests: list[QemuGuest] = []
    tmpdirs: list[Path] = []

    def make(workdir: Path | None = None, *, start: bool = True, **kwargs: Any) -> QemuGuest:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="smx-vm-"))
            tmpdirs.append(workdir)
        guest = QemuGuest(workdir, **kwargs)
        guests.append(guest)
        if start:
            guest.start()
        return guest

    yield make
    for guest in guests:
        guest.kill()
    for path in tmpdirs:
        shutil.rmtree(path, ignore_errors=True)
