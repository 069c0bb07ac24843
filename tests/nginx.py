"""A real nginx started by a test (daemon off, its own prefix dir), stopped at teardown."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def nginx_binary() -> str:
    """Path of nginx, or skip the test with the package to install."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if exe is None:
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    return exe


def run_user() -> str:
    # As root, nginx's workers would switch to "nobody", who cannot enter tmp_path.
    return "user root;" if os.geteuid() == 0 else ""


class Nginx:
    """Owns the nginx processes a test starts; ``stop()`` ends them all."""

    def __init__(self) -> None:
        self.exe = nginx_binary()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, root: Path, conf_text: str, port: int) -> None:
        """Write ``conf_text`` to ``root/nginx.conf``, start nginx, wait until ``port`` accepts."""
        conf = root / "nginx.conf"
        conf.write_text(conf_text)
        proc = subprocess.Popen(
            [self.exe, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (root / "error.log").read_text() if (root / "error.log").exists() else ""
                raise RuntimeError(f"nginx did not start: {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
