"""The web console in a real headless Chromium: log in, list, type, take over, SysRq, download.

The daemon runs in-process on 127.0.0.1; the browser is Debian's chromium
driven by Playwright's async API (the same event loop as the daemon).
Screenshots land in artifacts/screenshots/ for people to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from serialmuxd.daemon import Daemon
from tests.conftest import REPO, DaemonFactory, Users, url_of, wait_for
from tests.guest import GuestFactory
from tests.nginx import Nginx, run_user
from tests.test_pages import tls_files  # noqa: F401  (fixture)

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = REPO / "artifacts" / "screenshots"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 400, "height": 800}
DEMO = {"name": "demo", "uart": "demo:?boot=0"}

Browser = Any  # playwright.async_api.Browser (typed loosely: tests only)
Page = Any


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    if not (REPO / "src" / "serialmuxd" / "static" / "vendor" / "xterm.js").is_file():
        pytest.fail("static/vendor/xterm.js is missing: run scripts/build-web.sh")
    async with playwright_api.async_playwright() as p:
        # launch() gives a fresh temporary profile; each user gets its own context.
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


class Problems:
    """Browser-side errors (script exceptions, CSP violations) collected per page."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda e: self.items.append(f"pageerror: {e}"))
        page.on(
            "console",
            lambda m: (
                self.items.append(f"console: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text
                else None
            ),
        )


async def new_user_page(browser: Browser, viewport: dict[str, int] = WIDE) -> tuple[Any, Page]:
    ctx = await browser.new_context(viewport=viewport, accept_downloads=True)
    page = await ctx.new_page()
    page.set_default_timeout(20_000)
    return ctx, page


async def login(page: Page, base: str, token: str) -> None:
    """The way a person does it: open the site, get sent to the form, paste the token."""
    await page.goto(base + "/")
    await page.wait_for_url(re.compile(r".*/login$"))
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(re.escape(base) + r"/$"))


async def term_text(page: Page) -> str:
    text: str = await page.evaluate("() => window.serialmuxd ? window.serialmuxd.text() : ''")
    return text


async def wait_term(page: Page, needle: str | re.Pattern[str], timeout: float = 20) -> str:
    """Wait until the terminal's buffer (what xterm.js shows) holds ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        text = await term_text(page)
        if (needle in text) if isinstance(needle, str) else needle.search(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {needle!r} in the terminal within {timeout} s; it shows:\n{text[-1500:]}"
            )
        await asyncio.sleep(0.1)


async def wait_connected(page: Page, mode: str = "interactive") -> None:
    await page.wait_for_function(
        "(m) => window.serialmuxd && window.serialmuxd.connected && window.serialmuxd.mode === m", arg=mode
    )


async def open_console(page: Page, name: str) -> None:
    """From the list page, follow the console's link (as a person would)."""
    await page.click(f"tr[data-console='{name}'] td.name a")
    await wait_connected(page)


async def type_line(page: Page, line: str) -> None:
    await page.click("#terminal")
    await page.keyboard.type(line)
    await page.keyboard.press("Enter")


async def banner(page: Page, kind: str, timeout: float = 15) -> str:
    loc = page.locator(f"#banner[data-kind='{kind}']")
    await loc.wait_for(state="visible", timeout=timeout * 1000)
    text: str = await loc.inner_text()
    return text


async def quiet(d: Daemon, name: str, for_s: float = 0.8, timeout: float = 30) -> None:
    """Wait until the console printed nothing for ``for_s`` (before a BREAK: QEMU-RIG-NOTES)."""
    ring = d.consoles[name].ring
    deadline = time.monotonic() + timeout
    last, since = ring.next, time.monotonic()
    while time.monotonic() - since < for_s:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never went quiet for {for_s} s")
        await asyncio.sleep(0.05)
        if ring.next != last:
            last, since = ring.next, time.monotonic()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"))


# --- the demo guest -----------------------------------------------------------------------------------


