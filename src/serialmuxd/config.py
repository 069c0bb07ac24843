"""Configuration: TOML in, frozen typed structures out.

Validation is pure (``parse_config`` takes the decoded TOML mapping) so every
rule is unit-tested without files.  Every error names the file and the key
path the way an operator would look for it: ``config.toml: console[2] (vm3).uart: …``
with arrays counted from 0.  Unknown keys are errors: a typo must not silently
turn a safety setting off.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import Any

from serialmuxd.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MIN_RING_BYTES = 4096
MAX_RING_BYTES = 1 << 30


class Role(IntEnum):
    """Each role includes the ones before it."""

    READER = 1
    CONTRIBUTOR = 2
    OWNER = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class ConsoleSettings:
    """Keys of ``[defaults]``; any of them may be overridden per console."""

    baud: int = 115200
    ring_bytes: int = 1 << 20
    replay_bytes: int = 4096
    idle_timeout_s: float = 0.0
    detach_sequence: bytes = b""
    # Output queued for one slow client before it is dropped with 4009 ``too_slow``.
    # A bound per session keeps memory flat however many clients stall.
    client_buffer_bytes: int = 256 * 1024
    # When the interactive client is over its buffer, hold the UART for at most
    # this long while it drains (flow control for a fast client during a flood);
    # a client that has not drained by then is dropped as too_slow.  0 = never
    # hold: drop at once.  Watchers are never held for.
    flow_hold_ms: int = 200
    # While a console prints continuously, send its output to clients at most
    # once per this many milliseconds, in one write per client, instead of one
    # write per chunk read from the UART: the same bytes for far fewer system
    # calls.  A console that was quiet, and the window after a keystroke, go
    # out at once.  The UART is always read as data arrives.  0 = per chunk.
    coalesce_ms: int = 50


@dataclass(frozen=True)
class ConsoleConfig:
    name: str
    uart: str
    settings: ConsoleSettings
    qmp: str | None = None
    qmp_chardev: str = "serial0"

    @property
    def qmp_path(self) -> str | None:
        return self.qmp[len("unix:") :] if self.qmp else None


@dataclass(frozen=True)
class UserConfig:
    name: str
    token_sha256: bytes = field(repr=False)
    # (glob, role) in file order; the highest role of all matching globs wins.
    roles: tuple[tuple[str, Role], ...] = ()


@dataclass(frozen=True)
class HttpConfig:
    listen: tuple[str, ...] = ("127.0.0.1:7480",)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    metrics_listen: str = ""
    allow_plaintext: bool = False
    path_prefix: str = ""
    trusted_proxies: tuple[str, ...] = ()
    session_cookie_max_age_s: int = 12 * 3600
    request_head_timeout_s: float = 30.0

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = "/var/lib/serialmuxd"
    unix_listen_dir: str = ""
    unix_socket_group: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout_s: float = 5.0


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = DaemonConfig()
    http: HttpConfig = HttpConfig()
    defaults: ConsoleSettings = ConsoleSettings()
    consoles: tuple[ConsoleConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()
    source: str = "<memory>"

    def console(self, name: str) -> ConsoleConfig | None:
        for c in self.consoles:
            if c.name == name:
                return c
        return None


# --- parsing ---------------------------------------------------------------


class _Ctx:
    """Carries the file name so every error says where to look."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")


