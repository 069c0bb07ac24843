"""The HTTP face of the daemon: REST, WebSocket sessions, health.

Handlers are thin: parse and check the request, ask the console, shape JSON.
Every refusal is ``{"error", "message"}`` with a sentence that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import WSMsgType, web

from serialmuxd import __version__
from serialmuxd.auth import ANONYMOUS_OWNER, Principal, need_message
from serialmuxd.config import Role, validate_console_name
from serialmuxd.console import Console, ConsoleUnavailable
from serialmuxd.errors import ActionFailed, ActionUnsupported, BackendDown
from serialmuxd.session import Ending, EndReason, Mode
from serialmuxd.wssession import StreamSession, WsSession

if TYPE_CHECKING:
    from serialmuxd.daemon import Daemon

log = structlog.get_logger("serialmuxd.web")
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
COOKIE = "serialmuxd_session"
# Keystrokes arrive in small frames; a paste is split by the client.  Larger
# frames are refused (1009) rather than buffered.
MAX_WS_MESSAGE = 64 * 1024
# A client that answers no ping for WS_HEARTBEAT_S * 1.5 is gone (vanished
# host, half-open TCP) and is dropped as ``unresponsive``.
WS_HEARTBEAT_S = 30.0
JSON_CT = "application/json"
# What ws.receive() returns once the client closed, the connection broke or a
# frame was bad (aiohttp has sent the close frame for the last).
_CLIENT_GONE = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})


# --- errors ------------------------------------------------------------------


def fail(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    body = json.dumps({"error": code, "message": message})
    exc = web.HTTPException(text=body, content_type=JSON_CT, headers=headers)
    exc.set_status(status)
    raise exc


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status, content_type=JSON_CT)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON, and every request is counted by route and code."""
    daemon = request.app[DAEMON]
    route = _route_label(request)
    status = 500
    # A whole request head arrived: the connection's deadline stops until the answer is sent.
    daemon.conn_guard.request_started(request.protocol)
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        if e.content_type != JSON_CT and e.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status, "http_error")
            message = {
                404: "no such page: see GET /api/v1/openapi.json for the API",
                405: f"{request.method} is not allowed here",
                413: "request body too large",
            }.get(e.status, e.reason)
            body = json.dumps({"error": code, "message": message})
            new = web.HTTPException(text=body, content_type=JSON_CT, headers=_keep_headers(e))
            new.set_status(e.status)
            raise new from None
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499
        raise
    finally:
        daemon.metrics.http_request(route, status)
        daemon.conn_guard.request_finished(request.protocol)


def _keep_headers(e: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in e.headers.items() if k in {"Allow", "Retry-After", "WWW-Authenticate"}}


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) else "unmatched"


# --- auth ----------------------------------------------------------------------


def peer_of(request: web.Request) -> str:
    return request.app[DAEMON].peer_address(request)


async def authenticate(request: web.Request) -> Principal:
    """Who is asking (401 if nobody we know); rate-limits repeated failures (429)."""
    daemon = request.app[DAEMON]
    peer = peer_of(request)
    now = time.monotonic()
    wait = daemon.limiter.retry_after(peer, now)
    if wait > 0:
        daemon.metrics.auth_failures += 1
        fail(
            429,
            "too_many_failures",
            f"too many failed logins from {peer}: wait {wait:.0f} s and check your token",
            {"Retry-After": str(max(1, round(wait)))},
        )
    principal: Principal | None = None
    presented = False
    header = request.headers.get("Authorization", "")
    if header:
        presented = True
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            principal = daemon.auth.from_token(token.strip())
    elif COOKIE in request.cookies and not daemon.auth.open_access:
        # (With no users no cookie can be valid: one left from before is ignored,
        # as the pages ignore it.)
        presented = True
        principal = daemon.auth.from_cookie(request.cookies[COOKIE])
        if principal is not None:
            check_origin(request)
    if principal is not None:
        daemon.limiter.succeeded(peer)
        return principal
    if not presented and daemon.auth.open_access:
        check_open_access(request)
        return ANONYMOUS_OWNER
    daemon.limiter.failed(peer, now)
    daemon.metrics.auth_failures += 1
    daemon.audit_event("auth_failure", user="", peer=peer, reason="bad token" if presented else "no token")
    if presented:
        fail(
            401,
            "unauthorized",
            "the token or session is not valid: log in again or check your token",
            {"WWW-Authenticate": 'Bearer realm="serialmuxd"'},
        )
    fail(
        401,
        "unauthorized",
        "authentication required: send Authorization: Bearer <token> or log in at /login",
        {"WWW-Authenticate": 'Bearer realm="serialmuxd"'},
    )


