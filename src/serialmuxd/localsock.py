"""Per-console local sockets: ``unix_listen_dir/NAME.sock``.

A plain connection is an interactive attach under the same takeover rules as
the WebSocket; access is guarded by the socket's file mode (0660) and group,
which is what ``socat``, ``picocom`` and test rigs expect.  The session writes
straight to the transport (no queue, no task): the kernel socket buffer plus
the transport's buffer are the bound, checked on every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, cast

import structlog

from serialmuxd.console import Console, ConsoleUnavailable
from serialmuxd.session import Ending, EndReason, Mode, Session

if TYPE_CHECKING:
    from serialmuxd.daemon import Daemon

log = structlog.get_logger("serialmuxd.localsock")
SOCKET_MODE = 0o660


class LocalSession(Session, asyncio.Protocol):
    def __init__(self, daemon: Daemon, console: Console) -> None:
        Session.__init__(self, console=console.name, user=_local_user(), peer="local", mode=Mode.INTERACTIVE)
        self._daemon = daemon
        self._console = console
        self._transport: asyncio.Transport | None = None
        self._bound = console.cfg.settings.client_buffer_bytes
        self._draining = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed.
        self._transport = cast(asyncio.Transport, transport)
        # resume_writing() at a quarter of the bound tells a held console to go on.
        self._transport.set_write_buffer_limits(high=self._bound, low=self._bound // 4)
        self.user, self.peer = _peer_of(transport)
        try:
            _, replay = self._console.attach(self)
        except ConsoleUnavailable as e:
            self._transport.write(f"\r\n[serialmuxd] {e}\r\n".encode())
            self._transport.close()
            return
        self._daemon.sessions.add(self)
        if replay:
            self._transport.write(replay)

    def data_received(self, data: bytes) -> None:
        console = self._console
        console.write(self, data)
        if console.backend_congested and not self._draining and self._transport is not None:
            # Keystrokes get back-pressure: stop reading this client until the UART drains.
            self._draining = True
            self._transport.pause_reading()
            self._daemon.spawn(self._resume_after_drain(), name=f"drain:{self.id}")

    async def _resume_after_drain(self) -> None:
        try:
            await self._console.drain()
        finally:
            self._draining = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def backlog(self) -> int:
        t = self._transport
        return 0 if t is None else t.get_write_buffer_size()

    def pause_writing(self) -> None:
        return  # deliver() reports the bound; the console decides

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._check_drained(0, self._bound)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._daemon.sessions.discard(self)
        if self.ending is None:
            self.ending = Ending(EndReason.CLIENT_LEFT)
        self._console.detach(self, self.ending.reason)
        self._transport = None

    # Session

    def deliver(self, data: bytes) -> bool:
        t = self._transport
        if t is None:
            return True
        t.write(data)
        return t.get_write_buffer_size() <= self._bound

    def state_changed(self, state: str) -> None:
        return  # a raw byte stream has no place for it; the guest's output tells

    def _close(self, ending: Ending) -> None:
        t = self._transport
        if t is None:
            return
        if ending.reason is EndReason.TAKEN_OVER:
            t.write(f"\r\n[serialmuxd] session taken over by {ending.by} from {ending.peer}\r\n".encode())
        elif ending.reason is EndReason.TOO_SLOW:
            t.abort()  # its buffer is full: the farewell would only queue behind it
            return
        elif ending.message:
            t.write(f"\r\n[serialmuxd] {ending.message}\r\n".encode())
        elif ending.reason is EndReason.SHUTDOWN:
            t.write(b"\r\n[serialmuxd] daemon shutting down\r\n")
        t.close()


def _local_user() -> str:
    return "local"


def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(unix user, "pid N") of the connecting process, from SO_PEERCRED."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            import socket
            import struct

            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            try:
                import pwd

                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            return name, f"unix:pid {pid}"
    return "local", "unix"


def bind_socket(path: Path, group: str) -> socket.socket:
    """Bind and listen on ``path`` (blocking, at start-up or reload).

    The caller holds a 0o117 umask while this runs, so the socket is never
    reachable wider than 0660, not even between bind and chmod.  Binding a
    unix socket creates an inode: ~0.5 ms each on this project's ext4 test
    disks, ~15 µs on a tmpfs such as /run, where they belong.
    """
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(64)
        os.chmod(path, SOCKET_MODE)
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, PermissionError) as e:
                log.error("socket_group_failed", path=str(path), group=group, error=str(e))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_socket(daemon: Daemon, console: Console, sock: socket.socket) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        return LocalSession(daemon, console)

    return await loop.create_unix_server(factory, sock=sock)


async def start_listener(
    daemon: Daemon, console: Console, directory: Path, group: str
) -> asyncio.AbstractServer:
    path = directory / f"{console.name}.sock"
    old = os.umask(0o117)
    try:
        sock = bind_socket(path, group)
    finally:
        os.umask(old)
    return await serve_socket(daemon, console, sock)
