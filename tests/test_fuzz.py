"""Bad input, generated: WebSocket control frames, HTTP query parameters, config files.

The daemon is a real ``serialmuxd run`` process with two demo consoles:
``fuzz`` takes the input, ``other`` must keep echoing throughout.  Every case
answers with a clear error (JSON ``{"error", "message"}``, status below 500, or
an ``error`` frame with the session left open; a text frame that is not UTF-8
is a protocol error, closed 1007), and the process stays up.  The config
loader gets generated TOML text and answers with a config or a ConfigError
naming the file, nothing else.  Console names with ``/``, ``..``, NUL or 10 kB
are refused in URLs, percent-encoded or not.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from serialmuxd.config import load_config
from serialmuxd.errors import ConfigError

pytestmark = pytest.mark.slow

HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# --- a daemon process and plain clients ---------------------------------------------------


@dataclass
class Target:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the daemon died: {self.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "fuzz.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp}/state"\n[http]\nlisten = ["127.0.0.1:{port}"]\n'
        '[[console]]\nname = "fuzz"\nuart = "demo:?boot=0&baud=0"\n'
        '[[console]]\nname = "other"\nuart = "demo:?boot=0&baud=0"\n'
    )
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serialmuxd", "run", "-c", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )
    t = Target(proc, port, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                if request(t, "GET", "/readyz")[0] == 200:
                    break
            assert time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.05)
        yield t
        t.alive()
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[text.index("Traceback") - 300 :][:3000]
    finally:
        proc.terminate()
        proc.wait(10)


def request(t: Target, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type); a streaming answer (follow=1) is cut after its headers."""
    conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        ctype = r.getheader("Content-Type", "")
        if r.status == 200 and r.getheader("Transfer-Encoding") == "chunked":
            return r.status, b"", ctype
        return r.status, r.read(), ctype
    finally:
        conn.close()


def assert_clear_answer(status: int, body: bytes, ctype: str, what: str) -> None:
    assert status < 500, f"{what}: {status} {body[:300]!r}"
    if status >= 400 and status != 499:
        assert ctype.startswith("application/json"), f"{what}: {status} with {ctype}: {body[:200]!r}"
        err = json.loads(body)
        assert isinstance(err.get("error"), str) and err["error"], what
        assert isinstance(err.get("message"), str) and len(err["message"]) > 10, what