def _type_name(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _check_keys(ctx: _Ctx, path: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            hint = ", ".join(sorted(allowed))
            raise ctx.error(f"{path}.{key}" if path else key, f"unknown key (allowed: {hint})")


def _str(ctx: _Ctx, path: str, v: object) -> str:
    if not isinstance(v, str):
        raise ctx.error(path, f"must be a string, not {_type_name(v)}")
    if "\x00" in v:
        raise ctx.error(path, "must not contain NUL characters")
    return v


def _bool(ctx: _Ctx, path: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ctx.error(path, f"must be true or false, not {_type_name(v)}")
    return v


def _int(ctx: _Ctx, path: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.error(path, f"must be an integer, not {_type_name(v)}")
    if not lo <= v <= hi:
        raise ctx.error(path, f"must be between {lo} and {hi}, got {v}")
    return v


def _number(ctx: _Ctx, path: str, v: object, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.error(path, f"must be a number, not {_type_name(v)}")
    if isinstance(v, int) and not lo <= v <= hi:
        # Checked before float(): TOML integers can be too large for a float.
        shown = str(v) if abs(v) < 10**15 else f"an integer of {len(str(abs(v)))} digits"
        raise ctx.error(path, f"must be between {lo:g} and {hi:g}, got {shown}")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise ctx.error(path, f"must be between {lo:g} and {hi:g}, got {v}")
    return f


def _table(ctx: _Ctx, path: str, v: object) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise ctx.error(path, f"must be a table, not {_type_name(v)}")
    return v


def _array(ctx: _Ctx, path: str, v: object) -> list[Any]:
    if not isinstance(v, list):
        raise ctx.error(path, f"must be an array, not {_type_name(v)}")
    return v


def validate_listen(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError with a reason."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\[\]:]+):(\d{1,5})", address)
    if not m:
        raise ValueError(f"{address!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_uart(spec: str) -> str | None:
    """Returns a reason when ``spec`` is not a backend we know, else None."""
    if spec.startswith("unix:"):
        path = spec[5:]
        return None if path.startswith("/") else "unix: needs an absolute path (unix:/run/qemu/vm1.serial)"
    if spec.startswith("demo:"):
        from serialmuxd.backends.demo import parse_demo_spec

        try:
            parse_demo_spec(spec)
        except ValueError as e:
            return str(e)
        return None
    if spec.startswith("tcp:"):
        try:
            validate_listen(spec[4:])
        except ValueError as e:
            return f"tcp: needs HOST:PORT ({e})"
        return None
    if re.match(r"(socket|rfc2217|loop|spy|alt|hwgrep)://", spec):
        return None
    if spec.startswith("/dev/"):
        return None
    return (
        f"unknown backend {spec!r}: use unix:/path (QEMU socket chardev), /dev/ttyS1 or "
        "/dev/pts/N (tty or pty), tcp:HOST:PORT or socket:// / rfc2217:// URLs, or demo:"
    )


_SETTING_KEYS = {f.name for f in fields(ConsoleSettings)}


def _settings(ctx: _Ctx, path: str, table: Mapping[str, Any], base: ConsoleSettings) -> ConsoleSettings:
    changes: dict[str, Any] = {}
    for key in _SETTING_KEYS & table.keys():
        p = f"{path}.{key}" if path else key
        v = table[key]
        if key == "baud":
            changes[key] = _int(ctx, p, v, 50, 4_000_000)
        elif key == "ring_bytes":
            changes[key] = _int(ctx, p, v, MIN_RING_BYTES, MAX_RING_BYTES)
        elif key == "replay_bytes":
            changes[key] = _int(ctx, p, v, 0, MAX_RING_BYTES)
        elif key == "idle_timeout_s":
            changes[key] = _number(ctx, p, v, 0, 30 * 86400)
        elif key == "detach_sequence":
            s = _str(ctx, p, v)
            if len(s) > 256:
                raise ctx.error(p, "must be at most 256 characters")
            changes[key] = s.encode()
        elif key == "client_buffer_bytes":
            changes[key] = _int(ctx, p, v, 4096, 64 << 20)
        elif key == "flow_hold_ms":
            changes[key] = _int(ctx, p, v, 0, 10_000)
        elif key == "coalesce_ms":
            changes[key] = _int(ctx, p, v, 0, 1000)
    settings = replace(base, **changes)
    if settings.replay_bytes > settings.ring_bytes:
        raise ctx.error(
            f"{path}.replay_bytes" if path else "replay_bytes",
            f"must not exceed ring_bytes ({settings.ring_bytes})",
        )
    return settings


def validate_console_name(name: str) -> str | None:
    """Reason the name is unusable (it becomes a file name and a URL part), else None."""
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 70 else name[:64] + "…"
        return f"{shown!r} is not a valid console name: use 1-64 of A-Z a-z 0-9 . _ -"
    if name in {".", ".."}:
        return f"{name!r} is not a valid console name"
    return None


def _console(ctx: _Ctx, i: int, raw: object, defaults: ConsoleSettings) -> ConsoleConfig:
    table = _table(ctx, f"console[{i}]", raw)
    name_v = table.get("name")
    path = f"console[{i}]"
    if name_v is None:
        raise ctx.error(path, "missing key 'name'")
    name = _str(ctx, f"{path}.name", name_v)
    reason = validate_console_name(name)
    if reason:
        raise ctx.error(f"{path}.name", reason)
    path = f"console[{i}] ({name})"
    _check_keys(ctx, path, table, {"name", "uart", "qmp", "qmp_chardev"} | _SETTING_KEYS)
    if "uart" not in table:
        raise ctx.error(path, "missing key 'uart' (e.g. uart = \"unix:/run/qemu/vm1.serial\")")
    uart = _str(ctx, f"{path}.uart", table["uart"])
    reason = validate_uart(uart)
    if reason:
        raise ctx.error(f"{path}.uart", reason)
    qmp: str | None = None
    if "qmp" in table:
        qmp = _str(ctx, f"{path}.qmp", table["qmp"]) or None
        if qmp is not None and not (qmp.startswith("unix:/")):
            raise ctx.error(f"{path}.qmp", "must be unix:/absolute/path of the VM's QMP socket")
    chardev = _str(ctx, f"{path}.qmp_chardev", table.get("qmp_chardev", "serial0"))
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,127}", chardev):
        raise ctx.error(f"{path}.qmp_chardev", "must be a QEMU id such as serial0")
    settings = _settings(ctx, path, table, defaults)
    return ConsoleConfig(name=name, uart=uart, settings=settings, qmp=qmp, qmp_chardev=chardev)


def _user(ctx: _Ctx, i: int, raw: object) -> UserConfig:
    table = _table(ctx, f"user[{i}]", raw)
    path = f"user[{i}]"
    if "name" not in table:
        raise ctx.error(path, "missing key 'name'")
    name = _str(ctx, f"{path}.name", table["name"])
    if not USER_RE.fullmatch(name):
        raise ctx.error(f"{path}.name", "use 1-64 of A-Z a-z 0-9 . _ - @")
    path = f"user[{i}] ({name})"
    _check_keys(ctx, path, table, {"name", "token_sha256", "roles"})
    if "token_sha256" not in table:
        raise ctx.error(path, "missing key 'token_sha256' (run `serialmuxd token` to make one)")
    digest = _str(ctx, f"{path}.token_sha256", table["token_sha256"]).lower()
    if not SHA256_RE.fullmatch(digest):
        raise ctx.error(
            f"{path}.token_sha256",
            "must be 64 hex digits, the SHA-256 of the token (run `serialmuxd token`)",
        )
    roles_t = _table(ctx, f"{path}.roles", table.get("roles", {}))
    roles: list[tuple[str, Role]] = []
    for glob, role_v in roles_t.items():
        rp = f'{path}.roles."{glob}"'
        role_s = _str(ctx, rp, role_v)
        try:
            role = Role[role_s.upper()]
        except KeyError:
            raise ctx.error(rp, f"unknown role {role_s!r}: use reader, contributor or owner") from None
        if not glob or len(glob) > 128:
            raise ctx.error(rp, "the console-name glob must be 1-128 characters")
        roles.append((glob, role))
    return UserConfig(name=name, token_sha256=bytes.fromhex(digest), roles=tuple(roles))


def parse_config(data: Mapping[str, Any], source: str = "<memory>") -> Config:
    """Validate a decoded TOML document.  Raises ConfigError naming the key path."""
    ctx = _Ctx(source)
    _check_keys(ctx, "", data, {"daemon", "http", "defaults", "console", "user"})

    d = _table(ctx, "daemon", data.get("daemon", {}))
    _check_keys(ctx, "daemon", d, {f.name for f in fields(DaemonConfig)})
    daemon = DaemonConfig(
        state_dir=_str(ctx, "daemon.state_dir", d.get("state_dir", DaemonConfig.state_dir)),
        unix_listen_dir=_str(ctx, "daemon.unix_listen_dir", d.get("unix_listen_dir", "")),
        unix_socket_group=_str(ctx, "daemon.unix_socket_group", d.get("unix_socket_group", "")),
        log_level=_str(ctx, "daemon.log_level", d.get("log_level", "info")).lower(),
        log_format=_str(ctx, "daemon.log_format", d.get("log_format", "auto")).lower(),
        shutdown_timeout_s=_number(
            ctx, "daemon.shutdown_timeout_s", d.get("shutdown_timeout_s", 5.0), 0.1, 600
        ),
    )
    if not daemon.state_dir:
        raise ctx.error("daemon.state_dir", "must name a directory for ring logs and state")
    if daemon.log_level not in {"debug", "info", "warning", "error"}:
        raise ctx.error("daemon.log_level", "use debug, info, warning or error")
    if daemon.log_format not in {"auto", "json", "console"}:
        raise ctx.error("daemon.log_format", "use auto, json or console")

    h = _table(ctx, "http", data.get("http", {}))
    _check_keys(ctx, "http", h, {f.name for f in fields(HttpConfig)})
    listen_raw = _array(ctx, "http.listen", h.get("listen", list(HttpConfig.listen)))
    listen = tuple(_str(ctx, f"http.listen[{i}]", v) for i, v in enumerate(listen_raw))
    for i, addr in enumerate(listen):
        try:
            validate_listen(addr)
        except ValueError as e:
            raise ctx.error(f"http.listen[{i}]", str(e)) from None
    metrics_listen = _str(ctx, "http.metrics_listen", h.get("metrics_listen", ""))
    if metrics_listen:
        try:
            validate_listen(metrics_listen)
        except ValueError as e:
            raise ctx.error("http.metrics_listen", str(e)) from None
    proxies_raw = _array(ctx, "http.trusted_proxies", h.get("trusted_proxies", []))
    proxies = tuple(_str(ctx, f"http.trusted_proxies[{i}]", v) for i, v in enumerate(proxies_raw))
    for i, p in enumerate(proxies):
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            raise ctx.error(f"http.trusted_proxies[{i}]", f"{p!r} is not an IP address or network") from None
    prefix = _str(ctx, "http.path_prefix", h.get("path_prefix", "")).rstrip("/")
    if prefix and (not prefix.startswith("/") or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", prefix)):
        raise ctx.error("http.path_prefix", "must look like /host7 (slash-separated URL-safe words)")
    http = HttpConfig(
        listen=listen,
        tls_cert=_str(ctx, "http.tls_cert", h.get("tls_cert", "")),
        tls_key=_str(ctx, "http.tls_key", h.get("tls_key", "")),
        tls_client_ca=_str(ctx, "http.tls_client_ca", h.get("tls_client_ca", "")),
        metrics_listen=metrics_listen,
        allow_plaintext=_bool(ctx, "http.allow_plaintext", h.get("allow_plaintext", False)),
        path_prefix=prefix,
        trusted_proxies=proxies,
        session_cookie_max_age_s=_int(
            ctx,
            "http.session_cookie_max_age_s",
            h.get("session_cookie_max_age_s", 12 * 3600),
            60,
            30 * 86400,
        ),
        request_head_timeout_s=_number(
            ctx, "http.request_head_timeout_s", h.get("request_head_timeout_s", 30.0), 1, 3600
        ),
    )
    if bool(http.tls_cert) != bool(http.tls_key):
        raise ctx.error(
            "http.tls_key" if http.tls_cert else "http.tls_cert", "tls_cert and tls_key go together"
        )
    if http.tls_client_ca and not http.tls_cert:
        raise ctx.error("http.tls_client_ca", "mutual TLS needs tls_cert and tls_key as well")
    if not http.tls and not http.allow_plaintext:
        for i, addr in enumerate(http.listen):
            host, _ = validate_listen(addr)
            if not is_loopback(host):
                raise ctx.error(
                    f"http.listen[{i}]",
                    f"{addr} is not a loopback address and TLS is off: set tls_cert and tls_key, "
                    "or allow_plaintext = true if a TLS proxy in front of it is trusted",
                )

    if not data.get("user"):
        # No users means open access (everyone is owner): only for this host's own users.
        for i, addr in enumerate(http.listen):
            host, _ = validate_listen(addr)
            if not is_loopback(host):
                raise ctx.error(
                    f"http.listen[{i}]",
                    f"{addr} is not a loopback address and no [[user]] is configured, which would make "
                    "everyone who reaches it owner: add users (serialmuxd token) or listen on 127.0.0.1",
                )

    dt = _table(ctx, "defaults", data.get("defaults", {}))
    _check_keys(ctx, "defaults", dt, _SETTING_KEYS)
    defaults = _settings(ctx, "defaults", dt, ConsoleSettings())

    consoles: list[ConsoleConfig] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(_array(ctx, "console", data.get("console", []))):
        c = _console(ctx, i, raw, defaults)
        if c.name in seen:
            raise ctx.error(
                f"console[{i}] ({c.name}).name",
                f"duplicate: console[{seen[c.name]}] has the same name",
            )
        seen[c.name] = i
        consoles.append(c)

    users: list[UserConfig] = []
    seen_u: dict[str, int] = {}
    for i, raw in enumerate(_array(ctx, "user", data.get("user", []))):
        u = _user(ctx, i, raw)
        if u.name in seen_u:
            raise ctx.error(
                f"user[{i}] ({u.name}).name", f"duplicate: user[{seen_u[u.name]}] has the same name"
            )
        seen_u[u.name] = i
        users.append(u)

    return Config(
        daemon=daemon,
        http=http,
        defaults=defaults,
        consoles=tuple(consoles),
        users=tuple(users),
        source=source,
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file.  Raises ConfigError with file and key path."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:
        # tomllib lets these through: an integer of more than 4300 digits, or
        # arrays and tables nested thousands deep.
        raise ConfigError(f"{p}: not valid TOML: {str(e)[:120]}") from None
    return parse_config(data, source=str(p))
