"""The audit trail: who touched which console, when, and what they could see.

JSON lines in ``state_dir/audit.jsonl``, opened append-only with mode 0600,
written with one ``write(2)`` per event (no user-space buffer to lose on a
crash).  Each event records the ring offset at that moment, so an auditor can
read exactly what a session saw.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger("serialmuxd.audit")

EVENTS = frozenset(
    {
        "attach",
        "takeover",
        "detach",
        "watch",
        "break",
        "sysrq",
        "nmi",
        "reset",
        "enable",
        "disable",
        "auth_failure",
        "config_reload",
    }
)


def _now_rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.error: str | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(self._fd, 0o600)
        except OSError as e:
            self.error = f"cannot open the audit log {path}: {e.strerror}"
            log.error("audit_open_failed", path=str(path), error=e.strerror)

    def record(
        self,
        event: str,
        *,
        console: str | None = None,
        user: str = "",
        peer: str = "",
        session: str | None = None,
        offset: int | None = None,
        **extra: object,
    ) -> dict[str, object]:
        t = time.time()
        entry: dict[str, object] = {
            "time": _now_rfc3339(t),
            "event": event,
            "console": console,
            "user": user,
            "peer": peer,
            "session": session,
            "offset": offset,
        }
        entry.update({k: v for k, v in extra.items() if v is not None})
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        if self._fd >= 0:
            try:
                os.write(self._fd, line)
            except OSError as e:
                # Never lose the console over the audit file; say so loudly instead.
                log.error("audit_write_failed", error=e.strerror, audit_event=event)
        return entry

    def read(
        self, console: str | None = None, since: float | None = None, limit: int = 10_000
    ) -> list[dict[str, object]]:
        """The newest ``limit`` matching events, oldest first.

        The newest, not the first: on a host that has run for months the first
        10,000 events are history, and what an auditor asks for is the recent ones.
        """
        return list(deque(self._iter(console, since), maxlen=limit))

    def _iter(self, console: str | None, since: float | None) -> Iterator[dict[str, object]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except OSError:
            return
        with f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue  # a torn last line after a crash
                if not isinstance(entry, dict):
                    continue
                if console is not None and entry.get("console") != console:
                    continue
                if since is not None:
                    try:
                        t = datetime.fromisoformat(
                            str(entry.get("time", "")).replace("Z", "+00:00")
                        ).timestamp()
                    except ValueError:
                        continue
                    if t < since:
                        continue
                yield entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
