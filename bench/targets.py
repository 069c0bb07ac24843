"""The servers under test: how each is configured, started, reached and stopped.

Every target is started by the benchmark itself, on 127.0.0.1 and unix sockets only,
pointed at the fake VM's UART sockets, and stopped by PID (see ``procs``).  A target
hands out endpoints in the form ``loadclient`` and ``blocking`` understand:

- ``load`` endpoints are for the many-console workloads and must be cheap: raw
  sockets, the WebSocket, or the peer's wire protocol spoken by ``loadclient`` itself;
- ``interactive`` endpoints are what a person would use: for conserver and conman that
  is their own client program (``console``, ``conman``) on a pty.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from procs import Managed, free_port_range, listening_tcp_ports, stop_many

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Setup:
    """One run's world: where the UARTs are and what the consoles are called."""

    workdir: Path
    uart_paths: list[Path]
    replay_bytes: int = 0
    peer_logs: bool = True
    smx_settings: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # serialmuxd: the command to run it (see run.py prepare_serialmuxd) and where its
    # per-console sockets go (tmpfs, as /run is for the systemd unit).
    smx_command: list[str] = field(default_factory=list)
    runtime_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [f"c{i:04d}" for i in range(len(self.uart_paths))]


class Target:
    name: ClassVar[str] = ""
    family: ClassVar[str] = "peer"  # "floor", "peer" or "serialmuxd"
    # Connects every UART at start-up (so "ready" includes the fake VM seeing them all),
    # rather than when a client comes.
    eager: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # How many clients may be connecting at once.  Kept under the server's listen
    # backlog: past it the kernel drops SYNs and each client waits out TCP's
    # retransmission back-off (1, 3, 7, 15 ... s), which would be measured as a slow
    # server.  aiohttp listens with a backlog of 128, conmand with 10.
    attach_parallel: ClassVar[int] = 100

    def __init__(self) -> None:
        self.setup: Setup | None = None
        self.procs: list[Managed] = []

    def start(self, setup: Setup) -> None:
        self.setup = setup

    def server_roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ready(self) -> bool:
        return True

    def failed(self) -> str:
        """Why the server is gone, if it died."""
        for proc in self.procs:
            if not proc.alive():
                return f"{self.name}: {proc.argv[0]} exited {proc.popen.returncode}: {proc.log_tail()}"
        return ""

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        raise NotImplementedError

    def skip_reason(self, workload: str, consoles: int) -> str:
        return ""

    def stop(self) -> None:
        stop_many(self.procs)
        self.procs = []

    @property
    def s(self) -> Setup:
        assert self.setup is not None
        return self.setup


class Direct(Target):
    name = "direct"
    family = "floor"
    description = "client straight on the UART socket: the floor"

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        return {"kind": "unix", "path": str(self.s.uart_paths[index])}