def check_open_access(request: web.Request) -> None:
    """Open access trusts whoever reaches the listener, not every site the operator browses.

    A browser sends Origin on WebSocket upgrades and cross-site POSTs, so a
    foreign Origin is refused as with cookies; programs send none.  DNS
    rebinding (evil.example re-resolved to 127.0.0.1) is same-origin with
    itself, so a browser's request (Origin or Sec-Fetch-*, which pages cannot
    forge or drop) must be addressed to an IP address or localhost, never to a
    name someone else controls.
    """
    own = request.app[DAEMON].own_origins(request)
    hosts = {urlsplit(o).hostname or "" for o in own}
    browser = "Origin" in request.headers or any(k.lower().startswith("sec-fetch-") for k in request.headers)
    if browser and not any(h == "localhost" or h.endswith(".localhost") or _is_ip(h) for h in hosts):
        fail(
            403,
            "bad_host",
            "this daemon has no users (open access) and answers only requests addressed to an "
            "IP address or localhost: use its address, or configure users to serve a host name",
        )
    check_origin(request, required=False)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_origin(request: web.Request, *, required: bool = True) -> None:
    """Cookie-authenticated upgrades and writes must come from our own page.

    Browsers attach cookies to cross-site WebSocket upgrades (SameSite does
    not cover every case), so Origin is what stops cross-site hijacking.
    """
    is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
    if request.method in {"GET", "HEAD", "OPTIONS"} and not is_ws:
        return
    origin = request.headers.get("Origin")
    if origin is None:
        if not required:
            return
        fail(
            403,
            "bad_origin",
            "cookie-authenticated requests need an Origin header: use the web page or a token",
        )
    own = request.app[DAEMON].own_origins(request)
    if origin not in own:
        fail(
            403,
            "bad_origin",
            f"requests from {origin} are not allowed: open the console from its own page",
        )


async def require(request: web.Request, role: Role, console: str | None) -> Principal:
    principal = await authenticate(request)
    if not principal.may(role, console):
        fail(403, "forbidden", need_message(role, console))
    return principal


def get_console(request: web.Request) -> Console:
    name = request.match_info["name"]
    reason = validate_console_name(name)
    if reason:
        fail(400, "bad_name", reason)
    console = request.app[DAEMON].consoles.get(name)
    if console is None:
        fail(
            404,
            "no_such_console",
            f"there is no console named {name}: GET /api/v1/consoles lists them",
        )
    return console


async def console_for(request: web.Request, role: Role) -> tuple[Console, Principal]:
    principal = await authenticate(request)
    name = request.match_info["name"]
    # The role is checked on the name before the console is looked up, so only
    # those with a role on a name learn whether it exists (404).
    if validate_console_name(name) is None and not principal.may(role, name):
        fail(403, "forbidden", need_message(role, name))
    return get_console(request), principal


# --- JSON shapes ---------------------------------------------------------------


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> float:
    v = value.strip()
    if v.endswith(("Z", "z")):
        v = v[:-1] + "+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        raise ValueError("no time zone")
    return dt.timestamp()


def console_json(c: Console) -> dict[str, Any]:
    s = c.active
    out: dict[str, Any] = {
        "name": c.name,
        "state": c.state,
        "enabled": c.enabled and c.service_enabled,
        "backend": c.cfg.uart,
        "session": None if s is None else {"user": s.user, "peer": s.peer, "since": rfc3339(s.since)},
        "watchers": c.watcher_count,
        "log": {"first": c.ring.first, "next": c.ring.next, "capacity": c.ring.capacity},
        "link": "up" if c.up else "down",
        "reason": c.down_reason if not c.up else "",
        "vm_status": c.vm_status,
    }
    if c.ring.error:
        out["log"]["error"] = c.ring.error
    return out


