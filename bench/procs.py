"""Processes the benchmark starts, and what /proc says about them.

Every process is started in its own session (so its forks share its process group)
and registered; ``stop_all`` ends exactly those, by their PIDs, on the way out of a
run, an error or Ctrl-C.  CPU and memory are read from /proc for a process and all
its descendants, so multi-process servers (conserver's children, one socat per
console) are counted whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Managed:
    """A child process the benchmark owns; ``stop`` signals its process group by PID."""

    registry: ClassVar[list[Managed]] = []

    def __init__(
        self,
        argv: list[str],
        log: Path | None = None,
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        text: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab") if log is not None else None  # noqa: SIM115
        self.started_at = time.monotonic()
        self.popen: subprocess.Popen[Any] = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else (self._log_file or subprocess.DEVNULL),
            stderr=self._log_file or subprocess.DEVNULL,
            start_new_session=True,
            text=text,
            env=env,
            # Never the caller's directory: a server that writes relative paths
            # (conmand's logs did) writes them next to its own log.
            cwd=cwd if cwd is not None else (log.parent if log is not None else None),
        )
        self.pid = self.popen.pid
        Managed.registry.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        # The group was created by start_new_session, so its id is this PID.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        stop_many([self], timeout)

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def stop_many(procs: list[Managed], timeout: float = 5.0) -> None:
    """SIGTERM each group, wait up to ``timeout`` for all, then SIGKILL what is left."""
    for proc in procs:
        if proc.alive():
            proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        # Also the group: forked children (socat's, conserver's) may outlive the leader.
        proc.signal_group(signal.SIGKILL)
        if proc.alive():
            proc.popen.wait()
        if proc._log_file is not None:
            proc._log_file.close()
        with contextlib.suppress(ValueError):
            Managed.registry.remove(proc)


def stop_all() -> None:
    stop_many(list(Managed.registry), timeout=3.0)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every live process below them."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    seen: list[int] = []
    todo = [r for r in roots if Path(f"/proc/{r}").exists()]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def _task_runtime_ns(pid: int) -> int | None:
    """On-CPU time of every thread of ``pid``, in ns, from the scheduler's own counter."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        except (OSError, ValueError, IndexError):
            return None
    return total


def cpu_seconds(roots: list[int]) -> float:
    """CPU time used so far by ``roots`` and their descendants.

    From each thread's ``schedstat`` (ns, exact): the utime/stime of /proc/PID/stat
    are truncated to 10 ms per process, which makes hundreds of small processes (one
    socat per console, conserver's children) look free.  Falls back to utime+stime
    (+ reaped children) when schedstat is missing.
    """
    total_ns = 0
    for pid in descendants(roots):
        runtime = _task_runtime_ns(pid)
        if runtime is None:
            fields = _stat_fields(pid)
            if fields is not None:
                # After the ')': state ppid ... utime(11) stime(12) cutime(13) cstime(14).
                ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
                total_ns += ticks * 1_000_000_000 // CLK_TCK
            continue
        total_ns += runtime
    return total_ns / 1e9


@dataclass
class Memory:
    processes: int = 0
    rss_kib: int = 0
    pss_kib: int = 0
    pss_anon_kib: int = 0
    pss_file_kib: int = 0
    # PSS of the mappings of files whose name ends with ``mapped_suffix``: for
    # serialmuxd, its ring logs (every page the guest wrote, and nothing else, is
    # resident in them).
    pss_mapped_kib: int = 0


def memory(roots: list[int], mapped_suffix: str = "") -> Memory:
    mem = Memory()
    for pid in descendants(roots):
        if mapped_suffix:
            mem.pss_mapped_kib += mapped_pss_kib(pid, mapped_suffix)
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        mem.processes += 1
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            value = rest.split()
            if not value:
                continue
            kib = int(value[0])
            if key == "Rss":
                mem.rss_kib += kib
            elif key == "Pss":
                mem.pss_kib += kib
            elif key == "Pss_Anon":
                mem.pss_anon_kib += kib
            elif key == "Pss_File":
                mem.pss_file_kib += kib
    return mem


def mapped_pss_kib(pid: int, suffix: str) -> int:
    """Summed PSS of a process's mappings of files named ``*suffix`` (from smaps)."""
    total = 0
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=6)
                if "-" in first[0] and len(first) >= 5 and ":" in first[3]:
                    # A mapping's header line: range perms offset dev inode [path]
                    inside = len(first) == 6 and first[5].rstrip("\n").endswith(suffix)
                elif inside and first[0] == "Pss:":
                    total += int(first[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return total


def listening_tcp_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(name).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # TCP_LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def listening_unix_paths() -> set[str]:
    paths: set[str] = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
        if len(parts) >= 8 and parts[3] == "00010000":
            paths.add(parts[7])
    return paths


def free_port_range(count: int, start: int = 20000, end: int = 32768) -> int:
    """A base port such that base..base+count-1 has no listener now (below the
    ephemeral range, so client connections never take one of them)."""
    busy = listening_tcp_ports()
    base = start
    while base + count < end:
        clash = [p for p in busy if base <= p < base + count]
        if not clash:
            return base
        base = max(clash) + 1
    raise RuntimeError(f"no free range of {count} TCP ports")
