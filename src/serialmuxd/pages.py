"""The browser face: login/logout, the console list, the terminal page, static files.

Pages are small server-rendered shells; the data comes from the JSON API and
the WebSocket session, fetched by the page's own scripts.  Every link a page
holds is relative, so the same pages work behind a reverse proxy that mounts
the daemon under a path prefix (``https://console.example/host7/``).

Page auth differs from the API on purpose: a browser without a cookie is sent
to the login page, not counted as a failed login, so looking at the site never
locks anyone out.  Only token checks (``POST /login``, a bearer header) feed
the failure limiter.
"""

from __future__ import annotations

import html
import re
import string
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from serialmuxd.auth import ANONYMOUS_OWNER, Principal
from serialmuxd.config import Role, validate_console_name
from serialmuxd.web import COOKIE, DAEMON, authenticate

if TYPE_CHECKING:
    from serialmuxd.daemon import Daemon

# The package is installed as files (the pages are served from disk), so its
# directory is enough; importlib.resources would add ~100 KiB to every daemon.
STATIC_DIR = Path(__file__).resolve().parent / "static"
TEMPLATE_DIR = STATIC_DIR / "templates"
VENDOR_FILES = ("xterm.js", "xterm.css", "addon-fit.js")
# What /static/ serves: the page's own code and the vendored terminal, never the
# templates (they are rendered, not fetched).
STATIC_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".png": "image/png",
}
BUILD_HINT = "run scripts/build-web.sh (or scripts/setup.sh) in the serialmuxd source tree"
# A login that came from a console page goes back there.
NEXT_RE = re.compile(r"console/[A-Za-z0-9._-]{1,64}(\?mode=watch)?")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


# --- rendering -------------------------------------------------------------------


@cache
def _template(name: str) -> string.Template:
    return string.Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def vendor_missing() -> list[str]:
    """Vendored xterm files that scripts/build-web.sh has not produced (yet)."""
    return [f for f in VENDOR_FILES if not (STATIC_DIR / "vendor" / f).is_file()]


def csp(request: web.Request) -> str:
    """The page policy: scripts and connections only to ourselves.

    ``style-src`` allows inline styles because xterm.js's DOM renderer sizes
    its rows with ``<style>`` elements it creates at run time; scripts stay
    strict (no inline script, no eval), which is what stops injection.
    ``connect-src 'self'`` covers ws/wss of the same host in current browsers;
    the explicit ws(s) source is for older ones.
    """
    connect = "'self'"
    host = request.host
    if _HOST_RE.fullmatch(host):
        own = request.app[DAEMON].own_origins(request)
        scheme = "wss" if any(o.startswith("https:") for o in own) else "ws"
        connect += f" {scheme}://{host}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        f"img-src 'self' data:; connect-src {connect}; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


