"""Who may do what: every route of the app × every kind of caller, and cookie auth with Origin.

The route table below is the access-control contract in one place.  The test
enumerates the routes the app really serves, so a route added without a row
here (and so without a decision about who may call it) fails the test.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from serialmuxd.auth import FailureLimiter, Principal, new_token, token_sha256
from serialmuxd.config import Role, parse_config
from serialmuxd.daemon import Daemon
from serialmuxd.pages import vendor_missing
from serialmuxd.web import COOKIE, build_app
from tests.conftest import DaemonFactory, url_of, wait_for
from tests.test_sessions import recv_json

CONSOLES = [{"name": "web-1", "uart": "demo:?boot=0"}, {"name": "db-1", "uart": "demo:?boot=0"}]

# The callers, in the column order of every expectation tuple below.
CALLERS = ("none", "bad", "reader", "contributor", "owner", "globber", "webowner")
GRANTS: dict[str, dict[str, str]] = {
    "reader": {"*": "reader"},
    "contributor": {"*": "contributor"},
    "owner": {"*": "owner"},
    # glob grants: the highest role of every matching glob wins
    "globber": {"web-*": "contributor", "*": "reader"},
    # no "*" grant at all: sees web-* consoles only, nothing service-wide
    "webowner": {"web-*": "owner"},
}


class Tokens:
    def __init__(self) -> None:
        self.tokens = {name: new_token() for name in GRANTS}

    def users(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "token_sha256": token_sha256(self.tokens[name]), "roles": roles}
            for name, roles in GRANTS.items()
        ]

    def header(self, caller: str) -> dict[str, str]:
        if caller == "none":
            return {}
        if caller == "bad":
            return {"Authorization": f"Bearer {new_token()}"}
        return {"Authorization": f"Bearer {self.tokens[caller]}"}

    def form_token(self, caller: str) -> str:
        if caller == "none":
            return ""
        return new_token() if caller == "bad" else self.tokens[caller]


@dataclass(frozen=True)
class Row:
    """One request and the status each caller must get (in CALLERS order)."""

    method: str
    route: str  # the route as the app names it (resource.canonical)
    expect: tuple[int, int, int, int, int, int, int]
    name: str = ""  # fills {name}
    query: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    ws: bool = False

    @property
    def path(self) -> str:
        return self.route.replace("{name}", self.name).replace("{path}", "app.css")

    def label(self) -> str:
        q = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{self.method} {self.path}" + (f"?{q}" if q else "")


ALL_OK = (200,) * 7
# none, bad, reader, contributor, owner, globber, webowner
READ_WEB = (401, 401, 200, 200, 200, 200, 200)
READ_DB = (401, 401, 200, 200, 200, 200, 403)
READ_SERVICE = (401, 401, 200, 200, 200, 200, 403)
ACT_WEB = (401, 401, 403, 200, 200, 200, 200)
ACT_DB = (401, 401, 403, 200, 200, 403, 403)
OWN_WEB = (401, 401, 403, 403, 200, 403, 200)
OWN_DB = (401, 401, 403, 403, 200, 403, 403)
OWN_SERVICE = (401, 401, 403, 403, 200, 403, 403)
# A console nobody configured: those with a grant on the name learn it does not
# exist (404); those without one get the same 403 as for a real console, so the
# answer never tells them which names exist.
READ_NOPE = (401, 401, 404, 404, 404, 404, 403)
ACT_NOPE = (401, 401, 403, 404, 404, 403, 403)
OWN_NOPE = (401, 401, 403, 403, 404, 403, 403)
# Pages: no credentials = "please log in" (303 to /login), a bad token = 401.
PAGE = 200 if not vendor_missing() else 503  # the console page needs the vendored terminal


def _ws(expect: tuple[int, ...]) -> tuple[int, int, int, int, int, int, int]:
    """A WebSocket upgrade that passes the checks answers 101."""
    t = tuple(101 if s == 200 else s for s in expect)
    assert len(t) == 7
    return t


def rows() -> list[Row]:
    out = [
        Row("GET", "/healthz", ALL_OK),
        Row("GET", "/readyz", ALL_OK),
        Row("GET", "/api/v1/openapi.json", ALL_OK),
        Row("GET", "/metrics", READ_SERVICE),
        Row("GET", "/api/v1/consoles", (401, 401, 200, 200, 200, 200, 200)),
        Row("GET", "/api/v1/service", READ_SERVICE),
        Row("POST", "/api/v1/service/disable", OWN_SERVICE),
        Row("POST", "/api/v1/service/enable", OWN_SERVICE),
        Row("GET", "/api/v1/audit", OWN_SERVICE),
        Row("GET", "/api/v1/audit", OWN_WEB, query={"console": "web-1"}),
        Row("GET", "/api/v1/audit", OWN_DB, query={"console": "db-1"}),
        # a bad parameter is no reason to tell a stranger anything but 401
        Row("GET", "/api/v1/audit", (401, 401, 400, 400, 400, 400, 400), query={"console": "a/b"}),
        Row(
            "GET",
            "/api/v1/consoles/{name}/session",
            (401, 401, 400, 400, 400, 400, 400),
            name="web-1",
            query={"mode": "bogus"},
        ),
        Row("GET", "/api/v1/consoles/{name}", (401, 401, 400, 400, 400, 400, 400), name="a b"),
        # web pages
        Row("GET", "/", (303, 401, 200, 200, 200, 200, 200)),
        Row("GET", "/login", ALL_OK),
        Row("POST", "/login", (401, 401, 303, 303, 303, 303, 303)),
        Row("POST", "/logout", (303,) * 7),
        Row("GET", "/console/{name}", (303, 401, PAGE, PAGE, PAGE, PAGE, PAGE), name="web-1"),
        Row("GET", "/console/{name}", (303, 401, PAGE, PAGE, PAGE, PAGE, 404), name="db-1"),
        Row("GET", "/static/{path}", ALL_OK),
    ]
    per_console = {
        "web-1": (READ_WEB, ACT_WEB, OWN_WEB),
        "db-1": (READ_DB, ACT_DB, OWN_DB),
        "nope": (READ_NOPE, ACT_NOPE, OWN_NOPE),
    }
    for name, (read, act, own) in per_console.items():
        base = "/api/v1/consoles/{name}"
        out += [
            Row("GET", base, read, name=name),
            Row("GET", base + "/log", read, name=name, query={"start": "0", "max_bytes": "64"}),
            Row(
                "GET", base + "/wait", read, name=name, query={"pattern": ".", "start": "0", "timeout_s": "0"}
            ),
            Row("GET", base + "/session", _ws(act), name=name, ws=True),
            Row("GET", base + "/session", _ws(read), name=name, query={"mode": "watch"}, ws=True),
            Row("POST", base + "/break", act, name=name),
            Row("POST", base + "/sysrq", act, name=name, body={"key": "h"}),
            Row("POST", base + "/nmi", act, name=name),
            Row("POST", base + "/reset", act, name=name),
            Row("POST", base + "/disable", own, name=name),
            Row("POST", base + "/enable", own, name=name),
        ]
    # HEAD is served wherever GET is, with the same checks; a WebSocket route
    # answers a HEAD that passes them with 400 (it is not an upgrade).
    heads = [
        Row(
            "HEAD",
            r.route,
            tuple(400 if s == 101 else s for s in r.expect),  # type: ignore[arg-type]
            name=r.name,
            query=r.query,
        )
        for r in out
        if r.method == "GET"
    ]
    return out + heads


async def call(s: aiohttp.ClientSession, base: str, row: Row, caller: str, tokens: Tokens) -> int:
    headers = tokens.header(caller)
    url = base + row.path
    if row.ws:
        try:
            ws = await s.ws_connect(url, params=row.query, headers=headers)
        except aiohttp.WSServerHandshakeError as e:
            return e.status
        hello = await recv_json(ws, "hello")
        assert hello["mode"] == row.query.get("mode", "interactive")
        await ws.close()
        return 101
    if row.route == "/login" and row.method == "POST":
        r = await s.post(url, data={"token": tokens.form_token(caller)}, allow_redirects=False)
        return r.status
    r = await s.request(
        row.method, url, params=row.query, headers=headers, json=row.body, allow_redirects=False
    )
    if r.status >= 400 and row.method != "HEAD" and r.content_type == "application/json":
        body = await r.json()
        assert body.get("error") and body.get("message"), (row.label(), caller, body)
    await r.read()
    return r.status


async def authz_daemon(make_daemon: DaemonFactory, tokens: Tokens) -> Daemon:
    d = await make_daemon(CONSOLES, users=tokens.users())
    # The table makes hundreds of failed logins on purpose; rate limiting has its own tests.
    d.limiter = FailureLimiter(burst=1_000_000)
    await wait_for(lambda: all(c.up for c in d.consoles.values()), what="demo consoles up")
    return d


def served_routes(d: Daemon) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in build_app(d).router.routes() if r.resource is not None}


async def test_every_route_answers_every_caller_as_the_access_table_says(make_daemon: DaemonFactory) -> None:
    """Roles are checked on every route and WebSocket upgrade: reader < contributor < owner,
    granted by console-name glob; no credentials or a bad token is 401, a missing role 403.
    A route the app serves without a row in this table fails the test."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    table = rows()
    missing = served_routes(d) - {(r.method, r.route) for r in table}
    assert not missing, f"routes with no access-control expectation in test_authz.py: {sorted(missing)}"
    base = url_of(d)
    wrong: list[str] = []
    async with aiohttp.ClientSession() as s:
        for row in table:
            for caller, want in zip(CALLERS, row.expect, strict=True):
                got = await call(s, base, row, caller, tokens)
                if got != want:
                    wrong.append(f"{row.label():60} {caller:12} want {want} got {got}")
                # Put the switches back so the next request sees the console enabled.
                if not d.switches or not d.switches.service_enabled or d.switches.disabled:
                    for name in list(d.switches.disabled if d.switches else ()):
                        d.set_enabled(name, True, user="test", peer="test")
                    d.set_enabled(None, True, user="test", peer="test")
                    await wait_for(lambda: all(c.state != "disabled" for c in d.consoles.values()))
                # A reset reboots the demo guest; actions need it up again.
                await wait_for(lambda: all(c.up for c in d.consoles.values()), what="consoles up")
    assert not wrong, "\n" + "\n".join(wrong)


