"""What reading 1,000 UARTs costs, by way of reading: the probe behind the ring-read change.

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
  (``RingLog.writable``/``commit``, what serialmuxd does now).

Variants alternate for ``--rounds`` rounds, so a noisy machine affects all of them.
Ring files go to a temporary directory under ``--ring-root`` and are removed at the
end.  Usage::

    .venv/bin/python bench/read_paths.py --uarts 1000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("protocol-noop", "buffered-noop", "protocol-ring", "buffered-ring")


def measure(variant: str, sockdir: Path, ring_dir: Path, n: int, settle_s: float, window_s: float) -> float:
    import uvloop

    sys.path.insert(0, str(HERE.parent / "src"))
    from serialmuxd.ringlog import RingLog

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

    async def run() -> float:
        loop = asyncio.get_running_loop()
        rings: list[RingLog] = []
        for i in range(n):
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
            await loop.create_unix_connection(factory, str(sockdir / f"uart-{i:04d}.sock"))
        await asyncio.sleep(settle_s)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.sleep(window_s)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        return 100 * ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / (t1 - t0)

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--uarts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured")
    parser.add_argument("--ring-root", default="/var/tmp")
    parser.add_argument("--runtime-root", default="/dev/shm")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SOCKDIR", "RINGDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, sockdir, ring_dir = args.child
        pct = measure(variant, Path(sockdir), Path(ring_dir), args.uarts, args.settle, args.window)
        print(f"{pct:.1f}")
        return
    sockdir = Path(tempfile.mkdtemp(prefix="smxbench-paths-", dir=args.runtime_root))
    ring_root = Path(tempfile.mkdtemp(prefix="smxbench-paths-", dir=args.ring_root))
    fakevm = subprocess.Popen(
        [sys.executable, str(HERE / "fakevm.py"), "--dir", str(sockdir), "--uarts", f"rate:{args.uarts}"],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        deadline = time.monotonic() + 30
        while len(list(sockdir.glob("uart-*.sock"))) < args.uarts:
            if time.monotonic() > deadline or fakevm.poll() is not None:
                raise SystemExit("the fake VM did not create its UART sockets within 30 s")
            time.sleep(0.2)
        for rnd in range(args.rounds):
            for v in VARIANTS:
                ring_dir = ring_root / f"{v}-{rnd}"
                ring_dir.mkdir()
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
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.settle + args.window + 120,
                    check=True,
                )
                results[v].append(float(out.stdout.split()[-1]))
                print(f"round {rnd + 1} {v}: {results[v][-1]:.1f}% of a core", flush=True)
    finally:
        fakevm.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fakevm.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(ring_root, ignore_errors=True)
    print(f"\n{args.uarts} UARTs at 11,520 B/s, receiver CPU (% of a core), median of {args.rounds}:")
    for v in VARIANTS:
        vals = sorted(results[v])
        print(f"  {v:14s} {vals[len(vals) // 2]:5.1f}   (runs: {', '.join(f'{x:.1f}' for x in results[v])})")


if __name__ == "__main__":
    main()