class TcpPortsTarget(Target):
    """A server with one TCP port per console (socat, ser2net)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_port = 0

    def ready(self) -> bool:
        ports = listening_tcp_ports()
        return all(self.base_port + i in ports for i in range(len(self.s.names)))

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        return {"kind": "tcp", "port": self.base_port + index}


class Socat(TcpPortsTarget):
    name = "socat"
    description = "one `socat TCP-LISTEN:P,fork UNIX-CONNECT:uart` relay process per console"

    def start(self, setup: Setup) -> None:
        super().start(setup)
        self.base_port = free_port_range(len(setup.names))
        for i, path in enumerate(setup.uart_paths):
            self.procs.append(
                Managed(
                    [
                        "socat",
                        f"TCP-LISTEN:{self.base_port + i},bind=127.0.0.1,reuseaddr,fork,backlog=64",
                        f"UNIX-CONNECT:{path}",
                    ]
                )
            )

    def skip_reason(self, workload: str, consoles: int) -> str:
        if consoles > 1000:
            return "one relay process per console; not run above 1,000 consoles"
        return ""


class Ser2net(TcpPortsTarget):
    name = "ser2net"
    tuned = False
    description = "ser2net 4 with defaults (chardelay on, 64-byte buffers)"

    def yaml(self) -> str:
        lines = ["%YAML 1.1", "---"]
        for i, (name, path) in enumerate(zip(self.s.names, self.s.uart_paths, strict=True)):
            lines += [
                f"connection: &{name}",
                f"    accepter: tcp,127.0.0.1,{self.base_port + i}",
                f"    connector: unix,{path}",
            ]
            if self.tuned:
                lines += [
                    "    options:",
                    "      chardelay: false",
                    "      dev-to-net-bufsize: 4096",
                    "      net-to-dev-bufsize: 4096",
                ]
        return "\n".join(lines) + "\n"

    def start(self, setup: Setup) -> None:
        super().start(setup)
        self.base_port = free_port_range(len(setup.names))
        conf = setup.workdir / f"{self.name}.yaml"
        conf.write_text(self.yaml())
        self.procs.append(
            Managed(
                ["ser2net", "-n", "-u", "-c", str(conf), "-P", str(setup.workdir / f"{self.name}.pid")],
                setup.workdir / f"{self.name}.log",
            )
        )


class Ser2netTuned(Ser2net):
    name = "ser2net-tuned"
    tuned = True
    description = "ser2net 4 with `chardelay: false` and 4 KiB buffers both ways"


class Conserver(Target):
    name = "conserver"
    eager = True
    description = (
        "conserver 8.2 (-E: no TLS), `type uds` consoles, a log file per console; "
        "interactive client `console -E` on a pty"
    )

    def __init__(self) -> None:
        super().__init__()
        self.port = 0

    def config(self) -> str:
        logs = self.s.workdir / "conserver-logs"
        logs.mkdir(exist_ok=True)
        logfile = f'"{logs}/&.log"' if self.s.peer_logs else '""'
        head = f"""config * {{
  defaultaccess allowed;
}}
default * {{
  master 127.0.0.1;
  type uds;
  rw *;
  logfile {logfile};
  timestamp "";
}}
access * {{
  trusted 127.0.0.1;
}}
"""
        consoles = [
            f"console {name} {{ uds {path}; }}"
            for name, path in zip(self.s.names, self.s.uart_paths, strict=True)
        ]
        return head + "\n".join(consoles) + "\n"

    def start(self, setup: Setup) -> None:
        super().start(setup)
        self.port = free_port_range(1)
        conf = setup.workdir / "conserver.cf"
        conf.write_text(self.config())
        passwd = setup.workdir / "conserver.passwd"
        passwd.write_text("")
        argv = ["conserver", "-E", "-C", str(conf), "-P", str(passwd)]
        argv += ["-p", str(self.port), "-M", "127.0.0.1"]
        self.procs.append(Managed(argv, setup.workdir / "conserver.log"))

    def ready(self) -> bool:
        return self.port in listening_tcp_ports()

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        name = self.s.names[index]
        if purpose == "interactive":
            return {
                "kind": "pty",
                "argv": ["console", "-E", "-M", "127.0.0.1", "-p", str(self.port), name],
            }
        return {"kind": "conserver", "port": self.port, "console": name}


class Conman(Target):
    name = "conman"
    eager = True
    attach_parallel = 8
    description = (
        "conmand 0.2.7, `unix:` consoles, a log file per console; interactive client `conman` on a pty"
    )

    def __init__(self) -> None:
        super().__init__()
        self.port = 0

    def config(self) -> str:
        logs = self.s.workdir / "conman-logs"
        logs.mkdir(exist_ok=True)
        lines = [
            "server keepalive=off",
            "server loopback=on",
            f"server port={self.port}",
            # "0m", not "0": after a bare 0, conmand 0.2.7 takes the next line's first
            # word as the unit and rejects the line.
            "server timestamp=0m",
        ]
        if self.s.peer_logs:
            lines.append(f'global log="{logs}/%N.log"')
        lines += [
            f'console name="{name}" dev="unix:{path}"'
            for name, path in zip(self.s.names, self.s.uart_paths, strict=True)
        ]
        return "\n".join(lines) + "\n"

    def start(self, setup: Setup) -> None:
        super().start(setup)
        self.port = free_port_range(1)
        conf = setup.workdir / "conman.conf"
        conf.write_text(self.config())
        self.procs.append(Managed(["conmand", "-F", "-c", str(conf)], setup.workdir / "conman.log"))

    def ready(self) -> bool:
        return self.port in listening_tcp_ports()

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        name = self.s.names[index]
        if purpose == "interactive":
            return {"kind": "pty", "argv": ["conman", "-d", f"127.0.0.1:{self.port}", name]}
        return {"kind": "conman", "port": self.port, "console": name}


def new_token() -> tuple[str, str]:
    """A token in the documented form and its token_sha256 (as `serialmuxd token` does)."""
    while True:
        token = "smx_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        if token[4] != "-":
            return token, hashlib.sha256(token.encode()).hexdigest()


def serialmuxd_command() -> list[str]:
    exe = REPO / ".venv" / "bin" / "serialmuxd"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "serialmuxd"]


class Serialmuxd(Target):
    name = "serialmuxd-unix"
    family = "serialmuxd"
    eager = True
    description = "serialmuxd through its per-console local socket (a plain connect attaches)"

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.token = ""

    def config(self, token_hash: str) -> str:
        s = self.s
        lines = [
            "[daemon]",
            f'state_dir = "{s.workdir / "smx-state"}"',
            f'unix_listen_dir = "{self.sock_dir}"',
            "",
            "[http]",
            f'listen = ["127.0.0.1:{self.port}"]',
            "",
            "[defaults]",
            f"replay_bytes = {s.replay_bytes}",
            *(" = ".join(part.strip() for part in kv.split("=", 1)) for kv in s.smx_settings),
            "",
        ]
        for name, path in zip(s.names, s.uart_paths, strict=True):
            lines += ["[[console]]", f'name = "{name}"', f'uart = "unix:{path}"', ""]
        lines += [
            "[[user]]",
            'name = "bench"',
            f'token_sha256 = "{token_hash}"',
            'roles = { "*" = "owner" }',
        ]
        return "\n".join(lines) + "\n"

    @property
    def sock_dir(self) -> Path:
        return self.s.runtime_dir or self.s.workdir / "smx-sock"

    def start(self, setup: Setup) -> None:
        super().start(setup)
        self.port = free_port_range(1)
        self.token, token_hash = new_token()
        conf = setup.workdir / "serialmuxd.toml"
        conf.write_text(self.config(token_hash))
        env = dict(os.environ)
        if setup.smx_command:
            env.pop("PYTHONPATH", None)  # the installed copy, not the source tree
        else:
            env.setdefault("PYTHONPATH", str(REPO / "src"))
        self.procs.append(
            Managed(
                [*(setup.smx_command or serialmuxd_command()), "run", "-c", str(conf)],
                setup.workdir / "serialmuxd.log",
                env=env,
            )
        )

    def ready(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/readyz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        name = self.s.names[index]
        return {"kind": "unix", "path": str(self.sock_dir / f"{name}.sock")}


class SerialmuxdWs(Serialmuxd):
    name = "serialmuxd-ws"
    description = "serialmuxd through its WebSocket (binary frames both ways, Bearer token)"

    def endpoint(self, index: int, purpose: str = "load") -> dict[str, Any]:
        name = self.s.names[index]
        return {
            "kind": "ws",
            "port": self.port,
            "path": f"/api/v1/consoles/{name}/session",
            "token": self.token,
        }


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (Direct, Socat, Ser2net, Ser2netTuned, Conserver, Conman, Serialmuxd, SerialmuxdWs)
}
PEERS = ["socat", "ser2net", "ser2net-tuned", "conserver", "conman"]


def tool_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for package in ("ser2net", "conserver-server", "conman", "socat"):
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", package],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        versions[package] = out or "not installed"
    versions["python"] = sys.version.split()[0]
    return versions


def missing_tools(names: list[str]) -> dict[str, str]:
    need = {"socat": "socat", "ser2net": "ser2net", "ser2net-tuned": "ser2net"}
    need |= {"conserver": "conserver", "conman": "conmand"}
    return {n: need[n] for n in names if n in need and shutil.which(need[n]) is None}