# --- handlers --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    if not daemon.ready:
        fail(503, "not_ready", "serialmuxd is starting or stopping: retry in a moment")
    return json_response({"status": "ready", "consoles": len(daemon.consoles)})


async def list_consoles(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    daemon = request.app[DAEMON]
    visible = [console_json(c) for c in daemon.consoles.values() if principal.may_see(c.name)]
    return json_response({"consoles": visible})


async def get_console_info(request: web.Request) -> web.Response:
    console, _ = await console_for(request, Role.READER)
    return json_response(console_json(console))


def _int_param(request: web.Request, key: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return None
    if not re.fullmatch(r"-?\d{1,19}", raw):
        fail(400, "bad_parameter", f"{key} must be an integer, got {raw[:40]!r}")
    v = int(raw)
    if not lo <= v <= hi:
        fail(400, "bad_parameter", f"{key} must be between {lo} and {hi}")
    return v


def _bool_param(request: web.Request, key: str) -> bool:
    raw = request.query.get(key, "").lower()
    if raw in {"", "0", "false", "no"}:
        return False
    if raw in {"1", "true", "yes"}:
        return True
    fail(400, "bad_parameter", f"{key} must be 1 or 0")


async def read_log(request: web.Request) -> web.StreamResponse:
    console, principal = await console_for(request, Role.READER)
    start = _int_param(request, "start", -(1 << 62), 1 << 62)
    max_bytes = _int_param(request, "max_bytes", 0, 1 << 40)
    follow = _bool_param(request, "follow")
    since = request.query.get("since")
    if since is not None:
        if start is not None:
            fail(400, "bad_parameter", "give start or since, not both")
        try:
            when = parse_rfc3339(since)
        except ValueError:
            fail(
                400,
                "bad_parameter",
                f"since must be an RFC 3339 time such as 2026-11-27T07:00:00Z, got {since[:40]!r}",
            )
        start = console.ring.offset_at(when)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    if not follow:
        first, data, truncated = console.ring.read(start, max_bytes)
        headers.update(
            {
                "X-Log-Start": str(first),
                "X-Log-Next": str(first + len(data)),
                "X-Log-Truncated": "true" if truncated else "false",
            }
        )
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)
    daemon = request.app[DAEMON]
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/octet-stream"
    session = StreamSession(
        resp,
        console=console.name,
        user=principal.name,
        peer=peer_of(request),
        bound=console.cfg.settings.client_buffer_bytes,
    )
    try:
        first, data, truncated = console.follow(session, start)
    except ConsoleUnavailable as e:
        fail(409, e.code, str(e))
    resp.headers["X-Log-Start"] = str(first)
    resp.headers["X-Log-Next"] = str(first + len(data))
    resp.headers["X-Log-Truncated"] = "true" if truncated else "false"
    reason = EndReason.CLIENT_LEFT
    with daemon.track_session(session):
        try:
            await resp.prepare(request)
            if data:
                await resp.write(data)
            data = b""  # up to a whole ring: not kept for the life of the follow
            await session.pump()
        except ConnectionError:
            # The follower left or was cut (too slow): an ordinary end, not a server error.
            reason = EndReason.CLIENT_LEFT
        finally:
            session.end(Ending(reason))
            console.detach(session, session.ending.reason if session.ending else reason)
    return resp


async def ws_session(request: web.Request) -> web.StreamResponse:
    mode_s = request.query.get("mode", "interactive")
    if mode_s not in {"interactive", "watch"}:
        await authenticate(request)  # strangers get 401, whatever they send
        fail(400, "bad_parameter", "mode must be interactive or watch")
    mode = Mode(mode_s)
    console, principal = await console_for(
        request, Role.CONTRIBUTOR if mode is Mode.INTERACTIVE else Role.READER
    )
    if not (console.enabled and console.service_enabled):
        fail(409, "disabled", console.disabled_message())
    daemon = request.app[DAEMON]
    # aiohttp refuses a message of max_msg_size bytes itself: + 1 lets a 64 KiB frame in.
    # No aiohttp heartbeat and no autoping: the session answers pings and sees
    # pongs itself, and housekeeping pings the silent (WsSession.heartbeat).
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE + 1, autoping=False, compress=False)
    await ws.prepare(request)
    session = WsSession(
        ws,
        console=console.name,
        user=principal.name,
        peer=peer_of(request),
        mode=mode,
        bound=console.cfg.settings.client_buffer_bytes,
        heartbeat_s=WS_HEARTBEAT_S,
    )
    try:
        start, replay = console.attach(session)
    except ConsoleUnavailable as e:
        await ws.send_json({"type": "error", "error": e.code, "message": str(e)})
        await ws.close(code=EndReason.DISABLED.code, message=e.code.encode())
        return ws
    session.control(
        {
            "type": "hello",
            "console": console.name,
            "session": session.id,
            "user": principal.name,
            "mode": mode.value,
            "state": console.state,
            "log_next": start + len(replay),
            "replay_start": start,
        }
    )
    replay_n = len(replay)
    if replay:
        session.deliver(replay)
    del replay  # queued (copied): this frame lives as long as the session
    # Plain calls, not the context manager (track_session): its suspended
    # generator frame costs ~0.8 KiB per running session.
    daemon.sessions.add(session)
    ctx = {"console": console.name, "session": session.id, "user": principal.name, "peer": session.peer}
    try:
        log.info("session_started", mode=mode.value, replay_bytes=replay_n, **ctx)
        try:
            # One loop in this frame, not `async for` in a helper: every coroutine
            # frame suspended here lives as long as the session.
            while True:
                msg = await ws.receive()
                session.heard()
                if msg.type in _CLIENT_GONE or session.ending is not None:
                    break
                if msg.type is WSMsgType.PONG:
                    continue
                if session.over_bound:
                    # Pings or bad frames from a client that never reads the answers.
                    console.drop_too_slow(session)
                    break
                # The log context is bound while a frame is handled, not for the
                # session's whole idle life (~0.5 KiB per session).
                tokens = structlog.contextvars.bind_contextvars(**ctx)
                try:
                    await _client_frame(ws, msg, session, console)
                finally:
                    structlog.contextvars.reset_contextvars(**tokens)
        finally:
            session.end(Ending(EndReason.CLIENT_LEFT))
            console.detach(session, session.ending.reason if session.ending else EndReason.CLIENT_LEFT)
            # Ending the session started its pump, if it was not running, to say goodbye.
            pump = session.sender
            if pump is not None:
                try:
                    async with asyncio.timeout(3):
                        await asyncio.shield(pump)
                except (TimeoutError, ConnectionError):
                    pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                    await pump
            ending = session.ending
            log.info("session_ended", reason=ending.reason.label if ending else "client_left", **ctx)
    finally:
        daemon.sessions.discard(session)
    return ws