async def test_console_list_shows_only_consoles_the_user_has_a_role_on(make_daemon: DaemonFactory) -> None:
    """GET /consoles lists exactly the consoles the caller's glob grants match."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    async with aiohttp.ClientSession() as s:
        for caller, names in (
            ("owner", {"web-1", "db-1"}),
            ("globber", {"web-1", "db-1"}),
            ("webowner", {"web-1"}),
        ):
            r = await s.get(url_of(d) + "/api/v1/consoles", headers=tokens.header(caller))
            assert {c["name"] for c in (await r.json())["consoles"]} == names, caller


async def test_refusals_say_which_role_is_missing(make_daemon: DaemonFactory) -> None:
    """A 403 names the role and the console; a 401 says how to authenticate."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    base = url_of(d) + "/api/v1"
    async with aiohttp.ClientSession() as s:
        r = await s.post(base + "/consoles/db-1/break", headers=tokens.header("globber"))
        assert r.status == 403
        assert (await r.json())["message"].startswith("contributor on db-1 required")
        r = await s.post(base + "/service/disable", headers=tokens.header("webowner"))
        assert 'owner on the whole service (a "*" grant) required' in (await r.json())["message"]
        r = await s.get(base + "/consoles")
        assert r.status == 401 and "Bearer" in (await r.json())["message"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


# --- open access (no users configured) ----------------------------------------------------


async def test_open_access_makes_every_local_caller_owner_but_refuses_bad_tokens(
    make_daemon: DaemonFactory,
) -> None:
    """With no users, a request without credentials is owner everywhere; a token that
    matches no user is still 401 (the client believes in a user that does not exist)."""
    d = await make_daemon(CONSOLES)
    await wait_for(lambda: all(c.up for c in d.consoles.values()))
    base = url_of(d) + "/api/v1"
    async with aiohttp.ClientSession() as s:
        for method, path in (
            ("GET", "/consoles"),
            ("GET", "/metrics"),
            ("POST", "/consoles/db-1/break"),
            ("POST", "/consoles/db-1/disable"),
            ("POST", "/consoles/db-1/enable"),
            ("GET", "/audit"),
        ):
            url = (url_of(d) if path == "/metrics" else base) + path
            r = await s.request(method, url)
            assert r.status == 200, (method, path, await r.text())
        ws = await s.ws_connect(base + "/consoles/web-1/session")
        assert (await recv_json(ws, "hello"))["user"] == "anonymous"
        await ws.close()
        r = await s.get(base + "/consoles", headers={"Authorization": f"Bearer {new_token()}"})
        assert r.status == 401


async def test_open_access_ignores_a_stale_session_cookie(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A browser keeping a cookie from when users were configured still works once the
    config has none: the page says "open access", so the API must agree."""
    d = await make_daemon(CONSOLES)
    async with aiohttp.ClientSession() as s:
        r = await s.get(url_of(d) + "/api/v1/consoles", headers={"Cookie": f"{COOKIE}=stale-value"})
        assert r.status == 200


async def test_open_access_refuses_cross_site_websocket_and_posts(make_daemon: DaemonFactory) -> None:
    """Open access trusts whoever reaches the listener, not every web site the operator's
    browser visits: a cross-origin upgrade or POST is refused, same-origin and
    non-browser clients (no Origin) are not."""
    d = await make_daemon(CONSOLES)
    await wait_for(lambda: all(c.up for c in d.consoles.values()))
    base = url_of(d)
    evil = {"Origin": "https://evil.example"}
    async with aiohttp.ClientSession() as s:
        r = await s.get(base + "/api/v1/consoles/web-1/session", headers={**evil, **UPGRADE})
        assert r.status == 403 and (await r.json())["error"] == "bad_origin"
        r = await s.post(base + "/api/v1/consoles/web-1/reset", headers=evil)
        assert r.status == 403
        ws = await s.ws_connect(base + "/api/v1/consoles/web-1/session", origin=base)
        await recv_json(ws, "hello")
        await ws.close()
        r = await s.post(base + "/api/v1/consoles/web-1/break")
        assert r.status == 200


async def test_open_access_refuses_requests_for_a_foreign_host_name(make_daemon: DaemonFactory) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is
    same-origin with itself; the Host header gives it away, and with open access a
    browser's request (Origin or Sec-Fetch-* headers) must be addressed to an IP
    address or localhost.  Programs may send any Host."""
    d = await make_daemon(CONSOLES)
    await wait_for(lambda: all(c.up for c in d.consoles.values()))
    port = d.bound[0].port
    evil_host = {"Host": f"evil.example:{port}"}
    url = url_of(d) + "/api/v1/consoles"
    async with aiohttp.ClientSession() as s:
        r = await s.post(url + "/web-1/break", headers={**evil_host, "Origin": f"http://evil.example:{port}"})
        assert r.status == 403 and (await r.json())["error"] == "bad_host"
        r = await s.get(url, headers={**evil_host, "Sec-Fetch-Site": "same-origin"})
        assert r.status == 403
        r = await s.get(url, headers={"Host": f"localhost:{port}", "Sec-Fetch-Site": "same-origin"})
        assert r.status == 200
        r = await s.get(url, headers={"Host": f"[::1]:{port}", "Sec-Fetch-Site": "same-origin"})
        assert r.status == 200
        r = await s.get(url, headers=evil_host)
        assert r.status == 200
        r = await s.get(url_of(d) + "/healthz", headers={**evil_host, "Sec-Fetch-Site": "same-origin"})
        assert r.status == 200


# --- cookies and Origin -----------------------------------------------------------------------

UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}


def cookie_for(d: Daemon, tokens: Tokens, caller: str, max_age: int = 3600, now: float | None = None) -> str:
    principal = d.auth.from_token(tokens.tokens[caller])
    assert principal is not None
    return d.auth.make_cookie(principal, max_age, now=now)


def jar(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={value}"}


async def test_cookie_websocket_upgrade_from_another_origin_is_refused_before_upgrade(
    make_daemon: DaemonFactory,
) -> None:
    """Cross-site WebSocket hijacking: a valid cookie with a foreign (or no) Origin gets
    403 and a JSON error before the upgrade; from the daemon's own origin it works."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    base = url_of(d)
    url = base + "/api/v1/consoles/web-1/session"
    cookie = jar(cookie_for(d, tokens, "contributor"))
    async with aiohttp.ClientSession() as s:
        for origin in ("https://evil.example", "http://127.0.0.1", base.replace("http:", "https:"), "null"):
            r = await s.get(url, headers={**cookie, **UPGRADE, "Origin": origin})
            assert r.status == 403, origin
            assert r.content_type == "application/json"
            body = await r.json()
            assert body["error"] == "bad_origin" and origin in body["message"]
        r = await s.get(url, headers={**cookie, **UPGRADE})
        assert r.status == 403 and (await r.json())["error"] == "bad_origin"
        for mode in ("interactive", "watch"):
            ws = await s.ws_connect(url, params={"mode": mode}, headers=cookie, origin=base)
            hello = await recv_json(ws, "hello")
            assert hello["user"] == "contributor" and hello["mode"] == mode
            await ws.close()
    assert d.consoles["web-1"].active is None


async def test_cookie_posts_need_the_daemons_own_origin_and_reads_do_not(make_daemon: DaemonFactory) -> None:
    """A state-changing request on a cookie needs Origin = the daemon's own origin;
    a GET (which a cross-site page cannot read) does not."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    base = url_of(d)
    url = base + "/api/v1/consoles/web-1/break"
    cookie = jar(cookie_for(d, tokens, "contributor"))
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, headers=cookie)
        assert r.status == 403 and (await r.json())["error"] == "bad_origin"
        r = await s.post(url, headers={**cookie, "Origin": "https://evil.example"})
        assert r.status == 403
        r = await s.post(url, headers={**cookie, "Origin": base})
        assert r.status == 200
        r = await s.get(base + "/api/v1/consoles/web-1", headers=cookie)
        assert r.status == 200


async def test_bearer_token_requests_need_no_origin(make_daemon: DaemonFactory) -> None:
    """Programs authenticate with a bearer header, which no other site can attach: no Origin check."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    base = url_of(d) + "/api/v1/consoles/web-1"
    async with aiohttp.ClientSession() as s:
        r = await s.post(base + "/break", headers=tokens.header("contributor"))
        assert r.status == 200
        ws = await s.ws_connect(base + "/session", headers=tokens.header("contributor"))
        await recv_json(ws, "hello")
        await ws.close()


async def test_expired_tampered_and_foreign_cookies_are_refused(make_daemon: DaemonFactory) -> None:
    """A cookie past its expiry, with any byte changed, naming another user, or signed
    by another daemon's key is 401 (never 500), and counts as a failed login."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    url = url_of(d) + "/api/v1/consoles"
    good = cookie_for(d, tokens, "reader")
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)).decode()
    name, expiry, mac = raw.split("|")

    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    from serialmuxd.auth import Authenticator

    foreign = Authenticator(d.config.users, b"k" * 32)
    reader = d.auth.from_token(tokens.tokens["reader"])
    assert reader is not None
    bad = {
        "expired": cookie_for(d, tokens, "reader", max_age=60, now=time.time() - 3600),
        "other user": enc(f"owner|{expiry}|{mac}"),
        "later expiry": enc(f"{name}|{int(expiry) + 86400}|{mac}"),
        "flipped mac": enc(f"{name}|{expiry}|{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"),
        "non-ascii mac": enc(f"{name}|{expiry}|{'é' * 64}"),
        "no mac": enc(f"{name}|{expiry}"),
        "huge expiry": enc(f"{name}|{'9' * 5000}|{mac}"),
        "not base64": "%%%",
        "empty": "",
        "other key": foreign.make_cookie(reader, 3600),
    }
    async with aiohttp.ClientSession() as s:
        r = await s.get(url, headers=jar(good))
        assert r.status == 200
        before = d.metrics.auth_failures
        for what, value in bad.items():
            r = await s.get(url, headers=jar(value))
            assert r.status == 401, what
            assert (await r.json())["error"] == "unauthorized"
        assert d.metrics.auth_failures == before + len(bad)


