"""Client commands of the ``serialmuxd`` CLI (list, attach, log, …) over the HTTP API.

Every command talks to a running daemon at ``--url`` (or ``SERIALMUXD_URL``,
default http://127.0.0.1:7480) with ``--token`` (or ``SERIALMUXD_TOKEN``).
Refusals print the server's own message, which says what to do next; exit
statuses are listed at the top of :mod:`serialmuxd.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import math
import os
import select
import signal
import socket
import ssl
import sys
import termios
import tty
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
from aiohttp import WSMsgType
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from serialmuxd.config import validate_console_name
from serialmuxd.escape import HELP_LINES, Break, Detach, EscapeParser, Help, Send

EXIT_OK = 0
EXIT_FAIL = 1  # runtime failure, lost connection, or `wait` timed out
EXIT_USAGE = 2  # bad arguments (also a 400 from the server: the request was malformed)
EXIT_UNREACHABLE = 3  # no daemon answering at the URL
EXIT_REFUSED = 4  # 401, 403, 404, 409, 429: the daemon said no
EXIT_ENDED = 5  # the daemon ended the session: taken over, disabled, shutdown, idle, too slow

DEFAULT_URL = "http://127.0.0.1:7480"
API = "/api/v1"
# Keystroke reads: a paste is split into frames well under the server's 64 KiB limit.
READ_CHUNK = 16 * 1024
# A piped stdin at end-of-file: keep showing output this long before detaching,
# so `printf 'cmd\r' | serialmuxd attach vm1` shows the answer.
EOF_LINGER_S = 1.0
HELLO_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 10.0
# `wait` keeps its request open for --timeout; this much more covers the trip.
WAIT_GRACE_S = 15.0
TAG = "[serialmuxd]"

HELP = {
    "list": "list consoles and their state",
    "status": "show one console",
    "attach": "attach to a console interactively (Ctrl-] then . detaches, ? for help)",
    "log": "print a console's ring log",
    "wait": "wait until a console's output matches a regex",
    "sysrq": "send magic SysRq KEY (BREAK then the key)",
    "nmi": "inject an NMI into the VM",
    "reset": "reset the VM",
    "enable": "enable a console, or the whole service without NAME",
    "disable": "disable a console, or the whole service without NAME",
}

ATTACH_EPILOG = (
    "Keys after Ctrl-] (recognised anywhere in the input, as telnet does): "
    ". detach, b send a serial BREAK, ? help, Ctrl-] a literal Ctrl-]; any other key is sent "
    "together with the Ctrl-]. With a piped stdin, end-of-file detaches after 1 s. Exit status: "
    "0 detached, 4 refused, 5 ended by the daemon (taken over, disabled, shut down, idle, too slow)."
)


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name in {"attach", "log", "wait", "sysrq", "nmi", "reset", "status"}:
        p.add_argument("name", metavar="NAME", help="console name")
    if name in {"enable", "disable"}:
        p.add_argument("name", metavar="NAME", nargs="?", help="console name (omit for the whole service)")
    if name in {"list", "status", "wait"}:
        p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    if name == "attach":
        p.epilog = ATTACH_EPILOG
        p.add_argument("--watch", action="store_true", help="read-only: follow the output, never take over")
    if name == "log":
        p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until Ctrl-C")
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--since", metavar="TIME", help="from this RFC 3339 time, e.g. 2026-11-27T07:00:00Z"
        )
        where.add_argument(
            "--start", metavar="N", type=int, help="from ring offset N; negative: the last -N bytes"
        )
        p.add_argument("--max-bytes", metavar="N", type=int, help="print at most N bytes")
    if name == "wait":
        p.add_argument("pattern", metavar="REGEX", help="regular expression (RE2 syntax) to wait for")
        p.add_argument(
            "--timeout", metavar="S", type=float, default=30.0, help="give up after S seconds (default 30)"
        )
        p.add_argument(
            "--start", metavar="N", type=int, help="match output from ring offset N (default: from now)"
        )
    if name == "sysrq":
        p.add_argument("key", metavar="KEY", help="SysRq command key, e.g. h (help), s (sync), b (reboot)")


class ClientFailure(Exception):
    """Ends the command: ``message`` goes to stderr, ``status`` is the exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- target ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the daemon is and who we are; never shows the token in its repr."""

    base: str  # scheme://host:port[/prefix], no trailing slash
    token: str | None
    cacert: str | None

    def __repr__(self) -> str:
        return f"Target(base={self.base!r}, token={'set' if self.token else 'none'})"

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: dict[str, str] | None = None) -> Target:
        env = dict(os.environ) if env is None else env
        raw = getattr(args, "url", None) or env.get("SERIALMUXD_URL") or DEFAULT_URL
        token = getattr(args, "token", None) or env.get("SERIALMUXD_TOKEN") or None
        cacert = getattr(args, "cacert", None) or None
        return cls(base=normalize_url(raw), token=token.strip() if token else None, cacert=cacert)

    def api(self, path: str) -> URL:
        return URL(self.base + API + path, encoded=True)

    def ws(self, path: str) -> URL:
        url = self.api(path)
        return url.with_scheme("wss" if url.scheme == "https" else "ws")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def normalize_url(raw: str) -> str:
    """``host:port`` → ``http://host:port``; refuses what cannot be a daemon URL."""
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        url = URL(text)
    except ValueError as e:
        raise ClientFailure(EXIT_USAGE, f"{raw!r} is not a URL: {e}") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise ClientFailure(
            EXIT_USAGE, f"{raw!r} is not a daemon URL: use http://HOST:PORT or https://HOST:PORT[/PREFIX]"
        )
    if url.query_string or url.fragment:
        raise ClientFailure(EXIT_USAGE, f"{raw!r}: the daemon URL takes no query or fragment")
    return str(url).rstrip("/")