async def _client_frame(
    ws: web.WebSocketResponse, msg: aiohttp.WSMessage, session: WsSession, console: Console
) -> None:
    if msg.type is WSMsgType.BINARY:
        if session.mode is Mode.WATCH:
            session.control(
                {
                    "type": "error",
                    "error": "read_only",
                    "message": "this is a watch session: reconnect without mode=watch to type",
                }
            )
            return
        console.write(session, msg.data)
        await console.drain()
    elif msg.type is WSMsgType.TEXT:
        await _control(session, console, msg.data)
    elif msg.type is WSMsgType.PING:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.pong(msg.data)


async def _control(session: WsSession, console: Console, text: str) -> None:
    def error(code: str, message: str) -> None:
        session.control({"type": "error", "error": code, "message": message})

    try:
        msg = json.loads(text)
    except ValueError:
        error("bad_message", 'control messages are JSON objects such as {"type":"ping"}')
        return
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        error("bad_message", 'control messages are JSON objects with a string "type"')
        return
    kind = msg["type"]
    if kind == "ping":
        session.control({"type": "pong"})
        return
    if kind not in {"break", "sysrq", "nmi", "reset"}:
        error(
            "unknown_type",
            f"unknown control message type {kind[:40]!r}: use break, sysrq, nmi, reset or ping",
        )
        return
    if session.mode is not Mode.INTERACTIVE or console.active is not session:
        error("read_only", "actions need the interactive session: reconnect without mode=watch")
        return
    key = msg.get("key")
    if kind == "sysrq" and not (isinstance(key, str) and len(key) == 1):
        error("bad_message", 'sysrq needs a one-letter "key", e.g. {"type":"sysrq","key":"h"}')
        return
    try:
        await run_action(
            console,
            kind,
            key if isinstance(key, str) else None,
            session.user,
            session.peer,
            session.id,
        )
    except ActionError as e:
        error(e.code, e.message)


