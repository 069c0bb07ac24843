"""Side-by-side benchmark of serialmuxd against ser2net, conserver, conman and socat.

    .venv/bin/python bench/run.py                       # everything, 3 repetitions
    .venv/bin/python bench/run.py --quick --targets direct,socat
    .venv/bin/python bench/run.py --targets peers --workloads latency,throughput

Each repetition runs every (workload, case) on every target in turn, so the peers and
serialmuxd are interleaved and a noisy machine affects all of them alike.  Every
measurement is printed as one JSON line (and appended to bench/out/results.jsonl);
at the end come the medians, as JSON lines and as a markdown table with ratios of
serialmuxd to each peer.  See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocking import Closed, Conn, echo_round_trips
from procs import Managed, cpu_seconds, memory, stop_all, stop_many
from targets import PEERS, REPO, TARGETS, Setup, Target, missing_tools, serialmuxd_command, tool_versions

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
WORKLOADS = ("latency", "throughput", "scale", "takeover")


class CaseError(Exception):
    """A run that could not be measured; recorded with its reason, the rest goes on."""


# ---------------------------------------------------------------------------- helpers


class LineReader:
    """Reads JSON lines from a child's stdout pipe with a timeout."""

    def __init__(self, fd: int, what: str):
        self.fd = fd
        self.what = what
        self.buf = b""

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                raise CaseError(f"{self.what}: no answer within {timeout:.0f} s")
            data = os.read(self.fd, 1 << 20)
            if not data:
                raise CaseError(f"{self.what}: exited")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result


class FakeVmProc:
    def __init__(self, workdir: Path, groups: list[tuple[str, int]], opts: Options):
        self.dir = workdir / "uarts"
        argv = [PYTHON, str(BENCH / "fakevm.py"), "--dir", str(self.dir)]
        argv += ["--rate", str(opts.rate), "--tick-ms", str(opts.tick_ms)]
        for mode, count in groups:
            argv += ["--uarts", f"{mode}:{count}"]
        self.count = sum(c for _, c in groups)
        self.proc = Managed(argv, workdir / "fakevm.log", stdout=-1)
        assert self.proc.popen.stdout is not None
        ready = b""
        deadline = time.monotonic() + 30 + self.count / 500
        while not ready.endswith(b"\n"):
            r, _, _ = select.select([self.proc.popen.stdout], [], [], 1.0)
            if r:
                chunk = os.read(self.proc.popen.stdout.fileno(), 4096)
                if not chunk:
                    raise CaseError(f"fakevm exited: {self.proc.log_tail()}")
                ready += chunk
            if time.monotonic() > deadline:
                raise CaseError("fakevm did not start")
        self.paths = [self.dir / f"uart-{i:04d}.sock" for i in range(self.count)]

    def ask(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.dir / "ctl.sock"))
            sock.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                part = sock.recv(1 << 20)
                if not part:
                    break
                data += part
        result: dict[str, Any] = json.loads(data)
        return result

    def summary(self) -> dict[str, Any]:
        return self.ask("summary")

    def stop(self) -> None:
        self.proc.stop()