class SyncWs:
    """A small blocking WebSocket client (masked frames, RFC 6455) for generated frames."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.closed: int | None = None

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        return data

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frame(self) -> tuple[int, bytes] | None:
        """The next whole frame in the buffer, consumed; None while incomplete (a read
        timeout then never leaves half a frame behind)."""
        buf = self.buf
        if len(buf) < 2:
            return None
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < at + n:
            return None
        opcode, payload = buf[0] & 0x0F, buf[at : at + n]
        self.buf = buf[at + n :]
        if opcode == 0x8:
            self.closed = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        return opcode, payload

    def recv(self) -> tuple[int, bytes]:
        while (frame := self._frame()) is None:
            self.buf += self._recv()
        return frame

    def close(self) -> None:
        self.sock.close()


def answer_until_pong(ws: SyncWs) -> list[dict[str, object]]:
    """Send a ping and collect the control frames that come before the pong."""
    ws.send(0x1, b'{"type":"ping"}')
    frames: list[dict[str, object]] = []
    while True:
        opcode, payload = ws.recv()
        if opcode == 0x8:
            raise AssertionError(f"session closed {ws.closed}: {payload!r}")
        if opcode == 0x1:
            msg = json.loads(payload)
            if msg["type"] == "pong":
                return frames
            frames.append(msg)


def echoes(t: Target, console: str = "other") -> None:
    """The console answers a command through an interactive session (typed again each
    second: a fuzzed console may be rebooting after a SysRq or a reset)."""
    ws = SyncWs(t.port, f"/api/v1/consoles/{console}/session")
    ws.sock.settimeout(1.0)
    try:
        tag = f"alive-{time.monotonic_ns()}"
        seen = b""
        deadline = time.monotonic() + 15
        while f"\r\n{tag}".encode() not in seen:
            assert time.monotonic() < deadline, f"{console} did not echo: {seen[-300:]!r}"
            ws.send(0x2, f"echo {tag}\r".encode())
            with contextlib.suppress(TimeoutError):
                while True:
                    opcode, payload = ws.recv()
                    assert opcode != 0x8, f"{console} closed {ws.closed}"
                    if opcode == 0x2:
                        seen += payload
                    if f"\r\n{tag}".encode() in seen:
                        break
    finally:
        ws.close()


# --- WebSocket control frames ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
control_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["ping", "break", "sysrq", "nmi", "reset", "launch", "", "PING"])
        | st.text(max_size=12)
    },
    optional={"key": json_values | st.sampled_from(["h", "b", "", "hh", "\x00", "é"]), "pad": json_values},
)
# b (reboot) and c (crash) are fine on the fuzz console: the session must survive them too.
frames = st.one_of(
    control_like.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=200).map(str.encode),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def ws_holder(target: Target) -> Iterator[dict[str, SyncWs]]:
    holder = {"ws": SyncWs(target.port, "/api/v1/consoles/fuzz/session")}
    yield holder
    holder["ws"].close()


@settings(max_examples=300, deadline=None, suppress_health_check=HEALTH)
@given(payload=frames)
def test_fuzzed_control_frames_get_error_frames_and_the_session_stays(
    target: Target, ws_holder: dict[str, SyncWs], payload: bytes
) -> None:
    """Any text frame: an error frame (or the action's effect), never a dropped session;
    a frame that is not UTF-8 text is closed 1007 (a protocol error) and nothing else."""
    ws = ws_holder["ws"]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    ws.send(0x1, payload)
    if text is None:
        while ws.closed is None:
            ws.recv()
        assert ws.closed == 1007
        ws.close()
        ws_holder["ws"] = SyncWs(target.port, "/api/v1/consoles/fuzz/session")
        return
    for frame in answer_until_pong(ws):
        assert frame["type"] in {"error", "state", "hello"}, frame
        if frame["type"] == "error":
            assert isinstance(frame["error"], str) and isinstance(frame["message"], str) and frame["message"]
    target.alive()


def test_after_control_fuzz_both_consoles_still_echo(target: Target) -> None:
    target.alive()
    echoes(target, "other")
    echoes(target, "fuzz")


# --- HTTP query parameters ---------------------------------------------------------------------

ROUTES = [
    ("GET", "/api/v1/consoles"),
    ("GET", "/api/v1/consoles/{name}"),
    ("GET", "/api/v1/consoles/{name}/log"),
    ("GET", "/api/v1/consoles/{name}/wait"),
    ("GET", "/api/v1/consoles/{name}/session"),
    ("POST", "/api/v1/consoles/{name}/break"),
    ("POST", "/api/v1/consoles/{name}/sysrq"),
    ("POST", "/api/v1/consoles/{name}/nmi"),
    ("POST", "/api/v1/consoles/{name}/reset"),
    ("GET", "/api/v1/service"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
]
PARAMS = ["start", "max_bytes", "since", "follow", "pattern", "timeout_s", "mode", "console"]
values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(
        [
            "",
            "-0",
            "1e3",
            "0x10",
            " 1",
            "١٢",  # Arabic-Indic digits: isdigit() says yes, int() agrees, a regex may not
            "9" * 30,
            "2026-11-27T07:00:00Z",
            "2026-13-45T99:99:99Z",
            "1970-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00-23:59",
            "(a)\\1",
            "(",
            "a{100000}",
            "(?P<x>a)",
            "\\C",
            "[[:alpha:]]",
            "watch",
            "interactive",
            "true",
            "yes",
            "fuzz",
            "../other",
            "%00",
            "x" * 5000,
        ]
    ),
)
names = st.one_of(
    st.just("fuzz"),
    st.text(max_size=70),
    st.sampled_from(["..", ".", "a/b", "fuzz/..", "%2e%2e", "..%2F", "\x00", "x" * 10_000, "other%00"]),
)


def _wait_bounded(params: dict[str, str]) -> bool:
    """/wait with a real pattern and a long timeout would only make the test wait."""
    raw = params.get("timeout_s")
    if raw is None or raw == "":
        return False  # absent or empty: the daemon's default, 30 s
    try:
        return int(raw) <= 1
    except ValueError:
        return True


@settings(max_examples=400, deadline=None, suppress_health_check=HEALTH)
@given(
    route=st.sampled_from(ROUTES),
    name=names,
    params=st.dictionaries(st.sampled_from(PARAMS), values, max_size=4),
    body=st.none() | st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()),
    raw_name=st.booleans(),
)
def test_fuzzed_query_parameters_get_json_errors_never_5xx(
    target: Target,
    route: tuple[str, str],
    name: str,
    params: dict[str, str],
    body: bytes | None,
    raw_name: bool,
) -> None:
    """Random strings for every parameter of every route: a 2xx, or a 4xx JSON error with a
    message; the daemon stays up."""
    method, template = route
    if template.endswith("/wait"):
        assume(_wait_bounded(params) or "pattern" not in params)
        params.setdefault("timeout_s", "0")
        assume(_wait_bounded(params))
    if params.get("follow", "").lower() in {"1", "true", "yes"} and template.endswith("/log"):
        params["max_bytes"] = "0"  # a follow stream is cut after its headers anyway
    quoted = urllib.parse.quote(name, safe="") if not raw_name or not name.isascii() else name
    quoted = "".join(c if 32 < ord(c) < 127 and c not in "?#" else urllib.parse.quote(c) for c in quoted)
    path = template.replace("{name}", quoted)
    if params:
        path += "?" + urllib.parse.urlencode(params)
    try:
        status, data, ctype = request(target, method, path, body if method == "POST" else None)
    except http.client.HTTPException as e:
        raise AssertionError(f"{method} {path[:200]}: broken answer {e!r}") from None
    assert_clear_answer(status, data, ctype, f"{method} {path[:200]}")
    target.alive()


def test_after_query_fuzz_other_console_still_echoes(target: Target) -> None:
    target.alive()
    echoes(target, "other")


@pytest.mark.parametrize(
    "name",
    [
        "a/b",
        "a%2Fb",
        "a%2fb",
        "..",
        "%2E%2E",
        "%2e%2e",
        ".%2E",
        "%00",
        "fuzz%00",
        "%C0%AE%C0%AE",
        "x" * 10_000,
        "%78" * 3000,
        "fuzz%2F..%2Fother",
        "..%2Fstate%2Fcookie.key",
    ],
)
def test_console_names_with_slash_dots_nul_or_10kb_refused_in_urls(target: Target, name: str) -> None:
    """Every console route refuses a bad name with a 4xx JSON error; none reaches a file."""
    for method, template in ROUTES:
        if "{name}" not in template:
            continue
        path = template.replace("{name}", name)
        status, data, ctype = request(target, method, path)
        assert 400 <= status < 500, f"{method} {path[:80]}: {status}"
        assert_clear_answer(status, data, ctype, f"{method} {path[:80]}")
    status, data, ctype = request(target, "GET", "/api/v1/audit?console=" + name)
    assert 400 <= status < 500 and json.loads(data)["error"]


# --- the config loader ------------------------------------------------------------------------


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is JSON-compatible for these
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


SETTING_KEYS = [
    "baud",
    "ring_bytes",
    "replay_bytes",
    "idle_timeout_s",
    "detach_sequence",
    "client_buffer_bytes",
]
scalars = st.one_of(
    st.sampled_from([10**400, -(10**400), 0, -1, 4096, 1 << 30, (1 << 30) + 1]),
    st.booleans(),
    st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["unix:/run/q.sock", "demo:", "demo:?rate=0", "tcp:[::1]:99999", "/dev/ttyS0", "x"]),
)
tables = {
    "daemon": [
        "state_dir",
        "unix_listen_dir",
        "unix_socket_group",
        "log_level",
        "log_format",
        "shutdown_timeout_s",
    ],
    "http": [
        "listen",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "metrics_listen",
        "allow_plaintext",
        "path_prefix",
        "trusted_proxies",
        "session_cookie_max_age_s",
    ],
    "defaults": SETTING_KEYS,
}
key_values = st.lists(scalars, max_size=3) | scalars


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    out: list[str] = []
    for table, keys in tables.items():
        if draw(st.booleans()):
            out.append(f"[{table}]")
            for k in draw(st.lists(st.sampled_from([*keys, "bogus"]), max_size=4, unique=True)):
                out.append(f"{k} = {toml_value(draw(key_values))}")
    for _ in range(draw(st.integers(0, 3))):
        out.append("[[console]]")
        keys = ["name", "uart", "qmp", "qmp_chardev", *SETTING_KEYS, "bogus"]
        for k in draw(st.lists(st.sampled_from(keys), max_size=5, unique=True)):
            v = draw(st.one_of(key_values, st.sampled_from(["vm1", "a/b", "..", "x" * 100, "demo:"])))
            out.append(f"{k} = {toml_value(v)}")
    for _ in range(draw(st.integers(0, 2))):
        out.append("[[user]]")
        for k in draw(
            st.lists(st.sampled_from(["name", "token_sha256", "roles", "bogus"]), max_size=4, unique=True)
        ):
            v = draw(
                st.one_of(
                    key_values, st.just("a" * 64), st.dictionaries(st.text(max_size=5), scalars, max_size=2)
                )
            )
            out.append(f"{k} = {toml_value(v)}")
    text = "\n".join(out) + "\n"
    # Some documents get a random edit: a cut, a stray byte sequence, a duplicate line.
    edit = draw(st.integers(0, 3))
    if edit == 1 and text:
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == 2:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=10)) + text[at:]
    elif edit == 3 and out:
        text += draw(st.sampled_from(out)) + "\n"
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=HEALTH)
@given(text=config_texts() | st.text(max_size=300), raw=st.binary(max_size=40))
@example(text="[defaults]\nidle_timeout_s = 1" + "0" * 400 + "\n", raw=b"")
@example(text='[[console]]\nname = "vm1"\nuart = "demo:"\nidle_timeout_s = -1' + "0" * 400, raw=b"")
@example(text="[daemon]\nshutdown_timeout_s = " + "1" * 5000, raw=b"")
@example(text="a = " + "[" * 5000, raw=b"")
@example(text="a = " + "{b=" * 2000, raw=b"")
def test_fuzzed_config_text_loads_or_fails_with_config_error_naming_the_file(
    tmp_path: Path, text: str, raw: bytes
) -> None:
    """Whatever the file holds (valid TOML of the wrong shape, broken TOML, not UTF-8), the
    loader returns a config or raises ConfigError starting with the file name."""
    path = tmp_path / "fuzz.toml"
    data = text.encode("utf-8", "surrogatepass") + (raw if len(raw) % 3 == 0 else b"")
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: "), str(e)
