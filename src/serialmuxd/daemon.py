"""The daemon's lifecycle: start-up, serve, reload, ordered shutdown.

Modelled on uvicorn's ``Server``: ``serve()`` = ``startup()``, wait for the
shutdown trigger (signals in production, an injected awaitable in tests),
``shutdown()`` with a deadline.  Every task the daemon starts is tracked here
and cancelled on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import resource
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from serialmuxd import __version__
from serialmuxd.audit import AuditLog
from serialmuxd.auth import Authenticator, FailureLimiter
from serialmuxd.backends import make_backend
from serialmuxd.backends.base import Backend
from serialmuxd.backends.readmux import ReadMux
from serialmuxd.config import Config, ConsoleConfig, load_config, validate_listen
from serialmuxd.connguard import ConnGuard, GuardedTCPSite
from serialmuxd.console import Console, OutputBatcher
from serialmuxd.errors import ConfigError, SerialmuxdError
from serialmuxd.loop import loop_name
from serialmuxd.metrics import Metrics
from serialmuxd.notify import sd_notify
from serialmuxd.ringlog import RingLog
from serialmuxd.session import Ending, EndReason, Session
from serialmuxd.switches import Switches
from serialmuxd.watch import DirWatcher

log = structlog.get_logger("serialmuxd.daemon")

HOUSEKEEPING_S = 1.0
FDS_PER_CONSOLE = 4  # UART, local listener, QMP, one client
FDS_SPARE = 4096
FLUSH_EVERY_S = 30.0


class StartupError(SerialmuxdError):
    """The daemon cannot start (port in use, unwritable state dir…).

    ``exit_status`` is 2 when the cause is in the configuration (a TLS file
    that is missing or not PEM), as for any config error, else 1.
    """

    def __init__(self, message: str, *, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class Bound:
    """A listener as actually bound (port 0 in tests is read back from here)."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def server_ssl_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """TLS 1.2 or newer; client certificates from ``client_ca`` required when it is set.

    A file that cannot be used stops the start with the config key that names it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for k, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable by this user"
            raise StartupError(f"http.{k}: cannot read {path}: {why}", exit_status=2)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(
            f"http.tls_cert, http.tls_key: {cert} and {key} are not a PEM certificate and its "
            f"private key: {getattr(e, 'reason', None) or e}",
            exit_status=2,
        ) from e
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise StartupError(
                f"http.tls_client_ca: {client_ca} holds no PEM CA certificate: {getattr(e, 'reason', None) or e}",
                exit_status=2,
            ) from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._shutdown_trigger = shutdown_trigger
        self.state_dir = Path(config.daemon.state_dir)
        self.consoles: dict[str, Console] = {}
        self.sessions: set[Session] = set()
        self.metrics = Metrics(lambda: self.consoles)
        self.conn_guard = ConnGuard(
            lambda: self.config.http.request_head_timeout_s, on_expire=self.metrics.http_head_timeout
        )
        self.limiter = FailureLimiter()
        self.auth = Authenticator(config.users, b"")
        self.audit: AuditLog | None = None
        self.switches: Switches | None = None
        self.ready = False
        self.bound: list[Bound] = []
        self.metrics_bound: Bound | None = None
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: DirWatcher | None = None
        # One epoll set reads every UART link, a bounded number per loop pass.
        self._reads: ReadMux | None = None
        self._runner: web.AppRunner | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._local_servers: dict[str, asyncio.AbstractServer] = {}
        self._local_paths: dict[str, Path] = {}
        self._stop = asyncio.Event()
        self._shut_down = False
        self._lock_fd = -1
        self._last_status = ""
        self._reload_lock = asyncio.Lock()
        self._batcher = OutputBatcher()
        self._log = log

    # --- task tracking ---------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("task_failed", task=task.get_name(), exc_info=task.exception())

    @contextlib.contextmanager
    def track_session(self, session: Session) -> Iterator[None]:
        self.sessions.add(session)
        try:
            yield
        finally:
            self.sessions.discard(session)

    # --- lifecycle ---------------------------------------------------------------

    async def serve(self) -> None:
        await self.startup()
        try:
            if self._shutdown_trigger is not None:
                stop = asyncio.ensure_future(self._shutdown_trigger())
                internal = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({stop, internal}, return_when=asyncio.FIRST_COMPLETED)
                for f in (stop, internal):
                    f.cancel()
            else:
                await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload(), name="reload"))

    async def startup(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        http = cfg.http
        # TLS files first: a bad one stops the start before any console is opened.
        if http.tls:
            self._ssl_ctx = server_ssl_context(http.tls_cert, http.tls_key, http.tls_client_ca)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            raise StartupError(f"cannot create state_dir {self.state_dir}: {e.strerror}") from e
        self._lock_state_dir()
        self._raise_fd_limit(len(cfg.consoles))
        self.auth = Authenticator(cfg.users, self._cookie_key())
        self.switches = Switches.load(self.state_dir / "switches.json")
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self._watcher = DirWatcher()
        self._reads = ReadMux.create()
        # Serial on purpose: creating files or sockets in one directory is
        # serialized by its inode lock, and a thread pool only added overhead
        # (measured: 5,000 consoles 1.8 s serial, 3.5 s with 16 threads).
        for ccfg in cfg.consoles:
            self._add_console(ccfg)
        t_consoles = time.monotonic()
        if cfg.daemon.unix_listen_dir:
            d = Path(cfg.daemon.unix_listen_dir)
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as e:
                raise StartupError(f"cannot create unix_listen_dir {d}: {e.strerror}") from e
            await self._start_locals(list(self.consoles.values()), d)
        t_locals = time.monotonic()
        await self._start_http()
        self.spawn(self._housekeeping(), name="housekeeping")
        self.ready = True
        t_ready = time.monotonic()
        self._log.info(
            "started",
            version=__version__,
            loop=loop_name(),
            consoles=len(self.consoles),
            listen=[b.url for b in self.bound],
            seconds=round(t_ready - t0, 3),
            # Where a slow start went: ring files (the disk), local sockets, the rest.
            consoles_s=round(t_consoles - t0, 3),
            local_sockets_s=round(t_locals - t_consoles, 3),
        )
        self._notify_status("READY=1")

    def _lock_state_dir(self) -> None:
        """One daemon per state_dir: two would interleave writes into the same ring files.

        A state_dir where the lock file cannot even be made (read-only or full
        file system) holds no ring this daemon could write either: it runs on
        with its logs in memory, as the ring log decides, and says so.
        """
        path = self.state_dir / "serialmuxd.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._log.error("state_dir_lock_unavailable", path=str(path), error=e.strerror)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise StartupError(
                f"another serialmuxd (pid {other}) is running with state_dir {self.state_dir}: "
                "stop it, or give this one its own state_dir"
            ) from None
        with contextlib.suppress(OSError):  # the pid is only a courtesy for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _raise_fd_limit(self, consoles: int) -> None:
        """Make room for ~4 descriptors per console (UART, local listener, QMP, a
        client; rings keep none open), as nginx's worker_rlimit_nofile does.

        The soft limit goes up to the hard one; with CAP_SYS_RESOURCE (root) the
        hard one too.  Short of that, say how many are needed: running out
        shows up much later as consoles that never connect.
        """
        need = FDS_PER_CONSOLE * consoles + FDS_SPARE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= need:
            return
        want_hard = hard if hard == resource.RLIM_INFINITY or hard >= need else need
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need if want_hard >= need else want_hard, want_hard))
        except (ValueError, OSError):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            self._log.warning(
                "fd_limit_low",
                limit=soft,
                needed=need,
                hint="raise LimitNOFILE= in the unit (or ulimit -n): consoles past the limit cannot connect",
            )

    def _status_line(self) -> str:
        up = sum(1 for c in self.consoles.values() if c.up)
        active = sum(1 for c in self.consoles.values() if c.active is not None)
        n = len(self.consoles)
        return (
            f"STATUS={n} console{'' if n == 1 else 's'}, {up} connected, "
            f"{active} interactive session{'' if active == 1 else 's'}"
        )

    def _notify_status(self, *also: str) -> None:
        """Tell systemd the counts (``systemctl status``), only when they changed."""
        line = self._status_line()
        if also or line != self._last_status:
            self._last_status = line
            sd_notify("\n".join((*also, line)))

    def _cookie_key(self) -> bytes:
        """A per-host secret for session cookies, kept so logins survive restarts."""
        path = self.state_dir / "cookie.key"
        try:
            key = path.read_bytes()
            if len(key) >= 32:
                return key
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.error("cookie_key_unreadable", error=e.strerror)
            return secrets.token_bytes(32)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
        except OSError as e:
            self._log.error("cookie_key_unwritable", error=e.strerror)
        return key

    def _open_ring(self, ccfg: ConsoleConfig) -> RingLog:
        # RingLog.open says what was wrong with the file in one line of its own
        # (moved aside, or kept in memory); bound here, that line names the console.
        with structlog.contextvars.bound_contextvars(console=ccfg.name):
            ring = RingLog.open(self.state_dir / f"{ccfg.name}.ring", ccfg.settings.ring_bytes)
        if ring.notice:
            self.metrics.ring_errors += 1
        if ring.error:
            self.metrics.ring_errors += 1
        return ring

    async def _start_locals(self, consoles: list[Console], d: Path) -> None:
        from serialmuxd.localsock import bind_socket, serve_socket

        group = self.config.daemon.unix_socket_group

        def bind(c: Console) -> socket.socket | OSError:
            try:
                return bind_socket(d / f"{c.name}.sock", group)
            except OSError as e:
                return e

        old = os.umask(0o117)  # never wider than 0660, even between bind and chmod
        try:
            socks = [bind(c) for c in consoles]
        finally:
            os.umask(old)
        for console, sock in zip(consoles, socks, strict=True):
            if isinstance(sock, OSError):
                self._log.error("local_socket_failed", console=console.name, error=sock.strerror)
                continue
            self._local_servers[console.name] = await serve_socket(self, console, sock)
            self._local_paths[console.name] = d / f"{console.name}.sock"

    def _add_console(self, ccfg: ConsoleConfig, ring: RingLog | None = None) -> Console:
        watcher, reads = self._watcher, self._reads

        def factory(spec: str, sink: Console) -> Backend:
            return make_backend(spec, sink, baud=ccfg.settings.baud, watcher=watcher, reads=reads)

        console = Console(
            ccfg,
            ring or self._open_ring(ccfg),
            factory,
            on_event=self._on_console_event,
            batcher=self._batcher,
        )
        if self.switches is not None:
            console.enabled = ccfg.name not in self.switches.disabled
            console.service_enabled = self.switches.service_enabled
        self.consoles[ccfg.name] = console
        task = console.start()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self._start_qmp(console)
        return console

    def _start_qmp(self, console: Console) -> None:
        if console.cfg.qmp is None:
            return
        from serialmuxd.qmp import QmpMonitor

        monitor = QmpMonitor(console, console.cfg.qmp_path or "", watcher=self._watcher)
        console.qmp = monitor
        self.spawn(monitor.run(), name=f"qmp:{console.name}")

    async def _start_local(self, console: Console) -> None:
        from serialmuxd.localsock import start_listener

        d = Path(self.config.daemon.unix_listen_dir)
        try:
            server = await start_listener(self, console, d, self.config.daemon.unix_socket_group)
        except OSError as e:
            self._log.error("local_socket_failed", console=console.name, error=e.strerror)
            return
        self._local_servers[console.name] = server
        self._local_paths[console.name] = d / f"{console.name}.sock"

    async def _start_http(self) -> None:
        from serialmuxd.web import build_app

        http = self.config.http
        ssl_ctx = self._ssl_ctx
        app = build_app(self)
        # Request lines up to 64 KiB: a /wait pattern of 4096 characters, percent-encoded,
        # must reach our handler (and its JSON error) rather than the parser's plain-text 400.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0, max_line_size=65536
        )
        await self._runner.setup()
        for addr in http.listen:
            host, port = validate_listen(addr)
            site = GuardedTCPSite(
                self._runner, host, port, guard=self.conn_guard, ssl_context=ssl_ctx, reuse_address=True
            )
            try:
                await site.start()
            except OSError as e:
                raise StartupError(f"cannot listen on {addr}: {e.strerror}") from e
            _tune_keepalive(site)
            self.bound.extend(_bound_of(site, ssl_ctx is not None))
        if http.metrics_listen:
            from serialmuxd.web import build_metrics_app

            self._metrics_runner = web.AppRunner(
                build_metrics_app(self), handle_signals=False, access_log=None
            )
            await self._metrics_runner.setup()
            host, port = validate_listen(http.metrics_listen)
            msite = GuardedTCPSite(
                self._metrics_runner, host, port, guard=self.conn_guard, reuse_address=True
            )
            try:
                await msite.start()
            except OSError as e:
                raise StartupError(f"cannot listen on {http.metrics_listen}: {e.strerror}") from e
            self.metrics_bound = _bound_of(msite, False)[0]

    async def _housekeeping(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            for c in list(self.consoles.values()):
                c.check_idle(now)
            for s in list(self.sessions):
                if s.ending is not None:
                    continue
                if s.connection_gone():
                    s.end(Ending(EndReason.CLIENT_LEFT))
                elif not s.heartbeat(now):
                    owner = self.consoles.get(s.console)
                    if owner is not None:
                        owner.drop(s, EndReason.UNRESPONSIVE, "no answer to pings")
                    else:
                        s.end(Ending(EndReason.UNRESPONSIVE, message="no answer to pings"))
            if now - last_flush >= FLUSH_EVERY_S:
                last_flush = now
                rings = [c.ring for c in self.consoles.values()]
                # msync off the loop: the ring is durable against a daemon crash
                # already (page cache); this only narrows the window of a host crash.
                await asyncio.to_thread(_flush_all, rings)
            self._notify_status()

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self.ready = False
        sd_notify("STOPPING=1")
        deadline = time.monotonic() + self.config.daemon.shutdown_timeout_s
        self._log.info("stopping", sessions=len(self.sessions))
        # 1. stop accepting
        for server in self._local_servers.values():
            server.close()
        if self._runner is not None:
            for site in list(self._runner.sites):
                site_server = getattr(site, "_server", None)
                if site_server is not None:
                    site_server.close()
        # 2. say goodbye to every session (1001) and let the pumps send it
        bye = Ending(EndReason.SHUTDOWN, message="serialmuxd is shutting down; reconnect when it is back")
        for c in self.consoles.values():
            c.end_all(bye)
        while self.sessions and time.monotonic() < deadline - 1.5:
            await asyncio.sleep(0.02)
        # 3. HTTP runner: cancels what is left of the handlers
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), max(0.5, deadline - time.monotonic() - 0.5))
        if self._metrics_runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._metrics_runner.cleanup(), 0.5)
        # 4. consoles: cancel backends, flush rings
        await asyncio.gather(*(c.stop(bye) for c in self.consoles.values()), return_exceptions=True)
        self._batcher.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.1, deadline - time.monotonic()))
        # One fdatasync per ring: 1,000 of them one after the other on the loop took
        # seconds.  Nothing appends any more, so worker threads close them side by side.
        rings = [c.ring for c in self.consoles.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.to_thread(_close_all, rings), max(0.1, deadline - time.monotonic())
            )
        for server in self._local_servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.2)
        for path in self._local_paths.values():
            with contextlib.suppress(OSError):
                path.unlink()
        if self._watcher is not None:
            self._watcher.close()
        if self._reads is not None:
            self._reads.close()
        if self.audit is not None:
            self.audit.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the state_dir lock
            self._lock_fd = -1
        self._log.info("stopped")

    # --- reload (SIGHUP) ----------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; untouched consoles keep their link and sessions.

        A file that does not load is refused with a log line and an audit event,
        and the running configuration stays.  Reloads run one at a time, so two
        quick SIGHUPs apply in order.
        """
        if self.config_path is None:
            self._log.warning("reload_ignored", detail="running without a config file (demo)")
            return False
        async with self._reload_lock:
            # systemd shows "reloading" until the READY=1 below.
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                try:
                    new = await asyncio.to_thread(load_config, self.config_path)
                except ConfigError as e:
                    self._log.error("reload_refused", error=str(e), detail="the running configuration stays")
                    self.audit_event("config_reload", user="", peer="signal", result="refused", reason=str(e))
                    return False
                await self.apply_config(new)
                return True
            finally:
                self._notify_status("READY=1")

    async def apply_config(self, new: Config) -> None:
        old = self.config
        new, pending = _merge_live(new, old)
        if pending:
            self._log.warning("reload_needs_restart", keys=pending, detail="these apply at the next restart")
        old_by = {c.name: c for c in old.consoles}
        new_by = {c.name: c for c in new.consoles}
        removed = [n for n in old_by if n not in new_by]
        added = [n for n in new_by if n not in old_by]
        changed = [n for n in new_by if n in old_by and _link_key(new_by[n]) != _link_key(old_by[n])]
        for name in removed:
            await self._remove_console(name, f"console {name} was removed from the configuration")
        for name in changed:
            await self._remove_console(
                name, f"console {name} was re-opened: its uart, qmp, baud or ring_bytes changed; reconnect"
            )
        self.config = new
        self.auth = Authenticator(new.users, self.auth._cookie_key)
        for name in added + changed:
            console = self._add_console(new_by[name])
            if new.daemon.unix_listen_dir:
                await self._start_local(console)
        for name, ccfg in new_by.items():
            if name not in added and name not in changed:
                self.consoles[name].cfg = ccfg  # replay, idle timeout, detach sequence…
        # Keep the order of the file for listings.
        self.consoles = {n: self.consoles[n] for n in new_by}
        revoked = self._end_revoked_sessions()
        self._log.info("reloaded", added=added, removed=removed, changed=changed, revoked=revoked)
        self.audit_event(
            "config_reload",
            user="",
            peer="signal",
            result="applied",
            added=added,
            removed=removed,
            changed=changed,
            sessions_revoked=revoked or None,
            restart_needed=pending or None,
        )

    def _end_revoked_sessions(self) -> int:
        """Close HTTP sessions whose user lost the role they need (4003).

        A reload that removes a user or a grant must not leave that user typing
        into a console.  Local-socket sessions are guarded by the socket's file
        mode and group, not by [[user]], so they stay.
        """
        from serialmuxd.auth import Principal
        from serialmuxd.config import Role
        from serialmuxd.localsock import LocalSession
        from serialmuxd.session import Mode

        if self.auth.open_access:
            return 0
        users = {u.name: Principal(u.name, u.roles) for u in self.config.users}
        n = 0
        for c in self.consoles.values():
            for s in c.sessions():
                if isinstance(s, LocalSession):
                    continue
                need = Role.CONTRIBUTOR if s.mode is Mode.INTERACTIVE else Role.READER
                p = users.get(s.user)
                if p is not None and p.may(need, c.name):
                    continue
                s.end(
                    Ending(
                        EndReason.DISABLED,
                        message=f"{need.label} on {c.name} was withdrawn from {s.user} by a configuration reload",
                    )
                )
                c.detach(s, EndReason.DISABLED)
                n += 1
        return n

    async def _remove_console(self, name: str, why: str) -> None:
        console = self.consoles.pop(name, None)
        if console is None:
            return
        server = self._local_servers.pop(name, None)
        if server is not None:
            server.close()
        path = self._local_paths.pop(name, None)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        await console.stop(Ending(EndReason.REMOVED, message=why))
        if console.qmp is not None:
            for t in list(self._tasks):
                if t.get_name() == f"qmp:{name}":
                    t.cancel()
        await asyncio.to_thread(console.ring.close)  # fdatasync: not on the loop

    # --- switches -----------------------------------------------------------------

    def set_enabled(self, console: str | None, enabled: bool, *, user: str, peer: str) -> None:
        sw = self.switches
        assert sw is not None
        # Recorded first: the audit trail shows the switch before the sessions it closes.
        self.audit_event(
            "enable" if enabled else "disable",
            console=console,
            user=user,
            peer=peer,
            offset=self.consoles[console].ring.next if console else None,
        )
        if console is None:
            sw.service_enabled = enabled
            sw.who["*"] = user
            for c in self.consoles.values():
                c.set_enabled(enabled, service=True)
        else:
            if enabled:
                sw.disabled.discard(console)
            else:
                sw.disabled.add(console)
            sw.who[console] = user
            self.consoles[console].set_enabled(enabled)
        try:
            sw.save()
        except OSError as e:
            self._log.error("switches_save_failed", error=e.strerror)

    # --- audit and request context -------------------------------------------------------

    def _on_console_event(self, event: str, console: Console, fields: dict[str, object]) -> None:
        if event in {"backend_up", "backend_down"}:
            return
        self.audit_event(event, console=console.name, offset=console.ring.next, **fields)

    def audit_event(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _trusted(self, addr: str | None) -> bool:
        if not addr or not self.config.http.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.config.http.trusted_proxies)

    def peer_address(self, request: web.BaseRequest) -> str:
        remote = request.remote or "unknown"
        if self._trusted(request.remote):
            fwd = request.headers.get("X-Forwarded-For", "")
            if fwd:
                return fwd.split(",")[-1].strip()[:64] or remote
        return remote

    def path_prefix(self, request: web.BaseRequest) -> str:
        prefix = self.config.http.path_prefix
        if self._trusted(request.remote):
            fwd = request.headers.get("X-Forwarded-Prefix", "").rstrip("/")
            if fwd:
                prefix = fwd
        return prefix

    def own_origins(self, request: web.BaseRequest) -> set[str]:
        scheme = "https" if self.config.http.tls else "http"
        host = request.host
        if self._trusted(request.remote):
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
        return {f"{scheme}://{host}"}


def _flush_all(rings: list[RingLog]) -> None:
    for r in rings:
        with contextlib.suppress(Exception):
            r.flush()


# A follower (log?follow=1) of a quiet console whose host vanished gets no write
# that could fail, and has no heartbeat: TCP keepalive finds it in 30 + 3 * 10 s
# rather than the kernel's default two hours.  Accepted sockets inherit these
# from the listener; aiohttp turns SO_KEEPALIVE on for each.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


def _tune_keepalive(site: web.TCPSite) -> None:
    import socket

    server = getattr(site, "_server", None)
    for sock in getattr(server, "sockets", None) or []:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def _close_all(rings: list[RingLog]) -> None:
    """Flush and release every ring, several at a time (fdatasync mostly waits on the disk)."""
    from concurrent.futures import ThreadPoolExecutor

    def close(r: RingLog) -> None:
        try:
            r.close()
        except Exception:
            log.exception("ring_close_failed", path=str(r.path))

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(rings))), thread_name_prefix="ring-close") as pool:
        list(pool.map(close, rings))


def _link_key(c: ConsoleConfig) -> tuple[object, ...]:
    """What, when changed, needs the console re-opened (the rest applies live)."""
    return (c.uart, c.qmp, c.qmp_chardev, c.settings.ring_bytes, c.settings.baud)


# Bound at start-up: a reload cannot move a listener or a directory.
_RESTART_HTTP = ("listen", "tls_cert", "tls_key", "tls_client_ca", "metrics_listen", "allow_plaintext")


def _merge_live(new: Config, old: Config) -> tuple[Config, list[str]]:
    """The new config with what only a restart can change kept as it runs; and those keys.

    [http] path_prefix, trusted_proxies, session_cookie_max_age_s and
    request_head_timeout_s apply live.
    """
    from dataclasses import fields, replace

    pending = [f"http.{k}" for k in _RESTART_HTTP if getattr(new.http, k) != getattr(old.http, k)]
    pending += [
        f"daemon.{f.name}"
        for f in fields(old.daemon)
        if getattr(new.daemon, f.name) != getattr(old.daemon, f.name)
    ]
    http = replace(new.http, **{k: getattr(old.http, k) for k in _RESTART_HTTP})
    return replace(new, http=http, daemon=old.daemon), pending


def _bound_of(site: web.TCPSite, tls: bool) -> list[Bound]:
    server = getattr(site, "_server", None)
    out: list[Bound] = []
    for sock in getattr(server, "sockets", None) or []:
        addr = sock.getsockname()
        out.append(Bound(addr[0], addr[1], tls))
    return out