def console_path(name: str, suffix: str = "") -> str:
    reason = validate_console_name(name)
    if reason:
        raise ClientFailure(EXIT_USAGE, reason)
    return f"/consoles/{name}{suffix}"


# --- HTTP --------------------------------------------------------------------


def status_exit(status: int) -> int:
    if status in {400, 413}:
        return EXIT_USAGE
    if status in {401, 403, 404, 409, 429}:
        return EXIT_REFUSED
    return EXIT_FAIL


def refusal(status: int, body: bytes | None, target: Target) -> ClientFailure:
    """The server's ``message`` (it says what to do), with the exit status for ``status``."""
    message = ""
    code = ""
    if body:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            data = json.loads(body)
            if isinstance(data, dict):
                message = str(data.get("message") or "")
                code = str(data.get("error") or "")
    if not message:
        message = f"the daemon answered HTTP {status}"
    if status == 401 and not target.token:
        message += " (no token given: pass --token or set SERIALMUXD_TOKEN)"
    if status == 404 and code == "not_found":
        message += f" (is {target.base} a serialmuxd of this version?)"
    return ClientFailure(status_exit(status), message)


class _HandshakeBodies:
    """Client middleware keeping the body of a refused WebSocket upgrade.

    aiohttp raises on a non-101 answer without reading it, yet the JSON message
    in it ("contributor on vm1 required", "console vm1 is disabled: …") is what
    the user needs to see.
    """

    def __init__(self) -> None:
        self.body: bytes | None = None

    async def __call__(
        self,
        req: aiohttp.ClientRequest,
        handler: ClientHandlerType,
    ) -> aiohttp.ClientResponse:
        resp = await handler(req)
        if req.headers.get("Upgrade", "").lower() == "websocket" and resp.status != 101:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                self.body = await resp.read()
        return resp


def _ssl_context(target: Target) -> ssl.SSLContext | bool:
    if not target.cacert:
        return True
    try:
        return ssl.create_default_context(cafile=target.cacert)
    except (OSError, ssl.SSLError) as e:
        raise ClientFailure(EXIT_USAGE, f"cannot use --cacert {target.cacert}: {e}") from None