async def test_log_in_list_open_demo_type_and_download_the_log(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """A person logs in with a token, sees the consoles, opens the demo, types
    `echo $((6*7))` and sees 42; the log download holds the whole ring."""
    d = await make_daemon(
        [DEMO, {"name": "vm-off", "uart": "unix:/nonexistent/vm-off.serial"}], users=users.config()
    )
    base = url_of(d)
    problems = Problems()
    ctx, page = await new_user_page(browser)
    problems.watch(page)
    await login(page, base, users.tokens["contributor"])
    demo_row = page.locator("tr[data-console='demo']")
    await demo_row.locator(".state", has_text="running").wait_for()
    off_row = page.locator("tr[data-console='vm-off']")
    await off_row.locator(".state", has_text="stopped").wait_for()
    assert "Signed in as contributor" in await page.inner_text("header")

    list_page = await ctx.new_page()
    problems.watch(list_page)
    await list_page.goto(base + "/")
    await list_page.locator("tr[data-console='demo'] td.session", has_text="free").wait_for()

    await open_console(page, "demo")
    assert page.url == base + "/console/demo"
    assert "Connected as contributor" in await page.inner_text("#status")
    await wait_term(page, "demo# ")
    await type_line(page, "echo $((6*7))")
    text = await wait_term(page, re.compile(r"echo \$\(\(6\*7\)\)\s*\n42\n"))
    assert "42" in text

    async with page.expect_download() as dl_info:
        await page.click("#btn-download")
    download = await dl_info.value
    assert download.suggested_filename == "demo.log"
    content = Path(await download.path()).read_bytes()
    assert content == d.consoles["demo"].ring.read(None)[1]
    assert b"echo $((6*7))\r\n42\r\n" in content

    # The list (another tab, already open) shows who holds the session now, refreshing by itself.
    await list_page.locator(
        "tr[data-console='demo'] td.session", has_text="contributor from 127.0.0.1"
    ).wait_for()
    assert problems.items == []
    await ctx.close()


async def test_takeover_shows_a_banner_naming_the_newcomer_and_take_it_back(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """Another user opening the console takes it over: the first page says who and from where,
    does not reconnect by itself, and its "Take it back" button does."""
    d = await make_daemon([DEMO], users=users.config())
    base = url_of(d)
    ctx1, page1 = await new_user_page(browser)
    ctx2, page2 = await new_user_page(browser)
    await login(page1, base, users.tokens["contributor"])
    await open_console(page1, "demo")
    await login(page2, base, users.tokens["owner"])
    await open_console(page2, "demo")

    text = await banner(page1, "taken_over")
    assert "Taken over by owner from 127.0.0.1" in text
    assert await page1.locator("#banner").get_attribute("role") == "alert"
    assert "taken over by owner" in await page1.inner_text("#status")
    assert await page1.is_disabled("#btn-break")
    await asyncio.sleep(2.0)  # no automatic reconnect: that would start a takeover war
    active = d.consoles["demo"].active
    assert active is not None and active.user == "owner"

    await page1.click("#banner-action")
    await wait_connected(page1)
    assert "Taken over by contributor" in await banner(page2, "taken_over")
    await ctx1.close()
    await ctx2.close()


async def test_sysrq_help_and_reset_from_the_toolbar(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """SysRq h from the picker prints the kernel's help line; Reset asks first, Cancel does nothing."""
    d = await make_daemon([DEMO], users=users.config())
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await open_console(page, "demo")
    await wait_term(page, "demo# ")
    await page.select_option("#sysrq-key", "h")
    await page.click("#btn-sysrq")
    await wait_term(page, "sysrq: HELP")
    assert "SysRq h sent" in await page.inner_text("#action-result")

    before = d.consoles["demo"].ring.next
    await page.click("#btn-reset")
    dialog = page.locator("dialog#confirm")
    await dialog.wait_for(state="visible")
    assert "Reset demo?" in await dialog.inner_text()
    await page.keyboard.press("Escape")  # keyboard users can back out
    await dialog.wait_for(state="hidden")
    await asyncio.sleep(0.5)
    assert b"Linux version" not in d.consoles["demo"].ring.read(before)[1]
    await page.click("#btn-reset")
    await page.click("#confirm-ok")
    await wait_for(
        lambda: b"Linux version" in d.consoles["demo"].ring.read(before)[1], 15, "the demo to reboot"
    )
    await ctx.close()


async def test_reader_gets_a_read_only_watch_session(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """A reader's page watches (no takeover, keys not sent, actions off) and follows the output."""
    d = await make_daemon([DEMO], users=users.config())
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["reader"])
    await page.click("tr[data-console='demo'] td.name a")
    await wait_connected(page, "watch")
    assert await page.is_checked("#watch-toggle")
    assert await page.is_disabled("#watch-toggle")
    assert await page.is_disabled("#btn-sysrq")
    assert "Watching as reader (read-only)" in await page.inner_text("#status")
    console = d.consoles["demo"]
    assert console.active is None and console.watcher_count == 1
    tx = console.counters.tx_bytes
    await page.click("#terminal")
    await page.keyboard.type("reboot\n")
    await asyncio.sleep(0.5)
    assert console.counters.tx_bytes == tx
    await console.send_break()  # someone else's action shows up for the watcher
    console.backend.write(b"h")
    await wait_term(page, "sysrq: HELP")
    await ctx.close()


async def test_watch_toggle_switches_a_contributor_between_modes(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    d = await make_daemon([DEMO], users=users.config())
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await open_console(page, "demo")
    await page.check("#watch-toggle")
    await wait_connected(page, "watch")
    assert page.url.endswith("/console/demo?mode=watch")
    await wait_for(lambda: d.consoles["demo"].active is None, 5, "the seat to be freed")
    await page.uncheck("#watch-toggle")
    await wait_connected(page, "interactive")
    assert page.url.endswith("/console/demo")
    await ctx.close()


async def test_keyboard_only_reaches_the_toolbar_and_the_terminal(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """The terminal has the focus and keeps Tab for the guest; Alt+F10 gets out to the toolbar,
    and the skip link at the top of the page leads there too."""
    d = await make_daemon([DEMO], users=users.config())
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await page.goto(base + "/console/demo")
    await wait_connected(page)
    await wait_term(page, "demo# ")

    async def focused() -> str:
        v: str = await page.evaluate("() => document.activeElement.id || document.activeElement.className")
        return v

    assert await focused() == "xterm-helper-textarea"  # ready to type, no click needed
    console = d.consoles["demo"]
    tx = console.counters.tx_bytes
    await page.keyboard.press("Tab")  # shell completion, not a focus move
    await wait_for(lambda: console.counters.tx_bytes == tx + 1, 5, "Tab to reach the guest")
    assert await focused() == "xterm-helper-textarea"
    await page.keyboard.press("Alt+F10")
    assert await focused() == "btn-break"
    await page.keyboard.press("Control+c")  # out of the terminal: nothing is sent
    await asyncio.sleep(0.3)
    assert console.counters.tx_bytes == tx + 1
    order = []
    for _ in range(7):
        await page.keyboard.press("Tab")
        order.append(await focused())
    assert order == [
        "sysrq-key",
        "btn-sysrq",
        "btn-nmi",
        "btn-reset",
        "btn-download",
        "watch-toggle",
        "xterm-helper-textarea",
    ]
    # Backwards from the toolbar to the top of the page: the skip link comes first.
    await page.keyboard.press("Alt+F10")
    for _ in range(4):
        await page.keyboard.press("Shift+Tab")
    assert await focused() == "skip-link"
    await page.keyboard.press("Enter")
    await page.keyboard.press("Tab")
    assert await focused() == "btn-break"
    # And the toolbar works from the keyboard: SysRq h with Enter.
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")
    assert await focused() == "btn-sysrq"
    await page.keyboard.press("Enter")
    await wait_term(page, "sysrq: HELP")
    await ctx.close()


async def test_vm_stopped_and_console_disabled_banners(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """A stopped VM shows "waiting for it to start"; disabling the console shows the server's
    message naming who can enable it, on the open page and on a fresh load."""
    d = await make_daemon([{"name": "vm9", "uart": "unix:/nonexistent/vm9.serial"}], users=users.config())
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await page.goto(base + "/console/vm9")
    await wait_connected(page)
    assert "waiting for it to start" in await banner(page, "stopped")
    assert "VM stopped" in await page.inner_text("#status")

    async with aiohttp.ClientSession() as s:
        r = await s.post(base + "/api/v1/consoles/vm9/disable", headers=users.header("owner"))
        assert r.status == 200
    text = await banner(page, "disabled")
    assert "console vm9 is disabled: an owner can enable it" in text
    await page.reload()
    text = await banner(page, "disabled")
    assert "console vm9 is disabled: an owner can enable it" in text
    await ctx.close()


async def test_vm_power_off_and_on_shows_then_clears_the_stopped_banner(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """The guest powers off: "VM stopped, waiting"; it boots again: the banner goes and the
    same session shows the new boot without a reload."""
    d = await make_daemon([{"name": "demo", "uart": "demo:?boot=0&off=1"}], users=users.config())
    ctx, page = await new_user_page(browser)
    await login(page, url_of(d), users.tokens["contributor"])
    await open_console(page, "demo")
    await wait_term(page, "demo# ")
    boots = (await term_text(page)).count("Linux version")
    await type_line(page, "poweroff")
    assert "waiting for it to start" in await banner(page, "stopped")
    await page.locator("#banner").wait_for(state="hidden")
    assert "VM running" in await page.inner_text("#status")
    await wait_term(page, re.compile(f"(Linux version.*){{{boots + 1}}}", re.S))
    await ctx.close()


async def test_idle_timeout_closes_with_a_reconnect_button_and_no_retry_loop(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    d = await make_daemon([DEMO], users=users.config(), defaults={"idle_timeout_s": 1})
    ctx, page = await new_user_page(browser)
    await login(page, url_of(d), users.tokens["contributor"])
    await open_console(page, "demo")
    text = await banner(page, "idle")
    assert "no keystroke for 1 s" in text
    await asyncio.sleep(1.5)
    assert d.consoles["demo"].active is None  # still not reconnected by itself
    await page.click("#banner-action")
    await wait_connected(page)
    await ctx.close()


async def test_connection_lost_reconnects_with_back_off_when_the_daemon_returns(
    make_daemon: DaemonFactory, users: Users, browser: Browser, tmp_path: Path
) -> None:
    """The daemon restarts: the page says the connection is lost and reconnecting, then
    resumes by itself (the login cookie survives the restart)."""
    state = tmp_path / "state"
    d1 = await make_daemon([DEMO], users=users.config(), state_dir=state)
    port = d1.bound[0].port
    base = url_of(d1)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await open_console(page, "demo")
    await wait_term(page, "demo# ")
    await type_line(page, "echo before-restart")
    await wait_term(page, "\nbefore-restart\n")
    await d1.shutdown()
    text = await banner(page, "lost")
    assert "reconnecting in" in text
    await asyncio.sleep(1.0)
    d2 = await make_daemon(
        [DEMO], users=users.config(), state_dir=state, http={"listen": [f"127.0.0.1:{port}"]}
    )
    await wait_connected(page)
    await page.locator("#banner").wait_for(state="hidden")
    await type_line(page, "echo back")
    await wait_for(
        lambda: b"echo back" in d2.consoles["demo"].ring.read(-200)[1], 10, "typing after the restart"
    )
    # The replay after reconnecting continues the screen: nothing already shown comes twice.
    text = await wait_term(page, "\nback\n")
    assert text.count("echo before-restart") == 1, text
    await ctx.close()


async def test_the_console_works_over_tls(
    make_daemon: DaemonFactory,
    users: Users,
    browser: Browser,
    tls_files: tuple[Path, Path],  # noqa: F811  (the fixture imported above)
) -> None:
    """Over HTTPS the Secure cookie comes back and the terminal connects with wss."""
    cert, key = tls_files
    d = await make_daemon([DEMO], users=users.config(), http={"tls_cert": str(cert), "tls_key": str(key)})
    base = url_of(d)
    assert base.startswith("https://")
    ctx = await browser.new_context(viewport=WIDE, ignore_https_errors=True)
    page = await ctx.new_page()
    page.set_default_timeout(20_000)
    problems = Problems()
    problems.watch(page)
    await login(page, base, users.tokens["contributor"])
    assert [c["secure"] for c in await ctx.cookies()] == [True]
    await open_console(page, "demo")
    await type_line(page, "echo $((6*7))")
    await wait_term(page, "\n42\n")
    assert problems.items == []
    await ctx.close()


# --- screenshots ----------------------------------------------------------------------------------


async def test_screenshots_of_the_list_and_a_console(
    make_daemon: DaemonFactory, users: Users, browser: Browser
) -> None:
    """Artifacts for people: the list and a console page at 1280×800 and at 400 px wide."""
    d = await make_daemon(
        [DEMO, {"name": "db-1", "uart": "demo:?boot=0"}, {"name": "vm-off", "uart": "unix:/nonexistent/x"}],
        users=users.config(),
    )
    async with aiohttp.ClientSession() as s:
        await s.post(url_of(d) + "/api/v1/consoles/vm-off/disable", headers=users.header("owner"))
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await open_console(page, "db-1")  # someone holds db-1 while the list is taken
    await wait_term(page, "demo# ")
    ctx2, page2 = await new_user_page(browser)
    await page2.goto(base + "/login")
    await shot(page2, "login-1280x800")
    await login(page2, base, users.tokens["owner"])
    await page2.locator("tr[data-console='db-1'] td.session", has_text="contributor").wait_for()
    await shot(page2, "list-1280x800")
    await page2.set_viewport_size(NARROW)
    await shot(page2, "list-400")

    await page.goto(base + "/console/demo")
    await wait_connected(page)
    await type_line(page, "echo $((6*7))")
    await wait_term(page, "\n42\n")
    await page.select_option("#sysrq-key", "h")
    await page.click("#btn-sysrq")
    await wait_term(page, "sysrq: HELP")
    await shot(page, "console-1280x800")
    await page.set_viewport_size(NARROW)
    await asyncio.sleep(0.3)
    await shot(page, "console-400")
    await page2.set_viewport_size(WIDE)
    await page2.goto(base + "/console/demo")  # takes over the first page
    await wait_connected(page2)
    await page.set_viewport_size(WIDE)
    await banner(page, "taken_over")
    await shot(page, "console-taken-over-1280x800")
    await ctx.close()
    await ctx2.close()


# --- through a reverse proxy with a path prefix ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def nginx_prefix(tmp_path: Path) -> Iterator[Any]:
    """Start nginx proxying http://127.0.0.1:PORT/host7/ to a daemon port given later."""
    runner = Nginx()

    def start(daemon_port: int) -> str:
        port = _free_port()
        root = tmp_path / "nginx"
        root.mkdir()
        runner.start(
            root,
            f"""
{run_user()}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /host7/ {{
      proxy_pass http://127.0.0.1:{daemon_port}/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Prefix /host7;
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
""",
            port,
        )
        return f"http://127.0.0.1:{port}/host7"

    yield start
    runner.stop()


async def test_the_whole_flow_works_behind_a_reverse_proxy_prefix(
    make_daemon: DaemonFactory, users: Users, browser: Browser, nginx_prefix: Any
) -> None:
    """nginx mounts the daemon at /host7/: login, list, console, typing and the log all work."""
    d = await make_daemon([DEMO], users=users.config(), http={"trusted_proxies": ["127.0.0.1"]})
    base = nginx_prefix(d.bound[0].port)
    problems = Problems()
    ctx, page = await new_user_page(browser)
    problems.watch(page)
    await login(page, base, users.tokens["contributor"])
    cookies = await ctx.cookies()
    assert [(c["name"], c["path"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("serialmuxd_session", "/host7/", True, "Strict")
    ]
    await open_console(page, "demo")
    assert page.url == base + "/console/demo"
    await type_line(page, "echo $((6*7))")
    await wait_term(page, "\n42\n")
    async with page.expect_download() as dl_info:
        await page.click("#btn-download")
    assert b"42" in Path(await (await dl_info.value).path()).read_bytes()
    assert problems.items == []
    await ctx.close()


# --- a real QEMU guest ---------------------------------------------------------------------------------


@pytest.mark.qemu
async def test_qemu_guest_in_the_browser_echo_sysrq_and_nmi(
    make_daemon: DaemonFactory, users: Users, browser: Browser, qemu_guest: GuestFactory
) -> None:
    """A real Linux guest: the boot shows, `echo $((6*7))` prints 42, SysRq h from the toolbar
    prints the kernel's help line, and NMI (after its confirmation) reaches the kernel."""
    vm = qemu_guest(start=False, wait=True)
    d = await make_daemon(
        [{"name": "vm1", "uart": f"unix:{vm.uart_path}", "qmp": f"unix:{vm.qmp_path}"}],
        users=users.config(),
    )
    await asyncio.to_thread(vm.start)
    base = url_of(d)
    ctx, page = await new_user_page(browser)
    await login(page, base, users.tokens["contributor"])
    await page.locator("tr[data-console='vm1'] .state", has_text="running").wait_for(timeout=30_000)
    await open_console(page, "vm1")
    await wait_term(page, "guest# ", timeout=60)
    await quiet(d, "vm1")
    await type_line(page, "echo $((6*7))")
    await wait_term(page, re.compile(r"\n42\s*\n"), timeout=20)

    async def sysrq_help() -> None:
        # A byte landing while the kernel prints can disarm SysRq (QEMU-RIG-NOTES): retry.
        for _ in range(3):
            await quiet(d, "vm1")
            start = d.consoles["vm1"].ring.next
            await page.select_option("#sysrq-key", "h")
            await page.click("#btn-sysrq")
            with contextlib.suppress(AssertionError):
                await wait_for(
                    lambda start=start: b"sysrq: HELP" in d.consoles["vm1"].ring.read(start)[1],  # type: ignore[misc]
                    8,
                    "sysrq help",
                )
                return
        raise AssertionError("no sysrq: HELP after three tries")

    await sysrq_help()
    await wait_term(page, "sysrq: HELP")
    await quiet(d, "vm1")
    await page.click("#btn-nmi")
    await page.click("#confirm-ok")
    await wait_term(page, re.compile(r"NMI (received|rec)"), timeout=20)
    await shot(page, "console-qemu-1280x800")
    await ctx.close()