async def test_rotating_a_users_token_logs_out_their_cookies(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """A new token_sha256 for a user in the config (on reload) invalidates every cookie
    issued for the old one; other users' cookies stay valid."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    url = url_of(d) + "/api/v1/consoles"
    old_reader = cookie_for(d, tokens, "reader")
    owner = cookie_for(d, tokens, "owner")
    tokens.tokens["reader"] = new_token()
    new = parse_config(
        {
            "daemon": {"state_dir": d.config.daemon.state_dir},
            "http": {"listen": ["127.0.0.1:0"]},
            "console": CONSOLES,
            "user": tokens.users(),
        }
    )
    await d.apply_config(new)
    async with aiohttp.ClientSession() as s:
        assert (await s.get(url, headers=jar(old_reader))).status == 401
        assert (await s.get(url, headers=jar(owner))).status == 200
        assert (await s.get(url, headers=tokens.header("reader"))).status == 200
        assert (await s.get(url, headers=jar(cookie_for(d, tokens, "reader")))).status == 200


async def test_web_login_cookie_opens_a_same_origin_session_and_not_a_cross_origin_one(
    make_daemon: DaemonFactory,
) -> None:
    """End to end through POST /login: the cookie it sets is HttpOnly, SameSite=Strict,
    has an expiry, and works for a same-origin WebSocket only."""
    tokens = Tokens()
    d = await authz_daemon(make_daemon, tokens)
    base = url_of(d)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        r = await s.post(
            base + "/login",
            data={"token": tokens.tokens["contributor"]},
            headers={"Origin": base},
            allow_redirects=False,
        )
        assert r.status == 303
        morsel = r.cookies[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict"
        assert int(morsel["max-age"]) == d.config.http.session_cookie_max_age_s
        assert not morsel["secure"]  # plain HTTP on loopback; test_pages checks Secure over TLS
        url = base + "/api/v1/consoles/web-1/session"
        ws = await s.ws_connect(url, origin=base)
        assert (await recv_json(ws, "hello"))["user"] == "contributor"
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(url, origin="https://evil.example")
        assert e.value.status == 403
        r = await s.post(base + "/logout", headers={"Origin": base}, allow_redirects=False)
        assert r.status == 303
        r = await s.get(base + "/api/v1/consoles")
        assert r.status == 401


async def test_a_valid_token_between_guesses_does_not_reset_the_failure_count(
    make_daemon: DaemonFactory,
) -> None:
    """Holding one good token must not buy unlimited guesses at others: failures from a
    peer are slowed down (429 + Retry-After) even when valid requests come in between."""
    tokens = Tokens()
    d = await make_daemon(CONSOLES, users=tokens.users())
    url = url_of(d) + "/api/v1/consoles"
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            for _ in range(4):
                statuses.append((await s.get(url, headers=tokens.header("bad"))).status)
            statuses.append((await s.get(url, headers=tokens.header("reader"))).status)
    assert statuses[:5] == [401, 401, 401, 401, 200]
    assert 429 in statuses, statuses


async def test_a_disabled_console_stays_disabled_across_restarts_and_config_edits(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """An owner's per-console "off" is kept in state_dir: after a restart the console is
    listed as disabled and refuses sessions and actions with a sentence saying how to
    enable it; dropping it from the config and adding it back does not switch it on."""
    tokens = Tokens()
    state = tmp_path / "switch-state"
    d = await make_daemon(CONSOLES, users=tokens.users(), state_dir=state)
    async with aiohttp.ClientSession() as s:
        r = await s.post(url_of(d) + "/api/v1/consoles/db-1/disable", headers=tokens.header("owner"))
        assert r.status == 200
    await d.shutdown()
    for consoles in (CONSOLES, CONSOLES[:1], CONSOLES):
        d = await make_daemon(consoles, users=tokens.users(), state_dir=state)
        await d.shutdown()
    d = await make_daemon(CONSOLES, users=tokens.users(), state_dir=state)
    await wait_for(lambda: d.consoles["web-1"].up and d.consoles["db-1"].up)
    base = url_of(d) + "/api/v1/consoles"
    async with aiohttp.ClientSession() as s:
        listing = (await (await s.get(base, headers=tokens.header("reader"))).json())["consoles"]
        assert {c["name"]: (c["state"], c["enabled"]) for c in listing} == {
            "web-1": ("running", True),
            "db-1": ("disabled", False),
        }
        for method, path, role in (
            ("GET", "/db-1/session", "contributor"),
            ("POST", "/db-1/break", "contributor"),
            ("POST", "/db-1/reset", "owner"),
        ):
            upgrade = UPGRADE if path.endswith("/session") else {}
            r = await s.request(method, base + path, headers={**tokens.header(role), **upgrade})
            assert r.status == 409, path
            assert "POST /api/v1/consoles/db-1/enable" in (await r.json())["message"]
        r = await s.post(base + "/db-1/enable", headers=tokens.header("owner"))
        assert (await r.json())["state"] == "running"


def test_principal_roles_follow_the_highest_matching_glob() -> None:
    """Pure: grants by glob, each role including the ones before it; service-wide needs "*"."""
    p = Principal("g", (("web-*", Role.CONTRIBUTOR), ("*", Role.READER), ("web-9", Role.OWNER)))
    assert p.role_for("web-1") is Role.CONTRIBUTOR
    assert p.role_for("web-9") is Role.OWNER
    assert p.role_for("db-1") is Role.READER
    assert p.role_for(None) is Role.READER
    assert p.may(Role.READER, "web-1") and not p.may(Role.OWNER, "web-1")
    q = Principal("w", (("web-*", Role.OWNER),))
    assert q.role_for(None) is None and not q.may_see("db-1")
    assert not q.may(Role.READER, None)
