"""A fleet behind an ordinary reverse proxy: two daemons under /a/ and /b/ of one real nginx.

Daemon A trusts the proxy and takes its prefix from X-Forwarded-Prefix; daemon B has
``path_prefix = "/b"`` in its config and trusts nobody, so the headers nginx sends it
(including a bogus X-Forwarded-Prefix) are ignored.  Through each prefix: the list, the log
(also followed), a WebSocket session typing into a demo console, the web login cookie
scoped to the prefix with the Origin check, and the page itself.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from serialmuxd.daemon import Daemon
from tests.conftest import DaemonFactory, Users
from tests.nginx import Nginx, run_user
from tests.test_sessions import recv_json, recv_until
from tests.test_systemd import free_port

DEMO = {"name": "demo", "uart": "demo:?boot=0"}
SPOOFED = "203.0.113.9"

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {root}/access.log;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;

  map $http_upgrade $connection_upgrade {{
    default upgrade;
    ''      close;
  }}

  server {{
    listen 127.0.0.1:{port};

    # The README's snippet, one location per host of the fleet.
    location /a/ {{
      proxy_pass http://127.0.0.1:{port_a}/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Prefix /a;
      proxy_buffering off;
      proxy_read_timeout 1h;
    }}

    location /b/ {{
      proxy_pass http://127.0.0.1:{port_b}/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      # B trusts no proxy: this must be ignored in favour of its path_prefix.
      proxy_set_header X-Forwarded-Prefix /not-b;
      proxy_buffering off;
      proxy_read_timeout 1h;
    }}
  }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int, int], str]]:
    """Start nginx (as a child, daemon off) in front of two daemon ports; returns its base URL."""
    runner = Nginx()
    root = tmp_path / "nginx"

    def start(port_a: int, port_b: int) -> str:
        root.mkdir()
        port = free_port()
        runner.start(
            root, NGINX_CONF.format(user=run_user(), root=root, port=port, port_a=port_a, port_b=port_b), port
        )
        return f"http://127.0.0.1:{port}"

    yield start
    runner.stop()


async def fleet(
    make_daemon: DaemonFactory, users: Users, tmp_path: Path, nginx: Callable[[int, int], str]
) -> tuple[str, Daemon, Daemon]:
    a = await make_daemon(
        [DEMO], users=users.config(), http={"trusted_proxies": ["127.0.0.1"]}, state_dir=tmp_path / "a"
    )
    b = await make_daemon([DEMO], users=users.config(), http={"path_prefix": "/b"}, state_dir=tmp_path / "b")
    return nginx(a.bound[0].port, b.bound[0].port), a, b


def session_cookie(resp: aiohttp.ClientResponse) -> tuple[str, str]:
    """(cookie value, Path attribute) of the login's Set-Cookie."""
    for header in resp.headers.getall("Set-Cookie", []):
        if header.startswith("serialmuxd_session="):
            value = header.split(";", 1)[0].split("=", 1)[1]
            m = re.search(r";\s*Path=([^;]+)", header, re.I)
            return value, m.group(1) if m else ""
    raise AssertionError(f"no session cookie in {resp.headers.getall('Set-Cookie', [])}")