class LoadClientProc:
    """``loadclient.py`` with many endpoints; ``snap`` returns its counters."""

    def __init__(
        self,
        workdir: Path,
        endpoints: list[dict[str, Any]],
        deadline_s: float,
        check: bool = True,
        parallel: int = 100,
    ):
        self.count = len(endpoints)
        self.proc = Managed(
            [PYTHON, str(BENCH / "loadclient.py")],
            workdir / f"loadclient-{uuid.uuid4().hex[:6]}.log",
            stdin=-1,
            stdout=-1,
        )
        assert self.proc.popen.stdin is not None and self.proc.popen.stdout is not None
        self.stdin = self.proc.popen.stdin
        self.reader = LineReader(self.proc.popen.stdout.fileno(), "loadclient")
        spec = {"endpoints": endpoints, "check": check, "deadline_s": deadline_s, "parallel": parallel}
        self.stdin.write(json.dumps(spec).encode() + b"\n")
        self.stdin.flush()
        self.started = self.reader.read(30)

    def snap(self) -> dict[str, Any]:
        self.stdin.write(b"snap\n")
        self.stdin.flush()
        return self.reader.read(60)

    def wait_attached(self, deadline: float) -> dict[str, Any]:
        """Poll until every client got a first byte, or the deadline; returns the last snap."""
        while True:
            snap = self.snap()
            if snap["attached"] >= self.count or time.monotonic() > deadline:
                return snap
            time.sleep(0.05 if self.count < 1000 else 0.2)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdin.write(b"quit\n")
            self.stdin.flush()
        with contextlib.suppress(Exception):
            self.proc.popen.wait(10)
        self.proc.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = q * (len(ordered) - 1)
    low = int(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


@dataclass
class Ready:
    """When a started server was ready, in seconds from its start."""

    s: float  #: serving and (if eager) every UART connected: the start-up figure
    serving_s: float  #: first answer to its readiness probe
    connected_s: float  #: the fake VM had accepted every UART (0 when not eager)


def wait_ready(target: Target, vm: FakeVmProc, consoles: int, timeout: float) -> Ready:
    """Wait until the server serves (and, if eager, has every UART); when each happened."""
    started = target.procs[0].started_at if target.procs else time.monotonic()
    deadline = time.monotonic() + timeout
    poll = 0.01 if consoles <= 100 else 0.05
    serving_s = connected_s = None
    while time.monotonic() < deadline:
        failure = target.failed()
        if failure:
            raise CaseError(failure)
        if serving_s is None and target.ready():
            serving_s = time.monotonic() - started
        if connected_s is None and (not target.eager or vm.summary()["connected"] >= consoles):
            connected_s = time.monotonic() - started if target.eager else 0.0
        if serving_s is not None and connected_s is not None:
            return Ready(max(serving_s, connected_s), serving_s, connected_s)
        time.sleep(poll)
    connected = vm.summary()["connected"]
    raise CaseError(f"{target.name} not ready after {timeout:.0f} s ({connected}/{consoles} UARTs connected)")


@dataclass
class Window:
    """Counters at the two ends of a measurement window."""

    t: float
    cpu: float
    client: dict[str, Any] | None
    vm: dict[str, Any]


def window_point(target: Target, vm: FakeVmProc, client: LoadClientProc | None) -> Window:
    return Window(
        time.monotonic(),
        cpu_seconds(target.server_roots()),
        client.snap() if client else None,
        vm.summary(),
    )


# ---------------------------------------------------------------------------- workloads


@dataclass
class Options:
    targets: list[str]
    workloads: list[str]
    reps: int
    quick: bool
    latency_n: int
    warmup: int
    busy_mode: str
    duration: float
    scale_sizes: list[int]
    scale_duration: float
    takeover_duration: float
    takeover_rate: float
    rate: float
    tick_ms: float
    attach_timeout: float
    start_timeout: float
    peer_logs: bool
    out: Path
    keep: bool
    interactive_peers: bool = True
    smx_settings: list[str] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    tmp: Path = field(default_factory=lambda: Path("/var/tmp"))
    smx_install: str = "wheel"
    runtime_root: Path = field(default_factory=lambda: Path("/dev/shm"))
    smx_command: list[str] = field(default_factory=list)


@dataclass
class Case:
    workload: str
    case: str
    consoles: int
    params: dict[str, Any]


def cases(opts: Options) -> list[Case]:
    out: list[Case] = []
    if "latency" in opts.workloads:
        out.append(Case("latency", "alone", 1, {"busy": 0}))
        if not opts.quick:
            out.append(Case("latency", f"busy64-{opts.busy_mode}", 65, {"busy": 64}))
    if "throughput" in opts.workloads:
        for k in [1] if opts.quick else [1, 16]:
            out.append(Case("throughput", f"flood{k}", k, {}))
    if "scale" in opts.workloads:
        for n in opts.scale_sizes:
            out.append(Case("scale", f"n{n}", n, {}))
    if "takeover" in opts.workloads:
        out.append(Case("takeover", "replay4096", 1, {}))
    return out


def run_latency(target: Target, case: Case, opts: Options, wd: Path) -> dict[str, Any]:
    busy = int(case.params["busy"])
    groups = [("echo", 1)] + ([(opts.busy_mode, busy)] if busy else [])
    with running(target, groups, opts, wd) as (_vm, _ready):
        client = None
        if busy:
            endpoints = [target.endpoint(i, "load") for i in range(1, busy + 1)]
            client = LoadClientProc(wd, endpoints, opts.attach_timeout, parallel=target.attach_parallel)
            snap = client.wait_attached(time.monotonic() + opts.attach_timeout)
            if snap["attached"] < busy:
                raise CaseError(f"only {snap['attached']}/{busy} busy consoles attached")
        conn = Conn(target.endpoint(0, "interactive" if opts.interactive_peers else "load"))
        try:
            conn.settle()
            echo_round_trips(conn, opts.warmup)
            cpu0, t0 = cpu_seconds(target.server_roots()), time.monotonic()
            times, stray = echo_round_trips(conn, opts.latency_n)
            cpu1, t1 = cpu_seconds(target.server_roots()), time.monotonic()
        finally:
            conn.close()
            if client:
                busy_snap = client.snap()
                client.stop()
        us = [t / 1000 for t in times]
        metrics = {
            "p50_us": percentile(us, 0.5),
            "p90_us": percentile(us, 0.9),
            "p99_us": percentile(us, 0.99),
            "mean_us": statistics.fmean(us),
            "max_us": max(us),
            "round_trips": len(us),
            "stray_bytes": stray,
            "server_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        }
        if client:
            metrics["busy_errors"] = busy_snap["errors"]
        return metrics


def run_throughput(target: Target, case: Case, opts: Options, wd: Path) -> dict[str, Any]:
    k = case.consoles
    with running(target, [("flood", k)], opts, wd) as (vm, _ready):
        purpose = "interactive" if opts.interactive_peers else "load"
        client = LoadClientProc(wd, [target.endpoint(i, purpose) for i in range(k)], 30)
        try:
            snap = client.wait_attached(time.monotonic() + 30)
            if snap["attached"] < k:
                raise CaseError(f"only {snap['attached']}/{k} flood clients attached: {snap['notes']}")
            time.sleep(0.5)
            a = window_point(target, vm, client)
            time.sleep(opts.duration)
            b = window_point(target, vm, client)
        finally:
            client.stop()
    assert a.client is not None and b.client is not None
    seconds = b.t - a.t
    delivered = sum(b.client["bytes"]) - sum(a.client["bytes"])
    drained = b.vm["produced"] - a.vm["produced"]
    cpu = b.cpu - a.cpu
    mb = delivered / 1e6
    return {
        "mb_s": mb / seconds,
        "uart_mb_s": drained / 1e6 / seconds,
        "cpu_ms_per_mb": 1000 * cpu / mb if mb else float("nan"),
        "server_cpu_pct": 100 * cpu / seconds,
        "client_cpu_pct": 100 * (b.client["cpu_s"] - a.client["cpu_s"]) / seconds,
        "errors": b.client["errors"],
        "closed_sessions": b.client["closed"],
    }


def paused_point(target: Target, vm: FakeVmProc, client: LoadClientProc) -> Window:
    """Stop the printing, let what is in flight arrive, read the counters, resume."""
    vm.ask("pause")
    time.sleep(SETTLE_S)
    point = Window(time.monotonic(), 0.0, client.snap(), vm.summary())
    vm.ask("resume")
    point.cpu = cpu_seconds(target.server_roots())
    return point


SETTLE_S = 0.3
# serialmuxd's default ring_bytes, and the ring file's header page plus its first
# time-index page (one entry a second fills a 4 KiB page in ~4 minutes).
RING_DATA_KIB = 1024
RING_META_KIB = 8


def ring_pages_kib(printed_kib: float) -> float:
    """KiB of ring-file pages a console that printed this much has touched (estimate:
    from the mean printed per console, whole 4 KiB pages)."""
    return -(-min(printed_kib, RING_DATA_KIB) // 4) * 4 + RING_META_KIB


def run_scale(target: Target, case: Case, opts: Options, wd: Path) -> dict[str, Any]:
    n = case.consoles
    with running(target, [("rate", n)], opts, wd) as (vm, ready):
        started = target.procs[0].started_at if target.procs else time.monotonic()
        client = LoadClientProc(
            wd,
            [target.endpoint(i, "load") for i in range(n)],
            opts.attach_timeout,
            parallel=target.attach_parallel,
        )
        try:
            snap = client.wait_attached(time.monotonic() + opts.attach_timeout)
            attached = snap["attached"]
            firsts = [t for t in snap["first_byte_at"] if t]
            attach_all_s = max(firsts) - started if attached == n else float("nan")
            time.sleep(1.0)
            a = paused_point(target, vm, client)
            time.sleep(opts.scale_duration)
            cpu_end, t_end = cpu_seconds(target.server_roots()), time.monotonic()
            b = paused_point(target, vm, client)
            has_server = bool(target.server_roots())
            # serialmuxd's ring logs are its *.ring files (mapped shared)
            mem = memory(target.server_roots(), ".ring" if target.family == "serialmuxd" else "")
        finally:
            client.stop()
    assert a.client is not None and b.client is not None
    nominal = n * opts.rate
    active_s = b.vm["active_s"] - a.vm["active_s"]
    seconds = t_end - a.t
    delivered = sum(b.client["bytes"]) - sum(a.client["bytes"])
    produced = b.vm["produced"] - a.vm["produced"]
    blocked = b.vm["blocked"] - a.vm["blocked"]
    metrics: dict[str, Any] = {
        # Against the line rate: a server that stops draining makes the guest stall
        # (blocked bytes), which is as much a failure as losing bytes.
        "delivered_pct": 100 * delivered / active_s / nominal,
        "delivered_of_printed_pct": 100 * delivered / produced if produced else float("nan"),
        "produced_pct": 100 * produced / active_s / nominal,
        "blocked_pct": 100 * blocked / active_s / nominal,
        "server_cpu_pct": 100 * (cpu_end - a.cpu) / seconds,
        "startup_s": ready.s,
        # Which came last: the server's own readiness, or the fake VM accepting every
        # UART (a single Python process, also printing to those it has).
        "startup_serving_s": ready.serving_s,
        "startup_uarts_connected_s": ready.connected_s,
        "attach_all_s": attach_all_s,
        "attached": attached,
        "errors": b.client["errors"],
        "closed_sessions": b.client["closed"],
        "client_cpu_pct": 100 * (b.client["cpu_s"] - a.client["cpu_s"]) / seconds,
        "fakevm_cpu_pct": 100 * (b.vm["cpu_s"] - a.vm["cpu_s"]) / seconds,
        "processes": mem.processes,
        # All each UART printed since the server connected it: for serialmuxd, the
        # ring-log bytes written, so file-backed PSS can be set against the ring
        # pages the guest has filled.
        "printed_kib_per_console": b.vm["produced"] / n / 1024,
    }
    if has_server:
        metrics |= {
            "rss_kib_per_console": mem.rss_kib / n,
            "pss_kib_per_console": mem.pss_kib / n,
            "pss_anon_kib_per_console": mem.pss_anon_kib / n,
            "pss_file_kib_per_console": mem.pss_file_kib / n,
        }
        if target.family == "serialmuxd":
            # Measured: PSS less the PSS of the ring-file mappings, which hold the
            # pages the guest has written (and the header and time-index pages).
            metrics["ring_pss_kib_per_console"] = mem.pss_mapped_kib / n
            metrics["pss_beyond_ring_kib_per_console"] = (mem.pss_kib - mem.pss_mapped_kib) / n
            # The estimate earlier rounds reported (whole pages of the mean printed),
            # kept so their numbers compare with this one.
            printed = metrics["printed_kib_per_console"]
            metrics["pss_beyond_ring_est_kib_per_console"] = mem.pss_kib / n - ring_pages_kib(printed)
    if attached < n:
        metrics["note"] = (
            f"only {attached}/{n} clients attached within {opts.attach_timeout:.0f} s: "
            + "; ".join(snap["notes"])
        )
    return metrics


def takeover_once(endpoint: dict[str, Any], previous: Conn | None) -> tuple[Conn, float, str]:
    """Attach (taking the console over); returns the new session, seconds to its first
    replayed byte, and what happened to the previous session ("" if it ended as promised).
    """
    start = time.perf_counter()
    conn = Conn(endpoint)
    conn.recv(2.0)
    first_byte = time.perf_counter() - start
    problem = ""
    if previous is not None:
        tail = b""
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                tail = (tail + previous.recv(0.5))[-400:]
            problem = "previous session still open after 2 s"
        except Closed:
            if previous.kind == "ws" and previous.close_code != 4001:
                problem = f"previous session closed with {previous.close_code}, not 4001"
            elif previous.kind == "unix" and b"session taken over by" not in tail:
                problem = "previous session closed without the taken-over line"
        except TimeoutError:
            problem = "previous session still open"
        previous.close()
    return conn, first_byte, problem


def run_takeover(target: Target, case: Case, opts: Options, wd: Path) -> dict[str, Any]:
    with running(target, [("rate", 1)], opts, wd, replay_bytes=4096) as (_vm, _ready):
        time.sleep(1.0)  # > 4 KiB of output in the ring at 11,520 B/s
        endpoint = target.endpoint(0, "interactive")
        conn: Conn | None = None
        firsts: list[float] = []
        problems: list[str] = []
        try:
            for _ in range(10 if opts.quick else 50):
                conn, first, problem = takeover_once(endpoint, conn)
                firsts.append(first)
                if problem:
                    problems.append(problem)
            # Sustained: one takeover every 1/rate s for the duration.
            period = 1.0 / opts.takeover_rate
            sustained: list[float] = []
            failures = 0
            cpu0, t0 = cpu_seconds(target.server_roots()), time.monotonic()
            next_at = t0
            while time.monotonic() - t0 < opts.takeover_duration:
                next_at += period
                try:
                    conn, first, problem = takeover_once(endpoint, conn)
                    sustained.append(first)
                    if problem:
                        failures += 1
                        problems.append(problem)
                except (OSError, TimeoutError, Closed) as exc:
                    failures += 1
                    problems.append(repr(exc))
                    conn = None
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            cpu1, t1 = cpu_seconds(target.server_roots()), time.monotonic()
        finally:
            if conn is not None:
                conn.close()
    done = len(sustained)
    return {
        "first_byte_p50_ms": 1000 * percentile(firsts, 0.5),
        "first_byte_p99_ms": 1000 * percentile(firsts, 0.99),
        "sustained_per_s": done / (t1 - t0),
        "sustained_ok_pct": 100 * (done - failures) / max(1, done + failures),
        "sustained_first_byte_p99_ms": 1000 * percentile(sustained, 0.99),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "problems": sorted(set(problems))[:5],
    }


RUNNERS: dict[str, Callable[[Target, Case, Options, Path], dict[str, Any]]] = {
    "latency": run_latency,
    "throughput": run_throughput,
    "scale": run_scale,
    "takeover": run_takeover,
}


@contextlib.contextmanager
def running(
    target: Target,
    groups: list[tuple[str, int]],
    opts: Options,
    wd: Path,
    replay_bytes: int = 0,
) -> Iterator[tuple[FakeVmProc, Ready]]:
    """The fake VM and the target, started and (whatever happens) stopped."""
    vm = FakeVmProc(wd, groups, opts)
    runtime_dir = Path(tempfile.mkdtemp(prefix="smxbench-run-", dir=opts.runtime_root))
    try:
        target.start(
            Setup(
                wd,
                vm.paths,
                replay_bytes=replay_bytes,
                peer_logs=opts.peer_logs,
                smx_settings=opts.smx_settings,
                smx_command=opts.smx_command,
                runtime_dir=runtime_dir,
            )
        )
        try:
            yield vm, wait_ready(target, vm, vm.count, opts.start_timeout)
        finally:
            target.stop()
    finally:
        vm.stop()
        # tmpfs: deleting here costs the next case nothing (unlike the ext4 work dir).
        shutil.rmtree(runtime_dir, ignore_errors=True)


def takeover_skip(target: Target) -> str:
    if target.family == "serialmuxd":
        return ""
    return (
        "no attach-with-replay to compare (ser2net and socat have no log replay; "
        "conserver and conman replay only on request)"
    )


# ---------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": tool_versions(),
    }


def emit(result: dict[str, Any], results_file: Path) -> None:
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    with results_file.open("a") as f:
        f.write(line + "\n")


TABLE_METRICS: dict[str, list[tuple[str, str]]] = {
    "latency": [
        ("p50_us", "p50 µs"),
        ("p90_us", "p90 µs"),
        ("p99_us", "p99 µs"),
        ("server_cpu_pct", "server CPU %"),
    ],
    "throughput": [
        ("mb_s", "MB/s delivered"),
        ("uart_mb_s", "MB/s drained"),
        ("cpu_ms_per_mb", "CPU ms/MB"),
        ("server_cpu_pct", "server CPU %"),
        ("errors", "stream breaks (worst run)"),
        ("closed_sessions", "clients dropped (worst run)"),
    ],
    "scale": [
        ("delivered_pct", "delivered %"),
        ("attached", "clients attached"),
        ("server_cpu_pct", "server CPU %"),
        ("pss_kib_per_console", "PSS KiB/console"),
        ("pss_beyond_ring_kib_per_console", "PSS beyond ring pages KiB/console"),
        ("pss_beyond_ring_est_kib_per_console", "(estimate of earlier rounds) KiB/console"),
        ("ring_pss_kib_per_console", "ring-file PSS KiB/console"),
        ("pss_anon_kib_per_console", "anon PSS KiB/console"),
        ("rss_kib_per_console", "RSS KiB/console"),
        ("printed_kib_per_console", "printed KiB/console"),
        ("startup_s", "start-up s"),
        ("startup_serving_s", "serving s"),
        ("attach_all_s", "all attached s"),
    ],
    "takeover": [
        ("first_byte_p50_ms", "attach→replay p50 ms"),
        ("first_byte_p99_ms", "p99 ms"),
        ("sustained_per_s", "takeovers/s"),
        ("sustained_ok_pct", "ok %"),
        ("server_cpu_pct", "server CPU %"),
    ],
}


def medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if "metrics" in r:
            if "cpu_s_per_mb" in r["metrics"]:  # results written before the unit changed
                r["metrics"]["cpu_ms_per_mb"] = 1000 * r["metrics"].pop("cpu_s_per_mb")
            if (
                "pss_beyond_ring_kib_per_console" in r["metrics"]
                and "ring_pss_kib_per_console" not in r["metrics"]
            ):
                # Written before the ring pages were measured: the figure was the estimate.
                m = r["metrics"]
                m["pss_beyond_ring_est_kib_per_console"] = m.pop("pss_beyond_ring_kib_per_console")
            grouped.setdefault((r["workload"], r["case"], r["target"]), []).append(r["metrics"])
    out = []
    for (workload, case, target), runs in grouped.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        values = {}
        for key in keys:
            numbers = [m[key] for m in runs if isinstance(m.get(key), int | float)]
            numbers = [x for x in numbers if x == x]  # NaN means "not measured"
            if not numbers:
                values[key] = float("nan")
            else:
                values[key] = max(numbers) if key in WORST else statistics.median(numbers)
        out.append(
            {
                "summary": True,
                "workload": workload,
                "case": case,
                "target": target,
                "runs": len(runs),
                "median": values,
            }
        )
    return out


# Failures are summed up by the worst run: a median would hide one bad repetition.
WORST = {"errors", "closed_sessions"}
# Counts, not rates: a ratio of them means nothing.
NO_RATIO = {"errors", "closed_sessions", "attached"}


def fmt(value: float) -> str:
    if value != value:
        return "–"
    if 0 < abs(value) < 0.001:
        return "<0.001"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown(
    summary: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    failures: dict[tuple[str, str, str], str],
    info: dict[str, Any],
    opts: Options,
) -> str:
    lines = [
        "# serialmuxd benchmark",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['nproc']} × {info['cpu_model']}, Linux {info['kernel']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- repetitions: up to {opts.reps} (medians of `runs`), targets interleaved per repetition",
        f"- rate workloads: {opts.rate:,.0f} B/s per console, fake-VM tick {opts.tick_ms:g} ms",
        "",
    ]
    by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    runs: dict[tuple[str, str, str], int] = {}
    for s in summary:
        by_case.setdefault((s["workload"], s["case"]), {})[s["target"]] = s["median"]
        runs[(s["workload"], s["case"], s["target"])] = s["runs"]
    for workload, case, _target in failures:
        by_case.setdefault((workload, case), {})
    for s in skipped:
        by_case.setdefault((s["workload"], s["case"]), {})

    def order(key: tuple[str, str]) -> tuple[int, int, str]:
        digits = "".join(c for c in key[1] if c.isdigit())
        return WORKLOADS.index(key[0]), int(digits or 0), key[1]

    for workload, case in sorted(by_case, key=order):
        per_target = by_case[(workload, case)]
        columns = TABLE_METRICS[workload]
        lines += [f"## {workload}: {case}", ""]
        failed_here = any((workload, case, t) in failures for t in opts.targets)
        if per_target or failed_here:
            lines.append("| target | " + " | ".join(label for _, label in columns) + " | runs |")
            lines.append("|---|" + "---:|" * (len(columns) + 1))
        for target in opts.targets:
            if target in per_target:
                values = per_target[target]
                cells = [fmt(values.get(key, float("nan"))) for key, _ in columns]
                cells.append(str(runs[(workload, case, target)]))
                lines.append(f"| {target} | " + " | ".join(cells) + " |")
        for target in opts.targets:
            if target not in per_target and (workload, case, target) in failures:
                reason = failures[(workload, case, target)].replace("|", "/")[:160]
                lines.append(f"| {target} | failed: {reason} |" + " |" * len(columns))
        reasons: dict[str, list[str]] = {}
        for s in skipped:
            if (s["workload"], s["case"]) == (workload, case):
                reasons.setdefault(s["skipped"], []).append(s["target"])
        for reason, names in reasons.items():
            lines += ["", f"Not run on {', '.join(names)}: {reason}."]
        for ours in ("serialmuxd-unix", "serialmuxd-ws"):
            if ours not in per_target:
                continue
            peers = [p for p in opts.targets if p in per_target and p in PEERS]
            if not peers:
                continue
            ratio_columns = [(k, label) for k, label in columns if k not in NO_RATIO]
            lines += ["", f"{ours} ÷ peer (below 1 = fewer µs/CPU/KiB/s; above 1 = more MB/s, %)", ""]
            lines.append("| peer | " + " | ".join(label for _, label in ratio_columns) + " |")
            lines.append("|---|" + "---:|" * len(ratio_columns))
            for peer in peers:
                cells = []
                for key, _ in ratio_columns:
                    mine = per_target[ours].get(key, float("nan"))
                    theirs = per_target[peer].get(key, float("nan"))
                    cells.append(f"{mine / theirs:.2f}" if theirs and theirs == theirs else "–")
                lines.append(f"| {peer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets",
        default="all",
        help="comma list of " + ", ".join(TARGETS) + "; or all, peers (default all)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians over them)")
    parser.add_argument(
        "--quick", action="store_true", help="one short repetition of each workload: a smoke run"
    )
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--busy-mode", choices=("rate", "flood"), default="rate")
    parser.add_argument("--duration", type=float, default=5.0, help="throughput window, s")
    parser.add_argument("--scale-sizes", default="100,1000,5000")
    parser.add_argument("--scale-duration", type=float, default=10.0)
    parser.add_argument("--takeover-duration", type=float, default=10.0)
    parser.add_argument("--takeover-rate", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=11520.0, help="B/s per console (rate mode)")
    parser.add_argument("--tick-ms", type=float, default=20.0)
    parser.add_argument(
        "--attach-timeout", type=float, default=120.0, help="s for every client to get a first byte"
    )
    parser.add_argument("--start-timeout", type=float, default=300.0, help="s for a server to start serving")
    parser.add_argument("--no-peer-logs", action="store_true", help="conserver/conman: no log files")
    parser.add_argument(
        "--native-peer-clients",
        action="store_true",
        help="latency/throughput: speak conserver's/conman's protocol instead of their pty clients",
    )
    parser.add_argument(
        "--smx-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="serialmuxd: add a [defaults] setting (TOML value), e.g. coalesce_ms=0; repeatable",
    )
    parser.add_argument(
        "--workdir-root",
        type=Path,
        default=Path("/var/tmp"),
        help="where each run's work directory (fake UARTs, state, logs) is made; on a disk like "
        "/var/lib, not tmpfs (default /var/tmp; see README: this machine's /tmp creates files 50x slower)",
    )
    parser.add_argument(
        "--runtime-root",
        type=Path,
        default=Path("/dev/shm"),
        help="where serialmuxd's per-console sockets go: tmpfs, as /run (RuntimeDirectory=) is "
        "for the systemd unit (default /dev/shm)",
    )
    parser.add_argument(
        "--smx-install",
        choices=("wheel", "dev"),
        default="wheel",
        help="wheel (default): run serialmuxd installed from the working tree into its own venv "
        "(OUT/venv), as a user installs it, without the test extras; dev: the repo's .venv",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument(
        "--report",
        metavar="RUN[,RUN]",
        help="measure nothing: print the tables of these runs from OUT/results.jsonl",
    )
    args = parser.parse_args(argv)
    names = args.targets.split(",")
    if names == ["all"]:
        names = list(TARGETS)
    elif names == ["peers"]:
        names = ["direct", *PEERS]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    workloads = args.workloads.split(",")
    if any(w not in WORKLOADS for w in workloads):
        parser.error(f"workloads are {WORKLOADS}")
    opts = Options(
        targets=names,
        workloads=workloads,
        reps=args.reps,
        quick=args.quick,
        latency_n=args.latency_n,
        warmup=args.warmup,
        busy_mode=args.busy_mode,
        duration=args.duration,
        scale_sizes=[int(x) for x in args.scale_sizes.split(",") if x],
        scale_duration=args.scale_duration,
        takeover_duration=args.takeover_duration,
        takeover_rate=args.takeover_rate,
        rate=args.rate,
        tick_ms=args.tick_ms,
        attach_timeout=args.attach_timeout,
        start_timeout=args.start_timeout,
        peer_logs=not args.no_peer_logs,
        out=args.out,
        keep=args.keep,
        interactive_peers=not args.native_peer_clients,
        smx_settings=args.smx_set,
        tmp=args.workdir_root,
        runtime_root=args.runtime_root,
        smx_install=args.smx_install,
        report=args.report.split(",") if args.report else [],
    )
    if opts.quick:
        opts.reps = 1
        opts.latency_n = min(opts.latency_n, 500)
        opts.warmup = min(opts.warmup, 50)
        opts.duration = min(opts.duration, 2.0)
        opts.scale_sizes = [100]
        opts.scale_duration = min(opts.scale_duration, 3.0)
        opts.takeover_duration = min(opts.takeover_duration, 2.0)
        opts.attach_timeout = min(opts.attach_timeout, 20.0)
        opts.start_timeout = min(opts.start_timeout, 30.0)
    return opts


def report(opts: Options) -> int:
    """Tables of earlier runs (several runs combine: e.g. a 5,000-console run done apart)."""
    lines = [json.loads(x) for x in (opts.out / "results.jsonl").read_text().splitlines() if x]
    mine = [r for r in lines if r.get("run") in opts.report]
    results = [r for r in mine if not r.get("summary") and ("metrics" in r or "error" in r)]
    skipped = [r for r in mine if "skipped" in r]
    if not results:
        print(f"no results for runs {opts.report} in {opts.out / 'results.jsonl'}", file=sys.stderr)
        return 1
    infos = [r["machine"] for r in mine if r.get("summary")]
    info = infos[0] if infos else machine()
    if opts.targets != list(TARGETS):  # --targets given: only those
        results = [r for r in results if r["target"] in opts.targets]
        skipped = [r for r in skipped if r["target"] in opts.targets]
    seen = {r["target"] for r in results}
    opts.targets = [t for t in TARGETS if t in seen]
    opts.reps = max(r["rep"] for r in results)
    failures = {(r["workload"], r["case"], r["target"]): r["error"] for r in results if "error" in r}
    print(markdown(medians(results), skipped, failures, info, opts))
    return 0


# Keep at least this much disk free; work directories are deleted only past it.
MIN_FREE_BYTES = 20 << 30


CLEANUP_STAMP = "smxbench-cleaned"
# ext4 avoids reusing an inode for a while after it is freed (find_inode_bit's
# recently_deleted check: 60 s, 5 min for directories' groups); creations are slow meanwhile.
CHURN_S = 360.0


def recent_cleanup(tmp: Path) -> float | None:
    """Seconds since a previous run deleted its work directories, if within CHURN_S."""
    try:
        age = time.time() - (tmp / CLEANUP_STAMP).stat().st_mtime
    except OSError:
        return None
    return age if age < CHURN_S else None


def prepare_serialmuxd(opts: Options) -> tuple[list[str], dict[str, str]]:
    """The serialmuxd command under test, and how it was installed (for the report).

    By default the working tree is installed into a venv of its own, as a user
    installs the wheel: the repo's dev venv also holds the test tools (rich,
    which structlog imports when present, is 4 MB of memory), and an editable
    install would let an edit to src/ change the daemon in the middle of a run.
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    if opts.smx_install == "dev":
        return serialmuxd_command(), {"install": "dev venv (editable)", "commit": commit}
    venv = opts.out / "venv"
    python = venv / "bin" / "python"
    quiet = {"capture_output": True, "text": True, "timeout": 900}
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, **quiet)
    print(f"installing serialmuxd from {REPO} ({commit}) into {venv} ...", file=sys.stderr)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "--no-deps", "--force-reinstall", str(REPO)], **quiet)
    probe = [str(python), "-c", "import serialmuxd.daemon"]
    if r.returncode != 0 or subprocess.run(probe, **quiet).returncode != 0:
        r = subprocess.run([*pip, str(REPO)], **quiet)  # first time, or a new dependency
    if r.returncode != 0:
        raise SystemExit(f"cannot install serialmuxd into {venv}:\n{r.stderr[-3000:]}")
    # The install just wrote and compiled thousands of files: let the disk write them
    # back now, not while the first case's daemon is creating its ring files.
    os.sync()
    time.sleep(INSTALL_SETTLE_S)
    return [str(venv / "bin" / "serialmuxd")], {"install": "wheel into its own venv", "commit": commit}


INSTALL_SETTLE_S = 5.0


def discard(wd: Path, root: Path) -> None:
    """Move a finished case's work directory aside; delete it only when disk runs short.

    Deleting thousands of files right before the next case starts makes that
    case's file creations slow: ext4 skips recently deleted inodes when it
    allocates new ones, and on these disks each create then costs ~1 ms
    instead of ~15 µs (measured: 300 creates in a directory next to a fresh
    deletion vs elsewhere on the same file system).  That is the bench
    measuring itself, so the trash is emptied at the end of the run.
    """
    trash = root / "trash"
    trash.mkdir(exist_ok=True)
    wd.rename(trash / wd.name)
    if shutil.disk_usage(root).free < MIN_FREE_BYTES:
        shutil.rmtree(trash, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.report:
        return report(opts)
    missing = missing_tools(opts.targets)
    if missing:
        print(f"missing programs (apt-get install them): {missing}", file=sys.stderr)
        return 2

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # Also when started in the background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, terminate)
    opts.out.mkdir(parents=True, exist_ok=True)
    results_file = opts.out / "results.jsonl"
    run_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    info = machine()
    if any(TARGETS[n].family == "serialmuxd" for n in opts.targets):
        opts.smx_command, info["serialmuxd"] = prepare_serialmuxd(opts)
    churn = recent_cleanup(opts.tmp)
    if churn is not None:
        info["seconds_since_last_cleanup"] = round(churn)
        print(
            f"note: the last run deleted its work directories {churn:.0f} s ago; ext4 creates files "
            "slowly for up to 6 minutes after a mass deletion, so start-up times may read high",
            file=sys.stderr,
        )
    root = Path(tempfile.mkdtemp(prefix="smxbench-", dir=opts.tmp))
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    try:
        for rep in range(1, opts.reps + 1):
            for case in cases(opts):
                for name in opts.targets:
                    target = TARGETS[name]()
                    base = {
                        "run": run_id,
                        "rep": rep,
                        "workload": case.workload,
                        "case": case.case,
                        "target": name,
                        "consoles": case.consoles,
                    }
                    if opts.smx_settings and target.family == "serialmuxd":
                        base["smx_settings"] = opts.smx_settings
                    reason = target.skip_reason(case.workload, case.consoles)
                    if case.workload == "takeover":
                        reason = reason or takeover_skip(target)
                    if reason:
                        if rep == 1:
                            skipped.append(base | {"skipped": reason})
                            emit(base | {"skipped": reason}, results_file)
                        continue
                    wd = root / f"r{rep}-{case.workload}-{case.case}-{name}"
                    wd.mkdir()
                    began = time.monotonic()
                    try:
                        metrics = RUNNERS[case.workload](target, case, opts, wd)
                        result = base | {"metrics": metrics}
                    except (CaseError, OSError, TimeoutError, Closed) as exc:
                        result = base | {"error": f"{type(exc).__name__}: {exc}"[:600]}
                        traceback.print_exc(file=sys.stderr)
                    finally:
                        stop_many(list(Managed.registry))
                        if not opts.keep:
                            discard(wd, root)
                    result["seconds"] = round(time.monotonic() - began, 2)
                    results.append(result)
                    emit(result, results_file)
    except KeyboardInterrupt:
        print("interrupted: stopping what was started", file=sys.stderr)
    finally:
        stop_all()
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
            (opts.tmp / CLEANUP_STAMP).touch()
    summary = medians(results)
    for s in summary:
        emit(s | {"run": run_id, "machine": info}, results_file)
    failures = {(r["workload"], r["case"], r["target"]): r["error"] for r in results if "error" in r}
    table = markdown(summary, skipped, failures, info, opts)
    print()
    print(table)
    (opts.out / f"summary-{run_id}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