@contextlib.asynccontextmanager
async def open_session(
    target: Target, *, handshake: _HandshakeBodies | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=_ssl_context(target))
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=target.headers(),
        middlewares=(handshake,) if handshake is not None else (),
    ) as s:
        try:
            yield s
        except aiohttp.ClientConnectorCertificateError as e:
            raise ClientFailure(
                EXIT_UNREACHABLE,
                f"cannot reach serialmuxd at {target.base}: its TLS certificate is not trusted "
                f"({e.certificate_error}); pass --cacert FILE with the CA that signed it",
            ) from None
        except aiohttp.ClientSSLError as e:
            raise ClientFailure(EXIT_UNREACHABLE, f"TLS with {target.base} failed: {e}") from None
        except aiohttp.ClientConnectorError as e:
            raise ClientFailure(
                EXIT_UNREACHABLE,
                f"cannot reach serialmuxd at {target.base} ({_os_reason(e.os_error)}): "
                "the daemon may not be running; check --url or SERIALMUXD_URL",
            ) from None
        except aiohttp.ServerDisconnectedError:
            raise ClientFailure(
                EXIT_FAIL, f"serialmuxd at {target.base} closed the connection: it may be shutting down"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
            raise ClientFailure(EXIT_FAIL, f"connection to serialmuxd at {target.base} failed: {e}") from None


def _os_reason(e: OSError) -> str:
    if isinstance(e, socket.gaierror) and e.strerror:
        return e.strerror.lower()  # name resolution: "name or service not known"
    if e.errno and e.errno > 0:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


async def request_json(
    s: aiohttp.ClientSession,
    target: Target,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: object = None,
    timeout: float | None = 30.0,
) -> Any:
    kwargs: dict[str, Any] = {"params": params}
    if body is not None:
        kwargs["json"] = body
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout, connect=CONNECT_TIMEOUT_S)
    async with s.request(method, target.api(path), **kwargs) as resp:
        data = await resp.read()
        if resp.status >= 400:
            raise refusal(resp.status, data, target)
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise ClientFailure(
                EXIT_FAIL, f"{target.base} answered {method} {path} with something that is not JSON"
            ) from None


# --- list / status -------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    raise AssertionError("unreachable")


def session_text(session: object) -> str:
    if not isinstance(session, dict):
        return "-"
    return f"{session.get('user', '?')}@{session.get('peer', '?')} since {session.get('since', '?')}"


def log_text(log: object) -> str:
    if not isinstance(log, dict):
        return "-"
    first, nxt, cap = (int(log.get(k) or 0) for k in ("first", "next", "capacity"))
    return f"{human_bytes(nxt - first)}/{human_bytes(cap)}"


