"""The web pages over real HTTP: login and logout, cookies, CSP, redirects, prefixes, static files.

What a browser does with these pages is in test_web_e2e.py; here the promises
are the ones a proxy, a security review or a cookie jar can see.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from serialmuxd import pages
from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, Users, url_of

DEMO = [{"name": "demo", "uart": "demo:?boot=0"}]
STATIC = Path(pages.STATIC_DIR)


async def start(make_daemon: DaemonFactory, users: Users, **kw: object) -> Daemon:
    return await make_daemon(DEMO, users=users.config(), **kw)


def session(**kw: object) -> aiohttp.ClientSession:
    # Each test drives its own cookie jar; unsafe=True keeps cookies for an IP host.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)  # type: ignore[arg-type]


def set_cookie(headers: CIMultiDictProxy[str]) -> str:
    values = [v for v in headers.getall("Set-Cookie", []) if v.startswith("serialmuxd_session=")]
    assert len(values) == 1, headers
    return values[0]


async def login(s: aiohttp.ClientSession, base: str, token: str, query: str = "") -> aiohttp.ClientResponse:
    return await s.post(
        f"{base}/login{query}",
        data={"token": token},
        headers={"Origin": base},
        allow_redirects=False,
    )


class Links(HTMLParser):
    """Every URL a page refers to (href, src, action)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in {"href", "src", "action"} and v is not None:
                self.urls.append(v)
        if tag == "script":
            self._in_script = True
            if not any(k == "src" for k, _ in attrs):
                self.inline_scripts += 1
        if any(k.startswith("on") for k, _ in attrs):
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def links_of(html: str) -> Links:
    p = Links()
    p.feed(html)
    return p


# --- login and logout --------------------------------------------------------------------


async def test_login_sets_an_httponly_strict_session_cookie_and_redirects_relatively(
    make_daemon: DaemonFactory, users: Users
) -> None:
    """POST /login with a good token: 303 to ./ and an HttpOnly, SameSite=Strict cookie with Max-Age."""
    d = await start(make_daemon, users, http={"session_cookie_max_age_s": 3600})
    base = url_of(d)
    async with session() as s:
        resp = await login(s, base, users.tokens["contributor"])
        assert resp.status == 303
        assert resp.headers["Location"] == "./"
        cookie = set_cookie(resp.headers)
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "max-age", "path"} <= attrs
        assert "SameSite=Strict" in cookie
        assert "Max-Age=3600" in cookie
        assert "Path=/;" in cookie + ";"
        assert "secure" not in attrs  # plain HTTP on loopback: a Secure cookie would never come back
        assert users.tokens["contributor"] not in cookie
        page = await s.get(base + "/")
        assert page.status == 200
        assert "Signed in as <strong>contributor</strong>" in await page.text()
        api = await s.get(base + "/api/v1/consoles")
        assert api.status == 200
        assert [c["name"] for c in (await api.json())["consoles"]] == ["demo"]


async def test_logout_clears_the_cookie_and_returns_to_the_login_page(
    make_daemon: DaemonFactory, users: Users
) -> None:
    """POST /logout: the cookie is expired (Max-Age=0, same path) and / asks for a login again."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        await login(s, base, users.tokens["reader"])
        assert (await s.get(base + "/", allow_redirects=False)).status == 200
        resp = await s.post(base + "/logout", headers={"Origin": base}, allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "login"
        cookie = set_cookie(resp.headers)
        assert cookie.startswith('serialmuxd_session="";') or cookie.startswith("serialmuxd_session=;")
        assert "Max-Age=0" in cookie and "Path=/" in cookie and "HttpOnly" in cookie
        again = await s.get(base + "/", allow_redirects=False)
        assert again.status == 303 and again.headers["Location"] == "login"


async def test_bad_token_gets_a_401_page_and_repeated_failures_are_rate_limited(
    make_daemon: DaemonFactory, users: Users
) -> None:
    """A wrong token shows the form again with a 401 and a reason; the sixth try in a row gets 429."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        for _ in range(5):
            resp = await login(s, base, "smx_" + "x" * 43)
            assert resp.status == 401
            assert resp.content_type == "text/html"
            text = await resp.text()
            assert 'role="alert"' in text and "That token is not valid" in text
            assert "serialmuxd_session" not in resp.headers.get("Set-Cookie", "")
        limited = await login(s, base, users.tokens["owner"])  # even a good token waits
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert "Too many failed logins" in await limited.text()
    audit = [json.loads(line) for line in (d.state_dir / "audit.jsonl").read_text().splitlines()]
    failures = [e for e in audit if e["event"] == "auth_failure"]
    assert len(failures) == 5
    assert all(e["peer"] == "127.0.0.1" for e in failures)
    assert not any(users.tokens["owner"] in json.dumps(e) for e in audit)


async def test_empty_token_is_refused_with_a_hint(make_daemon: DaemonFactory, users: Users) -> None:
    d = await start(make_daemon, users)
    async with session() as s:
        resp = await login(s, url_of(d), "   ")
        assert resp.status == 401
        assert "Enter your token" in await resp.text()


