"""The package as a user gets it: `python -m build`, `pip install` into a fresh venv, `serialmuxd demo`."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_systemd import free_port, http_status, wait_ready

# What the web page and the demo need at run time, as paths inside the wheel.
RUNTIME_FILES = (
    "serialmuxd/static/vendor/xterm.js",
    "serialmuxd/static/vendor/xterm.css",
    "serialmuxd/static/vendor/addon-fit.js",
    "serialmuxd/static/vendor/LICENSE.xterm",
    "serialmuxd/static/templates/console.html",
    "serialmuxd/static/templates/login.html",
    "serialmuxd/static/console.js",
    "serialmuxd/static/list.js",
    "serialmuxd/static/app.css",
    "serialmuxd/backends/demo.py",
    "serialmuxd/backends/demoshell.py",
    "serialmuxd/py.typed",
)


def _copy_tree(dst: Path) -> None:
    """The files `python -m build` reads, without caches or another build's leftovers
    (and without writing build/ or *.egg-info into the shared working tree)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    shutil.copytree(REPO / "src", dst / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)


def _clean_env() -> dict[str, str]:
    """The user's environment minus anything that would import the source tree instead."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_carries_web_assets_and_demo_and_runs_demo_from_a_fresh_venv(tmp_path: Path) -> None:
    """`python -m build` makes an sdist and a wheel holding the static files (xterm.js included)
    and the demo guest; `pip install` of the wheel into a new venv gives a `serialmuxd` command
    whose `demo` serves the API, the list page, a console page and the vendored terminal."""
    vendor = REPO / "src/serialmuxd/static/vendor/xterm.js"
    assert vendor.exists(), "web assets missing: run scripts/build-web.sh (scripts/setup.sh does)"
    tree = tmp_path / "tree"
    _copy_tree(tree)
    dist = tmp_path / "dist"
    env = _clean_env()
    r = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(tree)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    wheels = list(dist.glob("serialmuxd-*.whl"))
    sdists = list(dist.glob("serialmuxd-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())

    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    missing = [f for f in RUNTIME_FILES if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "serialmuxd = serialmuxd.cli:main" in entry_points
    with tarfile.open(sdists[0]) as t:
        sdist_names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert "src/serialmuxd/static/vendor/xterm.js" in sdist_names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    r = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(wheels[0])],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import serialmuxd; print(serialmuxd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree

    port = free_port()
    proc = subprocess.Popen(
        [
            str(venv / "bin/serialmuxd"),
            "demo",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "demo-state"),
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "demo.log", "wb"),  # noqa: SIM115
        cwd=tmp_path,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for raw in stdout:
            lines.put(raw.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        token = ""
        banner = ""
        while not token:
            banner += lines.get(timeout=20)
            m = re.search(r"token \(owner of every console\): (smx_\S+)", banner)
            token = m.group(1) if m else ""
        assert f"{url}/" in banner
        auth = {"Authorization": f"Bearer {token}"}
        req = urllib.request.Request(url + "/api/v1/consoles", headers=auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            consoles = json.load(resp)["consoles"]
        assert [c["name"] for c in consoles] == ["demo1", "demo2", "demo3"]
        req = urllib.request.Request(url + "/", headers=auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "serialmuxd" in resp.read().decode()
        assert http_status(url + "/console/demo1", auth) == 200
        assert http_status(url + "/static/vendor/xterm.js", auth) == 200
        assert (
            http_status(url + "/api/v1/consoles/demo1/wait?pattern=demo%23&start=0&timeout_s=10", auth) == 200
        )
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the banner says
        assert proc.wait(15) == 0, (tmp_path / "demo.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
