"""What reading many UARTs costs, by way of reading: the probe behind the read-path changes.

Starts the fake VM with N rate-mode UARTs (11,520 B/s each, one send per UART per
20 ms tick), then, one variant at a time in a fresh process, connects to every
UART on uvloop and reports the receiving process's CPU (user + system, from
``getrusage``) over a fixed window:

- ``protocol-noop``: ``asyncio.Protocol``, ``data_received`` does nothing (the floor
  for one read per chunk: epoll, the read itself, a bytes object);
- ``buffered-noop``: ``asyncio.BufferedProtocol`` into one reused buffer;
- ``protocol-ring``: ``data_received`` appends each chunk to a real ring log (what
  serialmuxd did before: bytes object, then a copy into the mapping);
- ``buffered-ring``: reads straight into the ring log's mapping
  (``RingLog.writable``/``commit``, each UART's transport reading for itself);
- ``mux-noop``: ``ReadMux`` into one reused buffer per UART (the mux's floor);
- ``mux-ring``: the same reads into the ring, through serialmuxd's ``ReadMux`` (one
  epoll set for all UARTs, at most 256 read per loop pass: what serialmuxd does now);
- ``mux-ring-warm``: ``mux-ring`` with every page of each ring written once before
  the window, so no read lands on a page the process has not touched yet: what the
  first pass through a new ring costs in page faults.

With ``--api`` each receiver also serves HTTP on 127.0.0.1 (aiohttp, one tiny
handler) on the same loop, and this script times 15 requests to it during the
window: how long the API waits behind the reading.  At 5,000 UARTs
(``--uarts 5000 --api --variants buffered-ring,mux-ring``) that is the difference
between the two ways of reading.

Variants alternate for ``--rounds`` rounds, so a noisy machine affects all of them.
Ring files go to a temporary directory under ``--ring-root`` and are removed at the
end.  Usage::

    .venv/bin/python bench/read_paths.py --uarts 1000 --rounds 2
    .venv/bin/python bench/read_paths.py --uarts 5000 --api --variants buffered-ring,mux-ring
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = (
    "protocol-noop",
    "buffered-noop",
    "protocol-ring",
    "buffered-ring",
    "mux-noop",
    "mux-ring",
    "mux-ring-warm",
)
API_REQUESTS = 15


def measure(
    variant: str, sockdir: Path, ring_dir: Path, n: int, settle_s: float, window_s: float, api_port: int
) -> float:
    import uvloop
    from aiohttp import web

    sys.path.insert(0, str(HERE.parent / "src"))
    from serialmuxd.backends.readmux import ReadMux
    from serialmuxd.ringlog import RingLog

    class RingSink:
        def __init__(self, ring: RingLog) -> None:
            self.get_buffer = ring.writable
            self.commit = ring.commit

        def buffer_updated(self, nbytes: int) -> None:
            self.commit(nbytes)

        def on_data(self, data: bytes) -> None:
            raise AssertionError("read into the ring, not handed chunks")

        def on_state(self, up: bool, reason: str) -> None:
            return

    class NoopSink(RingSink):
        def __init__(self) -> None:
            buf = memoryview(bytearray(65536))
            self.get_buffer = lambda sizehint: buf

        def buffer_updated(self, nbytes: int) -> None:
            return

    def warm(ring: RingLog) -> None:
        # Every page of the ring written once, then the log rewound: no first-touch faults.
        for _ in range(ring.capacity // 4096):
            ring.writable(-1)[:4096] = bytes(4096)
            ring.commit(4096)

    class ProtocolNoop(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            return

    class ProtocolRing(asyncio.Protocol):
        def __init__(self, ring: RingLog) -> None:
            self.append = ring.append

        def data_received(self, data: bytes) -> None:
            self.append(data)

    class BufferedNoop(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = memoryview(bytearray(65536))

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            return

    class BufferedRing(asyncio.BufferedProtocol):
        def __init__(self, ring: RingLog) -> None:
            self.get_buffer = ring.writable  # type: ignore[method-assign]
            self.commit = ring.commit

        def buffer_updated(self, nbytes: int) -> None:
            self.commit(nbytes)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def run() -> float:
        loop = asyncio.get_running_loop()
        runner: web.AppRunner | None = None
        if api_port:
            app = web.Application()
            app.router.add_get("/", hello)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", api_port).start()
        rings: list[RingLog] = []
        mux = ReadMux()
        socks: list[socket.socket] = []
        for i in range(n):
            path = str(sockdir / f"uart-{i:04d}.sock")
            if variant.startswith("mux-"):
                sink: RingSink | NoopSink = NoopSink()
                if variant != "mux-noop":
                    ring = RingLog.open(ring_dir / f"c{i}.ring", 1 << 20)
                    if variant == "mux-ring-warm":
                        warm(ring)
                    rings.append(ring)
                    sink = RingSink(ring)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                sock.setblocking(False)
                socks.append(sock)
                mux.add(sock.fileno(), sink, lambda exc: None)
                continue
            factory: Callable[[], asyncio.BaseProtocol]
            if variant.endswith("-ring"):
                ring = RingLog.open(ring_dir / f"c{i}.ring", 1 << 20)
                rings.append(ring)
                factory = (
                    (lambda r=ring: ProtocolRing(r))
                    if variant.startswith("protocol")
                    else (lambda r=ring: BufferedRing(r))
                )
            else:
                factory = ProtocolNoop if variant.startswith("protocol") else BufferedNoop
            await loop.create_unix_connection(factory, path)
        await asyncio.sleep(settle_s)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.sleep(window_s)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        if runner is not None:
            await runner.cleanup()
        mux.close()
        return 100 * ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / (t1 - t0)

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--uarts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--api", action="store_true", help="also time HTTP requests to each receiver")
    parser.add_argument("--ring-root", default="/var/tmp")
    parser.add_argument("--runtime-root", default="/dev/shm")
    parser.add_argument(
        "--child", nargs=4, metavar=("VARIANT", "SOCKDIR", "RINGDIR", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        variant, sockdir, ring_dir, port = args.child
        pct = measure(variant, Path(sockdir), Path(ring_dir), args.uarts, args.settle, args.window, int(port))
        print(f"{pct:.1f}")
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.api and args.window < 8:
        raise SystemExit("--api needs --window 8 or more (15 requests, 0.3 s apart, after 2 s)")
    sockdir = Path(tempfile.mkdtemp(prefix="smxbench-paths-", dir=args.runtime_root))
    ring_root = Path(tempfile.mkdtemp(prefix="smxbench-paths-", dir=args.ring_root))
    fakevm = subprocess.Popen(
        [sys.executable, str(HERE / "fakevm.py"), "--dir", str(sockdir), "--uarts", f"rate:{args.uarts}"],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, list[float]] = {v: [] for v in variants}
    api_ms: dict[str, list[float]] = {v: [] for v in variants}
    try:
        deadline = time.monotonic() + 30
        while len(list(sockdir.glob("uart-*.sock"))) < args.uarts:
            if time.monotonic() > deadline or fakevm.poll() is not None:
                raise SystemExit("the fake VM did not create its UART sockets within 30 s")
            time.sleep(0.2)
        for rnd in range(args.rounds):
            for v in variants:
                ring_dir = ring_root / f"{v}-{rnd}"
                ring_dir.mkdir()
                port = free_port() if args.api else 0
                prober = None
                if port:
                    prober = threading.Thread(
                        target=probe_api, args=(port, args.settle + 2, api_ms[v]), daemon=True
                    )
                    prober.start()
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--uarts",
                        str(args.uarts),
                        "--settle",
                        str(args.settle),
                        "--window",
                        str(args.window),
                        "--child",
                        v,
                        str(sockdir),
                        str(ring_dir),
                        str(port),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.settle + args.window + 120,
                    check=True,
                )
                if prober is not None:
                    prober.join(30)
                results[v].append(float(out.stdout.split()[-1]))
                print(f"round {rnd + 1} {v}: {results[v][-1]:.1f}% of a core", flush=True)
    finally:
        fakevm.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fakevm.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(ring_root, ignore_errors=True)
    print(f"\n{args.uarts} UARTs at 11,520 B/s, receiver CPU (% of a core), median of {args.rounds}:")
    for v in variants:
        vals = sorted(results[v])
        print(f"  {v:14s} {vals[len(vals) // 2]:5.1f}   (runs: {', '.join(f'{x:.1f}' for x in results[v])})")
    if args.api:
        print(f"\nHTTP request time during the window, ms ({API_REQUESTS} per run, all runs; -1 = failed):")
        for v in variants:
            vals = sorted(api_ms[v])
            if vals:
                p50, worst = vals[len(vals) // 2], vals[-1]
                print(f"  {v:14s} p50 {p50:6.0f}   max {worst:6.0f}   (n={len(vals)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def probe_api(port: int, after_s: float, out: list[float]) -> None:
    """Time API_REQUESTS GETs to the receiver, 0.3 s apart, starting ``after_s`` from now."""
    time.sleep(after_s)
    for _ in range(API_REQUESTS):
        t = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            out.append((time.monotonic() - t) * 1000)
        except OSError:
            out.append(-1)
        finally:
            connection.close()
        time.sleep(0.3)


if __name__ == "__main__":
    main()
