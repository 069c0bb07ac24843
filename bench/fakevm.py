"""A fake VM host: N unix-socket UARTs in one process, as QEMU's socket chardev offers them.

Each UART is a listening unix socket ``DIR/uart-NNNN.sock`` that, like QEMU's
``-chardev socket,server=on,wait=off``, serves one client at a time (it stops
accepting while a client is connected) and discards what the guest prints while no
client is connected.  Modes, per group of UARTs:

- ``echo``: bytes written to the UART come back (a guest shell with echo on).
- ``flood``: prints as fast as the client reads.
- ``rate``: prints ``--rate`` bytes/s (11,520 B/s is 115200 baud 8N1), paced by one
  ticker for all UARTs together (``--tick-ms``, 20 ms by default).  When a UART's
  socket is full the tick's bytes are not printed and are counted as ``blocked``:
  a real guest would stall on a full UART, so blocked bytes mean the server did not
  drain the UART at line rate.

The printed data is the ``stream`` module's pattern, continuous per UART, so a reader
can check it for loss and duplication.

Control: ``DIR/ctl.sock`` answers one JSON line per ``stats`` request line with the
bytes produced and received per UART (``summary``: totals only), how many UARTs
have a client, the ticker's lateness and this process's own CPU time (so a
benchmark can say where the load generator itself saturates).  ``pause`` and
``resume`` stop and restart the rate ticker's printing.

Plain non-blocking sockets with ``add_reader``/``add_writer`` callbacks, not
transports or streams: the rate ticker does one ``send`` per UART per tick and
nothing else, which is what keeps 5,000 UARTs at line rate cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script (``python bench/fakevm.py``), so its directory is on sys.path.
from stream import MAX_CHUNK, PERIOD, chunk

MODES = ("echo", "flood", "rate")
FLOOD_CHUNK = 64 * 1024
FLOOD_CHUNKS_PER_WAKEUP = 8  # fairness between flooding UARTs


def uart_path(directory: Path, index: int) -> Path:
    return directory / f"uart-{index:04d}.sock"


class Uart:
    """One UART: a listening socket and at most one connected client."""

    __slots__ = (
        "blocked",
        "connections",
        "index",
        "listener",
        "loop",
        "mode",
        "offset",
        "out_pending",
        "path",
        "produced",
        "received",
        "sock",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int, path: Path, mode: str):
        self.loop = loop
        self.index = index
        self.path = path
        self.mode = mode
        # Different start phases, so two consoles never print identical bytes at once.
        self.offset = (index * 7919) % PERIOD
        self.produced = 0
        self.received = 0
        self.blocked = 0
        self.connections = 0
        self.out_pending = b""
        self.sock: socket.socket | None = None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.sock = conn
        self.connections += 1
        # One client at a time, like QEMU: further connects wait in the backlog.
        self.loop.remove_reader(self.listener.fileno())
        self.loop.add_reader(conn.fileno(), self._readable)
        if self.mode == "flood":
            self.loop.add_writer(conn.fileno(), self._flood)

    def _disconnect(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())
        self.loop.remove_writer(sock.fileno())
        sock.close()
        self.sock = None
        self.out_pending = b""
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _readable(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect()
            return
        if not data:
            self._disconnect()
            return
        self.received += len(data)
        if self.mode != "echo":
            return
        if self.out_pending:
            self.out_pending += data
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._disconnect()
            return
        self.produced += sent
        if sent < len(data):
            self.out_pending = data[sent:]
            self.loop.add_writer(sock.fileno(), self._echo_flush)

    def _echo_flush(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            sent = sock.send(self.out_pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect()
            return
        self.produced += sent
        self.out_pending = self.out_pending[sent:]
        if not self.out_pending:
            self.loop.remove_writer(sock.fileno())

    def _flood(self) -> None:
        sock = self.sock
        assert sock is not None
        for _ in range(FLOOD_CHUNKS_PER_WAKEUP):
            try:
                sent = sock.send(chunk(self.offset, FLOOD_CHUNK))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._disconnect()
                return
            self.offset += sent
            self.produced += sent
            if sent < FLOOD_CHUNK:
                return

    def tick(self, size: int) -> None:
        """Print ``size`` bytes now (rate mode); what the socket refuses is blocked."""
        sock = self.sock
        if sock is None:
            return
        try:
            sent = sock.send(chunk(self.offset, size))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._disconnect()
            return
        self.offset += sent
        self.produced += sent
        self.blocked += size - sent

    def close(self) -> None:
        self._disconnect()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class TickStats:
    ticks: int = 0
    late_ticks: int = 0  # ticks that started more than one tick period late
    max_late_s: float = 0.0
    busy_s: float = 0.0  # wall time spent inside tick callbacks


class Ticker:
    """Paces every rate-mode UART from one timer, by absolute deadlines (no drift).

    Each tick prints what is due since the last one, so a late tick prints more and
    the long-run rate stays exact until this process runs out of CPU; ``late_ticks``
    and ``busy_s`` tell when that happens.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, uarts: list[Uart], rate: float, tick_s: float):
        self.loop = loop
        self.uarts = uarts
        self.rate = rate
        self.tick_s = tick_s
        self.stats = TickStats()
        self.start = loop.time()
        self.due = 0
        self.paused = False
        self.active_s = 0.0  # time spent printing (not paused)
        self.last_tick = self.start
        self.next_deadline = self.start + tick_s
        self.handle = loop.call_at(self.next_deadline, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        late = now - self.next_deadline
        stats = self.stats
        stats.ticks += 1
        stats.max_late_s = max(stats.max_late_s, late)
        if late > self.tick_s:
            stats.late_ticks += 1
        due = int((now - self.start) * self.rate)
        size = min(due - self.due, MAX_CHUNK)
        self.due = due
        if not self.paused:
            self.active_s += now - self.last_tick
            if size > 0:
                for uart in self.uarts:
                    uart.tick(size)
        self.last_tick = now
        stats.busy_s += self.loop.time() - now
        self.next_deadline += self.tick_s
        if self.next_deadline < self.loop.time():
            # Far behind: skip missed deadlines rather than firing back to back.
            self.next_deadline = self.loop.time() + self.tick_s
        self.handle = self.loop.call_at(self.next_deadline, self._tick)

    def cancel(self) -> None:
        self.handle.cancel()


class FakeVm:
    def __init__(self, directory: Path, groups: list[tuple[str, int]], rate: float, tick_s: float):
        self.directory = directory
        self.groups = groups
        self.rate = rate
        self.tick_s = tick_s
        self.uarts: list[Uart] = []
        self.ticker: Ticker | None = None
        self.started = time.monotonic()

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        index = 0
        for mode, count in self.groups:
            for _ in range(count):
                path = uart_path(self.directory, index)
                self.uarts.append(Uart(loop, index, path, mode))
                index += 1
        rate_uarts = [u for u in self.uarts if u.mode == "rate"]
        if rate_uarts:
            self.ticker = Ticker(loop, rate_uarts, self.rate, self.tick_s)

    def stats(self) -> dict[str, object]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        ticks = self.ticker.stats if self.ticker else TickStats()
        return {
            "uarts": len(self.uarts),
            "connected": sum(1 for u in self.uarts if u.sock is not None),
            "connections": [u.connections for u in self.uarts],
            "produced": [u.produced for u in self.uarts],
            "received": [u.received for u in self.uarts],
            "blocked": [u.blocked for u in self.uarts],
            "ticks": ticks.ticks,
            "late_ticks": ticks.late_ticks,
            "max_late_ms": round(ticks.max_late_s * 1000, 3),
            "tick_busy_s": round(ticks.busy_s, 6),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "uptime_s": time.monotonic() - self.started,
        }

    def summary(self) -> dict[str, object]:
        """Totals only: cheap enough to poll while 5,000 UARTs are starting."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "active_s": self.ticker.active_s if self.ticker else 0.0,
            "uarts": len(self.uarts),
            "connected": sum(1 for u in self.uarts if u.sock is not None),
            "produced": sum(u.produced for u in self.uarts),
            "blocked": sum(u.blocked for u in self.uarts),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "uptime_s": time.monotonic() - self.started,
        }

    def close(self) -> None:
        if self.ticker:
            self.ticker.cancel()
        for uart in self.uarts:
            uart.close()


def parse_groups(specs: list[str]) -> list[tuple[str, int]]:
    groups: list[tuple[str, int]] = []
    for spec in specs:
        mode, _, count = spec.partition(":")
        if mode not in MODES or not count.isdigit():
            raise SystemExit(f"fakevm: bad --uarts {spec!r}: want MODE:COUNT, MODE one of {MODES}")
        groups.append((mode, int(count)))
    return groups


async def serve(vm: FakeVm) -> None:
    loop = asyncio.get_running_loop()
    vm.open(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                command = line.strip().decode()
                if command == "stats":
                    writer.write(json.dumps(vm.stats()).encode() + b"\n")
                elif command == "summary":
                    writer.write(json.dumps(vm.summary()).encode() + b"\n")
                elif command in ("pause", "resume"):
                    # Rate mode only: a measurement window starts and ends with a pause,
                    # so every byte printed inside it has had time to arrive.
                    if vm.ticker:
                        vm.ticker.paused = command == "pause"
                    writer.write(json.dumps(vm.summary()).encode() + b"\n")
                elif command == "quit":
                    stop.set()
                    writer.write(b'{"ok": true}\n')
                else:
                    writer.write(json.dumps({"error": f"unknown command {command!r}"}).encode())
                    writer.write(b"\n")
                await writer.drain()
        writer.close()

    ctl_path = vm.directory / "ctl.sock"
    with contextlib.suppress(FileNotFoundError):
        ctl_path.unlink()
    server = await asyncio.start_unix_server(control, path=str(ctl_path))
    print(f"READY {len(vm.uarts)} {os.getpid()}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        vm.close()
        with contextlib.suppress(FileNotFoundError):
            ctl_path.unlink()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="directory for uart-NNNN.sock")
    parser.add_argument(
        "--uarts",
        action="append",
        default=[],
        metavar="MODE:COUNT",
        help="a group of UARTs (repeatable, numbered in order), e.g. echo:1 rate:64",
    )
    parser.add_argument("--rate", type=float, default=11520.0, help="bytes/s per rate UART")
    parser.add_argument("--tick-ms", type=float, default=20.0, help="rate ticker period")
    args = parser.parse_args(argv)
    groups = parse_groups(args.uarts or ["echo:1"])
    raise_fd_limit()
    vm = FakeVm(args.dir, groups, args.rate, args.tick_ms / 1000)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(vm))
    else:
        uvloop.run(serve(vm))


if __name__ == "__main__":
    main()
