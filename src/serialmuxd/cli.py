"""The ``serialmuxd`` command: the daemon (run, demo, check-config, token) and the client.

Exit statuses:

- 0  success; ``attach`` detached with Ctrl-] .; ``log --follow`` stopped with Ctrl-C
- 1  runtime failure, connection lost, or ``wait`` timed out
- 2  usage or configuration error (also a 400 from the daemon: bad parameter)
- 3  cannot reach the daemon (not running, wrong ``--url``, untrusted TLS certificate)
- 4  refused by the daemon: 401, 403, 404, 409, 429 (the daemon's message says why)
- 5  the daemon ended the session or stream: taken over by someone else, console or
     service disabled, console removed, daemon shutting down, idle timeout, too slow
- 128+N  ``attach`` detached on signal N (SIGTERM, SIGHUP), terminal restored
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serialmuxd import __version__
from serialmuxd.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
CLIENT_COMMANDS = (
    "list",
    "attach",
    "log",
    "wait",
    "sysrq",
    "nmi",
    "reset",
    "enable",
    "disable",
    "status",
)


def _add_client_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--url",
        default=default,
        help="daemon URL (env SERIALMUXD_URL, default http://127.0.0.1:7480)",
    )
    p.add_argument("--token", default=default, help="API token (env SERIALMUXD_TOKEN)")
    p.add_argument("--cacert", default=default, help="CA bundle to trust for https URLs")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="serialmuxd",
        description="VM serial console server: drains every UART, ring-logs it, one interactive session.",
        epilog=doc[doc.find("Exit statuses:") :] if "Exit statuses:" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"serialmuxd {__version__}")
    _add_client_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    chk = sub.add_parser("check-config", help="validate a config file and exit")
    chk.add_argument("-c", "--config", required=True, help="TOML config file")
    sub.add_parser("token", help="print a new random API token and its token_sha256 config line")
    demo = sub.add_parser("demo", help="run the daemon on built-in demo consoles and print the URL")
    demo.add_argument("--listen", default="127.0.0.1:7480", help="HOST:PORT (default 127.0.0.1:7480)")
    demo.add_argument("--consoles", type=int, default=3, help="how many demo consoles (default 3)")
    demo.add_argument(
        "--state-dir",
        default=None,
        help="where ring logs go (default ~/.local/state/serialmuxd-demo)",
    )

    from serialmuxd import client

    for name in CLIENT_COMMANDS:
        sp = sub.add_parser(name, help=client.HELP[name])
        _add_client_options(sp, suppress=True)
        client.add_arguments(name, sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.command
    if cmd is None:
        parser.print_help()
        return EXIT_USAGE
    if cmd == "check-config":
        return _check_config(args.config)
    if cmd == "token":
        return _token()
    if cmd == "run":
        return _run(args.config)
    if cmd == "demo":
        return _demo(args.listen, args.consoles, args.state_dir)
    from serialmuxd import client

    return client.main(cmd, args)


def _check_config(path: str) -> int:
    from serialmuxd.config import load_config

    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"serialmuxd: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: OK ({len(cfg.consoles)} consoles, {len(cfg.users)} users)")
    return EXIT_OK


def _token() -> int:
    from serialmuxd.auth import new_token, token_sha256

    token = new_token()
    print(token)
    print(f'token_sha256 = "{token_sha256(token)}"')
    return EXIT_OK


def _run(path: str) -> int:
    from serialmuxd.config import load_config

    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"serialmuxd: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _serve(cfg, path)


def _serve(cfg: object, path: str | None, banner: str | None = None) -> int:
    from serialmuxd import logs
    from serialmuxd.config import Config
    from serialmuxd.daemon import Daemon, StartupError
    from serialmuxd.loop import run

    assert isinstance(cfg, Config)
    logs.configure(cfg.daemon.log_level, cfg.daemon.log_format)

    async def main() -> None:
        daemon = Daemon(cfg, config_path=path)
        daemon.install_signal_handlers()
        await daemon.startup()
        if banner:
            urls = ", ".join(b.url + "/" for b in daemon.bound)
            print(banner.format(urls=urls), flush=True)
        try:
            await daemon._stop.wait()
        finally:
            await daemon.shutdown()

    try:
        run(main())
    except StartupError as e:
        print(f"serialmuxd: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _demo(listen: str, n: int, state_dir: str | None) -> int:
    from serialmuxd.auth import new_token, token_sha256
    from serialmuxd.config import parse_config

    if not 1 <= n <= 5000:
        print("serialmuxd: --consoles must be between 1 and 5000", file=sys.stderr)
        return EXIT_USAGE
    base = (
        Path(state_dir)
        if state_dir
        else Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "serialmuxd-demo"
    )
    token = new_token()
    data = {
        "daemon": {"state_dir": str(base), "unix_listen_dir": str(base / "sockets")},
        "http": {"listen": [listen]},
        "console": [{"name": f"demo{i + 1}", "uart": "demo:"} for i in range(n)],
        "user": [{"name": "demo", "token_sha256": token_sha256(token), "roles": {"*": "owner"}}],
    }
    try:
        cfg = parse_config(data, source="demo")
    except ConfigError as e:
        print(f"serialmuxd: {e}", file=sys.stderr)
        return EXIT_USAGE
    sock = base / "sockets" / "demo1.sock"
    banner = (
        "serialmuxd demo: {urls}\n"
        f"  log in with this token (owner of every console): {token}\n"
        f"  local socket: {sock} (try: socat -,raw,echo=0 UNIX-CONNECT:{sock})\n"
        "  Ctrl-C stops."
    )
    return _serve(cfg, None, banner)


if __name__ == "__main__":
    sys.exit(main())