@pytest.mark.parametrize("prefix", ["/a", "/b"])
async def test_list_log_and_websocket_session_through_each_prefix(
    make_daemon: DaemonFactory, users: Users, tmp_path: Path, nginx: Callable[[int, int], str], prefix: str
) -> None:
    """Under /a/ (prefix from a trusted proxy) and /b/ (prefix from the config): the API lists,
    the log reads and follows, and a WebSocket session types into the console and sees the echo;
    the OpenAPI document names the prefixed server URL."""
    proxy, a, b = await fleet(make_daemon, users, tmp_path, nginx)
    daemon = a if prefix == "/a" else b
    base = proxy + prefix
    hdr = users.header("contributor")
    async with aiohttp.ClientSession(headers=hdr) as s:
        r = await s.get(base + "/api/v1/consoles")
        assert r.status == 200, await r.text()
        assert [c["name"] for c in (await r.json())["consoles"]] == ["demo"]
        r = await s.get(base + "/api/v1/openapi.json")
        assert (await r.json())["servers"] == [{"url": f"{prefix}/api/v1"}]

        follow = await s.get(base + "/api/v1/consoles/demo/log", params={"follow": "1", "start": "-1"})
        assert follow.status == 200
        marker = f"through{prefix.replace('/', '-')}"
        async with s.ws_connect(base + "/api/v1/consoles/demo/session") as ws:
            hello = await recv_json(ws, "hello")
            assert hello["user"] == "contributor" and hello["mode"] == "interactive"
            await ws.send_bytes(f"echo {marker}\r".encode())
            await recv_until(ws, f"{marker}\r\n".encode())
        # The follower saw the same output, streamed live through the proxy.
        got = b""
        async with asyncio.timeout(10):
            while f"{marker}\r\n".encode() not in got:
                got += await follow.content.readany()
        follow.close()

        r = await s.get(base + "/api/v1/consoles/demo/log")
        body = await r.read()
        assert f"{marker}\r\n".encode() in body
        assert int(r.headers["X-Log-Next"]) == daemon.consoles["demo"].ring.next
        assert r.headers["X-Log-Truncated"] == "false"

    # Requests went to the right daemon: only this one has the marker in its ring.
    other = b if daemon is a else a
    assert marker.encode() not in other.consoles["demo"].ring.read(0)[1]


@pytest.mark.parametrize("prefix", ["/a", "/b"])
async def test_web_login_cookie_is_scoped_to_the_prefix_and_origin_checked(
    make_daemon: DaemonFactory, users: Users, tmp_path: Path, nginx: Callable[[int, int], str], prefix: str
) -> None:
    """The login cookie's Path is the prefix (the two hosts' cookies never mix); with it, the
    page and its assets load, and a WebSocket from the proxy's own origin is accepted while one
    from another origin is refused 403."""
    proxy, _, _ = await fleet(make_daemon, users, tmp_path, nginx)
    base = proxy + prefix
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        r = await s.post(
            base + "/login",
            data={"token": users.tokens["contributor"]},
            headers={"Origin": proxy},
            allow_redirects=False,
        )
        assert r.status == 303, await r.text()
        assert not r.headers["Location"].startswith("/")  # relative: keeps the prefix
        value, path = session_cookie(r)
        assert path == prefix + "/"
        cookie = {"Cookie": f"serialmuxd_session={value}"}

        r = await s.get(base + "/", headers=cookie)
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        # Every link in the page is relative, so it resolves under the prefix.
        for link in re.findall(r'(?:href|src)="([^"]+)"', page):
            assert not link.startswith(("/", "http:", "https:")), link
        r = await s.get(base + "/static/app.css", headers=cookie)
        assert r.status == 200
        r = await s.get(base + "/console/demo", headers=cookie)
        assert r.status == 200

        url = base + "/api/v1/consoles/demo/session"
        async with s.ws_connect(url, headers={**cookie, "Origin": proxy}) as ws:
            hello = await recv_json(ws, "hello")
            assert hello["user"] == "contributor"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(url, headers={**cookie, "Origin": "http://evil.example"})
        assert refused.value.status == 403


async def test_forwarded_for_from_the_trusted_proxy_is_the_audited_peer_and_spoofs_are_not(
    make_daemon: DaemonFactory, users: Users, tmp_path: Path, nginx: Callable[[int, int], str]
) -> None:
    """A client's own X-Forwarded-For is not believed: nginx appends the real address and the
    daemon takes the entry its trusted proxy added, so the audit log names the real peer."""
    proxy, a, _ = await fleet(make_daemon, users, tmp_path, nginx)
    async with (
        aiohttp.ClientSession(headers={**users.header("contributor"), "X-Forwarded-For": SPOOFED}) as s,
        s.ws_connect(proxy + "/a/api/v1/consoles/demo/session") as ws,
    ):
        hello = await recv_json(ws, "hello")
    assert a.audit is not None
    attach = [e for e in a.audit.read("demo") if e["event"] == "attach" and e["session"] == hello["session"]]
    assert len(attach) == 1
    assert attach[0]["peer"] == "127.0.0.1"
    assert SPOOFED not in json.dumps(a.audit.read())