def format_table(consoles: Sequence[dict[str, Any]]) -> str:
    """The ``list`` table: NAME STATE SESSION WATCHERS LOG, columns aligned."""
    rows = [("NAME", "STATE", "SESSION", "WATCHERS", "LOG")]
    for c in consoles:
        rows.append(
            (
                str(c.get("name", "?")),
                str(c.get("state", "?")),
                session_text(c.get("session")),
                str(c.get("watchers", 0)),
                log_text(c.get("log")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_status(c: dict[str, Any]) -> str:
    log = c.get("log") if isinstance(c.get("log"), dict) else {}
    assert isinstance(log, dict)
    link = str(c.get("link", ""))
    if c.get("reason"):
        link += f" ({c['reason']})"
    fields = [
        ("name", str(c.get("name", ""))),
        ("state", str(c.get("state", ""))),
        ("enabled", "yes" if c.get("enabled") else "no"),
        ("backend", str(c.get("backend", ""))),
        ("session", session_text(c.get("session"))),
        ("watchers", str(c.get("watchers", 0))),
        (
            "log",
            f"{log_text(log)} (offsets {log.get('first', '?')}..{log.get('next', '?')})",
        ),
    ]
    if link:
        fields.append(("link", link))
    if c.get("vm_status"):
        fields.append(("vm status", str(c["vm_status"])))
    if isinstance(log, dict) and log.get("error"):
        fields.append(("log error", str(log["error"])))
    width = max(len(k) for k, _ in fields) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in fields)


async def cmd_list(target: Target, args: argparse.Namespace) -> int:
    async with open_session(target) as s:
        data = await request_json(s, target, "GET", "/consoles")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    consoles = data.get("consoles", []) if isinstance(data, dict) else []
    print(format_table([c for c in consoles if isinstance(c, dict)]))
    return EXIT_OK


async def cmd_status(target: Target, args: argparse.Namespace) -> int:
    async with open_session(target) as s:
        data = await request_json(s, target, "GET", console_path(args.name))
    print(json.dumps(data, indent=2) if args.json else format_status(data))
    return EXIT_OK


# --- log -------------------------------------------------------------------------


def _write_out(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    out.flush()


async def cmd_log(target: Target, args: argparse.Namespace) -> int:
    params: dict[str, str] = {}
    if args.since is not None:
        params["since"] = args.since
    if args.start is not None:
        params["start"] = str(args.start)
    if args.max_bytes is not None:
        if args.max_bytes < 0:
            raise ClientFailure(EXIT_USAGE, "--max-bytes must be 0 or more")
        params["max_bytes"] = str(args.max_bytes)
    if args.follow:
        params["follow"] = "1"
    path = console_path(args.name, "/log")
    out = sys.stdout.buffer
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if args.follow:
        # Ctrl-C is how a follow normally ends: exit 0, not a traceback or 130.
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        async with open_session(target) as s:
            async with s.get(target.api(path), params=params) as resp:
                if resp.status >= 400:
                    raise refusal(resp.status, await resp.read(), target)
                if resp.headers.get("X-Log-Truncated") == "true" and (
                    args.start is not None or args.since is not None
                ):
                    first = resp.headers.get("X-Log-Start")
                    print(f"{TAG} older output was overwritten: starting at offset {first}", file=sys.stderr)
                reading = asyncio.ensure_future(_copy_body(resp, out))
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    if not reading.done():
                        reading.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reading
                if stop.is_set():
                    return EXIT_OK
                try:
                    reading.result()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                    if not args.follow:
                        raise
                    # A follow cut mid-stream (daemon killed or restarting): say why below.
            if args.follow:
                why = await _why_stream_ended(s, target, args.name)
                print(f"{TAG} the log stream ended: {why}", file=sys.stderr)
                return EXIT_ENDED
    except BrokenPipeError:
        # `serialmuxd log vm1 | head`: the reader has what it wanted.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if args.follow:
            loop.remove_signal_handler(signal.SIGINT)
    return EXIT_OK


async def _copy_body(resp: aiohttp.ClientResponse, out: BinaryIO) -> None:
    async for chunk in resp.content.iter_any():
        _write_out(out, chunk)


async def _why_stream_ended(s: aiohttp.ClientSession, target: Target, name: str) -> str:
    """Ask the daemon why a follow ended (it says nothing on the stream itself)."""
    try:
        async with asyncio.timeout(5):
            info = await request_json(s, target, "GET", console_path(name))
    except ClientFailure as e:
        if e.status == EXIT_REFUSED:
            return e.message
        return "the daemon closed it (shutting down?)"
    except (aiohttp.ClientError, TimeoutError, OSError):
        return "the daemon closed it (shutting down?)"
    if isinstance(info, dict) and info.get("state") == "disabled":
        return f"console {name} was disabled"
    return "the daemon closed it (this client may have been too slow)"


# --- wait ---------------------------------------------------------------------------


async def cmd_wait(target: Target, args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise ClientFailure(EXIT_USAGE, "--timeout must be more than 0 seconds")
    # The API takes whole seconds; rounding up never gives up early.
    params = {"pattern": args.pattern, "timeout_s": str(math.ceil(args.timeout))}
    if args.start is not None:
        params["start"] = str(args.start)
    path = console_path(args.name, "/wait")
    async with (
        open_session(target) as s,
        s.get(
            target.api(path),
            params=params,
            timeout=aiohttp.ClientTimeout(total=args.timeout + WAIT_GRACE_S, connect=CONNECT_TIMEOUT_S),
        ) as resp,
    ):
        body = await resp.read()
        if resp.status == 408:
            failure = refusal(resp.status, body, target)
            if args.json:
                print(body.decode(errors="replace"))
            print(f"serialmuxd: {failure.message}", file=sys.stderr)
            return EXIT_FAIL
        if resp.status >= 400:
            raise refusal(resp.status, body, target)
    try:
        data = json.loads(body)
    except ValueError:
        raise ClientFailure(
            EXIT_FAIL, f"{target.base} answered wait with something that is not JSON"
        ) from None
    if args.json:
        print(json.dumps(data))
    elif isinstance(data, dict) and isinstance(data.get("match"), str):
        print(data["match"])
    return EXIT_OK


# --- actions ----------------------------------------------------------------------------


async def cmd_action(target: Target, args: argparse.Namespace, kind: str) -> int:
    body: dict[str, str] | None = None
    if kind == "sysrq":
        if len(args.key) != 1:
            raise ClientFailure(EXIT_USAGE, f"{args.key!r} is not a SysRq key: give one letter, e.g. h")
        body = {"key": args.key}
    async with open_session(target) as s:
        await request_json(s, target, "POST", console_path(args.name, f"/{kind}"), body=body)
    done = {
        "sysrq": f"SysRq {getattr(args, 'key', '')} sent",
        "nmi": "NMI injected",
        "reset": "VM reset",
        "break": "BREAK sent",
    }[kind]
    print(f"{args.name}: {done}")
    return EXIT_OK


async def cmd_switch(target: Target, args: argparse.Namespace, enable: bool) -> int:
    verb = "enable" if enable else "disable"
    path = console_path(args.name, f"/{verb}") if args.name else f"/service/{verb}"
    async with open_session(target) as s:
        await request_json(s, target, "POST", path)
    what = f"console {args.name}" if args.name else "console service"
    print(f"{what} {verb}d")
    return EXIT_OK


# --- attach ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int
    message: str


CLOSE_TEXT = {
    1001: "the daemon is shutting down",
    4003: "console {name} was disabled",
    4004: "console {name} was removed from the daemon's configuration",
    4008: "the session was closed for being idle",
    4009: "this client could not keep up with the console output; reconnect to resume",
}


def close_outcome(code: int | None, name: str, taken: dict[str, Any] | None, error: str) -> Outcome:
    """Why the daemon ended an attached session, from its close code and last frames."""
    if code == 4001 or taken is not None:
        t = taken or {}
        return Outcome(
            EXIT_ENDED,
            f"session taken over by {t.get('by') or 'someone'} from {t.get('peer') or 'elsewhere'}",
        )
    if code in CLOSE_TEXT:
        return Outcome(EXIT_ENDED, error or CLOSE_TEXT[code].format(name=name))
    if code == 1000:
        return Outcome(EXIT_ENDED, error or "the daemon closed the session")
    detail = f" (close code {code})" if code else ""
    return Outcome(EXIT_FAIL, (error or "the connection to the daemon was lost") + detail)


def _set_blocking_flags(fd: int, flags: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


class Terminal:
    """Raw mode for the attach, and the exact way back.

    Saves the termios of stdin (when a tty) and the file status flags of fds
    0-2: uvloop's add_reader sets O_NONBLOCK on stdin, and on a terminal that
    flag is shared with the shell that started us.
    """

    def __init__(self, stdin_fd: int, fds: Sequence[int]) -> None:
        self.fd = stdin_fd
        self.is_tty = os.isatty(stdin_fd)
        self._saved_attr: list[Any] | None = None
        self._saved_flags: dict[int, int] = {}
        for fd in fds:
            with contextlib.suppress(OSError):
                self._saved_flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)

    def raw(self) -> None:
        if self.is_tty:
            self._saved_attr = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        if self._saved_attr is not None:
            # A hung-up terminal (SIGHUP) cannot be restored and needs not be.
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_attr)
            self._saved_attr = None
        for fd, flags in self._saved_flags.items():
            _set_blocking_flags(fd, flags)


def write_all_sync(fd: int, data: bytes) -> None:
    """Short status lines, even to a descriptor someone made non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class Attach:
    """One interactive (or watch) session on a terminal."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        name: str,
        *,
        watch: bool,
        stdin_fd: int = 0,
        stdout_fd: int = 1,
        stderr_fd: int = 2,
    ) -> None:
        self.ws = ws
        self.name = name
        self.watch = watch
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.parser = EscapeParser()
        self.taken: dict[str, Any] | None = None
        self.last_error = ""
        self.raw = False
        self._done: asyncio.Future[Outcome] | None = None
        self._warned_read_only = False

    # -- output -----------------------------------------------------------------

    def say(self, text: str) -> None:
        """A status line on stderr that reads well in raw and cooked mode."""
        write_all_sync(self.stderr_fd, f"\r\n{TAG} {text}\r\n".encode(errors="replace"))

    async def write_out(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.stdout_fd, view) :]
            except BlockingIOError:
                # stdout shares the tty's O_NONBLOCK with stdin: wait without blocking
                # the loop, so Ctrl-] . still works while a flood is being drawn.
                await _wait_fd(loop, self.stdout_fd, write=True)

    # -- lifecycle ---------------------------------------------------------------

    def finish(self, outcome: Outcome) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)

    async def hello(self) -> dict[str, Any]:
        """The first frame: ``hello`` means attached; an error and a close mean refused."""
        error = ""
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                async for msg in self.ws:
                    if msg.type is not WSMsgType.TEXT:
                        break
                    data = _json_object(msg.data)
                    if data.get("type") == "hello":
                        return data
                    if data.get("type") == "error":
                        error = str(data.get("message") or "")
        except TimeoutError:
            raise ClientFailure(
                EXIT_FAIL, f"the daemon did not greet the session within {HELLO_TIMEOUT_S:g} s"
            ) from None
        code = self.ws.close_code
        if code in {4003, 4004}:
            raise ClientFailure(EXIT_REFUSED, error or f"the daemon refused the session (code {code})")
        raise ClientFailure(EXIT_FAIL, error or f"the daemon closed the session at once (code {code})")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        hello = await self.hello()
        user = hello.get("user", "?")
        if self.watch:
            self.say(f"watching {self.name} as {user} (read-only; Ctrl-] . to detach)")
        else:
            self.say(f"attached to {self.name} as {user} (Ctrl-] . to detach, Ctrl-] ? for help)")
        if hello.get("state") == "stopped":
            self.say(f"console {self.name} stopped: waiting for the VM to start")
        terminal = Terminal(self.stdin_fd, (self.stdin_fd, self.stdout_fd, self.stderr_fd))
        self._done = loop.create_future()
        signals = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
        tasks: list[asyncio.Task[None]] = []
        try:
            terminal.raw()
            for sig in signals:
                loop.add_signal_handler(sig, self._on_signal, sig)
            tasks.append(loop.create_task(self._receive(), name="attach-receive"))
            if not self.watch or terminal.is_tty:
                tasks.append(loop.create_task(self._keyboard(), name="attach-keyboard"))
            outcome = await self._done
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for sig in signals:
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                loop.remove_reader(self.stdin_fd)
            terminal.restore()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.ws.close()
        self.say(outcome.message)
        return outcome.status

    def _on_signal(self, sig: int) -> None:
        self.finish(Outcome(128 + sig, f"detached from {self.name} ({signal.Signals(sig).name})"))

    # -- daemon → terminal ------------------------------------------------------------

    async def _receive(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.BINARY:
                    await self.write_out(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    self._control(_json_object(msg.data))
                elif msg.type is WSMsgType.ERROR:
                    break
        except (aiohttp.ClientError, ConnectionError) as e:
            self.finish(Outcome(EXIT_FAIL, f"the connection to the daemon was lost: {e}"))
            return
        except OSError as e:
            self.finish(Outcome(EXIT_FAIL, f"cannot write the console output: {e.strerror or e}"))
            return
        self.finish(close_outcome(self.ws.close_code, self.name, self.taken, self.last_error))

    def _control(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "state":
            state = msg.get("state")
            if state == "stopped":
                self.say(f"console {self.name} stopped: waiting for the VM to start")
            elif state == "running":
                self.say(f"console {self.name} running")
            else:
                self.say(f"console {self.name} is {state}")
        elif kind == "taken_over":
            self.taken = msg
        elif kind == "error":
            message = str(msg.get("message") or msg.get("error") or "error")
            # The frame before a close explains it; print that one with the outcome.
            if msg.get("error") in {"disabled", "removed", "idle_timeout", "too_slow", "shutdown"}:
                self.last_error = message
            else:
                self.say(message)

    # -- terminal → daemon ---------------------------------------------------------------

    async def _keyboard(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await _wait_fd(loop, self.stdin_fd, write=False)
            try:
                data = os.read(self.stdin_fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""  # EIO: the terminal hung up
            if not data:
                await self._stdin_eof()
                return
            for action in self.parser.feed(data):
                if isinstance(action, Send):
                    try:
                        await self._send_keys(action.data)
                    except (aiohttp.ClientError, ConnectionError):
                        return  # the session is closing; the receiver reports why
                elif isinstance(action, Break):
                    with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                        await self.ws.send_str(json.dumps({"type": "break"}))
                elif isinstance(action, Help):
                    text = "".join(f"{TAG} {line}\r\n" for line in HELP_LINES)
                    write_all_sync(self.stderr_fd, b"\r\n" + text.encode())
                elif isinstance(action, Detach):
                    self.finish(Outcome(EXIT_OK, f"detached from {self.name}"))
                    return

    async def _send_keys(self, data: bytes) -> None:
        if self.watch:
            if not self._warned_read_only:
                self._warned_read_only = True
                self.say("watch mode: keystrokes are not sent (Ctrl-] . to detach)")
            return
        await self.ws.send_bytes(data)

    async def _stdin_eof(self) -> None:
        if self.watch:
            return  # a watcher needs no input: keep following
        await asyncio.sleep(EOF_LINGER_S)
        self.finish(Outcome(EXIT_OK, f"detached from {self.name} (end of input)"))


def _json_object(text: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict):
            return data
    return {}


async def cmd_attach(target: Target, args: argparse.Namespace) -> int:
    path = console_path(args.name, "/session")
    url = target.ws(path)
    if args.watch:
        url = url.with_query(mode="watch")
    handshake = _HandshakeBodies()
    async with open_session(target, handshake=handshake) as s:
        try:
            ws = await s.ws_connect(
                url,
                heartbeat=30.0,
                autoping=True,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
        except aiohttp.WSServerHandshakeError as e:
            raise refusal(e.status, handshake.body, target) from None
        async with ws:
            return await Attach(ws, args.name, watch=args.watch).run()


# --- entry -----------------------------------------------------------------------------------


async def _dispatch(cmd: str, target: Target, args: argparse.Namespace) -> int:
    if cmd == "list":
        return await cmd_list(target, args)
    if cmd == "status":
        return await cmd_status(target, args)
    if cmd == "log":
        return await cmd_log(target, args)
    if cmd == "wait":
        return await cmd_wait(target, args)
    if cmd in {"sysrq", "nmi", "reset"}:
        return await cmd_action(target, args, cmd)
    if cmd in {"enable", "disable"}:
        return await cmd_switch(target, args, cmd == "enable")
    if cmd == "attach":
        return await cmd_attach(target, args)
    raise ClientFailure(EXIT_USAGE, f"unknown command {cmd}")


def main(cmd: str, args: argparse.Namespace) -> int:
    from serialmuxd.loop import run

    try:
        target = Target.from_args(args)
        return run(_dispatch(cmd, target, args))
    except ClientFailure as e:
        print(f"serialmuxd: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