async def test_login_from_another_site_is_refused(make_daemon: DaemonFactory, users: Users) -> None:
    """Login CSRF: a form posted from another origin does not log the browser in."""
    d = await start(make_daemon, users)
    async with session() as s:
        resp = await s.post(
            url_of(d) + "/login",
            data={"token": users.tokens["owner"]},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        )
        assert resp.status == 403
        assert "Set-Cookie" not in resp.headers


async def test_login_returns_to_the_console_page_that_asked_for_it(
    make_daemon: DaemonFactory, users: Users
) -> None:
    """An unauthenticated console page sends the browser to login?next=…, and back after login."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        resp = await s.get(base + "/console/demo?mode=watch", allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "../login?next=console%2Fdemo%3Fmode%3Dwatch"
        form = await s.get(base + "/login?next=console%2Fdemo%3Fmode%3Dwatch")
        assert 'action="login?next=console%2Fdemo%3Fmode%3Dwatch"' in await form.text()
        done = await login(s, base, users.tokens["reader"], "?next=console%2Fdemo%3Fmode%3Dwatch")
        assert done.headers["Location"] == "console/demo?mode=watch"
        # Anything else is not a place to go: no open redirect.
        for bad in ("%2F%2Fevil.example", "https%3A%2F%2Fevil.example", "..%2Fapi%2Fv1%2Fconsoles"):
            resp = await login(s, base, users.tokens["reader"], f"?next={bad}")
            assert resp.headers["Location"] == "./"


async def test_open_access_login_page_says_no_login_is_needed(make_daemon: DaemonFactory) -> None:
    """With no users configured, the login page explains that everyone is owner; / opens directly."""
    d = await make_daemon(DEMO)
    base = url_of(d)
    async with session() as s:
        page = await s.get(base + "/login")
        text = await page.text()
        assert "no users configured" in text and "no login is needed" in text
        root = await s.get(base + "/", allow_redirects=False)
        assert root.status == 200
        assert "Open access" in await root.text()
        assert "logout" not in await root.text()


# --- page headers and links -----------------------------------------------------------------


async def test_pages_carry_a_strict_csp_and_refuse_framing(make_daemon: DaemonFactory, users: Users) -> None:
    """Every page: CSP with script-src 'self' (no inline, no eval), connect-src self + ws, no framing."""
    d = await start(make_daemon, users)
    base = url_of(d)
    host = base.removeprefix("http://")
    async with session() as s:
        await login(s, base, users.tokens["contributor"])
        for path in ("/login", "/", "/console/demo", "/console/nope"):
            resp = await s.get(base + path, allow_redirects=False)
            csp = resp.headers["Content-Security-Policy"]
            directives = {p.split()[0]: p.split()[1:] for p in csp.split(";") if p.strip()}
            assert directives["default-src"] == ["'self'"], path
            assert directives["script-src"] == ["'self'"], path
            assert directives["connect-src"] == ["'self'", f"ws://{host}"], path
            assert directives["frame-ancestors"] == ["'none'"], path
            assert directives["object-src"] == ["'none'"], path
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "no-store"
            assert links_of(await resp.text()).inline_scripts == 0, path


async def test_unauthenticated_root_redirects_to_login_without_counting_failures(
    make_daemon: DaemonFactory, users: Users
) -> None:
    """A browser with no cookie is sent to login (relative), and looking never locks anyone out."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        for _ in range(20):
            resp = await s.get(base + "/", allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"] == "login"
        # A stale or forged cookie is "not logged in" too, not an error page.
        s.cookie_jar.update_cookies({"serialmuxd_session": "Zm9vfDF8YmFy"})
        resp = await s.get(base + "/", allow_redirects=False)
        assert resp.status == 303
        assert (await login(s, base, users.tokens["reader"])).status == 303
    assert d.metrics.auth_failures == 0


async def test_every_link_in_the_pages_is_relative(make_daemon: DaemonFactory, users: Users) -> None:
    """No page or script names an absolute path, so a reverse proxy may mount the daemon anywhere."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        await login(s, base, users.tokens["contributor"])
        seen = 0
        for path in ("/login", "/", "/console/demo"):
            urls = links_of(await (await s.get(base + path)).text()).urls
            assert urls, path
            for u in urls:
                seen += 1
                assert not u.startswith(("/", "http:", "https:", "ws:", "wss:")), (path, u)
                assert "//" not in u, (path, u)
        assert seen >= 10
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        assert not re.search(r"""["'`]/(api|static|login|logout|console)\b""", text), script.name


async def test_pages_work_under_a_path_prefix(make_daemon: DaemonFactory, users: Users) -> None:
    """[http] path_prefix = "/host7": same pages, cookie scoped to /host7/, relative redirects."""
    d = await start(make_daemon, users, http={"path_prefix": "/host7"})
    base = url_of(d)  # the proxy strips /host7 before it reaches the daemon
    async with session() as s:
        resp = await login(s, base, users.tokens["owner"])
        assert resp.headers["Location"] == "./"
        assert "Path=/host7/" in set_cookie(resp.headers)
        out = await s.post(base + "/logout", headers={"Origin": base}, allow_redirects=False)
        assert "Path=/host7/" in set_cookie(out.headers)


async def test_a_trusted_proxy_sets_the_prefix_and_https(make_daemon: DaemonFactory, users: Users) -> None:
    """Behind a trusted proxy, X-Forwarded-Prefix/Proto scope the cookie and make it Secure."""
    d = await start(make_daemon, users, http={"trusted_proxies": ["127.0.0.1"]})
    base = url_of(d)
    fwd = {
        "X-Forwarded-Prefix": "/fleet/host9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "c.example",
    }
    async with session() as s:
        resp = await s.post(
            base + "/login",
            data={"token": users.tokens["owner"]},
            headers={**fwd, "Origin": "https://c.example"},
            allow_redirects=False,
        )
        assert resp.status == 303
        cookie = set_cookie(resp.headers)
        assert "Path=/fleet/host9/" in cookie and "Secure" in cookie
        page = await s.get(base + "/login", headers=fwd)
        assert "wss://" in page.headers["Content-Security-Policy"]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    argv += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_login_over_tls_sets_a_secure_cookie(
    make_daemon: DaemonFactory, users: Users, tls_files: tuple[Path, Path]
) -> None:
    """Over TLS the cookie is Secure and the page allows wss to itself."""
    cert, key = tls_files
    d = await start(make_daemon, users, http={"tls_cert": str(cert), "tls_key": str(key)})
    base = url_of(d)
    assert base.startswith("https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    async with session(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        resp = await login(s, base, users.tokens["contributor"])
        assert resp.status == 303
        assert "Secure" in set_cookie(resp.headers)
        page = await s.get(base + "/console/demo")
        assert page.status == 200
        assert f"wss://{base.removeprefix('https://')}" in page.headers["Content-Security-Policy"]


# --- console page --------------------------------------------------------------------------------


async def test_console_page_tells_the_script_who_may_type(make_daemon: DaemonFactory, users: Users) -> None:
    """A reader's page starts in watch mode (data-can-write=false); a contributor's may type."""
    d = await start(make_daemon, users)
    base = url_of(d)
    for role, can in (("reader", "false"), ("contributor", "true")):
        async with session() as s:
            await login(s, base, users.tokens[role])
            text = await (await s.get(base + "/console/demo")).text()
            assert f'data-can-write="{can}"' in text
            assert 'data-console="demo"' in text
            assert 'href="../api/v1/consoles/demo/log" download="demo.log"' in text
            assert 'role="toolbar"' in text and 'role="alert"' in text and 'role="status"' in text


async def test_unknown_console_page_is_a_404_page(make_daemon: DaemonFactory, users: Users) -> None:
    d = await start(make_daemon, users)
    async with session() as s:
        await login(s, url_of(d), users.tokens["owner"])
        resp = await s.get(url_of(d) + "/console/nope")
        assert resp.status == 404
        assert resp.content_type == "text/html"
        assert "There is no console named nope" in await resp.text()


async def test_console_page_says_how_to_build_missing_xterm_files(
    make_daemon: DaemonFactory, users: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without static/vendor (build-web.sh not run) the page says exactly what to run."""
    bare = tmp_path / "static"
    shutil.copytree(STATIC, bare, ignore=shutil.ignore_patterns("vendor"))
    monkeypatch.setattr(pages, "STATIC_DIR", bare)
    d = await start(make_daemon, users)
    async with session() as s:
        await login(s, url_of(d), users.tokens["owner"])
        resp = await s.get(url_of(d) + "/console/demo")
        assert resp.status == 503
        text = await resp.text()
        assert "scripts/build-web.sh" in text and "xterm.js" in text
        js = await s.get(url_of(d) + "/static/vendor/xterm.js")
        assert js.status == 404 and "scripts/build-web.sh" in await js.text()


# --- static files ------------------------------------------------------------------------------


async def test_static_files_are_served_with_their_types(make_daemon: DaemonFactory, users: Users) -> None:
    """Page code and the vendored terminal come from the package; templates and other files do not."""
    d = await start(make_daemon, users)
    base = url_of(d)
    async with session() as s:
        for path, ctype in (
            ("/static/console.js", "text/javascript"),
            ("/static/list.js", "text/javascript"),
            ("/static/app.css", "text/css"),
            ("/static/vendor/xterm.js", "text/javascript"),
            ("/static/vendor/xterm.css", "text/css"),
            ("/static/vendor/addon-fit.js", "text/javascript"),
        ):
            resp = await s.get(base + path)
            assert resp.status == 200, path
            assert resp.content_type == ctype, path
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        for path in (
            "/static/templates/layout.html",
            "/static/%2e%2e/pages.py",
            "/static/..%2fpages.py",
            "/static/vendor/LICENSE.xterm",
            "/static/nope.js",
        ):
            resp = await s.get(base + path)
            assert resp.status == 404, path
