"""Wake reconnect loops the moment a socket appears (inotify on Linux).

QEMU with ``wait=off`` discards what the guest prints while no client is
connected, so a console must reconnect within ~100 ms of the VM starting, not
at the next back-off tick.  One inotify descriptor serves every console; where
inotify is unavailable the back-off alone (capped at 1 s) still reconnects.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections import defaultdict
from pathlib import Path

import structlog

from serialmuxd.flag import Flag

log = structlog.get_logger("serialmuxd.watch")

_IN_ATTRIB = 0x00000004
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class DirWatcher:
    """Fires the events registered for a path when an entry of that name appears."""

    def __init__(self) -> None:
        self._fd = -1
        self._libc: ctypes.CDLL | None = None
        self._wd_dirs: dict[int, str] = {}
        self._dir_wds: dict[str, int] = {}
        self._waiters: defaultdict[str, list[Flag]] = defaultdict(list)
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            name = ctypes.util.find_library("c") or "libc.so.6"
            libc = ctypes.CDLL(name, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._libc = libc
        except (OSError, AttributeError):
            pass

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def _ensure_reader(self) -> None:
        if self._loop is None and self._fd >= 0:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._on_readable)

    def register(self, path: str, event: Flag) -> None:
        """Set ``event`` when ``path`` is created (or re-created)."""
        waiters = self._waiters[path]
        if event not in waiters:
            waiters.append(event)
        if self._fd < 0 or self._libc is None:
            return
        self._ensure_reader()
        directory = str(Path(path).parent)
        if directory in self._dir_wds:
            return
        wd = self._libc.inotify_add_watch(
            self._fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO | _IN_ATTRIB
        )
        if wd >= 0:
            self._wd_dirs[wd] = directory
            self._dir_wds[directory] = wd
        # A missing directory is retried at the next register(): the back-off covers it.

    def unregister(self, path: str, event: Flag) -> None:
        waiters = self._waiters.get(path)
        if waiters is not None and event in waiters:
            waiters.remove(event)
            if not waiters:
                del self._waiters[path]

    def _on_readable(self) -> None:
        try:
            buf = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            log.exception("inotify_read_failed")
            return
        pos = 0
        while pos + _EVENT.size <= len(buf):
            wd, _mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            directory = self._wd_dirs.get(wd)
            if directory is None or not name:
                continue
            path = os.path.join(directory, os.fsdecode(name))
            for ev in self._waiters.get(path, ()):
                ev.set()

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