class ActionError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def run_action(
    console: Console, kind: str, key: str | None, user: str, peer: str, session_id: str | None
) -> None:
    """Shared by POST routes and WebSocket control frames; audited."""
    try:
        if kind == "break":
            await console.send_break()
        elif kind == "sysrq":
            await console.sysrq(key or "")
        elif kind == "nmi":
            await console.nmi()
        elif kind == "reset":
            await console.reset()
    except ConsoleUnavailable as e:
        raise ActionError(409, e.code, str(e)) from None
    except ActionUnsupported as e:
        raise ActionError(409, "unsupported", str(e)) from None
    except (ActionFailed, BackendDown) as e:
        raise ActionError(409, "action_failed", str(e)) from None
    except ValueError as e:
        raise ActionError(400, "bad_parameter", str(e)) from None
    console.audit_action(kind, user=user, peer=peer, session_id=session_id, key=key)


def make_action_handler(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        console, principal = await console_for(request, Role.CONTRIBUTOR)
        key: str | None = None
        if kind == "sysrq":
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                fail(400, "bad_body", 'send a JSON body such as {"key": "h"}')
            k = body.get("key") if isinstance(body, dict) else None
            if not isinstance(k, str) or len(k) != 1:
                fail(400, "bad_body", 'sysrq needs a one-letter "key", e.g. {"key": "h"}')
            key = k
        try:
            await run_action(console, kind, key, principal.name, peer_of(request), None)
        except ActionError as e:
            fail(e.status, e.code, e.message)
        return json_response({"ok": True, "console": console.name, "action": kind})

    return handler


WAIT_WINDOW = 64 * 1024
WAIT_POLL_S = 0.05
WAIT_MAX_S = 3600


def compile_pattern(pattern: str) -> Any:
    """A user's regex, compiled for RE2: linear time, no backreferences."""
    import re2

    opts = re2.Options()
    opts.log_errors = False
    try:
        return re2.compile(pattern.encode("utf-8", "surrogateescape"), opts)
    except re2.error as e:
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        fail(400, "bad_pattern", f"pattern is not a valid RE2 regular expression: {msg}")


async def wait_output(request: web.Request) -> web.Response:
    """Test rigs' expect: wait until output from ``start`` matches ``pattern``.

    Polls the ring rather than hooking the hot path: a waiting client costs
    nothing per chunk, and the search runs on a bounded window so a pattern
    can never make the loop spend more than linear time on 64 KiB.
    """
    console, _ = await console_for(request, Role.READER)
    pattern = request.query.get("pattern")
    if not pattern:
        fail(400, "bad_parameter", "pattern is required, e.g. pattern=login:")
    if len(pattern) > 4096:
        fail(400, "bad_parameter", "pattern must be at most 4096 characters")
    regex = compile_pattern(pattern)
    start = _int_param(request, "start", -(1 << 62), 1 << 62)
    timeout_s = _int_param(request, "timeout_s", 0, WAIT_MAX_S)
    timeout = 30 if timeout_s is None else timeout_s
    ring = console.ring
    if start is None:
        pos = ring.next
    else:
        pos, _, _ = ring.read(start, 0)
    window = bytearray()
    window_base = pos
    deadline = time.monotonic() + timeout
    while True:
        # At most WAIT_WINDOW new bytes per search, after the previous WAIT_WINDOW: every
        # byte is searched (a match up to WAIT_WINDOW long is found wherever it lies),
        # and the loop gets a turn between searches while a reader catches up.
        first, data, _ = ring.read(pos, WAIT_WINDOW)
        if first > pos:  # the ring overtook us: carry on from what is still there
            window.clear()
            window_base = first
        pos = first + len(data)
        if data:
            window += data
            m = regex.search(bytes(window))
            if m is not None:
                return json_response(
                    {
                        "match": m.group(0).decode(errors="replace"),
                        "start": window_base + m.start(),
                        "end": window_base + m.end(),
                    }
                )
            if len(window) > WAIT_WINDOW:
                cut = len(window) - WAIT_WINDOW
                del window[:cut]
                window_base += cut
            if pos < ring.next:
                await asyncio.sleep(0)
                continue
        if time.monotonic() >= deadline:
            return json_response(
                {"error": "timeout", "message": f"no match for the pattern within {timeout} s", "next": pos},
                status=408,
            )
        transport = request.transport
        if transport is None or transport.is_closing():
            # The caller hung up: stop matching for nobody (499, as nginx logs it).
            return web.Response(status=499)
        await asyncio.sleep(WAIT_POLL_S)


async def switch_console(request: web.Request) -> web.Response:
    console, principal = await console_for(request, Role.OWNER)
    enable = request.path.endswith("/enable")
    request.app[DAEMON].set_enabled(console.name, enable, user=principal.name, peer=peer_of(request))
    return json_response(console_json(console))


async def get_service(request: web.Request) -> web.Response:
    await require(request, Role.READER, None)
    sw = request.app[DAEMON].switches
    return json_response({"enabled": sw.service_enabled if sw else True})


async def switch_service(request: web.Request) -> web.Response:
    principal = await require(request, Role.OWNER, None)
    enable = request.path.endswith("/enable")
    daemon = request.app[DAEMON]
    daemon.set_enabled(None, enable, user=principal.name, peer=peer_of(request))
    return json_response({"enabled": enable})


async def get_audit(request: web.Request) -> web.Response:
    console = request.query.get("console")
    if console is not None:
        reason = validate_console_name(console)
        if reason:
            await authenticate(request)  # strangers get 401, whatever they send
            fail(400, "bad_parameter", reason)
    await require(request, Role.OWNER, console)
    since_raw = request.query.get("since")
    since: float | None = None
    if since_raw is not None:
        try:
            since = parse_rfc3339(since_raw)
        except ValueError:
            fail(
                400,
                "bad_parameter",
                f"since must be an RFC 3339 time such as 2026-11-27T07:00:00Z, got {since_raw[:40]!r}",
            )
    audit = request.app[DAEMON].audit
    events = [] if audit is None else await asyncio.to_thread(audit.read, console, since)
    return json_response({"events": events})


async def openapi(request: web.Request) -> web.Response:
    from serialmuxd.openapi import spec

    return json_response(spec(request.app[DAEMON].path_prefix(request)))


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024)
    app[DAEMON] = daemon
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_auth)
    r.add_get("/api/v1/consoles", list_consoles)
    r.add_get("/api/v1/consoles/{name}", get_console_info)
    r.add_get("/api/v1/consoles/{name}/log", read_log)
    r.add_get("/api/v1/consoles/{name}/session", ws_session)
    r.add_get("/api/v1/consoles/{name}/wait", wait_output)
    for kind in ("break", "sysrq", "nmi", "reset"):
        r.add_post(f"/api/v1/consoles/{{name}}/{kind}", make_action_handler(kind))
    r.add_post("/api/v1/consoles/{name}/enable", switch_console)
    r.add_post("/api/v1/consoles/{name}/disable", switch_console)
    r.add_get("/api/v1/service", get_service)
    r.add_post("/api/v1/service/enable", switch_service)
    r.add_post("/api/v1/service/disable", switch_service)
    r.add_get("/api/v1/audit", get_audit)
    r.add_get("/api/v1/openapi.json", openapi)
    from serialmuxd.pages import add_routes

    add_routes(app)
    return app


async def metrics_auth(request: web.Request) -> web.Response:
    await require(request, Role.READER, None)
    return _metrics_response(request)


async def metrics_open(request: web.Request) -> web.Response:
    return _metrics_response(request)


def _metrics_response(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    body = request.app[DAEMON].metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def build_metrics_app(daemon: Daemon) -> web.Application:
    """The unauthenticated scrape listener (``metrics_listen``): /metrics only."""
    app = web.Application(middlewares=[error_middleware])
    app[DAEMON] = daemon
    app.router.add_get("/metrics", metrics_open)
    app.router.add_get("/healthz", healthz)
    return app
