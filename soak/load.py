"""Load soak: many consoles at 115200 baud, a client on each, takeovers all along.

Runs ``serialmuxd run`` as a child process with N ``demo:?rate=R&boot=0``
consoles (numbered 64-byte lines at R bytes a second each) and attaches one
client per console from this single asyncio process: even consoles get an
interactive WebSocket session, odd ones a watcher.  Meanwhile T new
interactive sessions a second take over random even consoles (the old one is
told ``taken_over`` and closed 4001).  Every client checks its own stream as
it arrives: numbered lines, consecutive, from its first whole line to its
last, and each line at the ring offset the other clients of that console saw
for it.  The daemon's RSS and PSS are sampled throughout.

Bounded: ``--duration`` (default 60 s, at most 3600), then SIGTERM, whose exit
status and time are reported too.  Prints a summary; exits 1 when a client
that kept reading lost or repeated a byte, or the daemon misbehaved.

    .venv/bin/python soak/load.py                      # 1,000 consoles, 60 s
    .venv/bin/python soak/load.py --consoles 100 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

LINE = 64  # bytes of one demo rate line: "%010d " + 51 letters + "\r\n"
LINE_RE = re.compile(rb"\d{10} [A-Za-z]{51}\r\n")


@dataclass
class Stream:
    """One client's view: checks numbered lines per chunk in O(1) (first and last line of
    each run of whole lines, and the count between them)."""

    console: str
    kind: str  # "session" or "watch"
    offset: int = 0  # ring offset of the next byte to arrive
    expect: int | None = None  # number of the next whole line, once in step
    pending: bytes = b""
    lines: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    end: str = "open"

    def start(self, offset: int) -> None:
        self.offset = offset

    def feed(self, data: bytes, bases: dict[str, int]) -> None:
        self.bytes += len(data)
        buf = self.pending + data
        at = self.offset - len(self.pending)  # ring offset of buf[0]
        self.offset += len(data)
        if self.expect is None:
            m = LINE_RE.search(buf)
            if m is None:
                self.pending = buf[-LINE:]
                return
            number = int(buf[m.start() : m.start() + 10])
            base = at + m.start() - number * LINE
            known = bases.setdefault(self.console, base)
            if known != base:
                self.errors.append(
                    f"line {number} at offset {at + m.start()}, expected at {known + number * LINE}"
                )
            self.expect = number
            at += m.start()
            buf = buf[m.start() :]
        k = len(buf) // LINE
        if k:
            first, last = buf[:LINE], buf[(k - 1) * LINE : k * LINE]
            ok = LINE_RE.fullmatch(first) and LINE_RE.fullmatch(last)
            if not ok or int(first[:10]) != self.expect or int(last[:10]) != self.expect + k - 1:
                self.errors.append(
                    f"at offset {at}: expected lines {self.expect}..{self.expect + k - 1}, "
                    f"got {first[:10]!r}..{last[:10]!r}"
                )
                self.expect = None  # resynchronise on the next chunk
                self.pending = b""
                return
            self.expect += k
            self.lines += k
        self.pending = buf[k * LINE :]


@dataclass
class Totals:
    streams: list[Stream] = field(default_factory=list)
    bases: dict[str, int] = field(default_factory=dict)
    takeovers: int = 0
    takeover_failures: int = 0
    connect_failures: int = 0


async def run_client(
    http: aiohttp.ClientSession, url: str, st: Stream, totals: Totals, ready: asyncio.Event | None
) -> None:
    mode = "?mode=watch" if st.kind == "watch" else ""
    try:
        async with http.ws_connect(f"{url}/api/v1/consoles/{st.console}/session{mode}", heartbeat=None) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    st.feed(msg.data, totals.bases)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "hello":
                        st.start(int(m["replay_start"]))
                        if ready is not None:
                            ready.set()
                    elif m["type"] == "taken_over":
                        st.end = "taken_over"
            if st.end == "open":
                st.end = f"closed {ws.close_code}"
    except (aiohttp.ClientError, OSError) as e:
        st.end = f"error {type(e).__name__}"
        totals.connect_failures += 1
        if ready is not None:
            ready.set()


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drift_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in MiB a minute."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60 / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def metric_sum(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        text = await (await s.get(url + "/metrics")).text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def start_daemon(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], Path, str]:
    """Write the config and start ``serialmuxd run``; returns (process, work dir, URL)."""
    work = Path(args.state_dir or tempfile.mkdtemp(prefix="smx-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    names = [f"load{i:04d}" for i in range(args.consoles)]
    cfg = work / "soak.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{work}/state"\nlog_format = "json"\n'
        f'[http]\nlisten = ["127.0.0.1:{port}"]\n'
        f"[defaults]\nring_bytes = {args.ring_bytes}\n"
        + "".join(f'[[console]]\nname = "{n}"\nuart = "demo:?rate={args.rate}&boot=0"\n' for n in names)
    )
    with open(work / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)], stdout=log, stderr=log
        )
    return proc, work, f"http://127.0.0.1:{port}"


async def soak(args: argparse.Namespace, proc: subprocess.Popen[bytes], work: Path, url: str) -> int:
    names = [f"load{i:04d}" for i in range(args.consoles)]
    t_start = time.monotonic()
    totals = Totals()
    samples: list[tuple[float, int, int]] = []
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    if (await s.get(url + "/readyz")).status == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("the daemon did not become ready", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.1)
        startup_s = time.monotonic() - t_start
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
            tasks: set[asyncio.Task[None]] = set()
            gate = asyncio.Semaphore(64)

            async def attach(name: str, kind: str) -> None:
                async with gate:
                    st = Stream(name, kind)
                    totals.streams.append(st)
                    ready = asyncio.Event()
                    tasks.add(asyncio.create_task(run_client(http, url, st, totals, ready)))
                    await asyncio.wait_for(ready.wait(), 30)

            t0 = time.monotonic()
            await asyncio.gather(
                *(attach(n, "session" if i % 2 == 0 else "watch") for i, n in enumerate(names))
            )
            attach_s = time.monotonic() - t0
            cpu0 = cpu_seconds(proc.pid)
            t_run = time.monotonic()
            end = t_run + args.duration
            interactive = names[0::2]
            next_takeover = t_run
            next_sample = t_run
            while (now := time.monotonic()) < end:
                if proc.poll() is not None:
                    print(f"the daemon exited with {proc.returncode} during the soak", file=sys.stderr)
                    return 1
                if now >= next_sample:
                    rss, pss = rss_pss(proc.pid)
                    samples.append((now - t_run, rss, pss))
                    next_sample += args.sample_s
                while next_takeover <= now and args.takeovers > 0:
                    st = Stream(random.choice(interactive), "session")
                    totals.streams.append(st)
                    tasks.add(asyncio.create_task(run_client(http, url, st, totals, None)))
                    totals.takeovers += 1
                    next_takeover += 1 / args.takeovers
                done = {t for t in tasks if t.done()}
                tasks -= done
                await asyncio.sleep(0.02)
            run_s = time.monotonic() - t_run
            cpu = cpu_seconds(proc.pid) - cpu0
            rss, pss = rss_pss(proc.pid)
            samples.append((run_s, rss, pss))
            drops = await metric_sum(url, "serialmuxd_session_drops_total")
            rx = await metric_sum(url, "serialmuxd_uart_rx_bytes_total")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            stop_s = time.monotonic() - t0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # --- the summary -------------------------------------------------------------------
    streams = totals.streams
    bad = [s for s in streams if s.errors]
    taken = [s for s in streams if s.end == "taken_over"]
    dropped = [s for s in streams if s.end.startswith("closed 4009")]
    received = sum(s.bytes for s in streams)
    lines = sum(s.lines for s in streams)
    expected = args.consoles * args.rate * run_s
    warm = [x for x in samples if x[0] >= args.warmup]
    text = (work / "daemon.log").read_text(errors="replace")
    tracebacks = text.count("Traceback")
    p = print
    p("serialmuxd load soak")
    p(
        f"  consoles            {args.consoles} x demo:?rate={args.rate} (= {args.consoles * args.rate / 1e6:.2f} MB/s)"
    )
    p(
        f"  clients             {args.consoles // 2 + args.consoles % 2} interactive + {args.consoles // 2} watchers"
    )
    p(f"  start-up            daemon ready in {startup_s:.1f} s, clients attached in {attach_s:.1f} s")
    p(f"  run                 {run_s:.1f} s, {totals.takeovers} takeovers ({totals.takeovers / run_s:.1f}/s)")
    p(f"  guest output        {rx / 1e6:.1f} MB read from the UARTs (all consoles, whole life)")
    p(
        f"  delivered           {received / 1e6:.1f} MB to clients ({received / run_s / 1e6:.2f} MB/s; "
        f"expected about {expected / run_s / 1e6:.2f} MB/s)"
    )
    p(f"  lines checked       {lines} numbered lines in {len(streams)} client streams")
    p(f"  streams with a gap  {len(bad)}")
    for s in bad[:10]:
        p(f"      {s.console} {s.kind} ({s.end}): {s.errors[0]}")
    p(f"  ended by takeover   {len(taken)} (taken_over then 4001)")
    p(f"  dropped too_slow    {len(dropped)} (server metric: {drops:.0f} drops)")
    p(f"  connect failures    {totals.connect_failures}")
    p(f"  daemon CPU          {cpu:.1f} s in {run_s:.1f} s ({100 * cpu / run_s:.0f}% of one core)")
    p("  daemon memory       t(s)    RSS(MiB)  PSS(MiB)")
    for t, r, q in samples[:: max(1, len(samples) // 12)] + ([samples[-1]] if samples else []):
        p(f"                      {t:6.1f}  {r / 1024:8.1f}  {q / 1024:8.1f}")
    if len(warm) >= 2:
        rs = [r for _, r, _ in warm]
        ps = [q for _, _, q in warm]
        slope = drift_mib_per_min([(t, r) for t, r, _ in warm])
        p(
            f"  after warm-up ({args.warmup:.0f} s)  RSS {min(rs) / 1024:.1f}..{max(rs) / 1024:.1f} MiB, "
            f"PSS {min(ps) / 1024:.1f}..{max(ps) / 1024:.1f} MiB, drift {slope:+.2f} MiB/min"
        )
    p(f"  SIGTERM             exit status {code} in {stop_s:.2f} s")
    p(f"  daemon log          {tracebacks} tracebacks")
    p(f"  state               {work}" + ("" if args.state_dir or args.keep else " (removed)"))
    failed = bool(bad) or code != 0 or tracebacks > 0 or totals.connect_failures > 0
    p("  verdict             " + ("FAIL" if failed else "ok: no byte lost to any client that kept reading"))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--consoles", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=11520, help="bytes a second per console (default 11520)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load after attaching (max 3600)")
    ap.add_argument("--takeovers", type=float, default=20.0, help="new interactive sessions a second")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before memory should be flat")
    ap.add_argument("--sample-s", type=float, default=2.0, help="memory sample interval")
    ap.add_argument("--ring-bytes", type=int, default=65536)
    ap.add_argument(
        "--state-dir", default="", help="where the config, rings and log go (default: a temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, rings, daemon log)")
    args = ap.parse_args()
    if not (1 <= args.consoles <= 5000 and 1 <= args.duration <= 3600 and 0 <= args.takeovers <= 200):
        ap.error("--consoles 1..5000, --duration 1..3600, --takeovers 0..200")
    proc, work, url = start_daemon(args)
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(soak(args, proc, work, url))
        return uvloop.run(soak(args, proc, work, url))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not args.state_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
