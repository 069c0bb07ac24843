"""What one chunk of guest output costs the daemon's read path, per console, in one process.

N real consoles (``serialmuxd.console.Console``) on real ring log files, each
read through ``ReadMux`` from its own socket pair, in two groups: every console
*watched* (an attached session that takes what it is given, so coalescing runs
as in the daemon) and every console *unwatched* (no session: what most consoles
of a host are, most of the time).  Each round writes one 230-byte chunk to every
UART (the benchmark's fake VM prints 230 bytes per UART per 20 ms tick), then
times the mux's passes until every ring holds its chunk: the read, the ring's
bookkeeping and the console's per-chunk work, without the writes to clients
(which run between rounds, untimed).  Prints the median nanoseconds per chunk of
each group.

It measures whatever ``serialmuxd`` it imports, so two commits compare with
alternating runs from two worktrees::

    git worktree add /tmp/wt-old <commit>
    for i in 1 2 3 4 5 6; do for t in /tmp/wt-old .; do
        PYTHONPATH=$t/src .venv/bin/python bench/chunk_path.py; done; done

Ring files go to a temporary directory under ``--ring-root``, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import socket
import tempfile
import time
from pathlib import Path

import serialmuxd
from serialmuxd.backends.readmux import ReadMux
from serialmuxd.config import parse_config
from serialmuxd.console import Console, OutputBatcher
from serialmuxd.ringlog import RingLog
from serialmuxd.session import Ending, Mode, Session

CHUNK = b"x" * 230


class Taker(Session):
    def deliver(self, data: bytes) -> bool:
        return True

    def state_changed(self, state: str) -> None:
        pass

    def _close(self, ending: Ending) -> None:
        pass


async def run(consoles: int, rounds: int, ring_root: Path) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(dir=ring_root, prefix="smx-chunk-"))
    cfgs = parse_config(
        {"console": [{"name": f"c{i}", "uart": "unix:/nonexistent"} for i in range(consoles)]}, source="bench"
    ).consoles
    batcher = OutputBatcher()
    loop = asyncio.get_running_loop()
    groups: dict[str, tuple[ReadMux, list[socket.socket], list[Console]]] = {}
    keep: list[socket.socket] = []
    try:
        for group in ("watched", "unwatched"):
            mux = ReadMux()
            writers: list[socket.socket] = []
            members: list[Console] = []
            for i, cfg in enumerate(cfgs):
                ring = RingLog.open(workdir / f"{group}{i}.ring", 1 << 20)
                console = Console(cfg, ring, lambda spec, sink: None, batcher=batcher)
                if group == "watched":
                    console.attach(Taker(console=cfg.name, user="bench", peer="bench", mode=Mode.INTERACTIVE))
                ours, theirs = socket.socketpair()
                ours.setblocking(False)
                theirs.setblocking(False)
                keep += [ours, theirs]
                mux.add(ours.fileno(), console, lambda exc: None)
                writers.append(theirs)
                members.append(console)
            groups[group] = (mux, writers, members)
            assert mux._ep is not None
            loop.remove_reader(mux._ep.fileno())  # the passes below are driven by hand
        per_chunk: dict[str, list[float]] = {g: [] for g in groups}
        gc.disable()
        for _ in range(rounds):
            for group, (mux, writers, members) in groups.items():
                for w in writers:
                    w.send(CHUNK)
                target = sum(c.ring.next for c in members) + len(members) * len(CHUNK)
                t0 = time.perf_counter()
                while sum(c.ring.next for c in members) < target:
                    mux._pass()
                per_chunk[group].append((time.perf_counter() - t0) / len(members))
            await asyncio.sleep(0.02)  # the fake VM's tick: coalescing windows end in between
        gc.enable()
        return {g: sorted(v)[len(v) // 2] for g, v in per_chunk.items()}
    finally:
        batcher.close()
        for mux, _, members in groups.values():
            mux.close()
            for c in members:
                c.ring.close()
        for s in keep:
            s.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consoles", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--ring-root", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    import uvloop

    medians = uvloop.run(run(args.consoles, args.rounds, args.ring_root))
    where = serialmuxd.__file__.rsplit("/src/", 1)[0]
    print(where, " ".join(f"{g} {ns * 1e9:.0f}" for g, ns in medians.items()), "ns/chunk (median)")


if __name__ == "__main__":
    main()
