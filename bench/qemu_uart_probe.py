"""How a real QEMU guest's 16550 output reaches a socket chardev.

Boots the test guest (tests/guest.py: TCG, busybox, `guest# ` prompt), starts
`seq 1 20000`, leaves the UART socket unread for 1 s and prints how many bytes
waited in it, then counts QEMU's send calls with `strace -c` for 2 s of reading.
Measured on this project's machines: 278 bytes waited (each byte is its own
send, so the socket fills after a few hundred), and 21,062 `sendmsg` calls for
21,339 bytes read.  That is why serialmuxd reads every UART as data arrives and
batches only the writes to clients (`coalesce_ms`, docs/DESIGN.md).

    .venv/bin/python bench/qemu_uart_probe.py      # needs qemu-system-x86, strace
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.guest import QemuGuest


def drain(sock: socket.socket) -> bytes:
    got = bytearray()
    sock.setblocking(False)
    try:
        while True:
            part = sock.recv(1 << 20)
            if not part:
                break
            got += part
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return bytes(got)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="qprobe-", dir="/tmp") as wd:
        guest = QemuGuest(Path(wd), name="qprobe", qmp=False, wait=False)
        guest.start()
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(guest.uart_path))
            sock.settimeout(60)
            seen = b""
            deadline = time.monotonic() + 60
            while b"guest# " not in seen and time.monotonic() < deadline:
                seen += sock.recv(65536)
            time.sleep(0.5)
            drain(sock)
            sock.sendall(b"seq 1 20000\r")
            time.sleep(1.0)
            print(f"bytes waiting after 1 s unread: {len(drain(sock))}")
            assert guest.pid is not None
            strace = subprocess.Popen(["strace", "-f", "-c", "-p", str(guest.pid)], stderr=subprocess.PIPE)
            time.sleep(0.5)
            n, t = 0, time.monotonic()
            while time.monotonic() - t < 2:
                n += len(sock.recv(65536))
            strace.terminate()
            err = strace.communicate(timeout=10)[1].decode()
            print(f"bytes read in 2 s: {n}")
            for line in err.splitlines():
                if "calls" in line or "sendmsg" in line or " write" in line:
                    print(line)
        finally:
            guest.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