def page(
    request: web.Request,
    *,
    title: str,
    body: str,
    root: str,
    page_id: str,
    data: dict[str, str] | None = None,
    scripts: tuple[str, ...] = (),
    styles: tuple[str, ...] = (),
    header: str = "",
    skip: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A full HTML page; ``root`` is the relative path back to the daemon's root."""
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in (data or {}).items())
    text = _template("layout.html").substitute(
        title=html.escape(title),
        root=root,
        page=page_id,
        body_attrs=attrs,
        skip=skip,
        header=header,
        body=body,
        styles="".join(f'\n  <link rel="stylesheet" href="{root}static/{s}">' for s in styles),
        scripts="".join(f'\n  <script src="{root}static/{s}"></script>' for s in scripts),
    )
    resp = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
    resp.headers.update(
        {
            "Content-Security-Policy": csp(request),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
    )
    if headers:
        resp.headers.update(headers)
    return resp


def page_header(principal: Principal, root: str) -> str:
    """Brand, who is signed in, and the logout button."""
    if principal.via == "anonymous":
        who = '<span class="who">Open access: no users configured, everyone here is owner</span>'
        logout = ""
    else:
        who = f'<span class="who">Signed in as <strong>{html.escape(principal.name)}</strong></span>'
        logout = (
            f'<form method="post" action="{root}logout" class="logout">'
            '<button type="submit">Log out</button></form>'
        )
    return (
        '<header class="site">'
        f'<a class="brand" href="{root or "./"}">serialmuxd</a>'
        f'<div class="account">{who}{logout}</div>'
        "</header>"
    )


# --- who is asking ---------------------------------------------------------------------


async def page_principal(request: web.Request) -> Principal | None:
    """The signed-in user, or None (send them to the login page).

    A bearer header goes through the API's check (and its rate limit); a
    missing or stale cookie is simply "not logged in".
    """
    daemon = request.app[DAEMON]
    if request.headers.get("Authorization"):
        return await authenticate(request)
    value = request.cookies.get(COOKIE)
    if value:
        principal = daemon.auth.from_cookie(value)
        if principal is not None:
            return principal
    if daemon.auth.open_access:
        return ANONYMOUS_OWNER
    return None


def redirect(location: str) -> web.Response:
    # Relative Location headers (RFC 9110) keep a reverse proxy's path prefix.
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def cookie_path(daemon: Daemon, request: web.Request) -> str:
    return daemon.path_prefix(request) + "/"


def cookie_secure(daemon: Daemon, request: web.Request) -> bool:
    return daemon.config.http.tls or any(o.startswith("https:") for o in daemon.own_origins(request))


def origin_ok(request: web.Request) -> bool:
    """A form post from another site (login CSRF) is refused; no Origin = not a browser."""
    origin = request.headers.get("Origin")
    return origin is None or origin in request.app[DAEMON].own_origins(request)


# --- handlers ----------------------------------------------------------------------------


async def list_page(request: web.Request) -> web.Response:
    principal = await page_principal(request)
    if principal is None:
        return redirect("login")
    body = _template("list.html").substitute()
    return page(
        request,
        title="Consoles · serialmuxd",
        body=body,
        root="",
        page_id="list",
        header=page_header(principal, ""),
        scripts=("list.js",),
    )


async def console_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    root = "../"
    principal = await page_principal(request)
    if validate_console_name(name) is not None:
        return message_page(request, root, 404, "No such console", "That is not a console name.", principal)
    if principal is None:
        target = f"console/{name}" + ("?mode=watch" if request.query.get("mode") == "watch" else "")
        return redirect(f"{root}login?next={quote(target, safe='')}")
    console = request.app[DAEMON].consoles.get(name)
    if console is None or not principal.may_see(name):
        return message_page(
            request,
            root,
            404,
            "No such console",
            f"There is no console named {name} that you may see.",
            principal,
        )
    missing = vendor_missing()
    if missing:
        return message_page(
            request,
            root,
            503,
            "The terminal is not installed",
            f"This daemon cannot show a terminal: the xterm.js files ({', '.join(missing)}) are "
            f"missing from its static/vendor folder. To fix it, {BUILD_HINT}, then reload this page.",
            principal,
        )
    can_write = principal.may(Role.CONTRIBUTOR, name)
    body = _template("console.html").substitute(name=html.escape(name), root=root)
    return page(
        request,
        title=f"{name} · serialmuxd",
        body=body,
        root=root,
        page_id="console",
        data={
            "console": name,
            "can-write": "true" if can_write else "false",
            "user": principal.name,
            "build-hint": BUILD_HINT,
        },
        header=page_header(principal, root),
        # First in the page: the terminal keeps Tab for the guest, so keyboard
        # users need a way to the toolbar that does not go through it.
        skip='<a class="skip-link" href="#toolbar">Skip to the console toolbar</a>\n',
        styles=("vendor/xterm.css",),
        scripts=("vendor/xterm.js", "vendor/addon-fit.js", "console.js"),
    )


def message_page(
    request: web.Request,
    root: str,
    status: int,
    title: str,
    text: str,
    principal: Principal | None,
) -> web.Response:
    body = _template("message.html").substitute(
        title=html.escape(title), text=html.escape(text), root=root or "./"
    )
    return page(
        request,
        title=f"{title} · serialmuxd",
        body=body,
        root=root,
        page_id="message",
        header=page_header(principal, root) if principal is not None else "",
        status=status,
    )


def login_form(
    request: web.Request,
    *,
    error: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    daemon = request.app[DAEMON]
    nxt = request.query.get("next", "")
    if not NEXT_RE.fullmatch(nxt):
        nxt = ""
    if daemon.auth.open_access:
        notice = (
            '<p class="notice" role="status">This daemon has no users configured (open access): '
            "everyone who can reach it is owner and no login is needed. "
            '<a href="./">Go to the consoles</a>.</p>'
        )
    else:
        notice = ""
    err = f'<p class="error" role="alert" id="login-error">{html.escape(error)}</p>' if error else ""
    action = "login" + (f"?next={quote(nxt, safe='')}" if nxt else "")
    body = _template("login.html").substitute(
        notice=notice,
        error=err,
        action=html.escape(action),
        described="login-error token-help" if error else "token-help",
        invalid="true" if error else "false",
    )
    return page(
        request,
        title="Log in · serialmuxd",
        body=body,
        root="",
        page_id="login",
        status=status,
        headers=headers,
    )


async def login_page(request: web.Request) -> web.Response:
    return login_form(request)


async def login_submit(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    peer = daemon.peer_address(request)
    now = time.monotonic()
    wait = daemon.limiter.retry_after(peer, now)
    if wait > 0:
        daemon.metrics.auth_failures += 1
        seconds = max(1, round(wait))
        return login_form(
            request,
            error=f"Too many failed logins from {peer}: wait {seconds} s, then check your token and retry.",
            status=429,
            headers={"Retry-After": str(seconds)},
        )
    if not origin_ok(request):
        return login_form(
            request,
            error="This login form was sent from another site: open the login page of this daemon itself.",
            status=403,
        )
    try:
        form = await request.post()
    except ValueError:
        form = None
    raw = form.get("token") if form is not None else None
    token = raw.strip() if isinstance(raw, str) else ""
    principal = daemon.auth.from_token(token) if token else None
    if principal is None:
        daemon.limiter.failed(peer, now)
        daemon.metrics.auth_failures += 1
        daemon.audit_event(
            "auth_failure",
            user="",
            peer=peer,
            reason="bad token (web login)" if token else "no token (web login)",
        )
        if daemon.auth.open_access:
            msg = "This daemon has no users, so no token is valid: no login is needed."
        elif token:
            msg = "That token is not valid: check it (it starts with smx_) or ask an owner for a new one."
        else:
            msg = "Enter your token: it starts with smx_ and was printed by `serialmuxd token`."
        return login_form(
            request,
            error=msg,
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="serialmuxd"'},
        )
    daemon.limiter.succeeded(peer)
    max_age = daemon.config.http.session_cookie_max_age_s
    nxt = request.query.get("next", "")
    resp = redirect(nxt if NEXT_RE.fullmatch(nxt) else "./")
    resp.set_cookie(
        COOKIE,
        daemon.auth.make_cookie(principal, max_age),
        max_age=max_age,
        path=cookie_path(daemon, request),
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(daemon, request),
    )
    return resp


async def logout(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    if not origin_ok(request):
        return message_page(
            request,
            "",
            403,
            "Not logged out",
            "This logout came from another site: use the button here.",
            None,
        )
    resp = redirect("login")
    resp.set_cookie(
        COOKIE,
        "",
        max_age=0,
        expires="Thu, 01 Jan 1970 00:00:00 GMT",
        path=cookie_path(daemon, request),
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(daemon, request),
    )
    return resp


async def static_file(request: web.Request) -> web.StreamResponse:
    rel = request.match_info["path"]
    path = (STATIC_DIR / rel).resolve()
    ctype = STATIC_TYPES.get(path.suffix)
    inside = path.is_relative_to(STATIC_DIR.resolve()) and not path.is_relative_to(TEMPLATE_DIR.resolve())
    if ctype is None or not inside or not path.is_file():
        if rel.startswith("vendor/") and vendor_missing():
            text = f"/* serialmuxd: {rel} is missing: {BUILD_HINT} */\n"
            return web.Response(text=text, status=404, content_type=ctype or "text/plain")
        raise web.HTTPNotFound()
    # Revalidate every time (cheap 304s): a daemon upgrade must not leave old
    # scripts in a browser cache talking to a new API.
    return web.FileResponse(
        path,
        headers={
            "Content-Type": ctype,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", list_page)
    r.add_get("/login", login_page)
    r.add_post("/login", login_submit)
    r.add_post("/logout", logout)
    r.add_get("/console/{name}", console_page)
    r.add_get("/static/{path:.+}", static_file)
